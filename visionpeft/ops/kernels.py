"""Which optional kernels run: torch.compile'd loops (ops/compiled.py) and C kernels (ops/native.py).

Each choice has a process default, read from the environment at import
(VISIONPEFT_COMPILED_KERNELS, off unless 1/true/yes; VISIONPEFT_NATIVE_KERNELS, on unless
0/false/no/off) and changed by ``set_compiled_kernels`` / ``set_native_kernels``. A block

    with vp.kernels(compiled=True):
        loss = model(x)
        loss.backward()

overrides it for the code inside and restores the previous choice on exit, also when an
exception leaves the block; blocks nest (None leaves that choice as it is). The override
is a ``contextvars.ContextVar``: other threads and asyncio tasks keep their own choices,
so nothing leaks between them.

A layer reads the choices in its forward and keeps them for its backward: the backward may
run after the block has ended, or on a thread of autograd's that never saw the block.
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from typing import Iterator

_DEFAULTS = {  # the process defaults; the parsing is each variable's documented one
    "compiled": os.environ.get("VISIONPEFT_COMPILED_KERNELS", "0").strip().lower() in ("1", "true", "yes"),
    "native": os.environ.get("VISIONPEFT_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off"),
}
# None: no `with kernels(...)` block in this context says anything, the default holds
_OVERRIDES = {name: ContextVar(f"visionpeft_{name}_kernels", default=None) for name in _DEFAULTS}


def kernel_enabled(name: str) -> bool:
    """Whether kernels of kind ``name`` ("compiled" or "native") run here: the innermost
    ``kernels`` block of this context that sets it, else the process default."""
    value = _OVERRIDES[name].get()
    return _DEFAULTS[name] if value is None else value


def set_default(name: str, enabled: bool) -> None:
    """The process default of ``name`` (what code outside every ``kernels`` block gets)."""
    _DEFAULTS[name] = enabled


def current_kernels() -> dict[str, bool]:
    """The choices in force here, as ``kernels`` takes them: ``kernels(**current_kernels())``
    re-applies them elsewhere (a layer's backward, another thread)."""
    return {name: kernel_enabled(name) for name in _DEFAULTS}


@contextlib.contextmanager
def kernels(compiled: bool | None = None, native: bool | None = None) -> Iterator[None]:
    """Choose the kernels for the code inside the ``with`` block (this thread or task only).

    compiled: SNELL's torch.compile'd loops (ops/compiled.py) on or off; native: the C
    kernels (ops/native.py) allowed or not, where compiled kernels run. None leaves that
    choice as the enclosing block or the process default has it."""
    chosen = {"compiled": compiled, "native": native}
    for name, flag in chosen.items():
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"kernels({name}=...) takes True, False or None, got {flag!r}")
    tokens = [(_OVERRIDES[name], _OVERRIDES[name].set(flag)) for name, flag in chosen.items() if flag is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
