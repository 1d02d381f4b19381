"""The shared training loop and the task recipes that run on it.

    from visionpeft.train import TrainConfig, train, DreamBoothTask, DreamBoothConfig
    result = train(DreamBoothTask(DreamBoothConfig(...)), TrainConfig(output_dir="out"))

or from a YAML file: ``visionpeft train configs/dreambooth_lora_sd15.yaml``.
"""
from .loop import TrainConfig, TrainResult, train
from .task import Task, TrainingError

TASKS = {"dreambooth": ("visionpeft.train.dreambooth", "DreamBoothTask", "DreamBoothConfig"),
         "change_detection": ("visionpeft.pipelines.change_detection.task", "ChangeDetectionTask",
                              "ChangeDetectionConfig"),
         "pretrain_embedded": ("visionpeft.train.pretrain", "PretrainTask", "PretrainConfig")}


def build_task(name: str, values: dict) -> Task:
    """A task from its name and its (non-loop) config keys."""
    import importlib

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    module, task_cls, cfg_cls = TASKS[name]
    mod = importlib.import_module(module)
    return getattr(mod, task_cls)(getattr(mod, cfg_cls).from_dict(values))


def run_config(values: dict) -> TrainResult:
    """Train from one flat mapping (a YAML file's contents): ``task`` picks the recipe,
    the loop's keys go to TrainConfig, the rest to the task's config."""
    values = dict(values)
    task_name = values.pop("task", None)
    if task_name is None:
        raise ValueError(f"the config has no 'task' key; known tasks: {sorted(TASKS)}")
    loop_cfg, rest = TrainConfig.split(values)
    return train(build_task(task_name, rest), loop_cfg)


def __getattr__(name):
    if name in ("DreamBoothTask", "DreamBoothConfig"):
        from . import dreambooth

        return getattr(dreambooth, name)
    raise AttributeError(name)


__all__ = ["TrainConfig", "TrainResult", "train", "Task", "TrainingError", "build_task", "run_config",
           "DreamBoothTask", "DreamBoothConfig"]
