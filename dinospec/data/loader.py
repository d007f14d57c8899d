"""The pretraining loader: sample ids from the sharded stream -> decoded, augmented, masked batches.

A batch (per rank, b samples, L local crops) is a dict:
  global_crops (2b, 3, G, G) float   [crop 0 of every sample, then crop 1] (DINOv2's order)
  local_crops  (L*b, 3, l, l) float  ordered by crop index, then sample; None when L == 0
  masks        (2b, N) bool          iBOT masks of the global crops, N = (G / patch_size)^2
  sample_ids   (b, 2) long           (pass, dataset index) of the image each sample shows
  labels       (b,) long             -1 when the dataset is unlabeled
  num_broken   int                   distinct broken files this rank's loader has met so far (over its workers;
                                     SSLLoader.broken.sync() gives the run's count over ranks)

Everything random about a sample derives from (train.seed, pass, index), so a sample is bitwise the same whatever
the number of ranks or workers, and a loader built with `start_step` (stream position step x global batch) resumes
exactly; `SSLLoader.position` is the position after the last batch the training loop *received*, not the last one
prefetched.
"""

from __future__ import annotations

import logging
import random
import signal
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinospec.data.augment import MultiCropAugmentation
from dinospec.data.broken import BrokenFiles, Report
from dinospec.data.datasets import BrokenImage, ConcatImages, ImageDataset, build_dataset
from dinospec.data.masking import SampleMasker
from dinospec.data.order import FeistelOrder, MixtureStream, RandpermOrder, ShardWindowOrder, SourceStream
from dinospec.data.sampler import SampleId, ShardedStreamSampler, derive_seed

log = logging.getLogger(__name__)
MAX_SUBSTITUTE_TRIES = 100


class MultiCropSamples(Dataset):
    """Map-style dataset keyed by sample id (pass, index): one sample's views, masks and label.

    A broken file is replaced by a substitute image chosen deterministically from (seed, pass, index, try); the
    views keep the random stream of the slot being filled, so a substitute never repeats the views its own slot
    gets. Each process skips the files it already knows to be broken and reports each one once (the sample's
    "broken" list); counting and logging over workers and ranks is the loader's (dinospec.data.broken).
    """

    def __init__(self, images: ImageDataset, augment: MultiCropAugmentation, masker: SampleMasker, seed: int):
        self.images = images
        self.augment = augment
        self.masker = masker
        self.seed = seed
        self.broken: set[int] = set()  # per process (each worker has its own copy)
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, pass_index: int, index: int, first: Image.Image | BrokenImage | None,
              reports: list[Report]) -> tuple[int, Image.Image]:
        candidate = index
        for attempt in range(1, MAX_SUBSTITUTE_TRIES + 1):
            if candidate not in self.broken:
                result = first if attempt == 1 and first is not None else None
                try:
                    if result is None:
                        result = self.images.load(candidate)
                    if isinstance(result, BrokenImage):
                        raise result
                    return candidate, result
                except BrokenImage as e:
                    self.broken.add(candidate)
                    if e.path not in self._reported:
                        self._reported.add(e.path)
                        reports.append((e.path, e.reason))
            candidate = derive_seed(self.seed, pass_index, index, "substitute", attempt) % len(self.images)
        raise RuntimeError(f"no decodable image found in {MAX_SUBSTITUTE_TRIES} tries around sample {index} "
                           f"({len(self.broken)} broken files seen); is the dataset mostly broken?")

    def _sample(self, sample_id: SampleId, first: Image.Image | BrokenImage | None) -> dict[str, Any]:
        pass_index, index = sample_id
        reports: list[Report] = []
        used, image = self._load(pass_index, index, first, reports)
        global_views, local_views = self.augment(image, random.Random(derive_seed(self.seed, pass_index, index,
                                                                                  "augment")))
        masks = self.masker(random.Random(derive_seed(self.seed, pass_index, index, "mask")))
        return {"global_crops": global_views, "local_crops": local_views, "masks": masks,
                "sample_id": (pass_index, used), "label": self.images.label(used), "broken": reports}

    def __getitem__(self, sample_id: SampleId) -> dict[str, Any]:
        return self._sample(sample_id, None)

    def __getitems__(self, sample_ids: list[SampleId]) -> list[dict[str, Any]]:
        """A batch: its images read together (tar shards: in file order), then each sample as __getitem__."""
        wanted = [i for _, i in sample_ids]
        firsts = self.images.load_many([i for i in wanted if i not in self.broken])
        preloaded = dict(zip((i for i in wanted if i not in self.broken), firsts))
        return [self._sample((p, i), preloaded.get(i)) for p, i in sample_ids]


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
        "broken": [report for s in samples for report in s["broken"]],
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
                 pin_memory: bool = False, broken: BrokenFiles | None = None):
        self.samples = samples
        self.sampler = sampler
        self.broken = BrokenFiles() if broken is None else broken  # the run's record (a resumed run's too)
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
        alone = not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1)
        for batch in self._loader:
            self._position += self.sampler.global_batch_size
            self.broken.add(batch.pop("broken"))
            if alone:  # no other rank to merge with: log new broken files as they come
                self.broken.sync()
            batch["num_broken"] = self.broken.local_count()
            yield batch



