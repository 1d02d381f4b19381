"""LoRA (Hu et al., 2021, arXiv 2106.09685): dW = (alpha / r) B A, B = 0 at init.

Reference method and interop baseline. Factors are stored as matrices for every layer
kind: A (r, fan_in), B (out, r), fan_in = in/groups * kh * kw for a conv; the conv
forward views A as an (r, in, kh, kw) kernel and B as a 1x1 kernel. Rank-stabilised
scaling (Kalajdzievski, 2023, arXiv 2312.03732) uses alpha / sqrt(r).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import (MethodConfig, check_choice, check_dropout, check_positive_int, rank_pattern_pairs,
                           split_ranks)
from ..core.registry import register_method
from ..ops.low_rank import lora_add_linear, lora_delta_conv, lora_delta_weight, lora_linear, lora_scale
from ..ops.routed import cached_stacks, dropped_once, routed_low_rank_add, scaled, stack_with_empty


# --- module -----------------------------------------------------------------------------
class LoRAModule(AdapterModule):
    def __init__(self, config: "LoRAConfig", host: HostSpec):
        super().__init__(config, host)
        r = config.r
        check_rank(r, host)
        self.scale = lora_scale(config.alpha, r, config.rank_stabilized)
        self.lora_A = nn.Parameter(torch.empty(r, host.fan_in))
        self.lora_B = nn.Parameter(torch.zeros(host.out_features, r))
        self.dropout = config.dropout
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:  # same as nn.Linear's default init of a (r, fan_in) weight
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return lora_delta_weight(self.lora_A, self.lora_B, self.scale, self.host.weight_shape)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, True) if self.dropout and self.training else x

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self._drop(x)
        if self.host.kind == "linear":
            return F.linear(F.linear(x, self.lora_A), self.lora_B * self.scale)
        if self.host.groups == 1:
            return lora_delta_conv(x, self.lora_A, self.lora_B, self.scale, self.host)
        return self.host.op(x, self.delta_weight())  # grouped conv: exact via dW

    def fused_linear(self, x, weight, bias, scale):
        if self.dropout and self.training:
            return None  # the host sees x, the adapter a dropped-out x: keep them apart
        return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scale * scale)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        if self.host.kind == "linear":
            return lora_add_linear(self._drop(x), y, self.lora_A, self.lora_B, self.scale * scale)
        return super().add_delta(x, y, scale)

    @classmethod
    def routed_add(cls, modules, scales, x, y, row_adapter, store=None):
        """Every row's LoRA as one batched product: the A and B of all adapters stacked
        (ranks zero-padded to the largest), each row's pair gathered. Conv hosts run an
        adapter per sub-batch instead."""
        if any(m.host.kind != "linear" for m in modules):
            return NotImplemented
        x = dropped_once(x, [m.dropout if m.training else 0.0 for m in modules])
        if x is None:
            return NotImplemented
        def build():
            return (stack_with_empty([m.lora_A for m in modules], pad_dims=(0,)),
                    scaled(stack_with_empty([m.lora_B for m in modules], pad_dims=(1,)),
                           [m.scale * s for m, s in zip(modules, scales)]))

        sources = [p for m in modules for p in (m.lora_A, m.lora_B)]
        A, B = cached_stacks(store, sources, tuple(scales), build)
        return routed_low_rank_add(x, y, A, B, row_adapter)

    # --- the "lora" file layout: dW = up @ down, every scale folded into up --------------
    def export_factors(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        r = self.lora_A.shape[0]
        return {"down": self.lora_A.detach().float().reshape(r, *self.host.weight_shape[1:]),
                "up": self.lora_B.detach().float() * (self.scale * scale)}

    @torch.no_grad()
    def import_factors(self, factors: dict[str, torch.Tensor]) -> None:
        """A lower rank is zero-padded; a higher one is reduced exactly by SVD when this
        layer's rank is already its full rank (dW cannot have more)."""
        down, up = factors["down"].float().flatten(1), factors["up"].float().flatten(1)
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"down has rank {down.shape[0]}, up rank {up.shape[1]}; a LoRA pair shares one rank")
        r, fan_in = self.lora_A.shape
        if (up.shape[0], down.shape[1]) != (self.lora_B.shape[0], fan_in):
            raise ValueError(f"factors give dW {(up.shape[0], down.shape[1])}, this layer's LoRA "
                             f"holds {(self.lora_B.shape[0], fan_in)}")
        if down.shape[0] > r:
            if r < min(self.lora_B.shape[0], fan_in):
                raise ValueError(f"file rank {down.shape[0]} does not fit rank {r} of this layer's LoRA")
            U, S, Vh = torch.linalg.svd(up @ down, full_matrices=False)
            up, down = U[:, :r] * S[:r], Vh[:r]
        k = down.shape[0]
        self.lora_A.zero_()[:k].copy_(down)
        self.lora_B.zero_()[:, :k].copy_(up / self.scale)


@register_method("lora", LoRAModule, layer_kinds=("linear", "conv2d"), factor_layout="lora",
                 runtime_fields=("dropout", "init"), folded_fields=("alpha", "rank_stabilized"))
@dataclass(frozen=True)
class LoRAConfig(MethodConfig):
    """r: rank; alpha: scale numerator (None = r, i.e. scale 1); dropout on the adapter
    input; rank_stabilized: alpha/sqrt(r); init of A: "kaiming" (PEFT's default) or
    "gaussian" (std 1/r); rank_pattern: {exact layer name: rank} for layers that differ
    from r (imported files with per-layer ranks use it)."""

    r: int = 8
    dropout: float = 0.0
    rank_stabilized: bool = False
    init: str = "kaiming"
    rank_pattern: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "rank_pattern", rank_pattern_pairs("LoRAConfig", self.rank_pattern))
        super().__post_init__()

    @classmethod
    def from_factors(cls, factors: dict[str, dict], target_modules: list[str]) -> "LoRAConfig":
        """Scale 1, each layer at its factors' rank capped by what the layer can hold (dW
        has no more); the most common rank is r, the others go to rank_pattern."""
        ranks = {m: min(f["down"].shape[0], f["up"].shape[0], f["down"][0].numel())
                 for m, f in factors.items()}
        r, pattern = split_ranks(ranks)
        return cls(r=r, target_modules=target_modules, rank_pattern=pattern)

    def for_layer(self, name: str, index: int | None = None) -> "LoRAConfig":
        ranks = dict(self.rank_pattern)
        return self.replace(r=ranks[name], rank_pattern=()) if name in ranks else self

    def validate(self) -> None:
        check_positive_int(self, "r")
        check_dropout(self)
        check_choice(self, "init", {"kaiming", "gaussian"})
