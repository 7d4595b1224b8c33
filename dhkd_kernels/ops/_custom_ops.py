"""The Triton backend as ``torch.library`` custom ops with fake implementations and an autograd
formula: ``dhkd::dual_head_kd_fwd``, ``dhkd::dual_head_kd_bwd``, ``dhkd::scale_`` (the chunked plan's
in-place gradient scaling) and ``dhkd::regrad_`` (its recompute for a per-row grad_output)."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import cost
from ._chunked_cublas import _finish_chunked, _forward_chunked, _scale_grads
from ._launch import _buffer, _empty, _finalize
from ._plan import F32, _ld, _Opts, _work, opts_cached, plan_from_list
from ._resident import _backward, _forward_resident, _grad_output, _row_weights
from .vocab_parallel import reduce_features_grad_, reduce_rows_

# ----------------------------------------------------------------------------- forward

def _forward(x, w1, b1, a, w2, b2, t, y, o: _Opts, needs, plan, row_weight=None, out_grads=None, wk=None,
             direct=False):
    """Returns loss, terms, correct, n_valid and the six state tensors for the backward: resident:
    (dz1, dz2, -, -, -, -); chunked: the gradients for a grad_output of 1 (gx, gw1, gb1, ga, gw2,
    gb2). ``t`` is the teacher logits tensor or (features, weight, bias). Empty tensors fill unused
    slots. reduction="none": loss (N,), terms (3, N), correct (N,) bool. ``row_weight``/``out_grads``:
    the chunked plan's recompute for a per-row grad_output, written into the stored gradients. ``wk``:
    the call's work, when the caller has it. ``direct`` (eager mode's autograd.Function, not the
    custom op, whose outputs may not alias each other): None in unused slots, and fewer allocations."""
    dev = x.device
    n, c = y.shape[0], w1.shape[0]
    if wk is None:
        wk = _work(x, w1, a, n, c, o, needs, t)
    loss = _buffer((), F32, dev)
    nt = _n_terms(o)  # rows: the terms (ce, kd, logit[, z_loss]) and correct
    if direct:  # the terms with the per-row buffer, the two counts together (the loss stays its own:
        # an output that is a view cannot be modified in place by the caller); every part starts on a
        # 16-byte boundary, as a buffer of its own would (the kernels' pointer specialization)
        r_len = -(-(nt + 1) * n // 4) * 4
        work = _buffer((r_len + 4,), F32, dev)
        rows, terms = work[:(nt + 1) * n].view(nt + 1, n), work[r_len:r_len + nt]
        counts = torch.empty((4,), dtype=torch.int64, device=dev)
        correct, n_valid = counts[0], counts[2]
    else:
        terms = _buffer((nt,), F32, dev)
        correct = torch.empty((), dtype=torch.int64, device=dev)
        n_valid = torch.empty((), dtype=torch.int64, device=dev)
        rows = _buffer((nt + 1, n), F32, dev)
    per_row = _buffer((n,), F32, dev) if o.none else None
    lgp = None
    if plan.resident:
        state = _forward_resident(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows, one_buffer=direct)
        lgp, state[3] = state[3], None  # grad_kernel's logit-loss sums, for _finalize only
    else:
        state = _forward_chunked(wk, plan, o, x, w1, b1, a, w2, b2, t, y, rows, n_valid, needs,
                                 row_weight=row_weight, out_grads=out_grads)
    if o.shard is not None and wk.aux:  # the logit-level sums of this rank's classes, summed over the group
        reduce_rows_(rows, slice(2, 3), o.shard)
    _finalize(wk, o, rows, y, loss, terms, correct, n_valid, per_row, lgp=lgp)
    if not plan.resident:
        _finish_chunked(wk, o, y, n_valid, state)
        if o.shard is not None:  # the features' gradients, stored by the forward
            for k in (0, 3):
                if state[k] is not None:
                    reduce_features_grad_(state[k], o.shard)
    state = state[:6] if direct else [v if v is not None else _empty(dev) for v in state[:6]]
    if o.none:  # per-row results: the terms are rows 0-2 of the row buffer, correct is read only for components
        loss, terms = per_row, rows[:nt]
        if o.components:
            correct = rows[nt] > 0.5
            cost.note("torch:gt", "torch", (), 0, 5 * n)
        else:
            correct = torch.empty(n, dtype=torch.bool, device=dev)
    return (loss, terms, correct, n_valid, *state)


def _n_terms(o: _Opts) -> int:
    """Per-row terms: ce, kd, logit, and z_loss when its weight is not 0."""
    return 4 if o.zl_w else 3


# ----------------------------------------------------------------------------- torch.library ops

def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _no_autocast(device: torch.device):
    """Autocast off inside the op (the entry point already cast the operands); a no-op context when
    autocast is not on (building a torch.autocast context costs tens of microseconds)."""
    if device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _teacher_arg(t, tf, tw, tb):
    return t if t is not None else (tf, tw, tb)


def _fwd_impl(x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight, kd_temperature,
              logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, extra, needs, plan):
    o = opts_cached(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, components, tf32, eps, none, extra)
    with _no_autocast(x.device), _on_device(x.device):
        return tuple(_forward(x, w1, b1, a, w2, b2, _teacher_arg(t, tf, tw, tb), y, o, needs,
                              plan=plan_from_list(plan)))


def _bwd_impl(grad, x, w1, b1, a, w2, b2, y, n_valid, state, n_classes, ce_weight, kd_weight, logit_weight,
              kd_temperature, logit_temperature, kl_norm, ignore_index, mean, tf32, eps, none, extra, needs, plan):
    o = opts_cached(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, False, tf32, eps, none, extra)
    with _no_autocast(x.device), _on_device(x.device):
        return _backward(grad, x, w1, b1, a, w2, b2, y, n_valid, list(state), o, needs, n_classes,
                         plan_from_list(plan))


def _scale_impl(grads, g):
    with _on_device(g.device):
        _scale_grads(grads, g)


def _regrad_impl(grads, g, x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight,
                 kd_temperature, logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, extra,
                 needs, plan):
    """The chunked plan with a per-row grad_output: one more pass of the forward's plan with the row
    weights folded into dz, writing the gradients into ``grads`` (the ones the forward stored)."""
    o = opts_cached(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, components, tf32, eps, none, extra)
    with _no_autocast(x.device), _on_device(x.device):
        _forward(x, w1, b1, a, w2, b2, _teacher_arg(t, tf, tw, tb), y, o, needs, plan_from_list(plan),
                 row_weight=_row_weights(g, y, o.ignore_index), out_grads=list(grads))


@torch.library.custom_op("dhkd::dual_head_kd_fwd", mutates_args=())
def _fwd_op(x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], t: Optional[Tensor], y: Tensor, tf: Optional[Tensor], tw: Optional[Tensor],
            tb: Optional[Tensor], ce_weight: float, kd_weight: float, logit_weight: float, kd_temperature: float,
            logit_temperature: float, kl_norm: bool, ignore_index: int, mean: bool, components: bool,
            tf32: bool, eps: float, none: bool, extra: List[float], needs: List[bool], plan: List[int]
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _fwd_impl(x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight, kd_temperature,
                     logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, extra, needs, plan)


@_fwd_op.register_fake
def _fwd_fake(x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight, kd_temperature,
              logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, extra, needs, plan):
    o = opts_cached(ce_weight, kd_weight, logit_weight, kd_temperature, logit_temperature, kl_norm,
                   ignore_index, mean, components, tf32, eps, none, extra)
    n, c = y.shape[0], w1.shape[0]
    wk = _work(x, w1, a, n, c, o, needs, _teacher_arg(t, tf, tw, tb))
    plan = plan_from_list(plan)
    e = x.new_empty((0,), dtype=F32)
    nt = _n_terms(o)
    if o.none:
        head = [x.new_empty((n,), dtype=F32), x.new_empty_strided((nt, n), (n, 1), dtype=F32),
                x.new_empty((n,), dtype=torch.bool), x.new_empty((), dtype=torch.int64)]
    else:
        head = [x.new_empty((), dtype=F32), x.new_empty((nt,), dtype=F32), x.new_empty((), dtype=torch.int64),
                x.new_empty((), dtype=torch.int64)]
    if plan.resident:
        if n == 0 or not (wk.main or wk.aux):
            return tuple(head + [e.clone() for _ in range(6)])
        state = [x.new_empty_strided((n, c), (_ld(c), 1)) if wk.g_main else e.clone(),
                 x.new_empty_strided((n, c), (_ld(c), 1)) if wk.g_aux else e.clone(),
                 x.new_empty((2, plan.bias_parts, _ld(c)), dtype=F32) if plan.bias_parts else e.clone(),
                 e.clone(), e.clone(), e.clone()]
    else:
        refs = (x, w1, b1, a, w2, b2)
        state = [r.new_empty(r.shape) if (need and r is not None) else e.clone() for r, need in zip(refs, needs)]
    return tuple(head + state)


@torch.library.custom_op("dhkd::dual_head_kd_bwd", mutates_args=())
def _bwd_op(grad: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], y: Tensor, n_valid: Tensor, state: List[Tensor], n_classes: int,
            ce_weight: float, kd_weight: float, logit_weight: float, kd_temperature: float,
            logit_temperature: float, kl_norm: bool, ignore_index: int, mean: bool, tf32: bool, eps: float,
            none: bool, extra: List[float], needs: List[bool], plan: List[int]) -> List[Tensor]:
    return _bwd_impl(grad, x, w1, b1, a, w2, b2, y, n_valid, state, n_classes, ce_weight, kd_weight,
                     logit_weight, kd_temperature, logit_temperature, kl_norm, ignore_index, mean, tf32, eps,
                     none, extra, needs, plan)


@_bwd_op.register_fake
def _bwd_fake(grad, x, w1, b1, a, w2, b2, y, n_valid, state, n_classes, *scalars_and_needs):
    needs = scalars_and_needs[-2]
    refs = (x, w1, b1, None if a is None else a, w2, b2)
    return [r.new_empty(r.shape) if (need and r is not None) else x.new_empty((0,), dtype=F32)
            for r, need in zip(refs, needs)]


@torch.library.custom_op("dhkd::scale_", mutates_args=("grads",))
def _scale_op(grads: List[Tensor], g: Tensor) -> None:
    _scale_impl(grads, g)


@_scale_op.register_fake
def _scale_fake(grads, g):
    return None


@torch.library.custom_op("dhkd::regrad_", mutates_args=("grads",))
def _regrad_op(grads: List[Tensor], g: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], a: Optional[Tensor],
               w2: Tensor, b2: Optional[Tensor], t: Optional[Tensor], y: Tensor, tf: Optional[Tensor],
               tw: Optional[Tensor], tb: Optional[Tensor], ce_weight: float, kd_weight: float,
               logit_weight: float, kd_temperature: float, logit_temperature: float, kl_norm: bool,
               ignore_index: int, mean: bool, components: bool, tf32: bool, eps: float, none: bool,
               extra: List[float], needs: List[bool], plan: List[int]) -> None:
    _regrad_impl(grads, g, x, w1, b1, a, w2, b2, t, y, tf, tw, tb, ce_weight, kd_weight, logit_weight,
                 kd_temperature, logit_temperature, kl_norm, ignore_index, mean, components, tf32, eps, none, extra,
                 needs, plan)


@_regrad_op.register_fake
def _regrad_fake(grads, g, *args):
    return None


# The custom ops run their fake implementation on ``meta`` tensors; ``simulate`` swaps in the real
# implementations (same host code, launches recorded instead of run) through this table.
_OPS = {"bwd": _bwd_op, "scale": _scale_op, "regrad": _regrad_op}

_DOUBLE_BACKWARD = ("fused_dual_head_kd_loss (backend='{}') has no second derivative: its backward ran with "
                    "create_graph=True (double backward, e.g. a gradient penalty). Use backend='reference' "
                    "(plain PyTorch autograd) for higher-order gradients.")

_N_FWD_ARGS = 26  # tensors (11), scalars (13: the last is the list of the LLM options), needs, plan


def _setup_context(ctx, inputs, output):
    x, w1, b1, a, w2, b2, t, y, tf, tw, tb = inputs[:11]
    scalars = inputs[11:24]
    needs = inputs[24]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the non-differentiable outputs
    o = opts_cached(*scalars)
    # the plan the forward ran, decided once by the caller: settings changed since (or between tracing
    # and running a compiled graph) cannot make the backward disagree with it
    ctx.plan = list(inputs[25])
    ctx.resident = plan_from_list(ctx.plan).resident
    ctx.n_classes = w1.shape[0]
    ctx.none = o.none
    if ctx.resident or not o.none:
        ctx.save_for_backward(x, w1, b1, a, w2, b2, y, output[3], *output[4:10])
    else:  # a per-row grad_output of the chunked plan recomputes from the inputs
        ctx.save_for_backward(x, w1, b1, a, w2, b2, y, output[3], *output[4:10], t, tf, tw, tb)
    # scalars for the backward op (everything but return_components) and the recompute (all)
    ctx.opts = tuple(scalars[:8]) + tuple(scalars[9:13])
    ctx.all_opts = tuple(scalars)
    ctx.needs = list(needs)


def _backward_entry(ctx, resident: bool, g):
    """The checks both backwards share (no second derivative; the chunked plan's gradients are scaled
    once) and their inputs: (saved tensors, grad_output, a zero scalar where the loss got none)."""
    if torch.is_grad_enabled():
        raise RuntimeError(_DOUBLE_BACKWARD.format("triton"))
    if not resident and getattr(ctx, "consumed", False):
        from .chunked import SECOND_BACKWARD
        raise RuntimeError(SECOND_BACKWARD.format("triton") + " (the chunked plan of large problems)")
    saved = ctx.saved_tensors
    if g is None:  # the loss itself got no gradient: zero gradients
        g = torch.zeros((), dtype=F32, device=saved[0].device)
        cost.note("torch:zeros", "torch", (), 0, 4)
    return saved, g


def _autograd_backward(ctx, g, *_unused):
    ops = _OPS
    saved, g = _backward_entry(ctx, ctx.resident, g)
    x, w1, b1, a, w2, b2, y, n_valid = saved[:8]
    state = list(saved[8:14])
    needs = ctx.needs
    if ctx.resident:
        grads = ops["bwd"](g, x, w1, b1, a, w2, b2, y, n_valid, state, ctx.n_classes, *ctx.opts, needs, ctx.plan)
    else:
        # the chunked plan's gradients were computed in the forward: scaled in place, once, by a scalar
        # grad_output (or the expanded scalar of .sum()); a per-row one recomputes them with its weights
        ctx.consumed = True
        grads = state
        live = [gr for gr, need in zip(grads, needs) if need and gr.numel()]
        g0, per_row = _grad_output(g)
        if per_row:
            t, tf, tw, tb = saved[14:18]
            ops["regrad"](grads, g0, x, w1, b1, a, w2, b2, t, y, tf, tw, tb, *ctx.all_opts, needs, ctx.plan)
        else:
            ops["scale"](live, g0.to(F32))
    out = [gr if need else None for gr, need in zip(grads, needs)]
    return tuple(out) + (None,) * (_N_FWD_ARGS - 6)


_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _DirectFn(torch.autograd.Function):
    """Eager mode: the forward and backward implementations through a plain autograd.Function, with
    the call's work, plan and options passed as Python objects (computed once by the entry point) and
    the backward's state kept on the context rather than returned as placeholder outputs. The
    ``torch.library`` dispatch of the two ops (its autograd wrapper rebuilds the 25-argument schema's
    defaults on every call, the backward op dispatches again) cost about 480 us of host time per
    forward+backward at imagenet-r18 on the 2-core CPU (``python -m dhkd_kernels host-overhead``,
    2026-12-02), several times the kernels' own time there. torch.compile traces the custom ops instead
    (the entry point calls ``_fwd_op`` when compiling), which keep the op opaque to dynamo and inductor and give it a fake
    implementation."""

    @staticmethod
    def forward(ctx, wk, plan, o, needs, x, w1, b1, a, w2, b2, t, y, tf, tw, tb):
        dev = x.device
        with _no_autocast(dev), _on_device(dev):
            out = _forward(x, w1, b1, a, w2, b2, _teacher_arg(t, tf, tw, tb), y, o, needs, plan, wk=wk, direct=True)
        loss, terms, correct, n_valid = out[:4]
        ctx.mark_non_differentiable(terms, correct, n_valid)
        ctx.set_materialize_grads(False)
        ctx.wk, ctx.plan, ctx.o, ctx.needs = wk, plan, o, needs
        # the state (dz buffers, or the chunked plan's gradients) saved like the inputs: autograd frees
        # it after the backward (unless retain_graph), and takes the returned gradients without a copy
        if plan.resident or not o.none:
            ctx.save_for_backward(x, w1, b1, a, w2, b2, y, n_valid, *out[4:10])
        else:  # a per-row grad_output of the chunked plan recomputes from the inputs
            ctx.save_for_backward(x, w1, b1, a, w2, b2, y, n_valid, *out[4:10], t, tf, tw, tb)
        return loss, terms, correct, n_valid

    @staticmethod
    def backward(ctx, g, *unused):
        plan, o, needs = ctx.plan, ctx.o, ctx.needs
        saved, g = _backward_entry(ctx, plan.resident, g)
        x, w1, b1, a, w2, b2, y, n_valid = saved[:8]
        dev = x.device
        state = list(saved[8:14])
        if plan.resident:
            with _no_autocast(dev), _on_device(dev):
                grads = _backward(g, x, w1, b1, a, w2, b2, y, n_valid, state, o, needs, ctx.wk.c, plan,
                                  wk=ctx.wk)
            if o.shard is not None:  # the features' gradients of this rank's classes, summed over the group
                for k in (0, 3):
                    if grads[k] is not None:
                        reduce_features_grad_(grads[k], o.shard)
        else:
            ctx.consumed = True
            grads = state
            g0, per_row = _grad_output(g)
            if per_row:
                t, tf, tw, tb = saved[14:18]
                full = [v if v is not None else _empty(dev) for v in grads]
                with _no_autocast(dev), _on_device(dev):
                    _forward(x, w1, b1, a, w2, b2, _teacher_arg(t, tf, tw, tb), y, o, needs, plan,
                             row_weight=_row_weights(g0, y, o.ignore_index), out_grads=full, wk=ctx.wk)
            else:
                _scale_impl([gr for gr, need in zip(grads, needs) if need and gr is not None and gr.numel()],
                            g0.to(F32))
        return (None, None, None, None) + tuple(gr if need else None for gr, need in zip(grads, needs)) \
            + (None,) * 5


def direct_forward(wk, plan, o, needs, x, w1, b1, a, w2, b2, t, y, tf, tw, tb):
    """Eager mode's forward (see :class:`_DirectFn`): (loss, terms, correct, n_valid)."""
    return _DirectFn.apply(wk, plan, o, needs, x, w1, b1, a, w2, b2, t, y, tf, tw, tb)


@contextlib.contextmanager
def _direct():
    """The custom op's backward calls the implementations directly (``simulate`` on meta tensors)."""
    saved = dict(_OPS)
    _OPS.update(bwd=_bwd_impl, scale=_scale_impl, regrad=_regrad_impl)
    try:
        yield
    finally:
        _OPS.clear()
        _OPS.update(saved)

