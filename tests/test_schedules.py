"""Schedules at key steps vs hand-computed values, lr scaling, and optimizer groups on a real routed ViT."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from dinospec.config import load_config
from dinospec.models.heads import DINOHead
from dinospec.models.vit import build_backbone
from dinospec.ssl.optim import apply_schedules, build_optimizer, param_groups, param_rules
from dinospec.ssl.schedules import CosineSchedule, build_schedules, scaled_lr

TINY = ["model=vit_pico", "spec=paper", "student.depth=3", "student.num_register_tokens=2", "student.patch_size=8",
        "crops.global_crops_size=32", "crops.local_crops_size=16"]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# schedules


def test_cosine_schedule_key_steps():
    s = CosineSchedule(1.0, 0.1, total_iters=12, warmup_iters=3, start_warmup=0.4, freeze_iters=1)
    assert s[0] == 0.0  # frozen
    assert [round(s[i], 12) for i in (1, 2, 3)] == [0.4, 0.7, 1.0]  # warmup, both ends included
    assert _close(s[4], 1.0)  # the cosine starts at base
    assert _close(s[8], 0.55)  # halfway through the 8 cosine steps: the midpoint of base and final
    assert _close(s[11], 0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)))
    assert s[12] == 0.1 and s[10**9] == 0.1  # clamped past the end

    # the same as DINOv2's array construction, at every step
    expected = np.concatenate([np.zeros(1), np.linspace(0.4, 1.0, 3),
                               0.1 + 0.45 * (1 + np.cos(np.pi * np.arange(8) / 8))])
    np.testing.assert_allclose([s[i] for i in range(12)], expected, rtol=1e-12)

    assert CosineSchedule(0.5, 0.5, 0)[0] == 0.5  # empty schedule: final everywhere
    assert CosineSchedule(0.07, 0.07, 1, warmup_iters=1, start_warmup=0.04)[0] == 0.04  # linspace of 1 point
    with pytest.raises(ValueError, match="warmup"):
        CosineSchedule(1.0, 0.0, total_iters=5, warmup_iters=6)
    with pytest.raises(IndexError):
        s[-1]


def test_build_schedules_from_config():
    cfg = load_config(overrides=["train.official_epoch_length=10", "optim.epochs=6", "optim.warmup_epochs=2",
                                 "optim.freeze_last_layer_epochs=1", "teacher.warmup_teacher_temp_epochs=3",
                                 "optim.base_lr=0.004", "optim.min_lr=1e-6"])
    s = build_schedules(cfg, None, total_batch=256)  # 60 steps; peak lr 0.004 * sqrt(256 / 1024) = 0.002
    peak = 0.002
    assert s.lr[0] == 0.0 and _close(s.lr[10], peak * 10 / 19) and _close(s.lr[19], peak) and _close(s.lr[20], peak)
    assert _close(s.lr[40], 1e-6 + 0.5 * (peak - 1e-6))  # half of the 40 cosine steps
    assert s.lr[60] == 1e-6
    assert [s.last_layer_lr[i] for i in range(10)] == [0.0] * 10  # frozen during the first epoch
    assert s.last_layer_lr[10] == s.lr[10] and s.last_layer_lr[59] == s.lr[59]
    assert s.teacher_temp[0] == 0.04 and _close(s.teacher_temp[15], 0.04 + 0.03 * 15 / 29)
    assert _close(s.teacher_temp[29], 0.07) and s.teacher_temp[30] == 0.07 and s.teacher_temp[10**6] == 0.07
    assert _close(s.momentum[0], 0.992) and _close(s.momentum[30], 0.996) and s.momentum[60] == 1.0
    assert _close(s.wd[0], 0.04) and _close(s.wd[30], 0.22) and s.wd[60] == 0.4

    # pure functions of the step: a fresh build (a resumed run) gives the same values, queried in any order
    again = build_schedules(cfg, None, total_batch=256)
    for step in (59, 3, 31, 0, 17):
        assert again.at(step) == s.at(step)
    assert set(s.at(0)) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}

    longer = build_schedules(cfg, 100, total_batch=256)  # explicit length: the cosine spans steps 20..99
    assert _close(longer.lr[60], 1e-6 + 0.5 * (peak - 1e-6)) and longer.lr[100] == 1e-6


def test_lr_scaling_rules():
    assert _close(scaled_lr(0.004, "sqrt_wrt_1024", 4096), 0.008)
    assert _close(scaled_lr(0.004, "sqrt_wrt_1024", 1024), 0.004)
    assert _close(scaled_lr(0.001, "linear_wrt_256", 512), 0.002)
    assert scaled_lr(0.004, "none", 7) == 0.004
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(0.004, "sqrt", 64)
    cfg = load_config(overrides=["optim.scaling_rule=linear_wrt_256", "optim.base_lr=0.001"])
    s = build_schedules(cfg, None, total_batch=64)
    assert _close(s.lr[cfg.optim.warmup_epochs * cfg.train.official_epoch_length], 0.00025)


# ---------------------------------------------------------------------------------------------------------------
# parameter groups on a real routed ViT (paper spec) with student / teacher names


class Wrapped(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.student = nn.ModuleDict({"backbone": build_backbone(cfg.student, cfg.spec, img_size=32),
                                      "dino_head": DINOHead(64, 32, hidden_dim=48, bottleneck_dim=16)})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)


def test_param_group_membership_and_multipliers():
    cfg = load_config(overrides=TINY)
    model = Wrapped(cfg)
    rules = param_rules(model, layerwise_decay=0.9, patch_embed_lr_mult=0.2, num_layers=3)
    expected = {  # name -> (layer id, lr multiplier, wd multiplier, is_last_layer); top layer id = 4
        "student.backbone.cls_token": (0, 0.6561, 0.0, False),
        "student.backbone.pos_embed": (0, 0.6561, 0.0, False),
        "student.backbone.register_tokens": (0, 0.6561, 0.0, False),
        "student.backbone.mask_token": (0, 0.6561, 0.0, False),
        "student.backbone.patch_embed.proj.weight": (0, 0.13122, 1.0, False),
        "student.backbone.patch_embed.proj.bias": (0, 0.13122, 0.0, False),
        "student.backbone.blocks.0.norm1.1.weight": (1, 0.729, 0.0, False),
        "student.backbone.blocks.0.attn.qkv.1.weight": (1, 0.729, 1.0, False),
        "student.backbone.blocks.0.attn.qkv.1.bias": (1, 0.729, 0.0, False),
        "student.backbone.blocks.1.ls1.0.gamma": (2, 0.81, 0.0, False),
        "student.backbone.blocks.1.attn.qkv.weight": (2, 0.81, 1.0, False),
        "student.backbone.blocks.2.mlp.fc1.weight": (3, 0.9, 1.0, False),
        "student.backbone.blocks.2.norm2.0.bias": (3, 0.9, 0.0, False),
        "student.backbone.norm.weight": (4, 1.0, 0.0, False),
        "student.dino_head.mlp.0.weight": (4, 1.0, 1.0, False),
        "student.dino_head.mlp.4.bias": (4, 1.0, 0.0, False),
        "student.dino_head.last_layer.weight": (4, 1.0, 1.0, True),
    }
    for name, (layer_id, lr_mult, wd_mult, last) in expected.items():
        r = rules[name]
        assert (r.layer_id, r.wd_multiplier, r.is_last_layer) == (layer_id, wd_mult, last), name
        assert math.isclose(r.lr_multiplier, lr_mult, rel_tol=1e-12), name
    assert not any(n.startswith("teacher.") for n in rules)  # frozen parameters are left out
    assert all(r.wd_multiplier == 0.0 for n, r in rules.items() if n.endswith((".gamma", ".bias")) or ".norm" in n)

    groups = param_groups(model, 0.9, 0.2, num_layers=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(set(keys)) == len(keys) == 12  # tokens, patch w + b, 3 blocks x 2 and top x 2 (decay or not), last
    by_id = {id(p): rules[n] for n, p in model.named_parameters() if p.requires_grad}
    for g in groups:
        for p in g["params"]:
            r = by_id[id(p)]
            assert (r.lr_multiplier, r.wd_multiplier, r.is_last_layer) == (g["lr_multiplier"], g["wd_multiplier"],
                                                                            g["is_last_layer"])
    with pytest.raises(ValueError, match="block 2"):
        param_rules(model, 0.9, 0.2, num_layers=2)


def test_optimizer_schedules_and_last_layer_freeze():
    cfg = load_config(overrides=TINY + ["optim.adamw_beta2=0.99"])
    model = Wrapped(cfg)
    opt = build_optimizer(model, cfg)  # num_layers from the config: depth 3
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["foreach"] is True
    apply_schedules(opt, lr=0.01, wd=0.05, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == (0.0 if g["is_last_layer"] else 0.01 * g["lr_multiplier"])
        assert g["weight_decay"] == 0.05 * g["wd_multiplier"]

    last = model.student.dino_head.last_layer.weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    logits = model.student.dino_head(model.student.backbone(x))
    torch.logsumexp(logits, dim=-1).mean().backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(last, before["student.dino_head.last_layer.weight"])  # frozen: lr 0 (and so no decay)
    assert not torch.equal(model.student.dino_head.mlp[0].weight, before["student.dino_head.mlp.0.weight"])
    assert not torch.equal(model.student.backbone.cls_token, before["student.backbone.cls_token"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("teacher."))

    apply_schedules(opt, lr=0.01, wd=0.05, last_layer_lr=0.01)  # after the freeze the last layer moves
    opt.step()
    assert not torch.equal(last, before["student.dino_head.last_layer.weight"])
