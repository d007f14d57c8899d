"""The DINO / iBOT projection head: an MLP to a small bottleneck, L2-normalised, then cosine logits to prototypes.

DINOv2 wraps the prototype layer in ``torch.nn.utils.weight_norm`` with the gain set to 1. Here the prototype
layer is a plain ``nn.Linear`` whose weight rows are normalised inside forward: the same function and the same
gradients (those of weight-norm with a fixed unit gain), but one ordinary parameter ``last_layer.weight``, which
FSDP2 can shard and DCP can checkpoint without parametrisation hooks. The logits are cosine similarities in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NormalizedLinear(nn.Linear):
    """A bias-free linear layer whose weight rows are L2-normalised on every call (weight-norm, gain fixed at 1)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-6 if self.weight.dtype == torch.float16 else 1e-12
        return F.linear(x, F.normalize(self.weight, dim=1, eps=eps))


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"DINOHead needs nlayers >= 1, got {nlayers}")
    if nlayers == 1:
        return nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """(..., in_dim) features -> (..., out_dim) prototype logits; parameters mlp.{0,2,4}.*, last_layer.weight."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's init: truncated-normal MLP weights, zero biases; the prototypes keep nn.Linear's default init
        (only their directions matter). Callable again after materialising a meta-device model."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # (..., bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, eps=eps)
        return self.last_layer(x)  # (..., out_dim), cosine similarities
