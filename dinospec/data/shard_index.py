"""The shard index: where every sample of a set of webdataset tar shards lies, built once, stored beside the data.

Start-up then reads one small table (a row per shard), not every tar header of every shard, and holds no Python
object per sample: a sample's bytes are at (shard, offset, size) in `samples.bin`, read on demand a shard at a time.

Layout of `<shard dir>/.dinospec-index/` (written to a temporary directory and renamed into place, so readers see a
whole index or none; concurrent builders on several ranks or jobs lock, and the loser of a race drops its copy):
  meta.json    {"version", "num_samples", "num_shards", "labelled", "num_classes"}
  shards.npy   one row per shard, sorted by name: name (bytes, relative to the shard dir), count, first (row of
               its first sample in samples.bin), nbytes (the shard's size when indexed: a changed shard is noticed)
  samples.bin  RECORD rows, shard-major, in member order: offset and size of the image member, label (-1 if none)

Grouping follows webdataset: a sample is the members sharing a key (path up to the first dot of the file name);
its image is the first member with an image extension, its label an optional `.cls` member holding an integer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

INDEX_DIRNAME = ".dinospec-index"
FORMAT_VERSION = 1
RECORD = np.dtype([("offset", "<i8"), ("size", "<u4"), ("label", "<i4")])  # 16 bytes per sample
SHARD_FIELDS = [("count", "<i8"), ("first", "<i8"), ("nbytes", "<i8")]
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz4")
# the one list of what is an image (by extension) for every reader: folders, file lists, tar members, evaluation
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm"})
LABEL_EXTENSIONS = frozenset({"cls", "cls.txt", "label", "label.txt"})  # webdataset members holding an integer class


class ShardIndexError(ValueError):
    """A shard set that cannot be indexed (compressed, not a tar, bad label member)."""


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.seg.png' -> key 'dir/abc', extension 'seg.png'."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<name>\\n" records), if any."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _members_fast(buf: mmap.mmap | bytes) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of an uncompressed tar, from its 512-byte headers.

    Handles ustar prefixes, GNU long names and pax path records; anything else unusual (checksum mismatch, base-256
    sizes, sparse files) raises ValueError so that the caller falls back to `tarfile`.
    """
    pos, end = 0, len(buf)
    long_name: str | None = None
    while pos + 512 <= end:
        header = buf[pos:pos + 512]
        if header.count(0) == 512:  # end-of-archive marker
            return
        stored = _octal(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ValueError(f"bad tar header checksum at byte {pos}")
        if header[124] & 0x80:
            raise ValueError("base-256 size field")
        size, kind = _octal(header[124:136]), header[156:157]
        data = pos + 512
        if kind in (b"L", b"x"):
            payload = bytes(buf[data:data + size])
            long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape") if kind == b"L" \
                else _pax_path(payload) or long_name
        elif kind in (b"0", b"\0", b"7"):
            name = long_name
            if name is None:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            yield name, data, size
            long_name = None
        elif kind in (b"1", b"2", b"3", b"4", b"5", b"6", b"g"):  # links, devices, folders, global pax: no data
            long_name = None
        else:
            raise ValueError(f"tar member type {kind!r} not handled by the fast reader")
        pos = data + (size + 511) // 512 * 512


def _members_tarfile(path: str) -> Iterator[tuple[str, int, int]]:
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, member.offset_data, member.size


def scan_shard(path: str) -> tuple[np.ndarray, bool]:
    """Index one shard: its samples' RECORD rows in member order, and whether every sample has a label."""
    if path.endswith(COMPRESSED_SUFFIXES):
        raise ShardIndexError(f"{path} is compressed: samples cannot be read by offset; decompress the shards "
                          f"(e.g. `gunzip`, `zstd -d`) into plain .tar files")
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, dtype=RECORD), True
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:2] in (b"\x1f\x8b", b"BZ", b"\xfd7", b"(\xb5"):
                raise ShardIndexError(f"{path} is compressed (gzip/bzip2/xz/zstd data in a .tar file): samples cannot "
                                  f"be read by offset; decompress it into a plain .tar file")
            try:
                members = list(_members_fast(buf))
            except ValueError:
                try:
                    members = list(_members_tarfile(path))
                except tarfile.ReadError as e:
                    raise ShardIndexError(f"cannot index tar shard {path} ({e}); shards must be uncompressed .tar "
                                      f"files") from None
            for name, offset, length in members:
                key, ext = split_member_name(name)
                if ext in IMAGE_EXTENSIONS:
                    images.setdefault(key, (offset, length))
                elif ext in LABEL_EXTENSIONS:
                    text = bytes(buf[offset:offset + length]).decode("utf-8", "replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise ShardIndexError(f"{path}: label member {name} holds {text[:20]!r}, not an "
                                          f"integer") from None
    records = np.zeros(len(images), dtype=RECORD)
    for row, (key, (offset, length)) in enumerate(images.items()):
        records[row] = (offset, length, labels.get(key, -1))
    return records, all(key in labels for key in images)


