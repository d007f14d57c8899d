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
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import synthetic_batch  # noqa: E402

from dinospec.config import CONFIG_DIR, load_config  # noqa: E402
from dinospec.ssl.gram_teacher import GramAnchor  # noqa: E402
from dinospec.ssl.meta_arch import SSLMetaArch  # noqa: E402
from dinospec.trainer import Trainee, train_step  # noqa: E402

CONFIGS = ("off", "on", "on_2x")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(CONFIG_DIR / "recipe" / "dinov3_vits16.yaml"))
    p.add_argument("--spec", default="none")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config([args.recipe], [f"spec={args.spec}", f"train.batch_size_per_gpu={args.batch}",
                                      f"crops.local_crops_number={args.local_crops}", "gram.enabled=true",
                                      f"dino.head_n_prototypes={args.prototypes}",
                                      f"ibot.head_n_prototypes={args.prototypes}"])
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

    def step(name: str) -> tuple[float, float]:
        trainee.gram = grams[name]
        w0, c0 = time.perf_counter(), time.process_time()
        losses = train_step(trainee, batch, at)
        assert ("gram_loss" in losses) == (name != "off")
        return time.perf_counter() - w0, time.process_time() - c0

    for name in CONFIGS:  # warm-up
        step(name)
    wall: dict[str, list[float]] = {n: [] for n in CONFIGS}
    cpu: dict[str, list[float]] = {n: [] for n in CONFIGS}
    for rep in range(args.reps):
        for name in CONFIGS[rep % 3:] + CONFIGS[:rep % 3]:
            w, c = step(name)
            wall[name].append(w)
            cpu[name].append(c)
    result = {"recipe": Path(args.recipe).name, "spec": args.spec, "batch": args.batch, "global_size": size,
              "local_crops": args.local_crops, "prototypes": args.prototypes, "threads": args.threads,
              "reps": args.reps, "cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
              "wall_s": {n: statistics.median(v) for n, v in wall.items()}}
    result["cpu_ratio"] = {n: result["cpu_s"][n] / result["cpu_s"]["off"] for n in CONFIGS[1:]}
    result["wall_ratio"] = {n: result["wall_s"][n] / result["wall_s"]["off"] for n in CONFIGS[1:]}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
