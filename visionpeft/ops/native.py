"""Small C kernels built with the machine's C compiler at first use (CPU, opt-in).

torch.compile (ops/compiled.py) fuses elementwise chains and reductions along one axis,
which covers most of what SNELL does per step, but not work whose amount depends on the
data: SNELL's backward needs the weight gradient g^T x only at the entries its mask keeps
(a tenth of them at 90% sparsity), which is a dot product per kept entry, not a GEMM.
Such a kernel is written in C in this folder (e.g. snell_backward.c, bound in
snell_native.py) and built here, the way inductor builds its own kernels: once per
process, with OpenMP, ``-march=native`` for this machine, and ``-ffp-contract=off``
(inductor's setting) so that arithmetic shared with the compiled forward rounds
identically. It runs only where compiled kernels are on (``vp.kernels(compiled=True)``,
ops/kernels.py); ``kernels(native=False)``, ``set_native_kernels(False)`` or
VISIONPEFT_NATIVE_KERNELS=0 keep it off. With no compiler, or when the build fails, the
method keeps its compiled-only path after one warning.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from .kernels import kernel_enabled, set_default

FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared")


def set_native_kernels(enabled: bool) -> None:
    """Set the process default: allow (the default) or forbid the C kernels, in every
    thread; with them off, compiled kernels run alone. A ``with kernels(native=...)``
    block (ops/kernels.py) overrides it for the code inside the block."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_native_kernels takes True or False, got {enabled!r}")
    set_default("native", enabled)


def native_kernels_enabled() -> bool:
    """Whether the C kernels are allowed here: the innermost ``kernels(native=...)`` block,
    else the process default."""
    return kernel_enabled("native")


def _compiler() -> list[str] | None:
    """The C compiler's command: $CC (may carry a launcher or flags, e.g. "ccache gcc"), else
    cc, gcc or clang from PATH."""
    if os.environ.get("CC", "").strip():
        return shlex.split(os.environ["CC"])
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return [found] if found else None


class CLibrary:
    """A C source file built into a shared library on first ``get()``.

    ``functions`` maps each exported function to its ctypes (restype, argtypes). ``get``
    returns the loaded library, or None where native kernels are off, on a platform
    without a C compiler or OpenMP, or after a failed build (one warning, never retried)."""

    def __init__(self, source: Path, functions: dict[str, tuple]):
        self.source, self.functions = Path(source), functions
        self._lib: ctypes.CDLL | None = None
        self._failed = False
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if not kernel_enabled("native") or self._failed:
            return None
        if self._lib is None:
            with self._lock:
                if self._lib is None and not self._failed:
                    self._lib = self._build()
        return self._lib

    def _build(self) -> ctypes.CDLL | None:
        try:
            cc = _compiler()
            if sys.platform != "linux" or cc is None:
                raise OSError("needs Linux and a C compiler (cc, gcc or clang on PATH, or $CC)")
            with tempfile.TemporaryDirectory(prefix="visionpeft-native-") as tmp:
                target = Path(tmp) / (self.source.stem + ".so")
                done = subprocess.run([*cc, *FLAGS, str(self.source), "-o", str(target)], capture_output=True,
                                      text=True, timeout=120)
                if done.returncode != 0:
                    raise OSError(f"{' '.join(cc)} failed: {(done.stderr or done.stdout).strip().splitlines()[:1]}")
                lib = ctypes.CDLL(str(target))  # mapped: the file may go with the folder
            for name, (restype, argtypes) in self.functions.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            return lib
        except (OSError, ValueError, subprocess.SubprocessError, AttributeError) as err:  # ValueError: $CC quoting
            self._failed = True
            warnings.warn(f"visionpeft: building {self.source.name} failed ({err}); the compiled path runs "
                          f"without it", RuntimeWarning, stacklevel=3)
            return None
