"""Linear classification probe on cached frozen features: a converged multinomial logistic regression.

Input: [CLS] features, or [CLS] concatenated with the mean patch token (DINOv2's "avgpool" variant). Features are
standardised with the training split's mean/std (frozen ViT features have condition numbers ~1e7; a first-order
optimiser with a short budget under-fits them by many points). The probe minimises

    mean cross-entropy + l2 / 2 * ||W||^2          (bias not penalised)

with full-batch L-BFGS and a strong-Wolfe line search in float64 until the gradient is below tolerance: the
problem is strictly convex, so the result does not depend on an lr, a schedule or a seed, and equals what
scikit-learn's LogisticRegression(C = 1 / (l2 * N)) finds (tests/test_eval.py checks both the objective and the
accuracy against it). The grid of l2 strengths is walked from strong to weak, each fit warm-started from the last.

Model selection, stated in every result: by default l2 is chosen on a stratified held-out part of the training
split, then the probe is refit on the whole training split and scored once on val (val never picks anything). With
``holdout=0`` the l2 is "best on val", which is optimistic and labelled so.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_L2S = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5)
DEFAULT_MAX_ITER = 1000
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
        raise ValueError("too few training samples to hold any out for model selection; use holdout=0")
    return fit_idx, held_idx


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Every tensor standardised with the per-feature mean and std of `train` (features are the columns)."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def logistic_objective(head: nn.Linear, x: Tensor, y: Tensor, l2: float) -> Tensor:
    """Mean cross-entropy plus l2/2 ||W||^2: the function every fit minimises (the bias is not penalised)."""
    return F.cross_entropy(head(x), y) + 0.5 * l2 * head.weight.pow(2).sum()


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, *, l2: float, max_iter: int = DEFAULT_MAX_ITER,
                 init: nn.Linear | None = None, tolerance: float = 1e-5) -> nn.Linear:
    """The minimiser of `logistic_objective` on x (N, D), y (N,), by L-BFGS in float64; `init` warm-starts it.

    Stops when no gradient entry exceeds `tolerance` (the objective is then within ~1e-7 of its minimum on
    standardised features; scikit-learn's default stops at 1e-4) or after `max_iter` iterations."""
    x64 = x.double()
    head = nn.Linear(x.shape[1], num_classes, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        if init is None:  # convex problem: zero init needs no randomness
            head.weight.zero_()
            head.bias.zero_()
        else:
            head.weight.copy_(init.weight)
            head.bias.copy_(init.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tolerance, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = logistic_objective(head, x64, y, l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, x: Tensor, y: Tensor) -> float:
    w = next(head.parameters())
    return (head(x.to(w.dtype)).argmax(dim=1) == y).float().mean().item()


def _path(x: Tensor, y: Tensor, num_classes: int, l2s: Sequence[float], max_iter: int) -> dict[float, nn.Linear]:
    """One fit per l2, strongest first, each warm-started from the previous (the regularisation path)."""
    heads: dict[float, nn.Linear] = {}
    previous = None
    for l2 in sorted(l2s, reverse=True):
        previous = heads[l2] = fit_logistic(x, y, num_classes, l2=l2, max_iter=max_iter, init=previous)
    return heads


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, *,
                 l2s: Sequence[float] = DEFAULT_L2S, max_iter: int = DEFAULT_MAX_ITER,
                 holdout: float = DEFAULT_HOLDOUT, seed: int = 0) -> dict:
    """Choose l2, then report val top-1 (%) of the converged probe; see the module docstring for selection."""
    if not l2s:
        raise ValueError("the l2 grid is empty")
    train_y, val_y = train_y.long(), val_y.long()
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    train_x, val_x = standardize(train_x.float(), val_x.float())

    if holdout > 0:
        fit_idx, held_idx = stratified_split(train_y, holdout, seed)
        heads = _path(train_x[fit_idx], train_y[fit_idx], num_classes, l2s, max_iter)
        scores = {l2: accuracy(h, train_x[held_idx], train_y[held_idx]) for l2, h in heads.items()}
        best = max(sorted(l2s, reverse=True), key=lambda l2: scores[l2])  # ties: the strongest regularisation
        head = fit_logistic(train_x, train_y, num_classes, l2=best, max_iter=max_iter, init=heads[best])
        val_acc = accuracy(head, val_x, val_y)
        selection = (f"l2 chosen on a stratified {holdout:.0%} of train held out ({len(held_idx)} samples), "
                     f"then refit on all of train; val scored once")
    else:
        heads = _path(train_x, train_y, num_classes, l2s, max_iter)
        scores = {l2: accuracy(h, val_x, val_y) for l2, h in heads.items()}
        best = max(sorted(l2s, reverse=True), key=lambda l2: scores[l2])
        head, val_acc = heads[best], scores[best]
        selection = "best on val (the l2 is chosen on the split it is scored on: optimistic)"
    return {
        "top1": 100.0 * val_acc,
        "train_top1": 100.0 * accuracy(head, train_x, train_y),
        "best_l2": best,
        "selection": selection,
        "selection_top1_by_l2": {f"{l2:g}": 100.0 * s for l2, s in sorted(scores.items(), reverse=True)},
        "objective": "multinomial logistic regression, mean CE + l2/2 ||W||^2, L-BFGS to convergence",
        "num_classes": num_classes,
        "num_train": len(train_x),
        "num_val": len(val_x),
    }
