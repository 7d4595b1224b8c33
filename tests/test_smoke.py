import torch

from tests.helpers import assert_matches_reference, make_inputs


def test_torch_path_matches_reference_float32():
    inputs = make_inputs(9, 5, 7, ignore_frac=0.3)
    assert_matches_reference(inputs, backend="torch", kd_weight=0.5)


def test_torch_path_bf16():
    inputs = make_inputs(9, 5, 7, dtype=torch.bfloat16, da=4)
    assert_matches_reference(inputs, backend="torch", kd_weight=0.5)
