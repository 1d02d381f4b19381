"""Change-detection metrics: hand-computed values, pooling, ignore_index, torchmetrics parity."""
from fractions import Fraction as F

import pytest
import torch

from visionpeft.pipelines.change_detection.metrics import ConfusionMatrix, metrics_from_confusion


def _maps_from_counts(cm):
    """Flat (pred, target) label maps with exactly the counts cm[t][p], shuffled."""
    target, pred = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            target += [t] * count
            pred += [p] * count
    perm = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))
    return torch.tensor(pred)[perm], torch.tensor(target)[perm]


# Binary example, rows = target, cols = prediction:
#                 pred 0   pred 1
#   target 0      TN = 50  FP = 10     row 60
#   target 1      FN =  5  TP = 35     row 40
#   cols             55       45       n = 100
HAND_CM = [[50, 10], [5, 35]]
HAND = {
    "oa": F(85, 100),                      # (50 + 35) / 100 = 17/20
    # p_e = (60*55 + 40*45) / 100^2 = 5100/10000 = 51/100
    "kappa": (F(85, 100) - F(51, 100)) / (1 - F(51, 100)),   # (34/100) / (49/100) = 34/49
    "precision": F(35, 45),                # TP / (TP+FP) = 7/9
    "recall": F(35, 40),                   # TP / (TP+FN) = 7/8
    "f1": F(70, 85),                       # 2TP / (2TP+FP+FN) = 14/17
    "iou": F(35, 50),                      # TP / (TP+FP+FN) = 7/10
    # class 0 (background): TP = 50, FP = 5, FN = 10
    "per_class_precision": [F(50, 55), F(35, 45)],   # 10/11, 7/9
    "per_class_recall": [F(50, 60), F(35, 40)],      # 5/6, 7/8
    "per_class_f1": [F(100, 115), F(70, 85)],        # 20/23, 14/17
    "per_class_iou": [F(50, 65), F(35, 50)],         # 10/13, 7/10
}


def test_hand_computed_example():
    assert HAND["kappa"] == F(34, 49)
    pred, target = _maps_from_counts(HAND_CM)
    cm = ConfusionMatrix(2)
    cm.update(pred.reshape(4, 25), target.reshape(4, 25))  # any shape is fine
    assert cm.matrix.tolist() == HAND_CM
    assert cm.matrix.dtype == torch.int64
    out = cm.compute()
    assert out == metrics_from_confusion(torch.tensor(HAND_CM))
    for key, want in HAND.items():
        got = out[key]
        if isinstance(want, list):
            assert all(isinstance(g, float) for g in got)
            assert got == pytest.approx([float(w) for w in want], abs=1e-12), key
        else:
            assert isinstance(got, float)
            assert got == pytest.approx(float(want), abs=1e-12), key


def test_pooling_equals_one_update_on_concatenation():
    g = torch.Generator().manual_seed(1)
    preds = [torch.randint(0, 2, (n, 8, 8), generator=g) for n in (1, 3, 2)]
    targets = [torch.randint(0, 2, (n, 8, 8), generator=g) for n in (1, 3, 2)]
    pooled = ConfusionMatrix()
    for p, t in zip(preds, targets):
        pooled.update(p, t)
    once = ConfusionMatrix()
    once.update(torch.cat(preds), torch.cat(targets))
    assert torch.equal(pooled.matrix, once.matrix)
    assert pooled.compute() == once.compute()
    pooled.reset()
    assert pooled.matrix.sum() == 0


def test_ignore_index_excluded():
    target = torch.tensor([0, 1, 255, 1, 255, 0])
    pred = torch.tensor([0, 1, 1, 0, 0, 1])
    cm = ConfusionMatrix(2)
    cm.update(pred, target, ignore_index=255)
    assert cm.matrix.tolist() == [[1, 1], [1, 1]]
    # without ignore_index the 255 labels are an error, not a silent miscount
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2).update(pred, target)


