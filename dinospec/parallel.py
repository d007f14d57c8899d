"""How a run computes, decided in one place and applied from outside the model (torchtitan's order): intra-op
threads, precision (autocast, or FSDP2's MixedPrecisionPolicy), torch.compile of the blocks, FSDP2 or DDP."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn

from dinospec.dist import world_size


@dataclass
class Parallel:
    """The applied choices: what runs the student's forward (the DDP wrapper or the student itself) and the cast
    around each forward (nullcontext where FSDP2 casts, or in fp32)."""

    student_forward: Callable[..., Any]
    autocast: AbstractContextManager
    strategy: str  # "none" | "ddp" | "fsdp"
    dtype: torch.dtype | None


def configure_process(cfg: DictConfig) -> None:
    """Threads and determinism, before anything is built."""
    torch.set_num_threads(num_threads(cfg))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def num_threads(cfg: DictConfig) -> int:
    if cfg.compute.num_threads is not None:
        return max(1, cfg.compute.num_threads)
    if "OMP_NUM_THREADS" in os.environ:  # set by the user, torchrun or SLURM job scripts: respect it
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
    return max(1, (os.cpu_count() or 1) // max(1, ranks_here) - cfg.data.num_workers)


def precision(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.compute.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def resolve_strategy(strategy: str, device: torch.device) -> str:
    """auto: FSDP2 on GPU with several ranks, DDP on CPU with several ranks, a plain module alone."""
    if strategy != "auto":
        return strategy if world_size() > 1 or strategy == "none" else "none"
    if world_size() == 1:
        return "none"
    return "fsdp" if device.type == "cuda" else "ddp"


def shard_fsdp2(module: nn.Module, blocks: list[nn.Module], mixed_precision: bool) -> None:
    """FSDP2 in place: each block a unit, then the root (torchtitan's order); bf16 params, fp32 reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)


def _blocks(part: nn.Module) -> list[nn.Module]:
    """The backbone blocks of every student a student (or EMA teacher) module holds."""
    return [block for member in part.members() for block in member.backbone.blocks]


def wrap(meta: Any, cfg: DictConfig, strategy: str, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Compile, then shard (FSDP2) or wrap (DDP) the student and EMA teacher; return the student's forward.
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
            shard_fsdp2(part, _blocks(part), mixed_precision=dtype is not None)
        if frozen is not None:  # FSDP2 casts the students only; autocast casts the teacher's forward alike
            meta.autocast_dtype = dtype
        return meta.student
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(meta.student, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    return meta.student


def parallelize(meta: Any, cfg: DictConfig, device: torch.device) -> Parallel:
    """compute.precision / strategy / compile applied to a built (and loaded) SSLMetaArch."""
    dtype, strategy = precision(cfg, device), resolve_strategy(cfg.compute.strategy, device)
    forward = wrap(meta, cfg, strategy, device, dtype)
    # FSDP2 casts through its MixedPrecisionPolicy; otherwise autocast does (bf16 on GPU by default)
    cast = torch.autocast(device.type, dtype=dtype) if dtype is not None and strategy != "fsdp" else nullcontext()
    return Parallel(forward, cast, strategy, dtype)
