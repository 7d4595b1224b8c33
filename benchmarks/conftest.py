"""Benchmark session set-up: machine details into pytest-benchmark's JSON and the report header."""
from __future__ import annotations

import torch


def _machine() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def pytest_report_header(config):
    m = _machine()
    return (f"dhkd benchmarks: torch {m['torch']}, triton {m['triton']}, "
            f"device {m.get('gpu', 'CPU only')}, torch threads {m['torch_threads']}")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dhkd"] = _machine()
