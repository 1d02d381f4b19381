"""Segmentation metrics: hand-computed macro values with an ignored pixel, absent classes,
torchmetrics parity, out-of-range labels, merging."""
import math
from fractions import Fraction as F

import pytest
import torch

from visionpeft.pipelines.change_detection.metrics import ConfusionMatrix
from visionpeft.pipelines.segmentation.metrics import SegConfusion

# 3 classes, one ignored pixel (last), predicted as 2 there, which must not count.
#   target  0 0 0 0 1 | 1 1 2 2 255
#   pred    0 0 1 2 1 | 1 1 2 1 2
# Counted pixels: 9. Rows = target, cols = prediction:
#             p0  p1  p2   row
#   t0         2   1   1    4
#   t1         0   3   0    3
#   t2         0   1   1    2
#   col        2   5   2
# class 0: TP 2, FP 0, FN 2 -> IoU 2/4 = 1/2, F1 4/6 = 2/3
# class 1: TP 3, FP 2, FN 0 -> IoU 3/5,       F1 6/8 = 3/4
# class 2: TP 1, FP 1, FN 1 -> IoU 1/3,       F1 2/4 = 1/2
# OA = 6/9 = 2/3; mIoU = (1/2 + 3/5 + 1/3) / 3 = 43/90; mF1 = (2/3 + 3/4 + 1/2) / 3 = 23/36
TARGET = torch.tensor([[[0, 0, 0, 0, 1], [1, 1, 2, 2, 255]]])
PRED = torch.tensor([[[0, 0, 1, 2, 1], [1, 1, 2, 1, 2]]])
IOU = [F(1, 2), F(3, 5), F(1, 3)]
F1 = [F(2, 3), F(3, 4), F(1, 2)]


def test_hand_computed_macro_scores_skip_the_ignored_pixel():
    m = SegConfusion(3)
    m.update(PRED, TARGET)
    out = m.compute()
    assert set(out) == {"oa", "miou", "mf1", "per_class_iou", "per_class_f1", "confusion", "pixels"}
    assert out["confusion"] == [[2, 1, 1], [0, 3, 0], [0, 1, 1]] and out["pixels"] == 9
    assert out["oa"] == pytest.approx(float(F(2, 3)))
    assert out["per_class_iou"] == pytest.approx([float(v) for v in IOU])
    assert out["per_class_f1"] == pytest.approx([float(v) for v in F1])
    assert out["miou"] == pytest.approx(float(F(43, 90)))
    assert out["mf1"] == pytest.approx(float(F(23, 36)))


def test_a_class_absent_from_both_is_nan_and_left_out_of_the_means():
    m = SegConfusion(5)  # classes 3 and 4 occur nowhere
    m.update(PRED, TARGET)
    out = m.compute()
    assert [math.isnan(v) for v in out["per_class_iou"]] == [False, False, False, True, True]
    assert math.isnan(out["per_class_f1"][4])
    assert out["miou"] == pytest.approx(float(F(43, 90))) and out["mf1"] == pytest.approx(float(F(23, 36)))


def test_a_class_only_predicted_scores_zero_and_counts():
    # target 0 0 1 1, pred 0 2 1 1: IoU 1/2, 1, 0 (class 2 is a false alarm only)
    m = SegConfusion(3)
    m.update(torch.tensor([[[0, 2, 1, 1]]]), torch.tensor([[[0, 0, 1, 1]]]))
    out = m.compute()
    assert out["per_class_iou"] == pytest.approx([0.5, 1.0, 0.0])
    assert out["miou"] == pytest.approx(0.5) and out["mf1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_matches_torchmetrics_macro_where_the_definitions_agree():
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    k, ignore = 5, 255
    jac = tm.MulticlassJaccardIndex(num_classes=k, average="macro", ignore_index=ignore)
    f1 = tm.MulticlassF1Score(num_classes=k, average="macro", ignore_index=ignore)
    acc = tm.MulticlassAccuracy(num_classes=k, average="micro", ignore_index=ignore)
    ours = SegConfusion(k, ignore_index=ignore)
    for _ in range(2):  # pooled over batches on both sides
        # class 4 occurs in neither map: both sides leave it out of the macro mean
        target = torch.randint(0, 4, (2, 9, 11), generator=g)
        pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                           torch.randint(0, 4, target.shape, generator=g))
        target[torch.rand(target.shape, generator=g) < 0.1] = ignore
        for metric in (jac, f1, acc):
            metric.update(pred, target)
        ours.update(pred, target)
    out = ours.compute()
    assert out["miou"] == pytest.approx(float(jac.compute()), abs=1e-6)
    assert out["mf1"] == pytest.approx(float(f1.compute()), abs=1e-6)
    assert out["oa"] == pytest.approx(float(acc.compute()), abs=1e-6)
    micro_f1 = tm.MulticlassF1Score(num_classes=k, average="micro", ignore_index=ignore)
    micro_f1.update(pred, target)  # the last batch alone: micro F1 is its OA
    last = SegConfusion(k)
    last.update(pred, target)
    assert float(micro_f1.compute()) == pytest.approx(last.compute()["oa"], abs=1e-6)


@pytest.mark.parametrize("pred,target,ignore,message", [
    ([[[0, 1]]], [[[0, 3]]], 255, r"target has values outside \[0, 3\)"),
    ([[[0, 1]]], [[[0, -1]]], 255, r"target has values outside \[0, 3\)"),
    ([[[0, 1]]], [[[0, 255]]], None, r"target has values outside \[0, 3\)"),
    ([[[0, 7]]], [[[0, 1]]], 255, r"pred has values outside \[0, 3\)"),
])
def test_labels_outside_the_classes_are_refused_in_one_line(pred, target, ignore, message):
    m = SegConfusion(3, ignore_index=ignore)
    with pytest.raises(ValueError, match=message) as err:
        m.update(torch.tensor(pred), torch.tensor(target))
    assert "\n" not in str(err.value)
    assert m.compute()["pixels"] == 0  # nothing was counted


def test_merge_sums_counts_from_other_processes_or_splits():
    whole, first, second = SegConfusion(3), SegConfusion(3), SegConfusion(3)
    whole.update(PRED, TARGET)
    first.update(PRED[..., :1, :], TARGET[..., :1, :])
    second.update(PRED[..., 1:, :], TARGET[..., 1:, :])
    assert first.merge(second).compute() == whole.compute()
    from_tensor = SegConfusion(3).merge(whole.matrix)  # e.g. a matrix all-reduced across ranks
    assert torch.equal(from_tensor.matrix, whole.matrix)
    with pytest.raises(ValueError, match="3x3 integer counts"):
        whole.merge(SegConfusion(4))
    with pytest.raises(ValueError, match="ignore_index"):
        whole.merge(SegConfusion(3, ignore_index=None))
    cd, a, b = ConfusionMatrix(2), ConfusionMatrix(2), ConfusionMatrix(2)  # the shared accumulator
    cd.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
    a.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    b.update(torch.tensor([1, 0]), torch.tensor([0, 0]))
    assert torch.equal(a.merge(b).matrix, cd.matrix)


def test_an_empty_matrix_scores_nan():
    out = SegConfusion(3).compute()
    assert out["pixels"] == 0 and all(math.isnan(out[k]) for k in ("oa", "miou", "mf1"))
