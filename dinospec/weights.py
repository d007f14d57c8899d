"""Backbone weights written elsewhere, made into dinospec's: DINOv2 checkpoints in, timm's key format out.

dinospec's vanilla parameter names are DINOv2's, so importing DINOv2 weights is mostly unwrapping (training
checkpoints nest the backbone under ``teacher`` / ``model`` and ``backbone.`` prefixes; FSDP ``block_chunks`` add
a chunk index). :func:`load_pretrained_backbone` then maps any vanilla or routed state onto any (vanilla or routed)
model: a shared layer is copied into every token group, so a specialised model starts out computing exactly what
the pretrained vanilla one did. Pickles are read with ``weights_only=True`` and nothing else.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinospec.models.routed import TokenRouted
from dinospec.models.specialize import resolve_groups, routed_slots
from dinospec.models.vit import SwiGLU, VisionTransformer

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"

_VANILLA_KEY = re.compile(
    r"^(cls_token|pos_embed|register_tokens|mask_token|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)
# a routed slot's key: '<slot>.<group>.<rest>', e.g. blocks.0.norm1.1.weight, blocks.3.mlp.0.fc1.bias, norm.1.weight
_ROUTED_KEY = re.compile(r"^(blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp|ls1|ls2)|norm)\.(\d+)\.(.+)$")
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


def _canonical_keys(state: Mapping[str, Any], allow_routed: bool) -> dict[str, Tensor]:
    """Flatten block chunks, drop classifier heads, and refuse keys that are not a backbone's."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("head.") or key == "head":
            continue
        if not isinstance(value, Tensor):
            raise WeightsError(f"'{key}' holds a {type(value).__name__}, not a tensor: not a backbone state dict")
        out[_CHUNKED_BLOCK.sub(r"blocks.\1.", key)] = value
    unknown = [k for k in out if not _VANILLA_KEY.match(k) and not (allow_routed and _ROUTED_KEY.match(k))]
    if unknown:
        hint = ""
        if "reg_token" in out:
            hint = " (this looks like timm's key format; dinospec reads DINOv2's format and its own exports)"
        raise WeightsError(f"{len(unknown)} key(s) are not DINOv2/dinospec backbone keys, e.g. {unknown[:4]}{hint}")
    if "cls_token" not in out or "patch_embed.proj.weight" not in out:
        raise WeightsError(f"no ViT backbone found (no cls_token / patch_embed); keys: {list(state)[:6]}")
    return out


def convert_dinov2_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """DINOv2 weights (released .pth, teacher/training checkpoint, chunked blocks) -> dinospec vanilla keys."""
    return _canonical_keys(_unwrap_backbone(state), allow_routed=False)


