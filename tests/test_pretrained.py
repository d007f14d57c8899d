"""Continued pretraining end to end: `dinospec train student.pretrained_weights=...` through the real CLI.

A vanilla backbone is saved (as a dinospec export, and as a DINOv2-format .pth), then a run with the paper's spec
starts from it. With lr 0 (optim.base_lr=0, and the warmup starts at 0 anyway) one real step changes no weight, so
the step-1 checkpoint shows what training started from: every backbone tensor of student and teacher equals the
source's, every routed copy equals the shared source tensor, and the heads are the fresh init a run without
pretrained weights gets from the same seed (the trainer seeds, then builds the model).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import photos_dir, run_cli, tiny_overrides
from dinospec.checkpoint import load_model_state
from dinospec.config import load_config
from dinospec.export import resolve_step_dir, save_backbone
from dinospec.models.vit import build_backbone
from dinospec.ssl.meta_arch import SSLMetaArch

IMG = 32  # tiny_overrides' global crop size: the export's position grid fits without resizing
# a routed slot's copy: blocks.0.norm1.1.weight -> blocks.0.norm1.weight (the group index dropped)
ROUTED = re.compile(r"^(blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp|ls1|ls2)|norm)\.\d+\.(.+)$")
# the size of the ViT tiny_overrides trains; the spec here is vanilla
VANILLA = ["model=vit_pico", "spec=none", "student.embed_dim=32", "student.depth=3", "student.num_heads=2",
           "student.patch_size=8", "student.num_register_tokens=1", "student.drop_path_rate=0.0"]
NO_UPDATE = {"optim.base_lr": 0.0, "optim.min_lr": 0.0, "train.max_steps": 1}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Any]:
    """Trained-looking vanilla weights (norms, LayerScale, tokens all away from their init), exported."""
    cfg = load_config(overrides=VANILLA)
    torch.manual_seed(123)
    model = build_backbone(cfg.student, cfg.spec, img_size=IMG)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("pretrained")
    save_backbone(model, out / "export", cfg.student, cfg.spec)
    return {"export_dir": out / "export", "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _fresh_init(cfg) -> dict[str, torch.Tensor]:
    """Student and teacher as a run of `cfg` without pretrained weights starts (the trainer seeds, then builds)."""
    torch.manual_seed(cfg.train.seed)
    return SSLMetaArch(cfg).state_dict()


def _state(run_dir: Path, prefix: str) -> dict[str, torch.Tensor]:
    return load_model_state(resolve_step_dir(run_dir), prefix=prefix)


def _train_from(weights: Path, run_dir: Path, **extra: object) -> dict[str, torch.Tensor]:
    """Train one lr-0 step from `weights`; return the fresh init of the same config without them."""
    overrides = tiny_overrides(run_dir, photos_dir(), **NO_UPDATE, **{"student.pretrained_weights": str(weights)},
                               **extra)
    cfg = load_config(overrides=overrides)
    assert cfg.spec.qkv != "none" and cfg.spec.norm1 == "all"  # a paper-like spec: the source must be routed into it
    run_cli(["train", *overrides])
    return _fresh_init(load_config(overrides=[*overrides, "student.pretrained_weights=null"]))


def _assert_started_from(run_dir: Path, source: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]) -> None:
    assert resolve_step_dir(run_dir).name == "step_1"
    for part in ("student", "teacher"):
        backbone = _state(run_dir, f"{part}.backbone.")
        routed = [k for k in backbone if ROUTED.match(k)]
        assert len(routed) > 10, f"the {part} backbone has no routed copies: the spec did not apply"
        shared_names = {ROUTED.sub(r"\1.\2", k) for k in backbone}
        assert shared_names == set(source), f"{part}: the keys do not map onto the source's"
        for key, value in backbone.items():
            plain = ROUTED.sub(r"\1.\2", key)  # a routed copy must equal the shared source tensor
            assert torch.equal(value, source[plain]), f"{part}.backbone.{key} differs from the source's {plain}"
        assert not torch.equal(fresh[f"{part}.backbone.blocks.0.attn.qkv.0.weight"],
                               backbone["blocks.0.attn.qkv.0.weight"])  # the source is not what init gives anyway
        # heads: not in the weights file, so the fresh init of the same seed
        heads = _state(run_dir, f"{part}.dino_head.")
        assert heads.keys() == {k[len(f"{part}.dino_head."):] for k in fresh if k.startswith(f"{part}.dino_head.")}
        for key in heads:
            assert torch.equal(heads[key], fresh[f"{part}.dino_head.{key}"]), f"{part}.dino_head.{key} is not fresh"


def test_continue_from_a_dinospec_export(tmp_path, source):
    fresh = _train_from(source["export_dir"], tmp_path / "run")
    _assert_started_from(tmp_path / "run", source["state"], fresh)


def test_continue_from_a_dinov2_teacher_checkpoint(tmp_path, source):
    """DINOv2's teacher_checkpoint.pth layout: {"teacher": {"backbone.<DINOv2 key>": ..., "dino_head.*": ...}};
    dinospec's vanilla keys are DINOv2's, so a vanilla state dict under that wrapper is one."""
    teacher = {f"backbone.{k}": v for k, v in source["state"].items()}
    teacher["dino_head.last_layer.weight_g"] = torch.ones(128, 1)  # heads in the file are ignored, not loaded
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    # a DINOv2 checkpoint with registers: DINOv2's register models interpolate with antialias and no offset
    # (the defaults, for the models without registers, are refused: test_export.py)
    fresh = _train_from(tmp_path / "teacher_checkpoint.pth", tmp_path / "run",
                        **{"student.interpolate_offset": 0.0, "student.interpolate_antialias": True})
    _assert_started_from(tmp_path / "run", source["state"], fresh)
