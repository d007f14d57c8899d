"""The pretraining loader: sample ids from the sharded stream -> decoded, augmented, masked batches.

A batch (per rank, b samples, L local crops) is a dict:
  global_crops (2b, 3, G, G) float   [crop 0 of every sample, then crop 1] (DINOv2's order)
  local_crops  (L*b, 3, l, l) float  ordered by crop index, then sample; None when L == 0
  masks        (2b, N) bool          iBOT masks of the global crops, N = (G / patch_size)^2
  sample_ids   (b, 2) long           (pass, dataset index) of the image each sample shows
  labels       (b,) long             -1 when the dataset is unlabeled
  num_broken   int                   distinct broken files the producing process has skipped so far

Everything random about a sample derives from (train.seed, pass, index), so a sample is bitwise the same whatever
the number of ranks or workers, and `state_dict()` (the stream position after the last batch the training loop
*received*, not the last one prefetched) resumes exactly.
"""

from __future__ import annotations

import logging
import random
import signal
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from dinospec.data.augment import MultiCropAugmentation
from dinospec.data.datasets import BrokenImage, ImageDataset, build_dataset
from dinospec.data.masking import SampleMasker
from dinospec.data.sampler import SampleId, ShardedStreamSampler, derive_seed

log = logging.getLogger(__name__)
MAX_SUBSTITUTE_TRIES = 100


class MultiCropSamples(Dataset):
    """Map-style dataset keyed by sample id (pass, index): one sample's views, masks and label.

    A broken file is counted and logged once (per process) and replaced by a substitute image chosen
    deterministically from (seed, pass, index, try); the views keep the random stream of the slot being filled, so
    a substitute never repeats the views its own slot gets.
    """

    def __init__(self, images: ImageDataset, augment: MultiCropAugmentation, masker: SampleMasker, seed: int):
        self.images = images
        self.augment = augment
        self.masker = masker
        self.seed = seed
        self.broken: set[int] = set()  # per process (each worker has its own copy)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, pass_index: int, index: int):
        candidate = index
        for attempt in range(1, MAX_SUBSTITUTE_TRIES + 1):
            if candidate not in self.broken:
                try:
                    return candidate, self.images.load(candidate)
                except BrokenImage as e:
                    self.broken.add(candidate)
                    log.warning("skipping broken image %s (%s); %d broken so far", e.path, e.reason,
                                len(self.broken))
            candidate = derive_seed(self.seed, pass_index, index, "substitute", attempt) % len(self.images)
        raise RuntimeError(f"no decodable image found in {MAX_SUBSTITUTE_TRIES} tries around sample {index} "
                           f"({len(self.broken)} broken files seen); is the dataset mostly broken?")

    def __getitem__(self, sample_id: SampleId) -> dict[str, Any]:
        pass_index, index = sample_id
        used, image = self._load(pass_index, index)
        global_views, local_views = self.augment(image, random.Random(derive_seed(self.seed, pass_index, index,
                                                                                  "augment")))
        masks = self.masker(random.Random(derive_seed(self.seed, pass_index, index, "mask")))
        return {"global_crops": global_views, "local_crops": local_views, "masks": masks,
                "sample_id": (pass_index, used), "label": self.images.label(used), "num_broken": len(self.broken)}


def collate_multicrop(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample views -> DINOv2's crop-major batch layout (see the module docstring)."""
    global_crops = torch.stack([s["global_crops"] for s in samples], dim=1).flatten(0, 1)  # (2, b, ...) -> (2b, ...)
    local = [s["local_crops"] for s in samples]
    local_crops = torch.stack(local, dim=1).flatten(0, 1) if local[0].shape[0] else None  # (L*b, 3, l, l)
    masks = torch.stack([s["masks"] for s in samples], dim=1).flatten(0, 1)  # (2, b, N) -> (2b, N)
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "sample_ids": torch.tensor([s["sample_id"] for s in samples], dtype=torch.long),  # (b, 2)
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "num_broken": max(s["num_broken"] for s in samples),
    }


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1/SIGUSR2 to the main process.

    SLURM, timeout and torchrun signal the whole process group: a worker killed by the default handler would make
    the loader raise in the middle of the graceful save the trainer does on those signals.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class SSLLoader:
    """Infinite iterable of batches with an exact-resume position.

    Each `iter()` starts at the position after the last batch handed out, so batches prefetched by workers but
    never received are produced again rather than skipped.
    """

    def __init__(self, samples: MultiCropSamples, sampler: ShardedStreamSampler, num_workers: int = 0,
                 pin_memory: bool = False):
        self.samples = samples
        self.sampler = sampler
        self._position = sampler.position
        self._loader = DataLoader(samples, batch_sampler=sampler, num_workers=num_workers,
                                  collate_fn=collate_multicrop, pin_memory=pin_memory,
                                  persistent_workers=num_workers > 0, worker_init_fn=_ignore_stop_signals,
                                  # a private generator: the loader's base seed must not draw from the training
                                  # RNG stream (drop-path), or a resumed run would diverge from an uninterrupted one
                                  generator=torch.Generator().manual_seed(samples.seed))

    @property
    def position(self) -> int:
        """Stream position of the next batch this loader will hand out (its global step * global batch)."""
        return self._position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.position = self._position
        for batch in self._loader:
            self._position += self.sampler.global_batch_size
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position, "global_batch_size": self.sampler.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state` (takes effect at the next iter())."""
        if state.get("global_batch_size", self.sampler.global_batch_size) != self.sampler.global_batch_size:
            log.warning("resuming a stream written with global batch %d at global batch %d: the stream stays "
                        "exact, step numbers no longer map to the same samples",
                        state["global_batch_size"], self.sampler.global_batch_size)
        self._position = int(state["position"])


def build_ssl_loader(cfg, rank: int = 0, world_size: int = 1, start_step: int = 0) -> SSLLoader:
    """The rank's loader for run config `cfg` (data.*, crops.*, ibot.*, student.patch_size, train.*), starting at
    global step `start_step`."""
    images = build_dataset(cfg.data.path, cfg.data.kind)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    masker = SampleMasker((grid, grid), cfg.ibot.mask_sample_probability, tuple(cfg.ibot.mask_ratio_min_max))
    samples = MultiCropSamples(images, MultiCropAugmentation.from_config(cfg.crops), masker, cfg.train.seed)
    b = cfg.train.batch_size_per_gpu
    sampler = ShardedStreamSampler(len(images), b, rank, world_size, cfg.train.seed,
                                   position=start_step * b * world_size)
    log.info("data: %d images from %s (%s), %d classes; rank %d/%d takes %d per step", len(images),
             cfg.data.path, type(images).__name__, len(images.classes), rank, world_size, b)
    pin = bool(cfg.data.pin_memory) and torch.cuda.is_available()
    return SSLLoader(samples, sampler, num_workers=cfg.data.num_workers, pin_memory=pin)
