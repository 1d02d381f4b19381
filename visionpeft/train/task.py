"""What a task gives the training loop: models with adapters, data, a loss. The loop
(`visionpeft.train.loop.train`) knows nothing else, so every recipe (DreamBooth, change
detection, segmentation, few-shot CLIP, point clouds) runs the same loop.

Tasks are found by name (``task:`` in a YAML config) in a registry: a recipe registers
itself with ``register_task(name, loader)``, where ``loader(values)`` builds the task from
its config keys. The recipes in `visionpeft.pipelines` register on import; ``build_task``
imports that package when a name is not registered yet (``_load_pipelines``: the one
place train/ reaches up to pipelines/, and only by package, never by recipe name).
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import visionpeft as vp


class TrainingError(RuntimeError):
    """Training cannot go on (bad data, NaN loss): the message says what and where."""


def adapter_config(spec: dict, where: str):
    """A registered method's config from ``{method: ..., fields...}``."""
    try:
        return vp.config_from_dict(dict(spec))
    except KeyError:
        raise ValueError(f"{where}: unknown adapter method {spec.get('method')!r}; registered: "
                         f"{vp.list_methods()}") from None


def unknown_keys_message(where: str, unknown: list[str], task_keys: list[str]) -> str:
    """One line naming ``unknown`` keys, the closest known key first ("did you mean ..."),
    then every key a config may hold: the task's and the training loop's (TrainConfig)."""
    import difflib

    from .loop import TrainConfig  # loop imports this module: looked up when needed

    loop_keys = sorted(f.name for f in dataclasses.fields(TrainConfig))
    known = sorted(set(task_keys) | set(loop_keys))
    hints = []
    for key in unknown:
        if key in loop_keys:
            hints.append(f"{key} is a training-loop key (TrainConfig), not a {where} one")
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        if close:
            hints.append(f"did you mean {' or '.join(close)}" + (f" for {key}" if len(unknown) > 1 else "") + "?")
    return (f"{where}: unknown key(s) {unknown}" + (f"; {'; '.join(hints)}" if hints else "")
            + f"; known {where} keys: {sorted(task_keys)}; known training-loop keys: {loop_keys}")


def task_config(cls, values: dict, where: str, skip: tuple[str, ...] = ()):
    """A task's config dataclass from a YAML mapping: unknown and missing keys are named."""
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    names = {f.name for f in fields}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(unknown_keys_message(where, unknown, sorted(names)))
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    return cls(**values)


