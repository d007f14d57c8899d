"""The measurements of `dinospec analyze` (dinospec/analysis.py runs the command; analysis_plots.py draws).

Measured per block on a set of images (forward hooks on ``blocks[i].norm1``, plain LayerNorm or TokenRouted alike):

- cosine similarity: mean cos([CLS], patch_j) over patches, and the mean off-diagonal cos(patch_i, patch_j), on the
  residual stream entering norm1 ("before") and on norm1's output ("after"); averaged over images.
- channel specialisation (after norm1): for channel c, A_cls[c] = mean |[CLS]_c| and A_patch[c] = mean |patch_c|
  (over patches, then images). Channel c is [CLS]-dominant when A_cls / A_patch > factor, patch-dominant when
  < 1 / factor; the specialisation score of a block is the fraction of its channels that are either. [CLS] is one
  token, so a few images leave its per-channel magnitudes noisy: the same score with one ordinary token (the centre
  patch) in place of [CLS] is reported beside it as the reference level of "specialisation" that noise alone gives.
- norm1 gains: mean |gamma| per token group when norm1 is routed (and their correlation over channels), else the
  shared gain's.
- high-norm tokens, on each block's output: per image the max / median norm of the patch tokens and the number of
  patches whose norm exceeds outlier_k x median; averaged over images.
- PCA of the last layer's normalised patch tokens, per image: the first 3 components as RGB (each min-max scaled),
  upsampled to the image and shown beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dinospec.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinospec.eval.features import ImageList, resolve_device
from dinospec.models.routed import TokenLayout, TokenRouted


# ----------------------------------------------------------------------------------------------------------------
# per-image statistics of a token sequence laid out as the backbone's TokenLayout (num_reg registers)


def cls_patch_cosine(x: Tensor, num_reg: int) -> Tensor:
    """(B, N, D) -> (B,): mean over patches of cos([CLS], patch)."""
    cls, _, patches = TokenLayout(num_reg).split(F.normalize(x.double(), dim=-1))
    return (patches @ cls.unsqueeze(-1)).squeeze(-1).mean(dim=1)


def patch_patch_cosine(x: Tensor, num_reg: int) -> Tensor:
    """(B, N, D) -> (B,): mean of cos(patch_i, patch_j) over i != j, via |sum_i p_i|^2 = N + sum_{i!=j} p_i.p_j."""
    p = F.normalize(TokenLayout(num_reg).split(x)[2].double(), dim=-1)
    n = p.shape[1]
    return (p.sum(dim=1).pow(2).sum(dim=-1) - n) / (n * (n - 1))


def high_norm_stats(x: Tensor, num_reg: int, k: float) -> tuple[Tensor, Tensor]:
    """(B, N, D) -> per image (max / median patch norm, count of patches with norm > k x median)."""
    norms = TokenLayout(num_reg).split(x)[2].double().norm(dim=-1)  # (B, P)
    median = norms.median(dim=1).values
    return norms.max(dim=1).values / median, (norms > k * median.unsqueeze(1)).sum(dim=1).double()


class BlockRecorder:
    """Forward hooks that reduce every block's activations to running sums as the images stream through."""

    def __init__(self, model: nn.Module, outlier_k: float):
        self.r, self.k, self.depth = model.num_register_tokens, outlier_k, len(model.blocks)
        zeros = lambda *s: torch.zeros(self.depth, *s, dtype=torch.float64)  # noqa: E731
        self.sums = {name: zeros() for name in ("cos_cls_patch_before", "cos_patch_patch_before",
                                                "cos_cls_patch_after", "cos_patch_patch_after",
                                                "max_over_median", "outliers")}
        self.cls_abs, self.patch_abs, self.ref_abs = (zeros(model.embed_dim) for _ in range(3))
        self.images = 0
        self.handles = []
        for i, block in enumerate(model.blocks):
            self.handles.append(block.norm1.register_forward_hook(self._norm1_hook(i)))
            self.handles.append(block.register_forward_hook(self._block_hook(i)))

    def _norm1_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            x, y = inputs[0], output  # (B, N, D) each: the residual stream and norm1's output
            self.sums["cos_cls_patch_before"][i] += cls_patch_cosine(x, self.r).sum()
            self.sums["cos_patch_patch_before"][i] += patch_patch_cosine(x, self.r).sum()
            self.sums["cos_cls_patch_after"][i] += cls_patch_cosine(y, self.r).sum()
            self.sums["cos_patch_patch_after"][i] += patch_patch_cosine(y, self.r).sum()
            cls, _, patches = TokenLayout(self.r).split(y)
            self.cls_abs[i] += cls.double().abs().sum(dim=0)
            self.patch_abs[i] += patches.double().abs().mean(dim=1).sum(dim=0)
            self.ref_abs[i] += patches[:, patches.shape[1] // 2].double().abs().sum(dim=0)  # centre: an ordinary token

        return hook

    def _block_hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            ratio, outliers = high_norm_stats(output, self.r, self.k)
            self.sums["max_over_median"][i] += ratio.sum()
            self.sums["outliers"][i] += outliers.sum()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def norm1_gains(model: nn.Module, factor: float) -> dict[str, Any]:
    """Per block: mean |gamma| of norm1 for the [CLS] and the patch group (equal when norm1 is shared)."""
    cls_group, _, patch_group = getattr(getattr(model, "spec", None), "group_of_type", (0, 0, 0))
    out: dict[str, list] = {"routed": [], "cls_mean_abs": [], "patch_mean_abs": [], "abs_correlation": [],
                            "specialised_fraction": []}
    for block in model.blocks:
        norm = block.norm1
        routed = isinstance(norm, TokenRouted)
        g_cls = (norm[cls_group] if routed else norm).weight.detach().double().abs()
        g_patch = (norm[patch_group] if routed else norm).weight.detach().double().abs()
        ratio = g_cls / g_patch.clamp_min(1e-12)
        corr = torch.corrcoef(torch.stack([g_cls, g_patch]))[0, 1].item() if routed else 1.0
        out["routed"].append(routed)
        out["cls_mean_abs"].append(g_cls.mean().item())
        out["patch_mean_abs"].append(g_patch.mean().item())
        out["abs_correlation"].append(corr if corr == corr else None)
        out["specialised_fraction"].append(((ratio > factor) | (ratio < 1 / factor)).double().mean().item())
    last = max((i for i, r in enumerate(out["routed"]) if r), default=None)
    if last is not None:  # per-channel gains of the deepest routed block, for the scatter plot
        norm = model.blocks[last].norm1
        out["scatter_block"] = last
        out["scatter_cls"] = norm[cls_group].weight.detach().abs().tolist()
        out["scatter_patch"] = norm[patch_group].weight.detach().abs().tolist()
    return out


# ----------------------------------------------------------------------------------------------------------------
# measurement


def pca_rgb(tokens: Tensor, grid: tuple[int, int]) -> tuple[np.ndarray, list[float]]:
    """(P, D) patch tokens -> (h, w, 3) picture of the first 3 principal components (min-max per channel)."""
    x = tokens.double() - tokens.double().mean(dim=0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:3].T  # (P, 3)
    flip = proj.gather(0, proj.abs().argmax(dim=0, keepdim=True)).sign()  # sign: largest |value| positive
    proj = proj * flip
    lo, hi = proj.min(dim=0).values, proj.max(dim=0).values
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12)).reshape(*grid, -1)
    if rgb.shape[-1] < 3:  # fewer than 3 components (tiny inputs): pad with black
        rgb = torch.cat([rgb, rgb.new_zeros(*grid, 3 - rgb.shape[-1])], dim=-1)
    var = (s**2 / (s**2).sum()).tolist()[:3]
    return rgb.float().numpy(), var


