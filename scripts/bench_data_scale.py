"""Data at scale: index build, start-up, memory and read throughput of tar shards, today's reader vs the index.

Generates a synthetic webdataset shard set in --out (a temporary dir; deleted at the end unless --keep): --samples
real-encoded 32x32 images (half JPEG, half PNG) with a .cls label each, --shard-size samples per shard. Fast
generation: --distinct images are encoded once with PIL; every sample writes one of them followed by 8 bytes of its
own id after the image's end marker (decoders stop at the marker, so every file differs and still decodes), with
tar headers written directly.

Then, each measurement in a fresh process (so resident memory is its own):
  - index build (`build_index`, 1 process and --index-workers processes);
  - start-up to the first batch's sample ids, and resident memory above the imports: the reader before the index
    (`TarShardDataset`: every header of every shard read, a name string per sample, a randperm per pass) vs the
    index (`ShardIndex` + `ShardWindowOrder`), at --samples; the index path also at 142M and 1.7B samples, measured
    directly on synthetic shard tables (a row per shard of 10,000 samples: start-up never reads samples.bin);
  - read throughput (a whole sample: read + decode + small multi-crop + masks; read + decode; read alone) in one
    process, both readers on the same shards, alternating
    repetitions; ratio = median over repetitions of new / old;
  - what the shard_window order gives up: distinct shards per rank batch and per global batch vs a full shuffle.

    .venv/bin/python scripts/bench_data_scale.py --out /tmp/dsbench --samples 1000000 --shard-size 500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LVD_SHARD = 10_000  # samples per shard assumed for the 142M / 1.7B tables (LVD-style 10k-sample shards)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# generation


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def generate(out: Path, samples: int, shard_size: int, distinct: int) -> float:
    from PIL import Image

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    encoded = []
    for k in range(distinct):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        pixels[:, : 8 + k % 24] //= 2  # some structure, not only noise
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG" if k % 2 == 0 else "PNG", **({"quality": 90} if k % 2 == 0 else {}))
        encoded.append((buf.getvalue(), "jpg" if k % 2 == 0 else "png"))
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, (samples + shard_size - 1) // shard_size):
        parts = []
        for i in range(s * shard_size, min(samples, (s + 1) * shard_size)):
            data, ext = encoded[(i * 7919) % distinct]
            parts.append(_member(f"{i:09d}.{ext}", data + i.to_bytes(8, "little")))
            parts.append(_member(f"{i:09d}.cls", str(i % 1000).encode()))
        (out / f"shard-{s:06d}.tar").write_bytes(b"".join(parts) + b"\0" * 1024)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# measurements run in child processes


def child_index(root: str, workers: int) -> dict:
    from dinospec.data.shard_index import INDEX_DIRNAME, build_index

    shutil.rmtree(Path(root) / INDEX_DIRNAME, ignore_errors=True)
    start = time.perf_counter()
    index = build_index(root, workers=workers)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (Path(root) / INDEX_DIRNAME).iterdir())
    return {"seconds": seconds, "samples": index.num_samples, "shards": len(index.shards), "bytes": size}


def child_startup_old(root: str, batch: int) -> dict:
    from dinospec.data.datasets import TarShardDataset
    from dinospec.data.sampler import ShardedStreamSampler

    base = rss_mb()
    start = time.perf_counter()
    images = TarShardDataset(sorted(str(p) for p in Path(root).glob("*.tar")))
    indexed = time.perf_counter()
    ids = ShardedStreamSampler(len(images), batch, seed=0).ids(0, batch)  # draws the pass's randperm
    end = time.perf_counter()
    return {"seconds": end - start, "scan_seconds": indexed - start, "perm_seconds": end - indexed,
            "rss_mb": rss_mb() - base, "samples": len(images), "first": ids[0][1]}


def child_startup_new(root: str, batch: int, window: int) -> dict:
    from dinospec.data.order import ShardWindowOrder, SourceStream
    from dinospec.data.shard_index import ShardIndex

    base = rss_mb()
    start = time.perf_counter()
    index = ShardIndex.load(root)
    stream = SourceStream(ShardWindowOrder(index.counts, 0, window))
    _, first = stream.ids(np.arange(batch))
    _, deep = stream.ids(np.arange(batch) + index.num_samples - batch - 12345)  # far into the pass
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_mb": rss_mb() - base, "samples": index.num_samples,
            "shards": len(index.shards), "first": int(first[0]), "deep": int(deep[0])}


def synthetic_table(folder: Path, samples: int) -> None:
    """An index of ceil(samples / LVD_SHARD) shards (names like LVD's) without shards or samples.bin: what start-up
    reads, at that scale."""
    from dinospec.data.shard_index import FORMAT_VERSION, INDEX_DIRNAME, SHARD_FIELDS

    n = (samples + LVD_SHARD - 1) // LVD_SHARD
    counts = np.full(n, LVD_SHARD, dtype=np.int64)
    counts[-1] = samples - LVD_SHARD * (n - 1)
    shards = np.zeros(n, dtype=[("name", "S24"), *SHARD_FIELDS])
    shards["name"] = [f"shard-{s:08d}.tar".encode() for s in range(n)]
    shards["count"], shards["first"] = counts, np.concatenate([[0], np.cumsum(counts)[:-1]])
    shards["nbytes"] = counts * 110_000
    index = folder / INDEX_DIRNAME
    index.mkdir(parents=True, exist_ok=True)
    np.save(index / "shards.npy", shards)
    (index / "meta.json").write_text(json.dumps({"version": FORMAT_VERSION, "num_samples": samples,
                                                 "num_shards": n, "labelled": True, "num_classes": 1000}))


def _throughput_positions(n: int, count: int, seed: int) -> np.ndarray:
    start = np.random.default_rng(seed).integers(0, max(1, n - count))
    return np.arange(start, start + count)


def child_throughput(root: str, count: int, reps: int, batch: int, window: int) -> dict:
    """Read + decode (and read alone) `count` samples per repetition, old and new readers alternating."""
    from dinospec.data.augment import MultiCropAugmentation
    from dinospec.data.datasets import TarShardDataset
    from dinospec.data.loader import MultiCropSamples
    from dinospec.data.masking import SampleMasker
    from dinospec.data.order import FeistelOrder, RandpermOrder, ShardWindowOrder
    from dinospec.data.shard_index import ShardIndex
    from dinospec.data.shards import IndexedTarDataset

    old = TarShardDataset(sorted(str(p) for p in Path(root).glob("*.tar")))
    new = IndexedTarDataset(ShardIndex.load(root), max_open=32)
    n = len(new)
    randperm, window_order, feistel = RandpermOrder(n, 0), ShardWindowOrder(new.shard_counts, 0, window), \
        FeistelOrder(n, 0)

    augment = MultiCropAugmentation(32, local_crops_number=2, local_crops_size=16)
    masker = SampleMasker((4, 4), 0.5, (0.1, 0.5))
    old_samples, new_samples = MultiCropSamples(old, augment, masker, 0), MultiCropSamples(new, augment, masker, 0)

    def old_reads(positions: np.ndarray, decode: bool | str) -> None:  # today's loader: one sample at a time
        for i in randperm.indices(0, positions).tolist():
            if decode == "sample":
                old_samples[(0, i)]
            elif decode:
                old.load(i)
            else:
                old._handle(int(old._shard_of[i])).seek(int(old._offsets[i]))
                old._handles[int(old._shard_of[i])].read(int(old._sizes[i]))

    def new_reads(order, positions: np.ndarray, decode: bool) -> None:  # a batch at a time, in file order
        indices = order.indices(0, positions)
        for b in range(0, len(indices), batch):
            chunk = indices[b:b + batch].tolist()
            if decode == "sample":
                new_samples.__getitems__([(0, i) for i in chunk])
            else:
                new.load_many(chunk) if decode else new.read_many(chunk)

    cases = {
        "old: randperm, TarShardDataset.load": lambda pos, d: old_reads(pos, d),
        "new: shard_window, load_many": lambda pos, d: new_reads(window_order, pos, d),
        "new: feistel (full shuffle), load_many": lambda pos, d: new_reads(feistel, pos, d),
    }
    modes = {"sample": "sample", "decode": True, "read": False}  # sample: read + decode + 2x32 + 2x16 crops, masks
    rates: dict[str, dict[str, list[float]]] = {mode: {name: [] for name in cases} for mode in modes}
    for rep in range(reps + 1):  # repetition 0 warms the page cache and is dropped
        for mode in modes:
            names = list(cases)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                many = count // 8 if mode == "sample" else count  # augmentation dominates: fewer samples
                positions = _throughput_positions(n, many, 1000 * rep + names.index(name))
                start = time.perf_counter()
                cases[name](positions, modes[mode])
                if rep:
                    rates[mode][name].append(many / (time.perf_counter() - start))
    base = "old: randperm, TarShardDataset.load"
    held = sum(a.nbytes for entry in new._open.values() for a in entry[1:])
    print(f"index rows held by the new reader: {held / 2**10:.0f} KiB for {len(new._open)} open shards "
          f"({held / max(1, sum(len(e[1]) for e in new._open.values())):.0f} B per sample)", file=sys.stderr)
    return {mode: {name: {"median": statistics.median(v), "ratio": statistics.median(
        a / b for a, b in zip(v, rates[mode][base]))} for name, v in by.items()} for mode, by in rates.items()}


def child_locality(samples: int, shard_size: int, window: int, batch: int, global_batch: int) -> dict:
    """Distinct shards per rank batch and per global batch over the first 200 global batches of a pass."""
    from dinospec.data.order import FeistelOrder, ShardWindowOrder

    n_shards = (samples + shard_size - 1) // shard_size
    counts = np.full(n_shards, shard_size, dtype=np.int64)
    counts[-1] = samples - shard_size * (n_shards - 1)
    out = {}
    for name, order in (("shard_window", ShardWindowOrder(counts, 0, window)), ("full", FeistelOrder(samples, 0))):
        positions = np.arange(min(samples, 200 * global_batch) // global_batch * global_batch)
        shard_of = np.searchsorted(np.concatenate([[0], np.cumsum(counts)]), order.indices(0, positions),
                                   side="right") - 1
        per_rank = [len(np.unique(shard_of[i:i + batch])) for i in range(0, len(shard_of), batch)]
        per_global = [len(np.unique(shard_of[i:i + global_batch])) for i in range(0, len(shard_of), global_batch)]
        out[name] = {"rank_batch": float(np.mean(per_rank)), "global_batch": float(np.mean(per_global))}
    return out


CHILDREN = {"index": child_index, "startup_old": child_startup_old, "startup_new": child_startup_new,
            "throughput": child_throughput, "locality": child_locality}


def run_child(name: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, json.dumps(list(args))]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr}")
    if "index rows held" in done.stderr:
        print(done.stderr.strip().splitlines()[-1], flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/dinospec-bench-data-scale")
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--distinct", type=int, default=512)
    parser.add_argument("--index-workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--window", type=int, default=16, help="data.window_shards")
    parser.add_argument("--throughput-samples", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-old-startup", action="store_true", help="skip today's (slow) start-up at full size")
    parser.add_argument("--keep", action="store_true", help="keep the generated shards")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](*json.loads(args.args))))
        return 0

    out = Path(args.out)
    root = out / "shards"
    report: dict = {"samples": args.samples, "shard_size": args.shard_size}
    try:
        if not root.is_dir():
            report["generate_s"] = generate(root, args.samples, args.shard_size, args.distinct)
            print(f"generated {args.samples:,} samples in {len(list(root.glob('*.tar'))):,} shards "
                  f"({sum(p.stat().st_size for p in root.glob('*.tar')) / 2**30:.2f} GiB) in "
                  f"{report['generate_s']:.0f} s", flush=True)
        report["index_1"] = run_child("index", str(root), 1)
        report["index_n"] = run_child("index", str(root), args.index_workers)
        for key, workers in (("index_1", 1), ("index_n", args.index_workers)):
            r = report[key]
            print(f"index build, {workers} process(es): {r['seconds']:.1f} s = {r['samples'] / r['seconds']:,.0f} "
                  f"samples/s; index on disk {r['bytes'] / 2**20:.1f} MiB", flush=True)
        report["startup_new"] = run_child("startup_new", str(root), args.batch, args.window)
        print(f"start-up from the index: {report['startup_new']['seconds']:.3f} s, "
              f"{report['startup_new']['rss_mb']:.1f} MB resident above the imports", flush=True)
        if not args.skip_old_startup:
            report["startup_old"] = run_child("startup_old", str(root), args.batch)
            r = report["startup_old"]
            print(f"start-up, reader before the index: {r['seconds']:.1f} s (headers {r['scan_seconds']:.1f} s, "
                  f"randperm {r['perm_seconds']:.2f} s), {r['rss_mb']:.0f} MB resident", flush=True)
        for label, n in (("142M", 142_000_000), ("1.7B", 1_700_000_000)):
            folder = out / f"table_{label}"
            synthetic_table(folder, n)
            report[f"startup_{label}"] = run_child("startup_new", str(folder), args.batch, args.window)
            r = report[f"startup_{label}"]
            print(f"start-up from the index at {label} ({r['shards']:,} shards of {LVD_SHARD:,}): "
                  f"{r['seconds']:.3f} s, {r['rss_mb']:.1f} MB resident above the imports; index on disk would be "
                  f"{n * 16 / 2**30:.1f} GiB samples.bin", flush=True)
        report["throughput"] = run_child("throughput", str(root), args.throughput_samples, args.reps, args.batch,
                                         args.window)
        for mode, by in report["throughput"].items():
            for name, r in by.items():
                print(f"{mode:6s} {name:42s} {r['median']:9.0f} samples/s  {r['ratio']:.2f}x", flush=True)
        report["locality"] = {
            "bench": run_child("locality", args.samples, args.shard_size, args.window, args.batch, args.global_batch),
            "142M": run_child("locality", 142_000_000, LVD_SHARD, args.window, args.batch, args.global_batch)}
        for layout, by in report["locality"].items():
            for name, r in by.items():
                print(f"distinct shards, {layout} layout, {name:12s}: {r['rank_batch']:.1f} per batch of "
                      f"{args.batch}, {r['global_batch']:.1f} per global batch of {args.global_batch}", flush=True)
        print(json.dumps(report))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
