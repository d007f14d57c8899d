"""Data pipeline: datasets on real image files, broken-file skipping, colour modes, multi-crop augmentation,
iBOT masks, the sharded resumable sampler and the loader (resume, rank and worker equivalence)."""

from __future__ import annotations

import io
import logging
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import photos_dir
from torchvision.transforms.v2 import functional as TF

from dinospec.config import load_config
from dinospec.data import augment as aug_ops
from dinospec.data.augment import BLUR_PROBABILITIES, MultiCropAugmentation
from dinospec.data.datasets import (BrokenImage, FileListDataset, FolderDataset, TarShardDataset, build_dataset,
                                    decode_image)
from dinospec.data.loader import MultiCropSamples, build_ssl_loader
from dinospec.data.shards import IndexedTarDataset
from dinospec.data.masking import BlockMaskGenerator, SampleMasker
from dinospec.data.sampler import ShardedStreamSampler, derive_seed

STAMPS = Path(__file__).resolve().parent / "data" / "tuxstamps"  # 3 bird + 3 fruit images, in the repo


def _photos(n: int) -> list[Path]:
    photos = sorted(photos_dir().glob("*.jpg"))
    assert len(photos) >= n, f"{n} photos wanted, {len(photos)} in {photos_dir()}"
    return photos[:n]


def _stamps(cls: str, n: int) -> list[Path]:
    stamps = sorted((STAMPS / cls).glob("*.jpg"))
    assert len(stamps) >= n, f"{n} {cls} images wanted, {len(stamps)} in {STAMPS / cls}"
    return stamps[:n]


@pytest.fixture
def labelled_tree(tmp_path: Path) -> Path:
    """Two class folders of real tuxstamps images (3 + 3)."""
    root = tmp_path / "labelled"
    for cls in ("bird", "fruit"):
        (root / cls).mkdir(parents=True)
        for f in _stamps(cls, 3):
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture
def photo_tree(tmp_path: Path) -> Path:
    """Real photos, some in the root and some in a nested folder (unlabeled)."""
    root = tmp_path / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    photos = _photos(6)
    for f in photos[:3]:
        shutil.copy(f, root / f.name)
    for f in photos[3:]:
        shutil.copy(f, root / "nested" / "deeper" / f.name)
    (root / "README.txt").write_text("not an image")
    return root


def _tiny_cfg(data_path: Path, *extra: str):
    return load_config(overrides=[
        f"data.path={data_path}", "data.num_workers=0", "data.pin_memory=false", "train.batch_size_per_gpu=2",
        "student.patch_size=8", "crops.global_crops_size=32", "crops.local_crops_size=16",
        "crops.local_crops_number=2", "train.seed=7", *extra])


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        elif key != "num_broken":
            assert a[key] == b[key], key


# ---------------------------------------------------------------------------------------------------------------
# datasets


