"""Render pytest-benchmark JSON from the dhkd benchmarks as a Markdown table and PNG charts.

    pytest benchmarks/ --benchmark-only --benchmark-json BENCH.json
    python benchmarks/report.py BENCH.json [MORE.json ...] --out DIR

Writes DIR/benchmarks.md (one table per dtype and mode, then the training-step rows if any) and, per
dtype and mode, DIR/time_<dtype>_<mode>.png and DIR/memory_<dtype>_<mode>.png (memory only when peak
CUDA memory was recorded). Standalone: needs only the standard library and matplotlib.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict

MODE_ORDER = ("forward", "backward", "forward+backward")
PROVIDER_ORDER = ("gemm-floor", "fused", "reference", "compiled", "liger", "cce")


def load(path: str) -> dict:
    """pytest-benchmark JSON as a dict (ValueError naming the file when it is not one)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


def loss_rows(data: dict) -> list[dict]:
    """One dict per loss benchmark (those whose extra_info names a provider and a shape)."""
    rows = []
    for b in data["benchmarks"]:
        e = b.get("extra_info") or {}
        if "provider" not in e or "shape" not in e:
            continue
        s = b["stats"]
        rows.append(dict(
            provider=e["provider"], shape=e["shape"], dims=f"{e.get('n')}x{e.get('d')}x{e.get('c')}",
            dtype=e.get("dtype", "?"), mode=e.get("mode", "?"), partial=bool(e.get("partial")),
            median_ms=s["median"] * 1e3, iqr_ms=s.get("iqr", 0.0) * 1e3, rounds=s.get("rounds"),
            peak_mib=e.get("peak_extra_mib"), tflops=e.get("tflops"), floor_ratio=e.get("gemm_floor_ratio"),
            backend=e.get("backend"), device_name=e.get("device_name"),
            torch=e.get("torch"), triton=e.get("triton")))
    return rows


def other_rows(data: dict) -> list[dict]:
    rows = []
    for b in data["benchmarks"]:
        e = b.get("extra_info") or {}
        if "provider" in e and "shape" in e:
            continue
        rows.append(dict(name=b.get("name", "?"), median_ms=b["stats"]["median"] * 1e3,
                         images_per_s=e.get("images_per_s"), extra=e))
    return rows


