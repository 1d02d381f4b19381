"""The registry of foreign file formats. Each format lives in its own file and registers
how to recognise, read and write it; the dispatch in ``interop/__init__.py`` asks this
registry and never names a format.

What a reader returns is the common currency of every format: per host module, a
layout name and the tensors of that layout (``("lora", {"down", "up"})``,
``("lokr", {"lokr_w1", "lokr_w2"})``, ``("loha", {"hada_w1_a", ..., "alpha"})``). A
method declares on its registry entry which layout its modules hold exactly
(``factor_layout``), which is how a file finds the method it imports into.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..core.atomic import write_file

Entries = dict[str, tuple[str, dict[str, torch.Tensor]]]  # module -> (layout, tensors)


def delta_shape(layout: str, tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The shape of the dW a layout's tensors describe (a conv's kernel where the file
    keeps its dims, else the (out, fan_in) matrix); None for a layout not known here."""
    if layout == "lora":
        down, up = tensors["down"], tensors["up"]
        return (up.shape[0], *down.shape[1:])
    if layout == "lokr":
        w1, w2 = tensors["lokr_w1"], tensors["lokr_w2"]
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    if layout == "loha":
        return (tensors["hada_w1_a"].shape[0], *tensors["hada_w1_b"].shape[1:])
    return None


def fits_weight(shape: tuple[int, ...] | None, weight_shape: tuple[int, ...]) -> bool:
    """dW's shape against a layer's weight: equal, or the weight viewed as a matrix."""
    if shape is None:
        return True  # the method's import_factors checks it
    flat = (weight_shape[0], int(torch.Size(weight_shape[1:]).numel()))
    return tuple(shape) == tuple(weight_shape) or (len(shape) == 2 and tuple(shape) == flat)


class InteropError(ValueError):
    """A file or adapter cannot be converted; the message says what was found."""


@dataclass
class ExportReport:
    path: Path
    format: str
    layers: int
    rank: int | None = None  # the largest rank written (LoRA formats)
    svd_error: dict[str, float] = field(default_factory=dict)  # relative Frobenius error

    @property
    def max_error(self) -> float:
        return max(self.svd_error.values(), default=0.0)

    def __str__(self) -> str:
        s = f"{self.format} export of {self.layers} layers to {self.path}"
        if self.svd_error:
            s += f"; rank {self.rank} by SVD, relative error max {self.max_error:.3g}"
        return s


@dataclass(frozen=True)
class FileFormat:
    """How one format is recognised, read and written. Every callable is optional.

    detect_folder(path) -> bool     a folder in this format (PEFT's adapter_config.json)
    detect_keys(keys) -> bool       a safetensors file whose keys are this format's
    read(model, path, prefix) -> Entries
    write(model, name, path, rank, prefix) -> ExportReport
    """

    name: str
    detect_folder: Callable[[Path], bool] | None = None
    detect_keys: Callable[[list[str]], bool] | None = None
    read: Callable[..., Entries] | None = None
    write: Callable[..., ExportReport] | None = None
    default_prefix: str | None = None
    factors_only: bool = True  # holds adapter factors only (modules_to_save stay behind)


_FORMATS: dict[str, FileFormat] = {}  # in registration order: detection tries them in turn


def register_format(fmt: FileFormat) -> FileFormat:
    if fmt.name in _FORMATS or fmt.name == "visionpeft":
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> FileFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"format must be one of {list_formats()}, got {name!r}") from None


def list_formats() -> list[str]:
    return list(_FORMATS)


def formats() -> list[FileFormat]:
    return list(_FORMATS.values())


# --- files: shared by the format files -----------------------------------------------
def save_tensors_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (a killed write never leaves half a file)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def single_file(path: Path, default_name: str) -> Path:
    """``path`` itself when it names a .safetensors file, else ``path / default_name``."""
    return path if path.suffix == ".safetensors" else path / default_name


def the_file(path: Path) -> Path:
    """The one .safetensors file at ``path`` (a file, or a folder holding exactly one)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InteropError(f"{path}: expected one .safetensors file, found {len(files)}; point at the file")
        return files[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _unreadable(path: Path, err: Exception) -> InteropError:
    return InteropError(f"{path} is not a readable safetensors file ({err}); it may be truncated "
                        "or another format (pickled .bin/.ckpt files are not read)")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err


def read_keys(path: Path) -> tuple[list[str], dict | None]:
    """A safetensors file's keys and header metadata, without loading its tensors."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys()), f.metadata()
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from err
