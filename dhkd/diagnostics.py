"""Head diagnostics: is a linear classification head collapsing, and do two losses fight over the backbone?

Pure PyTorch, no dependency on the trainer. Every function accepts CPU or CUDA tensors of any floating
dtype, detaches its inputs (except :func:`backbone_gradient_cosine`, which differentiates) and computes
in float64. Results are Python floats so they can go straight into a metrics log.

Notation: a head ``z = W h + b`` with class-weight matrix ``W`` of shape (C, d), rows ``w_c``; features
``h_i`` (N, d) with labels ``y_i``.

What the numbers mean (Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal
phase of deep learning training", PNAS: at the end of CE training the class means and the classifier
rows converge to a simplex equiangular tight frame (ETF), and within-class variability vanishes):

``norm_mean``, ``norm_cv``
    mean and coefficient of variation (population std / mean) of the row norms ``||w_c||``.
    Neural collapse makes the rows equinorm: CV -> 0. A head that a conflicting loss pulls apart shows
    a growing CV (some classes' rows shrink or blow up); a vanishing ``norm_mean`` means the head is
    being driven to zero.
``cos_mean``, ``cos_std``, ``cos_etf_gap``, ``cos_etf_absdev``
    cosines ``cos(w_i, w_j)`` over the C(C-1)/2 distinct pairs i < j: their mean, population std, the
    gap ``cos_mean - (-1/(C-1))`` to the simplex-ETF value and the mean absolute deviation
    ``mean |cos_ij + 1/(C-1)|`` (Papyan et al.'s equiangularity measure). An ETF head has every cosine
    equal to -1/(C-1): gap, absdev and std all -> 0. Rows drifting towards a common direction (a
    positive gap) mean the classes are no longer maximally separated.
``cos_centered_etf_gap``, ``cos_centered_std``
    the same after subtracting the mean row ``(1/C) sum_c w_c`` (the neural-collapse literature centres
    class means on the global mean). For a softmax head this removes a direction softmax ignores (it
    shifts every logit of a sample by the same amount); for a sigmoid/logit-level head it does not.
    Note: centred rows sum to zero, so with equal norms their mean cosine is exactly -1/(C-1) whatever
    the angles; the centred gap therefore only measures norm inequality, and ``cos_centered_std`` is
    the informative centred number.
``nc1``
    NC1 = tr(Sigma_W Sigma_B^+) / C (Papyan et al. 2020): within-class scatter measured in units of the
    between-class scatter. 0 when every feature equals its class mean (full variability collapse);
    grows as within-class noise grows.
gradient cosine
    ``cos(g_prob, g_logit)`` between the backbone gradients of the probability-level loss (CE/KD on the
    main head) and the logit-level loss (BinaryKL on the auxiliary head). The DHKD paper (Yang et al.,
    "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
    arXiv:2411.08937) argues that these two losses conflict in a shared linear classifier but not in
    the backbone. A negative cosine means the two losses pull the backbone in conflicting directions;
    this is the quantity gradient alignment tests, removing the conflicting component when it is < 0.
head gradient cosine
    ``cos(dL_a/dW, dL_b/dW)`` on the weights W (C, d) of one linear head, e.g. CE and BinaryKL on a
    shared head: the classifier-level conflict the DHKD paper's neural-collapse argument is about.
    With G = dL/dz (N, C) and the head's inputs H (N, d), dL/dW = G^T H, so a loss's gradient on row
    w_c is the G-weighted sum of the features. CE's G sums to 0 over the classes of each sample (softmax
    ignores a common shift of the logits), a per-class sigmoid loss's G need not: the common-mode part of
    a logit-level gradient is invisible to CE, and orthogonal to its gradient when H is.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = [
    "backbone_gradient_cosine",
    "gradient_cosine",
    "head_gradient_cosine",
    "head_report",
    "nc1",
    "pairwise_cosine_stats",
    "weight_norm_stats",
]

_F64 = torch.float64


def _check_float_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _check_weight(name: str, weight) -> torch.Tensor:
    _check_float_tensor(name, weight, 2)
    if weight.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 rows (classes), got shape {tuple(weight.shape)}")
    if weight.shape[1] < 1:
        raise ValueError(f"{name} must have at least 1 column, got shape {tuple(weight.shape)}")
    return weight.detach().to(_F64)


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; all-zero rows stay zero (their cosine with anything is 0)."""
    norms = w.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, w / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(w))


def weight_norm_stats(weight: torch.Tensor) -> dict:
    """Row norms of a (C, d) class-weight matrix: ``{"mean", "std", "cv"}``.

    ``std`` is the population std (divide by C); ``cv = std / mean``, defined as 0.0 when every row is zero.
    """
    norms = _check_weight("weight", weight).norm(dim=1)
    mean = norms.mean()
    std = norms.std(unbiased=False)
    cv = (std / mean).item() if mean.item() > 0 else 0.0
    return {"mean": mean.item(), "std": std.item(), "cv": cv}


def pairwise_cosine_stats(weight: torch.Tensor, center: bool = False) -> dict:
    """Cosines between the rows of a (C, d) class-weight matrix over the distinct pairs i < j.

    Returns ``{"mean_cos", "std_cos" (population), "etf_cos" = -1/(C-1), "gap" = mean_cos - etf_cos,
    "mean_abs_dev" = mean_ij |cos_ij - etf_cos|}``. With ``center=True`` the mean row is subtracted
    first (then an equinorm head has mean_cos = etf_cos exactly; see the module docstring).
    A zero row has cosine 0 with every other row.
    """
    w = _check_weight("weight", weight)
    if center:
        w = w - w.mean(dim=0, keepdim=True)
    c = w.shape[0]
    u = _unit_rows(w)
    i, j = torch.triu_indices(c, c, offset=1, device=w.device)
    cos = (u @ u.T)[i, j]
    etf = -1.0 / (c - 1)
    mean_cos = cos.mean().item()
    return {
        "mean_cos": mean_cos,
        "std_cos": cos.std(unbiased=False).item(),
        "etf_cos": etf,
        "gap": mean_cos - etf,
        "mean_abs_dev": (cos - etf).abs().mean().item(),
    }


def nc1(features: torch.Tensor, labels: torch.Tensor, num_classes: int, rtol: float | None = None) -> float:
    """NC1 = tr(Sigma_W Sigma_B^+) / C' over the C' classes present in ``labels``.

    features (N, d), labels (N,) integers in [0, num_classes). With class means mu_c, the global mean
    mu_G of all N features (Papyan et al. 2020), D_i = h_i - mu_{y_i} and M the (C', d) matrix of rows
    mu_c - mu_G:
        Sigma_W = D^T D / N,   Sigma_B = M^T M / C'.
    Since (M^T M)^+ = M^+ (M^+)^T, NC1 = ||D M^+||_F^2 / N = sum_k ||D v_k||^2 / (N s_k^2) over the SVD
    M = U S V^T, so no d x d matrix is formed. The pseudo-inverse keeps singular values above ``rtol``
    times the largest (default max(C', d) * eps of the input dtype) and at most C' - 1 of them: the
    count-weighted rows of M sum to zero, so rank(M) <= C' - 1 and the last singular value is round-off
    (keeping it would make NC1 explode when the features share a large offset). Classes absent from
    the batch are left out. Returns nan when fewer than 2 classes are present or the class means
    coincide (NC1 is undefined then).
    """
    _check_float_tensor("features", features, 2)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but features has {features.shape[0]} rows")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    n = features.shape[0]
    if n == 0:
        return math.nan
    lab = labels.detach().long().to(features.device)
    if int(lab.min()) < 0 or int(lab.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(lab.min())}, {int(lab.max())}]")
    eps = torch.finfo(features.dtype).eps
    h = features.detach().to(_F64)
    h = h - h.mean(dim=0, keepdim=True)  # centre on mu_G first: class means are then the rows of M
    counts = torch.bincount(lab, minlength=num_classes)
    sums = torch.zeros(num_classes, h.shape[1], dtype=_F64, device=h.device).index_add_(0, lab, h)
    present = counts > 0
    n_present = int(present.sum())
    if n_present < 2:
        return math.nan
    means = sums / counts.clamp_min(1).unsqueeze(1).to(_F64)
    d_within = h - means[lab]
    m = means[present]
    _, sv, vh = torch.linalg.svd(m, full_matrices=False)
    if not bool(sv[0] > 0):
        return math.nan
    if rtol is None:
        rtol = max(n_present, h.shape[1]) * eps
    # sum_c n_c (mu_c - mu_G) = 0, so rank(M) <= C' - 1: the last singular value is round-off, never kept.
    keep = (sv > rtol * sv[0]) & (torch.arange(sv.shape[0], device=sv.device) < n_present - 1)
    proj = (d_within @ vh[keep].T) / sv[keep]
    return proj.square().sum().item() / n


