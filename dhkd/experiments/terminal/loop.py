"""One run of ``dhkd experiment terminal``: the trainer's distiller, optimizer and schedule in a loop that
measures every epoch, and the head re-fit control.

The loop (``train_run``) takes the trainer's pieces (``dhkd.distill.Distiller.train_step``, which does
the losses, gradient alignment and the official numerics; ``build_optimizer``; ``build_scheduler``;
``EpochSampler``) with precomputed teacher logits. On a non-finite loss:

* ``exact`` numerics: the step is taken (its gradient is whatever the loss gave) and counted;
* ``official``/``official_torch21``: the official CIFAR loop's rule, the optimizer steps, then, if the
  loss is nan, the rest of the epoch is skipped (``break`` after ``optimizer.step()``). The run goes on
  with the next epoch, as the official loop does, and the best test epoch is reported as it reports it.

After every epoch, in eval mode, on the whole training split: train/val/test top-1 of both heads,
``metrics.nc_metrics`` of each head, ``metrics.head_conflict`` on the main head (CE vs the arm's logit
loss, default BinaryKL-Norm, also for arms that do not train it: what it would do there),
``metrics.feature_cosine`` and ``metrics.logit_maxima`` (eval mode: after epoch 1 BatchNorm's running
statistics can inflate them). During training, every step's logits (train mode, before the optimizer
step, from the features the step computed: ``StepLogits``) give the epoch's ``step_max_*`` maxima, the
quantities the official float32 losses saturate on; the first non-finite step records its batch's.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ...distill import Distiller
from . import metrics
from .data import build_student


class OneHeadDistiller(Distiller):
    """``Distiller`` of method dhkd with every term on the main head (W1 as both heads): one-head
    CE + KD + logit loss, with or without gradient alignment."""

    @property
    def uses_aux_head(self) -> bool:
        return False


class PrecomputedTeacher:
    """Stands in for the teacher: every step passes cached logits."""

    def eval(self):
        return self

    def __call__(self, x):
        raise RuntimeError("terminal runs pass precomputed teacher_logits to every step")


def make_distiller(student, cfg, heads: int) -> Distiller:
    teacher = None if cfg.method == "ce" else PrecomputedTeacher()
    cls = OneHeadDistiller if heads == 1 and cfg.method == "dhkd" else Distiller
    return cls(student, teacher, cfg.loss, cfg.method)


@torch.no_grad()
def forward_all(student, x, chunk: int = 4096):
    """Eval-mode (features, aux features or None, main logits, aux logits) of x, in chunks."""
    fs, afs, z1s, z2s = [], [], [], []
    for k in range(0, x.shape[0], chunk):
        f, a = student.forward_features(x[k:k + chunk])
        fs.append(f)
        afs.append(a)
        z1s.append(student.head(f))
        z2s.append(student.aux_logits(f, a))
    aux = None if afs[0] is None else torch.cat(afs)
    return torch.cat(fs), aux, torch.cat(z1s), torch.cat(z2s)


def _acc(z, y) -> float:
    return 100.0 * (z.argmax(1) == y).double().mean().item()


def epoch_metrics(student, cfg, heads: int, data: dict, t: torch.Tensor) -> dict:
    """The per-epoch row (without the loop's counters); see the module docstring."""
    student.eval()
    tau, kind = cfg.loss.logit_temperature, cfg.loss.logit_loss
    two = heads == 2
    y = data["y"]
    f, a, z1, z2 = forward_all(student, data["x"])
    row = {"train_acc": _acc(z1, y)}
    for split in ("val", "test"):
        _, _, v1, v2 = forward_all(student, data[f"x_{split}"])
        row[f"{split}_acc"] = _acc(v1, data[f"y_{split}"])
        if two:
            row[f"{split}_acc_aux"] = _acc(v2, data[f"y_{split}"])
    if two:
        row["train_acc_aux"] = _acc(z2, y)
    c = z1.shape[1]
    for head, h, lin in (("main", f, student.head), ("aux", f if a is None else a, student.aux_head)):
        if head == "aux" and not two:
            continue
        for k, v in metrics.nc_metrics(h, y, lin.weight, lin.bias, c).items():
            row[f"nc/{head}/{k}"] = v
    row.update(metrics.head_conflict(f, y, student.head.weight, student.head.bias, t, tau, kind))
    with torch.enable_grad():
        row["feat_cos"] = metrics.feature_cosine(student, f, y, t, tau, kind, two)
    row.update(metrics.logit_maxima(z1, z2 if two else z1, t, tau))
    row["finite_weights"] = all(bool(torch.isfinite(p).all()) for p in student.parameters())
    return row


class StepLogits:
    """Forward hooks that keep the batch features of the current training step (train mode, as the step
    computed them), so that its logits cost one small matmul per head: ``maxima(t)`` gives
    ``metrics.logit_maxima`` of the main head and of the head the logit loss trains (nan if none finite)."""

    def __init__(self, student, distiller, tau: float, two: bool):
        self.student, self.tau, self.two, self.seen = student, tau, two, {}
        self.hooks = [distiller.features.register_forward_hook(self._keep("f"))]
        if getattr(student, "aux_mlp", None) is not None:
            self.hooks.append(student.aux_mlp.register_forward_hook(self._keep("a")))

    def _keep(self, key):
        def hook(module, inputs, output):
            self.seen[key] = output.detach()
        return hook

    @torch.no_grad()
    def maxima(self, t: torch.Tensor) -> dict:
        s, f = self.student, self.seen["f"].float()
        z1 = F.linear(f, s.head.weight, s.head.bias)
        zl = F.linear(self.seen.get("a", f).float(), s.aux_head.weight, s.aux_head.bias) if self.two else z1
        out = {}
        for key, v in metrics.logit_maxima(z1, zl, t, self.tau).items():
            out[key] = v if math.isfinite(v) else math.nan
        return out

    def close(self):
        for h in self.hooks:
            h.remove()


def refit_head(student, data: dict, *, steps: int = 200, weight_decay: float = 5e-4, seed: int = 0) -> dict:
    """A fresh linear CE head on the frozen backbone's training features (full-batch L-BFGS, ``steps``
    iterations, L2 ``weight_decay``/2 ||W||^2): ``{"refit_train", "refit_test"}`` top-1, nan when the
    features are not finite."""
    student.eval()
    f, _, _, _ = forward_all(student, data["x"])
    ft, _, _, _ = forward_all(student, data["x_test"])
    if not (torch.isfinite(f).all() and torch.isfinite(ft).all()):
        return {"refit_train": math.nan, "refit_test": math.nan}
    torch.manual_seed(seed)
    c = int(data["y"].max()) + 1
    head = torch.nn.Linear(f.shape[1], c)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    y = data["y"]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(f), y) + 0.5 * weight_decay * head.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return {"refit_train": _acc(head(f), y), "refit_test": _acc(head(ft), data["y_test"])}


