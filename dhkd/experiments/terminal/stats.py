"""Paired comparisons over seeds: mean difference, its 95% confidence interval and the win count.

For per-seed values a_k, b_k (k = 1..n, the same seed in both arms), d_k = a_k - b_k, and
    mean = (1/n) sum d_k,   s = sqrt(sum (d_k - mean)^2 / (n - 1)),
    CI95 = mean -+ t_{0.975, n-1} s / sqrt(n)      (Student's t; undefined, nan, for n < 2).
"""
from __future__ import annotations

import math

# t_{0.975, df} for df = 1..30; above 30 the normal 1.96 is within 4%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite values; nan where undefined."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if not n:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def paired(a, b) -> dict:
    """``{"mean", "std", "n", "lo", "hi", "wins", "ties", "diffs"}`` of d_k = a_k - b_k over the pairs where
    both are finite; ``wins`` counts d_k > 0; lo/hi the 95% CI (nan for n < 2)."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    mean, std, n = mean_std(d)
    half = t975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "lo": mean - half, "hi": mean + half,
            "wins": sum(v > 0 for v in d), "ties": sum(v == 0 for v in d), "diffs": d}


def excludes_zero(p: dict) -> bool:
    """True when the 95% CI of ``paired``'s result lies strictly on one side of 0."""
    return p["n"] > 1 and (p["lo"] > 0 or p["hi"] < 0)


def fmt_paired(p: dict) -> str:
    """``+1.23 [+0.40, +2.06] (4/5)``, or a dash without data."""
    if p["n"] == 0:
        return "–"
    ci = "" if p["n"] < 2 else f" [{p['lo']:+.2f}, {p['hi']:+.2f}]"
    return f"{p['mean']:+.2f}{ci} ({p['wins']}/{p['n']})"


def fmt_mean(values, digits: int = 2) -> str:
    """``mean ± std`` of the finite values (just the mean for one), or a dash."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"
