"""Reading samples of indexed tar shards: a bounded set of open shards per process, reads in file order.

A process (the main one, or each DataLoader worker) keeps at most `max_open` shards open, least recently used
closed first, together with their index rows, so its memory does not grow with the dataset. `load_many` reads a
batch's members sorted by (shard, offset), so a worker that stays inside a window of shards reads forward through
each file. A shard that is missing, unreadable or changed since it was indexed is skipped: its samples raise
BrokenImage naming the shard (counted once, like a broken image), and the loader substitutes other samples.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from typing import Sequence

import numpy as np
from PIL import Image

from dinospec.data.datasets import BrokenImage, ImageDataset, decode_image
from dinospec.data.shard_index import ShardIndex


class IndexedTarDataset(ImageDataset):
    """The samples of a ShardIndex, shard-major (shard 0's samples first, in member order)."""

    def __init__(self, index: ShardIndex, max_open: int = 32):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.index = index
        self.max_open = max_open
        self.classes = [str(c) for c in range(index.num_classes)] if index.labelled else []
        self._reset()

    def _reset(self) -> None:
        # shard -> (file descriptor, offsets, sizes, labels of its samples: 16 bytes per sample), least recently
        # used first. Reads use pread (no shared file position), so descriptors a forked worker inherits stay
        # correct in both processes.
        self._open: OrderedDict[int, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._dead: dict[int, str] = {}  # shard -> why it cannot be read

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"], state["_dead"] = OrderedDict(), {}  # open files do not cross process boundaries
        return state

    @property
    def shard_counts(self) -> np.ndarray:
        return self.index.counts

    def __len__(self) -> int:
        return self.index.num_samples

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, member row in the shard) of dataset index `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        shard = int(self.index.starts.searchsorted(index, side="right")) - 1
        return shard, index - int(self.index.starts[shard])

    def _shard(self, shard: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.index.shard_path(shard)
        if shard in self._dead:
            raise BrokenImage(path, self._dead[shard])
        try:
            fd = os.open(path, os.O_RDONLY)  # kept open, closed on eviction
        except OSError as e:
            self._dead[shard] = f"shard cannot be opened ({e.strerror or e})"
            raise BrokenImage(path, self._dead[shard]) from None
        size, expected = os.fstat(fd).st_size, int(self.index.shards["nbytes"][shard])
        if size != expected:
            os.close(fd)
            self._dead[shard] = (f"shard is {size} bytes, {expected} when indexed: rebuild the index with "
                                 f"`dinospec index {self.index.root} --force`")
            raise BrokenImage(path, self._dead[shard])
        records = self.index.records(shard)
        self._open[shard] = (fd, np.ascontiguousarray(records["offset"]), np.ascontiguousarray(records["size"]),
                             np.ascontiguousarray(records["label"]))
        while len(self._open) > self.max_open:
            evicted = self._open.popitem(last=False)[1]
            os.close(evicted[0])
        return self._open[shard]

    def read(self, index: int) -> bytes:
        """The image member's bytes; BrokenImage if its shard cannot be read."""
        shard, row = self.locate(index)
        fd, offsets, sizes, _ = self._shard(shard)
        size = int(sizes[row])
        try:
            data = os.pread(fd, size, int(offsets[row]))
        except OSError as e:
            raise BrokenImage(self.describe(index), f"cannot read shard: {e}") from None
        if len(data) != size:
            raise BrokenImage(self.describe(index), f"shard ends early ({len(data)} of {size} bytes)")
        return data

    def _decode(self, data: bytes, index: int) -> Image.Image:
        try:
            return decode_image(io.BytesIO(data), "")
        except BrokenImage as e:  # only now look up the member's name (a header read) for the message
            raise BrokenImage(self.describe(index), e.reason) from None

    def load(self, index: int) -> Image.Image:
        return self._decode(self.read(index), index)

    def read_many(self, indices: Sequence[int]) -> dict[int, bytes | BrokenImage]:
        """The bytes of each distinct index (a failure as its BrokenImage), read in (shard, offset) order."""
        wanted = np.unique(np.asarray(indices, dtype=np.int64))
        if len(wanted) and not 0 <= wanted[0] <= wanted[-1] < len(self):
            raise IndexError(f"samples {wanted[0]}..{wanted[-1]} out of range [0, {len(self)})")
        shards = self.index.starts.searchsorted(wanted, side="right") - 1
        rows = wanted - self.index.starts[shards]
        out: dict[int, bytes | BrokenImage] = {}
        for index, shard, row in zip(wanted.tolist(), shards.tolist(), rows.tolist()):
            try:
                fd, offsets, sizes, _ = self._shard(shard)
                size = int(sizes[row])
                data = os.pread(fd, size, int(offsets[row]))
                if len(data) != size:
                    raise BrokenImage(self.describe(index), f"shard ends early ({len(data)} of {size} bytes)")
                out[index] = data
            except OSError as e:
                out[index] = BrokenImage(self.describe(index), f"cannot read shard: {e}")
            except BrokenImage as e:
                out[index] = e
        return out

    def load_many(self, indices: Sequence[int]) -> list[Image.Image | BrokenImage]:
        """Read in (shard, offset) order (forward through each file), decode in the order asked."""
        data = self.read_many(indices)
        out: list[Image.Image | BrokenImage] = []
        for index in indices:
            raw = data[index]
            try:
                out.append(raw if isinstance(raw, BrokenImage) else self._decode(raw, index))
            except BrokenImage as e:
                out.append(e)
        return out

    def label(self, index: int) -> int:
        if not self.index.labelled:
            return -1
        shard, row = self.locate(index)
        return int(self._shard(shard)[3][row])

    def describe(self, index: int) -> str:
        """shard path:member name (the member's tar header, read on demand: only log messages need it)."""
        shard, row = self.locate(index)
        path = self.index.shard_path(shard)
        try:
            fd, offsets, _, _ = self._shard(shard)
            header = os.pread(fd, 512, int(offsets[row]) - 512)
            name = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").name
        except (OSError, BrokenImage, tarfile.TarError):
            name = f"sample {row}"
        return f"{path}:{name}"
