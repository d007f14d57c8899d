"""Frozen-backbone evaluation: k-NN, linear and segmentation probes, mIoU, and the `dinospec eval` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dinospec.eval.features import SegmentationFolder, extract_features, image_folder
from dinospec.eval.knn import knn_accuracy, knn_eval_during_training
from dinospec.eval.linear import linear_probe, stratified_split
from dinospec.eval.segmentation import confusion_matrix, miou, per_class_iou, pixel_accuracy, seg_probe
from dinospec.models.vit import VisionTransformer

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO / "data" / "eval" / "fashion_mnist"
SEG = REPO / "data" / "eval" / "tuxstamps_seg"




def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, **kw)


# ----------------------------------------------------------------------------------------------------------------
# k-NN


def test_knn_on_separable_features_with_known_mislabels():
    """Three classes on three orthogonal axes; 2 of 15 val samples carry a wrong label: accuracy is 13/15."""
    gen = torch.Generator().manual_seed(0)
    axes = torch.eye(3, 8)
    train_y = torch.arange(3).repeat_interleave(10)
    train_x = axes[train_y] * 5 + 0.05 * torch.randn(30, 8, generator=gen)  # scale: k-NN normalises anyway
    val_true = torch.arange(3).repeat_interleave(5)
    val_x = axes[val_true] + 0.05 * torch.randn(15, 8, generator=gen)
    val_y = val_true.clone()
    val_y[[0, 7]] = torch.tensor([2, 0])
    acc = knn_accuracy(train_x, train_y, val_x, val_y, ks=(1, 10, 20))
    for k in (1, 10, 20):
        assert acc[k] == pytest.approx(13 / 15)


def test_knn_votes_are_weighted_by_similarity():
    """One neighbour of class 0 at cos 1.0 against two of class 1 at cos 0.9: with T = 0.07 the close one wins
    (e^(1/0.07) > 2 e^(0.9/0.07)); with T = 10 the weights are nearly equal and the majority wins."""
    s = math.sqrt(1 - 0.9**2)
    train_x = torch.tensor([[1.0, 0.0], [0.9, s], [0.9, -s]])
    train_y = torch.tensor([0, 1, 1])
    query, label0 = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert math.exp(1 / 0.07) > 2 * math.exp(0.9 / 0.07) and math.exp(1 / 10) < 2 * math.exp(0.9 / 10)
    assert knn_accuracy(train_x, train_y, query, label0, ks=(3,), temperature=0.07)[3] == 1.0
    assert knn_accuracy(train_x, train_y, query, label0, ks=(3,), temperature=10.0)[3] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# confusion matrix and mIoU


def test_confusion_matrix_and_miou_by_hand():
    # 4 classes; class 3 is absent from both target and prediction; 255 pixels are ignored whatever is predicted
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 1]])
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    expected = torch.tensor([[1, 1, 0, 0],   # gt 0: one right, one predicted as 1
                             [0, 2, 0, 0],   # gt 1: both right
                             [1, 0, 1, 0],   # gt 2: one right, one predicted as 0
                             [0, 0, 0, 0]])  # gt 3: absent (the 3 predicted on an ignored pixel does not count)
    assert torch.equal(conf, expected)
    # IoU: class 0 = 1 / (2 + 2 - 1) = 1/3, class 1 = 2 / (2 + 3 - 2) = 2/3, class 2 = 1 / (2 + 1 - 1) = 1/2
    iou = per_class_iou(conf)
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(iou[3])
    assert miou(conf) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)  # class 3 excluded from the mean
    assert pixel_accuracy(conf) == pytest.approx(4 / 6)


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), num_classes=3)
    assert miou(conf) == pytest.approx((1 / 2 + 0.0) / 2)


def test_confusion_matrix_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), num_classes=3)


# ----------------------------------------------------------------------------------------------------------------
# probes on toy features


def blobs(n_per_class: int, classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 4
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=gen), y


def test_linear_probe_learns_a_separable_problem_deterministically():
    train_x, train_y = blobs(20, 4, 16, seed=0)
    val_x, val_y = blobs(10, 4, 16, seed=1)
    r1 = linear_probe(train_x, train_y, val_x, val_y, l2s=(1e-1, 1e-3))
    r2 = linear_probe(train_x, train_y, val_x, val_y, l2s=(1e-1, 1e-3))
    assert r1["top1"] == 100.0 and r1 == r2
    assert "held out" in r1["selection"] and set(r1["selection_top1_by_l2"]) == {"0.1", "0.001"}
    on_val = linear_probe(train_x, train_y, val_x, val_y, l2s=(1e-2,), holdout=0)
    assert on_val["selection"].startswith("best on val")


def test_linear_probe_is_at_chance_on_random_labels():
    train_x, _ = blobs(20, 4, 16, seed=0)
    val_x, _ = blobs(50, 4, 16, seed=1)
    gen = torch.Generator().manual_seed(5)
    r = linear_probe(train_x, torch.randint(4, (80,), generator=gen), val_x, torch.randint(4, (200,), generator=gen),
                     l2s=(1e-2,))
    assert r["top1"] < 40.0  # chance is 25%: the probe cannot read labels that the features do not hold


def _fashion_pixels(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels of the bundled real Fashion-MNIST sample: ill-conditioned features (many near-constant pixels)."""
    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parent.parent / "data" / "eval" / "fashion_mnist" / split
    xs, ys = [], []
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for f in sorted(folder.glob("*.png")):
            xs.append(np.asarray(Image.open(f).convert("L"), dtype=np.float32).reshape(-1) / 255.0)
            ys.append(label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys)


