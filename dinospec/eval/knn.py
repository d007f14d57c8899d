"""Weighted k-NN classification on frozen [CLS] features, as DINO / DINOv2 evaluate it.

Features are L2-normalised, so the dot product is the cosine similarity. Each of the k nearest training samples votes
for its class with weight exp(sim / T) (T = 0.07); the class with the largest summed weight wins (ties: the lowest
class index). Top-1 accuracy is reported for every k asked for, from a single top-k search with the largest k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec import dist
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


def knn_of_training_teacher(backbone: nn.Module, rebuild: Callable[[], nn.Module], train_dir: str | Path,
                            val_dir: str | Path, *, img_size: int | None, batch_size: int,
                            device: torch.device) -> dict[str, float]:
    """k-NN of the teacher backbone in the middle of pretraining; every rank calls it at the same step.

    Under FSDP2 the parameters are shards: all ranks gather the full weights, which rank 0 loads into `rebuild()`
    (a fresh backbone of the same config); otherwise rank 0 evaluates `backbone` itself. Everything runs under a
    forked RNG, so training draws the same random numbers whether or not (and how often) it evaluates: runs and
    resumes stay bitwise reproducible. Rank 0 gets the metrics, the other ranks {}.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    main = dist.rank() == 0
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        model: nn.Module | None = backbone
        if any(isinstance(p, DTensor) for p in backbone.parameters()):
            full = get_model_state_dict(backbone, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            model = None
            if main:
                model = rebuild()
                model.load_state_dict(full)
        result = knn_eval_during_training(model, train_dir, val_dir, img_size=img_size, batch_size=batch_size,
                                          device=str(device)) if main else {}
    dist.barrier()
    return result
