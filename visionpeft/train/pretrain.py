"""Pretraining the embedded encoder (task ``pretrain_embedded``): masked autoencoding
(He et al., *Masked Autoencoders Are Scalable Vision Learners*, CVPR 2022) on the
procedural scenes of `visionpeft.data.scenes`, plus a scene-type head on the class token.

The encoder sees a random 25% of the patches (plus its class token); a light decoder
fills in mask tokens and predicts every patch's pixels, normalised per patch; the loss
is the mean squared error on the hidden patches. The class token is also trained to
tell the six pretraining scene types apart (cross-entropy, weight ``scene_weight``), so
that it carries image-level meaning; the four held-out types stay unseen.
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


class _Pool(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "scene": self.labels[i]}


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

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        return task_config(cls, values, "pretrain_embedded")


class PretrainTask(Task):
    """Trains every parameter (encoder, decoder, head); checkpoints hold them all."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def setup(self, device, dtype):
        import timm

        from ..backbones.embedded import ALIASES
        from ..data.scenes import PRETRAIN_SCENES, scene_set

        cfg = self.cfg
        encoder = timm.create_model(ALIASES.get(cfg.model, cfg.model), pretrained=False)
        self.model = MaskedAutoencoder(encoder, len(PRETRAIN_SCENES), cfg.decoder_dim,
                                       cfg.decoder_depth, cfg.mask_ratio)
        chunks, labels = [], []
        for start in range(0, cfg.pool_size, 1000):  # uint8 in memory: 12 kB per scene
            n = min(1000, cfg.pool_size - start)
            img, _, lab = scene_set(n, cfg.image_size, PRETRAIN_SCENES, seed=cfg.data_seed + start)
            chunks.append((img * 255).round().to(torch.uint8))
            labels.append(lab)
        self.pool = _Pool(torch.cat(chunks), torch.cat(labels))

    def models(self):
        return {"mae": self.model}

    def train_dataset(self):
        return self.pool

    def loss(self, models, batch):
        img = batch["image"].float() / 255
        k = int(torch.randint(0, 4, ()))  # one flip/rot90 per batch: scenes have no "up"
        img = torch.rot90(img, k, (2, 3))
        if torch.rand(()) < 0.5:
            img = img.flip(3)
        img = (img - MEAN.to(img.device)) / STD.to(img.device)
        recon, logits = models["mae"](img)
        ce = F.cross_entropy(logits, batch["scene"])
        acc = (logits.argmax(1) == batch["scene"]).float().mean()
        return recon + self.cfg.scene_weight * ce, {"recon": recon.item(), "scene_ce": ce.item(),
                                                   "scene_acc": acc.item()}

    def save_adapters(self, models, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in models["mae"].state_dict().items()}
        save_file(sd, str(folder / "mae.safetensors"))

    def load_adapters(self, models, folder: Path) -> None:
        models["mae"].load_state_dict(load_file(str(folder / "mae.safetensors")))


def encoder_state_dict(mae_file: str | Path) -> dict[str, torch.Tensor]:
    """The encoder's own timm keys from a saved MaskedAutoencoder (decoder and head dropped)."""
    sd = load_file(str(mae_file))
    return {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