def test_linear_probe_converges_to_scikit_learns_logistic_regression():
    """The probe minimises the same objective as sklearn's L-BFGS LogisticRegression and lands on its solution."""
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    from dinospec.eval.linear import fit_logistic, logistic_objective, standardize

    train_x, train_y = _fashion_pixels("train")
    val_x, val_y = _fashion_pixels("val")
    tr, va = standardize(train_x, val_x)
    l2 = 1e-2
    ours = fit_logistic(tr, train_y, 10, l2=l2)
    ref = sklearn_linear.LogisticRegression(C=1.0 / (l2 * len(tr)), max_iter=5000, tol=1e-8)
    ref.fit(tr.double().numpy(), train_y.numpy())
    ref_head = torch.nn.Linear(tr.shape[1], 10, dtype=torch.float64)
    with torch.no_grad():
        ref_head.weight.copy_(torch.from_numpy(ref.coef_))
        ref_head.bias.copy_(torch.from_numpy(ref.intercept_))
    with torch.no_grad():
        ours_obj = float(logistic_objective(ours, tr.double(), train_y, l2))
        ref_obj = float(logistic_objective(ref_head, tr.double(), train_y, l2))
    assert ours_obj <= ref_obj + 1e-6, (ours_obj, ref_obj)  # converged at least as far as the reference
    ours_acc = (ours(va.double()).argmax(1) == val_y).float().mean().item()
    ref_acc = float((ref.predict(va.double().numpy()) == val_y.numpy()).mean())
    assert abs(ours_acc - ref_acc) <= 0.01

    # the whole probe (l2 picked on a held-out part of train) within 1 point of sklearn with the same selection
    result = linear_probe(train_x, train_y, val_x, val_y, l2s=(1e-1, 1e-2, 1e-3))
    fit_idx, held_idx = stratified_split(train_y, 0.2, 0)
    scores = {}
    for c_l2 in sorted(result["selection_top1_by_l2"], key=float, reverse=True):
        m = sklearn_linear.LogisticRegression(C=1.0 / (float(c_l2) * len(fit_idx)), max_iter=5000, tol=1e-8)
        m.fit(tr[fit_idx].numpy(), train_y[fit_idx].numpy())
        scores[c_l2] = (m.predict(tr[held_idx].numpy()) == train_y[held_idx].numpy()).mean()
    best = max(scores, key=lambda k: scores[k])
    m = sklearn_linear.LogisticRegression(C=1.0 / (float(best) * len(tr)), max_iter=5000, tol=1e-8)
    m.fit(tr.numpy(), train_y.numpy())
    sk_top1 = 100.0 * float((m.predict(va.numpy()) == val_y.numpy()).mean())
    assert abs(result["top1"] - sk_top1) <= 1.0 + 1e-4, (result["top1"], sk_top1)
    assert result["top1"] > 60.0  # raw pixels of Fashion-MNIST are well above chance (10%) for a converged probe


def test_stratified_split_holds_out_every_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2)
    fit, held = stratified_split(labels, 0.2, seed=0)
    assert sorted(torch.cat([fit, held]).tolist()) == list(range(17))
    assert labels[held].bincount().tolist() == [2, 1, 1]


