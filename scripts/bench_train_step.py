"""One full SSL training step on CPU fp32 as dinospec's trainer runs it, and three ways to run the student's crops.

A step is the trainer's train_step (dinospec/trainer.py): SSLMetaArch.losses (teacher on the 2 global crops; student
on 2 global + L local crops; DINO + iBOT heads at their config sizes; DINO, iBOT and KoLeo losses), backward, the
trainer's per-part gradient clipping, AdamW step, EMA teacher update. Inputs are synthetic tensors of the loader's
shapes (global (2B,3,G,G), local (LB,3,l,l)) with real iBOT block masks, so data loading is excluded. The schedules
are read after warmup and last-layer freeze (every parameter moves).

Configs are SPEC:LAYOUT; LAYOUT is how the student's crops of two sizes share the backbone:
  separate  one backbone pass per crop size (what dinospec/ssl/meta_arch.py's Student does)
  padded    one pass over all crops, local sequences padded to the global length, a boolean attention mask
  packed    one pass with local crops concatenated into rows (as many as fit the global length), a block-diagonal
            boolean attention mask (DINOv2 does this with xformers' BlockDiagonalMask; here SDPA's dense mask)
Padded and packed rows hold tokens type-major ([cls slots | register slots | patch slots]) so one Routing fits
every row; attention is permutation-equivariant under the mask, so both compute what `separate` does, drop path
per crop included. The check (on by default) verifies it at the step-0 weights with drop path off: student outputs,
loss terms and student gradients vs `separate`.

    .venv/bin/python scripts/bench_train_step.py --batch 2 --reps 7 --mem-reps 2 --threads 1

Time: every config is built in this process (configs of one spec share a model) and stepped in rotating order
(A B C D, B C D A, ...) after one warm-up step each, so machine noise hits all alike; medians of wall and process
CPU time per step, and "paired" ratios (median over rotations of the ratio within one rotation). On a machine
shared with other jobs use --threads 1: with 2 OpenMP threads on 2 busy cores, threads spin waiting for each other
and both wall and CPU time swell 2-4x, irregularly; one thread's CPU time is the step's compute.
Memory: one fresh subprocess per (config, repetition) runs a warm-up step (gradients and AdamW state exist from then
on), frees heap to the OS (malloc_trim), resets the peak-RSS mark (/proc/self/clear_refs) and runs one step:
`peak` is the process's peak RSS during that steady-state step (model, teacher, optimizer state and activations),
`step` is that peak above the RSS just before it (activations, gradients, temporaries).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinospec.config import load_config
from dinospec.data.masking import SampleMasker
from dinospec.models.routed import Routing, route
from dinospec.ssl.meta_arch import SSLMetaArch, Student
from dinospec.trainer import Trainee, train_step

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = ("separate", "padded", "packed")
DEFAULT_CONFIGS = "none:separate,paper:separate,paper:padded,paper:packed"
RATIOS = [("paper:separate", "none:separate", "<= 1.02"), ("paper:padded", "paper:separate", "< 1 to win"),
          ("paper:packed", "paper:separate", "< 1 to win")]


def run_config(args: argparse.Namespace, spec: str) -> Any:
    return load_config(overrides=[
        f"model={args.arch}", f"spec={spec}", f"student.drop_path_rate={args.drop_path}",
        f"train.batch_size_per_gpu={args.batch}", f"crops.local_crops_number={args.local_crops}",
        f"crops.global_crops_size={args.global_size}", f"crops.local_crops_size={args.local_size}",
        f"dino.head_n_prototypes={args.prototypes}", f"ibot.head_n_prototypes={args.prototypes}"])


def synthetic_batch(cfg: Any, seed: int = 0) -> dict[str, Any]:
    """The loader's batch layout (dinospec/data/loader.py) with random pixels and real iBOT block masks."""
    b, n_local = cfg.train.batch_size_per_gpu, cfg.crops.local_crops_number
    g, l = cfg.crops.global_crops_size, cfg.crops.local_crops_size
    grid = g // cfg.student.patch_size
    gen = torch.Generator().manual_seed(seed)
    masker = SampleMasker((grid, grid), cfg.ibot.mask_sample_probability, tuple(cfg.ibot.mask_ratio_min_max))
    masks = torch.stack([masker(random.Random(seed * 100_003 + i)) for i in range(b)], dim=1).flatten(0, 1)  # (2B, N)
    return {"global_crops": torch.randn(2 * b, 3, g, g, generator=gen),
            "local_crops": torch.randn(n_local * b, 3, l, l, generator=gen) if n_local else None, "masks": masks}


