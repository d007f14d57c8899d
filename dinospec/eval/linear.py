"""Linear classification probe on cached frozen features (DINOv2's linear eval, made small and deterministic).

Input: [CLS] features, or [CLS] concatenated with the mean patch token (DINOv2's "avgpool" variant). Features are
standardised with the training split's mean/std so one lr grid suits any backbone. A zero-initialised linear layer
is trained with AdamW (cosine lr decay) for a few hundred full-batch (or mini-batch) steps per lr of the grid.

Model selection, stated in every result: by default the lr is chosen on a stratified held-out part of the training
split, then the probe is refit on the whole training split and scored once on val (val never picks anything). With
``holdout=0`` the lr is "best on val", which is optimistic and labelled so.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
DEFAULT_STEPS = 300
DEFAULT_HOLDOUT = 0.2


def stratified_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(fit indices, held-out indices): about `fraction` of every class held out, at least one of a class of 2+."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = min(max(round(fraction * len(idx)), 1), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    fit_idx, held_idx = torch.cat(fit).sort().values, torch.cat(held).sort().values
    if len(held_idx) == 0:
        raise ValueError("too few training samples to hold any out for lr selection; use holdout=0")
    return fit_idx, held_idx


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Every tensor standardised with the per-feature mean and std of `train` (features are the columns)."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))


def fit_linear(x: Tensor, y: Tensor, num_classes: int, *, lr: float, steps: int = DEFAULT_STEPS,
               weight_decay: float = 0.0, batch_size: int | None = None, seed: int = 0) -> nn.Linear:
    """A linear classifier x (N, D) -> num_classes logits, trained with cross-entropy. Deterministic for a seed."""
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(head.weight)  # the problem is convex: zero init needs no randomness
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = cosine_lr(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    full_batch = batch_size is None or batch_size >= len(x)
    for _ in range(steps):
        idx = slice(None) if full_batch else torch.randint(len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(head(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, x: Tensor, y: Tensor) -> float:
    return (head(x).argmax(dim=1) == y).float().mean().item()


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *,
                 lrs: Sequence[float] = DEFAULT_LRS, steps: int = DEFAULT_STEPS, weight_decay: float = 0.0,
                 holdout: float = DEFAULT_HOLDOUT, batch_size: int | None = None, seed: int = 0) -> dict:
    """Grid-search the lr, then report val top-1 (%) of the chosen probe; see the module docstring for selection."""
    if not lrs:
        raise ValueError("the lr grid is empty")
    train_y, val_y = train_y.long(), val_y.long()
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    train_x, val_x = standardize(train_x.float(), val_x.float())
    fit = dict(steps=steps, weight_decay=weight_decay, batch_size=batch_size, seed=seed)

    if holdout > 0:
        fit_idx, held_idx = stratified_split(train_y, holdout, seed)
        scores = {lr: accuracy(fit_linear(train_x[fit_idx], train_y[fit_idx], num_classes, lr=lr, **fit),
                               train_x[held_idx], train_y[held_idx]) for lr in lrs}
        best_lr = max(lrs, key=lambda lr: scores[lr])  # ties: the first (smallest) lr of the grid
        head = fit_linear(train_x, train_y, num_classes, lr=best_lr, **fit)
        val_acc = accuracy(head, val_x, val_y)
        selection = (f"lr chosen on a stratified {holdout:.0%} of train held out ({len(held_idx)} samples), "
                     f"then refit on all of train; val scored once")
    else:
        heads = {lr: fit_linear(train_x, train_y, num_classes, lr=lr, **fit) for lr in lrs}
        scores = {lr: accuracy(h, val_x, val_y) for lr, h in heads.items()}
        best_lr = max(lrs, key=lambda lr: scores[lr])
        head, val_acc = heads[best_lr], scores[best_lr]
        selection = "best on val (the lr is chosen on the split it is scored on: optimistic)"
    return {
        "top1": 100.0 * val_acc,
        "train_top1": 100.0 * accuracy(head, train_x, train_y),
        "best_lr": best_lr,
        "selection": selection,
        "selection_top1_by_lr": {f"{lr:g}": 100.0 * s for lr, s in scores.items()},
        "steps": steps,
        "weight_decay": weight_decay,
        "num_classes": num_classes,
        "num_train": len(train_x),
        "num_val": len(val_x),
    }
