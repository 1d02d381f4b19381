"""SNELL's kernel k(a_i, b_j), its sparsification and its gradient: the one home of the formula.

For rows a_i of A (out, r) and b_j of B (fan_in, r), the rank split into two halves k of
h = r/2 coordinates, each half gives a term T_k and dW = T_1 - T_2:
  distance: T_k = |s| ||a_k,i - b_k,j||          (dW negated for s < 0)
  rbf:      T_k = s exp(-||a_k,i - b_k,j||^2 / h)
  linear:   dW = s a_i . b_j (no halves; eager only)

The squared distances exist in two forms, kept side by side here on purpose:
  * eager (``half_terms``): one GEMM of augmented factors, the expansion cdist uses. Eager
    torch runs one GEMM far faster than r/2 broadcast passes over (out, in).
  * pointwise (``pointwise_terms``): (a_k - b_k)^2 summed coordinate by coordinate, which
    inductor fuses into a single loop (ops/snell_kernels.py) with no GEMM. It is exact (no
    |a|^2 + |b|^2 - 2ab cancellation), so its values differ from the eager form's in the
    last bits, and the C backward (snell_backward.c) repeats its float operations to
    rebuild the compiled forward's mask bit for bit.
Everything downstream of the terms has one definition used by both forms: combining the
halves (``combine_halves``) and the gradient's constants and assembly (``grads_from_sums``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("distance", "linear", "rbf")


# --- the kernel: eager form ------------------------------------------------------------
def squared_distances(A: torch.Tensor, B: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * ||a_i - b_j||^2 for all (i, j) as one matrix product of augmented factors,
    [-2a, |a|^2, 1] . [b, 1, |b|^2] (the expansion cdist itself uses on large inputs)."""
    sa, sb = A.square().sum(1, keepdim=True), B.square().sum(1, keepdim=True)
    Aa = torch.cat([A * (-2.0 * coef), sa * coef, torch.full_like(sa, coef)], 1)
    Bb = torch.cat([B, torch.ones_like(sb), sb], 1)
    return Aa @ Bb.t()


def half_terms(A: torch.Tensor, B: torch.Tensor, kernel: str, scale: float) -> list[torch.Tensor]:
    """[T_1, T_2], eager form. The constants ride in the GEMM's coefficient (s^2 for the
    distance, whose root then carries |s|; -1/h for the rbf), saving a pass over (out, in)."""
    h = A.shape[1] // 2
    halves = (slice(0, h), slice(h, None))
    if kernel == "distance":
        return [squared_distances(A[:, k], B[:, k], scale * scale).clamp_min_(0).sqrt_() for k in halves]
    return [squared_distances(A[:, k], B[:, k], -1.0 / h).exp_().mul_(scale) for k in halves]


