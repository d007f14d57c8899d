"""A Vision Transformer in the DINOv2 family whose layers can route each token type through its own parameters.

Parameter names follow DINOv2 / timm (``cls_token, register_tokens, pos_embed, mask_token, patch_embed.proj,
blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 | mlp.w12, mlp.w3, ls2.gamma}, norm``);
a routed slot adds a group index (``blocks.0.norm1.1.weight``). Which slots are routed comes from a ResolvedSpec.
Position: a learned ``pos_embed`` added to the tokens (DINOv2), or RoPE inside attention (DINOv3; no pos_embed).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

from dinospec.models import archs
from dinospec.models.rope import RopePositions, RopeTables, apply_rope
from dinospec.models.rope_config import rope_settings
from dinospec.models.routed import Routing, TokenLayout, make_slot, route
from dinospec.models.specialize import ResolvedSpec, resolve_spec, vanilla_spec

ARCHS, arch_kwargs = archs.ARCHS, archs.arch_kwargs  # torch-free (config validation); re-exported here
POS_EMBEDS = ("learned", "rope")


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'W', C)


class PerTokenAffineLayerNorm(torch.autograd.Function):
    """layer_norm(x) * weight + bias with weight and bias given per token, (N, C) against x's (..., N, C).

    Autograd through layer_norm + addcmul would keep the normalised input for the weight gradient: one extra
    activation per routed norm (+12% saved activations with every norm routed). This saves what the fused
    nn.LayerNorm saves (input, mean, rstd) and recomputes the normalised input in backward instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
        normalized, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), None, None, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return normalized * weight
        return torch.addcmul(bias, normalized, weight)  # bitwise what nn.LayerNorm's fused affine computes

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        batch_dims = tuple(range(grad.dim() - weight.dim()))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(grad * weight, x, (x.shape[-1],), mean, rstd, None, None,
                                                                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * ((x - mean) * rstd)).sum(batch_dims)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(batch_dims)
        return grad_x, grad_weight, grad_bias, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that can also take its weight and bias per token, for routing without splitting the sequence."""

    def forward_per_token(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return PerTokenAffineLayerNorm.apply(x, params["weight"], params.get("bias"), self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def forward_per_token(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return x * params["gamma"]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU FFN (names w12, w3; hidden width 2/3 of the MLP's, rounded up to a multiple of 8)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


FFN_LAYERS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": SwiGLU}


def _xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from xformers.ops import memory_efficient_attention  # optional GPU dependency, imported on use

    # xformers wants (B, N, H, d)
    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens at once; qkv and proj may be routed per token group."""

    def __init__(self, dim: int, num_heads: int, qkv_groups: int, proj_groups: int, qkv_bias: bool,
                 proj_bias: bool, backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = make_slot(lambda: nn.Linear(dim, 3 * dim, bias=qkv_bias), qkv_groups)
        self.proj = make_slot(lambda: nn.Linear(dim, dim, bias=proj_bias), proj_groups)
        self.attend: Callable[[Tensor, Tensor, Tensor], Tensor] = (
            _xformers_attention if backend == "xformers" else F.scaled_dot_product_attention
        )

    def forward(self, x: Tensor, routing: Routing, rope: RopeTables | None = None) -> Tensor:
        b, n, c = x.shape
        qkv = route(self.qkv, x, routing).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        if rope is not None:  # rotates the patch tokens only: the tables cover the last num_patches positions
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = self.attend(q, k, v).transpose(1, 2).reshape(b, n, c)  # (B, H, N, d) -> (B, N, C)
        return route(self.proj, x, routing)


class Block(nn.Module):
    """Pre-norm transformer block. `groups(kind)` says how many parameter sets each slot holds (1 = shared)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, ffn_layer: str, drop_path: float,
                 layerscale: float | None, groups: Callable[[str], int], qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, attn_backend: str = "sdpa",
                 drop_path_mode: str = "auto", norm_eps: float = 1e-6):
        super().__init__()
        norm = partial(LayerNorm, dim, eps=norm_eps)
        ffn = FFN_LAYERS[ffn_layer]
        self.norm1 = make_slot(norm, groups("norm1"))
        self.attn = Attention(dim, num_heads, groups("qkv"), groups("proj"), qkv_bias, proj_bias, attn_backend)
        self.ls1 = make_slot(lambda: LayerScale(dim, layerscale), groups("ls1")) if layerscale else nn.Identity()
        self.norm2 = make_slot(norm, groups("norm2"))
        self.mlp = make_slot(lambda: ffn(dim, int(dim * mlp_ratio), bias=ffn_bias), groups("mlp"))
        self.ls2 = make_slot(lambda: LayerScale(dim, layerscale), groups("ls2")) if layerscale else nn.Identity()
        self.drop_path = drop_path
        if drop_path_mode not in ("auto", "row", "subset"):
            raise ValueError(f"drop_path_mode {drop_path_mode!r} is not one of auto, row, subset")
        # DINOv2 switches to the subset trick above 0.1, where the saved compute outweighs the gather / index_add
        self.drop_path_mode = ("subset" if drop_path > 0.1 else "row") if drop_path_mode == "auto" else drop_path_mode

    def _attn_branch(self, x: Tensor, routing: Routing, rope: RopeTables | None = None) -> Tensor:
        return route(self.ls1, self.attn(route(self.norm1, x, routing), routing, rope), routing)

    def _ffn_branch(self, x: Tensor, routing: Routing) -> Tensor:
        return route(self.ls2, route(self.mlp, route(self.norm2, x, routing), routing), routing)

    def _add(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """x + branch(x) with stochastic depth in training (the student only; the teacher is in eval mode)."""
        if not (self.training and self.drop_path > 0):
            return x + branch(x)
        if self.drop_path_mode == "subset":
            return add_residual_of_subset(x, branch, self.drop_path)
        return x + stochastic_depth(branch(x), self.drop_path, "row", True)

    def forward(self, x: Tensor, routing: Routing, rope: RopeTables | None = None) -> Tensor:
        """`rope`: the sin/cos tables of the patch grid when the model uses RoPE (no batch dimension, so the
        batch-subset drop path needs nothing else)."""
        x = self._add(x, partial(self._attn_branch, routing=routing, rope=rope))
        return self._add(x, partial(self._ffn_branch, routing=routing))


def add_residual_of_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop_rate: float) -> Tensor:
    """Stochastic depth that runs the branch only for the samples it keeps (DINOv2's batch-subset trick).

    floor(B (1 - rate)) random samples (at least one) get branch(x) scaled by B / kept, the others nothing: the same
    expectation as per-row dropping, without computing the rows that would be zeroed. The subset is drawn with
    torch.randperm on the global generator, as DINOv2 draws it.
    """
    b = x.shape[0]
    kept = max(int(b * (1 - drop_rate)), 1)
    rows = torch.randperm(b, device=x.device)[:kept]
    residual = branch(x[rows]).to(x.dtype)
    return torch.index_add(x.flatten(1), 0, rows, residual.flatten(1), alpha=b / kept).view_as(x)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 14, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, ffn_layer: str = "mlp", num_register_tokens: int = 0,
                 drop_path_rate: float = 0.0, drop_path_mode: str = "auto", layerscale: float | None = 1e-5,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True, attn_backend: str = "sdpa",
                 interpolate_offset: float = 0.1, interpolate_antialias: bool = False,
                 pos_embed: str = "learned", rope: Mapping[str, Any] | None = None, norm_eps: float = 1e-6,
                 spec: ResolvedSpec | None = None):
        """`pos_embed`: "learned" (DINOv2: a pos_embed parameter, interpolated to other grids) or "rope" (DINOv3:
        rotary positions in attention, no pos_embed); `rope`: RopePositions' settings (base, min_period, max_period,
        normalize_coords, shift_coords, jitter_coords, rescale_coords). `norm_eps`: every LayerNorm's eps (DINOv2
        1e-6, DINOv3 1e-5)."""
        super().__init__()
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed {pos_embed!r} is not one of {POS_EMBEDS}")
        self.spec = spec or vanilla_spec()
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim = self.num_features = embed_dim
        self.layout = TokenLayout(num_register_tokens)
        self.interpolate_offset, self.interpolate_antialias = interpolate_offset, interpolate_antialias
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
            self.rope_embed = None
        else:
            self.pos_embed = None
            self.rope_embed = RopePositions(embed_dim // num_heads, **(rope or {}))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) \
            if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn_layer, drop_path_rate, layerscale,
                  partial(self.spec.groups_for, block=i), qkv_bias, proj_bias, ffn_bias, attn_backend, drop_path_mode,
                  norm_eps)
            for i in range(depth)
        )
        self.norm = make_slot(partial(LayerNorm, embed_dim, eps=norm_eps),
                              self.spec.num_groups if self.spec.final_norm else 1)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's init: truncated-normal linears and position embedding, near-zero tokens."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_register_tokens(self) -> int:
        return self.layout.num_registers

    @property
    def num_prefix_tokens(self) -> int:
        return self.layout.num_prefix

    def routing(self, num_patches: int) -> Routing:
        return Routing.from_lengths(self.spec.group_of_type, self.layout.lengths(num_patches))

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        """Position embedding for an h x w image: the learned grid resized bicubically (as DINOv2)."""
        if self.pos_embed is None:
            raise RuntimeError("this backbone uses RoPE (student.pos_embed=rope): it has no pos_embed to interpolate")
        return interpolate_pos_embed(self.pos_embed, h // self.patch_size, w // self.patch_size,
                                     self.interpolate_offset, self.interpolate_antialias)

    def rope_tables(self, h: int, w: int, device: torch.device) -> RopeTables | None:
        """RoPE's sin/cos for an h x w image (None with a learned pos_embed); coordinates augmented in training."""
        if self.rope_embed is None:
            return None
        return self.rope_embed(h // self.patch_size, w // self.patch_size, device)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> (B, 1 + R + N, D): patches (masked ones replaced by the mask token), cls, pos, registers."""
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.interpolate_pos_encoding(h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x

    def embed(self, images: Tensor, masks: Tensor | None = None) -> tuple[Tensor, Routing, RopeTables | None]:
        """What every forward path starts from: the tokens in `layout`, their routing and the RoPE tables."""
        rope = self.rope_tables(images.shape[-2], images.shape[-1], images.device)  # first: training jitter draws
        x = self.prepare_tokens(images, masks)
        return x, self.routing(x.shape[1] - self.layout.num_prefix), rope

    def run_blocks(self, x: Tensor, routing: Routing, rope: RopeTables | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, routing, rope)
        return x

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        """DINOv2's output dict: normalised cls / register / patch tokens, the pre-norm sequence and the masks."""
        x, routing, rope = self.embed(x, masks)
        x = self.run_blocks(x, routing, rope)
        cls, registers, patches = self.layout.split(route(self.norm, x, routing))
        return {"x_norm_clstoken": cls, "x_norm_regtokens": registers, "x_norm_patchtokens": patches,
                "x_prenorm": x, "masks": masks}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)["x_norm_clstoken"]

    def get_intermediate_layers(self, x: Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True,
                                return_extra_tokens: bool = False) -> tuple:
        """Outputs of the last n blocks (or of the listed block indices), as DINOv2's method of the same name.

        Per block: the patch tokens, then (return_class_token) the [CLS] token, then (return_extra_tokens, as
        DINOv3) the register tokens; a bare tensor when only the patch tokens are asked for.
        """
        b, _, h, w = x.shape
        x, routing, rope = self.embed(x)
        wanted = set(range(len(self.blocks) - n, len(self.blocks))) if isinstance(n, int) else set(n)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x, routing, rope)
            if i in wanted:
                outputs.append(route(self.norm, x, routing) if norm else x)
        cls, registers, patches = zip(*map(self.layout.split, outputs)) if outputs else ((), (), ())
        if reshape:
            gh, gw = h // self.patch_size, w // self.patch_size
            patches = [t.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for t in patches]
        parts = [patches]
        if return_class_token:
            parts.append(cls)
        if return_extra_tokens:
            parts.append(registers)
        return tuple(zip(*parts)) if len(parts) > 1 else tuple(patches)