class ShardIndex:
    """An index of the shards of one directory (see the module docstring), or a selection of its shards."""

    def __init__(self, root: Path, shards: np.ndarray, labelled: bool, num_classes: int):
        self.root = Path(root)
        self.shards = shards  # structured rows: name, count, first, nbytes
        self.labelled = labelled
        self.num_classes = num_classes
        self.starts = np.concatenate([[0], np.cumsum(shards["count"])]).astype(np.int64)  # dataset index per shard

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    @property
    def counts(self) -> np.ndarray:
        return self.shards["count"]

    def shard_path(self, shard: int) -> str:
        return str(self.root / self.shards["name"][shard].decode("utf-8", "surrogateescape"))

    def records(self, shard: int) -> np.ndarray:
        """The RECORD rows of one shard, read from samples.bin (one read; nothing stays mapped)."""
        row = self.shards[shard]
        return np.fromfile(self.root / INDEX_DIRNAME / "samples.bin", dtype=RECORD, count=int(row["count"]),
                           offset=int(row["first"]) * RECORD.itemsize)

    def select(self, names: Sequence[str]) -> "ShardIndex":
        """The index restricted to the shards `names` (relative to root), in sorted order."""
        wanted = {n.encode("utf-8", "surrogateescape") for n in names}
        keep = np.flatnonzero(np.isin(self.shards["name"], np.array(sorted(wanted), dtype=self.shards["name"].dtype)))
        missing = len(wanted) - len(keep)
        if missing:
            raise FileNotFoundError(f"{missing} of the selected shards are not in the index of {self.root}; "
                                    f"rebuild it with `dinospec index {self.root} --force`")
        return ShardIndex(self.root, self.shards[keep], self.labelled, self.num_classes)

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root) / INDEX_DIRNAME / "meta.json").is_file()

    @classmethod
    def load(cls, root: str | Path) -> "ShardIndex":
        folder = Path(root) / INDEX_DIRNAME
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{folder} has index format {meta.get('version')}, this dinospec reads "
                             f"{FORMAT_VERSION}; rebuild it with `dinospec index {root} --force`")
        shards = np.load(folder / "shards.npy")
        return cls(Path(root), shards, bool(meta["labelled"]), int(meta["num_classes"]))


def _scan_one(path: str) -> tuple[np.ndarray, bool, int]:
    records, labelled = scan_shard(path)
    return records, labelled, os.path.getsize(path)


def build_index(root: str | Path, workers: int = 1, force: bool = False) -> ShardIndex:
    """Index every `*.tar` directly in `root` and publish it atomically in `root/.dinospec-index`.

    Several processes may call this at once (every rank at first use): one builds under a lock file, the others
    wait and load its result; the lock file goes once the index is published. `workers` > 1 scans shards in that many processes.
    """
    root = Path(root)
    final = root / INDEX_DIRNAME
    lock_path = root / f"{INDEX_DIRNAME}.lock"
    try:
        lock = open(lock_path, "a+")  # noqa: SIM115 - held for the whole build
    except OSError as e:
        raise PermissionError(f"cannot write the shard index beside the data in {root} ({e.strerror}); build it "
                              f"once where the data is writable: dinospec index {root}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: builders race, the atomic rename keeps one whole index
            pass
        if ShardIndex.exists(root) and not force:
            lock_path.unlink(missing_ok=True)
            return ShardIndex.load(root)
        names = sorted(e.name for e in os.scandir(root) if e.name.endswith(".tar") and e.is_file())
        compressed = [e.name for e in os.scandir(root) if e.name.endswith(COMPRESSED_SUFFIXES)]
        if not names:
            hint = f" (found compressed shards such as {compressed[0]}: decompress them to .tar)" if compressed else ""
            raise FileNotFoundError(f"no .tar shards in {root}{hint}")
        start = time.perf_counter()
        paths = [str(root / n) for n in names]
        counts = np.zeros(len(names), dtype=np.int64)
        nbytes = np.zeros(len(names), dtype=np.int64)
        labelled, max_label = True, -1
        tmp = Path(tempfile.mkdtemp(prefix=f"{INDEX_DIRNAME}.tmp-", dir=root))
        try:
            pool = ProcessPoolExecutor(workers) if workers > 1 else None
            with open(tmp / "samples.bin", "wb") as f, pool or nullcontext():
                scanned = pool.map(_scan_one, paths, chunksize=max(1, len(paths) // (16 * workers))) if pool \
                    else map(_scan_one, paths)
                for s, (records, has_labels, size) in enumerate(scanned):  # in shard order, streamed to disk
                    f.write(records.tobytes())
                    counts[s], nbytes[s] = len(records), size
                    labelled &= has_labels
                    max_label = max(max_label, int(records["label"].max()) if len(records) else -1)
            if counts.sum() == 0:
                raise FileNotFoundError(f"no image members found in the {len(names)} tar shard(s) of {root}")
            width = max(len(n.encode("utf-8", "surrogateescape")) for n in names)
            shards = np.zeros(len(names), dtype=[("name", f"S{width}"), *SHARD_FIELDS])
            shards["name"] = [n.encode("utf-8", "surrogateescape") for n in names]
            shards["count"] = counts
            shards["first"] = np.concatenate([[0], np.cumsum(counts)[:-1]])
            shards["nbytes"] = nbytes
            np.save(tmp / "shards.npy", shards)
            meta = {"version": FORMAT_VERSION, "num_samples": int(counts.sum()), "num_shards": len(names),
                    "labelled": labelled, "num_classes": max_label + 1 if labelled else 0}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            if final.exists():  # --force: move the old one aside, then swap in the new one
                old = Path(tempfile.mkdtemp(prefix=f"{INDEX_DIRNAME}.old-", dir=root))
                os.replace(final, old / "index")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("indexed %d samples in %d shards of %s in %.1f s", counts.sum(), len(names), root,
                 time.perf_counter() - start)
        # the index is published, so whoever waits on this lock, or makes a new one, loads it: no stale lock file
        lock_path.unlink(missing_ok=True)
        return ShardIndex.load(root)


def open_index(root: str | Path, workers: int = 1) -> ShardIndex:
    """The index of the shards in `root`: loaded when it exists, built (once, for every rank) when not."""
    if ShardIndex.exists(root):
        return ShardIndex.load(root)
    log.warning("no shard index in %s: indexing the shards now (once; `dinospec index %s` does it ahead of a run)",
                root, root)
    return build_index(root, workers=workers)
