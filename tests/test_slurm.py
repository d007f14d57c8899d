"""`dinospec submit` on a real SLURM cluster (scripts/slurm_ci.sh up): a 2-task CPU job trains and finishes, and
every way a job gets interrupted ends requeued, resumed from its checkpoint, and bitwise equal to a run that was
never interrupted.

The four interruptions: (a) `scancel --signal=USR2` (what SLURM sends before a preemption), (b) the time limit
running out (USR2 from `--signal`, submitit's time-out path), (c) real preemption by a job in partition `urgent`,
(d) `scontrol requeue` (SIGTERM; SLURM requeues by itself). Cases run one after another (2 CPUs: one job at a time)
and share one uninterrupted reference run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
from contextlib import redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import submitit
import torch
import yaml

from dinospec import cli
from dinospec.checkpoint import load_model_state
from dinospec.config import load_config
from dinospec.launch import Resources, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS = 200  # ~17 s of training for 2 tasks on 2 cores (plus ~12 s of start-up per run)
INTERRUPT_AT = 40  # steps logged before the test interrupts a run (about 3 s into training)
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")

TINY = {  # a tiny ViT on the repository's real photos; deterministic kernels, one thread per task
    "student": {"arch": "vit_pico", "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
                "drop_path_rate": 0.0},
    "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2},
    "dino": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "ibot": {"head_n_prototypes": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
    "teacher": {"warmup_teacher_temp_epochs": 1},
    "optim": {"epochs": 4, "warmup_epochs": 1, "freeze_last_layer_epochs": 0, "scaling_rule": "none"},
    "data": {"path": str(REPO / "data" / "eval" / "photos"), "num_workers": 0, "pin_memory": False},
    "train": {"batch_size_per_gpu": 4, "official_epoch_length": STEPS // 4, "log_every": 1, "deterministic": True},
    "compute": {"device": "cpu"},
    # no periodic checkpoints: only the interruption's and the final one (keep all: the test reads them)
    "checkpoint": {"period_steps": 100_000, "keep_last": 0},
    "logging": {"progress": False, "plots": False},
    "evaluation": {"knn_period_steps": 0},  # demo.yaml's periodic k-NN reads repository-relative folders
}


def _sinfo_problem() -> str | None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True, timeout=30)
    except FileNotFoundError:
        return "sinfo not found (SLURM not installed)"
    except subprocess.CalledProcessError as e:
        return f"sinfo failed: {(e.stderr or e.stdout).strip()[:200]}"
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if not {"debug", "urgent"} <= set(out.stdout.split()):  # a real cluster's login node: submit nothing there
        return f"partitions {sorted(set(out.stdout.split()))} are not the test cluster's (debug, urgent)"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _sinfo_problem()
    if problem:
        pytest.skip(f"no SLURM cluster: {problem}; start one with `sudo bash scripts/slurm_ci.sh up`")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slurm_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def _sacct_states(job_id: str) -> list[str]:
    """Every run of the job, oldest first (-D: requeued runs too)."""
    out = _sh("sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _log(run_dir: Path, job_id: str) -> str:
    """Rank 0's stdout and stderr, appended across requeues."""
    return "".join((run_dir / "slurm" / f"{job_id}_0_log.{ext}").read_text(errors="replace")
                   for ext in ("out", "err") if (run_dir / "slurm" / f"{job_id}_0_log.{ext}").exists())


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for _ in path.open()) if path.exists() else 0


def _cancel(*job_ids: str | None) -> None:
    ids = [j for j in job_ids if j]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)


def _wait_until(what: str, condition, deadline: float, run_dir: Path, job_id: str) -> None:
    while not condition():
        if time.time() > deadline:
            states = _sacct_states(job_id)
            pytest.fail(f"timed out waiting for {what} (job {job_id}, sacct {states}); log tail:\n"
                        f"{_log(run_dir, job_id)[-3000:]}")
        time.sleep(0.25)


def _results(job: submitit.Job, run_dir: Path, deadline: float) -> list[dict]:
    def ended() -> bool:  # the latest run ended for good (a requeued job shows PENDING or RUNNING again)
        states = _sacct_states(job.job_id)
        return bool(states) and states[-1] in TERMINAL and job.done()

    _wait_until("the job to end", ended, deadline, run_dir, job.job_id)
    assert _sacct_states(job.job_id)[-1] == "COMPLETED", _log(run_dir, job.job_id)[-3000:]
    return job.results()


def _start_steps(log_text: str) -> list[int]:
    """The first step of each run, from the trainer's start line ("steps 0 -> 200"): two or more means resumed."""
    return [int(m) for m in re.findall(rf"steps (\d+) -> {STEPS}\b", log_text)]


def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS}"
    return load_model_state(run_dir)


