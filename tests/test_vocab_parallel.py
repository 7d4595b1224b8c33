"""The vocabulary-parallel form (issue 21, part 1) on CPU with gloo: 2 and 3 processes spawned by the test
(torch.multiprocessing, and one torchrun run), each rank holding a contiguous class shard of both heads
and of the teacher. Every rank's loss, components, weight/bias-shard gradients and features' gradient
must equal the single-process unsharded op's on the same full inputs: float64 to round-off, float32
within a tight tolerance. Also: the communicated tensors are O(N) (never (N, C)), the argument checks,
and the triton backend's refusal."""
from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dhkd_kernels import DualHeadKDLoss, fused_dual_head_kd_loss
from dhkd.distributed import leave_process
from dhkd_kernels.ops import chunked
from tests.helpers import make_inputs
from tests.test_distributed import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEAVES = ("features", "aux_features", "head_weight", "head_bias", "aux_weight", "aux_bias")
SHARDED = ("head_weight", "head_bias", "aux_weight", "aux_bias")
N, D, C = 13, 5, 11

# (name, options, extra): extra keys: dtype, form ("logits" | "head"), aux (separate aux_features),
# ignore (fraction of ignored rows), masked (teacher -inf entries), ties, vocab_size (False: not given),
# reduce_grad (False: the caller all-reduces the features' gradient)
CASES = [
    ("mean_bkln", dict(kd_weight=0.5), {}),
    ("none_ignored_smoothing", dict(reduction="none", kd_weight=1.0, label_smoothing=0.1,
                                    logit_loss="binary_kl"), dict(ignore=0.3)),
    ("teacher_head_aux_sum", dict(reduction="sum", kd_weight=0.7, label_smoothing=0.05),
     dict(form="head", aux=True, ignore=0.2)),
    ("reverse_kl_masked", dict(kd_weight=1.0, kd_divergence="reverse_kl"), dict(masked=True, ignore=0.2)),
    ("jsd_masked_none", dict(kd_weight=1.0, kd_divergence="jsd", jsd_beta=0.3, reduction="none"),
     dict(masked=True)),
    ("jsd_endpoint", dict(kd_weight=1.0, kd_divergence="jsd", jsd_beta=1.0), {}),
    ("softcaps_zloss", dict(kd_weight=0.5, softcap=2.0, teacher_softcap=3.0, z_loss_weight=0.1),
     dict(ignore=0.2)),
    ("all_options_head_none", dict(reduction="none", kd_weight=0.8, kd_divergence="jsd", jsd_beta=0.6,
                                   softcap=1.5, teacher_softcap=2.5, z_loss_weight=0.05, label_smoothing=0.1,
                                   logit_loss="binary_kl"), dict(form="head", aux=True, ignore=0.3)),
    ("fp32_mean", dict(kd_weight=1.0, label_smoothing=0.1, z_loss_weight=0.01), dict(dtype=torch.float32,
                                                                                    ignore=0.2)),
    ("fp32_head_reverse", dict(kd_weight=1.0, kd_divergence="reverse_kl", softcap=3.0),
     dict(dtype=torch.float32, form="head")),
    ("ties_correct", dict(kd_weight=0.0), dict(ties=True)),
    ("layout_gathered", dict(kd_weight=0.3), dict(vocab_size=False)),
    ("caller_reduces_features_grad", dict(kd_weight=0.3, z_loss_weight=0.1), dict(reduce_grad=False, aux=True)),
    ("ce_only", dict(logit_weight=0.0), {}),
]
BACKENDS = ("reference", "torch", "triton")  # triton: in the interpreter, float32 (its operand dtypes)


