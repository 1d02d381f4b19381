"""Task recipes built on the public API and the training loop (`visionpeft.train`):

- `visionpeft.pipelines.clora`: CLoRA multi-concept composition at sampling time (`compose`,
  ``visionpeft compose``; no training, so no task name and not imported here);
- `visionpeft.pipelines.change_detection`: PeftCD change detection (``task: change_detection``);
- `visionpeft.pipelines.dreambooth`: DreamBooth on Stable Diffusion / SDXL (``task: dreambooth``);
- `visionpeft.pipelines.fewshot_clip`: CLIP few-shot classification (``task: fewshot_clip``);
- `visionpeft.pipelines.pointcloud`: point-cloud classification (``task: point_classification``);
- `visionpeft.pipelines.segmentation`: semantic segmentation (``task: segmentation``).

`dense.py` is the one windowed-inference path of the dense tasks.

Each recipe registers its task name with `visionpeft.train.register_task` when imported;
importing this package imports them all, which is how ``visionpeft train`` and
`visionpeft.train.run_config` find them. A recipe imports only public names: the package
root (``import visionpeft as vp``), `visionpeft.train`, `visionpeft.backbones`,
`visionpeft.data` and other pipelines.
"""
from . import change_detection, dreambooth, fewshot_clip, pointcloud, segmentation  # importing registers their tasks
from .change_detection import ChangeDetectionConfig, ChangeDetectionTask
from .dreambooth import DreamBoothConfig, DreamBoothTask
from .fewshot_clip import FewShotCLIPConfig, FewShotCLIPTask
from .pointcloud import PointClassificationConfig, PointClassificationTask
from .segmentation import SegmentationConfig, SegmentationTask

__all__ = ["change_detection", "dreambooth", "fewshot_clip", "pointcloud", "segmentation", "ChangeDetectionConfig",
           "ChangeDetectionTask", "DreamBoothConfig", "DreamBoothTask", "FewShotCLIPConfig", "FewShotCLIPTask",
           "PointClassificationConfig", "PointClassificationTask", "SegmentationConfig", "SegmentationTask"]
