"""DiffuseKronA (Marjit et al., 2024, arXiv 2402.17412): dW = alpha * kron(A, B).

A (a1, a2), B (out/a1, in/a2): a1 splits the output, a2 the input. A starts random and B
at zero, so dW = 0 at init. The layout is LyCORIS LoKr's (w1 = A, w2 = B), which keeps
kohya / ComfyUI export a renaming. For a Conv2d, B carries the kernel dims, as in LoKr:
B (out/a1, in/a2, kh, kw) and dW = kron(A[..., None, None], B).

The forward never builds dW: with x viewed as (..., a2, in/a2),
x @ kron(A, B)^T = A @ (X @ B^T) flattened, which costs N * (in * out / a1 + a1 * out)
multiply-adds instead of N * in * out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule, HostSpec
from ..core.config import MethodConfig, ConfigError
from ..core.registry import register_method


# --- pure math ------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def sqrt_factor(n: int) -> int:
    """The largest divisor of n not above sqrt(n): the most balanced split n = f * (n/f)."""
    return max(d for d in divisors(n) if d * d <= n)


def krona_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """alpha * kron(A, B); for a conv B is (p, q, kh, kw) and A acts per kernel tap."""
    if B.dim() == 4:
        A = A[:, :, None, None]
    return torch.kron(A, B) * scale


def krona_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ (scale * kron(A, B))^T without building the Kronecker product."""
    a1, a2 = A.shape
    p, q = B.shape
    X = x.reshape(-1, a2, q)
    Y = torch.matmul(A * scale, X @ B.t())  # (N, a1, p)
    return Y.reshape(*x.shape[:-1], a1 * p)


def krona_conv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               host: HostSpec) -> torch.Tensor:
    """conv2d(x, scale * kron(A, B)) as a conv of each input group with B, mixed by A."""
    a1, a2 = A.shape
    p, q = B.shape[:2]
    n, _, h, w = x.shape
    z = F.conv2d(x.reshape(n * a2, q, h, w), B, None, host.stride, host.padding, host.dilation)
    z = z.reshape(n, a2, p, *z.shape[-2:])
    y = torch.einsum("ij,njphw->niphw", A * scale, z)
    return y.reshape(n, a1 * p, *y.shape[-2:])


# --- module -----------------------------------------------------------------------------
def _factor(requested: int | None, size: int, what: str, field: str) -> int:
    if requested is None:
        return sqrt_factor(size)
    if size % requested:
        raise ValueError(f"{field}={requested} does not divide the layer's {what} ({size}); "
                         f"valid {field}: {divisors(size)}")
    return requested


class KronAModule(AdapterModule):
    def __init__(self, config: "KronAConfig", host: HostSpec):
        super().__init__(config, host)
        in_ch = host.in_features // host.groups
        a1 = _factor(config.a1, host.out_features, "output size", "a1")
        a2 = _factor(config.a2, in_ch, "input size" + (" per group" if host.groups > 1 else ""), "a2")
        self.scale = 1.0 if config.alpha is None else float(config.alpha)
        self.A = nn.Parameter(torch.empty(a1, a2))
        b_shape = (host.out_features // a1, in_ch // a2)
        if host.kind == "conv2d":
            b_shape += tuple(host.kernel_size)
        self.B = nn.Parameter(torch.zeros(b_shape))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return krona_delta_weight(self.A, self.B, self.scale)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.host.kind == "linear":
            return krona_linear(x, self.A, self.B, self.scale)
        if self.host.groups == 1:
            return krona_conv(x, self.A, self.B, self.scale, self.host)
        return self.host.op(x, self.delta_weight())  # grouped conv: exact via dW


@register_method("krona", KronAModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class KronAConfig(MethodConfig):
    """a1: output factor (A has a1 rows, B out/a1); a2: input factor (A has a2 columns, B
    in/a2). None picks, per layer, the most balanced divisor (the largest one not above
    the square root of the size). alpha: plain multiplier of kron(A, B) (None = 1).
    Trainable per layer: a1 * a2 + (out/a1) * (in/a2) [* kh * kw]."""

    a1: int | None = None
    a2: int | None = None

    def validate(self) -> None:
        for name in ("a1", "a2"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"KronAConfig.{name} must be a positive integer or None "
                                  f"(balanced per layer), got {v!r}")
