"""DINOv3-format backbones imported into dinospec (vanilla and specialised), checked against DINOv3's own outputs.

The reference (../shared/reference/dinov3/, or $DINOSPEC_DINOV3_REFERENCE) holds a tiny DINOv3 ViT (RoPE, 4 storage
tokens, K-bias masking, LayerNorm eps 1e-5) in two variants, released (one final norm) and untied (a separate final
norm for [CLS] + storage tokens), its weights, inputs and every forward output, all produced by DINOv3's code. Its
20 MB of weights and outputs are not copied into the repository: those tests skip, saying why, without it. The
format tests below them build DINOv3-format state dicts from dinospec models and always run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dinospec.config import load_config
from dinospec.models.vit import VisionTransformer, build_backbone
from dinospec.weight_formats import DINOV3_NORM_GROUPS, convert_dinov3_state_dict, dinov3_rope_settings
from dinospec.weights import WeightsError, check_student_settings, load_pretrained_backbone

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("DINOSPEC_DINOV3_REFERENCE", REPO.parent / "shared" / "reference" / "dinov3"))
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "weights_released.safetensors").is_file(),
    reason=f"DINOv3 reference outputs not found in {REFERENCE} (set DINOSPEC_DINOV3_REFERENCE to the folder)")
TOL = 1e-5  # fp32; the reference README's list of typical mistakes starts at 1.8e-5
# dinospec's name for each DINOv3 output
FEATURES = {"x_norm_clstoken": "x_norm_clstoken", "x_norm_regtokens": "x_storage_tokens",
            "x_norm_patchtokens": "x_norm_patchtokens", "x_prenorm": "x_prenorm"}
# the DINOv3 ViT-S/16 recipe at the reference's size: what a user sets to import such weights
DINOV3_TINY = ["model=vit_tiny", "student.depth=4", "student.patch_size=16", "student.num_register_tokens=4",
               "student.pos_embed=rope", "student.norm_eps=1e-5", "student.rope_rescale_coords=2.0"]
# (variant, spec overrides): released into vanilla and specialised models; untied into the final-norm spec (its
# exact equivalent) and into specs that also route other layers or split [cls] from the registers
CASES = [
    ("released", ["spec=none"]),
    ("released", ["spec=paper"]),
    ("released", ["spec=qkv_all"]),
    ("untied", ["spec=final_norm"]),
    ("untied", ["spec=paper", "spec.groups=[[cls,reg],[patch]]", "spec.final_norm=true"]),
    ("untied", ["spec=paper", "spec.groups=[[cls],[reg],[patch]]", "spec.final_norm=true"]),
]


def build(*overrides: str, img_size: int = 224) -> VisionTransformer:
    cfg = load_config(overrides=[*DINOV3_TINY, *overrides])
    return build_backbone(cfg.student, cfg.spec, img_size=img_size).eval()


def reference(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(REFERENCE / name)


def max_abs_diffs(model: VisionTransformer, inputs: dict, want: dict) -> dict[str, float]:
    """Max abs difference of every output the reference holds: forward_features of the three inputs (mask
    included) and get_intermediate_layers(n=2) with class and storage tokens for the unmasked ones."""
    diffs = {}
    with torch.no_grad():
        for name, x, masks in (("img224", inputs["img224"], None), ("img224_masked", inputs["img224"],
                                                                     inputs["mask224"]),
                               ("img160x240", inputs["img160x240"], None)):
            got = model.forward_features(x, masks)
            for ours, theirs in FEATURES.items():
                diffs[f"{name}.{theirs}"] = (got[ours] - want[f"{name}.{theirs}"]).abs().max().item()
            if masks is not None:
                assert torch.equal(got["masks"], want[f"{name}.masks"])
                continue
            layers = model.get_intermediate_layers(x, n=2, return_class_token=True, return_extra_tokens=True)
            for block, (patch, cls, storage) in zip((2, 3), layers):
                for key, value in (("patch_tokens", patch), ("class_token", cls), ("storage_tokens", storage)):
                    ref_key = f"{name}.intermediate.block{block}.{key}"
                    diffs[ref_key] = (value - want[ref_key]).abs().max().item()
    return diffs


@needs_reference
@pytest.mark.parametrize("variant,spec", CASES, ids=[f"{v}-{'-'.join(s)}" for v, s in CASES])
def test_reproduces_dinov3_outputs(variant, spec):
    model = build(*spec)
    load_pretrained_backbone(model, REFERENCE / f"weights_{variant}.safetensors")
    diffs = max_abs_diffs(model, reference("inputs.safetensors"), reference(f"outputs_{variant}.safetensors"))
    assert len(diffs) == 24  # + the mask: all 25 stored outputs
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{worst}: max abs diff {diffs[worst]:.3g}"


@needs_reference
def test_training_checkpoint_wrapper_and_pth(tmp_path):
    """A DINOv3 training checkpoint nests the backbone (teacher.backbone.*) next to heads; saved as .pth."""
    weights = reference("weights_untied.safetensors")
    wrapped = {"model": {**{f"teacher.backbone.{k}": v for k, v in weights.items()},
                         **{f"student.backbone.{k}": v + 1 for k, v in weights.items()},
                         "teacher.dino_head.last_layer.weight": torch.zeros(3, 4)}}
    torch.save(wrapped, tmp_path / "model_0001.pth")
    model = build("spec=final_norm")
    load_pretrained_backbone(model, tmp_path / "model_0001.pth")
    diffs = max_abs_diffs(model, reference("inputs.safetensors"), reference("outputs_untied.safetensors"))
    assert max(diffs.values()) <= TOL


@needs_reference
def test_untied_norms_refused_where_no_exact_equivalent():
    for spec in (["spec=none"], ["spec=paper", "spec.final_norm=true"]):  # shared norm; [reg, patch] together
        with pytest.raises(WeightsError, match="'norm.weight' is specialised per token group"):
            load_pretrained_backbone(build(*spec), REFERENCE / "weights_untied.safetensors")


@needs_reference
def test_wrong_settings_are_refused_with_the_fix():
    path = REFERENCE / "weights_released.safetensors"
    with pytest.raises(WeightsError, match="DINOv3.*Set student.pos_embed=rope .*student.norm_eps=1e-05"):
        load_pretrained_backbone(build("student.pos_embed=learned"), path)
    with pytest.raises(WeightsError, match=r"norm_eps=1e-06.*Set student.norm_eps=1e-05$"):
        load_pretrained_backbone(build("student.norm_eps=1e-6"), path)
    with pytest.raises(WeightsError, match="student.rope_base=100.0"):
        load_pretrained_backbone(build("student.rope_base=1000"), path)
    with pytest.raises(WeightsError, match="student.rope_normalize_coords=separate"):
        load_pretrained_backbone(build("student.rope_normalize_coords=max"), path)
    # from the config alone (before a run builds anything)
    with pytest.raises(WeightsError, match="student.rope_base=100.0"):
        check_student_settings(load_config(overrides=[*DINOV3_TINY, "student.rope_base=10"]).student, path)
    check_student_settings(load_config(overrides=DINOV3_TINY).student, path)


# ----------------------------------------------------------------------------------------------------------------
# the format, without the reference files


def dinov3_format(model: VisionTransformer, untie: bool) -> dict[str, torch.Tensor]:
    """A dinospec RoPE model's weights written as DINOv3 names them, with K biases that must be masked out."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"storage_tokens": sd.pop("register_tokens"), "rope_embed.periods": torch.logspace(0, 1, 4, base=100.0)}
    out["rope_embed.periods"] = 100.0 ** (torch.arange(4, dtype=torch.float32) / 4)
    dim = model.embed_dim
    for key, value in sd.items():
        if key.endswith("attn.qkv.bias"):
            mask = torch.ones(3 * dim)
            mask[dim:2 * dim] = 0
            out[key.replace(".bias", ".bias_mask")] = mask
            value = value.clone()
            value[dim:2 * dim] = 5.0  # a K bias DINOv3 never applies
        out[key] = value
    if untie:
        out["cls_norm.weight"], out["cls_norm.bias"] = out["norm.weight"] * 2, out["norm.bias"] - 1
        out["local_cls_norm.weight"], out["local_cls_norm.bias"] = torch.zeros(dim), torch.zeros(dim)
    return out


