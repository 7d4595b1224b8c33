"""Every bad input raises the documented error, naming the argument, before any work."""
import math

import pytest
import torch

from dhkd_kernels import fused_dual_head_kd_loss
from tests.helpers import make_inputs

N, D, C = 4, 3, 5


def good():
    inputs = make_inputs(N, D, C, seed=0)
    return {k: v for k, v in inputs.items()}


def call(inputs, **opts):
    args = [inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                                "teacher_logits", "labels")]
    return fused_dual_head_kd_loss(*args, aux_features=inputs.get("aux_features"), **opts)


TENSOR_CASES = [
    # (argument, replacement, error type, words the message must contain)
    ("features", torch.randn(N, D, 1), ValueError, "features"),
    ("features", [[0.0] * D] * N, TypeError, "features"),
    ("features", torch.ones(N, D, dtype=torch.int64), TypeError, "features"),
    ("head_weight", torch.randn(C, D + 1), ValueError, "head_weight"),
    ("head_weight", torch.randn(0, D), ValueError, "head_weight"),
    ("head_bias", torch.randn(C + 1), ValueError, "head_bias"),
    ("head_bias", torch.randn(C, 1), ValueError, "head_bias"),
    ("aux_weight", torch.randn(C + 1, D), ValueError, "aux_weight"),
    ("aux_weight", torch.randn(C, D + 2), ValueError, "aux_weight"),
    ("aux_bias", torch.randn(C - 1), ValueError, "aux_bias"),
    ("teacher_logits", torch.randn(N, C + 1), ValueError, "teacher_logits"),
    ("teacher_logits", torch.randn(N + 1, C), ValueError, "teacher_logits"),
    ("teacher_logits", torch.ones(N, C, dtype=torch.int32), TypeError, "teacher_logits"),
    ("labels", torch.zeros(N + 1, dtype=torch.int64), ValueError, "labels"),
    ("labels", torch.zeros(N, dtype=torch.float32), TypeError, "labels"),
    ("labels", torch.zeros(N, 1, dtype=torch.int64), ValueError, "labels"),
    ("labels", torch.tensor([0, 1, C, 2]), ValueError, "labels"),
    ("labels", torch.tensor([0, -1, 2, 2]), ValueError, "labels"),
    ("aux_features", torch.randn(N + 1, 2), ValueError, "aux_features"),
    ("aux_features", torch.randn(N, 2), ValueError, "aux_weight"),  # aux_weight is (C, D), not (C, 2)
]


@pytest.mark.parametrize("name,value,error,words", TENSOR_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(TENSOR_CASES)])
def test_bad_tensors(name, value, error, words):
    inputs = good()
    inputs[name] = value
    with pytest.raises(error, match=words):
        call(inputs)


OPTION_CASES = [
    ("kd_temperature", 0.0, ValueError),
    ("kd_temperature", -1.0, ValueError),
    ("kd_temperature", math.inf, ValueError),
    ("logit_temperature", math.nan, ValueError),
    ("logit_temperature", "2", TypeError),
    ("logit_temperature", True, TypeError),
    ("ce_weight", -0.1, ValueError),
    ("kd_weight", -1, ValueError),
    ("logit_weight", math.nan, ValueError),
    ("logit_weight", None, TypeError),
    ("logit_loss", "mse", ValueError),
    ("reduction", "avg", ValueError),
    ("backend", "cuda", ValueError),
    ("ignore_index", 1.5, TypeError),
    ("kd_divergence", "kl", ValueError),
    ("kd_divergence", None, ValueError),
    ("jsd_beta", 1.5, ValueError),
    ("jsd_beta", -0.1, ValueError),
    ("jsd_beta", math.nan, ValueError),
    ("jsd_beta", True, TypeError),
    ("jsd_beta", "0.5", TypeError),
    ("softcap", 0.0, ValueError),
    ("softcap", -30.0, ValueError),
    ("softcap", math.inf, ValueError),
    ("softcap", math.nan, ValueError),
    ("softcap", True, TypeError),
    ("teacher_softcap", 0, ValueError),
    ("teacher_softcap", "30", TypeError),
    ("z_loss_weight", -1e-4, ValueError),
    ("z_loss_weight", math.inf, ValueError),
    ("z_loss_weight", math.nan, ValueError),
    ("z_loss_weight", None, TypeError),
]


@pytest.mark.parametrize("name,value,error", OPTION_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in OPTION_CASES])
def test_bad_options(name, value, error):
    with pytest.raises(error, match=name):
        call(good(), **{name: value})


def test_ignore_index_label_is_allowed_and_custom_index_checked():
    inputs = good()
    inputs["labels"] = torch.tensor([0, -100, 2, 4])
    assert torch.isfinite(call(inputs))
    with pytest.raises(ValueError, match="labels"):
        call(inputs, ignore_index=-1)


def test_devices_must_match():
    if not torch.cuda.is_available():
        inputs = good()
        inputs["teacher_logits"] = inputs["teacher_logits"].to("meta")
        with pytest.raises(ValueError, match="device"):
            call(inputs)
    else:
        inputs = good()
        inputs["labels"] = inputs["labels"].cuda()
        with pytest.raises(ValueError, match="device"):
            call(inputs)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    # the kernels are decorated on import, reading TRITON_INTERPRET then: import them first, or every
    # later triton test in this process would get compiled-mode kernels and no driver
    try:
        import dhkd_kernels.ops.dual_head_kd  # noqa: F401
    except ImportError:
        pass
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        call(good(), backend="triton")


def test_errors_come_before_any_work(monkeypatch):
    """A bad option must fail even if the computation itself would blow up."""
    from dhkd_kernels.ops import chunked

    def boom(*a, **k):
        raise AssertionError("computation started before validation")

    monkeypatch.setattr(chunked.ChunkedDualHeadKD, "apply", boom)
    with pytest.raises(ValueError, match="reduction"):
        call(good(), reduction="max", backend="torch")
