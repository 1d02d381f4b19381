"""Change-detection metrics from one confusion matrix pooled over a whole split.

Scores are computed from the summed counts of every image, not averaged per image,
so that a small image (or one with no change) does not weigh as much as a large one.
This is how change-detection results (F1 / IoU of the change class) are usually reported.

With ``cm[t, p]`` the number of pixels of target class ``t`` predicted as ``p``,
``n = cm.sum()`` and, for class ``c``, ``TP = cm[c, c]``, ``FP = col_c - TP``,
``FN = row_c - TP``:

* precision = TP / (TP + FP),  recall = TP / (TP + FN)
* F1  = 2 TP / (2 TP + FP + FN)   (the harmonic mean of precision and recall)
* IoU = TP / (TP + FP + FN)
* OA  = trace(cm) / n
* kappa = (p_o - p_e) / (1 - p_e), with p_o = OA and p_e = sum_c row_c * col_c / n^2
  the agreement expected by chance from the marginals.

Conventions: any 0/0 is 0.0 (e.g. the precision of a class that is never predicted,
or every score of an empty matrix). Kappa is undefined when p_e = 1, which happens only
when target and prediction are both one single class everywhere; it is then 1.0 if the
agreement is also perfect (p_o = 1) and 0.0 otherwise, so a perfect prediction always
scores kappa 1.0.
"""
from __future__ import annotations

import torch

__all__ = ["ConfusionMatrix", "metrics_from_confusion"]

CHANGE_CLASS = 1


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den elementwise, with 0/0 (and x/0) defined as 0.0."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """Scores of a square confusion matrix (rows = target, cols = prediction).

    Returns plain Python floats: ``oa``, ``kappa``, and for the change class (class 1)
    ``precision``, ``recall``, ``f1``, ``iou``; plus the lists ``per_class_precision``,
    ``per_class_recall``, ``per_class_f1``, ``per_class_iou``. 0/0 is 0.0; see the
    module docstring for the kappa convention.
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 2:
        raise ValueError(f"expected a square confusion matrix of at least 2x2, got {tuple(cm.shape)}")
    # float64: int64 counts of many megapixels stay exact, and products of marginals fit
    cm = cm.detach().to("cpu", torch.float64)
    n = cm.sum()
    tp = cm.diagonal()
    rows, cols = cm.sum(1), cm.sum(0)  # target counts, prediction counts
    fp, fn = cols - tp, rows - tp

    precision = _safe_div(tp, cols)
    recall = _safe_div(tp, rows)
    # 2TP / (2TP+FP+FN) equals the harmonic mean but needs no special case when P+R = 0
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    iou = _safe_div(tp, tp + fp + fn)

    oa = _safe_div(tp.sum(), n)
    pe = _safe_div((rows * cols).sum(), n * n)
    if n == 0:
        kappa = 0.0
    elif pe >= 1.0:
        kappa = 1.0 if oa >= 1.0 else 0.0
    else:
        kappa = float((oa - pe) / (1.0 - pe))

    c = CHANGE_CLASS
    return {
        "oa": float(oa),
        "kappa": kappa,
        "precision": float(precision[c]),
        "recall": float(recall[c]),
        "f1": float(f1[c]),
        "iou": float(iou[c]),
        "per_class_precision": precision.tolist(),
        "per_class_recall": recall.tolist(),
        "per_class_f1": f1.tolist(),
        "per_class_iou": iou.tolist(),
    }


class ConfusionMatrix:
    """Accumulates one ``num_classes x num_classes`` confusion matrix over many batches.

    ``matrix[t, p]`` counts pixels of target class ``t`` predicted as class ``p``.
    """

    def __init__(self, num_classes: int = 2):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        # kept on the CPU: it is tiny, and the split may be evaluated on several devices
        self._cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated counts (int64, rows = target, cols = prediction); a copy."""
        return self._cm.clone()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> None:
        """Add integer class maps of any (matching) shape, e.g. ``(B, H, W)``.

        Pixels whose *target* equals ``ignore_index`` are left out. Every other value,
        in ``pred`` or ``target``, must lie in ``[0, num_classes)``.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape, got pred {tuple(pred.shape)} "
                f"and target {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer (or bool) class maps; "
                            "take the argmax / threshold of the logits first")
        pred = pred.reshape(-1).long()
        target = target.reshape(-1).long()
        if ignore_index is not None:
            keep = target != ignore_index
            pred, target = pred[keep], target[keep]
        k = self.num_classes
        for name, t in (("pred", pred), ("target", target)):
            # out-of-range labels would silently land in another cell of the flat bincount
            if t.numel() and (t.min() < 0 or t.max() >= k):
                raise ValueError(
                    f"{name} has values outside [0, {k}) "
                    f"(min {int(t.min())}, max {int(t.max())}); ignore_index={ignore_index}")
        # one bincount over the flat cell index target*k + pred fills the whole matrix
        counts = torch.bincount(target * k + pred, minlength=k * k)
        self._cm += counts.reshape(k, k).to("cpu", torch.int64)

    def merge(self, other: "ConfusionMatrix | torch.Tensor") -> "ConfusionMatrix":
        """Add the counts of another accumulator (or a matrix of counts), e.g. from another
        process or split; returns ``self``."""
        counts = other._cm if isinstance(other, ConfusionMatrix) else other
        k = self.num_classes
        if not isinstance(counts, torch.Tensor) or counts.shape != (k, k) or counts.is_floating_point():
            shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise ValueError(f"can only merge {k}x{k} integer counts of the same classes, got {shape}")
        self._cm += counts.to("cpu", torch.int64)
        return self

    def compute(self) -> dict:
        """Scores of the pooled matrix; see :func:`metrics_from_confusion`."""
        return metrics_from_confusion(self._cm)
