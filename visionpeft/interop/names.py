"""Module names in the flattened form kohya and LyCORIS keys use: ``<prefix>_<module with
dots as underscores>``, and the lookup back to the model's dotted names."""
from __future__ import annotations

from torch import nn

from ..core.targeting import canonical_modules
from .formats import InteropError


def flat_name(module: str) -> str:
    return module.replace(".", "_")


def _lacks_text_model_level(model: nn.Module) -> bool:
    """transformers 5 dropped the ``text_model`` level of CLIPTextModel; kohya, LyCORIS,
    ComfyUI and A1111 files keep naming its modules ``text_model.encoder...``."""
    return (type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model")
            and hasattr(model, "encoder"))


def file_module_names(model: nn.Module) -> dict[str, str]:
    """{dotted module name: the name kohya / LyCORIS files give it} where they differ."""
    if not _lacks_text_model_level(model):
        return {}
    return {name: f"text_model.{name}" for name in canonical_modules(model) if name}


class _Lookup(dict):
    """{flattened name: dotted name}; a flattened name two modules share is refused only
    when a file entry asks for it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.clashes: dict[str, list[str]] = {}
        renamed = file_module_names(model)
        for name in canonical_modules(model):
            for flat in {flat_name(name), flat_name(renamed.get(name, name))}:  # files may use either
                if flat in self and self[flat] != name:
                    self.clashes.setdefault(flat, [self[flat]]).append(name)
                self[flat] = name

    def get(self, flat, default=None):
        if flat in self.clashes:
            raise InteropError(f"modules {self.clashes[flat]} share the kohya name {flat!r}; a "
                               "kohya key cannot say which one it means")
        return super().get(flat, default)


def module_lookup(model: nn.Module) -> _Lookup:
    return _Lookup(model)


def split_stem(stem: str, table: dict, prefixes=None) -> tuple[str, str] | None:
    """(prefix, module) for a key stem ``<prefix>_<flattened module>``; the prefix may
    itself contain underscores, so every split point is tried (given prefixes first)."""
    for p in prefixes or ():
        if stem.startswith(p + "_") and stem[len(p) + 1:] in table:
            return p, table.get(stem[len(p) + 1:])
    for i, ch in enumerate(stem):
        if ch == "_" and i and stem[i + 1:] in table:
            return stem[:i], table.get(stem[i + 1:])
    return None
