"""Axial rotary position embedding (RoPE) for the patch tokens of a ViT, as DINOv3 uses it.

Position enters attention only: each head's q and k of a patch token are rotated by angles that depend on the
patch's (row, column) coordinate, so attention scores depend on relative positions, and nothing is learned or
interpolated: any image size and aspect ratio gets its own table. Prefix tokens ([CLS], registers) are not rotated.

Per head of dimension D there are D/4 periods; a patch at normalised coordinates (y, x) gets the D/2 angles
``[2 pi y / period_j ..., 2 pi x / period_j ...]``, repeated once to D ("rotate-half" pairing: channel d and
d + D/2 share an angle). Coordinates are patch centres mapped into (-1, 1); in training they can be randomly
shifted, jittered per axis and rescaled (one draw per forward call, from torch's global generator so that
resuming restores the draws with the rest of the RNG state).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from dinospec.models.rope_config import check_rope_settings


class RopeTables:
    """sin and cos, each (num_patches, head_dim) float32: the rotation of every patch token, shared by all heads.

    A plain class on purpose, not a tuple or dataclass: FSDP2's mixed precision casts every floating tensor it finds
    in a block's inputs (through tuples, dicts and dataclasses) to bf16, and RoPE angles want float32 (as DINOv3
    keeps them); a plain object passes through untouched.
    """

    __slots__ = ("sin", "cos")

    def __init__(self, sin: Tensor, cos: Tensor):
        self.sin, self.cos = sin, cos

    def __iter__(self) -> Iterator[Tensor]:  # sin, cos = tables
        return iter((self.sin, self.cos))

    @property
    def num_patches(self) -> int:
        return self.sin.shape[0]


def rope_periods(head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, device: torch.device | None = None) -> Tensor:
    """The head_dim/4 periods, float32: ``base ** (j / (head_dim/4))``, or, when min_period and max_period are
    given (they take precedence over the base), geometric from min_period to max_period, both ends included."""
    check_rope_settings(head_dim, base, min_period, max_period)
    n = head_dim // 4
    if min_period is not None:
        exponents = torch.linspace(0, 1, n, dtype=torch.float32, device=device)
        return min_period * (max_period / min_period) ** exponents
    exponents = 2 * torch.arange(n, dtype=torch.float32, device=device) / (head_dim // 2)
    return base ** exponents


class RopePositions(nn.Module):
    """Builds the sin/cos tables of an h x w patch grid. No parameters and no buffers: the periods follow from the
    settings, so the module behaves the same on any device (meta included) and adds nothing to a state dict."""

    def __init__(self, head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                 max_period: float | None = None, normalize_coords: str = "separate",
                 shift_coords: float | None = None, jitter_coords: float | None = None,
                 rescale_coords: float | None = None):
        super().__init__()
        check_rope_settings(head_dim, base, min_period, max_period, normalize_coords, shift_coords, jitter_coords,
                            rescale_coords)  # now, not at the first forward
        self.head_dim, self.base, self.min_period, self.max_period = head_dim, base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, base={self.base}, periods=({self.min_period}, {self.max_period}), "
                f"normalize_coords={self.normalize_coords}, shift={self.shift_coords}, "
                f"jitter={self.jitter_coords}, rescale={self.rescale_coords}")

    def coords(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
        """(h*w, 2) float32 (y, x) of the patch centres in row-major order, normalised into (-1, 1)."""
        if self.normalize_coords == "separate":
            dh, dw = h, w
        else:
            dh = dw = max(h, w) if self.normalize_coords == "max" else min(h, w)
        ys = 2 * (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / dh - 1
        xs = 2 * (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / dw - 1
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)

    def augment(self, coords: Tensor) -> Tensor:
        """Training-time coordinate augmentation: shift (uniform per axis in [-s, s]), jitter (log-uniform per axis
        in [1/j, j]), rescale (one log-uniform factor in [1/r, r] for both axes)."""
        device = coords.device
        if self.shift_coords:
            coords = coords + torch.empty(2, device=device).uniform_(-self.shift_coords, self.shift_coords)
        if self.jitter_coords and self.jitter_coords > 1:
            log_j = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, device=device).uniform_(-log_j, log_j).exp()
        if self.rescale_coords and self.rescale_coords > 1:
            log_r = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
        return coords

    def forward(self, h: int, w: int, device: torch.device | None = None) -> RopeTables:
        """(sin, cos) for an h x w patch grid; augmented coordinates in training mode."""
        coords = self.coords(h, w, device)
        if self.training:
            coords = self.augment(coords)
        periods = rope_periods(self.head_dim, self.base, self.min_period, self.max_period, device)
        angles = 2 * math.pi * coords[:, :, None] / periods  # (N, 2, D/4)
        angles = angles.flatten(1).repeat(1, 2)  # (N, D): [y angles | x angles] twice
        return RopeTables(angles.sin(), angles.cos())


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """Rotate the last num_patches positions of x (B, H, N, D) by `tables`; the N - num_patches prefix tokens before
    them are left as they are. Computed in float32, returned in x's dtype."""
    sin, cos = tables
    prefix = x.shape[-2] - tables.num_patches
    patches = x[..., prefix:, :].float()
    first, second = patches.chunk(2, dim=-1)
    rotated = patches * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([x[..., :prefix, :], rotated.to(x.dtype)], dim=-2)
