"""Reused scratch buffers for (out, in)-sized temporaries on CPU.

glibc hands large freed blocks back to the kernel, so on CPU every fresh (out, in)
temporary is paid again in first-touch page faults: measured here at about 2 us per 4 KB
page, 20 ms for the three 9 MB buffers of one ViT-B MLP layer's SNELL backward against
3 ms for the arithmetic itself. Layers run one after another, so a handful of buffers,
each as large as the largest layer, serves every layer of a model. CUDA's caching
allocator already reuses memory, so there a scratch buffer is a plain allocation.

A scratch tensor is only valid until the same slot is asked for again: use it within one
forward or backward of one layer and never return it to the caller's caller.
"""
from __future__ import annotations

import math
import threading

import torch

_local = threading.local()  # autograd may run backward on another thread than forward


def scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` from reusable slot ``slot`` (per thread, CPU)."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    numel = math.prod(shape)
    buf = pool.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first asked for under inference_mode: an inference
        # tensor could not be written by the training steps that follow
        with torch.inference_mode(False):
            buf = pool[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free the calling thread's scratch buffers, public as ``vp.release_scratch()``.

    On CPU, SNELL's layers keep a few buffers per thread between steps, each as large as
    the largest adapted (out, in) weight (about 29 MB in all for ViT-B at batch 4), so that
    no step pays the first-touch page faults again. Call this when training or inference is
    done, or before measuring memory, to hand them back; the next step that needs one
    allocates it again. Safe at any time: a buffer still in use lives until its last user
    drops it. Other threads' buffers (a backward run on another thread) are freed when
    that thread ends. Nothing is held on CUDA, whose caching allocator does this job."""
    _local.pool = {}
