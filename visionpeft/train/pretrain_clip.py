"""Contrastive pretraining of the embedded CLIP (task ``pretrain_clip``) from scratch, on
captioned procedural scenes of the six pretraining types (`visionpeft.data.captions`).

The model is the open_clip ``embedded-clip`` architecture (visionpeft/backbones/weights/
embedded-clip.json), randomly initialised by open_clip under the loop's seed. The loss is
CLIP's symmetric InfoNCE (Radford et al., *Learning Transferable Visual Models From
Natural Language Supervision*, ICML 2021) as open_clip computes it (`open_clip.loss.ClipLoss`):
cross-entropy over the image-to-text and text-to-image similarities of a batch, scaled
by the learnable ``logit_scale``, which is clamped to at most ln(100) before each step as
open_clip's training does. Images are augmented by one of the 4 rotations and a horizontal
flip, drawn per image (the captions say nothing a rotation or flip would falsify), and
normalised with open_clip's OPENAI_DATASET_MEAN/STD, as ``create_model_and_transforms``'
preprocess does. The pool (images, captions, tokens) is generated once from
``data_seed``; initialisation and data order come from the loop's seed.

The four held-out scene types are never seen: neither their images nor their names.

Registered as task ``pretrain_clip`` when this module is imported
(``scripts/pretrain_embedded_clip.py`` imports it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from .task import Task, register_task, task_config

MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp of the learned temperature
ZERO_SHOT_PROMPT = "a satellite photo of {}."


def clip_mean_std(device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's OPENAI_DATASET_MEAN/STD as (1, 3, 1, 1) tensors."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return (torch.tensor(OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) images, or floats in [0, 1], -> the model's input."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    mean, std = clip_mean_std(x.device)
    return (x - mean) / std


def rotate_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image turned by its own multiple of 90 degrees, then mirrored with probability 1/2."""
    k = torch.randint(0, 4, (len(images),), generator=generator)
    flip = torch.rand(len(images), generator=generator) < 0.5
    out = images.clone()
    for turns in range(1, 4):
        chosen = (k == turns).nonzero().flatten().to(images.device)
        if len(chosen):
            out[chosen] = torch.rot90(images[chosen], turns, (2, 3))
    chosen = flip.nonzero().flatten().to(images.device)
    if len(chosen):
        out[chosen] = out[chosen].flip(3)
    return out


class _CaptionPool(Dataset):
    def __init__(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor, captions: list[str]):
        self.images, self.tokens, self.labels, self.captions = images, tokens, labels, captions

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "text": self.tokens[i], "scene": self.labels[i]}


@dataclass
class ClipPretrainConfig:
    model: str = "embedded-clip"  # an open_clip config name (the embedded one is registered on import)
    pool_size: int = 20000
    image_size: int = 64
    data_seed: int = 1234
    chunk: int = 1000  # scenes generated per seed: chunk i uses data_seed + i * chunk

    def __post_init__(self):
        for name in ("pool_size", "image_size", "chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"pretrain_clip: {name} must be a positive integer, got {v!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "ClipPretrainConfig":
        return task_config(cls, values, "pretrain_clip")


def build_pool(cfg: ClipPretrainConfig, tokenizer) -> _CaptionPool:
    """The captioned scenes of the six pretraining types, tokenised once."""
    from ..data.captions import caption_set
    from ..data.scenes import PRETRAIN_SCENES

    images, captions, labels = [], [], []
    for start in range(0, cfg.pool_size, cfg.chunk):
        img, cap, lab = caption_set(min(cfg.chunk, cfg.pool_size - start), cfg.image_size, PRETRAIN_SCENES,
                                    seed=cfg.data_seed + start)
        images.append(img)
        captions += cap
        labels.append(lab)
    tokens = torch.cat([tokenizer(captions[i:i + 4096]) for i in range(0, len(captions), 4096)])
    return _CaptionPool(torch.cat(images), tokens, torch.cat(labels), captions)


class ClipPretrainTask(Task):
    """Trains every parameter of the open_clip model; checkpoints hold its full state_dict
    (``clip.safetensors``, open_clip's own keys)."""

    name = "clip"

    def __init__(self, cfg: ClipPretrainConfig):
        self.cfg = cfg

    def setup(self, device, dtype):
        import open_clip
        from open_clip.loss import ClipLoss

        from ..backbones import embedded_clip

        embedded_clip.register()
        self.model = open_clip.create_model(self.cfg.model, pretrained=None)  # random init, the loop's seed
        self.model.train()
        self.tokenizer = open_clip.get_tokenizer(self.cfg.model)
        self.loss_fn = ClipLoss()
        self.pool = build_pool(self.cfg, self.tokenizer)

    def models(self):
        return {self.name: self.model}

    def train_dataset(self):
        return self.pool

    def loss(self, models, batch):
        model = models[self.name]
        inner = getattr(model, "module", model)
        with torch.no_grad():  # open_clip clamps after each optimizer step; before the next is the same
            inner.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        images = normalise(rotate_flip(batch["image"]))
        image_features, text_features, scale = model(images, batch["text"])[:3]
        loss = self.loss_fn(image_features, text_features, scale)
        with torch.no_grad():
            sim = image_features @ text_features.T
            # a match counts when the picked caption is the image's own text (duplicates allowed)
            same = (batch["text"][sim.argmax(1)] == batch["text"]).all(1)
        return loss, {"logit_scale": scale.detach().item(), "i2t_acc": same.float().mean().item()}

    def save_adapters(self, models, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state_dict_of(models[self.name]), str(folder / f"{self.name}.safetensors"))

    def load_adapters(self, models, folder: Path) -> None:
        models[self.name].load_state_dict(load_file(str(folder / f"{self.name}.safetensors")))


def state_dict_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state_dict as safetensors takes it: detached, contiguous, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, scenes, n: int = 600, seed: int = 99, size: int = 64,
                       prompt: str = ZERO_SHOT_PROMPT, batch: int = 256) -> dict:
    """Zero-shot classification of ``n`` fresh scenes of types ``scenes`` (drawn from
    ``seed``) among those type names, each written into ``prompt``: overall accuracy,
    per-type accuracy, and chance (1 / number of types)."""
    from ..data.scenes import scene_set

    was_training = model.training
    model.eval()
    try:
        text = model.encode_text(tokenizer([prompt.format(s) for s in scenes]), normalize=True)
        images, _, labels = scene_set(n, size, tuple(scenes), seed=seed)
        images = (images * 255).round().to(torch.uint8)  # what the pool and PIL inputs hold
        preds = torch.cat([(model.encode_image(normalise(images[i:i + batch]), normalize=True) @ text.T).argmax(1)
                           for i in range(0, n, batch)])
    finally:
        model.train(was_training)
    right = preds == labels
    per = {s: round(right[labels == k].float().mean().item(), 4) for k, s in enumerate(scenes) if (labels == k).any()}
    return {"accuracy": round(right.float().mean().item(), 4), "chance": round(1 / len(scenes), 4),
            "n": n, "seed": seed, "per_type": per}


def _pretrain_clip_task(values: dict) -> Task:
    return ClipPretrainTask(ClipPretrainConfig.from_dict(values))


register_task("pretrain_clip", _pretrain_clip_task)
