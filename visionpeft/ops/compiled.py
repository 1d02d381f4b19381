"""Opt-in torch.compile of the pointwise kernels some methods run over (out, in) matrices.

SNELL's step is dominated by a dozen elementwise passes over every adapted weight (kernel
distances, square roots, masks, divisions); in eager mode each is a trip through memory.
Compiled, inductor fuses each chain into one loop (C++ with OpenMP on CPU, Triton on
CUDA). It is off by default because the first call of each function compiles (seconds to
tens of seconds, cached on disk by inductor afterwards) and needs a C++ compiler on CPU:

    import visionpeft as vp
    with vp.kernels(compiled=True):    # this block only (ops/kernels.py)
        ...
    vp.set_compiled_kernels(True)      # the process default, or VISIONPEFT_COMPILED_KERNELS=1

A signature whose compilation fails runs eagerly from then on (one warning per function); the
eager and compiled forms compute the same values (tests compare them).
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Callable

import torch

from .kernels import kernel_enabled, set_default

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: only the CUDA name
# ``recompute=True``: inductor stores an intermediate that many reductions read (a kernel
# term feeding ten row and column sums) and reads it back; for such a function recomputing
# it from the rank-r factors inside each loop beats the (out, in) round trip through memory
# (SNELL's backward: 50 -> 25 ms per ViT-B step, 8 layers, CPU). Functions with one
# reduction over a stored matrix are better left with the defaults.
_RECOMPUTE = {"realize_reads_threshold": 1000, "realize_opusers_threshold": 1000,
              "realize_opcount_threshold": 10000, "realize_acc_reads_threshold": 1000}


@functools.lru_cache(maxsize=None)
def _recompute_options() -> dict:
    """The options of ``_RECOMPUTE`` this torch has (an unknown one fails the compile)."""
    import torch._inductor.config as inductor_config

    return {k: v for k, v in _RECOMPUTE.items() if hasattr(inductor_config, k)}


def set_compiled_kernels(enabled: bool) -> None:
    """Set the process default: compiled kernels on or off for every adapter from the next
    call, in every thread. A ``with kernels(compiled=...)`` block (ops/kernels.py)
    overrides it for the code inside the block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_compiled_kernels takes True or False, got {enabled!r}")
    set_default("compiled", enabled)


def compiled_kernels_enabled() -> bool:
    """Whether compiled kernels run here: the innermost ``kernels(compiled=...)`` block,
    else the process default."""
    return kernel_enabled("compiled")


def compiled(fn: Callable | None = None, *, recompute: bool = False) -> Callable:
    """``fn`` compiled when compiled kernels are on, ``fn`` itself otherwise or after a
    failed compilation. One compilation per distinct signature (tensor shapes, dtypes,
    strides, devices and the other arguments' values), each with static shapes: inductor's
    dynamic-shape code measured up to twice as slow on CPU here, and dynamo's per-function
    recompile limit (8) would otherwise send a model's ninth layer shape back to eager.
    Use as ``@compiled`` or ``@compiled(recompute=True)`` (see _RECOMPUTE above)."""
    if fn is None:
        return functools.partial(compiled, recompute=recompute)
    by_signature: dict = {}  # signature -> compiled function, or None once it failed
    warned: list = []

    @functools.wraps(fn)
    def run(*args):
        if not kernel_enabled("compiled") or torch.compiler.is_compiling():
            return fn(*args)
        key = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                    for a in args)
        if key in by_signature and by_signature[key] is None:
            return fn(*args)
        try:
            compiled_fn = by_signature.get(key)
            if compiled_fn is None:
                options = dict(_recompute_options()) if recompute else None
                compiled_fn = by_signature[key] = torch.compile(_own_code(fn), fullgraph=True, dynamic=False,
                                                                options=options)
            return compiled_fn(*args)
        except _OOM:
            raise
        except Exception as err:
            result = fn(*args)  # an error of the inputs themselves is raised from here
            # eager works, so compiling is what failed (no compiler, unsupported backend):
            # stay eager for this signature, say so once per function
            by_signature[key] = None
            if not warned:
                warned.append(True)
                warnings.warn(f"visionpeft: compiling {fn.__name__} failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly",
                              RuntimeWarning, stacklevel=2)
            return result

    run.eager, run.signatures = fn, by_signature
    return run


def _own_code(fn: Callable) -> Callable:
    """A copy of ``fn`` with its own code object: dynamo keys its cache (and its recompile
    limit) on the code object, so each signature gets a cache of its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                              fn.__closure__)
