"""Export, load_backbone, torch.hub, timm export and DINOv2 weight import, on real files and tiny models."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dinospec
from dinospec.checkpoint import Checkpointer
from dinospec.cli import main as cli_main
from dinospec.config import as_container, load_config, to_yaml
from dinospec.export import ExportError, export_run, export_weights, load_backbone, save_backbone
from dinospec.models.spec_ranges import explicit_config
from dinospec.models.specialize import vanilla_to_routed
from dinospec.models.vit import VisionTransformer, build_backbone
from dinospec.weight_formats import canonical_keys
from dinospec.weights import WeightsError, check_student_settings, load_pretrained_backbone

REPO = Path(__file__).resolve().parent.parent
IMG = 48  # vit_pico patch 16 -> a 3x3 grid
OUTPUTS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


@functools.lru_cache(maxsize=None)  # load_config takes ~1 s; the tests never modify a config
def _cached_cfg(overrides: tuple[str, ...]):
    return load_config(overrides=overrides)


def tiny_cfg(spec: str = "none", regs: int = 2, **student):
    overrides = ["model=vit_pico", f"spec={spec}", f"student.num_register_tokens={regs}", "student.depth=3",
                 "student.embed_dim=32", "student.num_heads=2"]
    return _cached_cfg(tuple(overrides + [f"student.{k}={v}" for k, v in sorted(student.items())]))


def perturbed(model: VisionTransformer, seed: int, scale: float = 0.05) -> VisionTransformer:
    """Random weights everywhere (trained-looking: LayerScale, norms and every token group differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny_model(cfg, seed: int = 0, img_size: int = IMG) -> VisionTransformer:
    torch.manual_seed(seed)
    return perturbed(build_backbone(cfg.student, cfg.spec, img_size=img_size), seed)


def images(n: int = 2, size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_features(a, b, x, atol: float = 0.0, keys=OUTPUTS, r: int | None = None) -> None:
    fa, fb = a.forward_features(x), b.forward_features(x)
    for key in keys:
        diff = (fa[key] - fb[key]).abs().max().item() if fa[key].numel() else 0.0
        assert diff <= atol, f"{key}: max abs diff {diff:.3g} > {atol}"


def make_run(tmp_path: Path, cfg, step: int = 7, seed: int = 0) -> tuple[Path, VisionTransformer, VisionTransformer]:
    """A run dir as the trainer writes it: checkpoints/step_<N>/ (DCP, key "model", config.yaml) + latest."""
    teacher, student = tiny_model(cfg, seed), tiny_model(cfg, seed + 100)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    state["student.dino_head.mlp.0.weight"] = torch.randn(8, 32)
    run = tmp_path / "run"
    Checkpointer(run).save(step, {"model": state}, config_yaml=to_yaml(cfg))
    return run, teacher, student


def run_readme_snippet(export_dir: Path):
    """Execute the code block of the export's README.md, as a user pasting it would; returns its `model`."""
    text = (export_dir / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(code, namespace)
    return namespace["model"]


# ----------------------------------------------------------------------------------------------------------------
# dinospec export / load_backbone


@pytest.mark.parametrize("spec", ["none", "paper"])
def test_export_round_trip_is_bit_exact(tmp_path, spec, capsys):
    cfg = tiny_cfg(spec)
    run, teacher, student = make_run(tmp_path, cfg)
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    assert "dinospec.load_backbone" in capsys.readouterr().out

    loaded = dinospec.load_backbone(out)
    assert not loaded.training
    assert_same_features(loaded, run_readme_snippet(out), images())
    ref = teacher.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    assert_same_features(teacher, loaded, images())

    config = json.loads((out / "config.json").read_text())
    assert config["source"]["step"] == 7 and config["source"]["which"] == "teacher"
    assert config["student"]["embed_dim"] == 32 and config["student"]["depth"] == 3
    assert config["student"]["num_register_tokens"] == 2 and config["img_size"] == IMG
    # the spec as block indices: its meaning does not depend on the range parser of the version that loads it
    assert config["spec"] == explicit_config(as_container(cfg.spec), 3)
    assert all(set(v) <= set("0123456789,") or v == "none" for k, v in config["spec"].items()
               if k not in ("groups", "final_norm"))
    assert not any(p.suffix in (".pth", ".pt", ".pkl") for p in out.iterdir())

    # the student, by explicit step, is a different backbone
    out_s = export_run(run, tmp_path / "student", step=7, which="student")
    assert_same_features(student, load_backbone(out_s), images())


def test_export_errors_are_clear(tmp_path):
    cfg = tiny_cfg()
    run, _, _ = make_run(tmp_path, cfg)
    out = export_run(run, tmp_path / "e")
    with pytest.raises(ExportError, match="--force"):
        export_run(run, out)
    export_run(run, out, force=True)
    with pytest.raises(ExportError, match=r"step_3 .*available: step_7"):
        export_run(run, tmp_path / "e2", step=3)
    assert cli_main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e3")]) == 2
    with pytest.raises(ExportError, match="not a dinospec export"):
        load_backbone(tmp_path)
    with pytest.raises(ExportError, match=r"unknown backbone setting\(s\) \['attn_bakend'\]"):
        load_backbone(out, attn_bakend="sdpa")
    with pytest.raises(ExportError, match="does not match the student/spec"):
        save_backbone(tiny_model(cfg), tmp_path / "mismatch", cfg.student, tiny_cfg("paper").spec)


# ----------------------------------------------------------------------------------------------------------------
# torch.hub


def test_torch_hub_local(tmp_path):
    cfg = tiny_cfg("none")
    source = tiny_model(cfg)
    out = save_backbone(source, tmp_path / "vanilla", cfg.student, cfg.spec)

    hub = torch.hub.load(str(REPO), "dinospec_backbone", source="local", weights=str(out))
    assert_same_features(source, hub, images())
    # the paper spec from the same weights: routed copies, same function
    paper = torch.hub.load(str(REPO), "dinospec_backbone", source="local", weights=str(out), spec="paper")
    assert any(".1." in k for k in paper.state_dict())
    assert_same_features(source, paper, images(), atol=1e-5)
    with pytest.raises(ValueError, match="vit_pico backbone, not a vit_small"):
        torch.hub.load(str(REPO), "vit_small", source="local", weights=str(out))
    fresh = torch.hub.load(str(REPO), "dinospec_backbone", source="local", arch="vit_pico", spec="paper", depth=3,
                           num_register_tokens=1, img_size=32)
    assert len(fresh.blocks) == 3 and fresh.num_register_tokens == 1 and fresh.pos_embed.shape[1] == 5


# ----------------------------------------------------------------------------------------------------------------
# timm


@pytest.mark.parametrize("ffn,regs,extra", [("mlp", 0, {}), ("mlp", 3, {}), ("swiglu", 2, {}),
                                             ("mlp", 1, {"layerscale": "null", "qkv_bias": "false"})])
def test_timm_export_matches(tmp_path, ffn, regs, extra):
    pytest.importorskip("timm")
    cfg = tiny_cfg("none", regs=regs, ffn_layer=ffn, **extra)
    run, teacher, _ = make_run(tmp_path, cfg)
    out = tmp_path / "timm"
    assert cli_main(["export", str(run), "--out", str(out), "--format", "timm"]) == 0
    info = json.loads((out / "config.json").read_text())["timm"]
    assert info["kwargs"]["reg_tokens"] == regs
    model = run_readme_snippet(out).eval()  # the timm.create_model call the export documents
    x = images()
    with torch.no_grad():
        ours, theirs = teacher.forward_features(x), model.forward_features(x)
        assert (ours["x_norm_clstoken"] - theirs[:, 0]).abs().max() <= 1e-5
        assert (ours["x_norm_patchtokens"] - theirs[:, 1 + regs:]).abs().max() <= 1e-5
        assert (teacher(x) - model(x)).abs().max() <= 1e-5


def test_timm_export_refuses_specialised_weights(tmp_path):
    cfg = tiny_cfg("paper")
    run, _, _ = make_run(tmp_path, cfg)
    with pytest.raises(ExportError, match="timm has no token-type routing.*different"):
        export_run(run, tmp_path / "t", fmt="timm")
    # a specialised model whose groups are still equal (converted from vanilla) is exportable
    vanilla = tiny_model(tiny_cfg("none"))
    paper = build_backbone(cfg.student, cfg.spec, img_size=IMG)
    paper.load_state_dict(vanilla_to_routed(vanilla.state_dict(), paper))
    save_backbone(paper, tmp_path / "t2", cfg.student, cfg.spec, fmt="timm")


# ----------------------------------------------------------------------------------------------------------------
# DINOv2-format import

try:
    from dinov2.models.vision_transformer import DinoVisionTransformer
    from dinov2.models.vision_transformer import vit_small as dinov2_vit_small
except ImportError:  # the reference package is optional: pip install --no-deps dinov2==0.0.1.dev2
    DinoVisionTransformer = None
needs_dinov2 = pytest.mark.skipif(DinoVisionTransformer is None,
                                  reason="reference package missing: pip install --no-deps dinov2==0.0.1.dev2")


def dinov2_features(ref, x: torch.Tensor, registers: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The reference forward; with registers as DINOv2 (>= Oct 2023) adds them: after the position embedding."""
    with torch.no_grad():
        if registers is None:
            return ref.forward_features(x)
        t = ref.prepare_tokens_with_masks(x)
        t = torch.cat([t[:, :1], registers.expand(len(t), -1, -1), t[:, 1:]], dim=1)
        for blk in ref.blocks:
            t = blk(t)
        t_norm = ref.norm(t)
        r = registers.shape[1]
        return {"x_norm_clstoken": t_norm[:, 0], "x_norm_patchtokens": t_norm[:, 1 + r:], "x_prenorm": t}


def empty_backbone(cfg, img_size: int) -> VisionTransformer:
    """Uninitialised memory (no random init): every weight must come from the checkpoint being loaded."""
    with torch.device("meta"):
        model = build_backbone(cfg.student, cfg.spec, img_size=img_size)
    return model.to_empty(device="cpu").eval()


def dinospec_like(spec: str, img: int, regs: int, **student):
    kw = {"patch_size": 14, "num_register_tokens": regs, **student}
    return _cached_cfg(tuple([f"spec={spec}"] + [f"student.{k}={v}" for k, v in kw.items()]))


@pytest.fixture(scope="module")
def dinov2_vits14():
    """DINOv2's own ViT-S/14 (the reference package), random trained-looking weights, 3x3 grid."""
    torch.manual_seed(0)
    return perturbed(dinov2_vit_small(patch_size=14, img_size=42, init_values=1e-5, block_chunks=0), 1)


@needs_dinov2
@pytest.mark.parametrize("regs", [0, 4])
def test_dinov2_vit_small_import(tmp_path, regs, dinov2_vits14):
    ref = dinov2_vits14
    sd = dict(ref.state_dict())
    if regs:
        sd["register_tokens"] = torch.randn(1, regs, 384)
    torch.save(sd, tmp_path / "dinov2_vits14.pth")
    x = images(size=42)
    want = dinov2_features(ref, x, sd.get("register_tokens"))
    family = {"interpolate_offset": 0.0, "interpolate_antialias": True} if regs else {}  # DINOv2's register models
    for spec in ("none", "paper"):
        model = empty_backbone(dinospec_like(spec, 42, regs, **family), 42)
        load_pretrained_backbone(model, tmp_path / "dinov2_vits14.pth")
        with torch.no_grad():
            got = model.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            assert (got[key] - want[key]).abs().max() <= 1e-5, (spec, key)


@needs_dinov2
def test_dinov2_checkpoint_variants(tmp_path):
    """SwiGLU, chunked blocks (FSDP block_chunks), teacher/training checkpoint wrappers, a classifier head."""
    torch.manual_seed(0)
    kw = dict(img_size=28, patch_size=14, embed_dim=48, depth=4, num_heads=3, init_values=1e-5)
    ref = perturbed(DinoVisionTransformer(ffn_layer="swiglufused", block_chunks=2, **kw), 2)
    sd = ref.state_dict()
    assert "blocks.1.3.mlp.w12.weight" in sd  # chunk 1 holds blocks 2, 3 under their global indices
    cfg = dinospec_like("paper", 28, 0, arch="vit_small", embed_dim=48, depth=4, num_heads=3, ffn_layer="swiglu")
    x = images(size=28)
    want = dinov2_features(ref, x)

    noise = {k: v + 1 for k, v in sd.items()}
    wrapped = {
        "plain.pth": dict(sd, **{"head.weight": torch.zeros(10, 48)}),
        "teacher_checkpoint.pth": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                               "dino_head.last_layer.weight": torch.zeros(4, 8)}},
        "model_0001.pth": {"model": {**{f"teacher.backbone.{k}": v for k, v in sd.items()},
                                     **{f"student.backbone.{k}": v for k, v in noise.items()}},
                           "iteration": 1},
    }
    for name, obj in wrapped.items():
        torch.save(obj, tmp_path / name)
        model = empty_backbone(cfg, 28)
        load_pretrained_backbone(model, tmp_path / name)
        with torch.no_grad():
            got = model.forward_features(x)
        for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            assert (got[key] - want[key]).abs().max() <= 1e-5, (name, key)
    assert set(canonical_keys(sd, allow_routed=False)) == set(build_backbone(cfg.student, dinospec_like(
        "none", 28, 0).spec, img_size=28).state_dict())


@needs_dinov2
def test_export_straight_from_a_dinov2_checkpoint(tmp_path, dinov2_vits14, capsys):
    """`dinospec export FILE.pth --out DIR spec=paper`: architecture from the weights, the register family's
    interpolation set, the spec converted; the exported backbone computes DINOv2's features, at its native size and,
    interpolated, at another."""
    ref = dinov2_vits14
    sd = dict(ref.state_dict())
    sd["register_tokens"] = torch.randn(1, 4, 384)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, tmp_path / "teacher_checkpoint.pth")
    out = tmp_path / "paper"
    assert cli_main(["export", str(tmp_path / "teacher_checkpoint.pth"), "spec=paper", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dinov2_reg weights" in printed and "specialised" in printed and "embed_dim 384" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["student"]["arch"] == "vit_small" and config["img_size"] == 42
    assert config["student"]["interpolate_offset"] == 0.0 and config["student"]["interpolate_antialias"] is True
    assert config["spec"]["qkv"] == "0,1,2,3" and config["source"]["family"] == "dinov2_reg"  # first third of 12
    model = load_backbone(out)
    assert any(".qkv.1." in k for k in model.state_dict())
    x = images(size=42)
    want = dinov2_features(ref, x, sd["register_tokens"])
    with torch.no_grad():
        got = model.forward_features(x)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert (got[key] - want[key]).abs().max() <= 1e-5, key
    # --img-size: the learned grid resized at export exactly as the model resizes it at runtime
    small = export_weights(tmp_path / "teacher_checkpoint.pth", tmp_path / "small", img_size=28)
    resized = load_backbone(small)
    assert resized.pos_embed.shape == (1, 1 + 4, 384)
    assert torch.equal(resized.pos_embed, model.interpolate_pos_encoding(28, 28))


def test_export_from_an_export_dir_converts_the_spec(tmp_path):
    cfg = tiny_cfg("none")
    source = tiny_model(cfg)
    vanilla = save_backbone(source, tmp_path / "v", cfg.student, cfg.spec)
    paper = export_weights(vanilla, tmp_path / "p", ["spec=paper"])
    qkv = export_weights(paper, tmp_path / "q", ["spec.qkv=all"])  # spec.* on top of the source's spec
    for out, spec in ((paper, "paper"), (qkv, None)):
        loaded = load_backbone(out)
        assert_same_features(source, loaded, images(), atol=1e-5)
        assert_same_features(source, loaded, images(size=64), atol=1e-5)
    config = json.loads((qkv / "config.json").read_text())
    every_block = ",".join(map(str, range(cfg.student.depth)))
    assert config["spec"]["qkv"] == every_block and config["spec"]["norm1"] == every_block  # paper's, kept
    assert config["source"] == {"weights": str(paper.resolve()), "family": "dinospec"}
    # refusals: one line, exit 2
    assert cli_main(["export", str(vanilla), "model=vit_large", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["export", str(vanilla), "spec.qkv=sometimes", "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["export", str(vanilla), "--step", "3", "--out", str(tmp_path / "x")]) == 2
    run, _, _ = make_run(tmp_path, cfg)
    assert cli_main(["export", str(run), "spec=paper", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="not a multiple of the patch size"):
        export_weights(vanilla, tmp_path / "odd", img_size=50)


# ----------------------------------------------------------------------------------------------------------------
# continued pretraining: loading into another spec


def test_vanilla_export_initialises_a_specialised_model(tmp_path):
    source = tiny_model(tiny_cfg("none"))
    out = save_backbone(source, tmp_path / "v", tiny_cfg("none").student, tiny_cfg("none").spec)
    cfg = tiny_cfg("paper")
    model = build_backbone(cfg.student, cfg.spec, img_size=IMG).eval()
    load_pretrained_backbone(model, out)
    expected = vanilla_to_routed(source.state_dict(), model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert_same_features(source, model, images(), atol=1e-5)


def test_specialised_exports_between_specs(tmp_path):
    norm_cfg, paper_cfg = tiny_cfg("norm"), tiny_cfg("paper")
    norm = tiny_model(norm_cfg)
    out = save_backbone(norm, tmp_path / "n", norm_cfg.student, norm_cfg.spec)
    # into a wider spec: per-group norms copied group by group, the rest shared -> same function
    paper = build_backbone(paper_cfg.student, paper_cfg.spec, img_size=IMG).eval()
    load_pretrained_backbone(paper, out)
    assert_same_features(norm, paper, images(), atol=1e-5)
    # into the same spec: bit-exact
    same = build_backbone(norm_cfg.student, norm_cfg.spec, img_size=IMG).eval()
    load_pretrained_backbone(same, out)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in norm.state_dict().items())
    # into vanilla: refused, the groups differ
    vanilla_cfg = tiny_cfg("none")
    with pytest.raises(WeightsError, match="blocks.0.norm1.weight.*different values per group"):
        load_pretrained_backbone(build_backbone(vanilla_cfg.student, vanilla_cfg.spec, img_size=IMG), out)


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False)])
def test_pos_embed_is_resized_to_the_model_grid(tmp_path, offset, antialias):
    """One resizer: the model resized at load time computes at its size exactly what the source computes there at
    runtime, under the model's interpolation settings (DINOv2's offset, antialiasing)."""
    cfg = tiny_cfg("none", interpolate_offset=offset, interpolate_antialias=antialias)
    source = tiny_model(cfg)  # 3x3 grid
    out = save_backbone(source, tmp_path / "v", cfg.student, cfg.spec)
    for size in (64, 32):  # 4x4 (up) and 2x2 (down, where antialiasing acts)
        small = build_backbone(cfg.student, cfg.spec, img_size=size).eval()
        load_pretrained_backbone(small, out)
        assert torch.equal(small.pos_embed, source.interpolate_pos_encoding(size, size))
        assert_same_features(source, small, images(size=size))  # bit-exact
    plain = F.interpolate(source.pos_embed[:, 1:].detach().reshape(1, 3, 3, 32).permute(0, 3, 1, 2), size=(2, 2),
                          mode="bicubic").permute(0, 2, 3, 1).reshape(1, 4, 32)
    if offset or antialias:  # the settings matter: a plain resize (the old load path) gives other values
        assert (small.pos_embed[:, 1:] - plain).abs().max() > 1e-3


def test_dinov2_family_is_read_from_the_keys(tmp_path):
    """A DINOv2-format checkpoint with registers under the settings of the models without (offset 0.1, no
    antialias) is refused with the fix; the right settings load; a checkpoint without registers refuses the
    register models' settings."""
    with_regs = tiny_model(tiny_cfg("none", regs=2, interpolate_offset=0.0, interpolate_antialias=True))
    torch.save(with_regs.state_dict(), tmp_path / "reg.pth")
    with pytest.raises(WeightsError, match="with registers.*Set student.interpolate_offset=0.0 "
                                           "student.interpolate_antialias=true"):
        load_pretrained_backbone(tiny_model(tiny_cfg("none", regs=2)), tmp_path / "reg.pth")
    ok = tiny_model(tiny_cfg("paper", regs=2, interpolate_offset=0.0, interpolate_antialias=True), seed=5)
    load_pretrained_backbone(ok, tmp_path / "reg.pth")
    assert_same_features(with_regs, ok, images(size=64), atol=1e-5)  # interpolated: 4x4 grid from 3x3
    no_regs = tiny_model(tiny_cfg("none", regs=0))
    torch.save(no_regs.state_dict(), tmp_path / "noreg.pth")
    with pytest.raises(WeightsError, match="without registers.*Set student.interpolate_offset=0.1 "
                                           "student.interpolate_antialias=false"):
        load_pretrained_backbone(tiny_model(tiny_cfg("none", regs=0, interpolate_offset=0.0,
                                                     interpolate_antialias=True)), tmp_path / "noreg.pth")
    # the same check from a config, before any model is built (what a run can do before it writes anything)
    with pytest.raises(WeightsError, match="with registers.*Set student.interpolate_offset=0.0"):
        check_student_settings(tiny_cfg("none", regs=2).student, tmp_path / "reg.pth")
    check_student_settings(tiny_cfg("none", regs=2, interpolate_offset=0.0, interpolate_antialias=True).student,
                           tmp_path / "reg.pth")
    # a dinospec export carries its own settings in config.json: loaded into any settings, as the user asks
    out = save_backbone(no_regs, tmp_path / "export", tiny_cfg("none", regs=0).student, tiny_cfg("none").spec)
    load_pretrained_backbone(tiny_model(tiny_cfg("none", regs=0, interpolate_antialias=True)), out)


# ----------------------------------------------------------------------------------------------------------------
# refusals


class _RunsCodeOnLoad:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    sd = tiny_model(tiny_cfg()).state_dict()
    torch.save({**sd, "payload": _RunsCodeOnLoad(marker)}, tmp_path / "evil.pth")
    model = build_backbone(tiny_cfg().student, tiny_cfg().spec, img_size=IMG)
    with pytest.raises(WeightsError, match="refusing to load .*evil.pth"):
        load_pretrained_backbone(model, tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_pretrained_backbone(model, tmp_path / "w.ckpt")


def test_wrong_architecture_errors_name_the_key(tmp_path):
    cfg = tiny_cfg("none")
    out = save_backbone(tiny_model(cfg), tmp_path / "v", cfg.student, cfg.spec)

    def try_load(**student):
        c = tiny_cfg("none", **student)
        load_pretrained_backbone(build_backbone(c.student, c.spec, img_size=IMG), out)

    with pytest.raises(WeightsError, match=r"'cls_token': weights \(1, 1, 32\) vs model \(1, 1, 64\).*embed_dim"):
        try_load(embed_dim=64)
    with pytest.raises(WeightsError, match=r"patch_embed.proj.weight.*different patch size"):
        try_load(patch_size=8)
    with pytest.raises(WeightsError, match=r"unexpected \['blocks.2.*depth=3.*depth=2"):
        try_load(depth=2)
    with pytest.raises(WeightsError, match=r"register_tokens.*2 register token\(s\).*0 register"):
        try_load(num_register_tokens=0)
    run, _, _ = make_run(tmp_path, cfg)
    with pytest.raises(WeightsError, match="training run or checkpoint.*dinospec export"):
        load_pretrained_backbone(tiny_model(cfg), run / "checkpoints" / "step_7")
