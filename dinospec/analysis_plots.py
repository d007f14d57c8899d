"""The plots of `dinospec analyze` (dinospec/analysis.py measures; this draws): one PNG per analysis.

Figures are built without pyplot (no global backend switch, no open-figure registry), so a trainer or a test can
draw them in any process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

def _blocks_axis(ax: Axes, depth: int) -> None:
    ax.set_xlabel("block")
    ax.set_xticks(range(0, depth, max(1, depth // 12)))
    ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-7 + 1.85" offsets on nearly flat curves
    ax.grid(alpha=0.3)


def _over_blocks(res: dict, sharey: bool = False) -> tuple[Figure, np.ndarray, range]:
    """A figure of two panels side by side, each a curve per block: the layout of the per-block analyses."""
    fig = Figure(figsize=(10, 4))
    return fig, fig.subplots(1, 2, sharey=sharey), range(res["depth"])


def _save(fig: Figure, path: Path) -> None:
    """Every analysis PNG laid out and written alike (120 dpi)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_cosine(res: dict, path: Path) -> None:
    fig, axes, blocks = _over_blocks(res, sharey=True)
    for ax, key, title in zip(axes, ("cls_patch", "patch_patch"), ("[CLS] vs patch", "patch vs patch (i != j)")):
        ax.plot(blocks, res["cosine"]["before_norm1"][key], "o--", label="before norm1 (residual stream)")
        ax.plot(blocks, res["cosine"]["after_norm1"][key], "s-", label="after norm1")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(f"{title}: mean cosine similarity")
        _blocks_axis(ax, res["depth"])
    axes[0].set_ylabel("mean cosine similarity")
    axes[0].legend()
    fig.suptitle(f"Token similarity through the pre-attention LayerNorm ({res['num_images']} images)")
    _save(fig, path)


def plot_channels(res: dict, path: Path) -> None:
    ch = res["channels"]
    log_ratio = np.log2(np.asarray(ch["cls_mean_abs"]) / np.maximum(np.asarray(ch["patch_mean_abs"]), 1e-12))
    log_ratio = np.sort(log_ratio, axis=1)  # channels sorted within each block: the share of each side is visible
    lim = max(float(np.abs(log_ratio).max()), np.log2(ch["factor"]) * 1.5)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    im = ax1.imshow(log_ratio, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax1.set_xlabel("channel (sorted per block)")
    ax1.set_ylabel("block")
    ax1.set_title("log2(mean |[CLS]| / mean |patch|) after norm1")
    fig.colorbar(im, ax=ax1, label="red: [CLS] larger, blue: patches larger")
    blocks = range(res["depth"])
    ax2.plot(blocks, ch["cls_dominant_fraction"], "o-", color="tab:red", label=f"[CLS] > {ch['factor']:g}x patch")
    ax2.plot(blocks, ch["patch_dominant_fraction"], "s-", color="tab:blue", label=f"patch > {ch['factor']:g}x [CLS]")
    ax2.plot(blocks, ch["specialisation_score"], "k--", label="either (specialisation score)")
    ax2.plot(blocks, ch["reference_score"], ":", color="gray", label="reference: centre patch as if [CLS]")
    ax2.set_ylabel("fraction of channels")
    ax2.set_title("Channels specialised to one token type")
    _blocks_axis(ax2, res["depth"])
    ax2.legend()
    _save(fig, path)


def plot_gains(res: dict, path: Path) -> None:
    g = res["norm1_gain"]
    fig, (ax1, ax2), blocks = _over_blocks(res)
    ax1.plot(blocks, g["cls_mean_abs"], "o-", color="tab:red", label="[CLS] group")
    ax1.plot(blocks, g["patch_mean_abs"], "s--", color="tab:blue", label="patch group")
    shared = [i for i, r in enumerate(g["routed"]) if not r]
    if shared:
        ax1.scatter(shared, [g["cls_mean_abs"][i] for i in shared], s=80, facecolors="none", edgecolors="gray",
                    label="shared norm1 (one gain)")
    ax1.set_ylabel("mean |gain| of norm1")
    ax1.set_title("norm1 gain per token group")
    _blocks_axis(ax1, res["depth"])
    ax1.legend()
    if "scatter_block" in g:
        ax2.scatter(g["scatter_patch"], g["scatter_cls"], s=8, alpha=0.6)
        top = max(max(g["scatter_patch"]), max(g["scatter_cls"]))
        ax2.plot([0, top], [0, top], "k--", lw=0.8, label="equal gains")
        ax2.set_xlabel("|gain|, patch group")
        ax2.set_ylabel("|gain|, [CLS] group")
        ax2.set_title(f"Per-channel norm1 gains, block {g['scatter_block']}")
        ax2.legend()
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, "norm1 is shared by all tokens in every block:\nno per-group gains to compare",
                 ha="center", va="center", fontsize=11)
    _save(fig, path)


def plot_high_norm(res: dict, path: Path) -> None:
    h = res["high_norm"]
    fig, (ax1, ax2), blocks = _over_blocks(res)
    ax1.plot(blocks, h["max_over_median"], "o-")
    ax1.set_ylabel("max / median patch-token norm")
    ax1.set_title("Largest patch-token norm (mean over images)")
    ax2.plot(blocks, h["outliers_per_image"], "s-", color="tab:orange")
    ax2.set_ylabel(f"patches with norm > {h['outlier_k']:g} x median")
    ax2.set_title("High-norm patch tokens per image")
    for ax in (ax1, ax2):
        _blocks_axis(ax, res["depth"])
    ax1.set_ylim(0.9, max(2.0, 1.1 * max(h["max_over_median"])))  # the ratio is >= 1; keep flat curves flat
    ax2.set_ylim(-0.05, max(1.0, 1.1 * max(h["outliers_per_image"])))
    fig.suptitle("High-norm tokens on each block's output")
    _save(fig, path)


def plot_pca(pictures: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    n = max(len(pictures), 1)
    fig = Figure(figsize=(2.4 * n, 5.2))
    axes = fig.subplots(2, n, squeeze=False)
    for j, (name, img, rgb) in enumerate(pictures):
        size = img.shape[:2]
        up = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None], size=size, mode="nearest")[0]
        axes[0, j].imshow(img)
        axes[0, j].set_title(Path(name).stem, fontsize=9)
        axes[1, j].imshow(up.permute(1, 2, 0).numpy())
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("PCA 1-3 as RGB")
    fig.suptitle("Last-layer patch features: first 3 principal components per image")
    _save(fig, path)
