"""High-resolution adaptation as a new phase (`train.init_from`): a real 32-px run continued at 48 px in a new run
directory with everything the model holds carried over (heads and loss centres too), pos_embed resized; the phase
trains, resumes from its own checkpoints, exports, and its export evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import photos_dir, run_cli, tiny_overrides
from dinospec.checkpoint import load_model_state
from dinospec.config import ConfigError, load_config
from dinospec.phase import init_from_run
from dinospec.ssl.meta_arch import SSLMetaArch
from dinospec.weights import resize_pos_embed

HIGH = {"crops.global_crops_size": 48, "crops.local_crops_size": 24}


@pytest.fixture(scope="module")
def phase1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("highres") / "phase1"
    run_cli(["train", *tiny_overrides(run, photos_dir(), **{"train.max_steps": 4, "checkpoint.period_steps": 4})])
    return run


def test_init_from_carries_everything_and_resizes_pos_embed(phase1: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides=tiny_overrides(tmp_path / "p2", photos_dir(), **HIGH,
                                               **{"train.init_from": str(phase1)}))
    torch.manual_seed(123)  # another init than phase 1's: only the loaded values can make them equal
    meta = SSLMetaArch(cfg)
    init_from_run(meta, cfg, phase1)
    saved, now = load_model_state(phase1), meta.state_dict()
    assert saved.keys() == now.keys()
    assert any(k.startswith("student.dino_head.") for k in saved) and "dino_loss.center" in saved
    for k, v in saved.items():
        if k.endswith("backbone.pos_embed"):
            assert v.shape[1] == 1 + 4 * 4 and now[k].shape[1] == 1 + 6 * 6
            part = meta.student if k.startswith("student") else meta.teacher
            assert torch.equal(now[k], resize_pos_embed(v, part.backbone))
        else:
            assert torch.equal(now[k], v), k


def test_init_from_with_rope_needs_no_resize(tmp_path: Path) -> None:
    """RoPE has no position table: a 32-px RoPE run continued at 48 px carries every tensor as saved, and the new
    phase's teacher computes at 48 px exactly what the source's computes there."""
    rope = {"student.pos_embed": "rope", "train.max_steps": 2, "checkpoint.period_steps": 2}
    source = tmp_path / "rope1"
    run_cli(["train", *tiny_overrides(source, photos_dir(), **rope)])
    cfg = load_config(overrides=tiny_overrides(tmp_path / "rope2", photos_dir(), **HIGH, **rope,
                                               **{"train.init_from": str(source)}))
    torch.manual_seed(123)
    meta = SSLMetaArch(cfg)
    init_from_run(meta, cfg, source)
    saved = load_model_state(source)
    assert not any(k.endswith("pos_embed") for k in saved)
    assert all(torch.equal(meta.state_dict()[k], v) for k, v in saved.items())
    source_meta = SSLMetaArch(load_config(overrides=tiny_overrides(source, photos_dir(), **rope)))
    source_meta.load_state_dict(saved)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(meta.teacher.backbone.eval()(x), source_meta.teacher.backbone.eval()(x))


def test_init_from_refuses_another_model(phase1: Path, tmp_path: Path) -> None:
    cfg = load_config(overrides=tiny_overrides(tmp_path / "p2", photos_dir(), **HIGH,
                                               **{"student.embed_dim": 64, "train.init_from": str(phase1)}))
    with pytest.raises(ConfigError, match="student.embed_dim: 32 -> 64"):
        init_from_run(SSLMetaArch(cfg), cfg, phase1)


def test_init_from_and_pretrained_weights_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(overrides=tiny_overrides(tmp_path / "p2", photos_dir(), **{
            "train.init_from": str(tmp_path / "p1"), "student.pretrained_weights": str(tmp_path / "w")}))


@pytest.mark.slow
def test_highres_phase_trains_resumes_exports_and_evaluates(phase1: Path, tmp_path: Path) -> None:
    """Phase 2 at 48 px (with Gram anchoring against the phase's start teacher at 96 px, as DINOv3's high-res
    recipe) for 4 steps, stopped at 2 and resumed from its own checkpoint; export;
    k-NN on the bundled Fashion-MNIST sample at 48 px."""
    phase2 = tmp_path / "phase2"
    extra = {**HIGH, "train.init_from": str(phase1), "gram.enabled": True, "gram.img_size": 96}
    first = run_cli(["train", *tiny_overrides(phase2, photos_dir(), **extra, **{"train.max_steps": 2,
                                                                             "checkpoint.period_steps": 2})])
    assert "new phase initialised from" in first.stderr + first.stdout
    run_cli(["train", *tiny_overrides(phase2, photos_dir(), **extra, **{"train.max_steps": 4})])
    records = [json.loads(x) for x in (phase2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["gram_loss"]])).all() for r in records)
    assert (phase2 / "config.yaml").read_text().count("global_crops_size: 48") == 1
    out = tmp_path / "export"
    run_cli(["export", str(phase2), "--out", str(out)])
    knn = run_cli(["eval", "knn", "--backbone", str(out), "--img-size", "48", "--json", "-", "--no-progress"])
    result = json.loads(knn.stdout[knn.stdout.index("{"):])
    top1 = result["results"]["top1_by_k"]
    assert result["img_size"] == 48 and set(top1) == {"10", "20"} and all(0 <= v <= 100 for v in top1.values())
