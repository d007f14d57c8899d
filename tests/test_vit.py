"""The backbone: output shapes for every size and spec, tokens, position embeddings, masking, names, FFNs, drop path.

Big sizes are built and run on the meta device (shapes and parameter counts without memory or compute); real
forwards use tiny models.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinospec.config import CONFIG_DIR, load_config
from dinospec.models.routed import TokenRouted
from dinospec.models.specialize import resolve_spec
from dinospec.models.vit import ARCHS, SwiGLU, VisionTransformer, arch_kwargs, build_backbone

SPEC_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "spec").glob("*.yaml"))
TINY = dict(embed_dim=32, depth=3, num_heads=4)


def tiny(img_size: int = 32, patch_size: int = 8, num_reg: int = 0, spec: dict | None = None, **kw) -> VisionTransformer:
    args = {**TINY, **kw}
    resolved = resolve_spec(spec, args["depth"]) if spec is not None else None
    return VisionTransformer(img_size=img_size, patch_size=patch_size, num_register_tokens=num_reg, spec=resolved,
                             **args).eval()


def images(b: int, h: int, w: int | None = None, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# shapes for every size x every spec preset


@pytest.fixture(scope="module")
def spec_presets() -> dict:
    return {name: load_config([], [f"spec={name}"]).spec for name in SPEC_PRESETS}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_and_spec_on_meta(arch, spec_presets):
    """Every size with every spec preset builds with exactly the routed slots its spec names; a meta forward
    (no memory, no compute) returns DINOv2's output dict with the right shapes."""
    kw = ARCHS[arch]
    d, depth = kw["embed_dim"], kw["depth"]
    student = dict(load_config([], [f"student.arch={arch}"]).student)
    params = {}
    for spec_name, spec in spec_presets.items():
        resolved = resolve_spec(spec, depth)
        with torch.device("meta"):
            model = build_backbone(student, spec, img_size=224)
        assert len(model.blocks) == depth and model.embed_dim == d
        for i, block in enumerate(model.blocks):
            slots = {"norm1": block.norm1, "qkv": block.attn.qkv, "proj": block.attn.proj, "norm2": block.norm2,
                     "mlp": block.mlp, "ls1": block.ls1, "ls2": block.ls2}
            for kind, slot in slots.items():
                groups = len(slot) if isinstance(slot, TokenRouted) else 1
                assert groups == resolved.groups_for(kind, i), (spec_name, i, kind)
        assert isinstance(model.norm, TokenRouted) == resolved.final_norm
        params[spec_name] = sum(p.numel() for p in model.parameters())
    # specialisation only adds parameters, and `none` adds none
    assert all(n >= params["none"] for n in params.values())
    assert params["paper"] > params["norm_ls"] > params["norm"] > params["none"]
    assert params["qkv_all"] > params["qkv_half"] > params["qkv_only"] > params["none"]

    for spec_name, num_reg in [("paper", 4), ("paper_reg_alone", 0)]:  # forwards are the slow part on meta
        with torch.device("meta"):
            model = build_backbone({**student, "num_register_tokens": num_reg}, spec_presets[spec_name], 224)
            out = model.forward_features(torch.empty(2, 3, 224, 224), masks=torch.empty(2, 256, dtype=torch.bool))
        assert out["x_norm_clstoken"].shape == (2, d)
        assert out["x_norm_regtokens"].shape == (2, num_reg, d)
        assert out["x_norm_patchtokens"].shape == (2, 256, d)
        assert out["x_prenorm"].shape == (2, 1 + num_reg + 256, d)
        assert out["masks"].shape == (2, 256)


def test_vanilla_parameter_counts():
    """Vanilla sizes match DINOv2's published backbones (ViT-S/14 21M, B 86M, L 300M, g 1.1B at 518 px)."""
    expected = {"vit_small": 22_056_576, "vit_base": 86_580_480, "vit_large": 304_368_640,
                "vit_giant2": 1_136_480_768}
    for arch, n in expected.items():
        with torch.device("meta"):
            model = VisionTransformer(img_size=518, patch_size=14, **ARCHS[arch])
        assert sum(p.numel() for p in model.parameters()) == n, arch


