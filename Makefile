# Quick start: `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv and install everything they need on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dhkd-installed

TRITON36 := $(VENV)/triton36

.PHONY: install demo test bench

$(STAMP): setup.py
	@echo "[make] creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	@echo "[make] upgrading pip"
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "[make] installing torch 2.14.1 and torchvision with their CUDA libraries (about 6 GB: the longest step, often minutes)"
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	@echo "[make] installing dhkd with its dev and train extras (pytest, tqdm, mnist1d, tensorboard, nvidia-dali, ...)"
	$(BIN)/python -m pip install -q -e '.[dev,train,dali]'
	@echo "[make] installed into $(VENV)"
	touch $(STAMP)

install: $(STAMP)

# the GPU image's Triton beside the installed one, for the sm_90 compile checks (tests/test_compile_report.py)
$(TRITON36)/.installed: $(STAMP)
	@echo "[make] installing triton 3.6.0 into $(TRITON36) for the compile checks"
	$(BIN)/python -m pip install -q --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

demo: $(STAMP)
	$(BIN)/dhkd demo

test: $(STAMP) $(TRITON36)/.installed
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q benchmarks/ --benchmark-only

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks/ --benchmark-only --benchmark-json bench.json
	$(BIN)/python benchmarks/report.py bench.json --out bench-report
