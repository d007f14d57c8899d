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
    """What runs the student's forward (the DDP wrapper or the student) and the cast around every forward."""

    student_forward: Callable[..., Any]
    autocast: AbstractContextManager  # nullcontext where FSDP2 casts, or in fp32


def configure_process(cfg: DictConfig) -> None:
    """Intra-op threads (compute.num_threads, else OMP_NUM_THREADS as the user, torchrun or a SLURM script set it,
    else this node's cores per rank less the data workers) and determinism, before anything is built."""
    threads = cfg.compute.num_threads
    if threads is None and "OMP_NUM_THREADS" in os.environ:
        threads = int(os.environ["OMP_NUM_THREADS"])
    elif threads is None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])
        threads = (os.cpu_count() or 1) // max(1, ranks_here) - cfg.data.num_workers
    torch.set_num_threads(max(1, threads))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_strategy(strategy: str, device: torch.device) -> str:
    """auto: FSDP2 on GPU with several ranks, DDP on CPU with several ranks; a plain module alone. An explicit
    fsdp / ddp is kept on one rank when a process group is up (a one-GPU check of FSDP2's numerics); with no
    group there is nothing to shard over: a plain module."""
    alone = world_size() == 1
    if strategy == "none" or (alone and (strategy == "auto" or not torch.distributed.is_initialized())):
        return "none"
    return strategy if strategy != "auto" else "fsdp" if device.type == "cuda" else "ddp"


def _blocks(part: nn.Module) -> list[nn.Module]:
    """The backbone blocks of every student a student (or EMA teacher) module holds."""
    return [block for member in part.members() for block in member.backbone.blocks]


def wrap(meta: Any, cfg: DictConfig, strategy: str, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Compile, then FSDP2 (each block a unit, then the root; bf16 params, fp32 reductions) or DDP for the
    student and EMA teacher; return the student's forward. A distillation teacher stays a plain replicated module
    (compiled with the rest)."""
    frozen = getattr(meta, "distill_teacher", None)  # a module, never falsy
    if cfg.compute.compile:
        for block in [*_blocks(meta.student), *_blocks(meta.teacher), *(frozen.backbone.blocks if frozen else ())]:
            block.compile()
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} \
            if dtype is not None else {}
        for part in (meta.student, meta.teacher):
            for unit in [*_blocks(part), part]:
                fully_shard(unit, **mp)
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
    p = cfg.compute.precision if cfg.compute.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
    dtype, strategy = torch.bfloat16 if p == "bf16" else None, resolve_strategy(cfg.compute.strategy, device)
    # FSDP2 casts through its MixedPrecisionPolicy; otherwise autocast does (bf16 on GPU by default)
    cast = torch.autocast(device.type, dtype=dtype) if dtype is not None and strategy != "fsdp" else nullcontext()
    return Parallel(wrap(meta, cfg, strategy, device, dtype), cast)
