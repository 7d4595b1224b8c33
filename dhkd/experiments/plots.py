"""Plots and tables for experiment runs, from ``metrics.jsonl``-like rows.

A *run* is a list of row dicts, one per line of a run's ``metrics.jsonl`` (e.g.
``{"epoch": 3, "val/acc1_main": 71.2, "diag/main/nc1": 0.4}``). Plot helpers take
``{method: [run, run, ...]}`` (one run per seed; a single run is accepted too) and draw the mean over
seeds per epoch with a shaded band of +/- one std (population std over the seeds present at that epoch).

Matplotlib is imported lazily and used through its object-oriented API with the Agg canvas, so
importing this module or calling it never changes pyplot's global backend. PNGs are written atomically
(temporary file + ``os.replace``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

from ..atomic import atomic_path

__all__ = [
    "DEFAULT_DIAG_KEYS",
    "final_value",
    "load_metrics",
    "markdown_table",
    "plot_accuracy",
    "plot_diagnostics",
    "series",
    "summarize",
]

DEFAULT_DIAG_KEYS = ("norm_cv", "cos_etf_gap", "cos_std", "nc1")


def load_metrics(path) -> list:
    """Rows of a ``metrics.jsonl`` file (blank lines skipped). Bad JSON -> ValueError with the line number."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(rows: Sequence[Mapping], key: str, x_key: str = "epoch") -> tuple:
    """(xs, ys) of the rows holding numeric ``key`` and ``x_key``, sorted by x; the last row wins per x."""
    by_x = {}
    for row in rows:
        x, y = row.get(x_key), row.get(key)
        if _is_number(x) and _is_number(y):
            by_x[x] = float(y)
    xs = sorted(by_x)
    return xs, [by_x[x] for x in xs]


def final_value(rows: Sequence[Mapping], key: str) -> float:
    """The value of ``key`` in the last row that has it (e.g. the final test accuracy). KeyError if none."""
    for row in reversed(rows):
        if _is_number(row.get(key)):
            return float(row[key])
    raise KeyError(f"no row has a numeric {key!r}")


def summarize(values: Sequence[float]) -> tuple:
    """(mean, std, n) of per-seed values; std is the sample std (n - 1), nan for n = 1. Non-finite values are errors."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values is empty")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"values must be finite, got {vals}")
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def markdown_table(
    results: Mapping[str, Mapping[str, Sequence[float]]],
    columns: Sequence[str] | None = None,
    digits: int = 2,
    label: str = "method",
) -> str:
    """A Markdown table of mean ± std (sample std over seeds) per method and column.

    ``results[method][column]`` holds the per-seed values, e.g.
    ``{"dhkd": {"main acc (%)": [71.2, 70.8], "aux acc (%)": [69.0, 69.5]}}``. Columns default to every
    column in first-seen order. A cell with one seed shows the value alone; a missing column shows "–".
    A last column gives the number of seeds (the largest n in the row).
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty mapping of method -> {column: values}")
    if columns is None:
        columns = []
        for method, cols in results.items():
            if not isinstance(cols, Mapping):
                raise ValueError(f"results[{method!r}] must be a mapping of column -> values")
            columns.extend(c for c in cols if c not in columns)
    if not columns:
        raise ValueError("columns is empty")
    lines = ["| " + " | ".join([label, *columns, "seeds"]) + " |", "|" + "---|" * (len(columns) + 2)]
    for method, cols in results.items():
        if not isinstance(cols, Mapping):
            raise ValueError(f"results[{method!r}] must be a mapping of column -> values")
        cells, n_max = [], 0
        for col in columns:
            if col not in cols:
                cells.append("–")
                continue
            mean, std, n = summarize(cols[col])
            n_max = max(n_max, n)
            cells.append(f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join([str(method), *cells, str(n_max)]) + " |")
    return "\n".join(lines) + "\n"


def _as_runs(name: str, runs_by_method) -> dict:
    if not isinstance(runs_by_method, Mapping) or not runs_by_method:
        raise ValueError(f"{name} must be a non-empty mapping of method -> list of runs")
    out = {}
    for method, runs in runs_by_method.items():
        if not isinstance(runs, (list, tuple)):
            raise ValueError(f"{name}[{method!r}] must be a run (list of row dicts) or a list of runs")
        if runs and all(isinstance(r, Mapping) for r in runs):
            runs = [runs]
        for k, run in enumerate(runs):
            if not isinstance(run, (list, tuple)) or not all(isinstance(r, Mapping) for r in run):
                raise ValueError(f"{name}[{method!r}][{k}] must be a list of row dicts")
        out[method] = list(runs)
    return out


