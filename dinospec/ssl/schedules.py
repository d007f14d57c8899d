"""Per-step schedules of DINOv2 (lr, weight decay, teacher momentum, teacher temperature, last-layer lr).

Every schedule is a pure function of the step, computed in closed form: a resumed run asks for step k and gets
exactly the value an uninterrupted run had, with no state to checkpoint and no array of length total_steps.
Epochs are DINOv2's "official" epochs: ``train.official_epoch_length`` iterations, whatever the data size.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple


class CosineSchedule:
    """DINOv2's CosineScheduler: `freeze_iters` zeros, a linear warmup from `start_warmup` to `base` over
    `warmup_iters` steps (both ends included), then a half cosine from `base` towards `final` over the remaining
    steps; any step >= total_iters gives `final`.
    """

    def __init__(self, base: float, final: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup: float = 0.0, freeze_iters: int = 0):
        if min(total_iters, warmup_iters, freeze_iters) < 0:
            raise ValueError("schedule lengths must be >= 0")
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(f"warmup ({warmup_iters} steps) + freeze ({freeze_iters} steps) is longer than the "
                             f"schedule ({total_iters} steps): shorten the warmup or lengthen the run")
        self.base, self.final = float(base), float(final)
        self.total_iters, self.warmup_iters, self.freeze_iters = total_iters, warmup_iters, freeze_iters
        self.start_warmup = float(start_warmup)

    def __getitem__(self, step: int) -> float:
        if step < 0:
            raise IndexError(f"schedule step must be >= 0, got {step}")
        if step >= self.total_iters:
            return self.final
        if step < self.freeze_iters:
            return 0.0
        step -= self.freeze_iters
        if step < self.warmup_iters:  # numpy.linspace(start_warmup, base, warmup_iters)[step]
            if self.warmup_iters == 1:
                return self.start_warmup
            return self.start_warmup + (self.base - self.start_warmup) * step / (self.warmup_iters - 1)
        step -= self.warmup_iters
        cosine_iters = self.total_iters - self.warmup_iters - self.freeze_iters
        return self.final + 0.5 * (self.base - self.final) * (1.0 + math.cos(math.pi * step / cosine_iters))

    __call__ = __getitem__


class ZeroedPrefix:
    """Another schedule with its first `zero_iters` steps set to 0 (DINOv2's frozen-last-layer lr)."""

    def __init__(self, schedule: CosineSchedule, zero_iters: int):
        self.schedule, self.zero_iters = schedule, zero_iters

    def __getitem__(self, step: int) -> float:
        return 0.0 if 0 <= step < self.zero_iters else self.schedule[step]

    __call__ = __getitem__


class Schedules(NamedTuple):
    lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_lr: ZeroedPrefix

    def at(self, step: int) -> dict[str, float]:
        """Every scheduled value at `step` (for applying and logging)."""
        return {name: schedule[step] for name, schedule in self._asdict().items()}


def scaled_lr(base_lr: float, scaling_rule: str, total_batch: int) -> float:
    """The peak lr for a total batch (all ranks): sqrt_wrt_1024 (DINOv2), linear_wrt_256, or none."""
    if total_batch < 1:
        raise ValueError(f"total batch must be >= 1, got {total_batch}")
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return base_lr * total_batch / 256.0
    if scaling_rule == "none":
        return base_lr
    raise ValueError(f"unknown optim.scaling_rule {scaling_rule!r} (sqrt_wrt_1024, linear_wrt_256, none)")


def build_schedules(cfg: Any, total_steps: int | None, total_batch: int) -> Schedules:
    """DINOv2's build_schedulers in steps. `total_steps` = the length of the lr / wd / momentum cosines (None:
    optim.epochs * official_epoch_length, as DINOv2); `total_batch` = batch_size_per_gpu * world_size (scales lr).
    Warmups and the last-layer freeze are given in epochs and converted with official_epoch_length."""
    epoch = cfg.train.official_epoch_length
    o, t = cfg.optim, cfg.teacher
    total = o.epochs * epoch if total_steps is None else total_steps
    peak_lr = scaled_lr(o.base_lr, o.scaling_rule, total_batch)
    lr = CosineSchedule(peak_lr, o.min_lr, total, warmup_iters=o.warmup_epochs * epoch, start_warmup=0.0)
    temp_warmup = t.warmup_teacher_temp_epochs * epoch
    return Schedules(
        lr=lr,
        wd=CosineSchedule(o.weight_decay, o.weight_decay_end, total),
        momentum=CosineSchedule(t.momentum_teacher, t.final_momentum_teacher, total),
        teacher_temp=CosineSchedule(t.teacher_temp, t.teacher_temp, temp_warmup, warmup_iters=temp_warmup,
                                    start_warmup=t.warmup_teacher_temp),
        last_layer_lr=ZeroedPrefix(lr, o.freeze_last_layer_epochs * epoch),
    )


def teacher_init_share(momentum: CosineSchedule, steps: int) -> float:
    """The share of its initial weights the EMA teacher still holds after `steps` updates: prod_t momentum[t].

    DINOv2's 0.992 -> 1 cosine leaves ~0 of the init after its 125k steps but ~30% after 300 steps: a short run's
    teacher is then mostly its random init, and its targets say little about the images.
    """
    log_share = sum(math.log(max(momentum[t], 1e-300)) for t in range(steps))
    return math.exp(log_share)


def momentum_for_run(steps: int, share: float = 0.05, final: float = 1.0) -> float:
    """The largest start momentum whose cosine to `final` leaves at most `share` of the init after `steps` steps
    (a bisection over teacher_init_share): what a short run's teacher.momentum_teacher should be at most."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if teacher_init_share(CosineSchedule(mid, final, steps), steps) > share:
            hi = mid
        else:
            lo = mid
    return lo
