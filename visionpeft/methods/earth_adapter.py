"""Earth-Adapter (Hu et al., 2025, "Earth-Adapter: Bridge the Geospatial Domain Gaps with
Mixture of Frequency Adaptation"): a mixture of frequency adapters after a ViT block.

On the block's output, patch tokens only (the prefix tokens pass unchanged), laid out as
an image f (H x W x C):

    f_low  = Re IFFT2( M_low . FFT2(f) ),   f_high = f - f_low       (orthonormal FFTs)
    w      = softmax(router(f))               per token, 3 weights
    f     <- f + s * (w_1 E_1(f) + w_2 E_2(f_low) + w_3 E_3(f_high))

with experts E_k = Linear(C, d) -> ReLU -> Linear(d, C) and s a learnable scalar per
block (init 0.1). Blocks outside ``frequency_blocks`` use f + s E_1(f) only, and hold no
E_2, E_3 or router (the official code builds them for every block, where unused
parameters break DDP). M_low is 1 on the centred (fftshift-ed) rows and columns
[H//2 - c, H//2 + c), c = int(min(H, W) * cutoff_ratio // 2), as in the official code: one
frequency more on the negative side than on the positive, so f_low is the real part of a
spectrum that is not conjugate-symmetric. Because the FFTs are linear and f is real,
f_high = f - f_low equals the official second inverse transform of (1 - M_low) FFT2(f).

The official code (VisionXLab/Earth-Adapter) hard-codes a 32 x 32 grid, width 1024, 24
blocks, one class token and a sequence-first layout; here the grid comes from the host at
run time (any H x W, patch 14 or 16, registers: `core.tokens`), and hosts whose blocks
return (B, H, W, C) (timm Hiera) are read as they are. Its experts keep PyTorch's default
init for both layers, so the adapter changes the host from step 0; ``zero_init=True``
zeroes the up-projections instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import BlockAdapterModule, HostSpec
from ..core.config import ConfigError, MethodConfig, check_positive_int
from ..core.registry import register_method
from ..core.tokens import square_split


# --- pure math ------------------------------------------------------------------------
def low_pass_mask(rows: int, cols: int, ratio: float, device=None) -> torch.Tensor:
    """(rows, cols) 0/1 mask in the UNSHIFTED FFT layout: 1 where the centred mask of
    the official code is (fftshift-ed rows / cols [n//2 - c, n//2 + c))."""
    c = int(min(rows, cols) * ratio // 2)
    r = torch.zeros(rows, device=device)
    k = torch.zeros(cols, device=device)
    r[rows // 2 - c:rows // 2 + c] = 1
    k[cols // 2 - c:cols // 2 + c] = 1
    return torch.fft.ifftshift(r[:, None] * k[None, :])


def frequency_split(f: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_low, f_high) of f (..., rows, cols, C), channels last. Computed in float32 at
    least (half-precision FFTs are not available everywhere), returned in f's dtype."""
    work = f if f.dtype in (torch.float32, torch.float64) else f.float()
    rows, cols = f.shape[-3], f.shape[-2]
    mask = low_pass_mask(rows, cols, ratio, f.device).to(work.dtype)[:, :, None]
    spectrum = torch.fft.fft2(work, dim=(-3, -2), norm="ortho")
    low = torch.fft.ifft2(spectrum * mask, dim=(-3, -2), norm="ortho").real
    return low.to(f.dtype), (work - low).to(f.dtype)


def _expert(width: int, bottleneck: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, bottleneck), nn.ReLU(), nn.Linear(bottleneck, width))


# --- module -----------------------------------------------------------------------------
class EarthAdapterModule(BlockAdapterModule):
    placement = "output"
    needs_token_grid = True  # the patch grid comes from the host (core.tokens)

    def __init__(self, config: "EarthAdapterConfig", host: HostSpec):
        super().__init__(config, host)
        width = host.out_features
        if config.bottleneck > width:
            raise ValueError(f"bottleneck={config.bottleneck} is wider than the block's {width} features; "
                             f"use bottleneck <= {width}")
        self.width, self.split = width, bool(getattr(config, "frequency_split", False))
        self.ratio = float(config.cutoff_ratio)
        self.experts = nn.ModuleList([_expert(width, config.bottleneck) for _ in range(3 if self.split else 1)])
        self.router = nn.Linear(width, 3) if self.split else None
        # float64 here, so that the host's dtype (the module is moved to it) holds scale_init as
        # closely as it can, not float32's rounding of it
        self.scale = nn.Parameter(torch.tensor([float(config.scale_init)], dtype=torch.float64))
        if config.zero_init:
            for e in self.experts:
                nn.init.zeros_(e[2].weight)
                nn.init.zeros_(e[2].bias)
        self.token_grid = None  # set when attached to a model

    def _layout(self, h: torch.Tensor) -> tuple[int, tuple[int, int]]:
        if h.dim() == 4:  # (B, H, W, C): Hiera's stages
            return 0, (h.shape[1], h.shape[2])
        if h.dim() != 3:
            raise ValueError(f"Earth-Adapter expects block outputs (batch, tokens, {self.width}) or "
                             f"(batch, rows, cols, {self.width}), got shape {tuple(h.shape)}")
        n = h.shape[1]
        return self.token_grid.split(n) if self.token_grid is not None else square_split(n)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.width:
            raise ValueError(f"Earth-Adapter expects {self.width} features on the last dim of the "
                             f"block output, got shape {tuple(h.shape)}")
        prefix, (rows, cols) = self._layout(h)
        batch = h.shape[0]
        f = h.reshape(batch, -1, self.width)[:, prefix:]  # patch tokens, row-major
        out = self.experts[0](f)
        if self.split:
            low, high = frequency_split(f.reshape(batch, rows, cols, self.width), self.ratio)
            w = F.softmax(self.router(f), dim=-1)
            out = (w[..., 0:1] * out + w[..., 1:2] * self.experts[1](low.reshape_as(f))
                   + w[..., 2:3] * self.experts[2](high.reshape_as(f)))
        out = out * self.scale
        if prefix:
            out = torch.cat([out.new_zeros(batch, prefix, self.width), out], 1)
        return out.reshape(h.shape)

    def extra_repr(self) -> str:
        kind = f"frequency mixture, cutoff ratio {self.ratio}" if self.split else "one expert"
        return f"{self.width} -> {self.config.bottleneck} -> {self.width}, {kind}"


@register_method("earth_adapter", EarthAdapterModule, layer_kinds=("block",), weight_space=False)
@dataclass(frozen=True)
class EarthAdapterConfig(MethodConfig):
    """Earth-Adapter after ViT blocks (target the blocks: ``TIMM_BLOCKS``, ``HF_VIT_LAYERS``).

    bottleneck: expert width d; cutoff_ratio: low-pass half-width as a share of the grid
    (c = int(min(H, W) * ratio // 2)); frequency_blocks: indices among the adapted blocks
    (model order) that get the frequency mixture, the others one expert (None: the first
    three, (0, 1, 2), as the official supervised LoveDA config); scale_init: the
    per-block scale's start; zero_init: zero the experts' up-projections (the official
    code does not). Official settings (DINOv2-L, 24 blocks adapted): LoveDA d 16, blocks
    (0, 1, 2), ratio 0.2; Potsdam -> Vaihingen DG d 24, blocks 18-23, ratio 0.3;
    Vaihingen -> Potsdam DG d 64, blocks 0-5, ratio 0.3.
    Trainable per block: 2 d C + d + C, plus 2 (2 d C + d + C) + 3 C + 3 with the mixture,
    plus 1 (the scale).
    """

    bottleneck: int = 16
    cutoff_ratio: float = 0.2
    frequency_blocks: tuple[int, ...] | None = None
    scale_init: float = 0.1
    zero_init: bool = False

    def __post_init__(self):
        blocks = self.frequency_blocks
        if blocks is None:  # the first three adapted blocks (fewer where fewer are adapted)
            return super().__post_init__()
        if isinstance(blocks, int) and not isinstance(blocks, bool):
            blocks = (blocks,)
        if not isinstance(blocks, (list, tuple)) or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise ConfigError("EarthAdapterConfig.frequency_blocks must be a list of block indices >= 0 "
                              f"(positions among the adapted blocks), got {self.frequency_blocks!r}")
        object.__setattr__(self, "frequency_blocks", tuple(sorted(set(blocks))))
        super().__post_init__()

    def validate(self) -> None:
        check_positive_int(self, "bottleneck")
        ratio = self.cutoff_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ConfigError(f"EarthAdapterConfig.cutoff_ratio is a share of the grid in [0, 1], got {ratio!r}")
        if self.alpha is not None:
            raise ConfigError("EarthAdapterConfig has no alpha: its learnable per-block scale (scale_init) "
                              "plays that part; vp.set_scale scales the whole adapter")
        if isinstance(self.scale_init, bool) or not isinstance(self.scale_init, (int, float)):
            raise ConfigError(f"EarthAdapterConfig.scale_init must be a number, got {self.scale_init!r}")

    def check_layers(self, names: list[str]) -> None:
        if self.frequency_blocks is None:
            return
        over = [b for b in self.frequency_blocks if b >= len(names)]
        if over and not names:
            raise ConfigError("EarthAdapterConfig: no blocks are adapted, so frequency_blocks "
                              f"{list(over)} index nothing; target the host's blocks")
        if over:
            raise ConfigError(f"EarthAdapterConfig.frequency_blocks {list(over)} index the adapted blocks, "
                              f"but only {len(names)} are adapted ({names[0]} ... {names[-1]}): "
                              f"use indices 0-{len(names) - 1}")

    def for_layer(self, name: str, index: int | None = None) -> "EarthAdapterConfig":
        cfg = self.replace()
        # not a field: a per-layer flag for the module being built, never saved
        blocks = (0, 1, 2) if self.frequency_blocks is None else self.frequency_blocks
        object.__setattr__(cfg, "frequency_split", index is not None and index in blocks)
        return cfg
