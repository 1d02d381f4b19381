"""What a method sees of a host layer, and the contract an adapter module keeps.

A host layer is described once (`HostSpec`: kind, weight shape, op and op kwargs);
methods build their factors from it and never ``isinstance``-check host modules.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HostSpec:
    """The weight an adapter updates: a Linear (out, in) or a Conv2d (out, in/g, kh, kw).

    For a slice of a fused projection (``qkv[q]``, an MHA's in_proj slice) ``out_features``
    is the slice's height: the adapter sees only its rows.
    """

    kind: str  # "linear" | "conv2d"
    out_features: int
    in_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @property
    def fan_in(self) -> int:
        """Columns of the weight viewed as a matrix (in/g * kh * kw for a conv)."""
        return math.prod(self.weight_shape[1:])

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The host's operation with another weight and no bias."""
        if self.kind == "linear":
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    @staticmethod
    def from_module(module: nn.Module, rows: int | None = None) -> "HostSpec":
        if isinstance(module, nn.Linear):
            return HostSpec("linear", rows or module.out_features, module.in_features)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise TypeError(
                    f"Conv2d with padding_mode={module.padding_mode!r} is not supported; "
                    "only 'zeros' padding can be adapted"
                )
            return HostSpec("conv2d", rows or module.out_channels, module.in_channels,
                            tuple(module.kernel_size), tuple(module.stride), module.padding,
                            tuple(module.dilation), module.groups)
        raise TypeError(f"no host description for {type(module).__name__}")


def check_rank(r: int, host: HostSpec, fan_in: int | None = None, note: str = "") -> None:
    """Refuse a rank above what the layer (as an out x fan_in matrix) can hold."""
    fan_in = host.fan_in if fan_in is None else fan_in
    limit = min(host.out_features, fan_in)
    if r > limit:
        raise ValueError(f"rank r={r} is larger than the layer allows (weight "
                         f"{tuple(host.weight_shape)}, as a matrix {host.out_features} x "
                         f"{fan_in}{note}); use r <= {limit}")


class AdapterModule(nn.Module, abc.ABC):
    """Base of every method's per-layer module.

    Subclasses define ``delta_weight()`` (the full update of the host weight, the
    method's own scale included) and may override ``delta(x)`` with a cheaper
    activation-space form and ``add_delta(x, y, scale)`` with a fused one. The defaults
    fall back to the host op applied with ``delta_weight()``, which is exact for any
    layer kind (grouped convs included) but builds dW every call.
    """

    def __init__(self, config, host: HostSpec):
        super().__init__()
        self.config = config
        self.host = host

    @abc.abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """dW with the host weight's shape, the method's own scale included."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.op(x, self.delta_weight())

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """``y + scale * delta(x)``; methods fuse this where it saves a pass over y, and may
        write into ``y``: the wrapper passes a tensor it owns."""
        d = self.delta(x)
        return y + d if scale == 1.0 else y + scale * d

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
        """Optional: ``F.linear(x, weight, bias) + scale * delta(x)`` as one op, for a plain
        nn.Linear host with this adapter alone active. None means "not offered here" and
        the wrapper runs the host op and `add_delta` instead."""
        return None

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype

    def extra_repr(self) -> str:
        return f"{self.host.kind} {tuple(self.host.weight_shape)}"
