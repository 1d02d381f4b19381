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

With `vp.set_compiled_kernels(True)` the distance and RBF kernels on a plain Linear run as
torch.compile'd loops instead (``fused_*`` below: dW built entry by entry and the
threshold's count pass compiled with it, W' in one loop, the whole backward in one function;
SNELLA's softmax term adds a loop for its column statistics). On CPU the distance kernel's
backward then runs in C (snell_backward.c, ``native_sparse_grads``): the factor gradients
need g^T x only where the mask keeps dW, so it takes one dot product per kept entry
instead of the host-size GEMM.

SNELLA's mixed kernel (`softmax_term=True`; read from the official SNELLA layer in
ssfgunner/SNELL, the paper's method text was not available to us): with D the kernel
matrix above, dW = D + a * softmax(D / t) + c before sparsification, the softmax taken
over the output index for each input (dim 0 of our (out, in) layout), and a, t, c three
learnable scalars per layer initialised to 1, 1, 0.
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..core.adapter import AdapterModule, HostSpec, check_rank
from ..core.config import MethodConfig, ConfigError, check_choice, check_positive_int
from ..core.registry import register_method
from ..ops.compiled import compiled, compiled_kernels_enabled
from ..ops.native import CLibrary
from ..ops.weight_delta import WeightDelta, linear_with_weight_delta
from ..ops.workspace import scratch

KERNELS = ("distance", "linear", "rbf")


