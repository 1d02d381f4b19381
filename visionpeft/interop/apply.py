"""Foreign factors into a model: a new adapter (`inject_entries`) or the tensors of a
loaded one (`hotswap_entries`). Which method takes a layout is the registry's answer
(``factor_layout``); the method's own ``from_factors`` / ``import_factors`` do the rest,
so nothing here knows a method or its parameter names."""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..core.layers import AdaptedLayerBase
from ..core.model_ops import adapted_layers, attach, get_state, plan_injection
from ..core.registry import get_method, method_for_layout
from ..core.targeting import canonical_modules
from .factors import exact_targets, plain_host
from .formats import Entries, InteropError, delta_shape, fits_weight

# the "layout" of a module a file holds in full (PEFT's modules_to_save): its state_dict
SAVED_MODULE = "module"


def _split_saved(entries: Entries) -> tuple[Entries, dict[str, dict]]:
    saved = {m: t for m, (layout, t) in entries.items() if layout == SAVED_MODULE}
    return {m: e for m, e in entries.items() if m not in saved}, saved


def _saved_module_states(saved: dict[str, dict], modules: dict, layers: dict, where: str) -> dict[str, dict]:
    """Check the modules a file holds in full against the model: each is there, carries
    no adapter, and takes the file's state_dict exactly. -> {module: state_dict}."""
    problems = []
    for m, sd in saved.items():
        if m not in modules:
            problems.append(f"{m} (trained in full) is not in this model")
            continue
        host = modules[m].base_layer if hasattr(modules[m], "copies") else modules[m]
        if any(t == m or t.startswith(m + ".") for t in layers) or any(
                isinstance(x, AdaptedLayerBase) for x in host.modules()):
            problems.append(f"{m} is trained in full and also carries an adapter")
            continue
        want = host.state_dict()
        if set(want) != set(sd):
            problems.append(f"{m}: the file holds {sorted(sd)[:6]}, the module has {sorted(want)[:6]}")
            continue
        wrong = [f"{p} {tuple(sd[p].shape)} vs {tuple(t.shape)}" for p, t in want.items()
                 if tuple(sd[p].shape) != tuple(t.shape)]
        if wrong:
            problems.append(f"{m}: the file's shapes differ from the module's: {wrong[:4]}")
    if problems:
        raise InteropError(f"{where} does not fit this model: " + "; ".join(problems[:8]))
    return {m: dict(sd) for m, sd in saved.items()}


def _one_layout(entries: Entries, where: str) -> str:
    layouts = sorted({layout for layout, _ in entries.values()})
    if len(layouts) != 1:
        raise InteropError(f"{where} mixes layouts {layouts}; one adapter holds one method")
    return layouts[0]


def inject_entries(model: nn.Module, entries: Entries, name: str, where: str = "the file") -> nn.Module:
    """Add adapter ``name`` holding ``entries`` exactly. Every module and shape is checked
    (the factors are written into the planned modules) before the model is touched."""
    entries, saved = _split_saved(entries)
    if not entries:
        raise InteropError(f"{where} has no adapter entries" + (
            f" (only modules trained in full: {sorted(saved)[:8]})" if saved else ""))
    layout = _one_layout(entries, where)
    try:
        spec = method_for_layout(layout)
    except KeyError as err:
        raise InteropError(f"{where}: {err.args[0]}") from None
    modules = canonical_modules(model)
    missing = [m for m in entries if m not in modules]
    if missing:
        raise InteropError(f"{where}: {len(missing)} module(s) of the file are not in this model: "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    odd = [f"{m} is {type(plain_host(modules[m])).__name__}" for m in entries
           if not isinstance(plain_host(modules[m]), (nn.Linear, nn.Conv2d))]
    if odd:
        raise InteropError(f"{where} does not fit this model: {'; '.join(odd[:8])} (files adapt Linear/Conv2d)")
    _check_shapes(entries, modules, where)
    tensors = {m: t for m, (_, t) in entries.items()}
    try:
        config = spec.config_cls.from_factors(tensors, exact_targets(entries))
        if saved:  # the exact module names; the plan takes them as listed, not matched again
            config = dataclasses.replace(config, modules_to_save=tuple(sorted(saved)))
        plan = plan_injection(model, config, name, match_saved=not saved)
    except ValueError as err:  # ConfigError, TargetError, a rank the layer cannot hold
        raise InteropError(f"{where} does not fit this model: {err}") from None
    if saved:
        plan.module_states = _saved_module_states(saved, modules, plan.layers, where)
        plan.save_modules = sorted(saved)
    problems = []
    for m, t in tensors.items():
        try:
            plan.layers[m][1]["full"].import_factors(t)
        except ValueError as err:
            problems.append(f"{m}: {err}")
    if problems:
        raise InteropError(f"{where} does not fit this model: " + "; ".join(problems[:8]))
    return attach(model, plan)


def _check_shapes(entries: Entries, modules: dict, where: str) -> None:
    wrong = []
    for m, (layout, tensors) in entries.items():
        shape, weight = delta_shape(layout, tensors), tuple(plain_host(modules[m]).weight.shape)
        if not fits_weight(shape, weight):
            wrong.append(f"{m}: the file gives dW {tuple(shape)}, the layer's weight is {weight}")
    if wrong:
        raise InteropError(f"{where} does not fit this model: " + "; ".join(wrong[:8]))


def hotswap_entries(model: nn.Module, entries: Entries, name: str, where: str = "the file") -> nn.Module:
    """Write ``entries`` into the loaded adapter ``name`` in place: the same modules, the
    same parameter objects (a compiled graph keeps them); each module's ``import_factors``
    takes what fits it (a LoRA zero-pads a lower rank). Checked on copies first, so a
    misfit changes nothing."""
    state = get_state(model)
    if name not in state.configs:
        raise InteropError(f"hot-swap writes into a loaded adapter; this model has {list(state.configs)}, "
                           f"not {name!r}")
    if state.merged:
        raise RuntimeError(f"adapters {list(state.merged)} are merged; unmerge before a hotswap")
    entries, saved = _split_saved(entries)
    if saved:
        raise InteropError(f"{where} also holds modules trained in full ({sorted(saved)[:6]}); a hot-swap "
                           "writes adapter factors only: load it as a new adapter instead")
    layout = _one_layout(entries, where)
    method = state.configs[name].method
    if get_method(method).factor_layout != layout:
        raise InteropError(f"{where} holds {layout} factors; {name!r} is {method}, which does not hold them")
    layers = {m: layer for m, layer in adapted_layers(model).items() if name in layer.adapters}
    _check_shapes({m: e for m, e in entries.items() if m in layers}, layers, where)
    problems = []
    if set(layers) != set(entries):
        problems.append(f"modules only in the file: {sorted(set(entries) - set(layers))[:6]}, only in "
                        f"the adapter: {sorted(set(layers) - set(entries))[:6]}")
    for m in sorted(set(layers) & set(entries)):
        parts = layers[m].adapters[name]
        if set(parts) != {"full"}:
            problems.append(f"{m}: the adapter holds parts {list(parts)}, a file holds whole layers")
            continue
        try:
            copy.deepcopy(parts["full"]).import_factors(entries[m][1])
        except ValueError as err:
            problems.append(f"{m}: {err}")
    if problems:
        raise InteropError("cannot hot-swap: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for m, (_, tensors) in entries.items():
            layers[m].adapters[name]["full"].import_factors(tensors)
    return model
