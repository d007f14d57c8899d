"""AdamW parameter groups with DINOv2's layer-wise lr decay, weight-decay exemptions and last-layer flag.

Each trainable parameter gets (lr_multiplier, wd_multiplier, is_last_layer) from its name; parameters with equal
triples share one optimizer group, so AdamW's foreach / fused kernels run over few, large groups. The scheduled
lr and wd are applied every step by :func:`apply_schedules` from those multipliers. Names are matched by
dot-separated components, so wrappers (``module.``, ``_orig_mod.``, ``_checkpoint_wrapped_module.``) and routed
copies (``blocks.0.norm1.1.weight``) are handled alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dinospec.models.specialize import FINAL_NORM, SLOT_PATHS, TOKEN_PARAMS

_TOKEN = re.compile(rf"(?:^|\.)(?:{'|'.join(TOKEN_PARAMS)})$")
_PATCH_EMBED = re.compile(r"(?:^|\.)patch_embed\.")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_NORM = re.compile(rf"(?:^|\.)(?:{SLOT_PATHS['norm1']}|{SLOT_PATHS['norm2']}|{FINAL_NORM})\.")
_LAST_LAYER = re.compile(r"(?:^|\.)last_layer\.")


@dataclass(frozen=True)
class ParamRule:
    """What the optimizer does with one parameter."""

    layer_id: int  # 0: tokens and patch embedding; i + 1: block i; num_layers + 1: final norm and heads
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool


def param_rule(name: str, param: torch.Tensor, layerwise_decay: float, patch_embed_lr_mult: float,
               num_layers: int) -> ParamRule:
    """DINOv2's rule for one parameter: lr x layerwise_decay ** (num_layers + 1 - layer_id), patch embedding
    lr x patch_embed_lr_mult; no weight decay on biases, norms, LayerScale gammas, tokens (any 1-D parameter)."""
    is_token = bool(_TOKEN.search(name))
    is_patch_embed = bool(_PATCH_EMBED.search(name))
    block = _BLOCK.search(name)
    if is_token or is_patch_embed:
        layer_id = 0
    elif block:
        layer_id = int(block.group(1)) + 1
        if layer_id > num_layers:
            raise ValueError(f"parameter {name!r} is in block {layer_id - 1} but num_layers is {num_layers}")
    else:
        layer_id = num_layers + 1
    lr_multiplier = layerwise_decay ** (num_layers + 1 - layer_id)
    if is_patch_embed:
        lr_multiplier *= patch_embed_lr_mult
    no_decay = (param.ndim <= 1 or is_token or name.endswith(".bias") or name.endswith(".gamma")
                or bool(_NORM.search(name)))
    return ParamRule(layer_id, lr_multiplier, 0.0 if no_decay else 1.0, bool(_LAST_LAYER.search(name)))


def param_rules(model: nn.Module, layerwise_decay: float, patch_embed_lr_mult: float,
                num_layers: int) -> dict[str, ParamRule]:
    """The rule of every trainable parameter of `model`, by name (for groups, logging and tests)."""
    return {
        name: param_rule(name, p, layerwise_decay, patch_embed_lr_mult, num_layers)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def param_groups(model: nn.Module, layerwise_decay: float, patch_embed_lr_mult: float,
                 num_layers: int) -> list[dict[str, Any]]:
    """Optimizer groups: trainable parameters with equal (lr_multiplier, wd_multiplier, is_last_layer) together,
    in the order of first appearance (deterministic, so optimizer state lines up on resume)."""
    params = dict(model.named_parameters())
    groups: dict[tuple[float, float, bool], dict[str, Any]] = {}
    for name, rule in param_rules(model, layerwise_decay, patch_embed_lr_mult, num_layers).items():
        key = (rule.lr_multiplier, rule.wd_multiplier, rule.is_last_layer)
        if key not in groups:
            groups[key] = {"params": [], "lr_multiplier": rule.lr_multiplier,
                           "wd_multiplier": rule.wd_multiplier, "is_last_layer": rule.is_last_layer}
        groups[key]["params"].append(params[name])
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's lr and weight decay for this step from its multipliers (DINOv2's apply_optim_scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]


def build_optimizer(model: nn.Module, cfg: Any, num_layers: int | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the config's betas; fused kernels when every parameter is on CUDA, foreach
    otherwise. lr and weight decay start at 0: call `apply_schedules` before every step.
    `num_layers` defaults to the backbone depth the config describes."""
    if num_layers is None:
        from dinospec.models.vit import arch_kwargs

        num_layers = arch_kwargs(cfg.student)["depth"]
    o = cfg.optim
    groups = param_groups(model, o.layerwise_decay, o.patch_embed_lr_mult, num_layers)
    if not groups:
        raise ValueError("the model has no trainable parameters to optimise")
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    kernel = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=(o.adamw_beta1, o.adamw_beta2), **kernel)
