"""SNELL (Shen et al., NeurIPS 2024, "Expanding Sparse Tuning for Low Memory Usage",
arXiv 2411.01800) and SNELLA's bi-level sparsity allocation (Shen et al., 2025,
arXiv 2510.24037).

dW[i, j] = k(a_i, b_j) for rows a_i of A (out, r) and b_j of B (fan_in, r) with a
non-linear kernel; then competition-based sparsification keeps, in every forward, only
the entries whose |dW| exceeds the layer's s-quantile (s = `sparsity`, the fraction set to
zero), so no index or mask is stored. The dense dW exists only inside the adapter's
forward, which runs under activation checkpointing: backward recomputes it instead of
keeping an (out, in) tensor alive, which is the method's memory saving.

Kernels (`kernel`):
  "distance" (authors' default): alpha * (||a1_i - b1_j|| - ||a2_i - b2_j||) over the two
      halves of the rank, alpha = 0.1 by default (the official code's constant)
  "linear": alpha * a_i . b_j, i.e. LoRA (alpha = 1 / r by default)
  "rbf": alpha * (exp(-||a1_i - b1_j||^2 / h) - exp(-||a2_i - b2_j||^2 / h)), h = r/2
A and B are Kaiming-uniform, as in the official code: dW is small but not zero at init.
`reweight=True` reproduces the official code's kept values, dW * |dW| (detached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import AdapterConfig, ConfigError, check_choice, check_positive_int
from ..core.registry import register_method
from ..ops.weight_delta import linear_with_weight_delta

KERNELS = ("distance", "linear", "rbf")


# --- pure math ------------------------------------------------------------------------
def kernel_matrix(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float) -> torch.Tensor:
    """(out, fan_in) matrix of k(a_i, b_j); half-precision factors are evaluated in fp32
    (distances of nearby points lose everything in fp16, and CPU cdist has no fp16)."""
    if A.dtype in (torch.float16, torch.bfloat16):
        return kernel_matrix(A.float(), B.float(), kernel, scale).to(A.dtype)
    if kernel == "linear":
        return (A @ B.t()) * scale
    h = A.shape[1] // 2
    A1, A2, B1, B2 = A[:, :h], A[:, h:], B[:, :h], B[:, h:]
    if kernel == "distance":
        return (torch.cdist(A1, B1) - torch.cdist(A2, B2)) * scale
    d1 = torch.cdist(A1, B1).square()
    d2 = torch.cdist(A2, B2).square()
    return (torch.exp(-d1 / h) - torch.exp(-d2 / h)) * scale


def zero_count(sparsity: float, numel: int) -> int:
    """Entries to zero for a sparsity fraction (computed in double precision)."""
    return int(math.floor(float(sparsity) * numel))


def kth_smallest(v: torch.Tensor, k: int, sample: int = 32768) -> torch.Tensor:
    """The k-th smallest value of a flat tensor (1-based), exactly as kthvalue but several
    times faster on large tensors: a strided sample brackets the k-th value, one pass
    counts what lies below the bracket, and kthvalue runs only inside it. A bracket that
    misses falls back to kthvalue on everything, so the answer is always exact.
    (torch.quantile is no option: it refuses tensors over 16M elements.)"""
    n = v.numel()
    if n < 4 * sample:
        return v.kthvalue(k).values
    sub = v[:: n // sample]
    m = sub.numel()
    q = k / n
    margin = 4.0 * math.sqrt(q * (1 - q) / m) + 2.0 / m
    lo = sub.kthvalue(max(1, math.floor((q - margin) * m))).values
    hi = sub.kthvalue(min(m, math.ceil((q + margin) * m))).values
    below = int((v < lo).sum())
    inside = v[(v >= lo) & (v <= hi)]
    if below >= k or below + inside.numel() < k:
        return v.kthvalue(k).values
    return inside.kthvalue(k - below).values


def sparsity_threshold(dW: torch.Tensor, n_zero: int) -> torch.Tensor | None:
    """The |dW| value at or below which the ``n_zero`` smallest entries lie (None: keep all)."""
    if n_zero <= 0:
        return None
    return kth_smallest(dW.detach().abs().flatten(), n_zero)


def apply_threshold(dW: torch.Tensor, threshold: torch.Tensor | None, reweight: bool = False) -> torch.Tensor:
    """Keep entries with |dW| above ``threshold`` (optionally as dW * |dW|, detached), zero
    the rest. The mask carries no gradient; the kept entries do."""
    mag = dW.detach().abs()
    kept = dW * mag if reweight else dW
    if threshold is None:
        return kept
    return torch.where(mag > threshold, kept, torch.zeros((), dtype=dW.dtype, device=dW.device))


def sparsify(dW: torch.Tensor, n_zero: int, reweight: bool = False) -> torch.Tensor:
    """Zero the ``n_zero`` entries with the smallest |dW| (ties aside)."""
    return apply_threshold(dW, sparsity_threshold(dW, n_zero), reweight)


# --- module -----------------------------------------------------------------------------
class SNELLModule(AdapterModule):
    def __init__(self, config: "SNELLConfig", host: HostSpec):
        super().__init__(config, host)
        r = config.r
        check_rank(r, host)
        if config.kernel != "linear" and r % 2:
            raise ValueError(f"kernel {config.kernel!r} splits the rank in two halves: r must be "
                             f"even, got r={r}")
        self.kernel = config.kernel
        default = {"distance": 0.1, "linear": 1.0 / r, "rbf": 1.0}[config.kernel]
        self.scale = default if config.alpha is None else float(config.alpha)
        self.reweight = config.reweight
        self.A = nn.Parameter(torch.empty(host.out_features, r))
        self.B = nn.Parameter(torch.empty(host.fan_in, r))
        for p in (self.A, self.B):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        # entries zeroed per forward: an integer buffer, so SNELLA's allocation is saved
        # with the adapter and no dtype cast of the module can round it
        self.numel = host.out_features * host.fan_in
        self.register_buffer("n_zero", torch.tensor(zero_count(config.sparsity, self.numel)))

    @property
    def sparsity(self) -> float:
        return int(self.n_zero) / self.numel

    def delta_weight(self) -> torch.Tensor:
        dW = kernel_matrix(self.A, self.B, self.kernel, self.scale)
        dW = sparsify(dW, int(self.n_zero), self.reweight)
        return dW.reshape(self.host.weight_shape)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.op(x, self.delta_weight().to(x.dtype))

    def fused_linear(self, x, weight, bias, scale):
        # host and delta in one GEMM; dW rebuilt in backward, never kept. The threshold
        # found in the forward is reused by the rebuild: same dW, same mask, one search
        found = {}

        def build() -> torch.Tensor:
            dW = kernel_matrix(self.A, self.B, self.kernel, self.scale)
            if "t" not in found:
                found["t"] = sparsity_threshold(dW, int(self.n_zero))
            return apply_threshold(dW, found["t"], self.reweight).reshape(self.host.weight_shape)

        return linear_with_weight_delta(x, weight, bias, scale, build, [self.A, self.B])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.A.requires_grad:
            # recompute dW in backward rather than keep it: only x is saved
            return checkpoint(self._delta, x, use_reentrant=False)
        return self._delta(x)


@register_method("snell", SNELLModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class SNELLConfig(AdapterConfig):
    """r: rank of A (out, r) and B (in, r); sparsity: fraction of dW set to zero in every
    forward, in (0, 1); kernel: "distance" (default), "linear" or "rbf"; alpha: kernel scale
    (None = 0.1 for distance, 1/r for linear, 1 for rbf); reweight: keep dW * |dW| as the
    official code does. Trainable per layer: r * (out + in)."""

    r: int = 8
    sparsity: float = 0.9
    kernel: str = "distance"
    reweight: bool = False

    def validate(self) -> None:
        check_positive_int(self, "r")
        check_choice(self, "kernel", set(KERNELS))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 < float(self.sparsity) < 1.0:
            raise ConfigError(f"SNELLConfig.sparsity is the fraction of dW set to zero and must be "
                              f"in (0, 1), got {self.sparsity!r}")
