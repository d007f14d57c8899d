"""Backbone state-dict formats made into dinospec's keys, and what each checkpoint family needs from a model.

Pure transformations of state dicts (no files, no model): DINOv2's keys are dinospec's vanilla keys once unwrapped
(training checkpoints nest the backbone under ``teacher`` / ``model`` and ``backbone.`` prefixes; FSDP
``block_chunks`` add a chunk index); DINOv3's differ by a few names and buffers (:func:`convert_dinov3_state_dict`).
The family (DINOv2 with or without registers, DINOv3) is read from the keys and comes with the student.* settings
its weights were trained with (:class:`ImportedWeights`). dinospec/weights.py reads files and fits the result onto a
model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor

from dinospec.models.rope import rope_periods
from dinospec.models.specialize import TOKEN_PARAMS, plain_key, split_routed_key
from dinospec.models.vit import ARCHS

_VANILLA_KEY = re.compile(  # DINOv2's keys: dinospec's vanilla ones
    rf"^({'|'.join(TOKEN_PARAMS)}|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")  # DINOv2 block_chunks: blocks.<chunk>.<global index>.*


class WeightsError(ValueError):
    """Weights that cannot be read, or that do not fit the model they are meant for."""


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 key format -> dinospec vanilla


def _unwrap_backbone(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone inside what DINOv2 saves: a bare state dict, teacher_checkpoint.pth or a training model_*.pth."""
    state: Mapping[str, Any] = ckpt
    for wrapper in ("teacher", "model", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    for prefix in ("teacher.backbone.", "backbone."):  # the teacher is the model DINOv2 evaluates and releases
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def canonical_keys(state: Mapping[str, Any], allow_routed: bool) -> dict[str, Tensor]:
    """Flatten block chunks, drop classifier heads, and refuse keys that are not a backbone's."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("head.") or key == "head":
            continue
        if not isinstance(value, Tensor):
            raise WeightsError(f"'{key}' holds a {type(value).__name__}, not a tensor: not a backbone state dict")
        out[_CHUNKED_BLOCK.sub(r"blocks.\1.", key)] = value
    unknown = [k for k in out if not _VANILLA_KEY.match(k) and not (allow_routed and split_routed_key(k))]
    if unknown:
        hint = ""
        if "reg_token" in out:
            hint = " (this looks like timm's key format; dinospec reads DINOv2's format and its own exports)"
        raise WeightsError(f"{len(unknown)} key(s) are not DINOv2/dinospec backbone keys, e.g. {unknown[:4]}{hint}")
    if "cls_token" not in out or "patch_embed.proj.weight" not in out:
        raise WeightsError(f"no ViT backbone found (no cls_token / patch_embed); keys: {list(state)[:6]}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# DINOv3 key format -> dinospec

DINOV3_NORM_GROUPS = (0, 0, 1)
"""An untied DINOv3 final norm as a routed dinospec one: group 0 = [cls, registers] (cls_norm), 1 = patches (norm);
dinospec's spec=final_norm preset."""
_DINOV3_ONLY = re.compile(r"^(storage_tokens|rope_embed\.periods|(local_)?cls_norm\.(weight|bias)"
                          r"|blocks\.\d+\.attn\.qkv\.bias_mask)$")


def is_dinov3_state_dict(state: Mapping[str, Any]) -> bool:
    """DINOv3's keys: storage tokens, the RoPE periods buffer, K-bias masks, untied class norms."""
    return any(_DINOV3_ONLY.match(k) for k in state)


def convert_dinov3_state_dict(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], tuple[int, int, int] | None,
                                                                  Tensor | None]:
    """DINOv3 backbone weights -> (dinospec keys, group_of_type of the routed final norm or None, RoPE periods).

    - ``storage_tokens`` are dinospec's ``register_tokens`` (same place: after [CLS], before the patches).
    - ``attn.qkv.bias_mask`` (0 on the K third: keys get no bias) is applied to ``attn.qkv.bias`` and dropped; the
      K bias is then stored as zeros, which computes exactly what the masked bias computed.
    - ``cls_norm`` (untie_cls_and_patch_norms: the final norm of [CLS] and storage tokens) and ``norm`` (patches)
      become the routed final norm ``norm.0`` / ``norm.1`` of groups [[cls, reg], [patch]].
    - ``local_cls_norm`` is dropped: DINOv3 uses it only in training, for the local crops' class tokens; no output
      of the backbone depends on it.
    - ``rope_embed.periods`` is a buffer derived from the RoPE settings: returned (to check the model's settings),
      not loaded.
    """
    state = _unwrap_backbone(state)
    out: dict[str, Tensor] = {}
    periods = state.get("rope_embed.periods")
    for key, value in state.items():
        if key in ("rope_embed.periods",) or key.endswith(".attn.qkv.bias_mask") or key.startswith("local_cls_norm."):
            continue
        if key == "storage_tokens":
            if value.shape[1]:
                out["register_tokens"] = value
            continue
        out[key] = value
    for key, mask in state.items():
        if key.endswith(".attn.qkv.bias_mask"):
            bias_key = key[: -len("_mask")]
            if bias_key in out:
                out[bias_key] = out[bias_key] * mask.to(out[bias_key].dtype)
    groups = None
    if "cls_norm.weight" in out:
        for name in ("weight", "bias"):
            if f"cls_norm.{name}" in out:
                out[f"norm.0.{name}"] = out.pop(f"cls_norm.{name}")
                out[f"norm.1.{name}"] = out.pop(f"norm.{name}")
        groups = DINOV3_NORM_GROUPS
    return canonical_keys(out, allow_routed=True), groups, periods


