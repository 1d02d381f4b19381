"""Export to and import from the formats other tools read. One file per format, each
registering itself (`formats.register_format`); this file only dispatches through the
registry and detects formats from file contents (never from the file name alone).

    report = vp.export(model, "out/dog.safetensors", name="dog", format="diffusers")
    vp.import_adapter(model, "their_lora.safetensors", name="style")   # format detected
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from ..core.model_ops import get_state, trained_copies
from .apply import hotswap_entries, inject_entries
from .factors import Factors
from .formats import Entries, ExportReport, InteropError, formats, get_format, list_formats, read_keys

# the formats, one line each; registration order is detection order
from . import peft_format  # noqa: E402,F401
from . import lycoris_format  # noqa: E402,F401
from . import kohya_format  # noqa: E402,F401
from . import diffusers_format  # noqa: E402,F401
from . import merged  # noqa: E402,F401

FORMATS = tuple(list_formats())


def export(model: nn.Module, path, name: str | None = None, format: str = "peft",
           rank: int | None = None, prefix: str | None = None) -> ExportReport:
    """Write adapter ``name`` (default: the only one) in ``format``:

    - "peft": a folder for ``PeftModel.from_pretrained(model, folder)``
    - "diffusers": ``pytorch_lora_weights.safetensors`` (``path`` may be the file or a
      folder) for ``pipe.load_lora_weights`` / ``unet.load_lora_adapter``; keys under
      ``prefix`` (default "unet")
    - "kohya": ``lora_down`` / ``lora_up`` / ``alpha`` keys under ``prefix`` (default
      "lora_unet"), for kohya, ComfyUI and A1111
    - "lycoris": LoKr keys of a KronA adapter or LoHa keys of a LoHa adapter, prefix
      "lycoris" by default
    - "merged": the host's own state_dict with dW merged in

    The LoRA formats take a LoRA adapter as it is; any other weight-space method needs
    ``rank`` and is written as the rank-``rank`` truncated SVD of its dW, with the
    relative error per layer in the returned report. What is written is what the model
    computes now: the method's scale and the one set by ``vp.set_scale`` are folded in."""
    fmt = get_format(format)
    if fmt.write is None:
        raise ValueError(f"format {format!r} is read-only; export formats: "
                         f"{[f.name for f in formats() if f.write]}")
    state = get_state(model)
    if name is None:
        if len(state.configs) != 1:
            raise ValueError(f"the model has adapters {list(state.configs)}; name the one to export")
        name = next(iter(state.configs))
    if name not in state.configs:
        raise KeyError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    copies = sorted(m for m, holder in trained_copies(model).items() if name in holder.copies)
    if copies and fmt.factors_only:
        warnings.warn(f"{format} files hold adapter factors only: the modules {name!r} trains in full "
                      f"(modules_to_save: {copies}) are not written; vp.save_adapter keeps them, or use "
                      f"format='merged'", stacklevel=2)
    return fmt.write(model, name, Path(path), rank, prefix or fmt.default_prefix)


def detect_format(path) -> str:
    """The registered format of a foreign adapter folder or file, from its contents."""
    path = Path(path)
    if path.is_dir():
        for fmt in formats():
            if fmt.detect_folder and fmt.detect_folder(path):
                return fmt.name
        cfg = path / "adapter_config.json"
        if cfg.is_file():
            doc = json.loads(cfg.read_text())
            if isinstance(doc, dict) and doc.get("format") == "visionpeft":
                raise InteropError(f"{path} is a vp.save_adapter folder, not a foreign format: "
                                   "vp.load_adapter / vp.detect_format read it")
            raise InteropError(f"{cfg} is neither a visionpeft nor a PEFT adapter config")
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise InteropError(f"{path} has no adapter_config.json and {len(files)} .safetensors "
                               "files; point at the file")
        path = files[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    keys, _ = read_keys(path)
    for fmt in formats():
        if fmt.detect_keys and fmt.detect_keys(keys):
            return fmt.name
    raise InteropError(f"{path}: no known adapter layout in its keys (first: {keys[:5]}); "
                       "expected lora_A/lora_B (diffusers, PEFT), lora_down/lora_up (kohya), "
                       "lokr_w1/lokr_w2 or hada_w1_a/... (LyCORIS)")


def read_entries(model: nn.Module, path, format: str | None = None, prefix: str | None = None) -> Entries:
    """{module: (layout, tensors)} of a foreign file, every scale folded as its layout says."""
    path = Path(path)
    fmt = get_format(format or detect_format(path))
    if fmt.read is None:
        raise InteropError(f"{path}: the {fmt.name} format is written, not read")
    return fmt.read(model, path, prefix)


def import_adapter(model: nn.Module, path, name: str = "default", format: str | None = None,
                   prefix: str | None = None) -> nn.Module:
    """Inject an adapter from a foreign file: LoRA formats become a LoRA adapter (one rank,
    the file's largest; scales folded in), a LoKr file a KronA adapter, a LoHa file a LoHa
    adapter. The format is read from the contents when not given. Every key and shape is
    checked before the model changes; keys that match no module are listed."""
    state = get_state(model, required=False)
    if state is not None and name in state.configs:
        raise ValueError(f"the model already has an adapter named {name!r}")
    return inject_entries(model, read_entries(model, path, format, prefix), name, str(path))


def hotswap_file(model: nn.Module, path, name: str, format: str | None = None,
                 prefix: str | None = None) -> nn.Module:
    """Write a foreign file's factors into the loaded adapter ``name`` in place."""
    return hotswap_entries(model, read_entries(model, path, format, prefix), name, str(path))


__all__ = ["export", "import_adapter", "detect_format", "read_entries", "hotswap_file", "ExportReport",
           "InteropError", "Factors", "FORMATS"]
