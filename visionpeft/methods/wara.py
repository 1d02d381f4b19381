"""WaRA (arXiv 2506.24092): low-rank factors in the 2-D wavelet domain of the update.

dW (out, fan_in) is the inverse J-level 2-D wavelet transform of sub-bands that are each
low rank: sub-band S = B_S A_S with rank min(r, its size), B_S = 0 at init, then
dW = (alpha / r) * IDWT_J(sub-bands). The transform is our torch code on PyWavelets'
filters (`visionpeft.ops.dwt`), periodized so sizes halve exactly; sizes that are not
multiples of 2^J are zero-padded for the transform and cropped back.

Two readings of the paper exist (see the README): its abstract (factors per sub-band of
the update, `share_factors=False`, our default: it is what the text describes and it
reaches higher rank than LoRA for the same parameters) and its overview figure, where one
shared pair acts on the wavelet coefficients (`share_factors=True`: single level, the
approximation and diagonal sub-bands both carry the same B A, the horizontal and vertical
ones are zero; half of LoRA's parameters at the same r).

dW is built once per forward (not per token). On a plain Linear it is folded into the
host weight for one GEMM, and rebuilt in backward instead of kept
(`ops.weight_delta`); while the adapter is frozen it is cached until its factors change.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.adapter import AdapterModule, HostSpec
from ..core.config import AdapterConfig, ConfigError, check_positive_int
from ..core.registry import register_method
from ..ops.dwt import crop, subband_shapes, waverec2, wavelet_filters
from ..ops.weight_delta import linear_with_weight_delta
from .lora import lora_scale

DETAIL_NAMES = ("H", "V", "D")


# --- pure math ------------------------------------------------------------------------
def padded_shape(shape: tuple[int, int], levels: int) -> tuple[int, int]:
    m = 2 ** levels
    return tuple(-(-s // m) * m for s in shape)


def band_layout(shape: tuple[int, int], levels: int) -> dict[str, tuple[int, int]]:
    """{band name: shape}: "A" for the coarsest approximation, "H2", "V2", "D2" ... for
    the details of each level (1 = finest), for a matrix padded to multiples of 2^levels."""
    layout = subband_shapes(padded_shape(shape, levels), levels)
    bands = {"A": tuple(layout[0])}
    for depth, details in enumerate(layout[1:]):
        level = levels - depth
        for name, s in zip(DETAIL_NAMES, details):
            bands[f"{name}{level}"] = tuple(s)
    return bands


def wara_delta_weight(bands: dict[str, torch.Tensor], shape: tuple[int, int], levels: int,
                      wavelet: str, scale: float) -> torch.Tensor:
    """scale * crop(IDWT_J(bands)) for band matrices keyed as in `band_layout`."""
    coeffs = [bands["A"]]
    for level in range(levels, 0, -1):
        coeffs.append(tuple(bands[f"{n}{level}"] for n in DETAIL_NAMES))
    return crop(waverec2(coeffs, wavelet), shape) * scale


# --- module -----------------------------------------------------------------------------
class WaRAModule(AdapterModule):
    def __init__(self, config: "WaRAConfig", host: HostSpec):
        super().__init__(config, host)
        r, levels = config.r, config.levels
        self.shape = (host.out_features, host.fan_in)
        limit = min(self.shape)
        if r > limit:
            raise ValueError(f"rank r={r} is larger than the layer allows (as a matrix "
                             f"{self.shape[0]} x {self.shape[1]}); use r <= {limit}")
        self.levels, self.wavelet = (1 if config.share_factors else levels), config.wavelet
        self.share = config.share_factors
        self.scale = lora_scale(config.alpha, r)
        self.layout = band_layout(self.shape, self.levels)
        bands = ["A"] if self.share else list(self.layout)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for band in bands:
            h, w = self.layout[band]
            rank = min(r, h, w)
            self.A[band] = nn.Parameter(torch.empty(rank, w))
            self.B[band] = nn.Parameter(torch.zeros(h, rank))
            nn.init.kaiming_uniform_(self.A[band], a=math.sqrt(5))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def band_matrices(self) -> dict[str, torch.Tensor]:
        if self.share:
            ba = self.B["A"] @ self.A["A"]
            zero = torch.zeros_like(ba)
            return {"A": ba, "H1": zero, "V1": zero, "D1": ba}
        return {band: self.B[band] @ self.A[band] for band in self.layout}

    def _build(self) -> torch.Tensor:
        dW = wara_delta_weight(self.band_matrices(), self.shape, self.levels, self.wavelet, self.scale)
        return dW.reshape(self.host.weight_shape)

    def delta_weight(self) -> torch.Tensor:
        if any(p.requires_grad for p in self.parameters()):  # cache only while frozen
            self._cache = None
            return self._build()
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._build())
        return self._cache[1]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.op(x, self.delta_weight().to(x.dtype))

    def fused_linear(self, x, weight, bias, scale):
        return linear_with_weight_delta(x, weight, bias, scale, self.delta_weight,
                                        list(self.parameters()))


@register_method("wara", WaRAModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class WaRAConfig(AdapterConfig):
    """r: rank per sub-band (capped by the band's size); wavelet: any orthogonal PyWavelets
    wavelet ("haar", "db2", "sym4", ...); levels: J >= 1; share_factors: the overview-figure
    reading (one pair, single level); alpha: dW = (alpha / r) IDWT(...) (None = r)."""

    r: int = 8
    wavelet: str = "haar"
    levels: int = 1
    share_factors: bool = False

    def validate(self) -> None:
        check_positive_int(self, "r")
        check_positive_int(self, "levels")
        if not isinstance(self.wavelet, str):
            raise ConfigError(f"WaRAConfig.wavelet must be a PyWavelets name, got {self.wavelet!r}")
        try:
            wavelet_filters(self.wavelet)
        except ValueError as err:
            raise ConfigError(f"WaRAConfig.wavelet: {err}") from None
        if self.share_factors and self.levels != 1:
            raise ConfigError("WaRAConfig.share_factors is the single-level reading; "
                              f"use levels=1 with it, got levels={self.levels}")
