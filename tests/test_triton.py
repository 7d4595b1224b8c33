"""Triton kernels (``backend="triton"``) against the float64 reference.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
tiny; the same tests run on CUDA when present, plus the GPU-only ones at the end. Every test runs
with NaN-poisoned kernel outputs, so a value a kernel fails to write shows up as a non-finite result.
The ``plan`` fixture runs a test under each plan of the backend: resident with the Triton GEMMs,
resident with cuBLAS (CPU BLAS here), and chunked (a memory budget so small that the auxiliary head
runs in several class slabs and the main head in several row chunks).
"""
from __future__ import annotations

import pytest
import torch

from dhkd_kernels import fused_dual_head_kd_loss, reference
from tests.helpers import (GRAD_NAMES, assert_matches_reference, cast_inputs, loss_and_grads, make_inputs,
                           reference_in, rel_err)

dhk = pytest.importorskip("dhkd_kernels.ops.dual_head_kd")
_plan = pytest.importorskip("dhkd_kernels.ops._plan")
_launch = pytest.importorskip("dhkd_kernels.ops._launch")

ARGS = ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits", "labels")
PLANS = ("triton", "cublas", "chunked")
CHUNKED_BUDGET = 2048  # bytes: the smallest chunks (4 rows, 16-class slabs in the interpreter)


