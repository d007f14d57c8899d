"""The one mechanism of token-type specialization: a layer with one parameter set per token group.

A sequence is laid out as ``[cls | registers | patches]``. A :class:`Routing` says which contiguous token segment
belongs to which group; a :class:`TokenRouted` layer holds one copy of its layer per group and applies copy ``g``
to the segments of group ``g`` only, so every token passes through exactly one copy and the FLOPs are those of the
plain layer. Layers that are not specialised stay plain modules; :func:`route` calls either kind, so blocks never
branch on token types.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

TOKEN_TYPES = ("cls", "reg", "patch")


@dataclass(frozen=True)
class Routing:
    """Contiguous token segments ``(start, stop, group)`` covering a sequence, adjacent same-group runs merged."""

    segments: tuple[tuple[int, int, int], ...]

    @staticmethod
    def build(group_of_type: Sequence[int], num_reg: int, num_patches: int) -> "Routing":
        """`group_of_type[i]` is the group of TOKEN_TYPES[i]; the layout is [1 cls | num_reg | num_patches]."""
        lengths = (1, num_reg, num_patches)
        segments: list[list[int]] = []
        start = 0
        for group, length in zip(group_of_type, lengths):
            if length == 0:
                continue
            if segments and segments[-1][2] == group:
                segments[-1][1] += length
            else:
                segments.append([start, start + length, group])
            start += length
        return Routing(tuple(tuple(s) for s in segments))  # type: ignore[misc]

    def group_index(self, device: torch.device | None = None) -> Tensor:
        """(N,) long tensor: the group of every token position."""
        return torch.cat([torch.full((b - a,), g, dtype=torch.long, device=device) for a, b, g in self.segments])


class TokenRouted(nn.ModuleList):
    """One copy of a layer per token group; copy ``g`` sees only the tokens of group ``g``.

    As a ModuleList its parameters are named ``<slot>.<g>.<param>``, so the shared layer's names gain one group
    index and conversion to and from the plain layer is a rename. The copies are built as deep copies of one layer;
    the model's weight init then draws each copy afresh, and conversion from a plain layer copies its weights into
    every copy (the converted model computes exactly what the plain one did).
    """

    def __init__(self, layer: nn.Module, num_groups: int):
        if num_groups < 2:
            raise ValueError("TokenRouted needs at least two groups; keep the plain layer otherwise")
        super().__init__([layer] + [copy.deepcopy(layer) for _ in range(num_groups - 1)])

    def forward(self, x: Tensor, routing: Routing) -> Tensor:  # type: ignore[override]
        # x: (B, N, C) -> (B, N, C'); each segment through its group's copy, then re-joined in sequence order
        parts = [self[g](x[:, a:b]) for a, b, g in routing.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def route(layer: nn.Module, x: Tensor, routing: Routing) -> Tensor:
    """Apply a slot that is either a plain layer (all tokens share it) or a TokenRouted one."""
    return layer(x, routing) if isinstance(layer, TokenRouted) else layer(x)


def make_slot(make_layer: Callable[[], nn.Module], num_groups: int) -> nn.Module:
    """A plain layer when num_groups is 1, else a TokenRouted holding num_groups copies of it."""
    layer = make_layer()
    return layer if num_groups == 1 else TokenRouted(layer, num_groups)
