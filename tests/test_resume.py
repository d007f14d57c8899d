"""Exact resume of `dinospec train` end to end: real processes killed (SIGKILL to every rank at once) or preempted
(SIGTERM, SIGUSR1) at random moments, real checkpoints on disk, real gloo process groups, real images.

"Exact" means the finished run's checkpoint is bitwise the one of a run that was never interrupted: student,
teacher, loss centres, AdamW moments and step counts, param groups, step counters and the torch RNG state. The run
uses stochastic depth (drop-path 0.1), so a resumed RNG stream that is off by a single draw changes the weights.
Python's and numpy's global RNG states are left out of the comparison: the trainer does not seed them (nothing in
training draws from them), so two uninterrupted runs already differ there; a resume restores them.

The launching, waiting, killing and comparing are tests/resume_harness.py's (scripts/torture_resume.py runs it), which repeats the SIGKILL case many
times; this file runs each case once, at a random moment (the event text in a failure says which).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import photos_dir, tiny_overrides
from resume_harness import (GLOBAL_BATCH, TOTAL_STEPS, Job, checkpoint_state, differences, final_state, flatten,
                            kill_at_random, published_step, run_to_end, train_args, wait_for_step)

from dinospec.checkpoint import load_model_state, verify_checkpoint
from dinospec.cli import EXIT_PREEMPTED

HALF = TOTAL_STEPS // 2


def _seeded_rng() -> tuple[random.Random, int]:
    seed = random.SystemRandom().randrange(2**31)
    return random.Random(seed), seed


def _assert_exact(reference: dict[str, Any], run_dir: Path, story: str) -> None:
    diffs = differences(reference, final_state(run_dir))
    assert any(k.startswith("optim.state.") for k in reference) and any(".teacher." in k for k in reference)
    assert not diffs, f"{story}: {len(diffs)} of {len(reference)} entries differ: {diffs[:6]}"


def _start_step(log: str) -> int:
    return int(re.findall(r"steps (\d+) -> \d+", log)[-1])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted 1-rank run (checkpointed only at its end)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(train_args(run, **{"checkpoint.period_steps": TOTAL_STEPS}), 1, run.parent / "log")
    return final_state(run)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-rank run (DDP on gloo, global batch as on 1 rank), checkpointed at HALF and at its end."""
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    run_to_end(train_args(run, 2, **{"checkpoint.period_steps": HALF}), 2, run.parent / "log")
    return run


def _kill_and_resume(tmp_path: Path, ranks: int) -> tuple[Path, str]:
    """Train with a checkpoint every step, SIGKILL every rank at a random moment after step HALF is published
    (mid-step or mid-save), then run the same command again to the end."""
    rng, seed = _seeded_rng()
    run = tmp_path / "run"
    args = train_args(run, ranks, **{"checkpoint.period_steps": 1})
    event = kill_at_random(Job(args, ranks, tmp_path / "killed.log"), run, HALF, rng)
    assert event.startswith("SIGKILL"), event
    committed = published_step(run)
    log = run_to_end(args, ranks, tmp_path / "resumed.log")
    story = f"seed {seed}: {event}; resumed from step {_start_step(log)}"
    assert _start_step(log) == committed, story  # from the commit point, not from a half-written newer step
    return run, story


def test_sigkill_at_a_random_moment_resumes_bitwise_exact(tmp_path: Path, reference: dict[str, Any]) -> None:
    run, story = _kill_and_resume(tmp_path, ranks=1)
    _assert_exact(reference, run, story)
    # the killed run's records after its checkpoint were dropped; the resumed run logged those steps once
    assert [r["step"] for r in _records(run)] == list(range(1, TOTAL_STEPS + 1)), story
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "leftovers not cleaned"


@pytest.mark.slow
def test_sigkill_two_ranks_resumes_bitwise_exact(tmp_path: Path, two_rank_run: Path) -> None:
    run, story = _kill_and_resume(tmp_path, ranks=2)
    _assert_exact(final_state(two_rank_run), run, story)


@pytest.mark.slow
def test_preemption_signals_save_the_current_step_exit_75_and_resume_exactly(
        tmp_path: Path, reference: dict[str, Any]) -> None:
    """SIGTERM, then SIGUSR1 on the resumed run, each sent to the whole process group (as SLURM does, data-loader
    worker included) a random moment into a step: the step finishes, is saved, the exit code is 75; the third run
    finishes the job bitwise equal to the uninterrupted one. Each run is frozen (SIGSTOP) a few ms after it
    published a checkpoint of its own, signalled, and let go (SIGCONT): mid-step however fast the machine is."""
    rng, seed = _seeded_rng()
    run = tmp_path / "run"
    args = train_args(run, **{"checkpoint.period_steps": 2, "data.num_workers": 1})
    story, saved = f"seed {seed}", ["0"]
    for i, sig in enumerate((signal.SIGTERM, signal.SIGUSR1)):
        after = int(saved[0]) + 2  # a checkpoint this run publishes: past start-up, >= 4 steps before the end
        job = Job(args, 1, tmp_path / f"preempted{i}.log")
        per_step = wait_for_step(job, run, after)
        delay = rng.uniform(0.0, 0.9) * min(per_step, 0.01)
        time.sleep(delay)
        job.signal(signal.SIGSTOP)
        job.signal(sig)
        job.signal(signal.SIGCONT)
        codes = job.wait(120)
        saved = re.findall(r"signal received: saved step (\d+)", job.log())
        story += f"; {signal.Signals(sig).name} +{delay:.3f}s after step >= {after}: exit {codes}, saved {saved}"
        assert codes == [EXIT_PREEMPTED] and len(saved) == 1, f"{story}\n{job.log()[-3000:]}"
        assert published_step(run) == int(saved[0]) > after - 1, story
        verify_checkpoint(run / "checkpoints" / f"step_{saved[0]}")
    log = run_to_end(args, 1, tmp_path / "finished.log")
    assert _start_step(log) == int(saved[0]), story
    _assert_exact(reference, run, story)


def test_transient_nonfinite_loss_is_skipped_and_the_count_survives_resume(tmp_path: Path) -> None:
    """A real, config-made NaN: a warmup teacher temperature of 0 divides the teacher logits by 0 at step 0 only
    (the temperature warms up from there), so the DINO/iBOT targets are NaN once. With train.nonfinite=skip the step
    changes nothing (no AdamW step, no EMA) and training goes on. The resumed run then sets the final temperature
    to 0 too (a compatible change), a fault that persists: the count carried by the checkpoint reaches the limit."""
    run = tmp_path / "run"
    nan_once = {"teacher.warmup_teacher_temp": 0.0, "optim.warmup_epochs": 0, "train.nonfinite": "skip",
                "train.max_nonfinite_skips": 2, "checkpoint.period_steps": 1}
    log = run_to_end(train_args(run, **{**nan_once, "train.max_steps": 3}), 1, tmp_path / "first.log")
    assert "step 0: non-finite loss" in log and "step skipped (1/2)" in log
    losses = [r["loss"] for r in _records(run)]
    assert len(losses) == 3 and not math.isfinite(losses[0]) and all(map(math.isfinite, losses[1:])), losses
    after_skip, end = checkpoint_state(run / "checkpoints" / "step_1"), checkpoint_state(run / "checkpoints" / "step_3")
    assert int(after_skip["train.nonfinite_skips"]) == 1 == int(end["train.nonfinite_skips"])
    adam = {k: v for k, v in after_skip.items() if k.startswith("optim.state.")}
    assert adam and all(not v.any() for v in adam.values()), "the skipped step (or saving it) moved AdamW"
    student = {k[len("model.student."):]: v for k, v in after_skip.items() if k.startswith("model.student.")}
    assert student and all(torch.equal(v, after_skip[f"model.teacher.{k}"]) for k, v in student.items())
    adam_steps = {int(v) for k, v in end.items() if k.startswith("optim.state.") and k.endswith(".step")}
    assert adam_steps == {2}, f"steps 1 and 2 are the only real updates, AdamW counts {adam_steps}"
    assert all(torch.isfinite(v).all() for v in end.values() if torch.is_tensor(v) and v.is_floating_point())

    proc = Job(train_args(run, **{**nan_once, "train.max_steps": 6, "teacher.teacher_temp": 0.0}), 1,
               tmp_path / "second.log")
    assert proc.wait(120) == [1]
    log = proc.log()
    assert "step 3: non-finite loss" in log and "step skipped (2/2)" in log, log[-3000:]
    assert "non-finite loss at step 4" in log and "(3 non-finite step(s) so far)" in log, log[-3000:]
    assert published_step(run) == 4  # the skipped step 3 was saved (finite); nothing after it
    assert int(checkpoint_state(run / "checkpoints" / "step_4")["train.nonfinite_skips"]) == 2


