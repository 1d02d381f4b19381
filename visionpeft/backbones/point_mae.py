"""Point-MAE's point transformer (Pang et al., "Masked Autoencoders for Point Cloud
Self-supervised Learning", ECCV 2022) as a classifier, in pure torch, loading the official
checkpoints.

    points (B, N, 3) -> FPS centres (G) -> the k = M nearest points of each, centred
    -> mini-PointNet tokens (B, G, 384) -> + cls token; a positional MLP of the centres is
    added before EVERY block -> 12 pre-norm blocks (384 wide, 6 heads, MLP 4x GELU, qkv
    without bias, drop path 0 to 0.1) -> LayerNorm -> head on [cls, max over tokens]
    (768-256-256-classes, BN, ReLU, dropout 0.5)

About 22.1M parameters with 15 classes. The official code groups with compiled CUDA
extensions (pointnet2_ops, KNN_CUDA); here grouping is `visionpeft.ops.points`, so the
model runs on CPU and GPU from a pip install. Module names follow timm's ViT (``blocks.<i>``,
``attn.qkv``, ``mlp.fc1``, ``head``), so the usual targeting works; the official names map
on load (``blocks.blocks.<i>`` -> ``blocks.<i>``, ``cls_head_finetune`` -> ``head``).

For adapters that need the geometry (Point-PEFT), every block is called as
``block(x + pos, centres=centres, points=points)``: the token centres (B, G, 3) and the
input cloud (B, N, 3) ride along as keywords, which the block itself ignores.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..ops.points import group_points

WIDTH = 384
DEPTH = 12
HEADS = 6
DROP_PATH = 0.1
# the pretraining model's parts a classifier has no use for (Point_MAE's decoder side)
_DECODER_KEYS = ("mask_token", "decoder_pos_embed.", "MAE_decoder.", "increase_dim.")


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath): drop the branch for a random subset
    of the batch in training and scale the rest by 1 / keep."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEncoder(nn.Module):
    """Point-MAE's mini-PointNet: (B, G, M, 3) neighbourhoods -> (B, G, dim) tokens.
    Conv1d 3-128, BN, ReLU, Conv1d 128-256; max over the M points, concatenated (first)
    with each point's feature -> 512; Conv1d 512-512, BN, ReLU, Conv1d 512-dim; max."""

    def __init__(self, dim: int = WIDTH):
        super().__init__()
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, dim, 1))
        self.dim = dim

    def forward(self, neighbourhoods: torch.Tensor) -> torch.Tensor:
        b, g, m, _ = neighbourhoods.shape
        x = self.first_conv(neighbourhoods.reshape(b * g, m, 3).transpose(1, 2))  # (BG, 256, M)
        pooled = x.max(dim=2, keepdim=True).values
        x = torch.cat([pooled.expand(-1, -1, m), x], dim=1)  # (BG, 512, M)
        x = self.second_conv(x).max(dim=2).values
        return x.reshape(b, g, self.dim)


