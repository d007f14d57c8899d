"""DINOv2's multi-crop augmentation (DataAugmentationDINO), driven by an explicit per-sample random stream.

Per view, in DINOv2's order: random resized crop (bicubic, antialiased) and horizontal flip 0.5; colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in a random order) with p 0.8; grayscale p 0.2; Gaussian
blur (9 taps, sigma in [0.1, 2] px, `crops.blur_sigma`); solarize p 0.2 on the second global view; ImageNet normalisation.

Blur probabilities (global-1, global-2, local):
- "intended" (default): 1.0, 0.1, 0.5, as the DINOv2 paper and config comments describe;
- "upstream": 0.0, 0.9, 0.5, what dinov2/dinov3's code actually does: its GaussianBlur(p) passes p to RandomApply
  as the probability of *keeping* the image, so GaussianBlur(p=1.0) never blurs global-1 and GaussianBlur(p=0.1)
  blurs global-2 90% of the time (dinov2 PR #411, dinov3 #286). Locals are unaffected (p = 0.5 either way).

Speed (see scripts/bench_data.py): each view is cropped first on the uint8 image (torchvision.transforms.v2's
native uint8 bicubic kernel, ~3x faster than PIL's), then every later op runs once on the small float crop; the
blur is separable (2 x 9 taps instead of torchvision's 81-tap 2D kernel); a grayscale view carries one channel
until normalisation. The ops compute torchvision's float formulas (tests compare them), without the rounding to
uint8 that PIL-based pipelines do between ops.

Determinism: every random draw comes from the `random.Random` passed in, which the loader seeds from
(seed, pass, index) only; reductions use numpy's fixed summation order, so the result is bitwise independent of
the worker, process and torch thread count.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_PROBABILITIES = {"intended": (1.0, 0.1, 0.5), "upstream": (0.0, 0.9, 0.5)}  # global-1, global-2, local
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128 / 255
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
JITTER_P, GRAYSCALE_P, SOLARIZE_P, HFLIP_P = 0.8, 0.2, 0.2, 0.5


# ---------------------------------------------------------------------------------------------------------------
# ops on float images in [0, 1], shape (C, H, W)


def sample_crop_box(rng: random.Random, height: int, width: int, scale: Sequence[float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop: RandomResizedCrop's algorithm (10 tries at a random area
    fraction and log-uniform aspect ratio, then a central crop of the clamped ratio)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    image_ratio = width / height
    if image_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def grayscale(x: Tensor) -> Tensor:
    """(3, H, W) -> (1, H, W) luma."""
    r, g, b = x.unbind(-3)
    return (r * GREY_WEIGHTS[0]).add_(g, alpha=GREY_WEIGHTS[1]).add_(b, alpha=GREY_WEIGHTS[2]).unsqueeze(-3)


def adjust_brightness(x: Tensor, factor: float) -> Tensor:
    return (x * factor).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: float) -> Tensor:
    grey = grayscale(x) if x.shape[-3] == 3 else x
    mean = float(grey.numpy().mean(dtype=np.float64))  # numpy's pairwise sum: same bits for any thread count
    return (x * factor).add_((1 - factor) * mean).clamp_(0, 1)


def adjust_saturation(x: Tensor, factor: float) -> Tensor:
    if x.shape[-3] == 1:
        return x
    return torch.lerp(grayscale(x).expand_as(x), x, factor).clamp_(0, 1)


_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def adjust_hue(x: Tensor, shift: float) -> Tensor:
    """Rotate the HSV hue by `shift` turns without leaving RGB: with max M, min m, chroma C = M - m and the hue h
    in sectors [0, 6), channel n of the result is M - C * clamp(min(k, 4 - k), 0, 1), k = (offset_n + h) mod 6."""
    if x.shape[-3] == 1:
        return x
    top, argmax = x.max(-3, keepdim=True)  # (1, H, W)
    chroma = top - x.amin(-3, keepdim=True)
    diff = x.roll(-1, -3) - x.roll(-2, -3)  # (3, H, W): [g - b, b - r, r - g]
    hue = diff.gather(-3, argmax).div_(chroma.clamp_min(1e-12))  # (1, H, W) in [-1, 1]; 0 where chroma == 0
    hue.add_(argmax, alpha=2.0).add_(6.0 * shift)  # sector of the max channel: red 0, green 2, blue 4
    k = torch.remainder(hue + _HUE_OFFSETS, 6.0)  # (3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return top - chroma * ramp


def gaussian_kernel(sigma: float, size: int = BLUR_KERNEL_SIZE) -> list[float]:
    half = (size - 1) / 2
    weights = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(size)]
    total = sum(weights)
    return [w / total for w in weights]


def gaussian_blur(x: Tensor, sigma: float, size: int = BLUR_KERNEL_SIZE) -> Tensor:
    """torchvision's GaussianBlur (reflect padding) as two 1-D passes of shifted adds: the symmetric kernel
    needs (size+1)/2 multiplies per pass, far cheaper on CPU than a depthwise conv2d."""
    kernel = gaussian_kernel(sigma, size)
    half = size // 2
    height, width = x.shape[-2:]
    padded = F.pad(x.unsqueeze(0), (half, half, half, half), mode="reflect").squeeze(0)  # (C, H+2h, W+2h)
    rows = padded[..., half:half + width] * kernel[half]
    for i in range(half):
        rows.add_(padded[..., i:i + width] + padded[..., size - 1 - i:size - 1 - i + width], alpha=kernel[i])
    out = rows[..., half:half + height, :] * kernel[half]  # (C, H+2h, W) -> (C, H, W)
    for i in range(half):
        out.add_(rows[..., i:i + height, :] + rows[..., size - 1 - i:size - 1 - i + height, :], alpha=kernel[i])
    return out


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run a block on one intra-op thread. Per-view work is many small ops: extra threads only add wake-up latency
    (measured: ~20 ms per parallel op on a busy 2-core machine, 27x slower batches). DataLoader workers already
    run one thread; this matters when augmenting in the main process (num_workers=0)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------


class MultiCropAugmentation:
    """Image -> (global views (2, 3, G, G), local views (L, 3, l, l)), float32, ImageNet-normalised."""

    def __init__(self, global_crops_size: int = 224, global_crops_scale: Sequence[float] = (0.32, 1.0),
                 local_crops_number: int = 8, local_crops_size: int = 96,
                 local_crops_scale: Sequence[float] = (0.05, 0.32), blur_probabilities: str = "intended",
                 blur_sigma: Sequence[float] = BLUR_SIGMA):
        if blur_probabilities not in BLUR_PROBABILITIES:
            raise ValueError(f"blur_probabilities={blur_probabilities!r}: expected one of "
                             f"{sorted(BLUR_PROBABILITIES)}")
        self.global_crops_size = global_crops_size
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_number = local_crops_number
        self.local_crops_size = local_crops_size
        self.local_crops_scale = tuple(local_crops_scale)
        self.blur_probabilities = BLUR_PROBABILITIES[blur_probabilities]
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma={list(blur_sigma)}: expected [low, high] with 0 < low <= high")
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self._norm_scale = 1.0 / std
        self._norm_shift = -torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / std

    @classmethod
    def from_config(cls, crops) -> MultiCropAugmentation:
        """From the run config's `crops` section."""
        return cls(crops.global_crops_size, list(crops.global_crops_scale), crops.local_crops_number,
                   crops.local_crops_size, list(crops.local_crops_scale), crops.blur_probabilities,
                   list(crops.blur_sigma))

    def __call__(self, image: Image.Image, rng: random.Random) -> tuple[Tensor, Tensor]:
        with one_torch_thread():
            return self._views(image, rng)

    def _views(self, image: Image.Image, rng: random.Random) -> tuple[Tensor, Tensor]:
        pixels = TF.pil_to_tensor(image)  # (3, H, W) uint8, a view of the decoded HWC buffer
        blur_g1, blur_g2, blur_local = self.blur_probabilities
        g, l_size = self.global_crops_size, self.local_crops_size
        global_views = torch.stack([
            self._view(pixels, rng, g, self.global_crops_scale, blur_g1, solarize_p=0.0),
            self._view(pixels, rng, g, self.global_crops_scale, blur_g2, solarize_p=SOLARIZE_P),
        ])
        local_views = [self._view(pixels, rng, l_size, self.local_crops_scale, blur_local, solarize_p=0.0)
                       for _ in range(self.local_crops_number)]
        local = torch.stack(local_views) if local_views else torch.empty(0, 3, l_size, l_size)
        return global_views, local

    def _view(self, pixels: Tensor, rng: random.Random, size: int, scale: tuple[float, float], blur_p: float,
              solarize_p: float) -> Tensor:
        top, left, h, w = sample_crop_box(rng, pixels.shape[-2], pixels.shape[-1], scale)
        crop = TF.resized_crop(pixels, top, left, h, w, [size, size], TF.InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < HFLIP_P:
            crop = crop.flip(-1)
        x = crop.float().div_(255.0)  # (3, size, size) in [0, 1]
        if rng.random() < JITTER_P:
            x = self._color_jitter(x, rng)
        if rng.random() < GRAYSCALE_P:
            x = grayscale(x)  # (1, size, size) until normalisation
        if rng.random() < blur_p:
            x = gaussian_blur(x, rng.uniform(*self.blur_sigma))
        if solarize_p and rng.random() < solarize_p:
            x = solarize(x)
        return torch.addcmul(self._norm_shift, x, self._norm_scale)  # (3, size, size), grey broadcast to 3

    @staticmethod
    def _color_jitter(x: Tensor, rng: random.Random) -> Tensor:
        order = list(range(4))
        rng.shuffle(order)
        b, c, s, h = JITTER["brightness"], JITTER["contrast"], JITTER["saturation"], JITTER["hue"]
        factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s),
                   rng.uniform(-h, h))
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for op_index in order:
            x = ops[op_index](x, factors[op_index])
        return x