def dinov3_rope_settings(periods: Tensor, head_dim: int | None = None) -> dict[str, Any]:
    """student.rope_* settings that give these periods: a base (base ** (j / n)), else min/max periods."""
    n = periods.numel()
    p = periods.double()
    if head_dim is not None and head_dim != 4 * n:
        raise WeightsError(f"RoPE periods buffer has {n} entries, head dim {head_dim} needs {head_dim // 4}")
    raw_base = float(p[-1] ** (n / (n - 1))) if n > 1 else None
    candidates = [{"rope_base": float(round(raw_base, digits)), "rope_min_period": None, "rope_max_period": None}
                  for digits in range(7) if raw_base is not None]  # the shortest base that gives these periods
    candidates.append({"rope_base": None, "rope_min_period": float(p[0]), "rope_max_period": float(p[-1])})
    for c in candidates:
        derived = rope_periods(4 * n, c["rope_base"], c["rope_min_period"], c["rope_max_period"]).double()
        if torch.allclose(derived, p, rtol=1e-6, atol=0):
            return c
    raise WeightsError(f"RoPE periods {periods.tolist()[:4]}... are neither base ** (j / {n}) nor geometric "
                       f"between two periods: not a RoPE dinospec can rebuild")


# ----------------------------------------------------------------------------------------------------------------
# families: what the weights need from the model


@dataclass
class ImportedWeights:
    """A backbone state in dinospec keys and what it was trained with.

    `settings` are student.* values the model must have to compute what the weights computed where they came from
    (DINOv2 with registers: antialiased pos_embed interpolation without offset; DINOv3: RoPE, LayerNorm eps 1e-5).
    """

    state: dict[str, Tensor]
    groups: tuple[int, int, int] | None  # group_of_type of the routed slots, when known
    family: str  # dinospec | dinov2 | dinov2_reg | dinov3
    settings: dict[str, Any] = field(default_factory=dict)
    head_dim: int | None = None  # known for DINOv3 (from the RoPE periods); DINOv2's releases all use 64


