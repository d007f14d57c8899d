"""Issue #12 on a real SLURM cluster (scripts/slurm_ci.sh up): sbatch refusals are one line and leave nothing behind,
a second job for a run directory is refused while the first one lives (and accepted once it is gone), and a
requeued job runs the code snapshotted at submission, not the checkout as it is when it restarts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_slurm import TERMINAL, TINY, _cancel, _log, _sacct_states, _sh, _sinfo_problem, _wait_until

pytestmark = [pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _sinfo_problem()
    if problem:
        pytest.skip(f"no SLURM cluster: {problem}; start one with `sudo bash scripts/slurm_ci.sh up`")


def _config(tmp_path: Path, steps: int) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["train"]["official_epoch_length"] = steps // 4
    cfg["checkpoint"]["period_steps"] = 20
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(config: Path, run_dir: Path, *extra: str, cwd: Path = REPO, env: dict | None = None,
            tasks: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinospec.cli", "submit", "--config", str(config),
                           f"train.output_dir={run_dir}", "--tasks-per-node", str(tasks), "--cpus-per-task", "1",
                           "--time", "30", *extra], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _job_id(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def _active(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and out.stdout.strip() != ""


@pytest.mark.parametrize("request_", [("--partition", "nope"), ("--mem", "100000G")], ids=["partition", "memory"])
def test_sbatch_refusal_is_one_line_and_leaves_nothing(tmp_path, request_):
    config = _config(tmp_path, 40)
    fresh = tmp_path / "fresh" / "run"
    existing = tmp_path / "existing"
    (existing / "slurm").mkdir(parents=True)
    (existing / "slurm" / "123_0_log.out").write_text("an earlier job's log\n")
    jobs_before = _sh("squeue", "-h", "-o", "%i").split()
    for run_dir in (fresh, existing):
        before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
        proc = _submit(config, run_dir, *request_)
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and "sbatch refused the job" in proc.stderr, proc.stderr
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert _sh("squeue", "-h", "-o", "%i").split() == jobs_before


@pytest.mark.slow
def test_second_job_for_a_run_is_refused_while_the_first_lives(tmp_path):
    config = _config(tmp_path, 4000)  # runs until cancelled
    run_dir = tmp_path / "run"
    first = second = None
    try:
        first = _job_id(_submit(config, run_dir))
        refused = _submit(config, run_dir)  # queued, not yet running: the submission holds the lease for it
        assert refused.returncode == 2, refused.stderr
        assert f"is in use by SLURM job {first}" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
        # once it trains, its rank 0 holds the lease (taken over from the submission with the job's token)
        _wait_until("the job to hold the lease", lambda: (run_dir / "writers.jsonl").exists(), time.time() + 120,
                    run_dir, first)
        lease = json.loads((run_dir / "lease.json").read_text())
        assert lease["holder"]["job_id"] == first and lease["holder"]["what"] == "train"
        refused = _submit(config, run_dir)
        assert refused.returncode == 2 and f"SLURM job {first} (train" in refused.stderr, refused.stderr
        _cancel(first)  # SIGKILL in the end: nothing releases the lease, squeue tells it is gone
        _wait_until("the job to end", lambda: not _active(first), time.time() + 120, run_dir, first)
        second = _job_id(_submit(config, run_dir))  # recovered without anyone's help
        lease = json.loads((run_dir / "lease.json").read_text())
        assert lease["holder"]["job_id"] == second
    finally:
        _cancel(first, second)


@pytest.mark.slow
def test_requeued_job_runs_the_code_it_was_submitted_with(tmp_path):
    """Submit from a checkout, break that checkout, requeue: the job runs again from its snapshot and finishes;
    writers.jsonl records the snapshot's commit for both runs."""
    steps = 200
    config = _config(tmp_path, steps)
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(checkout)], check=True, timeout=120)
    commit = _sh("git", "-C", str(checkout), "rev-parse", "HEAD").strip()
    run_dir = tmp_path / "run"
    env = {"PYTHONPATH": str(checkout)}
    job = None
    try:
        job = _job_id(_submit(config, run_dir, cwd=checkout, env=env))
        _wait_until("some training", lambda: (run_dir / "metrics.jsonl").exists()
                    and len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 30, time.time() + 180,
                    run_dir, job)
        trainer = checkout / "dinospec" / "trainer.py"
        trainer.write_text("raise RuntimeError('the live checkout was imported')\n" + trainer.read_text())
        _sh("scontrol", "requeue", job)

        def ended() -> bool:
            states = _sacct_states(job)
            return len(states) >= 2 and states[-1] in TERMINAL

        _wait_until("the requeued job to end", ended, time.time() + 300, run_dir, job)
        assert _sacct_states(job)[-1] == "COMPLETED", _log(run_dir, job)[-3000:]
        assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
        writers = [json.loads(line) for line in (run_dir / "writers.jsonl").read_text().splitlines()]
        assert len(writers) >= 2
        snapshots = {w["code"]["source"] for w in writers}
        assert len(snapshots) == 1 and Path(snapshots.pop()).parent == run_dir / "code"
        assert all(w["code"]["commit"] == commit and w["code"]["dirty"] is False for w in writers)
        assert all(w["holder"]["job_id"] == job for w in writers)
        assert not (run_dir / "lease.json").exists(), "a finished job releases its lease"
    finally:
        _cancel(job)
