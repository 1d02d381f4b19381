"""Pretraining the embedded Point-MAE (task ``pretrain_point_mae``): Point-MAE's masked
point modelling (60 % of the patches hidden, their points predicted, L2 Chamfer loss;
`visionpeft.backbones.point_mae.PointMAEPretrain`) on procedural shapes
(`visionpeft.data.shapes`: the eight ``PRETRAIN_SHAPES``, with noise, partial views and
clutter), each cloud drawn from (data seed, index) and augmented with Point-MAE's per-axis
scale 2/3-3/2 and translation 0.2. The four ``HELD_OUT_SHAPES`` are never seen: the
adaptation table classifies them. Checkpoints hold the whole model (every parameter trains).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .task import Task, register_task, task_config


class ShapeStream(Dataset):
    """``size`` procedural clouds a pass, cloud i of epoch e drawn from (seed, e, i): new
    shapes and augmentation every epoch, the same after a resume, nothing held in memory."""

    def __init__(self, classes, size: int, num_points: int, seed: int, style: dict):
        self.classes, self.size, self.n, self.seed, self.style = list(classes), size, num_points, seed, style
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the training loop calls it at each pass
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        from ..data.points import augment
        from ..data.shapes import shape_cloud

        rng = np.random.default_rng((self.seed, self.epoch, i))
        cloud = shape_cloud(self.classes[i % len(self.classes)], self.n, rng, **self.style)
        return torch.from_numpy(augment(cloud, "modelnet40", rng).astype(np.float32))


@dataclass
class PointPretrainConfig:
    classes: list = field(default_factory=lambda: list(_pretrain_shapes()))
    pool_size: int = 20000  # clouds per epoch
    num_points: int = 1024
    num_group: int = 64
    group_size: int = 32
    dim: int = 192
    depth: int = 6
    heads: int = 3
    decoder_depth: int = 2
    mask_ratio: float = 0.6
    noise: float = 0.01
    partial: float = 0.3
    clutter: float = 0.05
    data_seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "PointPretrainConfig":
        return task_config(cls, values, "pretrain_point_mae")

    def __post_init__(self):
        from ..data.shapes import SHAPES

        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise ValueError(f"pretrain_point_mae: unknown shapes {unknown}; known: {sorted(SHAPES)}")
        if self.dim % self.heads:
            raise ValueError(f"pretrain_point_mae: dim {self.dim} must divide into heads {self.heads}")


def _pretrain_shapes():
    from ..data.shapes import PRETRAIN_SHAPES

    return PRETRAIN_SHAPES


class PointPretrainTask(Task):
    def __init__(self, cfg: PointPretrainConfig):
        self.cfg = cfg

    def setup(self, device, dtype):
        from ..backbones.point_mae import PointMAEPretrain

        c = self.cfg
        self.model = PointMAEPretrain(c.num_group, c.group_size, c.dim, c.depth, c.heads, c.decoder_depth,
                                      c.mask_ratio).to(device)
        self.data = ShapeStream(c.classes, c.pool_size, c.num_points, c.data_seed,
                                {"noise": c.noise, "partial": c.partial, "clutter": c.clutter})

    def models(self):
        return {"point_mae": self.model}

    def no_weight_decay(self, name, param):
        """Point-MAE's groups: no decay on 1-D tensors, biases and tokens (the mask token)."""
        return param.ndim <= 1 or name.endswith(".bias") or "token" in name

    def train_dataset(self):
        return self.data

    def loss(self, models, batch):
        loss = models["point_mae"](batch)
        return loss, {"chamfer_l2": loss.item()}

    def save_adapters(self, models, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in models["point_mae"].state_dict().items()}
        save_file(sd, str(folder / "point_mae.safetensors"))

    def load_adapters(self, models, folder: Path) -> None:
        models["point_mae"].load_state_dict(load_file(str(folder / "point_mae.safetensors")))


def _load_task(values: dict) -> Task:
    return PointPretrainTask(PointPretrainConfig.from_dict(values))


register_task("pretrain_point_mae", _load_task)
