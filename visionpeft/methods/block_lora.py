"""Block-LoRA (Zhou et al., 2025, "One Head Eight Arms", arXiv 2501.16720).

LoRA's down projection A (r, in) is split into n column blocks that all share one
matrix A0 (r, in/n): dW = (alpha / r) B [A0 A0 ... A0]. Then A x = A0 (x_1 + ... + x_n)
for the n consecutive input chunks x_i, so a sum of chunks replaces n - 1 of the n block
products, and parameters drop from r (in + out) to r (in/n + out).

Our reading: the abstract says the method "partitions the low-rank decomposition matrix
into sub-matrices while sharing all down-projection sub-matrices" and turns
multiplications into additions; the form above is the one that does both. The paper's
method section could not be consulted where this was written: check it before relying on
details beyond that (README, Block-LoRA section).

For a Conv2d the blocks are groups of input channels (n must divide in_channels, per
group for a grouped conv): the n channel blocks of x are summed, then A0 acts as a
kh x kw conv in/n -> r and B as 1x1 (grouped convs go through dW).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import MethodConfig, check_dropout, check_positive_int
from ..core.registry import register_method
from ..ops.factorize import divisors
from ..ops.low_rank import lora_add_linear, lora_linear, lora_scale
from ..ops.routed import cached_stacks, dropped_once, routed_low_rank_add, scaled, stack_with_empty


# --- pure math ------------------------------------------------------------------------
def block_lora_delta_weight(A0: torch.Tensor, B: torch.Tensor, n: int, scale: float,
                            weight_shape: tuple[int, ...]) -> torch.Tensor:
    """scale * B [A0 ... A0]; for a conv, A0 is (r, in/n * kh * kw) and the repeat runs
    over input-channel groups."""
    r = A0.shape[0]
    if len(weight_shape) == 4:
        out, cin, kh, kw = weight_shape
        full_A = A0.view(r, 1, cin // n, kh * kw).expand(r, n, cin // n, kh * kw)
        return (B @ full_A.reshape(r, -1)).mul_(scale).reshape(weight_shape)
    return (B @ A0.repeat(1, n)).mul_(scale)


def block_sum(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """x_1 + ... + x_n over n consecutive chunks of ``dim``."""
    shape = x.shape
    dim = dim % x.dim()
    return x.reshape(*shape[:dim], n, shape[dim] // n, *shape[dim + 1:]).sum(dim)


# --- module -----------------------------------------------------------------------------
class BlockLoRAModule(AdapterModule):
    def __init__(self, config: "BlockLoRAConfig", host: HostSpec):
        super().__init__(config, host)
        n, r = config.n_blocks, config.r
        in_ch = host.in_features // host.groups
        if in_ch % n:
            raise ValueError(f"n_blocks={n} does not divide the layer's input size ({in_ch}); "
                             f"valid n_blocks: {divisors(in_ch)}")
        block_fan_in = host.fan_in // n
        check_rank(r, host, block_fan_in, f" per block with n_blocks={n}")
        self.n = n
        self.scale = lora_scale(config.alpha, r, config.rank_stabilized)
        self.dropout = config.dropout
        self.A0 = nn.Parameter(torch.empty(r, block_fan_in))
        self.B = nn.Parameter(torch.zeros(host.out_features, r))
        nn.init.kaiming_uniform_(self.A0, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return block_lora_delta_weight(self.A0, self.B, self.n, self.scale, self.host.weight_shape)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, True) if self.dropout and self.training else x

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self._drop(x)
        if self.host.kind == "linear":
            return F.linear(F.linear(block_sum(x, self.n, -1), self.A0), self.B * self.scale)
        h = self.host
        if h.groups > 1:
            return super().delta(x)  # blocks run within each group: exact via dW
        kernel = self.A0.view(self.A0.shape[0], h.in_features // self.n, *h.kernel_size)
        z = F.conv2d(block_sum(x, self.n, 1), kernel, None, h.stride, h.padding, h.dilation)
        return F.conv2d(z, (self.B * self.scale)[:, :, None, None])

    def fused_linear(self, x, weight, bias, scale):
        # LoRA's fused host Function, fed the chunk sum: only (N, in/n) is saved
        if self.dropout and self.training:
            return None  # the host sees x, the adapter a dropped-out x: keep them apart
        return lora_linear(x, weight, bias, self.A0, self.B, self.scale * scale, blocks=self.n)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        if self.host.kind == "linear":  # LoRA's fused add on the summed chunks
            return lora_add_linear(block_sum(self._drop(x), self.n, -1), y, self.A0, self.B, self.scale * scale)
        return super().add_delta(x, y, scale)

    @classmethod
    def routed_add(cls, modules, scales, x, y, row_adapter, store=None):
        """Every row's Block-LoRA as one batched LoRA product. The chunk sum is shared by
        all rows: x is summed over g = gcd of the adapters' block counts, and an adapter
        with n blocks sees that sum through A0 repeated n / g times (each g-chunk holds
        n / g of its n-chunks, so this is its own sum of n chunks, exactly)."""
        if any(m.host.kind != "linear" for m in modules):
            return NotImplemented
        x = dropped_once(x, [m.dropout if m.training else 0.0 for m in modules])
        if x is None:
            return NotImplemented
        g = math.gcd(*(m.n for m in modules))

        def build():
            return (stack_with_empty([m.A0.repeat(1, m.n // g) if m.n > g else m.A0 for m in modules], pad_dims=(0,)),
                    scaled(stack_with_empty([m.B for m in modules], pad_dims=(1,)),
                           [m.scale * s for m, s in zip(modules, scales)]))

        A, B = cached_stacks(store, [p for m in modules for p in (m.A0, m.B)], tuple(scales), build)
        return routed_low_rank_add(x if g == 1 else block_sum(x, g, -1), y, A, B, row_adapter)


@register_method("block_lora", BlockLoRAModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class BlockLoRAConfig(MethodConfig):
    """r: rank; n_blocks: input blocks sharing one down projection A0 (must divide the
    layer's input size); alpha: scale numerator, dW = (alpha / r) B [A0 ... A0] (None = r);
    rank_stabilized: alpha / sqrt(r) instead (CLIP-LoRA's scaling, the baseline the paper
    builds on); dropout: on the adapter's input, as CLIP-LoRA applies it (0.25 there).
    Trainable per layer: r * (in / n_blocks + out)."""

    r: int = 8
    n_blocks: int = 8
    dropout: float = 0.0
    rank_stabilized: bool = False

    def validate(self) -> None:
        check_positive_int(self, "r")
        check_positive_int(self, "n_blocks")
        check_dropout(self)
