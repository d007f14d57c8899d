"""The training loop, readable top to bottom: `dinospec train --config X [overrides]`.

    dinospec train --config configs/demo.yaml                                  # one process (CPU or GPU)
    torchrun --nproc_per_node=8 -m dinospec.cli train model=vit_large spec=paper data.path=/data/imagenet/train
    dinospec submit --nodes 4 --gpus-per-node 8 model=vit_large spec=paper ... # SLURM (dinospec/launch.py)

A run directory holds config.yaml, metrics.jsonl, checkpoints/ and plots/. Training resumes from the latest good
checkpoint of its run directory by default; a preemption signal (SIGTERM, SIGUSR1, SIGUSR2) finishes the current
step, saves and returns status "preempted" (`dinospec train` then exits with dinospec.cli.EXIT_PREEMPTED).

`set_up` builds a run; `train_step` is one step (scripts call it on a `Trainee.build(cfg, meta, device)` of their
own); `_log` (with the k-NN when due) and `_save_or_stop` are the periodic actions.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from dinospec import dist
from dinospec.checkpoint import Checkpointer
from dinospec.checkpoint_state import ModelState, OptimState, Progress
from dinospec.config import ConfigError, check_compatible, to_yaml
from dinospec.data.loader import SSLLoader, build_ssl_loader
from dinospec.metrics import MetricsLogger, plot_losses
from dinospec.parallel import Parallel, configure_process, parallelize
from dinospec.rng import seed_all
from dinospec.run_lease import hold_run_dir
from dinospec.ssl.meta_arch import SSLMetaArch
from dinospec.ssl.diagnostics import CollapseDetector
from dinospec.ssl.gram_teacher import GramAnchor
from dinospec.ssl.optim import apply_schedules, build_optimizer
from dinospec.ssl.schedules import Schedules, build_schedules, momentum_for_run, teacher_init_share

log = logging.getLogger("dinospec")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or inf (train.nonfinite=stop, or too many skipped steps)."""


@dataclass
class TrainOutcome:
    status: str  # "finished" | "preempted"
    step: int
    run_dir: Path


