"""The sample stream: an infinite, rank-sharded, resumable order of (pass, index) ids.

Pass k is a permutation of the dataset drawn from (seed, k); the global stream is pass 0, then pass 1, ...
Global step s with global batch B = world_size * b covers stream positions [s*B, (s+1)*B), of which rank r takes
[s*B + r*b, s*B + (r+1)*b). So the samples of a step do not depend on how the global batch is split across ranks,
and the only state is one integer, the stream position of the next step: resuming there replays exactly what an
uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch

SampleId = tuple[int, int]  # (pass, dataset index)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, pass, index, "augment"): stable across processes, machines and
    Python versions (unlike hash()), and unrelated for neighbouring tuples."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pass_permutation(seed: int, pass_index: int, size: int) -> torch.Tensor:
    """The dataset order of one pass over `size` samples: a permutation drawn from (seed, pass)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, pass_index, "permutation"))
    return torch.randperm(size, generator=generator)


class ShardedStreamSampler:
    """Batch sampler: each iteration step yields this rank's `batch_size` sample ids of the next global step.

    `position` is the stream position where the next global step starts; iteration starts there and advances it
    by the global batch per yielded batch. Use as DataLoader(batch_sampler=...); the loader, not this sampler,
    knows how many batches the training loop has really consumed (see loader.SSLLoader).
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 position: int = 0):
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
        self._cached_pass = -1
        self._cached_order = torch.empty(0, dtype=torch.long)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _order(self, pass_index: int) -> torch.Tensor:
        if pass_index != self._cached_pass:
            self._cached_order = pass_permutation(self.seed, pass_index, self.dataset_size)
            self._cached_pass = pass_index
        return self._cached_order

    def ids(self, start: int, count: int) -> list[SampleId]:
        """The sample ids at stream positions [start, start + count)."""
        out: list[SampleId] = []
        position, end = start, start + count
        while position < end:
            pass_index, offset = divmod(position, self.dataset_size)
            take = min(end - position, self.dataset_size - offset)
            out.extend((pass_index, int(i)) for i in self._order(pass_index)[offset:offset + take].tolist())
            position += take
        return out

    def __iter__(self) -> Iterator[list[SampleId]]:
        while True:
            start = self.position + self.rank * self.batch_size
            batch = self.ids(start, self.batch_size)
            self.position += self.global_batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])
