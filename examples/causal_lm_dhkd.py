"""Dual-head distillation of a small causal language model with the fused loss, on CPU in about a minute.

    python examples/causal_lm_dhkd.py [--steps 300] [--teacher-steps 200] [--threads 1]
    torchrun --nproc_per_node 2 examples/causal_lm_dhkd.py --vocab-parallel    # heads sharded, CPU (gloo)

A toy language (a random sparse Markov chain over 256 tokens, sequences of random length padded to 32)
is learned by a 2-layer decoder-only teacher; a 1-layer student with two LM heads on the same hidden
states is then distilled from it: the main head takes cross-entropy on the next token (with label
smoothing), the auxiliary head BinaryKL-Norm against the teacher's logits, and only the main head would
be used for generation. The teacher's logits are never formed: the loss takes the teacher's last hidden
states and its LM head (``teacher_features``, ``teacher_weight``) and projects them chunk by chunk inside.
Labels are the inputs shifted by one; padding positions are ``ignore_index``.

With ``--vocab-parallel`` (under torchrun) the vocabulary is sharded over the ranks, Megatron-style: each
rank holds a contiguous slice of the classes of both student LM heads and of the teacher's LM head, the
rest of both models is replicated, and the fused loss runs with ``vocab_parallel_group=``: every rank
gets the full loss, the gradients of its head shards and the backbone's full gradient (the features'
gradient is summed over the ranks inside the op), so the replicated backbones stay identical. The first
step checks the sharded loss against the unsharded one computed from the gathered heads.

Prints the distillation loss as it falls and the student's next-token cross-entropy on held-out text
next to the teacher's and a uniform guess; exits 1 if the loss did not fall.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from dhkd_kernels import fused_dual_head_kd_loss

VOCAB, PAD, SEQ = 256, 0, 32
IGNORE = -100


def make_language(seed: int) -> torch.Tensor:
    """Transition matrix (VOCAB, VOCAB) of a sparse Markov chain: each token has 4 likely successors."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((VOCAB, VOCAB), -8.0)
    succ = torch.randint(1, VOCAB, (VOCAB, 4), generator=g)
    logits.scatter_(1, succ, torch.randn(VOCAB, 4, generator=g) * 1.5 + 3.0)
    logits[:, PAD] = -1e9  # PAD never follows a token
    return logits.softmax(-1)


def sample_batch(trans: torch.Tensor, batch: int, g: torch.Generator):
    """(tokens (batch, SEQ) padded with PAD, labels (batch, SEQ) shifted, IGNORE at padding)."""
    tokens = torch.full((batch, SEQ + 1), PAD, dtype=torch.long)
    lengths = torch.randint(SEQ // 2, SEQ + 2, (batch,), generator=g)
    tokens[:, 0] = torch.randint(1, VOCAB, (batch,), generator=g)
    for i in range(1, SEQ + 1):
        tokens[:, i] = torch.multinomial(trans[tokens[:, i - 1]], 1, generator=g).squeeze(1)
    pos = torch.arange(SEQ + 1)[None, :]
    tokens[pos >= lengths[:, None]] = PAD
    inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    labels[labels == PAD] = IGNORE  # padding, and the position after the last token
    return inputs, labels


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Decoder-only transformer; ``hidden(tokens)`` (B, T, d) are the last hidden states, ``lm_head``
    the main head, ``aux_head`` (students only) the auxiliary head of DHKD."""

    def __init__(self, d: int, layers: int, heads: int, aux_head: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB)
        self.aux_head = nn.Linear(d, VOCAB) if aux_head else None

    def hidden(self, tokens):
        t = tokens.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), 1)
        x = self.embed(tokens) + self.pos[:t]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln(x)


def train_teacher(trans, steps, batch, lr, g, log):
    teacher = TinyLM(d=128, layers=2, heads=4)
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr)
    for step in range(1, steps + 1):
        x, y = sample_batch(trans, batch, g)
        loss = F.cross_entropy(teacher.lm_head(teacher.hidden(x)).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 4) == 0 or step == steps:
            log(f"teacher step {step:4d}: CE {loss.item():.3f}")
    return teacher.eval().requires_grad_(False)


def heldout_ce(model, trans, seed=1234, batches=4, batch=64, shard=None):
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(batches):
            x, y = sample_batch(trans, batch, g)
            if shard:  # a sharded main head: the fused loss's CE term alone (no rank forms every logit)
                h, w = model.hidden(x).flatten(0, 1), model.lm_head.weight
                total += fused_dual_head_kd_loss(
                    h, w, model.lm_head.bias, model.aux_head.weight, None, h.new_zeros(h.shape[0], w.shape[0]),
                    y.flatten(), ce_weight=1.0, logit_weight=0.0, ignore_index=IGNORE, reduction="sum",
                    **shard).item()
            else:
                z = model.lm_head(model.hidden(x)).flatten(0, 1)
                total += F.cross_entropy(z, y.flatten(), ignore_index=IGNORE, reduction="sum").item()
            count += int((y != IGNORE).sum())
    return total / count


class VocabShardLinear(nn.Module):
    """Rows [start, stop) of a Linear(d, VOCAB): this rank's shard of a column-parallel LM head."""

    def __init__(self, full: nn.Linear, start: int, stop: int):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[start:stop].clone())
        self.bias = nn.Parameter(full.bias.detach()[start:stop].clone())