class Task(abc.ABC):
    """Subclass and fill in ``setup``, ``models``, ``train_dataset`` and ``loss``.

    The adapters of each model in ``models()`` are what checkpoints and the final output
    hold (written with ``vp.save_adapter`` as ``<folder>/<model name>``)."""

    adapter_name = "default"
    # True for a task that may have nothing to train (a zero-shot baseline): the loop then
    # sets it up, writes its output and calls ``finish`` at step 0 instead of refusing
    trains_nothing = False
    # the loop drops an epoch's last partial batch unless a recipe keeps it (CLIP-LoRA does)
    drop_last = True

    def loop_defaults(self, given: dict) -> dict:
        """The recipe's own training-loop settings (TrainConfig keys), used where the
        config does not set them, e.g. ``{"max_train_steps": 500 * shots}``; ``given`` holds
        the loop keys the config does set (a default may depend on them). Applied by
        `run_config` (YAML configs, ``visionpeft train``); ``train(task, TrainConfig(...))``
        takes the TrainConfig as given."""
        return {}

    @abc.abstractmethod
    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Build or load the models, inject the adapters, read the data. Called on every
        process with the same seed, so adapters start identical everywhere. ``dtype`` is
        the mixed-precision dtype frozen parts may be kept in (trained ones stay fp32)."""

    @abc.abstractmethod
    def models(self) -> dict[str, nn.Module]:
        """{name: model with a trainable adapter}; the loop prepares them with accelerate."""

    def frozen_models(self) -> dict[str, nn.Module]:
        """Models used in the loss without being trained (moved to the device, in the
        mixed-precision dtype where that is safe)."""
        return {}

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """True for a trainable tensor AdamW should not decay (``name`` as the task's model
        names it, e.g. ``blocks.0.adapters.default.full.bias.fc1``); by default every tensor
        decays. Point-MAE's recipe exempts 1-D tensors, biases and tokens."""
        return False

    @abc.abstractmethod
    def train_dataset(self) -> torch.utils.data.Dataset:
        ...

    def collate(self, items: list):
        return torch.utils.data.default_collate(items)

    @abc.abstractmethod
    def loss(self, models: dict[str, nn.Module], batch) -> tuple[torch.Tensor, dict]:
        """(loss, scalars to log) for one batch; ``models`` are the prepared ones."""

    def after_backward(self, models: dict[str, nn.Module], step: int) -> None:
        """Called once per optimizer step when its gradients are complete (all micro-batches
        accumulated, before clipping and the optimizer), e.g. SNELLA's allocator:
        ``self.alloc.step(step)``. ``step`` is the step being taken, from 1."""

    def state_dict(self) -> dict:
        """State a resumed run needs beyond the adapters and the optimizer (a callback's,
        e.g. ``{"snella": self.alloc.state_dict()}``; tensors allowed): saved in every
        checkpoint and handed to ``load_state_dict`` on resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}; "
                             f"override load_state_dict")

    def check_output(self, output_dir: Path) -> None:
        """Called after ``setup``, before any training: refuse now (a TrainingError) what
        ``finish`` would have to refuse at the end, e.g. an export folder holding files the
        run would not write."""

    def validate(self, models: dict[str, nn.Module], step: int, output_dir: Path) -> dict:
        return {}

    def finish(self, models: dict[str, nn.Module], output_dir: Path) -> dict:
        """After the final adapters are written (e.g. exports); returns what to report."""
        return {}

    # adapters in and out -------------------------------------------------------
    def save_adapters(self, models: dict[str, nn.Module], folder: Path) -> None:
        for name, model in models.items():
            vp.save_adapter(model, folder / name, name=self.adapter_name)

    def load_adapters(self, models: dict[str, nn.Module], folder: Path) -> None:
        for name, model in models.items():
            vp.load_adapter(model, folder / name, name=self.adapter_name, hotswap=True)


# --- the task registry ------------------------------------------------------------------
_TASKS: dict[str, Callable[[dict], Task]] = {}
_SHARED: dict[str, tuple[str, ...]] = {}


def register_task(name: str, loader: Callable[[dict], Task], replace: bool = False,
                  shared_keys: tuple[str, ...] = ()) -> None:
    """Make ``task: name`` in a config build ``loader(values)``, ``values`` being the
    config's keys minus ``task`` and the loop's (TrainConfig) keys, plus the loop keys
    named in ``shared_keys`` that the recipe reads too (e.g. ``seed`` for a few-shot draw;
    their values as the loop will use them). A second loader for a taken name is refused
    unless ``replace`` (the same function re-registered, e.g. by a module reload, replaces
    the first)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_task: the name must be a non-empty string, got {name!r}")
    if not callable(loader):
        raise TypeError(f"register_task({name!r}): the loader must be callable (values -> Task), "
                        f"got {type(loader).__name__}")
    old = _TASKS.get(name)
    same = old is not None and (getattr(old, "__module__", None), getattr(old, "__qualname__", None)) \
        == (getattr(loader, "__module__", None), getattr(loader, "__qualname__", None))
    if old is not None and old is not loader and not same and not replace:
        raise ValueError(f"task {name!r} is already registered (by {getattr(old, '__module__', '?')}); "
                         "pass replace=True to override it")
    _TASKS[name] = loader
    _SHARED[name] = tuple(shared_keys)


def task_shared_keys(name: str) -> tuple[str, ...]:
    """The loop keys task ``name`` also reads (see `register_task`)."""
    if name not in _TASKS:
        _load_pipelines()
    return _SHARED.get(name, ())


def _load_pipelines():
    """Import `visionpeft.pipelines`, whose recipes register their tasks on import. The
    only import of pipelines/ from train/ (build_task and the deprecated names use it)."""
    return importlib.import_module("visionpeft.pipelines")


def task_names() -> list[str]:
    """The registered task names, the pipelines' included (sorted)."""
    _load_pipelines()
    return sorted(_TASKS)


def build_task(name: str, values: dict) -> Task:
    """A task from its registered name and its (non-loop) config keys."""
    if name not in _TASKS:
        _load_pipelines()
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(_TASKS)}")
    return _TASKS[name](dict(values))