def test_broken_files_are_counted_and_logged_once_over_a_resume(tmp_path: Path) -> None:
    """Every step is a whole pass over 6 photos and 2 broken files: the run meets both before its checkpoint and
    again after the resume, which knows them from the checkpoint (train.broken_files) and neither counts nor logs
    them again."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    for photo in photos_dir().glob("*.jpg"):
        shutil.copy(photo, data / photo.name)
    (data / "b_empty.jpg").write_bytes(b"")
    (data / "b_text.jpg").write_text("this is not a JPEG\n")
    assert len(list(data.glob("*.jpg"))) == GLOBAL_BATCH
    logs = [run_to_end(["train", *tiny_overrides(run, data, **{"train.max_steps": steps, "checkpoint.period_steps": 3,
                                                               "compute.num_threads": 1})], 1, tmp_path / f"{steps}.log")
            for steps in (3, 6)]
    assert _start_step(logs[1]) == 3
    saved = json.loads(checkpoint_state(run / "checkpoints" / "step_3")["train.broken_files"])
    assert sorted(Path(p).name for p in saved) == ["b_empty.jpg", "b_text.jpg"]
    assert [r["num_broken"] for r in _records(run)] == [2] * 6
    for name in ("b_empty.jpg", "b_text.jpg"):
        assert sum(len(re.findall(f"skipping broken image .*{name}", log)) for log in logs) == 1, logs[1][-3000:]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path,
                                                                  reference: dict[str, Any]) -> None:
    run = tmp_path / "run"
    run_to_end(train_args(run, **{"checkpoint.period_steps": 4, "train.max_steps": 8}), 1, tmp_path / "first.log")
    shard = run / "checkpoints" / "step_8" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    log = run_to_end(train_args(run, **{"checkpoint.period_steps": 4}), 1, tmp_path / "second.log")
    assert re.search(r"step_8 (skipped|not loaded).*sha256 differs", log), log[-3000:]
    assert _start_step(log) == 4, log[-3000:]
    verify_checkpoint(run / "checkpoints" / "step_8")  # saved anew by the resumed run
    _assert_exact(reference, run, "resumed from step 4 after step_8 was corrupted")


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path: Path, two_rank_run: Path) -> None:
    """2 ranks x batch 4 to step HALF, then 1 rank x batch 8: same global batch, same samples per step.

    After loading, the 1-rank trainer state equals the 2-rank checkpoint bitwise (DCP reads every rank's files into
    one process). The finished run is not compared bitwise with a 1-rank straight run, and cannot be: each step's
    gradient was the all-reduced mean of two half-batch gradients, summed in another order than one full-batch
    backward, so the weights at step HALF already differ from the 1-rank run's by rounding, which AdamW amplifies
    (see test_train's 2-vs-1-rank test); and drop-path's RNG streams are reseeded for the new world size.
    """
    from dinospec.checkpoint import Checkpointer
    from dinospec.config import load_config
    from dinospec.ssl.meta_arch import SSLMetaArch
    from dinospec.ssl.optim import build_optimizer
    from dinospec.checkpoint_state import ModelState, OptimState, Progress

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_rank_run / "checkpoints" / f"step_{HALF}", run / "checkpoints" / f"step_{HALF}")
    (run / "checkpoints" / "latest").write_text(f"step_{HALF}\n")
    args = train_args(run, 1)

    cfg = load_config([], args[1:])
    meta = SSLMetaArch(cfg)
    optimizer = build_optimizer(meta.student, cfg)
    progress = Progress(torch.device("cpu"))
    state = {"model": ModelState(meta), "optim": OptimState(meta.student, optimizer), "train": progress}
    assert Checkpointer(run).load(state) == HALF and progress.step == HALF
    saved = checkpoint_state(run / "checkpoints" / f"step_{HALF}")
    loaded = {f"model.{k}": v for k, v in state["model"].state_dict().items()}
    loaded.update({f"optim.{k}": v for k, v in flatten(state["optim"].state_dict())})
    expected = {k: v for k, v in saved.items() if k.startswith(("model.", "optim.state."))}
    diffs = differences(expected, {k: v for k, v in loaded.items() if k.startswith(("model.", "optim.state."))})
    assert not diffs and len(expected) > 300, diffs[:6]
    assert torch.equal(load_model_state(run, "student.backbone.")["cls_token"], meta.student.backbone.cls_token)

    log = run_to_end(args, 1, tmp_path / "resumed.log")
    assert _start_step(log) == HALF and "RNG streams reseeded" in log, log[-3000:]
    records = _records(run)
    assert [r["step"] for r in records] == list(range(HALF + 1, TOTAL_STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert int(checkpoint_state(run / "checkpoints" / f"step_{TOTAL_STEPS}")["train.world_size"]) == 1



def test_metrics_of_steps_after_the_checkpoint_are_dropped_on_restart(tmp_path: Path) -> None:
    from dinospec.metrics import MetricsLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=8, start_step=3, progress=False)
    logger.log(4, {"loss": 0.5})
    logger.close()
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]
    assert _records(tmp_path)[-1]["loss"] == 0.5
    MetricsLogger(tmp_path, enabled=True, total_steps=8, start_step=4, progress=False).close()  # nothing to drop
    assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]
