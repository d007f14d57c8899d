"""Shared test helpers: where real images are, and a tiny-but-complete training config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """Test tensors are tiny: with 2 intra-op threads each op waits on a thread barrier, and on a busy 2-core CI
    machine that wait dominates (minutes instead of seconds). One thread computes the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photos_dir() -> Path:
    """Real unlabeled photos: the repo's bundled set, else the shared one."""
    for candidate in (REPO / "data" / "eval" / "photos", SHARED_DATA / "photos"):
        if candidate.is_dir() and any(candidate.glob("*.jpg")):
            return candidate
    pytest.skip("no real photos found (data/eval/photos or ../shared/data/photos)")


def knn_overrides(period: int) -> dict[str, object]:
    """Periodic k-NN of the teacher on the repository's bundled Fashion-MNIST subset (300 train / 100 val)."""
    root = REPO / "data" / "eval" / "fashion_mnist"
    return {"evaluation.knn_period_steps": period, "evaluation.knn_train": str(root / "train"),
            "evaluation.knn_val": str(root / "val")}


def tiny_overrides(run_dir: Path, data_dir: Path, **extra: object) -> list[str]:
    """A 3-block 32-wide ViT with the paper spec, 32 px global crops, 2 local crops, small heads, no workers."""
    base = {
        "student.arch": "vit_pico", "student.embed_dim": 32, "student.depth": 3, "student.num_heads": 2,
        "student.patch_size": 8, "student.drop_path_rate": 0.0, "student.num_register_tokens": 1,
        "spec.norm1": "all", "spec.norm2": "all", "spec.ls1": "all", "spec.ls2": "all", "spec.qkv": "first_third",
        "crops.global_crops_size": 32, "crops.local_crops_size": 16, "crops.local_crops_number": 2,
        "dino.head_n_prototypes": 128, "dino.head_hidden_dim": 64, "dino.head_bottleneck_dim": 32,
        "ibot.head_n_prototypes": 128, "ibot.head_hidden_dim": 64, "ibot.head_bottleneck_dim": 32,
        "teacher.warmup_teacher_temp_epochs": 1, "optim.epochs": 4, "optim.warmup_epochs": 1,
        "optim.scaling_rule": "none", "optim.base_lr": 0.002, "optim.freeze_last_layer_epochs": 0,
        "train.official_epoch_length": 5, "train.batch_size_per_gpu": 8, "train.log_every": 1,
        "data.num_workers": 0, "data.pin_memory": False, "data.path": str(data_dir),
        "train.output_dir": str(run_dir), "logging.progress": False, "logging.plots": False,
        "checkpoint.period_steps": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m dinospec.cli ARGS` in a fresh process with one thread (deterministic, no oversubscription)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "dinospec.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dinospec {' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N -m dinospec.cli ARGS` on gloo, one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dinospec.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc
