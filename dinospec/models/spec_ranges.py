"""Specialization specs as data, without torch: block ranges, token groups, and the spec resolved for a depth.

Torch-free on purpose: `dinospec.config.validate` resolves every spec before a command imports torch, so a bad
range is refused in well under a second. The model-side half (routed slots, weight conversion) is
dinospec/models/specialize.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterable, Mapping

TOKEN_TYPES = ("cls", "reg", "patch")
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


def vanilla_config(spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`spec` (a SpecConfig or mapping; default: every kind "none") with one token group: every layer shared."""
    return {**({kind: "none" for kind in BLOCK_KINDS} if spec is None else spec), "groups": [list(TOKEN_TYPES)],
            "final_norm": False}


def explicit_config(spec: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """`spec` with every block range written as its block indices ("0,1,2" or "none") for `depth` blocks: what an
    export stores, so its meaning does not depend on the range parser of the version that loads it."""
    resolved = resolve_spec(spec, depth)
    ranges = {kind: ",".join(map(str, sorted(blocks))) or "none" for kind, blocks in resolved.blocks.items()}
    return {**ranges, "groups": [list(g) for g in spec["groups"]], "final_norm": resolved.final_norm}


def vanilla_spec() -> ResolvedSpec:
    """The empty spec, resolved: every layer shared by all tokens."""
    return resolve_spec(vanilla_config(), depth=1)


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
