"""The ctypes binding of snell_backward.c (built by ops/native.py): SNELL's distance-kernel
backward on CPU with g^T x formed only at the entries the mask keeps (see the C file)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .native import CLibrary
from .snell_math import grads_from_sums
from .workspace import scratch

_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
LIBRARY = CLibrary(Path(__file__).with_name("snell_backward.c"), {
    "snell_sparse_backward": (_C, [_P] * 5 + [_I] * 4 + [_F, _C, _F, _F, _C] + [_P] * 3 + [_I, _C]),
    "transpose_f32": (None, [_P, _I, _I, _I, _P, _C])})
# Tokens per call: g and x are transposed a chunk at a time into two scratch buffers of
# (out or in) x this many floats, about a large ViT-B weight; larger batches loop.
_TOKEN_CHUNK = 1024
# Above this kept fraction one GEMM over every entry beats a dot product per kept entry.
_MAX_KEPT_FRACTION = 0.3
_CACHE_FLOATS = 128 * 1024  # xT rows a column block reads: half of a core's L2 (1 MB on this Zen 4)


def native_applies(kernel: str, threshold: float | None, kept_fraction: float, A, W, g, x2) -> bool:
    """Whether ``native_sparse_grads`` takes this layer: the distance kernel, ranks up to
    62, float32 on CPU, a contiguous host weight and a sparse enough mask."""
    return (kernel == "distance" and threshold is not None and A.shape[1] <= 62
            and W.device.type == "cpu" and W.is_contiguous()
            and all(t.dtype == torch.float32 for t in (A, W, g, x2))
            and kept_fraction <= _MAX_KEPT_FRACTION)


def native_sparse_grads(A, Bt, W, g, x2, threshold: float, scale: float, host_scale: float, reweight: bool,
                        w_out) -> tuple | None:
    """The distance kernel's backward without the dense g^T x: writes W' into ``w_out``
    and returns (dL/dA, dL/dB), the values of ``fused_weight_and_grads`` on g^T x, with
    g^T x formed only at the entries the mask keeps. All float32 CPU tensors, Bt and W
    contiguous; A, g (tokens, out) and x2 (tokens, in) any layout. None when the C library
    is not available (not built here, or native kernels off)."""
    lib = LIBRARY.get()
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
    return grads_from_sums(A, Bt.t(), rows, cols, "distance", scale)
