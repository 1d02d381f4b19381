"""PeftCD (Dong et al., 2025, "PeftCD: Leveraging Vision Foundation Models with
Parameter-Efficient Fine-Tuning for Remote Sensing Change Detection"; official code
dyzy41/PeftCD): a shared-weight Siamese encoder with adapters, feature exchange between
the two dates, a light decoder applied to each branch, the loss averaged over both
branches and the prediction from the averaged logits.

After the exchange each branch holds features of both dates (whole levels swapped, or
every other channel), which is what lets one branch's decoder see a change. Encoders:
any timm model with ``forward_intermediates`` (SAM2 Hiera: its 4 stages; ViTs such as
DINOv3: 4 evenly spaced blocks) and transformers ``DINOv3ViTModel`` / ``Dinov2Model`` /
``Sam2VisionModel`` through their hidden states. Decoders: FPN-style for pyramids,
multi-layer fusion + ASPP for single-scale ViT features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXCHANGES = ("layer", "channel")


# --- encoders: a host model seen as four NCHW maps ------------------------------------
def _even_layers(depth: int) -> list[int]:
    """Four blocks spread over the depth (PeftCD's ViT-L takes 5, 11, 17, 23 of 24)."""
    return [max(0, round(depth * (i + 1) / 4) - 1) for i in range(4)]


class FeatureEncoder(nn.Module):
    """``blocks``: the four blocks of a plain ViT to read (default: evenly spaced); a
    hierarchical host (Hiera) always gives its four stages."""

    def __init__(self, host: nn.Module, blocks: list[int] | None = None):
        super().__init__()
        self.host = host
        self.kind = "timm" if hasattr(host, "forward_intermediates") else "transformers"
        depth = _vit_depth(host, self.kind)
        if blocks is not None:
            if depth is None:
                raise ValueError(f"feature blocks {list(blocks)} were given, but {type(host).__name__} is not a "
                                 "plain ViT: its four stages are used")
            if len(blocks) != 4 or not all(isinstance(b, int) and 0 <= b < depth for b in blocks):
                raise ValueError(f"feature blocks must be four block indices in [0, {depth}), got {list(blocks)}")
        if self.kind == "timm" and depth is not None:
            self.indices = list(blocks) if blocks is not None else _even_layers(depth)  # a plain ViT
        else:
            self.indices = 4
        self.blocks = list(blocks) if blocks is not None else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "timm":
            if not isinstance(self.indices, list):  # a pyramid: its four stages
                return list(self.host.forward_intermediates(x, indices=4, output_fmt="NCHW",
                                                            intermediates_only=True))
            unique = sorted(set(self.indices))  # shallow ViTs repeat a block; timm takes each once
            feats = self.host.forward_intermediates(x, indices=unique, output_fmt="NCHW",
                                                    intermediates_only=True, norm=True)
            return [dict(zip(unique, feats))[i] for i in self.indices]
        out = self.host(pixel_values=x, output_hidden_states=True)
        hidden = out.hidden_states
        if hidden[-1].dim() == 4:  # Sam2VisionModel: NHWC per block; last block of each size
            last = {}
            for h in hidden:
                last[tuple(h.shape[1:3])] = h
            return [h.permute(0, 3, 1, 2).contiguous() for h in list(last.values())[-4:]]
        cfg = self.host.config  # ViT tokens: drop CLS and register tokens, fold the grid
        prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        gh, gw = x.shape[2] // cfg.patch_size, x.shape[3] // cfg.patch_size
        picks = [i + 1 for i in (self.blocks or _even_layers(len(hidden) - 1))]
        return [hidden[i][:, prefix:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw) for i in picks]


def _vit_depth(host: nn.Module, kind: str) -> int | None:
    """Number of blocks of a plain ViT (timm ViT / Eva, transformers DINOv2 / DINOv3), None
    for a hierarchical host."""
    if kind == "timm":
        return len(host.blocks) if hasattr(host, "blocks") and not hasattr(host, "stage_ends") else None
    cfg = getattr(host, "config", None)
    if cfg is not None and getattr(cfg, "patch_size", None) and getattr(cfg, "num_hidden_layers", None):
        return int(cfg.num_hidden_layers)
    return None


def exchange(fa: list[torch.Tensor], fb: list[torch.Tensor], mode: str):
    """Swap whole odd levels ("layer") or every other channel at every level ("channel")."""
    if mode == "layer":
        return ([b if i % 2 else a for i, (a, b) in enumerate(zip(fa, fb))],
                [a if i % 2 else b for i, (a, b) in enumerate(zip(fa, fb))])
    out_a, out_b = [], []
    for a, b in zip(fa, fb):
        odd = (torch.arange(a.shape[1], device=a.device) % 2 == 1).view(1, -1, 1, 1)
        out_a.append(torch.where(odd, b, a))
        out_b.append(torch.where(odd, a, b))
    return out_a, out_b


# --- decoders ------------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(ch, ch), nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        return F.relu(x + self.body(x))


class FPNDecoder(nn.Module):
    """Lateral 1x1 projections, top-down upsample-and-add with a residual block per level."""

    def __init__(self, in_channels: list[int], ch: int = 64, classes: int = 2):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, ch, 1) for c in in_channels)
        self.blocks = nn.ModuleList(ResBlock(ch) for _ in in_channels)
        self.head = nn.Sequential(_conv_bn(ch, ch), nn.Conv2d(ch, classes, 1))

    def forward(self, feats, size):
        x = None
        for lat, block, f in zip(reversed(self.lateral), reversed(self.blocks), reversed(feats)):
            y = lat(f)
            if x is not None:
                y = y + F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False)
            x = block(y)
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    def __init__(self, ch: int, rates=(1, 2, 3)):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(ch, ch, 1)] + [_conv_bn(ch, ch, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, ch, 1), nn.ReLU(inplace=True))
        self.project = _conv_bn(ch * (len(rates) + 2), ch, 1)

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class FusionASPPDecoder(nn.Module):
    """Single-scale ViT features: each layer projected, concatenated and fused, ASPP,
    then two upsampling refinement steps to the input size."""

    def __init__(self, in_channels: list[int], ch: int = 64, classes: int = 2):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, ch, 1) for c in in_channels)
        self.fuse = _conv_bn(ch * len(in_channels), ch, 1)
        self.aspp = ASPP(ch)
        self.refine = nn.Sequential(ResBlock(ch), ResBlock(ch))
        self.head = nn.Conv2d(ch, classes, 1)

    def forward(self, feats, size):
        x = self.aspp(self.fuse(torch.cat([p(f) for p, f in zip(self.project, feats)], 1)))
        for block in self.refine:
            x = block(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


class SiameseChangeDetector(nn.Module):
    """encoder (shared, with the adapter), exchange, decoder on each branch."""

    def __init__(self, encoder: FeatureEncoder, channels: list[int], pyramid: bool,
                 decoder_channels: int = 64, exchange_mode: str = "layer"):
        super().__init__()
        if exchange_mode not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange_mode!r}")
        self.encoder, self.exchange_mode = encoder, exchange_mode
        dec = FPNDecoder if pyramid else FusionASPPDecoder
        self.decoder = dec(channels, decoder_channels)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, 2, H, W) of each branch."""
        fa, fb = exchange(self.encoder(a), self.encoder(b), self.exchange_mode)
        size = a.shape[-2:]
        return self.decoder(fa, size), self.decoder(fb, size)

    @staticmethod
    def loss(logits: tuple[torch.Tensor, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(lg, label) for lg in logits) / len(logits)

    @staticmethod
    def predict(logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return ((logits[0] + logits[1]) / 2).softmax(1)


def probe_channels(encoder: FeatureEncoder, image_size: int) -> tuple[list[int], bool]:
    """(channels per level, whether the levels form a pyramid) from one dry run."""
    with torch.no_grad():
        feats = encoder(torch.zeros(1, 3, image_size, image_size))
    return [f.shape[1] for f in feats], len({f.shape[-1] for f in feats}) > 1
