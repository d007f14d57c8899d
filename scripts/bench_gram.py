"""Gram anchoring's cost: one full SSL training step on CPU fp32 with the Gram loss off, on (Gram teacher at the
global crop size) and on at twice the size (the crops upsampled for the Gram teacher), same model, same batch.

A step is the trainer's train_step (dinospec/trainer.py): SSLMetaArch.losses (with or without the run's GramAnchor,
whose teacher has been taken), backward, per-part clipping, AdamW step, EMA teacher update. One model and optimizer
serve every config (only the Gram term differs), so the ratios measure Gram anchoring alone. Inputs: synthetic
pixels of the loader's shapes with real iBOT block masks (scripts/bench_train_step.py's), data loading excluded.
Configs are stepped in rotating order after one warm-up step each; per config the median of process CPU time and
of wall time per step, and ratios against `off` measured in the same run. Use --threads 1 on a shared machine
(one thread's CPU time is the step's compute).

    .venv/bin/python scripts/bench_gram.py --batch 2 --reps 5 --threads 1 --json bench_gram.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import synthetic_batch  # noqa: E402
from step_timing import add_step_arguments, report, size_overrides, time_rotating  # noqa: E402

from dinospec.config import load_config  # noqa: E402
from dinospec.ssl.gram_teacher import GramAnchor  # noqa: E402
from dinospec.ssl.meta_arch import SSLMetaArch  # noqa: E402
from dinospec.trainer import Trainee, train_step  # noqa: E402

CONFIGS = ("off", "on", "on_2x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(p, reps=5)
    p.add_argument("--spec", default="none")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config([args.recipe], [f"spec={args.spec}", "gram.enabled=true", *size_overrides(args)])
    size = cfg.crops.global_crops_size
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg)
    grams = {"off": None, "on": GramAnchor(cfg, meta.teacher.backbone)}
    cfg2x = load_config([args.recipe], [f"spec={args.spec}", "gram.enabled=true", f"gram.img_size={2 * size}"])
    grams["on_2x"] = GramAnchor(cfg2x, meta.teacher.backbone)
    at = cfg.optim.warmup_epochs * cfg.train.official_epoch_length + 1  # after warmup and freeze
    for g in grams.values():
        if g is not None:  # taken at the step every config runs: train_step does not take it again there
            g.refresh(meta.teacher.backbone, at)
    trainee = Trainee.build(cfg, meta, torch.device("cpu"))
    batch = synthetic_batch(cfg)

    def step(name: str) -> None:
        trainee.gram = grams[name]
        losses = train_step(trainee, batch, at)
        assert ("gram_loss" in losses) == (name != "off")

    result = {"recipe": Path(args.recipe).name, "spec": args.spec, "batch": args.batch, "global_size": size,
              "local_crops": args.local_crops, "prototypes": args.prototypes, "threads": args.threads,
              "reps": args.reps, **time_rotating(step, CONFIGS, args.reps)}
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
