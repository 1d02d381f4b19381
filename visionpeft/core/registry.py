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


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, module_cls, *, layer_kinds=("linear", "conv2d"),
                    weight_space: bool = True, version: int = 1):
    """Class decorator for a method's config: ``@register_method("lora", LoRAModule)``."""

    def deco(config_cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        config_cls.method = name
        _METHODS[name] = MethodSpec(name, config_cls, module_cls, tuple(layer_kinds),
                                    weight_space, version)
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
