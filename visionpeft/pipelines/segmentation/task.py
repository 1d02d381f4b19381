"""Semantic segmentation on the shared training loop (``task: segmentation``), plus the one
inference path that evaluate-seg and predict-seg use (sliding windows, overlap averaged).

Domain generalisation / adaptation runs train on a source domain (``source_domain``, or a
whole data set) and validate and test on a target (``target_domain``, or a second data
set in ``target_data_root`` / ``target_dataset``). The best checkpoint is chosen on the
SOURCE's validation split by default (``select_on: source``); the official Earth-Adapter
code selects on the target's validation split, which reports a figure tuned on the test
domain: ``select_on: target`` reproduces that, and the metrics files say which was used.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import visionpeft as vp
from visionpeft.data.segmentation import SegmentationDataset, find_split
from visionpeft.train import Task, TrainingError, adapter_config, task_config

from ..change_detection.model import FeatureEncoder
from ..change_detection.task import build_backbone, check_backbone
from ..checkpoints import HEAD_NAME as DECODER_NAME
from ..checkpoints import find_checkpoint_folder, validations_kept, write_checkpoint
from ..dense import sliding_window
from .metrics import SegConfusion
from .mask2former import build_criterion, scores_to_probs
from .model import ALL_DECODERS, SegmentationModel, probe

CONFIG_NAME = "seg_config.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# an adapter without target_modules takes the first of these presets that the host has
BLOCK_PRESETS = ("TIMM_BLOCKS", "HF_VIT_LAYERS", "HF_SAM2_BLOCKS")
WEIGHT_PRESETS = ("TIMM_VIT_QKV", "HF_DINOV2_QKV", "HF_SAM2_QKV")


def _check_trains_something(spec: dict) -> None:
    if spec.get("target_modules") == [] and not spec.get("modules_to_save"):
        raise ValueError("segmentation: the adapter has target_modules: [] and no modules_to_save, so it would "
                         "train nothing; list modules to adapt, or drop target_modules for the host's preset")


def inject_adapter(host: nn.Module, spec: dict, name: str) -> dict:
    """Inject the adapter ``spec``; without ``target_modules`` the host's preset (its blocks
    for a block method, its q/k/v for a weight method) is used. Returns the spec as
    injected (with the targets), which is what a checkpoint records. ``target_modules: []``
    with ``modules_to_save`` trains those modules whole (full fine-tuning: blocks, patch
    embedding, norm)."""
    _check_trains_something(spec)
    if spec.get("target_modules") or spec.get("target_modules") == []:
        vp.inject(host, adapter_config(spec, "segmentation"), name=name)
        return spec
    block = not vp.get_method(spec["method"]).weight_space  # the method was checked with the config
    tried = []
    for preset in BLOCK_PRESETS if block else WEIGHT_PRESETS:
        full = {**spec, "target_modules": list(getattr(vp.presets, preset))}
        try:
            vp.inject(host, adapter_config(full, "segmentation"), name=name)
            return full
        except vp.TargetError:  # not this host family: nothing was changed, try the next
            tried.append(preset)
    raise ValueError(f"segmentation: the adapter has no target_modules and none of the presets {tried} "
                     f"matches {type(host).__name__}; give target_modules")


@dataclass
class SegmentationConfig:
    dataset: str
    data_root: str
    num_classes: int
    backbone: dict
    adapter: dict | None = None
    decoder: dict = field(default_factory=lambda: {"name": "upernet"})
    ignore_index: int = 255
    image_size: int = 512
    source_domain: str | None = None
    target_domain: str | None = None
    target_data_root: str | None = None
    target_dataset: str | None = None
    dataset_options: dict = field(default_factory=dict)
    select_on: str = "source"
    eval_stride: int | None = None
    cut_tiles: int | None = None  # cut large images (ISPRS) into tiles of this size, as mmseg's converters do
    base_scale: float = 1.0  # the scale the model sees images at (mmseg's LoveDA recipe: 0.5)
    feature_blocks: list[int] | None = None  # the four ViT blocks read (default: evenly spaced)
    eval_batch_size: int = 1  # whole images: more than one needs equal sizes
    adapter_name: str = "default"

    @classmethod
    def from_dict(cls, values: dict) -> "SegmentationConfig":
        cfg = task_config(cls, values, "segmentation")
        cfg.check()
        return cfg

    def check(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"segmentation: num_classes must be an integer >= 2, got {self.num_classes!r}")
        name = (self.decoder or {}).get("name")
        if name not in ALL_DECODERS:
            raise ValueError(f"segmentation: decoder.name must be one of {list(ALL_DECODERS)}, got {name!r}")
        if self.select_on not in ("source", "target"):
            raise ValueError(f"segmentation: select_on must be source or target, got {self.select_on!r}")
        if self.select_on == "target" and not self.has_target:
            raise ValueError("segmentation: select_on: target needs a target (target_domain or target_data_root)")

    @property
    def has_target(self) -> bool:
        return bool(self.target_domain or self.target_data_root)

    def split(self, which: str, split: str):
        """The SegSplit of the source or the target domain."""
        if which == "source":
            return find_split(self.dataset, self.data_root, split, domain=self.source_domain, **self.dataset_options)
        return find_split(self.target_dataset or self.dataset, self.target_data_root or self.data_root, split,
                          domain=self.target_domain, **self.dataset_options)


class Segmenter(nn.Module):
    """Normalisation + encoder with adapters + decoder; what a checkpoint rebuilds."""

    def __init__(self, host: nn.Module, num_classes: int, decoder: dict, image_size: int,
                 feature_blocks: list[int] | None = None):
        super().__init__()
        encoder = FeatureEncoder(host, feature_blocks)
        options = {k: v for k, v in decoder.items() if k != "name"}
        # the crop size is what the host sees in training and in every window
        channels, strides = probe(encoder, image_size)
        self.net = SegmentationModel(encoder, channels, num_classes, decoder["name"], options, strides)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @property
    def host(self) -> nn.Module:
        return self.net.encoder.host

    def trained_head(self) -> dict[str, torch.Tensor]:
        """Decoder and classifier weights (the encoder's part is its adapter)."""
        return {k: v for k, v in self.net.state_dict().items() if not k.startswith("encoder.")}

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.net((x - self.mean) / self.std, **kwargs)


def save_segmenter(model: Segmenter, folder: Path, config: dict, name: str) -> None:
    write_checkpoint(folder, model.host, name, model.trained_head(), config, CONFIG_NAME)


def find_checkpoint(path) -> Path:
    """The folder with seg_config.json: ``path`` itself, its ``best/`` or its ``adapter/``."""
    return find_checkpoint_folder(path, CONFIG_NAME, "segmentation")


def load_head(model: Segmenter, file: Path) -> None:
    """The decoder and classifier weights of a checkpoint, every one of them: a key missing
    or left over (another decoder, other options) is refused, not left at random init."""
    result = model.net.load_state_dict(load_file(str(file)), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("encoder.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{file} does not fit this decoder ({model.net.decoder_name}): missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}; was it saved with other decoder options?")


def load_segmenter(path) -> tuple[Segmenter, dict]:
    folder = find_checkpoint(path)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    host = build_backbone(cfg["backbone"])
    if (folder / "encoder").is_dir():
        vp.load_adapter(host, folder / "encoder")
    else:
        host.requires_grad_(False)
    model = Segmenter(host, cfg["num_classes"], cfg["decoder"], cfg["image_size"], cfg.get("feature_blocks"))
    load_head(model, folder / DECODER_NAME)
    return model.eval(), cfg


@torch.no_grad()
def predict_probs(model: Segmenter, image: torch.Tensor, tile: int, stride: int | None = None,
                  scale: float = 1.0) -> torch.Tensor:
    """Class probabilities (N, K, H, W) for images of any size: per-window probabilities
    (softmax; mask2former's scores normalised per pixel) averaged over overlapping windows
    of ``tile`` (stride: tile * 2/3, as the official 512/341). With
    ``scale`` the image is resized by it first and the probabilities brought back to its
    size, as mmseg evaluates a resized test pipeline against full-size labels."""
    stride = stride or max(1, tile * 2 // 3)
    x = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
    # mask2former's scores are sums of class x mask probabilities, not logits: normalised, not softmaxed
    to_probs = scores_to_probs if model.net.decoder_name == "mask2former" else (lambda s: F.softmax(s, 1))
    probs = sliding_window(lambda crop: to_probs(model(crop)), x, tile, stride)
    return probs if scale == 1.0 else F.interpolate(probs, size=image.shape[-2:], mode="bilinear",
                                                     align_corners=False)


def evaluate(model: Segmenter, dataset, tile: int, num_classes: int, ignore_index: int,
             stride: int | None = None, batch_size: int = 1, scale: float = 1.0) -> dict:
    """Metrics from one confusion matrix over ``dataset`` (macro mIoU / mF1, OA)."""
    cm = SegConfusion(num_classes, ignore_index)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    device = next(model.parameters()).device
    for batch in loader:
        probs = predict_probs(model, batch["image"].to(device), tile, stride, scale)
        cm.update(probs.argmax(1).cpu(), batch["mask"])
    return cm.compute()


class SegmentationTask(Task):
    def __init__(self, cfg: SegmentationConfig):
        self.cfg = cfg
        self.adapter_name = cfg.adapter_name
        check_backbone(cfg.backbone)
        if cfg.adapter:  # a bad method or field fails here, before any data is read
            _check_trains_something(cfg.adapter)
            adapter_config({**cfg.adapter, "target_modules": cfg.adapter.get("target_modules") or ["set-in-setup"]},
                           "segmentation")
        self.adapter_config = cfg.adapter or None
        self.best = -1.0

    def setup(self, device, dtype):
        cfg = self.cfg
        try:
            train = cfg.split("source", "train")
            self.val_sets = {"source": SegmentationDataset(cfg.split("source", "val"), tile=cfg.cut_tiles)}
            if cfg.has_target:
                self.val_sets["target"] = SegmentationDataset(cfg.split("target", "val"), tile=cfg.cut_tiles)
        except (ValueError, FileNotFoundError) as err:
            raise TrainingError(f"data_root {cfg.data_root}: {err}") from None
        if train.ignore_index != cfg.ignore_index:
            raise TrainingError(f"segmentation: ignore_index is {cfg.ignore_index} but {cfg.dataset}'s masks mark "
                                f"ignored pixels with {train.ignore_index}; set ignore_index: {train.ignore_index}")
        if len(train.classes) != cfg.num_classes:
            raise TrainingError(f"segmentation: num_classes is {cfg.num_classes} but {cfg.dataset} has "
                                f"{len(train.classes)} classes {train.classes}")
        self.train_set = SegmentationDataset(train, image_size=cfg.image_size, train=True, seed=0,
                                             tile=cfg.cut_tiles, scale=cfg.base_scale)
        host = build_backbone(cfg.backbone)
        if self.adapter_config is not None:
            self.adapter_spec = inject_adapter(host, self.adapter_config, self.adapter_name)
        else:
            host.requires_grad_(False)
        try:
            self.model = Segmenter(host, cfg.num_classes, cfg.decoder, cfg.image_size, cfg.feature_blocks)
        except ValueError as err:
            raise TrainingError(f"segmentation: {err}") from None
        for name, p in self.model.net.named_parameters():
            if not name.startswith("encoder."):
                p.requires_grad_(True)
        # mask2former trains with its set loss (matching, mask BCE + dice, classes), not per-pixel CE
        self.criterion = (build_criterion(self.model.net.decoder.config).to(device)
                          if cfg.decoder["name"] == "mask2former" else None)

    def models(self):
        return {"model": self.model}

    def train_dataset(self):
        return self.train_set

    def loss(self, models, batch):
        if self.criterion is not None:
            out = models["model"](batch["image"], queries=True)
            return self.criterion.semantic(out, batch["mask"], self.cfg.ignore_index)
        logits = models["model"](batch["image"])
        return F.cross_entropy(logits, batch["mask"], ignore_index=self.cfg.ignore_index), {}

    def _config(self) -> dict:
        c = self.cfg
        return {"backbone": c.backbone, "num_classes": c.num_classes, "decoder": c.decoder, "image_size": c.image_size,
                "ignore_index": c.ignore_index, "adapter": getattr(self, "adapter_spec", c.adapter),
                "dataset": c.dataset,
                "dataset_options": c.dataset_options, "cut_tiles": c.cut_tiles, "eval_stride": c.eval_stride,
                "base_scale": c.base_scale, "feature_blocks": c.feature_blocks,
                "classes": list(self.train_set.classes) if hasattr(self, "train_set") else None}

    def save_adapters(self, models, folder):
        save_segmenter(models["model"], folder, self._config(), self.adapter_name)

    def load_adapters(self, models, folder):
        model = models["model"]
        if self.adapter_config is not None:
            vp.load_adapter(model.host, folder / "encoder", name=self.adapter_name, hotswap=True)
        load_head(model, folder / DECODER_NAME)
        rows = validations_kept(folder)  # validations after the checkpoint are redone
        if rows is not None:
            self.best = max((r[f"{self.cfg.select_on}_miou"] for r in rows), default=-1.0)

    def validate(self, models, step, output_dir):
        model = models["model"]
        was = model.training
        model.eval()
        row = {"step": step, "selected_on": self.cfg.select_on}
        for which, data in self.val_sets.items():
            m = evaluate(model, data, self.cfg.image_size, self.cfg.num_classes, self.cfg.ignore_index,
                         self.cfg.eval_stride, self.cfg.eval_batch_size, self.cfg.base_scale)
            row.update({f"{which}_{k}": v for k, v in m.items() if k in ("oa", "miou", "mf1")})
        model.train(was)
        with open(output_dir / "val_metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        score = row[f"{self.cfg.select_on}_miou"]
        if score > self.best:
            self.best = score
            vp.atomic_write_dir(output_dir / "best", lambda tmp: self.save_adapters(models, tmp))
        return row

    def finish(self, models, output_dir):
        if not (output_dir / "best").exists():
            shutil.copytree(output_dir / "adapter", output_dir / "best")
        return {f"best_{self.cfg.select_on}_val_miou": self.best if self.best >= 0 else None}
