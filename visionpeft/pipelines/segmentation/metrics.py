"""Semantic-segmentation metrics from one confusion matrix pooled over a whole split.

Counts are summed over every image first (a small image weighs by its pixels, not as a
whole image), then scored. With ``cm[t, p]`` the pixels of target class ``t`` predicted
as ``p`` and, for class ``c``, ``TP = cm[c, c]``, ``FP = col_c - TP``, ``FN = row_c - TP``:

* IoU_c = TP / (TP + FP + FN),  F1_c = 2 TP / (2 TP + FP + FN)
* OA = trace(cm) / cm.sum()
* mIoU, mF1: MACRO means, every class weighing the same, over the classes that occur in
  the target or in the prediction. A class absent from both has no score (NaN in the
  per-class lists) and is left out of the means, so a split that lacks a class is not
  penalised for it. A class only predicted, or never predicted, scores 0 and counts.

These are the figures remote-sensing papers usually report as mIoU / mF1. torchgeo's and
torchmetrics' defaults are often MICRO averages (pooled TP, FP, FN over classes), which
weigh frequent classes more; a micro F1 equals OA. torchmetrics' ``average="macro"``
agrees with the means here when ``ignore_index`` is not a class index (it also leaves out
classes absent from both target and prediction).

Pixels whose target is ``ignore_index`` are left out entirely, whatever was predicted
there. An empty matrix scores NaN throughout.
"""
from __future__ import annotations

import math

import torch

# the pooled bincount with its range checks lives with change detection's metrics: one
# accumulation for every dense task
from ..change_detection.metrics import ConfusionMatrix

__all__ = ["SegConfusion", "seg_metrics_from_confusion"]


def seg_metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Scores of a square matrix of counts (rows = target, cols = prediction); see the
    module docstring. Returns ``oa``, ``miou``, ``mf1`` (floats), ``per_class_iou``,
    ``per_class_f1`` (lists, NaN for absent classes), ``confusion`` (nested list of ints)
    and ``pixels`` (the number of counted pixels)."""
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square confusion matrix, got {tuple(cm.shape)}")
    counts = cm.detach().to("cpu", torch.int64)
    cm = counts.to(torch.float64)  # exact for any realistic pixel count
    tp, rows, cols = cm.diagonal(), cm.sum(1), cm.sum(0)
    present = rows + cols > 0
    nan = torch.full_like(tp, math.nan)
    # for a present class TP + FP + FN = row + col - TP > 0: no 0/0 to define
    iou = torch.where(present, tp / (rows + cols - tp), nan)
    f1 = torch.where(present, 2 * tp / (rows + cols), nan)
    total = cm.sum()
    return {
        "oa": float(tp.sum() / total) if total > 0 else math.nan,
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "mf1": float(f1[present].mean()) if present.any() else math.nan,
        "per_class_iou": iou.tolist(),
        "per_class_f1": f1.tolist(),
        "confusion": counts.tolist(),
        "pixels": int(counts.sum()),
    }


class SegConfusion:
    """Pooled ``num_classes x num_classes`` confusion matrix of class maps (int64, rows =
    target, cols = prediction), skipping pixels whose target is ``ignore_index``
    (``None``: skip nothing). ``compute()`` gives macro mIoU / mF1 and OA; see the
    module docstring."""

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
        self._counts = ConfusionMatrix(num_classes)  # checks num_classes >= 2
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def reset(self) -> None:
        self._counts.reset()

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated counts (int64, on the CPU); a copy."""
        return self._counts.matrix

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add integer class maps of the same shape, e.g. (N, H, W). Target values must be
        in [0, num_classes) or ``ignore_index``; predictions in [0, num_classes)."""
        self._counts.update(pred, target, ignore_index=self.ignore_index)

    def merge(self, other: "SegConfusion | torch.Tensor") -> "SegConfusion":
        """Add another accumulator's counts (another process, another split) or a matrix
        of counts; returns ``self``."""
        if isinstance(other, SegConfusion):
            if other.ignore_index != self.ignore_index:
                raise ValueError(f"cannot merge counts made with ignore_index {other.ignore_index} "
                                 f"into ones made with {self.ignore_index}")
            other = other._counts
        self._counts.merge(other)
        return self

    def compute(self) -> dict:
        return seg_metrics_from_confusion(self._counts.matrix)
