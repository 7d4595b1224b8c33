"""The public entry points: ``fused_dual_head_kd_loss`` and the ``DualHeadKDLoss`` module."""
from __future__ import annotations

import os

import torch
from torch import nn

from . import reference
from ._validation import check_label_values, env_flag, validate
from .ops import TeacherHead
from .ops.chunked import chunked_dual_head_kd_loss
from .ops.vocab_parallel import make_shard, reference_loss_sharded

_CHECK_LABELS = env_flag("DHKD_CHECK_LABELS")


def set_label_check(enabled: bool) -> None:
    """Check label values on the host for CUDA tensors too (a synchronisation per call; for debugging).

    CPU labels are always checked (a ValueError naming the first bad label). On CUDA nothing
    synchronises by default: a valid row (label != ignore_index) whose label is outside [0, C) makes
    the loss, the weight and bias gradients and that row's feature gradient NaN on the triton and torch
    backends."""
    global _CHECK_LABELS
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _CHECK_LABELS = enabled


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover (older torch)
        return False


def _constant(x: torch.Tensor | None, compiling: bool = False) -> torch.Tensor | None:
    """A target with no gradient (labels, teacher): detached, and an ordinary tensor when it was made
    under ``torch.inference_mode()`` (such tensors cannot be saved for backward; one copy of it).
    Under torch.compile, which does not trace ``is_inference``, the tensor is only detached."""
    if x is None:
        return None
    x = x.detach()
    if not compiling and x.is_inference() and not torch.is_inference_mode_enabled():
        x = x.clone()
    return x


def _triton_usable(device: torch.device) -> bool:
    if device.type in ("cuda", "meta"):
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


try:
    from torch._C._functorch import is_functorch_wrapped_tensor, peek_interpreter_stack
except ImportError:  # pragma: no cover (older torch)
    is_functorch_wrapped_tensor = peek_interpreter_stack = None


def _functorch_active(tensors) -> bool:
    """True inside a torch.func transform (grad, vmap, jacrev, ...)."""
    if peek_interpreter_stack is None:
        return False
    if peek_interpreter_stack() is not None:
        return True
    return any(t is not None and is_functorch_wrapped_tensor(t) for t in tensors)


