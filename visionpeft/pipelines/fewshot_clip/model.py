"""CLIP as a classifier over class-name prompts, the way CLIP-LoRA trains and evaluates it:
logits = 100 x cosine(image feature, text feature of "a photo of a {class}."), with the
text features recomputed at every call (the text tower carries adapters too), a fixed
scale of 100 rather than CLIP's learned one, and CLIP's own mean/std and sizes."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE = 100.0  # CLIP-LoRA's fixed scale (main.py: logit_scale = 100)
EMBEDDED = "embedded-clip"


def prompts(template: str, classnames: list[str]) -> list[str]:
    """One prompt per class; underscores in class names read as spaces (as CLIP-LoRA)."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no {{}} for the class name, e.g. 'a photo of a {{}}.'")
    return [template.format(c.replace("_", " ")) for c in classnames]


def build_clip(spec: dict) -> tuple[nn.Module, object]:
    """(open_clip model, its tokenizer) from ``{source: open_clip, name, pretrained}``.

    ``pretrained``: a tag of open_clip's (``openai``, ``laion2b_s34b_b88k``), a weights
    file (safetensors, or a pickle read with ``weights_only=True``), ``true`` for the
    packaged weights of ``embedded-clip``, ``false`` for a random init drawn from
    ``init_seed`` (0) alone, so that a checkpoint (which holds only the adapter) rebuilds
    the very same frozen model. ``name`` may also be a local open_clip folder
    (``open_clip_config.json`` + weights), which carries its own weights."""
    import open_clip

    from visionpeft.backbones import load_backbone

    spec = dict(spec)
    source = spec.pop("source", "open_clip")
    if source != "open_clip":
        raise ValueError(f"fewshot_clip: backbone.source must be open_clip, got {source!r}")
    name = spec.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("fewshot_clip: backbone needs a name, e.g. {source: open_clip, name: ViT-B-16, "
                         "pretrained: openai} or {name: embedded-clip}")
    pretrained = spec.pop("pretrained", True)
    seed = spec.pop("init_seed", 0)
    if spec:
        raise ValueError(f"fewshot_clip: unknown backbone key(s) {sorted(spec)}; known: source, name, "
                         f"pretrained, init_seed")
    local = os.path.isdir(os.path.expanduser(name))
    kwargs: dict = {}
    if pretrained is False or local or (pretrained is True and name == EMBEDDED):
        kwargs["pretrained"] = pretrained is not False or local
    elif isinstance(pretrained, str) and (os.sep in pretrained or Path(pretrained).suffix):
        kwargs["checkpoint_path"] = os.path.expanduser(pretrained)
    elif isinstance(pretrained, str):
        kwargs["tag"] = pretrained
        # OpenAI's weights were trained with QuickGELU, which open_clip's plain ViT-B-16
        # config lacks (it only warns): build the activation the weights expect
        if (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
    else:
        raise ValueError(f"fewshot_clip: backbone.pretrained for {name!r} must be an open_clip tag (e.g. openai), "
                         f"a weights file or false, got {pretrained!r}")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = load_backbone("open_clip", name, **kwargs)
    except pickle.UnpicklingError:  # open_clip reads pickles with torch.load(weights_only=True)
        raise ValueError(f"fewshot_clip: cannot load open_clip {name!r} weights {pretrained!r}: the pickle holds "
                         f"more than tensors (it could run code), so torch.load(weights_only=True) refused it; "
                         f"use a safetensors file") from None
    except RuntimeError as err:  # a file of other shapes or keys
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"fewshot_clip: cannot load open_clip {name!r} weights {pretrained!r}: {first}") from None
    tokenizer = open_clip.get_tokenizer(("local-dir:" + os.path.expanduser(name)) if local else name)
    return model, tokenizer


def image_settings(clip: nn.Module) -> tuple[int, tuple, tuple]:
    """(input size, mean, std) the model was built for (open_clip's preprocess config)."""
    size = getattr(clip.visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # open_clip's own default

    cfg = getattr(clip.visual, "preprocess_cfg", None) or {}
    return size, tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))


def train_transform(size: int, mean, std):
    """CLIP-LoRA's: RandomResizedCrop(scale 0.08-1, bicubic), horizontal flip, CLIP mean/std."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(size: int, mean, std):
    """CLIP's own test preprocessing: shorter side to ``size`` (bicubic), centre crop."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])


class CLIPClassifier(nn.Module):
    """An open_clip model (adapters or not) + class-name prompts -> class logits."""

    def __init__(self, clip: nn.Module, tokenizer, classnames: list[str], template: str,
                 logit_scale: float = LOGIT_SCALE):
        super().__init__()
        self.clip, self.tokenizer, self.logit_scale = clip, tokenizer, float(logit_scale)
        self.template = template
        self.set_classes(classnames)

    def set_classes(self, classnames: list[str]) -> None:
        self.classnames = list(classnames)
        tokens = self.tokenizer(prompts(self.template, self.classnames))
        device = next(self.clip.parameters()).device
        self.register_buffer("tokens", tokens.to(device), persistent=False)

    def text_features(self) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(self.tokens), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def forward(self, images: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, classes); ``text_features`` reused when given (evaluation computes
        them once; training recomputes them at every step, as the text tower learns)."""
        text = self.text_features() if text_features is None else text_features
        return self.logit_scale * self.image_features(images) @ text.t()
