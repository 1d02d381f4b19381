"""Multi-level 2-D discrete wavelet transform of matrices, in pure torch.

Numerically the same as ``pywt.wavedec2`` / ``pywt.waverec2`` with ``mode="periodization"``
(filters read from ``pywt.Wavelet(name)``), but differentiable and usable on any device,
so a wavelet-domain adapter (e.g. WaRA) can keep its parameters as wavelet coefficients and
map them to a weight update inside the autograd graph.

Conventions (checked against PyWavelets 1.8 by ``tests/test_dwt.py``):

* 1-D analysis of a length-``n`` signal with a length-``F`` filter ``f`` (``F`` is even for
  every orthogonal pywt wavelet) is
  ``y[k] = sum_j f[j] * x[(2k + F//2 - j) mod n]``,  k = 0 .. n/2 - 1,
  i.e. circular convolution with ``f``, keep the samples at positions ``2k + F//2``. Indices
  wrap as often as needed, which is also what pywt does when the filter is longer than the
  signal (deep levels of long wavelets).
* 2-D: filtering runs along both of the last two axes. ``cA`` is low-pass on both, ``cH``
  is high-pass along axis -2 (rows index) and low-pass along axis -1, ``cV`` is low-pass
  along axis -2 and high-pass along axis -1, ``cD`` is high-pass on both; signs are those
  of pywt's ``dec_hi`` as is (no extra sign flips).
* Synthesis is the exact adjoint of analysis: upsample by 2 and convolve with ``rec_lo`` /
  ``rec_hi``. For orthogonal wavelets pywt's ``rec_*`` are exactly the reversed ``dec_*``,
  so adjoint == inverse == pywt's reconstruction. Biorthogonal wavelets are rejected,
  because for them the adjoint is not the inverse.

Sizes: every level halves each of the last two sizes exactly, so a ``level``-level transform
needs both sizes divisible by ``2**level`` (pywt's periodization would instead extend odd
lengths by one sample and return ``ceil(n/2)`` coefficients, which is not an orthogonal
map and is not reproduced here). Callers with odd sizes zero-pad with
:func:`pad_to_multiple`, transform, and :func:`crop` back after :func:`waverec2`.

Leading dimensions are batch dimensions. There are no Python loops over rows or columns:
one ``conv1d`` (analysis) or ``conv_transpose1d`` (synthesis) per axis per level.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import pywt
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "wavelet_filters",
    "max_level",
    "dwt2",
    "idwt2",
    "wavedec2",
    "waverec2",
    "subband_shapes",
    "pad_to_multiple",
    "crop",
]


# --------------------------------------------------------------------------- filters
@functools.lru_cache(maxsize=None)
def _filter_lists(name: str) -> tuple[tuple[float, ...], ...]:
    """Validated (dec_lo, dec_hi, rec_lo, rec_hi) as Python floats, looked up once per name."""
    if not isinstance(name, str):
        raise TypeError(f"wavelet name must be a str, got {type(name).__name__}")
    known = pywt.wavelist(kind="discrete")
    if name not in known:
        usable = [n for n in known if pywt.Wavelet(n).orthogonal]  # what the synthesis below inverts
        raise ValueError(
            f"unknown wavelet {name!r}; PyWavelets' orthogonal wavelets (the ones taken here) are: "
            f"{', '.join(usable)}"
        )
    w = pywt.Wavelet(name)
    if not w.orthogonal:
        # the synthesis below is the adjoint of the analysis, which inverts it only for
        # orthogonal filter banks
        raise ValueError(
            f"wavelet {name!r} is not orthogonal; only orthogonal wavelets are supported "
            "(e.g. haar, dbN, symN, coifN)"
        )
    return tuple(tuple(float(v) for v in f) for f in (w.dec_lo, w.dec_hi, w.rec_lo, w.rec_hi))


def wavelet_filters(
    name: str, dtype: torch.dtype = torch.float32, device=None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dec_lo, dec_hi, rec_lo, rec_hi)`` of the pywt wavelet ``name`` as 1-D tensors.

    Raises ``ValueError`` for names that are not pywt discrete wavelets and for
    non-orthogonal (biorthogonal) ones.
    """
    return tuple(torch.tensor(f, dtype=dtype, device=device) for f in _filter_lists(name))


