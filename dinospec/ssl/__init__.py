"""Self-supervised training pieces: losses, schedules, optimizer groups (the meta-architecture lives in meta_arch)."""

from dinospec.ssl.losses import (
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
    update_center,
)
from dinospec.ssl.optim import apply_schedules, build_optimizer, param_groups, param_rules
from dinospec.ssl.schedules import CosineSchedule, Schedules, build_schedules, scaled_lr

__all__ = [
    "CosineSchedule",
    "DINOLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "Schedules",
    "apply_schedules",
    "build_optimizer",
    "build_schedules",
    "param_groups",
    "param_rules",
    "scaled_lr",
    "sinkhorn_knopp_teacher",
    "softmax_center_teacher",
    "update_center",
]
