"""Backbone weights written elsewhere, loaded into dinospec models: DINOv2 / DINOv3 checkpoints in, timm's keys out.

Files are read here (a dinospec export dir, or .pth / .safetensors; the key formats are dinospec/weight_formats.py's).
:func:`load_pretrained_backbone` then maps any vanilla or routed state onto any (vanilla or routed) model: a shared
layer is copied into every token group, so a specialised model starts out computing exactly what the pretrained one
did. The checkpoint's family (DINOv2 with or without registers, DINOv3) is read from its keys, and a model whose
settings would compute something else from these weights (interpolation, RoPE, norm eps) is refused with the
settings to use. Pickles are read with ``weights_only=True`` and nothing else.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dinospec.models.rope import rope_periods
from dinospec.models.specialize import TOKEN_PARAMS, SpecError, convert_state_dict, resolve_groups, routed_slots
from dinospec.models.vit import SwiGLU, VisionTransformer, arch_kwargs, interpolate_pos_embed
from dinospec.weight_formats import ImportedWeights, WeightsError, canonical_keys, from_raw

__all__ = ["WeightsError", "load_pretrained_backbone", "load_weights", "load_into", "check_model_settings",
           "check_student_settings", "adapt_state_dict", "timm_model_args", "to_timm_state_dict"]

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


# ----------------------------------------------------------------------------------------------------------------
# fitting a checkpoint family's settings


def model_settings(model: VisionTransformer) -> dict[str, Any]:
    """The student.* settings a built model computes with (those a checkpoint family can require)."""
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    out: dict[str, Any] = {"pos_embed": "learned" if model.rope_embed is None else "rope",
                           "norm_eps": eps.pop() if len(eps) == 1 else sorted(eps)}
    if model.pos_embed is not None:
        out.update(interpolate_offset=model.interpolate_offset, interpolate_antialias=model.interpolate_antialias)
    else:
        rope = model.rope_embed
        out.update(rope_normalize_coords=rope.normalize_coords, rope_base=rope.base,
                   rope_min_period=rope.min_period, rope_max_period=rope.max_period, head_dim=rope.head_dim)
    return out


def student_settings(student: Mapping[str, Any]) -> dict[str, Any]:
    """The same settings from a config's `student` section, before any model is built."""
    out = {k: student[k] for k in ("pos_embed", "norm_eps", "interpolate_offset", "interpolate_antialias")}
    if student["pos_embed"] == "rope":
        out.update({k: student[k] for k in ("rope_normalize_coords", "rope_base", "rope_min_period",
                                            "rope_max_period")})
        size = arch_kwargs(student)
        out["head_dim"] = size["embed_dim"] // size["num_heads"]
    return out


def check_student_settings(student: Mapping[str, Any], path: str | Path) -> None:
    """check_model_settings for a config's `student` section and a weights path (a run's pretrained_weights),
    without building the model: for a check before a run writes or queues anything."""
    check_settings(student_settings(student), load_weights(path))


def _same_setting(key: str, want: Any, have: Any) -> bool:
    if key in ("rope_base", "rope_min_period", "rope_max_period"):  # compared by the periods they give
        return True
    if isinstance(want, float) and isinstance(have, (int, float)):
        return math.isclose(want, have, rel_tol=1e-9, abs_tol=0.0)
    return want == have


def check_model_settings(model: VisionTransformer, weights: ImportedWeights) -> None:
    """Refuse a model that would compute something else from these weights than their source did, naming the
    student.* keys (and values) to set."""
    check_settings(model_settings(model), weights)


