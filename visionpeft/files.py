"""Adapter files, whatever wrote them or reads them: the one place that sends a path to
our own format (`core.io`) or to a foreign one (`interop`), for loading, hot-swapping,
importing and exporting.

    vp.load_adapter(unet, "out/dog")                       # vp.save_adapter folder
    vp.load_adapter(unet, "their_lora.safetensors")        # diffusers / kohya / LyCORIS file
    vp.load_adapter(unet, "out/dog2", name="dog", hotswap=True)
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from . import interop
from .core import io
from .core.atomic import recover
from .core.io import AdapterFileError
from .core.model_ops import adapter_names
from .interop import ExportReport

NATIVE = "visionpeft"


def list_formats() -> list[str]:
    """Every format `export` writes or `load_adapter` reads: ours, then the registered ones."""
    return [NATIVE, *interop.FORMATS]


def detect_format(path) -> str:
    """"visionpeft" (a `vp.save_adapter` folder) or the registered foreign format of a
    folder or file ("peft", "diffusers", "kohya", "lycoris"), read from its contents."""
    return NATIVE if io.is_saved_adapter(path) else interop.detect_format(path)


def _adapter_subfolders(path: Path) -> list[str]:
    """Folders up to two levels below ``path`` that hold an adapter, relative to it (a
    DreamBooth run's output holds ``adapter/unet`` and ``adapter/text_encoder``)."""
    if not path.is_dir():
        return []
    found = sorted(str(p.parent.relative_to(path)) for p in path.glob("*/" + io.CONFIG_NAME))
    return found or sorted(str(p.parent.relative_to(path)) for p in path.glob("*/*/" + io.CONFIG_NAME))


def _check_exists(path: Path) -> None:
    if not path.exists():
        recover(path)  # a save killed mid-swap (two-rename systems) left it under .old-
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and not (path / io.CONFIG_NAME).is_file() and not any(path.glob("*.safetensors")):
        subs = _adapter_subfolders(path)
        if subs:
            example = next((x for x in subs if x.startswith("adapter/")), subs[-1])  # a run's final adapters
            raise AdapterFileError(f"{path} has no {io.CONFIG_NAME}: its subfolders {subs} hold adapters; "
                                   f"pass the one for this model, e.g. {path / example}")
        raise FileNotFoundError(f"{path} has no {io.CONFIG_NAME} and no .safetensors file; is it an "
                                "adapter folder?")


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 hotswap: bool = False, prefix: str | None = None) -> nn.Module:
    """Inject an adapter from a folder written by `save_adapter` (everything checked
    before the model changes), or import a foreign one: a PEFT folder, a diffusers /
    kohya / LyCORIS file (`import_adapter`).

    ``hotswap=True`` instead replaces the tensors of the loaded adapter ``name`` in place
    (same method, layers and shapes): no re-injection and the same parameter objects, so a
    compiled model keeps its graphs."""
    path = Path(path)
    _check_exists(path)
    if hotswap:
        return hotswap_adapter(model, path, name, prefix=prefix)
    if io.is_saved_adapter(path):
        return io.load_saved(model, path, name)
    return interop.import_adapter(model, path, name or "default", prefix=prefix)


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                    prefix: str | None = None) -> nn.Module:
    """Copy a saved adapter's tensors into the loaded adapter ``name`` in place (see
    `load_adapter`). Our folders may differ from the loaded config only where the
    method allows (a LoRA's alpha: re-folded into its factors); a PEFT folder or a
    diffusers / kohya / LyCORIS file goes into a loaded adapter of the method that holds
    its layout, on the same modules. Everything is checked first."""
    path = Path(path)
    _check_exists(path)
    if io.is_saved_adapter(path):
        return io.hotswap_saved(model, path, name)
    if name is None:
        raise ValueError("name the loaded adapter to hot-swap into")
    return interop.hotswap_file(model, path, name, prefix=prefix)


def import_adapter(model: nn.Module, path, name: str = "default", format: str | None = None,
                   prefix: str | None = None) -> nn.Module:
    """`interop.import_adapter`, and our own folders as `load_adapter` reads them."""
    if (format or detect_format(path)) == NATIVE:
        return io.load_saved(model, path, name)
    return interop.import_adapter(model, path, name, format, prefix)


def export(model: nn.Module, path, name: str | None = None, format: str = "peft", rank: int | None = None,
           prefix: str | None = None) -> ExportReport:
    """Write adapter ``name`` for another tool (`interop.export`: "peft", "diffusers",
    "kohya", "lycoris", "merged"), or as our own folder with ``format="visionpeft"``
    (`save_adapter`)."""
    if format == NATIVE:
        if rank is not None or prefix is not None:
            raise ValueError("format='visionpeft' saves the adapter as it is: it takes no rank or prefix")
        if name is None:
            names = adapter_names(model)
            if len(names) != 1:
                raise ValueError(f"the model has adapters {names}; name the one to export")
            name = names[0]
        saved = io.save_adapter(model, path, name)
        return ExportReport(saved, NATIVE, len(io.read_adapter_config(saved)["targets"]))
    return interop.export(model, path, name, format, rank, prefix)
