"""`dinospec submit`: training as a SLURM job (submitit) that requeues itself and resumes exactly.

    dinospec submit model=vit_large spec=paper --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 48:00:00 --cpus-per-task 10 --mem 0
    dinospec submit --config configs/demo.yaml --tasks-per-node 2 --dry-run   # print the sbatch script only
    dinospec submit --config configs/demo.yaml --tasks-per-node 2 --local     # same job, this machine, no SLURM

One task per GPU; each task joins torch.distributed from SLURM's variables (dinospec.dist, as under torchrun).
Interruptions, and who requeues:
- preemption or the time limit: SLURM sends USR2 (``--signal=USR2@<delay>``); the trainer finishes its step, saves
  and returns "preempted"; the job then hands over to submitit's own USR2 handler on rank 0, which calls
  `checkpoint()`, counts a time-out or a preemption (``--max-num-timeout``) and runs ``scontrol requeue``.
- ``scontrol requeue`` from outside (or a plain SIGTERM): SLURM requeues by itself; the trainer saves, the tasks exit
  without a result so nothing stale is reported, and the requeued job resumes from ``checkpoints/latest``.
Logs: ``<run>/slurm/<jobid>_<task>_log.out|err`` (appended across requeues).

Before anything is queued: the config and the run's paths are checked (dinospec/preflight.py), the run directory's
lease is taken (dinospec/run_lease.py: a second job for the same run is refused, naming the first) and handed to
the job, and the code is snapshotted into ``<run>/code/`` (dinospec/code_version.py), so a job requeued days later
runs the code it was submitted with. When sbatch refuses the job, that is one line and nothing is left behind.

submitit.SlurmExecutor / LocalExecutor are used directly (AutoExecutor only picks one of them): the very parameters
that submit a job also render the ``--dry-run`` script, on machines without SLURM too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinospec.cli import EXIT_PREEMPTED, add_config_args
from dinospec.config import ConfigError, RunConfig, check_compatible, load_config, to_yaml, validate
from dinospec.run_lease import TOKEN_ENV, RunLease, local_process, queued_job, this_process

LOG_DIR = "slurm"  # submitit's job folder inside the run directory
# submitit calls a USR2 a time-out once the job ran min(80 % of its limit, limit - 10 min); below this limit every
# USR2 (preemption too) is a time-out and uses up --max-num-timeout
SUBMITIT_TIMEOUT_FLOOR_MIN = 10


@dataclass
class Resources:
    """What the job asks SLURM for; `sbatch_parameters` turns it into submitit.SlurmExecutor parameters."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    time_min: int = 24 * 60
    job_name: str = "dinospec"
    signal_delay_s: int = 180
    """USR2 this long before the time limit (SLURM may send it up to ~60 s earlier): a step plus a save must fit."""
    max_num_timeout: int = 20
    """Requeues after a time limit; every run saves before it ends, so each one makes progress."""
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """More sbatch options (`--slurm key=value`): {"gres": "gpu:8", "exclusive": True}."""

    def check(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min", "max_num_timeout"):
            if getattr(self, name) < (0 if name == "max_num_timeout" else 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.signal_delay_s < 0:
            raise ConfigError("--gpus-per-node and --signal-delay must be >= 0")
        if self.gpus_per_node and self.tasks_per_node > self.gpus_per_node:
            raise ConfigError(f"--tasks-per-node {self.tasks_per_node} > --gpus-per-node {self.gpus_per_node}: "
                              f"each task drives one GPU")
        if self.signal_delay_s >= self.time_min * 60:
            raise ConfigError(f"--signal-delay {self.signal_delay_s}s does not fit in --time {self.time_min} min")


def parse_time(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ConfigError(f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = ((days * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = (a * 60 + b) * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r} must be positive")
    return -(-seconds // 60)


def sbatch_parameters(res: Resources) -> dict[str, Any]:
    """submitit.SlurmExecutor parameters (its own names) for `res`."""
    params: dict[str, Any] = {
        "job_name": res.job_name, "time": res.time_min, "nodes": res.nodes, "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task, "signal_delay_s": res.signal_delay_s,
        # requeue must be allowed even where the cluster's JobRequeue=0
        "additional_parameters": {"requeue": True, **res.extra},
        # one crashed rank ends the job instead of leaving the others waiting in a collective
        "srun_args": ["--kill-on-bad-exit=1"],
        # intra-op threads = the CPUs of the task (one thread per task unless asked otherwise)
        "setup": [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{res.cpus_per_task}}}"],
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for name in ("mem", "partition", "account", "qos", "constraint", "exclude"):
        if getattr(res, name) is not None:
            params[name] = getattr(res, name)
    return params


class _ScriptOnlyExecutor(submitit.SlurmExecutor):
    """Renders the sbatch script exactly as SlurmExecutor would, also where SLURM is not installed (--dry-run)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def job_folder(cfg: DictConfig) -> Path:
    return Path(cfg.train.output_dir).absolute() / LOG_DIR


def sbatch_script(cfg: DictConfig, res: Resources) -> str:
    """The sbatch script `submit` would hand to SLURM for this config (nothing is written or submitted)."""
    res.check()
    executor = _ScriptOnlyExecutor(folder=job_folder(cfg), max_num_timeout=res.max_num_timeout)
    executor.update_parameters(**sbatch_parameters(res))
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def make_executor(cfg: DictConfig, res: Resources, local: bool = False) -> submitit.Executor:
    """SlurmExecutor (or LocalExecutor: same job, tasks as local processes) with the run's `slurm/` as job folder."""
    res.check()
    folder = job_folder(cfg)
    if not local:
        executor: submitit.Executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_num_timeout)
        executor.update_parameters(**sbatch_parameters(res))
        return executor
    if res.nodes != 1:
        raise ConfigError("--local runs on this machine: --nodes must be 1")
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_num_timeout)
    executor.update_parameters(timeout_min=res.time_min, tasks_per_node=res.tasks_per_node,
                               gpus_per_node=res.gpus_per_node, signal_delay_s=res.signal_delay_s,
                               setup=sbatch_parameters(res)["setup"])
    return executor


PATH_KEYS = ("data.path", "train.output_dir", "evaluation.knn_train", "evaluation.knn_val",
             "student.pretrained_weights", "train.init_from", "distill.teacher")


def with_absolute_paths(cfg: DictConfig) -> DictConfig:
    """The config with every path made absolute: the job runs in its code snapshot, not where it was submitted."""
    cfg = cfg.copy()
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if value:
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(str(value))))
    for source in cfg.data.sources:
        source.path = os.path.abspath(os.path.expanduser(str(source.path)))
    return cfg


class SubmitError(RuntimeError):
    """sbatch (or the local executor) refused the job; nothing of it is left in the run directory."""


def _listing(run_dir: Path) -> dict[Path, set[str] | None]:
    """What a submission may add to: the run directory, its slurm/ and code/ folders (None: does not exist)."""
    return {f: (set(os.listdir(f)) if f.is_dir() else None) for f in (run_dir, run_dir / LOG_DIR, run_dir / "code")}


def _new_entries(before: dict[Path, set[str] | None]) -> list[Path]:
    """What appeared in the listed folders since `before` (a folder that is new is one entry of its parent's)."""
    out: list[Path] = []
    for folder, names in before.items():
        if names is not None and folder.is_dir():
            out += [folder / n for n in sorted(set(os.listdir(folder)) - names)]
    return out


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _sbatch_message(error: BaseException | str) -> str:
    lines = [re.sub(r"^(sbatch: error|allocation failure): ", "", line).strip() for line in str(error).splitlines()]
    return "; ".join(line for line in lines if line) or type(error).__name__


def _sbatch_test_only(executor: submitit.SlurmExecutor) -> None:
    """`sbatch --test-only` with the job's own script: SLURM validates the request (partition, memory, time, ...)
    without queueing anything, so a refusal leaves nothing behind (and a job SLURM could never start is refused
    instead of pending forever)."""
    text = executor._make_submission_file_text(executor._submitit_command_str, "test-only")
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
        script.write(text)
        script.flush()
        try:
            out = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            raise SubmitError(f"sbatch could not be run: {e}") from None
    if out.returncode != 0:
        raise SubmitError(f"sbatch refused the job: {_sbatch_message(out.stderr or out.stdout)}")


def submit(cfg: DictConfig, res: Resources, local: bool = False, snapshot: bool = True) -> submitit.Job:
    """Submit `cfg`'s training as one job of res.nodes x res.tasks_per_node tasks; returns submitit's Job.

    Takes the run directory's lease first (RunDirBusy if another writer holds it) and hands it to the job; with
    `snapshot`, the job runs a copy of the code taken now. SubmitError if sbatch refuses: the lease, the snapshot
    and submitit's files are removed again."""
    from dinospec.code_version import snapshot as code_snapshot

    cfg = with_absolute_paths(cfg)
    run_dir = Path(cfg.train.output_dir)
    executor = make_executor(cfg, res, local)
    if not local:
        _sbatch_test_only(executor)  # type: ignore[arg-type]
    missing = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    before = _listing(run_dir)
    lease = RunLease(run_dir, holder=this_process("submit")).acquire()
    try:
        job = TrainJob(to_yaml(cfg), lease.token)
        stderr = io.StringIO()
        with contextlib.ExitStack() as stack:
            if snapshot:
                stack.enter_context(code_snapshot(run_dir))
            with contextlib.redirect_stderr(stderr):  # submitit echoes sbatch's error; ours is one line
                submitted = executor.submit(job)
        lease.hand_to(local_process(int(submitted.job_id), "queued job") if local else
                      queued_job(submitted.job_id))
        lease.release(keep=True)
        return submitted
    except BaseException as e:
        lease.release()
        _remove([missing] if missing is not None else _new_entries(before))
        if isinstance(e, (submitit.core.utils.FailedJobError, OSError)):
            raise SubmitError(f"{'sbatch' if not local else 'the local executor'} refused the job: "
                              f"{_sbatch_message(e)}") from None
        raise


# ---------------------------------------------------------------------------------------------------------------
# the job


def config_from_yaml(text: str) -> DictConfig:
    """A resolved config (to_yaml) back to a validated RunConfig: the job checks it against its own install."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(text))
    except OmegaConfBaseException as e:
        raise ConfigError(f"the submitted config does not fit this install's schema: {e}") from None
    validate(cfg)
    return cfg


class SignalLog:
    """The signals that reached this process while the context was open (whatever handler ran).

    The trainer's handlers only set a flag, so the job cannot otherwise tell USR2 (submitit requeues) from SIGTERM
    (SLURM requeues, or the job is cancelled). Python writes every handled signal's number to the wakeup fd.
    """

    def __enter__(self) -> "SignalLog":
        self.received: set[int] = set()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.set_wakeup_fd(self._previous)
        try:
            while chunk := os.read(self._read, 4096):
                self.received.update(chunk)
        except BlockingIOError:
            pass
        os.close(self._read)
        os.close(self._write)


class TrainJob(submitit.helpers.Checkpointable):
    """One task of the job: train `config_yaml`; on preemption hand the requeue to submitit or SLURM.

    Holds the config and the run directory's lease token (which the job presents, in every run, to take the lease
    over from `submit` or from its own previous run): a requeued job resumes from the latest checkpoint.
    """

    def __init__(self, config_yaml: str, lease_token: str | None = None):
        self.config_yaml = config_yaml
        self.lease_token = lease_token

    def __call__(self) -> dict[str, Any]:
        from dinospec import dist
        from dinospec.trainer import train

        _log_to_stderr()
        cfg = config_from_yaml(self.config_yaml)
        job_env = _job_environment()
        if job_env is not None and job_env.cluster == "local":
            _export_local_ranks(job_env)
        if self.lease_token:
            os.environ[TOKEN_ENV] = self.lease_token
        if job_env is not None:  # rank 0 publishes a free port in the job folder (dinospec.dist)
            restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
            dist.init_distributed(cfg.compute.device, rendezvous_file=job_folder(cfg) /
                                  f".rendezvous_{job_env.job_id}_{restarts}")
        with SignalLog() as signals:
            outcome = train(cfg, resume="auto")
        summary = {"status": outcome.status, "step": outcome.step, "run_dir": str(outcome.run_dir),
                   "job_id": job_env.job_id if job_env is not None else None,
                   "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
        if outcome.status == "finished" or job_env is None:
            if job_env is not None:  # nothing is left to save: a late USR2 (time limit) must not kill the exit
                for sig in (signal.SIGUSR1, signal.SIGUSR2):
                    signal.signal(sig, signal.SIG_IGN)
            dist.shutdown()
            return summary
        self._hand_over(signals.received, job_env)
        return summary  # not reached inside a job

    def _hand_over(self, received: set[int], job_env: submitit.JobEnvironment) -> None:
        """After the trainer saved on a signal: requeue through submitit (USR1/USR2) or leave it to SLURM (TERM only).

        No task returns a result for the interrupted run (only rank 0 writes submitit's error if it refuses to
        requeue, e.g. "timed-out too many times"), so nothing reports it as done.
        """
        from dinospec import dist

        # SIGTERM alone: `scontrol requeue`, a cancel or a kill at the limit, where SLURM decides; else submitit's path
        by_submitit = bool(received & {signal.SIGUSR1, signal.SIGUSR2}) or signal.SIGTERM not in received
        print(f"dinospec: saved after {', '.join(signal.Signals(s).name for s in sorted(received)) or 'a signal'}; "
              f"{'submitit requeues the job' if by_submitit else 'SLURM requeues or ends the job'}", flush=True)
        try:
            if by_submitit and job_env.global_rank == 0:
                # submitit's handler is back in place (the trainer restores handlers): checkpoint(), count the
                # time-out or preemption, scontrol requeue, then SystemExit (or UncompletedJobError: not requeued)
                signal.raise_signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG))
        finally:
            try:  # the other ranks wait for rank 0's hand-over before they go, so that none ends the step early
                dist.barrier()
            except Exception:  # rank 0 may already be gone
                pass
            dist.shutdown()
        raise SystemExit(EXIT_PREEMPTED)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before it requeues: the same job, which resumes from `checkpoints/latest`."""
        print("dinospec: requeuing; the next run resumes from the run's latest checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(TrainJob(self.config_yaml, self.lease_token))


def _log_to_stderr() -> None:
    """dinospec's log lines into the task's .err file (not the root logger: submitit's lines would come twice)."""
    logger = logging.getLogger("dinospec")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("DINOSPEC_LOG", "INFO"))


def _job_environment() -> submitit.JobEnvironment | None:
    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (called directly)
        return None


def _export_local_ranks(job_env: submitit.JobEnvironment) -> None:
    """LocalExecutor tasks carry no SLURM variables: give dinospec.dist torchrun's instead (no MASTER_PORT: rank 0
    picks a free one and publishes it in the job folder)."""
    if job_env.num_tasks > 1:
        os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                          LOCAL_RANK=str(job_env.local_rank), MASTER_ADDR="127.0.0.1")


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU (default 0: CPU tasks)")
    g.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node, or 1 on CPU")
    g.add_argument("--cpus-per-task", type=int, help="default: data.num_workers + 1")
    g.add_argument("--mem", help="memory per node, SLURM syntax (64G; 0 = all of it)")
    g.add_argument("--time", default="24:00:00", help="time limit of each run (requeues start anew; default 24 h)")
    for name in ("partition", "account", "qos", "constraint", "exclude"):
        g.add_argument(f"--{name}")
    g.add_argument("--job-name", help="default: dinospec-<run directory name>")
    g.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm gres=gpu:8 --slurm exclusive (repeatable)")
    r = p.add_argument_group("requeue")
    r.add_argument("--signal-delay", type=int, default=Resources.signal_delay_s, metavar="S",
                   help="USR2 this many seconds before the time limit (default %(default)s)")
    r.add_argument("--max-num-timeout", type=int, default=Resources.max_num_timeout, metavar="N",
                   help="requeues after the time limit (default %(default)s; preemptions do not count)")
    m = p.add_argument_group("mode")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    mode.add_argument("--local", action="store_true", help="run the job here through submitit's LocalExecutor")
    m.add_argument("--wait", action="store_true", help="wait for the job to end (always with --local)")
    m.add_argument("--no-snapshot", action="store_true",
                   help="run the code in this checkout as it is when the job (re)starts, not a copy taken now")


