"""Sample orders computed per position: which dataset index sits at offset `o` of pass `k`, from (seed, k, o).

Three orders, all bijections of [0, N) per pass (every sample exactly once per pass):

- `RandpermOrder`: a full `torch.randperm` per pass, the order dinospec has always used (an N-element array per
  pass: 1.1 GB at 142M samples, so only for small datasets and for runs that must see the same data as before).
- `FeistelOrder`: a full shuffle without a per-sample array: a keyed Feistel cipher over [0, N) (cycle walking
  keeps it inside the range), evaluated on the positions asked for.
- `ShardWindowOrder`: the order for tar shards. Each pass permutes the shards, cuts the permuted list into
  windows of `window` consecutive shards, and shuffles the samples of each window with a keyed Feistel cipher.
  Memory is O(number of shards); a run of consecutive positions reads from `window` shards only, which is what
  lets a worker keep few files open and read forward. What it gives up against a full shuffle: a batch mixes
  samples of `window` shards rather than of the whole dataset (scripts/bench_data_scale.py measures it).

`SourceStream` and `MixtureStream` turn stream positions into (pass, index) sample ids; a mixture interleaves
several sources with fixed weights so that a source's own stream position is also computable from the position.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from dinospec.data.seeds import derive_seed, pass_permutation

SampleId = tuple[int, int]  # (pass, dataset index)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
FEISTEL_ROUNDS = 6
MIXTURE_PERIOD = 10_000  # slots per mixture block: weights hold exactly over every block of this many positions


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixing hash of uint64 values (wrap-around arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(values: np.ndarray, sizes: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Apply, element-wise, the keyed permutation of [0, size) given by (key, size) to `values` (< size).

    A balanced Feistel network over 2h bits (the smallest even width covering size) is a bijection of
    [0, 4^h); re-encrypting until the value falls below size (cycle walking, < 4 rounds expected as 4^h < 4 size)
    restricts it to a bijection of [0, size). All arguments are int64/uint64 arrays of one shape.
    """
    values = np.asarray(values, dtype=np.uint64).copy()
    sizes = np.asarray(sizes, dtype=np.uint64)
    keys = np.asarray(keys, dtype=np.uint64)
    widths, where = np.unique(sizes, return_inverse=True)  # few distinct sizes: exact integer bit lengths
    bits = np.array([max(1, (int(w) - 1).bit_length()) for w in widths], dtype=np.uint64)[where.reshape(sizes.shape)]
    half = (bits + np.uint64(1)) // np.uint64(2)
    mask = (np.uint64(1) << half) - np.uint64(1)
    pending = np.ones(values.shape, dtype=bool)
    while pending.any():
        v, h, m, k = values[pending], half[pending], mask[pending], keys[pending]
        left, right = v >> h, v & m
        with np.errstate(over="ignore"):
            for r in range(FEISTEL_ROUNDS):
                f = _mix64(right ^ _mix64(k + np.uint64(r) * np.uint64(0x9E3779B97F4A7C15))) & m
                left, right = right, left ^ f
        v = (left << h) | right
        values[pending] = v
        pending[pending] = v >= sizes[pending]
    return values.astype(np.int64)


def _key(*parts: int | str) -> int:
    return derive_seed(*parts)


class Order(Protocol):
    """A per-pass bijection of [0, size)."""

    size: int

    def indices(self, pass_index: int, offsets: np.ndarray) -> np.ndarray:
        """Dataset indices at `offsets` (int64 array, each < size) of pass `pass_index`."""
        ...


class RandpermOrder:
    """Today's order: pass k is torch.randperm(size) drawn from (seed, k) (cached for the current pass)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._pass, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, pass_index: int, offsets: np.ndarray) -> np.ndarray:
        if pass_index != self._pass:
            self._perm = pass_permutation(self.seed, pass_index, self.size).numpy()
            self._pass = pass_index
        return self._perm[offsets]


class FeistelOrder:
    """A full shuffle of [0, size) per pass with no per-sample array: a keyed cipher evaluated per position."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed

    def indices(self, pass_index: int, offsets: np.ndarray) -> np.ndarray:
        key = _key(self.seed, pass_index, "feistel")
        n = len(offsets)
        return feistel_permute(offsets, np.full(n, self.size, dtype=np.uint64), np.full(n, key, dtype=np.uint64))


