"""LoHa (LyCORIS; the low-rank Hadamard product of FedPara, Hyeon-Woo et al., 2022,
arXiv 2108.06098): dW = (alpha / r) (W1a W1b) * (W2a W2b), "*" the elementwise product.

W1a, W2a (out, r) and W1b, W2b (r, fan_in), fan_in = in/groups * kh * kw for a Conv2d,
whose dW is then viewed as the kernel (out, in/groups, kh, kw). Each product has rank at
most r, their Hadamard product at most r^2, for 2 r (out + fan_in) parameters.

Conventions are LyCORIS's (``LohaModule`` without Tucker, which ComfyUI reads too):
  - the names and shapes above are the file's ``hada_w1_a`` / ``hada_w1_b`` /
    ``hada_w2_a`` / ``hada_w2_b``; a conv's factors are stored flattened, (r, fan_in);
  - the scale is ``alpha / r`` with r = the rows of ``hada_w1_b`` and alpha the file's
    0-d ``alpha`` (None or 0: alpha = r, scale 1);
  - init: W1a ~ N(0, 0.1^2), W1b and W2b ~ N(0, 1), W2a = 0, so dW = 0 at the start.
LyCORIS's own ``merge_to`` applies alpha / r twice (``get_diff_weight`` scales the output
of ``get_weight``, which is already scaled); its forward and ComfyUI apply it once, as here.

The forward builds dW (the Hadamard product needs it): on a plain Linear, host and delta
run as one GEMM with dW rebuilt in backward (`linear_with_weight_delta`); elsewhere the
host op is applied with dW, exact for convs with any stride, dilation or groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import (ConfigError, MethodConfig, check_dropout, check_positive_int, rank_pattern_pairs,
                           split_ranks)
from ..core.registry import register_method
from ..ops.weight_delta import WeightDelta, linear_with_weight_delta

FACTOR_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


# --- pure math ------------------------------------------------------------------------
def loha_scale(alpha: float | None, r: int) -> float:
    """alpha / r, with alpha None meaning r (scale 1)."""
    return 1.0 if alpha is None else float(alpha) / r


def loha_delta_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                      scale: float, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """scale * (w1a @ w1b) * (w2a @ w2b), viewed as ``weight_shape``.

    The scale goes on the (out, r) factor, the cheapest place for it."""
    w1a = w1a if scale == 1.0 else w1a * scale
    return ((w1a @ w1b) * (w2a @ w2b)).reshape(weight_shape)


def file_scale(alpha, r: int) -> float:
    """The scale a LoHa file's layer applies: alpha / r, where LyCORIS reads an absent or
    zero alpha as r."""
    if alpha is None:
        return 1.0
    alpha = float(alpha)
    return 1.0 if alpha == 0.0 else alpha / r


def _reduce_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a @ b as a rank-r product, exact when a @ b has rank <= r (here: r is the layer's
    full rank, min(out, fan_in))."""
    U, S, Vh = torch.linalg.svd(a.double() @ b.double(), full_matrices=False)
    return (U[:, :r] * S[:r]).float(), Vh[:r].float()


