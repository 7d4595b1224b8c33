"""Implementations behind ``fused_dual_head_kd_loss``: one module per backend, each with its autograd Function.

Contract of a backend's entry point ``f(features, head_weight, head_bias, aux_weight, aux_bias,
teacher_logits, labels, *, aux_features, **options)``: validated inputs in, ``(loss, terms, correct,
n_valid)`` out, where ``terms`` is a (3,) tensor of the unweighted, reduced CE, KD and logit losses
(for ``reduction="none"``: loss (N,), terms (3, N), correct (N,) bool). ``teacher_logits`` is either
the (N, C) tensor or a :class:`TeacherHead` whose product the backend computes chunk by chunk.
"""
from typing import NamedTuple, Optional

import torch


class TeacherHead(NamedTuple):
    """The teacher as its last hidden states and head: logits = features @ weight.T + bias, no gradient."""

    features: torch.Tensor   # (N, D_t)
    weight: torch.Tensor     # (C, D_t)
    bias: Optional[torch.Tensor]  # (C,) or None
