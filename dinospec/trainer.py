"""The training loop, readable top to bottom: `dinospec train --config X [overrides]`.

    dinospec train --config configs/demo.yaml                                  # one process (CPU or GPU)
    torchrun --nproc_per_node=8 -m dinospec.cli train model=vit_large spec=paper data.path=/data/imagenet/train
    dinospec submit --nodes 4 --gpus-per-node 8 model=vit_large spec=paper ... # SLURM (dinospec/launch.py)

A run directory holds config.yaml, metrics.jsonl, checkpoints/ and plots/. Training resumes from the latest good
checkpoint of its run directory by default; a preemption signal (SIGTERM, SIGUSR1, SIGUSR2) finishes the current
step, saves and returns status "preempted" (`dinospec train` then exits with dinospec.cli.EXIT_PREEMPTED).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from dinospec import dist
from dinospec.checkpoint import Checkpointer
from dinospec.config import ConfigError, flat_keys, to_yaml
from dinospec.data.loader import build_ssl_loader
from dinospec.metrics import MetricsLogger, plot_losses
from dinospec.rng import capture_rng, restore_rng, seed_all
from dinospec.run_lease import hold_run_dir
from dinospec.ssl.meta_arch import SSLMetaArch
from dinospec.ssl.diagnostics import CollapseDetector
from dinospec.ssl.gram_teacher import GramAnchor
from dinospec.ssl.optim import apply_schedules, build_optimizer
from dinospec.ssl.schedules import build_schedules, momentum_for_run, teacher_init_share

log = logging.getLogger("dinospec")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# keys whose change makes a checkpoint unusable (the model or its heads would not match)
INCOMPATIBLE_KEYS = ("student", "spec", "dino.head_", "ibot.head_", "ibot.separate_head", "crops.global_crops_size",
                     "distill.enabled", "distill.students")


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or inf (train.nonfinite=stop, or too many skipped steps)."""


@dataclass
class TrainOutcome:
    status: str  # "finished" | "preempted"
    step: int
    run_dir: Path


class ModelState(Stateful):
    """Student, teacher and loss centres as DCP state: full FQNs, sharded or not. Keys under the model's
    `unsaved_prefixes` (a distillation teacher, read again from its source) are left out, and only they may be
    missing when loading."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.unsaved = tuple(getattr(model, "unsaved_prefixes", ()))

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        return {k: v for k, v in state.items() if not k.startswith(self.unsaved)} if self.unsaved else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.unsaved:
            set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))
            return
        result = set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=False))
        wrong = [k for k in result.missing_keys if not k.startswith(self.unsaved)] + list(result.unexpected_keys)
        if wrong:
            raise RuntimeError(f"checkpoint and model differ in {len(wrong)} key(s), e.g. {sorted(wrong)[:4]}")


class OptimState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        fresh = not self.optimizer.state  # no step taken yet (every step so far skipped as non-finite)
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if fresh:  # torch made that state with a zero-lr step that counts: save, and keep, "no step taken"
            self.optimizer.state.clear()
            for per_param in state["state"].values():
                if "step" in per_param:
                    per_param["step"] = torch.zeros_like(per_param["step"])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class Progress(Stateful):
    """Step, skip count and every rank's RNG: what makes a resumed run continue the same run. The data position is
    not held here: the loader is rebuilt at `step` (build_ssl_loader(start_step=...))."""

    def __init__(self, device: torch.device):
        self.step = 0
        self.nonfinite_skips = 0
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng()
        out: dict[str, Any] = {"step": torch.tensor(self.step), "nonfinite_skips": torch.tensor(self.nonfinite_skips),
                               "world_size": torch.tensor(dist.world_size())}
        for key, value in rng.items():  # every rank's state in one replicated (W, ...) tensor
            out[f"rng.{key}"] = _gather(value)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.nonfinite_skips = int(state_dict["nonfinite_skips"])
        if int(state_dict["world_size"]) == dist.world_size():
            # clone: torch.set_rng_state segfaults on a view at a non-zero storage offset (rank >= 1's row)
            restore_rng({k[4:]: v[dist.rank()].clone() for k, v in state_dict.items() if k.startswith("rng.")})
        else:  # another number of ranks: a fresh, deterministic stream per rank (data order does not depend on it)
            log.warning("resuming on %d ranks from a %d-rank checkpoint: RNG streams reseeded",
                        dist.world_size(), int(state_dict["world_size"]))
            seed_all(1_000_003 * self.step + dist.rank())


def _gather(t: torch.Tensor) -> torch.Tensor:
    return dist.gather_stacked(t.cpu())  # CPU: the default group serves it through gloo beside NCCL on GPU


class SignalFlag:
    """Remembers a preemption signal; the loop checks it once per step (on every rank together)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "SignalFlag":
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def total_steps(cfg: DictConfig) -> int:
    return cfg.train.max_steps if cfg.train.max_steps is not None else cfg.optim.epochs * cfg.train.official_epoch_length