DINOV2_INTERPOLATION = {  # DINOv2's hub: models with registers interpolate with antialias and no offset
    "dinov2": {"interpolate_offset": 0.1, "interpolate_antialias": False},
    "dinov2_reg": {"interpolate_offset": 0.0, "interpolate_antialias": True},
}
DINOV3_SETTINGS = {"pos_embed": "rope", "rope_normalize_coords": "separate", "norm_eps": 1e-5}
"""What DINOv3's released backbones use (besides the periods, read from the weights)."""


def imported_dinov2(state: dict[str, Tensor]) -> ImportedWeights:
    family = "dinov2_reg" if "register_tokens" in state else "dinov2"
    return ImportedWeights(state, None, family, dict(DINOV2_INTERPOLATION[family]))


def imported_dinov3(raw: Mapping[str, Any]) -> ImportedWeights:
    state, groups, periods = convert_dinov3_state_dict(raw)
    settings: dict[str, Any] = dict(DINOV3_SETTINGS)
    if periods is not None:
        settings.update(dinov3_rope_settings(periods))
    return ImportedWeights(state, groups, "dinov3", settings, 4 * periods.numel() if periods is not None else None)


def infer_student(weights: ImportedWeights) -> dict[str, Any]:
    """student.* settings that rebuild the backbone these weights belong to, read from their shapes and keys plus
    the family's settings. The head count is not in the weights: DINOv3's from its RoPE periods, else head dim 64
    (every DINOv2 / DINOv3 release); override student.num_heads otherwise."""
    state = {plain_key(k): v for k, v in weights.state.items()}
    dim = state["cls_token"].shape[-1]
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    head_dim = weights.head_dim or 64
    if dim % head_dim:
        raise WeightsError(f"embed_dim {dim} is not a multiple of head dim {head_dim}: give student.num_heads")
    swiglu = "blocks.0.mlp.w12.weight" in state
    if swiglu:  # SwiGLU's hidden width: (int(dim * ratio * 2/3) + 7) // 8 * 8; DINOv2's ViT-g uses ratio 4
        hidden = state["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratio = 4.0 if (int(dim * 4.0 * 2 / 3) + 7) // 8 * 8 == hidden else hidden * 1.5 / dim
    else:
        ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    fc_in = "blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias"
    sizes = dict(embed_dim=dim, depth=len(blocks), num_heads=dim // head_dim, ffn_layer="swiglu" if swiglu else "mlp")
    arch = next((name for name, preset in ARCHS.items() if preset == sizes), "vit_small")  # sizes set explicitly too
    student: dict[str, Any] = {
        "arch": arch, "embed_dim": dim, "depth": len(blocks), "num_heads": dim // head_dim,
        "ffn_layer": "swiglu" if swiglu else "mlp", "mlp_ratio": ratio,
        "patch_size": state["patch_embed.proj.weight"].shape[-1],
        "num_register_tokens": state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        "layerscale": 1e-5 if "blocks.0.ls1.gamma" in state else None,  # the value is loaded; only on/off matters
        "qkv_bias": "blocks.0.attn.qkv.bias" in state, "proj_bias": "blocks.0.attn.proj.bias" in state,
        "ffn_bias": fc_in in state,
    }
    student.update(weights.settings)
    if weights.family == "dinov3":
        student.setdefault("rope_rescale_coords", 2.0)  # DINOv3's released recipe: training only, no output changes
    return student


def from_raw(raw: Mapping[str, Any]) -> ImportedWeights:
    """A state dict read from a file: DINOv3 or DINOv2 format (or a dinospec state dict without its config)."""
    unwrapped = _unwrap_backbone(raw)
    if is_dinov3_state_dict(unwrapped):
        return imported_dinov3(unwrapped)
    state = canonical_keys(unwrapped, allow_routed=True)
    if any(map(split_routed_key, state)):  # routed keys: dinospec's, without the export's config
        return ImportedWeights(state, None, "dinospec")
    return imported_dinov2(state)
