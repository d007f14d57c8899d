"""Image datasets for pretraining: an image folder, a file list, or webdataset-style tar shards.

All three expose the same small interface (`ImageDataset`): a length, `load(i)` giving an RGB PIL image, `label(i)`
(-1 when unlabeled) and `classes`. Random access everywhere (tar members are indexed once at start-up), so the
sampler's resumable stream positions mean the same thing for every kind. A file that does not decode raises
`BrokenImage`; what to do about it is the loader's policy, not the dataset's.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import os
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
from PIL import Image, ImageOps

from dinospec.data.shard_index import IMAGE_EXTENSIONS, LABEL_EXTENSIONS
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class BrokenImage(Exception):
    """A sample whose file is missing or does not decode to an image (truncated, empty, not an image...)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    Alpha is composited over white (transparent pixels carry arbitrary colours otherwise); 16-bit grey is scaled
    to 8 bits (PIL's own conversion clips it, turning most of the image white); the rest (L, 1, P, CMYK, YCbCr,
    F...) goes through PIL's converters.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_GREY_MODES:
        grey = np.asarray(img).astype(np.float32) / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "F":
        img = img.convert("L")  # float images: PIL clips to 0..255
    return img.convert("RGB")


def _decode(f: BinaryIO) -> Image.Image:
    img = Image.open(f)
    img.load()  # decode now: a truncated file fails here, not later in a transform
    ImageOps.exif_transpose(img, in_place=True)  # camera orientation tag -> upright pixels
    return to_rgb(img)


def decode_image(source: str | BinaryIO, name: str) -> Image.Image:
    """Fully decode `source` (a path or a file object) to RGB; any failure becomes BrokenImage naming `name`."""
    try:
        if isinstance(source, str):
            with open(source, "rb") as f:  # we own the file, so it closes even for multi-frame formats
                return _decode(f)
        return _decode(source)
    except FileNotFoundError:
        raise BrokenImage(name, "file not found") from None
    except Exception as e:  # noqa: BLE001 - third-party decoders raise anything; the loader counts and skips
        raise BrokenImage(name, f"{type(e).__name__}: {e}") from None


class ImageDataset:
    """Random-access images. Subclasses fill `classes` and implement `__len__`, `load`, `label`, `describe`."""

    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The decoded RGB image; raises BrokenImage when the file cannot be decoded."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        """Class index, or -1 when the dataset is unlabeled."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample `index` comes from (a path, or shard:member), for log messages."""
        raise NotImplementedError

    def load_many(self, indices: Sequence[int]) -> list[Image.Image | BrokenImage]:
        """`load` for each index, a failure as its BrokenImage; datasets whose reads are cheaper in some order
        (tar shards: file order) override it."""
        out: list[Image.Image | BrokenImage] = []
        for index in indices:
            try:
                out.append(self.load(index))
            except BrokenImage as e:
                out.append(e)
        return out


class ConcatImages(ImageDataset):
    """Datasets laid end to end (a mixture's sources): index bases[k] + i is sample i of dataset k. Labels stay
    each source's own; `classes` is empty (the sources' class lists need not agree)."""

    def __init__(self, parts: Sequence[ImageDataset]):
        self.parts = list(parts)
        self.bases = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.classes = []

    def __len__(self) -> int:
        return int(self.bases[-1])

    def _part(self, index: int) -> tuple[ImageDataset, int]:
        k = int(np.searchsorted(self.bases, index, side="right")) - 1
        return self.parts[k], index - int(self.bases[k])

    def load(self, index: int) -> Image.Image:
        part, i = self._part(index)
        return part.load(i)

    def load_many(self, indices: Sequence[int]) -> list[Image.Image | BrokenImage]:
        out: list[Image.Image | BrokenImage | None] = [None] * len(indices)
        located = [self._part(i) for i in indices]
        for part in {id(p): p for p, _ in located}.values():  # each source's reads together, in its own order
            rows = [j for j, (p, _) in enumerate(located) if p is part]
            for j, image in zip(rows, part.load_many([located[j][1] for j in rows])):
                out[j] = image
        return out  # type: ignore[return-value]

    def label(self, index: int) -> int:
        part, i = self._part(index)
        return part.label(i)

    def describe(self, index: int) -> str:
        part, i = self._part(index)
        return part.describe(i)


