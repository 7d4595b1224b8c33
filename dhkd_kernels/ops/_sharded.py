"""The triton backend's vocabulary-parallel form: the main head's epilogue in phases around the group's
collectives (the auxiliary head's is per class and runs as in the unsharded op).

For a block of R rows (the resident plan's N, or one row chunk: the same chunks on every rank, the plan
being made for the global C):

    phase 1   epilogue_kernel(PHASE=1): this rank's row statistics (11, R), anchored at its own maxima
    combine   all_reduce MAX (3, R), all_reduce SUM (8, R); the group's statistics, the per-row CE, KD,
              z-loss and correct written into the row buffer (torch operations on (R,) vectors)
    [phase 3  JSD only: epilogue_kernel(PHASE=3), the per-class sums with the group's normalizers, and
              an all_reduce SUM (2, R)]
    phase 2   epilogue_kernel(PHASE=2): dz1 (and the auxiliary head's pass) from the group's statistics

Only per-row values cross ranks; the bytes are those of the torch backend's sharded form (kernels.md).
"""
from __future__ import annotations

import torch

from ..reference import valid_rows
from ._plan import F32, kd_scale
from .vocab_parallel import _all_reduce_

STATS = 11   # m1, s1n, zy, zsum, s1t, mt, st, kacc, racc | J, sk | S, amax
GSTATS = 10  # M, log s1, q, log s1t, Mt, log st, kdiv, skn, J, S


def sharded_epilogue(wk, o, z1, z2, t, y, b1, b2, rows, *, r0, R, c0, W, aux, g_ce, g_kd, g_aux, acc_logit,
                     br, bc, warps, t_row0, t_col0, w):
    from ._launch import _epilogue
    dev = z1.device
    shard = o.shard
    stats = torch.zeros((STATS, R), dtype=F32, device=dev)
    common = dict(r0=r0, R=R, c0=c0, W=W, br=br, bc=bc, warps=warps, t_row0=t_row0, t_col0=t_col0)
    _epilogue(wk, o, z1, None, t, y, b1, None, rows, main=True, aux=False, g_ce=False, g_kd=False, g_aux=False,
              acc_logit=False, phase=1, stats=stats, **common)
    yb = y[r0:r0 + R]
    valid = valid_rows(yb, o.ignore_index)
    bad = valid & ((yb < 0) | (yb >= shard.total))
    gstats = _combine(stats, yb, valid, bad, rows, r0, wk, o)
    if wk.kd_stats and o.div == 2:
        _epilogue(wk, o, z1, None, t, y, b1, None, rows, main=True, aux=False, g_ce=False, g_kd=False,
                  g_aux=False, acc_logit=False, phase=3, stats=gstats, **common)
        js = _all_reduce_(gstats[8:10].contiguous(), shard)
        gstats[6] = js[1]
        rows[1, r0:r0 + R] = _row_term(o.kd_t * o.kd_t * js[0], valid, bad)
    if g_ce or g_kd or (o.zl_w and wk.g_main) or aux:
        _epilogue(wk, o, z1, z2, t, y, b1, b2, rows, main=True, aux=aux, g_ce=g_ce, g_kd=g_kd, g_aux=g_aux,
                  acc_logit=acc_logit, w=w, phase=2, stats=gstats, **common)


def _row_term(v, valid, bad):
    """A per-row term as the unsharded epilogue stores it: 0 outside V, NaN for a bad label."""
    return torch.where(bad, float("nan"), torch.where(valid, v, 0.0))


def _combine(stats, y, valid, bad, rows, r0, wk, o):
    """The group's per-row statistics from every rank's (``stats``, anchored at its own maxima): the
    (GSTATS, R) buffer phase 2 reads; CE, KD (forward and reverse KL), z-loss and correct written into
    ``rows`` for rows [r0, r0 + R) (``valid``/``bad``: the rows in V, and those with a label outside
    [0, C))."""
    shard = o.shard
    T = o.kd_t
    m1, s1n, zy, zsum, s1t, mt, st, kacc, racc, sk, amax = stats
    ks = kd_scale(shard.total)  # kacc and racc come times it (epilogue_kernel's PHASE 1)
    mx = _all_reduce_(torch.stack([m1, mt, zy]), shard, "max")
    M, Mt, zy_g = mx
    e = torch.exp(m1 - M)
    et = torch.exp((m1 - M) / T)
    at = torch.exp(mt - Mt)
    shift = (M - m1) / T - (Mt - mt)
    live_t = st > 0
    earlier = ((m1 == M) & (amax < y.to(F32))).to(F32)
    sums = _all_reduce_(torch.stack([
        s1n * e, s1t * et, st * at,
        at * (kacc + torch.where(live_t, st * (shift * ks), 0.0)),
        et * (racc - torch.where(sk > 0, sk * (shift * ks), 0.0)), et * sk, zsum, earlier]), shard)
    s1n_g, s1t_g, st_g, k_g, r_g, sk_g, zsum_g, earlier_g = sums
    s1 = s1n_g + torch.exp(zy_g - M)
    confident = (zy_g == M) & (s1n_g < 1e-3)
    log_s1 = torch.where(confident, s1n_g * (1.0 - s1n_g * (0.5 - s1n_g / 3.0)), torch.log(s1))
    q = s1n_g / s1
    c = shard.total
    ce = (M - zy_g) + log_s1
    if o.eps:
        ce = ce - o.eps * (zsum_g / c - zy_g)
    log_s1t, log_st = torch.log(s1t_g), torch.log(st_g)
    g = torch.zeros((GSTATS, stats.shape[1]), dtype=F32, device=stats.device)
    g[0], g[1], g[2], g[3], g[4], g[5] = M, log_s1, q, log_s1t, Mt, log_st
    end = r0 + stats.shape[1]
    rows[0, r0:end] = _row_term(ce, valid, bad)
    if wk.kd_stats:
        if o.div == 0:
            rows[1, r0:end] = _row_term(T * T * ((k_g / st_g) / ks - log_st + log_s1t), valid, bad)
        elif o.div == 1:
            skn = sk_g / s1t_g
            kdiv = (r_g / s1t_g) / ks + skn * (log_st - log_s1t)
            g[6], g[7] = kdiv, skn
            rows[1, r0:end] = _row_term(T * T * kdiv, valid, bad)
    else:  # as the unsharded epilogue stores it: 0, NaN for a bad label
        rows[1, r0:end] = _row_term(torch.zeros_like(ce), valid, bad)
    ok = valid & ~bad
    if o.zl_w:
        rows[3, r0:end] = _row_term((M + log_s1) ** 2, valid, bad)
    rows[3 + int(bool(o.zl_w)), r0:end] = (ok & (zy_g == M) & (earlier_g == 0)).to(F32)
    return g
