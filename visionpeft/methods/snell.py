"""SNELL (Shen et al., NeurIPS 2024, "Expanding Sparse Tuning for Low Memory Usage",
arXiv 2411.01800) and SNELLA's mixed kernel (Shen et al., 2025, arXiv 2510.24037): the
config, the formula and the module. The machinery lives in ops/: the kernel in its eager
and pointwise forms and its gradient (snell_math.py), the exact threshold search (kth.py),
the hand-written autograd (snell_autograd.py), the compiled loops (snell_kernels.py) and
the C backward (snell_native.py, snell_backward.c).

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

Inside `with vp.kernels(compiled=True)` (or with `vp.set_compiled_kernels(True)`) the
distance and RBF kernels on a plain Linear run as torch.compile'd loops instead: dW built
entry by entry and the threshold's count pass compiled with it, W' in one loop, the whole
backward in one function; SNELLA's softmax term adds a loop for its column statistics. On
CPU the distance kernel's backward then runs in C (``native_sparse_grads``): the factor
gradients need g^T x only where the mask keeps dW, so it takes one dot product per kept
entry instead of the host-size GEMM.

SNELLA's mixed kernel (`softmax_term=True`; read from the official SNELLA layer in
ssfgunner/SNELL, the paper's method text was not available to us): with D the kernel
matrix above, dW = D + a * softmax(D / t) + c before sparsification, the softmax taken
over the output index for each input (dim 0 of our (out, in) layout), and a, t, c three
learnable scalars per layer initialised to 1, 1, 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import MethodConfig, ConfigError, check_choice, check_positive_int
from ..core.registry import register_method
from ..ops.kth import kth_smallest, sparsity_threshold
from ..ops.snell_autograd import SNELLADelta, SNELLDelta, SparseKernel
from ..ops.snell_math import KERNELS, keep_largest, mixed_kernel
from ..ops.weight_delta import linear_with_weight_delta

__all__ = ["KERNELS", "SNELLConfig", "SNELLModule", "keep_largest", "kernel_matrix", "kth_smallest", "mixed_kernel",
           "snell_delta", "snella_delta", "sparsify", "sparsity_threshold", "zero_count"]


# --- the formula ------------------------------------------------------------------------
def snell_delta(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float, n_zero: int,
                reweight: bool = False) -> torch.Tensor:
    """SNELL's sparse dW (out, fan_in): the kernel matrix with its ``n_zero`` smallest
    entries zeroed. Half-precision factors, and any under autocast, are evaluated in fp32
    (distances of nearby points lose everything in fp16)."""
    if A.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(A.device.type):
        # autocast would run the distance GEMMs in half precision: the kernel stays fp32
        with torch.autocast(A.device.type, enabled=False):
            return snell_delta(A.float(), B.float(), kernel, scale, n_zero, reweight).to(A.dtype)
    return SparseKernel.apply(A, B, kernel, float(scale), int(n_zero), reweight)


def snella_delta(A, B, kernel: str, scale: float, n_zero: int, mix_alpha, temperature, shift,
                 reweight: bool = False) -> torch.Tensor:
    """SNELLA's sparse dW: the mixed kernel with its ``n_zero`` smallest |entries| zeroed.
    Autograd runs through the softmax; the base kernel keeps its hand-written gradient."""
    if A.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(A.device.type):
        with torch.autocast(A.device.type, enabled=False):
            return snella_delta(A.float(), B.float(), kernel, scale, n_zero, mix_alpha.float(),
                                temperature.float(), shift.float(), reweight).to(A.dtype)
    K = mixed_kernel(kernel_matrix(A, B, kernel, scale), mix_alpha, temperature, shift)
    return keep_largest(K, sparsity_threshold(K, int(n_zero)), reweight)


def kernel_matrix(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float) -> torch.Tensor:
    """(out, fan_in) matrix of k(a_i, b_j), nothing zeroed."""
    return snell_delta(A, B, kernel, scale, 0)


def zero_count(sparsity: float, numel: int) -> int:
    """Entries to zero for a sparsity fraction (computed in double precision)."""
    # rounded to 1e-6 of an entry first: 0.29 * 100 is 28.999999999999996 in floats
    return int(math.floor(round(float(sparsity) * numel, 6)))


def sparsify(dW: torch.Tensor, n_zero: int, reweight: bool = False) -> torch.Tensor:
    """Zero the ``n_zero`` entries with the smallest |dW| (ties aside)."""
    return keep_largest(dW, sparsity_threshold(dW, n_zero), reweight)


# --- module -----------------------------------------------------------------------------
class SNELLModule(AdapterModule):
    """One layer's SNELL adapter: factors A (out, r) and B (fan_in, r), the count of dW
    entries zeroed per forward (a buffer SNELLA's allocator moves), SNELLA's a, t, c."""

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
        self._threshold_hint: dict = {}  # not state: only narrows the next exact search
        self.softmax_term = config.softmax_term
        if self.softmax_term:  # SNELLA: a * softmax(D / t) + c, three scalars per layer
            self.mix_alpha = nn.Parameter(torch.ones(()))
            self.temperature = nn.Parameter(torch.ones(()))
            self.shift = nn.Parameter(torch.zeros(()))

    @property
    def sparsity(self) -> float:
        return int(self.n_zero) / self.numel

    def delta_weight(self) -> torch.Tensor:
        if self.softmax_term:
            dW = snella_delta(self.A, self.B, self.kernel, self.scale, int(self.n_zero),
                              self.mix_alpha, self.temperature, self.shift, self.reweight)
        else:
            dW = snell_delta(self.A, self.B, self.kernel, self.scale, int(self.n_zero), self.reweight)
        return dW.reshape(self.host.weight_shape)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.op(x, self.delta_weight().to(x.dtype))

    def fused_linear(self, x, weight, bias, scale):
        # host and delta in one GEMM; dW rebuilt in backward, never kept. The rebuild
        # reuses the forward's threshold: same dW, same mask, one search
        args = (self.kernel, self.scale, int(self.n_zero), self.reweight, self.host.weight_shape)
        hint = self.__dict__.setdefault("_threshold_hint", {})  # set here too for layers unpickled from before it
        if self.softmax_term:
            delta = SNELLADelta(self.A, self.B, (self.mix_alpha, self.temperature, self.shift), *args, hint=hint)
        else:
            delta = SNELLDelta(self.A, self.B, *args, hint=hint)
        return linear_with_weight_delta(x, weight, bias, scale, delta)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.A.requires_grad:
            # recompute dW in backward rather than keep it: only x is saved
            return checkpoint(self._delta, x, use_reentrant=False)
        return self._delta(x)


@register_method("snell", SNELLModule, layer_kinds=("linear", "conv2d"))
@dataclass(frozen=True)
class SNELLConfig(MethodConfig):
    """r: rank of A (out, r) and B (in, r); sparsity: fraction of dW set to zero in every
    forward, in (0, 1); kernel: "distance" (default), "linear" or "rbf"; alpha: kernel scale
    (None = 0.1 for distance, 1/r for linear, 1 for rbf); reweight: keep dW * |dW| as the
    official code does; softmax_term: SNELLA's mixed kernel D + a softmax(D / t) + c.
    Trainable per layer: r * (out + in) (+ 3 with softmax_term)."""

    r: int = 8
    sparsity: float = 0.9
    kernel: str = "distance"
    reweight: bool = False
    softmax_term: bool = False

    def validate(self) -> None:
        check_positive_int(self, "r")
        check_choice(self, "kernel", set(KERNELS))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) \
                or not 0.0 < float(self.sparsity) < 1.0:
            raise ConfigError(f"SNELLConfig.sparsity is the fraction of dW set to zero and must be "
                              f"in (0, 1), got {self.sparsity!r}")
