"""GPU acceptance in one prepared script: correctness and speed of dinospec's GPU path, in under 8 minutes.

    .venv/bin/python scripts/gpu_check.py [--out runs/gpu_check]      # on a node with 1 (or 2) H100 / H200 GPUs
    .venv/bin/python scripts/gpu_check.py --dry-run                   # the same code paths, tiny sizes, CPU + gloo

Checks, in this order (each isolated, each with its own time budget; see CHECKS):
  env               device, versions, the bf16 dense peak used for MFU (PEAK_BF16_DENSE_TFLOPS)
  bf16_autocast     the routed `paper` spec trained a few steps under bf16 autocast: losses within 2% of fp32
  fsdp2_ws1         FSDP2 MixedPrecisionPolicy (bf16 params, fp32 reduce), world size 1 over NCCL: within 2% of fp32
  fsdp2_ws2         the same on 2 processes over NCCL (only with >= 2 GPUs), then a 2-rank checkpoint round trip
  sdpa_backends     dinospec's Attention under SDPA flash / memory-efficient / cuDNN vs the math backend (bf16), and
                    which kernel the dispatcher picks for the model
  xformers          attn_backend=xformers vs sdpa on the same weights (skipped, with the reason, if it cannot run)
  checkpoint_resume 2 steps, save, load into fresh objects, 2 steps == 4 uninterrupted steps, bitwise, on the GPU
  ssl_step          vit_large/14 `paper` SSL step (2 x 224 + 8 x 98 crops, real heads, bf16): images/s, ms/step,
                    peak memory, MFU; a torch.profiler summary when MFU < 50%
  paper_vs_vanilla  the same step, `paper` vs `none` spec, interleaved: time ratio (target <= 1.02)
  checkpoint_stall  async checkpoint of the ViT-L training state: how long save() blocks training (target < 1 s)
  backbone_vs_timm  ViT-L/14 backbone forward + backward vs timm's VisionTransformer of the same config (<= 0.95)
  compile_blocks    torch.compile of the blocks (the trainer's compute.compile) equal to eager, fp32
  compile_speed     the ViT-L SSL step compiled vs eager

Everything runs dinospec's own code: SSLMetaArch, dinospec.trainer's Trainee.build (compute.precision / strategy:
autocast or FSDP2) and train_step, dinospec.parallel.wrap (compile), Trainee.state() with
dinospec.checkpoint.Checkpointer, dinospec.dist, dinospec.model_info.count_flops; synthetic batches and timm models
come from scripts/bench_*.py.

How it stays inside the time and survives failures: this process (the parent: standard library only, it never
touches CUDA) starts one worker process that runs the checks one after the other and reports each start, partial
figure and result as a JSON line (events.jsonl). A check that raises is reported FAIL with its error and the next
one runs; a check that overruns its budget (or kills its process) is reported FAIL with the figures it had sent,
its worker is killed (with every child) and a fresh worker continues with the next check; after a FAIL on a GPU the
worker also restarts, so a broken CUDA context cannot spoil later checks. Budgets also shrink to the time left of
--time-limit, so the whole run ends in time. After every check the parent rewrites gpu_check.json and
gpu_check.md (a Markdown block for BENCHMARKS.md), so a run killed from outside still leaves its figures.

Status: PASS (ran, and correctness within tolerance), FAIL (error, timeout, or outside tolerance), SKIP (cannot run
here: the reason is printed), INFO. Speed targets are reported apart as met / missed: a missed target is a figure,
not a failure. Exit code 1 when any check FAILed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # the parent never imports torch; the worker does
    import torch

    from dinospec.trainer import Trainee

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"

# bf16 dense (no sparsity) tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets. First substring of
# torch.cuda.get_device_name() that matches wins (so "H100 PCIe" before "H100"; "GH200" contains "H200").
PEAK_BF16_DENSE_TFLOPS: list[tuple[str, str, float]] = [
    ("H200", "H200 (SXM / NVL / GH200)", 989.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100", "H100 SXM", 989.0),
    ("A100", "A100", 312.0),
]
MFU_TARGET = 0.50

GRACE_S = 15.0  # at most, beyond a check's budget before its worker is killed (cleanup, a last partial event)
MIN_USEFUL_S = 5.0  # a check with less time than this left in --time-limit is skipped

FAIL, PASS, SKIP, INFO = "FAIL", "PASS", "SKIP", "INFO"


def peak_tflops(device_name: str) -> tuple[str, float] | None:
    """(row name, bf16 dense peak TFLOP/s) of PEAK_BF16_DENSE_TFLOPS for a device name, or None if unknown."""
    for key, name, tflops in PEAK_BF16_DENSE_TFLOPS:
        if key.lower() in device_name.lower():
            return name, tflops
    return None


# ===============================================================================================================
# checks: registry and budgets
#
# GPU budgets (seconds) were sized by arithmetic, not measured (no GPU has run this yet): one H100/H200 SXM at
# ~40-50% of 989 TFLOP/s bf16 does ~400-500 TFLOP/s. The vit_large/14 SSL step is ~2.06 TFLOP per image nominal
# (student 3 x (2 x 162 + 8 x ~31.5) GFLOP, teacher 2 x 162, heads ~9; ~1.5 TFLOP executed with drop path 0.3 on a
# batch subset), so batch 64 is ~0.2-0.3 s a step and ~30 steps of timing cost ~10 s; a model build on the device
# ~3-5 s; cuBLAS / SDPA first calls a few s. ViT-S correctness runs (batch 16, 3 steps per precision) are < 1 s a
# step even in fp32. The ViT-L training state (student + teacher + AdamW, fp32) is ~7 GiB: its device-to-host
# staging ~1 s, its write + fsync + sha256 manifest ~10 s. torch.compile (inductor) of the blocks dominates:
# ~4-8 graphs (routed-QKV and plain blocks x student train / teacher eval x crop sizes, forward + backward) at
# ~10-20 s each. The expected total is ~4-5 minutes; the budgets are caps that sum to 450 s with one GPU (with two,
# fsdp2_ws2 adds 60 s and the time limit trims the last checks: the run still ends in time).


@dataclass(frozen=True)
class Check:
    name: str
    budget_s: float  # on a GPU
    title: str


CHECKS: list[Check] = [
    Check("env", 5, "device, versions, peak"),
    Check("bf16_autocast", 25, "bf16 autocast vs fp32 losses"),  # ViT-S x 3 steps x 2 precisions: ~8 s
    Check("fsdp2_ws1", 30, "FSDP2 bf16 mixed precision, 1 rank NCCL"),  # NCCL init ~3 s + 2 x 3 steps: ~10 s
    Check("fsdp2_ws2", 60, "FSDP2 bf16 mixed precision, 2 ranks NCCL"),  # 2 spawned processes: ~30 s
    Check("sdpa_backends", 15, "SDPA flash / efficient / cuDNN vs math"),  # one attention layer: ~3 s
    Check("xformers", 15, "xformers attention vs SDPA"),  # two ViT-S forward+backward: ~3 s
    Check("checkpoint_resume", 30, "checkpoint resume bitwise on the device"),  # 3 x 4 ViT-S steps + DCP: ~12 s
    Check("ssl_step", 55, "vit_large/14 SSL step speed and MFU"),  # build 5 + warm 5 + 10 steps 3 + profile 10
    Check("paper_vs_vanilla", 35, "paper vs vanilla SSL step"),  # vanilla build 5 + 16 steps ~5: ~12 s
    Check("checkpoint_stall", 40, "async checkpoint stall, ViT-L state"),  # 2 saves of ~7 GiB: ~25 s
    Check("backbone_vs_timm", 30, "ViT-L backbone vs timm"),  # 3 backbones, ~24 fwd+bwd of batch 64: ~12 s
    Check("compile_blocks", 60, "torch.compile blocks == eager"),  # ViT-S, QKV routed everywhere, ~3-4 graphs: ~30 s
    Check("compile_speed", 110, "ViT-L SSL step compiled vs eager"),  # ~6-8 graphs at dim 1024: ~70 s
]
CHECK_NAMES = [c.name for c in CHECKS]
GPU_TIME_LIMIT_S = 450.0  # 7:30: + at most 15 s grace for a last overrun + the report, inside 8 minutes
DRY_TIME_LIMIT_S = 900.0
DRY_BUDGET_S = 120.0  # per check in --dry-run (a loaded 2-core CI box is slow; tiny sizes need seconds)


def effective_budget(budget: float, now: float, deadline: float) -> float:
    """A check gets its budget, or what is left of the run's time limit if that is less."""
    return max(0.0, min(budget, deadline - now))


# ===============================================================================================================
# the parent: starts workers, enforces budgets, writes the results


@dataclass
class Record:
    name: str
    status: str = SKIP
    seconds: float = 0.0
    cpu_s: float = 0.0  # CPU time of the worker and the children it waited for (spawned ranks) in the check
    budget_s: float = 0.0
    summary: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str = ""


def grace(budget: float) -> float:
    """How long past its budget a check may run before its worker is killed."""
    return min(GRACE_S, max(2.0, budget / 4))


def stamp(t0: float) -> str:
    """[wall clock +seconds since the run started] (t0: the parent's start, time.time())."""
    return f"[{time.strftime('%H:%M:%S')} +{time.time() - t0:6.1f}s]"


