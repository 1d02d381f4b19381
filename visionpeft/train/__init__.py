"""The shared training loop, the Task interface recipes implement, and the task registry.

    from visionpeft.train import TrainConfig, train
    from visionpeft.pipelines.dreambooth import DreamBoothTask, DreamBoothConfig
    result = train(DreamBoothTask(DreamBoothConfig(...)), TrainConfig(output_dir="out"))

or from a YAML file: ``visionpeft train configs/dreambooth_lora_sd15.yaml``, whose ``task:``
names a registered task (``register_task``; the recipes of `visionpeft.pipelines` register
themselves, ``pretrain_embedded`` and ``pretrain_clip`` are registered here).
"""
import dataclasses
import sys
import warnings

from .loop import TrainConfig, TrainResult, train
from .pretrain import MEAN as PRETRAIN_MEAN
from .pretrain import STD as PRETRAIN_STD
from .pretrain import PretrainConfig, PretrainTask, encoder_state_dict
from .task import (Task, TrainingError, _load_pipelines, adapter_config, build_task, register_task,
                   task_config, task_names, task_shared_keys)


def _pretrain_task(values: dict) -> Task:
    return PretrainTask(PretrainConfig.from_dict(values))


register_task("pretrain_embedded", _pretrain_task)
from . import pretrain_clip  # noqa: E402,F401  (registers task pretrain_clip: the embedded CLIP's recipe)
from . import pretrain_points  # noqa: E402,F401  (registers task pretrain_point_mae: the embedded Point-MAE's)
from . import pretrain_sd  # noqa: E402,F401  (registers pretrain_sd_vae and pretrain_sd_unet: the embedded SD's)


def run_config(values: dict) -> TrainResult:
    """Train from one flat mapping (a YAML file's contents): ``task`` picks the recipe,
    the loop's keys go to TrainConfig, the rest to the task's config."""
    values = dict(values)
    task_name = values.pop("task", None)
    if task_name is None:
        raise ValueError(f"the config has no 'task' key; known tasks: {task_names()}")
    loop_cfg, rest = TrainConfig.split(values)
    rest.update({k: getattr(loop_cfg, k) for k in task_shared_keys(task_name)})
    task = build_task(task_name, rest)
    given = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    defaults = {k: v for k, v in task.loop_defaults(given).items() if k not in values}
    if defaults:  # the recipe's settings where the config is silent, checked as the config's are
        loop_cfg = TrainConfig(**{**dataclasses.asdict(loop_cfg), **defaults})
    return train(task, loop_cfg)


# names that moved to visionpeft.pipelines: still importable from here, with a warning
_MOVED = {"DreamBoothTask": "dreambooth", "DreamBoothConfig": "dreambooth"}


def __getattr__(name):
    if name in _MOVED:
        where = f"visionpeft.pipelines.{_MOVED[name]}"
        # `from visionpeft.train import X` asks twice (importlib's hasattr, then the import): warn once
        if sys._getframe(1).f_code.co_name != "_handle_fromlist":
            warnings.warn(f"visionpeft.train.{name} moved: import it from {where} "
                          f"(from {where} import {name})", DeprecationWarning, stacklevel=2)
        return getattr(getattr(_load_pipelines(), _MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainConfig", "TrainResult", "train", "Task", "TrainingError", "adapter_config", "task_config",
           "register_task", "build_task", "task_names", "run_config",
           "PretrainConfig", "PretrainTask", "encoder_state_dict", "PRETRAIN_MEAN", "PRETRAIN_STD"]
