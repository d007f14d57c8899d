"""Distillation's cost: one full training step of a student distilled from a frozen teacher, against one normal SSL
step of the same student (its own EMA teacher giving the targets), on CPU fp32, same batch, in the same run.

A step is the trainer's train_step (dinospec/trainer.py): `losses` (teacher targets, student forward), backward,
per-part clipping, AdamW step, EMA update, every config at the `ssl` recipe's schedules. Configs: `ssl` (SSLMetaArch
of the recipe's student), `distill` (DistillMetaArch: the same student, a frozen ViT-B/16 teacher by default) and
`distill_2` (a second student, the same size with the `paper` spec, beside it). The teacher is a randomly
initialised backbone written as a dinospec export into a temporary directory and read back as a run reads
`distill.teacher` (timing does not depend on its weights). Inputs: synthetic pixels of the loader's shapes with real iBOT block masks (scripts/bench_train_step.py's),
data loading excluded. Configs are stepped in rotating order after one warm-up step each; per config the median of
process CPU time and of wall time per step, and ratios against `ssl`. Use --threads 1 on a shared machine.

    .venv/bin/python scripts/bench_distill.py --batch 2 --reps 3 --threads 1 --json bench_distill.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import synthetic_batch  # noqa: E402
from step_timing import add_step_arguments, report, size_overrides, time_rotating  # noqa: E402

from dinospec.config import CONFIG_DIR, load_config  # noqa: E402
from dinospec.export import save_backbone  # noqa: E402
from dinospec.models.vit import build_backbone  # noqa: E402
from dinospec.ssl.distill import DistillMetaArch  # noqa: E402
from dinospec.ssl.meta_arch import SSLMetaArch  # noqa: E402
from dinospec.trainer import Trainee, train_step  # noqa: E402

CONFIGS = ("ssl", "distill", "distill_2")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(p, reps=3)
    p.add_argument("--teacher-arch", default="vit_base")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common = size_overrides(args)
    recipes = [args.recipe, str(CONFIG_DIR / "recipe" / "dinov3_distill.yaml")]
    with tempfile.TemporaryDirectory() as tmp:
        teacher_cfg = load_config([args.recipe], [f"student.arch={args.teacher_arch}"])
        torch.manual_seed(1)
        teacher = build_backbone(teacher_cfg.student, teacher_cfg.spec, img_size=teacher_cfg.crops.global_crops_size)
        save_backbone(teacher.eval(), Path(tmp) / "teacher", teacher_cfg.student, teacher_cfg.spec)
        del teacher
        cfgs = {"ssl": load_config([args.recipe], common)}
        distill = [*common, f"distill.teacher={Path(tmp) / 'teacher'}"]
        cfgs["distill"] = load_config(recipes, distill)
        cfgs["distill_2"] = load_config(recipes, [*distill, "distill.students=[{spec: paper}]"])
        metas = {}
        for name, cfg in cfgs.items():
            torch.manual_seed(0)
            metas[name] = (DistillMetaArch if cfg.distill.enabled else SSLMetaArch)(cfg)
    trainees = {n: Trainee.build(cfgs[n], m, torch.device("cpu")) for n, m in metas.items()}
    for t in trainees.values():  # the ssl recipe's schedules for all (the distill recipe's teacher temperature differs)
        t.sched = trainees["ssl"].sched
    cfg = cfgs["ssl"]
    at = cfg.optim.warmup_epochs * cfg.train.official_epoch_length + 1  # after warmup and freeze
    batch = synthetic_batch(cfg)

    def step(name: str) -> None:
        losses = train_step(trainees[name], batch, at)
        assert ("dino_loss_s1" in losses) == (name == "distill_2")

    result = {"recipe": Path(args.recipe).name, "teacher_arch": args.teacher_arch, "batch": args.batch,
              "global_size": cfg.crops.global_crops_size, "local_crops": args.local_crops,
              "prototypes": args.prototypes, "threads": args.threads, "reps": args.reps,
              **time_rotating(step, CONFIGS, args.reps)}
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
