"""PeftCD on the shared training loop, plus the one inference path that evaluate-cd and
predict-cd use (sliding windows with overlap averaging)."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import visionpeft as vp
from visionpeft.train import Task, TrainingError, adapter_config, task_config

from ..checkpoints import HEAD_NAME as DECODER_NAME
from ..checkpoints import find_checkpoint_folder, validations_kept, write_checkpoint
from ..dense import sliding_window
from .metrics import ConfusionMatrix
from .model import FeatureEncoder, SiameseChangeDetector, probe_channels

CONFIG_NAME = "cd_config.json"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def build_backbone(spec: dict) -> nn.Module:
    """``{name, source: timm|transformers|tiny, pretrained, checkpoint_path, init_seed,
    ...kwargs}``; ``pretrained: false`` builds random weights from ``init_seed`` (0)."""
    spec = dict(spec)
    name, source = spec.pop("name", None), spec.pop("source", "timm")
    if not name:
        raise ValueError("backbone: give a name, e.g. {name: sam2_hiera_tiny, source: timm}")
    if source == "tiny":
        from visionpeft.backbones.tiny import build_tiny

        return build_tiny(name, seed=spec.pop("seed", 0))
    if source not in ("timm", "transformers"):
        raise ValueError(f"backbone.source must be timm, transformers or tiny, got {source!r}")
    from visionpeft.backbones import load_backbone

    if spec.get("pretrained", True):
        return load_backbone(source, name, **spec)
    # random weights: drawn from init_seed alone, so a checkpoint (which holds only the
    # adapter and the decoder) rebuilds the very same frozen encoder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.pop("init_seed", 0))
        return load_backbone(source, name, **spec)


def check_backbone(spec: dict) -> None:
    """What can be told of a timm backbone before any data is read or weight downloaded:
    a name timm does not know (`UnknownModelError`, with the closest names), and, with
    ``HF_HUB_OFFLINE=1``, pretrained hub weights missing from the local cache
    (`OfflineWeightsError`). Anything else (local paths, transformers, custom weight
    sources) is left to the loader."""
    if not isinstance(spec, dict):
        return
    name, source = spec.get("name"), spec.get("source", "timm")
    if source != "timm" or not isinstance(name, str) or not name:
        return
    import os

    from timm.models import get_pretrained_cfg

    from visionpeft.backbones import ALIASES, OfflineWeightsError, check_timm_name

    name = ALIASES.get(name, name)
    if os.path.exists(os.path.expanduser(name)) or not check_timm_name(name):
        return  # a path, a hub repo or a local folder: the loader checks it
    if not spec.get("pretrained", True) or spec.get("checkpoint_path") or "pretrained_cfg" in spec \
            or "pretrained_cfg_overlay" in spec:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id or cfg.file or cfg.state_dict:
        return
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
             *([cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []))
    cache = spec.get("cache_dir")  # timm.create_model(cache_dir=...) looks there
    if not any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision or None), str)
               for f in files):
        raise OfflineWeightsError.for_hub("timm", name, "a local file as checkpoint_path or a local timm folder")


@dataclass
class ChangeDetectionConfig:
    data_root: str
    backbone: dict
    adapter: dict | None
    image_size: int = 256
    decoder_channels: int = 64
    exchange: str = "layer"
    augment: bool = True
    val_split: str = "val"
    eval_batch_size: int = 4
    adapter_name: str = "default"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> "ChangeDetectionConfig":
        return task_config(cls, values, "change_detection", skip=("extra",))


class Detector(nn.Module):
    """Normalisation + the Siamese detector; what a checkpoint rebuilds."""

    def __init__(self, host: nn.Module, image_size: int, decoder_channels: int, exchange: str):
        super().__init__()
        encoder = FeatureEncoder(host)
        channels, pyramid = probe_channels(encoder, image_size)
        self.net = SiameseChangeDetector(encoder, channels, pyramid, decoder_channels, exchange)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    @property
    def host(self) -> nn.Module:
        return self.net.encoder.host

    def forward(self, a, b):
        return self.net((a - self.mean) / self.std, (b - self.mean) / self.std)


def save_detector(model: Detector, folder: Path, config: dict, name: str) -> None:
    write_checkpoint(folder, model.host, name, model.net.decoder.state_dict(), config, CONFIG_NAME)


def find_checkpoint(path) -> Path:
    """The folder with cd_config.json: ``path`` itself, its ``best/`` or its ``adapter/``."""
    return find_checkpoint_folder(path, CONFIG_NAME, "change-detection")


def load_detector(path) -> tuple[Detector, dict]:
    folder = find_checkpoint(path)
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    host = build_backbone(cfg["backbone"])
    if (folder / "encoder").is_dir():  # no folder: the encoder was trained frozen
        vp.load_adapter(host, folder / "encoder")
    else:
        host.requires_grad_(False)
    model = Detector(host, cfg["image_size"], cfg["decoder_channels"], cfg["exchange"])
    model.net.decoder.load_state_dict(load_file(str(folder / DECODER_NAME)))
    return model.eval(), cfg


@torch.no_grad()
def predict_probs(model: Detector, a: torch.Tensor, b: torch.Tensor, tile: int, stride: int | None = None
                  ) -> torch.Tensor:
    """Change probability (N, H, W) for images of any size, through the shared sliding
    window (`visionpeft.pipelines.dense.sliding_window`): windows of ``tile`` with
    ``stride`` (default tile / 2), overlapping windows averaged; smaller images are padded
    (reflect) to one window and cropped back."""
    if a.shape != b.shape:
        raise ValueError(f"the two dates differ in size: {tuple(a.shape[-2:])} and {tuple(b.shape[-2:])}")

    def change_prob(wa, wb):
        # only the change channel is averaged: it is all that is thresholded
        return SiameseChangeDetector.predict(model(wa, wb))[:, 1:2]

    # stride 0 has always meant the default
    return sliding_window(change_prob, [a, b], tile, stride or None, num_channels=1)[:, 0]


def evaluate(model: Detector, dataset, tile: int, batch_size: int = 4) -> dict:
    cm = ConfusionMatrix(2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    device = next(model.parameters()).device
    for batch in loader:
        probs = predict_probs(model, batch["a"].to(device), batch["b"].to(device), tile)
        cm.update((probs > 0.5).long().cpu(), batch["label"])
    return cm.compute()


class ChangeDetectionTask(Task):
    def __init__(self, cfg: ChangeDetectionConfig):
        self.cfg = cfg
        self.adapter_name = cfg.adapter_name
        check_backbone(cfg.backbone)  # a wrong name or missing weights fail before the data is read
        # adapter: null trains the decoder on a frozen encoder (the lower reference)
        self.adapter_config = None if cfg.adapter is None else adapter_config(cfg.adapter, "adapter")
        self.best_iou = -1.0

    def setup(self, device, dtype):
        from visionpeft.data.change_detection import ChangeDetectionDataset, find_triples

        cfg = self.cfg
        try:
            self.train_set = ChangeDetectionDataset(find_triples(cfg.data_root, "train"), augment=cfg.augment,
                                                    crop_size=cfg.image_size)
            val = find_triples(cfg.data_root, cfg.val_split)
        except (ValueError, FileNotFoundError) as err:
            raise TrainingError(f"data_root {cfg.data_root}: {err}") from None
        self.val_set = ChangeDetectionDataset(val)
        host = build_backbone(cfg.backbone)
        if self.adapter_config is not None:
            vp.inject(host, self.adapter_config, name=self.adapter_name)
        else:
            host.requires_grad_(False)
        self.model = Detector(host, cfg.image_size, cfg.decoder_channels, cfg.exchange)
        self.model.net.decoder.requires_grad_(True)
        self.device = device

    def models(self):
        return {"model": self.model}

    def train_dataset(self):
        return self.train_set

    def loss(self, models, batch):
        logits = models["model"](batch["a"], batch["b"])
        return SiameseChangeDetector.loss(logits, batch["label"]), {}

    def _config(self) -> dict:
        c = self.cfg
        # the backbone spec as given: the frozen weights come back from the same source
        return {"backbone": c.backbone, "image_size": c.image_size, "decoder_channels": c.decoder_channels,
                "exchange": c.exchange, "adapter": c.adapter}

    def save_adapters(self, models, folder):
        save_detector(models["model"], folder, self._config(), self.adapter_name)

    def load_adapters(self, models, folder):
        model = models["model"]
        if self.adapter_config is not None:
            vp.load_adapter(model.host, folder / "encoder", name=self.adapter_name, hotswap=True)
        model.net.decoder.load_state_dict(load_file(str(folder / DECODER_NAME)))
        # resuming: validations up to the checkpoint stand, later ones are redone, and the
        # best IoU so far keeps best/ from being replaced by a worse model
        rows = validations_kept(folder)
        if rows is not None:
            self.best_iou = max((r["iou"] for r in rows), default=-1.0)

    def validate(self, models, step, output_dir):
        model = models["model"]
        was = model.training
        model.eval()
        metrics = evaluate(model, self.val_set, self.cfg.image_size, self.cfg.eval_batch_size)
        model.train(was)
        with open(output_dir / "val_metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if not isinstance(v, list)}}) + "\n")
        if metrics["iou"] > self.best_iou:  # keep the best by change IoU
            self.best_iou = metrics["iou"]
            vp.atomic_write_dir(output_dir / "best", lambda tmp: self.save_adapters(models, tmp))
        return metrics

    def finish(self, models, output_dir):
        if not (output_dir / "best").exists():
            shutil.copytree(output_dir / "adapter", output_dir / "best")
        return {"best_val_iou": self.best_iou if self.best_iou >= 0 else None}