class Attention(nn.Module):
    def __init__(self, dim: int = WIDTH, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int = WIDTH, hidden: int = 4 * WIDTH):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(LN x)), then x + DropPath(mlp(LN x))."""

    def __init__(self, dim: int = WIDTH, heads: int = HEADS, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, centres=None, points=None):  # centres, points: for geometry-aware adapters
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _head(num_classes: int, dim: int = WIDTH) -> nn.Sequential:
    return nn.Sequential(nn.Linear(2 * dim, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                         nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                         nn.Linear(256, num_classes))


class PointMAE(nn.Module):
    """The Point-MAE classifier (``PointTransformer`` of the official code). ``forward(points)``
    takes (B, N, 3) and returns (B, num_classes) logits; ``forward_features`` the (B, 1 + G, dim)
    tokens after the final LayerNorm, ``pooled`` of those the (B, 2 dim) [cls, max] feature."""

    def __init__(self, num_classes: int, num_points: int = 1024, num_group: int = 64, group_size: int = 32,
                 dim: int = WIDTH, depth: int = DEPTH, heads: int = HEADS, drop_path: float = DROP_PATH):
        super().__init__()
        if num_group > num_points or group_size > num_points:
            raise ValueError(f"num_group={num_group} and group_size={group_size} must not exceed "
                             f"num_points={num_points}")
        self.num_classes, self.num_points = num_classes, num_points
        self.num_group, self.group_size = num_group, group_size
        self.encoder = PatchEncoder(dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.head = _head(num_classes, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Point-MAE's init: Linear and Conv1d weights truncated normal (std 0.02, cut at
        +-2 absolute, so in effect untruncated), biases 0, LayerNorm 1 and 0, cls token and
        position truncated normal 0.02."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.cls_pos, std=0.02, a=-2.0, b=2.0)

    def tokens(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patch tokens (B, G, dim), their position embedding (B, G, dim), centres (B, G, 3))."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"Point-MAE takes points of shape (batch, points, 3), got {tuple(points.shape)}")
        neighbourhoods, centres = group_points(points, self.num_group, self.group_size)
        return self.encoder(neighbourhoods), self.pos_embed(centres), centres

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        tokens, pos, centres = self.tokens(points)
        b = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), pos], dim=1)
        for block in self.blocks:
            x = block(x + pos, centres=centres, points=points)  # the position goes in before every block
        return self.norm(x)

    @staticmethod
    def pooled(features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features[:, 0], features[:, 1:].max(dim=1).values], dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(self.forward_features(points)))


class _Stack(nn.Module):
    """Point-MAE's TransformerEncoder: ``blocks`` of pre-norm blocks, the position added
    before each (the container's name gives the official keys ``blocks.blocks.<i>``)."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in torch.linspace(0, drop_path, depth).tolist())

    def forward(self, x, pos):
        for block in self.blocks:
            x = block(x + pos)
        return x


class _MaskEncoder(nn.Module):
    """Point-MAE's MaskTransformer: tokens of the visible patches (no cls token)."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path: float):
        super().__init__()
        self.encoder = PatchEncoder(dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = _Stack(dim, depth, heads, drop_path)
        self.norm = nn.LayerNorm(dim)


class _Decoder(nn.Module):
    """Point-MAE's TransformerDecoder (keys ``MAE_decoder.blocks.<i>``, ``MAE_decoder.norm``)."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, r) for r in torch.linspace(0, drop_path, depth).tolist())
        self.norm = nn.LayerNorm(dim)


class PointMAEPretrain(nn.Module):
    """Point-MAE's masked point modelling (its ``Point_MAE`` model), with the official
    state-dict names, so that its ``state_dict()`` saved as ``{"base_model": ...}`` (or as
    safetensors) is a checkpoint `build_point_mae` loads like the released pretrain.pth.

    ``forward(points)`` -> the loss: a random ``mask_ratio`` of the G patches per cloud is
    hidden; the encoder sees the visible ones (positions re-added before every block); the
    decoder (4 blocks) gets them and a mask token per hidden patch, each with a decoder
    position embedding, and its normed hidden-patch tokens go through a Conv1d to M x 3
    points; the loss is the L2 Chamfer distance to the true (centred) hidden patches."""

    def __init__(self, num_group: int = 64, group_size: int = 32, dim: int = WIDTH, depth: int = DEPTH,
                 heads: int = HEADS, decoder_depth: int = 4, mask_ratio: float = 0.6, drop_path: float = DROP_PATH):
        super().__init__()
        if not 0 < mask_ratio < 1 or int(mask_ratio * num_group) < 1:
            raise ValueError(f"mask_ratio {mask_ratio} must hide between 1 and {num_group - 1} of {num_group} patches")
        self.num_group, self.group_size, self.mask_ratio = num_group, group_size, mask_ratio
        self.MAE_encoder = _MaskEncoder(dim, depth, heads, drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.MAE_decoder = _Decoder(dim, decoder_depth, heads, drop_path)
        self.increase_dim = nn.Sequential(nn.Conv1d(dim, 3 * group_size, 1))
        for m in self.MAE_encoder.modules():  # Point-MAE: truncated normal 0.02 in the encoder ...
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.MAE_decoder.modules():  # ... Xavier-uniform in the decoder
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        from ..ops.points import chamfer_distance

        neighbourhoods, centres = group_points(points, self.num_group, self.group_size)
        b, g = centres.shape[:2]
        n_mask = int(self.mask_ratio * g)
        order = torch.rand(b, g, device=points.device).argsort(dim=1)  # a random set of patches per cloud
        hidden, visible = order[:, :n_mask], order[:, n_mask:]

        def take(t, idx):
            return t.gather(1, idx.reshape(b, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))

        enc = self.MAE_encoder
        tokens = enc.encoder(take(neighbourhoods, visible))
        x = enc.norm(enc.blocks(tokens, enc.pos_embed(take(centres, visible))))
        pos = self.decoder_pos_embed(torch.cat([take(centres, visible), take(centres, hidden)], dim=1))
        x = torch.cat([x, self.mask_token.expand(b, n_mask, -1)], dim=1)
        for block in self.MAE_decoder.blocks:
            x = block(x + pos)
        x = self.MAE_decoder.norm(x[:, -n_mask:])
        pred = self.increase_dim(x.transpose(1, 2)).transpose(1, 2).reshape(b * n_mask, self.group_size, 3)
        return chamfer_distance(pred, take(neighbourhoods, hidden).reshape(b * n_mask, self.group_size, 3))


def official_state_dict(state: dict) -> dict:
    """An official Point-MAE state dict (a pretraining ``base_model``, or a fine-tuned
    classifier's) renamed to this module's names, the decoder's keys dropped: ``module.``
    (DataParallel) and ``MAE_encoder.`` / ``base_model.`` prefixes removed,
    ``blocks.blocks.<i>`` -> ``blocks.<i>``, ``cls_head_finetune`` -> ``head``."""
    out = {}
    for key, value in state.items():
        key = key.replace("module.", "")
        for prefix in ("MAE_encoder.", "base_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(_DECODER_KEYS):
            continue
        key = key.replace("blocks.blocks.", "blocks.", 1).replace("cls_head_finetune.", "head.", 1)
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The tensors of a Point-MAE checkpoint: an official ``.pth`` (a dict whose
    ``base_model`` holds the weights), read with ``torch.load(weights_only=True)`` so a
    pickle carrying code is refused, or a ``.safetensors`` file of the same keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Point-MAE checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import pickle

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"cannot load {path}: the pickle holds more than tensors (it could run code), so "
                         f"torch.load(weights_only=True) refused it; use the official checkpoint or a "
                         f"safetensors file") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("base_model"), dict):
        return ckpt["base_model"]
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise ValueError(f"{path} is not a Point-MAE checkpoint: expected a dict with 'base_model' (the official "
                     f"layout) or a flat dict of tensors")


def load_checkpoint(model: PointMAE, path: str | os.PathLike) -> list[str]:
    """Load the encoder (and, from a fine-tuned checkpoint, the cls token and head) from
    ``path``; returns the model's keys the file did not hold (cls token, cls pos and the
    head for a pretraining checkpoint; the head of one with another class count). Raises
    ValueError in one line when the file lacks an encoder weight, holds an unknown key or
    a tensor of another shape."""
    state = official_state_dict(read_checkpoint(path))
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise ValueError(f"{path} holds keys a Point-MAE classifier does not have, e.g. {unknown[:3]}: "
                         f"not a Point-MAE checkpoint, or another architecture")
    if any(k.startswith("head.") and tuple(v.shape) != tuple(own[k].shape) for k, v in state.items()):
        # a fine-tuned checkpoint of another class count: its encoder, not its head
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{path}: {key} is {tuple(value.shape)}, the model's is {tuple(own[key].shape)} "
                             f"(a checkpoint of another width, depth or class count)")
    missing = [k for k in own if k not in state]
    encoder = [k for k in missing if not k.startswith(("head.", "cls_token", "cls_pos"))]
    if encoder:
        raise ValueError(f"{path} lacks {len(encoder)} encoder weights of Point-MAE, e.g. {encoder[:3]}: "
                         f"not a Point-MAE checkpoint")
    model.load_state_dict(state, strict=False)
    return missing


