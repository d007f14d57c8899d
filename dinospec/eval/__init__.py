"""Frozen-backbone evaluation: weighted k-NN and linear probes on [CLS], a linear segmentation probe on patches.

Features are extracted once per split (:mod:`dinospec.eval.features`); the probes are pure functions on feature
tensors (:mod:`~dinospec.eval.knn`, :mod:`~dinospec.eval.linear`, :mod:`~dinospec.eval.segmentation`);
:mod:`dinospec.eval.cli` is the `dinospec eval` command and its directory-level entry points.
"""

from dinospec.eval.features import Features, extract_features, load_eval_backbone
from dinospec.eval.knn import knn_accuracy, knn_eval_during_training
from dinospec.eval.linear import linear_probe
from dinospec.eval.segmentation import confusion_matrix, miou, per_class_iou, seg_probe

__all__ = ["Features", "extract_features", "load_eval_backbone", "knn_accuracy", "knn_eval_during_training",
           "linear_probe", "confusion_matrix", "miou", "per_class_iou", "seg_probe"]