@dataclass
class Trainee:
    """What one training step needs (train_step): the model, how it runs, its optimizer, schedules and progress."""

    cfg: DictConfig
    meta: SSLMetaArch
    par: Parallel
    optimizer: torch.optim.Optimizer
    sched: Schedules
    progress: Progress
    gram: GramAnchor | None = None  # replicated, never sharded or wrapped
    grad_norm: float = 0.0  # the largest clipped norm of the last step taken (a skipped step keeps it)

    @classmethod
    def build(cls, cfg: DictConfig, meta: SSLMetaArch, device: torch.device, world_size: int = 1,
              gram: GramAnchor | None = None) -> "Trainee":
        """A built (and loaded) model made ready to train: parallelized, with its optimizer, the schedules (over
        optim.epochs; train.max_steps may stop sooner) and a fresh Progress."""
        return cls(cfg, meta, parallelize(meta, cfg, device), _build_optimizer(meta, cfg),
                   build_schedules(cfg, None, cfg.train.batch_size_per_gpu * world_size), Progress(device), gram)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (a Gram teacher's weights too: frozen since their step, not recomputable)."""
        state = {"model": ModelState(self.meta), "optim": OptimState(self.meta.student, self.optimizer),
                 "train": self.progress}
        return state if self.gram is None else {**state, "gram": self.gram}


@dataclass
class Run:
    """A run as set_up builds it: the trainee, and what the loop and its periodic actions use."""

    trainee: Trainee
    env: dist.DistEnv
    device: torch.device
    run_dir: Path
    checkpointer: Checkpointer
    logger: MetricsLogger
    loader: SSLLoader
    start: int
    steps: int
    global_batch: int
    collapse: CollapseDetector
    since: tuple[float, int]  # (time, step) of the last log line: img/s and s/step are measured from there


class SignalFlag:
    """Remembers a preemption signal until restore(); the loop checks it once per step (on every rank together)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def total_steps(cfg: DictConfig) -> int:
    return cfg.train.max_steps if cfg.train.max_steps is not None else cfg.optim.epochs * cfg.train.official_epoch_length


def _check_knn_folders(cfg: DictConfig) -> None:
    """Fail before training, not at the first evaluation an hour in."""
    if cfg.evaluation.knn_period_steps:
        for key in ("knn_train", "knn_val"):
            if not Path(cfg.evaluation[key]).is_dir():
                raise ConfigError(f"config key 'evaluation.{key}' = {cfg.evaluation[key]!r} is not a folder")


def _knn(meta: SSLMetaArch, cfg: DictConfig, device: torch.device) -> dict[str, float]:
    """k-NN top-1 of the teacher backbone now (rank 0's numbers; {} on the other ranks)."""
    from dinospec.eval.knn import knn_of_training_teacher
    from dinospec.ssl.meta_arch import build_teacher_backbone

    ev = cfg.evaluation
    return knn_of_training_teacher(meta.teacher.backbone, partial(build_teacher_backbone, cfg), ev.knn_train,
                                   ev.knn_val, img_size=ev.knn_img_size or cfg.crops.global_crops_size,
                                   batch_size=ev.knn_batch_size, device=device)


def _batches(loader: Any, device: torch.device) -> Iterator[dict[str, Any]]:
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(cfg: DictConfig, resume: str = "auto") -> TrainOutcome:
    """Pretrain as `cfg` says. resume: "auto" (latest checkpoint of the run dir, if any), "never", or a path.

    Holds the run directory's lease meanwhile (dinospec/run_lease.py): RunDirBusy if another writer has it."""
    _check_knn_folders(cfg)
    env, device = dist.init_distributed(cfg.compute.device)
    run_dir = Path(cfg.train.output_dir)
    lease = hold_run_dir(run_dir, env.is_main)
    outcome = None
    try:
        outcome = _train(set_up(cfg, resume, env, device, run_dir))
        return outcome
    finally:
        if lease is not None:  # a preempted run keeps it for its requeue (or its next start) to take over
            lease.release(keep=outcome is not None and outcome.status == "preempted")


def _train(run: Run) -> TrainOutcome:
    """The step loop: a step, then its periodic actions; the status the run ends with."""
    cfg, status, knn_period = run.trainee.cfg, "finished", run.trainee.cfg.evaluation.knn_period_steps
    batches, signals = _batches(run.loader, run.device), SignalFlag()
    try:
        for step in range(run.start, run.steps):
            # k-NN every knn_period steps, at the end, and after the first step (the baseline of a fresh run)
            knn_due = bool(knn_period) and ((step + 1) % knn_period == 0 or step + 1 == run.steps or step == 0)
            logs = knn_due or (step + 1) % cfg.train.log_every == 0 or step == run.start or step + 1 == run.steps
            losses = train_step(run.trainee, next(batches), step, run.logger.info, diagnostics=logs)
            run.logger.advance()
            if logs:
                _log(run, step, losses, knn_due)
            if _save_or_stop(run, step, signals):
                status = "preempted"
                break
        run.checkpointer.wait()
    finally:
        signals.restore()
        run.logger.close()
    if run.env.is_main and cfg.logging.plots and (run.run_dir / "metrics.jsonl").exists():
        plot_losses(run.run_dir / "metrics.jsonl", run.run_dir / "plots" / "losses.png")
    return TrainOutcome(status, run.trainee.progress.step, run.run_dir)


def set_up(cfg: DictConfig, resume: str, env: dist.DistEnv, device: torch.device, run_dir: Path) -> Run:
    """Everything a run needs, once: seeds, model (pretrained weights or an init_from phase), parallelism,
    optimizer, the resumed state, schedules, logger, and the loader at the resumed step."""
    configure_process(cfg)
    checkpointer = Checkpointer(run_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                async_save=cfg.checkpoint.async_save)
    resuming, saved_gram = _resume_plan(checkpointer, cfg, resume, env.is_main)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (the teacher is never broadcast)
    meta = _build_meta(cfg).to(device)
    seed_all(cfg.train.seed + 1 + env.rank)  # then one stream per rank (drop-path; python and numpy too)
    _load_pretrained(meta, cfg)
    if cfg.train.init_from and not resuming:  # a new phase of another run (its own checkpoints win once it has any)
        from dinospec.phase import init_from_run

        init_from_run(meta, cfg, cfg.train.init_from)
    # a frozen copy of the teacher backbone, taken at gram.start_step
    gram = GramAnchor(cfg, meta.teacher.backbone).to(device) if cfg.gram.enabled else None
    t = Trainee.build(cfg, meta, device, env.world_size, gram)
    if resume != "never":  # a checkpoint from before Gram anchoring was on has no Gram teacher: it is taken anew
        checkpointer.load({k: v for k, v in t.state().items() if k != "gram" or saved_gram},
                          path=None if resume == "auto" else resume)
    meta.check_loaded()
    start, steps, global_batch = t.progress.step, total_steps(cfg), cfg.train.batch_size_per_gpu * env.world_size
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = MetricsLogger(run_dir, env.is_main, steps, start, cfg.logging.progress, cfg.logging.wandb,
                           OmegaConf.to_container(cfg, resolve=True))
    logger.info(f"dinospec: {env.world_size} rank(s) on {device}, {sum(p.numel() for p in meta.student.parameters()):,} "
                f"student params, steps {start} -> {steps}, global batch {global_batch}, run {run_dir}")
    share = teacher_init_share(t.sched.momentum, steps)
    if share > 0.05 and start == 0:
        logger.info(f"WARNING: with teacher.momentum_teacher {cfg.teacher.momentum_teacher} the EMA teacher still "
                    f"holds {share:.0%} of its random init at the last step ({steps}): its targets will say little "
                    f"about the images. For a run this short use teacher.momentum_teacher <= "
                    f"{momentum_for_run(steps):.4f} (or a longer run).")
    loader = build_ssl_loader(cfg, env.rank, env.world_size, start_step=start, broken=t.progress.broken)
    collapse = CollapseDetector(cfg.dino.head_n_prototypes, cfg.logging.collapse_patience_steps)
    return Run(t, env, device, run_dir, checkpointer, logger, loader, start, steps, global_batch, collapse,
               since=(time.perf_counter(), start))


def _resume_plan(checkpointer: Checkpointer, cfg: DictConfig, resume: str, is_main: bool) -> tuple[bool, bool]:
    """(whether the run resumes, whether the checkpoint it resumes from holds a Gram teacher); ConfigError when
    the checkpoint may not be used."""
    has_checkpoint = checkpointer.latest_step() is not None
    if resume == "never" and has_checkpoint:
        raise ConfigError(f"{checkpointer.dir.parent} already holds checkpoints and --no-resume was given; "
                          f"choose another train.output_dir (nothing is overwritten)")
    if resume == "never" or (resume == "auto" and not has_checkpoint):
        return False, False
    saved_yaml = checkpointer.read_config(None if resume == "auto" else resume)
    changed = check_compatible(saved_yaml, cfg)
    if changed and is_main:
        log.warning("resuming with changed config keys: %s", ", ".join(changed))
    return True, bool(OmegaConf.select(OmegaConf.create(saved_yaml), "gram.enabled", default=False))


def train_step(t: Trainee, batch: dict[str, Any], step: int, info: Callable[[str], None] = log.info,
               diagnostics: bool = True) -> dict[str, torch.Tensor]:
    """Step `step` on `batch`: schedules, the Gram teacher when due, forward under the run's cast, a non-finite
    loss skipped (or NonFiniteLoss), backward, clip, AdamW, EMA; then progress.step = step + 1. Returns the loss
    terms (detached, not synced to the host) and, with `diagnostics`, the learning diagnostics. info: where its
    messages go. Every rank calls it together."""
    cfg, meta, progress = t.cfg, t.meta, t.progress
    now = t.sched.at(step)
    apply_schedules(t.optimizer, now["lr"], now["wd"], now["last_layer_lr"])
    t.optimizer.zero_grad(set_to_none=True)
    if t.gram is not None and t.gram.due(step):
        t.gram.refresh(meta.teacher.backbone, step)
        info(f"step {step}: Gram teacher taken from the EMA teacher")
    with t.par.autocast:
        losses = meta.losses(batch, now["teacher_temp"], t.par.student_forward, t.gram, diagnostics)
    loss = losses["loss"]
    if dist.any_rank(not bool(torch.isfinite(loss)), loss.device):
        progress.nonfinite_skips += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        if cfg.train.nonfinite == "stop" or progress.nonfinite_skips > cfg.train.max_nonfinite_skips:
            raise NonFiniteLoss(f"non-finite loss at step {step}: {values} "
                                f"({progress.nonfinite_skips} non-finite step(s) so far)")
        info(f"step {step}: non-finite loss {values}, step skipped "
             f"({progress.nonfinite_skips}/{cfg.train.max_nonfinite_skips})")
        loss.backward()  # keeps DDP's gradient hooks in step on every rank; the gradients are dropped
        t.optimizer.zero_grad(set_to_none=True)
    else:
        loss.backward()
        t.grad_norm = _clip(meta, cfg.optim.clip_grad)
        t.optimizer.step()
        meta.update_teacher(now["momentum"])
    progress.step = step + 1
    return {k: v.detach() for k, v in losses.items()}


def _log(run: Run, step: int, losses: dict[str, torch.Tensor], knn_due: bool) -> None:
    """A metrics line after `step` (losses averaged over ranks, schedules, speed, broken files, memory, the k-NN
    when due), and the collapse detector's look at it."""
    t, now, (t_last, s_last) = run.trainee, run.trainee.sched.at(step), run.since
    dt, n = time.perf_counter() - t_last, step + 1 - s_last
    metrics = dist.mean_over_ranks({k: float(v) for k, v in losses.items()}, run.device)
    metrics.update(lr=now["lr"], wd=now["wd"], mom=now["momentum"], teacher_temp=now["teacher_temp"],
                   grad_norm=float(t.grad_norm), img_s=round(n * run.global_batch / dt, 2), s_per_step=round(dt / n, 4),
                   num_broken=run.loader.broken.sync(), nonfinite_skips=t.progress.nonfinite_skips,
                   **_memory(run.device))
    if knn_due:
        metrics.update(_knn(t.meta, t.cfg, run.device))
        run.logger.info(f"step {step + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()
                                                         if k.startswith("knn_")))
    run.logger.log(step + 1, metrics)
    warning = run.collapse.update(step + 1, metrics["dino_target_entropy"])
    if warning:
        run.logger.info(f"WARNING step {step + 1}: {warning}")
    run.since = (time.perf_counter(), step + 1)


def _save_or_stop(run: Run, step: int, signals: SignalFlag) -> bool:
    """Save after `step` every checkpoint.period_steps, at the end, and when any rank received a preemption
    signal; True: stop now (preempted)."""
    stop = dist.any_rank(signals.received is not None, run.device)
    if stop or (step + 1) % run.trainee.cfg.checkpoint.period_steps == 0 or step + 1 == run.steps:
        run.checkpointer.save(step + 1, run.trainee.state(), config_yaml=to_yaml(run.trainee.cfg))
    if stop:
        run.logger.info(f"signal received: saved step {step + 1}, exiting to be resumed")
    return stop


def _build_meta(cfg: DictConfig) -> SSLMetaArch:
    """The run's model: SSLMetaArch, or with distill.enabled the students of a frozen teacher."""
    if cfg.distill.enabled:
        from dinospec.ssl.distill import DistillMetaArch

        meta = DistillMetaArch(cfg)
        log.info("distillation teacher: %s", meta.teacher_source)
        return meta
    return SSLMetaArch(cfg)


def _load_pretrained(meta: SSLMetaArch, cfg: DictConfig) -> None:
    """student.pretrained_weights (and a distillation student's own) into the student and EMA teacher backbones."""
    from dinospec.config import distill_members

    for k, (student, _) in enumerate(distill_members(cfg)):
        if student.pretrained_weights:
            from dinospec.weights import load_pretrained_backbone

            for part in (meta.student, meta.teacher):
                load_pretrained_backbone(part.members()[k].backbone, student.pretrained_weights)


def _build_optimizer(meta: SSLMetaArch, cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the student's parameters; each further student of a distillation run adds its groups with its own
    depth's layer-wise lr decay."""
    from dinospec.config import distill_members
    from dinospec.models.vit import arch_kwargs
    from dinospec.ssl.optim import param_groups

    members = meta.student.members()
    optimizer = build_optimizer(members[0], cfg)
    o = cfg.optim
    for member, (student, _) in zip(members[1:], distill_members(cfg)[1:]):
        for group in param_groups(member, o.layerwise_decay, o.patch_embed_lr_mult, arch_kwargs(student)["depth"]):
            optimizer.add_param_group(group)
    return optimizer


def _clip(meta: SSLMetaArch, max_norm: float) -> float:
    """Clip each part of every student on its own (backbone, heads), as DINOv2; return the largest norm."""
    norms = []
    for part in meta.student.clip_parts():
        params = [p for p in part.parameters() if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
            norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    return max(norms, default=0.0)


def _memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"max_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    import resource

    return {"max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}

