"""The one mechanism of token-type specialization: a layer with one parameter set per token group.

A sequence is laid out as ``[cls | registers | patches]`` (:class:`TokenLayout`, held by the backbone). A :class:`Routing` says which contiguous token segment
belongs to which group; a :class:`TokenRouted` layer holds one copy of its layer per group and applies copy ``g``
to the segments of group ``g`` only, so every token passes through exactly one copy and the FLOPs are those of the
plain layer. Layers that are not specialised stay plain modules; :func:`route` calls either kind, so blocks never
branch on token types.

Two ways to run a routed layer, same result: a layer that only scales / shifts channels with its parameters
(LayerNorm's affine, LayerScale) defines ``forward_per_token(x, params)`` and gets each parameter as an ``(N, ...)``
tensor holding, per token, its group's copy: one pass over the whole sequence, no split and no concatenation of
activations (those copies cost as much as the cheap layer itself). A Linear runs one GEMM per segment into one
output and keeps only its input for backward, as nn.Linear does. Any other layer (an MLP) runs once per segment on
a split view and the outputs are concatenated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class TokenLayout:
    """Where each token type sits in a sequence ``[1 cls | num_registers | patches]`` (the one place that knows)."""

    num_registers: int

    @property
    def num_prefix(self) -> int:  # [CLS] and the registers (DINOv3's storage tokens)
        return 1 + self.num_registers

    def lengths(self, num_patches: int) -> tuple[int, int, int]:
        """Tokens of each type (TOKEN_TYPES order: cls, reg, patch)."""
        return 1, self.num_registers, num_patches

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, ...) -> [CLS] (B, ...), registers (B, R, ...), patches (B, N - 1 - R, ...): views, no copy."""
        return x[:, 0], x[:, 1 : self.num_prefix], x[:, self.num_prefix :]


@dataclass(frozen=True)
class Routing:
    """Contiguous token segments ``(start, stop, group)`` covering a sequence, adjacent same-group runs merged."""

    segments: tuple[tuple[int, int, int], ...]

    @staticmethod
    def from_lengths(group_of_type: Sequence[int], lengths: Sequence[int]) -> "Routing":
        """The layout [lengths[0] cls | lengths[1] registers | lengths[2] patches] (several sequences packed
        type-major have more than one [CLS])."""
        segments: list[list[int]] = []
        start = 0
        for group, length in zip(group_of_type, lengths):
            length = int(length)  # plain ints even from a traced shape (fvcore's jit trace)
            if length == 0:
                continue
            if segments and segments[-1][2] == group:
                segments[-1][1] += length
            else:
                segments.append([start, start + length, group])
            start += length
        return Routing(tuple(tuple(s) for s in segments))  # type: ignore[misc]


class SegmentedLinear(torch.autograd.Function):
    """A Linear with its own (weight, bias) per token segment of x (B, N, C), all written into one output.

    Autograd through split + linear + cat keeps a contiguous copy of each segment's input (a segment of a (B, N, C)
    tensor cannot be folded into GEMM rows without one): one extra activation per routed Linear. This keeps only x
    and the weights, as nn.Linear does; the per-segment copies live inside forward and backward. Under autocast the
    GEMMs run in autocast's dtype (the output's); backward casts like autocast's own casts would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, segments: tuple[tuple[int, int, int], ...], *params: Tensor | None) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        out: Tensor | None = None
        for (a, b, _), weight, bias in zip(segments, weights, biases):
            part = F.linear(x[:, a:b], weight, bias)
            if out is None:
                out = part.new_empty(*x.shape[:-1], part.shape[-1])
            out[:, a:b] = part
        ctx.segments = segments
        ctx.save_for_backward(x, *weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grads: list[Tensor | None] = []
        for i, ((a, b, _), weight) in enumerate(zip(ctx.segments, weights)):
            g = grad[:, a:b]
            if grad_x is not None:
                grad_x[:, a:b] = g.matmul(weight.to(g.dtype))
            g2d = g.reshape(-1, g.shape[-1])
            need_weight, need_bias = ctx.needs_input_grad[2 + 2 * i], ctx.needs_input_grad[3 + 2 * i]
            x2d = x[:, a:b].reshape(-1, x.shape[-1]).to(g.dtype) if need_weight else None
            grads.append(g2d.t().matmul(x2d).to(weight.dtype) if need_weight else None)
            grads.append(g2d.sum(0).to(weight.dtype) if need_bias else None)
        return (grad_x, None, *grads)


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
        # x: (B, N, C) -> (B, N, C')
        if len(routing.segments) == 1:
            return self[routing.segments[0][2]](x)
        if hasattr(self[0], "forward_per_token"):
            return self[0].forward_per_token(x, self.per_token(routing))
        if type(self[0]) is nn.Linear:
            params = [t for _, _, g in routing.segments for t in (self[g].weight, self[g].bias)]
            return SegmentedLinear.apply(x, routing.segments, *params)
        # one split (its backward is one cat; a slice per segment would allocate a full-size zero grad per segment)
        sizes = [b - a for a, b, _ in routing.segments]
        parts = [self[g](xs) for xs, (_, _, g) in zip(x.split(sizes, dim=1), routing.segments)]
        return torch.cat(parts, dim=1)

    def per_token(self, routing: Routing) -> dict[str, Tensor]:
        """Each direct parameter of the layer as an (N, ...) tensor: row n is token n's group's copy. Small (no batch
        dimension); its backward sums a copy's gradient over that copy's tokens only."""
        return {name: torch.cat([getattr(self[g], name).expand(b - a, *param.shape) for a, b, g in routing.segments])
                for name, param in self[0].named_parameters(recurse=False)}


def route(layer: nn.Module, x: Tensor, routing: Routing) -> Tensor:
    """Apply a slot that is either a plain layer (all tokens share it) or a TokenRouted one."""
    return layer(x, routing) if isinstance(layer, TokenRouted) else layer(x)


def make_slot(make_layer: Callable[[], nn.Module], num_groups: int) -> nn.Module:
    """A plain layer when num_groups is 1, else a TokenRouted holding num_groups copies of it."""
    layer = make_layer()
    return layer if num_groups == 1 else TokenRouted(layer, num_groups)