def _order(values, preferred):
    seen = list(OrderedDict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def _slug(text: str) -> str:
    return text.replace("+", "_").replace(" ", "_").replace("/", "_")


def machine_line(data: dict, rows: list[dict]) -> str:
    m = data.get("machine_info", {})
    dh = m.get("dhkd", {})
    device = dh.get("gpu") or (rows[0]["device_name"] if rows else None) or \
        m.get("cpu", {}).get("brand_raw") or m.get("processor") or "unknown device"
    torch_v = dh.get("torch") or (rows[0]["torch"] if rows else "?")
    triton_v = dh.get("triton") or (rows[0]["triton"] if rows else "?")
    when = data.get("datetime", "unknown date")
    commit = data.get("commit_info", {}) or {}
    commit_s = f", commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}" \
        if commit.get("id") else ""
    threads = dh.get("torch_threads")
    threads_s = f", {threads} torch thread(s)" if threads and not dh.get("gpu") else ""
    return f"{device}{threads_s}; torch {torch_v}, triton {triton_v}; run {when}{commit_s}"


def markdown(data: dict, charts: dict) -> str:
    rows = loss_rows(data)
    lines = [f"Machine: {machine_line(data, rows)}", ""]
    if rows:
        lines += ["Median over timed rounds (synchronized), IQR, peak extra memory over the inputs "
                  "(CUDA only), achieved TFLOP/s of the nominal matmul work, time as a multiple of the "
                  "GEMM floor, and the reference's time divided by the provider's. * = partial peer.", ""]
    shapes = _order([r["shape"] for r in rows], ())
    for dtype in _order([r["dtype"] for r in rows], ("bf16", "fp32")):
        for mode in _order([r["mode"] for r in rows if r["dtype"] == dtype], MODE_ORDER):
            group = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
            lines += [f"### {dtype}, {mode}", "",
                      "| shape | N×D×C | provider | median ms | IQR ms | peak extra MiB | TFLOP/s "
                      "| × GEMM floor | vs reference |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for shape in shapes:
                here = [r for r in group if r["shape"] == shape]
                ref = next((r for r in here if r["provider"] == "reference"), None)
                for prov in _order([r["provider"] for r in here], PROVIDER_ORDER):
                    r = next(x for x in here if x["provider"] == prov)
                    name = prov + ("*" if r["partial"] else "") + \
                        (f" ({r['backend']})" if r.get("backend") else "")
                    speed = ref["median_ms"] / r["median_ms"] if ref and r["median_ms"] > 0 else None
                    lines.append(
                        f"| {shape} | {r['dims']} | {name} | {_fmt(r['median_ms'], '.3f')} | "
                        f"{_fmt(r['iqr_ms'], '.3f')} | {_fmt(r['peak_mib'], '.1f')} | "
                        f"{_fmt(r['tflops'], '.3g')} | {_fmt(r['floor_ratio'], '.2f')} | "
                        f"{_fmt(speed, '.2f')}{'×' if speed is not None else ''} |")
            lines.append("")
            for kind in ("time", "memory"):
                if (dtype, mode, kind) in charts:
                    lines += [f"![{kind}, {dtype}, {mode}]({charts[(dtype, mode, kind)]})", ""]
    others = other_rows(data)
    if others:
        lines += ["### Other benchmarks", "", "| benchmark | median ms | images/s |", "|---|---:|---:|"]
        for r in others:
            lines.append(f"| {r['name']} | {_fmt(r['median_ms'], '.3f')} | {_fmt(r['images_per_s'], ',.0f')} |")
        lines.append("")
    if not rows and not others:
        lines += ["No benchmark ran (every case skipped?).", ""]
    return "\n".join(lines)


def _bar_chart(path, title, ylabel, shapes, providers, value):
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the charts need matplotlib (pip install matplotlib); "
                           "--no-charts writes the table alone") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(shapes) + 2), 4.2))
    width = 0.8 / max(1, len(providers))
    positive = []
    for i, prov in enumerate(providers):
        xs, ys = [], []
        for j, shape in enumerate(shapes):
            v = value(shape, prov)
            if v is not None and v > 0:
                xs.append(j + (i - (len(providers) - 1) / 2) * width)
                ys.append(v)
        positive += ys
        if xs:
            ax.bar(xs, ys, width=width, label=prov)
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def charts(data: dict, out_dir: str) -> dict:
    """Write the PNG charts; returns {(dtype, mode, "time"|"memory"): file name}."""
    rows = loss_rows(data)
    made = {}
    shapes = _order([r["shape"] for r in rows], ())
    for dtype in _order([r["dtype"] for r in rows], ("bf16", "fp32")):
        for mode in _order([r["mode"] for r in rows if r["dtype"] == dtype], MODE_ORDER):
            group = {(r["shape"], r["provider"]): r for r in rows if r["dtype"] == dtype and r["mode"] == mode}
            here_shapes = [s for s in shapes if any(k[0] == s for k in group)]
            providers = _order([k[1] for k in group], PROVIDER_ORDER)
            name = f"time_{dtype}_{_slug(mode)}.png"
            _bar_chart(os.path.join(out_dir, name), f"median time, {dtype}, {mode}", "ms", here_shapes,
                       providers, lambda s, p: group[(s, p)]["median_ms"] if (s, p) in group else None)
            made[(dtype, mode, "time")] = name
            if any(r["peak_mib"] is not None for r in group.values()):
                name = f"memory_{dtype}_{_slug(mode)}.png"
                _bar_chart(os.path.join(out_dir, name), f"peak extra memory, {dtype}, {mode}", "MiB",
                           here_shapes, providers,
                           lambda s, p: group[(s, p)]["peak_mib"] if (s, p) in group else None)
                made[(dtype, mode, "memory")] = name
    return made


def load_all(paths) -> dict:
    """Several runs' JSON as one: machine and commit info from the first, every file's benchmarks."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs = [load(p) for p in paths]
    merged = dict(runs[0])
    merged["benchmarks"] = [b for run in runs for b in run["benchmarks"]]
    return merged


def render(json_paths, out_dir: str, *, with_charts: bool = True) -> str:
    """Read one or more JSON files, write ``out_dir``/benchmarks.md (and the charts); returns its path."""
    data = load_all(json_paths)
    os.makedirs(out_dir, exist_ok=True)
    made = charts(data, out_dir) if with_charts else {}
    path = os.path.join(out_dir, "benchmarks.md")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown(data, made))
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+",
                        help="pytest-benchmark JSON (from --benchmark-json); several files are merged, "
                             "e.g. a GPU suite run in pieces with -k")
    parser.add_argument("--out", required=True, help="directory for benchmarks.md and the PNG charts")
    parser.add_argument("--no-charts", action="store_true", help="write the Markdown table only")
    args = parser.parse_args(argv)
    for path in args.json:
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    try:
        path = render(args.json, args.out, with_charts=not args.no_charts)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