def test_seg_probe_learns_patch_features_that_encode_the_class():
    """Each patch's features are its class's centre plus noise; masks are the patch labels upsampled 4x."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 3
    labels = torch.randint(3, (24, 6, 6), generator=gen)  # (N, h, w)
    feats = centres[labels].permute(0, 3, 1, 2) + 0.3 * torch.randn(24, 16, 6, 6, generator=gen)  # (N, D, h, w)
    masks = labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)  # (N, 24, 24)
    masks[:, 0, :] = 255  # an ignored row
    r = seg_probe(feats[:16], masks[:16], feats[16:], masks[16:], num_classes=3, lrs=(1e-2, 1e-1), steps=60,
                  batch_size=8, class_names=["a", "b", "c"])
    assert r["miou"] > 70.0 and set(r["per_class_iou"]) == {"a", "b", "c"}  # chance mIoU is about 20%


# ----------------------------------------------------------------------------------------------------------------
# real data: bundled sets, feature extraction, the command


def test_bundled_data_is_complete():
    train, val = image_folder(FASHION / "train", 32), image_folder(FASHION / "val", 32)
    assert (len(train), len(val)) == (300, 100) and train.classes == val.classes
    assert (len(SegmentationFolder(SEG / "train", 32)), len(SegmentationFolder(SEG / "val", 32))) == (60, 20)
    for licence in ("fashion_mnist/COPYRIGHT.dataset-fashion-mnist", "tuxstamps_seg/COPYRIGHT.tuxpaint-data",
                    "tuxstamps_seg/COPYRIGHT.tuxpaint-stamps-default", "README.md"):
        assert (REPO / "data" / "eval" / licence).is_file()


def test_segmentation_folder_reads_masks_aligned_with_images():
    img, mask = SegmentationFolder(SEG / "val", 48)[0]
    assert img.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.long
    assert 0 < (mask > 0).float().mean() < 1 and int(mask.max()) <= 6  # some object, some background


def test_segmentation_folder_reports_images_without_masks(tmp_path):
    (tmp_path / "a.jpg").write_bytes((SEG / "train" / "0000.jpg").read_bytes())
    with pytest.raises(FileNotFoundError, match="no mask"):
        SegmentationFolder(tmp_path, 32)


def test_eval_decodes_images_as_training_does(tmp_path):
    """One decoder: an EXIF-rotated JPEG comes out upright and a transparent PNG over white, as in training."""
    from PIL import Image

    from dinospec.data.datasets import decode_image
    from dinospec.eval.features import open_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert open_rgb(tmp_path / "rotated.jpg").size == (20, 40)
    assert open_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    for name in ("rotated.jpg", "clear.png"):
        path = str(tmp_path / name)
        assert open_rgb(tmp_path / name).tobytes() == decode_image(path, path).tobytes()


def test_extract_features_restores_mode_and_keeps_the_patch_grid():
    model = tiny_vit(num_register_tokens=2).train()
    feats = extract_features(model, SegmentationFolder(SEG / "val", 32), batch_size=8, keep_patches=True,
                             progress=False)
    assert model.training
    assert feats.cls.shape == (20, 32) and feats.patches.shape == (20, 32, 4, 4) and feats.targets.shape == (20, 32,
                                                                                                             32)
    assert torch.allclose(feats.patches.mean(dim=(2, 3)), feats.patch_mean, atol=1e-5)


def test_knn_eval_during_training_on_bundled_data():
    r = knn_eval_during_training(tiny_vit(), FASHION / "train", FASHION / "val", img_size=32, ks=(10,))
    assert set(r) == {"knn_top1_k10"} and 0.0 <= r["knn_top1_k10"] <= 100.0


@pytest.mark.parametrize("task", ["knn", "linear", "seg"])
def test_eval_command_end_to_end(task, tmp_path, capsys):
    from dinospec.cli import main
    from dinospec.export import save_backbone

    student = dict(arch="vit_pico", patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                   num_register_tokens=1, layerscale=1e-5, qkv_bias=True, proj_bias=True, ffn_bias=True,
                   attn_backend="sdpa", interpolate_offset=0.1, interpolate_antialias=False, drop_path_rate=0.0)
    spec = dict(groups=[["cls"], ["reg", "patch"]], norm1="all", qkv="0:1", proj="none", norm2="all", mlp="none",
                ls1="all", ls2="all", final_norm=False)
    from dinospec.models.vit import build_backbone

    torch.manual_seed(0)
    export = save_backbone(build_backbone(student, spec, img_size=32), tmp_path / "export", student, spec)
    out = tmp_path / "result.json"
    extra = {"knn": ["--k", "5", "10"], "linear": ["--l2", "0.01", "0.001"],
             "seg": ["--steps", "20", "--lrs", "0.1"]}[task]
    rc = main(["eval", task, "--backbone", str(export), "--img-size", "32", "--json", str(out), "--no-progress",
               *extra])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["task"] == task and report["img_size"] == 32
    results = report["results"]
    metric = results["top1_by_k"]["10"] if task == "knn" else results["top1" if task == "linear" else "miou"]
    assert metric is not None and 0.0 <= metric <= 100.0
    assert str(export) in capsys.readouterr().out  # the table names the backbone


def test_eval_command_reports_a_missing_backbone(tmp_path, capsys):
    from dinospec.cli import main

    assert main(["eval", "knn", "--backbone", str(tmp_path / "nope")]) == 2
    assert "export dir" in capsys.readouterr().err
