"""What the CPU step benchmarks (bench_gram.py, bench_distill.py) share: their common arguments and the timing of
several configs' steps in rotating order, as medians and ratios against the first config measured in the same run
(a shared, noisy machine: only ratios taken side by side mean anything)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from dinospec.config import CONFIG_DIR


def add_step_arguments(p: argparse.ArgumentParser, reps: int) -> None:
    p.add_argument("--recipe", default=str(CONFIG_DIR / "recipe" / "dinov3_vits16.yaml"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--threads", type=int, default=1, help="1 on a shared machine: CPU time is then the compute")
    p.add_argument("--json", default=None)


def size_overrides(args: argparse.Namespace) -> list[str]:
    """The batch, local crops and prototype counts of the arguments as config overrides."""
    return [f"train.batch_size_per_gpu={args.batch}", f"crops.local_crops_number={args.local_crops}",
            f"dino.head_n_prototypes={args.prototypes}", f"ibot.head_n_prototypes={args.prototypes}"]


def time_rotating(step: Callable[[str], Any], names: Sequence[str], reps: int) -> dict[str, dict[str, float]]:
    """One warm-up step per config, then `reps` rounds in rotating order; the median wall and process-CPU seconds
    per config and their ratios to names[0]'s."""
    for name in names:
        step(name)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in [*names[k:], *names[:k]]:
            w0, c0 = time.perf_counter(), time.process_time()
            step(name)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    out = {"cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
           "wall_s": {n: statistics.median(v) for n, v in wall.items()}}
    for kind in ("cpu", "wall"):
        base = out[f"{kind}_s"][names[0]]
        out[f"{kind}_ratio"] = {n: out[f"{kind}_s"][n] / base for n in names[1:]}
    return out


def report(result: dict[str, Any], json_path: str | None) -> None:
    print(json.dumps(result, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
