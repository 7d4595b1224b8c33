"""Property-based checks: random shapes, options and values, torch path against the float64 reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import assert_matches_reference, make_inputs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12), d=st.integers(1, 9), c=st.integers(1, 40),
    da=st.one_of(st.none(), st.integers(1, 7)),
    bias=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    logit_scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    teacher_scale=st.sampled_from([0.0, 1.0, 8.0, 50.0]),
    ce_weight=st.floats(0.0, 2.0), kd_weight=st.floats(0.0, 2.0), logit_weight=st.floats(0.0, 2.0),
    kd_temperature=st.floats(0.5, 10.0), logit_temperature=st.floats(0.5, 10.0),
    logit_loss=st.sampled_from(["binary_kl_norm", "binary_kl"]),
    reduction=st.sampled_from(["mean", "sum"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_torch_path_matches_reference(n, d, c, da, bias, ignore_frac, logit_scale, teacher_scale,
                                      ce_weight, kd_weight, logit_weight, kd_temperature,
                                      logit_temperature, logit_loss, reduction, dtype, seed):
    inputs = make_inputs(n, d, c, da=da, dtype=dtype, bias=bias, ignore_frac=ignore_frac,
                         logit_scale=logit_scale, teacher_scale=teacher_scale, seed=seed)
    assert_matches_reference(inputs, backend="torch", ce_weight=ce_weight, kd_weight=kd_weight,
                             logit_weight=logit_weight, kd_temperature=kd_temperature,
                             logit_temperature=logit_temperature, logit_loss=logit_loss,
                             reduction=reduction)
