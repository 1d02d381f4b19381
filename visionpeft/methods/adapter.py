"""Bottleneck Adapter (Houlsby et al., 2019; parallel form: AdaptFormer, Chen et al.,
NeurIPS 2022), the adapter PeftCD places around each encoder block.

    delta(h) = alpha * up(act(down(h)))        down: d_in -> bottleneck, up: -> d_out

with ``up`` zero-initialised, so a new adapter leaves the host unchanged. Placements
(the block wrapper applies them, see `visionpeft.core.layers.AdaptedBlock`):

  sequential, position "output"   y = f(x) + delta(f(x))      (Houlsby/Pfeiffer)
  sequential, position "input"    y = f(x + delta(x))         (PeftCD's official code)
  parallel                        y = f(x) + delta(x)         (AdaptFormer, alpha 0.1)

(x is what the block receives, after any input-position adapter on the same block.)

PeftCD's released code (dyzy41/PeftCD) adds one more GELU after ``up`` and leaves ``up``
at the default init; we keep the textbook form above (Houlsby et al., 2019: zero-initialised
``up``), which starts at the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import BlockAdapterModule, HostSpec
from ..core.config import MethodConfig, check_choice, check_dropout, check_positive_int
from ..core.registry import register_method

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


# --- pure math ------------------------------------------------------------------------
def bottleneck_delta(h: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor | None,
                     up_w: torch.Tensor, up_b: torch.Tensor | None, activation: str = "gelu",
                     scale: float = 1.0, channels_first: bool = False,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """scale * up(act(down(h))) over the feature axis of h (last, or dim 1 when
    ``channels_first``: a 1x1 conv on (B, C, H, W))."""
    if channels_first:
        h = h.movedim(1, -1)
    z = ACTIVATIONS[activation](F.linear(h, down_w, down_b))
    if dropout:
        z = F.dropout(z, dropout, training)
    out = F.linear(z, up_w, up_b)
    if scale != 1.0:
        out = out * scale
    return out.movedim(-1, 1) if channels_first else out


# --- module -------------------------------------------------------------------------------
class BottleneckAdapterModule(BlockAdapterModule):
    def __init__(self, config: "AdapterConfig", host: HostSpec):
        super().__init__(config, host)
        self.placement = "parallel" if config.placement == "parallel" else config.position
        d_in = host.out_features if self.placement == "output" else host.in_features
        d_out = host.in_features if self.placement == "input" else host.out_features
        if config.bottleneck > min(d_in, d_out):
            raise ValueError(f"bottleneck={config.bottleneck} is wider than the features it "
                             f"adapts ({d_in} -> {d_out}); use bottleneck <= {min(d_in, d_out)}")
        self.d_in, self.d_out = d_in, d_out
        self.scale = 1.0 if config.alpha is None else float(config.alpha)
        self.down = nn.Linear(d_in, config.bottleneck)  # default (Kaiming-uniform) init
        self.up = nn.Linear(config.bottleneck, d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        first = self.config.channels == "first"
        size = h.shape[1] if first else h.shape[-1]
        if h.dim() < (3 if first else 1) or size != self.d_in:
            where = "dim 1 (channels: first)" if first else "the last dim (channels: last)"
            raise ValueError(f"adapter expects {self.d_in} features on {where}, got hidden "
                             f"states of shape {tuple(h.shape)}. If the features sit on the "
                             f"other axis, set channels={'last' if first else 'first'}; if the "
                             "block widens its input inside (e.g. concatenates skip "
                             "connections, as diffusers' up-blocks do), target its inner "
                             "blocks (resnets, transformer_blocks) instead")
        return bottleneck_delta(h, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                self.config.activation, self.scale, first,
                                self.config.dropout, self.training)

    def extra_repr(self) -> str:
        return f"{self.placement}, {self.d_in} -> {self.config.bottleneck} -> {self.d_out}"


@register_method("adapter", BottleneckAdapterModule, layer_kinds=("block",), weight_space=False)
@dataclass(frozen=True)
class AdapterConfig(MethodConfig):
    """Bottleneck adapter around whole modules (blocks, MLPs, any Linear).

    bottleneck: hidden width; placement: "sequential" or "parallel" (AdaptFormer);
    position: where a sequential adapter sits, "output" (after the block) or "input"
    (before it, as PeftCD does); alpha: output scale (None = 1; AdaptFormer uses 0.1);
    activation: gelu / relu / silu; dropout on the bottleneck; channels: "last" for token
    layouts (B, N, C) and (B, H, W, C), "first" for (B, C, H, W) conv blocks.
    Trainable per module: bottleneck * (d_in + d_out) + bottleneck + d_out.
    """

    bottleneck: int = 64
    placement: str = "sequential"
    position: str = "output"
    activation: str = "gelu"
    dropout: float = 0.0
    channels: str = "last"

    def validate(self) -> None:
        check_positive_int(self, "bottleneck")
        check_choice(self, "placement", {"sequential", "parallel"})
        check_choice(self, "position", {"input", "output"})
        check_choice(self, "activation", set(ACTIVATIONS))
        check_choice(self, "channels", {"last", "first"})
        check_dropout(self)
