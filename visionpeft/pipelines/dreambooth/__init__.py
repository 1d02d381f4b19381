"""DreamBooth (Ruiz et al., CVPR 2023) with any registered adapter on a Stable Diffusion
1.x/2.x or SDXL UNet, optionally on the text encoder(s) too. Train with ``visionpeft train``
and ``task: dreambooth`` (configs/dreambooth_*.yaml), with the diffusers-style flags of
``scripts/train_dreambooth.py``, or in Python:

    from visionpeft.train import TrainConfig, train
    from visionpeft.pipelines.dreambooth import DreamBoothConfig, DreamBoothTask
    train(DreamBoothTask(DreamBoothConfig(...)), TrainConfig(output_dir="out"))
"""
from visionpeft.train import register_task

from .task import IMAGE_SUFFIXES, DreamBoothConfig, DreamBoothTask, list_images, load_image


def _task(values: dict) -> DreamBoothTask:
    return DreamBoothTask(DreamBoothConfig.from_dict(values))


register_task("dreambooth", _task)

__all__ = ["DreamBoothConfig", "DreamBoothTask", "IMAGE_SUFFIXES", "list_images", "load_image"]