def resources_from_args(args: argparse.Namespace, cfg: DictConfig) -> Resources:
    extra: dict[str, Any] = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not key or key.startswith("-"):
            raise ConfigError(f"--slurm {item!r}: expected KEY=VALUE or KEY (an sbatch option without its dashes)")
        extra[key.replace("_", "-")] = value if sep else True
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    res = Resources(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task or cfg.data.num_workers + 1, time_min=parse_time(args.time),
        job_name=args.job_name or f"dinospec-{Path(cfg.train.output_dir).name}", signal_delay_s=args.signal_delay,
        max_num_timeout=args.max_num_timeout, mem=args.mem, partition=args.partition, account=args.account,
        qos=args.qos, constraint=args.constraint, exclude=args.exclude, extra=extra)
    res.check()
    return res


def resume_step(cfg: DictConfig) -> int | None:
    """The step a (re)submitted run resumes from (None: a fresh run). A run directory whose checkpoints another,
    incompatible config wrote fails here with ConfigError, not hours later when the job leaves the queue."""
    if not (Path(cfg.train.output_dir) / "checkpoints").is_dir():
        return None  # a fresh run: no need to import torch
    from dinospec.checkpoint import Checkpointer, CheckpointError

    checkpointer = Checkpointer(cfg.train.output_dir)
    step = checkpointer.latest_step()
    if step is not None:
        try:
            check_compatible(checkpointer.read_config(), cfg)
        except CheckpointError as e:  # nothing usable: the job would start afresh or fail; say so now
            raise ConfigError(f"{cfg.train.output_dir} holds checkpoints that cannot be read: {e}") from None
    return step


