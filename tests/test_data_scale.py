"""Data at scale: the on-disk shard index, per-position orders, mixtures, unreadable shards, and the exactness of
the stream over ranks (real gloo processes), workers (real DataLoader workers) and resume, on real tar shards of
real encoded images written by the tests."""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinospec.cli import main as cli_main
from dinospec.config import load_config
from dinospec.data.datasets import BrokenImage, TarShardDataset, build_dataset, decode_image
from dinospec.data.loader import build_ssl_loader
from dinospec.data.order import (FeistelOrder, MixtureStream, RandpermOrder, ShardWindowOrder, SourceStream,
                                 feistel_permute, mixture_counts)
from dinospec.data.sampler import ShardedStreamSampler, pass_permutation
from dinospec.data.shard_index import INDEX_DIRNAME, ShardIndex, _members_fast, _members_tarfile, build_index
from dinospec.data.shards import IndexedTarDataset

REPO = Path(__file__).resolve().parents[1]


def _image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    """A real encoded 16x16 image with seed-dependent pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def write_shards(folder: Path, sizes: list[int], labelled: bool = True, start: int = 0,
                 fmt: int = tarfile.USTAR_FORMAT) -> list[tuple[str, int]]:
    """Shards shard-000000.tar, ... of `sizes` samples each (a .jpg or .png, a .cls, a .json per sample); returns
    each sample's (member name, label) in dataset order."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    k = start
    for s, size in enumerate(sizes):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w", format=fmt) as tar:
            for _ in range(size):
                key = f"{k:08d}"
                ext = "png" if k % 3 == 0 else "jpg"
                members = [(f"{key}.json", b"{}"), (f"{key}.{ext}", _image_bytes(k, "PNG" if ext == "png" else "JPEG"))]
                if labelled:
                    members.append((f"{key}.cls", str(k % 5).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                samples.append((f"{key}.{ext}", k % 5))
                k += 1
    return samples


def _cfg(*overrides: str):
    return load_config(overrides=[
        "data.num_workers=0", "data.pin_memory=false", "train.batch_size_per_gpu=2", "student.patch_size=8",
        "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=1", "train.seed=3",
        "data.window_shards=2", *overrides])


# ---------------------------------------------------------------------------------------------------------------
# the index


def test_index_is_built_once_atomically_and_reads_what_the_tar_holds(tmp_path: Path):
    root = tmp_path / "shards"
    samples = write_shards(root, [5, 0, 7, 3])
    assert cli_main(["index", str(root), "--workers", "2"]) == 0
    index = ShardIndex.load(root)
    assert index.num_samples == 15 and index.labelled and index.num_classes == 5
    assert list(index.counts) == [5, 0, 7, 3] and list(index.starts) == [0, 5, 5, 12, 15]
    assert sorted(p.name for p in root.iterdir()) == [INDEX_DIRNAME] + \
        [f"shard-{s:06d}.tar" for s in range(4)]  # no temporary directory left behind
    stamp = (root / INDEX_DIRNAME / "samples.bin").stat().st_mtime_ns
    assert build_index(root).num_samples == 15  # an existing index is loaded, not rebuilt
    assert (root / INDEX_DIRNAME / "samples.bin").stat().st_mtime_ns == stamp

    ds = build_dataset(str(root))
    old = TarShardDataset(sorted(str(p) for p in root.glob("*.tar")))
    assert isinstance(ds, IndexedTarDataset) and len(ds) == len(old) == 15
    for i in (14, 0, 7, 5, 12):  # random access, any order
        assert np.array_equal(np.asarray(ds.load(i)), np.asarray(old.load(i)))
        assert ds.label(i) == old.label(i) == samples[i][1]
        assert ds.describe(i) == old.describe(i) and ds.describe(i).endswith(samples[i][0])
    batch = ds.load_many([9, 2, 14, 2])
    assert [np.asarray(im).tobytes() for im in batch] == [np.asarray(ds.load(i)).tobytes() for i in (9, 2, 14, 2)]
    few = IndexedTarDataset(ds.index, max_open=1)  # one open shard at a time: every switch closes the other
    assert [np.asarray(few.load(i)).tobytes() for i in (0, 13, 1, 6)] == \
        [np.asarray(ds.load(i)).tobytes() for i in (0, 13, 1, 6)] and len(few._open) == 1
    part = build_dataset(str(root / "shard-00000[23].tar"))  # a glob selects shards of the directory's index
    assert len(part) == 10 and np.array_equal(np.asarray(part.load(0)), np.asarray(ds.load(5)))
    one = build_dataset(str(root / "shard-000003.tar"))
    assert len(one) == 3 and one.describe(2) == ds.describe(14)


def test_fast_header_reader_agrees_with_tarfile(tmp_path: Path):
    long_name = "a" * 120 + "/" + "b" * 110  # needs a GNU long-name or a pax header
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            folder = tarfile.TarInfo("dir")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for name in ("dir/x.jpg", "dir/x.cls", "ü-名前.png") + ((f"{long_name}.jpg",) if fmt else ()):
                data = name.encode() * 3
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            fast = list(_members_fast(f.read()))
        assert fast == list(_members_tarfile(str(path))) and len(fast) >= 3


def test_concurrent_first_use_builds_one_index(tmp_path: Path):
    root = tmp_path / "shards"
    write_shards(root, [4, 4, 4], labelled=False)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('shard_index', sys.argv[2]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.open_index(sys.argv[1]).num_samples)")  # the module alone: numpy, no torch to import
    module = REPO / "dinospec" / "data" / "shard_index.py"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(module)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(3)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["12"] * 3
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(INDEX_DIRNAME)) \
        == [INDEX_DIRNAME]  # one index, no temporary copies or lock file left
    ds = build_dataset(str(root))
    assert not ds.index.labelled and ds.label(3) == -1 and ds.classes == []


def test_missing_changed_and_truncated_shards_are_skipped_and_counted_once(tmp_path: Path, caplog):
    root = tmp_path / "shards"
    write_shards(root, [4, 4, 4, 4])
    build_index(root)
    (root / "shard-000001.tar").unlink()  # missing
    with open(root / "shard-000002.tar", "ab") as f:  # rewritten since indexing
        f.write(b"\0" * 512)
    ds = build_dataset(str(root))
    with pytest.raises(BrokenImage, match="cannot be opened"):
        ds.load(4)
    with pytest.raises(BrokenImage, match="rebuild the index"):
        ds.load(8)
    loader = build_ssl_loader(_cfg(f"data.path={root}", "data.num_workers=2", "train.batch_size_per_gpu=4"))
    with caplog.at_level(logging.WARNING, logger="dinospec.data.loader"):
        batches = [b for _, b in zip(range(8), loader)]  # two passes; both workers meet both bad shards
    shown = {i for b in batches for i in b["sample_ids"][:, 1].tolist()}
    assert shown <= set(range(4)) | set(range(12, 16))
    logged = [r.getMessage() for r in caplog.records if "broken image" in r.getMessage()]
    assert len(logged) == 2 and batches[-1]["num_broken"] == 2 and loader.broken.sync() == 2


# ---------------------------------------------------------------------------------------------------------------
# orders and mixtures


def test_orders_are_deterministic_per_pass_bijections():
    counts = np.array([7, 0, 3, 12, 1, 9, 5])
    n = int(counts.sum())
    assert np.array_equal(RandpermOrder(n, 4).indices(2, np.arange(n)), pass_permutation(4, 2, n).numpy())
    for order in (FeistelOrder(n, 4), ShardWindowOrder(counts, 4, 2), ShardWindowOrder(counts, 4, 100)):
        passes = [order.indices(k, np.arange(n)) for k in range(3)]
        for p in passes:
            assert sorted(p.tolist()) == list(range(n))
        assert not np.array_equal(passes[0], passes[1])
        assert np.array_equal(order.indices(1, np.array([5, 2, 30])), passes[1][[5, 2, 30]])  # any positions
    assert not np.array_equal(FeistelOrder(n, 5).indices(0, np.arange(n)), FeistelOrder(n, 4).indices(0, np.arange(n)))
    sizes = np.array([1, 2, 5, 1000, 2**20 + 3], dtype=np.uint64)
    for size in sizes:
        m = int(min(size, 5000))
        v = feistel_permute(np.arange(m), np.full(m, size), np.full(m, 99, dtype=np.uint64))
        assert len(set(v.tolist())) == m and v.max() < size


def test_shard_window_order_reads_window_shards_at_a_time():
    counts = np.full(40, 25)
    order = ShardWindowOrder(counts, seed=1, window=4)
    shard = order.indices(0, np.arange(1000)) // 25
    for w in range(10):  # each window of 100 positions holds exactly 4 whole shards
        window = shard[w * 100:(w + 1) * 100]
        assert len(set(window.tolist())) == 4 and np.bincount(window).max() == 25
    assert len(set(shard[:16].tolist())) > 1  # shuffled inside the window, not shard after shard


def test_mixture_stream_weights_and_per_source_order():
    a, b = SourceStream(FeistelOrder(50, 1)), SourceStream(RandpermOrder(7, 2))
    assert list(mixture_counts([3, 1], 40)) == [30, 10] and list(mixture_counts([1, 1, 1], 10)) == [4, 3, 3]
    with pytest.raises(ValueError, match="positive"):
        mixture_counts([1, 0])
    mix = MixtureStream([a, b], [3, 1], seed=0, period=40)
    passes, index = mix.ids(np.arange(400))
    from_b = index >= 50
    for block in range(10):
        assert from_b[block * 40:(block + 1) * 40].sum() == 10
    pa, ia = a.ids(np.arange(300))
    pb, ib = b.ids(np.arange(100))
    assert np.array_equal(index[~from_b], ia) and np.array_equal(passes[~from_b], pa)  # each source in its order
    assert np.array_equal(index[from_b] - 50, ib) and np.array_equal(passes[from_b], pb)
    assert np.array_equal(mix.ids(np.arange(123, 211))[1], index[123:211])  # from any position


def test_randperm_order_on_tar_shards_reproduces_the_reader_before_the_index(tmp_path: Path):
    root = tmp_path / "shards"
    write_shards(root, [3, 5, 4])
    loader = build_ssl_loader(_cfg(f"data.path={root}", "data.order=randperm", "train.batch_size_per_gpu=3"))
    old = ShardedStreamSampler(12, 3, seed=3)  # the stream and numbering of tar runs before the shard index
    old_images = TarShardDataset(sorted(str(p) for p in root.glob("*.tar")))
    for step, batch in zip(range(6), loader):
        ids = old.ids(step * 3, 3)
        assert batch["sample_ids"].tolist() == [list(i) for i in ids]
        image = loader.samples.images.load(ids[0][1])
        assert np.array_equal(np.asarray(image), np.asarray(old_images.load(ids[0][1])))


# ---------------------------------------------------------------------------------------------------------------
# exactness: workers, resume, ranks


def _mixture_overrides(tmp_path: Path) -> list[str]:
    write_shards(tmp_path / "a", [6, 5, 7, 4])
    write_shards(tmp_path / "b", [3, 3, 3], labelled=False, start=1000)
    build_index(tmp_path / "a")
    (tmp_path / "a" / "shard-000002.tar").write_bytes(b"")  # emptied after indexing: skipped, counted as broken
    return [f"data.sources=[{{path: {tmp_path / 'a'}, weight: 2}}, {{path: {tmp_path / 'b'}, weight: 1}}]"]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        for key in ("sample_ids", "labels", "global_crops", "local_crops", "masks"):
            assert torch.equal(x[key], y[key]), key


def test_mixture_resume_is_exact_with_workers(tmp_path: Path):
    overrides = _mixture_overrides(tmp_path)
    cfg = _cfg(*overrides, "data.num_workers=2", "train.batch_size_per_gpu=3")
    loader = build_ssl_loader(cfg)
    it = iter(loader)
    [next(it) for _ in range(3)]
    position = loader.position
    expected = [next(it) for _ in range(9)]  # crosses passes of source b
    resumed = build_ssl_loader(_cfg(*overrides, "data.num_workers=0", "train.batch_size_per_gpu=3"),
                               start_step=position // 3)
    _assert_same_batches([b for _, b in zip(range(9), resumed)], expected)
    ids = torch.cat([b["sample_ids"] for b in expected])[:, 1]
    assert (ids >= 22).sum() > 0 and (ids < 22).sum() > (ids >= 22).sum()  # both sources, a about twice b


def _rank_main(rank: int, init_file: str, overrides: list[str], out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    loader = build_ssl_loader(_cfg(*overrides, "data.num_workers=1"), rank=rank, world_size=2)
    batches = [b for _, b in zip(range(5), loader)]
    torch.save({"batches": batches, "num_broken": loader.broken.sync()}, out)
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_see_what_one_rank_with_two_workers_sees(tmp_path: Path):
    overrides = _mixture_overrides(tmp_path)
    single = build_ssl_loader(_cfg(*overrides, "data.num_workers=2", "train.batch_size_per_gpu=4"))
    whole = [b for _, b in zip(range(5), single)]
    ctx = mp.get_context("fork")  # the test process has no process group and one torch thread: safe to fork
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "init"), overrides, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    ranks = [torch.load(o, weights_only=False) for o in outs]
    assert ranks[0]["num_broken"] == ranks[1]["num_broken"] == single.broken.sync() == 1  # the emptied shard
    for step in range(5):
        halves = [r["batches"][step] for r in ranks]
        assert torch.equal(whole[step]["sample_ids"], torch.cat([h["sample_ids"] for h in halves]))
        for key in ("global_crops", "masks"):
            crops = [h[key].view(2, 2, *h[key].shape[1:]) for h in halves]  # (crop, sample, ...)
            assert torch.equal(whole[step][key], torch.cat(crops, dim=1).flatten(0, 1)), key


def test_config_refuses_bad_data_keys():
    from dinospec.config import ConfigError

    with pytest.raises(ConfigError, match="data.order"):
        _cfg("data.order=sorted")
    with pytest.raises(ConfigError, match=r"sources\[0\].weight"):
        _cfg("data.sources=[{path: x, weight: -1}]")
    with pytest.raises(ConfigError, match=r"sources\[0\].path"):
        _cfg("data.sources=[{weight: 1}]")


def test_shard_window_order_needs_shards(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.jpg").write_bytes(_image_bytes(k))
    assert np.asarray(decode_image(str(folder / "0.jpg"), "x")).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="needs tar shards"):
        build_ssl_loader(_cfg(f"data.path={folder}", "data.order=shard_window"))
    assert os.path.isdir(folder)