def _assert_same_weights(run_dir: Path, reference: Path) -> None:
    got, want = _final_state(run_dir), _final_state(reference)
    assert sorted(got) == sorted(want)
    assert any(k.startswith("teacher.") for k in got) and any(k.startswith("student.") for k in got)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run: {differ[:5]}"


def _submit(config_file: Path, run_dir: Path, overrides: tuple[str, ...] = (), **resources) -> submitit.Job:
    cfg = load_config([REPO / "configs" / "demo.yaml", config_file], [f"train.output_dir={run_dir}", *overrides])
    res = Resources(tasks_per_node=2, cpus_per_task=1, time_min=30, job_name=f"test-{run_dir.name}")
    return submit(cfg, replace(res, **resources))


@dataclass
class Finished:
    results: list[dict]  # each task's return value
    log: str  # rank 0's stdout + stderr over all runs
    states: list[str]  # sacct, one per run
    other_job: str | None  # a job the interruption submitted


def _interrupted_run(config_file: Path, run_dir: Path, interrupt, timeout_s: float, overrides=(),
                     **resources) -> Finished:
    """Submit; once INTERRUPT_AT steps are logged call interrupt(job_id) (it may return another job's id, cancelled
    at the end); wait for the job to end."""
    deadline = time.time() + timeout_s
    job, other = None, None
    try:
        job = _submit(config_file, run_dir, overrides, **resources)
        if interrupt is not None:
            _wait_until(f"{INTERRUPT_AT} steps", lambda: _logged_steps(run_dir) >= INTERRUPT_AT, deadline, run_dir,
                        job.job_id)
            other = interrupt(job.job_id)
        results = _results(job, run_dir, deadline)
        return Finished(results, _log(run_dir, job.job_id), _sacct_states(job.job_id), other)
    finally:
        _cancel(job.job_id if job is not None else None, other)


def _assert_resumed(done: Finished, run_dir: Path) -> int:
    """Finished on both ranks after at least one requeue that resumed mid-run; returns the first resumed step."""
    assert [r["status"] for r in done.results] == ["finished", "finished"] and done.results[0]["step"] == STEPS
    assert done.results[0]["restarts"] >= 1, "SLURM_RESTART_COUNT: the job never ran again"
    assert "REQUEUED" in done.states[:-1], done.states
    starts = _start_steps(done.log)
    resumed = [k for k in starts[1:] if 0 < k < STEPS]
    assert len(starts) >= 2 and starts[0] == 0 and resumed, starts
    assert starts == sorted(starts), f"a run started before the previous one's checkpoint: {starts}"
    steps_logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps_logged == list(range(1, STEPS + 1))  # each step once: records after the checkpoint were dropped
    return resumed[0]


