"""Remote-sensing semantic segmentation: an encoder with adapters (any registered method;
Earth-Adapter is the one made for it), smp decoders, macro metrics from one confusion
matrix, sliding-window inference shared with change detection. Train with
``visionpeft train`` and ``task: segmentation``."""
from visionpeft.train import register_task

from .metrics import SegConfusion, seg_metrics_from_confusion
from .model import ALL_DECODERS, DECODERS, SegmentationModel
from .task import (SegmentationConfig, SegmentationTask, Segmenter, evaluate, find_checkpoint, inject_adapter,
                   load_segmenter, predict_probs)


def _task(values: dict) -> SegmentationTask:
    return SegmentationTask(SegmentationConfig.from_dict(values))


register_task("segmentation", _task)

__all__ = ["SegConfusion", "seg_metrics_from_confusion", "ALL_DECODERS", "DECODERS", "SegmentationModel",
           "SegmentationConfig", "SegmentationTask", "Segmenter", "evaluate", "find_checkpoint", "inject_adapter",
           "load_segmenter", "predict_probs"]