def to_display(img: Tensor) -> np.ndarray:
    """A normalised (3, H, W) image back to (H, W, 3) in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def measure(model: nn.Module, files: Sequence[Path], *, img_size: int = 224, batch_size: int = 16,
            device: str | None = None, factor: float = 3.0, outlier_k: float = 3.0, pca_images: int = 6,
            progress: bool = True) -> tuple[dict[str, Any], list[tuple[str, np.ndarray, np.ndarray]]]:
    """All numbers of analysis.json, and (name, image, PCA picture) for the first `pca_images` images."""
    dev = resolve_device(device)
    was_training, param_device = model.training, next(model.parameters()).device
    model.eval().to(dev)
    recorder = BlockRecorder(model, outlier_k)
    pictures, pca_var = [], []
    try:
        loader = DataLoader(ImageList(files, img_size), batch_size=batch_size)
        for images, idx in tqdm(loader, desc="analyze", disable=not progress, leave=False):
            out = model.forward_features(images.to(dev))
            recorder.images += len(images)
            grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
            for j, i in enumerate(idx.tolist()):
                if i < pca_images:
                    rgb, var = pca_rgb(out["x_norm_patchtokens"][j].cpu(), grid)
                    pictures.append((files[i].name, to_display(images[j]), rgb))
                    pca_var.append(var)
    finally:
        recorder.remove()
        model.train(was_training).to(param_device)
    n = recorder.images
    mean = {k: (v / n).tolist() for k, v in recorder.sums.items()}
    ratio = recorder.cls_abs / recorder.patch_abs.clamp_min(1e-12)  # (depth, D)
    ref_ratio = recorder.ref_abs / recorder.patch_abs.clamp_min(1e-12)
    specialised = lambda r: ((r > factor) | (r < 1 / factor)).double().mean(dim=1).tolist()  # noqa: E731
    results = {
        "num_images": n,
        "img_size": img_size,
        "patch_size": model.patch_size,
        "num_register_tokens": model.num_register_tokens,
        "depth": recorder.depth,
        "embed_dim": model.embed_dim,
        "cosine": {
            "before_norm1": {"cls_patch": mean["cos_cls_patch_before"], "patch_patch": mean["cos_patch_patch_before"]},
            "after_norm1": {"cls_patch": mean["cos_cls_patch_after"], "patch_patch": mean["cos_patch_patch_after"]},
        },
        "channels": {
            "statistic": "after norm1, per channel: mean |[CLS]| / mean |patch| over images (and patches)",
            "factor": factor,
            "cls_dominant_fraction": (ratio > factor).double().mean(dim=1).tolist(),
            "patch_dominant_fraction": (ratio < 1 / factor).double().mean(dim=1).tolist(),
            "specialisation_score": specialised(ratio),
            "reference_score": specialised(ref_ratio),
            "reference": "the same score with the centre patch token in place of [CLS] (noise level)",
            "cls_mean_abs": (recorder.cls_abs / n).tolist(),
            "patch_mean_abs": (recorder.patch_abs / n).tolist(),
        },
        "norm1_gain": norm1_gains(model, factor),
        "high_norm": {
            "where": "each block's output (residual stream), patch tokens only",
            "outlier_k": outlier_k,
            "max_over_median": mean["max_over_median"],
            "outliers_per_image": mean["outliers"],
        },
        "pca": {"images": [name for name, _, _ in pictures], "explained_variance_ratio": pca_var,
                "fit": "per image, on the last layer's normalised patch tokens"},
    }
    return results, pictures
