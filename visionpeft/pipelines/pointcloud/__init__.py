"""Point-cloud classification (``task: point_classification``): a Point-MAE classifier with
Point-PEFT (or any registered adapter) on ModelNet40, ScanObjectNN or procedural shapes."""
from visionpeft.train import register_task

from .task import (CONFIG_NAME, PointClassificationConfig, PointClassificationTask, _load_task, evaluate,
                   find_checkpoint, frozen_features, load_classifier)

register_task("point_classification", _load_task, shared_keys=("seed",))

__all__ = ["CONFIG_NAME", "PointClassificationConfig", "PointClassificationTask", "evaluate", "find_checkpoint",
           "frozen_features", "load_classifier"]
