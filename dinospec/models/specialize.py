"""Specialization specs: parse "which layer kinds are routed in which blocks", and convert weights.

A spec is data (``SpecConfig``): per module kind a block range, plus a grouping of token types. ``resolve_spec``
turns it into a :class:`ResolvedSpec` for a given depth; the model asks it how many groups each slot gets.
Conversion between a plain (vanilla) state dict and a routed one is a rename plus copy: ``<slot>.<p>`` becomes
``<slot>.<g>.<p>`` for every group ``g``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from dinospec.models.routed import TokenRouted
from dinospec.models.spec_ranges import (
    BLOCK_KINDS, NAMED_RANGES, TOKEN_TYPES, ResolvedSpec, SpecError, parse_block_range, resolve_groups, resolve_spec,
    vanilla_spec,
)

# the spec half lives in spec_ranges (torch-free, for config validation) and is re-exported here
__all__ = ["BLOCK_KINDS", "NAMED_RANGES", "TOKEN_TYPES", "ResolvedSpec", "SpecError", "parse_block_range",
           "resolve_groups", "resolve_spec", "vanilla_spec", "routed_slots", "plain_key", "vanilla_to_routed",
           "routed_to_vanilla"]

# ----------------------------------------------------------------------------------------------------------------
# weight conversion


def routed_slots(model: nn.Module) -> dict[str, int]:
    """Names of the model's TokenRouted slots -> number of groups."""
    return {name: len(m) for name, m in model.named_modules() if isinstance(m, TokenRouted)}


def _split_routed_key(key: str, slots: Mapping[str, int]) -> tuple[str, int, str] | None:
    """'blocks.0.norm1.1.weight' -> ('blocks.0.norm1', 1, 'weight') when blocks.0.norm1 is a routed slot."""
    parts = key.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit():
            prefix = ".".join(parts[:i])
            if prefix in slots:
                return prefix, int(parts[i]), ".".join(parts[i + 1 :])
    return None


def plain_key(key: str, slots: Mapping[str, int]) -> str:
    split = _split_routed_key(key, slots)
    return key if split is None else f"{split[0]}.{split[2]}"


def vanilla_to_routed(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a plain state dict onto `model`'s (possibly routed) keys, copying shared weights into every group."""
    slots = routed_slots(model)
    out: dict[str, Tensor] = {}
    missing = []
    for key in model.state_dict().keys():
        src = plain_key(key, slots)
        if src not in state:
            missing.append(src)
            continue
        out[key] = state[src].clone()
    if missing:
        missing = list(dict.fromkeys(missing))  # a routed slot asks for the same plain key once per group
        raise SpecError(f"vanilla state dict lacks {len(missing)} key(s), e.g. {missing[:3]}")
    extra = sorted(set(state) - {plain_key(k, slots) for k in out})
    if extra:
        raise SpecError(f"vanilla state dict has {len(extra)} key(s) the model lacks, e.g. {extra[:3]}")
    return out


def routed_to_vanilla(state: Mapping[str, Tensor], model: nn.Module, atol: float = 0.0) -> dict[str, Tensor]:
    """Collapse `model`'s routed state dict to plain keys; refuse when a slot's groups differ."""
    slots = routed_slots(model)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        split = _split_routed_key(key, slots)
        if split is None:
            out[key] = value.clone()
            continue
        prefix, g, rest = split
        target = f"{prefix}.{rest}"
        if target in out:
            if not torch.allclose(out[target], value, atol=atol, rtol=0):
                diff = (out[target].float() - value.float()).abs().max().item()
                raise SpecError(
                    f"cannot convert to vanilla: the token groups of '{prefix}' hold different '{rest}' "
                    f"(max abs difference {diff:.3g}); a specialised layer has no single shared equivalent"
                )
        else:
            out[target] = value.clone()
    return out