def _order(images: ImageDataset, name: str, seed: int, window: int):
    """The per-pass order `name` (auto: shard windows for tar shards, today's randperm otherwise)."""
    counts = getattr(images, "shard_counts", None)
    if name == "auto":
        name = "shard_window" if counts is not None else "randperm"
    if name == "shard_window":
        if counts is None:
            raise ValueError(f"data.order=shard_window needs tar shards; {type(images).__name__} has none "
                             f"(use randperm or feistel)")
        return ShardWindowOrder(counts, seed, window)
    if name == "feistel":
        return FeistelOrder(len(images), seed)
    return RandpermOrder(len(images), seed)


def build_images_and_stream(data_cfg, seed: int) -> tuple[ImageDataset, SourceStream | MixtureStream]:
    """The dataset (one source, or the sources of `data.sources` laid end to end) and its sample stream.

    One source keeps today's seeds, so data.order=randperm reproduces earlier runs exactly; source k of a mixture
    draws its order from derive_seed(seed, "source", k).
    """
    def open_source(path: str, kind: str) -> ImageDataset:
        return build_dataset(path, kind, max_open_shards=data_cfg.max_open_shards,
                             index_workers=data_cfg.index_workers)

    sources = list(data_cfg.get("sources") or [])
    if not sources:
        images = open_source(data_cfg.path, data_cfg.kind)
        return images, SourceStream(_order(images, data_cfg.order, seed, data_cfg.window_shards))
    parts = [open_source(src.path, src.get("kind", "auto")) for src in sources]
    streams = [SourceStream(_order(part, data_cfg.order, derive_seed(seed, "source", k), data_cfg.window_shards))
               for k, part in enumerate(parts)]
    return ConcatImages(parts), MixtureStream(streams, [float(src.get("weight", 1.0)) for src in sources], seed)


def build_ssl_loader(cfg, rank: int = 0, world_size: int = 1, start_step: int = 0,
                     broken: BrokenFiles | None = None) -> SSLLoader:
    """The rank's loader for run config `cfg` (data.*, crops.*, ibot.*, student.patch_size, train.*), starting at
    global step `start_step`, reporting broken files into `broken` (the run's record; default: a new one)."""
    images, stream = build_images_and_stream(cfg.data, cfg.train.seed)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    masker = SampleMasker((grid, grid), cfg.ibot.mask_sample_probability, tuple(cfg.ibot.mask_ratio_min_max))
    samples = MultiCropSamples(images, MultiCropAugmentation.from_config(cfg.crops), masker, cfg.train.seed)
    b = cfg.train.batch_size_per_gpu
    sampler = ShardedStreamSampler(len(images), b, rank, world_size, cfg.train.seed,
                                   position=start_step * b * world_size, stream=stream)
    what = ", ".join(f"{s.path} (weight {s.get('weight', 1.0)})" for s in cfg.data.sources) if cfg.data.get(
        "sources") else cfg.data.path
    log.info("data: %d images from %s (%s, order %s), %d classes; rank %d/%d takes %d per step", len(images),
             what, type(images).__name__, cfg.data.order, len(images.classes), rank, world_size, b)
    pin = bool(cfg.data.pin_memory) and torch.cuda.is_available()
    return SSLLoader(samples, sampler, num_workers=cfg.data.num_workers, pin_memory=pin, broken=broken)
