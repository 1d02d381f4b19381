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

The inverse transform is linear and separable, so a band S = B_S A_S contributes
U_S V_S to dW, with U_S the 1-D synthesis of B_S along the rows (from the band's channel,
then up through the coarser levels) and V_S that of A_S along the columns. dW is thus a
LoRA of rank sum_S r_S with factors U = [U_S], V = [V_S] made by 1-D transforms of thin
matrices: the forward never builds dW (O((out + in) r) work per step for the transform,
then LoRA's fused path). `wara_delta_weight` keeps the direct 2-D form as the reference,
`wara_factors_reference` the band-by-band 1-D form; `wara_factors` runs every band of a
side and level through one polyphase table (`ops.wara_math`), a few ops per layer, so a
step costs about what LoRA of rank sum_S r_S costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import MethodConfig, ConfigError, check_positive_int
from ..core.registry import register_method
from ..ops.dwt import crop, idwt1, subband_shapes, waverec2, wavelet_filters
from ..ops.low_rank import lora_add_linear, lora_delta_conv, lora_linear, lora_scale
from ..ops.routed import cached_stacks, routed_low_rank_add, scaled, stack_with_empty
from ..ops.wara_math import synthesize_columns

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


# (row channel, column channel) of each band: pywt's cH is high-pass along the rows
# axis, cV along the columns axis, cD along both
_CHANNELS = {"A": ("lo", "lo"), "H": ("hi", "lo"), "V": ("lo", "hi"), "D": ("hi", "hi")}


def synthesize_factor(M: torch.Tensor, channel: str, level: int, wavelet: str) -> torch.Tensor:
    """1-D inverse transform of a thin (r, h) factor placed in ``channel`` of ``level``,
    then through the low channel of every finer level: (r, h * 2^level)."""
    y = idwt1(M, None, wavelet) if channel == "lo" else idwt1(None, M, wavelet)
    for _ in range(level - 1):
        y = idwt1(y, None, wavelet)
    return y


def _band_level(band: str, levels: int) -> int:
    return levels if band == "A" else int(band[1:])


def wara_factors_reference(bands: dict[str, tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int],
                           levels: int, wavelet: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`wara_factors` band by band through `idwt1`: the plain form, kept to check it against."""
    us, vs = [], []
    for band, (B, A) in bands.items():
        level = _band_level(band, levels)
        row, col = _CHANNELS[band[0]]
        us.append(synthesize_factor(B.t(), row, level, wavelet)[:, :shape[0]].t())
        vs.append(synthesize_factor(A, col, level, wavelet)[:, :shape[1]])
    return torch.cat(us, 1), torch.cat(vs, 0)


def wara_factors(bands: dict[str, tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int],
                 levels: int, wavelet: str) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, R), V (R, in) with U V = crop(IDWT_J(B_S A_S)) for bands {name: (B_S, A_S)},
    columns of U / rows of V in the bands' order. U is contiguous; V is the transpose of a
    contiguous (in, R), which is how LoRA's kernels read their down factor."""
    rows, cols = [], []
    for band, (B, A) in bands.items():
        level = _band_level(band, levels)
        row, col = _CHANNELS[band[0]]
        rows.append((B, row, level))
        cols.append((A, col, level))
    return (synthesize_columns(rows, shape[0], wavelet),
            synthesize_columns(cols, shape[1], wavelet, transposed=[True] * len(cols)).t())


# --- module -----------------------------------------------------------------------------
class WaRAModule(AdapterModule):
    def __init__(self, config: "WaRAConfig", host: HostSpec):
        super().__init__(config, host)
        r, levels = config.r, config.levels
        self.shape = (host.out_features, host.fan_in)
        check_rank(r, host)
        if 2 ** levels > min(self.shape):
            raise ValueError(f"WaRA levels={levels} halves the update {levels} times, but this layer's "
                             f"update is {self.shape[0]} x {self.shape[1]}: 2^levels must be at most its "
                             f"smaller side, so levels <= {int(math.log2(min(self.shape)))} here")
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

    def band_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{band: (B_S, A_S)}; the shared reading puts one pair on the A and D1 bands."""
        if self.share:
            pair = (self.B["A"], self.A["A"])
            return {"A": pair, "D1": pair}
        return {band: (self.B[band], self.A[band]) for band in self.layout}

    def band_matrices(self) -> dict[str, torch.Tensor]:
        """Every sub-band as a full matrix (zeros where the reading has none)."""
        pairs = self.band_factors()
        out = {}
        for band, (h, w) in self.layout.items():
            b, a = pairs.get(band, (None, None))
            out[band] = b @ a if b is not None else self.A["A"].new_zeros(h, w)
        return out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V), once per forward. Where no gradient is needed (frozen adapter, no_grad,
        evaluation) they are cached, keyed on every factor's storage, version counter,
        dtype and device, so an optimizer step, ``load_state_dict`` or ``.to()`` rebuilds them
        (an edit through ``p.data`` bypasses the version counter: edit the parameter itself)."""
        def build():
            return wara_factors(self.band_factors(), self.shape, self.levels, self.wavelet)

        params = list(self.A.values()) + list(self.B.values())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        try:
            key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        except RuntimeError:  # inference tensors have no version counter: no cache
            return build()
        cached = self.__dict__.get("_factor_cache")
        if cached is None or cached[0] != key:
            # normal tensors even under inference_mode: a later training step may save them
            with torch.inference_mode(False), torch.no_grad():
                cached = self.__dict__["_factor_cache"] = (key, build())
        return cached[1]

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up (out, R), down (R, fan_in)) with dW = up @ down (as a matrix), this layer's
        scale folded into up: WaRA as the LoRA of rank R = sum of the band ranks it is.
        One synthesis per call (cached while frozen, as `factors`); down is the transpose
        of a contiguous (fan_in, R): reshape it, do not view it."""
        U, V = self.factors()
        return U * self.scale, V

    def delta_weight(self) -> torch.Tensor:
        U, V = self.factors()
        return (U @ V).mul_(self.scale).reshape(self.host.weight_shape)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.factors()
        if self.host.kind == "linear":
            return F.linear(F.linear(x, V), U * self.scale)
        if self.host.groups == 1:
            return lora_delta_conv(x, V.contiguous(), U, self.scale, self.host)  # it views V as a kernel
        return self.host.op(x, self.delta_weight())

    def add_delta(self, x, y, scale):
        if self.host.kind == "linear":
            U, V = self.factors()
            return lora_add_linear(x, y, V, U, self.scale * scale)
        return super().add_delta(x, y, scale)

    def fused_linear(self, x, weight, bias, scale):
        U, V = self.factors()
        return lora_linear(x, weight, bias, V, U, self.scale * scale)

    @classmethod
    def routed_add(cls, modules, scales, x, y, row_adapter, store=None):
        """Every row's WaRA as one batched LoRA product over the synthesized factors
        (U, V) of each adapter, ranks zero-padded to the largest."""
        if any(m.host.kind != "linear" for m in modules):
            return NotImplemented

        def build():
            pairs = [m.factors() for m in modules]
            return (stack_with_empty([V for _, V in pairs], pad_dims=(0,)),
                    scaled(stack_with_empty([U for U, _ in pairs], pad_dims=(1,)),
                           [m.scale * s for m, s in zip(modules, scales)]))

        # the ParameterDicts' own tables: .values() goes through getattr per key, 8x slower
        sources = [p for m in modules for d in (m.A, m.B) for p in d._parameters.values()]
        A, B = cached_stacks(store, sources, tuple(scales), build)
        return routed_low_rank_add(x, y, A, B, row_adapter)


@register_method("wara", WaRAModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class WaRAConfig(MethodConfig):
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