def train_run(cfg, heads: int, spec: dict, data: dict, teacher_logits: torch.Tensor, *, refit_steps: int = 200,
              log=None) -> dict:
    """Train one student; ``{"rows": per-epoch dicts, "events", "first_event", "final", "cpu_s", "wall_s"}``.
    ``data``: tensors ``x, y, x_val, y_val, x_test, y_test``; ``teacher_logits`` (n_train, C)."""
    from ...data import EpochSampler
    from ...optim import build_optimizer, build_scheduler
    from ...train import seed_everything
    t0, c0 = time.perf_counter(), time.process_time()
    x, y, t = data["x"], data["y"], teacher_logits
    seed_everything(cfg.train.seed)
    student = build_student(spec, x.shape[1], t.shape[1], aux_head=cfg.student.aux_head)
    distiller = make_distiller(student, cfg, heads)
    batch = cfg.data.batch_size
    steps = x.shape[0] // batch
    optimizer = build_optimizer(student, cfg, batch)
    scheduler = build_scheduler(optimizer, cfg, steps, batch)
    sampler = EpochSampler(x.shape[0], shuffle=True, seed=cfg.train.seed)
    official = cfg.loss.numerics != "exact"
    tau, two = cfg.loss.logit_temperature, heads == 2
    rows, events, first_event = [], 0, None
    step_logits = StepLogits(student, distiller, tau, two)
    for epoch in range(cfg.train.epochs):
        student.train()
        sampler.set_epoch(epoch)
        order = sampler.indices()
        total, n_ok, n_bad, broke, ga = 0.0, 0, 0, False, 0.0
        step_max: dict = {}
        for b in range(steps):
            i = order[b * batch:(b + 1) * batch]
            out = distiller.train_step(x[i], y[i], epoch, teacher_logits=t[i])
            loss = float(out["loss"])
            batch_max = step_logits.maxima(t[i])
            for k, v in batch_max.items():
                step_max[k] = max(step_max.get(k, -math.inf), v) if math.isfinite(v) else step_max.get(k, math.nan)
            if math.isfinite(loss):
                total, n_ok = total + loss, n_ok + 1
            else:
                n_bad += 1
                if first_event is None:
                    first_event = {"epoch": epoch + 1, "step": b, "loss": loss,
                                   **{"batch_" + k: v for k, v in batch_max.items()}}
            ga += float(out.get("ga_conflict", 0.0))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if official and math.isnan(loss):
                broke = True
                break
        events += n_bad
        row = {"epoch": epoch + 1, "train_loss": total / n_ok if n_ok else math.nan, "nonfinite_steps": n_bad,
               "epoch_broken": broke, "ga_projected": ga / steps,
               **{"step_" + k: v for k, v in step_max.items()},
               **epoch_metrics(student, cfg, heads, data, t)}
        rows.append(row)
        if log is not None:
            log(f"    epoch {epoch + 1}: train {row['train_acc']:.2f}% test {row['test_acc']:.2f}%")
    step_logits.close()
    final = refit_head(student, data, steps=refit_steps, seed=cfg.train.seed)
    return {"rows": rows, "events": events, "first_event": first_event, "final": final,
            "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}
