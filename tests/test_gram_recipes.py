"""The DINOv3 phase recipes (configs/recipe/dinov3_*.yaml), stacked as the README runs them, with spec presets on
top: each validates, builds its backbone (RoPE, registers, the spec's routed copies), runs a forward at its global
crop size, and gives finite schedules; the phases differ where they should."""

from __future__ import annotations

import pytest
import torch

from dinospec.config import CONFIG_DIR, load_config
from dinospec.models.vit import build_backbone
from dinospec.ssl.schedules import build_schedules

RECIPES = CONFIG_DIR / "recipe"
PHASES = {
    "pretrain": ["dinov3_vits16.yaml"],
    "gram": ["dinov3_vits16.yaml", "dinov3_gram.yaml"],
    "highres": ["dinov3_vits16.yaml", "dinov3_gram.yaml", "dinov3_highres.yaml"],
}


@pytest.mark.parametrize("spec", ["none", "paper", "final_norm"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_phase_recipe_with_spec_builds(phase: str, spec: str) -> None:
    cfg = load_config([RECIPES / f for f in PHASES[phase]], [f"spec={spec}", "train.max_steps=10"])
    assert cfg.student.pos_embed == "rope" and cfg.student.patch_size == 16 and cfg.student.num_register_tokens == 4
    assert cfg.gram.enabled == (phase != "pretrain")
    assert cfg.crops.global_crops_size == (512 if phase == "highres" else 224)
    size = cfg.crops.global_crops_size
    model = build_backbone(cfg.student, cfg.spec, img_size=size).eval()
    routed = [n for n, _ in model.named_parameters() if n.startswith("blocks.0.norm1.1.")]
    assert bool(routed) == (spec == "paper")
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, size, size))
    assert out["x_norm_patchtokens"].shape == (1, (size // 16) ** 2, 384)
    assert out["x_norm_regtokens"].shape == (1, 4, 384)
    sched = build_schedules(cfg, None, cfg.train.batch_size_per_gpu)
    assert all(torch.isfinite(torch.tensor(list(sched.at(0).values()))))