def test_out_of_range_and_bad_input():
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2).update(torch.tensor([0, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        ConfusionMatrix(2).update(torch.tensor([0, 1]), torch.tensor([-1, 1]))
    with pytest.raises(TypeError):
        ConfusionMatrix(2).update(torch.tensor([0.2, 0.9]), torch.tensor([0, 1]))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        ConfusionMatrix(2).update(torch.zeros(2, 4, 4, dtype=torch.long),
                                  torch.zeros(2, 16, dtype=torch.long))
    assert "(2, 4, 4)" in str(err.value) and "(2, 16)" in str(err.value)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_agrees_with_torchmetrics(seed):
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 2, (4, 32, 32), generator=g)
    # noisy prediction, so that the scores are neither trivial nor random
    flip = torch.rand(target.shape, generator=g) < 0.3
    pred = torch.where(flip, 1 - target, target)
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    out = cm.compute()
    ref = {
        "precision": tmf.binary_precision(pred, target),
        "recall": tmf.binary_recall(pred, target),
        "f1": tmf.binary_f1_score(pred, target),
        "iou": tmf.binary_jaccard_index(pred, target),
        "oa": tmf.binary_accuracy(pred, target),
        "kappa": tmf.binary_cohen_kappa(pred, target),
    }
    for key, want in ref.items():
        assert out[key] == pytest.approx(float(want), abs=1e-6), key

    # ignore_index is honoured the same way
    target_ign = target.clone()
    target_ign[:, :4] = 255
    cm_ign = ConfusionMatrix(2)
    cm_ign.update(pred, target_ign, ignore_index=255)
    assert cm_ign.compute()["f1"] == pytest.approx(
        float(tmf.binary_f1_score(pred, target_ign, ignore_index=255)), abs=1e-6)

    # three classes: per-class lists against the multiclass functions
    k = 3
    target3 = torch.randint(0, k, (2, 16, 16), generator=g)
    pred3 = torch.where(torch.rand(target3.shape, generator=g) < 0.4,
                        torch.randint(0, k, target3.shape, generator=g), target3)
    cm3 = ConfusionMatrix(k)
    cm3.update(pred3, target3)
    out3 = cm3.compute()
    per_class = {
        "per_class_precision": tmf.multiclass_precision(pred3, target3, k, average="none"),
        "per_class_recall": tmf.multiclass_recall(pred3, target3, k, average="none"),
        "per_class_f1": tmf.multiclass_f1_score(pred3, target3, k, average="none"),
        "per_class_iou": tmf.multiclass_jaccard_index(pred3, target3, k, average="none"),
    }
    for key, want in per_class.items():
        assert out3[key] == pytest.approx(want.tolist(), abs=1e-6), key
    assert out3["oa"] == pytest.approx(
        float(tmf.multiclass_accuracy(pred3, target3, k, average="micro")), abs=1e-6)
    assert out3["kappa"] == pytest.approx(
        float(tmf.multiclass_cohen_kappa(pred3, target3, k)), abs=1e-6)


def test_all_background_predicted_background():
    # no change anywhere and none predicted: p_e = 1, p_o = 1 -> kappa 1.0 by convention;
    # change-class scores are 0/0 -> 0.0
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(3, 5, 5, dtype=torch.long), torch.zeros(3, 5, 5, dtype=torch.long))
    out = cm.compute()
    assert out["oa"] == 1.0 and out["kappa"] == 1.0
    assert out["precision"] == out["recall"] == out["f1"] == out["iou"] == 0.0
    assert out["per_class_f1"] == [1.0, 0.0] and out["per_class_iou"] == [1.0, 0.0]


def test_all_background_with_false_alarms():
    # target all 0, prediction has 2 false positives out of 10: change TP = 0 -> all 0.0;
    # p_o = 8/10, p_e = (10*8 + 0*2)/100 = 8/10 -> kappa 0
    out = metrics_from_confusion(torch.tensor([[8, 2], [0, 0]]))
    assert out["oa"] == pytest.approx(0.8)
    assert out["kappa"] == pytest.approx(0.0, abs=1e-12)
    assert out["precision"] == out["recall"] == out["f1"] == out["iou"] == 0.0


def test_perfect_prediction():
    g = torch.Generator().manual_seed(7)
    target = torch.randint(0, 2, (2, 16, 16), generator=g)
    cm = ConfusionMatrix(2)
    cm.update(target.clone(), target)
    out = cm.compute()
    for key in ("oa", "kappa", "precision", "recall", "f1", "iou"):
        assert out[key] == 1.0, key
    assert out["per_class_iou"] == [1.0, 1.0]


def test_empty_matrix_is_all_zero():
    out = ConfusionMatrix(2).compute()
    assert out["oa"] == out["kappa"] == out["f1"] == 0.0
    assert out["per_class_precision"] == [0.0, 0.0]
