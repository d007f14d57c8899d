"""`dinospec index DATA`: build the shard index of a directory of tar shards ahead of a run.

    dinospec index /data/lvd142m/shards --workers 16     # once; every rank and job then starts from the index
    dinospec index /data/lvd142m/shards --force          # after adding, removing or rewriting shards
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="a directory of .tar shards (or one shard / a glob in it: its directory is indexed)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="indexing processes")
    p.add_argument("--force", action="store_true", help="rebuild an existing index")


def run(args: argparse.Namespace) -> int:
    from dinospec.data.shard_index import INDEX_DIRNAME, ShardIndexError, build_index

    root = Path(args.data)
    if not root.is_dir():
        if not (glob.has_magic(args.data) or root.is_file()):
            print(f"dinospec index: {args.data}: no such file or directory", file=sys.stderr)
            return 2
        root = root.parent  # one shard or a glob: its directory is indexed
    start = time.perf_counter()
    try:
        index = build_index(root, workers=max(1, args.workers), force=args.force)
    except (ShardIndexError, FileNotFoundError, PermissionError) as e:
        print(f"dinospec index: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in (root / INDEX_DIRNAME).iterdir())
    labels = f"{index.num_classes} classes" if index.labelled else "unlabeled"
    print(f"{root}: {index.num_samples:,} samples in {len(index.shards):,} shards ({labels}); index "
          f"{root / INDEX_DIRNAME} ({size / 2**20:.1f} MiB), {time.perf_counter() - start:.1f} s")
    return 0
