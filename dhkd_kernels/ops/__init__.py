"""Implementations behind ``fused_dual_head_kd_loss``: one module per backend, each with its autograd Function.

Contract of a backend's entry point ``f(features, head_weight, head_bias, aux_weight, aux_bias,
teacher_logits, labels, *, aux_features, **options)``: validated inputs in, ``(loss, terms, correct,
n_valid)`` out, where ``terms`` is a (3,) tensor of the unweighted, reduced CE, KD and logit losses.
"""
