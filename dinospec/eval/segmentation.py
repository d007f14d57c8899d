"""Linear segmentation probe on frozen patch features, and the mIoU it is scored by.

The probe is DINOv2's "linear" semantic-segmentation head: (optional BatchNorm) + a 1x1 convolution on the patch
grid (B, D, h, w), whose logits are upsampled bilinearly and trained with cross-entropy (label 255 ignored).
Features are cached once; only the head trains. The lr is chosen on a held-out part of the training images and the
head refit on all of them, as in :mod:`dinospec.eval.linear`.

Training resolution: the loss is taken on logits upsampled to ``train_size`` (default: 4x the patch grid, at most
the mask size) against the masks sampled at the same points (nearest); that is ~13x cheaper on a CPU than the full
mask size and, the head being linear per patch, loses little. Evaluation is always at the full mask resolution.

mIoU convention: IoU_c = TP / (TP + FP + FN) from a confusion matrix summed over all validation pixels (rows:
ground truth, columns: prediction; pixels labelled ``ignore_index`` are left out). A class absent from both the
ground truth and the predictions (TP + FP + FN = 0) has no IoU and is excluded from the mean; a class that is
predicted but absent from the ground truth counts, with IoU 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.eval.linear import stratified_split


def cosine_lr(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))

IGNORE_INDEX = 255
DEFAULT_LRS = (1e-3, 1e-2, 1e-1)
DEFAULT_STEPS = 200


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(C, C) int64 counts, row = ground-truth class, column = predicted class; ignored pixels are not counted."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    pred, target = pred[valid].long(), target[valid].long()
    for name, t in (("target", target), ("prediction", pred)):
        bad = (t < 0) | (t >= num_classes)
        if bad.any():
            raise ValueError(f"{name} holds {int(bad.sum())} label(s) outside 0..{num_classes - 1} "
                             f"(e.g. {int(t[bad][0])}) that are not the ignore index {ignore_index}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_iou(conf: Tensor) -> Tensor:
    """(C,) IoU per class; NaN for a class absent from both ground truth and predictions."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(dim=0) + conf.sum(dim=1) - tp  # TP + FP + FN
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def miou(conf: Tensor) -> float:
    """Mean IoU over the classes present in ground truth or prediction (NaN when there is none)."""
    iou = per_class_iou(conf)
    present = ~iou.isnan()
    return iou[present].mean().item() if present.any() else float("nan")


def pixel_accuracy(conf: Tensor) -> float:
    total = conf.sum().item()
    return conf.diag().sum().item() / total if total else float("nan")


