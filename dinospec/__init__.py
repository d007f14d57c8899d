"""dinospec: DINOv2-style self-supervised pretraining of ViTs with token-type specialised layers."""

from typing import Any


def __getattr__(name: str) -> Any:
    # imported on first use, so `import dinospec` stays light
    if name == "load_backbone":
        from dinospec.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'dinospec' has no attribute {name!r}")