@pytest.mark.parametrize("patch_size,img", [(14, 28), (14, 42), (16, 32), (16, 48)])
@pytest.mark.parametrize("num_reg", [0, 4])
def test_real_forward_shapes(patch_size, img, num_reg):
    model = tiny(img_size=img, patch_size=patch_size, num_reg=num_reg, spec=load_config([], ["spec=paper"]).spec)
    n = (img // patch_size) ** 2
    with torch.no_grad():
        out = model.forward_features(images(2, img))
        cls = model(images(2, img))
    assert out["x_norm_clstoken"].shape == (2, 32) and torch.equal(cls, out["x_norm_clstoken"])
    assert out["x_norm_regtokens"].shape == (2, num_reg, 32)
    assert out["x_norm_patchtokens"].shape == (2, n, 32)
    assert out["x_prenorm"].shape == (2, 1 + num_reg + n, 32)
    assert out["masks"] is None
    assert torch.isfinite(out["x_prenorm"]).all()
    # the normalised outputs are the final norm of x_prenorm, split by token type
    normed = model.norm(out["x_prenorm"])
    assert torch.allclose(normed[:, 0], out["x_norm_clstoken"])
    assert torch.allclose(normed[:, 1 + num_reg:], out["x_norm_patchtokens"])


def test_image_size_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny()(images(1, 30))


# ----------------------------------------------------------------------------------------------------------------
# tokens, position embeddings, masking


def test_prepare_tokens_layout():
    """[cls + pos0 | registers (no pos) | patches + pos]."""
    model = tiny(num_reg=4)
    with torch.no_grad():
        for p in (model.cls_token, model.register_tokens):
            p.normal_()
        x = images(2, 32)
        tokens = model.prepare_tokens(x)
        patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 16, D)
    assert tokens.shape == (2, 1 + 4 + 16, 32)
    assert torch.allclose(tokens[:, 0], (model.cls_token[0, 0] + model.pos_embed[0, 0]).expand(2, -1))
    assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))
    assert torch.allclose(tokens[:, 5:], patches + model.pos_embed[:, 1:])


def test_mask_token_replaces_exactly_the_masked_patches():
    model = tiny(num_reg=2)
    with torch.no_grad():
        model.mask_token.normal_()
        x = images(2, 32)
        masks = torch.zeros(2, 16, dtype=torch.bool)
        masks[0, [0, 5, 15]] = True
        masks[1, 3:9] = True
        plain, masked = model.prepare_tokens(x), model.prepare_tokens(x, masks)
    m = torch.cat([torch.zeros(2, 3, dtype=torch.bool), masks], dim=1)  # cls + 2 registers are never masked
    assert torch.equal(masked[~m], plain[~m])
    expected = model.mask_token + model.pos_embed[0, 1:][masks.nonzero()[:, 1]]
    assert torch.allclose(masked[m], expected)
    assert not torch.isclose(masked[m], plain[m]).all(dim=-1).any()
    out = model.forward_features(x, masks)
    assert out["masks"] is masks


def test_pos_embed_identity_at_native_size():
    model = tiny(img_size=32)
    assert model.interpolate_pos_encoding(32, 32) is model.pos_embed


@pytest.mark.parametrize("h,w", [(48, 48), (16, 16), (32, 48), (24, 40), (16, 32)])
def test_pos_embed_interpolation(h, w):
    model = tiny(img_size=32)  # a 4x4 grid
    gh, gw = h // 8, w // 8
    pos = model.interpolate_pos_encoding(h, w)
    assert pos.shape == (1, 1 + gh * gw, 32)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])  # the cls position never moves
    # with DINOv2's offset the grid is resized by scale factor; without it, to the exact size: close but not equal
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)  # (1, D, 4, 4)
    by_size = F.interpolate(grid, size=(gh, gw), mode="bicubic").permute(0, 2, 3, 1).reshape(1, gh * gw, 32)
    model.interpolate_offset = 0.0
    assert torch.allclose(model.interpolate_pos_encoding(h, w)[:, 1:], by_size, atol=1e-6)
    assert (pos[:, 1:] - by_size).abs().max() < 0.5 * model.pos_embed.abs().max()
    with torch.no_grad():
        out = model.forward_features(images(1, h, w))
    assert out["x_norm_patchtokens"].shape == (1, gh * gw, 32)


def test_pos_embed_same_count_non_square_is_interpolated():
    """A 2x8 grid has as many patches as the native 4x4 one, but its positions must still be resized."""
    model = tiny(img_size=32)
    pos = model.interpolate_pos_encoding(16, 64)
    assert pos.shape == model.pos_embed.shape and not torch.equal(pos, model.pos_embed)


