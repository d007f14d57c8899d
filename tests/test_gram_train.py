"""Gram anchoring in training: the Gram teacher's schedule and copy (fast, in process), config refusals, and real
short runs on real photos that resume bitwise, including switching Gram anchoring on when resuming (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import photos_dir, run_cli, tiny_overrides
from dinospec.checkpoint import load_model_state
from dinospec.config import ConfigError, load_config
from dinospec.ssl.gram_teacher import GramAnchor
from dinospec.ssl.meta_arch import SSLMetaArch


def _cfg(tmp_path: Path, **extra: object):
    return load_config(overrides=tiny_overrides(tmp_path / "run", photos_dir(), **extra))


def test_schedule_copy_and_loss(tmp_path: Path) -> None:
    """Taken at start_step, retaken every period, a real copy (not a view) of the teacher; the loss is zero against
    itself and grows when the student moves away; building it draws nothing from the RNG."""
    cfg = _cfg(tmp_path, **{"gram.enabled": True, "gram.start_step": 4, "gram.refresh_period_steps": 3,
                            "gram.img_size": 48})
    torch.manual_seed(0)
    meta = SSLMetaArch(cfg)
    before = torch.get_rng_state()
    gram = GramAnchor(cfg, meta.teacher.backbone)
    assert torch.equal(before, torch.get_rng_state())
    assert not gram.active and not gram.training
    assert [s for s in range(6) if gram.due(s)] == [4, 5]  # never taken: due at every step from start_step on
    gram.refresh(meta.teacher.backbone, 4)
    assert gram.active and int(gram.taken_step) == 4
    assert [s for s in range(15) if gram.due(s)] == [7, 10, 13]
    teacher = dict(meta.teacher.backbone.named_parameters())
    for name, value in gram.backbone.named_parameters():
        assert torch.equal(value, teacher[name]) and value.data_ptr() != teacher[name].data_ptr()
        assert not value.requires_grad
    with torch.no_grad():  # the EMA teacher moves on; the Gram teacher does not
        teacher["blocks.0.mlp.fc1.weight"].add_(1.0)
    assert not torch.equal(gram.backbone.blocks[0].mlp.fc1.weight, teacher["blocks.0.mlp.fc1.weight"])

    crops = torch.randn(4, 3, 32, 32)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    own = gram.backbone.forward_features(torch.nn.functional.interpolate(crops, size=48, mode="bicubic"))
    assert own["x_norm_patchtokens"].shape[1] == 36  # the 48-px teacher grid (6x6), resized to the student's 4x4
    student = meta.student.backbone.forward_features(crops)["x_norm_patchtokens"]
    loss = gram.loss(student, crops, masks)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    same = GramAnchor(_cfg(tmp_path, **{"gram.enabled": True}), meta.student.backbone)
    same.refresh(meta.student.backbone, 0)
    assert same.loss(student, crops, masks).item() == pytest.approx(0.0, abs=1e-10)


def test_config_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        _cfg(tmp_path, **{"gram.enabled": True, "gram.remove_neg": True, "gram.remove_only_teacher_neg": True})
    with pytest.raises(ConfigError, match="img_level"):
        _cfg(tmp_path, **{"gram.enabled": True, "gram.tokens_used": "masked"})
    with pytest.raises(ConfigError, match="multiple of"):
        _cfg(tmp_path, **{"gram.enabled": True, "gram.img_size": 44})
    with pytest.raises(ConfigError, match="gram.refresh_period_steps"):
        _cfg(tmp_path, **{"gram.refresh_period_steps": -1})
    _cfg(tmp_path, **{"gram.enabled": True, "gram.tokens_used": "masked", "gram.img_level": False})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Model and Gram-teacher tensors of a checkpoint (the Gram teacher is its own entry, "gram")."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = run / "checkpoints" / f"step_{step}"
    out = {f"model.{k}": v for k, v in load_model_state(ckpt).items()}
    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    gram = {k[len("gram."):]: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.items()
            if k.startswith("gram.") and isinstance(md, TensorStorageMetadata)}
    if gram:
        dcp.load({"gram": gram}, checkpoint_id=str(ckpt), no_dist=True)
    return out | {f"gram.{k}": v for k, v in gram.items()}


@pytest.mark.slow
def test_gram_run_resumes_bitwise_and_switches_on_when_resuming(tmp_path: Path) -> None:
    """Three ways to the same 6 steps (Gram teacher taken at step 3, retaken at 5, at 1.5x the crop size):
    straight; stopped at step 4 (the checkpoint's Gram teacher, taken at 3, must be used at step 4) and resumed;
    3 steps without Gram anchoring, then resumed with it on. All end bitwise equal, Gram teacher included."""
    gram = {"gram.enabled": True, "gram.start_step": 3, "gram.refresh_period_steps": 2, "gram.img_size": 48,
            "gram.loss_weight": 2.0}
    straight, stopped, late = tmp_path / "straight", tmp_path / "stopped", tmp_path / "late"
    photos = photos_dir()
    run_cli(["train", *tiny_overrides(straight, photos, **{**gram, "train.max_steps": 6})])
    run_cli(["train", *tiny_overrides(stopped, photos, **{**gram, "train.max_steps": 4,
                                                          "checkpoint.period_steps": 4})])
    run_cli(["train", *tiny_overrides(stopped, photos, **{**gram, "train.max_steps": 6})])
    run_cli(["train", *tiny_overrides(late, photos, **{"train.max_steps": 3, "checkpoint.period_steps": 3})])
    proc = run_cli(["train", *tiny_overrides(late, photos, **{**gram, "train.max_steps": 6})])
    assert "step 3: Gram teacher taken" in proc.stdout + proc.stderr

    records = _records(straight)
    assert [r["step"] for r in records if "gram_loss" in r] == [4, 5, 6]
    for r in records[3:]:
        assert r["gram_loss"] > 0
        parts = r["dino_loss"] + r["ibot_loss"] + 0.1 * r["koleo_loss"] + 2.0 * r["gram_loss"]
        assert r["loss"] == pytest.approx(parts, rel=1e-5)
    for run in (stopped, late):
        assert [r["gram_loss"] for r in _records(run)[3:]] == [r["gram_loss"] for r in records[3:]]
    a = _state(straight, 6)
    assert any(k.startswith("gram.backbone.") for k in a) and int(a["gram.taken_step"]) == 5
    frozen = [k for k in a if k.startswith("gram.backbone.")]
    assert any(not torch.equal(a[k], a["model.teacher." + k[len("gram."):]]) for k in frozen)  # the EMA moved on
    for run in (stopped, late):
        b = _state(run, 6)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_fsdp2_gram_teacher_is_the_gathered_teacher(tmp_path: Path) -> None:
    """2 ranks, FSDP2 on gloo: the Gram teacher taken before step 3 (each rank gathering the sharded EMA teacher)
    is exactly the full teacher of the step-3 checkpoint, and training goes on with a finite Gram loss."""
    from conftest import run_torchrun

    run = tmp_path / "fsdp"
    run_torchrun(2, ["train", *tiny_overrides(run, photos_dir(), **{
        "train.max_steps": 4, "checkpoint.period_steps": 3, "checkpoint.keep_last": 0, "compute.strategy": "fsdp",
        "train.batch_size_per_gpu": 4, "gram.enabled": True, "gram.start_step": 3, "gram.img_size": 48})])
    at3, at4 = _state(run, 3), _state(run, 4)
    assert int(at3["gram.taken_step"]) == -1 and int(at4["gram.taken_step"]) == 3
    frozen = [k for k in at4 if k.startswith("gram.backbone.")]
    assert len(frozen) > 10
    for k in frozen:
        assert torch.equal(at4[k], at3["model.teacher." + k[len("gram."):]]), k
    last = _records(run)[-1]
    assert last["step"] == 4 and 0 < last["gram_loss"] < float("inf")
