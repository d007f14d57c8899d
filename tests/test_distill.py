"""Distillation (dinospec/ssl/distill.py): a frozen teacher read from real files (a dinospec export, a DINOv2-format
weights file, a dinospec run) teaching one or two students on the repository's real photos: the targets are the
teacher's own forward, the teacher never moves, runs resume bitwise, and each student exports and loads like any
backbone. Config refusals are checked before torch builds anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import photos_dir, run_cli, tiny_overrides
from dinospec.checkpoint import load_model_state
from dinospec.checkpoint_state import ModelState
from dinospec.config import ConfigError, load_config
from dinospec.data.loader import build_ssl_loader
from dinospec.export import load_backbone, save_backbone
from dinospec.models.vit import build_backbone
from dinospec.ssl.distill import DistillMetaArch, MultiStudent
from dinospec.ssl.losses import sinkhorn_knopp_teacher
from dinospec.ssl.meta_arch import SSLMetaArch
from dinospec.trainer import _build_optimizer, _clip
from resume_harness import differences, final_state

# a teacher wider than the tiny students, without LayerScale (at LayerScale's 1e-5 init an untrained backbone gives
# every image nearly the same [CLS], and its targets would not tell the images apart)
TEACHER = {"arch": "vit_pico", "embed_dim": 48, "depth": 2, "num_heads": 2, "patch_size": 8, "layerscale": "null",
           "num_register_tokens": 2, "drop_path_rate": 0.0}
VANILLA_EXTRA = "[{spec: none, embed_dim: 16, num_heads: 1}]"  # beside the tiny main student (paper spec)


def _teacher_export(out: Path, seed: int) -> Path:
    cfg = load_config(overrides=[f"student.{k}={v}" for k, v in TEACHER.items()]
                      + ["crops.global_crops_size=32", "crops.local_crops_size=16"])
    torch.manual_seed(seed)
    model = build_backbone(cfg.student, cfg.spec, img_size=32).eval()
    return save_backbone(model, out, cfg.student, cfg.spec)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _teacher_export(tmp_path_factory.mktemp("distill") / "teacher", seed=5)


def _distill(run: Path, teacher: Path | str, **extra: object) -> list[str]:
    return tiny_overrides(run, photos_dir(), **{"distill.enabled": True, "distill.teacher": str(teacher), **extra})


def _batch(cfg) -> dict[str, torch.Tensor]:
    """One real batch of the photos, as the trainer's loader makes it."""
    return next(iter(build_ssl_loader(cfg, 0, 1)))


def test_config_refusals(tmp_path: Path) -> None:
    def load(**keys: object):  # the default config plus these keys: each refusal costs one fast load
        return load_config(overrides=[f"{k}={v}" for k, v in keys.items()])

    on = {"distill.enabled": True, "distill.teacher": "t"}
    with pytest.raises(ConfigError, match="needs 'distill.teacher'"):
        load(**{"distill.enabled": True})
    with pytest.raises(ConfigError, match="'distill.enabled' = false"):
        load(**{"distill.students": "[{arch: vit_tiny}]"})
    with pytest.raises(ConfigError, match=r"distill.students\[0\].patch_size' = 16 differs"):
        load(**on, **{"distill.students": "[{patch_size: 16}]"})
    with pytest.raises(ConfigError, match=r"distill.students\[1\].archh' is not a student.\* key.*'arch'"):
        load(**on, **{"distill.students": "[{arch: vit_tiny}, {archh: vit_tiny}]"})
    with pytest.raises(ConfigError, match="unknown spec preset 'papr'"):
        load(**on, **{"distill.students": "[{spec: papr}]"})
    with pytest.raises(ConfigError, match="unknown student.arch 'vit_huge'"):
        load(**on, **{"distill.students": "[{arch: vit_huge}]"})
    with pytest.raises(ConfigError, match="exclusive"):
        load(**on, **{"gram.enabled": True})
    with pytest.raises(ConfigError, match="exclusive"):
        load(**on, **{"train.init_from": str(tmp_path)})
    from dinospec.config import distill_members

    cfg = load(**on, **{"student.embed_dim": 96, "distill.students": "[{arch: vit_tiny, spec: paper}]"})
    (main, _), (extra, spec) = distill_members(cfg)
    assert main.embed_dim == 96 and extra.embed_dim is None and extra.arch == "vit_tiny"  # the preset's sizes
    assert spec.norm1 == "all" and extra.patch_size == main.patch_size
    with pytest.raises(ConfigError, match="distill.teacher"):  # a path that holds no teacher, refused when built
        DistillMetaArch(load_config(overrides=_distill(tmp_path / "run", tmp_path / "nothing")))