# --- module -----------------------------------------------------------------------------
class LoHaModule(AdapterModule):
    def __init__(self, config: "LoHaConfig", host: HostSpec):
        super().__init__(config, host)
        r = config.r
        check_rank(r, host)
        self.scale = loha_scale(config.alpha, r)
        self.dropout = config.dropout
        out, fan_in = host.out_features, host.fan_in
        self.hada_w1_a = nn.Parameter(torch.empty(out, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, fan_in))
        self.hada_w2_a = nn.Parameter(torch.zeros(out, r))
        self.hada_w2_b = nn.Parameter(torch.empty(r, fan_in))
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)

    def _factors(self) -> list[torch.Tensor]:
        return [self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b]

    def delta_weight(self) -> torch.Tensor:
        return loha_delta_weight(*self._factors(), self.scale, self.host.weight_shape)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, True) if self.dropout and self.training else x

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.op(self._drop(x), self.delta_weight())

    def fused_linear(self, x, weight, bias, scale):
        if self.dropout and self.training:
            return None  # the host sees x, the adapter a dropped-out x: keep them apart
        return linear_with_weight_delta(x, weight, bias, scale,
                                        WeightDelta(self.delta_weight, self._factors()))

    # --- the "loha" file layout (LyCORIS LoHa, no Tucker) --------------------------------
    def export_factors(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """dW = (w1_a w1_b) * (w2_a w2_b) * alpha / r gives ``scale * delta_weight()``:
        the parameters as they are with this layer's alpha, ``scale`` folded into w1_a."""
        r = self.hada_w1_b.shape[0]
        alpha = float(r) if self.config.alpha is None else float(self.config.alpha)
        out = {k: p.detach().float().clone() for k, p in zip(FACTOR_KEYS, self._factors())}
        if scale != 1.0:
            out["hada_w1_a"].mul_(scale)
        out["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return out

    @torch.no_grad()
    def import_factors(self, factors: dict[str, torch.Tensor]) -> None:
        """The file's alpha / r is folded into w1_a relative to this layer's scale. A lower
        rank is zero-padded; a higher one is reduced exactly by SVD only when this layer's
        rank is already its full rank (neither product can have more)."""
        tucker = sorted(k for k in factors if k in ("hada_t1", "hada_t2", "dora_scale"))
        if tucker:
            raise ValueError(f"LoHa factors with {tucker} (Tucker-decomposed or weight-decomposed "
                             "LoHa) cannot be held by this layer's plain LoHa")
        missing = [k for k in FACTOR_KEYS if k not in factors]
        if missing:
            raise ValueError(f"LoHa factors lack {missing}; expected {list(FACTOR_KEYS)} (and alpha)")
        w1a, w1b, w2a, w2b = (factors[k].detach().float() for k in FACTOR_KEYS)
        # a conv's b factor may come as a kernel (r, in/groups, kh, kw)
        w1b, w2b = (t.flatten(1) if t.dim() > 2 else t for t in (w1b, w2b))
        mine = [tuple(p.shape) for p in self._factors()]
        theirs = [tuple(factors[k].shape) for k in FACTOR_KEYS]
        out, r = self.hada_w1_a.shape
        fan_in = self.hada_w1_b.shape[1]
        fits = (w1a.dim() == w2a.dim() == w1b.dim() == w2b.dim() == 2
                and w1a.shape[0] == w2a.shape[0] == out and w1b.shape[1] == w2b.shape[1] == fan_in
                and w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0])
        if not fits:
            raise ValueError(f"LoHa factors of shapes {theirs} (w1_a, w1_b, w2_a, w2_b) do not give "
                             f"this layer's dW {(out, fan_in)}; its LoHa holds {mine}")
        ratio = file_scale(factors.get("alpha"), w1b.shape[0]) / self.scale
        if ratio != 1.0:
            w1a = w1a * ratio
        pairs = [(w1a, w1b), (w2a, w2b)]
        if max(w1b.shape[0], w2b.shape[0]) > r:
            if r < min(out, fan_in):
                raise ValueError(f"LoHa factors of shapes {theirs} have rank "
                                 f"{max(w1b.shape[0], w2b.shape[0])}, above this layer's rank {r} "
                                 f"(its LoHa holds {mine})")
            pairs = [_reduce_rank(a, b, r) if b.shape[0] > r else (a, b) for a, b in pairs]
        for (a, b), pa, pb in zip(pairs, self._factors()[0::2], self._factors()[1::2]):
            k = b.shape[0]
            pa.zero_()[:, :k].copy_(a)
            pb.zero_()[:k].copy_(b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.hada_w1_b.shape[0]}, scale={self.scale:g}"


@register_method("loha", LoHaModule, layer_kinds=("linear", "conv2d"), factor_layout="loha",
                 folded_fields=("alpha",))
@dataclass(frozen=True)
class LoHaConfig(MethodConfig):
    """r: rank of each of the two products (dW has rank up to r^2); alpha: scale numerator
    (None = r, i.e. scale 1); dropout on the adapter input; rank_pattern: {exact layer
    name: rank} for layers that differ from r (imported files with per-layer ranks use it).
    Trainable per layer: 2 r (out + fan_in), fan_in = in/groups * kh * kw."""

    r: int = 8
    dropout: float = 0.0
    rank_pattern: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "rank_pattern", rank_pattern_pairs("LoHaConfig", self.rank_pattern))
        super().__post_init__()

    @classmethod
    def from_factors(cls, factors: dict[str, dict], target_modules: list[str]) -> "LoHaConfig":
        """Every layer at its factors' rank (capped by what the layer can hold): with one
        rank and one alpha throughout, r and alpha are the file's and the tensors load as
        they are; otherwise r is the most common rank, the others go to rank_pattern, and
        alpha is None (scale 1): each layer's alpha / r is folded into its w1_a."""
        if not factors:
            raise ConfigError("LoHaConfig.from_factors needs at least one layer's factors")
        ranks, alphas = {}, set()
        for m, f in factors.items():
            k = max(f["hada_w1_b"].shape[0], f["hada_w2_b"].shape[0])
            ranks[m] = min(k, f["hada_w1_a"].shape[0], f["hada_w1_b"][0].numel())
            a = f.get("alpha")
            alphas.add(None if a is None else float(a))
        r, pattern = split_ranks(ranks)
        if not pattern and len(alphas) == 1:
            (alpha,) = alphas
            if alpha is None or alpha == 0.0:  # LyCORIS reads both as alpha = r: scale 1
                return cls(r=r, target_modules=target_modules)
            if 0.0 < alpha < math.inf:
                return cls(r=r, alpha=alpha, target_modules=target_modules)
        return cls(r=r, target_modules=target_modules, rank_pattern=pattern)

    def for_layer(self, name: str, index: int | None = None) -> "LoHaConfig":
        ranks = dict(self.rank_pattern)
        return self.replace(r=ranks[name], rank_pattern=()) if name in ranks else self

    def validate(self) -> None:
        check_positive_int(self, "r")
        check_dropout(self)