# ----------------------------------------------------------------------------------------------------------------
# reading files


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], tuple[int, int, int] | None]:
    """(state dict in dinospec keys, group_of_type of its routed slots if known) from an export dir or a file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / ".metadata").is_file() or (path / "checkpoints").is_dir():
            raise WeightsError(f"{path} is a training run or checkpoint (torch.distributed.checkpoint); "
                               f"export it first: dinospec export RUN_DIR --out DIR")
        config_path = path / CONFIG_FILE
        if not (path / WEIGHTS_FILE).is_file() or not config_path.is_file():
            raise WeightsError(f"{path} is not a dinospec export (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
        config = json.loads(config_path.read_text())
        if config.get("format") != "dinospec":
            raise WeightsError(f"{path} holds weights in {config.get('format')!r} format; "
                               f"load it with that library, or export again with --format dinospec")
        group_of_type, _ = resolve_groups(config["spec"]["groups"])
        return _canonical_keys(load_file(path / WEIGHTS_FILE), allow_routed=True), group_of_type
    if not path.is_file():
        raise WeightsError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        return _canonical_keys(_unwrap_backbone(load_file(path)), allow_routed=True), None
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise WeightsError(f"{path}: unknown weights format (expected a dinospec export dir, .safetensors or .pth)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200]
        raise WeightsError(
            f"refusing to load {path}: it is a pickle holding more than tensors and plain containers, which could "
            f"run code on load (torch.load(weights_only=True) said: {first}). Re-save its state dict with "
            f"torch.save(state_dict) or safetensors, from code you trust."
        ) from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return _canonical_keys(_unwrap_backbone(obj), allow_routed=True), None


# ----------------------------------------------------------------------------------------------------------------
# mapping onto a model


def describe_weights(state: Mapping[str, Tensor]) -> str:
    """A one-line size summary of a backbone state dict, for error messages."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    grid = math.isqrt(state["pos_embed"].shape[1] - 1) if "pos_embed" in state else "?"
    patch = state["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in state else "?"
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    ffn = "swiglu" if any(".w12." in k for k in state) else "mlp"
    dim = state["cls_token"].shape[-1] if "cls_token" in state else "?"
    layerscale = "with" if any(".ls1." in k for k in state) else "without"
    return (f"embed_dim={dim}, depth={len(blocks)}, patch_size={patch}, {regs} register token(s), ffn={ffn}, "
            f"{layerscale} layerscale, position grid {grid}x{grid}")


def resize_pos_embed(pos: Tensor, num_patches: int) -> Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + G*G, D): the patch grid resized bicubically, as DINOv2 does for other sizes."""
    m, g = math.isqrt(pos.shape[1] - 1), math.isqrt(num_patches)
    if m * m != pos.shape[1] - 1 or g * g != num_patches:
        raise WeightsError(f"pos_embed {tuple(pos.shape)}: only square position grids can be resized")
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()  # (1, D, M, M)
    grid = F.interpolate(grid, size=(g, g), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g * g, -1).to(pos.dtype)  # (1, G*G, D)
    return torch.cat([pos[:, :1], grid], dim=1)


def _source_slots(state: Mapping[str, Tensor]) -> dict[str, int]:
    """Routed slots of a state dict, from its keys: slot -> number of groups."""
    slots: dict[str, int] = {}
    for key in state:
        m = _ROUTED_KEY.match(key)
        if m:
            slots[m[1]] = max(slots.get(m[1], 0), int(m[2]) + 1)
    return slots


def _group_copies(state: Mapping[str, Tensor], plain: str, slots: Mapping[str, int]) -> list[str] | None:
    """Keys of the per-group copies of `plain` ('blocks.0.norm1.weight') in a routed state dict, or None."""
    for slot, n in slots.items():
        if plain.startswith(slot + "."):
            rest = plain[len(slot) + 1:]
            keys = [f"{slot}.{g}.{rest}" for g in range(n)]
            return keys if all(k in state for k in keys) else None
    return None


def adapt_state_dict(state: Mapping[str, Tensor], model: VisionTransformer,
                     source_groups: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Map a vanilla or routed backbone state onto `model`'s keys and shapes.

    A slot shared in the source is copied into every group of a routed target slot (as
    :func:`dinospec.models.specialize.vanilla_to_routed`); a routed source slot goes group by group into a target
    routed with the same token groups (`source_groups` = the source's group_of_type), and into a shared target only
    when all its groups are equal (as ``routed_to_vanilla``). Done key by key, so a run can continue from an export
    whose spec differs from its own.
    """
    target = model.state_dict()
    state = dict(state)
    n_target = target["pos_embed"].shape[1] - 1
    if "pos_embed" in state and state["pos_embed"].shape[1] - 1 != n_target \
            and state["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], n_target)
    src_slots, dst_slots = _source_slots(state), routed_slots(model)
    same_groups = source_groups is not None and tuple(source_groups) == model.spec.group_of_type

    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for key in target:
        m = _ROUTED_KEY.match(key)
        routed = m is not None and m[1] in dst_slots
        plain, group = (f"{m[1]}.{m[3]}", int(m[2])) if routed else (key, None)
        if plain in state:  # shared in the source
            out[key] = state[plain]
            used.add(plain)
            continue
        copies = _group_copies(state, plain, src_slots)
        if copies is None:
            missing.append(plain)
            continue
        used.update(copies)
        if group is not None and same_groups and len(copies) == len(model.get_submodule(m[1])):
            out[key] = state[copies[group]]
        elif all(torch.equal(state[copies[0]], state[c]) for c in copies[1:]):
            out[key] = state[copies[0]]
        else:
            raise WeightsError(
                f"'{plain}' is specialised per token group in the weights, with different values per group, but "
                f"the model {'shares it' if group is None else 'groups tokens differently'}: no exact equivalent. "
                f"Use a model with the same spec (or one that routes this layer with the same groups)."
            )
    extra = sorted(set(state) - used)
    if missing or extra:
        raise WeightsError(
            f"the weights do not fit the model: {len(missing)} missing key(s) {missing[:3]}, {len(extra)} unexpected "
            f"{extra[:3]}. Weights: {describe_weights(state)}; model: {describe_weights(target)}. Likely a "
            f"different architecture (arch/depth/registers/ffn_layer/layerscale)."
        )
    for key, value in out.items():
        if value.shape != target[key].shape:
            hint = ("different patch size" if key.startswith("patch_embed") else
                    "different number of register tokens" if key == "register_tokens" else
                    "different arch (embed_dim / mlp_ratio / ffn_layer)")
            raise WeightsError(
                f"shape mismatch for '{key}': weights {tuple(value.shape)} vs model {tuple(target[key].shape)} "
                f"(likely a {hint}). Weights: {describe_weights(state)}; model: {describe_weights(target)}"
            )
    return out


def load_pretrained_backbone(model: VisionTransformer, path: str | Path) -> None:
    """Initialise `model` (vanilla or specialised) in place from a dinospec export dir or DINOv2-format weights."""
    state, groups = read_weights(path)
    with torch.no_grad():
        model.load_state_dict(adapt_state_dict(state, model, groups), strict=True)


# ----------------------------------------------------------------------------------------------------------------
# dinospec vanilla -> timm


def timm_model_args(model: VisionTransformer) -> tuple[str, dict[str, Any]]:
    """The timm model name and kwargs that build a timm VisionTransformer computing what `model` computes."""
    block = model.blocks[0]
    if any(isinstance(m, TokenRouted) for m in model.modules()):
        raise WeightsError("timm has no token-type routing: collapse the model to vanilla first")
    dim, depth, regs = model.embed_dim, len(model.blocks), model.num_register_tokens
    fc_in = block.mlp.w12 if isinstance(block.mlp, SwiGLU) else block.mlp.fc1
    biases = {block.attn.proj.bias is not None, fc_in.bias is not None}
    if len(biases) > 1:
        raise WeightsError("timm uses one switch (proj_bias) for the attention projection's and the FFN's biases; "
                           "this model has one without the other")
    swiglu = isinstance(block.mlp, SwiGLU)
    hidden = fc_in.out_features
    kwargs: dict[str, Any] = dict(
        img_size=model.img_size, patch_size=model.patch_size, embed_dim=dim, depth=depth,
        num_heads=block.attn.num_heads,
        # timm's hidden width is int(dim * mlp_ratio) (packed w12 for SwiGLU); +0.5 keeps int() off rounding edges
        mlp_ratio=(hidden + 0.5) / dim if swiglu else hidden / dim,
        # only on/off matters (gamma is loaded); 0.0, not None: timm.create_model drops None-valued kwargs
        init_values=1e-5 if hasattr(block.ls1, "gamma") else 0.0,
        reg_tokens=regs, no_embed_class=regs > 0, qkv_bias=block.attn.qkv.bias is not None,
        proj_bias=biases.pop(), num_classes=0,
    )
    sizes = {(384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large", (1536, 40, 24): "giant"}
    size = sizes.get((dim, depth, block.attn.num_heads))
    if size and model.patch_size == 14 and regs in (0, 4) and swiglu == (size == "giant"):
        name = f"vit_{size}_patch14{'_reg4' if regs else ''}_dinov2"
    else:  # any size: the kwargs above override the named model's; the giant entry brings SwiGLU + SiLU
        name = "vit_giant_patch14_dinov2" if swiglu else "vit_small_patch14_dinov2"
    return name, kwargs


def to_timm_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """dinospec vanilla keys -> timm VisionTransformer keys (what timm's own DINOv2 conversion does)."""
    out = {k: v for k, v in state.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    for key in list(out):
        if ".mlp.w12." in key or ".mlp.w3." in key:  # SwiGLU: timm's packed GluMlp names them fc1 / fc2
            out[key.replace(".w12.", ".fc1.").replace(".w3.", ".fc2.")] = out.pop(key)
    if "register_tokens" in state:
        # timm's no_embed_class layout: registers and cls take no position; fold cls's position into the token
        out["reg_token"] = state["register_tokens"]
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embed"] = state["pos_embed"][:, 1:]
    else:
        out["cls_token"], out["pos_embed"] = state["cls_token"], state["pos_embed"]
    return out
