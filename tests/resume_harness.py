"""Kill `dinospec train` at random moments (SIGKILL to every rank at once, mid-step or mid-save), resume it, and check
that the finished run is bitwise the run that was never interrupted: weights, teacher, loss centres, AdamW state,
step counters and every rank's torch RNG state (the run uses drop-path, so an RNG slip shows in the weights).

    .venv/bin/python scripts/torture_resume.py --trials 10 [--seed S] [--ranks 1|2] [--async-save]

Each trial starts a fresh run directory, picks a checkpoint period (1-3 steps) and one or two kill points ("a random
fraction of a step after checkpoint k was published", so kills land in the forward/backward, in DCP's write, in the
publish or between steps), kills the whole process group with SIGKILL, then re-runs the same command until it
finishes. The last line printed is `K/N resumes bitwise exact`.

This module lives with the tests, which import its machinery (launching ranks in one process group, waiting for a
published step, reading a whole checkpoint, comparing two); scripts/torture_resume.py is its command line.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from conftest import REPO, photos_dir, tiny_overrides  # the tiny run config the tests use

from dinospec.checkpoint import verify_checkpoint

TOTAL_STEPS = 12  # a run of 2N steps, interrupted after step N = 6 or later
GLOBAL_BATCH = 8
# python's and numpy's global generators: the trainer does not seed them (nothing in training draws from them), so
# two uninterrupted runs already differ there; a resume restores them. Left out of the comparisons.
UNSEEDED = ("train.rng.python_", "train.rng.numpy_")


def train_args(run_dir: Path, ranks: int = 1, **extra: object) -> list[str]:
    """`dinospec train` arguments of the tiny run, TOTAL_STEPS long, the same global batch on any number of ranks,
    with stochastic depth (drop-path): its draws make any slip of the resumed RNG stream show in the weights.
    One intra-op thread in every run, whatever its data workers: CPU kernels may round differently with another
    number of threads, and bitwise comparisons need the same arithmetic."""
    settings = {"train.max_steps": TOTAL_STEPS, "train.batch_size_per_gpu": GLOBAL_BATCH // ranks,
                "student.drop_path_rate": 0.1, "compute.num_threads": 1, **extra}
    return ["train", *tiny_overrides(run_dir, photos_dir(), **settings)]


# ---------------------------------------------------------------------------------------------------------------
# processes


_RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """`dinospec train` on `ranks` processes (RANK/WORLD_SIZE set as torchrun would) that share one new process group,
    so one killpg reaches every rank and every data-loader worker at the same instant, as a node failure would.
    torchrun is not used for this: it starts each worker in a session of its own, out of reach of a group kill."""

    def __init__(self, args: list[str], ranks: int, log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}  # not an outer job's rank
        base = {**inherited, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        port = str(_free_port())
        self.procs: list[subprocess.Popen] = []
        with open(log_path, "ab") as log:
            for rank in range(ranks):
                rank_env = base if ranks == 1 else {
                    **base, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                group = 0 if rank == 0 else self.procs[0].pid  # 0: a new group led by rank 0
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "dinospec.cli", *args], cwd=REPO, env=rank_env, stdout=log,
                    stderr=subprocess.STDOUT, process_group=group))
        self.pgid = self.procs[0].pid

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:  # everyone already gone
            pass

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(0.0, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            raise AssertionError(f"dinospec train did not finish in {timeout:.0f} s:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def run_to_end(args: list[str], ranks: int, log_path: Path, timeout: float = 600) -> str:
    """Run `dinospec train` to completion; its log, or AssertionError with the log's tail."""
    job = Job(args, ranks, log_path)
    try:
        codes = job.wait(timeout)
    except BaseException:  # Ctrl-C, timeout: leave no training behind
        job.signal(signal.SIGKILL)
        raise
    if any(codes):
        raise AssertionError(f"dinospec train exited {codes}:\n{job.log()[-4000:]}")
    return job.log()


def published_step(run_dir: Path) -> int | None:
    """The step `checkpoints/latest` names (its commit point), None before the first publish."""
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip()[len("step_"):])
    except (FileNotFoundError, ValueError):
        return None


def wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 600) -> float:
    """Poll until a checkpoint at `step` or later is published; return the seconds one step takes (latest publishes
    observed). AssertionError when the job ends or times out first."""
    deadline, seen, last = time.monotonic() + timeout, [], published_step(run_dir)
    while (now := published_step(run_dir)) is None or now < step:
        if now != last:
            seen.append((time.monotonic(), now))
            last = now
        if not job.running():
            raise AssertionError(f"dinospec train ended before publishing step {step}:\n{job.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint >= step {step} within {timeout:.0f} s:\n{job.log()[-3000:]}")
        time.sleep(0.005)
    seen.append((time.monotonic(), now))
    if len(seen) >= 2 and seen[-1][1] > seen[-2][1]:
        return (seen[-1][0] - seen[-2][0]) / (seen[-1][1] - seen[-2][1])
    return 0.3


def describe_disk(run_dir: Path) -> str:
    """What a kill left in checkpoints/: the commit point, unfinished saves, steps renamed but not yet committed."""
    ckpts = run_dir / "checkpoints"
    latest = published_step(run_dir)
    names = _listing(ckpts) if ckpts.is_dir() else []
    names = [] if isinstance(names, str) else names
    tmp = [n for n in names if n.startswith(".tmp_step_")]
    newer = [n for n in names if n.startswith("step_") and latest is not None and int(n[5:]) > latest]
    where = ("during a save (DCP write or manifest)" if tmp else
             "between publishing a step and committing it in latest" if newer else "outside any save")
    files = "".join(f" {n}/{_listing(ckpts / n)}" for n in tmp)
    return f"killed {where}: latest=step_{latest}{files}{' uncommitted ' + ','.join(newer) if newer else ''}"


def _listing(directory: Path) -> list[str] | str:
    try:
        return sorted(p.name for p in directory.iterdir())
    except OSError:  # renamed or removed meanwhile (the job was still running)
        return "(gone)"


# ---------------------------------------------------------------------------------------------------------------
# checkpoints as flat dicts


def checkpoint_state(ckpt: Path) -> dict[str, Any]:
    """Everything a checkpoint holds (model, optimizer, train progress and RNG), flattened to dotted keys.
    One process, no process group; verified against its manifest first. torch.load inside reads the optimizer's
    param-group values unrestricted: use it on checkpoints this program wrote."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    verify_checkpoint(ckpt, deep=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nested = _load_state_dict_from_keys(checkpoint_id=str(ckpt))
    return dict(flatten(nested))


def final_state(run_dir: Path, step: int = TOTAL_STEPS) -> dict[str, Any]:
    """checkpoint_state of a run's step_<step>, without the UNSEEDED generator states."""
    state = checkpoint_state(run_dir / "checkpoints" / f"step_{step}")
    return {k: v for k, v in state.items() if not k.startswith(UNSEEDED)}


