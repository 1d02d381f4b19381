"""The scene-type judge: which of the ten procedural scene types (`visionpeft.data.scenes.
SCENE_TYPES`) an image shows, for scoring generated images with a model that no adapter
was trained against.

It is a linear classifier (multinomial logistic regression) on the frozen features of the
shipped ``embedded-vit-s`` (its CLS token, 192 wide, standardised with the training
features' mean and std), fitted on real generator images of all ten types by
``scripts/train_scene_judge.py`` and shipped as ``weights/embedded_scene_judge.safetensors``
(the classifier and the standardisation; the encoder is the packaged ViT)::

    from visionpeft.backbones.scene_judge import load_scene_judge
    judge = load_scene_judge()
    types = judge.classify(images)          # images (B, 3, H, W) in [0, 1] -> (B,) indices
    names = [judge.classes[i] for i in types]
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

JUDGE_FILE = Path(__file__).resolve().parent / "weights" / "embedded_scene_judge.safetensors"
REGENERATE = "python scripts/train_scene_judge.py"
ENCODER = "embedded-vit-s"
SIZE = 64  # the encoder's and the scenes' size: other sizes are resized to it


def load_encoder() -> nn.Module:
    """The packaged embedded-vit-s without a head (pooled CLS features), in eval mode."""
    from .loaders import load_backbone

    return load_backbone("timm", ENCODER).eval()


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(N, 192) float32 features of images (N, 3, H, W) in [0, 1] (resized to 64 px with
    antialiasing when they are not, then ImageNet-normalised as the encoder was trained)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the judge takes images (N, 3, H, W), got shape {tuple(images.shape)}")
    if not torch.is_floating_point(images) or not torch.isfinite(images).all() or images.min() < 0 or \
            images.max() > 1:
        raise ValueError("the judge takes float images with values in [0, 1] (divide uint8 images by 255)")
    device = next(encoder.parameters()).device
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device, torch.float32)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        out.append(encoder((x - mean) / std).float().cpu())
    return torch.cat(out)


class SceneJudge(nn.Module):
    """The encoder, the standardisation and the linear classifier; ``classes`` names the
    logits' columns."""

    def __init__(self, encoder: nn.Module, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, classes: list[str], info: dict | None = None):
        super().__init__()
        if weight.shape != (len(classes), mean.numel()) or bias.shape != (len(classes),) or std.shape != mean.shape:
            raise ValueError(f"judge tensors do not fit {len(classes)} classes: weight {tuple(weight.shape)}, "
                             f"bias {tuple(bias.shape)}, mean {tuple(mean.shape)}, std {tuple(std.shape)}")
        self.encoder = encoder.eval().requires_grad_(False)
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())
        self.classes = list(classes)
        self.info = dict(info or {})

    def logits_of_features(self, features: torch.Tensor) -> torch.Tensor:
        return ((features - self.mean) / self.std) @ self.weight.t() + self.bias

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of images (B, 3, H, W) in [0, 1]."""
        return self.logits_of_features(encoder_features(self.encoder, images).to(self.weight.device))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) indices into ``classes``."""
        return self(images).argmax(-1)


def judge_state(weight, bias, mean, std) -> dict[str, torch.Tensor]:
    return {"weight": weight.float().contiguous(), "bias": bias.float().contiguous(),
            "mean": mean.float().contiguous(), "std": std.float().contiguous()}


def load_scene_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> SceneJudge:
    """The judge from ``path`` (default: the packaged file); a one-line error naming the
    command that makes it when the file is missing, or the file is not a judge."""
    from safetensors import safe_open

    path = Path(path) if path is not None else JUDGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the scene judge {path} is missing; make it with `{REGENERATE}` "
                                f"(see docs/EMBEDDED.md)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "visionpeft-scene-judge" or set(f.keys()) != {"weight", "bias", "mean", "std"}:
            raise ValueError(f"{path} is not a scene judge file (made by `{REGENERATE}`)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    classes = json.loads(meta["classes"])
    info = {k: v for k, v in meta.items() if k not in ("format", "classes")}
    return SceneJudge(load_encoder(), classes=classes, info=info, **tensors).to(device)


__all__ = ["SceneJudge", "load_scene_judge", "encoder_features", "load_encoder", "JUDGE_FILE", "REGENERATE"]
