"""torch.hub entry points for dinospec backbones, for local use (nothing is downloaded).

    model = torch.hub.load(REPO_DIR, "dinospec_backbone", source="local", weights="exports/vits14")
    model = torch.hub.load(REPO_DIR, "vit_small", source="local", weights="exports/vits14", spec="paper")
    model = torch.hub.load(REPO_DIR, "vit_large", source="local", spec="paper", num_register_tokens=4)  # random init

With `weights` (a dinospec export directory) the backbone is the exported one; passing `spec` too converts it to
that specialization (shared weights copied into every token group: same outputs, ready for continued training).
Without weights the backbone is freshly initialised from dinospec's presets. Other keyword arguments override
student.* settings (and img_size). Models come back in eval mode.
"""

from __future__ import annotations

from typing import Any

dependencies = ["torch", "torchvision", "safetensors"]


def _spec_section(name: str) -> dict[str, Any]:
    from dinospec.config import as_container, load_config

    return as_container(load_config(overrides=[f"spec={name}"]).spec)


def _random_backbone(arch: str, spec: str, img_size: int, overrides: dict[str, Any]):
    import json

    from dinospec.config import load_config
    from dinospec.models.vit import build_backbone

    dotlist = [f"model={arch}", f"spec={spec}"] + [f"student.{k}={json.dumps(v)}" for k, v in overrides.items()]
    cfg = load_config(overrides=dotlist)
    return build_backbone(cfg.student, cfg.spec, img_size=img_size).eval()


def dinospec_backbone(weights: str | None = None, arch: str | None = None, spec: str | None = None,
                      img_size: int | None = None, **overrides: Any):
    """A dinospec VisionTransformer: from an export dir (`weights`), or freshly initialised (`arch`, `spec`)."""
    if weights is None:
        return _random_backbone(arch or "vit_small", spec or "none", img_size or 224, overrides)

    from dinospec.export import load_backbone, read_export_config
    from dinospec.models.vit import build_backbone
    from dinospec.weights import load_pretrained_backbone

    config = read_export_config(weights)
    if arch is not None and arch != config["student"]["arch"]:
        raise ValueError(f"{weights} holds a {config['student']['arch']} backbone, not a {arch}: "
                         f"use the '{config['student']['arch']}' entry point or 'dinospec_backbone'")
    if spec is None and img_size in (None, config["img_size"]):
        return load_backbone(weights, **overrides)
    student = {**config["student"], **overrides}
    model = build_backbone(student, _spec_section(spec) if spec else config["spec"],
                           img_size=img_size or config["img_size"])
    load_pretrained_backbone(model, weights)  # converts the spec, resizes position embeddings
    return model.eval()


def vit_small(weights: str | None = None, spec: str | None = None, **overrides: Any):
    """ViT-S (384 wide, 12 blocks, 6 heads)."""
    return dinospec_backbone(weights, "vit_small", spec, **overrides)


def vit_base(weights: str | None = None, spec: str | None = None, **overrides: Any):
    """ViT-B (768 wide, 12 blocks, 12 heads)."""
    return dinospec_backbone(weights, "vit_base", spec, **overrides)


def vit_large(weights: str | None = None, spec: str | None = None, **overrides: Any):
    """ViT-L (1024 wide, 24 blocks, 16 heads)."""
    return dinospec_backbone(weights, "vit_large", spec, **overrides)


def vit_giant2(weights: str | None = None, spec: str | None = None, **overrides: Any):
    """ViT-g (1536 wide, 40 blocks, 24 heads, SwiGLU)."""
    return dinospec_backbone(weights, "vit_giant2", spec, **overrides)