@pytest.mark.parametrize("spec", ["none", "paper"])
def test_distill_recipe_validates_with_students(spec: str) -> None:
    """configs/recipe/dinov3_distill.yaml stacked on the pretraining recipe, as the README submits it."""
    from dinospec.config import CONFIG_DIR, distill_members

    recipes = [CONFIG_DIR / "recipe" / "dinov3_vits16.yaml", CONFIG_DIR / "recipe" / "dinov3_distill.yaml"]
    with pytest.raises(ConfigError, match="needs 'distill.teacher'"):
        load_config(recipes, [f"spec={spec}"])
    cfg = load_config(recipes, [f"spec={spec}", "distill.teacher=runs/v3l_highres",
                                "distill.students=[{arch: vit_base}, {arch: vit_tiny, spec: final_norm}]"])
    members = distill_members(cfg)
    assert [m.arch for m, _ in members] == ["vit_small", "vit_base", "vit_tiny"]
    assert all(m.patch_size == 16 and m.pos_embed == "rope" for m, _ in members)
    assert members[1][1].norm1 == ("all" if spec == "paper" else "none") and members[2][1].final_norm
    assert cfg.teacher.warmup_teacher_temp_epochs == 0


def test_targets_frozen_teacher_and_students(teacher: Path, tmp_path: Path) -> None:
    """Two students (paper spec + vanilla): the targets equal Sinkhorn-Knopp of a direct forward of the exported
    teacher (with the seeded heads); one optimizer step moves both students and leaves the teacher as it was; the
    frozen teacher stays out of the checkpointed state; building it draws nothing from the run's RNG."""
    cfg = load_config(overrides=_distill(tmp_path / "run", teacher, **{"distill.students": VANILLA_EXTRA}))
    torch.manual_seed(0)
    meta = DistillMetaArch(cfg)
    rng_after = torch.get_rng_state()
    torch.manual_seed(0)
    plain = SSLMetaArch(load_config(overrides=tiny_overrides(tmp_path / "run", photos_dir())))
    assert all(torch.equal(v, meta.student.state_dict()[k]) for k, v in plain.student.state_dict().items())
    torch.manual_seed(0)
    again = DistillMetaArch(cfg)
    assert torch.equal(rng_after, torch.get_rng_state())  # the same stream whatever the teacher's heads draw
    assert all(torch.equal(v, again.distill_teacher.state_dict()[k])
               for k, v in meta.distill_teacher.state_dict().items())  # rebuilt identically on resume
    assert isinstance(meta.student, MultiStudent) and len(meta.student.members()) == 2
    assert meta.student.extra[0].backbone.embed_dim == 16 and not meta.distill_teacher.training

    direct = load_backbone(teacher)
    frozen = meta.distill_teacher.state_dict()
    assert all(torch.equal(v, frozen[f"backbone.{k}"]) for k, v in direct.state_dict().items())
    batch = _batch(cfg)
    crops, masks, temp = batch["global_crops"], batch["masks"], 0.05
    assert masks.any()
    with torch.no_grad():
        feats = direct.forward_features(crops)
        head = meta.distill_teacher.dino_head
        want_dino = sinkhorn_knopp_teacher(head(feats["x_norm_clstoken"]), temp, 3)
        want_ibot = sinkhorn_knopp_teacher(head(feats["x_norm_patchtokens"].flatten(0, 1)[masks.flatten()]), temp, 3)
    dino_t, ibot_t, _ = meta.teacher_targets(crops, masks, temp)
    torch.testing.assert_close(dino_t, want_dino, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ibot_t, want_ibot, rtol=1e-5, atol=1e-7)
    assert dino_t.argmax(1).unique().numel() > 1  # the targets tell the images apart

    saved = ModelState(meta).state_dict()
    assert "distill_fingerprint" in saved and not any(k.startswith("distill_teacher.") for k in saved)
    assert any(k.startswith("student.extra.0.backbone.") for k in saved)
    optimizer = _build_optimizer(meta, cfg)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(meta.student.parameters()))
    from dinospec.ssl.optim import apply_schedules

    apply_schedules(optimizer, 1e-3, 0.04, 1e-3)
    before = {k: v.clone() for k, v in meta.state_dict().items()}
    losses = meta.losses(batch, temp)
    assert all(torch.isfinite(v) for v in losses.values())
    parts = sum(losses[f"dino_loss{s}"] + losses[f"ibot_loss{s}"] + 0.1 * losses[f"koleo_loss{s}"]
                for s in ("", "_s1"))
    assert float(losses["loss"].detach()) == pytest.approx(float(parts.detach()), rel=1e-6)
    losses["loss"].backward()
    assert all(p.grad is None for p in meta.distill_teacher.parameters())
    assert _clip(meta, 3.0) > 0
    optimizer.step()
    meta.update_teacher(0.9)
    after = meta.state_dict()
    for prefix in ("student.backbone.", "student.extra.0.backbone.", "teacher.extra.0.dino_head."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("distill_teacher."))