class ShardWindowOrder:
    """Shards permuted per pass, samples shuffled within windows of `window` consecutive (permuted) shards.

    `counts[s]` is the number of samples of shard s; dataset indices are shard-major (shard 0's samples first).
    Memory: a few int64 arrays over shards (cached for the current pass).
    """

    def __init__(self, counts: Sequence[int] | np.ndarray, seed: int, window: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        if window < 1:
            raise ValueError(f"window must be >= 1 shard, got {window}")
        self.window, self.seed = int(window), seed
        self.first = np.concatenate([[0], np.cumsum(self.counts)])  # dataset index of each shard's first sample
        self.size = int(self.first[-1])
        self._pass = -1

    def _prepare(self, pass_index: int) -> None:
        if pass_index == self._pass:
            return
        generator = torch.Generator().manual_seed(_key(self.seed, pass_index, "shards"))  # torch's stream: stable
        self._shards = torch.randperm(len(self.counts), generator=generator).numpy()  # pass order of the shards
        self._starts = np.concatenate([[0], np.cumsum(self.counts[self._shards])])  # pass offset of each
        # pass offset where each window begins, then the end of the pass
        self._window_starts = np.append(self._starts[np.arange(0, len(self.counts), self.window)], self._starts[-1])
        self._pass = pass_index

    def indices(self, pass_index: int, offsets: np.ndarray) -> np.ndarray:
        self._prepare(pass_index)
        offsets = np.asarray(offsets, dtype=np.int64)
        w = np.searchsorted(self._window_starts, offsets, side="right") - 1
        begin, end = self._window_starts[w], self._window_starts[w + 1]
        windows, where = np.unique(w, return_inverse=True)  # a batch spans one or two windows: few keys to derive
        keys = np.array([_key(self.seed, pass_index, int(i), "window") for i in windows], dtype=np.uint64)[where]
        target = begin + feistel_permute(offsets - begin, (end - begin).astype(np.uint64), keys)
        slot = np.searchsorted(self._starts, target, side="right") - 1  # position of the shard in pass order
        shard = self._shards[slot]
        return self.first[shard] + (target - self._starts[slot])


class SourceStream:
    """One dataset's stream: position q is offset q % size of pass q // size of `order`."""

    def __init__(self, order: Order):
        self.order = order
        self.size = order.size

    def ids(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(passes, indices) at stream `positions` (int64 array)."""
        passes, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.size)
        indices = np.empty_like(offsets)
        for p in np.unique(passes):
            sel = passes == p
            indices[sel] = self.order.indices(int(p), offsets[sel])
        return passes, indices


def mixture_counts(weights: Sequence[float], period: int = MIXTURE_PERIOD) -> np.ndarray:
    """Slots per source in every block of `period` positions: the weights, rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
        raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
    exact = w / w.sum() * period
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: period - counts.sum()]] += 1
    if (counts == 0).any():
        raise ValueError(f"a weight below 1/{period} of the total gets no samples: weights {list(weights)}")
    return counts


class MixtureStream:
    """Sources interleaved with fixed weights; position p's source and that source's own position derive from
    (seed, p // period) alone.

    Every block of `period` positions holds exactly counts[s] slots of source s, in an order drawn per block; the
    j-th slot of source s in block b is source position b * counts[s] + j. Sample ids are (pass of the source,
    bases[s] + index in the source): the sources' indices laid end to end, as the concatenated dataset numbers them.
    """

    def __init__(self, sources: Sequence[SourceStream], weights: Sequence[float], seed: int,
                 period: int = MIXTURE_PERIOD):
        self.sources = list(sources)
        self.counts = mixture_counts(weights, period)
        self.bases = np.concatenate([[0], np.cumsum([s.size for s in self.sources])])[:-1]
        self.seed, self.period = seed, period
        self._block = -1

    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank of the slot among its source's slots) for each slot of `block`."""
        if block != self._block:
            generator = torch.Generator().manual_seed(_key(self.seed, block, "mixture"))
            source = np.repeat(np.arange(len(self.counts)), self.counts)[torch.randperm(self.period,
                                                                                          generator=generator).numpy()]
            rank = np.empty(self.period, dtype=np.int64)
            for s in range(len(self.counts)):
                rank[source == s] = np.arange(self.counts[s])
            self._block, self._source, self._rank = block, source, rank
        return self._source, self._rank

    def ids(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        positions = np.asarray(positions, dtype=np.int64)
        blocks, slots = np.divmod(positions, self.period)
        source = np.empty_like(positions)
        local = np.empty_like(positions)
        for b in np.unique(blocks):
            sel = blocks == b
            src, rank = self._layout(int(b))
            source[sel] = src[slots[sel]]
            local[sel] = int(b) * self.counts[src[slots[sel]]] + rank[slots[sel]]
        passes = np.empty_like(positions)
        indices = np.empty_like(positions)
        for s, stream in enumerate(self.sources):
            sel = source == s
            if sel.any():
                passes[sel], idx = stream.ids(local[sel])
                indices[sel] = self.bases[s] + idx
        return passes, indices


def as_sample_ids(passes: np.ndarray, indices: np.ndarray) -> list[SampleId]:
    return list(zip(passes.tolist(), indices.tolist()))
