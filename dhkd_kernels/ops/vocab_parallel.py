"""The vocabulary-parallel form: each rank of a process group holds a contiguous shard of the classes.

Each rank passes its rows [start, start + size) of both heads' weights and biases and its columns of
the teacher logits (or its rows of the teacher head); features, labels (global class ids) and the
teacher features are the same on every rank. Every rank gets the unsharded op's loss and components,
the gradients of its own weight and bias shards and (summed over the group inside the op unless
``reduce_features_grad`` is False) the features' gradient.

Only per-row statistics cross ranks, never (N, C) data. One chunk of n rows, in the torch backend
(``main_head_sharded``):

    round 1  all_reduce MAX  (k1, n): the row max of z1 [and of the teacher t, when KD is computed]
    round 2  all_reduce SUM  (k2, n): sum exp(z1 - M), the label's logit (from the rank owning it, 0
             elsewhere), [sum (z1 - M) for label smoothing], [sum exp(z1/T - M/T), sum exp(t/T - Mt/T)
             and the count of unmasked teacher classes, when KD is computed], [the number of ranks
             holding a class that reaches the row max before the label, for ``correct``]
    round 3  all_reduce SUM  (1-2, n), only for the gradient of reverse KL / JSD: sum_c s r and the
             student mass on masked classes (reverse KL), or sum_c s (log s - log m) (JSD)

and once per call an all_reduce SUM of the per-row partial sums of the KD and logit-level terms (2, N)
and, by default, of the features' gradient (N, D) [and of the aux features' gradient (N, D_aux)].
``correct`` needs no MIN collective: the first global arg-max is the label exactly when the label's
logit equals the global max and no rank holds an earlier class reaching it. The BinaryKL /
BinaryKL-Norm term is per class: its gradient needs nothing from other ranks.

The reference backend's sharded form (``reference_loss_sharded``) differentiates through
:class:`_ReduceSum` (all_reduce SUM both ways: autograd then differentiates the sum over ranks of the
replicated loss, and :class:`_ScaleGrad` divides by P) and :class:`_CopyToGroup` (forward identity,
backward all_reduce SUM: the features' gradient, Megatron's copy-to-model-parallel region). Its
backward runs O(N) all-reduces too (one per forward reduction).

No collective depends on data: every rank runs the same collectives in the same order for the same
options and N. Nothing is read on the host, except when ``vocab_size`` is not given: then
:func:`make_shard` all-gathers (start, size) of every rank once per call and reads it (a
synchronisation on CUDA).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._divergence import softmax_divergence_terms

__all__ = ["VocabShard", "make_shard", "main_head_sharded", "reference_loss_sharded"]


class VocabShard(NamedTuple):
    """This rank's place in the vocabulary-parallel group (host values only)."""

    group: object          # torch.distributed ProcessGroup
    start: int             # global id of this rank's first class
    size: int              # classes held by this rank
    total: int             # C, the global number of classes
    world: int             # ranks in the group
    reduce_features_grad: bool


def _dist():
    import torch.distributed as dist
    return dist