def gathered(shard: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's shard (uneven shards too); only for the example's check."""
    import torch.distributed as dist
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, shard.detach())
    return torch.cat(parts)


def distill(teacher, trans, steps, batch, lr, g, log, *, logit_weight, label_smoothing, vp=None):
    student = TinyLM(d=64, layers=1, heads=4, aux_head=True)
    t_weight, t_bias = teacher.lm_head.weight, teacher.lm_head.bias
    shard = {}
    if vp is not None:  # keep this rank's classes of the three LM heads
        start, stop = vp.pop("range")
        student.lm_head = VocabShardLinear(student.lm_head, start, stop)
        student.aux_head = VocabShardLinear(student.aux_head, start, stop)
        t_weight, t_bias = t_weight[start:stop], t_bias[start:stop]
        shard = vp
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    losses = []
    for step in range(1, steps + 1):
        x, y = sample_batch(trans, batch, g)
        with torch.no_grad():
            t_hidden = teacher.hidden(x).flatten(0, 1)  # (B T, d_t): the teacher's logits are never formed
        h = student.hidden(x).flatten(0, 1)  # (B T, d)
        heads = (student.lm_head.weight, student.lm_head.bias, student.aux_head.weight, student.aux_head.bias)
        options = dict(teacher_features=t_hidden, ce_weight=1.0, kd_weight=0.0, logit_weight=logit_weight,
                       logit_temperature=2.0, label_smoothing=label_smoothing, ignore_index=IGNORE)
        loss = fused_dual_head_kd_loss(h, *heads, None, y.flatten(), teacher_weight=t_weight, teacher_bias=t_bias,
                                       **options, **shard)
        if shard and step == 1:  # the sharded loss is the unsharded one
            with torch.no_grad():
                full = fused_dual_head_kd_loss(h, *(gathered(v) for v in heads), None, y.flatten(),
                                               teacher_weight=teacher.lm_head.weight,
                                               teacher_bias=teacher.lm_head.bias, **options)
            log(f"step 1: sharded loss {loss.item():.6f}, unsharded loss {full.item():.6f} "
                f"(difference {abs(loss.item() - full.item()):.1e})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 6) == 0 or step == steps:
            recent = sum(losses[-10:]) / len(losses[-10:])
            log(f"student step {step:4d}: DHKD loss {recent:.3f} (mean of the last {min(10, len(losses))})")
    return student, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="student steps (default 300)")
    p.add_argument("--teacher-steps", type=int, default=200, help="teacher steps (default 200)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--logit-weight", type=float, default=0.1,
                   help="weight of the logit-level loss, which sums over the 256-token vocabulary (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-parallel", action="store_true",
                   help="shard the LM heads over the ranks of `torchrun --nproc_per_node P` (gloo, CPU)")
    args = p.parse_args(argv)
    for name in ("steps", "teacher_steps", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    vp, rank = None, 0
    if args.vocab_parallel:
        import torch.distributed as dist
        dist.init_process_group("gloo")  # torchrun's environment
        rank, world = dist.get_rank(), dist.get_world_size()
        sizes = [VOCAB // world + (r < VOCAB % world) for r in range(world)]
        start = sum(sizes[:rank])
        vp = dict(vocab_parallel_group=dist.group.WORLD, vocab_start=start, vocab_size=VOCAB,
                  range=(start, start + sizes[rank]))

    def log(msg):
        if rank == 0:
            print(f"[{time.time() - t0:5.1f}s] {msg}", flush=True)

    if vp is not None:
        log(f"vocabulary sharded over {world} ranks: {sizes} classes")
    trans = make_language(args.seed)
    # the same seed on every rank: identical teachers and identical (replicated) student backbones
    teacher = train_teacher(trans, args.teacher_steps, args.batch, 3e-3, g, log)
    student, losses = distill(teacher, trans, args.steps, args.batch, 3e-3, g, log,
                              logit_weight=args.logit_weight, label_smoothing=0.05, vp=vp)
    ce_s, ce_t = heldout_ce(student, trans, shard=vp), heldout_ce(teacher, trans)
    log(f"held-out next-token CE: student (main head) {ce_s:.3f}, teacher {ce_t:.3f}, "
        f"uniform guess {math.log(VOCAB - 1):.3f}")
    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    log(f"distillation loss: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    code = 0 if last < first else 1
    if vp is not None:  # the replicated parts got the same (full) gradients on every rank
        replicated = [v.detach() for k, v in student.named_parameters() if not k.startswith(("lm_head", "aux_head"))]
        sums = [None] * world
        dist.all_gather_object(sums, [float(v.double().sum()) for v in replicated])
        log(f"replicated student parameters identical on every rank: {all(x == sums[0] for x in sums)}")
        dist.barrier()  # no rank leaves while another still waits on a collective
        dist.destroy_process_group()
        leave(code)  # a torchrun worker ends here
    return code


def leave(code: int) -> None:
    """Exit a torchrun worker at once (flushed): after gloo has run, the interpreter's C++ teardown
    sometimes aborts with "terminate called without an active exception" (exit status -6), which
    torchrun reports as a failed worker although everything finished."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
