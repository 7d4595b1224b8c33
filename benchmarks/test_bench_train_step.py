"""End-to-end DHKD training-step throughput: ResNet-34 teacher -> ResNet-18 DualHeadStudent on
synthetic 224x224 batches (images/s in extra_info). CUDA only.

One step: teacher logits under no_grad, student features, CE (main head) + BinaryKL-Norm (aux head)
through the loss, backward, SGD step. Variants: bf16 autocast + channels_last (eager or torch.compile
of both networks) with the fused loss or the eager reference, and fp32 eager with the reference as in
the original code. Nothing here asserts on time.
"""
from __future__ import annotations

import itertools
import time

import pytest
import torch

from .providers import rel_err, sync, time_median

BATCH = 256
NUM_CLASSES = 1000
STEP_LOSS = dict(ce_weight=1.0, kd_weight=0.0, logit_weight=1.0, logit_temperature=2.0,
                 logit_loss="binary_kl_norm")
VARIANTS = [  # (precision, compile, loss)
    ("bf16", False, "fused"), ("bf16", False, "reference"),
    ("bf16", True, "fused"), ("bf16", True, "reference"),
    ("fp32", False, "reference"),
]


def _loss_fn(kind):
    from dhkd_kernels import fused_dual_head_kd_loss, reference
    if kind == "fused":
        return fused_dual_head_kd_loss
    return reference.dual_head_kd_loss


def _loss(kind, student, feats, aux, t, y):
    """Loss on the student's features; head weights cast to the features' dtype, as autocast would."""
    dt = feats.dtype
    w = [p.to(dt) for p in (student.head.weight, student.head.bias, student.aux_head.weight,
                            student.aux_head.bias)]
    return _loss_fn(kind)(feats, w[0], w[1], w[2], w[3], t, y, aux_features=aux, **STEP_LOSS)


def build_step(precision, compiled, loss, device, *, batch=BATCH, image_size=224, num_classes=NUM_CLASSES):
    """The timed training step and what it needs: returns (step, next_batch, check) where
    ``step(x, y)`` runs one synchronized step, ``next_batch()`` rotates three synthetic batches and
    ``check()`` returns the relative error of the step's loss against float64 on the same features."""
    from dhkd.models import build_student, build_teacher
    bf16 = precision == "bf16"
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    torch.manual_seed(0)
    student = build_student("resnet18", num_classes=num_classes, aux_head="linear").to(device, memory_format=fmt)
    teacher = build_teacher("resnet34", num_classes=num_classes).to(device, memory_format=fmt).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    features_of = torch.compile(student.forward_features) if compiled else student.forward_features
    teacher_fn = torch.compile(teacher) if compiled else teacher
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(batch, 3, image_size, image_size, generator=g, device=device)
                .contiguous(memory_format=fmt),
                torch.randint(0, num_classes, (batch,), generator=g, device=device)) for _ in range(3)]
    order = itertools.cycle(batches)

    def forward(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t = teacher_fn(x)
            feats, aux = features_of(x)
        return feats, aux, t.float()

    def step(x, y, loss=loss):
        feats, aux, t = forward(x)
        value = _loss(loss, student, feats, aux, t, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sync(device)
        return value.detach()

    def check(loss=loss):
        x, y = batches[0]
        feats, aux, t = forward(x)
        got = _loss(loss, student, feats, aux, t, y)
        ref = [v.detach().double() for v in (feats, student.head.weight, student.head.bias,
                                             student.aux_head.weight, student.aux_head.bias, t)]
        want = _loss_fn("reference")(*ref, y, **STEP_LOSS)
        return rel_err(got, want), (feats, aux, t, y)

    def loss_only_fn(feats, aux, t, y, loss=loss):
        f_det = feats.detach().requires_grad_(True)
        a_det = None if aux is None else aux.detach().requires_grad_(True)

        def run():
            _loss(loss, student, f_det, a_det, t, y).backward()
        return run

    step.loss_only_fn = loss_only_fn
    step.zero_grad = lambda: opt.zero_grad(set_to_none=True)
    return step, lambda: next(order), check


@pytest.mark.parametrize("precision,compiled,loss", VARIANTS,
                         ids=[f"{p}-{'compiled' if c else 'eager'}-{l}" for p, c, l in VARIANTS])
def test_train_step(benchmark, precision, compiled, loss):
    if not torch.cuda.is_available():
        pytest.skip("training-step throughput needs a CUDA device, none here")
    try:
        import dhkd.models  # noqa: F401
    except ImportError as e:
        pytest.skip(f"dhkd.models is not available ({e})")
    device = torch.device("cuda")
    step, next_batch, check = build_step(precision, compiled, loss, device)

    err, (feats, aux, t, y) = check()
    limit = 2e-2 if precision == "bf16" else 1e-4
    assert err <= limit, f"step loss differs from float64 on the same features: rel {err:.2e} > {limit}"

    t0 = time.perf_counter()
    for _ in range(3):  # warm-up, compiles when compiled
        step(*next_batch())
    warmup_s = time.perf_counter() - t0
    benchmark.group = f"train step resnet34->resnet18 batch {BATCH}"
    benchmark.pedantic(step, setup=lambda: (next_batch(), {}), rounds=20, warmup_rounds=2, iterations=1)

    # the loss's share of the step: its forward+backward alone on this step's feature shapes
    loss_s = time_median(step.loss_only_fn(feats, aux, t, y), device, rounds=20, warmup=3)
    step.zero_grad()

    from .test_bench_loss import _versions, device_name
    info = dict(precision=precision, compiled=compiled, loss=loss, batch=BATCH, channels_last=precision == "bf16",
                device_name=device_name(device), **_versions(), warmup_s=warmup_s, check_rel_err_loss=err,
                loss_ms=loss_s * 1e3)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        info.update(step_ms=stats.median * 1e3, images_per_s=BATCH / stats.median,
                    loss_fraction=loss_s / stats.median)
    benchmark.extra_info.update(info)