def _as_tensor_list(name: str, grads) -> list:
    if isinstance(grads, torch.Tensor):
        return [grads]
    if isinstance(grads, (list, tuple)):
        for k, g in enumerate(grads):
            if g is not None and not isinstance(g, torch.Tensor):
                raise TypeError(f"{name}[{k}] must be a torch.Tensor or None, got {type(g).__name__}")
        return list(grads)
    raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(grads).__name__}")


def gradient_cosine(grads_a, grads_b) -> float:
    """Cosine between two gradients, each a tensor or a list/tuple of tensors (flattened and concatenated).

    Lists must match in length and in each entry's number of elements; a ``None`` entry (what
    ``torch.autograd.grad(..., allow_unused=True)`` returns for an unused input) counts as zeros.
    Returns 0.0 when either gradient is exactly zero (no direction, so no conflict), never nan for
    finite inputs; non-finite gradients give nan.
    """
    a = _as_tensor_list("grads_a", grads_a)
    b = _as_tensor_list("grads_b", grads_b)
    if len(a) != len(b):
        raise ValueError(f"grads_a has {len(a)} tensors but grads_b has {len(b)}")
    if not a:
        raise ValueError("grads_a and grads_b are empty")
    terms = []  # per entry: (|a|^2, |b|^2, a.b) as a float64 tensor on the first gradient's device
    for k, (ga, gb) in enumerate(zip(a, b)):
        if ga is not None and gb is not None and ga.numel() != gb.numel():
            raise ValueError(f"grads_a[{k}] has {ga.numel()} elements but grads_b[{k}] has {gb.numel()}")
        for name, g in (("grads_a", ga), ("grads_b", gb)):
            if g is not None and not g.is_floating_point():
                raise TypeError(f"{name}[{k}] must be a floating-point tensor, got dtype {g.dtype}")
        if ga is None and gb is None:
            continue
        dev = terms[0].device if terms else (ga if ga is not None else gb).device
        zero = torch.zeros((), dtype=_F64, device=dev)
        va = None if ga is None else ga.detach().reshape(-1).to(device=dev, dtype=_F64)
        vb = None if gb is None else gb.detach().reshape(-1).to(device=dev, dtype=_F64)
        terms.append(torch.stack([
            zero if va is None else va.dot(va),
            zero if vb is None else vb.dot(vb),
            zero if va is None or vb is None else va.dot(vb),
        ]))
    na, nb, dot = torch.stack(terms).sum(0).tolist() if terms else (0.0, 0.0, 0.0)
    if not (math.isfinite(na) and math.isfinite(nb) and math.isfinite(dot)):
        return math.nan
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / (math.sqrt(na) * math.sqrt(nb))))


