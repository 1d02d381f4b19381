"""What a task gives the training loop: models with adapters, data, a loss. The loop
(`visionpeft.train.loop.train`) knows nothing else, so every recipe (DreamBooth, change
detection, segmentation, few-shot CLIP, point clouds) runs the same loop."""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path

import torch
from torch import nn

import visionpeft as vp


class TrainingError(RuntimeError):
    """Training cannot go on (bad data, NaN loss): the message says what and where."""


def adapter_config(spec: dict, where: str):
    """A registered method's config from ``{method: ..., fields...}``."""
    from ..core.registry import config_from_dict

    try:
        return config_from_dict(dict(spec))
    except KeyError:
        raise ValueError(f"{where}: unknown adapter method {spec.get('method')!r}; registered: "
                         f"{vp.list_methods()}") from None


def task_config(cls, values: dict, where: str, skip: tuple[str, ...] = ()):
    """A task's config dataclass from a YAML mapping: unknown and missing keys are named."""
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    names = {f.name for f in fields}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
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