def check_settings(have: Mapping[str, Any], weights: ImportedWeights) -> None:
    """`have`: model_settings or student_settings. Raises WeightsError naming what to set."""
    wrong = {k: v for k, v in weights.settings.items() if k in have and not _same_setting(k, v, have[k])}
    if "pos_embed" not in wrong and weights.settings.get("pos_embed") == "rope" and have["pos_embed"] == "rope":
        want = rope_periods(have["head_dim"], weights.settings.get("rope_base"),
                            weights.settings.get("rope_min_period"), weights.settings.get("rope_max_period"))
        got = rope_periods(have["head_dim"], have["rope_base"], have["rope_min_period"], have["rope_max_period"])
        if not torch.allclose(want, got, rtol=1e-6, atol=0):
            wrong.update({k: weights.settings.get(k) for k in ("rope_base", "rope_min_period", "rope_max_period")
                          if weights.settings.get(k) != have.get(k)})
    if "pos_embed" in wrong:  # the rest follows once the position kind is right
        wrong = {k: v for k, v in weights.settings.items() if k in ("pos_embed", "norm_eps") or k.startswith("rope_")}
    if not wrong:
        return
    why = {"dinov2": "a DINOv2 checkpoint without registers (DINOv2 interpolates its position embeddings with "
                     "offset 0.1, no antialiasing)",
           "dinov2_reg": "a DINOv2 checkpoint with registers (DINOv2's register models interpolate their position "
                         "embeddings with antialiasing and no offset; other settings move every patch token at "
                         "other image sizes, 0.09 at 224 px for a ViT-B/14)",
           "dinov3": "a DINOv3 backbone (RoPE positions, LayerNorm eps 1e-5)"}.get(weights.family, weights.family)
    fix = " ".join(f"student.{k}={_yaml(v)}" for k, v in wrong.items())
    now = ", ".join(f"{k}={_yaml(have.get(k))}" for k in wrong)
    raise WeightsError(f"these weights are {why}, but the model has {now}: it would not compute what the weights "
                       f"were trained to. Set {fix}")


def _yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------------------------------------------
# reading files


def load_weights(path: str | Path) -> ImportedWeights:
    """Backbone weights from a dinospec export dir, or a DINOv2 / DINOv3 .pth / .safetensors file."""
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
        return ImportedWeights(canonical_keys(load_file(path / WEIGHTS_FILE), allow_routed=True), group_of_type,
                               "dinospec")
    if not path.is_file():
        raise WeightsError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        return from_raw(load_file(path))
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
    return from_raw(obj)


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


def resize_pos_embed(pos: Tensor, model: VisionTransformer) -> Tensor:
    """A loaded (1, 1 + M*M, D) pos_embed on `model`'s grid, resized exactly as `model` resizes it at runtime (its
    interpolate_offset / interpolate_antialias): the model then computes at its own size what the weights computed
    there."""
    m, g = math.isqrt(pos.shape[1] - 1), math.isqrt(model.pos_embed.shape[1] - 1)
    if m * m != pos.shape[1] - 1:
        raise WeightsError(f"pos_embed {tuple(pos.shape)}: only square position grids can be resized")
    return interpolate_pos_embed(pos, g, g, model.interpolate_offset, model.interpolate_antialias)


def adapt_state_dict(state: Mapping[str, Tensor], model: VisionTransformer,
                     source_groups: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Map a vanilla or routed backbone state onto `model`'s keys and shapes.

    Keys as :func:`dinospec.models.specialize.convert_state_dict` maps them (`source_groups`: the source's
    group_of_type), key by key, so a run can continue from an export whose spec differs from its own; the learned
    pos_embed is resized to the model's grid, and what does not fit is refused naming the likely cause.
    """
    target = model.state_dict()
    state = dict(state)
    if ("pos_embed" in state) != ("pos_embed" in target):
        raise WeightsError(
            "the weights have a learned pos_embed but the model uses RoPE (set student.pos_embed=learned)"
            if "pos_embed" in state else
            "the weights have no pos_embed (RoPE, as DINOv3) but the model learns one (set student.pos_embed=rope)")
    if "pos_embed" in state and state["pos_embed"].shape[1] != target["pos_embed"].shape[1] \
            and state["pos_embed"].shape[-1] == target["pos_embed"].shape[-1]:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], model)
    try:
        out, missing, extra = convert_state_dict(state, target, source_groups, model.spec.group_of_type)
    except SpecError as e:
        raise WeightsError(f"{e}. Use a model with the same spec (or one that routes this layer with the same "
                           f"groups).") from None
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
    """Initialise `model` (vanilla or specialised) in place from a dinospec export dir or DINOv2 / DINOv3 weights;
    a model whose settings do not suit the checkpoint's family is refused (see :func:`check_model_settings`)."""
    load_into(model, load_weights(path))


def load_into(model: VisionTransformer, weights: ImportedWeights) -> None:
    """Initialise `model` in place from weights already read (settings checked, spec converted, pos_embed resized)."""
    check_model_settings(model, weights)
    with torch.no_grad():
        model.load_state_dict(adapt_state_dict(weights.state, model, weights.groups), strict=True)


# ----------------------------------------------------------------------------------------------------------------
# dinospec vanilla -> timm


def timm_model_args(model: VisionTransformer) -> tuple[str, dict[str, Any]]:
    """The timm model name and kwargs that build a timm VisionTransformer computing what `model` computes."""
    block = model.blocks[0]
    if routed_slots(model):
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
    out = {k: v for k, v in state.items() if k not in TOKEN_PARAMS}
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
