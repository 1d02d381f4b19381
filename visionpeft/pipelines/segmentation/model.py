"""Segmentation model: an encoder seen as four NCHW maps, brought to strides 4-32, and a
decoder from segmentation-models-pytorch (smp) or a linear probe.

Plain ViTs give four blocks at the patch stride; as the Earth-Adapter / Rein code does,
they are resized by x4, x2, x1 and x0.5 (bilinear, no parameters) to form a pyramid of
strides 4, 8, 16 and 32 for patch 16. Hierarchical hosts (SAM2 Hiera) give their four
stages as they are. smp's decoders take a list of features at strides [1, 2, 4, 8, 16,
32]; we hand them the image at stride 1 and an empty (0-channel) map at stride 2, which
their UPerNet and FPN skip and their U-Net concatenates as nothing, so smp's own decoder
modules run on our pyramid unchanged (none is copied here). ``mask2former`` puts transformers'
Mask2Former pixel decoder and masked-attention transformer on the same pyramid
(mask2former.py); it predicts masks per query and is trained with its own set loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODERS = ("upernet", "fpn", "deeplabv3plus", "unet", "dpt", "linear")  # per-pixel logits
QUERY_DECODERS = ("mask2former",)  # per-query masks and classes, a set loss (task.py)
ALL_DECODERS = DECODERS + QUERY_DECODERS
VIT_SCALES = (4.0, 2.0, 1.0, 0.5)


def to_pyramid(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """Four maps of one size (a plain ViT's blocks) resized x4, x2, x1, x0.5; a pyramid
    (maps of different sizes) as it is. The sizes are 8q, 4q, 2q and q with q the grid
    halved and rounded up, so each level is exactly twice the next (smp's decoders
    upsample by fixed factors); on an odd grid the x1 map is resampled one cell larger."""
    if len({tuple(f.shape[-2:]) for f in feats}) > 1:
        return list(feats)
    q = [-(-n // 2) for n in feats[0].shape[-2:]]
    out = []
    for f, s in zip(feats, VIT_SCALES):
        size = (int(q[0] * 2 * s), int(q[1] * 2 * s))
        out.append(f if tuple(f.shape[-2:]) == size else
                   F.interpolate(f, size=size, mode="bilinear", align_corners=False))
    return out


class LinearHead(nn.Module):
    """A probe: BatchNorm and a 1x1 conv on the four maps, upsampled to the finest and
    concatenated (the DINOv2 linear-probe recipe on several layers)."""

    def __init__(self, channels: list[int], num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(sum(channels))
        self.classifier = nn.Conv2d(sum(channels), num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        x = torch.cat([f if f.shape[-2:] == size else
                       F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], 1)
        return self.classifier(self.norm(x))


def _smp_decoder(name: str, channels: list[int], options: dict) -> tuple[nn.Module, int]:
    """smp decoder for encoder channels [3, 0, c4, c8, c16, c32] -> (module, its output channels)."""
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
    from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

    enc = [3, 0, *channels]
    if name == "upernet":
        width = int(options.get("channels", 256))
        return UPerNetDecoder(enc, encoder_depth=5, decoder_channels=width), width
    if name == "fpn":
        width = int(options.get("channels", 128))
        if width % 32 or int(options.get("pyramid_channels", 256)) % 32:
            raise ValueError(f"decoder fpn: channels and pyramid_channels must be multiples of 32 (smp's FPN "
                             f"uses GroupNorm(32)), got {width} and {options.get('pyramid_channels', 256)}")
        dec = FPNDecoder(enc, encoder_depth=5, pyramid_channels=int(options.get("pyramid_channels", 256)),
                         segmentation_channels=width, dropout=float(options.get("dropout", 0.2)))
        return dec, dec.out_channels
    if name == "deeplabv3plus":
        width = int(options.get("channels", 256))
        # ASPP on the deepest map (stride 32: the last block's adapter reaches the loss through
        # nothing else), upsampled x4 (the most smp's decoder does) onto its skip at stride 8
        return DeepLabV3PlusDecoder([3, 0, *channels[1:]], encoder_depth=4, out_channels=width,
                                    atrous_rates=tuple(options.get("atrous_rates", (12, 24, 36))),
                                    output_stride=16, aspp_separable=True, aspp_dropout=0.5), width
    widths = tuple(options.get("channels", (256, 128, 64, 32, 16)))
    return UnetDecoder(enc, decoder_channels=widths, n_blocks=5), widths[-1]


def _dpt_decoder(channels: list[int], strides: list[int] | None, options: dict) -> tuple[nn.Module, int]:
    """smp's DPT decoder: it reassembles the encoder's own maps (learned resizing to strides
    4-32), so it takes them before `to_pyramid`; the prefix tokens are already dropped."""
    from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder

    if strides is None or any(s % 4 or (s // 4) & (s // 4 - 1) for s in strides):
        raise ValueError(f"decoder dpt needs feature strides of 4 x a power of two (patch 8 or 16, or a "
                         f"pyramid), got {strides}; use upernet for patch 14")
    width = int(options.get("channels", 256))
    mid = tuple(options.get("intermediate_channels", (width, width, width, width)))
    return DPTDecoder(channels, strides, encoder_has_prefix_tokens=False, readout="ignore",
                      intermediate_channels=mid, fusion_channels=width), width


class SegmentationModel(nn.Module):
    """encoder (a module returning four NCHW maps, with the adapter) -> pyramid -> decoder
    -> 1x1 classifier -> logits (N, classes, H, W) at the input size. ``strides``: the
    input size over each map's (for dpt). mask2former gives its semantic scores (N, classes,
    H, W; >= 0, not logits) instead, or with ``queries=True`` its per-layer query logits
    for the loss."""

    def __init__(self, encoder: nn.Module, channels: list[int], num_classes: int,
                 decoder: str = "upernet", options: dict | None = None, strides: list[int] | None = None):
        super().__init__()
        if decoder not in ALL_DECODERS:
            raise ValueError(f"decoder {decoder!r} is not one of {list(ALL_DECODERS)}")
        if len(channels) != 4:
            raise ValueError(f"the encoder must give four feature maps, it gave {len(channels)}")
        self.encoder, self.decoder_name = encoder, decoder
        self.strides = list(strides) if strides is not None else None
        if decoder == "dpt":
            self.decoder, width = _dpt_decoder(channels, strides, options or {})
            self.head = nn.Conv2d(width, num_classes, 1)
        elif decoder == "linear":
            self.decoder, self.head = LinearHead(channels, num_classes), nn.Identity()
        elif decoder == "mask2former":
            from .mask2former import Mask2FormerHead

            self.decoder, self.head = Mask2FormerHead(channels, num_classes, options), nn.Identity()
        else:
            self.decoder, width = _smp_decoder(decoder, channels, options or {})
            self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor, queries: bool = False):
        if queries and self.decoder_name not in QUERY_DECODERS:
            raise ValueError(f"queries=True needs a query decoder {list(QUERY_DECODERS)}, not {self.decoder_name}")
        if self.decoder_name == "mask2former":
            from .mask2former import semantic_scores

            out = self.decoder(to_pyramid(self.encoder(x)))
            return out if queries else semantic_scores(out.classes[-1], out.masks[-1], x.shape[-2:])
        if self.decoder_name == "dpt":
            feats = self.encoder(x)
            gh, gw = feats[-1].shape[-2:]
            # its deepest step brings the last map to stride 32 by a strided conv, and the fusion
            # doubles back up: the grid must divide by 32 / stride; pad the missing cells
            m = max(1, 32 // self.strides[-1])
            ph, pw = -gh % m, -gw % m
            if ph or pw:
                feats = [F.pad(f, (0, pw, 0, ph), mode="replicate") for f in feats]
            out = self.decoder(feats, [None] * len(feats))
            if ph or pw:  # and crop the padded cells' share back off
                out = out[..., :round(out.shape[-2] * gh / (gh + ph)), :round(out.shape[-1] * gw / (gw + pw))]
            return F.interpolate(self.head(out), size=x.shape[-2:], mode="bilinear", align_corners=False)
        feats = to_pyramid(self.encoder(x))
        if self.decoder_name == "linear":
            out = self.decoder(feats)
        else:
            n, _, h, w = x.shape
            stride2 = x.new_zeros(n, 0, -(-h // 2), -(-w // 2))
            levels = [x, stride2, *feats]
            out = self.decoder([x, stride2, *feats[1:]] if self.decoder_name == "deeplabv3plus" else levels)
        return F.interpolate(self.head(out), size=x.shape[-2:], mode="bilinear", align_corners=False)


def probe_channels(encoder: nn.Module, image_size: int) -> list[int]:
    """Channels of the encoder's four maps, from one dry run."""
    return probe(encoder, image_size)[0]


def probe(encoder: nn.Module, image_size: int) -> tuple[list[int], list[int]]:
    """(channels, strides) of the encoder's four maps, from one dry run."""
    with torch.no_grad():
        feats = encoder(torch.zeros(1, 3, image_size, image_size))
    return [f.shape[1] for f in feats], [round(image_size / f.shape[-1]) for f in feats]