# --- the kernel: pointwise form (compiled loops, and the C kernel's reference) ---------
def pointwise_terms(A: torch.Tensor, Bt: torch.Tensor, kernel: str, scale: float) -> list[torch.Tensor]:
    """[T_1, T_2] from A (out, r) and Bt = B^T (r, in) as broadcasts over (out, in)."""
    return terms_from_differences(lambda k: A[:, k:k + 1] - Bt[k:k + 1], A.shape[1] // 2, kernel, scale)


def terms_from_differences(diff, h: int, kernel: str, scale: float) -> list[torch.Tensor]:
    """[T_1, T_2] from diff(k) = a_k - b_k, coordinate k of the rank, over any broadcast shape."""
    terms = []
    for k0 in (0, h):
        q = sum(diff(k).square() for k in range(k0, k0 + h))
        terms.append(abs(scale) * q.sqrt() if kernel == "distance" else scale * torch.exp(-q / h))
    return terms


# --- both forms ------------------------------------------------------------------------
def combine_halves(T1: torch.Tensor, T2: torch.Tensor, kernel: str, scale: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """dW = T_1 - T_2, negated for the distance kernel with s < 0 (its terms carry |s|);
    written into ``out`` when given (T_1 itself, to spare a buffer)."""
    D = T1 - T2 if out is None else torch.sub(T1, T2, out=out)
    return D.neg_() if kernel == "distance" and scale < 0 else D


def raw_delta(A, B, kernel: str, scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(dW, terms), eager: the dense kernel matrix and the terms its gradient needs."""
    if kernel == "linear":
        return (A @ B.t()).mul_(scale), []
    terms = half_terms(A, B, kernel, scale)
    return combine_halves(*terms, kernel, scale), terms


def mixed_kernel(D: torch.Tensor, mix_alpha: torch.Tensor, temperature: torch.Tensor,
                 shift: torch.Tensor) -> torch.Tensor:
    """SNELLA's kernel matrix from SNELL's: D + a * softmax(D / t) + c, the softmax over
    the output index (dim 0) for every input column."""
    return D + mix_alpha * torch.softmax(D / temperature, dim=0) + shift


def pointwise_mixed(D: torch.Tensor, m, z, mix) -> tuple[torch.Tensor, torch.Tensor]:
    """``mixed_kernel`` entry by entry, as (K, S) with S the softmax, from the column
    statistics m = max_i D / t and z = sum_i exp(D / t - m); ``mix`` = [a, t, c] (a tensor:
    the three change every step, Python floats would recompile)."""
    S = torch.exp(D / mix[1] - m) / z
    return D + mix[0] * S + mix[2], S


# --- sparsification --------------------------------------------------------------------
def keep_largest(dW: torch.Tensor, threshold: float | None, reweight: bool = False) -> torch.Tensor:
    """Entries with |dW| above ``threshold`` (all when None), zero elsewhere; with
    ``reweight`` the kept values are dW * |dW|. hardshrink is exactly this mask in one
    float pass (a boolean mask and where() take four, and bool kernels are slow on CPU)."""
    kept = dW if threshold is None else F.hardshrink(dW, threshold)
    return kept * kept.detach().abs() if reweight else kept  # |dW| is a constant weight


def pointwise_kept(D: torch.Tensor, threshold: torch.Tensor, reweight: bool) -> torch.Tensor:
    """``keep_largest`` for the compiled loops (a tensor threshold, -1 keeps everything)."""
    kept = torch.where(D.abs() > threshold, D, 0.0)
    return kept * D.abs() if reweight else kept


def mask_grad(G: torch.Tensor, dW: torch.Tensor, threshold: float | None, reweight: bool) -> torch.Tensor:
    """dL/d(dense dW) from dL/d(kept), in place: zero where dropped; times |dW| (detached)
    under reweight."""
    if threshold is not None:
        torch.ops.aten.hardshrink_backward.grad_input(G, dW, threshold, grad_input=G)
    return G.mul_(dW.abs()) if reweight else G


# --- the gradient ----------------------------------------------------------------------
# Each half contributes grad_a_i = c sum_j H_ij (a_i - b_j) (mirrored for b_j), i.e.
# rowsum(H) * A - H B: distance H_k = G / T_k (coincident points get no gradient, as in
# cdist's backward), d(|s| D)/da = s^2 (a - b) / (|s| D); rbf H_k = G * T_k,
# d(s exp(-d^2/h))/da = -(2/h) s exp(-d^2/h) (a - b).
def half_constant(kernel: str, scale: float, sign: float, h: int) -> float:
    """c of grad_a_i = c sum_j H_ij (a_i - b_j) for one half of the rank (sign +1 / -1)."""
    return sign * scale * abs(scale) if kernel == "distance" else -sign * 2.0 / h


def grads_from_sums(A, B, rows, cols, kernel: str, scale: float):
    """dL/dA, dL/dB from each half's reductions of H: rows (out, 2 (h+1)) holds per half
    [rowsum H, H B_k] and cols (in, 2 (h+1)) [colsum H, H^T A_k] (snell_backward.c writes
    this layout too)."""
    h = A.shape[1] // 2
    grad_A, grad_B = [], []
    for half, sign in ((0, 1.0), (1, -1.0)):
        c = half_constant(kernel, scale, sign, h)
        k, j = slice(half * h, (half + 1) * h), half * (h + 1)
        grad_A.append((rows[:, j:j + 1] * A[:, k] - rows[:, j + 1:j + 1 + h]) * c)
        grad_B.append((cols[:, j:j + 1] * B[:, k] - cols[:, j + 1:j + 1 + h]) * c)
    return torch.cat(grad_A, 1), torch.cat(grad_B, 1)


def skinny_grads(H: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """(H B, H^T A, rowsum H, colsum H) in the layouts CPU BLAS runs fastest: the products
    are taken as (B^T H^T)^T and (A^T H)^T, several times faster than H @ B and H^T @ A."""
    HB = (torch.cat([B, torch.ones_like(B[:, :1])], 1).t() @ H.t()).t()
    HtA = (torch.cat([A, torch.ones_like(A[:, :1])], 1).t() @ H).t()
    return HB[:, :-1], HtA[:, :-1], HB[:, -1:], HtA[:, -1:]


def factor_grads(A, B, terms: list[torch.Tensor], G: torch.Tensor, kernel: str, scale: float):
    """dL/dA, dL/dB from G = dL/d(dense dW), eager: H is written over ``terms`` (in place,
    no fresh (out, in) buffer) and reduced with one skinny GEMM per factor and half."""
    if kernel == "linear":
        GB, GtA, _, _ = skinny_grads(G, A, B)
        return GB * scale, GtA * scale
    if kernel == "distance":
        Hs = [torch.div(G, T, out=T).nan_to_num_(0.0, 0.0, 0.0) for T in terms]
    else:
        Hs = [T.mul_(G) for T in terms]
    h = A.shape[1] // 2
    rows, cols = [], []
    for k, H in zip((slice(0, h), slice(h, None)), Hs):
        HB, HtA, row, col = skinny_grads(H, A[:, k], B[:, k])
        rows += [row, HB]
        cols += [col, HtA]
    return grads_from_sums(A, B, torch.cat(rows, 1), torch.cat(cols, 1), kernel, scale)


def pointwise_factor_grads(A, Bt, terms: list[torch.Tensor], GD: torch.Tensor, kernel: str, scale: float):
    """``factor_grads`` as broadcasts for the compiled loops: each half's H reduced to its
    row and column sums and products one coordinate at a time (no GEMM, no stored H)."""
    h = A.shape[1] // 2
    rows, cols = [], []
    for T, k0 in zip(terms, (0, h)):
        H = torch.where(T > 0, GD / T, 0.0) if kernel == "distance" else GD * T
        rows.append(H.sum(1))
        cols.append(H.sum(0))
        for k in range(k0, k0 + h):
            rows.append((H * Bt[k:k + 1]).sum(1))
            cols.append((H * A[:, k:k + 1]).sum(0))
    return grads_from_sums(A, Bt.t(), torch.stack(rows, 1), torch.stack(cols, 1), kernel, scale)