def run(args: argparse.Namespace) -> int:
    from dinospec.preflight import check_run_paths

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before anything is queued
    res = resources_from_args(args, cfg)
    try:
        check_run_paths(cfg)  # a missing data folder now, not 30 s into the job
    except ConfigError as e:
        if not args.dry_run:
            raise
        print(f"dinospec: note: {e}", file=sys.stderr)  # the script may be meant for another machine
    if not (args.dry_run or args.local or args.no_snapshot):
        from dinospec.code_version import snapshot_available

        if (why := snapshot_available()) is not None:
            raise ConfigError(f"cannot snapshot the code ({why}); pass --no-snapshot to run the live checkout")
    step = resume_step(cfg)
    if args.dry_run:
        print(sbatch_script(cfg, res))
        return 0
    if res.time_min <= SUBMITIT_TIMEOUT_FLOOR_MIN and not args.local:
        print(f"dinospec: note: with --time <= {SUBMITIT_TIMEOUT_FLOOR_MIN} min submitit counts every USR2, "
              f"preemptions included, as a time-out (at most --max-num-timeout {res.max_num_timeout})",
              file=sys.stderr)
    try:
        job = submit(cfg, res, local=args.local, snapshot=not (args.local or args.no_snapshot))
    except SubmitError as e:
        print(f"dinospec: {e}", file=sys.stderr)
        return 1
    run_dir = Path(cfg.train.output_dir).absolute()
    print(f"submitted job {job.job_id}: {res.nodes} node(s) x {res.tasks_per_node} task(s), run {run_dir}"
          f"{f' (resumes from step {step})' if step is not None else ''}")
    print(f"  log:    {job.paths.stdout}")
    if not args.local:
        print(f"  watch:  squeue -j {job.job_id}; sacct -j {job.job_id} -D; tail -f {job.paths.stdout}")
        print(f"  stop:   scancel {job.job_id}   (save first and requeue: scancel --signal=USR2 {job.job_id})")
    if not (args.wait or args.local):
        return 0
    try:
        outcome = job.results()[0]
    except KeyboardInterrupt:
        if args.local:
            job.cancel(check=False)
        raise
    print(f"job {job.job_id}: {outcome['status']} at step {outcome['step']} ({outcome['restarts']} restart(s))")
    return 0 if outcome["status"] == "finished" else 1