def full_inputs(extra, seed):
    """Float64 full (unsharded) inputs of one case, the same on every rank."""
    inp = make_inputs(N, D, C, da=3 if extra.get("aux") else None, dtype=torch.float64, seed=seed,
                      ignore_frac=extra.get("ignore", 0.0), logit_scale=2.0)
    inp = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    g = torch.Generator().manual_seed(seed + 100)
    if extra.get("masked"):
        t = inp["teacher_logits"]
        t[torch.rand(t.shape, generator=g) < 0.25] = float("-inf")
        t[0, 0] = float("-inf")  # the single-class rank of the 3-way split masks everything in row 0
    if extra.get("ties"):  # classes 1 and 7 (and 2 and 9) identical: ties across ranks, labels on both
        for a, b in ((1, 7), (2, 9)):
            inp["head_weight"][b] = inp["head_weight"][a]
            inp["head_bias"][b] = inp["head_bias"][a]
        inp["head_weight"][[1, 7]] *= 4.0
        inp["head_bias"][[1, 7]] += 3.0
        inp["labels"][:4] = torch.tensor([1, 7, 2, 9])
        inp["labels"][4:8] = 7
    if extra.get("form") == "head":
        dt = 4
        inp["teacher_features"] = torch.randn(N, dt, generator=g, dtype=torch.float64)
        inp["teacher_weight"] = torch.randn(C, dt, generator=g, dtype=torch.float64)
        inp["teacher_bias"] = torch.randn(C, generator=g, dtype=torch.float64) * 0.3
        inp["teacher_logits"] = None
    return inp


