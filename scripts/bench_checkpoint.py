"""How long a checkpoint of a vit_small-sized training state stalls training: synchronous save vs the part of an
asynchronous save that blocks (staging to CPU memory, checks), measured in the same run on the same disk.

    .venv/bin/python scripts/bench_checkpoint.py [--model vit_small] [--repeats 3] [--dir /path/on/target/disk]

State: the backbone from dinospec's config (default: vit_small, ~22M parameters) and AdamW after one step (two
moments per parameter), saved by dinospec.checkpoint.Checkpointer in one process (no process group).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict

from dinospec.checkpoint import Checkpointer
from dinospec.config import load_config
from dinospec.models.vit import build_backbone


def training_state(model_preset: str) -> tuple[dict, int]:
    cfg = load_config([], [f"model={model_preset}"])
    model = build_backbone(cfg.student, cfg.spec, cfg.crops.global_crops_size)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optim.step()
    msd, osd = get_state_dict(model, optim)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model": msd, "optim": osd, "train": {"step": 1}}, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = ap.parse_args()

    state, n_params = training_state(args.model)
    n_bytes = sum(t.numel() * t.element_size() for t in _tensors(state))
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, state {n_bytes / 2**20:.0f} MiB (model + AdamW)")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sync_ckpt = Checkpointer(Path(tmp) / "sync", keep_last=1)
        async_ckpt = Checkpointer(Path(tmp) / "async", keep_last=1, async_save=True)
        sync_s, stall_s, publish_s = [], [], []
        for step in range(1, args.repeats + 1):
            t0 = time.perf_counter()
            sync_ckpt.save(step, state)
            sync_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            async_ckpt.save(step, state)
            stall_s.append(time.perf_counter() - t0)
            async_ckpt.wait()
            publish_s.append(time.perf_counter() - t0)
        async_ckpt.close()

    sync, stall, publish = (statistics.median(v) for v in (sync_s, stall_s, publish_s))
    print(f"sync save (write + fsync + sha256 manifest + publish): {sync:.2f} s  (runs: "
          f"{', '.join(f'{v:.2f}' for v in sync_s)})")
    print(f"async save, training stalled for:                      {stall:.2f} s  (runs: "
          f"{', '.join(f'{v:.2f}' for v in stall_s)})")
    print(f"async save, until published (background):              {publish:.2f} s")
    print(f"ratio async stall / sync save: {stall / sync:.3f}")


def _tensors(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


if __name__ == "__main__":
    main()