def _resolve_backend(backend: str, device: torch.device, float64: bool = False) -> str:
    if backend == "auto":
        # the Triton kernels take fp32/bf16/fp16 operands; float64 goes to the torch path
        if device.type == "cuda" and not float64 and _triton_ops() is not None:
            return "triton"
        return "torch"
    if backend == "triton":
        if _triton_ops() is None:
            raise RuntimeError("backend='triton' needs the triton package, which is not importable here")
        if not _triton_usable(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got {device}")
    return backend


def _triton_ops():
    """The Triton backend's module, or None where triton cannot be imported (looked up once)."""
    global _TRITON_OPS
    if _TRITON_OPS is False:
        try:
            from .ops import dual_head_kd
        except ImportError:
            dual_head_kd = None
        _TRITON_OPS = dual_head_kd
    return _TRITON_OPS


_TRITON_OPS = False  # not looked up yet


def fused_dual_head_kd_loss(
    features: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    aux_weight: torch.Tensor,
    aux_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    aux_features: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ce_weight: float = 1.0,
    kd_weight: float = 0.0,
    logit_weight: float = 1.0,
    kd_temperature: float = 4.0,
    logit_temperature: float = 2.0,
    logit_loss: str = "binary_kl_norm",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    return_components: bool = False,
    kd_divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    softcap: float | None = None,
    teacher_softcap: float | None = None,
    z_loss_weight: float = 0.0,
    vocab_parallel_group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    vocab_parallel_reduce_features_grad: bool = True,
):
    """Dual-head KD loss from features and head weights, without keeping the (N, C) logits.

    Shapes: features (N, D); head_weight (C, D); head_bias (C,) or None; aux_weight (C, D_aux);
    aux_bias (C,) or None; teacher_logits (N, C), any float dtype, no gradient; labels (N,) int64/int32;
    aux_features (N, D_aux), defaulting to ``features`` (a linear auxiliary head).

    LLM form: ``teacher_logits=None`` with ``teacher_features`` (N, D_t), ``teacher_weight`` (C, D_t) and
    ``teacher_bias`` (C,) or None: the teacher logits t = teacher_features teacher_weight^T + teacher_bias
    are computed inside, chunk by chunk, without a gradient, and never held whole. ``label_smoothing``
    eps applies to the CE term exactly as in ``F.cross_entropy(..., label_smoothing=eps)``.

    With z1 = features W1^T + b1 and z2 = aux_features W2^T + b2 (see ``dhkd_kernels.reference``):
        loss = ce_weight CE(z1, y) + kd_weight KD_T(z1, t) + logit_weight L_tau(z2, t)
    with L = BinaryKL-Norm (default) or BinaryKL, summed over the rows whose label is not
    ``ignore_index`` and divided by their count for ``reduction="mean"`` (0 when there are none);
    ``reduction="none"`` returns the (N,) fp32 per-row weighted losses, 0 for ignored rows.

    LLM options (formulas in ``dhkd_kernels.reference``; every backend):
    ``kd_divergence`` "forward_kl" (default, KL(p || s)), "reverse_kl" (KL(s || p)) or "jsd" (the
    generalised JSD of TRL's GKD / Liger-Kernel: ``jsd_beta`` b KL(p || m) + (1 - b) KL(s || m),
    m = b p + (1 - b) s; b = 0 is forward KL and b = 1 reverse KL), for the KD term with
    s = softmax(z1/T), p = softmax(t/T), scaled by T^2; ``softcap=cap`` replaces z1 and z2 by
    cap tanh(z / cap) before every term (CE, KD, logit-level loss, z-loss, ``correct``) and
    ``teacher_softcap`` does the same to the teacher logits (-inf stays a masked class);
    ``z_loss_weight=lambda`` adds lambda logsumexp(z1)^2 per valid row (PaLM's z-loss, on the
    softcapped z1, temperature 1), reported as the ``z_loss`` component when lambda is not 0.

    Vocabulary-parallel form (the LM head sharded over a tensor-parallel group, Megatron-style): pass
    ``vocab_parallel_group`` (a ``torch.distributed`` ProcessGroup) and ``vocab_start`` (the global id of
    this rank's first class). Each rank passes its contiguous class shard (C_r rows, shards may be uneven,
    down to one class) of ``head_weight``, ``head_bias``, ``aux_weight``, ``aux_bias`` and of the teacher:
    ``teacher_logits`` (N, C_r) or ``teacher_weight`` (C_r, D_t) / ``teacher_bias``; features, aux
    features, teacher features and labels (GLOBAL class ids) are the same on every rank. Every rank gets
    the unsharded op's loss and components and the gradients of its own weight and bias shards; the
    features' gradient is summed over the group inside the op, unless
    ``vocab_parallel_reduce_features_grad=False``, which returns this rank's partial sum and leaves the
    all-reduce to the caller (the Megatron convention: the layer owning the replicated input reduces).
    ``vocab_size`` = C, the global number of classes: pass it and the op adds no host synchronisation
    (the shard layout is then the caller's promise: contiguous, non-overlapping, covering [0, C));
    without it, each call all-gathers every rank's (vocab_start, C_r) and reads it on the host to check
    the layout (a synchronisation on CUDA). Only O(N) per-row statistics cross ranks, never (N, C) data:
    per chunk of rows an all-reduce MAX of (1-2, n) row maxima and an all-reduce SUM of (2-7, n) sums
    (exponentials, the label's logit, counts), a third (1-2, n) SUM for the gradient of reverse KL / JSD;
    per call a (2, N) SUM of the KD and logit-level partial sums and the (N, D) [+ (N, D_aux)] features'
    gradient SUM (docs/kernels.md has the byte count). Every backend ("auto" picks "torch": the triton
    form, eager mode only, has not run on a GPU yet). Every rank must make the same call (the same
    options and N): the collectives run in the same order on all of them.

    Backends: "auto" (Triton kernels for CUDA tensors, else "torch"), "triton", "torch" (chunked
    PyTorch with an analytic backward), "reference" (plain PyTorch autograd, in the inputs' dtype).
    The loss is float32 (float64 for float64 inputs); gradients come back in each input's dtype.
    Only "reference" has second derivatives and supports torch.func transforms; the others raise a
    RuntimeError saying so. Rows not in V never influence a result (garbage there is fine); a teacher
    logit of -inf is a masked class (probability 0 in KD, no logit-level loss). Labels outside
    [0, C) raise a ValueError for CPU tensors; on CUDA they make the loss NaN (see
    :func:`set_label_check`).

    Returns the loss, or with ``return_components=True`` ``(loss, dict)`` whose ``ce``, ``kd``, ``logit``
    are the unweighted terms reduced like the loss (detached; per row (N,) for "none"), ``correct`` the
    number of valid rows whose first arg-max of z1 (softcapped) is the label (per row, bool, for "none"),
    ``n_valid`` the number of valid rows, and ``z_loss`` (reduced like ``ce``) when ``z_loss_weight`` is
    not 0.
    """
    validate(features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels,
             aux_features=aux_features, ce_weight=ce_weight, kd_weight=kd_weight,
             logit_weight=logit_weight, kd_temperature=kd_temperature,
             logit_temperature=logit_temperature, logit_loss=logit_loss, ignore_index=ignore_index,
             reduction=reduction, backend=backend, teacher_features=teacher_features,
             teacher_weight=teacher_weight, teacher_bias=teacher_bias, label_smoothing=label_smoothing,
             return_components=return_components, kd_divergence=kd_divergence, jsd_beta=jsd_beta,
             softcap=softcap, teacher_softcap=teacher_softcap, z_loss_weight=z_loss_weight)
    shard = None
    if vocab_parallel_group is not None:
        shard = make_shard(vocab_parallel_group, vocab_start, vocab_size, vocab_parallel_reduce_features_grad,
                           head_weight.shape[0], features.device)
    elif vocab_start is not None or vocab_size is not None:
        raise ValueError("vocab_start / vocab_size are for the vocabulary-parallel form: pass "
                         "vocab_parallel_group too")
    elif not isinstance(vocab_parallel_reduce_features_grad, bool):
        raise TypeError("vocab_parallel_reduce_features_grad must be a bool, got "
                        f"{type(vocab_parallel_reduce_features_grad).__name__}")
    # the LLM options are passed on only when one is set: the default call is unchanged
    options = kd_divergence != "forward_kl" or softcap is not None or teacher_softcap is not None \
        or z_loss_weight != 0.0
    opts = dict(ce_weight=float(ce_weight), kd_weight=float(kd_weight), logit_weight=float(logit_weight),
                kd_temperature=float(kd_temperature), logit_temperature=float(logit_temperature),
                logit_loss=logit_loss, ignore_index=int(ignore_index), reduction=reduction,
                return_components=bool(return_components), label_smoothing=float(label_smoothing))
    float64 = any(x is not None and x.dtype == torch.float64
                  for x in (features, head_weight, head_bias, aux_weight, aux_bias, aux_features))
    # "auto" takes the torch path for float64 and for the sharded form (its triton form: no GPU run yet)
    backend = _resolve_backend(backend, features.device, float64 or shard is not None)
    if shard is not None:
        opts["vocab_parallel"] = shard
    if options:
        opts.update(kd_divergence=kd_divergence, jsd_beta=float(jsd_beta), z_loss_weight=float(z_loss_weight),
                    softcap=None if softcap is None else float(softcap),
                    teacher_softcap=None if teacher_softcap is None else float(teacher_softcap))
    # under torch.compile the host read would break the graph: the device-side rule applies (a bad
    # label makes that row's loss and gradients NaN)
    compiling = _compiling()
    if not compiling and (labels.device.type == "cpu" or (_CHECK_LABELS and labels.device.type == "cuda")):
        check_label_values(labels, head_weight.shape[0] if shard is None else shard.total, ignore_index)
    if backend != "reference" and not compiling and _functorch_active((features, head_weight, aux_weight, aux_features,
                                                     head_bias, aux_bias)):
        raise RuntimeError(
            f"fused_dual_head_kd_loss(backend={backend!r}) does not support torch.func transforms "
            "(grad, vmap, jacrev, ...): its gradients are computed by fused kernels, not by autograd "
            "formulas functorch can transform. Use backend='reference' inside torch.func, or "
            "torch.autograd.grad / loss.backward() outside it.")
    labels = _constant(labels, compiling)
    if teacher_logits is not None:
        teacher = _constant(teacher_logits, compiling)  # a constant target on every backend
    else:
        teacher = TeacherHead(*(_constant(v, compiling) for v in (teacher_features, teacher_weight, teacher_bias)))
    if backend == "reference":
        head = {} if teacher_logits is not None else dict(
            teacher_features=teacher.features, teacher_weight=teacher.weight, teacher_bias=teacher.bias)
        if shard is not None:
            opts.pop("vocab_parallel")
            return reference_loss_sharded(features, head_weight, head_bias, aux_weight, aux_bias,
                                          teacher_logits if teacher_logits is None else teacher, labels, shard,
                                          aux_features=aux_features, **head, **opts)
        return reference.dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias,
                                           teacher_logits if teacher_logits is None else teacher, labels,
                                           aux_features=aux_features, **head, **opts)
    if backend == "triton":
        run = _triton_ops().dual_head_kd_loss
    else:
        run = chunked_dual_head_kd_loss
    loss, terms, correct, n_valid = run(features, head_weight, head_bias, aux_weight, aux_bias,
                                        teacher, labels, aux_features=aux_features, **opts)
    if not return_components:
        return loss
    components = {"ce": terms[0], "kd": terms[1], "logit": terms[2], "correct": correct, "n_valid": n_valid}
    if opts.get("z_loss_weight"):
        components["z_loss"] = terms[3]
    return loss, components


class DualHeadKDLoss(nn.Module):
    """Module form of :func:`fused_dual_head_kd_loss`: holds the options, takes the tensors (the
    vocabulary-parallel ones included: ``vocab_parallel_group``, ``vocab_start``, ``vocab_size``,
    ``vocab_parallel_reduce_features_grad``)."""

    def __init__(self, *, ce_weight: float = 1.0, kd_weight: float = 0.0, logit_weight: float = 1.0,
                 kd_temperature: float = 4.0, logit_temperature: float = 2.0,
                 logit_loss: str = "binary_kl_norm", ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", return_components: bool = False, label_smoothing: float = 0.0,
                 kd_divergence: str = "forward_kl", jsd_beta: float = 0.5, softcap: float | None = None,
                 teacher_softcap: float | None = None, z_loss_weight: float = 0.0,
                 vocab_parallel_group=None, vocab_start: int | None = None, vocab_size: int | None = None,
                 vocab_parallel_reduce_features_grad: bool = True):
        super().__init__()
        self.options = dict(ce_weight=ce_weight, kd_weight=kd_weight, logit_weight=logit_weight,
                            kd_temperature=kd_temperature, logit_temperature=logit_temperature,
                            logit_loss=logit_loss, ignore_index=ignore_index, reduction=reduction,
                            backend=backend, return_components=return_components,
                            label_smoothing=label_smoothing, kd_divergence=kd_divergence, jsd_beta=jsd_beta,
                            softcap=softcap, teacher_softcap=teacher_softcap, z_loss_weight=z_loss_weight,
                            vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start,
                            vocab_size=vocab_size,
                            vocab_parallel_reduce_features_grad=vocab_parallel_reduce_features_grad)

    def forward(self, features, head_weight, head_bias, aux_weight, aux_bias, teacher_logits, labels,
                aux_features=None, teacher_features=None, teacher_weight=None, teacher_bias=None):
        return fused_dual_head_kd_loss(features, head_weight, head_bias, aux_weight, aux_bias,
                                       teacher_logits, labels, aux_features=aux_features,
                                       teacher_features=teacher_features, teacher_weight=teacher_weight,
                                       teacher_bias=teacher_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