def interpolate_pos_embed(pos: Tensor, gh: int, gw: int, offset: float, antialias: bool) -> Tensor:
    """A learned (1, 1 + M*M, D) position embedding for a gh x gw patch grid: the patch grid resized bicubically,
    DINOv2's way (scale factors (g + offset) / M when offset is set, else the target size). The one resizer: the
    forward pass and the resizing of loaded weights both use it, so a resized checkpoint computes what the
    checkpoint computes at runtime."""
    n = pos.shape[1] - 1
    if gh * gw == n and gh == gw:
        return pos
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed {tuple(pos.shape)}: only a square position grid can be resized")
    patch_pos = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()  # (1, D, M, M)
    if offset:  # float(): a traced grid size (fvcore's jit trace) is a tensor, which F.interpolate refuses
        sx, sy = float(gw + offset) / m, float(gh + offset) / m
        patch_pos = F.interpolate(patch_pos, scale_factor=(sy, sx), mode="bicubic", antialias=antialias)
    else:
        patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", antialias=antialias)
    patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)  # (1, gh*gw, D)
    return torch.cat([pos[:, :1], patch_pos], dim=1)


def build_backbone(student: Mapping[str, Any], spec: Mapping[str, Any], img_size: int = 224) -> VisionTransformer:
    """The backbone a run's config describes (`student` and `spec` sections). Keys added after an export was
    written (pos_embed, rope_*, norm_eps) default to what the export was built with."""
    kw = arch_kwargs(student)
    return VisionTransformer(
        img_size=img_size,
        patch_size=student["patch_size"],
        mlp_ratio=student["mlp_ratio"],
        num_register_tokens=student["num_register_tokens"],
        drop_path_rate=student["drop_path_rate"],
        drop_path_mode=student.get("drop_path_mode", "auto"),  # exports do not carry it (training only)
        layerscale=student["layerscale"],
        qkv_bias=student["qkv_bias"],
        proj_bias=student["proj_bias"],
        ffn_bias=student["ffn_bias"],
        attn_backend=student["attn_backend"],
        interpolate_offset=student["interpolate_offset"],
        interpolate_antialias=student["interpolate_antialias"],
        pos_embed=student.get("pos_embed", "learned"),
        rope=rope_settings(student),
        norm_eps=student.get("norm_eps", 1e-6),
        spec=resolve_spec(spec, kw["depth"]),
        **kw,
    )
