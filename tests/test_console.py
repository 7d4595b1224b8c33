"""The installed ``dhkd`` console script itself (not ``python -m dhkd``): ``dhkd bench --report``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bench_report import bench_json  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("dhkd")


@pytest.mark.skipif(not SCRIPT.is_file(), reason=f"no dhkd console script next to {sys.executable} "
                                                  f"(pip install -e . installs it)")
def test_bench_report_from_the_console_script(bench_json, tmp_path):  # noqa: F811
    """From the repository root and from elsewhere. PYTHONPATH holds links to this checkout's packages
    only, so the script runs this code without the checkout's benchmarks/ on sys.path (as an installed
    script does)."""
    links = tmp_path / "path"
    links.mkdir()
    for pkg in ("dhkd", "dhkd_kernels"):
        (links / pkg).symlink_to(ROOT / pkg, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(links)}
    for cwd, charts in ((ROOT, []), (tmp_path, ["--no-charts"])):
        out = tmp_path / f"report-{cwd.name}"
        proc = subprocess.run([str(SCRIPT), "bench", "--report", str(bench_json), "--out", str(out), *charts], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "imagenet-r18" in (out / "benchmarks.md").read_text()
