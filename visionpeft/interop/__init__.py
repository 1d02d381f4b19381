"""Export to and import from the formats other tools read: diffusers, PEFT, kohya /
ComfyUI, LyCORIS LoKr, and a merged state dict. One converter module per format; this
file only dispatches, detects formats from file contents (never from the file name
alone) and writes atomically.

    report = vp.export(model, "out/dog.safetensors", name="dog", format="diffusers")
    vp.import_adapter(model, "their_lora.safetensors", name="style")   # format detected
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.targeting import canonical_modules
from ..core.atomic import write_dir, write_file
from ..core.model_ops import adapted_layers, get_state, trained_copies
from . import diffusers_format, kohya_format, lycoris_format, peft_format
from .factors import (InteropError, _plain_host, conv_layout_problem, hotswap_factors, inject_factors,
                      model_factors)
from .merged import merged_state_dict

FORMATS = ("diffusers", "peft", "kohya", "lycoris", "merged")
DEFAULT_PREFIX = {"diffusers": "unet", "kohya": "lora_unet", "lycoris": "lycoris"}


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


def _atomic_save_file(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _single_file(path: Path, default_name: str) -> Path:
    return path if path.suffix == ".safetensors" else path / default_name


def export(model: nn.Module, path, name: str | None = None, format: str = "peft",
           rank: int | None = None, prefix: str | None = None) -> ExportReport:
    """Write adapter ``name`` (default: the only one) in ``format``:

    - "peft": a folder for ``PeftModel.from_pretrained(model, folder)``
    - "diffusers": ``pytorch_lora_weights.safetensors`` (``path`` may be the file or a
      folder) for ``pipe.load_lora_weights`` / ``unet.load_lora_adapter``; keys under
      ``prefix`` (default "unet")
    - "kohya": ``lora_down`` / ``lora_up`` / ``alpha`` keys under ``prefix`` (default
      "lora_unet"), for kohya, ComfyUI and A1111
    - "lycoris": LoKr keys (``lokr_w1`` / ``lokr_w2``) of a KronA adapter, prefix
      "lycoris" by default
    - "merged": the host's own state_dict with dW merged in

    The LoRA formats take a LoRA adapter as it is; any other weight-space method needs
    ``rank`` and is written as the rank-``rank`` truncated SVD of its dW, with the
    relative error per layer in the returned report. What is written is what the model
    computes now: the method's scale and the one set by ``vp.set_scale`` are folded in."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    state = get_state(model)
    if name is None:
        if len(state.configs) != 1:
            raise ValueError(f"the model has adapters {list(state.configs)}; name the one to export")
        name = next(iter(state.configs))
    if name not in state.configs:
        raise KeyError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    path = Path(path)
    prefix = prefix or DEFAULT_PREFIX.get(format)
    if format == "merged":
        tensors = merged_state_dict(model, name)
        target = _single_file(path, "model.safetensors")
        _atomic_save_file(tensors, target, {"format": "pt"})
        layers = sum(1 for layer in adapted_layers(model).values() if name in layer.adapters)
        return ExportReport(target, format, layers)
    copies = sorted(m for m, holder in trained_copies(model).items() if name in holder.copies)
    if copies:
        warnings.warn(f"{format} files hold adapter factors only: the modules {name!r} trains in full "
                      f"(modules_to_save: {copies}) are not written; vp.save_adapter keeps them, or use "
                      f"format='merged'", stacklevel=2)
    if format == "lycoris":
        tensors = lycoris_format.to_tensors(model, name, prefix)
        target = _single_file(path, "lycoris_weights.safetensors")
        _atomic_save_file(tensors, target, {"format": "pt"})
        return ExportReport(target, format, len(tensors) // 3)
    factors, errors = model_factors(model, name, rank)
    modules = canonical_modules(model)
    odd = {m: why for m in factors if (why := conv_layout_problem(_plain_host(modules[m])))}
    if odd and format in ("peft", "diffusers"):
        raise InteropError(f"{format} builds a LoRA conv without groups or dilation, so these "
                           f"layers would load wrong: {odd}; use format='kohya' (weight-patching "
                           "loaders such as ComfyUI apply it exactly) or 'merged'")
    if odd:
        warnings.warn(f"kohya export of convs with {odd}: loaders that patch weights (ComfyUI, "
                      "A1111) apply it exactly, loaders that build LoRA conv layers "
                      "(diffusers' kohya conversion) do not", stacklevel=2)
    written = max((f.rank for f in factors.values()), default=0)
    if format == "peft":
        write_dir(path, lambda folder: peft_format.write(factors, folder))
        target = path
    else:
        module = diffusers_format if format == "diffusers" else kohya_format
        target = _single_file(path, diffusers_format.WEIGHTS_NAME if format == "diffusers"
                              else "lora_weights.safetensors")
        _atomic_save_file(module.to_tensors(factors, prefix), target, {"format": "pt"})
    return ExportReport(target, format, len(factors), written, errors)


def detect_format(path) -> str:
    """"visionpeft" (a vp.save_adapter folder), "peft", "diffusers", "kohya" or "lycoris",
    read from the files' contents."""
    path = Path(path)
    if path.is_dir():
        cfg = path / "adapter_config.json"
        if cfg.is_file():
            doc = json.loads(cfg.read_text())
            if doc.get("format") == "visionpeft":
                return "visionpeft"
            if "peft_type" in doc:
                return "peft"
            raise InteropError(f"{cfg} is neither a visionpeft nor a PEFT adapter config")
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InteropError(f"{path} has no adapter_config.json and {len(files)} .safetensors "
                               "files; point at the file")
        path = files[0]
    keys = list(_read_tensors(path))
    for fmt, module in (("lycoris", lycoris_format), ("kohya", kohya_format), ("diffusers", diffusers_format)):
        if module.looks_like(keys):
            return fmt
    raise InteropError(f"{path}: no known adapter layout in its keys (first: {keys[:5]}); "
                       "expected lora_A/lora_B (diffusers, PEFT), lora_down/lora_up (kohya) or "
                       "lokr_w1/lokr_w2 (LyCORIS)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InteropError(f"{path} is not a readable safetensors file ({e}); it may be truncated "
                           "or another format (pickled .bin/.ckpt files are not read)") from e


def import_adapter(model: nn.Module, path, name: str = "default", format: str | None = None,
                   prefix: str | None = None) -> nn.Module:
    """Inject an adapter from a foreign file: LoRA formats become a LoRA adapter (one rank,
    the file's largest; scales folded in), a LoKr file a KronA adapter. The format is read
    from the contents when not given. Every key and shape is checked before the model
    changes; keys that match no module are listed."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt == "visionpeft":
        from ..core.io import load_adapter

        return load_adapter(model, path, name)
    if fmt not in FORMATS or fmt == "merged":
        raise ValueError(f"format must be one of peft, diffusers, kohya, lycoris; got {fmt!r}")
    state = get_state(model, required=False)
    if state is not None and name in state.configs:
        raise ValueError(f"the model already has an adapter named {name!r}")
    if fmt == "lycoris":
        tensors = _read_tensors(_the_file(path))
        pairs = lycoris_format.from_tensors(tensors, model, prefix, str(path))
        return lycoris_format.inject_kron(model, pairs, name)
    return inject_factors(model, read_factors(model, path, fmt, prefix), name)


def _the_file(path: Path) -> Path:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InteropError(f"{path}: expected one .safetensors file, found {len(files)}")
        return files[0]
    return path


def read_factors(model: nn.Module, path, format: str, prefix: str | None = None) -> dict:
    """{module: Factors} from a PEFT folder or a diffusers / kohya file, scales folded in."""
    path = Path(path)
    if format == "peft":
        if not peft_format.is_peft_folder(path):
            raise InteropError(f"{path} is not a PEFT adapter folder (adapter_config.json with peft_type)")
        return peft_format.read(path)
    if format not in ("diffusers", "kohya"):
        raise InteropError(f"{path} is a {format} file, not a LoRA; it has no LoRA factors")
    file = _the_file(path)
    tensors = _read_tensors(file)
    if format == "kohya":
        return kohya_format.from_tensors(tensors, model, prefix, str(path))
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    return diffusers_format.from_tensors(tensors, prefix, str(path), metadata)


__all__ = ["export", "import_adapter", "detect_format", "read_factors", "hotswap_factors", "ExportReport",
           "InteropError", "FORMATS"]