def make_shard(group, vocab_start, vocab_size, reduce_features_grad, local_classes: int, device) -> VocabShard:
    """Check the vocabulary-parallel arguments (TypeError/ValueError naming the argument) and return
    the shard. With ``vocab_size=None`` the shard sizes of every rank are all-gathered (one small
    collective and a host read per call) and checked to tile [0, C)."""
    dist = _dist()
    if not dist.is_available():
        raise ValueError("vocab_parallel_group needs torch.distributed, which this PyTorch build lacks")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError("vocab_parallel_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD or one from new_group), got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("vocab_parallel_group given but torch.distributed is not initialized")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    world = dist.get_world_size(group)
    if vocab_start is None:
        raise ValueError("vocab_parallel_group needs vocab_start=, the global id of this rank's first class")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    vocab_start = int(vocab_start)
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if not isinstance(reduce_features_grad, bool):
        raise TypeError("vocab_parallel_reduce_features_grad must be a bool, got "
                        f"{type(reduce_features_grad).__name__}")
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        vocab_size = int(vocab_size)
        if vocab_start + local_classes > vocab_size:
            raise ValueError(f"vocab_start + classes of this shard = {vocab_start} + {local_classes} exceeds "
                             f"vocab_size = {vocab_size}")
        return VocabShard(group, vocab_start, local_classes, vocab_size, world, reduce_features_grad)
    mine = torch.tensor([vocab_start, local_classes], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    layout = sorted(tuple(int(v) for v in e.tolist()) for e in every)
    end = 0
    for s, n in layout:
        if s != end:
            raise ValueError(f"vocab_start: the shards (start, classes) of the group {layout} do not tile "
                             "[0, C) contiguously (a gap or an overlap)")
        end = s + n
    return VocabShard(group, vocab_start, local_classes, end, world, reduce_features_grad)


def _all_reduce_(x: torch.Tensor, shard: VocabShard, op: str = "sum") -> torch.Tensor:
    dist = _dist()
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=shard.group)
    return x


def reduce_rows_(per_row: torch.Tensor, rows: slice, shard: VocabShard) -> None:
    """Sum ``per_row[rows]`` (a few (N,) rows of partial sums) over the group, in place."""
    part = per_row[rows].contiguous()
    per_row[rows] = _all_reduce_(part, shard)


def reduce_features_grad_(g: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    return _all_reduce_(g, shard) if shard.reduce_features_grad else g


# ---------------------------------------------------------------- torch backend: one chunk of rows

def main_head_sharded(z, t, y, ok, o, shard: VocabShard, *, kd_stats, grad_ce, grad_kd, grad_z, comps):
    """Sharded counterpart of ``chunked.main_head`` for one chunk: ``z`` (n, size) the (softcapped) local
    logits (consumed), ``t`` (n, size) the local teacher logits, ``y`` (n,) global labels (0 where not
    ``ok``). Returns (ce, kd_partial or None, z_loss or None, dz or None, correct or None): ce, z_loss
    and correct are the global per-row values; kd_partial is this rank's part of the KD sum (to be
    summed over the group), NaN on rows whose teacher masks every class."""
    ce_w, kd_w, T = o["ce_weight"], o["kd_weight"], o["kd_temperature"]
    zl_w = o.get("z_loss_weight", 0.0)
    eps = o.get("label_smoothing", 0.0)
    C = shard.total
    divergence, beta = o.get("kd_divergence", "forward_kl"), o.get("jsd_beta", 0.5)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    yl = y - shard.start
    own = ok & (yl >= 0) & (yl < shard.size)
    yl = torch.where(own, yl, torch.zeros_like(yl)).unsqueeze(-1)

    # round 1: row maxima
    maxes = [z.amax(-1)]
    first = z.argmax(-1) if comps else None  # this rank's first arg-max (z is consumed below)
    if kd_stats:
        maxes.append(t.amax(-1))
    mx = _all_reduce_(torch.stack(maxes), shard, "max")
    m = mx[0]
    # round 2: sums of exponentials, the label's logit, the counts
    d = z - m.unsqueeze(-1)                      # z - M, <= 0
    sums = [torch.exp(d).sum(-1), torch.where(own, z.gather(-1, yl).squeeze(-1), 0.0)]
    if eps:
        sums.append(d.sum(-1))
    if kd_stats:
        xs = z.mul_(1.0 / T)                     # z / T (z consumed)
        ms = m * (1.0 / T)                       # = max of z / T (rounding is monotone)
        xs.sub_(ms.unsqueeze(-1))
        tt = t / T
        mt = mx[1] / T
        tt.sub_(mt.unsqueeze(-1))
        masked = torch.isneginf(t)
        sums += [torch.exp(xs).sum(-1), torch.exp(tt).sum(-1), (~masked).sum(-1).to(z.dtype)]
    if comps:
        earlier = (maxes[0] == m) & (first + shard.start < y)
        sums.append(earlier.to(z.dtype))
    tot = _all_reduce_(torch.stack(sums), shard)
    k = 2
    log_s = torch.log(tot[0])
    lp_y = (tot[1] - m) - log_s
    ce = -lp_y
    if eps:
        ce = (1.0 - eps) * ce - eps * (tot[k] / C - log_s)  # mean_c log p_c = mean_c (z - M) - log S
        k += 1
    zl = zdz = dz = kd = None
    if zl_w:
        lse = m + log_s
        zl = lse.square()
    if kd_stats:
        log_ss, log_st, kept = torch.log(tot[k]), torch.log(tot[k + 1]), tot[k + 2]
        k += 3
    correct = None
    if comps:
        correct = ok & (tot[1] == m) & (tot[k] == 0)
    if grad_ce or grad_z:
        p = d.sub_(log_s.unsqueeze(-1)).exp_()   # softmax(z1), global normalisation
        if grad_z:
            zdz = p * (lse.mul(2.0 * zl_w)).unsqueeze(-1)
        if grad_ce:
            dz = p
            if eps:
                dz.sub_(eps / C)
            dz.mul_(ce_w)
            target = torch.expm1(lp_y).add_(eps - eps / C).mul_(ce_w).unsqueeze(-1)
            dz.scatter_(-1, yl, torch.where(own.unsqueeze(-1), target, dz.gather(-1, yl)))
        elif zdz is not None:
            dz, zdz = zdz, None
    del d
    if zdz is not None:
        dz = dz.add_(zdz)
    if kd_stats:
        log_ps = xs.sub_(log_ss.unsqueeze(-1))   # log softmax(z/T)
        log_pt = tt.sub_(log_st.unsqueeze(-1))   # log softmax(t/T)
        nan_rows = (kept == 0)
        kd, g = softmax_divergence_terms(log_ps, log_pt, masked, T, divergence, beta, grad=grad_kd,
                                         group_sum=lambda v: _all_reduce_(v, shard))
        kd = torch.where(nan_rows, float("nan"), kd)
        if g is not None:
            g.mul_(kd_w * T)
            dz = g if dz is None else dz.add_(g)
    return ce, kd, zl, dz, correct


# ---------------------------------------------------------------- reference backend

class _ReduceSum(torch.autograd.Function):
    """Sum over the group; backward: the gradient summed over the group (the adjoint of a sum whose
    result every rank uses). With it autograd differentiates F = sum over ranks of each rank's loss,
    which is P times the replicated loss: :class:`_ScaleGrad` divides by P at the end. (An identity
    backward would be wrong here: a rank's summands depend on the other ranks' logits through the
    global statistics, e.g. the label's log-probability through logsumexp.)"""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return _all_reduce_(x.clone(), shard)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce_(g.contiguous().clone(), ctx.shard), None


class _ScaleGrad(torch.autograd.Function):
    """Identity; backward: the gradient times ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _CopyToGroup(torch.autograd.Function):
    """Identity; backward: the gradient summed over the group (Megatron's copy-to-model-parallel region)."""

    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce_(g.contiguous().clone(), ctx.shard), None


def _global_lse(x, shard):
    """logsumexp over the whole vocabulary of the sharded (n, size) x, differentiable in x."""
    m = _all_reduce_(x.detach().amax(-1), shard, "max")
    return m + torch.log(_ReduceSum.apply(torch.exp(x - m.unsqueeze(-1)).sum(-1), shard))


def _divergence_ref(z1, t, T, divergence, beta, shard):
    """``reference.softmax_divergence`` with the softmaxes and row sums over the group."""
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    xs, tt = z1 / T, t / T
    log_ps = xs - _global_lse(xs, shard).unsqueeze(-1)
    log_pt = tt - _global_lse(tt, shard).unsqueeze(-1)
    keep = t != float("-inf")
    zero = torch.zeros((), dtype=log_pt.dtype, device=log_pt.device)
    if divergence == "forward_kl":
        pt = log_pt.exp()
        per_class = torch.where(pt == 0, zero, pt * (log_pt - log_ps))
    elif divergence == "reverse_kl":
        safe_log_pt = torch.where(keep, log_pt, zero)
        per_class = torch.where(keep, log_ps.exp() * (log_ps - safe_log_pt), zero)
    else:
        pt, ps = log_pt.exp(), log_ps.exp()
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        teacher_side = torch.where(pt == 0, zero, pt * (log_pt - log_m))
        per_class = beta * teacher_side + (1.0 - beta) * ps * (log_ps - log_m)
    kd = T**2 * _ReduceSum.apply(per_class.sum(-1), shard)
    kept = _all_reduce_(keep.sum(-1).to(kd.dtype), shard)
    return torch.where(kept == 0, torch.full_like(kd, float("nan")), kd)


def reference_loss_sharded(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels,
                           shard: VocabShard, *, aux_features=None, teacher_features=None, teacher_weight=None,
                           teacher_bias=None, label_smoothing=0.0, ce_weight=1.0, kd_weight=0.0,
                           logit_weight=1.0, kd_temperature=4.0, logit_temperature=2.0,
                           logit_loss="binary_kl_norm", ignore_index=-100, reduction="mean",
                           return_components=False, kd_divergence="forward_kl", jsd_beta=0.5, softcap=None,
                           teacher_softcap=None, z_loss_weight=0.0):
    """``reference.dual_head_kd_loss`` over a class shard, through autograd (every term computed, as
    there, with the softmaxes normalised and the row sums taken over the group)."""
    from ..reference import _operand_dtype, apply_softcap, binary_kl, binary_kl_norm, valid_rows, weighted_loss
    if teacher_logits is None:
        tdt = _operand_dtype([teacher_features, teacher_weight], teacher_features.device.type)
        with torch.no_grad():
            teacher_logits = F.linear(teacher_features.to(tdt), teacher_weight.to(tdt),
                                      None if teacher_bias is None else teacher_bias.to(tdt))
    mats = [features, head_weight, aux_weight] + ([aux_features] if aux_features is not None else [])
    cdt = _operand_dtype(mats, features.device.type)
    with torch.autocast(features.device.type, enabled=False):
        ldt = torch.float64 if cdt == torch.float64 else torch.float32
        features, head_weight, aux_weight = (m.to(cdt) for m in (features, head_weight, aux_weight))
        head_bias = None if head_bias is None else head_bias.to(cdt)
        aux_bias = None if aux_bias is None else aux_bias.to(cdt)
        valid = valid_rows(labels, ignore_index)
        vcol = valid.unsqueeze(-1)
        zero = torch.zeros((), dtype=cdt, device=features.device)
        features = torch.where(vcol, features, zero)
        if shard.reduce_features_grad:
            features = _CopyToGroup.apply(features, shard)
        if aux_features is None:
            aux_features = features
        else:
            aux_features = torch.where(vcol, aux_features.to(cdt), zero)
            if shard.reduce_features_grad:
                aux_features = _CopyToGroup.apply(aux_features, shard)
        z1 = F.linear(features, head_weight, head_bias).to(ldt)
        z2 = F.linear(aux_features, aux_weight, aux_bias).to(ldt)
        t = torch.where(vcol, teacher_logits.to(ldt), torch.zeros((), dtype=ldt, device=z1.device))
        y = torch.where(valid, labels, torch.zeros_like(labels)).long()
        z1, z2, t = apply_softcap(z1, softcap), apply_softcap(z2, softcap), apply_softcap(t, teacher_softcap)

        yl = y - shard.start
        own = valid & (yl >= 0) & (yl < shard.size)
        yl = torch.where(own, yl, torch.zeros_like(yl))
        lse = _global_lse(z1, shard)
        lp = z1 - lse.unsqueeze(-1)
        lp_y = _ReduceSum.apply(torch.where(own, lp.gather(-1, yl.unsqueeze(-1)).squeeze(-1), 0.0), shard)
        ce = -lp_y
        if label_smoothing:
            ce = (1.0 - label_smoothing) * ce - label_smoothing * _ReduceSum.apply(lp.sum(-1), shard) / shard.total
        kd = _divergence_ref(z1, t, kd_temperature, kd_divergence, jsd_beta, shard)
        per_class_loss = binary_kl_norm if logit_loss == "binary_kl_norm" else binary_kl
        logit = _ReduceSum.apply(per_class_loss(z2, t, logit_temperature), shard)

        per_row = {"ce": ce, "kd": kd, "logit": logit}
        weights = {"ce": ce_weight, "kd": kd_weight, "logit": logit_weight}
        if z_loss_weight:
            per_row["z_loss"] = lse.square()
            weights["z_loss"] = z_loss_weight
        loss, terms = weighted_loss(per_row, weights, valid, reduction, z1, z2)
        loss = _ScaleGrad.apply(loss, 1.0 / shard.world)
        if not return_components:
            return loss
        components = {k: v.detach() for k, v in terms.items()}
        with torch.no_grad():
            m = z1.amax(-1)
            gm = _all_reduce_(m.clone(), shard, "max")
            label_logit = _all_reduce_(torch.where(own, z1.gather(-1, yl.unsqueeze(-1)).squeeze(-1), 0.0), shard)
            earlier = _all_reduce_(((m == gm) & (z1.argmax(-1) + shard.start < y)).to(ldt), shard)
            correct = valid & (label_logit == gm) & (earlier == 0)
        components["correct"] = correct if reduction == "none" else correct.sum()
        components["n_valid"] = valid.sum()
        return loss, components