def test_pos_embed_interpolation_keeps_a_constant_grid():
    model = tiny(img_size=32)
    with torch.no_grad():
        model.pos_embed.fill_(0.25)
    assert torch.allclose(model.interpolate_pos_encoding(40, 24), torch.full((1, 1 + 15, 32), 0.25), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# intermediate layers


def test_get_intermediate_layers():
    model = tiny(num_reg=2, depth=4, spec=load_config([], ["spec=final_norm"]).spec)
    x = images(2, 32, 48)  # a 4x6 grid
    with torch.no_grad():
        last = model.get_intermediate_layers(x, n=2)
        assert len(last) == 2 and all(t.shape == (2, 24, 32) for t in last)
        final = model.forward_features(x)
        assert torch.allclose(last[-1], final["x_norm_patchtokens"])  # the last block, normed = the output
        picked = model.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True)
        assert len(picked) == 2
        for patches, cls in picked:
            assert patches.shape == (2, 32, 4, 6) and cls.shape == (2, 32)
        flat = model.get_intermediate_layers(x, n=[0, 2])
        # reshape puts patch (i, j) of the 4x6 grid at [:, :, i, j]
        assert torch.equal(picked[1][0][:, :, 2, 5], flat[1][:, 2 * 6 + 5])
        assert torch.equal(picked[1][0].flatten(2).transpose(1, 2), flat[1])
        prenorm = model.get_intermediate_layers(x, n=1, norm=False)[0]
        assert torch.equal(prenorm, final["x_prenorm"][:, 3:])
        assert not torch.allclose(picked[0][0].flatten(2), picked[1][0].flatten(2))


# ----------------------------------------------------------------------------------------------------------------
# names, FFNs, drop path


def test_dinov2_parameter_names():
    model = tiny(num_reg=4, depth=2)
    names = set(model.state_dict())
    expected = {"cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias", "ls2.gamma")}
    assert names == expected
    assert model.cls_token.shape == (1, 1, 32) and model.mask_token.shape == (1, 32)
    assert model.register_tokens.shape == (1, 4, 32) and model.pos_embed.shape == (1, 17, 32)
    assert model.blocks[0].attn.qkv.weight.shape == (96, 32)

    swiglu = tiny(depth=1, ffn_layer="swiglu", layerscale=None)
    ffn_names = {n for n in swiglu.state_dict() if ".mlp." in n or ".ls" in n}
    assert ffn_names == {"blocks.0.mlp.w12.weight", "blocks.0.mlp.w12.bias", "blocks.0.mlp.w3.weight",
                         "blocks.0.mlp.w3.bias"}
    assert "register_tokens" not in swiglu.state_dict()


def test_routed_names_gain_a_group_index():
    model = tiny(num_reg=2, depth=2, spec={**load_config([], ["spec=paper"]).spec, "final_norm": True})
    names = set(model.state_dict())
    assert {"blocks.0.norm1.0.weight", "blocks.0.norm1.1.weight", "blocks.0.attn.qkv.1.bias",
            "blocks.1.ls2.1.gamma", "norm.1.bias"} <= names
    assert "blocks.0.attn.proj.weight" in names and "blocks.0.mlp.fc1.weight" in names


def test_swiglu():
    ffn = SwiGLU(48, 4 * 48)
    hidden = (int(4 * 48 * 2 / 3) + 7) // 8 * 8  # DINOv2's SwiGLUFFNFused width: 128
    assert hidden == 128 and ffn.w12.weight.shape == (256, 48) and ffn.w3.weight.shape == (48, 128)
    x = torch.randn(3, 5, 48)
    w1, w2 = ffn.w12.weight[:hidden], ffn.w12.weight[hidden:]
    b1, b2 = ffn.w12.bias[:hidden], ffn.w12.bias[hidden:]
    expected = ffn.w3(F.silu(x @ w1.T + b1) * (x @ w2.T + b2))
    assert torch.allclose(ffn(x), expected, atol=1e-6)
    assert SwiGLU(1536, 4 * 1536).w12.weight.shape == (2 * 4096, 1536)  # giant2, as DINOv2's ViT-g/14
    model = tiny(ffn_layer="swiglu")
    with torch.no_grad():
        assert model.forward_features(images(1, 32))["x_norm_patchtokens"].shape == (1, 16, 32)


def test_arch_overrides():
    kw = arch_kwargs({"arch": "vit_small", "depth": 4, "embed_dim": None, "num_heads": None, "ffn_layer": "swiglu"})
    assert kw == dict(embed_dim=384, depth=4, num_heads=6, ffn_layer="swiglu")
    with pytest.raises(KeyError, match="vit_huge"):
        arch_kwargs({"arch": "vit_huge"})