def test_folder_dataset_takes_labels_from_class_folders(labelled_tree: Path):
    ds = build_dataset(str(labelled_tree))
    assert isinstance(ds, FolderDataset)
    assert ds.classes == ["bird", "fruit"] and len(ds) == 6
    assert [ds.label(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    img = ds.load(4)
    assert img.mode == "RGB" and img.size == (224, 224)


def test_folder_dataset_without_class_folders_is_unlabeled_and_recursive(photo_tree: Path):
    ds = build_dataset(str(photo_tree), kind="folder")
    assert ds.classes == [] and len(ds) == 6  # README.txt is not an image
    assert {ds.label(i) for i in range(6)} == {-1}
    assert sum("deeper" in ds.describe(i) for i in range(6)) == 3
    assert all(ds.load(i).mode == "RGB" for i in range(6))


def test_file_list_with_and_without_labels(tmp_path: Path, labelled_tree: Path):
    files = sorted(labelled_tree.rglob("*.jpg"))
    rel = [f.relative_to(tmp_path) for f in files]
    (tmp_path / "list.txt").write_text(f"# a comment\n{rel[0]} 3\n\n{files[1]},1\n{rel[2]}   0\n")
    ds = build_dataset(str(tmp_path / "list.txt"))
    assert isinstance(ds, FileListDataset) and len(ds) == 3
    assert [ds.label(i) for i in range(3)] == [3, 1, 0] and ds.classes == ["0", "1", "2", "3"]
    assert np.array_equal(np.asarray(ds.load(0)), np.asarray(decode_image(str(files[0]), "x")))

    (tmp_path / "plain.txt").write_text("\n".join(str(r) for r in rel))
    plain = build_dataset(str(tmp_path / "plain.txt"), kind="filelist")
    assert len(plain) == 6 and plain.label(5) == -1 and plain.classes == []

    (tmp_path / "mixed.txt").write_text(f"{rel[0]} 1\n{rel[1]}\n")
    with pytest.raises(ValueError, match="some entries have a label"):
        build_dataset(str(tmp_path / "mixed.txt"))


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_shards_index_group_by_key_and_read_randomly(tmp_path: Path, labelled_tree: Path):
    files = sorted(labelled_tree.rglob("*.jpg"))
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    members0 = []
    for k, f in enumerate(files[:4]):
        members0 += [(f"s/{k:04d}.cls", str(k % 2).encode()), (f"s/{k:04d}.jpg", f.read_bytes())]
    members0.append(("s/9999.json", b"{}"))  # a sample without an image: left out
    _write_shard(shard_dir / "shard-000000.tar", members0)
    _write_shard(shard_dir / "shard-000001.tar", [(f"{k:04d}.jpg", f.read_bytes()) for k, f in
                                                   enumerate(files[4:])] + [("0000.cls", b"1"), ("0001.cls", b"0")])
    scanned = TarShardDataset(sorted(str(p) for p in shard_dir.glob("*.tar")))  # the reader before the index
    for path in (str(shard_dir), str(shard_dir / "shard-*.tar")):
        ds = build_dataset(path)
        assert isinstance(ds, IndexedTarDataset) and len(ds) == 6 == len(scanned)
        assert [ds.describe(i) for i in range(6)] == [scanned.describe(i) for i in range(6)]  # same numbering
        assert [scanned.label(i) for i in range(6)] == [0, 1, 0, 1, 1, 0]
        assert [ds.label(i) for i in range(6)] == [0, 1, 0, 1, 1, 0] and ds.classes == ["0", "1"]
        for i in (5, 0, 3):  # random access, out of order
            expected = decode_image(str(files[i]), "x")
            assert np.array_equal(np.asarray(ds.load(i)), np.asarray(expected))
    single = build_dataset(str(shard_dir / "shard-000001.tar"), kind="tar")
    assert len(single) == 2 and "shard-000001.tar:0001.jpg" in single.describe(1)


def test_build_dataset_errors_are_clear(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        build_dataset(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown dataset kind"):
        build_dataset(str(tmp_path), kind="lmdb")
    with tarfile.open(tmp_path / "compressed.tar", "w:gz") as tar:  # random access needs uncompressed shards
        info = tarfile.TarInfo("0.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ValueError, match="is compressed.*decompress"):
        build_dataset(str(tmp_path / "compressed.tar"))
    with pytest.raises(ValueError, match="compressed shard.*decompress"):
        build_dataset(str(tmp_path / "shard-*.tar.gz"))
    (tmp_path / "list.txt").write_text("a.jpg -1\n")
    with pytest.raises(ValueError, match="negative"):
        build_dataset(str(tmp_path / "list.txt"))


def test_colour_modes_convert_to_rgb(tmp_path: Path):
    grey16 = np.full((6, 6), 40000, dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([255, 255, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "palette_transparent.gif", transparency=0)
    la = Image.new("LA", (6, 6), (100, 255))
    la.putpixel((0, 0), (0, 0))
    la.save(tmp_path / "la.png")
    rgba = Image.new("RGBA", (6, 6), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (6, 6), 77).save(tmp_path / "grey.jpg", quality=100)
    Image.new("1", (6, 6), 1).save(tmp_path / "bilevel.png")

    def pixel(name: str, xy=(3, 3)) -> tuple[int, ...]:
        img = decode_image(str(tmp_path / name), name)
        assert img.mode == "RGB" and img.size == (6, 6)
        return img.getpixel(xy)

    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert pixel("grey16.png") == (156,) * 3  # 40000 / 257 (PIL's own convert would clip to 255)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = pixel("cmyk.jpg")
    assert r > 240 and g < 15 and b < 15  # CMYK (0, 1, 1, 0) is red
    assert pixel("palette.png") == (0, 0, 255) and pixel("palette.png", (0, 0)) == (255, 255, 0)
    assert pixel("palette_transparent.gif", (0, 0)) == (255, 255, 255)  # transparent -> white background
    assert pixel("palette_transparent.gif") == (0, 0, 255)
    assert pixel("la.png") == (100, 100, 100) and pixel("la.png", (0, 0)) == (255, 255, 255)
    assert pixel("rgba.png") == (10, 20, 30) and pixel("rgba.png", (0, 0)) == (255, 255, 255)
    assert pixel("grey.jpg") == (77, 77, 77)
    assert pixel("bilevel.png") == (255, 255, 255)


@pytest.fixture
def broken_tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """Real photos plus real broken files: a truncated JPEG, a zero-byte .jpg, a text file named .jpg."""
    root = tmp_path / "mixed"
    root.mkdir()
    photos = _photos(5)
    for f in photos[:4]:
        shutil.copy(f, root / f.name)
    data = photos[4].read_bytes()
    (root / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "b_empty.jpg").write_bytes(b"")
    (root / "b_text.jpg").write_text("this is not a JPEG\n" * 20)
    return root, ["b_empty.jpg", "b_text.jpg", "b_truncated.jpg"]


def test_broken_files_raise_broken_image(broken_tree):
    root, broken = broken_tree
    ds = build_dataset(str(root))
    assert len(ds) == 7
    failing = []
    for i in range(len(ds)):
        try:
            assert ds.load(i).mode == "RGB"
        except BrokenImage as e:
            failing.append(Path(e.path).name)
    assert sorted(failing) == broken


def test_samples_skip_broken_files_reporting_each_once(broken_tree):
    root, broken = broken_tree
    ds = build_dataset(str(root))
    grid = 32 // 8
    samples = MultiCropSamples(ds, MultiCropAugmentation(32, local_crops_number=1, local_crops_size=16),
                               SampleMasker((grid, grid), 0.5, (0.1, 0.5)), seed=3)
    ids = [(p, i) for p in range(2) for i in range(len(ds))]  # two passes: each broken file met twice
    out = samples.__getitems__(ids[:5]) + [samples[sid] for sid in ids[5:]]  # batch reads and single reads agree
    assert len(samples.broken) == 3
    reports = [r for sample in out for r in sample["broken"]]
    assert sorted(Path(path).name for path, _ in reports) == broken  # each reported once by this process
    broken_index = {i for i in range(len(ds)) if Path(ds.describe(i)).name in broken}
    for sid, sample in zip(ids, out):
        assert sample["sample_id"][1] not in broken_index  # every sample shows a decodable image
        assert (sample["sample_id"] == sid) == (sid[1] not in broken_index)
    fresh = MultiCropSamples(ds, samples.augment, samples.masker, seed=3)  # substitutes are deterministic
    for sid, sample in zip(ids, out):
        again = fresh[sid]
        assert again["sample_id"] == sample["sample_id"] and torch.equal(again["global_crops"], sample["global_crops"])


def test_loader_counts_and_logs_each_broken_file_once_over_workers(broken_tree, caplog):
    """Two workers, three passes: every worker meets every broken file, the run logs and counts each once."""
    root, broken = broken_tree
    loader = build_ssl_loader(_tiny_cfg(root, "data.num_workers=2", "train.batch_size_per_gpu=7"))
    with caplog.at_level(logging.WARNING, logger="dinospec.data.loader"):
        batches = [b for _, b in zip(range(6), loader)]
    logged = [r.getMessage() for r in caplog.records if "broken image" in r.getMessage()]
    assert sorted(Path(m.split()[3]).name for m in logged) == broken
    assert batches[-1]["num_broken"] == 3 and loader.broken.sync() == 3


# ---------------------------------------------------------------------------------------------------------------
# augmentation and masks


def test_colour_ops_match_torchvision_formulas():
    x = TF.pil_to_tensor(Image.open(_photos(1)[0]).convert("RGB").resize((48, 40))).float() / 255
    for f in (0.6, 1.0, 1.4):
        assert torch.allclose(aug_ops.adjust_brightness(x, f), TF.adjust_brightness(x, f), atol=1e-6)
        assert torch.allclose(aug_ops.adjust_contrast(x, f), TF.adjust_contrast(x, f), atol=1e-6)
        assert torch.allclose(aug_ops.adjust_saturation(x, f), TF.adjust_saturation(x, f), atol=1e-6)
    for shift in (-0.1, -0.03, 0.0, 0.07, 0.1):
        assert torch.allclose(aug_ops.adjust_hue(x, shift), TF.adjust_hue(x, shift), atol=1e-5)
    for sigma in (0.1, 0.9, 2.0):
        assert torch.allclose(aug_ops.gaussian_blur(x, sigma), TF.gaussian_blur(x, [9, 9], [sigma, sigma]),
                              atol=1e-5)
    assert torch.equal(aug_ops.solarize(x), TF.solarize(x, 128 / 255))
    assert torch.allclose(aug_ops.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)


def test_blur_probability_tables():
    assert BLUR_PROBABILITIES["intended"] == (1.0, 0.1, 0.5)
    assert BLUR_PROBABILITIES["upstream"] == (0.0, 0.9, 0.5)  # dinov2's GaussianBlur(p) keeps with p
    with pytest.raises(ValueError, match="blur_probabilities"):
        MultiCropAugmentation(blur_probabilities="sometimes")


def test_blur_sigma_range_sets_the_blur_of_the_always_blurred_view():
    """crops.blur_sigma reaches the blur: the same random stream gives the same crops, and global-1 (blurred with
    p 1 in the intended table) keeps more fine detail with a small sigma range than with a large one."""
    image = Image.open(_photos(1)[0]).convert("RGB")

    def detail(blur_sigma):
        aug = MultiCropAugmentation(64, (0.32, 1.0), 0, 32, (0.05, 0.32), blur_sigma=blur_sigma)
        view = aug(image, random.Random(3))[0][0]
        return (view[..., 1:] - view[..., :-1]).abs().mean().item()  # horizontal gradient energy

    assert detail((0.1, 0.2)) > 1.5 * detail((3.0, 4.0))
    with pytest.raises(ValueError, match="blur_sigma"):
        MultiCropAugmentation(blur_sigma=(2.0, 1.0))


def test_multicrop_shapes_dtypes_and_normalisation():
    image = Image.open(_photos(1)[0]).convert("RGB")
    aug = MultiCropAugmentation(64, (0.32, 1.0), 3, 32, (0.05, 0.32))
    global_views, local_views = aug(image, random.Random(0))
    assert global_views.shape == (2, 3, 64, 64) and local_views.shape == (3, 3, 32, 32)
    assert global_views.dtype == local_views.dtype == torch.float32
    lo = (0 - max(aug_ops.IMAGENET_MEAN)) / min(aug_ops.IMAGENET_STD)
    hi = (1 - min(aug_ops.IMAGENET_MEAN)) / min(aug_ops.IMAGENET_STD)
    assert lo - 1e-5 <= global_views.min() and global_views.max() <= hi + 1e-5
    assert not torch.equal(global_views[0], global_views[1])
    _, none = MultiCropAugmentation(64, local_crops_number=0, local_crops_size=32)(image, random.Random(0))
    assert none.shape == (0, 3, 32, 32)


def test_block_masks_statistics():
    grid, p, (lo, hi) = 14, 0.5, (0.1, 0.5)
    masker = SampleMasker((grid, grid), p, (lo, hi))
    masks = torch.cat([masker(random.Random(derive_seed(0, 0, i, "mask"))) for i in range(1500)])  # (3000, 196)
    counts = masks.sum(1).float()
    masked = counts > 0
    assert abs(masked.float().mean().item() - p) < 0.04
    ratios = counts[masked] / grid**2
    # DINOv2's generator stops short of the target when a block no longer fits: mean a bit under (lo + hi) / 2
    assert 0.25 < ratios.mean().item() <= (lo + hi) / 2 and ratios.max().item() <= hi
    assert (ratios < 0.2).float().mean() > 0.1 and (ratios > 0.4).float().mean() > 0.1  # spread over the range
    grids = masks[masked].view(-1, grid, grid)
    padded = torch.nn.functional.pad(grids, (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    assert (neighbours[grids]).float().mean() > 0.97  # blocks, not scattered patches
    # one block at most half the grid, at least 4 patches (DINOv2's limits)
    single = BlockMaskGenerator((grid, grid))(grid * grid, random.Random(1))
    assert 4 <= single.sum() <= grid * grid


# ---------------------------------------------------------------------------------------------------------------
# sampler


def test_sampler_one_rank_equals_two_ranks_concatenated():
    n, b, steps = 10, 3, 9  # crosses pass boundaries mid-batch
    one = iter(ShardedStreamSampler(n, 2 * b, rank=0, world_size=1, seed=5))
    ranks = [iter(ShardedStreamSampler(n, b, rank=r, world_size=2, seed=5)) for r in range(2)]
    stream = []
    for _ in range(steps):
        whole = next(one)
        assert whole == next(ranks[0]) + next(ranks[1])
        stream += whole
    for k in range(len(stream) // n):  # each pass is a permutation of the dataset
        assert sorted(i for p, i in stream[k * n:(k + 1) * n] if p == k) == list(range(n))
    orders = [[i for p, i in stream if p == k] for k in range(3)]
    assert orders[0] != orders[1] != orders[2]
    other_seed = ShardedStreamSampler(n, 2 * b, seed=6).ids(0, n)
    assert other_seed != stream[:n]


def test_sampler_resume_continues_the_same_stream():
    full = iter(ShardedStreamSampler(7, 2, rank=1, world_size=3, seed=1))
    expected = [next(full) for _ in range(8)]
    first = ShardedStreamSampler(7, 2, rank=1, world_size=3, seed=1)
    it = iter(first)
    got = [next(it) for _ in range(3)]
    assert first.position == 3 * 6  # 3 steps of the global batch (2 per rank x 3 ranks)
    it = iter(ShardedStreamSampler(7, 2, rank=1, world_size=3, seed=1, position=first.position))
    got += [next(it) for _ in range(5)]
    assert got == expected


# ---------------------------------------------------------------------------------------------------------------
# loader


def test_loader_batch_layout(labelled_tree: Path):
    cfg = _tiny_cfg(labelled_tree)
    loader = build_ssl_loader(cfg, rank=0, world_size=1, start_step=0)
    batch = next(iter(loader))
    b, n_patches = 2, (32 // 8) ** 2
    assert batch["global_crops"].shape == (2 * b, 3, 32, 32) and batch["global_crops"].dtype == torch.float32
    assert batch["local_crops"].shape == (2 * b, 3, 16, 16)
    assert batch["masks"].shape == (2 * b, n_patches) and batch["masks"].dtype == torch.bool
    assert batch["sample_ids"].shape == (b, 2) and batch["labels"].shape == (b,) and batch["num_broken"] == 0
    for j, (p, i) in enumerate(batch["sample_ids"].tolist()):
        sample = loader.samples[(p, i)]
        assert batch["labels"][j] == loader.samples.images.label(i)
        for crop in range(2):  # crop-major: [crop 0 of every sample, crop 1 of every sample]
            assert torch.equal(batch["global_crops"][crop * b + j], sample["global_crops"][crop])
            assert torch.equal(batch["local_crops"][crop * b + j], sample["local_crops"][crop])
            assert torch.equal(batch["masks"][crop * b + j], sample["masks"][crop])
    no_local = next(iter(build_ssl_loader(_tiny_cfg(labelled_tree, "crops.local_crops_number=0"))))
    assert no_local["local_crops"] is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resume_is_exact(labelled_tree: Path, num_workers: int):
    cfg = _tiny_cfg(labelled_tree, f"data.num_workers={num_workers}")
    loader = build_ssl_loader(cfg, rank=0, world_size=1, start_step=0)
    it = iter(loader)
    [next(it) for _ in range(2)]
    position = loader.position  # workers have prefetched beyond batch 2 by now
    expected = [next(it) for _ in range(4)]  # crosses into pass 1 (6 images, 2 per step)
    assert position == 2 * 2
    again = iter(loader)  # a new iteration continues after the last batch handed out, not after prefetched ones
    _assert_batches_equal(next(again), next(iter(build_ssl_loader(cfg, rank=0, world_size=1, start_step=6))))
    it2 = iter(build_ssl_loader(cfg, rank=0, world_size=1, start_step=position // 2))  # global batch 2
    for want in expected:
        _assert_batches_equal(next(it2), want)
    by_step = next(iter(build_ssl_loader(cfg, rank=0, world_size=1, start_step=2)))
    _assert_batches_equal(by_step, expected[0])
    assert {p for p, _ in torch.cat([e["sample_ids"] for e in expected]).tolist()} == {0, 1}


def test_samples_do_not_depend_on_ranks_or_workers(labelled_tree: Path):
    """One rank with batch 4 (2 worker processes) == two ranks with batch 2 (in-process), bitwise; another pass
    of the same image gives other views."""
    one = build_ssl_loader(_tiny_cfg(labelled_tree, "train.batch_size_per_gpu=4", "data.num_workers=2"), 0, 1)
    whole = [b for _, b in zip(range(2), one)]
    parts = [[b for _, b in zip(range(2), build_ssl_loader(_tiny_cfg(labelled_tree), r, 2))] for r in range(2)]
    for step in range(2):
        halves = [parts[0][step], parts[1][step]]
        assert torch.equal(whole[step]["sample_ids"], torch.cat([h["sample_ids"] for h in halves]))
        for key in ("global_crops", "local_crops", "masks"):
            crops = [h[key].view(2, 2, *h[key].shape[1:]) for h in halves]  # (crop, sample, ...)
            assert torch.equal(whole[step][key], torch.cat(crops, dim=1).flatten(0, 1)), key
    samples = one.samples
    index = whole[0]["sample_ids"][0, 1].item()
    assert not torch.equal(samples[(0, index)]["global_crops"], samples[(1, index)]["global_crops"])


def test_views_do_not_depend_on_torch_thread_count():
    """Workers run 1 torch thread, the main process several: large crops must still give the same bits."""
    image = Image.open(_photos(1)[0]).convert("RGB")
    aug = MultiCropAugmentation(224, (0.9, 1.0), 0, 32)
    threads = torch.get_num_threads()
    try:
        views = []
        for n in (1, 2):
            torch.set_num_threads(n)
            views.append(torch.cat([aug(image, random.Random(seed))[0] for seed in range(6)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(views[0], views[1])
