"""Weighted k-NN classification on frozen [CLS] features, as DINO / DINOv2 evaluate it.

Features are L2-normalised, so the dot product is the cosine similarity. Each of the k nearest training samples votes
for its class with weight exp(sim / T) (T = 0.07); the class with the largest summed weight wins (ties: the lowest
class index). Top-1 accuracy is reported for every k asked for, from a single top-k search with the largest k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.eval.features import extract_features, paired_image_folders

DEFAULT_KS = (10, 20)
DEFAULT_TEMPERATURE = 0.07


def knn_votes(train_feats: Tensor, train_labels: Tensor, query_feats: Tensor, k: int, num_classes: int,
              temperature: float = DEFAULT_TEMPERATURE, chunk_size: int = 1024) -> Tensor:
    """(M, num_classes) summed vote weights of the k nearest training samples of each query."""
    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    k = min(k, train.shape[0])
    votes = []
    for start in range(0, query_feats.shape[0], chunk_size):
        query = F.normalize(query_feats[start : start + chunk_size].float(), dim=1)  # (m, D)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (m, k)
        weights = (sim / temperature).exp()
        onehot = F.one_hot(train_labels[idx].long(), num_classes).float()  # (m, k, C)
        votes.append((onehot * weights.unsqueeze(-1)).sum(dim=1))  # (m, C)
    return torch.cat(votes)


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE) -> dict[int, float]:
    """Top-1 accuracy (in [0, 1]) of the weighted k-NN classifier, for every k in `ks`."""
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("k-NN needs at least one training and one validation sample")
    if train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError(f"feature widths differ: train {train_feats.shape[1]} vs val {val_feats.shape[1]}")
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    result = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        pred = knn_votes(train_feats, train_labels, val_feats, k, num_classes, temperature).argmax(dim=1)
        result[int(k)] = (pred == val_labels.long()).float().mean().item()
    return result


def knn_eval_during_training(backbone: nn.Module, train_dir: str | Path, val_dir: str | Path, *,
                             ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                             img_size: int | None = None, batch_size: int = 64, device: str | None = None,
                             num_workers: int = 0, progress: bool = False) -> dict[str, float]:
    """k-NN top-1 (in %) of a backbone during pretraining: {"knn_top1_k10": ..., "knn_top1_k20": ...}.

    Call it on one rank with the unwrapped teacher backbone; its train/eval mode and device are restored after.
    img_size None: the backbone's training size (its `img_size`).
    """
    img_size = img_size or getattr(backbone, "img_size", 224)
    train_set, val_set = paired_image_folders(train_dir, val_dir, img_size)
    train = extract_features(backbone, train_set, batch_size=batch_size, device=device, num_workers=num_workers,
                             desc="knn train", progress=progress)
    val = extract_features(backbone, val_set, batch_size=batch_size, device=device, num_workers=num_workers,
                           desc="knn val", progress=progress)
    acc = knn_accuracy(train.cls, train.targets, val.cls, val.targets, ks, temperature)
    return {f"knn_top1_k{k}": 100.0 * a for k, a in acc.items()}