@functools.lru_cache(maxsize=64)
def _weights(name: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """conv weights of shape (2, 1, F): analysis = reversed dec filters (conv1d is a
    cross-correlation), synthesis = rec filters (conv_transpose1d scatters them as is).
    Cached so repeated calls on CUDA do not copy the filters to the device every time."""
    # a first call under inference_mode must not cache inference tensors, which autograd
    # would later refuse to save for backward
    with torch.inference_mode(False):
        dec_lo, dec_hi, rec_lo, rec_hi = wavelet_filters(name, dtype, device)
        ana = torch.stack([dec_lo.flip(0), dec_hi.flip(0)]).unsqueeze(1)
        syn = torch.stack([rec_lo, rec_hi]).unsqueeze(1)
    return ana, syn


def _weights_for(name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    return _weights(name, x.dtype, x.device)


# --------------------------------------------------------------------------- sizes
def _two_adic(n: int) -> int:
    """How many times n can be halved and stay an integer (n > 0)."""
    return (n & -n).bit_length() - 1


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"need a matrix shape (at least 2 dims), got {shape}")
    rows, cols = shape[-2:]
    if rows <= 0 or cols <= 0:
        raise ValueError(f"matrix sizes must be positive, got {(rows, cols)}")
    return rows, cols


def max_level(shape: Sequence[int], name: str) -> int:
    """Largest ``level`` for which :func:`wavedec2` accepts a matrix of ``shape``.

    Each periodized level halves both sizes exactly, so this is the number of times both of
    the last two sizes can be halved while staying integers: ``min(v2(rows), v2(cols))``
    where ``v2`` counts factors of two (e.g. 32x48 -> 4, 24x64 -> 3, 7x8 -> 0).

    ``name`` is only validated: with periodization the transform stays exact and orthogonal
    even when the filter is longer than the signal, so the filter length sets no limit here.
    (pywt's ``dwt_max_level`` is a different, usefulness bound based on filter length;
    pywt merely warns when it is exceeded and computes the same numbers as this module.)
    Leading batch dims in ``shape`` are ignored.
    """
    _filter_lists(name)
    rows, cols = _matrix_shape(shape)
    return min(_two_adic(rows), _two_adic(cols))


def _check_level(level, shape: Sequence[int], name: str) -> int:
    if isinstance(level, bool) or not isinstance(level, int):
        raise TypeError(f"level must be an int, got {level!r}")
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    top = max_level(shape, name)
    if level > top:
        rows, cols = _matrix_shape(shape)
        raise ValueError(
            f"level {level} needs both sizes divisible by 2**{level}={2 ** level}, but the "
            f"matrix is {rows}x{cols} (max level {top}); pad with pad_to_multiple(x, {level})"
        )
    return level


def subband_shapes(shape: Sequence[int], level: int) -> list:
    """Shapes of :func:`wavedec2`'s output for an input of ``shape``, in the same nesting:
    ``[shape_A_J, (shape_H_J, shape_V_J, shape_D_J), ..., (shape_H_1, shape_V_1, shape_D_1)]``.

    Leading batch dims of ``shape`` are kept in every entry. Requires both matrix sizes
    divisible by ``2**level``.
    """
    shape = tuple(int(s) for s in shape)
    rows, cols = _matrix_shape(shape)
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be an int >= 0, got {level!r}")
    if rows % (1 << level) or cols % (1 << level):
        raise ValueError(
            f"level {level} needs both sizes divisible by {1 << level}, got {rows}x{cols}"
        )
    batch = shape[:-2]
    details = []
    for j in range(1, level + 1):  # finest (j=1) first, reversed below to match wavedec2
        s = batch + (rows >> j, cols >> j)
        details.append((s, s, s))
    return [batch + (rows >> level, cols >> level)] + details[::-1]


def pad_to_multiple(x: Tensor, level: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad the last two dims of ``x`` at the end (bottom/right) up to multiples of
    ``2**level``. Returns ``(x_padded, (rows, cols))``; ``crop(.., (rows, cols))`` undoes it.

    Because the transform is orthogonal, ``crop(waverec2(c))`` is exactly the adjoint of
    ``wavedec2(pad(.))``, so an adapter parametrised by coefficients ``c`` of the padded
    shape and using ``crop(waverec2(c), shape)`` as its update gets correct gradients; the
    coefficients simply have a few directions that only touch the cropped-away border.
    """
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be an int >= 0, got {level!r}")
    rows, cols = _matrix_shape(x.shape)
    m = 1 << level
    pad_r, pad_c = -rows % m, -cols % m
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    return x, (rows, cols)


def crop(x: Tensor, original_shape: Sequence[int]) -> Tensor:
    """Keep the top-left ``original_shape[-2:]`` block of the last two dims of ``x``."""
    rows, cols = _matrix_shape(original_shape)
    if rows > x.shape[-2] or cols > x.shape[-1]:
        raise ValueError(f"cannot crop {tuple(x.shape[-2:])} to the larger {(rows, cols)}")
    return x[..., :rows, :cols]


# --------------------------------------------------------------------------- 1-D kernels
def _analyze_last(x: Tensor, ana: Tensor) -> Tensor:
    """Periodized one-level analysis along the last axis: (..., n) -> (..., 2, n/2),
    index 0 of the new axis = low-pass, 1 = high-pass.

    With filter length L, y[k] = sum_j f[j] x[(2k + L/2 - j) mod n]. Substituting the
    reversed filter w[i] = f[L-1-i] turns it into y[k] = sum_i w[i] xp[2k + i] with
    xp[i] = x[(i + o) mod n], o = 1 - L/2: a plain stride-2 cross-correlation (conv1d) of
    the periodically extended signal xp of length n + L - 1.
    """
    n = x.shape[-1]
    L = ana.shape[-1]
    o = 1 - L // 2
    xr = torch.roll(x, shifts=-o, dims=-1)  # xr[i] = x[(i + o) mod n]
    need = n + L - 1
    reps = -(-need // n)  # the filter may be longer than the signal: wrap several times
    xp = torch.cat([xr] * reps, dim=-1)[..., :need]
    y = F.conv1d(xp.reshape(-1, 1, need), ana, stride=2)
    return y.reshape(*x.shape[:-1], 2, n // 2)


def _synthesize_last(y: Tensor, syn: Tensor) -> Tensor:
    """Exact adjoint of :func:`_analyze_last`: (..., 2, h) -> (..., 2h).

    conv_transpose1d with the same (reversed-dec == rec) weights gives the extended signal
    xp of length n + L - 1 (output_padding=1 restores the last sample, which conv1d with
    stride 2 never reads); folding it modulo n and rolling by o maps it back onto x.
    Folding is a reshape + sum rather than index_add, so it is deterministic on CUDA.
    """
    h = y.shape[-1]
    n = 2 * h
    L = syn.shape[-1]
    o = 1 - L // 2
    z = F.conv_transpose1d(y.reshape(-1, 2, h), syn, stride=2, output_padding=1)
    z = z.reshape(-1, n + L - 1)
    reps = -(-(n + L - 1) // n)
    z = F.pad(z, (0, reps * n - (n + L - 1)))
    w = z.reshape(-1, reps, n).sum(dim=1)  # w[m] = sum_q xp[m + q n]  -> x[(m + o) mod n]
    x = torch.roll(w, shifts=o, dims=-1)
    return x.reshape(*y.shape[:-2], n)


def idwt1(low: Optional[Tensor], high: Optional[Tensor], name: str) -> Tensor:
    """One periodized 1-D synthesis level along the last axis: (..., h) bands -> (..., 2h).
    Either band may be None (zeros); pywt.idwt(low, high, name, "periodization")."""
    ref = low if low is not None else high
    if ref is None:
        raise ValueError("idwt1 needs at least one band")
    low = torch.zeros_like(ref) if low is None else low
    high = torch.zeros_like(ref) if high is None else high
    _, syn = _weights_for(name, ref)
    return _synthesize_last(torch.stack([low, high], dim=-2), syn)


# --------------------------------------------------------------------------- 2-D
def _dwt2_stacked(x: Tensor, ana: Tensor) -> Tensor:
    """(..., M, N) -> (..., 2, 2, M/2, N/2) indexed [band along axis -2, band along -1]."""
    nb = x.dim() - 2
    y = _analyze_last(x, ana)  # (..., M, c, N/2)
    y = y.movedim(-3, -1)  # (..., c, N/2, M)
    y = _analyze_last(y, ana)  # (..., c, N/2, r, M/2)
    return y.permute(*range(nb), nb + 2, nb, nb + 3, nb + 1)  # (..., r, c, M/2, N/2)


def _idwt2_stacked(s: Tensor, syn: Tensor) -> Tensor:
    """Inverse of :func:`_dwt2_stacked`: (..., 2, 2, m, n) -> (..., 2m, 2n)."""
    nb = s.dim() - 4
    y = s.permute(*range(nb), nb + 1, nb + 3, nb, nb + 2)  # (..., c, n, r, m)
    y = _synthesize_last(y, syn)  # (..., c, n, M)
    y = y.movedim(-1, -3)  # (..., M, c, n)
    return _synthesize_last(y, syn)  # (..., M, N)


def _check_matrix(x: Tensor, what: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{what} must have at least 2 dims (a matrix), got shape {tuple(x.shape)}")


def dwt2(x: Tensor, name: str) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One periodized level: ``cA, (cH, cV, cD)`` exactly as
    ``pywt.dwt2(x, name, mode="periodization")`` for even sizes."""
    _check_matrix(x)
    _check_level(1, x.shape, name)
    ana, _ = _weights_for(name, x)
    s = _dwt2_stacked(x, ana)
    return s[..., 0, 0, :, :], (s[..., 1, 0, :, :], s[..., 0, 1, :, :], s[..., 1, 1, :, :])


def _stack_bands(cA: Tensor, details: Sequence[Tensor]) -> Tensor:
    if len(details) != 3:
        raise ValueError(f"expected 3 detail bands (cH, cV, cD), got {len(details)}")
    cH, cV, cD = details
    for t, nm in ((cA, "cA"), (cH, "cH"), (cV, "cV"), (cD, "cD")):
        _check_matrix(t, nm)
    if not (cA.shape == cH.shape == cV.shape == cD.shape):
        raise ValueError(
            "all four subbands must have the same shape, got "
            f"{[tuple(t.shape) for t in (cA, cH, cV, cD)]}"
        )
    return torch.stack([torch.stack([cA, cV], -3), torch.stack([cH, cD], -3)], -4)


def idwt2(cA: Tensor, details: Sequence[Tensor], name: str) -> Tensor:
    """Inverse of :func:`dwt2` (``pywt.idwt2(.., mode="periodization")``)."""
    s = _stack_bands(cA, details)
    _, syn = _weights_for(name, s)
    return _idwt2_stacked(s, syn)


def wavedec2(x: Tensor, name: str, level: int) -> list:
    """``[cA_J, (cH_J, cV_J, cD_J), ..., (cH_1, cV_1, cD_1)]`` like
    ``pywt.wavedec2(x, name, mode="periodization", level=J)``; both matrix sizes must be
    divisible by ``2**level`` (see :func:`max_level`, :func:`pad_to_multiple`).
    ``level=0`` returns ``[x]``."""
    _check_matrix(x)
    _check_level(level, x.shape, name)
    ana, _ = _weights_for(name, x)
    details = []
    a = x
    for _ in range(level):
        s = _dwt2_stacked(a, ana)
        a = s[..., 0, 0, :, :]
        details.append((s[..., 1, 0, :, :], s[..., 0, 1, :, :], s[..., 1, 1, :, :]))
    return [a] + details[::-1]


def waverec2(coeffs: Sequence, name: str) -> Tensor:
    """Inverse of :func:`wavedec2` (``pywt.waverec2(.., mode="periodization")``).

    Unlike pywt, mismatched subband shapes are an error instead of being cropped, because
    with exact halving they can only come from a bug."""
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) < 1:
        raise ValueError("coeffs must be a non-empty list [cA, (cH, cV, cD), ...]")
    a = coeffs[0]
    _check_matrix(a, "cA")
    _, syn = _weights_for(name, a)
    for j, details in enumerate(coeffs[1:], start=1):
        if not isinstance(details, (list, tuple)):
            raise ValueError(f"coeffs[{j}] must be a (cH, cV, cD) tuple")
        a = _idwt2_stacked(_stack_bands(a, details), syn)
    return a
