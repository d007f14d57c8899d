"""RoPE as a backbone option (student.pos_embed=rope): tables, the prefix left alone, any grid, masks, routed specs,
coordinate augmentation, config and export.

The sin/cos tables are checked against DINOv3's own (tests/data/dinov3/rope.safetensors, outputs of DINOv3's code);
the full DINOv3 backbone parity is in test_dinov3.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinospec.config import ConfigError, load_config
from dinospec.export import ExportError, load_backbone, save_backbone
from dinospec.models.rope import RopePositions, RopeTables, apply_rope, rope_periods
from dinospec.models.specialize import vanilla_to_routed
from dinospec.models.vit import VisionTransformer, build_backbone

DATA = Path(__file__).resolve().parent / "data" / "dinov3"
ROPE = ["student.pos_embed=rope"]


def tiny_cfg(spec: str = "none", *extra: str):
    return load_config(overrides=["model=vit_pico", f"spec={spec}", "student.depth=2", "student.embed_dim=32",
                                  "student.num_heads=2", "student.patch_size=8", "student.num_register_tokens=2",
                                  *ROPE, *extra])


def tiny_model(cfg, seed: int = 0) -> VisionTransformer:
    """Random weights away from their init (LayerScale especially), eval mode."""
    torch.manual_seed(seed)
    model = build_backbone(cfg.student, cfg.spec, img_size=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def images(h: int = 32, w: int = 32, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# the tables


def test_tables_equal_dinov3s():
    """Periods and sin/cos for a square and a non-square grid, bit for bit against DINOv3's stored tables."""
    from safetensors.torch import load_file

    ref = load_file(DATA / "rope.safetensors")
    assert torch.equal(rope_periods(64, base=100.0), ref["periods"])
    rope = RopePositions(64, base=100.0, normalize_coords="separate").eval()
    for key, (h, w) in (("grid14x14", (14, 14)), ("grid10x15", (10, 15))):
        sin, cos = rope(h, w)
        assert sin.shape == (h * w, 64)
        torch.testing.assert_close(sin, ref[f"{key}.sin"], atol=0, rtol=0)
        torch.testing.assert_close(cos, ref[f"{key}.cos"], atol=0, rtol=0)


