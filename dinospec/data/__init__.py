"""Data pipeline for pretraining: datasets (folder, file list, indexed tar shards, mixtures), DINOv2 multi-crop
augmentation, iBOT block masks, per-position sample orders, the sharded resumable sample stream and the loader that
ties them together."""

from dinospec.data.augment import BLUR_PROBABILITIES, MultiCropAugmentation
from dinospec.data.datasets import (
    BrokenImage,
    ConcatImages,
    FileListDataset,
    FolderDataset,
    ImageDataset,
    TarShardDataset,
    build_dataset,
    decode_image,
)
from dinospec.data.loader import MultiCropSamples, SSLLoader, build_ssl_loader, collate_multicrop
from dinospec.data.masking import BlockMaskGenerator, SampleMasker
from dinospec.data.order import FeistelOrder, MixtureStream, RandpermOrder, ShardWindowOrder, SourceStream
from dinospec.data.sampler import ShardedStreamSampler, derive_seed, pass_permutation
from dinospec.data.shard_index import ShardIndex, build_index, open_index
from dinospec.data.shards import IndexedTarDataset

__all__ = [
    "BLUR_PROBABILITIES",
    "BlockMaskGenerator",
    "BrokenImage",
    "ConcatImages",
    "FeistelOrder",
    "FileListDataset",
    "FolderDataset",
    "ImageDataset",
    "IndexedTarDataset",
    "MixtureStream",
    "MultiCropAugmentation",
    "MultiCropSamples",
    "RandpermOrder",
    "SSLLoader",
    "SampleMasker",
    "ShardIndex",
    "ShardWindowOrder",
    "ShardedStreamSampler",
    "SourceStream",
    "TarShardDataset",
    "build_dataset",
    "build_index",
    "build_ssl_loader",
    "collate_multicrop",
    "decode_image",
    "derive_seed",
    "open_index",
    "pass_permutation",
]