def run_op(inp, dtype, backend, opts, *, start=None, stop=None, weight=None, **vp):
    """Loss, components and the gradients of 3 * loss (or of sum(weight * loss) for "none"), with the
    classes [start, stop) when sharded."""
    sl = slice(start, stop)
    leaves = {}
    for k in LEAVES:
        v = inp.get(k)
        if v is not None:
            v = v[sl] if (k in SHARDED and start is not None) else v
            leaves[k] = v.to(dtype).clone().requires_grad_(True)
        else:
            leaves[k] = None
    teacher = {}
    if inp.get("teacher_logits") is not None:
        t = inp["teacher_logits"]
        teacher_logits = (t[:, sl] if start is not None else t).to(dtype)
    else:
        teacher_logits = None
        full = start is None
        teacher = dict(teacher_features=inp["teacher_features"].to(dtype),
                       teacher_weight=(inp["teacher_weight"] if full else inp["teacher_weight"][sl]).to(dtype),
                       teacher_bias=(inp["teacher_bias"] if full else inp["teacher_bias"][sl]).to(dtype))
    loss, comps = fused_dual_head_kd_loss(
        leaves["features"], leaves["head_weight"], leaves["head_bias"], leaves["aux_weight"], leaves["aux_bias"],
        teacher_logits, inp["labels"], aux_features=leaves["aux_features"], backend=backend,
        return_components=True, **teacher, **opts, **vp)
    (3 * loss if weight is None else (loss * weight.to(loss.dtype)).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return loss.detach(), comps, grads


def _close(name, a, b, tol):
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return f"{name}: non-finite entries differ"
    err = (a[fin] - b[fin]).norm().item()
    ref = b[fin].norm().item()
    if err > tol * max(ref, 1e-3):
        return f"{name}: |a - b| = {err:.3e}, |b| = {ref:.3e}"
    return None


def check_case(name, opts, extra, *, rank, world, splits, group, seed=0):
    """Run one case sharded (this rank) and unsharded (locally): a list of failure messages."""
    inp = full_inputs(extra, seed)
    starts = [sum(splits[:r]) for r in range(world)]
    start, stop = starts[rank], starts[rank] + splits[rank]
    dtype = extra.get("dtype", torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    weight = None
    if opts.get("reduction") == "none":
        weight = torch.randn(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reduce_grad = extra.get("reduce_grad", True)
    vp = dict(vocab_parallel_group=group, vocab_start=start,
              vocab_size=None if extra.get("vocab_size") is False else C,
              vocab_parallel_reduce_features_grad=reduce_grad)
    failures = []
    for backend in BACKENDS:
        tag = f"{name}[{backend}, world {world}, splits {splits}, rank {rank}]"
        bdt, btol = (torch.float32, 1e-4) if backend == "triton" else (dtype, tol)
        try:
            loss, comps, grads = run_op(inp, bdt, backend, opts, start=start, stop=stop, weight=weight, **vp)
            ref_loss, ref_comps, ref_grads = run_op(inp, bdt, backend, opts, weight=weight)
        except Exception:  # noqa: BLE001 (reported by the parent)
            failures.append(f"{tag}: {traceback.format_exc()}")
            continue
        if not reduce_grad:  # the caller's all-reduce
            for k in ("features", "aux_features"):
                if k in grads:
                    dist.all_reduce(grads[k], group=group)
        msgs = [_close("loss", loss, ref_loss, btol)]
        if set(comps) != set(ref_comps):
            msgs.append(f"components {sorted(comps)} != {sorted(ref_comps)}")
        for k in ref_comps:
            if k in ("correct", "n_valid"):
                if not torch.equal(comps[k], ref_comps[k]):
                    msgs.append(f"{k}: {comps[k].tolist()} != {ref_comps[k].tolist()}")
            else:
                msgs.append(_close(k, comps[k], ref_comps[k], btol))
        for k, g in ref_grads.items():
            expect = g[start:stop] if k in SHARDED else g
            msgs.append(_close(f"grad {k}", grads[k], expect, btol))
        failures += [f"{tag}: {m}" for m in msgs if m]
    return failures


def _init(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _comm_check(rank, world, group):
    """Record every tensor the collectives carry: (k, N) row statistics, (N, D) features' gradients."""
    seen = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        seen.append(tuple(t.shape))
        return real_reduce(t, *a, **k)

    def all_gather(out, t, *a, **k):
        seen.append(tuple(t.shape))
        return real_gather(out, t, *a, **k)

    n, d, da, c = 9, 4, 3, 64
    inp = make_inputs(n, d, c, da=da, dtype=torch.float64, seed=3, ignore_frac=0.2)
    inp = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    splits = [20, 44]
    start = sum(splits[:rank])
    opts = dict(reduction="mean", kd_weight=1.0, kd_divergence="jsd", softcap=3.0, teacher_softcap=4.0,
                z_loss_weight=0.1, label_smoothing=0.1)
    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        for backend in BACKENDS:
            for vocab_size in (c, None):
                run_op(inp, torch.float32 if backend == "triton" else torch.float64, backend, opts, start=start,
                       stop=start + splits[rank], vocab_parallel_group=group, vocab_start=start,
                       vocab_size=vocab_size)
    finally:
        dist.all_reduce, dist.all_gather = real_reduce, real_gather
    # row statistics (k <= 8 per row of a chunk), the features' gradients (N, D), (N, D_aux), the
    # gathered layout (2,); the smallest shard's logits would be n * 20 = 180 elements
    allowed = {(n, d), (n, da), (2,)}
    bad = sorted(set(s for s in seen if s not in allowed and not (
        len(s) <= 2 and s[-1] <= n and (len(s) == 1 or s[0] <= 8))))
    return [f"communicated shapes outside O(N): {bad}"] if bad else ([] if seen else ["nothing communicated?"])


def _worker(rank, world, port, jobs, out):
    _init(rank, world, port)
    failures, ran = [], 0
    try:
        chunked.DEFAULT_CHUNK_ELEMENTS = 24  # several row chunks on the torch backend (sharded and not)
        group = dist.group.WORLD
        for splits in jobs["splits"]:
            for name, opts, extra in CASES:
                failures += check_case(name, opts, extra, rank=rank, world=world, splits=splits, group=group)
                ran += 1
        if jobs.get("comm"):
            failures += _comm_check(rank, world, group)
        if jobs.get("subgroup"):  # a group made by new_group, not the default one
            sub = dist.new_group(list(range(world)))
            failures += check_case(*CASES[1], rank=rank, world=world, splits=jobs["splits"][0], group=sub)
    except Exception:  # noqa: BLE001
        failures.append(traceback.format_exc())
    finally:
        out[rank] = (ran, failures)
        dist.destroy_process_group()
    leave_process()  # see its docstring: gloo's C++ teardown can abort a finished worker


def _spawn(world, jobs):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), jobs, out), nprocs=world, join=True)
        return dict(out)


def test_two_ranks_equal_the_unsharded_op():
    """Uneven split of 11 classes, every case on both backends; plus the communication check."""
    results = _spawn(2, {"splits": [[5, 6]], "comm": True, "subgroup": True})
    assert sorted(results) == [0, 1]
    for rank, (ran, failures) in results.items():
        assert ran == len(CASES)
        assert not failures, "\n".join(failures)


def test_three_ranks_with_a_single_class_shard_equal_the_unsharded_op():
    results = _spawn(3, {"splits": [[1, 6, 4], [4, 4, 3]]})
    assert sorted(results) == [0, 1, 2]
    for rank, (ran, failures) in results.items():
        assert ran == 2 * len(CASES)
        assert not failures, "\n".join(failures)


def test_torchrun_two_ranks():
    """The same comparison under torchrun (env:// initialisation), a few cases."""
    env = dict(os.environ, TRITON_INTERPRET="1")  # CPU tensors: the triton backend in its interpreter
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "tests" / "vocab_parallel_torchrun.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("vocab-parallel ok") == 2, proc.stdout[-3000:]


# ---------------------------------------------------------------- argument checks (one process)

@pytest.fixture()
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _args(c=C):
    inp = make_inputs(N, D, c, seed=1)
    return [inp[k] for k in ("features", "head_weight", "head_bias", "aux_weight", "aux_bias",
                             "teacher_logits", "labels")]


def test_one_rank_group_equals_the_unsharded_op(one_rank_group):
    for backend in BACKENDS:
        loss = fused_dual_head_kd_loss(*_args(), backend=backend, kd_weight=0.5)
        sharded = fused_dual_head_kd_loss(*_args(), backend=backend, kd_weight=0.5,
                                          vocab_parallel_group=one_rank_group, vocab_start=0, vocab_size=C)
        torch.testing.assert_close(sharded, loss, rtol=1e-6, atol=1e-7)
        module = DualHeadKDLoss(backend=backend, kd_weight=0.5, vocab_parallel_group=one_rank_group, vocab_start=0)
        torch.testing.assert_close(module(*_args()), loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(vocab_parallel_group="world", vocab_start=0), TypeError, "vocab_parallel_group"),
    (dict(vocab_start=0), ValueError, "vocab_parallel_group"),
    (dict(vocab_size=11), ValueError, "vocab_parallel_group"),
    (dict(group=True), ValueError, "vocab_start"),
    (dict(group=True, vocab_start=1.0), TypeError, "vocab_start"),
    (dict(group=True, vocab_start=True), TypeError, "vocab_start"),
    (dict(group=True, vocab_start=-1), ValueError, "vocab_start"),
    (dict(group=True, vocab_start=3, vocab_size=11), ValueError, "vocab_start"),
    (dict(group=True, vocab_start=0, vocab_size="11"), TypeError, "vocab_size"),
    (dict(group=True, vocab_start=2), ValueError, "vocab_start"),  # gathered layout: a gap before it
    (dict(group=True, vocab_start=0, vocab_parallel_reduce_features_grad=1), TypeError,
     "vocab_parallel_reduce_features_grad"),
    (dict(vocab_parallel_reduce_features_grad="no"), TypeError, "vocab_parallel_reduce_features_grad"),
])
def test_bad_arguments_are_named(one_rank_group, kwargs, error, match):
    kwargs = dict(kwargs)
    if kwargs.pop("group", False):
        kwargs["vocab_parallel_group"] = one_rank_group
    with pytest.raises(error, match=match):
        fused_dual_head_kd_loss(*_args(), **kwargs)


def test_labels_are_global_class_ids(one_rank_group):
    args = _args()
    args[-1] = args[-1].clone()
    args[-1][0] = C  # beyond the global vocabulary
    with pytest.raises(ValueError, match="labels"):
        fused_dual_head_kd_loss(*args, vocab_parallel_group=one_rank_group, vocab_start=0, vocab_size=C)


def test_auto_picks_torch_when_sharded(one_rank_group, monkeypatch):
    from dhkd_kernels import functional
    picked = []
    real = functional._resolve_backend

    def spy(backend, device, float64=False):
        picked.append(real(backend, torch.device("cuda"), float64))
        return picked[-1]

    monkeypatch.setattr(functional, "_resolve_backend", spy)
    monkeypatch.setattr(functional, "_triton_ops", lambda: object())
    fused_dual_head_kd_loss(*_args(), vocab_parallel_group=one_rank_group, vocab_start=0, vocab_size=C)
    assert picked == ["torch"]