def test_coordinate_normalisation():
    """separate: each axis into (-1, 1) by its own length; max / min: both axes by the longer / shorter side."""
    h, w = 2, 4
    sep = RopePositions(8, normalize_coords="separate").coords(h, w)
    assert torch.allclose(sep[:, 0].unique(), torch.tensor([-0.5, 0.5]))
    assert torch.allclose(sep[:, 1].unique(), torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    mx = RopePositions(8, normalize_coords="max").coords(h, w)
    assert torch.allclose(mx[:, 0].unique(), torch.tensor([-0.75, -0.25]))  # rows measured in units of w
    mn = RopePositions(8, normalize_coords="min").coords(h, w)
    assert torch.allclose(mn[:, 1].unique(), torch.tensor([-0.5, 0.5, 1.5, 2.5]))
    assert torch.equal(sep[1], torch.tensor([-0.5, -0.25]))  # row-major: index 1 is row 0, column 1


def test_min_max_periods_are_geometric_and_take_precedence():
    p = rope_periods(16, base=100.0, min_period=1.0, max_period=8.0)  # 4 periods: 1, 2, 4, 8
    torch.testing.assert_close(p, torch.tensor([1.0, 2.0, 4.0, 8.0]))
    with pytest.raises(ValueError, match="both"):
        rope_periods(16, min_period=1.0)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_periods(18)


def test_apply_rope_leaves_the_prefix_and_keeps_norms():
    rope = RopePositions(8).eval()
    tables = rope(3, 2)
    x = torch.randn(2, 4, 3 + 6, 8)  # 3 prefix tokens, a 3x2 grid
    y = apply_rope(x, tables)
    assert torch.equal(y[:, :, :3], x[:, :, :3])
    assert not torch.allclose(y[:, :, 3:], x[:, :, 3:])
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_scores_depend_on_relative_position_only():
    """<rope(q at p), rope(k at p')> depends only on p - p': shifting every coordinate leaves all scores unchanged,
    which is why a train-time shift is harmless to attention yet changes absolute positions."""
    rope = RopePositions(16).eval()
    q, k = torch.randn(1, 1, 12, 16), torch.randn(1, 1, 12, 16)
    sin, cos = rope(3, 4)
    coords = rope.coords(3, 4) + torch.tensor([0.3, -0.7])
    periods = rope_periods(16)
    angles = (2 * torch.pi * coords[:, :, None] / periods).flatten(1).repeat(1, 2)
    shifted = RopeTables(angles.sin(), angles.cos())
    tables = RopeTables(sin, cos)
    scores = apply_rope(q, tables) @ apply_rope(k, tables).transpose(-1, -2)
    scores_shifted = apply_rope(q, shifted) @ apply_rope(k, shifted).transpose(-1, -2)
    torch.testing.assert_close(scores, scores_shifted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(sin, shifted.sin, atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# the backbone


def test_rope_backbone_has_no_pos_embed_and_takes_any_grid():
    model = tiny_model(tiny_cfg())
    assert model.pos_embed is None and "pos_embed" not in model.state_dict()
    assert not any(k.startswith("rope") for k in model.state_dict())  # nothing learned, nothing stored
    with pytest.raises(RuntimeError, match="RoPE"):
        model.interpolate_pos_encoding(32, 32)
    with torch.no_grad():
        for h, w in ((32, 32), (16, 48), (56, 24), (8, 8)):
            out = model.forward_features(images(h, w))
            assert out["x_norm_patchtokens"].shape == (2, (h // 8) * (w // 8), 32)
            assert out["x_norm_regtokens"].shape == (2, 2, 32)
            assert torch.isfinite(out["x_prenorm"]).all()


def test_positions_matter_and_registers_are_not_rotated():
    """Permuting the patches changes the output (RoPE carries position); the prefix tokens get no rotation, so a
    model where RoPE sees no patches behaves like attention without positions."""
    model = tiny_model(tiny_cfg())
    x = images()
    with torch.no_grad():
        ref = model.forward_features(x)["x_norm_clstoken"]
        flipped = model.forward_features(x.flip(-1).flip(-2))["x_norm_clstoken"]
    assert not torch.allclose(ref, flipped, atol=1e-4)
    # attention's rope tables cover exactly the patch tokens: prefix length = the backbone's own num_prefix_tokens
    tables = model.rope_tables(32, 32, torch.device("cpu"))
    assert tables.num_patches == 16 and model.num_prefix_tokens == 3


def test_masks_replace_patches_before_attention():
    model = tiny_model(tiny_cfg())
    x = images()
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    with torch.no_grad():
        plain, masked = model.forward_features(x), model.forward_features(x, masks)
    assert torch.equal(masked["masks"], masks)
    assert torch.allclose(plain["x_prenorm"][1], masked["x_prenorm"][1], atol=1e-6)  # image 1 has no mask
    assert not torch.allclose(plain["x_prenorm"][0], masked["x_prenorm"][0], atol=1e-4)


@pytest.mark.parametrize("spec", ["paper", "qkv_all", "final_norm"])
def test_routed_spec_with_copied_weights_computes_the_vanilla_function(spec):
    vanilla = tiny_model(tiny_cfg())
    cfg = tiny_cfg(spec)
    routed = build_backbone(cfg.student, cfg.spec, img_size=32).eval()
    routed.load_state_dict(vanilla_to_routed(vanilla.state_dict(), routed))
    x = images(24, 40)
    with torch.no_grad():
        a, b = vanilla.forward_features(x), routed.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_get_intermediate_layers_with_extra_tokens():
    model = tiny_model(tiny_cfg())
    x = images(16, 24)
    with torch.no_grad():
        out = model.forward_features(x)
        (patch, cls, regs), = model.get_intermediate_layers(x, n=1, return_class_token=True, return_extra_tokens=True)
        (patch_only,) = model.get_intermediate_layers(x, n=1, reshape=True)
    assert torch.equal(patch, out["x_norm_patchtokens"]) and torch.equal(cls, out["x_norm_clstoken"])
    assert torch.equal(regs, out["x_norm_regtokens"])
    assert patch_only.shape == (2, 32, 2, 3)


# ----------------------------------------------------------------------------------------------------------------
# coordinate augmentation (training only)


def test_augmentation_only_in_training_and_reproducible():
    cfg = tiny_cfg("none", "student.rope_jitter_coords=1.5", "student.rope_rescale_coords=2.0",
                   "student.rope_shift_coords=0.5")
    model = tiny_model(cfg)
    assert model.rope_embed.jitter_coords == 1.5 and model.rope_embed.rescale_coords == 2.0
    x = images()
    with torch.no_grad():
        eval_a, eval_b = model(x), model(x)
        model.train()
        torch.manual_seed(5)
        train_a = model(x)
        torch.manual_seed(5)
        train_b = model(x)
        train_c = model(x)
    assert torch.equal(eval_a, eval_b)
    assert torch.equal(train_a, train_b)  # the draws come from torch's generator: restored RNG, same draws
    assert not torch.allclose(train_a, eval_a, atol=1e-4) and not torch.allclose(train_a, train_c, atol=1e-4)


def test_shift_moves_every_patch_by_one_offset():
    """Shift adds one offset per axis (within [-s, s]) to all patches: patch-to-patch relative positions are kept
    (see test_scores_depend_on_relative_position_only), only their position relative to the unrotated prefix moves."""
    rope = RopePositions(8, shift_coords=0.5).train()
    torch.manual_seed(0)
    shifted = rope.augment(rope.coords(3, 3))
    offset = shifted - rope.coords(3, 3)
    assert torch.allclose(offset, offset[:1].expand_as(offset)) and offset.abs().max() <= 0.5
    assert offset.abs().min() > 0


def test_rescale_draw_range():
    rope = RopePositions(8, rescale_coords=2.0).train()
    torch.manual_seed(0)
    base = rope.coords(4, 4)
    factors = torch.stack([(rope.augment(base) / base)[0, 0] for _ in range(200)])
    assert factors.min() >= 0.5 - 1e-6 and factors.max() <= 2.0 + 1e-6
    assert factors.min() < 0.6 and factors.max() > 1.7  # log-uniform over the whole range
    ratio = rope.augment(base) / base
    assert torch.allclose(ratio, ratio[0, 0].expand_as(ratio))  # one factor per call, for both axes
    jitter = RopePositions(8, jitter_coords=2.0).train()
    ratio = jitter.augment(base) / base
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio)) and not torch.isclose(ratio[0, 0], ratio[0, 1])


# ----------------------------------------------------------------------------------------------------------------
# config and export


def test_config_rejects_bad_rope_settings():
    with pytest.raises(ConfigError, match="rope_normalize_coords"):
        tiny_cfg("none", "student.rope_normalize_coords=diagonal")
    with pytest.raises(ConfigError, match="divisible by 4"):
        tiny_cfg("none", "student.embed_dim=36", "student.num_heads=6")  # head dim 6
    with pytest.raises(ConfigError, match="jitter_coords"):
        tiny_cfg("none", "student.rope_jitter_coords=0.5")
    with pytest.raises(ConfigError, match="pos_embed"):
        tiny_cfg("none", "student.pos_embed=sincos")


def test_export_round_trip(tmp_path):
    cfg = tiny_cfg("paper", "student.rope_normalize_coords=max", "student.norm_eps=1e-5")
    model = tiny_model(cfg)
    save_backbone(model, tmp_path / "export", cfg.student, cfg.spec)
    loaded = load_backbone(tmp_path / "export")
    assert loaded.rope_embed.normalize_coords == "max"
    assert {m.eps for m in loaded.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    x = images(16, 40)
    with torch.no_grad():
        a, b = model.forward_features(x), loaded.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert torch.equal(a[key], b[key])
    with pytest.raises(ExportError, match="RoPE"):
        save_backbone(model, tmp_path / "timm", cfg.student, cfg.spec, fmt="timm")


def test_learned_pos_embed_is_unchanged_by_default():
    cfg = load_config(overrides=["model=vit_pico", "student.depth=1"])
    model = build_backbone(cfg.student, cfg.spec, img_size=32)
    assert model.rope_embed is None and model.pos_embed.shape == (1, 1 + 4, 64)
    assert model.blocks[0].norm1.eps == 1e-6


def test_trains_with_subset_drop_path_and_crops_of_two_sizes():
    """The student's use: train mode (rescale on), batch-subset stochastic depth, global and local crops of
    different grids in one step; gradients reach every parameter and are finite."""
    cfg = tiny_cfg("paper", "student.drop_path_rate=0.4", "student.rope_rescale_coords=2.0")
    model = tiny_model(cfg).train()
    assert model.blocks[0].drop_path_mode == "subset"
    torch.manual_seed(0)
    masks = torch.rand(4, 16) < 0.3
    g = model.forward_features(images(n=4), masks)
    loss = g["x_norm_clstoken"].square().mean() + g["x_norm_patchtokens"].square().mean()
    loss = loss + model(images(16, 16, n=4)).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(gr is not None and torch.isfinite(gr).all() for n, gr in grads.items() if n != "mask_token")
    assert grads["mask_token"].abs().sum() > 0


FSDP2_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from dinospec.config import load_config
from dinospec.models.vit import build_backbone
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cfg = load_config(overrides=["model=vit_pico", "spec=paper", "student.depth=2", "student.embed_dim=32",
                             "student.num_heads=2", "student.patch_size=8", "student.pos_embed=rope"])
torch.manual_seed(0)
model = build_backbone(cfg.student, cfg.spec, img_size=32).eval()
x = torch.randn(2, 3, 24, 40)
with torch.no_grad():
    want = model(x)
seen = []
model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[2].sin.dtype))
mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
for block in model.blocks:
    fully_shard(block, mp_policy=mp)
fully_shard(model, mp_policy=mp)
with torch.no_grad():
    got = model(x)
print("DTYPE", seen[0], "DIFF", (got.float() - want).abs().max().item(), got.dtype)
dist.destroy_process_group()
"""


def test_fsdp2_bf16_keeps_the_rope_tables_in_fp32():
    """Under FSDP2's bf16 MixedPrecisionPolicy the blocks' inputs are cast to bf16; the RoPE tables reach
    attention in float32 all the same, and the output agrees with fp32 to bf16 accuracy (one gloo rank)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FSDP2_SCRIPT], capture_output=True, text=True, timeout=240, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("DTYPE"))
    _, dtype, _, diff, _ = line.split()
    assert dtype == "torch.float32"
    assert float(diff) < 0.1


