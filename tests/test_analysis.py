"""`dinospec analyze`: token-type statistics through norm1, channel specialisation, high-norm tokens, PCA pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinospec.analysis import PLOTS, analyze
from dinospec.analysis_measure import high_norm_stats, measure, pca_rgb
from dinospec.eval.features import ImageList, list_images
from dinospec.models.routed import route
from dinospec.models.vit import build_backbone

PHOTOS = Path(__file__).resolve().parents[1] / "data" / "eval" / "photos"
STUDENT = dict(arch="vit_pico", patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
               num_register_tokens=2, layerscale=1.0, qkv_bias=True, proj_bias=True, ffn_bias=True,
               attn_backend="sdpa", interpolate_offset=0.1, interpolate_antialias=False, drop_path_rate=0.0)
PAPER_SPEC = dict(groups=[["cls"], ["reg", "patch"]], norm1="all", qkv="0:1", proj="none", norm2="all", mlp="none",
                  ls1="all", ls2="all", final_norm=False)




def tiny_model(spec: dict = PAPER_SPEC) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(STUDENT, spec, img_size=32).eval()  # layerscale 1.0: blocks change the stream


def by_hand_cosines(x: torch.Tensor, r: int) -> tuple[float, float]:
    """Mean cos([CLS], patch) and mean off-diagonal cos(patch, patch) over a batch, one pair at a time."""
    cls_patch, patch_patch = [], []
    for seq in x.double():
        cls, patches = seq[0], seq[1 + r :]
        cls_patch.append(torch.stack([F.cosine_similarity(cls, p, dim=0) for p in patches]).mean())
        pairs = [F.cosine_similarity(patches[i], patches[j], dim=0)
                 for i in range(len(patches)) for j in range(len(patches)) if i != j]
        patch_patch.append(torch.stack(pairs).mean())
    return torch.stack(cls_patch).mean().item(), torch.stack(patch_patch).mean().item()


@pytest.mark.parametrize("spec", [PAPER_SPEC, {**PAPER_SPEC, "norm1": "none"}], ids=["routed_norm1", "shared_norm1"])
def test_cosines_before_and_after_norm1_match_a_by_hand_computation(spec):
    model = tiny_model(spec)
    files = list_images(PHOTOS)[:3]
    res, _ = measure(model, files, img_size=32, batch_size=2, progress=False)
    images = torch.stack([ImageList(files, 32)[i][0] for i in range(3)])
    with torch.no_grad():  # the residual stream entering block 1 and block 1's norm1 output, written out
        x = model.prepare_tokens(images)
        routing = model.routing(x.shape[1] - 1 - model.num_register_tokens)
        x = model.blocks[0](x, routing)
        y = route(model.blocks[1].norm1, x, routing)
    r = model.num_register_tokens
    for stage, tokens in (("before_norm1", x), ("after_norm1", y)):
        cls_patch, patch_patch = by_hand_cosines(tokens, r)
        assert res["cosine"][stage]["cls_patch"][1] == pytest.approx(cls_patch, abs=1e-6)
        assert res["cosine"][stage]["patch_patch"][1] == pytest.approx(patch_patch, abs=1e-6)


def test_channel_statistic_finds_channels_given_to_cls():
    """Scale the [CLS] group's norm1 gain by 100 on 8 of 32 channels: at least those are [CLS]-dominant."""
    model = tiny_model()
    with torch.no_grad():
        for block in model.blocks:
            block.norm1[0].weight[:8] *= 100.0  # group 0 = [CLS]
    res, _ = measure(model, list_images(PHOTOS)[:2], img_size=32, progress=False)
    assert all(f >= 8 / 32 for f in res["channels"]["cls_dominant_fraction"])
    gains = res["norm1_gain"]
    assert gains["routed"] == [True] * 3 and gains["scatter_block"] == 2
    assert gains["cls_mean_abs"][0] == pytest.approx((8 * 100 + 24) / 32)
    assert gains["patch_mean_abs"][0] == pytest.approx(1.0)


def test_high_norm_stats_by_hand():
    x = torch.zeros(1, 1 + 1 + 4, 3)  # cls, one register, four patches
    x[0, 1] = 100.0  # a register with a huge norm is not a patch: not counted
    x[0, 2:, 0] = torch.tensor([1.0, 1.0, 2.0, 10.0])
    ratio, outliers = high_norm_stats(x, num_reg=1, k=3.0)
    assert ratio.item() == pytest.approx(10.0)  # median of (1, 1, 2, 10) taken as the lower middle value, 1
    assert outliers.item() == 1


def test_pca_picture_is_an_rgb_grid_in_unit_range():
    tokens = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    rgb, var = pca_rgb(tokens, (4, 4))
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert len(var) == 3 and var[0] >= var[1] >= var[2] > 0


def test_analyze_writes_readable_plots_and_json(tmp_path):
    model = tiny_model()
    res = analyze(model, list_images(PHOTOS)[:3], tmp_path, img_size=32, pca_images=2, progress=False)
    for name in PLOTS:
        with Image.open(tmp_path / name) as img:
            assert img.width > 400 and img.height > 200
    saved = json.loads((tmp_path / "analysis.json").read_text())
    assert saved["num_images"] == 3 and saved["depth"] == 3 and saved["plots"] == list(PLOTS)
    assert set(saved) >= {"cosine", "channels", "norm1_gain", "high_norm", "pca"}
    for stage in ("before_norm1", "after_norm1"):
        assert len(saved["cosine"][stage]["cls_patch"]) == 3 and len(saved["cosine"][stage]["patch_patch"]) == 3
    assert len(saved["channels"]["specialisation_score"]) == 3 and len(saved["channels"]["reference_score"]) == 3
    assert len(saved["channels"]["cls_mean_abs"]) == 3 and len(saved["channels"]["cls_mean_abs"][0]) == 32
    assert len(saved["high_norm"]["max_over_median"]) == 3
    assert saved["pca"]["images"] == [p.name for p in list_images(PHOTOS)[:2]]
    assert res["cosine"] == saved["cosine"]


def test_analyze_command_on_an_export(tmp_path, capsys):
    from dinospec.cli import main
    from dinospec.export import save_backbone

    export = save_backbone(tiny_model(), tmp_path / "export", STUDENT, PAPER_SPEC)
    rc = main(["analyze", "--backbone", str(export), "--images", str(PHOTOS), "--out", str(tmp_path / "out"),
               "--max-images", "2", "--img-size", "32", "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "out" / "analysis.json").read_text())["num_images"] == 2
    assert "cls-patch before" in capsys.readouterr().out
    assert main(["analyze", "--backbone", str(export), "--images", str(PHOTOS), "--out", str(tmp_path / "o2"),
                 "--img-size", "30"]) == 2
