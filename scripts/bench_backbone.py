"""Backbone cost on CPU (fp32): forward+backward time and peak memory of one training step.

Compares, at the same size and input, dinospec's routed `paper` preset vs dinospec vanilla (the cost of routing),
and dinospec vanilla vs timm's VisionTransformer and vs the reference `dinov2` package (PyPI 0.0.1.dev2, installed
with `pip install --no-deps dinov2==0.0.1.dev2`; without xformers its attention runs as plain matmuls + softmax).
`routed_slice` is the first TokenRouted implementation (see below), kept to measure what the current one saves.

    .venv/bin/python scripts/bench_backbone.py --archs vit_small,vit_base --batch 32 --reps 5

Time: all models are built in one process and measured in rotating interleaved order (A B C D, B C D A, ...), one
warm-up step each, so machine noise hits every config alike; medians (and minima) of --reps steps are reported,
wall-clock and process CPU time.
Memory: tracemalloc does not see torch's allocations, so each (config, repetition) runs in a fresh subprocess that
builds its model and input, returns freed heap to the OS (malloc_trim), resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and reports the peak RSS of its first step above the RSS just before it: activations kept
for backward, gradients, temporaries, and what the allocator holds on to (heap fragmentation). --mmap-threshold N
runs the children with MALLOC_MMAP_THRESHOLD_=N, so that glibc serves every large block by mmap and RSS follows the
live tensors. The median over --mem-reps subprocesses is reported.
All configs use torch.set_num_threads(--threads), drop path --drop-path (default 0; with a rate above 0.1 dinospec
and dinov2 run each residual branch on a random batch subset only, timm and `vanilla_row` on every row, zeroing
the dropped ones),
LayerScale 1e-5, patch --patch, no registers, and the loss = mean of the normalised [CLS] + patch tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("vanilla", "routed", "timm", "dinov2")
RATIOS = [  # (numerator, denominator, target ratio)
    ("routed", "vanilla", 1.02),
    ("routed_slice", "vanilla", 1.02),
    ("vanilla", "vanilla_row", 1.0),
    ("vanilla", "timm", 1.0),
    ("vanilla", "dinov2", 1.0),
]


# ----------------------------------------------------------------------------------------------------------------
# the first TokenRouted forward, kept for comparison (`routed_slice`): one slice per segment for every layer


def slice_forward(self: nn.Module, x: Tensor, routing) -> Tensor:
    """Slice each segment, run its copy, concatenate. The backward of a slice allocates a zero tensor of the full
    input size per segment, and norms / LayerScale pay a split and a cat that cost as much as they do."""
    parts = [self[g](x[:, a:b]) for a, b, g in routing.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def use_slice_routing(model: nn.Module) -> None:
    from dinospec.models.routed import TokenRouted

    for m in model.modules():
        if isinstance(m, TokenRouted):
            m.forward = types.MethodType(slice_forward, m)


# ----------------------------------------------------------------------------------------------------------------
# the models


def build(config: str, arch: str, patch: int, img: int, drop_path: float = 0.0
          ) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """A model and its loss function; every model computes the same architecture."""
    from dinospec.config import load_config
    from dinospec.models.specialize import resolve_spec
    from dinospec.models.vit import ARCHS, VisionTransformer

    size = ARCHS[arch]
    if config in ("vanilla", "vanilla_row", "routed", "routed_slice"):
        spec = resolve_spec(load_config([], ["spec=paper"]).spec, size["depth"]) if config.startswith("routed") \
            else None
        mode = "row" if config == "vanilla_row" else "auto"  # auto: DINOv2's batch subset above rate 0.1
        model = VisionTransformer(img_size=img, patch_size=patch, layerscale=1e-5, drop_path_rate=drop_path,
                                  drop_path_mode=mode, spec=spec, **size)
        if config == "routed_slice":
            use_slice_routing(model)
        return model, dict_loss
    if config == "timm":
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        model = TimmViT(img_size=img, patch_size=patch, embed_dim=size["embed_dim"], depth=size["depth"],
                        num_heads=size["num_heads"], mlp_ratio=4.0, qkv_bias=True, init_values=1e-5,
                        class_token=True, num_classes=0, global_pool="token", drop_path_rate=drop_path)
        return model, lambda m, x: m.forward_features(x).mean()  # (B, 1 + N, D) normalised tokens
    if config == "dinov2":
        import logging

        logging.getLogger("dinov2").setLevel(logging.ERROR)  # "xFormers not available"
        from dinov2.models import vision_transformer as dv

        model = getattr(dv, arch)(patch_size=patch, img_size=img, init_values=1e-5, block_chunks=0,
                                  drop_path_rate=drop_path)
        return model, dict_loss
    raise ValueError(f"unknown config {config!r}")


def dict_loss(model: nn.Module, x: Tensor) -> Tensor:
    """Mean over the normalised [CLS] and patch tokens of a DINOv2-style output dict."""
    out = model.forward_features(x)
    cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]  # (B, D), (B, N, D)
    return (cls.sum() + patches.sum()) / (cls.numel() + patches.numel())


def step(model: nn.Module, loss_fn: Callable, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model, x).backward()


def rotations(configs: list[str], rep: int) -> list[str]:
    k = rep % len(configs)
    return configs[k:] + configs[:k]


# ----------------------------------------------------------------------------------------------------------------
# memory: one fresh process per measurement


def _proc_status_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def child_memory(config: str, arch: str, batch: int, patch: int, img: int, drop_path: float) -> None:
    import ctypes
    import gc

    torch.manual_seed(0)
    model, loss_fn = build(config, arch, patch, img, drop_path)
    model.train()
    x = torch.randn(batch, 3, img, img)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS growth is new memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _proc_status_mib("VmRSS")
    step(model, loss_fn, x)  # the first step: its gradients are allocated inside it, as in training
    peak = _proc_status_mib("VmHWM")
    print(json.dumps({"before_mib": before, "peak_mib": peak, "step_mib": peak - before}))


def measure_memory(configs: list[str], arch: str, args: argparse.Namespace) -> dict[str, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    results: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(args.mem_reps):
        for config in rotations(configs, rep):
            cmd = [sys.executable, __file__, "--child-memory", config, "--archs", arch, "--batch", str(args.batch),
                   "--patch", str(args.patch), "--img", str(args.img), "--threads", str(args.threads),
                   "--drop-path", str(args.drop_path)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            if proc.returncode:
                raise RuntimeError(f"memory child for {config} failed:\n{proc.stderr[-2000:]}")
            results[config].append(json.loads(proc.stdout.strip().splitlines()[-1])["step_mib"])
            print(f"  mem  {arch:<10} {config:<14} rep {rep}: {results[config][-1]:8.1f} MiB", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# time: every model in this process, measured interleaved


def measure_time(configs: list[str], arch: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """Wall-clock and process CPU seconds of each step (CPU time is less hurt by other processes on the machine)."""
    torch.manual_seed(0)
    models = {c: build(c, arch, args.patch, args.img, args.drop_path) for c in configs}
    x = torch.randn(args.batch, 3, args.img, args.img)
    for model, loss_fn in models.values():
        model.train()
        step(model, loss_fn, x)  # warm-up
    wall: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(args.reps):
        for config in rotations(configs, rep):
            model, loss_fn = models[config]
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, loss_fn, x)
            wall[config].append(time.perf_counter() - t0)
            cpu[config].append(time.process_time() - c0)
            print(f"  time {arch:<10} {config:<14} rep {rep}: {wall[config][-1]:7.3f} s "
                  f"(cpu {cpu[config][-1]:7.3f} s)", flush=True)
    return wall, cpu


def report(arch: str, wall: dict, cpu: dict, mem: dict, args: argparse.Namespace) -> list[str]:
    med = statistics.median
    mem_note = f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else ""
    lines = [f"{arch}/{args.patch}, batch {args.batch} x {args.img}px, fwd+bwd fp32, {args.threads} threads, "
             f"{args.reps} timed steps, {args.mem_reps} memory runs{mem_note}",
             f"{'config':<14} {'wall med':>9} {'wall min':>9} {'cpu med':>9} {'cpu min':>9} {'step MiB':>9}"]
    for c in wall:
        m = f"{med(mem[c]):9.0f}" if mem.get(c) else f"{'-':>9}"
        lines.append(f"{c:<14} {med(wall[c]):9.3f} {min(wall[c]):9.3f} {med(cpu[c]):9.3f} {min(cpu[c]):9.3f} {m}")
    lines.append(f"{'ratio':<24} {'wall med':>9} {'wall min':>9} {'cpu med':>9} {'cpu min':>9} {'memory':>9}  target")
    for num, den, target in RATIOS:
        if num not in wall or den not in wall:
            continue
        r = [med(wall[num]) / med(wall[den]), min(wall[num]) / min(wall[den]),
             med(cpu[num]) / med(cpu[den]), min(cpu[num]) / min(cpu[den])]
        rm = med(mem[num]) / med(mem[den]) if mem.get(num) and mem.get(den) else None
        rm_text = f"{rm:9.3f}" if rm is not None else f"{'-':>9}"
        lines.append(f"{num + '/' + den:<24} " + " ".join(f"{v:9.3f}" for v in r) + f" {rm_text}  <= {target}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="vit_small,vit_base")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help="comma list of vanilla, vanilla_row, routed, routed_slice, timm, dinov2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--reps", type=int, default=5, help="timed steps per config (after one warm-up); 0 = no timing")
    p.add_argument("--mem-reps", type=int, default=2, help="fresh subprocesses per config for peak memory")
    p.add_argument("--mmap-threshold", type=int, default=0, help="MALLOC_MMAP_THRESHOLD_ for the memory runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--drop-path", type=float, default=0.0,
                   help="stochastic depth rate for every model (DINOv2's ViT-L/g recipe: 0.4; default %(default)s)")
    p.add_argument("--child-memory", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args.archs, args.batch, args.patch, args.img, args.drop_path)
        return 0
    configs = args.configs.split(",")
    out = []
    for arch in args.archs.split(","):
        print(f"{arch}: {configs}", flush=True)
        wall, cpu = measure_time(configs, arch, args) if args.reps else ({c: [float("nan")] for c in configs},) * 2
        mem = measure_memory(configs, arch, args) if args.mem_reps else {}
        out += report(arch, wall, cpu, mem, args) + [""]
    print("\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
