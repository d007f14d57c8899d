"""Data pipeline for pretraining: datasets (folder, file list, tar shards), DINOv2 multi-crop augmentation, iBOT
block masks, the sharded resumable sample stream and the loader that ties them together."""

from dinospec.data.augment import BLUR_PROBABILITIES, MultiCropAugmentation
from dinospec.data.datasets import (
    BrokenImage,
    FileListDataset,
    FolderDataset,
    ImageDataset,
    TarShardDataset,
    build_dataset,
    decode_image,
)
from dinospec.data.loader import MultiCropSamples, SSLLoader, build_ssl_loader, collate_multicrop
from dinospec.data.masking import BlockMaskGenerator, SampleMasker
from dinospec.data.sampler import ShardedStreamSampler, derive_seed, pass_permutation

__all__ = [
    "BLUR_PROBABILITIES",
    "BlockMaskGenerator",
    "BrokenImage",
    "FileListDataset",
    "FolderDataset",
    "ImageDataset",
    "MultiCropAugmentation",
    "MultiCropSamples",
    "SSLLoader",
    "SampleMasker",
    "ShardedStreamSampler",
    "TarShardDataset",
    "build_dataset",
    "build_ssl_loader",
    "collate_multicrop",
    "decode_image",
    "derive_seed",
    "pass_permutation",
]
