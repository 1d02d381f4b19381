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

from ..core.adapter import AdapterModule, HostSpec
from ..core.config import AdapterConfig, ConfigError, check_choice, check_positive_int
from ..core.registry import register_method


# --- pure math ------------------------------------------------------------------------
def lora_scale(alpha: float | None, r: int, rank_stabilized: bool = False) -> float:
    alpha = float(r) if alpha is None else float(alpha)
    return alpha / (math.sqrt(r) if rank_stabilized else r)


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float,
                      weight_shape: tuple[int, ...]) -> torch.Tensor:
    return (B @ A).mul_(scale).reshape(weight_shape)


def lora_add_linear(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """y + scale * x A^T B^T with the add fused into the second GEMM (no pass over y for
    the scale, none for the sum)."""
    h = F.linear(x, A)
    Bt = B.t() if B.dtype == h.dtype else B.t().to(h.dtype)
    if y.dtype != h.dtype:
        return y + (h @ Bt).mul_(scale).to(y.dtype)
    out_shape = y.shape
    y2 = y.reshape(-1, out_shape[-1])
    return torch.addmm(y2, h.reshape(-1, h.shape[-1]), Bt, alpha=scale).view(out_shape)


def lora_delta_conv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                    host: HostSpec) -> torch.Tensor:
    r = A.shape[0]
    kernel = A.view(r, host.in_features, *host.kernel_size)
    h = F.conv2d(x, kernel, None, host.stride, host.padding, host.dilation)
    return F.conv2d(h, (B * scale).view(host.out_features, r, 1, 1))


# --- module -----------------------------------------------------------------------------
class LoRAModule(AdapterModule):
    def __init__(self, config: "LoRAConfig", host: HostSpec):
        super().__init__(config, host)
        r = config.r
        limit = min(host.out_features, host.fan_in)
        if r > limit:
            raise ValueError(f"rank r={r} is larger than the layer allows (weight "
                             f"{tuple(host.weight_shape)}, as a matrix {host.out_features} x "
                             f"{host.fan_in}); use r <= {limit}")
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

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        if self.host.kind == "linear":
            return lora_add_linear(self._drop(x), y, self.lora_A, self.lora_B, self.scale * scale)
        return super().add_delta(x, y, scale)


@register_method("lora", LoRAModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """r: rank; alpha: scale numerator (None = r, i.e. scale 1); dropout on the adapter
    input; rank_stabilized: alpha/sqrt(r); init of A: "kaiming" (PEFT's default) or
    "gaussian" (std 1/r)."""

    r: int = 8
    dropout: float = 0.0
    rank_stabilized: bool = False
    init: str = "kaiming"

    def validate(self) -> None:
        check_positive_int(self, "r")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        check_choice(self, "init", {"kaiming", "gaussian"})
