"""One code path for a single process, torchrun and SLURM tasks: environment -> process group -> collectives.

Rank, world size and rendezvous come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or,
when those are absent, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST). Without a
MASTER_PORT, rank 0 binds a free port and publishes it in a file of the run directory (no two jobs on a node can
pick the same port). The default group serves CPU tensors through gloo beside NCCL on GPU ("cpu:gloo,cuda:nccl"),
and dinospec's own collectives check that their group serves every tensor's device (CollectiveDeviceError).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int  # 0: not given; rank 0 picks a free one and publishes it (init_distributed's rendezvous_file)
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


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    port = int(env.get("MASTER_PORT", 0))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        hosts = _slurm_hosts(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", hosts[0]), port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def backend_for(use_cuda: bool) -> str:
    """NCCL serves CUDA tensors only, and some state is CPU-resident by nature (RNG states, object collectives):
    on GPU the default group gets gloo for CPU tensors beside NCCL, so no collective lands on a backend that
    cannot serve its tensors (issue #12: Progress.state_dict all-gathered CPU RNG states on NCCL)."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def served_devices(backend_config: str) -> set[str]:
    """Device types a backend config serves: "cpu:gloo,cuda:nccl" -> {cpu, cuda}; a bare "nccl" -> {cuda}."""
    if ":" not in backend_config:
        return {"cuda"} if backend_config == "nccl" else {"cpu", "cuda"}
    return {item.split(":", 1)[0].strip() for item in backend_config.split(",")}


def _file_rendezvous(env: DistEnv, path: Path, timeout: timedelta) -> dist.TCPStore:
    """Rank 0 opens the store on a free port (the kernel picks it, so no other job on the node has it) and
    publishes the port in `path` (a file in the run directory, which every task sees); the others wait for it.
    Once all have joined, rank 0 removes the file."""
    if env.rank == 0:
        store = dist.TCPStore(env.master_addr, 0, env.world_size, True,
                              timeout=timeout, wait_for_workers=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{env.master_addr}:{store.port}\n")
        os.replace(tmp, path)
        store.wait([f"joined_{r}" for r in range(1, env.world_size)])
        path.unlink(missing_ok=True)
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {env.rank}: no rendezvous file {path} from rank 0 after {timeout}")
        time.sleep(0.05)
    host, port = path.read_text().strip().rsplit(":", 1)
    store = dist.TCPStore(host, int(port), env.world_size, False, timeout=timeout)
    store.set(f"joined_{env.rank}", "1")
    return store


def init_distributed(device: str = "auto", timeout_s: int = 1800,
                     rendezvous_file: Path | None = None) -> tuple[DistEnv, torch.device]:
    """Read the environment, pick the device, start the process group when there are several ranks.

    rendezvous_file: where rank 0 publishes its port when MASTER_PORT is not set (a path all tasks see, unique to
    this job run). Without it, MASTER_PORT is required."""
    env = read_env()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        dev = torch.device("cuda", env.local_rank)
    else:
        dev = torch.device("cpu")
    if env.world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        kwargs: dict[str, Any] = {}
        if env.master_port:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
        elif rendezvous_file is not None:
            kwargs["store"] = _file_rendezvous(env, Path(rendezvous_file), timeout)
        else:
            raise RuntimeError(f"{env.world_size} {env.source} ranks but no MASTER_PORT: set it, or start through "
                               f"`dinospec train` / `dinospec submit`, which agree on a free port")
        dist.init_process_group(
            backend=backend_for(use_cuda), rank=env.rank, world_size=env.world_size,
            timeout=timeout, device_id=dev if use_cuda else None, **kwargs,
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


class CollectiveDeviceError(RuntimeError):
    """A collective was given a tensor on a device its group's backend does not serve (CPU tensors on NCCL)."""


def check_devices(op: str, tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Raise CollectiveDeviceError unless `group` (default: the default group) serves every tensor's device.

    Every dinospec collective on tensors calls this first: a mistake that would only fail (or hang) on a GPU
    cluster fails the same way on a CPU test (tests/test_edges.py runs it on a group that serves CUDA only)."""
    served = served_devices(dist.get_backend_config(group))
    bad = sorted({t.device.type for t in tensors} - served)
    if bad:
        raise CollectiveDeviceError(f"{op}: tensor on {', '.join(bad)} but the group's backend "
                                    f"({dist.get_backend_config(group)}) serves {', '.join(sorted(served))} only")


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
               group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.all_reduce, in place, once check_devices passed."""
    check_devices("all_reduce", [t], group)
    dist.all_reduce(t, op=op, group=group)


def all_gather(parts: list[torch.Tensor], t: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """torch.distributed.all_gather into `parts`, once check_devices passed."""
    check_devices("all_gather", [t, *parts], group)
    dist.all_gather(parts, t, group=group)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (keeps ranks in lock-step on signals and NaNs)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    check_devices("any_rank all_reduce", [t])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over ranks (for logging the global-batch loss, not rank 0's share)."""
    if not dist.is_initialized() or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    check_devices("mean_over_ranks all_reduce", [t])
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def gather_stacked(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked into one (W, ...) tensor on every rank, on t's device (one process: (1, ...))."""
    if not dist.is_initialized():
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    check_devices("gather_stacked all_gather", [t, *parts])
    dist.all_gather(parts, t)
    return torch.stack(parts)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank (one process: obj itself)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

