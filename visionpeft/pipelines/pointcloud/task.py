"""Point-cloud classification on the shared training loop (``task: point_classification``):
a Point-MAE classifier with any registered adapter (Point-PEFT by default), Point-MAE's
fine-tuning recipe: AdamW 5e-4, weight decay 0.05, cosine with 10 warm-up epochs, 300
epochs, batch 32, gradient clipping at 10; per-data-set augmentation (ScanObjectNN: per-axis
scale 0.9-1.1 and a rotation about y, as Point-PEFT; ModelNet40 and the synthetic shapes:
per-axis scale 2/3-3/2 and translation +-0.2, as Point-MAE); training clouds are FPS-thinned
to 1.2 x num_points and num_points drawn from those at random, test clouds FPS-sampled to
num_points; metrics overall and mean-class accuracy.

A checkpoint folder holds ``points_config.json`` (backbone, classes, points) and
``model/`` (the adapter, with Point-PEFT's memory bank), which `load_classifier` rebuilds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft.backbones import build_point_mae
from visionpeft.data.points import PointClouds, PointSplit, read_point_split
from visionpeft.data.shapes import HELD_OUT_SHAPES, make_shape_split
from visionpeft.train import Task, TrainingError, adapter_config, task_config

from ..checkpoints import find_checkpoint_folder, validations_kept

CONFIG_NAME = "points_config.json"
ADAPTER_DIR = "model"
FULL_NAME = "model.safetensors"  # adapter: null (full fine-tuning) saves the whole model
_DEFAULT = object()
POINT_PEFT = {"method": "point_peft"}
SYNTHETIC_CLASSES = HELD_OUT_SHAPES  # the shapes the embedded Point-MAE never saw
DATASETS = ("modelnet40", "scanobjectnn", "synthetic")
WARMUP_EPOCHS = 10
EMBEDDED = "embedded-point-mae"
# dim, depth, heads: a smaller transformer than Point-MAE's 384 x 12 (6 heads)
BACKBONE_KEYS = ("name", "pretrained", "checkpoint_path", "num_group", "group_size", "dim", "depth", "heads")


@dataclass
class PointClassificationConfig:
    dataset: str
    data_root: str | None = None
    variant: str = "PB_T50_RS"  # scanobjectnn: PB_T50_RS, OBJ_BG or OBJ_ONLY
    num_points: int | None = None  # 2048 for scanobjectnn, else 1024 (Point-MAE's settings)
    backbone: dict | None = None  # {name: point-mae, checkpoint_path: pretrain.pth} or pretrained: false
    adapter: object = _DEFAULT  # left out: Point-PEFT with its defaults; null: full fine-tuning
    epochs: int = 300
    classes: list | None = None  # synthetic: shape names (visionpeft.data.shapes.SHAPES)
    per_class: int = 40  # synthetic: training clouds per class
    test_per_class: int | None = None  # synthetic: test clouds per class (None: a quarter of per_class)
    eval_batch_size: int = 64
    adapter_name: str = "default"
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "PointClassificationConfig":
        if values.get("dataset") != "synthetic":
            misplaced = sorted(k for k in ("classes", "per_class", "test_per_class") if values.get(k) is not None)
            if misplaced:
                raise ValueError(f"point_classification: {', '.join(misplaced)} only apply to dataset: synthetic "
                                 f"(dataset {values.get('dataset')!r} reads its classes and clouds from data_root)")
        return task_config(cls, values, "point_classification")

    def __post_init__(self) -> None:
        where = "point_classification"
        if self.dataset not in DATASETS:
            raise ValueError(f"{where}: dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.dataset != "synthetic" and not self.data_root:
            raise ValueError(f"{where}: dataset {self.dataset} needs data_root (the folder holding its files)")
        if self.num_points is None:
            self.num_points = 2048 if self.dataset == "scanobjectnn" else 1024
        for name in ("num_points", "epochs", "per_class", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {name} must be an integer >= 1, got {v!r}")
        if self.test_per_class is not None and (isinstance(self.test_per_class, bool) or
                                                not isinstance(self.test_per_class, int) or self.test_per_class < 1):
            raise ValueError(f"{where}: test_per_class must be an integer >= 1 (or null), got {self.test_per_class!r}")
        if self.num_points < 32:
            raise ValueError(f"{where}: num_points {self.num_points} is below one group of 32 points")
        if self.backbone is None:
            self.backbone = {"name": "point-mae", "pretrained": False}
        if not isinstance(self.backbone, dict) or self.backbone.get("name") not in ("point-mae", EMBEDDED):
            raise ValueError(f"{where}: backbone must be {{name: point-mae, checkpoint_path: FILE}} (or pretrained: "
                             f"false) or {{name: {EMBEDDED}}}, got {self.backbone!r}")
        if self.backbone["name"] == EMBEDDED:  # the packaged weights and their size
            from visionpeft.backbones.embedded_point_mae import GROUPS, SIZE

            self.backbone = {**SIZE, "num_group": GROUPS["num_group"], "group_size": GROUPS["group_size"],
                             **self.backbone}
        unknown = sorted(set(self.backbone) - set(BACKBONE_KEYS))
        if unknown:
            raise ValueError(f"{where}: backbone keys {unknown} unknown; known: {', '.join(BACKBONE_KEYS)}")
        if self.backbone.get("pretrained", True) and not self.backbone.get("checkpoint_path") and \
                self.backbone["name"] != EMBEDDED:
            raise ValueError(f"{where}: backbone point-mae with pretrained weights needs checkpoint_path (Point-MAE's "
                             f"pretrain.pth); pretrained: false trains from a random init")
        if self.adapter is _DEFAULT:
            self.adapter = dict(POINT_PEFT)
        if self.adapter is None:  # full fine-tuning: every parameter trains
            if self.dataset == "synthetic":
                self.classes = list(self.classes or SYNTHETIC_CLASSES)
            return
        if not isinstance(self.adapter, dict):
            raise ValueError(f"{where}: adapter must be a mapping with a method (e.g. {{method: point_peft}}), "
                             f"got {self.adapter!r}")
        spec = dict(self.adapter)
        if "target_modules" not in spec and spec.get("method") != "point_peft":
            block = spec.get("method") in vp.list_methods() and not vp.get_method(spec["method"]).weight_space
            spec["target_modules"] = list(vp.presets.TIMM_BLOCKS if block else vp.presets.TIMM_VIT_QKV)
            spec.setdefault("modules_to_save", ["head"])
        adapter_config(spec, where)  # a bad method or field fails now, before any data is read
        self.adapter = spec
        if self.dataset == "synthetic":
            self.classes = list(self.classes or SYNTHETIC_CLASSES)

    @property
    def groups(self) -> tuple[int, int]:
        """(num_group, group_size): Point-MAE's 64 x 32 for 1024 points, 128 x 32 for 2048."""
        return (self.backbone.get("num_group") or max(1, self.num_points // 16),
                self.backbone.get("group_size") or min(32, self.num_points))


def _frozen_norms_eval(model: torch.nn.Module) -> None:
    """BatchNorm layers with no trainable parameter stay in eval mode: their running
    statistics are the pretrained ones (the official code lets them drift in training)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


@torch.no_grad()
def evaluate(model, dataset, classes: list[str], batch_size: int = 64, progress: bool = False) -> dict:
    """Overall and mean-class accuracy (the mean over classes of each class's share right)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    k = len(classes)
    correct, total = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluate", leave=False)
    for points, labels in loader:
        pred = model(points.to(device)).argmax(-1).cpu()
        total += torch.bincount(labels, minlength=k)
        correct += torch.bincount(labels[pred == labels], minlength=k)
    model.train(was)
    if int(total.sum()) == 0:
        raise ValueError("evaluate: the data set is empty")
    per_class = {c: (int(correct[i]) / int(total[i]) if total[i] else None) for i, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    return {"accuracy": int(correct.sum()) / int(total.sum()), "mean_class_accuracy": sum(present) / len(present),
            "per_class_accuracy": per_class, "clouds": int(total.sum())}


@torch.no_grad()
def frozen_features(model, dataset, batch_size: int = 64) -> torch.Tensor:
    """(n, C) features of the frozen host (every adapter off, eval mode): the final
    LayerNorm's tokens, max over the patch tokens; what Point-PEFT's memory bank holds."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    feats = []
    with vp.disabled(model):
        for points, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            feats.append(model.forward_features(points.to(device))[:, 1:].max(dim=1).values.float().cpu())
    model.train(was)
    return torch.cat(feats)


def build_model(backbone: dict, num_classes: int, num_points: int, groups: tuple[int, int], init_seed: int = 0):
    """The Point-MAE classifier; its random init (all of it without a checkpoint, the head
    with one) is drawn from ``init_seed``, so a checkpoint rebuilds the same frozen host."""
    checkpoint = backbone.get("checkpoint_path") if backbone.get("pretrained", True) else None
    if backbone.get("name") == EMBEDDED and backbone.get("pretrained", True) and not checkpoint:
        from visionpeft.backbones.embedded_point_mae import weights_path

        checkpoint = weights_path()  # FileNotFoundError naming the command that makes it
    size = {k: backbone[k] for k in ("dim", "depth", "heads") if backbone.get(k) is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_point_mae(num_classes, num_points=num_points, num_group=groups[0], group_size=groups[1],
                               checkpoint_path=checkpoint, **size)


class PointClassificationTask(Task):
    def __init__(self, cfg: PointClassificationConfig):
        self.cfg = cfg
        self.adapter_name = cfg.adapter_name
        self._splits: dict[str, PointSplit] = {}

    def split(self, name: str) -> PointSplit:
        if name not in self._splits:
            c = self.cfg
            try:
                if c.dataset == "synthetic":
                    per = c.per_class if name == "train" else (c.test_per_class or max(1, c.per_class // 4))
                    self._splits[name] = make_shape_split(c.classes, per, c.num_points,
                                                          seed=c.seed * 2 + (name == "test"), partial=0.3,
                                                          clutter=0.05)
                else:
                    self._splits[name] = read_point_split(c.dataset, c.data_root, name, c.variant)
            except (ValueError, FileNotFoundError, ImportError) as err:
                raise TrainingError(f"point_classification: {err}") from None
        return self._splits[name]

    def loop_defaults(self, given: dict) -> dict:
        batch = given.get("train_batch_size", 32)
        per_epoch = max(1, len(self.split("train")) // batch)  # the loop drops an epoch's last partial batch
        epochs = self.cfg.epochs
        warmup = min(WARMUP_EPOCHS, epochs - 1) * per_epoch
        if given.get("max_train_steps"):  # steps instead of epochs: the warm-up keeps its share of the run
            warmup = given["max_train_steps"] * min(WARMUP_EPOCHS, epochs - 1) // epochs
        return {"train_batch_size": 32, "learning_rate": 5e-4, "adam_weight_decay": 0.05, "lr_scheduler": "cosine",
                "lr_min": 1e-6, "max_grad_norm": 10.0, "max_train_steps": epochs * per_epoch,
                "lr_warmup_steps": warmup}

    def setup(self, device, dtype):
        c = self.cfg
        train, test = self.split("train"), self.split("test")
        if train.classes != test.classes:
            raise TrainingError("point_classification: the train and test splits name different classes")
        if len(train) == 0:
            raise TrainingError("point_classification: the train split is empty")
        self.classes = list(train.classes)
        try:
            model = build_model(c.backbone, len(self.classes), c.num_points, c.groups, init_seed=c.seed)
        except (ValueError, FileNotFoundError) as err:
            raise TrainingError(f"point_classification: {err}") from None
        if c.adapter is not None:
            try:
                vp.inject(model, adapter_config(c.adapter, "point_classification"), name=self.adapter_name)
            except (vp.TargetError, ValueError) as err:  # e.g. prompt blocks beyond a small host's depth
                raise TrainingError(f"point_classification: {str(err).splitlines()[0]}") from None
        self.model = model.to(device)
        self.train_set = PointClouds(train, c.num_points, c.dataset, train=True, seed=c.seed)
        self.test_set = PointClouds(test, c.num_points, c.dataset, train=False)
        if c.adapter is not None and c.adapter["method"] == "point_peft":
            # the memory bank: the training clouds through the frozen host
            bank_set = PointClouds(train, c.num_points, c.dataset, train=False)
            vp.set_memory_bank(self.model, frozen_features(self.model, bank_set, c.eval_batch_size),
                               name=self.adapter_name)

    def models(self):
        return {"points": self.model}

    def no_weight_decay(self, name, param):
        """Point-MAE's groups: no decay on 1-D tensors (norms, biases, BN, offsets), biases and tokens."""
        return param.ndim <= 1 or name.endswith(".bias") or "token" in name

    def train_dataset(self):
        return self.train_set

    def loss(self, models, batch):
        points, labels = batch
        model = models["points"]
        _frozen_norms_eval(model)
        logits = model(points)
        acc = (logits.detach().argmax(-1) == labels).float().mean()
        return F.cross_entropy(logits.float(), labels), {"train_acc": acc}

    def _config(self) -> dict:
        c = self.cfg
        backbone = dict(c.backbone)
        if backbone.get("checkpoint_path"):
            backbone["checkpoint_path"] = str(Path(backbone["checkpoint_path"]).expanduser().resolve())
        return {"backbone": backbone, "adapter": c.adapter, "adapter_name": self.adapter_name,
                "classes": self.classes, "num_points": c.num_points, "groups": list(c.groups), "init_seed": c.seed,
                "dataset": c.dataset, "variant": c.variant if c.dataset == "scanobjectnn" else None}

    def save_adapters(self, models, folder):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.adapter is None:  # full fine-tuning: the whole model
            state = {k: v.detach().cpu().contiguous() for k, v in models["points"].state_dict().items()}
            vp.atomic_write_file(folder / FULL_NAME, lambda tmp: save_file(state, tmp))
        else:
            vp.save_adapter(models["points"], folder / ADAPTER_DIR, name=self.adapter_name)
        text = json.dumps(self._config(), indent=2)
        vp.atomic_write_file(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))

    def load_adapters(self, models, folder):
        if self.cfg.adapter is None:
            models["points"].load_state_dict(load_file(str(Path(folder) / FULL_NAME)))
        else:
            vp.load_adapter(models["points"], Path(folder) / ADAPTER_DIR, name=self.adapter_name, hotswap=True)
        validations_kept(Path(folder))

    def validate(self, models, step, output_dir):
        m = evaluate(models["points"], self.test_set, self.classes, self.cfg.eval_batch_size)
        row = {"step": step, "test_accuracy": m["accuracy"], "test_mean_class_accuracy": m["mean_class_accuracy"]}
        with open(Path(output_dir) / "val_metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def finish(self, models, output_dir):
        """Test accuracy after the last step (no selection of the best epoch on the test
        split, which both official repos do)."""
        m = evaluate(models["points"], self.test_set, self.classes, self.cfg.eval_batch_size, progress=True)
        m.update(split="test", adapter=self.cfg.adapter["method"] if self.cfg.adapter else None,
                 trainable_parameters=sum(p.numel() for p in models["points"].parameters() if p.requires_grad))
        text = json.dumps(m, indent=2)
        vp.atomic_write_file(Path(output_dir) / "metrics.json", lambda tmp: Path(tmp).write_text(text))
        return {"test_accuracy": m["accuracy"], "test_mean_class_accuracy": m["mean_class_accuracy"]}


def find_checkpoint(path) -> Path:
    """The folder with points_config.json: ``path`` itself, its ``best/`` or its ``adapter/``."""
    return find_checkpoint_folder(path, CONFIG_NAME, "point-cloud classification")


def load_classifier(path, device: str | torch.device = "cpu"):
    """(model in eval mode, config) of a checkpoint folder or a training output_dir."""
    folder = find_checkpoint(path)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    model = build_model(cfg["backbone"], len(cfg["classes"]), cfg["num_points"], tuple(cfg["groups"]),
                        cfg.get("init_seed", 0))
    try:
        if cfg.get("adapter") is None:
            model.load_state_dict(load_file(str(folder / FULL_NAME)))
        else:
            vp.load_adapter(model, folder / ADAPTER_DIR, name=cfg.get("adapter_name", "default"))
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, vp.TargetError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"checkpoint {folder}: cannot load its adapter: {first}") from None
    return model.to(device).eval(), cfg


def _load_task(values: dict) -> Task:
    return PointClassificationTask(PointClassificationConfig.from_dict(values))
