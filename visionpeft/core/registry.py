"""Method registry: a decorator registers a config class with its adapter module.

Capabilities live on the entry, so core code and the test matrix ask the registry
instead of testing method names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapter import AdapterModule
    from .config import MethodConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type["MethodConfig"]
    module_cls: type["AdapterModule"]
    layer_kinds: tuple[str, ...] = ("linear", "conv2d")
    weight_space: bool = True  # has delta_weight(): merge, export, MHA all rely on it
    version: int = 1  # bumped when the saved tensor layout of the method changes
    # What files and hot-swap may ask of the method (see AdapterModule.export_factors):
    # the standard file layout its modules read and write exactly ("lora": down/up,
    # "lokr": lokr_w1/lokr_w2, "loha": hada_w1_a/.../alpha), or None
    factor_layout: str | None = None
    # config fields that never touch stored tensors (a hot-swap may change them freely)
    runtime_fields: tuple[str, ...] = ("dropout",)
    # config fields whose effect lives in the tensors' scale: a hot-swap may change them,
    # the saved factors are re-folded for the loaded config (needs factor_layout)
    folded_fields: tuple[str, ...] = ()


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, module_cls, *, layer_kinds=("linear", "conv2d"),
                    weight_space: bool = True, version: int = 1, factor_layout: str | None = None,
                    runtime_fields=("dropout",), folded_fields=()):
    """Class decorator for a method's config: ``@register_method("lora", LoRAModule)``.

    A method with ``factor_layout`` implements ``export_factors`` / ``import_factors`` on
    its module and ``from_factors`` on its config: files in that layout then import into
    it, export from it, and hot-swap into it."""

    def deco(config_cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if folded_fields and factor_layout is None:
            raise ValueError(f"method {name!r}: folded_fields need a factor_layout to re-fold")
        taken = [m for m, spec in _METHODS.items() if factor_layout and spec.factor_layout == factor_layout]
        if taken:
            raise ValueError(f"method {name!r}: the {factor_layout!r} file layout is held by {taken[0]!r} "
                             "already; a file must find one method")
        config_cls.method = name
        _METHODS[name] = MethodSpec(name, config_cls, module_cls, tuple(layer_kinds),
                                    weight_space, version, factor_layout, tuple(runtime_fields),
                                    tuple(folded_fields))
        return config_cls

    return deco


def get_method(name: str) -> MethodSpec:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {list_methods()}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)


def config_from_dict(data: dict) -> "MethodConfig":
    """Build the right config class from a dict carrying ``method``."""
    if "method" not in data:
        raise KeyError(f"config dict has no 'method' key; registered methods: {list_methods()}")
    return get_method(data["method"]).config_cls.from_dict(data)


def method_for_layout(layout: str) -> MethodSpec:
    """The registered method whose modules hold files of ``layout`` exactly."""
    found = [spec for spec in _METHODS.values() if spec.factor_layout == layout]  # one at most
    if not found:
        known = sorted({s.factor_layout for s in _METHODS.values() if s.factor_layout})
        raise KeyError(f"no registered method holds {layout!r} factors; layouts with a method: {known}")
    return found[0]
