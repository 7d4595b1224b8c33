"""The benchmark tooling itself: the report script on synthetic pytest-benchmark JSON, the shape
registry, and the chunked float64 reference the benchmarks check every provider against.

(These live in tests/ because ``pytest benchmarks/ --benchmark-only`` skips tests without the
benchmark fixture.)"""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import providers, report, shapes
from dhkd_kernels import reference


def _bench(provider, shape, dtype, mode, median_s, *, peak_mib=None, partial=False, backend=None):
    s = shapes.get(shape)
    extra = dict(provider=provider, shape=shape, n=s.n, d=s.d, c=s.c, dtype=dtype, mode=mode,
                 partial=partial, peak_extra_mib=peak_mib, tflops=12 * s.n * s.d * s.c / median_s / 1e12,
                 gemm_floor_ratio=median_s / 0.0005, device_name="Synthetic GPU", torch="9.9", triton="8.8")
    if backend:
        extra["backend"] = backend
    return {"name": f"test_loss[{shape}-{dtype}-{provider}-{mode}]", "group": f"{shape} {dtype} {mode}",
            "extra_info": extra,
            "stats": {"median": median_s, "iqr": median_s / 10, "rounds": 7, "mean": median_s}}


@pytest.fixture
def bench_json(tmp_path):
    rows = []
    for mode in ("forward", "forward+backward"):
        for shape, scale in (("imagenet-r18", 1.0), ("llm-32k", 300.0)):
            rows.append(_bench("reference", shape, "bf16", mode, 0.002 * scale, peak_mib=100.0 * scale))
            rows.append(_bench("fused", shape, "bf16", mode, 0.001 * scale, peak_mib=10.0 * scale,
                               backend="triton"))
            rows.append(_bench("cce", shape, "bf16", mode, 0.0008 * scale, peak_mib=5.0 * scale,
                               partial=True))
    rows.append({"name": "test_train_step[resnet34-resnet18]", "group": "train",
                 "extra_info": {"images_per_s": 12345.6}, "stats": {"median": 0.0207, "iqr": 0.001}})
    data = {"machine_info": {"dhkd": {"torch": "9.9", "triton": "8.8", "gpu": "Synthetic GPU"}},
            "commit_info": {"id": "0123456789abcdef", "dirty": False},
            "datetime": "2026-01-02T03:04:05", "version": "5.1.0", "benchmarks": rows}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_report_writes_table_and_charts(bench_json, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert report.main([str(bench_json), "--out", str(out)]) == 0
    md = (out / "benchmarks.md").read_text()
    assert "Synthetic GPU" in md and "torch 9.9, triton 8.8" in md and "2026-01-02T03:04:05" in md
    assert "### bf16, forward" in md and "### bf16, forward+backward" in md
    # fused at imagenet-r18: 1 ms, half the reference's time, 10 MiB, floor ratio 1 / 0.5 = 2
    assert "| imagenet-r18 | 1024x512x1000 | fused (triton) | 1.000 | 0.100 | 10.0 |" in md
    assert "| 2.00 | 2.00× |" in md
    assert "cce*" in md  # partial peer marked
    assert "| test_train_step[resnet34-resnet18] | 20.700 | 12,346 |" in md
    for mode in ("forward", "forward_backward"):
        for kind in ("time", "memory"):
            png = out / f"{kind}_bf16_{mode}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({png.name})" in md
    assert "wrote" in capsys.readouterr().out


def test_report_table_order_follows_registry_and_providers(bench_json, tmp_path):
    report.main([str(bench_json), "--out", str(tmp_path), "--no-charts"])
    md = (tmp_path / "benchmarks.md").read_text()
    section = md.split("### bf16, forward+backward")[1]
    order = [line.split("|")[3].strip() for line in section.splitlines() if line.startswith("| imagenet-r18")]
    assert order == ["fused (triton)", "reference", "cce*"]
    assert section.index("imagenet-r18") < section.index("llm-32k")
    assert not list(tmp_path.glob("*.png"))


def test_report_rejects_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        report.main([str(bad), "--out", str(tmp_path / "o")])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit):
        report.main([str(wrong), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")])


def test_shape_registry():
    expected = {"imagenet-r18": (1024, 512, 1000), "imagenet-r50": (256, 2048, 1000),
                "imagenet-r50-bigbatch": (4096, 2048, 1000), "imagenet21k": (2048, 2048, 21841),
                "llm-32k": (8192, 4096, 32000), "llm-128k": (8192, 4096, 128256)}
    for name, dims in expected.items():
        s = shapes.get(name)
        assert (s.n, s.d, s.c, s.device) == (*dims, "cuda")
    assert len(shapes.BY_NAME) == len(shapes.SHAPES)
    assert any(s.device == "cpu" for s in shapes.SHAPES)
    s = shapes.get("imagenet-r18")
    assert shapes.flops(s, "forward+backward") == 12 * 1024 * 512 * 1000
    assert shapes.flops(s, "forward") + shapes.flops(s, "backward") == shapes.flops(s, "forward+backward")
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.get("nope")
    with pytest.raises(ValueError, match="mode"):
        shapes.flops(s, "sideways")


def test_chunked_float64_reference_equals_whole(monkeypatch):
    """The benchmarks' oracle sums row chunks; it must equal the reference on the whole batch."""
    shape = shapes.Shape("t", 10, 6, 7, "cpu")
    inputs = providers.make_input_set(shape, torch.float32, torch.device("cpu"), seed=3)
    inputs["labels"][2] = -100
    monkeypatch.setattr(providers, "_chunk_rows", lambda c: 3)
    loss, grads = providers.float64_reference(inputs)
    leaves = {k: inputs[k].detach().double().requires_grad_(True) for k in providers.LEAVES}
    whole = reference.dual_head_kd_loss(*[leaves.get(k, inputs[k]) for k in providers.POSITIONAL[:5]],
                                        inputs["teacher_logits"].double(), inputs["labels"],
                                        **providers.LOSS_OPTS)
    whole.backward()
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-12, atol=0)
    for k in providers.LEAVES:
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-12, atol=1e-15)
    ce = providers.float64_main_ce(dict(inputs, labels=inputs["labels"].clamp(min=0)))
    z1 = leaves["features"] @ leaves["head_weight"].t() + leaves["head_bias"]
    torch.testing.assert_close(ce, reference.cross_entropy(z1, inputs["labels"].clamp(min=0)).mean().detach(),
                               rtol=1e-12, atol=0)


