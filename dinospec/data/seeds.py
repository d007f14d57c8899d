"""Seeds derived from tuples: everything random about the data stream comes from (seed, ...) through here."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple such as (seed, pass, index, "augment"): stable across processes, machines and
    Python versions (unlike hash()), and unrelated for neighbouring tuples."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def pass_permutation(seed: int, pass_index: int, size: int) -> torch.Tensor:
    """The dataset order of one pass over `size` samples: a permutation drawn from (seed, pass)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, pass_index, "permutation"))
    return torch.randperm(size, generator=generator)