def test_drop_path_only_in_train_mode():
    x = images(4, 32)
    model = tiny(num_reg=2, drop_path_rate=1.0, drop_path_mode="row")  # every residual branch dropped when active
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # LayerScale far from 1e-5 so a residual branch is visible
        tokens = model.prepare_tokens(x)
        model.train()
        train_out = model.forward_features(x)["x_prenorm"]
        model.eval()
        eval_out = model.forward_features(x)["x_prenorm"]
        no_drop = tiny(num_reg=2, drop_path_rate=0.0)
        no_drop.load_state_dict(model.state_dict())
        reference = no_drop.forward_features(x)["x_prenorm"]
    assert torch.equal(train_out, tokens)  # all blocks skipped: the sequence is the embedded tokens
    assert torch.equal(eval_out, reference)  # eval: no drop, no rescale
    assert not torch.allclose(eval_out, tokens)

    half = tiny(num_reg=2, drop_path_rate=0.5).train()
    half.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.manual_seed(0)
        a = half.forward_features(x)["x_prenorm"]
        b = half.forward_features(x)["x_prenorm"]
    assert not torch.equal(a, b)  # random per call


def test_residual_of_subset_runs_the_branch_on_kept_rows_only():
    from dinospec.models.vit import add_residual_of_subset

    x = torch.randn(10, 5, 4)
    seen: list[torch.Tensor] = []

    def branch(t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return 2 * t + 1

    torch.manual_seed(3)
    out = add_residual_of_subset(x, branch, drop_rate=0.35)
    assert seen[0].shape[0] == 6  # floor(10 * 0.65): the dropped rows are never computed
    changed = [i for i in range(10) if not torch.equal(out[i], x[i])]
    assert len(changed) == 6
    for i in changed:  # kept rows get the branch scaled by B / kept
        torch.testing.assert_close(out[i], x[i] + (2 * x[i] + 1) * 10 / 6)
    assert add_residual_of_subset(x[:1], branch, drop_rate=0.9).shape == (1, 5, 4)  # at least one row kept


@pytest.mark.parametrize("mode, rate, expected", [("auto", 0.1, "row"), ("auto", 0.4, "subset"),
                                                  ("row", 0.4, "row"), ("subset", 0.05, "subset")])
def test_drop_path_mode_resolution(mode, rate, expected):
    assert {b.drop_path_mode for b in tiny(drop_path_rate=rate, drop_path_mode=mode).blocks} == {expected}


def test_subset_drop_path_matches_dinov2_block_in_training():
    """Same weights, same seed: a training step of our block and of the reference package's block (which takes the
    subset path above rate 0.1) give the same output and the same gradients."""
    block_module = pytest.importorskip("dinov2.layers.block", reason="pip install --no-deps dinov2==0.0.1.dev2")
    from dinov2.layers.attention import Attention as Dinov2Attention
    from dinov2.layers.layer_scale import LayerScale as Dinov2LayerScale

    spec = dict(load_config([], ["spec=norm_ls"]).spec)
    ours = tiny(depth=1, drop_path_rate=0.4, spec=spec).blocks[0].train()
    ref = block_module.Block(dim=TINY["embed_dim"], num_heads=TINY["num_heads"], qkv_bias=True, drop_path=0.4,
                             init_values=1e-5, attn_class=Dinov2Attention).train()
    assert isinstance(ref.ls1, Dinov2LayerScale)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    # the routed model starts from the plain weights: every group's copy = the reference's layer
    from dinospec.models.specialize import vanilla_to_routed

    ours.load_state_dict(vanilla_to_routed(ref.state_dict(), ours))
    x = torch.randn(8, 1 + 16, TINY["embed_dim"])
    from dinospec.models.routed import Routing, TokenLayout

    routing = Routing.from_lengths((0, 1, 1), TokenLayout(0).lengths(16))
    torch.manual_seed(6)
    got = ours(x, routing)
    torch.manual_seed(6)
    want = ref(x)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())  # noqa: E731
    close(got, want)  # fp32 rounding apart (the reference attends with matmul + softmax, we with SDPA)
    torch.manual_seed(7)
    assert not torch.allclose(ours(x, routing), want, atol=1e-3)  # another subset: the draw matters
    got.square().sum().backward()
    want.square().sum().backward()
    close(ours.attn.qkv.weight.grad, ref.attn.qkv.weight.grad)
    close(ours.norm1[0].weight.grad + ours.norm1[1].weight.grad, ref.norm1.weight.grad)
    close(ours.ls2[0].gamma.grad + ours.ls2[1].gamma.grad, ref.ls2.gamma.grad)
