"""Learning diagnostics, the collapse detector, run-length-fitted teacher momentum and the small-scale presets."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from conftest import photos_dir, tiny_overrides
from dinospec.config import load_config
from dinospec.ssl.diagnostics import CollapseDetector, dino_diagnostics, mean_pairwise_cosine
from dinospec.ssl.schedules import CosineSchedule, momentum_for_run, teacher_init_share


def test_mean_pairwise_cosine_matches_the_pairwise_definition():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.normalize(x, dim=1)
    sims = z @ z.T
    expected = (sims.sum() - sims.diagonal().sum()) / (7 * 6)
    assert torch.allclose(mean_pairwise_cosine(x), expected, atol=1e-6)
    assert torch.allclose(mean_pairwise_cosine(torch.ones(4, 3)), torch.tensor(1.0))
    assert float(mean_pairwise_cosine(torch.ones(1, 3))) == 0.0  # no pair


def test_diagnostics_see_a_collapsed_and_a_healthy_teacher():
    k = 16
    same = dino_diagnostics(torch.ones(8, 4), torch.ones(8, k), torch.full((8, k), 1.0 / k))
    assert math.isclose(float(same["dino_target_entropy"]), math.log(k), rel_tol=1e-6)
    assert float(same["teacher_logit_spread"]) == 0.0
    assert math.isclose(float(same["teacher_cls_cos"]), 1.0, rel_tol=1e-6)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, k, generator=gen)
    healthy = dino_diagnostics(torch.randn(8, 4, generator=gen), logits, torch.softmax(logits / 0.1, dim=1))
    assert float(healthy["dino_target_entropy"]) < math.log(k) - 0.5
    assert float(healthy["teacher_logit_spread"]) > 0.5 and float(healthy["teacher_cls_cos"]) < 0.9


def test_collapse_detector_warns_once_after_its_patience_and_resets_on_recovery():
    det = CollapseDetector(n_prototypes=1024, patience_steps=30)
    ln_k = math.log(1024)
    assert det.update(10, ln_k) is None and det.update(30, ln_k - 1e-4) is None  # uniform since 10, 20 steps
    warning = det.update(40, ln_k)
    assert warning is not None and "student.layerscale" in warning and "since step 10" in warning
    assert det.update(50, ln_k) is None  # once
    fresh = CollapseDetector(n_prototypes=1024, patience_steps=30)
    fresh.update(10, ln_k)
    fresh.update(30, ln_k - 0.5)  # learning: the clock restarts
    assert fresh.update(50, ln_k) is None and fresh.update(70, ln_k) is None and fresh.update(80, ln_k) is not None
    assert CollapseDetector(1024, patience_steps=0).update(10_000, ln_k) is None  # 0 = never


def test_momentum_fitted_to_the_run_length_leaves_little_of_the_init():
    # DINOv2's 0.992 -> 1 cosine leaves ~30% of the random init in a 300-step teacher; ~0 over its 125k steps
    assert teacher_init_share(CosineSchedule(0.992, 1.0, 300), 300) > 0.25
    assert teacher_init_share(CosineSchedule(0.992, 1.0, 20_000), 20_000) < 1e-10
    for steps in (100, 300, 2000):
        m = momentum_for_run(steps)
        assert 0.5 < m < 1.0
        assert teacher_init_share(CosineSchedule(m, 1.0, steps), steps) <= 0.05 + 1e-9
        assert teacher_init_share(CosineSchedule(m + 0.002, 1.0, steps), steps) > 0.05  # the largest such
    assert momentum_for_run(300) < momentum_for_run(2000)


def test_small_presets_use_caits_layerscale_and_large_ones_keep_dinov2s():
    for arch in ("vit_pico", "vit_tiny", "vit_small", "vit_base"):
        assert load_config([], [f"model={arch}"]).student.layerscale == 0.1, arch
    for arch in ("vit_large", "vit_giant2"):
        cfg = load_config([], [f"model={arch}"])
        assert cfg.student.layerscale == 1e-5 and cfg.teacher.momentum_teacher == 0.992, arch


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_diagnostics_tell_a_dead_cls_head_from_a_live_one_in_real_training(tmp_path: Path, capsys):
    """The failure this guards against: LayerScale 1e-5 on a shallow ViT gives every image the same teacher [CLS],
    so the DINO targets are exactly uniform. LayerScale 0.1 (the small presets) lets the image through at step 1.
    In-process (one torch import for both runs): dinospec.trainer.train is what `dinospec train` calls."""
    from dinospec.trainer import train

    records, printed = {}, {}
    for name, layerscale in (("dead", 1e-5), ("live", 0.1)):
        cfg = load_config([], tiny_overrides(tmp_path / name, photos_dir(), **{
            "student.layerscale": layerscale, "train.max_steps": 4, "logging.collapse_patience_steps": 2,
            "dino.head_n_prototypes": 256}))
        train(cfg)
        records[name], printed[name] = _records(tmp_path / name), capsys.readouterr().out
    dead, live = records["dead"], records["live"]
    ln_k = math.log(256)
    assert all(abs(r["dino_target_entropy"] - ln_k) < 1e-3 for r in dead)
    assert dead[0]["teacher_cls_cos"] > 0.9999
    assert live[0]["dino_target_entropy"] < ln_k - 0.01 and live[0]["teacher_cls_cos"] < 0.999
    assert "the DINO targets have been uniform" in printed["dead"]
    assert "the DINO targets have been uniform" not in printed["live"]
    # the short-run momentum warning: 4 steps at DINOv2's 0.992 leave ~100% of the init in the teacher
    assert "holds" in printed["live"] and "teacher.momentum_teacher <=" in printed["live"]


def test_diagnostics_are_computed_only_when_asked_and_change_nothing_in_training(tmp_path: Path):
    """The trainer asks for the diagnostics at its log steps only; with or without them a step is bitwise the same."""
    from dinospec.data.loader import build_ssl_loader
    from dinospec.ssl.meta_arch import SSLMetaArch
    from dinospec.trainer import Trainee, train_step

    cfg = load_config([], tiny_overrides(tmp_path, photos_dir()))
    batches = list(itertools.islice(build_ssl_loader(cfg), 2))
    weights = []
    for diagnostics in (True, False):
        torch.manual_seed(0)
        t = Trainee.build(cfg, SSLMetaArch(cfg), torch.device("cpu"))
        out = [train_step(t, batch, step, diagnostics=diagnostics) for step, batch in enumerate(batches)]
        assert ("dino_target_entropy" in out[1]) == diagnostics and t.progress.step == 2 and t.grad_norm > 0
        weights.append(t.meta.state_dict())
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())


def test_demo_pretraining_images_are_real_and_disjoint_from_the_evaluation_sample(tmp_path: Path):
    """make demo pretrains on 4000 bundled Fashion-MNIST images; its k-NN is measured on data/eval/fashion_mnist,
    which must not contain any of them (else the demo's learning curve would be measured on training images)."""
    import sys

    import numpy as np
    from PIL import Image

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "scripts"))
    try:
        import prepare_demo_data
    finally:
        sys.path.remove(str(repo / "scripts"))
    assert prepare_demo_data.write_fashion_mnist(tmp_path, force=False) == 4000
    demo = {np.asarray(Image.open(p)).tobytes() for p in tmp_path.glob("*.png")}
    assert len(demo) > 3900  # real, varied images (a few exact duplicates exist in Fashion-MNIST itself)
    evaluation = [np.asarray(Image.open(p).convert("L")).tobytes()
                  for p in (repo / "data" / "eval" / "fashion_mnist").glob("*/*/*.png")]
    assert len(evaluation) == 400 and not demo & set(evaluation)