def build_point_mae(num_classes: int, num_points: int = 1024, num_group: int = 64, group_size: int = 32,
                    checkpoint_path: str | os.PathLike | None = None, dim: int = WIDTH, depth: int = DEPTH,
                    heads: int = HEADS) -> PointMAE:
    """The Point-MAE classifier, from scratch or with the encoder of an official checkpoint
    (``pretrain.pth``: keys under ``base_model``, ``module.`` and ``MAE_encoder.`` prefixes,
    decoder keys ignored; or a fine-tuned ``ckpt-best.pth``, its head too when its class
    count matches, else a new head). Use 64 groups for 1024 points and 128 for 2048, as Point-MAE does.

    As in the official code, a head the checkpoint does not hold keeps PyTorch's default
    init (Point-MAE's truncated-normal init runs only when no checkpoint is given). ``dim``,
    ``depth`` and ``heads`` build a smaller transformer (Point-MAE's is 384 x 12, 6 heads)."""
    model = PointMAE(num_classes, num_points=num_points, num_group=num_group, group_size=group_size, dim=dim,
                     depth=depth, heads=heads)
    if checkpoint_path is not None:
        missing = load_checkpoint(model, checkpoint_path)
        if any(k.startswith("head.") for k in missing):
            for m in model.head.modules():
                if hasattr(m, "reset_parameters") and m is not model.head:
                    m.reset_parameters()
    return model
