"""Parameter and FLOP counts: fvcore (with our SDPA handle) against a formula written out by hand, against
torch.utils.flop_counter, and routed vs vanilla (routing must add parameters but never FLOPs).

What fvcore counts in a ViT: convolutions, linears and (through our handle) attention, as multiply-adds, plus its
own estimate of 5 per element for every LayerNorm with an affine. It does not count elementwise ops (GELU, SiLU,
residual adds, LayerScale, position-embedding add). model_info reports 2 x multiply-adds. torch's FlopCounterMode
counts matmuls, convolutions and attention in FLOPs but no norms, so the two agree once the norm term is removed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinospec.config import CONFIG_DIR, load_config
from dinospec.model_info import count_flops, count_flops_torch, format_table, model_info, params_by_kind
from dinospec.models.specialize import resolve_spec, vanilla_config
from dinospec.models.vit import VisionTransformer, build_backbone

SPEC_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "spec").glob("*.yaml"))
REPO = Path(__file__).resolve().parent.parent


def hand_flops(img: int, patch: int, dim: int, depth: int, heads: int, num_reg: int, hidden: int,
               ffn: str = "mlp", batch: int = 1) -> dict[str, int]:
    """Forward FLOPs (2 per multiply-add) of a ViT, written out layer by layer."""
    p = (img // patch) ** 2  # patches
    n = 1 + num_reg + p  # tokens
    head_dim = dim // heads
    patch_embed = p * dim * (3 * patch * patch)  # conv: one 3*patch*patch dot product per patch and channel
    qkv = n * dim * 3 * dim
    attention = heads * n * n * (head_dim + head_dim)  # q k^T, then softmax(.) v
    proj = n * dim * dim
    if ffn == "mlp":
        ffn_macs = n * dim * hidden + n * hidden * dim  # fc1, fc2
    else:
        h = (int(hidden * 2 / 3) + 7) // 8 * 8
        ffn_macs = n * dim * 2 * h + n * h * dim  # w12, w3
    matmul_macs = patch_embed + depth * (qkv + attention + proj + ffn_macs)
    norm_macs = (2 * depth + 1) * 5 * n * dim  # fvcore's LayerNorm estimate: 5 per element (norm1, norm2, final)
    return {"matmul": 2 * batch * matmul_macs, "norm": 2 * batch * norm_macs}


TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=4.0)


def tiny(num_reg: int = 2, spec=None, **kw) -> VisionTransformer:
    args = {**TINY, **kw}
    resolved = resolve_spec(spec, args["depth"]) if spec is not None else None
    return VisionTransformer(num_register_tokens=num_reg, spec=resolved, **args)


@pytest.mark.parametrize("num_reg,ffn,patch,img", [(0, "mlp", 8, 32), (2, "mlp", 8, 32), (3, "swiglu", 14, 42)])
def test_fvcore_flops_equal_the_hand_formula(num_reg, ffn, patch, img):
    model = tiny(num_reg, ffn_layer=ffn, patch_size=patch, img_size=img)
    expected = hand_flops(img, patch, 32, 3, 4, num_reg, 128, ffn)
    assert count_flops(model, img) == expected["matmul"] + expected["norm"]
    assert count_flops(model, img, batch=3) == 3 * (expected["matmul"] + expected["norm"])
    # torch's counter (math SDPA kernel) counts the same matmuls, and no norms
    assert count_flops_torch(model, img) == expected["matmul"]


@pytest.mark.parametrize("pos_embed,offset,asked", [("learned", 0.1, 64), ("learned", 0.1, 16), ("learned", 0.0, 48),
                                                     ("rope", 0.1, 64)])
def test_flops_at_a_size_other_than_the_built_one(pos_embed, offset, asked):
    """A backbone built at 32 px counted at another size (a local crop, a larger image) counts that size's tokens:
    the hand formula at `asked`, and what a backbone built at `asked` counts."""
    small = dict(depth=2, pos_embed=pos_embed, interpolate_offset=offset)
    model = tiny(2, **small)
    expected = hand_flops(asked, 8, 32, 2, 4, 2, 128)
    assert count_flops(model, asked) == expected["matmul"] + expected["norm"] == count_flops(
        tiny(2, img_size=asked, **small), asked)
    assert count_flops_torch(model, asked) == expected["matmul"]


def test_flops_do_not_depend_on_the_spec():
    small = dict(depth=2, img_size=16)  # 4 patches + 2 registers: fvcore's tracing is the slow part
    vanilla = count_flops(tiny(2, **small), 16)
    for name in SPEC_PRESETS:
        spec = load_config([], [f"spec={name}"]).spec
        assert count_flops(tiny(2, spec, **small), 16) == vanilla, name
    routed_everything = {"groups": [["cls"], ["reg"], ["patch"]], "norm1": "all", "qkv": "all", "proj": "all",
                         "norm2": "all", "mlp": "all", "ls1": "all", "ls2": "all", "final_norm": True}
    model = tiny(2, routed_everything, **small)
    assert count_flops(model, 16) == vanilla
    assert model.training, "counting must leave the model's mode as it was"
    assert count_flops_torch(model, 16) == count_flops_torch(tiny(2, **small), 16)
    assert model.training, "counting must leave the model's mode as it was"


def meta_params(arch: str, spec: str) -> tuple[int, int, dict, dict]:
    cfg = load_config([], [f"model={arch}", f"spec={spec}"])
    with torch.device("meta"):  # parameter counts need no memory
        model = build_backbone(cfg.student, cfg.spec, 224)
        vanilla = build_backbone(cfg.student, vanilla_config(cfg.spec), 224)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(model), count(vanilla), params_by_kind(model), params_by_kind(vanilla)


def test_paper_preset_parameter_increase():
    """The paper: +8.3% for ViT-L/14; norms + LayerScale alone add < 0.1%."""
    params, vanilla, by_kind, by_kind_vanilla = meta_params("vit_large", "paper")
    assert 8.25 < 100 * (params - vanilla) / vanilla < 8.45
    d, depth = 1024, 24
    extra = {k: by_kind[k] - by_kind_vanilla[k] for k in by_kind}
    assert extra["qkv"] == 8 * (d * 3 * d + 3 * d)  # one extra QKV (weight + bias) in each of blocks 0-7
    assert extra["norm1"] == extra["norm2"] == depth * 2 * d and extra["ls1"] == extra["ls2"] == depth * d
    assert extra["mlp"] == extra["proj"] == extra["final_norm"] == extra["patch_embed"] == extra["tokens"] == 0
    assert sum(by_kind.values()) == params and sum(by_kind_vanilla.values()) == vanilla
    params, vanilla, _, _ = meta_params("vit_large", "norm_ls")
    assert 0 < 100 * (params - vanilla) / vanilla < 0.1


def test_model_info_tiny():
    cfg = load_config([], ["model=vit_pico", "spec=paper", "crops.global_crops_size=32", "crops.local_crops_size=16",
                           "student.num_register_tokens=2"])
    info = model_info(cfg)
    expected = hand_flops(32, 16, 64, 6, 4, 2, 256)
    assert info["flops"] == info["flops_vanilla"] == expected["matmul"] + expected["norm"]
    assert info["flops_increase_pct"] == 0.0
    assert info["params"] - info["params_vanilla"] == 2 * (64 * 192 + 192) + 6 * (2 * 128 + 2 * 64)
    assert info["routed_blocks"] == {"norm1": list(range(6)), "norm2": list(range(6)), "ls1": list(range(6)),
                                     "ls2": list(range(6)), "qkv": [0, 1]}
    assert info["groups"] == [["cls"], ["reg", "patch"]] and info["depth"] == 6
    assert sum(r["params"] for r in info["params_by_kind"].values()) == info["params"]
    table = format_table(info)
    assert "qkv" in table and "0-1" in table and "total" in table and "+0.0000%" in table
    json.dumps(info)  # serialisable as is


def test_cli_model_info_json():
    proc = subprocess.run(
        [sys.executable, "-m", "dinospec.cli", "model-info", "model=vit_small", "spec=paper", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    info = json.loads(lines[0])
    assert {"params", "params_vanilla", "flops", "flops_vanilla"} <= set(info)
    assert info["flops"] == info["flops_vanilla"] > 0
    assert info["params"] > info["params_vanilla"]
    expected = hand_flops(224, 14, 384, 12, 6, 0, 1536)
    assert info["flops"] == expected["matmul"] + expected["norm"]
    params, vanilla, _, _ = meta_params("vit_small", "paper")
    assert (info["params"], info["params_vanilla"]) == (params, vanilla)
