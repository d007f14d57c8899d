"""iBOT block-wise masks for the global crops, drawn per sample from that sample's own random stream.

Block shapes follow BEiT / DINOv2's MaskingGenerator: rectangles of area >= `min_num_patches` and aspect ratio in
[0.3, 1/0.3], added until the target number of patches is masked, each block at most `max_num_patches` (DINOv2: half
the grid).

Which crops are masked, and how much: DINOv2's collate masks exactly int(p * 2b) of a batch's 2b global crops, with
ratios stratified over [min, max] (one draw in each of the equal sub-intervals) and shuffled over the crops. Seen
from one crop, that is: masked with probability p, ratio uniform in [min, max]. Here each global crop draws exactly
that from its sample's (seed, pass, index) stream, so a sample's masks do not depend on the batch it lands in or on
the number of ranks; the per-batch count of masked crops is Binomial(2b, p) instead of fixed.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


class BlockMaskGenerator:
    """Masks of shape (height, width) made of random rectangles (DINOv2's MaskingGenerator semantics)."""

    def __init__(self, grid: tuple[int, int], max_num_patches: int | None = None, min_num_patches: int = 4,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches // 2 if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        """Try (10 times) to mask one new rectangle adding at most `budget` patches; returns patches added."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top:top + h, left:left + w]  # a view: writing to it writes the mask
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: random.Random) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask


class SampleMasker:
    """The iBOT masks of one sample's global crops: each crop masked with probability `probability`, at a ratio
    uniform in `ratio_min_max` of the patch grid. Returns (num_crops, height * width) bool."""

    def __init__(self, grid: tuple[int, int], probability: float, ratio_min_max: tuple[float, float],
                 num_crops: int = 2):
        self.generator = BlockMaskGenerator(grid)
        self.probability = probability
        self.ratio_min, self.ratio_max = ratio_min_max
        self.num_crops = num_crops

    @property
    def num_patches(self) -> int:
        return self.generator.num_patches

    def __call__(self, rng: random.Random) -> torch.Tensor:
        masks = np.zeros((self.num_crops, self.num_patches), dtype=bool)
        for crop in range(self.num_crops):
            crop_rng = random.Random(rng.getrandbits(64))  # one stream per crop: crops never shift each other
            masked = crop_rng.random() < self.probability
            ratio = crop_rng.uniform(self.ratio_min, self.ratio_max)
            if masked:
                target = int(self.num_patches * ratio)
                masks[crop] = self.generator(target, crop_rng).reshape(-1)
        return torch.from_numpy(masks)
