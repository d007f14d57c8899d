"""One writer per run directory: an exclusive lease in ``<run>/lease.json``.

Two jobs writing one run directory corrupt it (the second resumes from the first's checkpoint and deletes its
in-progress save). So whoever writes a run holds its lease, and a second writer is refused with a message naming
the holder. The lease

- is taken by ``dinospec submit`` before sbatch (as the submitting process) and handed to the queued job, then by
  the job's rank 0 when training starts, and by a plain ``dinospec train``; whoever presents the lease's token (the
  job carries it, across requeues too) takes it over;
- is released when the run ends, and kept while a preempted SLURM job waits to be requeued;
- is recoverable without anyone's help: a holder that is gone (a SLURM job that squeue no longer lists as pending
  or running, a process that no longer exists on this host, or a process on another host whose heartbeat is older
  than `stale_after_s`) no longer holds it.

Every acquisition appends the holder and the code version to ``<run>/writers.jsonl``: who wrote this run, when,
with which code.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from dinospec.config import ConfigError

LEASE = "lease.json"
LOCK = ".lease.lock"
WRITERS = "writers.jsonl"
TOKEN_ENV = "DINOSPEC_LEASE_TOKEN"  # a job's lease token, for the trainer it runs
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # a holder on another host, outside SLURM, that has not beaten for this long is gone
# squeue states of a job that still owns its run (it runs, waits to run, or waits to be requeued)
ACTIVE_JOB_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                     "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "PREEMPTED", "STOPPED"}


class RunDirBusy(ConfigError):
    """Another writer holds the run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a SLURM job (liveness from squeue) or a process (liveness from its pid and start time)."""

    kind: str  # "slurm" | "process"
    host: str
    pid: int
    pid_start: str  # the process's start time (/proc/<pid>/stat field 22), so a reused pid is not mistaken for it
    job_id: str | None = None
    what: str = "train"  # "train" | "submit" | "queued job"

    def describe(self) -> str:
        if self.kind == "slurm":
            return f"SLURM job {self.job_id} ({self.what}; host {self.host}, pid {self.pid})"
        return f"process {self.pid} on {self.host} ({self.what})"


def _pid_start(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process(what: str = "train") -> Holder:
    """This process as a holder: a SLURM job when it runs inside one (SLURM_JOB_ID), else a plain process."""
    job_id = os.environ.get("SLURM_JOB_ID")
    return Holder("slurm" if job_id else "process", socket.gethostname(), os.getpid(), _pid_start(os.getpid()),
                  job_id, what)


def local_process(pid: int, what: str) -> Holder:
    """Another process on this host (a job of submitit's LocalExecutor)."""
    return Holder("process", socket.gethostname(), pid, _pid_start(pid), None, what)


def queued_job(job_id: str) -> Holder:
    """A submitted SLURM job that has not started yet."""
    return Holder("slurm", socket.gethostname(), 0, "", str(job_id), "queued job")


def _slurm_job_state(job_id: str) -> str | None:
    """The job's squeue state; "" when squeue no longer lists it; None when squeue cannot tell."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # "Invalid job id specified": the job ended long enough ago to be purged
        return "" if "invalid job id" in out.stderr.lower() else None
    states = out.stdout.split()
    return states[0] if states else ""


def holder_alive(holder: Holder, heartbeat_age_s: float, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether `holder` still holds its lease (see the module docstring for the rules)."""
    if holder.kind == "slurm" and holder.job_id:
        state = _slurm_job_state(holder.job_id)
        if state is not None:
            return state.split("+")[0] in ACTIVE_JOB_STATES
    if holder.host == socket.gethostname() and holder.pid:
        return _pid_start(holder.pid) == holder.pid_start and holder.pid_start != ""
    return heartbeat_age_s < stale_after_s


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialises lease changes between processes (flock; the critical section is a read and a rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_lease(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / LEASE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # torn or foreign: nobody can be said to hold it
        return None


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


class RunLease:
    """This process's lease on a run directory; `acquire` raises RunDirBusy naming the holder."""

    def __init__(self, run_dir: str | Path, holder: Holder | None = None, token: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.holder = holder or this_process()
        self.token = token or secrets.token_hex(16)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LEASE

    def acquire(self, code: dict[str, Any] | None = None) -> "RunLease":
        """Take the lease unless a live holder with another token has it; a writer passes the code it runs
        (code_version.describe()), recorded in writers.jsonl."""
        with _locked(self.run_dir):
            current = read_lease(self.run_dir)
            if current is not None and current.get("token") != self.token:
                holder = Holder(**current["holder"])
                age = time.time() - self.path.stat().st_mtime
                if holder_alive(holder, age, self.stale_after_s):
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(current.get("acquired", 0)))
                    raise RunDirBusy(f"run directory {self.run_dir} is in use by {holder.describe()} since {since}; "
                                     f"wait for it to end, stop it, or choose another train.output_dir")
            self._write_holder(self.holder)
            if code is not None:  # a writer (not a submission reserving the run for its job)
                took_over = None if current is None or current.get("token") == self.token else current["holder"]
                with open(self.run_dir / WRITERS, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), "holder": asdict(self.holder),
                                        "took_over": took_over, "code": code}) + "\n")
        self._start_heartbeat()
        return self

    def hand_to(self, holder: Holder) -> None:
        """Keep the lease (same token) under another holder: the submitted job, or the job waiting for a requeue."""
        with _locked(self.run_dir):
            self._write_holder(holder)
        self.holder = holder

    def release(self, keep: bool = False) -> None:
        """Give the lease up (keep=True: leave it to this SLURM job's requeue, or to a resumption of this process;
        a process that is gone no longer holds it anyway)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        if keep:
            return
        with _locked(self.run_dir):
            current = read_lease(self.run_dir)
            if current is not None and current.get("token") == self.token:
                self.path.unlink()

    def _write_holder(self, holder: Holder) -> None:
        _write(self.path, {"token": self.token, "holder": asdict(holder), "acquired": round(time.time(), 3)})

    def _start_heartbeat(self) -> None:
        """Touch the lease now and then, so a holder on another host that died can be told from one that runs."""
        if self._beat is not None or self.heartbeat_s <= 0:
            return
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    os.utime(self.path)
                except OSError:  # taken over after we were presumed dead, or the run dir went away
                    return

        self._beat = threading.Thread(target=beat, name="run-lease-heartbeat", daemon=True)
        self._beat.start()


def hold_run_dir(run_dir: str | Path, is_main: bool) -> RunLease | None:
    """Collective (all ranks): rank 0 takes the lease (with the job's token from $DINOSPEC_LEASE_TOKEN, if any) and
    records itself and its code in writers.jsonl; RunDirBusy on every rank when another writer holds it. Returns
    rank 0's lease (None on the other ranks)."""
    from dinospec import dist
    from dinospec.code_version import describe

    lease, error = None, None
    if is_main:  # whatever goes wrong, every rank learns it (the others would wait in the next collective)
        try:
            lease = RunLease(run_dir, token=os.environ.get(TOKEN_ENV)).acquire(describe())
        except RunDirBusy as e:
            error = ("busy", str(e))
        except OSError as e:
            error = ("os", f"cannot take the lease of run directory {run_dir}: {e}")
    error = dist.broadcast_object(error)
    if error:
        raise RunDirBusy(error[1]) if error[0] == "busy" else ConfigError(error[1])
    return lease