def cuda_only(test):
    """GPU-only test: marked ``gpu`` (pyproject marker) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(autouse=True)
def _poison_and_strict_fp32(monkeypatch):
    monkeypatch.setattr(_launch, "_POISON", True)
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    yield


def use_plan(monkeypatch, plan: str) -> None:
    if plan == "chunked":
        monkeypatch.setattr(_plan, "MEMORY_BUDGET_BYTES", CHUNKED_BUDGET)
        monkeypatch.setattr(_plan, "_ENGINE", "cublas")
    else:
        monkeypatch.setattr(_plan, "_ENGINE", plan)


@pytest.fixture(params=PLANS)
def plan(request, monkeypatch):
    use_plan(monkeypatch, request.param)
    return request.param


def current_plan(inputs, **opts):
    """The Plan the backend picks for ``inputs`` (all grads on) under the current settings."""
    o = dhk._opts_from(opts.get("ce_weight", 1.0), opts.get("kd_weight", 0.0), opts.get("logit_weight", 1.0),
                       4.0, 2.0, True, -100, True, False, False)
    x = inputs["features"]
    n, c = inputs["teacher_logits"].shape
    wk = dhk._work(x, inputs["head_weight"], inputs["aux_features"], n, c, o, [True] * 6)
    return dhk.make_plan(wk, x.device)


def _call(inputs, **opts):
    return fused_dual_head_kd_loss(*[inputs[k] for k in ARGS], aux_features=inputs["aux_features"], **opts)


# ------------------------------------------------------------------ loss and every gradient

@pytest.mark.parametrize("n,d,c,da,bias", [
    (1, 3, 1, None, True),
    (1, 3, 7, None, False),
    (9, 5, 7, 3, True),
    (9, 3, 129, None, True),
    (37, 20, 33, 6, False),
    (6, 4, 32, None, True),
    (5, 3, 16, 2, True),
])
def test_matches_reference_shapes(device, plan, n, d, c, da, bias):
    inputs = make_inputs(n, d, c, da=da, bias=bias, device=device, ignore_frac=0.25, seed=n + c)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


@pytest.mark.parametrize("c", [15, 16, 47, 48])
@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1), dict(kd_divergence="reverse_kl"),
                                  dict(softcap=5.0, teacher_softcap=6.0, z_loss_weight=1e-2)])
def test_statistics_full_tiles_and_tail(device, plan, c, opts):
    """Pass 1 reads the row's full class tiles without class masks and its partial last tile with them
    (the interpreter's tiles are 16 classes): rows whose width is, and is not, a multiple of the tile,
    with the options that keep their own lane sums."""
    inputs = make_inputs(7, 4, c, bias=True, device=device, ignore_frac=0.2, seed=c, teacher_scale=6.0)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5, **opts)


@pytest.mark.parametrize("logit_loss,reduction,kd_weight", [
    ("binary_kl", "sum", 0.7),
    ("binary_kl", "mean", 0.0),
    ("binary_kl_norm", "sum", 0.0),
])
def test_losses_and_reductions(device, plan, logit_loss, reduction, kd_weight):
    inputs = make_inputs(11, 6, 21, da=4, device=device, ignore_frac=0.2, seed=3)
    assert_matches_reference(inputs, backend="triton", logit_loss=logit_loss, reduction=reduction,
                             kd_weight=kd_weight, ce_weight=0.8, logit_weight=1.3,
                             kd_temperature=2.5, logit_temperature=1.5)


@pytest.mark.parametrize("weights", [dict(ce_weight=0.0, kd_weight=1.0, logit_weight=0.0),
                                     dict(ce_weight=1.0, kd_weight=0.0, logit_weight=0.0),
                                     dict(ce_weight=0.0, kd_weight=0.0, logit_weight=1.0)])
def test_single_terms(device, plan, weights):
    inputs = make_inputs(7, 4, 19, device=device, seed=5)
    assert_matches_reference(inputs, backend="triton", **weights)


def test_confident_and_large_logits(device, plan):
    confident = make_inputs(10, 8, 23, device=device, logit_scale=30.0, teacher_scale=30.0, seed=6)
    assert_matches_reference(confident, backend="triton", kd_weight=0.5)
    large = make_inputs(6, 4, 17, device=device, logit_scale=1e4, teacher_scale=1e4, seed=7)
    for logit_loss in ("binary_kl_norm", "binary_kl"):
        assert_matches_reference(large, backend="triton", kd_weight=0.5, logit_loss=logit_loss)


def test_teacher_equals_student(device):
    inputs = make_inputs(8, 5, 18, device=device, seed=8)
    with torch.no_grad():
        z1 = torch.nn.functional.linear(inputs["features"], inputs["head_weight"], inputs["head_bias"])
    inputs["teacher_logits"] = z1.clone()
    assert_matches_reference(inputs, backend="triton", kd_weight=1.0, ce_weight=0.0)


def test_confident_rows_keep_small_ce_and_gradients(device):
    """p_y -> 1 in float32: CE ~ 1e-5 and p_y - 1 keep their digits (eager float32 loses ~1% here)."""
    inputs = make_inputs(1, 1, 36, device=device, logit_scale=10.0, teacher_scale=0.0, seed=469)
    opts = dict(ce_weight=1.0, kd_weight=0.0, logit_weight=0.0)
    loss, grads = loss_and_grads(inputs, backend="triton", **opts)
    ref, ref_grads = reference_in(inputs, torch.float64, **opts)
    assert ref.item() < 1e-3  # the case is confident
    assert rel_err(loss, ref) < 1e-5
    for k in ("features", "head_weight", "head_bias"):
        assert rel_err(grads[k], ref_grads[k]) < 1e-5, k


@pytest.mark.parametrize("gap", [1e-3, 0.3, 3.0])
def test_small_gaps_keep_relative_accuracy(device, gap):
    """BinaryKL-Norm of a student close to its teacher: tiny losses stay accurate in float32."""
    inputs = make_inputs(6, 5, 19, device=device, seed=9)
    with torch.no_grad():
        z2 = torch.nn.functional.linear(inputs["features"], inputs["aux_weight"], inputs["aux_bias"])
    noise = torch.randn(z2.shape, generator=torch.Generator().manual_seed(1)).to(device)
    inputs["teacher_logits"] = z2 + gap * noise
    assert_matches_reference(inputs, backend="triton", ce_weight=0.0)
    loss, _ = loss_and_grads(inputs, backend="triton", ce_weight=0.0)
    ref, _ = reference_in(inputs, torch.float64, ce_weight=0.0)
    assert rel_err(loss, ref) < 2e-5  # relative, with no absolute floor: the loss is ~1e-6 at gap 1e-3


def test_all_rows_ignored_and_empty_batch(device, plan):
    for n in (5, 0):
        inputs = make_inputs(n, 4, 9, device=device, ignore_frac=1.0 if n else 0.0, seed=9)
        for reduction in ("mean", "sum"):
            loss, grads = loss_and_grads(inputs, backend="triton", reduction=reduction, kd_weight=0.5)
            assert loss.dtype == torch.float32 and loss.item() == 0.0
            for k, g in grads.items():
                assert torch.equal(g, torch.zeros_like(g)), k


def test_grad_output_and_partial_grads(device, plan):
    inputs = make_inputs(9, 5, 13, da=3, device=device, seed=10)
    # only some inputs require grad; the others get None
    for k in ("head_weight", "aux_features", "aux_bias"):
        inputs[k].requires_grad_(False)
    loss = _call(inputs, backend="triton", kd_weight=0.5)
    g_out = torch.tensor(-3.5, device=device)
    loss.backward(g_out)
    ref = cast_inputs(inputs, torch.float64)
    for k in ("head_weight", "aux_features", "aux_bias"):
        ref[k].requires_grad_(False)
    ref_loss = _call(ref, backend="reference", kd_weight=0.5)
    ref_loss.backward(g_out.double())
    for k in GRAD_NAMES:
        if inputs.get(k) is None:
            continue
        if not inputs[k].requires_grad:
            assert inputs[k].grad is None
            continue
        assert rel_err(inputs[k].grad, ref[k].grad) < 1e-4, k


@pytest.mark.parametrize("seed", range(8))
def test_random_configurations(device, seed):
    """Random shapes and options, including zero weights."""
    import random
    rng = random.Random(seed)
    n, d, c = rng.randint(1, 40), rng.randint(1, 20), rng.randint(1, 70)
    da = rng.choice([None, rng.randint(1, 12)])
    inputs = make_inputs(n, d, c, da=da, bias=rng.random() < 0.5, device=device, seed=100 + seed,
                         ignore_frac=rng.choice([0.0, 0.3]), logit_scale=rng.choice([1.0, 6.0]))
    opts = dict(ce_weight=rng.choice([0.0, 1.0, 0.7]), kd_weight=rng.choice([0.0, 0.5, 2.0]),
                logit_weight=rng.choice([0.0, 1.0, 1.7]), kd_temperature=rng.choice([1.0, 4.0, 0.5]),
                logit_temperature=rng.choice([1.0, 2.0, 5.0]),
                logit_loss=rng.choice(["binary_kl_norm", "binary_kl"]),
                reduction=rng.choice(["mean", "sum"]))
    if not (opts["ce_weight"] or opts["kd_weight"] or opts["logit_weight"]):
        opts["logit_weight"] = 1.0
    assert_matches_reference(inputs, backend="triton", **opts)


def test_aux_features_is_features(device, plan):
    """Passing the features tensor itself as aux_features: both heads' gradients reach it."""
    base = make_inputs(9, 5, 13, device=device, seed=25)
    grads = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        inp = cast_inputs(base, dtype)
        loss = fused_dual_head_kd_loss(*[inp[k] for k in ARGS], aux_features=inp["features"],
                                       backend=backend, kd_weight=0.5)
        loss.backward()
        grads[backend] = inp["features"].grad
    assert rel_err(grads["triton"], grads["reference"]) < 1e-4


# ------------------------------------------------------------------ chunking, layouts, dtypes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("da", [None, 5])
def test_chunked_plan_several_slabs_and_chunks(device, monkeypatch, dtype, da):
    """A budget that forces several class slabs (auxiliary head) and row chunks (main head): the
    accumulators of dX, dW1 and the biases across chunks, the logit loss across slabs."""
    use_plan(monkeypatch, "chunked")
    inputs = make_inputs(40, 6, 45, da=da, device=device, dtype=dtype, ignore_frac=0.2, seed=11)
    p = current_plan(inputs, kd_weight=0.5)
    assert not p.resident and p.rows < 40 and p.slab < 45, p
    for logit_loss, reduction in (("binary_kl_norm", "mean"), ("binary_kl", "sum")):
        assert_matches_reference(inputs, backend="triton", kd_weight=0.5, logit_loss=logit_loss,
                                 reduction=reduction)


def test_chunked_plan_only_some_parts(device, monkeypatch):
    """Chunked with one head switched off or only the weights asking for gradients."""
    use_plan(monkeypatch, "chunked")
    inputs = make_inputs(21, 5, 37, da=3, device=device, ignore_frac=0.3, seed=30)
    assert_matches_reference(inputs, backend="triton", ce_weight=0.0, kd_weight=0.0)
    assert_matches_reference(inputs, backend="triton", logit_weight=0.0, kd_weight=1.0)
    for k in ("features", "aux_features", "head_bias"):
        inputs[k].requires_grad_(False)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


@pytest.mark.parametrize("plan_name", ["cublas", "chunked", "triton"])
def test_fp16_gradients_do_not_overflow_before_the_mean(device, monkeypatch, plan_name):
    """fp16: dW2 summed over 40 rows before the 1/|V| of the mean passes fp16's 65504 although the
    gradient itself (max ~7800) does not; every plan applies the scale before rounding to fp16."""
    use_plan(monkeypatch, plan_name)
    inputs = make_inputs(40, 6, 9, device=device, dtype=torch.float16, seed=3)
    with torch.no_grad():
        inputs["features"].copy_(inputs["features"].abs() * 20)
    opts = dict(ce_weight=0.0, kd_weight=0.0, logit_weight=100.0, logit_temperature=4.0)
    _, grads = loss_and_grads(inputs, backend="triton", **opts)
    _, ref = reference_in(inputs, torch.float64, **opts)
    assert ref["aux_weight"].abs().max() < 65504 / 2
    for k in grads:
        assert torch.isfinite(grads[k]).all(), k
    assert_matches_reference(inputs, backend="triton", **opts)


def test_plan_rule_and_memory_bound():
    """The documented dispatch rule and memory bound (planning only; meta tensors)."""
    meta = torch.device("meta")

    def plan_for(n, d, c, dtype=torch.bfloat16, tf32=False, budget=None, **kw):
        o = dhk._opts_from(1.0, 1.0, 1.0, 4.0, 2.0, True, -100, True, False, tf32)
        x = torch.empty(n, d, dtype=dtype, device=meta)
        w = torch.empty(c, d, dtype=dtype, device=meta)
        wk = dhk._work(x, w, None, n, c, o, kw.get("needs", [True] * 6))
        saved = _plan.MEMORY_BUDGET_BYTES
        try:
            if budget:
                _plan.MEMORY_BUDGET_BYTES = budget
            return dhk.make_plan(wk, meta)
        finally:
            _plan.MEMORY_BUDGET_BYTES = saved

    assert plan_for(1024, 512, 1000).describe() == "resident/triton"
    assert plan_for(1024, 512, 1000, dtype=torch.float32).engine == "cublas"  # IEEE fp32: no tensor cores
    assert plan_for(1024, 512, 1000, dtype=torch.float32, tf32=True).engine == "triton"
    assert plan_for(4096, 2048, 1000).describe() == "resident/triton"  # 100 GFLOP < TRITON_MAX_FLOPS
    assert plan_for(2048, 2048, 21841).describe() == "resident/cublas"  # 1.1 TFLOP
    big = plan_for(8192, 4096, 128256)
    assert not big.resident and big.extra_bytes <= 512 * 2**20 and big.rows % 64 == 0 and big.slab % 128 == 0
    small = plan_for(8192, 4096, 128256, budget=320 * 2**20)
    assert small.extra_bytes <= 320 * 2**20 and small.rows < big.rows and small.slab < big.slab
    # below the fixed part (fp32 dX accumulator, masked features): the smallest chunks, and the plan says so
    tiny = plan_for(8192, 4096, 128256, budget=64 * 2**20)
    assert (tiny.rows, tiny.slab) == (64, 128) and tiny.extra_bytes > 64 * 2**20
    with pytest.raises(ValueError, match="nbytes"):
        dhk.set_memory_budget(0)
    with pytest.raises(ValueError, match="kind"):
        dhk.set_engine("cutlass")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vs_eager(device, plan, dtype):
    inputs = make_inputs(12, 16, 40, da=8, device=device, dtype=dtype, ignore_frac=0.2, seed=13)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


@pytest.mark.parametrize("c", [1, 17, 1000])
def test_padded_logit_strides_match_reference(device, plan, c):
    """Logits/dz buffers with a row stride padded to a multiple of 64 (C = 1, 17, 1000): every plan
    against the float64 reference, with ignored rows."""
    inputs = make_inputs(6, 8, c, da=4, device=device, ignore_frac=0.25, seed=40 + c)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


@pytest.mark.parametrize("c", [21841, 128257])
def test_padded_logit_strides_large_odd_c(device, monkeypatch, c):
    """Odd class counts past the LLM vocabulary (C = 21841, 128257) on the cuBLAS engine and on the
    chunked plan with several class slabs (the interpreter's Triton GEMMs over 10^5 classes would take
    minutes; the Triton GEMMs' padded K loop is covered above)."""
    inputs = make_inputs(3, 4, c, device=device, ignore_frac=0.0, seed=41)
    use_plan(monkeypatch, "cublas")
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)
    o = dhk._opts_from(1.0, 0.5, 1.0, 4.0, 2.0, True, -100, True, False, False)
    wk = dhk._work(inputs["features"], inputs["head_weight"], None, 3, c, o, [True] * 6)
    # half of what the resident plan needs: a few large class slabs (the interpreter's launches are slow)
    monkeypatch.setattr(_plan, "MEMORY_BUDGET_BYTES", _plan._resident_bytes(wk, "cublas", torch.device(device)) // 2)
    plan = dhk.make_plan(wk, torch.device(device))
    assert not plan.resident and 2 <= -(-c // plan.slab) <= 8, plan
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


@pytest.mark.parametrize("engine", ["triton", "cublas"])
@pytest.mark.parametrize("kl_norm,extras", [(True, []), (False, []), (True, [2.0, 0.3, 5.0, 6.0, 0.01]),
                                             (False, [1.0, 0.5, 5.0, 0.0, 0.0])])
def test_dz_buffers_are_padded_and_zero_past_c(device, monkeypatch, kl_norm, extras, engine):
    """The resident forward returns dz with row stride _ld(C), and the epilogue (cuBLAS with biases:
    grad_kernel) wrote zeros (NaN-poisoned before) in the padding columns the Triton GEMMs read without
    a class mask, whatever the padding of the logits buffer held (garbage through a softcap's derivative
    included) and for every option."""
    use_plan(monkeypatch, engine)
    n, c = 7, 70
    inputs = make_inputs(n, 8, c, device=device, ignore_frac=0.3, seed=42)
    x, w1, b1, w2, b2 = (inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias"))
    args = (x, w1, b1, None, w2, b2, inputs["teacher_logits"], inputs["labels"], None, None, None,
            1.0, 0.5, 1.0, 4.0, 2.0, kl_norm, -100, True, False, False, 0.0, False, extras, [True] * 6)
    out = torch.ops.dhkd.dual_head_kd_fwd(*args, _plan_arg(args))
    ld = _plan._ld(c)
    assert ld % 64 == 0 and ld >= c
    for dz in out[4:6]:
        assert dz.shape == (n, c) and dz.stride() == (ld, 1)
        whole = dz.as_strided((n, ld), (ld, 1))
        assert torch.isfinite(whole).all() and (whole[:, c:] == 0).all()


@pytest.mark.parametrize("n,c,parts", [(37, 17, 2), (37, 203, 1), (1, 1, 1), (9, 70, 1)])
@pytest.mark.parametrize("biases", ["both", "head", "aux"])
def test_cublas_plan_sums_bias_gradients_in_grad_kernel(device, monkeypatch, n, c, parts, biases):
    """The resident cuBLAS plan with bias gradients runs the statistics pass and grad_kernel apart: dz,
    the bias gradients from the program's column sums (several row parts of several row blocks, or one),
    the logit-level loss from the per-program sums; no dZ^T 1 product. Against the float64 reference,
    with ignored rows, a bias without a gradient, and a class the teacher masks."""
    from dhkd_kernels import cost
    use_plan(monkeypatch, "cublas")
    inputs = make_inputs(n, 6, c, da=4, device=device, ignore_frac=0.3, seed=n + c)
    if biases != "both":
        k = "aux_bias" if biases == "head" else "head_bias"
        inputs[k] = inputs[k].detach()
    if c > 1:  # (a row needs one class the teacher keeps)
        t = inputs["teacher_logits"].clone()
        t[0, c // 2] = float("-inf")
        inputs["teacher_logits"] = t
    if device == "cpu":
        assert current_plan(inputs, kd_weight=0.5).bias_parts == parts
    with cost.record() as rec:
        assert_matches_reference(cast_inputs(inputs, torch.float32), backend="triton", kd_weight=0.5)
    kernels = rec.by_kernel()
    # no column of ones for dZ^T 1 (with C = 1 the forward's products are matrix-vector ones too); the
    # bias gradients in the backward's scale launches: one for X's scaled copy and dX, one for A's and dA
    assert kernels.get("grad_kernel") == 1 and kernels.get("scale_kernel") == 2 and "torch:fill_" not in kernels, \
        kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts,heads,mean", [(7, 2, True), (1, 1, False), (4, 2, False)])
def test_scale_kernel_sums_bias_parts_in_order(device, parts, heads, mean, dtype):
    """scale_kernel's bias job alone: out_h = g / max(|V|, 1) (mean) x the sum of the P fp32 parts of each head's column
    sums (grad_kernel's row parts, strided rows; several blocks of parts at once), cast to the bias
    dtype; the other head untouched when one is asked."""
    g = torch.Generator().manual_seed(parts)
    c, cp = 37, 64
    sums = torch.randn(2, parts, cp, generator=g).to(device)
    out1, out2 = (torch.full((c,), float("nan"), device=device, dtype=dtype) for _ in range(2))
    grad = torch.tensor(1.75, device=device)
    n_valid = torch.tensor(5, device=device)
    _launch._scales([], n_valid, grad, n_valid, mean=mean, ignore_index=0,
                    bias=(sums[0], sums[1] if heads == 2 else None, out1, out2 if heads == 2 else None))
    scale = 1.75 / 5 if mean else 1.75
    for out, h in ((out1, 0), (out2, 1))[:heads]:
        want = sums[h, :, :c].double().sum(0) * scale
        if dtype == torch.float32:
            torch.testing.assert_close(out.double().cpu(), want.cpu(), rtol=1e-6, atol=1e-6)
        else:  # rounded to nearest (the interpreter's own cast truncates)
            assert torch.equal(out.cpu(), want.float().to(dtype).cpu())
    if heads == 1:
        assert torch.isnan(out2).all()


@pytest.mark.parametrize("row_g", [False, True])
def test_scale_kernel_two_jobs_and_biases_in_one_launch(device, row_g):
    """One scale_kernel launch: a masked scaled copy (X for dW), an fp32 accumulator cast to bf16 (dX)
    and both heads' bias gradients from their parts, each against its float64 value; outputs poisoned."""
    from dhkd_kernels import cost
    g = torch.Generator().manual_seed(3 + int(row_g))
    m, p, c, parts = 37, 24, 19, 3
    y = torch.randint(0, c, (m,), generator=g)
    y[::4] = -100
    x = torch.randn(m, p, generator=g)
    x[y == -100] = float("nan")  # rows outside V: zeroed by the mask, never scaled
    acc = torch.randn(m, p, generator=g)
    sums = torch.randn(2, parts, 32, generator=g)
    grad = (torch.rand(m, generator=g) + 0.5) if row_g else torch.tensor(1.75)
    n_valid = (y != -100).sum()
    x, acc, sums, grad, y, n_valid = (v.to(device) for v in (x, acc, sums, grad, y, n_valid))
    xs, gx = (torch.full((m, p), float("nan"), device=device, dtype=torch.bfloat16) for _ in range(2))
    b1, b2 = (torch.full((c,), float("nan"), device=device) for _ in range(2))
    with cost.record() as rec:
        _launch._scales([(x.bfloat16(), xs, True), (acc, gx, False)], y, grad, n_valid, mean=True,
                        ignore_index=-100, row_g=row_g, bias=(sums[0], sums[1], b1, b2))
    assert [x_.kernel for x_ in rec.launches if x_.engine == "triton"] == ["scale_kernel"]
    s = 1.0 / n_valid.item()
    srow = (grad.double().cpu() * s) if row_g else torch.full((m,), 1.75 * s, dtype=torch.float64)
    keep = (y != -100).cpu()
    want_xs = torch.where(keep[:, None], x.bfloat16().double().cpu().nan_to_num() * srow[:, None], 0.0)
    assert torch.equal(xs.cpu(), want_xs.float().bfloat16())
    assert torch.equal(gx.cpu(), (acc.double().cpu() * srow[:, None]).float().bfloat16())
    sb = s if row_g else 1.75 * s  # a per-row grad_output weights dz's columns already
    for out, h in ((b1, 0), (b2, 1)):
        torch.testing.assert_close(out.double().cpu(), sums[h, :, :c].double().cpu().sum(0) * sb, rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bias_gradients_alone_every_plan(device, plan, reduction):
    """Only the biases ask for gradients: dZ^T 1 (cuBLAS, chunked) or the tensor-core product inside
    dw_kernel, with ignored rows whose features are NaN."""
    inputs = make_inputs(9, 6, 37, device=device, ignore_frac=0.3, seed=43)
    for k in ("features", "head_weight", "aux_weight"):
        inputs[k] = inputs[k].detach()
    ignored = inputs["labels"] == -100
    inputs["features"] = inputs["features"].masked_fill(ignored[:, None], float("nan"))
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5, reduction=reduction)


def test_fp32_accumulation_branch_by_torch_version():
    """16-bit products into fp32 outputs: cuBLAS's fp32 output (addmm.dtype_out) only where torch
    accepts it (>= 2.10), else the product rounded once to 16 bits and added in fp32; never fp32
    copies of the operands on a GPU."""
    mode = _launch.accumulate_mode
    for v in ((2, 4), (2, 7), (2, 8), (2, 9)):
        assert mode(v) == "round16", v
    for v in ((2, 10), (2, 11), (2, 14), (3, 0)):
        assert mode(v) == "dtype_out", v
    assert mode((2, 9), "cpu") == mode((2, 14), "cpu") == "fp32_copies"
    assert _launch._torch_version("2.9.1+cu128") == (2, 9) and _launch._torch_version("2.10.0a0") == (2, 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round16_accumulation_vs_eager(device, plan, dtype, monkeypatch):
    """The older-torch branch (product rounded to 16 bits, summed in fp32) holds eager's accuracy."""
    monkeypatch.setitem(_launch._ACCUMULATE, device.type, "round16")
    inputs = make_inputs(12, 16, 40, da=8, device=device, dtype=dtype, ignore_frac=0.2, seed=31)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


def test_fp16_small_probabilities(device):
    """Mean over many rows times small softmax entries: dz would underflow in fp16 if it carried the
    1/|V| factor (it does not: the scale is applied to the fp32 GEMM results)."""
    inputs = make_inputs(256, 8, 40, device=device, dtype=torch.float16, logit_scale=8.0, seed=28)
    errors = assert_matches_reference(inputs, backend="triton", kd_weight=0.5)
    assert errors["head_weight"] < 1e-3


def test_non_contiguous_int32_labels_and_teacher_dtypes(device, plan):
    base = make_inputs(10, 6, 21, da=5, device=device, seed=14)
    inputs = {}
    for k, v in base.items():
        if v is None or k == "labels":
            inputs[k] = v
        elif v.dim() == 2:
            # same values, transposed storage (column-major)
            inputs[k] = v.detach().t().contiguous().t().requires_grad_(k != "teacher_logits")
        else:
            inputs[k] = v.detach()[None, :].expand(2, -1)[1].requires_grad_(True)
    assert not inputs["features"].is_contiguous()
    inputs["labels"] = base["labels"].to(torch.int32)
    inputs["teacher_logits"] = base["teacher_logits"].to(torch.bfloat16)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)
    inputs["teacher_logits"] = base["teacher_logits"].double()
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


def test_strided_and_expanded_labels_and_biases(device):
    """Labels as a column of an (N, 2) tensor, biases with stride 2 and a bias expanded from one
    value (stride 0): the kernels read labels/biases with unit stride, so these views used to give
    a wrong loss (21.3 instead of 10.8 here) without any error."""
    base = make_inputs(10, 5, 7, device=device, seed=4, ignore_frac=0.2)
    y = base["labels"]
    views = {"strided": lambda b: torch.stack([b, b * 0 + 5], 1)[:, 0],
             "expanded": lambda b: b[:1].expand(b.shape[0])}
    for name, view in views.items():
        results = {}
        for backend in ("triton", "torch"):
            inp = {k: (None if v is None else v.detach()) for k, v in base.items()}
            inp["labels"] = torch.stack([y, (y + 3) % 7], 1)[:, 0]
            for k in ("head_bias", "aux_bias"):
                inp[k] = view(inp[k]).requires_grad_(True)
            for k in ("features", "head_weight", "aux_weight"):
                inp[k].requires_grad_(True)
            assert not inp["labels"].is_contiguous() and inp["head_bias"].stride() != (1,)
            loss = _call(inp, backend=backend, kd_weight=0.5)
            loss.backward()
            results[backend] = (loss, {k: inp[k].grad for k in ("features", "head_weight", "head_bias",
                                                                 "aux_weight", "aux_bias")})
        (l_tri, g_tri), (l_ref, g_ref) = results["triton"], results["torch"]
        assert rel_err(l_tri, l_ref) < 1e-5, name
        for k in g_ref:
            assert rel_err(g_tri[k], g_ref[k]) < 1e-4, (name, k)


def test_tf32_setting_is_read_from_either_api():
    from types import SimpleNamespace

    class NewApiOnly:  # torch 2.14 raises on allow_tf32 once fp32_precision was set
        def __init__(self, prec):
            self.fp32_precision = prec

        @property
        def allow_tf32(self):
            raise RuntimeError("mix of the legacy and new APIs")

    assert dhk._tf32_enabled(NewApiOnly("tf32")) is True
    assert dhk._tf32_enabled(NewApiOnly("ieee")) is False
    assert dhk._tf32_enabled(SimpleNamespace(allow_tf32=True)) is True
    assert dhk._tf32_enabled(SimpleNamespace(allow_tf32=False, fp32_precision="none")) is False
    assert isinstance(dhk._tf32_enabled(), bool)
    assert dhk._dot_precision(torch.float32, True) == "tf32"
    assert dhk._dot_precision(torch.float32, False) == "ieee"
    assert dhk._dot_precision(torch.bfloat16, False) == "tf32"  # unused for 16-bit operands


def test_float64_raises_and_auto_routes(device):
    inputs = make_inputs(4, 3, 5, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        _call(inputs, backend="triton")
    loss = _call(inputs, backend="auto")  # torch path for float64, on any device
    assert loss.dtype == torch.float64


def test_autocast_bf16(device):
    inputs = make_inputs(12, 16, 40, da=8, device=device, seed=15)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss, grads = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads.values())
    ref_loss, ref_grads = reference_in(inputs, torch.float64, kd_weight=0.5)
    # operands rounded to bf16, fp32 math: bounded by eager bf16's own error
    eager_loss, eager_grads = reference_in(inputs, torch.bfloat16, kd_weight=0.5)
    assert rel_err(loss, ref_loss) <= 1.5 * rel_err(eager_loss, ref_loss) + 2e-3
    for k in grads:
        assert rel_err(grads[k], ref_grads[k]) <= 1.5 * rel_err(eager_grads[k], ref_grads[k]) + 2e-3, k


def test_autocast_bf16_features_fp32_weights(device):
    """The trainer's call: bf16 features, fp32 weights and biases, bf16 teacher, under bf16 autocast.
    Every gradient comes back in its input's dtype and matches the torch path under the same autocast."""
    base = make_inputs(12, 16, 40, da=8, device=device, seed=29)
    results = {}
    for backend in ("triton", "torch"):
        inp = cast_inputs(base)
        for k in ("features", "aux_features"):
            inp[k] = inp[k].detach().to(torch.bfloat16).requires_grad_(True)
        inp["teacher_logits"] = inp["teacher_logits"].to(torch.bfloat16)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = _call(inp, backend=backend, kd_weight=0.5)
        loss.backward()
        assert loss.dtype == torch.float32
        results[backend] = (loss, {k: inp[k].grad for k in GRAD_NAMES})
        for k in GRAD_NAMES:
            assert inp[k].grad.dtype == inp[k].dtype, k
    (l_tri, g_tri), (l_ref, g_ref) = results["triton"], results["torch"]
    assert rel_err(l_tri, l_ref) < 1e-3
    for k in GRAD_NAMES:
        assert rel_err(g_tri[k], g_ref[k]) < 2e-2, k


# ------------------------------------------------------------------ components and arg-max

def test_components_match_torch_path(device):
    inputs = make_inputs(23, 8, 37, da=5, device=device, ignore_frac=0.3, logit_scale=5.0, seed=16)
    for opts in (dict(kd_weight=0.5), dict(kd_weight=0.0, logit_weight=0.0, logit_loss="binary_kl",
                                           reduction="sum")):
        _, tri = _call(inputs, backend="triton", return_components=True, **opts)
        _, ref = _call(inputs, backend="torch", return_components=True, **opts)
        for k in ("ce", "kd", "logit"):
            assert rel_err(tri[k], ref[k]) < 1e-5, k
            assert not tri[k].requires_grad
        for k in ("correct", "n_valid"):
            assert tri[k].dtype == torch.int64 and tri[k].dim() == 0
            assert int(tri[k]) == int(ref[k]), k
        assert int(tri["correct"]) > 0


def test_argmax_ties_take_first_index(device):
    """Duplicate class rows give exact ties in z1, across class tiles and splits."""
    n, d, c = 6, 4, 129
    inputs = make_inputs(n, d, c, device=device, bias=False, logit_scale=20.0, seed=17)
    w = inputs["head_weight"].detach().clone()
    with torch.no_grad():
        k = int((inputs["features"][:1] @ w.t()).argmax())
        assert k < 100
        w[100] = w[k]
        w[120] = w[k]
        z1 = inputs["features"] @ w.t()
    inputs["head_weight"] = w.requires_grad_(True)
    first = z1.argmax(-1)
    assert first[0] == k and z1[0, 100] == z1[0, k] == z1[0, 120]
    labels = first.clone()
    labels[0] = 100  # tied with the first maximum k < 100: not counted
    inputs["labels"] = labels
    _, comps = _call(inputs, backend="triton", return_components=True)
    assert int(comps["correct"]) == n - 1
    labels[0] = k
    _, comps = _call(inputs, backend="triton", return_components=True)
    assert int(comps["correct"]) == n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_ties_inside_a_class_group(device, dtype):
    """The epilogue keeps one max per group of adjacent classes (4 or 8: one 128-bit load) and finds the
    first arg-max inside the winning group at the end: exact ties in row 0 inside one group, in a later
    group and in later class tiles, with row 0's label on each tied class in turn."""
    n, d, c = 5, 4, 70
    inputs = make_inputs(n, d, c, device=device, bias=True, dtype=dtype, seed=19)
    x = inputs["features"].detach()
    w = inputs["head_weight"].detach().clone()
    b = inputs["head_bias"].detach().clone()
    tied = (17, 18, 23, 40, 66)  # one group of 4 (16-19), the next group of 8 (16-23), later tiles
    with torch.no_grad():
        for i in tied:
            w[i] = 8.0 * x[0]
            b[i] = 1.0
    inputs["head_weight"], inputs["head_bias"] = w.requires_grad_(True), b.requires_grad_(True)
    z1 = (x.double() @ w.double().t() + b.double()).to(dtype)
    first = z1.argmax(-1)
    assert first[0] == 17 and (z1[0, list(tied)] == z1[0, 17]).all()
    for label in tied:
        labels = first.clone()
        labels[0] = label
        inputs["labels"] = labels
        _, comps = _call(inputs, backend="triton", return_components=True)
        assert int(comps["correct"]) == n - (label != 17), label


# ------------------------------------------------------------------ torch.compile and registration

def _plan_arg(case):
    """The plan argument the entry point would pass with these op arguments (tensors, scalars, needs)."""
    x, w1, a, t, y = case[0], case[1], case[3], case[6], case[7]
    o = dhk._opts_from(*case[11:24])
    wk = dhk._work(x, w1, a, y.shape[0], w1.shape[0], o, case[24], t if t is not None else case[8:11])
    return dhk.plan_to_list(dhk.make_plan(wk, x.device))


@pytest.mark.parametrize("plan_name", PLANS)
def test_custom_op_registration_opcheck(device, monkeypatch, plan_name):
    use_plan(monkeypatch, plan_name)
    inputs = make_inputs(5, 4, 9, da=3, device=device, seed=18)
    x, w1, b1, w2, b2 = (inputs[k].detach().requires_grad_(True) for k in
                         ("features", "head_weight", "head_bias", "aux_weight", "aux_bias"))
    a = inputs["aux_features"].detach().requires_grad_(True)
    args = (x, w1, b1, a, w2, b2, inputs["teacher_logits"], inputs["labels"], None, None, None,
            1.0, 0.5, 1.0, 4.0, 2.0, True, -100, True, True, False, 0.0, False, [], [True] * 6)
    nothing_to_do = args[:11] + (0.0, 0.0, 0.0) + args[14:19] + (False, False, 0.0, False, [], [True] * 6)
    per_row = args[:18] + (False, True, False, 0.1, True, [], [True] * 6)  # reduction="none", label smoothing
    # the LLM options (JSD, softcaps, z-loss: a fourth term)
    options = args[:23] + ([2.0, 0.3, 5.0, 6.0, 0.01], [True] * 6)
    g = torch.Generator().manual_seed(3)
    head = (torch.randn(5, 6, generator=g), torch.randn(9, 6, generator=g), torch.randn(9, generator=g))
    teacher_head = args[:6] + (None, args[7]) + head + args[11:]
    # the chunked plan's backward scales the gradients the forward stored (outputs 4-9) in place; opcheck's
    # AOT test returns every op output from its graph, which AOT refuses for an output the backward
    # mutates. fused_dual_head_kd_loss never returns them: torch.compile of the chunked plan is tested in
    # test_torch_compile_training_step.
    aot = ("test_aot_dispatch_dynamic",) if plan_name != "chunked" else ()
    for case in (args, nothing_to_do, per_row, teacher_head, options):
        case = case + (_plan_arg(case),)
        torch.library.opcheck(torch.ops.dhkd.dual_head_kd_fwd.default, case,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor") + aot)


@pytest.mark.parametrize("plan_name", PLANS)
def test_custom_ops_fake_match_real_for_transposed_inputs(device, monkeypatch, plan_name):
    """The fake implementations give the real outputs' shapes, dtypes and strides (compiled graphs
    rely on them), also for column-major features/weights."""
    use_plan(monkeypatch, plan_name)
    inputs = make_inputs(5, 4, 9, da=3, device=device, seed=18)

    def col_major(v):
        return v.detach().t().contiguous().t().requires_grad_(True)

    x, w1, a, w2 = (col_major(inputs[k]) for k in ("features", "head_weight", "aux_features", "aux_weight"))
    b1, b2 = (inputs[k].detach().requires_grad_(True) for k in ("head_bias", "aux_bias"))
    assert x.stride() == (1, 5)
    t, y = inputs["teacher_logits"], inputs["labels"]
    scalars = (1.0, 0.5, 1.0, 4.0, 2.0, True, -100, True)
    o = dhk._opts_from(*scalars, True, False)
    plan = dhk.make_plan(dhk._work(x, w1, a, 5, 9, o, [True] * 6, t), torch.device(device))
    fwd_args = (x, w1, b1, a, w2, b2, t, y, None, None, None) + scalars + (True, False, 0.0, False, [], [True] * 6,
                                                                            dhk.plan_to_list(plan))
    torch.library.opcheck(torch.ops.dhkd.dual_head_kd_fwd.default, fwd_args, test_utils=("test_faketensor",))
    out = torch.ops.dhkd.dual_head_kd_fwd(*fwd_args)
    if plan_name != "chunked":
        bwd_args = (torch.tensor(1.0, device=device), x, w1, b1, a, w2, b2, y, out[3], list(out[4:10]), 9) \
            + scalars + (False, 0.0, False, [], [True] * 6, dhk.plan_to_list(plan))
        torch.library.opcheck(torch.ops.dhkd.dual_head_kd_bwd.default, bwd_args, test_utils=("test_faketensor",))


def test_torch_compile_training_step(device, plan):
    inputs = make_inputs(9, 6, 21, da=4, device=device, ignore_frac=0.2, seed=19)
    opts = dict(kd_weight=0.5, ce_weight=0.9)
    eager_loss, eager_grads = loss_and_grads(inputs, backend="triton", **opts)

    def step(*args, aux_features, **kw):
        loss = fused_dual_head_kd_loss(*args, aux_features=aux_features, backend="triton", **kw)
        return loss

    from torch._dynamo.backends.registry import lookup_backend
    inner = lookup_backend("inductor" if device.type == "cuda" else "aot_eager")
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=recording_backend)
    loss, grads = loss_and_grads(inputs, backend=None, fn=compiled, **opts)
    assert any("dhkd.dual_head_kd_fwd" in g for g in graphs), "custom op was not captured in a graph"
    assert rel_err(loss, eager_loss) < 1e-6
    for k in grads:
        assert rel_err(grads[k], eager_grads[k]) < 1e-6, k


def test_compiled_graph_keeps_its_plan_when_settings_change(device, monkeypatch):
    """The plan is decided once per call, by the entry point (at trace time under torch.compile) and
    passed to the forward, its fake and the backward: changing the engine or the memory budget after
    compiling, or between a forward and its backward, cannot make them run different plans."""
    inputs = make_inputs(9, 6, 21, da=4, device=device, ignore_frac=0.2, seed=23)
    eager_loss, eager_grads = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    eager_grads = {k: g.clone() for k, g in eager_grads.items()}
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, aux_features, **kw: fused_dual_head_kd_loss(
        *a, aux_features=aux_features, backend="triton", **kw), backend="aot_eager")
    args = [inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias", "teacher_logits",
                                "labels")]
    for before, between in (("chunked", "triton"), ("triton", "chunked"), ("cublas", "chunked")):
        for k in eager_grads:
            inputs[k].grad = None
        use_plan(monkeypatch, before)
        loss = compiled(*args, aux_features=inputs["aux_features"], kd_weight=0.5)
        use_plan(monkeypatch, between)  # between the forward and the backward
        (loss * 2.0).backward()  # loss_and_grads' grad_scale
        assert rel_err(loss, eager_loss) < 1e-6, (before, between)
        for k, g in eager_grads.items():
            assert rel_err(inputs[k].grad, g) < 1e-6, (before, between, k)
        monkeypatch.setattr(_plan, "MEMORY_BUDGET_BYTES", 512 * 2**20)


def test_plan_cache_never_reuses_a_plan_across_shapes_flags_or_settings(monkeypatch):
    meta = torch.device("meta")
    monkeypatch.setattr(_plan, "_PLAN_CACHE", {})

    def work(n=64, c=1000, d=32, needs=(True,) * 6, lg=1.0):
        x = torch.empty(n, d, dtype=torch.bfloat16, device=meta)
        w = torch.empty(c, d, dtype=torch.bfloat16, device=meta)
        o = dhk._opts_from(1.0, 1.0, lg, 4.0, 2.0, True, -100, True, False, False)
        return dhk._work(x, w, None, n, c, o, list(needs))

    cases = [work(), work(n=65), work(c=1001), work(d=48), work(needs=(True, False) * 3), work(lg=0.0)]
    for wk in cases:
        assert _plan.plan_for(wk, meta) == dhk.make_plan(wk, meta)
    assert len(_plan._PLAN_CACHE) == len(cases)
    small = dict(memory_budget=4096)
    with dhk.settings(**small):
        assert _plan.plan_for(cases[0], meta) == dhk.make_plan(cases[0], meta)
        assert not _plan.plan_for(cases[0], meta).resident
    with dhk.settings(engine="cublas"):
        assert _plan.plan_for(cases[0], meta).engine == "cublas"
    assert _plan.plan_for(cases[0], meta).engine == "triton"
    assert len(_plan._PLAN_CACHE) == len(cases) + 2


def test_deterministic_run_to_run(device, plan):
    inputs = make_inputs(20, 8, 35, da=5, device=device, seed=20)
    l1, g1 = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    l2, g2 = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    assert torch.equal(l1, l2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


def test_backward_frees_its_buffers_and_returns_fresh_gradients(device, plan, monkeypatch):
    """The backward's state (the resident plan's dz buffers, the chunked plan's gradients) is released
    by the backward itself, while the loss is still referenced (a training loop's next forward must not
    find the last step's buffers alive), and the returned gradients become .grad without a copy."""
    import gc
    import weakref

    from dhkd_kernels.ops import _custom_ops
    states = []
    real = _custom_ops._forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        states.extend(weakref.ref(v) for v in out[4:10] if v is not None)
        return out

    monkeypatch.setattr(_custom_ops, "_forward", spy)
    inputs = make_inputs(12, 8, 21, device=device, seed=3)
    loss = fused_dual_head_kd_loss(*(inputs[k] for k in ("features", "head_weight", "head_bias", "aux_weight",
                                                         "aux_bias", "teacher_logits", "labels")),
                                   kd_weight=1.0, backend="triton")
    assert states and all(r() is not None for r in states)
    loss.backward()
    gc.collect()
    grads = {id(inputs[k].grad) for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias")}
    alive = [r() for r in states if r() is not None]
    # what is still alive is only what became a .grad (the chunked plan's gradients, taken as they are)
    assert all(id(v) in grads for v in alive), [tuple(v.shape) for v in alive]
    assert loss.grad_fn is not None


_TRANSPOSED_OFFSETS = """
import torch
from dhkd_kernels import fused_dual_head_kd_loss, reference
n, d, c, S = 2, 3, 5, 2**30
try:
    buf = torch.empty(2 * S + n, dtype=torch.float16)  # 4 GiB of address space, a few pages touched
except RuntimeError:
    print("SKIP"); raise SystemExit(0)
g = torch.Generator().manual_seed(0)
x = torch.randn(n, d, generator=g).half()
t, y = torch.randn(n, c, generator=g).half(), torch.tensor([1, 3])
if OPERAND == "features":
    x = buf.as_strided((n, d), (1, S)).copy_(x)  # column k at k * 2**30: element offsets reach 2**31
else:
    t = buf.as_strided((n, c), (1, S // 2)).copy_(t)  # class k at k * 2**29: offsets reach 2**31
x.requires_grad_(True)
w1, w2 = (torch.randn(c, d, generator=g).half().requires_grad_(True) for _ in range(2))
loss = fused_dual_head_kd_loss(x, w1, None, w2, None, t, y, backend="triton", kd_weight=0.5)
loss.backward()
r = [v.detach().double().requires_grad_(True) for v in (x, w1, w2)]
ref = reference.dual_head_kd_loss(r[0], r[1], None, r[2], None, t.double(), y, kd_weight=0.5)
ref.backward()
errs = [float((loss - ref).abs() / ref.abs())] + \
    [float((v.grad.double() - rv.grad).norm() / rv.grad.norm()) for v, rv in zip((x, w1, w2), r)]
print("ERRS", max(errs))
"""


@pytest.mark.parametrize("operand", ["features", "teacher"])
def test_transposed_operand_offsets_past_2_31(operand):
    """A column-major operand whose column stride times its width passes 2**31 elements: the
    features' K-offsets in the forward must be int64 (in int32 they wrapped negative; the interpreter
    then segfaulted); the teacher, whose class offsets the epilogues take in int32, is copied to
    contiguous rows first. Runs in a subprocess so that a regression cannot take the test session
    down with it."""
    import os
    import pathlib
    import subprocess
    import sys
    if torch.cuda.is_available():
        pytest.skip("needs 4 GiB of device memory on a GPU; the CPU interpreter run covers the offsets")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", f"OPERAND = {operand!r}\n" + _TRANSPOSED_OFFSETS], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"rc={proc.returncode}: {proc.stderr[-2000:]}"
    if "SKIP" in proc.stdout:
        pytest.skip("no 4 GiB of address space for the strided view")
    err = float(proc.stdout.split("ERRS")[-1])
    assert err < 5e-3, proc.stdout  # fp16 operands, fp32 math


# ------------------------------------------------------------------ GPU only

@cuda_only
@pytest.mark.parametrize("c", [128, 256])
def test_gpu_fp32_strict(c):
    inputs = make_inputs(300, 96, c, da=64, device="cuda", ignore_frac=0.1, seed=21)
    for logit_loss in ("binary_kl_norm", "binary_kl"):
        assert_matches_reference(inputs, backend="triton", kd_weight=0.5, logit_loss=logit_loss)


@cuda_only
@pytest.mark.parametrize("c,dtype", [(21841, torch.bfloat16), (128256, torch.bfloat16),
                                     (21841, torch.float32)])
def test_gpu_large_vocab(c, dtype):
    inputs = make_inputs(256, 128, c, device="cuda", dtype=dtype, ignore_frac=0.1, seed=22)
    assert_matches_reference(inputs, backend="triton", kd_weight=0.5)


@cuda_only
def test_gpu_more_than_2_31_logits():
    """N*C > 2**31: the sum-reduced loss vs the torch path, and the last rows' dX vs float64."""
    n, d, c = 2**21 + 37, 16, 1031
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    w1 = (torch.randn(c, d, device="cuda", generator=g) / 4).to(torch.bfloat16).requires_grad_(True)
    w2 = (torch.randn(c, d, device="cuda", generator=g) / 4).to(torch.bfloat16).requires_grad_(True)
    t = torch.randn(n, c, device="cuda", generator=g, dtype=torch.bfloat16)
    y = torch.randint(0, c, (n,), device="cuda", generator=g)
    assert n * c > 2**31
    opts = dict(kd_weight=0.5, reduction="sum")
    loss = fused_dual_head_kd_loss(x, w1, None, w2, None, t, y, backend="triton", **opts)
    loss.backward()
    with torch.no_grad():
        ref_loss = fused_dual_head_kd_loss(x, w1, None, w2, None, t, y, backend="torch", **opts)
    assert rel_err(loss, ref_loss) < 1e-3
    tail = slice(n - 64, n)
    xs = x.detach()[tail].double().requires_grad_(True)
    ref_tail = reference.dual_head_kd_loss(xs, w1.detach().double(), None, w2.detach().double(), None,
                                           t[tail].double(), y[tail], **opts)
    ref_tail.backward()
    assert rel_err(x.grad[tail], xs.grad) < 2e-2


@cuda_only
def test_gpu_bitwise_determinism_large():
    inputs = make_inputs(2048, 256, 5000, device="cuda", dtype=torch.bfloat16, seed=23)
    l1, g1 = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    l2, g2 = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    assert torch.equal(l1, l2)
    for k in g1:
        assert torch.equal(g1[k], g2[k]), k


@cuda_only
def test_gpu_cuda_graph_capture():
    """The op captures in a CUDA graph (no host sync, no data-dependent host logic): replaying the
    graph on new input values gives the eager result, for each plan."""
    for plan_name, budget in (("triton", None), ("cublas", None), ("chunked", 256 * 1024)):
        saved = _plan._ENGINE, _plan.MEMORY_BUDGET_BYTES
        try:
            _plan._ENGINE = "cublas" if plan_name == "chunked" else plan_name
            if budget:
                _plan.MEMORY_BUDGET_BYTES = budget
            inputs = make_inputs(64, 32, 300, device="cuda", dtype=torch.bfloat16, ignore_frac=0.1, seed=31)
            static = cast_inputs(inputs)
            args = [static[k] for k in ARGS]

            def step():
                for k in GRAD_NAMES:
                    if static.get(k) is not None:
                        static[k].grad = None
                loss = fused_dual_head_kd_loss(*args, backend="triton", kd_weight=0.5)
                loss.backward()
                return loss

            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            for k in GRAD_NAMES:
                if static.get(k) is not None:
                    static[k].grad = None
            with torch.cuda.graph(graph):
                loss = fused_dual_head_kd_loss(*args, backend="triton", kd_weight=0.5)
                loss.backward()
            fresh = make_inputs(64, 32, 300, device="cuda", dtype=torch.bfloat16, ignore_frac=0.1, seed=32)
            with torch.no_grad():
                for k in ARGS:
                    if static.get(k) is not None and static[k].is_floating_point():
                        static[k].copy_(fresh[k])
                static["labels"].copy_(fresh["labels"])
            graph.replay()
            ref_loss, ref_grads = loss_and_grads(fresh, backend="triton", grad_scale=1.0, kd_weight=0.5)
            assert torch.equal(loss.detach(), ref_loss), plan_name
            for k in ("features", "head_weight", "aux_weight"):
                assert torch.equal(static[k].grad, ref_grads[k]), (plan_name, k)
        finally:
            _plan._ENGINE, _plan.MEMORY_BUDGET_BYTES = saved


@cuda_only
def test_gpu_compile_reduce_overhead():
    """torch.compile(mode="reduce-overhead") of a training step (CUDA graphs, no host time per step for
    fixed shapes) gives the eager loss and gradients on new input values, step after step."""
    inputs = make_inputs(64, 32, 300, device="cuda", dtype=torch.bfloat16, ignore_frac=0.1, seed=33)
    eager_loss, eager_grads = loss_and_grads(inputs, backend="triton", kd_weight=0.5)
    eager_grads = {k: g.clone() for k, g in eager_grads.items()}
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, aux_features, **kw: fused_dual_head_kd_loss(
        *a, aux_features=aux_features, backend="triton", **kw), mode="reduce-overhead")
    for _ in range(3):
        loss, grads = loss_and_grads(inputs, backend=None, fn=compiled, kd_weight=0.5)
        assert rel_err(loss, eager_loss) < 1e-5
        for k in grads:
            assert rel_err(grads[k], eager_grads[k]) < 1e-5, k
            inputs[k].grad = None