def small(*overrides: str) -> VisionTransformer:
    cfg = load_config(overrides=["model=vit_pico", "student.depth=2", "student.embed_dim=32", "student.num_heads=2",
                                 "student.patch_size=8", "student.num_register_tokens=3", "student.pos_embed=rope",
                                 "student.norm_eps=1e-5", *overrides])
    torch.manual_seed(0)
    model = build_backbone(cfg.student, cfg.spec, img_size=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_conversion_masks_k_bias_and_renames(tmp_path):
    from safetensors.torch import save_file

    source = small()
    with torch.no_grad():
        for block in source.blocks:
            block.attn.qkv.bias[32:64] = 0.0  # what the masked K bias computes
    raw = dinov3_format(source, untie=False)
    state, groups, periods = convert_dinov3_state_dict(raw)
    assert groups is None and set(state) == set(source.state_dict())
    assert torch.equal(state["blocks.1.attn.qkv.bias"], source.blocks[1].attn.qkv.bias)
    assert dinov3_rope_settings(periods) == {"rope_base": 100.0, "rope_min_period": None, "rope_max_period": None}
    save_file(raw, tmp_path / "v3.safetensors")
    for spec in ("none", "paper"):
        model = small(f"spec={spec}")
        load_pretrained_backbone(model, tmp_path / "v3.safetensors")
        x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            a, b = source.forward_features(x), model.forward_features(x)
        for key in FEATURES:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_untied_norms_become_the_routed_final_norm():
    raw = dinov3_format(small(), untie=True)
    state, groups, _ = convert_dinov3_state_dict(raw)
    assert groups == DINOV3_NORM_GROUPS == (0, 0, 1)
    assert torch.equal(state["norm.0.weight"], raw["cls_norm.weight"])
    assert torch.equal(state["norm.1.bias"], raw["norm.bias"])
    assert not any(k.startswith(("local_cls_norm", "cls_norm", "norm.weight")) for k in state)


def test_min_max_periods_are_recognised():
    from dinospec.models.rope import rope_periods

    settings = dinov3_rope_settings(rope_periods(64, min_period=0.5, max_period=40.0))
    assert settings["rope_base"] is None and settings["rope_min_period"] == pytest.approx(0.5)
    with pytest.raises(WeightsError, match="neither"):
        dinov3_rope_settings(torch.tensor([1.0, 3.0, 4.0, 20.0]))


def test_export_from_a_dinov3_file(tmp_path):
    """`dinospec export FILE` reads a DINOv3 backbone's architecture and settings from the weights (head count
    from the RoPE periods, eps, storage tokens, untied norms -> spec final_norm) and converts the spec on request."""
    from safetensors.torch import save_file

    from dinospec.export import export_weights, load_backbone

    source = small("spec=final_norm")
    with torch.no_grad():
        for block in source.blocks:
            block.attn.qkv.bias[32:64] = 0.0
    raw = dinov3_format(source, untie=False)  # its final norm is routed: norm.0 ([cls, reg]), norm.1 (patches)
    for name in ("weight", "bias"):  # DINOv3's names for the two
        raw[f"cls_norm.{name}"], raw[f"norm.{name}"] = raw.pop(f"norm.0.{name}"), raw.pop(f"norm.1.{name}")
    save_file({k: v.contiguous() for k, v in raw.items()}, tmp_path / "v3.safetensors")
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(4))
    for overrides in ([], ["spec=paper", "spec.groups=[[cls],[reg],[patch]]", "spec.final_norm=true"]):
        out = export_weights(tmp_path / "v3.safetensors", tmp_path / f"out{len(overrides)}", overrides)
        model = load_backbone(out)
        assert model.rope_embed is not None and model.num_register_tokens == 3 and model.spec.final_norm
        assert model.spec.num_groups == (3 if overrides else 2)
        assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
        with torch.no_grad():
            a, b = source.forward_features(x), model.forward_features(x)
        for key in FEATURES:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@needs_reference
def test_export_reference_into_a_specialised_backbone(tmp_path):
    from dinospec.export import export_weights, load_backbone

    out = export_weights(REFERENCE / "weights_untied.safetensors", tmp_path / "e",
                         ["spec=paper", "spec.groups=[[cls],[reg],[patch]]", "spec.final_norm=true"])
    diffs = max_abs_diffs(load_backbone(out), reference("inputs.safetensors"), reference("outputs_untied.safetensors"))
    assert max(diffs.values()) <= TOL
