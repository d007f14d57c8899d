"""Specs, and the one owner of the backbone's parameter names: the module a spec kind names, the routed key rule,
state-dict conversion between any two specs. model_info, weights, weight_formats, ssl/optim and export ask it.

A spec (``SpecConfig``: per module kind a block range, plus a grouping of token types) resolved for a depth tells
the model how many groups each slot gets. A routed slot's parameters are named ``<slot>.<g>.<param>``
(``blocks.0.norm1.1.weight``), a shared one's ``<slot>.<param>``: conversion is a rename plus copy.
"""

from __future__ import annotations

import re
from itertools import count, takewhile
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dinospec.models.routed import TokenRouted
from dinospec.models.spec_ranges import (
    BLOCK_KINDS, NAMED_RANGES, TOKEN_TYPES, ResolvedSpec, SpecError, parse_block_range, resolve_groups, resolve_spec,
    vanilla_config, vanilla_spec,
)

# the spec half lives in spec_ranges (torch-free, for config validation) and is re-exported here
__all__ = ["BLOCK_KINDS", "NAMED_RANGES", "TOKEN_TYPES", "ResolvedSpec", "SpecError", "parse_block_range",
           "resolve_groups", "resolve_spec", "vanilla_config", "vanilla_spec", "SLOT_PATHS", "FINAL_NORM",
           "TOKEN_PARAMS", "split_routed_key", "plain_key", "param_kind", "routed_slots", "convert_state_dict",
           "vanilla_to_routed", "routed_to_vanilla"]

# ----------------------------------------------------------------------------------------------------------------
# names

SLOT_PATHS = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "mlp": "mlp", "ls1": "ls1",
              "ls2": "ls2"}
"""Spec kind (BLOCK_KINDS) -> module path inside ``blocks.<i>`` (models/vit.Block's attributes)."""
FINAL_NORM = "norm"  # the final norm's module path (routed with spec.final_norm)
TOKEN_PARAMS = ("cls_token", "register_tokens", "pos_embed", "mask_token")  # the backbone's learned tokens

_PATHS = "|".join(map(re.escape, SLOT_PATHS.values()))
_BACKBONE_SLOTS = rf"blocks\.\d+\.(?:{_PATHS})|{FINAL_NORM}"  # every slot a backbone can route
_BLOCK_SLOT = re.compile(rf"^blocks\.\d+\.({_PATHS})\.")
_KIND_OF_PATH = {path: kind for kind, path in SLOT_PATHS.items()}


def _slots_pattern(slots: Iterable[str] | None) -> str:
    """Regex alternatives for the routed slots a key may be in: `slots` (a module's routed_slots: exact for any
    module, a Block as well as a backbone), else every slot a backbone can route."""
    return _BACKBONE_SLOTS if slots is None else "|".join(map(re.escape, slots)) or "(?!)"


def split_routed_key(key: str, slots: Iterable[str] | None = None) -> tuple[str, int, str] | None:
    """'blocks.0.norm1.1.weight' -> ('blocks.0.norm1', 1, 'weight'): the `<slot>.<group>.<param>` rule; None for a
    key outside a routed slot."""
    m = re.match(rf"^({_slots_pattern(slots)})\.(\d+)\.(.+)$", key)
    return (m[1], int(m[2]), m[3]) if m else None


def plain_key(key: str, slots: Iterable[str] | None = None) -> str:
    """A routed copy's key without its group index ('blocks.0.norm1.1.weight' -> 'blocks.0.norm1.weight')."""
    split = split_routed_key(key, slots)
    return key if split is None else f"{split[0]}.{split[2]}"


def param_kind(name: str) -> str:
    """A backbone parameter's kind: a spec kind (BLOCK_KINDS), 'final_norm', 'tokens', 'patch_embed' or 'other'."""
    name = plain_key(name)
    if name in TOKEN_PARAMS:
        return "tokens"
    m = _BLOCK_SLOT.match(name)
    if m:
        return _KIND_OF_PATH[m[1]]
    return {"patch_embed": "patch_embed", FINAL_NORM: "final_norm"}.get(name.split(".")[0], "other")


