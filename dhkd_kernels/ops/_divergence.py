"""The softmax term's divergences on a block of rows, from the block's log-probabilities: shared by
the torch backend (:mod:`.chunked`) and its vocabulary-parallel form (:mod:`.vocab_parallel`), where a
block holds only this rank's classes and the gradient's row sums run over the group.

With s = softmax(z/T), p = softmax(t/T) (see ``reference``), every gradient with respect to z/T has the
form h - s sum_c h_c, h_c = dD/d(log s_c) s_c:
    forward KL  s - p
    reverse KL  h = [c kept] s (log s - log p + 1): s (r - f + S_masked - [c masked]),
                r = log s - log p on kept classes (0 on masked ones), f = sum_c s r
    JSD         h = (1 - beta) s (log s - log m),   m = beta p + (1 - beta) s
"""
from __future__ import annotations

import math

import torch


def softmax_divergence_terms(log_ps, log_pt, masked, T, divergence, beta, *, grad, group_sum=None):
    """(T^2 D per row over this block's classes, dD/d(z/T) or None) for ``divergence`` forward_kl,
    reverse_kl or jsd (beta inside (0, 1)). ``log_ps``, ``log_pt`` (n, C) are consumed; ``masked`` (n, C):
    the teacher's -inf classes. ``group_sum``: maps the rows' (k, n) partial sums to their sums over the
    classes of every rank (the sharded form); None when the block holds every class. A row whose teacher
    masks every class is left to the caller (it has no teacher distribution)."""
    ps = log_ps.exp()
    g = None
    if divergence == "forward_kl":
        pt = log_pt.exp()
        # subtract first, then weight (no cancellation between two large sums for nearly equal
        # distributions); xlogy: wherever pt = 0 (t = -inf, or underflow) the term is 0, a NaN
        # teacher stays NaN
        kd = (T * T) * log_pt.sub_(log_ps).mul_(pt).masked_fill_(pt == 0, 0.0).sum(-1)
        if grad:
            g = ps.sub_(pt)
        return kd, g
    if divergence == "reverse_kl":
        # a masked class (p = 0 exactly, t = -inf) is left out of the sum
        r = log_ps.sub_(log_pt).masked_fill_(masked, 0.0)
        f = ps.mul(r).sum(-1)
        if grad:
            sums = torch.stack([f, ps.masked_fill(~masked, 0.0).sum(-1)])  # f, the mass on masked classes
            if group_sum is not None:
                sums = group_sum(sums)
            g = r.sub_(sums[0].unsqueeze(-1)).add_(sums[1].unsqueeze(-1)).sub_(masked.to(r.dtype)).mul_(ps)
        return (T * T) * f, g
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    pt = log_pt.exp()
    # xlogy on the teacher side: p = 0 (masked, or underflowed) contributes 0
    teacher_side = (log_pt - log_m).mul_(pt).masked_fill_(pt == 0, 0.0).sum(-1)
    student = log_ps.sub_(log_m).mul_(ps)  # s (log s - log m)
    part = student.sum(-1)
    kd = (T * T) * (beta * teacher_side + (1.0 - beta) * part)
    if grad:
        total = part if group_sum is None else group_sum(part.unsqueeze(0).clone())[0]
        g = student.sub_(ps.mul_(total.unsqueeze(-1))).mul_(1.0 - beta)
    return kd, g