def test_check_catches_a_wrong_provider():
    """The per-case gate must fail a provider whose loss or gradients are off."""
    shape = shapes.Shape("t", 16, 8, 11, "cpu")
    inputs = providers.make_input_set(shape, torch.float32, torch.device("cpu"), seed=0)
    ref = providers.float64_reference(inputs)

    def good(inp):
        return reference.dual_head_kd_loss(*[inp[k] for k in providers.POSITIONAL], **providers.LOSS_OPTS)

    def wrong_temperature(inp):
        opts = dict(providers.LOSS_OPTS, logit_temperature=2.5)
        return reference.dual_head_kd_loss(*[inp[k] for k in providers.POSITIONAL], **opts)

    limits = providers.limits_for(torch.float32, None)
    assert all(v <= limits[k] for k, v in providers.errors_against(good, inputs, ref).items())
    errs = providers.errors_against(wrong_temperature, inputs, ref)
    assert any(v > limits[k] for k, v in errs.items())


@pytest.mark.parametrize("precision,loss", [("bf16", "fused"), ("fp32", "reference")])
def test_train_step_builds_and_steps_on_cpu(precision, loss):
    """The GPU training-step benchmark's step, run tiny on CPU: its loss check passes and it trains."""
    pytest.importorskip("torchvision")
    pytest.importorskip("dhkd.models")
    from benchmarks.test_bench_train_step import build_step

    step, next_batch, check = build_step(precision, False, loss, torch.device("cpu"), batch=4,
                                         image_size=32, num_classes=10)
    err, (feats, aux, t, y) = check()
    assert err <= (2e-2 if precision == "bf16" else 1e-4)
    first = step(*next_batch())
    assert torch.isfinite(first)
    step.loss_only_fn(feats, aux, t, y)()


def test_cuda_event_timer_pairs_calls(monkeypatch):
    """The GPU timer returns 0 at the start call and the events' elapsed seconds at the end call."""
    clock = {"now": 0.0}

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = clock["now"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3  # milliseconds, like CUDA events

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = providers.CudaEventTimer()
    for work in (0.25, 0.5):
        start = timer()
        clock["now"] += work
        assert timer() - start == pytest.approx(work)


def test_report_merges_several_runs(bench_json, tmp_path):
    data = json.loads(bench_json.read_text())
    extra = dict(data, benchmarks=[_bench("compiled", "llm-128k", "bf16", "forward", 0.0948)])
    second = tmp_path / "second.json"
    second.write_text(json.dumps(extra))
    report.main([str(bench_json), str(second), "--out", str(tmp_path / "m"), "--no-charts"])
    md = (tmp_path / "m" / "benchmarks.md").read_text()
    assert "| llm-128k | 8192x4096x128256 | compiled | 94.800 |" in md
    assert "| imagenet-r18 | 1024x512x1000 | fused (triton) | 1.000 |" in md


def test_dhkd_bench_report_cli(bench_json, tmp_path):
    from dhkd.cli import main
    out = tmp_path / "cli-report"
    assert main(["bench", "--report", str(bench_json), "--out", str(out)]) == 0
    table = (out / "benchmarks.md").read_text()
    assert "imagenet-r18" in table and "llm-32k" in table
