"""Render pytest-benchmark JSON from the dhkd benchmarks as a Markdown table and PNG charts.

    pytest benchmarks/ --benchmark-only --benchmark-json BENCH.json
    python benchmarks/report.py BENCH.json [MORE.json ...] --out DIR

    python benchmarks/report.py RESULTS/gpu_check.json --out DIR [--update-doc docs/benchmarks.md]

Writes DIR/benchmarks.md (one table per dtype and mode, then the training-step rows if any) and, per
dtype and mode, DIR/time_<dtype>_<mode>.png and DIR/memory_<dtype>_<mode>.png (memory only when peak
CUDA memory was recorded). Given the gpu_check.json of benchmarks/gpu_check.py instead, it writes
DIR/gpu_section.md (GPU, driver, versions, date, the headline/correctness/training tables) and
DIR/gpu_time.png, and with --update-doc replaces that section of a Markdown file. Standalone: needs only the standard library and matplotlib.
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


def _is_gpu_check(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return '"stages"' in f.read(4096)
    except OSError:
        return False


# ----------------------------------------------------------------------------- gpu_check results

GPU_START, GPU_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"


def _ms(cell):
    return cell.get("ms") if isinstance(cell, dict) else None


def train_table(rows) -> list:
    """Markdown lines of the training-step rows of gpu_check's ``train`` stage."""
    out = ["| variant | img/s | step ms | loss fwd+bwd ms | loss share of the step |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['error']} | | | |")
        else:
            out.append(f"| {r['variant']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['loss_ms']:.2f} | "
                       f"{100 * r['loss_share']:.1f}% |")
    return out


def _show(cell, label=None) -> str:
    ms = _ms(cell)
    if ms is None:
        return cell.get("error", "—")[:30] if isinstance(cell, dict) else "—"
    extra = cell.get("extra_mib")
    return f"{ms:.3f}" + ("" if extra is None else f" ({extra:.0f})") + (f" ({label})" if label else "")