@pytest.mark.slow
def test_training_run_with_rope_resumes_bitwise_and_exports(tmp_path):
    """`dinospec train` with RoPE and train-time coordinate augmentation on real images: 4 steps straight equal,
    bitwise, 2 steps + a resume to 4 (the augmentation's draws come back with the RNG state); losses finite; the
    run's teacher exports and loads as a RoPE backbone."""
    import json

    from conftest import run_cli
    from resume_harness import differences, final_state, train_args

    from dinospec.export import export_run

    rope = {"student.pos_embed": "rope", "student.rope_rescale_coords": 2.0, "student.rope_jitter_coords": 1.2,
            "student.rope_shift_coords": 0.1, "checkpoint.period_steps": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(train_args(straight, **rope, **{"train.max_steps": 4}))
    run_cli(train_args(resumed, **rope, **{"train.max_steps": 2}))
    run_cli(train_args(resumed, **rope, **{"train.max_steps": 4}))
    reference = final_state(straight, 4)
    assert not any("pos_embed" in k for k in reference)
    diffs = differences(reference, final_state(resumed, 4))
    assert not diffs, diffs[:6]
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    loaded = load_backbone(export_run(straight, tmp_path / "export"))
    assert loaded.rope_embed is not None and loaded.rope_embed.rescale_coords == 2.0
    with torch.no_grad():
        assert loaded.forward_features(images(24, 40))["x_norm_patchtokens"].shape == (2, 15, 32)
