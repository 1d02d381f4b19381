"""SNELL's torch.compile'd loops (ops/compiled.py): the kernel's pointwise form
(ops/snell_math.py) built entry by entry with no intermediate GEMM, so that inductor
fuses each function into one loop over (out, in) or a few.

Each writes into buffers it is given (ops/workspace.py: no fresh (out, in) memory per
step on CPU); inductor stores straight into them. (m, z, mix) are None for SNELL, and
SNELLA's column statistics and [a, t, c] otherwise. Scalars that change between steps
(threshold, host scale, mix) come as tensors, so a new value never recompiles.
"""
from __future__ import annotations

import functools

import torch

from .compiled import compiled
from .snell_math import (combine_halves, pointwise_factor_grads, pointwise_kept, pointwise_mixed, pointwise_terms,
                         terms_from_differences)


def _kernel(A, Bt, kernel: str, scale: float, m, z, mix) -> torch.Tensor:
    """SNELL's kernel matrix entry by entry, or SNELLA's K when ``m`` is given."""
    D = combine_halves(*pointwise_terms(A, Bt, kernel, scale), kernel, scale)
    return D if m is None else pointwise_mixed(D, m, z, mix)[0]


@compiled
def fused_kernel_matrix(A, Bt, kernel: str, scale: float, m, z, mix, out) -> None:
    """out = the dense kernel matrix (nothing zeroed)."""
    out.copy_(_kernel(A, Bt, kernel, scale, m, z, mix))


@compiled
def fused_column_stats(A, Bt, kernel: str, scale: float, mix):
    """SNELLA's softmax statistics per column: (max_i D / t, sum_i exp(D / t - max))."""
    Dt = combine_halves(*pointwise_terms(A, Bt, kernel, scale), kernel, scale) / mix[1]
    m = Dt.amax(0)
    return m, torch.exp(Dt - m).sum(0)


@compiled
def fused_kernel_and_count(A, Bt, kernel: str, scale: float, m, z, mix, lo, hi, segments: int, out):
    """out = the dense kernel matrix, then the count pass of ``kth_smallest`` over |dW|
    with the bracket [lo, hi] (a second loop over ``out``). Rather than a compaction of the
    entries inside (torch.nonzero, a slow extra pass), the flat matrix is cut into
    ``segments`` interleaved strips (entry e in strip e // (n / segments)) and, for every
    position across the strips, the number of entries inside and the smallest of them are
    reduced: with ~1% inside, a position holds at most one almost always, and that one is
    its minimum. Returns (#|dW| < lo, counts, minima)."""
    out.copy_(_kernel(A, Bt, kernel, scale, m, z, mix))
    a = out.abs().reshape(segments, -1)  # read back: computed from D, inductor keeps a temporary copy
    inside = (a >= lo) & (a <= hi)
    return ((a < lo).sum(), inside.sum(0, dtype=torch.int32),
            torch.where(inside, a, torch.full_like(a, float("inf"))).amin(0))


@compiled
def fused_sample(A, B, rows, cols, kernel: str, scale: float, m, z, mix) -> torch.Tensor:
    """|dW| at the positions (rows, cols), from the factors."""
    Ai, Bj = A[rows], B[cols]
    terms = terms_from_differences(lambda k: Ai[:, k] - Bj[:, k], A.shape[1] // 2, kernel, scale)
    D = combine_halves(*terms, kernel, scale)
    return (D if m is None else pointwise_mixed(D, m[cols], z[cols], mix)[0]).abs()


@functools.lru_cache(maxsize=64)
def sample_positions(n: int, fan_in: int, sample: int, device: torch.device):
    """Row and column of every (n // sample)-th entry of a flattened (n / fan_in, fan_in)."""
    flat = torch.arange(0, n, n // sample, device=device)
    return flat // fan_in, flat % fan_in


@compiled
def fused_effective_weight(D, W, threshold, host_scale, reweight: bool, out) -> None:
    """out = W + host_scale * keep_largest(D)."""
    out.copy_(W + host_scale * pointwise_kept(D, threshold, reweight).to(W.dtype))


def _weight_and_mask(K, W, G, threshold, host_scale, reweight: bool, w_out) -> torch.Tensor:
    """Write W' = W + s keep(K) into ``w_out``; return dL/dK from G = g^T x: masked to the
    kept entries, times the host scale (and |K| under reweight)."""
    w_out.copy_(W + host_scale * pointwise_kept(K, threshold, reweight).to(W.dtype))
    Gm = torch.where(K.abs() > threshold, G.to(K.dtype) * host_scale, 0.0)
    return Gm * K.abs() if reweight else Gm


@compiled(recompute=True)
def fused_weight_and_grads(A, Bt, W, G, threshold, kernel: str, scale: float, host_scale,
                           reweight: bool, w_out):
    """The backward's (out, in) work in one compiled function: rebuild the kernel, write
    W' = W + s dW for dL/dx, and from G = g^T x (mask, reweight and the host scale
    applied) reduce each half's H to its row sums, H B_k, column sums and H^T A_k, then
    assemble dL/dA, dL/dB from them. Inductor (with ``recompute``) emits a row loop, a
    column loop and the W' loop, each rebuilding the kernel from the factors; storing H or
    the kernel terms and reading them back measured 1.6x-2x slower."""
    terms = pointwise_terms(A, Bt, kernel, scale)
    D = combine_halves(*terms, kernel, scale)
    Gm = _weight_and_mask(D, W, G, threshold, host_scale, reweight, w_out)
    return pointwise_factor_grads(A, Bt, terms, Gm, kernel, scale)


@compiled(recompute=True)
def fused_mixed_weight_and_grads(A, Bt, W, G, threshold, kernel: str, scale: float, host_scale,
                                 reweight: bool, m, z, mix, w_out):
    """``fused_weight_and_grads`` for SNELLA's K = D + a S + c (``SNELLADelta``'s formulas:
    col = colsum(G S), Z = a S (G - col), dL/dD = G + Z / t), returning (dL/dA, dL/dB,
    [dL/da, dL/dt, dL/dc]). Inductor: a column loop for col, then the row, column and
    W' loops, each rebuilding D and S from the factors and the column statistics."""
    terms = pointwise_terms(A, Bt, kernel, scale)
    D = combine_halves(*terms, kernel, scale)
    K, S = pointwise_mixed(D, m, z, mix)
    Gm = _weight_and_mask(K, W, G, threshold, host_scale, reweight, w_out)
    col = (Gm * S).sum(0)
    Z = mix[0] * S * (Gm - col)
    grad_mix = torch.stack([col.sum(), -(Z * D).sum(1).sum() / (mix[1] * mix[1]), Gm.sum(0).sum()])
    return (*pointwise_factor_grads(A, Bt, terms, Gm + Z / mix[1], kernel, scale), grad_mix)