def _mean_band(runs, key, x_key):
    """Per-x mean and population std over the runs that have ``key`` at that x."""
    per_x = {}
    for run in runs:
        for x, y in zip(*series(run, key, x_key)):
            per_x.setdefault(x, []).append(y)
    xs = sorted(per_x)
    means = [sum(per_x[x]) / len(per_x[x]) for x in xs]
    stds = [math.sqrt(sum((v - m) ** 2 for v in per_x[x]) / len(per_x[x])) for x, m in zip(xs, means)]
    return xs, means, stds


def _new_figure(nplots: int, width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(nplots, 2)
    nrows = math.ceil(nplots / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nplots)]
    return fig, axes


def _save(fig, path) -> str:
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _draw(ax, xs, means, stds, **style):
    line = ax.plot(xs, means, marker="o", markersize=3, **style)[0]
    lo = [m - s for m, s in zip(means, stds)]
    hi = [m + s for m, s in zip(means, stds)]
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)


def plot_accuracy(
    runs_by_method: Mapping[str, Sequence],
    path,
    keys: Sequence[str] = ("val/acc1_main",),
    x_key: str = "epoch",
    title: str | None = None,
    ylabel: str = "accuracy (%)",
) -> str:
    """Accuracy per epoch per method (mean over seeds, +/- std band) as a PNG at ``path``; returns the path.

    Several ``keys`` (e.g. main and auxiliary head accuracy) share one axis: the first solid, the
    others dashed. ValueError when no run holds any of the keys.
    """
    runs_by_method = _as_runs("runs_by_method", runs_by_method)
    if isinstance(keys, str):
        keys = (keys,)
    fig, (ax,) = _new_figure(1, width=7.0, height=4.5)
    styles = ["-", "--", ":", "-."]
    drawn = 0
    for ci, (method, runs) in enumerate(runs_by_method.items()):
        for ki, key in enumerate(keys):
            xs, means, stds = _mean_band(runs, key, x_key)
            if not xs:
                continue
            label = method if len(keys) == 1 else f"{method} ({key})"
            _draw(ax, xs, means, stds, color=f"C{ci % 10}", linestyle=styles[ki % len(styles)], label=label)
            drawn += 1
    if not drawn:
        raise ValueError(f"no run has any of the keys {list(keys)} together with {x_key!r}")
    ax.set_xlabel(x_key)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_diagnostics(
    runs_by_method: Mapping[str, Sequence],
    path,
    keys: Sequence[str] = DEFAULT_DIAG_KEYS,
    heads: Sequence[str] = ("main", "aux"),
    extra_keys: Sequence[str] = (),
    prefix: str = "diag",
    x_key: str = "epoch",
    title: str | None = None,
) -> str:
    """Head diagnostics over epochs as a PNG at ``path``; returns the path.

    One panel per diagnostic ``key``, reading ``f"{prefix}/{head}/{key}"`` for each head (main solid,
    aux dashed, one colour per method); one more panel per entry of ``extra_keys`` read as is (e.g. a
    gradient-cosine key). A panel with no data says so; ValueError when no panel has data.
    """
    runs_by_method = _as_runs("runs_by_method", runs_by_method)
    panels = [(key, [(head, f"{prefix}/{head}/{key}") for head in heads]) for key in keys]
    panels += [(key, [(None, key)]) for key in extra_keys]
    if not panels:
        raise ValueError("keys and extra_keys are both empty")
    fig, axes = _new_figure(len(panels))
    styles = ["-", "--", ":", "-."]
    total = 0
    for ax, (name, columns) in zip(axes, panels):
        drawn = 0
        for ci, (method, runs) in enumerate(runs_by_method.items()):
            for hi, (head, column) in enumerate(columns):
                xs, means, stds = _mean_band(runs, column, x_key)
                if not xs:
                    continue
                label = method if head is None else f"{method} / {head}"
                _draw(ax, xs, means, stds, color=f"C{ci % 10}", linestyle=styles[hi % len(styles)], label=label)
                drawn += 1
        ax.set_title(name)
        ax.set_xlabel(x_key)
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        total += drawn
    if not total:
        raise ValueError(f"no run has any of the diagnostics {[c for _, cols in panels for _, c in cols]}")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