def flatten(tree: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) for every leaf of nested dicts and lists, keys as DCP names them."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        yield key, tree
        return
    for k, v in items:
        yield from flatten(v, f"{key}.{k}" if key else str(k))


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """Keys whose values are not bitwise equal (same dtype, shape and bits; NaN equals NaN), described."""
    out = [f"{k}: missing" for k in sorted(set(expected) - set(actual))]
    out += [f"{k}: unexpected" for k in sorted(set(actual) - set(expected))]
    for k in sorted(set(expected) & set(actual)):
        a, b = expected[k], actual[k]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.view(-1).view(torch.uint8),
                                                                           b.view(-1).view(torch.uint8)):
                gap = (a.double() - b.double()).abs().max().item() if a.shape == b.shape and a.numel() else "?"
                out.append(f"{k}: differs (max |diff| {gap})")
        elif type(a) is not type(b) or a != b:
            out.append(f"{k}: {a!r} != {b!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# one trial


@dataclass
class Trial:
    exact: bool = False
    events: list[str] = field(default_factory=list)


def kill_at_random(job: Job, run_dir: Path, after_step: int, rng: random.Random) -> str:
    """SIGKILL the job a random fraction of a step (0-1 step) after step `after_step` (or later) was published."""
    try:
        per_step = wait_for_step(job, run_dir, after_step)
        delay = rng.uniform(0.0, 1.0) * per_step
        time.sleep(delay)
        state = describe_disk(run_dir)  # a snapshot just before the kill
    finally:
        ran_to_end = not job.running()
        job.signal(signal.SIGKILL)
        job.wait(60)
    if ran_to_end or published_step(run_dir) == TOTAL_STEPS:
        return f"finished before the kill (+{delay:.2f}s after step_{after_step})"
    after = describe_disk(run_dir)
    return (f"SIGKILL +{delay:.2f}s after step_{after_step} published; {after}"
            + (f" (just before the kill: {state})" if state != after else ""))


def run_trial(work: Path, reference: dict[str, Any], ranks: int, rng: random.Random,
              extra: dict[str, object]) -> Trial:
    """A fresh run killed once or twice at random points, then resumed to the end and compared to `reference`."""
    run = work / "run"
    period = rng.choice((1, 1, 2, 3))
    args = train_args(run, ranks, **{"checkpoint.period_steps": period, **extra})
    trial = Trial(events=[f"period {period}"])
    lowest = TOTAL_STEPS // 2
    for kill in range(rng.choice((1, 2))):
        publishes = [s for s in range(lowest, TOTAL_STEPS - 1) if s % period == 0]  # kill after one of them
        if not publishes:
            break
        after = rng.choice(publishes)
        trial.events.append(kill_at_random(Job(args, ranks, work / f"kill{kill}.log"), run, after, rng))
        lowest = max(lowest, (published_step(run) or 0) + 1)  # the next kill after the resumed run's own publish
    log = run_to_end(args, ranks, work / "resume.log")
    starts = re.findall(r"steps (\d+) -> (\d+)", log)
    trial.events.append(f"resumed {starts[-1][0]} -> {starts[-1][1]}" if starts else "resumed (no start line?)")
    diffs = differences(reference, final_state(run))
    trial.exact = not diffs
    trial.events.append(f"bitwise exact ({len(reference)} entries)" if trial.exact else
                        f"NOT EXACT: {len(diffs)} of {len(reference)} entries differ: {diffs[:4]}")
    return trial


def _kill_kind(event: str) -> str | None:
    if event.startswith("finished before"):
        return "finished before the kill"
    where = re.match(r"SIGKILL .*?; killed (during a save|between publishing|outside any save)", event)
    return where.group(1) if where else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill points (default: random, printed)")
    ap.add_argument("--ranks", type=int, choices=(1, 2), default=1)
    ap.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true in the killed runs")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (printed) for inspection")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    extra = {"checkpoint.async_save": "true"} if a.async_save else {}
    work = Path(tempfile.mkdtemp(prefix="torture_resume_"))
    print(f"torture_resume: {a.trials} trials, {a.ranks} rank(s), {TOTAL_STEPS} steps, seed {seed}, "
          f"async_save={a.async_save}, work {work}", flush=True)
    t0 = time.monotonic()
    run_to_end(train_args(work / "reference", a.ranks, **{"checkpoint.period_steps": TOTAL_STEPS}), a.ranks,
               work / "reference.log")
    reference = final_state(work / "reference")
    exact, kills = 0, Counter()
    for i in range(a.trials):
        trial_dir = work / f"trial_{i}"
        trial_dir.mkdir()
        try:
            trial = run_trial(trial_dir, reference, a.ranks, rng, extra)
        except AssertionError as e:  # a run that failed outright counts as not exact
            trial = Trial(events=[f"FAILED: {str(e)[:1500]}"])
        exact += trial.exact
        kills.update(kind for kind in map(_kill_kind, trial.events) if kind)
        print(f"trial {i + 1}/{a.trials}: " + "; ".join(trial.events), flush=True)
        if not a.keep and trial.exact:
            shutil.rmtree(trial_dir, ignore_errors=True)
    print("kills: " + (", ".join(f"{n} {kind}" for kind, n in kills.most_common()) or "none"))
    print(f"({time.monotonic() - t0:.0f} s; work directory {work}{' kept' if a.keep or exact < a.trials else ''})")
    if not a.keep and exact == a.trials:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{exact}/{a.trials} resumes bitwise exact")
    return 0 if exact == a.trials else 1


if __name__ == "__main__":
    sys.exit(main())