def test_dinov2_weights_file_as_teacher(tmp_path: Path) -> None:
    """A DINOv2-format .pth (a plain state dict in DINOv2's keys, head dim 64 as every release) as the teacher: its
    architecture and settings are read from the file, and its features are the file's backbone's."""
    cfg2 = load_config(overrides=["student.arch=vit_pico", "student.embed_dim=64", "student.num_heads=1",
                                  "student.depth=2", "student.patch_size=8", "student.layerscale=null",
                                  "crops.global_crops_size=32", "crops.local_crops_size=16"])
    torch.manual_seed(3)
    reference = build_backbone(cfg2.student, cfg2.spec, img_size=32).eval()
    path = tmp_path / "dinov2_vitp8_pretrain.pth"
    torch.save(reference.state_dict(), path)
    cfg = load_config(overrides=_distill(tmp_path / "run", path))
    torch.manual_seed(0)
    meta = DistillMetaArch(cfg)
    assert "dinov2 weights" in meta.teacher_source
    backbone = meta.distill_teacher.backbone
    assert backbone.embed_dim == 64 and len(backbone.blocks) == 2
    batch = _batch(cfg)
    with torch.no_grad():
        want = reference.forward_features(batch["global_crops"])["x_norm_clstoken"]
        got = backbone.forward_features(batch["global_crops"])["x_norm_clstoken"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    losses = meta.losses(batch, 0.05)
    assert torch.isfinite(losses["loss"]) and "dino_loss_s1" not in losses


def test_run_directory_teacher_brings_its_heads_and_centres(tmp_path: Path) -> None:
    """A dinospec run as the teacher: its EMA teacher backbone and heads, and (softmax centering) its loss centres;
    students with another prototype count are refused, naming the key to set."""
    source = tmp_path / "source"
    run_cli(["train", *tiny_overrides(source, photos_dir(), **{"train.max_steps": 2, "checkpoint.period_steps": 2,
                                                                "teacher.centering": "centering"})])
    saved = load_model_state(source)
    cfg = load_config(overrides=_distill(tmp_path / "run", source, **{"teacher.centering": "centering",
                                                                       "distill.students": VANILLA_EXTRA}))
    meta = DistillMetaArch(cfg)
    frozen = meta.distill_teacher.state_dict()
    teacher_keys = [k for k in saved if k.startswith("teacher.")]
    assert len(teacher_keys) == len(frozen) and any(".dino_head." in k for k in teacher_keys)
    assert all(torch.equal(saved[k], frozen[k[len("teacher."):]]) for k in teacher_keys)
    assert torch.equal(meta.dino_loss.center, saved["dino_loss.center"]) and meta.dino_loss.center.abs().sum() > 0
    with pytest.raises(ConfigError, match="set dino.head_n_prototypes=128"):
        DistillMetaArch(load_config(overrides=_distill(tmp_path / "run", source, **{
            "dino.head_n_prototypes": 64, "ibot.head_n_prototypes": 64})))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_students_resume_bitwise_and_export(teacher: Path, tmp_path: Path) -> None:
    """A real 4-step distillation into two students (paper spec + vanilla, with drop-path) equals, bitwise, the
    same run stopped at step 2 and resumed; each student's EMA exports and loads with load_backbone; a resume
    against another teacher is refused."""
    extra = {"distill.students": VANILLA_EXTRA, "student.drop_path_rate": 0.1}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_cli(["train", *_distill(straight, teacher, **extra, **{"train.max_steps": 4})])
    run_cli(["train", *_distill(stopped, teacher, **extra, **{"train.max_steps": 2, "checkpoint.period_steps": 2})])
    run_cli(["train", *_distill(stopped, teacher, **extra, **{"train.max_steps": 4})])
    a, b = final_state(straight, 4), final_state(stopped, 4)
    assert not differences(a, b), differences(a, b)[:5]
    assert not any("distill_teacher" in k for k in a) and any(k.startswith("model.student.extra.0.") for k in a)
    records = _records(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["dino_loss_s1"], r["ibot_loss_s1"]])).all()
               for r in records)
    state = load_model_state(straight)
    for k, embed_dim in ((0, 32), (1, 16)):
        out = tmp_path / f"export_s{k}"
        run_cli(["export", str(straight), "--out", str(out), *(["--student", str(k)] if k else [])])
        model = load_backbone(out)
        prefix = "teacher.backbone." if k == 0 else "teacher.extra.0.backbone."
        assert model.embed_dim == embed_dim
        assert all(torch.equal(v, state[prefix + n]) for n, v in model.state_dict().items())
        feats = model.forward_features(torch.randn(2, 3, 32, 32))["x_norm_clstoken"]
        assert feats.shape == (2, embed_dim) and torch.isfinite(feats).all()
    assert json.loads((tmp_path / "export_s1" / "config.json").read_text())["spec"]["norm1"] == "none"
    proc = run_cli(["export", str(straight), "--out", str(tmp_path / "s2"), "--student", "2"], check=False)
    assert proc.returncode == 2 and "trains 2 student(s)" in proc.stderr
    other = _teacher_export(tmp_path / "other_teacher", seed=6)
    proc = run_cli(["train", *_distill(stopped, other, **extra, **{"train.max_steps": 6})], check=False)
    assert proc.returncode != 0 and "fingerprints differ" in proc.stderr


@pytest.mark.slow
def test_fsdp2_and_ddp_distill_two_students_alike(teacher: Path, tmp_path: Path) -> None:
    """2 ranks on gloo: the students (both sharded block by block under FSDP2) and the replicated frozen teacher
    train the same 3 steps under FSDP2 and DDP, to float rounding."""
    from conftest import run_torchrun

    runs = {}
    for strategy in ("fsdp", "ddp"):
        runs[strategy] = tmp_path / strategy
        run_torchrun(2, ["train", *_distill(runs[strategy], teacher, **{
            "distill.students": VANILLA_EXTRA, "train.max_steps": 3, "compute.strategy": strategy,
            "train.batch_size_per_gpu": 4})])
    a, b = load_model_state(runs["fsdp"]), load_model_state(runs["ddp"])
    assert a.keys() == b.keys() and any(k.startswith("student.extra.0.") for k in a)
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) < 1e-4
    losses = [[r["loss"] for r in _records(run)] for run in runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
