"""Docs that must match the code: numbers only with the run that produced them, the logit-loss scale
advice of the README against the shipped recipes and the loss itself, make's install messages."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dhkd.cli import main
from dhkd.config import load_config
from dhkd_kernels import fused_dual_head_kd_loss

ROOT = Path(__file__).resolve().parents[1]
DURATION = re.compile(r"\b(\d+(?:\.\d+)?) ?(s|seconds|min|minutes)\b")


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", re.sub(r"\s+", " ", text))]


def test_demo_help_quotes_no_time(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert not DURATION.search(capsys.readouterr().out)


def test_timings_and_results_in_docs_name_their_run():
    """Every sentence of README.md and docs/training.md that gives the demo's or the test suite's time,
    or the demo's accuracies, names the machine and the commit it was measured at; the demo's time is
    the same number everywhere."""
    demo_times = set()
    for doc in ("README.md", "docs/training.md"):
        for s in sentences((ROOT / doc).read_text(encoding="utf-8")):
            timed = DURATION.search(s) and re.search(r"\b(demo|make test|pytest)\b", s)
            scored = "demo" in s.lower() and re.search(r"\d+\.\d ± \d+\.\d", s)
            if timed or scored:
                assert "2-core" in s and re.search(r"commit [0-9a-f]{7}", s), f"{doc}: {s}"
            if timed and "demo" in s:
                demo_times.add(DURATION.search(s).group(0))
    assert len(demo_times) <= 1, demo_times


def test_logit_weight_advice_matches_the_recipes_and_the_loss():
    readme = re.sub(r"\s+", " ", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert "`logit_weight=1` on CIFAR-100" in readme and "`logit_weight=0.1` on ImageNet" in readme
    for path, weight in (("cifar100", 1.0), ("imagenet", 0.1)):
        for f in sorted((ROOT / "configs" / path).glob("*.yaml")):
            assert load_config(f).loss.logit_weight == weight, f
    # the sum over classes: the same gap in every class, 10x the classes -> 10x the logit term
    terms = []
    for c in (100, 1000):
        f = torch.zeros(4, 8, dtype=torch.float64)
        w, b = torch.zeros(c, 8, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
        t = torch.full((4, c), 3.0, dtype=torch.float64)
        _, parts = fused_dual_head_kd_loss(f, w, b, w, b, t, torch.zeros(4, dtype=torch.long), backend="reference",
                                           return_components=True)
        terms.append(float(parts["logit"]))
    assert terms[1] == pytest.approx(10 * terms[0], rel=1e-9)


def test_make_says_what_each_long_install_step_does():
    recipe = (ROOT / "Makefile").read_text().split("$(STAMP): setup.py\n", 1)[1].split("\n\n", 1)[0].splitlines()
    for i, line in enumerate(recipe):
        if " -m venv " in line or "pip install" in line:
            assert recipe[i - 1].strip().startswith("@echo "), line
