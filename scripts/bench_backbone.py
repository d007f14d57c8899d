"""Backbone cost on CPU (fp32): forward+backward time and peak memory of one training step.

Compares, at the same size and input, dinospec's routed `paper` preset vs dinospec vanilla (the cost of routing),
and dinospec vanilla vs timm's VisionTransformer and vs the reference `dinov2` package (PyPI 0.0.1.dev2, installed
with `pip install --no-deps dinov2==0.0.1.dev2`; its attention runs as plain matmuls without xformers).

    .venv/bin/python scripts/bench_backbone.py --archs vit_small,vit_base --batch 32 --reps 5

Time: all models are built in one process and measured in rotating interleaved order (A B C D, B C D A, ...), one
warm-up step each, so machine noise hits every config alike; the median of --reps steps is reported.
Memory: tracemalloc does not see torch's allocations, so each (config, repetition) runs in a fresh subprocess that
builds its model and input, returns freed heap to the OS (malloc_trim), resets the kernel's peak-RSS mark
(/proc/self/clear_refs) and reports the peak RSS of its first step above the RSS just before it: activations kept
for backward, gradients and temporaries. The median over --mem-reps subprocesses is reported.
All configs use torch.set_num_threads(--threads), drop path 0 (the three code bases drop paths differently),
LayerScale 1e-5, patch --patch, no registers, and the loss = mean of the normalised [CLS] + patch tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("vanilla", "routed", "timm", "dinov2")
RATIOS = [  # (numerator, denominator, target ratio)
    ("routed", "vanilla", 1.02),
    ("vanilla", "timm", 1.0),
    ("vanilla", "dinov2", 1.0),
]


def build(config: str, arch: str, patch: int, img: int) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    """A model and its loss function; every model computes the same architecture."""
    from dinospec.models.vit import ARCHS, VisionTransformer
    from dinospec.config import load_config
    from dinospec.models.specialize import resolve_spec

    size = ARCHS[arch]
    if config in ("vanilla", "routed", "routed_split"):
        spec = resolve_spec(load_config([], ["spec=paper"]).spec, size["depth"]) if config != "vanilla" else None
        model = VisionTransformer(img_size=img, patch_size=patch, layerscale=1e-5, drop_path_rate=0.0, spec=spec,
                                  **size)
        if config == "routed_split":
            use_split_routing(model)
        return model, _dict_loss
    if config == "timm":
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        model = TimmViT(img_size=img, patch_size=patch, embed_dim=size["embed_dim"], depth=size["depth"],
                        num_heads=size["num_heads"], mlp_ratio=4.0, qkv_bias=True, init_values=1e-5,
                        class_token=True, num_classes=0, global_pool="token", drop_path_rate=0.0)
        return model, lambda m, x: m.forward_features(x).mean()  # (B, 1 + N, D) normalised tokens
    if config == "dinov2":
        import logging

        logging.getLogger("dinov2").setLevel(logging.ERROR)  # "xFormers not available"
        from dinov2.models import vision_transformer as dv

        model = getattr(dv, arch)(patch_size=patch, img_size=img, init_values=1e-5, block_chunks=0,
                                  drop_path_rate=0.0)
        return model, _dict_loss
    raise ValueError(f"unknown config {config!r} (known: {', '.join(CONFIGS)})")


def _split_forward(self: nn.Module, x: Tensor, routing) -> Tensor:
    """Proposed TokenRouted.forward: one split into segment views instead of one slice per segment.

    The backward of a slice allocates a zero tensor of the full input size and copies its segment in, once per
    segment, and autograd then adds those up; the backward of one split is a single cat of the segment grads.
    """
    sizes = [b - a for a, b, _ in routing.segments]
    parts = [self[g](xs) for xs, (_, _, g) in zip(x.split(sizes, dim=1), routing.segments)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def use_split_routing(model: nn.Module) -> None:
    import types

    from dinospec.models.routed import TokenRouted

    for m in model.modules():
        if isinstance(m, TokenRouted):
            m.forward = types.MethodType(_split_forward, m)


def _dict_loss(model: nn.Module, x: Tensor) -> Tensor:
    out = model.forward_features(x)
    n = out["x_norm_patchtokens"].shape[1] + 1
    return (out["x_norm_clstoken"].sum(1) + out["x_norm_patchtokens"].sum((1, 2))).mean() / (n * out["x_norm_clstoken"].shape[1])


def step(model: nn.Module, loss_fn: Callable, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    loss_fn(model, x).backward()


# ----------------------------------------------------------------------------------------------------------------
# memory: one fresh process per measurement


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def child_memory(config: str, arch: str, batch: int, patch: int, img: int, threads: int) -> None:
    import ctypes
    import gc

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, loss_fn = build(config, arch, patch, img)
    model.train()
    x = torch.randn(batch, 3, img, img)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS growth is real new memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _rss_mib("VmRSS")
    step(model, loss_fn, x)  # the first step: its gradients are allocated inside it, as in training
    peak = _rss_mib("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"before_mib": before, "peak_mib": peak, "step_mib": peak - before, "params": params}))


def measure_memory(configs: list[str], arch: str, args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(args.mem_reps):
        for config in configs[rep % len(configs):] + configs[: rep % len(configs)]:
            cmd = [sys.executable, __file__, "--child-memory", config, "--archs", arch, "--batch", str(args.batch),
                   "--patch", str(args.patch), "--img", str(args.img), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"})
            if proc.returncode:
                raise RuntimeError(f"memory child for {config} failed:\n{proc.stderr[-2000:]}")
            results[config].append(json.loads(proc.stdout.strip().splitlines()[-1])["step_mib"])
            print(f"  mem {arch:<10} {config:<8} rep {rep}: {results[config][-1]:8.1f} MiB", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# time: every model in this process, measured interleaved


def measure_time(configs: list[str], arch: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """Wall-clock and process CPU seconds of each step (CPU time is less hurt by other processes on the machine)."""
    torch.manual_seed(0)
    models = {c: build(c, arch, args.patch, args.img) for c in configs}
    x = torch.randn(args.batch, 3, args.img, args.img)
    for config, (model, loss_fn) in models.items():
        model.train()
        step(model, loss_fn, x)  # warm-up
    times: dict[str, list[float]] = {c: [] for c in configs}
    cpu_times: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(args.reps):
        for config in configs[rep % len(configs):] + configs[: rep % len(configs)]:
            model, loss_fn = models[config]
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, loss_fn, x)
            times[config].append(time.perf_counter() - t0)
            cpu_times[config].append(time.process_time() - c0)
            print(f"  time {arch:<10} {config:<12} rep {rep}: {times[config][-1]:7.3f} s "
                  f"(cpu {cpu_times[config][-1]:7.3f} s)", flush=True)
    return times, cpu_times


def report(arch: str, times: dict[str, list[float]], mem: dict[str, list[float]], args: argparse.Namespace) -> list[str]:
    lines = [f"### {arch}/{args.patch}, batch {args.batch} x {args.img}², fwd+bwd fp32, {args.threads} threads",
             "", "| config | time (s, median) | time min-max | step memory (MiB, median) | memory min-max |",
             "|---|---|---|---|---|"]
    for c in times:
        t, m = times[c], mem.get(c, [])
        mm = f"{statistics.median(m):.0f} | {min(m):.0f}-{max(m):.0f}" if m else "- | -"
        lines.append(f"| {c} | {statistics.median(t):.3f} | {min(t):.3f}-{max(t):.3f} | {mm} |")
    lines += ["", "| ratio | time | memory | target |", "|---|---|---|---|"]
    for num, den, target in RATIOS:
        if num in times and den in times:
            rt = statistics.median(times[num]) / statistics.median(times[den])
            rm = (statistics.median(mem[num]) / statistics.median(mem[den])) if mem.get(num) and mem.get(den) else None
            ok = "met" if rt <= target and (rm is None or rm <= target) else "MISSED"
            rm_text = f"{rm:.3f}" if rm is not None else "-"
            lines.append(f"| {num}/{den} | {rt:.3f} | {rm_text} | ≤ {target} ({ok}) |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="vit_small,vit_base")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--reps", type=int, default=5, help="timed steps per config (after one warm-up)")
    p.add_argument("--mem-reps", type=int, default=2, help="fresh subprocesses per config for peak memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child-memory", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args.archs, args.batch, args.patch, args.img, args.threads)
        return 0
    configs = args.configs.split(",")
    out = []
    for arch in args.archs.split(","):
        print(f"{arch}: timing {configs}", flush=True)
        times, cpu_times = measure_time(configs, arch, args)
        mem = measure_memory(configs, arch, args) if args.mem_reps else {}
        out += report(arch, times, mem, args) + [""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