def _is_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def _images_under(root: Path) -> list[str]:
    """Every image file below `root`, sorted, skipping hidden files and folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and _is_image(f))
    return sorted(found)


class _FileDataset(ImageDataset):
    """One file per sample: `paths`, and `_labels` (None when unlabeled)."""

    paths: list[str]
    _labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return decode_image(self.paths[index], self.paths[index])

    def label(self, index: int) -> int:
        return int(self._labels[index]) if self._labels is not None else -1

    def describe(self, index: int) -> str:
        return self.paths[index]


class FolderDataset(_FileDataset):
    """An image tree. With no images directly in the root, each subfolder holding images is a class (as
    torchvision's ImageFolder); with images in the root, the whole tree is one unlabeled set (found recursively)."""

    def __init__(self, root: str | Path):
        root = Path(root)
        entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
        loose = [e for e in entries if e.is_file() and _is_image(e.name)]
        self.paths: list[str] = []
        labels: list[int] = []
        self.classes = []
        if loose:
            self.paths = _images_under(root)
        else:
            for entry in (e for e in entries if e.is_dir()):
                images = _images_under(Path(entry.path))
                if images:
                    labels.extend([len(self.classes)] * len(images))
                    self.classes.append(entry.name)
                    self.paths.extend(images)
        if not self.paths:
            raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
        self._labels = np.asarray(labels, dtype=np.int64) if labels else None


_LABEL_TAIL = re.compile(r"^(.*\S)[\s,]+(-?\d+)\s*$")


class FileListDataset(_FileDataset):
    """A text file, one image path per line (relative paths are relative to the list's folder), optionally
    followed by an integer label after whitespace or a comma. Blank lines and lines starting with # are skipped;
    either every line has a label or none does."""

    def __init__(self, list_path: str | Path):
        list_path = Path(list_path)
        base = list_path.parent
        self.paths = []
        labels: list[int | None] = []
        for lineno, raw in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LABEL_TAIL.match(line)
            path, label = (match.group(1), int(match.group(2))) if match else (line, None)
            if label is not None and label < 0:
                raise ValueError(f"{list_path}:{lineno}: label {label} is negative")
            path = path.strip().rstrip(",").strip()
            self.paths.append(str(base / path) if not os.path.isabs(path) else path)
            labels.append(label)
        if not self.paths:
            raise ValueError(f"file list {list_path} names no images")
        labelled = [lab is not None for lab in labels]
        if any(labelled) and not all(labelled):
            lineno = labelled.index(False) if labelled[0] else labelled.index(True)
            raise ValueError(f"{list_path}: some entries have a label and some do not (entry {lineno + 1} differs "
                             f"from the first); label every line or none")
        self._labels = np.asarray(labels, dtype=np.int64) if labelled[0] else None
        self.classes = [str(c) for c in range(int(self._labels.max()) + 1)] if self._labels is not None else []


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: 'dir/abc.seg.png' -> key 'dir/abc', extension 'seg.png'."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShardDataset(ImageDataset):
    """webdataset-layout tar shards, indexed in memory at start-up by reading every member header (the reader
    before the on-disk shard index; `build_dataset` now opens tar shards through dinospec.data.shards, which numbers
    the samples the same way; this one stays as the baseline scripts/bench_data_scale.py compares against).

    Members are grouped into samples by key (path up to the first dot of the file name); a sample's image is its
    first member with an image extension, its label an optional `.cls` member holding an integer. Shards must be
    uncompressed (random access); samples without an image member are left out.
    """

    def __init__(self, shards: list[str]):
        if not shards:
            raise FileNotFoundError("no .tar shards given")
        self.shards = list(shards)
        shard_of, offsets, sizes, names, labels = [], [], [], [], []
        for shard_index, shard in enumerate(self.shards):
            for key, (member, label) in self._index_shard(shard).items():
                shard_of.append(shard_index)
                offsets.append(member.offset_data)
                sizes.append(member.size)
                names.append(member.name)
                labels.append(label)
        if not names:
            raise FileNotFoundError(f"no image members found in {len(self.shards)} tar shard(s) "
                                    f"({self.shards[0]}{', ...' if len(self.shards) > 1 else ''})")
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._names = names
        has_label = [lab is not None for lab in labels]
        self._labels = np.asarray([lab if lab is not None else -1 for lab in labels], dtype=np.int64) \
            if all(has_label) else None
        self.classes = [str(c) for c in range(int(self._labels.max()) + 1)] if self._labels is not None else []
        self._handles: dict[int, BinaryIO] = {}
        self._handles_pid = os.getpid()

    @staticmethod
    def _index_shard(shard: str) -> dict[str, tuple[tarfile.TarInfo, int | None]]:
        images: dict[str, tarfile.TarInfo] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member_name(member.name)
                    if ext in IMAGE_EXTENSIONS and key not in images:
                        images[key] = member
                    elif ext in LABEL_EXTENSIONS:
                        text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                        try:
                            labels[key] = int(text)
                        except ValueError:
                            raise ValueError(f"{shard}: label member {member.name} holds {text[:20]!r}, "
                                             f"not an integer") from None
        except tarfile.ReadError as e:
            raise ValueError(f"cannot index tar shard {shard} ({e}); shards must be uncompressed .tar files "
                             f"for random access") from None
        return {key: (member, labels.get(key)) for key, member in images.items()}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross process boundaries
        return state

    def _handle(self, shard_index: int) -> BinaryIO:
        if self._handles_pid != os.getpid():  # forked into a worker: never share the parent's file offsets
            self._handles, self._handles_pid = {}, os.getpid()
        handle = self._handles.get(shard_index)
        if handle is None:
            handle = self._handles[shard_index] = open(self.shards[shard_index], "rb")  # noqa: SIM115
        return handle

    def __len__(self) -> int:
        return len(self._names)

    def load(self, index: int) -> Image.Image:
        shard_index = int(self._shard_of[index])
        try:
            handle = self._handle(shard_index)
            handle.seek(int(self._offsets[index]))
            data = handle.read(int(self._sizes[index]))
        except OSError as e:
            raise BrokenImage(self.describe(index), f"cannot read shard: {e}") from None
        return decode_image(io.BytesIO(data), self.describe(index))

    def label(self, index: int) -> int:
        return int(self._labels[index]) if self._labels is not None else -1

    def describe(self, index: int) -> str:
        return f"{self.shards[int(self._shard_of[index])]}:{self._names[index]}"


def _indexed_shards(path: str, max_open: int, index_workers: int) -> ImageDataset:
    """A directory of shards, a glob of shards in one directory, or one shard, through the directory's index."""
    from dinospec.data.shard_index import COMPRESSED_SUFFIXES, ShardIndex, open_index
    from dinospec.data.shards import IndexedTarDataset

    if path.endswith(COMPRESSED_SUFFIXES):
        raise ValueError(f"{path} is a compressed shard: samples cannot be read by offset; decompress the shards "
                         f"into plain .tar files")
    if os.path.isdir(path):
        return IndexedTarDataset(open_index(path, index_workers), max_open)
    root, pattern = os.path.split(path)
    root = root or "."
    if glob.has_magic(root):
        raise ValueError(f"data path {path}: wildcards are allowed in the shard file name only (one directory of "
                         f"shards, e.g. /data/shards/train-*.tar)")
    if not glob.has_magic(pattern) and not os.path.isfile(path):
        raise FileNotFoundError(f"tar shard {path} does not exist")
    index = open_index(root, index_workers) if os.path.isdir(root) else None
    if index is None:
        raise FileNotFoundError(f"no .tar shards match {path}")
    names = [n.decode("utf-8", "surrogateescape") for n in index.shards["name"]]
    chosen = fnmatch.filter(names, pattern)
    if not chosen:
        raise FileNotFoundError(f"no .tar shards match {path} (the index of {root} lists {len(names)} shards; "
                                f"if shards were added, rebuild it: dinospec index {root} --force)")
    selected: ShardIndex = index.select(chosen)
    return IndexedTarDataset(selected, max_open)


def _tar_shards(path: str) -> list[str]:
    if glob.has_magic(path):
        shards = sorted(p for p in glob.glob(path) if p.endswith(".tar"))
    elif os.path.isdir(path):
        shards = sorted(str(p) for p in Path(path).glob("*.tar"))
    else:
        shards = [path]
    if not shards:
        raise FileNotFoundError(f"no .tar shards match {path}")
    return shards


def _detect_kind(path: str) -> str:
    if glob.has_magic(path) or path.endswith(".tar") or path.endswith((".tar.gz", ".tgz")):
        return "tar"
    if os.path.isdir(os.path.join(path, ".dinospec-index")):
        return "tar"
    if os.path.isdir(path):
        names = [e.name for e in os.scandir(path) if not e.name.startswith(".")]
        has_tars = any(n.endswith(".tar") for n in names)
        has_images_or_dirs = any(_is_image(n) or os.path.isdir(os.path.join(path, n)) for n in names)
        return "tar" if has_tars and not has_images_or_dirs else "folder"
    if os.path.isfile(path):
        return "filelist"
    raise FileNotFoundError(f"data path {path} does not exist")


def build_dataset(path: str, kind: str = "auto", max_open_shards: int = 32, index_workers: int = 1) -> ImageDataset:
    """Open `path` as an image folder, a file list (.txt), or a folder/glob of .tar shards (kind auto|folder|
    filelist|tar; auto guesses from what is on disk). Tar shards are read through the shard index stored beside
    them (built at first use with `index_workers` processes if missing), each process keeping at most
    `max_open_shards` shards open."""
    path = str(path)
    if kind == "auto":
        kind = _detect_kind(path)
    if kind == "folder":
        if not os.path.isdir(path):
            raise FileNotFoundError(f"image folder {path} does not exist")
        return FolderDataset(path)
    if kind == "filelist":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"file list {path} does not exist")
        return FileListDataset(path)
    if kind == "tar":
        return _indexed_shards(path, max_open_shards, index_workers)
    raise ValueError(f"unknown dataset kind {kind!r}: expected auto, folder, filelist or tar")