class Parent:
    """Runs the selected checks through worker processes and keeps gpu_check.json / gpu_check.md current."""

    def __init__(self, args: argparse.Namespace, names: list[str]):
        self.args, self.names = args, names
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.events_path = self.out / "events.jsonl"
        self.events_path.write_text("")
        self.t0 = time.time()
        self.deadline_wall = self.t0 + args.time_limit
        self.records: dict[str, Record] = {}
        self.partials: dict[str, dict[str, Any]] = {}
        self.meta: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "dry_run": args.dry_run,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "time_limit_s": args.time_limit,
            "host": socket.gethostname(), "commit": _git_commit(), "checks": names}
        self.proc: subprocess.Popen | None = None
        self.current: tuple[str, float, float] | None = None  # the running check: name, monotonic start, budget
        self.interrupted = False

    def log(self, msg: str) -> None:
        print(f"{stamp(self.t0)} {msg}", flush=True)

    # -- workers ------------------------------------------------------------------------------------------------

    def _start_worker(self, pending: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--events", str(self.events_path),
               "--only", ",".join(pending), "--deadline", f"{self.deadline_wall:.3f}", "--out", str(self.out),
               "--t0", f"{self.t0:.3f}"]
        for opt in ("work_dir", "peak_tflops", "vitl_batch", "inject_fault"):
            value = getattr(self.args, opt)
            if value is not None:
                cmd += [f"--{opt.replace('_', '-')}", str(value)]
        for b in self.args.budget:
            cmd += ["--budget", b]
        if self.args.dry_run:
            cmd.append("--dry-run")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # a new session: a kill takes the worker and everything it started (spawned ranks, compile workers)
        return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)

    def _kill_worker(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def _events(self, pos: int) -> tuple[list[dict[str, Any]], int]:
        with open(self.events_path, "rb") as f:
            f.seek(pos)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()], pos + len(complete)

    def run(self) -> int:
        pending = list(self.names)
        pos = 0
        self.log(f"gpu_check: {len(pending)} checks, time limit {self.args.time_limit:.0f} s, results in {self.out}")
        try:
            while pending:
                self.proc = self._start_worker(pending)
                current: tuple[str, float, float] | None = None  # name, monotonic start, budget
                progressed = False  # this worker started or ended a check
                while True:
                    events, pos = self._events(pos)
                    self.current = current
                    for ev in events:
                        kind = ev["event"]
                        if kind == "ready":
                            self.meta.setdefault("worker", ev.get("info", {}))
                        elif kind == "start":
                            current, progressed = (ev["check"], time.monotonic(), float(ev["budget_s"])), True
                            self.current = current
                        elif kind == "partial":
                            self.partials.setdefault(ev["check"], {}).update(ev["figures"])
                        elif kind == "end":
                            rec = Record(**ev["record"])
                            self._finish(rec)
                            if rec.name in pending:
                                pending.remove(rec.name)
                            current, progressed = None, True
                    rc = self.proc.poll()
                    if rc is not None:
                        events, pos = self._events(pos)
                        if events:  # written just before it exited: handle them first
                            continue
                        if current is not None:
                            self._finish(self._failed(current, f"the worker died (exit code {rc}) during the check"))
                            pending.remove(current[0])
                        elif pending and not progressed:
                            for name in pending:
                                self._finish(Record(name, FAIL, error=f"the worker exited with code {rc} before "
                                                    f"starting a check (see its output above)"))
                            pending = []
                        break
                    if current is not None and time.monotonic() > current[1] + current[2] + grace(current[2]):
                        self.log(f"{current[0]}: over its budget of {current[2]:.0f} s: killing the worker")
                        self._kill_worker()
                        self._finish(self._failed(current, f"timed out: still running "
                                                           f"{current[2] + grace(current[2]):.0f} s after it started "
                                                           f"(budget {current[2]:.0f} s)"))
                        pending.remove(current[0])
                        break
                    if current is None and time.time() > self.deadline_wall + GRACE_S:
                        self._kill_worker()
                        break
                    time.sleep(0.1)
                if time.time() > self.deadline_wall:
                    for name in pending:
                        self._finish(Record(name, SKIP, summary="no time left in --time-limit"))
                    pending = []
        except KeyboardInterrupt:
            self.interrupted = True
            self._kill_worker()
            for name in pending:
                if name in self.records:
                    continue
                if self.current is not None and self.current[0] == name:
                    self.records[name] = self._failed(self.current, "interrupted (SIGTERM or Ctrl-C) while running")
                else:
                    self.records[name] = Record(name, SKIP, summary="not run: interrupted")
            self.log("interrupted: results so far written")
        finally:
            self._kill_worker()
            self.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            self.meta["wall_s"] = round(time.time() - self.t0, 1)
            self._write()
        print("\n" + summary_table(self.records, self.names), flush=True)
        self.log(f"done in {time.time() - self.t0:.0f} s: {self.out / 'gpu_check.json'}, "
                 f"{self.out / 'gpu_check.md'}")
        return 1 if any(r.status == FAIL for r in self.records.values()) or self.interrupted else 0

    def _failed(self, current: tuple[str, float, float], why: str) -> Record:
        name, started, budget = current
        return Record(name, FAIL, seconds=round(time.monotonic() - started, 1), budget_s=budget,
                      figures=self.partials.get(name, {}), error=why,
                      summary=f"{why}; figures sent before: {_short(self.partials.get(name, {}))}")

    def _finish(self, rec: Record) -> None:
        self.records[rec.name] = rec
        line = f"{rec.name}: {rec.status} ({rec.seconds:.1f} s) {rec.summary}"
        if rec.error and rec.error not in rec.summary:
            line += f" | {rec.error}"
        self.log(line)
        self._write()

    def _write(self) -> None:
        """gpu_check.json and gpu_check.md as they stand (atomic replace: a reader never sees half a file)."""
        data = {"meta": self.meta, "checks": {n: vars(r) for n, r in self.records.items()}}
        _write_atomic(self.out / "gpu_check.json", json.dumps(data, indent=2, default=str) + "\n")
        _write_atomic(self.out / "gpu_check.md", markdown(self.meta, self.records, self.names))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (dirty)' if dirty else ''}" if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _short(figures: dict[str, Any], limit: int = 6) -> str:
    items = [f"{k} {_fmt(v)}" for k, v in figures.items() if not isinstance(v, (dict, list))][:limit]
    return ", ".join(items) if items else "none"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_table(records: dict[str, Record], names: list[str]) -> str:
    rows = [("check", "status", "s / budget", "summary")]
    for n in names:
        r = records.get(n, Record(n, SKIP, summary="not run"))
        rows.append((n, r.status, f"{r.seconds:.0f} / {r.budget_s:.0f}", r.summary[:110]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    targets = [(n, t) for n in names if n in records for t in records[n].targets]
    if targets:
        lines += ["", "targets:"]
        lines += [f"  {n}: {t['what']} = {_fmt(t['value'])} (target {t['target']}): "
                  f"{'met' if t['met'] else 'MISSED'}" for n, t in targets]
    return "\n".join(lines)


def markdown(meta: dict[str, Any], records: dict[str, Record], names: list[str]) -> str:
    """The block to paste into BENCHMARKS.md: where and how it ran, one row per check, the targets."""
    w = meta.get("worker", {})
    device = w.get("device_name", "?")
    lines = [f"### GPU acceptance: {device} x {w.get('device_count', '?')}, {meta['started']}"
             + (" (DRY RUN on CPU: tiny sizes, not GPU figures)" if meta["dry_run"] else ""), "",
             f"`{meta['command']}`, commit {meta['commit']}, torch {w.get('torch', '?')}, CUDA {w.get('cuda', '-')}, "
             f"wall {meta.get('wall_s', '?')} s (limit {meta['time_limit_s']:.0f} s).", "",
             "| check | status | time s (budget) | result |", "| --- | --- | ---: | --- |"]
    for n in names:
        r = records.get(n, Record(n, SKIP, summary="not run"))
        text = (r.summary + (f" **error:** {r.error}" if r.error and r.error not in r.summary else "")).replace("|", "/")
        lines.append(f"| {n} | {r.status} | {r.seconds:.1f} ({r.budget_s:.0f}) | {text} |")
    targets = [(n, t) for n in names if n in records for t in records[n].targets]
    if targets:
        lines += ["", "| target | value | wanted | met |", "| --- | ---: | --- | --- |"]
        lines += [f"| {n}: {t['what']} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['met'] else '**no**'} |"
                  for n, t in targets]
    notes = [(n, note) for n in names if n in records for note in records[n].notes]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}: {note}" for n, note in notes]
    return "\n".join(lines) + "\n"


# ===============================================================================================================
# the worker: runs checks in this process, reports through the events file


class Skip(Exception):
    """The check cannot run here; the message says why."""


@dataclass
class Sizes:
    """What the checks build: real sizes on a GPU, tiny ones for --dry-run (the same code either way)."""

    correct: list[str]  # config overrides of the correctness model (the routed `paper` spec)
    correct_batch: int
    correct_steps: int
    speed: list[str]  # config overrides of the speed model (vit_large/14 `paper`, real heads)
    warmup: int
    timed: int
    attn: tuple[int, int, int, int]  # batch, tokens, dim, heads of the attention check
    backbone: tuple[str, int, int, int]  # arch, patch, image size, batch of the backbone comparison
    compile_backend: str  # inductor on a GPU; dynamo alone ("eager") on CPU, where inductor takes minutes


TINY = ["student.arch=vit_pico", "student.embed_dim=32", "student.depth=3", "student.num_heads=2",
        "student.patch_size=8", "student.num_register_tokens=1", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "dino.head_n_prototypes=128",
        "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_n_prototypes=128",
        "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32"]
GPU_SIZES = Sizes(correct=["model=vit_small", "spec=paper"], correct_batch=16, correct_steps=3,
                  speed=["model=vit_large", "spec=paper"], warmup=3, timed=10, attn=(32, 257, 1024, 16),
                  backbone=("vit_large", 14, 224, 64), compile_backend="inductor")
# dry run: QKV routed in every block (one block variant: half the graphs for dynamo to trace, the routed QKV kept)
DRY_SIZES = Sizes(correct=["spec=paper", *TINY, "spec.qkv=all", "student.drop_path_rate=0.1"], correct_batch=4,
                  correct_steps=2,
                  speed=["spec=paper", *TINY, "student.drop_path_rate=0.3", "ibot.separate_head=true"],
                  warmup=1, timed=2, attn=(2, 17, 32, 2), backbone=("vit_pico", 8, 32, 4), compile_backend="eager")


class Ctx:
    """What a check gets: device, sizes, time left, a cache shared by the checks of one worker, reporting."""

    def __init__(self, args: argparse.Namespace, events: Path, t0: float):
        import torch

        self.args, self.events, self.t0 = args, events, t0
        self.dry = args.dry_run
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.sizes = DRY_SIZES if self.dry else GPU_SIZES
        self.out = Path(args.out)
        self.work = Path(args.work_dir) if args.work_dir else Path(os.environ.get("TMPDIR", "/tmp"))
        self.cache: dict[str, Any] = {}
        self.check = ""
        self.ends_at = 0.0
        self.budget = 0.0

    def emit(self, event: str, **payload: Any) -> None:
        with open(self.events, "a") as f:
            f.write(json.dumps({"event": event, "t": time.time(), **payload}, default=str) + "\n")
            f.flush()

    def log(self, msg: str) -> None:
        print(f"{stamp(self.t0)} {self.check}: {msg}", flush=True)

    def partial(self, **figures: Any) -> None:
        """Figures known so far: kept by the parent even if this check is killed later."""
        self.emit("partial", check=self.check, figures=figures)

    def left(self) -> float:
        """Seconds left of this check's budget (loops use it to stop early with fewer figures, not none)."""
        return self.ends_at - time.monotonic()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass
class Result:
    """What a check returns (raise Skip or any exception instead to SKIP / FAIL)."""

    status: str
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def target(what: str, value: float | None, wanted: str, met: bool | None) -> list[dict[str, Any]]:
    return [] if value is None or met is None else [{"what": what, "value": value, "target": wanted, "met": met}]


# ---------------------------------------------------------------------------------------------------------------
# dinospec's training step, as the trainer runs it


def load_cfg(overrides: list[str]) -> Any:
    from dinospec.config import load_config

    return load_config([], overrides)


def make_batches(cfg: Any, n: int, device: "torch.device", seed: int = 0) -> list[dict[str, Any]]:
    """n synthetic batches of the loader's layout (scripts/bench_train_step.py), moved as the trainer moves them."""
    sys.path.insert(0, str(SCRIPTS))
    from bench_train_step import synthetic_batch

    from dinospec.trainer import _batches

    return list(_batches((synthetic_batch(cfg, seed + i) for i in range(n)), device))


def build_trainee(cfg: Any, device: "torch.device", precision: str = "fp32", strategy: str = "none",
                  seed: int | None = None, on_device: bool = False) -> Trainee:
    """A dinospec.trainer.Trainee built in set_up's order (seed, SSLMetaArch, per-rank seed, Trainee.build with
    compute.precision / compute.strategy), its progress placed after warmup and the last-layer freeze so every
    parameter moves. on_device=True builds the model directly on the device (a ViT-L initialised on the CPU takes
    seconds; the values differ, which speed checks do not care about)."""
    from contextlib import nullcontext

    import torch
    from omegaconf import OmegaConf

    from dinospec import dist as ddist
    from dinospec.rng import seed_all
    from dinospec.ssl.meta_arch import SSLMetaArch
    from dinospec.trainer import Trainee

    cfg = OmegaConf.merge(cfg, {"compute": {"precision": precision, "strategy": strategy},
                                "train": {"nonfinite": "stop"}})  # a non-finite loss: NonFiniteLoss, the check's FAIL
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    with torch.device(device) if on_device else nullcontext():
        meta = SSLMetaArch(cfg)
    seed_all(seed + 1 + ddist.rank())
    t = Trainee.build(cfg, meta.to(device), device, ddist.world_size())
    o = cfg.optim
    t.progress.step = max(o.warmup_epochs, o.freeze_last_layer_epochs) * cfg.train.official_epoch_length
    return t


def step(t: Trainee, batch: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The trainer's step at the trainee's next step, as the trainer runs it between log steps (no diagnostics)."""
    from dinospec.trainer import train_step

    return train_step(t, batch, t.progress.step, diagnostics=False)


def forward_losses(t: Trainee, batch: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The next step's losses alone, under the run's cast (no update): gradients to compare."""
    with t.par.autocast:
        return t.meta.losses(batch, t.sched.at(t.progress.step)["teacher_temp"], t.par.student_forward)



def floats(losses: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in losses.items()}


JUDGED_TERMS = ("dino_loss", "ibot_loss")  # the total and KoLeo are reported: see compare_losses


def compare_losses(runs: list[dict[str, float]], ref: list[dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Max relative difference over steps of the judged terms (DINO, iBOT), and of every loss term for the record.

    KoLeo (weight 0.1, inside the total) is reported, not judged: at a fresh init (LayerScale 1e-5) the [CLS]
    features of different images are nearly identical, and once parameters and residual stream are bf16 (FSDP2's
    MixedPrecisionPolicy) the blocks' 1e-5-scaled updates fall below bf16's resolution, so every image gets the same
    [CLS] and KoLeo sits at -log(eps) while fp32's does not (tests/test_train.py notes the same on CPU). The DINO and
    iBOT terms measure the numerics of backbone, heads and targets."""
    terms = [k for k in ref[0] if k == "loss" or k.endswith("_loss")]  # not the diagnostics meta_arch adds
    per_term = {k: max(abs(r[k] - f[k]) / max(abs(f[k]), 1e-12) for r, f in zip(runs, ref)) for k in terms}
    return max(per_term[k] for k in JUDGED_TERMS if k in per_term), per_term


def koleo_note(per_term: dict[str, float], runs: list[dict[str, float]], ref: list[dict[str, float]]) -> list[str]:
    """Say so, and why if it is the known cause, when KoLeo (and with it the total) is off by more than 2%."""
    if per_term.get("koleo_loss", 0.0) <= 0.02:
        return []
    ko = [round(r["koleo_loss"], 2) for r in runs]
    note = (f"KoLeo differs by {per_term['koleo_loss']:.0%} (bf16 {ko} vs fp32 "
            f"{[round(r['koleo_loss'], 2) for r in ref]}), the total loss by {per_term.get('loss', 0.0):.1%}: ")
    if all(abs(k - 36.84) < 0.01 for k in ko):  # 2 x -log(1e-8): every nearest-neighbour distance at the clamp
        return [note + "every image gets the same [CLS] in bf16: with bf16 parameters the residual stream is bf16 "
                       "and the blocks' LayerScale-1e-5 updates vanish below its resolution at init"]
    return [note + "at init the [CLS] features of different images are nearly identical, so their nearest-neighbour "
                   "distances are dominated by rounding"]


def fp32_reference(ctx: Ctx) -> list[dict[str, float]]:
    """The correctness model's losses in fp32 on one process (shared by the mixed-precision checks)."""
    if "fp32_ref" not in ctx.cache:
        cfg = load_cfg(ctx.sizes.correct + [f"train.batch_size_per_gpu={ctx.sizes.correct_batch}"])
        batches = make_batches(cfg, ctx.sizes.correct_steps, ctx.device)
        trainee = build_trainee(cfg, ctx.device, "fp32")
        ctx.cache["fp32_ref"] = [floats(step(trainee, b)) for b in batches]
    return ctx.cache["fp32_ref"]


def timed_steps(ctx: Ctx, trainee: Trainee, batch: dict[str, Any], n: int) -> list[float]:
    """Seconds of each of n training steps (device synchronised around each)."""
    times = []
    for _ in range(n):
        ctx.sync()
        t = time.perf_counter()
        step(trainee, batch)
        ctx.sync()
        times.append(time.perf_counter() - t)
    return times


def speed_batch(ctx: Ctx) -> int:
    """Images per step of the ViT-L checks: --vitl-batch, else 64 on >= 100 GiB devices (H200), else 32 (H100)."""
    import torch

    if ctx.args.vitl_batch:
        return ctx.args.vitl_batch
    if not ctx.cuda:
        return 4
    return 64 if torch.cuda.get_device_properties(ctx.device).total_memory >= 100 * 2**30 else 32


def vitl(ctx: Ctx, spec: str = "paper") -> tuple[Trainee, dict[str, Any]]:
    """The ViT-L speed model of a spec and a batch for it, built once per worker; halves the batch on OOM."""
    import gc

    import torch

    key = f"vitl_{spec}"
    if key not in ctx.cache:
        batch = ctx.cache.get("vitl_batch") or speed_batch(ctx)
        others = [k for k in ctx.cache if str(k).startswith("vitl_") and k not in (key, "vitl_batch")]
        while True:
            try:
                cfg = load_cfg(ctx.sizes.speed + [f"spec={spec}", f"train.batch_size_per_gpu={batch}"])
                trainee = build_trainee(cfg, ctx.device, "bf16", on_device=True)
                data = make_batches(cfg, 1, ctx.device)[0]
                step(trainee, data)  # first step: cuBLAS / SDPA set-up, AdamW state; out of memory shows here
                break
            except torch.cuda.OutOfMemoryError:
                if batch <= 8 or others:  # a smaller batch than the cached model's would not compare
                    raise
            # here, outside the except block, the traceback no longer holds the failed step's tensors
            trainee = data = None  # type: ignore[assignment]
            gc.collect()
            torch.cuda.empty_cache()
            ctx.log(f"out of memory at batch {batch}: trying {batch // 2}")
            batch //= 2
        ctx.cache["vitl_batch"] = batch
        ctx.cache[key] = (trainee, data)
    return ctx.cache[key]


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and MFU


def ssl_flops_per_image(cfg: Any, masked_per_image: float) -> dict[str, float]:
    """Model FLOPs of one SSL step per image (2 global + L local crops), nominal and as executed.

    Backbone forward FLOPs come from dinospec.model_info.count_flops (fvcore, SDPA counted, 2 FLOPs per
    multiply-add) on backbones of depth 1 and 2 at each crop size: blocks are identical in FLOPs (routing adds
    none), so FLOPs(depth D) = outside + D x block, exactly, without building a full ViT-L on the CPU. Heads: 2 x in
    x out per Linear per token, for the [CLS] of every crop and the masked patches. Backward = 2 x forward for the
    student (the usual MFU convention); the teacher runs forward only, on the global crops. "executed" scales the
    student's blocks by the fraction of rows drop path computes when it runs on a batch subset (DINOv2's trick:
    floor(n (1 - rate)) of n rows), since those FLOPs are never done.
    """
    import torch
    from torch import nn

    from dinospec.model_info import count_flops
    from dinospec.models.specialize import vanilla_config
    from dinospec.models.vit import arch_kwargs, build_backbone
    from dinospec.ssl.meta_arch import _heads

    student = dict(cfg.student)
    depth = arch_kwargs(student)["depth"]
    g, l, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    vanilla = vanilla_config(cfg.spec)  # routing adds no FLOPs (model_info counts both and tests it)
    models = []
    for depth_here in (1, 2):  # built at the global crop size, as the student; counted at both crop sizes
        with torch.device("meta"):  # no init: the values do not change the count
            model = build_backbone({**student, "depth": depth_here, "drop_path_rate": 0.0}, vanilla, img_size=g)
        model = model.to_empty(device="cpu")
        for t in [*model.parameters(), *model.buffers()]:
            torch.nn.init.zeros_(t)
        models.append(model)

    def split(img: int) -> tuple[float, float]:
        f1, f2 = (count_flops(model, img) for model in models)
        return f1 - (f2 - f1), f2 - f1  # outside the blocks, one block

    (out_g, blk_g), (out_l, blk_l) = split(g), split(l)
    with torch.device("meta"):  # shapes are all the count needs: no memory, no init
        heads = _heads(cfg, arch_kwargs(student)["embed_dim"])
    per_token = {k: sum(2 * m.in_features * m.out_features for m in h.modules() if isinstance(m, nn.Linear))
                 for k, h in heads.items()}
    cls_head, patch_head = per_token["dino_head"], per_token.get("ibot_head", per_token["dino_head"])
    rate = cfg.student.drop_path_rate
    b = cfg.train.batch_size_per_gpu
    subset = rate > 0 and (cfg.student.drop_path_mode == "subset" or (cfg.student.drop_path_mode == "auto"
                                                                       and rate > 0.1))

    def kept(rows: int) -> float:  # dinospec.models.vit.add_residual_of_subset
        return max(int(rows * (1 - rate)), 1) / rows if subset else 1.0

    def student_fwd(keep_g: float, keep_l: float) -> float:
        backbone = 2 * (out_g + depth * blk_g * keep_g) + n_local * (out_l + depth * blk_l * keep_l)
        return backbone + (2 + n_local) * cls_head + masked_per_image * patch_head

    teacher = 2 * (out_g + depth * blk_g) + 2 * cls_head + masked_per_image * patch_head
    nominal = 3 * student_fwd(1.0, 1.0) + teacher
    executed = 3 * student_fwd(kept(2 * b), kept(n_local * b)) + teacher
    return {"backbone_fwd_flops_global": out_g + depth * blk_g, "backbone_fwd_flops_local": out_l + depth * blk_l,
            "flops_per_image_nominal": nominal, "flops_per_image_executed": executed}


def step_flops(ctx: Ctx, trainee: Trainee, batch: dict[str, Any]) -> dict[str, float]:
    """ssl_flops_per_image for this model and batch, counted once per worker (fvcore traces take seconds)."""
    b = trainee.cfg.train.batch_size_per_gpu
    masked = float(batch["masks"].sum()) / b
    key = ("flops", trainee.cfg.student.arch, b, masked)
    if key not in ctx.cache:
        ctx.cache[key] = {**ssl_flops_per_image(trainee.cfg, masked), "masked_patches_per_image": masked}
    return ctx.cache[key]


def device_peak(ctx: Ctx) -> tuple[str, float] | None:
    """(source, bf16 dense TFLOP/s per device) for MFU: --peak-tflops, else PEAK_BF16_DENSE_TFLOPS, else None."""
    import torch

    if ctx.args.peak_tflops:
        return "--peak-tflops", ctx.args.peak_tflops
    if ctx.cuda:
        return peak_tflops(torch.cuda.get_device_name(ctx.device))
    return None


# ---------------------------------------------------------------------------------------------------------------
# the checks


def check_env(ctx: Ctx) -> Result:
    import importlib.metadata
    import platform

    import torch

    figures: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                               "device": str(ctx.device), "dry_run": ctx.dry}
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        figures.update(device_name=props.name, device_count=torch.cuda.device_count(),
                       capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                       cudnn=torch.backends.cudnn.version())
        try:
            figures["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 - a build without NCCL: the FSDP checks will say more
            figures["nccl"] = f"unavailable ({type(e).__name__})"
    for dist_name in ("xformers", "timm", "triton"):  # installed versions (whether they run is checked later)
        try:
            figures[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            figures[dist_name] = "not installed"
    peak = device_peak(ctx)
    figures["peak_bf16_tflops"] = peak[1] if peak else None
    figures["peak_source"] = peak[0] if peak else "unknown device: pass --peak-tflops for MFU"
    name = figures.get("device_name", "CPU")
    return Result(INFO, f"{name} x {figures.get('device_count', 0)}, torch {figures['torch']}, CUDA {figures['cuda']}, "
                        f"bf16 peak {figures['peak_bf16_tflops']} TFLOP/s ({figures['peak_source']})", figures)


def check_bf16_autocast(ctx: Ctx) -> Result:
    cfg = load_cfg(ctx.sizes.correct + [f"train.batch_size_per_gpu={ctx.sizes.correct_batch}"])
    ref = fp32_reference(ctx)
    ctx.partial(fp32_losses=[r["loss"] for r in ref])
    trainee = build_trainee(cfg, ctx.device, "bf16")
    runs = [floats(step(trainee, b)) for b in make_batches(cfg, ctx.sizes.correct_steps, ctx.device)]
    worst, per_term = compare_losses(runs, ref)
    ok = worst <= 0.02
    return Result(PASS if ok else FAIL,
                  f"{len(runs)} steps, max rel. diff vs fp32 {worst:.2%} (dino, ibot; limit 2%); total "
                  f"{per_term.get('loss', 0):.2%}, koleo {per_term.get('koleo_loss', 0):.2%}",
                  {"max_rel_diff": worst, "per_term": per_term, "bf16": runs, "fp32": ref},
                  notes=koleo_note(per_term, runs, ref))


class single_rank_group:
    """A world-size-1 process group with the backend dinospec's init_distributed would pick (NCCL on GPU)."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx

    def __enter__(self) -> str:
        import torch.distributed as tdist

        from dinospec import dist as ddist

        pick = getattr(ddist, "backend_for", None)  # newer dinospec: "cpu:gloo,cuda:nccl" on GPU
        backend = pick(self.ctx.cuda) if pick else ("nccl" if self.ctx.cuda else "gloo")
        tdist.init_process_group(backend=backend, store=tdist.HashStore(), rank=0, world_size=1,
                                 device_id=self.ctx.device if self.ctx.cuda else None)
        return backend

    def __exit__(self, *exc: Any) -> None:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()


def check_fsdp2_ws1(ctx: Ctx) -> Result:
    cfg = load_cfg(ctx.sizes.correct + [f"train.batch_size_per_gpu={ctx.sizes.correct_batch}"])
    ref = fp32_reference(ctx)
    batches = make_batches(cfg, ctx.sizes.correct_steps, ctx.device)
    with single_rank_group(ctx) as backend:  # a process group: compute.strategy=fsdp is kept on one rank
        trainee = build_trainee(cfg, ctx.device, "bf16", strategy="fsdp")
        mixed = [floats(step(trainee, b)) for b in batches]
        ctx.partial(backend=backend, bf16_losses=[r["loss"] for r in mixed])
        del trainee
        trainee = build_trainee(cfg, ctx.device, "fp32", strategy="fsdp")
        full = [floats(step(trainee, b)) for b in batches]
    worst, per_term = compare_losses(mixed, ref)
    worst32, _ = compare_losses(full, ref)
    ok = worst <= 0.02 and worst32 <= 1e-4
    return Result(PASS if ok else FAIL,
                  f"{backend}: bf16 MixedPrecisionPolicy max rel. diff vs fp32 {worst:.2%} (dino, ibot; limit 2%), "
                  f"total {per_term.get('loss', 0):.2%}, koleo {per_term.get('koleo_loss', 0):.2%}; FSDP2 fp32 vs plain "
                  f"fp32 {worst32:.1e} (limit 1e-4)",
                  {"backend": backend, "max_rel_diff": worst, "per_term": per_term, "fsdp_fp32_vs_fp32": worst32,
                   "bf16": mixed, "fsdp_fp32": full, "fp32": ref}, notes=koleo_note(per_term, mixed, ref))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(local_rank: int, world: int, port: int, dry: bool, overrides: list[str], steps: int,
               out_json: str, work: str) -> None:
    """One rank of the fsdp2_ws2 check, started by torch.multiprocessing with torchrun's environment variables
    and joined through dinospec.dist.init_distributed (NCCL on GPU, gloo on CPU)."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from dinospec import dist as ddist
    from dinospec.checkpoint import Checkpointer
    from dinospec.config import to_yaml

    if dry:
        torch.set_num_threads(1)
    env, device = ddist.init_distributed("cpu" if dry else "cuda", timeout_s=120)
    try:
        cfg = load_cfg(overrides)
        batches = make_batches(cfg, steps, device, seed=1000 * env.rank)
        out: dict[str, Any] = {"backend": str(torch.distributed.get_backend())}
        trainees = {}
        for precision in ("fp32", "bf16"):
            trainees[precision] = build_trainee(cfg, device, precision, strategy="fsdp")
            out[precision] = [ddist.mean_over_ranks(floats(step(trainees[precision], b)), device) for b in batches]
        # the multi-GPU checkpoint path (issue #12: Progress all-gathered CPU RNG states on the NCCL group)
        try:
            trainee = trainees["bf16"]
            ckpt = Checkpointer(Path(work) / "run", keep_last=1)
            ckpt.save(trainee.progress.step, trainee.state(), config_yaml=to_yaml(cfg))
            fresh = build_trainee(cfg, device, "bf16", strategy="fsdp", seed=cfg.train.seed + 7)
            ckpt.load(fresh.state())
            same = all(bool((a.full_tensor() == b.full_tensor()).all()) for a, b in
                       zip(trainee.meta.student.parameters(), fresh.meta.student.parameters()))
            ckpt.close()
            out["checkpoint"] = "bitwise equal after save + load" if same else "loaded weights DIFFER"
            out["checkpoint_ok"] = same and fresh.progress.step == trainee.progress.step
        except Exception as e:  # noqa: BLE001 - reported, the loss figures above still count
            out["checkpoint"] = f"{type(e).__name__}: {str(e)[:400]}"
            out["checkpoint_ok"] = False
        if env.rank == 0:
            Path(out_json).write_text(json.dumps(out))
    finally:
        ddist.shutdown()


def check_fsdp2_ws2(ctx: Ctx) -> Result:
    import importlib
    import tempfile

    import torch
    import torch.multiprocessing as mp

    if ctx.cuda and torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count()} GPU here: the 2-process NCCL run needs 2")
    batch = max(ctx.sizes.correct_batch // 2, 2)
    overrides = ctx.sizes.correct + [f"train.batch_size_per_gpu={batch}"]
    if not ctx.cuda:  # forked ranks inherit this process's modules: import the checkpoint stack once, not per rank
        for module in ("torch.distributed.checkpoint.default_planner", "torch.distributed.fsdp", "dinospec.checkpoint"):
            importlib.import_module(module)
    with tempfile.TemporaryDirectory(dir=ctx.work, prefix="gpu_check_ws2_") as tmp:
        out_json = Path(tmp) / "ranks.json"
        # fork on CPU (the worker's imports are reused: seconds on a busy CI box); spawn on GPU, where a CUDA
        # context cannot be forked
        mp.start_processes(_rank_main, nprocs=2, join=True, start_method="spawn" if ctx.cuda else "fork",
                           args=(2, _free_port(), ctx.dry, overrides, ctx.sizes.correct_steps, str(out_json), tmp))
        out = json.loads(out_json.read_text())
    worst, per_term = compare_losses(out["bf16"], out["fp32"])
    ok = worst <= 0.02 and out["checkpoint_ok"]
    return Result(PASS if ok else FAIL,
                  f"2 ranks ({out['backend']}), batch {batch} each: bf16 MixedPrecisionPolicy vs FSDP2 fp32 max rel. "
                  f"diff {worst:.2%} (dino, ibot; limit 2%), total {per_term.get('loss', 0):.2%}, koleo "
                  f"{per_term.get('koleo_loss', 0):.2%}; 2-rank checkpoint: {out['checkpoint']}",
                  {"max_rel_diff": worst, "per_term": per_term, **out}, notes=koleo_note(per_term, out["bf16"], out["fp32"]))


def check_sdpa_backends(ctx: Ctx) -> Result:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from dinospec.models.routed import Routing, TokenLayout
    from dinospec.models.vit import Attention

    b, n, c, h = ctx.sizes.attn
    torch.manual_seed(0)
    attn = Attention(c, h, 1, 1, True, True).to(ctx.device)  # dinospec's layer: its q, k, v layout included
    x = torch.randn(b, n, c, device=ctx.device)
    probe = torch.randn(b, n, c, device=ctx.device)
    routing = Routing.from_lengths((0, 0, 0), TokenLayout(0).lengths(n - 1))

    def run(backends: list[Any]) -> list[torch.Tensor]:
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with sdpa_kernel(backends), torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            out = attn(xi, routing)
        (out.float() * probe).sum().backward()
        return [out.detach().float(), xi.grad.float()] + [p.grad.float() for p in attn.parameters()]

    def rel(a: torch.Tensor, b_: torch.Tensor) -> float:
        return float((a - b_).norm() / b_.norm().clamp_min(1e-30))

    ref = run([SDPBackend.MATH])
    figures: dict[str, Any] = {"shape_bnch": [b, n, c, h]}
    notes, bad = [], []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            got = run([backend])
        except RuntimeError as e:
            why = str(e).strip().splitlines()[0][:200]
            if not ctx.cuda:
                figures[name] = "skipped: no CPU kernel (needs CUDA)"
            elif name == "cudnn":
                figures[name] = f"not available: {why}"  # optional on some builds: reported, not failed
            else:
                figures[name] = f"NOT AVAILABLE: {why}"
                bad.append(name)
            continue
        out_err, grad_err = rel(got[0], ref[0]), max(rel(a, r) for a, r in zip(got[1:], ref[1:]))
        figures[name] = {"output_rel_err": out_err, "grad_rel_err": grad_err}
        if out_err > 2e-2 or grad_err > 2e-2:
            bad.append(name)
    # which kernel the dispatcher picks for the model's own call (no restriction), from the aten op names
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            attn(x, routing).float().sum().backward()
        ctx.sync()
    ops = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and "backward" not in e.key})
    picked = next((k for k, tag in (("flash", "flash"), ("efficient", "efficient"), ("cudnn", "cudnn"),
                                    ("math", "math")) if any(tag in op for op in ops)), "unknown")
    figures.update(selected=picked, selected_ops=ops)
    if ctx.cuda and picked in ("math", "unknown"):
        bad.append(f"selected {picked}")
    tested = {k: v for k, v in figures.items() if isinstance(v, dict)}
    summary = (f"dispatcher picks {picked}; vs math (bf16), max rel. err output / grads: "
               + ", ".join(f"{k} {v['output_rel_err']:.1e} / {v['grad_rel_err']:.1e}" for k, v in tested.items())
               + " (limit 2e-2)"
               + "".join(f"; {k}: {figures[k]}" for k in ("flash", "efficient", "cudnn") if isinstance(figures[k], str)))
    return Result(FAIL if bad else PASS, summary, figures, notes=notes)


def check_xformers(ctx: Ctx) -> Result:
    import torch

    try:
        import xformers
        import xformers.ops as xops
    except Exception as e:  # noqa: BLE001 - ImportError, or an extension built for another torch
        raise Skip(f"xformers not importable: {type(e).__name__}: {str(e)[:200]}") from None
    if not ctx.cuda:
        raise Skip(f"xformers {xformers.__version__} has no CPU kernels (needs CUDA)")
    q = torch.randn(1, 16, 2, 64, device=ctx.device, dtype=torch.bfloat16)
    try:
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001 - its ops were built for another torch / CUDA
        raise Skip(f"xformers {xformers.__version__} installed but its kernels do not run with torch "
                   f"{torch.__version__}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from None
    from dinospec.models.vit import build_backbone

    cfg = load_cfg(ctx.sizes.correct + ["student.drop_path_rate=0.0"])
    models = {}
    for backend in ("sdpa", "xformers"):
        torch.manual_seed(0)
        models[backend] = build_backbone({**cfg.student, "attn_backend": backend}, cfg.spec,
                                         cfg.crops.global_crops_size).to(ctx.device)
    models["xformers"].load_state_dict(models["sdpa"].state_dict())
    size = cfg.crops.global_crops_size
    x = torch.randn(ctx.sizes.correct_batch, 3, size, size, device=ctx.device)
    res = {}
    for backend, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model.forward_features(x)
        tokens = torch.cat([out["x_norm_clstoken"].unsqueeze(1), out["x_norm_patchtokens"]], 1).float()
        tokens.square().mean().backward()
        res[backend] = [tokens.detach()] + [p.grad.float() for p in model.parameters()]
    errs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(res["xformers"], res["sdpa"])]
    out_err, grad_err = errs[0], max(errs[1:])
    ok = out_err <= 2e-2 and grad_err <= 5e-2
    return Result(PASS if ok else FAIL, f"xformers {xformers.__version__} vs sdpa, {cfg.student.arch} bf16: rel. err "
                  f"tokens {out_err:.1e} (limit 2e-2), grads {grad_err:.1e} (limit 5e-2)",
                  {"xformers": xformers.__version__, "tokens_rel_err": out_err, "grads_rel_err": grad_err})


def _state_tensors(trainee: Trainee) -> dict[str, "torch.Tensor"]:
    """Every tensor a resume must restore: model (student, teacher, loss centres) and AdamW state, on the CPU."""
    out = {f"model.{k}": v.detach().cpu().clone() for k, v in trainee.meta.state_dict().items()}
    for i, st in trainee.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.detach().cpu().clone() for k, v in st.items() if hasattr(v, "cpu")})
    return out


def check_checkpoint_resume(ctx: Ctx) -> Result:
    import tempfile
    import warnings

    import torch

    from dinospec.checkpoint import Checkpointer
    from dinospec.config import to_yaml

    steps = 4
    cfg = load_cfg(ctx.sizes.correct + [f"train.batch_size_per_gpu={max(ctx.sizes.correct_batch // 2, 2)}"])
    batches = make_batches(cfg, steps, ctx.device)
    precision = "bf16" if ctx.cuda else "fp32"  # the device's default (compute.precision=auto)
    flagged: set[str] = set()

    def straight() -> tuple[list[float], dict[str, torch.Tensor]]:
        t = build_trainee(cfg, ctx.device, precision)
        losses = [float(step(t, b)["loss"]) for b in batches]
        return losses, _state_tensors(t)

    torch.use_deterministic_algorithms(True, warn_only=True)  # what train.deterministic=true sets
    try:
        with warnings.catch_warnings(record=True) as caught, tempfile.TemporaryDirectory(
                dir=ctx.work, prefix="gpu_check_resume_") as tmp:
            warnings.simplefilter("always")
            losses_a, state_a = straight()
            ctx.partial(uninterrupted_losses=losses_a)
            first = build_trainee(cfg, ctx.device, precision)
            losses_b = [float(step(first, b)["loss"]) for b in batches[: steps // 2]]
            ckpt = Checkpointer(Path(tmp) / "run", keep_last=1)
            ckpt.save(first.progress.step, first.state(), config_yaml=to_yaml(cfg))
            del first
            resumed = build_trainee(cfg, ctx.device, precision, seed=cfg.train.seed + 7)  # other weights: load must overwrite
            ckpt.load(resumed.state())
            ckpt.close()
            losses_b += [float(step(resumed, b)["loss"]) for b in batches[steps // 2:]]
            state_b = _state_tensors(resumed)
            differ = sorted(k for k in state_a if not torch.equal(state_a[k], state_b[k]))
            figures: dict[str, Any] = {"precision": precision, "tensors": len(state_a), "differ": len(differ),
                                       "losses_uninterrupted": losses_a, "losses_resumed": losses_b}
            control = ""
            if differ:  # is it the resume, or do two uninterrupted runs already differ (non-deterministic kernels)?
                _, state_c = straight()
                runs_differ = sum(not torch.equal(state_a[k], state_c[k]) for k in state_a)
                figures.update(first_differing=differ[:5], uninterrupted_runs_differ=runs_differ,
                               max_abs_diff=max(float((state_a[k].float() - state_b[k].float()).abs().max())
                                                for k in differ))
                control = (f"; two uninterrupted runs differ in {runs_differ} tensors too (kernel non-determinism)"
                           if runs_differ else "; two uninterrupted runs are equal: the resume lost something")
            flagged = {str(w.message).split(" does not have a deterministic")[0][:120] for w in caught
                       if "deterministic" in str(w.message)}
    finally:
        torch.use_deterministic_algorithms(False)
    figures["nondeterministic_ops_flagged"] = sorted(flagged)
    notes = [f"torch flagged as non-deterministic: {', '.join(sorted(flagged))}"] if flagged else []
    return Result(PASS if not differ else FAIL,
                  f"{steps // 2} steps + save/load + {steps - steps // 2} steps vs {steps} uninterrupted ({precision}, "
                  f"deterministic algorithms): {len(state_a) - len(differ)}/{len(state_a)} tensors bitwise equal, "
                  f"losses {'equal' if losses_a == losses_b else 'DIFFER'}{control}", figures, notes=notes)


def profile_steps(ctx: Ctx, trainee: Trainee, batch: dict[str, Any], steps: int, tag: str) -> dict[str, Any]:
    """Where a training step's time goes: top kernels (or CPU ops) and coarse categories; the full table is
    written to profile_<tag>.txt."""
    import re

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    ctx.sync()
    t = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(trainee, batch)
        ctx.sync()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    events = prof.key_averages()
    key = "self_device_time_total" if ctx.cuda else "self_cpu_time_total"
    rows = sorted((e for e in events if getattr(e, key) > 0), key=lambda e: getattr(e, key), reverse=True)
    if ctx.cuda:  # kernels only (CPU-side ops carry no device time of their own)
        rows = [e for e in rows if not e.key.startswith("aten::")]
    per_step = [(e.key, getattr(e, key) / 1e3 / steps) for e in rows]
    busy_ms = sum(ms for _, ms in per_step)
    categories = [("attention", r"flash|fmha|attention|sdpa"),  # before gemm: fmha_cutlass* is attention
                  ("gemm", r"gemm|matmul|\bmm\b|addmm|bmm|cutlass|xmma|sm\d+_|linear|conv"),
                  ("norm", r"layer_norm|layernorm"),
                  ("softmax / loss", r"softmax|log_softmax|nll|cross"), ("optimizer / EMA", r"adam|foreach|lerp"),
                  ("copy / cat / index", r"copy|cat|index|gather|scatter|elementwise_kernel_with_index")]
    cats: dict[str, float] = {}
    for name, ms in per_step:
        cat = next((c for c, pat in categories if re.search(pat, name, re.I)), "other elementwise / misc")
        cats[cat] = cats.get(cat, 0.0) + ms
    try:
        table = events.table(sort_by=key, row_limit=30)
    except (KeyError, AttributeError, ValueError):  # older spellings of the sort key
        table = events.table(sort_by="self_cuda_time_total" if ctx.cuda else "cpu_time_total", row_limit=30)
    (ctx.out / f"profile_{tag}.txt").write_text(table + "\n")
    return {"profile_wall_ms_per_step": wall_ms, "profile_busy_ms_per_step": busy_ms,
            "profile_busy_fraction": busy_ms / wall_ms if wall_ms else None,
            "profile_categories_ms": {k: round(v, 2) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "profile_top": [[n[:90], round(ms, 3)] for n, ms in per_step[:10]],
            "profile_table": f"profile_{tag}.txt"}


def check_ssl_step(ctx: Ctx) -> Result:
    import torch

    trainee, batch = vitl(ctx)
    cfg, b = trainee.cfg, ctx.cache["vitl_batch"]
    ctx.partial(batch=b)
    timed_steps(ctx, trainee, batch, max(ctx.sizes.warmup - 1, 0))  # vitl() ran the first
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = timed_steps(ctx, trainee, batch, ctx.sizes.timed)
    ms = statistics.median(times) * 1e3
    img_s = b / (ms / 1e3)
    figures: dict[str, Any] = {"batch": b, "ms_per_step": ms, "ms_min": min(times) * 1e3, "images_per_s": img_s,
                               "crops": f"2 x {cfg.crops.global_crops_size} + {cfg.crops.local_crops_number} x "
                                        f"{cfg.crops.local_crops_size}"}
    if ctx.cuda:
        figures.update(peak_allocated_gib=torch.cuda.max_memory_allocated(ctx.device) / 2**30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved(ctx.device) / 2**30)
    ctx.partial(**figures)
    flops = step_flops(ctx, trainee, batch)
    figures.update(flops)
    peak = device_peak(ctx)
    mfu = None
    if peak:
        mfu = flops["flops_per_image_executed"] * img_s / (peak[1] * 1e12)
        figures.update(mfu=mfu, mfu_nominal=flops["flops_per_image_nominal"] * img_s / (peak[1] * 1e12),
                       peak_tflops=peak[1], peak_source=peak[0])
        ctx.partial(**figures)
    notes = []
    if mfu is not None and mfu < MFU_TARGET and ctx.left() < 0.25 * ctx.budget:
        notes.append(f"MFU {mfu:.1%} < {MFU_TARGET:.0%}, but too little of the budget left for a profile")
    elif mfu is not None and mfu < MFU_TARGET:
        figures.update(profile_steps(ctx, trainee, batch, 3 if ctx.cuda else 1, "ssl_step"))
        cats = figures["profile_categories_ms"]
        notes.append(f"MFU {mfu:.1%} < {MFU_TARGET:.0%}: device busy {figures['profile_busy_fraction']:.0%} of the "
                     f"step; time by kind (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in list(cats.items())[:6])
                     + "; top: " + "; ".join(f"{n} {ms:.2f} ms" for n, ms in figures["profile_top"][:4]))
    mem = f", peak {figures['peak_allocated_gib']:.1f} GiB" if ctx.cuda else ""
    summary = (f"{cfg.student.arch}/{cfg.student.patch_size} paper, batch {b} ({figures['crops']}), bf16: "
               f"{ms:.1f} ms/step, {img_s:.1f} img/s{mem}, "
               + (f"MFU {mfu:.1%} (nominal {figures['mfu_nominal']:.1%}) of {peak[1]:.0f} TFLOP/s" if peak
                  else "MFU n/a (no bf16 peak known for this device)"))
    return Result(PASS, summary, figures, target("MFU", mfu, f">= {MFU_TARGET:.0%}",
                                                 None if mfu is None else mfu >= MFU_TARGET), notes)


def check_paper_vs_vanilla(ctx: Ctx) -> Result:
    import torch

    paper, batch = vitl(ctx, "paper")
    vanilla, _ = vitl(ctx, "none")
    both = {"paper": paper, "none": vanilla}
    times: dict[str, list[float]] = {"paper": [], "none": []}
    act: dict[str, float] = {}
    reps = max(ctx.sizes.timed // 2 + 1, 2)
    for r in range(reps):
        for spec in (("paper", "none") if r % 2 == 0 else ("none", "paper")):
            if ctx.cuda and r == 0:
                torch.cuda.synchronize(ctx.device)
                before = torch.cuda.memory_allocated(ctx.device)
                torch.cuda.reset_peak_memory_stats(ctx.device)
            times[spec] += timed_steps(ctx, both[spec], batch, 1)
            if ctx.cuda and r == 0:
                act[spec] = (torch.cuda.max_memory_allocated(ctx.device) - before) / 2**30
        ctx.partial(rounds=r + 1)
        if r >= 1 and ctx.left() < 0.2 * ctx.budget:  # fewer rounds rather than no figures
            break
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["paper"] / med["none"]
    paired = statistics.median(p / v for p, v in zip(times["paper"], times["none"]))
    figures: dict[str, Any] = {"ms_paper": med["paper"] * 1e3, "ms_vanilla": med["none"] * 1e3, "ratio": ratio,
                               "ratio_paired": paired, "steps_each": reps, "batch": ctx.cache["vitl_batch"]}
    if act:
        figures.update(step_gib_paper=act["paper"], step_gib_vanilla=act["none"],
                       step_memory_ratio=act["paper"] / act["none"])
    mem = f", step memory ratio {figures['step_memory_ratio']:.3f}" if act else ""
    return Result(PASS, f"paper / vanilla SSL step {ratio:.3f} (paired {paired:.3f}; {med['paper'] * 1e3:.1f} vs "
                        f"{med['none'] * 1e3:.1f} ms){mem}", figures,
                  target("paper / vanilla step time", ratio, "<= 1.02", ratio <= 1.02))


def check_checkpoint_stall(ctx: Ctx) -> Result:
    import shutil
    import tempfile

    import torch

    from dinospec.checkpoint import Checkpointer
    from dinospec.config import to_yaml

    trainee, batch = vitl(ctx)  # after a step: AdamW state exists
    vanilla = ctx.cache.pop("vitl_none", None)  # no longer needed: free its memory for the staging
    del vanilla
    if ctx.cuda:
        torch.cuda.empty_cache()
    state_bytes = sum(t.numel() * t.element_size() for t in _state_tensors_live(trainee))
    tmp = Path(tempfile.mkdtemp(dir=ctx.work, prefix="gpu_check_stall_"))
    stalls, published, during = [], [], []
    try:
        ckpt = Checkpointer(tmp / "run", keep_last=1, async_save=True)
        for i in range(2):
            ctx.sync()
            t = time.perf_counter()
            ckpt.save(1000 + i, trainee.state(), config_yaml=to_yaml(trainee.cfg))
            stalls.append(time.perf_counter() - t)
            during += timed_steps(ctx, trainee, batch, 1)  # training goes on while the files are written
            ckpt.wait()
            published.append(time.perf_counter() - t)
            ctx.partial(stall_s=stalls, published_s=published)
        ckpt.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stall = stalls[-1]
    figures = {"state_gib": state_bytes / 2**30, "stall_s": stalls, "until_published_s": published,
               "step_ms_while_writing": [t * 1e3 for t in during], "work_dir": str(ctx.work)}
    return Result(PASS, f"{state_bytes / 2**30:.2f} GiB training state (student, teacher, AdamW): save() blocks "
                        f"{stalls[0]:.2f} s (first) / {stall:.2f} s (second), published after {published[-1]:.1f} s",
                  figures, target("async checkpoint stall (s)", stall, "< 1", stall < 1.0))


def _state_tensors_live(trainee: Trainee) -> Iterator["torch.Tensor"]:
    yield from trainee.meta.state_dict().values()
    for st in trainee.optimizer.state.values():
        yield from (v for v in st.values() if hasattr(v, "numel"))


def check_backbone_vs_timm(ctx: Ctx) -> Result:
    import torch

    sys.path.insert(0, str(SCRIPTS))
    import bench_backbone

    try:
        import timm
    except ImportError as e:
        raise Skip(f"timm not installed ({e}); pip install timm") from None
    arch, patch, img, b = ctx.sizes.backbone
    if ctx.cuda and ctx.args.vitl_batch:
        b = ctx.args.vitl_batch
    models = {}
    for name in ("vanilla", "routed", "timm"):
        torch.manual_seed(0)
        with torch.device(ctx.device):  # initialised on the device: three ViT-L on the CPU would take seconds each
            model, loss_fn = bench_backbone.build(name, arch, patch, img, drop_path=0.0)
        models[name] = (model.to(ctx.device), loss_fn)
    x = torch.randn(b, 3, img, img, device=ctx.device)

    def step(name: str) -> float:
        model, loss_fn = models[name]
        ctx.sync()
        t = time.perf_counter()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        ctx.sync()
        return time.perf_counter() - t

    names = list(models)
    for name in names:
        step(name)
        step(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(max(ctx.sizes.timed, 3)):
        for name in names[r % 3:] + names[: r % 3]:
            times[name].append(step(name))
        ctx.partial(rounds=r + 1)
        if r >= 2 and ctx.left() < 0.2 * ctx.budget:  # fewer rounds rather than no figures
            break
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio, routed = med["vanilla"] / med["timm"], med["routed"] / med["timm"]
    figures = {f"ms_{n}": v * 1e3 for n, v in med.items()} | {
        "vanilla_over_timm": ratio, "paper_over_timm": routed, "batch": b, "timm": timm.__version__}
    return Result(PASS, f"{arch}/{patch} at {img} px, batch {b}, bf16 fwd+bwd: dinospec vanilla / timm {ratio:.3f}, "
                        f"paper / timm {routed:.3f} ({med['vanilla'] * 1e3:.1f} / {med['routed'] * 1e3:.1f} / "
                        f"{med['timm'] * 1e3:.1f} ms)", figures,
                  target("dinospec vanilla / timm", ratio, "<= 0.95", ratio <= 0.95)
                  + target("dinospec paper / timm", routed, "<= 0.95", routed <= 0.95))


def _compile_setup(ctx: Ctx) -> None:
    """Room for the recompiles of every block variant; the inductor cache on disk, so a rerun compiles less."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)


def compile_blocks(trainee: Trainee, backend: str) -> None:
    """The trainer's compile: dinospec.parallel.wrap with compute.compile=true (block.compile() on student and
    teacher), in place on a built trainee. Another backend (dry run) is bound to each block's compile() first, so
    wrap itself still does the work."""
    from functools import partial

    from omegaconf import OmegaConf

    from dinospec.parallel import wrap

    if backend != "inductor":
        for part in (trainee.meta.student, trainee.meta.teacher):
            for block in part.backbone.blocks:
                block.compile = partial(block.compile, backend=backend)
    cfg = OmegaConf.merge(trainee.cfg, {"compute": {"compile": True}})
    wrap(trainee.meta, cfg, "none", trainee.progress.device, None)  # no FSDP: the trainee's autocast still casts


def _dynamo_counters() -> dict[str, Any]:
    from torch._dynamo.utils import counters

    return {k: (sum(v.values()) if k != "stats" else dict(v)) for k, v in counters.items() if v}


def check_compile_blocks(ctx: Ctx) -> Result:
    import torch
    import torch._dynamo

    _compile_setup(ctx)
    torch._dynamo.reset()
    # drop path off (equality needs the same random draws; the drop-path path is compiled by compile_speed), QKV
    # routed in every block: one block variant, so about half the graphs to compile
    cfg = load_cfg(ctx.sizes.correct + ["student.drop_path_rate=0.0", "spec.qkv=all",
                                        f"train.batch_size_per_gpu={max(ctx.sizes.correct_batch // 4, 2)}"])
    batches = make_batches(cfg, 3, ctx.device)
    runs = {}
    for mode in ("eager", "compiled"):
        trainee = build_trainee(cfg, ctx.device, "fp32")
        t = time.perf_counter()
        if mode == "compiled":
            compile_blocks(trainee, ctx.sizes.compile_backend)
        losses = forward_losses(trainee, batches[0])
        losses["loss"].backward()
        first_s = time.perf_counter() - t
        grads = [p.grad.detach().clone() for p in trainee.meta.student.parameters() if p.grad is not None]
        trainee.optimizer.zero_grad(set_to_none=True)
        later = [float(step(trainee, b)["loss"]) for b in batches[1:]]
        runs[mode] = (floats(losses), grads, later, first_s)
        if mode == "compiled":
            ctx.partial(first_call_s=first_s)
    (l_e, g_e, later_e, _), (l_c, g_c, later_c, first_s) = runs["eager"], runs["compiled"]
    loss_err = max(abs(l_c[k] - l_e[k]) / max(abs(l_e[k]), 1e-12) for k in l_e)
    err = sum(float((a - b).double().square().sum()) for a, b in zip(g_c, g_e)) ** 0.5
    norm = sum(float(b.double().square().sum()) for b in g_e) ** 0.5
    grad_err = err / max(norm, 1e-30)
    later_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(later_c, later_e))
    counters = _dynamo_counters()
    ok = loss_err <= 1e-4 and grad_err <= 1e-3 and later_err <= 1e-3 and len(g_c) == len(g_e)
    return Result(PASS if ok else FAIL,
                  f"{ctx.sizes.compile_backend}, fp32: loss terms rel. diff {loss_err:.1e} (limit 1e-4), student "
                  f"gradients {grad_err:.1e} (limit 1e-3), losses after 2 more steps {later_err:.1e} (limit 1e-3); "
                  f"first call {first_s:.1f} s",
                  {"backend": ctx.sizes.compile_backend, "loss_rel_diff": loss_err, "grad_rel_diff": grad_err,
                   "later_loss_rel_diff": later_err, "first_call_s": first_s, "dynamo": counters})


def check_compile_speed(ctx: Ctx) -> Result:
    """The ViT-L step eager, then compiled as the trainer compiles it. If the trainer's compile fails, the error is
    this check's FAIL, and the step is compiled again with torch._dynamo.config.specialize_float=True (the known
    way round the drop-path failure: see the report) so the speed figures still come."""
    import torch
    import torch._dynamo

    _compile_setup(ctx)
    trainee, batch = vitl(ctx)
    b = ctx.cache["vitl_batch"]
    eager = timed_steps(ctx, trainee, batch, max(ctx.sizes.timed // 2, 2))
    eager_ms = statistics.median(eager) * 1e3
    ctx.partial(eager_ms=eager_ms, batch=b)
    t = time.perf_counter()
    compile_blocks(trainee, ctx.sizes.compile_backend)
    ctx.cache.pop("vitl_paper", None)  # compiled now: no longer the eager model other checks expect
    trainer_error = ""
    specialize = getattr(torch._dynamo.config, "specialize_float", None)
    try:
        try:
            timed_steps(ctx, trainee, batch, 1)  # compiles on the way
        except Exception as e:  # noqa: BLE001 - reported below; the retry gives the speed figures
            if specialize is None or specialize:
                raise
            trainer_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            ctx.log(f"the trainer's compile failed ({trainer_error[:120]}...): again with specialize_float=True")
            ctx.partial(trainer_compile_error=trainer_error)
            torch._dynamo.config.specialize_float = True  # no reset: the graphs that did compile are kept
            t = time.perf_counter()
            timed_steps(ctx, trainee, batch, 1)
        compile_s = time.perf_counter() - t
        ctx.partial(eager_ms=eager_ms, first_compiled_step_s=compile_s)
        timed_steps(ctx, trainee, batch, 1)  # a second shape seen late (dynamic recompiles) lands here
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        compiled = timed_steps(ctx, trainee, batch, max(ctx.sizes.timed // 2, 2))
    finally:
        if specialize is not None:
            torch._dynamo.config.specialize_float = specialize
    comp_ms = statistics.median(compiled) * 1e3
    figures: dict[str, Any] = {"batch": b, "eager_ms": eager_ms, "compiled_ms": comp_ms, "speedup": eager_ms / comp_ms,
                               "first_compiled_step_s": compile_s, "images_per_s_compiled": b / (comp_ms / 1e3),
                               "backend": ctx.sizes.compile_backend, "dynamo": _dynamo_counters()}
    if trainer_error:
        figures.update(trainer_compile_error=trainer_error, measured_with="torch._dynamo.config.specialize_float=True")
    if ctx.cuda:
        figures["peak_allocated_gib_compiled"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    peak = device_peak(ctx)
    mfu_text = ""
    if peak:
        flops = step_flops(ctx, trainee, batch)["flops_per_image_executed"]
        figures["mfu_compiled"] = flops * figures["images_per_s_compiled"] / (peak[1] * 1e12)
        mfu_text = f", MFU {figures['mfu_compiled']:.1%}"
    summary = (f"{eager_ms:.1f} ms eager -> {comp_ms:.1f} ms compiled ({ctx.sizes.compile_backend} backend, "
               f"x{eager_ms / comp_ms:.2f}){mfu_text}; first compiled step {compile_s:.0f} s")
    notes = []
    if trainer_error:
        summary = (f"the trainer's compute.compile FAILS on this step ({trainer_error[:160]}); with "
                   f"specialize_float=True: " + summary)
        notes.append("dinospec.parallel.wrap compiles student and teacher blocks, which share Block.forward with "
                     "drop_path 0.3 (student) and 0.0 (teacher): dynamo's automatic dynamic then traces the float as a symbolic "
                     "float, and add_residual_of_subset's int(b * (1 - drop_rate)) cannot be lifted "
                     f"(dinospec/models/vit.py): {trainer_error}")
    return Result(FAIL if trainer_error else PASS, summary, figures,
                  target("compiled MFU", figures.get("mfu_compiled"), f">= {MFU_TARGET:.0%}",
                         None if "mfu_compiled" not in figures else figures["mfu_compiled"] >= MFU_TARGET), notes)


CHECK_FNS: dict[str, Callable[[Ctx], Result]] = {
    "env": check_env, "bf16_autocast": check_bf16_autocast, "fsdp2_ws1": check_fsdp2_ws1,
    "fsdp2_ws2": check_fsdp2_ws2, "sdpa_backends": check_sdpa_backends, "xformers": check_xformers,
    "checkpoint_resume": check_checkpoint_resume, "ssl_step": check_ssl_step, "paper_vs_vanilla": check_paper_vs_vanilla,
    "checkpoint_stall": check_checkpoint_stall, "backbone_vs_timm": check_backbone_vs_timm,
    "compile_blocks": check_compile_blocks, "compile_speed": check_compile_speed,
}


def _inject(fault: str, ctx: Ctx) -> None:
    """Test hook (--inject-fault NAME=raise|hang|exit): exercises isolation, budgets and worker restarts."""
    ctx.partial(injected=fault)
    if fault == "raise":
        raise RuntimeError("injected fault")
    if fault == "hang":
        while True:
            time.sleep(1)
    if fault == "exit":
        os._exit(9)


def worker(args: argparse.Namespace) -> int:
    """Run the given checks in order in this process; exit 3 after a FAIL on a GPU (the parent starts a fresh one)."""
    t0 = args.t0 or time.time()
    budgets = {c.name: (DRY_BUDGET_S if args.dry_run else c.budget_s) for c in CHECKS}
    for item in args.budget:
        name, seconds = item.split("=")
        budgets[name] = float(seconds)
    faults = dict(item.split("=") for item in args.inject_fault.split(",")) if args.inject_fault else {}
    _exit_with_parent()
    names = args.only.split(",")
    events = Path(args.events)
    if all(n in faults for n in names):
        ctx: Any = _FaultOnlyCtx(args, events, t0)  # a test of the machinery alone: no torch import
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO / "runs" / "gpu_check_cache" / "inductor"))
        ctx = Ctx(args, events, t0)
        ctx.emit("ready", info=_worker_info(ctx))
    for name in names:
        now_wall = time.time()
        budget = effective_budget(budgets[name], now_wall, args.deadline)
        ctx.check = name
        if args.deadline - now_wall < MIN_USEFUL_S:
            ctx.emit("end", record=vars(Record(name, SKIP, summary="no time left in --time-limit")))
            continue
        ctx.emit("start", check=name, budget_s=budget)
        ctx.ends_at, ctx.budget = time.monotonic() + budget, budget
        ctx.log(f"start (budget {budget:.0f} s)")
        t, cpu = time.monotonic(), _cpu_s()
        rec = Record(name, budget_s=round(budget, 1))
        try:
            if name in faults:
                _inject(faults[name], ctx)
            res = CHECK_FNS[name](ctx)
            rec.status, rec.summary, rec.figures, rec.targets, rec.notes = (
                res.status, res.summary, res.figures, res.targets, res.notes)
        except Skip as e:
            rec.status, rec.summary = SKIP, str(e)
        except BaseException as e:  # noqa: BLE001 - isolation: any error is this check's FAIL, the next one runs
            if isinstance(e, KeyboardInterrupt):
                raise
            rec.status, rec.error = FAIL, f"{type(e).__name__}: {str(e)[:1500]}"
            rec.summary = rec.error.splitlines()[0][:200] if rec.error else "failed"
            rec.notes = ["traceback: " + " | ".join(traceback.format_exc().strip().splitlines()[-6:])]
        rec.seconds, rec.cpu_s = round(time.monotonic() - t, 1), round(_cpu_s() - cpu, 1)
        _cleanup(ctx)
        ctx.emit("end", record=vars(rec))
        if rec.status == FAIL and getattr(ctx, "cuda", False):
            return 3
    return 0


def _exit_with_parent() -> None:
    """A parent killed outright (SIGKILL from a scheduler) cannot kill this worker: it notices and ends its whole
    process group (spawned ranks, compile workers) itself, so nothing keeps the GPU busy."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="gpu-check-parent-watch").start()


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _FaultOnlyCtx:
    """The reporting half of Ctx, for --inject-fault runs where every selected check is faked."""

    cuda = False

    def __init__(self, args: argparse.Namespace, events: Path, t0: float):
        self.args, self.events, self.t0, self.check, self.ends_at = args, events, t0, "", 0.0

    emit, log, partial = Ctx.emit, Ctx.log, Ctx.partial


def _worker_info(ctx: Ctx) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device_count": 0,
                            "device_name": "CPU (dry run)" if ctx.dry else "CPU"}
    if ctx.cuda:
        info.update(device_name=torch.cuda.get_device_name(ctx.device), device_count=torch.cuda.device_count())
    return info


def _cleanup(ctx: Any) -> None:
    """Between checks: no process group left behind, freed device memory (the ViT-L cache stays)."""
    if not isinstance(ctx, Ctx):
        return
    import gc

    import torch
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ===============================================================================================================
# command line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[__doc__.find(
                                    "Checks,"):__doc__.find("Everything runs")])
    p.add_argument("--out", default=str(REPO / "runs" / "gpu_check"),
                   help="where gpu_check.json, gpu_check.md, events.jsonl and profiles go (%(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU with gloo (what needs CUDA is skipped with the reason)")
    p.add_argument("--only", help=f"comma list of checks (default: all): {','.join(CHECK_NAMES)}")
    p.add_argument("--skip", default="", help="comma list of checks to leave out")
    p.add_argument("--time-limit", type=float, help=f"seconds for the whole run (default {GPU_TIME_LIMIT_S:.0f}; "
                                                    f"dry run {DRY_TIME_LIMIT_S:.0f})")
    p.add_argument("--budget", action="append", default=[], metavar="CHECK=SECONDS",
                   help="override one check's budget (repeatable)")
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak per device for MFU (default: by device name)")
    p.add_argument("--vitl-batch", type=int, help="images per step of the ViT-L checks (default: 64 on >= 100 GiB "
                                                  "devices, else 32; halved on out-of-memory)")
    p.add_argument("--work-dir", help="scratch for checkpoints, on the disk to measure (default $TMPDIR or /tmp)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    p.add_argument("--inject-fault", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    names = args.only.split(",") if args.only else list(CHECK_NAMES)
    skip = set(filter(None, args.skip.split(",")))
    unknown = [n for n in [*names, *skip, *(b.split("=")[0] for b in args.budget)] if n not in CHECK_NAMES]
    if unknown:
        p.error(f"unknown check(s) {unknown}; known: {', '.join(CHECK_NAMES)}")
    names = [n for n in CHECK_NAMES if n in names and n not in skip]  # always in the registry's order
    if args.time_limit is None:
        args.time_limit = DRY_TIME_LIMIT_S if args.dry_run else GPU_TIME_LIMIT_S
    parent = Parent(args, names)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` or a scheduler: results so far are written, then exit
    return parent.run()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