# ----------------------------------------------------------------------------------------------------------------
# the one-pass student forwards (padded / packed)


@dataclass
class Plan:
    """Where every token of every crop sits in the (rows, length) one-pass layout."""

    source: Tensor  # (R*T,) index into the pool of all crops' tokens (+ one zero row for padding)
    seq_index: Tensor  # (R, T) sequence of each slot; padding -> S (a drop-path scale fixed at 1)
    attn_mask: Tensor  # (R, 1, T, T) bool: a slot attends to the slots of its own sequence (padding: itself)
    routing: Routing
    cls_slot: Tensor  # (S,) flat slot of each sequence's [CLS], sequences in input order
    patch_slot: Tensor  # (2B*N,) flat slots of the global crops' patches, in (crop, patch) order
    rows: int
    length: int


def make_plan(shapes: list[tuple[int, int]], num_reg: int, num_global: int, group_of_type: tuple[int, ...],
              layout: str) -> Plan:
    """shapes: (count, tokens per sequence) per crop size, globals first. padded: one sequence per row; packed:
    sequences first-fit in order into rows of the longest sequence's patch count."""
    seqs, offset = [], 0  # (first token in the pool, patches)
    for count, length in shapes:
        for _ in range(count):
            seqs.append((offset, length - 1 - num_reg))
            offset += length
    longest = max(n for _, n in seqs)
    rows: list[list[int]] = []
    for s, (_, n) in enumerate(seqs):
        if layout == "packed" and rows and sum(seqs[t][1] for t in rows[-1]) + n <= longest:
            rows[-1].append(s)
        else:
            rows.append([s])
    k, r = max(len(row) for row in rows), num_reg
    length = k * (1 + r) + longest
    source = torch.full((len(rows), length), offset, dtype=torch.long)  # `offset` = the pool's zero row
    seq_id = -1 - torch.arange(len(rows) * length).view(len(rows), length)  # padding: an id of its own
    cls_slot = torch.empty(len(seqs), dtype=torch.long)
    patch_slots: list[Tensor] = [torch.empty(0, dtype=torch.long)] * len(seqs)
    for i, members in enumerate(rows):
        p = k * (1 + r)
        for j, s in enumerate(members):
            start, n = seqs[s]
            slots = torch.cat([torch.tensor([j]), torch.arange(k + j * r, k + (j + 1) * r), torch.arange(p, p + n)])
            source[i, slots] = torch.arange(start, start + 1 + r + n)  # a sequence's tokens are [cls, regs, patches]
            seq_id[i, slots] = s
            cls_slot[s] = i * length + j
            patch_slots[s] = i * length + torch.arange(p, p + n)
            p += n
    return Plan(source=source.flatten(), seq_index=torch.where(seq_id >= 0, seq_id, len(seqs)),
                attn_mask=(seq_id[:, :, None] == seq_id[:, None, :]).unsqueeze(1),
                routing=Routing.from_lengths(group_of_type, (k, k * r, longest)), cls_slot=cls_slot,
                patch_slot=torch.cat(patch_slots[:num_global]), rows=len(rows), length=length)


