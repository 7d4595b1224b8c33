"""Evaluation beside the training loop: top-1/top-5 of both heads on the validation set and the
per-head diagnostics. The trainer (``dhkd.train``) and ``dhkd eval`` call these with their student,
data and device; nothing here trains."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import broadcast_tensors


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of rows whose label is among the top-k logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.unsqueeze(1)
    return [hit[:, :min(k, kmax)].any(1).sum() for k in ks]


@torch.no_grad()
def evaluate(student, data, device, *, channels_last, autocast, all_reduce, model=None, aux_trained=True,
             broadcast_buffers=False) -> dict:
    """Top-1/top-5 of the student's main and auxiliary heads (or of ``model``'s logits) on ``data.val``.

    ``autocast()``: the forward's context; ``all_reduce(t)``: sums ``t`` over processes in place;
    ``aux_trained=False`` drops the aux head's accuracies (no loss trained it); ``broadcast_buffers``:
    rank 0's BatchNorm statistics on every rank first (DDP)."""
    if broadcast_buffers:
        broadcast_tensors(list(student.buffers()))
    was_training = student.training
    student.eval()
    counts = torch.zeros(6, dtype=torch.float64, device=device)  # m1 m5 a1 a5 n ce_sum
    for x, y in data.val:
        x = data.prepare(x, device, channels_last)
        y = y.to(device, non_blocking=True)
        with autocast():
            if model is not None:
                z1, z2 = model(x), None
            else:
                f, a = student.forward_features(x)
                z1, z2 = student.head(f), student.aux_logits(f, a)
        z1 = z1.float()
        m1, m5 = topk_correct(z1, y)
        counts[0] += m1
        counts[1] += m5
        if z2 is not None:
            a1, a5 = topk_correct(z2.float(), y)
            counts[2] += a1
            counts[3] += a5
        counts[4] += y.numel()
        counts[5] += F.cross_entropy(z1, y, reduction="sum").double()
    all_reduce(counts)
    student.train(was_training)
    n = max(counts[4].item(), 1.0)
    if model is not None:
        return {"val/acc1": 100 * counts[0].item() / n, "val/acc5": 100 * counts[1].item() / n}
    row = {"val/acc1_main": 100 * counts[0].item() / n, "val/acc5_main": 100 * counts[1].item() / n,
           "val/acc1_aux": 100 * counts[2].item() / n, "val/acc5_aux": 100 * counts[3].item() / n,
           "val/loss_ce_main": counts[5].item() / n, "val/n": int(counts[4].item())}
    if not aux_trained:
        del row["val/acc1_aux"], row["val/acc5_aux"]
    return row


@torch.no_grad()
def head_diagnostics(student, data, device, cfg, *, channels_last, autocast, aux_trained) -> dict:
    """``dhkd.diagnostics.head_report`` of the main head (``diag/main/<key>``) and, when the aux head is
    trained, of the auxiliary head (``diag/aux/<key>``), with NC1 on the first
    ``train.diagnostics_samples`` validation samples of this process (eval mode; each head's NC1 on its
    own input features)."""
    from .diagnostics import head_report
    was_training = student.training
    student.eval()
    feats, aux_feats, labels, n = [], [], [], 0
    for x, y in data.val:
        x = data.prepare(x, device, channels_last)
        with autocast():
            f, a = student.forward_features(x)
        feats.append(f.float())
        aux_feats.append(f.float() if a is None else a.float())
        labels.append(y.to(device))
        n += y.shape[0]
        if n >= cfg.train.diagnostics_samples:
            break
    student.train(was_training)
    k = cfg.train.diagnostics_samples
    f, a, y = torch.cat(feats)[:k], torch.cat(aux_feats)[:k], torch.cat(labels)[:k]
    c = cfg.num_classes
    row = {f"diag/main/{key}": v for key, v in head_report(student.head.weight, f, y, c).items()}
    if aux_trained:
        row.update({f"diag/aux/{key}": v for key, v in head_report(student.aux_head.weight, a, y, c).items()})
    return row
