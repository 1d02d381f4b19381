"""Config base: typed dataclasses, validated on construction, JSON round trip.

Every method config inherits the fields every method shares (targets, exclusions,
alpha, modules to train in full) and adds its own. A config is never modified after
construction by the library: injection reads it, it never writes to it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config field holds a value the method cannot use."""


def _targets_tuple(value, field_name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(
        f"{field_name} must be a module name, a 're:' regex or a list of those; "
        f"got {value!r}"
    )


def rank_pattern_pairs(owner: str, pattern) -> tuple[tuple[str, int], ...]:
    """A ``rank_pattern`` ({exact layer name: rank}, or its pairs) as sorted pairs,
    checked: what a frozen config stores (a dict is not hashable)."""
    try:
        pairs = pattern.items() if isinstance(pattern, dict) else pattern
        pairs = tuple(sorted((str(k), v) for k, v in pairs))
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"{owner}.rank_pattern must map layer names to ranks, got {pattern!r}") from None
    bad = [(k, v) for k, v in pairs if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ConfigError(f"{owner}.rank_pattern ranks must be integers >= 1, got {bad[:4]}")
    return pairs


def split_ranks(ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(r, rank_pattern) for per-layer ranks: the most common rank (a tie goes to the
    larger) and the layers that differ from it."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    return r, {m: k for m, k in ranks.items() if k != r}


@dataclass(frozen=True)
class MethodConfig:
    """Fields shared by every method.

    target_modules: names matched exactly or by dotted suffix, ``re:`` full-match
        regexes, optional slice selectors such as ``"qkv[q,v]"``; presets in
        ``visionpeft.presets``.
    exclude_modules: same syntax; matches are skipped.
    alpha: the method's scale numerator; ``None`` picks the method's default.
    modules_to_save: modules (head, norms) trained in full and saved with the adapter;
        the base copy stays untouched, so ``disabled()`` still gives the base model.
    """

    method: ClassVar[str] = ""

    target_modules: tuple[str, ...] = ()
    exclude_modules: tuple[str, ...] = ()
    alpha: float | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        # frozen dataclass: normalise through object.__setattr__ once, at construction.
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            object.__setattr__(self, name, _targets_tuple(getattr(self, name), name))
        if not self.target_modules and not self.modules_to_save:
            raise ConfigError(
                f"{type(self).__name__}: target_modules is empty; give module names, "
                "a 're:' regex or a preset from visionpeft.presets"
            )
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
                raise ConfigError(f"alpha must be a number or None, got {self.alpha!r}")
            if not 0 < self.alpha < math.inf:
                raise ConfigError(f"alpha must be a finite number > 0, got {self.alpha}")
        for f in fields(self):  # a string like "False" would otherwise count as true
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{type(self).__name__}.{f.name} must be true or false, got "
                                  f"{getattr(self, f.name)!r}")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ConfigError saying what is allowed."""

    @classmethod
    def from_factors(cls, factors: dict[str, dict], target_modules: list[str]) -> "MethodConfig":
        """A config whose modules on these layers hold ``factors`` ({layer: tensors of the
        method's file layout}) exactly; methods with a registry ``factor_layout`` define it."""
        raise TypeError(f"{cls.__name__} has no file layout to build a config from")

    def for_layer(self, name: str, index: int | None = None) -> "MethodConfig":
        """The config one layer's module is built from (per-layer overrides, e.g. LoRA's
        rank_pattern); the adapter as a whole keeps ``self``. ``index``: the layer's
        position among this adapter's targets in model order (None where not known)."""
        return self

    def check_layers(self, names: list[str]) -> None:
        """Checks that need the resolved targets (their names, in model order); raise
        ConfigError saying what would fit."""

    # --- serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        data = dict(data)
        method = data.pop("method", cls.method)
        if cls.method and method != cls.method:
            raise ConfigError(f"{cls.__name__} reads method {cls.method!r}, got {method!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(known)}"
            )
        return cls(**data)

    def replace(self, **changes) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


def check_positive_int(cfg: MethodConfig, name: str, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be an integer >= {minimum}, got {value!r}"
        )


def check_choice(cfg: MethodConfig, name: str, choices) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(
            f"{type(cfg).__name__}.{name}={value!r} is not allowed; choose one of {sorted(choices)}"
        )


def check_dropout(cfg: MethodConfig, name: str = "dropout") -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{type(cfg).__name__}.{name} is a probability and must be in [0, 1), "
                          f"got {value!r}")


__all__ = ["MethodConfig", "ConfigError", "check_positive_int", "check_choice", "check_dropout", "field"]