def masked_attention(attn: Any, x: Tensor, routing: Routing, mask: Tensor) -> Tensor:
    """dinospec.models.vit.Attention.forward with an attention mask."""
    b, n, c = x.shape
    qkv = route(attn.qkv, x, routing).reshape(b, n, 3, attn.num_heads, c // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)
    return route(attn.proj, x, routing)


def drop_scale(p: float, plan: Plan, training: bool) -> Tensor | None:
    """Stochastic depth per crop (torchvision's "row" mode, one row = one crop), as (R, T, 1) per-slot scales."""
    if not training or p == 0:
        return None
    num_seqs = plan.cls_slot.shape[0]
    keep = torch.empty(num_seqs + 1).bernoulli_(1 - p).div_(1 - p) if p < 1 else torch.zeros(num_seqs + 1)
    keep[-1] = 1.0
    return keep[plan.seq_index].unsqueeze(-1)


def masked_block(block: Any, x: Tensor, plan: Plan) -> Tensor:
    """dinospec.models.vit.Block.forward with an attention mask and per-crop drop path."""
    routing = plan.routing
    h = masked_attention(block.attn, route(block.norm1, x, routing), routing, plan.attn_mask)
    h = route(block.ls1, h, routing)
    keep = drop_scale(block.drop_path, plan, block.training)
    x = x + (h if keep is None else h * keep)
    h = route(block.ls2, route(block.mlp, route(block.norm2, x, routing), routing), routing)
    keep = drop_scale(block.drop_path, plan, block.training)
    return x + (h if keep is None else h * keep)


def head_outputs(student: Student, cls_g: Tensor, cls_l: Tensor | None, masked: Tensor) -> dict[str, Tensor | None]:
    """The head half of Student.forward, unchanged."""
    n_g, n_l = cls_g.shape[0], 0 if cls_l is None else cls_l.shape[0]
    if student.ibot_head is None:
        logits = student.dino_head(torch.cat([cls_g] + ([cls_l] if cls_l is not None else []) + [masked]))
        dino_g, dino_l, ibot = logits[:n_g], logits[n_g: n_g + n_l], logits[n_g + n_l:]
    else:
        dino = student.dino_head(torch.cat([cls_g, cls_l]) if cls_l is not None else cls_g)
        dino_g, dino_l, ibot = dino[:n_g], dino[n_g:], student.ibot_head(masked)
    return {"cls": cls_g, "dino_global": dino_g, "dino_local": dino_l if n_l else None, "ibot": ibot}


class OnePassStudent:
    """A drop-in for Student.forward (SSLMetaArch.losses' student_forward) running every crop in one pass."""

    def __init__(self, student: Student, layout: str):
        self.student, self.layout = student, layout
        self.plans: dict[tuple, Plan] = {}

    def __call__(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor) -> dict[str, Tensor | None]:
        bb = self.student.backbone
        tokens = [bb.prepare_tokens(global_crops, masks)]  # (2B, 1+R+N, D)
        if local_crops is not None:
            tokens.append(bb.prepare_tokens(local_crops))  # (LB, 1+R+n, D)
        key = tuple(tuple(t.shape[:2]) for t in tokens)
        if key not in self.plans:
            self.plans[key] = make_plan([tuple(s) for s in key], bb.num_register_tokens, global_crops.shape[0],
                                        bb.spec.group_of_type, self.layout)
        plan = self.plans[key]
        d = tokens[0].shape[-1]
        pool = torch.cat([t.flatten(0, 1) for t in tokens] + [tokens[0].new_zeros(1, d)])  # (all tokens + 1, D)
        x = pool[plan.source].view(plan.rows, plan.length, d)  # (R, T, D)
        for block in bb.blocks:
            x = masked_block(block, x, plan)
        x_norm = route(bb.norm, x, plan.routing).flatten(0, 1)  # (R*T, D)
        cls = x_norm[plan.cls_slot]  # (S, D)
        n_g = global_crops.shape[0]
        masked = x_norm[plan.patch_slot][masks.flatten()]  # (M, D)
        return head_outputs(self.student, cls[:n_g], cls[n_g:] if local_crops is not None else None, masked)


# ----------------------------------------------------------------------------------------------------------------
# the trainer's step


class Bench:
    """One spec's trainee (dinospec.trainer.Trainee); `step(batch, layout)` is the trainer's train_step with the
    layout's student forward, always at the step after warmup and the last-layer freeze."""

    def __init__(self, cfg: Any):
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.meta = SSLMetaArch(cfg)
        self.trainee = Trainee.build(cfg, self.meta, torch.device("cpu"))
        self.at = max(cfg.optim.warmup_epochs, cfg.optim.freeze_last_layer_epochs) * cfg.train.official_epoch_length
        self.par = self.trainee.par  # its student_forward: the student itself (one process, no wrapper)
        self.forwards = {"separate": None, **{k: OnePassStudent(self.meta.student, k) for k in LAYOUTS[1:]}}

    def losses(self, batch: dict[str, Any], layout: str) -> dict[str, Tensor]:
        return self.meta.losses(batch, self.trainee.sched.at(self.at)["teacher_temp"], self.forwards[layout])

    def step(self, batch: dict[str, Any], layout: str) -> float:
        """train.nonfinite=stop (the default) raises NonFiniteLoss on a non-finite loss."""
        self.trainee.par = replace(self.par, student_forward=self.forwards[layout] or self.par.student_forward)
        return float(train_step(self.trainee, batch, self.at)["loss"])


def check_layouts(bench: Bench, batch: dict[str, Any]) -> list[str]:
    """Loss terms and student gradients of padded / packed vs separate, same weights and batch, drop path off."""
    blocks = bench.meta.student.backbone.blocks
    saved_rates = [b.drop_path for b in blocks]
    saved_buffers = {k: v.clone() for k, v in bench.meta.named_buffers()}  # centres, if softmax centering
    results = {}
    try:
        for b in blocks:
            b.drop_path = 0.0
        with torch.no_grad():  # the student's outputs themselves
            args = (batch["global_crops"], batch["local_crops"], batch["masks"])
            ref = bench.meta.student(*args)
            outs = {k: f(*args) for k, f in bench.forwards.items() if f is not None}
            # the keys both give (the layouts' one-pass forwards do not return the Gram loss's patch features)
            out_diff = {k: max(float((out[key] - ref[key]).abs().max()) for key in ref
                               if ref[key] is not None and key in out) for k, out in outs.items()}
        for layout in LAYOUTS:
            bench.meta.zero_grad(set_to_none=True)
            losses = bench.losses(batch, layout)
            losses["loss"].backward()
            grads = {n: p.grad.clone() for n, p in bench.meta.student.named_parameters() if p.grad is not None}
            results[layout] = ({k: float(v.detach()) for k, v in losses.items()}, grads)
            for name, value in saved_buffers.items():
                bench.meta.get_buffer(name).copy_(value)
    finally:
        for b, rate in zip(blocks, saved_rates):
            b.drop_path = rate
        bench.meta.zero_grad(set_to_none=True)
    ref_losses, ref_grads = results["separate"]
    lines = []
    for layout in LAYOUTS[1:]:
        losses, grads = results[layout]
        loss_diff = max(abs(losses[k] - ref_losses[k]) for k in ref_losses)
        if grads.keys() != ref_grads.keys():
            raise AssertionError(f"{layout}: other parameters got gradients than with separate passes")
        # all student gradients as one vector: |g - g_ref| / |g_ref|. Per tensor, float32 summation order makes
        # tensors with ~1e-7 gradients differ relatively more. KoLeo's gradient goes as 1 / (nearest distance), and
        # near-identical [CLS] features (random pixels, a tiny batch) amplify float32 noise: hence 1e-4, not 1e-5.
        err = sum(float((grads[n] - g).double().pow(2).sum()) for n, g in ref_grads.items()) ** 0.5
        norm = sum(float(g.double().pow(2).sum()) for g in ref_grads.values()) ** 0.5
        worst = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
        ok = loss_diff <= 1e-5 and err <= 1e-4 * norm and out_diff[layout] <= 1e-4
        lines.append(f"check {layout} vs separate: max |output diff| {out_diff[layout]:.1e} (cls, logits); max |loss "
                     f"diff| {loss_diff:.1e} ({', '.join(sorted(ref_losses))}); gradients: |diff| / |grad| "
                     f"{err / norm:.1e}, max |diff| {worst:.1e}  {'OK' if ok else 'MISMATCH'}")
        if not ok:
            raise AssertionError(lines[-1])
    return lines


# ----------------------------------------------------------------------------------------------------------------
# measurements


def rotations(configs: list[str], rep: int) -> list[str]:
    k = rep % len(configs)
    return configs[k:] + configs[:k]


def _status_mib(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def child_memory(config: str, args: argparse.Namespace) -> None:
    spec, layout = config.split(":")
    cfg = run_config(args, spec)
    bench, batch = Bench(cfg), synthetic_batch(cfg)
    bench.step(batch, layout)  # warm-up: gradients and AdamW state now exist, as in any later step
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so growth below is real new memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_mib("VmRSS")
    bench.step(batch, layout)
    peak = _status_mib("VmHWM")
    print(json.dumps({"before_mib": before, "peak_mib": peak, "step_mib": peak - before}))


def measure_memory(configs: list[str], args: argparse.Namespace) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {c: [] for c in configs}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("arch", "batch", "local_crops", "global_size", "local_size", "prototypes", "drop_path",
                            "threads")]
    for rep in range(args.mem_reps):
        for config in rotations(configs, rep):
            proc = subprocess.run([sys.executable, __file__, "--child-memory", config, *passthrough], cwd=REPO,
                                  capture_output=True, text=True,
                                  env={"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"})
            if proc.returncode:
                raise RuntimeError(f"memory child for {config} failed:\n{proc.stderr[-3000:]}")
            results[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[config][-1]
            print(f"  mem  {config:<16} rep {rep}: peak {r['peak_mib']:8.0f} MiB, step {r['step_mib']:7.0f} MiB",
                  flush=True)
    return results


def describe(benches: dict[str, Bench], batch: dict[str, Any]) -> list[str]:
    """Sizes, and the token slots of the one-pass layouts (their plans exist once they have run)."""
    notes = [f"masked global-crop patches in the batch: {int(batch['masks'].sum())} of {batch['masks'].numel()}"]
    for spec, bench in benches.items():
        notes.append(f"{spec}: student {sum(p.numel() for p in bench.meta.student.parameters()):,} params "
                     f"(backbone {sum(p.numel() for p in bench.meta.student.backbone.parameters()):,})")
        for layout, forward in bench.forwards.items():
            for plan in getattr(forward, "plans", {}).values():
                real = int((plan.seq_index < plan.cls_slot.numel()).sum())
                notes.append(f"{spec}:{layout}: {plan.rows} rows x {plan.length} = {plan.rows * plan.length} token "
                             f"slots for the {real} tokens of separate passes")
    return notes


def measure_time(configs: list[str], args: argparse.Namespace) -> tuple[dict, dict, list[str]]:
    benches = {spec: Bench(run_config(args, spec)) for spec in dict.fromkeys(c.split(":")[0] for c in configs)}
    batch = synthetic_batch(next(iter(benches.values())).cfg)
    checks = []
    if args.check:  # at the trainer's step-0 weights, before any step
        for spec, bench in benches.items():
            if any(c.startswith(f"{spec}:") and not c.endswith(":separate") for c in configs):
                checks += [f"{spec}: {line}" for line in check_layouts(bench, batch)]
    for config in configs:  # warm-up
        spec, layout = config.split(":")
        benches[spec].step(batch, layout)
    notes = describe(benches, batch) + checks
    print("\n".join(notes), flush=True)
    wall: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    for rep in range(args.reps):
        for config in rotations(configs, rep):
            spec, layout = config.split(":")
            t0, c0 = time.perf_counter(), time.process_time()
            benches[spec].step(batch, layout)
            wall[config].append(time.perf_counter() - t0)
            cpu[config].append(time.process_time() - c0)
            print(f"  time {config:<16} rep {rep}: {wall[config][-1]:7.3f} s (cpu {cpu[config][-1]:7.3f} s)",
                  flush=True)
    return wall, cpu, notes


def report(wall: dict, cpu: dict, mem: dict, args: argparse.Namespace) -> list[str]:
    med = statistics.median
    mem_of = {c: (med(r["peak_mib"] for r in runs), med(r["step_mib"] for r in runs))
              for c, runs in mem.items() if runs}
    lines = [f"{args.arch}, batch {args.batch}: 2 x {args.global_size}px + {args.local_crops} x {args.local_size}px "
             f"crops, {args.prototypes} prototypes, drop path {args.drop_path}, fp32, {args.threads} threads, "
             f"{args.reps} timed steps, {args.mem_reps} memory runs",
             "| config | wall s (median) | wall s (min) | CPU s (median) | peak RSS MiB | step MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in wall:
        peak, step = (f"{v:.0f}" for v in mem_of[c]) if c in mem_of else ("-", "-")
        lines.append(f"| {c} | {med(wall[c]):.3f} | {min(wall[c]):.3f} | {med(cpu[c]):.3f} | {peak} | {step} |")
    lines += ["", "paired: the median over repetitions of the ratio of the two steps of one rotation (run minutes "
              "apart at most, so they share the machine's load)",
              "| ratio | wall (median) | wall (paired) | CPU (median) | CPU (paired) | peak RSS | step MiB | target |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for num, den, target in RATIOS:
        if num in wall and den in wall:
            mem_ratio = [f"{mem_of[num][i] / mem_of[den][i]:.3f}" if num in mem_of and den in mem_of else "-"
                         for i in (0, 1)]
            paired = [med(a / b for a, b in zip(t[num], t[den])) for t in (wall, cpu)]
            lines.append(f"| {num} / {den} | {med(wall[num]) / med(wall[den]):.3f} | {paired[0]:.3f} | "
                         f"{med(cpu[num]) / med(cpu[den]):.3f} | {paired[1]:.3f} | {mem_ratio[0]} | {mem_ratio[1]} | "
                         f"{target} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="vit_small", help="a configs/model preset (%(default)s)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of SPEC:LAYOUT (%(default)s)")
    p.add_argument("--batch", type=int, default=2, help="images per step (%(default)s: the smallest with a KoLeo term; "
                   "a few seconds a step on 2 idle cores)")
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--prototypes", type=int, default=65536, help="DINO and iBOT prototypes (%(default)s)")
    p.add_argument("--drop-path", type=float, default=0.1, help="student drop-path rate (%(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed steps per config (after one warm-up)")
    p.add_argument("--mem-reps", type=int, default=2, help="fresh subprocesses per config for peak memory")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the layout equivalence check")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    p.add_argument("--child-memory", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_memory:
        child_memory(args.child_memory, args)
        return 0
    configs = args.configs.split(",")
    bad = [c for c in configs if c.count(":") != 1 or c.split(":")[1] not in LAYOUTS]
    if bad:
        p.error(f"configs must be SPEC:LAYOUT with LAYOUT in {LAYOUTS}; got {bad}")
    wall, cpu, notes = measure_time(configs, args) if args.reps else ({c: [float("nan")] for c in configs},) * 2 + ([],)
    mem = measure_memory(configs, args) if args.mem_reps else {}
    lines = report(wall, cpu, mem, args)
    print("\n" + "\n".join(notes + [""] + lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "wall_s": wall, "cpu_s": cpu, "memory": mem,
                                               "notes": notes}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
