"""PeftCD change detection: Siamese encoder with adapters, exchange, light decoders,
pooled metrics, sliding-window inference. Train with ``visionpeft train`` and
``task: change_detection``; evaluate and predict with ``visionpeft evaluate-cd`` /
``visionpeft predict-cd``."""
from visionpeft.train import register_task

from .metrics import ConfusionMatrix, metrics_from_confusion
from .model import FeatureEncoder, SiameseChangeDetector
from .task import (ChangeDetectionConfig, ChangeDetectionTask, Detector, evaluate, find_checkpoint,
                   load_detector, predict_probs)


def _task(values: dict) -> ChangeDetectionTask:
    return ChangeDetectionTask(ChangeDetectionConfig.from_dict(values))


register_task("change_detection", _task)

__all__ = ["ConfusionMatrix", "metrics_from_confusion", "FeatureEncoder", "SiameseChangeDetector",
           "ChangeDetectionConfig", "ChangeDetectionTask", "Detector", "evaluate", "find_checkpoint", "load_detector",
           "predict_probs"]
