"""Pretraining the embedded encoder (task ``pretrain_embedded``) on the procedural scenes
of `visionpeft.data.scenes`, in two stages (``objective``):

``mae``: masked autoencoding (He et al., *Masked Autoencoders Are Scalable Vision
Learners*, CVPR 2022). The encoder sees a random 25% of the patches (plus its class
token); a light decoder fills in mask tokens and predicts every patch's pixels, normalised
per patch; the loss is the mean squared error on the hidden patches.

``dense``: starting from the MAE encoder (``init_weights``), every patch token of the
blocks in ``dense_blocks`` predicts the land-cover class of each of its pixels (a linear
head to patch x patch x classes logits, cross-entropy). MAE's last layer serves its
decoder, so its tokens alone segment worse than a random encoder's; this stage gives
the intermediate and last tokens the local meaning dense heads read.

In both, the class token also learns the six pretraining scene types (cross-entropy,
weight ``scene_weight``), so that it carries image-level meaning; the four held-out
types are never seen in either stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.data import Dataset

from .task import Task, task_config

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder with an MAE decoder and a scene-type head."""

    def __init__(self, encoder: nn.Module, n_scenes: int, decoder_dim: int = 128,
                 decoder_depth: int = 2, mask_ratio: float = 0.75):
        super().__init__()
        self.encoder, self.mask_ratio = encoder, mask_ratio
        dim, (gh, gw) = encoder.embed_dim, encoder.patch_embed.grid_size
        self.patch = encoder.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, gh * gw + 1, decoder_dim))
        self.decoder = nn.Sequential(*[Block(decoder_dim, 4) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch ** 2 * 3)
        self.scene_head = nn.Linear(dim, n_scenes)
        trunc_normal_(self.decoder_pos, std=0.02)
        trunc_normal_(self.mask_token, std=0.02)

    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b, c, h, w = img.shape
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (per-patch reconstruction loss on hidden patches, scene logits)."""
        enc = self.encoder
        x = enc.norm_pre(enc._pos_embed(enc.patch_embed(img)))  # (B, 1 + N, C)
        cls, tokens = x[:, :1], x[:, 1:]
        b, n, c = tokens.shape
        keep = max(1, int(round(n * (1 - self.mask_ratio))))
        order = torch.rand(b, n, device=img.device).argsort(1)
        visible = order[:, :keep]
        x = torch.cat([cls, tokens.gather(1, visible[..., None].expand(-1, -1, c))], 1)
        x = enc.norm(enc.blocks(x))
        logits = self.scene_head(x[:, 0])
        y = self.decoder_embed(x)
        full = self.mask_token.expand(b, n, -1).clone()
        full.scatter_(1, visible[..., None].expand(-1, -1, y.shape[-1]), y[:, 1:])
        y = torch.cat([y[:, :1], full], 1) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(y)))[:, 1:]
        target = self.patchify(img)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        hidden = torch.ones(b, n, device=img.device)
        hidden.scatter_(1, visible, 0.0)
        loss = (((pred - target) ** 2).mean(-1) * hidden).sum() / hidden.sum()
        return loss, logits


class DenseLandCover(nn.Module):
    """A timm ViT encoder with a per-pixel land-cover head on chosen blocks and a
    scene-type head on the class token."""

    def __init__(self, encoder: nn.Module, n_scenes: int, n_classes: int, blocks: tuple[int, ...]):
        super().__init__()
        depth = len(encoder.blocks)
        bad = [b for b in blocks if not -depth <= b < depth]
        if not blocks or bad:
            raise ValueError(f"dense_blocks {list(blocks)} must be non-empty block indices of a depth-{depth} encoder")
        self.encoder, self.n_classes = encoder, n_classes
        self.blocks = sorted({b % depth for b in blocks})
        self.patch = encoder.patch_embed.patch_size[0]
        dim = encoder.embed_dim
        # every block is read through the encoder's final norm: what timm's
        # forward_intermediates(norm=True) hands the dense pipelines
        self.heads = nn.ModuleList(nn.Linear(dim, self.patch ** 2 * n_classes) for _ in self.blocks)
        self.scene_head = nn.Linear(dim, n_scenes)

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (per-pixel class logits (B, K, H, W) for each dense block, scene logits)."""
        enc = self.encoder
        x = enc.norm_pre(enc._pos_embed(enc.patch_embed(img)))
        b, _, h, w = img.shape
        gh, gw, p, k = h // self.patch, w // self.patch, self.patch, self.n_classes
        outs = []
        for i, block in enumerate(enc.blocks):
            x = block(x)
            if i in self.blocks:
                j = self.blocks.index(i)
                tokens = enc.norm(x[:, enc.num_prefix_tokens:])
                logits = self.heads[j](tokens).reshape(b, gh, gw, p, p, k)
                outs.append(logits.permute(0, 5, 1, 3, 2, 4).reshape(b, k, h, w))
        return outs, self.scene_head(enc.norm(x[:, 0]))


class _Pool(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "scene": self.labels[i], "classes": self.classes[i]}


@dataclass
class PretrainConfig:
    model: str = "embedded-vit-s"
    pool_size: int = 20000
    image_size: int = 64
    data_seed: int = 1234
    mask_ratio: float = 0.75
    scene_weight: float = 0.3
    decoder_dim: int = 128
    decoder_depth: int = 2
    objective: str = "mae"  # "mae" | "dense" (see the module docstring)
    init_weights: str | None = None  # an encoder safetensors file to start from (dense: the MAE stage's)
    dense_blocks: tuple[int, ...] = (2, 5)  # blocks whose tokens predict land cover (dense)

    def __post_init__(self):
        if self.objective not in ("mae", "dense"):
            raise ValueError(f"objective must be 'mae' or 'dense', got {self.objective!r}")
        blocks = self.dense_blocks
        if not isinstance(blocks, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                            for b in blocks):
            raise ValueError(f"dense_blocks must be a list of block indices (e.g. [2, 5]), got {blocks!r}")
        self.dense_blocks = tuple(blocks)
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            raise ValueError(f"init_weights {self.init_weights} is not a file; give the encoder safetensors "
                             "the stage starts from")

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        return task_config(cls, values, "pretrain_embedded")


class PretrainTask(Task):
    """Trains every parameter (encoder and the objective's heads); checkpoints hold them all."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def setup(self, device, dtype):
        import timm

        from ..backbones.embedded import ALIASES
        from ..data.scenes import CLASSES, PRETRAIN_SCENES, scene_set

        cfg = self.cfg
        encoder = timm.create_model(ALIASES.get(cfg.model, cfg.model), pretrained=False)
        if cfg.init_weights:
            encoder.load_state_dict(load_file(str(cfg.init_weights)))  # strict: a wrong file fails here
        elif cfg.objective == "dense":
            raise ValueError("objective 'dense' starts from the MAE stage's encoder: set init_weights "
                             "(scripts/pretrain_embedded.py runs both stages)")
        if cfg.objective == "mae":
            self.model = MaskedAutoencoder(encoder, len(PRETRAIN_SCENES), cfg.decoder_dim,
                                           cfg.decoder_depth, cfg.mask_ratio)
        else:
            self.model = DenseLandCover(encoder, len(PRETRAIN_SCENES), len(CLASSES), cfg.dense_blocks)
        chunks, labels, classes = [], [], []
        for start in range(0, cfg.pool_size, 1000):  # uint8 in memory: 16 kB per scene
            n = min(1000, cfg.pool_size - start)
            img, cls, lab = scene_set(n, cfg.image_size, PRETRAIN_SCENES, seed=cfg.data_seed + start)
            chunks.append((img * 255).round().to(torch.uint8))
            labels.append(lab)
            classes.append(cls.to(torch.uint8))
        self.pool = _Pool(torch.cat(chunks), torch.cat(labels), torch.cat(classes))

    def models(self):
        return {self.cfg.objective: self.model}

    def train_dataset(self):
        return self.pool

    def loss(self, models, batch):
        img = batch["image"].float() / 255
        classes = batch["classes"].long()
        k = int(torch.randint(0, 4, ()))  # one flip/rot90 per batch: scenes have no "up"
        img, classes = torch.rot90(img, k, (2, 3)), torch.rot90(classes, k, (1, 2))
        if torch.rand(()) < 0.5:
            img, classes = img.flip(3), classes.flip(2)
        img = (img - MEAN.to(img.device)) / STD.to(img.device)
        model = models[self.cfg.objective]
        if self.cfg.objective == "mae":
            main, logits = model(img)
            logs = {"recon": main.item()}
        else:
            dense, logits = model(img)
            per_block = [F.cross_entropy(d, classes) for d in dense]
            main = sum(per_block) / len(per_block)
            logs = {f"dense_ce_{b}": c.item() for b, c in zip(model.blocks, per_block)}
            logs["pixel_acc"] = (dense[-1].argmax(1) == classes).float().mean().item()
        ce = F.cross_entropy(logits, batch["scene"])
        acc = (logits.argmax(1) == batch["scene"]).float().mean()
        return main + self.cfg.scene_weight * ce, {**logs, "scene_ce": ce.item(), "scene_acc": acc.item()}

    def save_adapters(self, models, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = self.cfg.objective
        sd = {k: v.detach().contiguous().cpu() for k, v in models[name].state_dict().items()}
        save_file(sd, str(folder / f"{name}.safetensors"))

    def load_adapters(self, models, folder: Path) -> None:
        name = self.cfg.objective
        models[name].load_state_dict(load_file(str(folder / f"{name}.safetensors")))


def encoder_state_dict(model_file: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's own timm keys from a saved pretraining model (decoder and heads dropped)."""
    sd = load_file(str(model_file))
    return {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
