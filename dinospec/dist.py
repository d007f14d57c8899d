"""One code path for a single process, torchrun and SLURM tasks: environment -> process group -> wrapped model.

Rank, world size and rendezvous come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or,
when those are absent, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID).
The backend is nccl on GPU and gloo on CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "single" | "torchrun" | "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list -> host names: 'gpu[01-03,07],cpu5' -> [gpu01, gpu02, gpu03, gpu07, cpu5].

    Handles zero padding and several bracket groups per name (e.g. 'rack[1-2]-n[01-02]').
    """
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]+(?:\[[^\]]*\])?)+", nodelist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            choices = [literal]
            if ranges:
                choices = []
                for part in ranges.split(","):
                    if "-" in part:
                        lo, hi = part.split("-", 1)
                        width = len(lo)
                        choices += [f"{literal}{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
                    else:
                        choices.append(f"{literal}{part}")
            expanded = [e + c for e in expanded for c in choices]
        hosts += [h for h in expanded if h]
    return hosts


def _slurm_hosts(nodelist: str) -> list[str]:
    """Prefer `scontrol show hostnames` (SLURM's own parser); fall back to ours where it is not installed."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def slurm_port(job_id: str) -> int:
    """A rendezvous port derived from the job id, so all tasks of a job agree without talking (and jobs differ)."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        hosts = _slurm_hosts(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", hosts[0]),
                       int(env.get("MASTER_PORT", slurm_port(env.get("SLURM_JOB_ID", "0")))), "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> tuple[DistEnv, torch.device]:
    """Read the environment, pick the device, start the process group when there are several ranks."""
    env = read_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        dev = torch.device("cuda", env.local_rank)
    else:
        dev = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s), device_id=dev if use_cuda else None,
        )
    return env, dev


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (keeps ranks in lock-step on signals and NaNs)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (for logging the global-batch loss, not rank 0's share)."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def resolve_strategy(strategy: str, device: torch.device) -> str:
    """auto: FSDP2 on GPU with several ranks, DDP on CPU with several ranks, a plain module alone."""
    if strategy != "auto":
        return strategy if world_size() > 1 or strategy == "none" else "none"
    if world_size() == 1:
        return "none"
    return "fsdp" if device.type == "cuda" else "ddp"


def shard_fsdp2(module: nn.Module, blocks: nn.ModuleList, mixed_precision: bool) -> None:
    """FSDP2 in place: each block a unit, then the root (torchtitan's order); bf16 params, fp32 reductions."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
