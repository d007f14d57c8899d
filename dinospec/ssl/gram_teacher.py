"""Gram anchoring in training (DINOv3): a frozen Gram teacher, when it is taken and refreshed, and its loss term.

The Gram teacher is a copy of the EMA teacher's backbone taken at step ``gram.start_step`` and retaken every
``gram.refresh_period_steps`` steps after it. It is frozen between refreshes, so its weights cannot be recomputed
from the student or the EMA teacher of a later step: they are run state and go into every checkpoint (the
trainer's ``state["gram"]``), together with the step they were taken at. Until ``start_step`` it holds a copy of
the initial teacher and gives no loss.

It is a plain module replicated on every rank (never sharded, never wrapped by DDP): under FSDP2 a refresh gathers
each sharded teacher parameter in full on every rank. It runs in eval mode (no RoPE coordinate augmentation: a
refresh or a forward draws nothing from the RNG, so a run's random stream does not depend on Gram anchoring).

``gram.img_size`` larger than the global crops: the Gram teacher sees the student's global crops upsampled to that
size (bicubic), and its patch grid is resized back onto the student's (``resize_patch_grid``). DINOv3 instead
crops the larger view from the source image; upsampling the crop keeps the data pipeline unchanged and still gives
the teacher its finer, high-resolution feature map.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.ssl.gram import GramLoss, resize_patch_grid


def _full(t: Tensor) -> Tensor:
    """A parameter in full: a DTensor (FSDP2 shard) is gathered, a plain tensor is returned as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class GramAnchor(nn.Module):
    """Frozen Gram teacher backbone + GramLoss + the refresh schedule; its state_dict is what a checkpoint needs."""

    def __init__(self, cfg: Any, teacher_backbone: nn.Module):
        """cfg: the run config (its `gram` section); teacher_backbone: the EMA teacher's backbone, not yet sharded
        (its initial weights are copied, so the module's state is defined before the first refresh)."""
        super().__init__()
        from dinospec.ssl.meta_arch import build_teacher_backbone

        g = cfg.gram
        self.start_step, self.period = int(g.start_step), int(g.refresh_period_steps)
        self.img_size = int(g.img_size or cfg.crops.global_crops_size)
        self.patch_size = int(cfg.student.patch_size)
        self.loss_fn = GramLoss(normalized=g.normalized, img_level=g.img_level, remove_neg=g.remove_neg,
                                remove_only_teacher_neg=g.remove_only_teacher_neg, tokens_used=g.tokens_used)
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: keep the run's RNG stream as is
            self.backbone = build_teacher_backbone(cfg)
        self.backbone.load_state_dict(teacher_backbone.state_dict())
        self.backbone.requires_grad_(False)
        self.register_buffer("taken_step", torch.tensor(-1, dtype=torch.long))  # -1: not taken yet
        self.eval()

    def train(self, mode: bool = True) -> "GramAnchor":
        """Always eval: a frozen feature extractor (no coordinate augmentation, no RNG draws)."""
        return super().train(False)

    @property
    def active(self) -> bool:
        """Whether the Gram loss is computed (the teacher has been taken)."""
        return int(self.taken_step) >= 0

    def due(self, step: int) -> bool:
        """Take (or retake) the Gram teacher before `step`: at start_step, every period after it, and at the first
        step run past start_step when it was never taken (Gram anchoring switched on when resuming a later step)."""
        if step < self.start_step:
            return False
        if not self.active:
            return True
        return self.period > 0 and step > int(self.taken_step) and (step - self.start_step) % self.period == 0

    @torch.no_grad()
    def refresh(self, teacher_backbone: nn.Module, step: int) -> None:
        """Copy the EMA teacher backbone's current weights (every rank calls it together: FSDP2 gathers)."""
        target = self.backbone.state_dict()
        source = dict(teacher_backbone.named_parameters()) | dict(teacher_backbone.named_buffers())
        missing = set(target) - set(source)
        if missing:
            raise RuntimeError(f"gram: the teacher backbone lacks {sorted(missing)[:3]}")
        for name, value in target.items():
            value.copy_(_full(source[name]).detach())
        self.taken_step.fill_(step)

    def loss(self, student_patches: Tensor, global_crops: Tensor, masks: Tensor) -> Tensor:
        """Gram loss of the student's global-crop patch features (2B, N, D) against the Gram teacher's on the same
        crops (at gram.img_size, resized onto the student's grid); masks (2B, N) True = masked token."""
        h, w = (s // self.patch_size for s in global_crops.shape[-2:])
        with torch.no_grad():
            crops = global_crops
            if self.img_size != global_crops.shape[-1] or self.img_size != global_crops.shape[-2]:
                crops = F.interpolate(global_crops, size=(self.img_size, self.img_size), mode="bicubic",
                                      align_corners=False, antialias=False)
            teacher = self.backbone.forward_features(crops)["x_norm_patchtokens"]
            grid = (crops.shape[-2] // self.patch_size, crops.shape[-1] // self.patch_size)
            teacher = resize_patch_grid(teacher, grid, (h, w))
        return self.loss_fn(student_patches, teacher, masks)