# --- pure math ------------------------------------------------------------------------
def _squared_distances(A: torch.Tensor, B: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * ||a_i - b_j||^2 for all (i, j) as one matrix product of augmented factors,
    [-2a, |a|^2, 1] . [b, 1, |b|^2] (the expansion cdist itself uses on large inputs)."""
    sa, sb = A.square().sum(1, keepdim=True), B.square().sum(1, keepdim=True)
    Aa = torch.cat([A * (-2.0 * coef), sa * coef, torch.full_like(sa, coef)], 1)
    Bb = torch.cat([B, torch.ones_like(sb), sb], 1)
    return Aa @ Bb.t()


def _half_terms(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float) -> list[torch.Tensor]:
    """T1, T2 with dW = T1 - T2 (negated for a negative distance scale), one per half of
    the rank: distance |scale| * ||a_k - b_k||; rbf scale * exp(-||a_k - b_k||^2 / h)."""
    h = A.shape[1] // 2
    halves = (slice(0, h), slice(h, None))
    if kernel == "distance":
        return [_squared_distances(A[:, k], B[:, k], scale * scale).clamp_min_(0).sqrt_() for k in halves]
    return [_squared_distances(A[:, k], B[:, k], -1.0 / h).exp_().mul_(scale) for k in halves]


def _skinny_grads(H: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """(H B, H^T A, rowsum H, colsum H) in the layouts CPU BLAS runs fastest: the products
    are taken as (B^T H^T)^T and (A^T H)^T, several times faster than H @ B and H^T @ A."""
    HB = (torch.cat([B, torch.ones_like(B[:, :1])], 1).t() @ H.t()).t()
    HtA = (torch.cat([A, torch.ones_like(A[:, :1])], 1).t() @ H).t()
    return HB[:, :-1], HtA[:, :-1], HB[:, -1:], HtA[:, -1:]


def _raw_delta(A, B, kernel: str, scale: float):
    """(dW, terms): the dense kernel matrix and the per-half terms its gradient needs."""
    if kernel == "linear":
        return (A @ B.t()).mul_(scale), []
    terms = _half_terms(A, B, kernel, scale)
    dW = terms[0] - terms[1]
    return (dW.neg_() if kernel == "distance" and scale < 0 else dW), terms


def _factor_grads(A, B, terms: list[torch.Tensor], G: torch.Tensor, kernel: str, scale: float):
    """dL/dA, dL/dB from G = dL/d(dense dW). Overwrites ``terms`` (H is written over them):
    distance H_k = G / T_k (coincident points get no gradient, as in cdist's backward),
    rbf H_k = G * T_k."""
    if kernel == "linear":
        GB, GtA, _, _ = _skinny_grads(G, A, B)
        return GB * scale, GtA * scale
    if kernel == "distance":
        Hs = [torch.div(G, T, out=T).nan_to_num_(0.0, 0.0, 0.0) for T in terms]
    else:
        Hs = [T.mul_(G) for T in terms]
    return _grads_from_h(A, B, Hs, kernel, scale)


def _half_constant(kernel: str, scale: float, sign: float, h: int) -> float:
    """c of grad_a_i = c sum_j H_ij (a_i - b_j) for one half of the rank (sign +1 / -1)."""
    return sign * scale * abs(scale) if kernel == "distance" else -sign * 2.0 / h


def _grads_from_h(A, B, Hs: list[torch.Tensor], kernel: str, scale: float):
    """Each half of the kernel contributes grad_a_i = c sum_j H_ij (a_i - b_j) (mirrored
    for b_j): one skinny product per factor, rowsum(H) * A - H B. The constant c:
    distance d(|s| D)/da = s^2 (a - b) / (|s| D) with sign(s) folded in; rbf
    d(s exp(-d^2/h))/da = -(2/h) s exp(-d^2/h) (a - b)."""
    h = A.shape[1] // 2
    grad_A, grad_B = [], []
    for k, H, sign in ((slice(0, h), Hs[0], 1.0), (slice(h, None), Hs[1], -1.0)):
        c = _half_constant(kernel, scale, sign, h)
        Ak, Bk = A[:, k], B[:, k]
        HB, HtA, row, col = _skinny_grads(H, Ak, Bk)
        grad_A.append((row * Ak - HB) * c)
        grad_B.append((col * Bk - HtA) * c)
    return torch.cat(grad_A, 1), torch.cat(grad_B, 1)


# --- the same, entry by entry, for the compiled path (ops/compiled.py) -----------------
# Written as broadcasts over (out, in) with no intermediate GEMM, so that inductor fuses
# each function into one loop; the eager path above is faster without compilation.
def _pointwise_terms(A: torch.Tensor, Bt: torch.Tensor, kernel: str, scale: float) -> list[torch.Tensor]:
    """T1, T2 of ``_half_terms`` from A (out, r) and Bt = B^T (r, in), each squared
    distance summed coordinate by coordinate (exact: no |a|^2 + |b|^2 - 2ab cancellation)."""
    return _terms_from_differences(lambda k: A[:, k:k + 1] - Bt[k:k + 1], A.shape[1] // 2, kernel, scale)


def _terms_from_differences(diff, h: int, kernel: str, scale: float) -> list[torch.Tensor]:
    """T1, T2 from diff(k) = a_k - b_k, coordinate k of the rank, over any broadcast shape."""
    terms = []
    for k0 in (0, h):
        q = sum(diff(k).square() for k in range(k0, k0 + h))
        terms.append(abs(scale) * q.sqrt() if kernel == "distance" else scale * torch.exp(-q / h))
    return terms


def _pointwise_delta(terms: list[torch.Tensor], kernel: str, scale: float) -> torch.Tensor:
    D = terms[0] - terms[1]
    return -D if kernel == "distance" and scale < 0 else D


def _pointwise_mixed(D: torch.Tensor, m, z, mix) -> tuple[torch.Tensor, torch.Tensor]:
    """SNELLA's (K, S): K = D + a S + c, S = softmax over dim 0 of D / t, from the column
    statistics m = max_i D / t and z = sum_i exp(D / t - m); ``mix`` = [a, t, c] (a tensor:
    the three change every step, a Python float would recompile)."""
    S = torch.exp(D / mix[1] - m) / z
    return D + mix[0] * S + mix[2], S


def _pointwise_kernel(A, Bt, kernel: str, scale: float, m, z, mix) -> torch.Tensor:
    """SNELL's kernel matrix entry by entry, or SNELLA's K when ``m`` is given."""
    D = _pointwise_delta(_pointwise_terms(A, Bt, kernel, scale), kernel, scale)
    return D if m is None else _pointwise_mixed(D, m, z, mix)[0]


def _pointwise_kept(D: torch.Tensor, threshold: torch.Tensor, reweight: bool) -> torch.Tensor:
    kept = torch.where(D.abs() > threshold, D, 0.0)
    return kept * D.abs() if reweight else kept


# Each writes into buffers it is given (ops/workspace.py: no fresh (out, in) memory per
# step on CPU); inductor stores straight into them.
# (m, z, mix) are None for SNELL, SNELLA's column statistics and [a, t, c] otherwise.
@compiled
def fused_kernel_matrix(A, Bt, kernel: str, scale: float, m, z, mix, out) -> None:
    """out = the dense kernel matrix (nothing zeroed)."""
    out.copy_(_pointwise_kernel(A, Bt, kernel, scale, m, z, mix))


@compiled
def fused_column_stats(A, Bt, kernel: str, scale: float, mix):
    """SNELLA's softmax statistics per column: (max_i D / t, sum_i exp(D / t - max))."""
    Dt = _pointwise_delta(_pointwise_terms(A, Bt, kernel, scale), kernel, scale) / mix[1]
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
    out.copy_(_pointwise_kernel(A, Bt, kernel, scale, m, z, mix))
    a = out.abs().reshape(segments, -1)  # read back: computed from D, inductor keeps a temporary copy
    inside = (a >= lo) & (a <= hi)
    return ((a < lo).sum(), inside.sum(0, dtype=torch.int32),
            torch.where(inside, a, torch.full_like(a, float("inf"))).amin(0))


@compiled
def fused_effective_weight(D, W, threshold, host_scale, reweight: bool, out) -> None:
    """out = W + host_scale * keep_largest(D) (``host_scale`` a 0-d tensor: no recompile
    when the adapter's scale changes)."""
    out.copy_(W + host_scale * _pointwise_kept(D, threshold, reweight).to(W.dtype))


@compiled(recompute=True)
def fused_weight_and_grads(A, Bt, W, G, threshold, kernel: str, scale: float, host_scale,
                           reweight: bool, w_out):
    """The backward's (out, in) work in one compiled function: rebuild the kernel, write
    W' = W + s dW for dL/dx, and from G = g^T x (mask, reweight and the host scale
    applied) reduce each half's H_k of ``_grads_from_h`` to its row sums, H_k B_k, column
    sums and H_k^T A_k, then assemble dL/dA, dL/dB from them. Inductor (with
    ``recompute``) emits a row loop, a column loop and the W' loop, each rebuilding the
    kernel from the factors; storing H or the kernel terms and reading them back measured
    1.6x-2x slower. ``host_scale`` is a tensor, so a new adapter scale does not recompile."""
    terms = _pointwise_terms(A, Bt, kernel, scale)
    D = _pointwise_delta(terms, kernel, scale)
    Gm = _pointwise_weight_and_mask(D, W, G, threshold, host_scale, reweight, w_out)
    return _pointwise_factor_grads(A, Bt, terms, Gm, kernel, scale)


def _pointwise_weight_and_mask(K, W, G, threshold, host_scale, reweight: bool, w_out) -> torch.Tensor:
    """Write W' = W + s keep(K) into ``w_out``; return dL/dK from G = g^T x: masked to the
    kept entries, times the host scale (and |K| under reweight)."""
    w_out.copy_(W + host_scale * _pointwise_kept(K, threshold, reweight).to(W.dtype))
    Gm = torch.where(K.abs() > threshold, G.to(K.dtype) * host_scale, 0.0)
    return Gm * K.abs() if reweight else Gm


def _pointwise_factor_grads(A, Bt, terms: list[torch.Tensor], GD: torch.Tensor, kernel: str, scale: float):
    """dL/dA, dL/dB from GD = dL/d(kernel matrix): each half's H_k of ``_factor_grads``
    reduced to its row sums, H_k B_k, column sums and H_k^T A_k, then ``_grads_from_sums``."""
    h = A.shape[1] // 2
    rows, cols = [], []
    for T, k0 in zip(terms, (0, h)):
        H = torch.where(T > 0, GD / T, 0.0) if kernel == "distance" else GD * T
        rows.append(H.sum(1))
        cols.append(H.sum(0))
        for k in range(k0, k0 + h):
            rows.append((H * Bt[k:k + 1]).sum(1))
            cols.append((H * A[:, k:k + 1]).sum(0))
    return _grads_from_sums(A, Bt.t(), torch.stack(rows, 1), torch.stack(cols, 1), kernel, scale)


@compiled(recompute=True)
def fused_mixed_weight_and_grads(A, Bt, W, G, threshold, kernel: str, scale: float, host_scale,
                                 reweight: bool, m, z, mix, w_out):
    """``fused_weight_and_grads`` for SNELLA's K = D + a S + c (``SNELLADelta``'s formulas:
    col = colsum(G S), Z = a S (G - col), dL/dD = G + Z / t), returning (dL/dA, dL/dB,
    [dL/da, dL/dt, dL/dc]). Inductor: a column loop for col, then the row, column and
    W' loops, each rebuilding D and S from the factors and the column statistics."""
    terms = _pointwise_terms(A, Bt, kernel, scale)
    D = _pointwise_delta(terms, kernel, scale)
    K, S = _pointwise_mixed(D, m, z, mix)
    Gm = _pointwise_weight_and_mask(K, W, G, threshold, host_scale, reweight, w_out)
    col = (Gm * S).sum(0)
    Z = mix[0] * S * (Gm - col)
    grad_mix = torch.stack([col.sum(), -(Z * D).sum(1).sum() / (mix[1] * mix[1]), Gm.sum(0).sum()])
    return (*_pointwise_factor_grads(A, Bt, terms, Gm + Z / mix[1], kernel, scale), grad_mix)


def _grads_from_sums(A, B, rows, cols, kernel: str, scale: float):
    """``_grads_from_h`` from the row and column reductions, each half's block
    [sum, products...] of (out, 2 (h+1)) and (in, 2 (h+1))."""
    h = A.shape[1] // 2
    grad_A, grad_B = [], []
    for half, sign in ((0, 1.0), (1, -1.0)):
        c = _half_constant(kernel, scale, sign, h)
        k, j = slice(half * h, (half + 1) * h), half * (h + 1)
        grad_A.append((rows[:, j:j + 1] * A[:, k] - rows[:, j + 1:j + 1 + h]) * c)
        grad_B.append((cols[:, j:j + 1] * B[:, k] - cols[:, j + 1:j + 1 + h]) * c)
    return torch.cat(grad_A, 1), torch.cat(grad_B, 1)


@compiled
def fused_sample(A, B, rows, cols, kernel: str, scale: float, m, z, mix) -> torch.Tensor:
    """|dW| at the positions (rows, cols), from the factors."""
    Ai, Bj = A[rows], B[cols]
    terms = _terms_from_differences(lambda k: Ai[:, k] - Bj[:, k], A.shape[1] // 2, kernel, scale)
    D = _pointwise_delta(terms, kernel, scale)
    return (D if m is None else _pointwise_mixed(D, m[cols], z[cols], mix)[0]).abs()


@functools.lru_cache(maxsize=64)
def _sample_positions(n: int, fan_in: int, sample: int, device: torch.device):
    """Row and column of every (n // sample)-th entry of a flattened (n / fan_in, fan_in)."""
    flat = torch.arange(0, n, n // sample, device=device)
    return flat // fan_in, flat % fan_in


# --- the backward with g^T x only where kept, in C (snell_backward.c, ops/native.py) -----
_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_NATIVE = CLibrary(Path(__file__).with_name("snell_backward.c"), {
    "snell_sparse_backward": (_C, [_P] * 5 + [_I] * 4 + [_F, _C, _F, _F, _C] + [_P] * 3 + [_I, _C]),
    "transpose_f32": (None, [_P, _I, _I, _I, _P, _C])})
# Tokens per call: g and x are transposed a chunk at a time into two scratch buffers of
# (out or in) x this many floats, about a large ViT-B weight; larger batches loop.
_TOKEN_CHUNK = 1024
# Above this kept fraction one GEMM over every entry beats a dot product per kept entry.
_MAX_KEPT_FRACTION = 0.3
_CACHE_FLOATS = 128 * 1024  # xT rows a column block reads: half of a core's L2 (1 MB on this Zen 4)


def native_sparse_grads(A, Bt, W, g, x2, threshold: float, scale: float, host_scale: float, reweight: bool,
                        w_out) -> tuple | None:
    """The distance kernel's backward without the dense g^T x: writes W' into ``w_out``
    and returns (dL/dA, dL/dB), the values of ``fused_weight_and_grads`` on g^T x, with
    g^T x formed only at the entries the mask keeps. All float32 CPU tensors, Bt and W
    contiguous; A, g (tokens, out) and x2 (tokens, in) any layout. None when the C library
    is not available (not built here, or native kernels off)."""
    lib = _NATIVE.get()
    if lib is None:
        return None
    out, fan_in = W.shape
    A = A.contiguous()  # read as row-major (out, r): e.g. a factor loaded with assign=True may not be
    h, threads = A.shape[1] // 2, torch.get_num_threads()
    rows, cols = A.new_zeros(out, 2 * h + 2), A.new_zeros(fan_in, 2 * h + 2)
    g, x2 = (t if t.stride(1) == 1 else t.contiguous() for t in (g, x2))  # rows of unit stride
    for t0 in range(0, g.shape[0], _TOKEN_CHUNK):
        t1 = min(g.shape[0], t0 + _TOKEN_CHUNK)
        gT, xT = scratch(0, (out, t1 - t0), g.dtype, g.device), scratch(2, (fan_in, t1 - t0), x2.dtype, x2.device)
        for src, dst in ((g, gT), (x2, xT)):
            lib.transpose_f32(src[t0].data_ptr(), t1 - t0, src.shape[1], src.stride(0), dst.data_ptr(), threads)
        status = lib.snell_sparse_backward(
            A.data_ptr(), Bt.data_ptr(), W.data_ptr() if t0 == 0 else None, gT.data_ptr(), xT.data_ptr(),
            out, fan_in, h, t1 - t0, abs(scale), int(scale < 0), threshold, host_scale, int(reweight),
            w_out.data_ptr(), rows.data_ptr(), cols.data_ptr(), max(16, _CACHE_FLOATS // (t1 - t0)), threads)
        if status != 0:
            raise RuntimeError(f"snell_sparse_backward returned {status} (r = {A.shape[1]}: the C kernel takes "
                               f"ranks up to 62)")
    return _grads_from_sums(A, Bt.t(), rows, cols, "distance", scale)


# The bracket around the previous step's threshold, as a fraction of it: between training
# steps the threshold moved by ~2e-5 (lr 1e-4) to ~3e-3 (lr 1e-2) of itself (median; ViT-B,
# AdamW), so the half-width follows four times the recent moves, within these bounds.
_HINT_WIDTH = (1e-4, 0.05)


def fused_kernel_and_threshold(A, B, kernel: str, scale: float, n_zero: int, out, hint: dict | None = None,
                               sample: int = 32768, stats: tuple = (None, None, None)) -> float | None:
    """Build the kernel matrix into ``out`` and return ``sparsity_threshold`` of it, the
    same bracket search as ``kth_smallest`` with its count pass compiled together with the
    build: the bracket is the previous step's threshold +- a small margin when ``hint``
    (a dict the caller keeps between calls) holds one, else from a sample evaluated from
    the factors (no pass over dW); it is counted without boolean tensors or a compaction,
    and kthvalue runs only on the entries inside. Exact, as there: a bracket that misses
    costs one eager search over ``out``. ``stats``: SNELLA's (m, z, mix), for its K."""
    Bt = B.t().contiguous()
    n = out.numel()
    if n_zero <= 0 or n < 4 * sample:
        fused_kernel_matrix(A, Bt, kernel, scale, *stats, out)
        return None if n_zero <= 0 else float(out.reshape(-1).abs().kthvalue(n_zero).values)
    previous = hint.get("threshold") if hint is not None and hint.get("n_zero") == n_zero else None
    if previous:
        lo, hi = previous * (1 - hint["width"]), previous * (1 + hint["width"])
    else:
        rows, cols = _sample_positions(n, B.shape[0], sample, A.device)
        lo, hi = _sample_bracket(fused_sample(A, B, rows, cols, kernel, scale, *stats), n_zero / n)
    segments = 16 if n % 16 == 0 else 1
    below, counts, minima = fused_kernel_and_count(A, Bt, kernel, scale, *stats, out.new_tensor(lo),
                                                   out.new_tensor(hi), segments, out)
    below = int(below)
    values = _inside_values(out.reshape(segments, -1), counts, minima, lo, hi)
    missed = below >= n_zero or below + values.numel() < n_zero
    t = kth_smallest(out.reshape(-1).abs(), n_zero) if missed else float(values.kthvalue(n_zero - below).values)
    if hint is not None and t > 0:
        if previous:  # 4x the last move, decaying slowly (repeated forwards of one step move 0)
            width = max(4 * abs(t - previous) / t, (2.0 if missed else 0.9) * hint["width"])
        else:
            width = (hi - lo) / (8 * t)  # a quarter of the sample bracket's half-width
        hint.update(threshold=t, n_zero=n_zero, width=min(max(width, _HINT_WIDTH[0]), _HINT_WIDTH[1]))
    return t


def _inside_values(strips: torch.Tensor, counts: torch.Tensor, minima: torch.Tensor, lo: float,
                   hi: float) -> torch.Tensor:
    """Every |dW| in [lo, hi] from ``fused_kernel_and_count``'s per-position counts and
    minima: the minimum where a position holds one, the strips' entries where it holds
    several. In numpy on CPU (these arrays are small; numpy's indexing costs a fraction of
    torch's dispatch here)."""
    if strips.device.type == "cpu":
        c, m = counts.numpy(), minima.numpy()
        rest = np.abs(strips.numpy()[:, np.flatnonzero(c > 1)]).ravel()
        return torch.from_numpy(np.concatenate([m[c == 1], rest[(rest >= lo) & (rest <= hi)]]))
    rest = strips[:, (counts > 1).nonzero().squeeze(1)].abs().reshape(-1)
    return torch.cat([minima[counts == 1], rest[(rest >= lo) & (rest <= hi)]])


def keep_largest(dW: torch.Tensor, threshold: float | None, reweight: bool = False) -> torch.Tensor:
    """Entries with |dW| above ``threshold`` (all when None), zero elsewhere; with
    ``reweight`` the kept values are dW * |dW|. hardshrink is exactly this mask in one
    float pass (a boolean mask and where() take four, and bool kernels are slow on CPU)."""
    kept = dW if threshold is None else F.hardshrink(dW, threshold)
    return kept * kept.detach().abs() if reweight else kept  # |dW| is a constant weight


def _mask_grad(G: torch.Tensor, dW: torch.Tensor, threshold: float | None, reweight: bool) -> torch.Tensor:
    """dL/d(dense dW) from dL/d(kept), in place: zero where dropped; times |dW| (detached)
    under reweight."""
    if threshold is not None:
        torch.ops.aten.hardshrink_backward.grad_input(G, dW, threshold, grad_input=G)
    return G.mul_(dW.abs()) if reweight else G


class _SparseKernel(torch.autograd.Function):
    """dW = keep_largest(k(A, B)) with a hand-written backward (autograd through cdist,
    abs and where costs about ten passes over the (out, in) matrix)."""

    @staticmethod
    def forward(ctx, A, B, kernel, scale, n_zero, reweight):
        dW, terms = _raw_delta(A, B, kernel, scale)
        threshold = sparsity_threshold(dW, n_zero)
        ctx.kernel, ctx.scale, ctx.reweight, ctx.threshold = kernel, scale, reweight, threshold
        ctx.save_for_backward(A, B, dW, *terms)
        return keep_largest(dW, threshold, reweight)

    @staticmethod
    @once_differentiable  # the gradient is written by hand from saved terms: no second derivative
    def backward(ctx, G):
        A, B, dW, *terms = ctx.saved_tensors
        G = _mask_grad(G.clone(), dW, ctx.threshold, ctx.reweight)
        grads = _factor_grads(A, B, [t.clone() for t in terms], G, ctx.kernel, ctx.scale)
        return *grads, None, None, None, None


class SNELLDelta(WeightDelta):
    """SNELL's dW for ``linear_with_weight_delta``: the forward builds in two (out, in)
    buffers and finds the threshold; the backward rebuilds with the same threshold and
    hands the kernel terms to the hand-written gradient. Factors in half precision are
    evaluated in fp32."""

    def __init__(self, A, B, kernel: str, scale: float, n_zero: int, reweight: bool, shape,
                 hint: dict | None = None):
        self.params, self.kernel, self.scale = [A, B], kernel, scale
        self.n_zero, self.reweight, self.shape = n_zero, reweight, shape
        self.threshold: float | None = None
        self.hint = hint  # the layer's last threshold, a starting guess for the compiled search
        self.stats: tuple | None = None  # set by a compiled forward: its backward is compiled too

    def _factors(self):
        A, B = self.params[:2]
        return (A.detach().float(), B.detach().float()) if A.dtype in (torch.float16, torch.bfloat16) \
            else (A.detach(), B.detach())

    def _kernel_in_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, spare): the dense kernel matrix and a second (out, in) buffer the caller
        may overwrite (the other distance half, or a fresh one for the linear kernel)."""
        A, B = self._factors()
        if self.kernel == "linear":
            dW = (A @ B.t()).mul_(self.scale)
            return dW, torch.empty_like(dW)
        T1, spare = _half_terms(A, B, self.kernel, self.scale)
        dW = T1.sub_(spare)
        return (dW.neg_() if self.kernel == "distance" and self.scale < 0 else dW), spare

    def _sparsify_into(self, dW: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
        """Find the threshold of ``dW`` and write the kept entries into ``spare``."""
        self.threshold = sparsity_threshold(dW, self.n_zero)
        kept = dW if self.threshold is None else torch.ops.aten.hardshrink.out(dW, self.threshold, out=spare)
        return (kept.mul_(kept.abs()) if self.reweight else kept).reshape(self.shape)

    @torch.no_grad()
    def build(self) -> torch.Tensor:
        return self._sparsify_into(*self._kernel_in_buffers())

    @torch.no_grad()
    def rebuild(self):
        A, B = self._factors()
        dW, terms = _raw_delta(A, B, self.kernel, self.scale)
        kept = keep_largest(dW, self.threshold, self.reweight)
        kept = kept.clone() if kept is dW else kept
        return kept.reshape(self.shape), (dW, terms)

    @torch.no_grad()
    def param_grads(self, state, grad_dW):
        dW, terms = state
        A, B = self._factors()
        G = _mask_grad(grad_dW.reshape(dW.shape).to(dW.dtype), dW, self.threshold, self.reweight)
        gA, gB = _factor_grads(A, B, terms, G, self.kernel, self.scale)
        return gA.to(self.params[0].dtype), gB.to(self.params[1].dtype)

    # compiled path: kernel, mask and W' fused per step (ops/compiled.py), when turned on
    def _fused(self, W: torch.Tensor) -> bool:
        return compiled_kernels_enabled() and self.kernel != "linear" and W.dim() == 2

    def _scalars(self, like: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(threshold, host scale) as 0-d tensors, so new values never recompile; a
        threshold of -1 keeps every entry (|dW| >= 0)."""
        t = -1.0 if self.threshold is None else self.threshold
        return torch.tensor([t, float(scale)], dtype=like.dtype, device=like.device).unbind()

    def _kernel_stats(self, A, Bt) -> tuple:
        """What the compiled kernels need besides the factors: nothing for SNELL."""
        return None, None, None

    def _fused_grads(self, A, Bt, W, G, threshold, host_scale, w_eff) -> tuple:
        """The compiled backward: writes W' into ``w_eff``, returns the parameters' gradients."""
        return fused_weight_and_grads(A, Bt, W, G, threshold, self.kernel, self.scale, host_scale,
                                      self.reweight, w_eff)

    @torch.no_grad()
    def effective_weight(self, W, scale):
        if not self._fused(W):
            return super().effective_weight(W, scale)
        A, B = self._factors()
        self.stats = self._kernel_stats(A, B.t().contiguous())
        D = scratch(0, W.shape, A.dtype, W.device)
        self.threshold = fused_kernel_and_threshold(A, B, self.kernel, self.scale, self.n_zero, D, self.hint,
                                                    stats=self.stats)
        w_eff = scratch(1, W.shape, W.dtype, W.device)
        fused_effective_weight(D, W, *self._scalars(D, scale), self.reweight, w_eff)
        return w_eff

    def _native_grads(self, A, Bt, W, g, x2, scale, w_eff) -> tuple | None:
        """``native_sparse_grads`` where it applies (distance kernel, float32 on CPU, a
        sparse enough mask), else None."""
        if not (self.kernel == "distance" and self.threshold is not None and A.shape[1] <= 62
                and W.device.type == "cpu" and W.is_contiguous()
                and all(t.dtype == torch.float32 for t in (A, W, g, x2))
                and 1 - self.n_zero / W.numel() <= _MAX_KEPT_FRACTION):
            return None
        return native_sparse_grads(A, Bt, W, g, x2, self.threshold, self.scale, float(scale), self.reweight, w_eff)

    @torch.no_grad()
    def backward(self, g, x2, W, scale, need_x, need_W):
        if self.stats is None or not self._fused(W):
            return super().backward(g, x2, W, scale, need_x, need_W)
        A, B = self._factors()
        Bt = B.t().contiguous()
        w_eff = scratch(1, W.shape, W.dtype, W.device)
        grads = None if need_W else self._native_grads(A, Bt, W, g, x2, scale, w_eff)
        grad_W = None
        if grads is None:  # the dense weight gradient, then the compiled loops
            G = torch.mm(g.t(), x2, out=scratch(0, W.shape, g.dtype, g.device))
            grad_W = G.clone() if need_W else None
            threshold, host_scale = self._scalars(A, scale)
            grads = self._fused_grads(A, Bt, W, G, threshold, host_scale, w_eff)
        grad_x = g @ w_eff if need_x else None
        return grad_x, grad_W, tuple(gp.to(p.dtype) for gp, p in zip(grads, self.params))


class SNELLADelta(SNELLDelta):
    """SNELLA's mixed kernel K = D + a softmax(D / t) + c for ``linear_with_weight_delta``,
    its gradient written by hand like SNELL's. From G = dL/dK (masked), with S the softmax:
      grad_c = sum G, grad_a = sum G S, Z = a S (G - colsum(G S)) (the softmax backward
      over dim 0), grad_t = -sum Z D / t^2, dL/dD = G + Z / t,
    and dL/dD goes through SNELL's kernel gradient. Every step reuses (out, in) buffers:
    on CPU each fresh one costs page faults worth several passes. ViT-B step relative to
    LoRA (batch 4, CPU): 3.34x checkpointed, 2.76x folded with an autograd rebuild, 2.54x
    hand-written, 2.19x with the buffers reused (SNELL 1.86x in that run), 1.5x-1.6x with
    compiled kernels (column statistics, then SNELL's loops on K; docs/BENCHMARKS.md)."""

    def __init__(self, A, B, mix, kernel: str, scale: float, n_zero: int, reweight: bool, shape,
                 hint: dict | None = None):
        super().__init__(A, B, kernel, scale, n_zero, reweight, shape, hint)
        self.params = [A, B, *mix]

    def _mix(self):  # a, t, c in the precision the factors are evaluated in (fp32 or wider)
        return tuple(p.detach().float() if p.dtype in (torch.float16, torch.bfloat16) else p.detach()
                     for p in self.params[2:])

    # compiled path: the softmax's column statistics first, then SNELL's loops on K
    def _kernel_stats(self, A, Bt) -> tuple:
        mix = torch.stack(self._mix()).to(A.device)  # [a, t, c]
        return (*fused_column_stats(A, Bt, self.kernel, self.scale, mix), mix)

    def _fused_grads(self, A, Bt, W, G, threshold, host_scale, w_eff) -> tuple:
        gA, gB, grad_mix = fused_mixed_weight_and_grads(A, Bt, W, G, threshold, self.kernel, self.scale,
                                                        host_scale, self.reweight, *self.stats, w_eff)
        return gA, gB, *grad_mix.unbind()

    def _native_grads(self, A, Bt, W, g, x2, scale, w_eff) -> None:
        return None  # the C kernel knows SNELL's distance kernel only, not K's softmax term

    @torch.no_grad()
    def build(self) -> torch.Tensor:
        a, t, c = self._mix()
        D, spare = self._kernel_in_buffers()
        S = torch.softmax(torch.div(D, t, out=spare), dim=0)
        K = D.add_(c).addcmul_(S, a)  # D is not needed again here
        return self._sparsify_into(K, S)

    @torch.no_grad()
    def rebuild(self):
        a, t, c = self._mix()
        A, B = self._factors()
        D, terms = _raw_delta(A, B, self.kernel, self.scale)
        scaled = D / t
        S = torch.softmax(scaled, dim=0)
        K = torch.add(D, c, out=scaled).addcmul_(S, a)
        kept = keep_largest(K, self.threshold, self.reweight)
        return (kept.clone() if kept is K else kept).reshape(self.shape), (K, D, S, terms)

    @torch.no_grad()
    def param_grads(self, state, grad_dW):
        K, D, S, terms = state
        A, B = self._factors()
        a, t, _ = self._mix()
        G = _mask_grad(grad_dW.reshape(K.shape).to(K.dtype), K, self.threshold, self.reweight)
        GS = torch.mul(G, S, out=K)  # K's last use was the mask
        grad_a, grad_c, col = GS.sum(), G.sum(), GS.sum(0, keepdim=True)
        Z = torch.sub(G, col, out=K).mul_(S).mul_(a)
        grad_t = -torch.dot(Z.reshape(-1), D.reshape(-1)) / (t * t)
        gA, gB = _factor_grads(A, B, terms, Z.div_(t).add_(G), self.kernel, self.scale)
        grads = (gA, gB, grad_a, grad_t, grad_c)
        return tuple(g.to(p.dtype) for g, p in zip(grads, self.params))


def mixed_kernel(D: torch.Tensor, mix_alpha: torch.Tensor, temperature: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:
    """SNELLA's kernel matrix from SNELL's: D + a * softmax(D / t) + c, the softmax over
    the output index (dim 0) for every input column."""
    return D + mix_alpha * torch.softmax(D / temperature, dim=0) + shift


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


def snell_delta(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float, n_zero: int,
                reweight: bool = False) -> torch.Tensor:
    """SNELL's sparse dW (out, fan_in): the kernel matrix with its ``n_zero`` smallest
    entries zeroed. Half-precision factors, and any under autocast, are evaluated in fp32
    (distances of nearby points lose everything in fp16)."""
    if A.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(A.device.type):
        # autocast would run the distance GEMMs in half precision: the kernel stays fp32
        with torch.autocast(A.device.type, enabled=False):
            return snell_delta(A.float(), B.float(), kernel, scale, n_zero, reweight).to(A.dtype)
    return _SparseKernel.apply(A, B, kernel, float(scale), int(n_zero), reweight)


def kernel_matrix(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float) -> torch.Tensor:
    """(out, fan_in) matrix of k(a_i, b_j), nothing zeroed."""
    return snell_delta(A, B, kernel, scale, 0)


def zero_count(sparsity: float, numel: int) -> int:
    """Entries to zero for a sparsity fraction (computed in double precision)."""
    # rounded to 1e-6 of an entry first: 0.29 * 100 is 28.999999999999996 in floats
    return int(math.floor(round(float(sparsity) * numel, 6)))


def _sample_bracket(sub: torch.Tensor, q: float) -> tuple[float, float]:
    """(lo, hi) around the q-quantile of a population from a sample of it, wide enough
    (four standard errors) that the population's quantile lies inside almost always."""
    m = sub.numel()
    margin = 4.0 * math.sqrt(q * (1 - q) / m) + 2.0 / m
    k_lo, k_hi = max(1, math.floor((q - margin) * m)), min(m, math.ceil((q + margin) * m))
    if sub.device.type == "cpu" and sub.dtype in (torch.float32, torch.float64):
        # one numpy partition for both: half the time of two kthvalue
        part = np.partition(sub.detach().contiguous().numpy(), [k_lo - 1, k_hi - 1])
        return float(part[k_lo - 1]), float(part[k_hi - 1])
    return float(sub.kthvalue(k_lo).values), float(sub.kthvalue(k_hi).values)


def kth_smallest(v: torch.Tensor, k: int, sample: int = 32768) -> float:
    """The k-th smallest value of a flat tensor (1-based), exactly as kthvalue but several
    times faster on large tensors: a strided sample brackets the k-th value, one pass
    counts what lies below the bracket, and kthvalue runs only inside it. A bracket that
    misses falls back to kthvalue on everything, so the answer is always exact.
    (torch.quantile is no option: it refuses tensors over 16M elements.) Comparisons
    take Python scalars and counts use count_nonzero: both several times faster on CPU
    than tensor operands and bool.sum()."""
    n = v.numel()
    if n < 4 * sample:
        return float(v.kthvalue(k).values)
    lo, hi = _sample_bracket(v[:: n // sample], k / n)
    at_least_lo = v >= lo
    below = n - int(torch.count_nonzero(at_least_lo))
    inside = v[at_least_lo & (v <= hi)]
    if below >= k or below + inside.numel() < k:
        return float(v.kthvalue(k).values)
    return float(inside.kthvalue(k - below).values)


def sparsity_threshold(dW: torch.Tensor, n_zero: int) -> float | None:
    """The |dW| value at or below which the ``n_zero`` smallest entries lie (None: keep all)."""
    if n_zero <= 0:
        return None
    return kth_smallest(dW.detach().abs().flatten(), n_zero)


def sparsify(dW: torch.Tensor, n_zero: int, reweight: bool = False) -> torch.Tensor:
    """Zero the ``n_zero`` entries with the smallest |dW| (ties aside)."""
    return keep_largest(dW, sparsity_threshold(dW, n_zero), reweight)


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