def gpu_section(data: dict, charts_made: dict | None = None) -> str:
    """The GPU section of docs/benchmarks.md from ``gpu_check.json`` (benchmarks/gpu_check.py)."""
    env = data.get("env") or {}
    st = data.get("stages", {})
    out = [f"### Measured on {env.get('gpu')} ({env.get('date')})", "",
           f"Driver {env.get('driver')}, CUDA {env.get('cuda')}, torch {env.get('torch')}, triton {env.get('triton')}, "
           f"Python {env.get('python')}. `benchmarks/gpu_check.py`; stages:", ""]
    for name, d in st.items():
        out.append(f"- `{name}`: {d.get('status')}, {d.get('wall_s', 0):.0f} s of {d.get('budget_s', 0):.0f} s, "
                   f"{d.get('compiles', 0)} Triton compiles, {d.get('compile_s', 0):.0f} s compiling")
    head = st.get("headline", {})
    if head.get("rows"):
        out += ["", "Forward+backward median ms (peak extra MiB); ratios against the cuBLAS GEMM floor measured "
                "in the same run:", "",
                "| shape (N, D, C) | dtype | fused (plan) | × floor | other engine | GEMM floor | torch path | "
                "torch.compile(ref) | fused vs compile | partial peers |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in head["rows"]:
            dims = f"| {r['shape']} ({r['N']}, {r['D']}, {r['C']}) | {r['dtype']} |"
            if "skipped" in r:
                out.append(f"{dims} skipped: {r['skipped']} | | | | | | | |")
                continue
            cells = r.get("cells", {})
            fused = [k for k in cells if k.startswith("fused ")]  # the automatic plan first, then the other engine
            auto = cells.get(fused[0]) if fused else None
            other = cells.get(fused[1]) if len(fused) > 1 else None
            f_ms, floor = _ms(auto), _ms(cells.get("gemm floor"))
            comp = _ms(cells.get("torch.compile(reference)"))
            peers = "; ".join(f"{k.split(' (')[0]} {_ms(v):.3f}" for k, v in cells.items()
                              if "only" in k and _ms(v) is not None) or "—"
            out.append(" ".join([
                dims, _show(auto, fused[0][6:] if fused else None), "|",
                f"{f_ms / floor:.2f}" if (f_ms and floor) else "—", "|",
                _show(other, fused[1][6:] if other is not None else None), "|",
                _show(cells.get("gemm floor")), "|", _show(cells.get("torch path")), "|",
                _show(cells.get("torch.compile(reference)")), "|",
                f"{comp / f_ms:.1f}x" if (comp and f_ms) else "—", "|", peers, "|"]))
        if head.get("peers"):
            out += ["", "Partial peers (main-head CE only, not the whole loss): " + ", ".join(head["peers"])]
    corr = st.get("correctness", {})
    if corr.get("checks"):
        ok = sum(1 for c in corr["checks"] if c.get("ok"))
        out += ["", f"GPU correctness against float64: {ok}/{len(corr['checks'])} checks passed", ""]
        out += [f"- {'ok' if c.get('ok') else ('skipped' if c.get('ok') is None else 'FAIL')} {c['check']}: "
                f"{c['detail']}" for c in corr["checks"]]
    train = st.get("train", {})
    if train.get("rows"):
        out += ["", "ResNet-34 → ResNet-18 DHKD training step, batch 256, bf16 autocast, channels_last:", ""]
        out += train_table(train["rows"])
    for title, fname in (charts_made or {}).items():
        out += ["", f"![{title}]({fname})"]
    return "\n".join(out) + "\n"


def gpu_charts(data: dict, out_dir: str) -> dict:
    """fused / floor per shape and every provider's ms per shape (log scale), as PNGs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    rows = [r for r in data.get("stages", {}).get("headline", {}).get("rows", []) if r.get("cells")]
    if not rows:
        return {}
    made = {}
    labels = [f"{r['shape']}\n{r['dtype']}" for r in rows]
    providers = []
    for r in rows:
        for k in r["cells"]:
            if k not in providers:
                providers.append(k)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
    width = 0.8 / max(len(providers), 1)
    for i, prov in enumerate(providers):
        vals = [_ms(r["cells"].get(prov)) or float("nan") for r in rows]
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=prov)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward ms (median)")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels, fontsize=7)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gpu_time.png"), dpi=120)
    plt.close(fig)
    made["forward+backward time per provider"] = "gpu_time.png"
    return made


def render_gpu(json_path: str, out_dir: str, *, with_charts: bool = True, update_doc: str | None = None) -> str:
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "stages" not in data:
        raise ValueError(f"{json_path} is not a gpu_check.json (no 'stages')")
    os.makedirs(out_dir, exist_ok=True)
    made = gpu_charts(data, out_dir) if with_charts else {}
    text = gpu_section(data, made)
    path = os.path.join(out_dir, "gpu_section.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    if update_doc:
        doc = open(update_doc, encoding="utf-8").read()
        if GPU_START not in doc or GPU_END not in doc:
            raise ValueError(f"{update_doc} has no {GPU_START} ... {GPU_END} markers")
        head, rest = doc.split(GPU_START, 1)
        _, tail = rest.split(GPU_END, 1)
        new = head + GPU_START + "\n" + text + GPU_END + tail
        with open(update_doc + ".tmp", "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(update_doc + ".tmp", update_doc)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+",
                        help="pytest-benchmark JSON (from --benchmark-json); several files are merged, "
                             "e.g. a GPU suite run in pieces with -k")
    parser.add_argument("--out", required=True, help="directory for benchmarks.md and the PNG charts")
    parser.add_argument("--no-charts", action="store_true", help="write the Markdown table only")
    parser.add_argument("--update-doc", default=None,
                        help="with a gpu_check.json: also replace the GPU section of this Markdown file "
                             f"(between {GPU_START} and {GPU_END})")
    args = parser.parse_args(argv)
    for path in args.json:
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    if len(args.json) == 1 and _is_gpu_check(args.json[0]):
        try:
            path = render_gpu(args.json[0], args.out, with_charts=not args.no_charts, update_doc=args.update_doc)
        except (ValueError, OSError) as e:
            parser.error(str(e))
        print(f"wrote {path}")
        return 0
    try:
        path = render(args.json, args.out, with_charts=not args.no_charts)
    except (ValueError, RuntimeError) as e:
        parser.error(str(e))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