def check_compatible(saved_yaml: str, cfg: DictConfig) -> list[str]:
    """Raise ConfigError when the saved run's model differs; return the compatible keys that changed."""
    saved = OmegaConf.create(saved_yaml)
    old, new = flat_keys(OmegaConf.to_container(saved)), flat_keys(OmegaConf.to_container(cfg))
    old = {"distill.enabled": False, "distill.students": [], **old}  # runs saved before distillation existed
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    bad = [k for k in changed if k.startswith(INCOMPATIBLE_KEYS)]
    if bad:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad[:6])
        raise ConfigError(f"the checkpoint was written by an incompatible config ({detail}); "
                          f"use another train.output_dir or --no-resume with a new directory")
    return changed


def _num_threads(cfg: DictConfig) -> int:
    if cfg.compute.num_threads is not None:
        return max(1, cfg.compute.num_threads)
    if "OMP_NUM_THREADS" in os.environ:  # set by the user, torchrun or SLURM job scripts: respect it
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
    return max(1, (os.cpu_count() or 1) // max(1, ranks_here) - cfg.data.num_workers)


def _precision(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.compute.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def _blocks(part: torch.nn.Module) -> list[torch.nn.Module]:
    """The backbone blocks of every student a student (or EMA teacher) module holds."""
    return [block for member in part.members() for block in member.backbone.blocks]


def _wrap(meta: SSLMetaArch, cfg: DictConfig, strategy: str, device: torch.device,
          dtype: torch.dtype | None) -> Any:
    """Apply compile and parallelism from outside the model (torchtitan's order); return the student's forward.
    A distillation teacher stays a plain replicated module (compiled with the rest)."""
    frozen = getattr(meta, "distill_teacher", None)
    if cfg.compute.compile:
        for part in (meta.student, meta.teacher):
            for block in _blocks(part):
                block.compile()
        for block in frozen.backbone.blocks if frozen is not None else ():
            block.compile()
    if strategy == "fsdp":
        for part in (meta.student, meta.teacher):
            dist.shard_fsdp2(part, _blocks(part), mixed_precision=dtype is not None)
        if frozen is not None:  # FSDP2 casts the students only; autocast casts the teacher's forward alike
            meta.autocast_dtype = dtype
        return meta.student
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(meta.student, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    return meta.student


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
        outcome = _train(cfg, resume, env, device, run_dir)
        return outcome
    finally:
        if lease is not None:  # a preempted run keeps it for its requeue (or its next start) to take over
            lease.release(keep=outcome is not None and outcome.status == "preempted")


def _train(cfg: DictConfig, resume: str, env: dist.DistEnv, device: torch.device, run_dir: Path) -> TrainOutcome:
    torch.set_num_threads(_num_threads(cfg))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    checkpointer = Checkpointer(run_dir, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
                                async_save=cfg.checkpoint.async_save)
    has_checkpoint = checkpointer.latest_step() is not None
    if resume == "never" and has_checkpoint:
        raise ConfigError(f"{run_dir} already holds checkpoints and --no-resume was given; "
                          f"choose another train.output_dir (nothing is overwritten)")
    saved_gram = False  # whether the checkpoint resumed from holds a Gram teacher
    resuming = resume not in ("auto", "never") or (resume == "auto" and has_checkpoint)
    if resuming:
        saved_yaml = checkpointer.read_config(None if resume == "auto" else resume)
        saved_gram = bool(OmegaConf.select(OmegaConf.create(saved_yaml), "gram.enabled", default=False))
        changed = check_compatible(saved_yaml, cfg)
        if changed and env.is_main:
            log.warning("resuming with changed config keys: %s", ", ".join(changed))

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (the teacher is never broadcast)
    meta = _build_meta(cfg).to(device)
    seed_all(cfg.train.seed + 1 + env.rank)  # then one stream per rank (drop-path; python and numpy too)
    _load_pretrained(meta, cfg)
    if cfg.train.init_from and not resuming:  # a new phase of another run (its own checkpoints win once it has any)
        from dinospec.phase import init_from_run

        init_from_run(meta, cfg, cfg.train.init_from)
    # a frozen copy of the teacher backbone, taken at gram.start_step; replicated, never sharded or wrapped
    gram = GramAnchor(cfg, meta.teacher.backbone).to(device) if cfg.gram.enabled else None
    dtype = _precision(cfg, device)
    strategy = dist.resolve_strategy(cfg.compute.strategy, device)
    student_forward = _wrap(meta, cfg, strategy, device, dtype)
    optimizer = _build_optimizer(meta, cfg)
    progress = Progress(device)
    state = {"model": ModelState(meta), "optim": OptimState(meta.student, optimizer), "train": progress}
    if gram is not None:
        state["gram"] = gram  # its weights are run state: frozen since their step, not recomputable
    if resume != "never":  # a checkpoint from before Gram anchoring was on has no Gram teacher: it is taken anew
        loadable = state if saved_gram else {k: v for k, v in state.items() if k != "gram"}
        checkpointer.load(loadable, path=None if resume == "auto" else resume)
    if hasattr(meta, "check_teacher_unchanged"):
        meta.check_teacher_unchanged()
    start = progress.step
    steps = total_steps(cfg)
    global_batch = cfg.train.batch_size_per_gpu * env.world_size
    sched = build_schedules(cfg, None, global_batch)  # schedules span optim.epochs; max_steps may stop sooner

    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    logger = MetricsLogger(run_dir, env.is_main, steps, start, cfg.logging.progress, cfg.logging.wandb,
                           OmegaConf.to_container(cfg, resolve=True))
    logger.info(f"dinospec: {env.world_size} rank(s) on {device}, {sum(p.numel() for p in meta.student.parameters()):,} "
                f"student params, steps {start} -> {steps}, global batch {global_batch}, run {run_dir}")
    share = teacher_init_share(sched.momentum, steps)
    if share > 0.05 and start == 0:
        logger.info(f"WARNING: with teacher.momentum_teacher {cfg.teacher.momentum_teacher} the EMA teacher still "
                    f"holds {share:.0%} of its random init at the last step ({steps}): its targets will say little "
                    f"about the images. For a run this short use teacher.momentum_teacher <= "
                    f"{momentum_for_run(steps):.4f} (or a longer run).")
    loader = build_ssl_loader(cfg, env.rank, env.world_size, start_step=start)
    batches = _batches(loader, device)
    signals = SignalFlag().install()
    status, step = "finished", start
    # FSDP2 casts through its MixedPrecisionPolicy; otherwise autocast does (bf16 on GPU by default)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None and strategy != "fsdp" \
        else nullcontext()
    grad_norm = 0.0
    knn_period = cfg.evaluation.knn_period_steps
    collapse = CollapseDetector(cfg.dino.head_n_prototypes, cfg.logging.collapse_patience_steps)
    try:
        t_last, n_since = time.perf_counter(), 0
        for step in range(start, steps):
            batch = next(batches)
            now = sched.at(step)
            lr, wd, last_lr = now["lr"], now["wd"], now["last_layer_lr"]
            momentum, teacher_temp = now["momentum"], now["teacher_temp"]
            apply_schedules(optimizer, lr, wd, last_lr)
            optimizer.zero_grad(set_to_none=True)
            if gram is not None and gram.due(step):
                gram.refresh(meta.teacher.backbone, step)
                logger.info(f"step {step}: Gram teacher taken from the EMA teacher")
            with autocast:
                losses = meta.losses(batch, teacher_temp, student_forward, gram)
            loss = losses["loss"]
            if dist.any_rank(not bool(torch.isfinite(loss)), device):
                progress.nonfinite_skips += 1
                values = {k: float(v.detach()) for k, v in losses.items()}
                if cfg.train.nonfinite == "stop" or progress.nonfinite_skips > cfg.train.max_nonfinite_skips:
                    raise NonFiniteLoss(f"non-finite loss at step {step}: {values} "
                                        f"({progress.nonfinite_skips} non-finite step(s) so far)")
                logger.info(f"step {step}: non-finite loss {values}, step skipped "
                            f"({progress.nonfinite_skips}/{cfg.train.max_nonfinite_skips})")
                loss.backward()  # keeps DDP's gradient hooks in step on every rank; the gradients are dropped
                optimizer.zero_grad(set_to_none=True)
            else:
                loss.backward()
                grad_norm = _clip(meta, cfg.optim.clip_grad)
                optimizer.step()
                meta.update_teacher(momentum)
            progress.step = step + 1
            n_since += 1
            logger.advance()
            # k-NN every knn_period steps, at the end, and after the first step (the baseline of a fresh run)
            knn_due = bool(knn_period) and ((step + 1) % knn_period == 0 or step + 1 == steps or step == 0)
            if (step + 1) % cfg.train.log_every == 0 or step == start or step + 1 == steps or knn_due:
                dt = time.perf_counter() - t_last
                metrics = dist.mean_over_ranks({k: float(v.detach()) for k, v in losses.items()}, device)
                metrics.update(lr=lr, wd=wd, mom=momentum, teacher_temp=teacher_temp, grad_norm=float(grad_norm),
                               img_s=round(n_since * global_batch / dt, 2), s_per_step=round(dt / n_since, 4),
                               num_broken=loader.broken.sync(), nonfinite_skips=progress.nonfinite_skips,
                               **_memory(device))
                if knn_due:
                    metrics.update(_knn(meta, cfg, device))
                    logger.info(f"step {step + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()
                                                                   if k.startswith("knn_")))
                logger.log(step + 1, metrics)
                warning = collapse.update(step + 1, metrics["dino_target_entropy"])
                if warning:
                    logger.info(f"WARNING step {step + 1}: {warning}")
                t_last, n_since = time.perf_counter(), 0
            stop = dist.any_rank(signals.received is not None, device)
            if stop or (step + 1) % cfg.checkpoint.period_steps == 0 or step + 1 == steps:
                checkpointer.save(step + 1, state, config_yaml=to_yaml(cfg))
            if stop:
                logger.info(f"signal received: saved step {step + 1}, exiting to be resumed")
                status = "preempted"
                break
        checkpointer.wait()
    finally:
        signals.restore()
        logger.close()
    if env.is_main and cfg.logging.plots and (run_dir / "metrics.jsonl").exists():
        plot_losses(run_dir / "metrics.jsonl", run_dir / "plots" / "losses.png")
    return TrainOutcome(status, progress.step, run_dir)


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

