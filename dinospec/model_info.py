"""Parameters and forward FLOPs of a configured backbone, next to its vanilla twin.

FLOPs are counted with fvcore, which ignores ``aten::scaled_dot_product_attention`` unless told how to count it, and
which counts multiply-adds: we register a handle for SDPA and report FLOPs = 2 x multiply-adds, the convention of
``torch.utils.flop_counter`` (cross-checked in the tests). Routing splits a layer's tokens between copies but never
adds work, so a specialised model's FLOPs equal the vanilla model's exactly. The routed fast paths are autograd
Functions, opaque to fvcore's trace: a routed LayerNorm is counted as fvcore counts ``layer_norm`` (5 per element
with affine), a routed Linear as its GEMMs (input elements x output features).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any, Mapping

import torch
from torch import nn

from dinospec.models.routed import SegmentedLinear
from dinospec.models.specialize import param_kind, vanilla_config
from dinospec.models.vit import PerTokenAffineLayerNorm, VisionTransformer, build_backbone


def _sdpa_macs(inputs: list, outputs: list) -> int:
    """fvcore handle: multiply-adds of softmax(q k^T) v = B*H*Nq*Nk*(d_qk + d_v)."""
    q, k, v = (i.type().sizes() for i in inputs[:3])
    *batch, nq, d = q
    nk, dv = k[-2], v[-1]
    b = 1
    for s in batch:
        b *= s
    return b * nq * nk * (d + dv)


def _size(value: Any) -> int:
    n = 1
    for s in value.type().sizes():
        n *= s
    return n


def _routed_layer_norm_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for routed LayerNorm: fvcore's own estimate for layer_norm with affine, 5 per element."""
    return 5 * _size(inputs[0])


def _routed_linear_macs(inputs: list, outputs: list) -> int:
    """fvcore handle for routed Linear: every token through one (C_in x C_out) GEMM."""
    return _size(inputs[0]) * outputs[0].type().sizes()[-1]


def count_flops(model: nn.Module, img_size: int, batch: int = 1) -> int:
    """Forward FLOPs (2 x multiply-adds) of `model` on a batch of img_size x img_size images, counted by fvcore.

    Any size the backbone accepts, not only the one it was built at (a local crop, a high-resolution eval): the
    runtime resizing of a learned pos_embed is no FLOPs to fvcore, and RoPE's tables have no size."""
    with warnings.catch_warnings():  # fvcore's import still calls the deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    x = torch.zeros(batch, 3, img_size, img_size)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, x).set_op_handle(
            "aten::scaled_dot_product_attention", _sdpa_macs,
            f"prim::PythonOp.{PerTokenAffineLayerNorm.__name__}", _routed_layer_norm_macs,
            f"prim::PythonOp.{SegmentedLinear.__name__}", _routed_linear_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2 * int(analysis.total())
    finally:
        model.train(was_training)


def count_flops_torch(model: nn.Module, img_size: int, batch: int = 1) -> int:
    """The same count with torch.utils.flop_counter, attention forced onto the math kernel (which has a formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model.eval()(x)
    finally:
        model.train(was_training)  # as count_flops: counting must not leave a student in eval mode
    return counter.get_total_flops()


def params_by_kind(model: nn.Module) -> dict[str, int]:
    """Parameters per kind (specialize.param_kind: spec kinds, final_norm, tokens, patch_embed, other)."""
    counts: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        counts[param_kind(name)] += p.numel()
    return dict(counts)


def model_info(cfg: Any) -> dict[str, Any]:
    """Parameters and FLOPs of the backbone `cfg` describes and of the same backbone without specialization."""
    img = cfg.crops.global_crops_size
    model: VisionTransformer = build_backbone(cfg.student, cfg.spec, img_size=img)
    vanilla: VisionTransformer = build_backbone(cfg.student, vanilla_config(cfg.spec), img_size=img)
    params = sum(p.numel() for p in model.parameters())
    params_vanilla = sum(p.numel() for p in vanilla.parameters())
    flops, flops_vanilla = count_flops(model, img), count_flops(vanilla, img)
    by_kind, by_kind_vanilla = params_by_kind(model), params_by_kind(vanilla)
    spec = model.spec
    return {
        "arch": cfg.student.arch,
        "patch_size": cfg.student.patch_size,
        "img_size": img,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_register_tokens": model.num_register_tokens,
        "groups": [list(g) for g in (cfg.spec if spec.num_groups > 1 else vanilla_config())["groups"]],
        "routed_blocks": {k: sorted(v) for k, v in spec.blocks.items() if v},
        "final_norm_routed": spec.final_norm,
        "params": params,
        "params_vanilla": params_vanilla,
        "params_increase_pct": 100.0 * (params - params_vanilla) / params_vanilla,
        "flops": flops,
        "flops_vanilla": flops_vanilla,
        "flops_increase_pct": 100.0 * (flops - flops_vanilla) / flops_vanilla,
        "params_by_kind": {k: {"params": by_kind.get(k, 0), "params_vanilla": by_kind_vanilla.get(k, 0)}
                           for k in dict.fromkeys([*by_kind_vanilla, *by_kind])},
    }


def format_table(info: Mapping[str, Any]) -> str:
    lines = [
        f"{info['arch']}/{info['patch_size']} at {info['img_size']} px, groups {info['groups']}",
        f"{'module kind':<12} {'params':>14} {'vanilla':>14} {'extra':>10}  routed blocks",
    ]
    for kind, row in info["params_by_kind"].items():
        blocks = info["routed_blocks"].get(kind, [])
        where = "final" if kind == "final_norm" and info["final_norm_routed"] else _ranges(blocks)
        lines.append(f"{kind:<12} {row['params']:>14,} {row['params_vanilla']:>14,} "
                     f"{row['params'] - row['params_vanilla']:>10,}  {where}")
    lines.append(f"{'total':<12} {info['params']:>14,} {info['params_vanilla']:>14,} "
                 f"{info['params'] - info['params_vanilla']:>10,}  ({info['params_increase_pct']:+.2f}%)")
    lines.append(f"forward FLOPs (1 image): {info['flops']:,} vs vanilla {info['flops_vanilla']:,} "
                 f"({info['flops_increase_pct']:+.4f}%)")
    return "\n".join(lines)


def _ranges(blocks: list[int]) -> str:
    if not blocks:
        return "-"
    runs, start = [], blocks[0]
    for prev, cur in zip(blocks, blocks[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(runs)