def backbone_gradient_cosine(
    features: torch.Tensor,
    loss_prob: torch.Tensor,
    loss_logit: torch.Tensor,
    params: Iterable[torch.Tensor] | None = None,
) -> float:
    """cos(d loss_prob / d theta, d loss_logit / d theta) for the backbone.

    theta = ``params`` (e.g. the backbone's parameters) when given, else the ``features`` tensor itself
    (the backbone output, which must be part of both losses' graph). Uses ``torch.autograd.grad`` with
    ``retain_graph=True`` for both calls, so the caller can still ``backward()`` the total loss; no
    ``.grad`` field is touched. Inputs that a loss does not reach count as zero gradient.
    Zero-gradient handling as in :func:`gradient_cosine` (0.0).
    """
    for name, loss in (("loss_prob", loss_prob), ("loss_logit", loss_logit)):
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"{name} does not require grad (computed under no_grad or detached?)")
    if params is None:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not features.requires_grad:
            raise ValueError("features does not require grad; pass params or a features tensor in the graph")
        targets: Sequence[torch.Tensor] = [features]
    else:
        targets = [p for p in params]
        if not targets:
            raise ValueError("params is empty")
        for k, p in enumerate(targets):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{k}] must be a torch.Tensor, got {type(p).__name__}")
            if not p.requires_grad:
                raise ValueError(f"params[{k}] does not require grad")
    g_prob = torch.autograd.grad(loss_prob.reshape(()), targets, retain_graph=True, allow_unused=True)
    g_logit = torch.autograd.grad(loss_logit.reshape(()), targets, retain_graph=True, allow_unused=True)
    return gradient_cosine(list(g_prob), list(g_logit))


def head_gradient_cosine(loss_a: torch.Tensor, loss_b: torch.Tensor, head_weight: torch.Tensor) -> dict:
    """Cosines between two losses' gradients on a linear head's weight matrix W (C, d).

    Returns ``{"cos": cos(vec dL_a/dW, vec dL_b/dW), "row_cos_mean": mean_c cos(dL_a/dw_c, dL_b/dw_c),
    "row_conflict_frac": the fraction of classes c whose row cosine is < 0}``. A row (or a whole
    gradient) that is zero for either loss has cosine 0. Differentiates with ``torch.autograd.grad(...,
    retain_graph=True)``, so the caller can still ``backward()``; no ``.grad`` is touched. A loss that
    does not reach W counts as a zero gradient.
    """
    w = head_weight
    _check_float_tensor("head_weight", w, 2)
    if not w.requires_grad:
        raise ValueError("head_weight does not require grad")
    grads = []
    for name, loss in (("loss_a", loss_a), ("loss_b", loss_b)):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError(f"{name} does not require grad (computed under no_grad or detached?)")
        g, = torch.autograd.grad(loss.reshape(()), [w], retain_graph=True, allow_unused=True)
        grads.append(torch.zeros_like(w, dtype=_F64) if g is None else g.detach().to(_F64))
    a, b = grads
    rows = (_unit_rows(a) * _unit_rows(b)).sum(1)
    return {"cos": gradient_cosine(a, b), "row_cos_mean": rows.mean().item(),
            "row_conflict_frac": (rows < 0).double().mean().item()}


def head_report(
    head_weight: torch.Tensor,
    features: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> dict:
    """All head diagnostics as a flat ``{key: float}`` dict with stable keys.

    Always: ``norm_mean``, ``norm_cv``, ``cos_mean``, ``cos_std``, ``cos_etf_gap``, ``cos_etf_absdev``,
    ``cos_centered_etf_gap``, ``cos_centered_std``. With ``features`` (N, d') (the inputs of this head;
    NC1 depends on them alone) and ``labels`` (N,) also ``nc1`` (``num_classes`` defaults to the number of rows of ``head_weight``). The trainer logs them
    as ``diag/main/<key>`` and ``diag/aux/<key>``.
    """
    w = _check_weight("head_weight", head_weight)
    if (features is None) != (labels is None):
        raise ValueError("features and labels must be given together (both or neither)")
    norms = weight_norm_stats(w)
    cos = pairwise_cosine_stats(w)
    ccos = pairwise_cosine_stats(w, center=True)
    out = {
        "norm_mean": norms["mean"],
        "norm_cv": norms["cv"],
        "cos_mean": cos["mean_cos"],
        "cos_std": cos["std_cos"],
        "cos_etf_gap": cos["gap"],
        "cos_etf_absdev": cos["mean_abs_dev"],
        "cos_centered_etf_gap": ccos["gap"],
        "cos_centered_std": ccos["std_cos"],
    }
    if features is not None:
        out["nc1"] = nc1(features, labels, head_weight.shape[0] if num_classes is None else num_classes)
    return out
