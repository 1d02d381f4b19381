"""The exact threshold search: the k-th smallest |dW|, at or below which SNELL zeroes.

``kth_smallest`` equals kthvalue, several times faster on large tensors: a sample
brackets the k-th value, one pass counts what lies below the bracket, and kthvalue runs
only inside it. ``fused_kernel_and_threshold`` is the same search with SNELL's compiled
build (ops/snell_kernels.py): the count pass runs in the build's loop, and the bracket
comes from the layer's previous threshold (a hint) or from a sample evaluated from the
factors. A bracket that misses always falls back to a full search: every answer is exact.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .snell_kernels import fused_kernel_and_count, fused_kernel_matrix, fused_sample, sample_positions

# The bracket around the previous step's threshold, as a fraction of it: between training
# steps the threshold moved by ~2e-5 (lr 1e-4) to ~3e-3 (lr 1e-2) of itself (median; ViT-B,
# AdamW), so the half-width follows four times the recent moves, within these bounds.
HINT_WIDTH = (1e-4, 0.05)


def sample_bracket(sub: torch.Tensor, q: float) -> tuple[float, float]:
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
    """The k-th smallest value of a flat tensor (1-based), exactly as kthvalue. (torch.quantile
    is no option: it refuses tensors over 16M elements.) Comparisons take Python scalars
    and counts use count_nonzero: both several times faster on CPU than tensor operands
    and bool.sum()."""
    n = v.numel()
    if n < 4 * sample:
        return float(v.kthvalue(k).values)
    lo, hi = sample_bracket(v[:: n // sample], k / n)
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


def fused_kernel_and_threshold(A, B, kernel: str, scale: float, n_zero: int, out, hint: dict | None = None,
                               sample: int = 32768, stats: tuple = (None, None, None)) -> float | None:
    """Build the kernel matrix into ``out`` and return ``sparsity_threshold`` of it. The
    bracket is the previous step's threshold +- a small margin when ``hint`` (a dict the
    caller keeps between calls) holds one, else from a sample evaluated from the factors
    (no pass over dW); it is counted without boolean tensors or a compaction, and kthvalue
    runs only on the entries inside; a bracket that misses costs one eager search over
    ``out``. ``stats``: SNELLA's (m, z, mix), for its K."""
    Bt = B.t().contiguous()
    n = out.numel()
    if n_zero <= 0 or n < 4 * sample:
        fused_kernel_matrix(A, Bt, kernel, scale, *stats, out)
        return None if n_zero <= 0 else float(out.reshape(-1).abs().kthvalue(n_zero).values)
    previous = hint.get("threshold") if hint is not None and hint.get("n_zero") == n_zero else None
    if previous:
        lo, hi = previous * (1 - hint["width"]), previous * (1 + hint["width"])
    else:
        rows, cols = sample_positions(n, B.shape[0], sample, A.device)
        lo, hi = sample_bracket(fused_sample(A, B, rows, cols, kernel, scale, *stats), n_zero / n)
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
        hint.update(threshold=t, n_zero=n_zero, width=min(max(width, HINT_WIDTH[0]), HINT_WIDTH[1]))
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