def routed_slots(model: nn.Module) -> dict[str, int]:
    """Names of the model's TokenRouted slots -> number of groups."""
    return {name: len(m) for name, m in model.named_modules() if isinstance(m, TokenRouted)}


# ----------------------------------------------------------------------------------------------------------------
# conversion


def convert_state_dict(state: Mapping[str, Tensor], target_keys: Iterable[str],
                       source_groups: Sequence[int] | None = None, target_groups: Sequence[int] | None = None,
                       atol: float = 0.0, slots: Iterable[str] | None = None
                       ) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """A vanilla or routed `state` on `target_keys` (vanilla or routed): (mapped, missing plain keys, unused keys).

    A slot shared in `state` serves every group of a routed target slot (the converted model computes what the
    plain one did); a routed source slot goes group by group into a target routed with the same token groups
    (`source_groups` / `target_groups`: their group_of_type), and otherwise only when its copies agree within
    `atol` (SpecError if not). Values are not copied. `slots`: as for split_routed_key.
    """
    slots = None if slots is None else list(slots)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key in target_keys:
        split = split_routed_key(key, slots)
        plain, group = (f"{split[0]}.{split[2]}", split[1]) if split else (key, None)
        if plain in state:  # shared in the source
            out[key] = state[plain]
            used.add(plain)
            continue
        m = re.match(rf"^({_slots_pattern(slots)})\.(.+)$", plain)
        copies = list(takewhile(state.__contains__, (f"{m[1]}.{g}.{m[2]}" for g in count()))) if m else []
        if not copies:
            missing.append(plain)
            continue
        used.update(copies)
        source = _source_group(source_groups, target_groups, group, len(copies))
        out[key] = first = state[copies[0 if source is None else source]]
        if source is None and not all(torch.allclose(state[c], first, atol=atol, rtol=0) for c in copies[1:]):
            diff = max((state[c].float() - first.float()).abs().max().item() for c in copies[1:])
            raise SpecError(
                f"'{plain}' is specialised per token group in the weights (slot '{m[1]}', parameter '{m[2]}'), with "
                f"different values per group (max abs difference {diff:.3g}), but the target "
                f"{'shares it' if group is None else 'groups tokens differently'}: no exact equivalent"
            )
    return out, list(dict.fromkeys(missing)), sorted(set(state) - used)


def _source_group(source_groups: Sequence[int] | None, target_groups: Sequence[int] | None, group: int | None,
                  num_copies: int) -> int | None:
    """The source copy that serves target group `group`: the one source group all of the target group's token types
    belong to (None when unknown, when the target slot is shared, or when the types come from different copies)."""
    if source_groups is None or target_groups is None or group is None or max(source_groups) + 1 != num_copies:
        return None
    sources = {s for s, t in zip(source_groups, target_groups) if t == group}
    return sources.pop() if len(sources) == 1 else None


def vanilla_to_routed(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Map a plain state dict onto `model`'s (possibly routed) keys, copying shared weights into every group."""
    out, missing, extra = convert_state_dict(state, model.state_dict(), slots=routed_slots(model))
    if missing:
        raise SpecError(f"vanilla state dict lacks {len(missing)} key(s), e.g. {missing[:3]}")
    if extra:
        raise SpecError(f"vanilla state dict has {len(extra)} key(s) the model lacks, e.g. {extra[:3]}")
    return {key: value.clone() for key, value in out.items()}


def routed_to_vanilla(state: Mapping[str, Tensor], model: nn.Module, atol: float = 0.0) -> dict[str, Tensor]:
    """Collapse `model`'s routed state dict to plain keys; refuse when a slot's groups differ by more than atol."""
    slots = routed_slots(model)
    target = dict.fromkeys(plain_key(key, slots) for key in model.state_dict())
    out, _, _ = convert_state_dict(state, target, atol=atol, slots=slots)
    return {key: value.clone() for key, value in out.items()}
