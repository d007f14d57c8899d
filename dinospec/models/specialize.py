"""Specialization specs: parse "which layer kinds are routed in which blocks", and convert weights.

A spec is data (``SpecConfig``): per module kind a block range, plus a grouping of token types. ``resolve_spec``
turns it into a :class:`ResolvedSpec` for a given depth; the model asks it how many groups each slot gets.
Conversion between a plain (vanilla) state dict and a routed one is a rename plus copy: ``<slot>.<p>`` becomes
``<slot>.<g>.<p>`` for every group ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from dinospec.models.routed import TOKEN_TYPES, TokenRouted

BLOCK_KINDS = ("norm1", "qkv", "proj", "norm2", "mlp", "ls1", "ls2")
NAMED_RANGES = {"all": "0:1/1", "none": "0:0", "first_third": "0:1/3", "first_half": "0:1/2"}


class SpecError(ValueError):
    """A specialization spec that cannot be resolved, or weights that cannot be converted."""


def _bound(text: str, depth: int) -> int:
    text = text.strip()
    if "/" in text or "." in text:
        return int(round(Fraction(text) * depth))  # "1/3" of 24 blocks -> 8; of 40 -> 13
    return int(text)


def parse_block_range(text: str | int, depth: int) -> frozenset[int]:
    """Block indices named by "none", "all", "first_third", "first_half", "a:b" (ints or fractions), "i,j,k"."""
    text = str(text).strip().lower()
    text = NAMED_RANGES.get(text, text)
    a = b = 0
    try:
        if ":" in text:
            lo, hi = text.split(":", 1)
            a = _bound(lo, depth) if lo else 0
            b = _bound(hi, depth) if hi else depth
            blocks = set(range(a, b))
        elif text:
            blocks = {int(t) for t in text.split(",")}
        else:
            blocks = set()
    except (ValueError, ZeroDivisionError):
        raise SpecError(
            f"bad block range {text!r}: use none, all, first_third, first_half, 'a:b' (ints or fractions like "
            f"0:1/3) or 'i,j,k'"
        ) from None
    if a > b:  # "8:4" or "1/2:1" (= 6:1) would silently route nothing
        raise SpecError(f"block range {text!r} is reversed ({a}:{b}); a bare integer is a block index")
    bad = sorted(b for b in blocks if not 0 <= b < depth)
    if bad:
        shown = ", ".join(map(str, bad[:4])) + (", ..." if len(bad) > 4 else "")
        raise SpecError(f"block range {text!r} names blocks [{shown}] outside 0..{depth - 1}")
    return frozenset(blocks)


@dataclass(frozen=True)
class ResolvedSpec:
    """A spec made concrete for one depth."""

    group_of_type: tuple[int, int, int]  # group index of cls, reg, patch
    num_groups: int
    blocks: Mapping[str, frozenset[int]]  # kind -> routed block indices
    final_norm: bool

    def groups_for(self, kind: str, block: int) -> int:
        return self.num_groups if block in self.blocks[kind] else 1

    @property
    def is_vanilla(self) -> bool:
        return not self.final_norm and not any(self.blocks.values())


def vanilla_spec() -> ResolvedSpec:
    """The empty spec: every layer shared by all tokens."""
    return ResolvedSpec((0, 0, 0), 1, {kind: frozenset() for kind in BLOCK_KINDS}, False)


def resolve_groups(groups: Iterable[Iterable[str]]) -> tuple[tuple[int, int, int], int]:
    groups = [list(g) for g in groups]
    seen: dict[str, int] = {}
    for gi, group in enumerate(groups):
        if not group:
            raise SpecError(f"spec.groups: group {gi} is empty")
        for t in group:
            if t not in TOKEN_TYPES:
                raise SpecError(f"spec.groups: unknown token type {t!r} (valid: {', '.join(TOKEN_TYPES)})")
            if t in seen:
                raise SpecError(f"spec.groups: token type {t!r} is in two groups")
            seen[t] = gi
    missing = [t for t in TOKEN_TYPES if t not in seen]
    if missing:
        raise SpecError(f"spec.groups: token types {missing} are in no group; every type needs one")
    return tuple(seen[t] for t in TOKEN_TYPES), len(groups)  # type: ignore[return-value]


def resolve_spec(spec: Any, depth: int) -> ResolvedSpec:
    """`spec` is a SpecConfig (or any mapping with its keys)."""
    group_of_type, num_groups = resolve_groups(spec["groups"])
    blocks = {}
    for kind in BLOCK_KINDS:
        try:
            blocks[kind] = parse_block_range(spec[kind], depth)
        except SpecError as e:
            raise SpecError(f"spec.{kind}: {e}") from None
    if num_groups == 1:  # one group: nothing can differ, the model is vanilla
        blocks = {kind: frozenset() for kind in BLOCK_KINDS}
    return ResolvedSpec(group_of_type, num_groups, blocks, bool(spec["final_norm"]) and num_groups > 1)


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