class LinearSegHead(nn.Module):
    """Per-patch linear classifier: (B, D, h, w) features -> (B, C, H, W) logits at the requested size."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim) if batchnorm else nn.Identity()
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.zeros_(self.classifier.weight)  # deterministic start; the head alone is trained
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: Tensor, size: tuple[int, int]) -> Tensor:
        logits = self.classifier(self.bn(feats))  # (B, C, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def standardize_channels(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Per-channel standardisation of (N, D, h, w) tensors with the statistics of `train`."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def resample_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, H, W) label masks sampled at `size` by nearest neighbour (labels are never blended)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()  # (N, h', w')


def default_train_size(feats: Tensor, masks: Tensor, factor: int = 4) -> tuple[int, int]:
    h, w = feats.shape[-2:]
    return min(factor * h, masks.shape[-2]), min(factor * w, masks.shape[-1])


def fit_seg_head(feats: Tensor, masks: Tensor, num_classes: int, *, lr: float, steps: int = DEFAULT_STEPS,
                 batch_size: int = 16, batchnorm: bool = True, weight_decay: float = 0.0, seed: int = 0,
                 ignore_index: int = IGNORE_INDEX, train_size: tuple[int, int] | None = None) -> LinearSegHead:
    """Train a LinearSegHead on cached features (N, D, h, w) against masks (N, H, W)."""
    head = LinearSegHead(feats.shape[1], num_classes, batchnorm).to(feats.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = cosine_lr(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    size = tuple(train_size or default_train_size(feats, masks))
    masks = resample_masks(masks, size)
    for _ in range(steps):
        idx = torch.randperm(len(feats), generator=gen)[:batch_size]
        target = masks[idx]
        if (target != ignore_index).any():  # an all-ignored batch has no loss to follow
            loss = F.cross_entropy(head(feats[idx], size), target, ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return head.eval()


@torch.no_grad()
def evaluate_seg(head: nn.Module, feats: Tensor, masks: Tensor, num_classes: int, batch_size: int = 16,
                 ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The confusion matrix of `head`'s argmax predictions at the mask resolution."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(feats), batch_size):
        target = masks[start : start + batch_size]
        pred = head(feats[start : start + batch_size], tuple(target.shape[-2:])).argmax(dim=1)  # (B, H, W)
        conf += confusion_matrix(pred.cpu(), target.cpu(), num_classes, ignore_index)
    return conf


def seg_probe(train_feats: Tensor, train_masks: Tensor, val_feats: Tensor, val_masks: Tensor, num_classes: int,
              *, lrs: Sequence[float] = DEFAULT_LRS, steps: int = DEFAULT_STEPS, batch_size: int = 16,
              batchnorm: bool = True, holdout: float = 0.2, seed: int = 0, ignore_index: int = IGNORE_INDEX,
              class_names: Sequence[str] | None = None) -> dict:
    """Grid-search the lr (held-out train images, or best on val with holdout=0), report val mIoU (%)."""
    if not lrs:
        raise ValueError("the lr grid is empty")
    train_feats, val_feats = standardize_channels(train_feats.float(), val_feats.float())
    train_size = default_train_size(train_feats, train_masks)
    fit = dict(steps=steps, batch_size=batch_size, batchnorm=batchnorm, seed=seed, ignore_index=ignore_index,
               train_size=train_size)

    def score(head: nn.Module, feats: Tensor, masks: Tensor) -> float:
        return miou(evaluate_seg(head, feats, masks, num_classes, batch_size, ignore_index))

    if holdout > 0:
        fit_idx, held_idx = stratified_split(torch.zeros(len(train_feats), dtype=torch.long), holdout, seed)
        scores = {lr: score(fit_seg_head(train_feats[fit_idx], train_masks[fit_idx], num_classes, lr=lr, **fit),
                            train_feats[held_idx], train_masks[held_idx]) for lr in lrs}
        best_lr = max(lrs, key=lambda lr: scores[lr])
        head = fit_seg_head(train_feats, train_masks, num_classes, lr=best_lr, **fit)
        selection = (f"lr chosen on {len(held_idx)} held-out train images ({holdout:.0%}), then refit on all of "
                     f"train; val scored once")
    else:
        heads = {lr: fit_seg_head(train_feats, train_masks, num_classes, lr=lr, **fit) for lr in lrs}
        scores = {lr: score(h, val_feats, val_masks) for lr, h in heads.items()}
        best_lr = max(lrs, key=lambda lr: scores[lr])
        head = heads[best_lr]
        selection = "best on val (the lr is chosen on the split it is scored on: optimistic)"
    conf = evaluate_seg(head, val_feats, val_masks, num_classes, batch_size, ignore_index)
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    return {
        "miou": 100.0 * miou(conf),
        "pixel_accuracy": 100.0 * pixel_accuracy(conf),
        "per_class_iou": {n: (None if v != v else 100.0 * v) for n, v in zip(names, per_class_iou(conf).tolist())},
        "best_lr": best_lr,
        "selection": selection,
        "selection_miou_by_lr": {f"{lr:g}": 100.0 * s for lr, s in scores.items()},
        "miou_convention": "classes absent from both ground truth and prediction are excluded from the mean",
        "steps": steps,
        "batchnorm": batchnorm,
        "train_loss_size": list(train_size),
        "eval_size": list(val_masks.shape[-2:]),
        "num_classes": num_classes,
        "num_train": len(train_feats),
        "num_val": len(val_feats),
    }
