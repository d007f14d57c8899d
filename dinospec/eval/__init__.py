"""Frozen-backbone evaluation: weighted k-NN and linear probes on [CLS], a linear segmentation probe on patches.

Features are extracted once per split (:mod:`dinospec.eval.features`); the probes are pure functions on feature
tensors (:mod:`~dinospec.eval.knn`, :mod:`~dinospec.eval.linear`, :mod:`~dinospec.eval.segmentation`);
:mod:`dinospec.eval.cli` is the `dinospec eval` command and its directory-level entry points.
"""

import importlib
from typing import Any

# name -> module; imported on first use, so `dinospec eval` checks its arguments before torch is imported
_EXPORTS = {"Features": "features", "extract_features": "features", "load_eval_backbone": "features",
            "knn_accuracy": "knn", "knn_eval_during_training": "knn", "linear_probe": "linear",
            "confusion_matrix": "segmentation", "miou": "segmentation", "per_class_iou": "segmentation",
            "seg_probe": "segmentation"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dinospec.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dinospec.eval' has no attribute {name!r}")
