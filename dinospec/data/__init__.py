"""Data pipeline for pretraining: datasets (folder, file list, indexed tar shards, mixtures), DINOv2 multi-crop
augmentation, iBOT block masks, per-position sample orders, the sharded resumable sample stream and the loader that
ties them together.

The names below are imported from their modules on first use (PEP 562), so importing a torch-free module of this
package (shard_index, index_cmd: `dinospec index --help`) does not load torch."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "augment": ("BLUR_PROBABILITIES", "MultiCropAugmentation"),
    "datasets": ("BrokenImage", "ConcatImages", "FileListDataset", "FolderDataset", "ImageDataset", "TarShardDataset",
                 "build_dataset", "decode_image"),
    "loader": ("MultiCropSamples", "SSLLoader", "build_ssl_loader", "collate_multicrop"),
    "masking": ("BlockMaskGenerator", "SampleMasker"),
    "order": ("FeistelOrder", "MixtureStream", "RandpermOrder", "ShardWindowOrder", "SourceStream"),
    "sampler": ("ShardedStreamSampler", "derive_seed", "pass_permutation"),
    "shard_index": ("ShardIndex", "build_index", "open_index"),
    "shards": ("IndexedTarDataset",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'dinospec.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dinospec.data.{_MODULE_OF[name]}"), name)