# ---------------------------------------------------------------------------------------------------------------
# tests (in file order; all compare with the same uninterrupted run)


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> Path:
    """The uninterrupted run, submitted through the command line."""
    run_dir = tmp_path_factory.mktemp("slurm_ref") / "ref"
    argv = ["submit", "--config", str(REPO / "configs" / "demo.yaml"), "--config", str(config_file),
            f"train.output_dir={run_dir}", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30"]
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(argv) == 0
    job_id = re.search(r"submitted job (\d+)", out.getvalue()).group(1)
    try:
        job = submitit.SlurmJob(folder=run_dir / "slurm", job_id=job_id, tasks=[0, 1])
        results = _results(job, run_dir, time.time() + 180)
    finally:
        _cancel(job_id)
    assert [r["status"] for r in results] == ["finished", "finished"], results
    assert results[0]["restarts"] == 0 and _start_steps(_log(run_dir, job_id)) == [0]
    # what was submitted is what --dry-run prints
    dry = io.StringIO()
    with redirect_stdout(dry):
        assert cli.main(argv + ["--dry-run"]) == 0
    assert (run_dir / "slurm" / f"{job_id}_submission.sh").read_text().strip() == dry.getvalue().strip()
    return run_dir


def test_two_task_job_trains_and_finishes(reference):
    job_id = next(reference.glob("slurm/*_0_log.out")).name.split("_")[0]
    assert "2 rank(s) on cpu" in _log(reference, job_id)
    assert _logged_steps(reference) == STEPS
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["latest", f"step_{STEPS}"]


def _send_usr2(job_id: str) -> None:
    _sh("scancel", "--signal=USR2", job_id)  # to every task, as SLURM's --signal and preemption notice do


def _submit_urgent(job_id: str) -> str:
    """A job in the higher-tier partition that needs both CPUs: SLURM preempts (USR2, then requeue) the debug job."""
    return _sh("sbatch", "--parsable", "-p", "urgent", "-J", "test-urgent", "--cpus-per-task=2", "-o", "/dev/null",
               "--wrap", "sleep 2").strip().split(";")[0]


def _scontrol_requeue(job_id: str) -> None:
    _sh("scontrol", "requeue", job_id)  # SIGTERM now, SIGKILL after KillWait; SLURM puts the job back itself


def test_usr2_requeues_and_resumes_exactly(config_file, reference, tmp_path):
    run_dir = tmp_path / "usr2"
    done = _interrupted_run(config_file, run_dir, _send_usr2, timeout_s=200)
    resumed = _assert_resumed(done, run_dir)
    assert (run_dir / "checkpoints" / f"step_{resumed}").is_dir()
    assert "this job is preempted" in done.log
    assert f"({Resources.max_num_timeout} remaining timeouts)" in done.log  # a preemption uses up no time-out
    _assert_same_weights(run_dir, reference)


def _task_pids(job_id: str) -> list[int]:
    """The tasks of the job's srun steps on this node (not the batch step: its script and srun)."""
    rows = [line.split() for line in _sh("scontrol", "listpids", job_id).splitlines()[1:]]
    return [int(r[0]) for r in rows if len(r) >= 4 and r[2].isdigit() and r[3].isdigit()]


def _proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict; empty once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def _stopped(pid: int) -> bool:
    return _proc_status(pid).get("State", "T").startswith("T")


def _signalled_or_running(pid: int) -> bool:
    """True once SLURM signalled a stopped task: USR2 or TERM pending, or the task running again (slurmstepd sends
    SIGCONT with its signals) or gone."""
    fields = _proc_status(pid)
    if not fields:
        return True
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    wanted = (1 << (signal.SIGUSR2 - 1)) | (1 << (signal.SIGTERM - 1))
    return bool(pending & wanted) or not fields["State"].startswith("T")


def _hold_until_signalled(job_id: str, deadline: float, run_dir: Path) -> None:
    """Stop (SIGSTOP) the job's tasks until SLURM signals them (USR2 from --signal, or the time limit's TERM), then
    let them all go: the run is cut by the limit however fast this machine trains."""
    pids = _task_pids(job_id)
    assert len(pids) == 2, f"tasks of job {job_id}: {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        _wait_until("the tasks to stop", lambda: all(_stopped(p) for p in pids), time.time() + 30, run_dir, job_id)
        _wait_until("SLURM's signal at the time limit", lambda: any(_signalled_or_running(p) for p in pids), deadline,
                    run_dir, job_id)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_time_limit_requeues_and_resumes_exactly(config_file, reference, tmp_path):
    """--time 1: SLURM's USR2 comes 29-59 s into a run (its timer ticks every 30 s), the kill 30 s later. The test
    holds the tasks (SIGSTOP) from a few steps in until that USR2 is pending, so the first run is cut mid-training on
    any machine; a checkpoint at every step checks that saving does not change the weights either. Once a cut run has
    been requeued the test lifts the limit, so the rest runs in one go."""
    run_dir = tmp_path / "timelimit"

    def lift_limit_after_a_cut(job_id: str) -> None:
        def cut() -> bool:  # a run ended by the limit after it saved
            return "REQUEUED" in _sacct_states(job_id) and (run_dir / "checkpoints" / "latest").exists()

        _hold_until_signalled(job_id, time.time() + 150, run_dir)
        _wait_until("a requeue at the time limit", cut, time.time() + 120, run_dir, job_id)
        _sh("scontrol", "update", f"JobId={job_id}", "TimeLimit=30")

    done = _interrupted_run(config_file, run_dir, lift_limit_after_a_cut, timeout_s=360,
                            overrides=("checkpoint.period_steps=1", "checkpoint.keep_last=2"),
                            time_min=1, signal_delay_s=1, max_num_timeout=3)
    _assert_resumed(done, run_dir)
    assert "this job is timed-out" in done.log and "(2 remaining timeouts)" in done.log  # 3 - 1
    _assert_same_weights(run_dir, reference)


def test_preemption_by_urgent_partition_resumes_exactly(config_file, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    done = _interrupted_run(config_file, run_dir, _submit_urgent, timeout_s=200)
    resumed = _assert_resumed(done, run_dir)
    assert (run_dir / "checkpoints" / f"step_{resumed}").is_dir()
    assert "this job is preempted" in done.log
    assert _sacct_states(done.other_job)[-1] == "COMPLETED", "the urgent job did not run"
    _assert_same_weights(run_dir, reference)


def test_scontrol_requeue_resumes_exactly(config_file, reference, tmp_path):
    run_dir = tmp_path / "requeue"
    done = _interrupted_run(config_file, run_dir, _scontrol_requeue, timeout_s=200)
    resumed = _assert_resumed(done, run_dir)
    assert (run_dir / "checkpoints" / f"step_{resumed}").is_dir()
    assert "saved after SIGTERM" in done.log and "SLURM requeues" in done.log
    assert "this job is" not in done.log  # submitit's USR2 path was not involved
    _assert_same_weights(run_dir, reference)
