"""The sample stream: an infinite, rank-sharded, resumable order of (pass, index) ids.

Which sample sits at stream position p is a stream's business (dinospec.data.order: one source in some per-pass
order, or a weighted mixture of sources), computed from (seed, p) alone. Global step s with global batch
B = world_size * b covers stream positions [s*B, (s+1)*B), of which rank r takes [s*B + r*b, s*B + (r+1)*b). So
the samples of a step do not depend on how the global batch is split across ranks, and the only state is one
integer, the stream position of the next step: resuming there replays exactly what an uninterrupted run would have
seen.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from dinospec.data.order import RandpermOrder, SampleId, SourceStream, as_sample_ids
from dinospec.data.seeds import derive_seed, pass_permutation

__all__ = ["SampleId", "SampleStream", "ShardedStreamSampler", "derive_seed", "pass_permutation"]


class SampleStream(Protocol):
    def ids(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(passes, dataset indices) at the given stream positions."""
        ...


class ShardedStreamSampler:
    """Batch sampler: each iteration step yields this rank's `batch_size` sample ids of the next global step.

    `position` is the stream position where the next global step starts; iteration starts there and advances it
    by the global batch per yielded batch. Use as DataLoader(batch_sampler=...); the loader, not this sampler,
    knows how many batches the training loop has really consumed (see loader.SSLLoader). Without a `stream`, pass
    k is torch.randperm(dataset_size) drawn from (seed, k), the order dinospec has always used.
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 position: int = 0, stream: SampleStream | None = None):
        if dataset_size < 1:
            raise ValueError("the dataset is empty")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got batch_size={batch_size}, "
                             f"rank={rank}, world_size={world_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.position = position
        self.stream = stream if stream is not None else SourceStream(RandpermOrder(dataset_size, seed))

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def ids(self, start: int, count: int) -> list[SampleId]:
        """The sample ids at stream positions [start, start + count)."""
        return as_sample_ids(*self.stream.ids(np.arange(start, start + count, dtype=np.int64)))

    def __iter__(self) -> Iterator[list[SampleId]]:
        while True:
            start = self.position + self.rank * self.batch_size
            batch = self.ids(start, self.batch_size)
            self.position += self.global_batch_size
            yield batch
