"""Model-level operations of the public API: inject, switch, merge, remove, inspect.

Injection is two-phase: `plan_injection` resolves targets and builds every adapter
module without touching the model (so every error comes before any change), then
`attach` swaps wrappers in. `load_adapter` reuses both phases.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import AdapterModule, HostSpec
from .config import MethodConfig
from .layers import (AdaptedBlock, AdaptedLayer, AdaptedLayerBase, AdaptedMultiheadAttention,
                     AdapterState, TrainedCopy, host_spec)
from .registry import MethodSpec, get_method
from .targeting import TargetError, adaptable_layers, canonical_modules, resolve_targets
from .tokens import bind_token_grid, release_token_grid

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# --- finding our pieces -------------------------------------------------------------
def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayerBase]:
    """Our wrappers by the host's module names (see `canonical_modules`)."""
    return {n: m for n, m in canonical_modules(model).items() if isinstance(m, AdaptedLayerBase)}


def trained_copies(model: nn.Module) -> dict[str, TrainedCopy]:
    return {n: m for n, m in canonical_modules(model).items() if isinstance(m, TrainedCopy)}


def _adapter_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters our wrappers hold (adapters, trained copies): told apart by
    the module that owns them, not by name, since a host may have a submodule called
    "adapters" or "copies" of its own."""
    ids = set()
    for m in model.modules():
        if isinstance(m, AdaptedLayerBase):
            ids.update(id(p) for p in m.adapters.parameters())
        elif isinstance(m, TrainedCopy):
            ids.update(id(p) for p in m.copies.parameters())
    return ids


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict(keep_vars=True)`` with the ``base_layer`` hop of every block wrapper
    removed, so keys carry the host's names (layer wrappers keep theirs)."""
    blocks = {raw for raw, m in model.named_modules() if isinstance(m, AdaptedBlock) and raw}
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        raw, kept = [], []
        for atom in key.split("."):
            hop = atom == "base_layer" and ".".join(raw) in blocks
            raw.append(atom)
            if not hop:
                kept.append(atom)
        out[".".join(kept)] = tensor
    return out


def is_block_method(spec: MethodSpec) -> bool:
    return "block" in spec.layer_kinds


def get_state(model: nn.Module, required: bool = True) -> AdapterState | None:
    for m in model.modules():
        if isinstance(m, (AdaptedLayerBase, TrainedCopy)):
            return m.state
    if required:
        raise ValueError("this model has no adapters; add one with vp.inject(model, config)")
    return None


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters injected into ``model``, in injection order ([] for none)."""
    state = get_state(model, required=False)
    return [] if state is None else list(state.configs)


def _check_names(state: AdapterState, names) -> None:
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise KeyError(f"no adapter named {unknown}; this model has {list(state.configs)}")


# --- injection ----------------------------------------------------------------------
@dataclass
class InjectionPlan:
    name: str
    config: MethodConfig
    layers: dict[str, tuple[str, dict[str, AdapterModule]]]  # layer name -> (kind, part -> module)
    save_modules: list[str]
    module_states: dict[str, dict] = field(default_factory=dict)  # loaded copies, by module


def _host_weight(module: nn.Module) -> torch.Tensor:
    """The tensor whose device and dtype new adapter modules take."""
    base = module.base_layer if isinstance(module, AdaptedLayerBase) else module
    if isinstance(base, nn.MultiheadAttention):
        return base.in_proj_weight
    if isinstance(base, (nn.Linear, nn.Conv2d)):
        return base.weight
    return next((p for p in base.parameters() if p.is_floating_point()), torch.empty(0))


def _refuse_overlap(lname: str, module: nn.Module, block: bool) -> None:
    """One module name, one wrapper: a block adapter cannot wrap a layer that carries
    weight-space adapters, nor the other way round."""
    if block and isinstance(module, AdaptedLayerBase) and not isinstance(module, AdaptedBlock):
        raise TargetError(f"{lname} carries weight-space adapters {list(module.adapters)}; a "
                          "block adapter cannot wrap the same layer: target the block around it")
    if not block and isinstance(module, AdaptedBlock):
        raise TargetError(f"{lname} is wrapped whole by block adapters {list(module.adapters)}; "
                          "weight-space adapters go on the layers inside a block, or are "
                          "injected before the block adapter on a layer of its own")


def _layer_config(config: MethodConfig, name: str, index: int) -> MethodConfig:
    """``config.for_layer(name, index)``; a config written before ``for_layer`` took the
    layer's index (``for_layer(self, name)``) is called as it was."""
    if "index" in inspect.signature(config.for_layer).parameters:
        return config.for_layer(name, index)
    return config.for_layer(name)


def plan_injection(model: nn.Module, config: MethodConfig, name: str,
                   targets: dict[str, tuple[str, tuple[str, ...]]] | None = None,
                   match_saved: bool = True) -> InjectionPlan:
    """Resolve and build everything, touching nothing. ``targets`` (from a saved file)
    replaces pattern matching; ``match_saved=False`` leaves modules_to_save to the
    caller (a file lists them by name)."""
    if not isinstance(config, MethodConfig):
        raise TypeError(f"config must be a method config (e.g. vp.LoRAConfig), got {type(config).__name__}")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    state = get_state(model, required=False)
    if state is not None and name in state.configs:
        raise ValueError(f"the model already has an adapter named {name!r}; "
                         "vp.remove(model, name) first or choose another name")
    spec = get_method(config.method)
    block = is_block_method(spec)
    if targets is None:
        targets = resolve_targets(model, config.target_modules, config.exclude_modules,
                                  blocks=block) if config.target_modules else {}
    layers_by_name = adaptable_layers(model, blocks=block)
    unknown = [n for n in targets if n not in layers_by_name]
    if unknown:
        raise TargetError(f"no adaptable layer named {unknown[0]!r} in this model")
    order = [n for n in layers_by_name if n in targets]  # model order, also for a saved file's list
    position = {n: i for i, n in enumerate(order)}
    config.check_layers(order)
    built: dict[str, tuple[str, dict[str, AdapterModule]]] = {}
    for lname, (kind, parts) in targets.items():
        module = layers_by_name[lname][1]
        kind = layers_by_name[lname][0]
        _refuse_overlap(lname, module, block)
        if block:
            try:
                mod = spec.module_cls(_layer_config(config, lname, position[lname]), HostSpec.for_block(
                    module.base_layer if isinstance(module, AdaptedBlock) else module))
            except (ValueError, TypeError) as err:
                raise type(err)(f"{lname}: {err}") from None
            weight = _host_weight(module)
            built[lname] = (kind, {"full": mod.to(device=weight.device, dtype=weight.dtype)})
            continue
        host_kind = "linear" if kind == "mha" else kind
        if host_kind not in spec.layer_kinds:
            raise TargetError(f"{lname}: method {spec.name!r} supports {list(spec.layer_kinds)} "
                              f"layers, not {kind}; exclude it with exclude_modules")
        if kind == "mha" and not spec.weight_space:
            raise TargetError(f"{lname}: MultiheadAttention needs a weight-space method")
        weight = _host_weight(module)
        mods = {}
        for part in parts:
            base = module.base_layer if isinstance(module, AdaptedLayerBase) else module
            try:
                mod = spec.module_cls(_layer_config(config, lname, position[lname]), host_spec(base, part))
            except (ValueError, TypeError) as err:
                raise type(err)(f"{lname}{'' if part == 'full' else f'[{part}]'}: {err}") from None
            mods[part] = mod.to(device=weight.device, dtype=weight.dtype)
        built[lname] = (kind, mods)
    save_modules = []
    if config.modules_to_save and match_saved:
        named = canonical_modules(model)
        for entry in config.modules_to_save:
            hits = [n for n in named if n == entry or n.endswith("." + entry)]
            hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
            if not hits:
                raise TargetError(f"modules_to_save entry {entry!r} matches no module")
            overlap = [h for h in hits if h in built]
            overlap += [h for h in hits if h not in overlap and any(
                isinstance(m, AdaptedLayerBase) for m in named[h].modules())]  # another adapter's
            if overlap:
                raise TargetError(f"{overlap}: a module cannot both carry an adapter and be "
                                  "trained in full (modules_to_save)")
            save_modules += hits
    return InjectionPlan(name, config, built, list(dict.fromkeys(save_modules)))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    while isinstance(parent, AdaptedBlock):  # the host's child lives in the host block
        parent = parent.base_layer
    setattr(parent, child, new)


def attach(model: nn.Module, plan: InjectionPlan) -> nn.Module:
    """Phase two: freeze the base, swap wrappers in, register the adapter. Cannot fail on
    user input: plan_injection checked everything."""
    state = get_state(model, required=False)
    if state is None:
        state = AdapterState()
        state.frozen_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if state.merged:
        raise RuntimeError("the model is merged; vp.unmerge(model) before adding adapters")
    ours = _adapter_parameter_ids(model)
    for p in model.parameters():  # the base only: other adapters stay as they are
        if id(p) not in ours:
            p.requires_grad_(False)
    for lname, (kind, mods) in plan.layers.items():
        module = model.get_submodule(lname)
        if kind == "block" and not isinstance(module, AdaptedBlock):
            module = AdaptedBlock(module, state)
            _set_submodule(model, lname, module)
        elif not isinstance(module, AdaptedLayerBase):
            module = (AdaptedMultiheadAttention if kind == "mha" else AdaptedLayer)(module, state)
            _set_submodule(model, lname, module)
        module.add_adapter(plan.name, mods)
        # follow the host's train/eval mode (adapter dropout), leaving the host as it is
        module.training = module.base_layer.training
        module.adapters.train(module.training)
    for mname in plan.save_modules:
        module = model.get_submodule(mname)
        if not isinstance(module, TrainedCopy):
            module = TrainedCopy(module, state)
            module.training = module.base_layer.training
            _set_submodule(model, mname, module)
        copy = _clone_module(module.base_layer)
        if mname in plan.module_states:
            copy.load_state_dict(plan.module_states[mname])
        copy.requires_grad_(True)
        module.copies.train(module.training)
        module.copies[plan.name] = copy
    for mods in (m for _, m in plan.layers.values()):
        for mod in mods.values():
            mod.requires_grad_(True)
            if getattr(mod, "needs_token_grid", False):
                mod.token_grid = bind_token_grid(model, state)
    for mods in (m for _, m in plan.layers.values()):
        for mod in mods.values():
            if hasattr(mod, "bind_model"):  # modules that need the model (shared parts, a pass of the host)
                mod.bind_model(model, plan.name)
    state.configs[plan.name] = plan.config
    state.scales[plan.name] = 1.0
    state.active = state.active + (plan.name,)
    return model


def _clone_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def inject(model: nn.Module, config: MethodConfig, name: str = "default") -> nn.Module:
    """Add adapter ``name`` to ``model`` in place; freezes the base; the new adapter is
    active alongside those already active. Returns the model."""
    return attach(model, plan_injection(model, config, name))


# --- switching ------------------------------------------------------------------------
def _refuse_if_merged(state: AdapterState, what: str) -> None:
    if state.merged:
        raise RuntimeError(f"cannot {what} while adapters {list(state.merged)} are merged; "
                           "vp.unmerge(model) first")


def set_active(model: nn.Module, names) -> None:
    """Run exactly these adapters (a name, a list, or [] for none)."""
    state = get_state(model)
    names = (names,) if isinstance(names, str) else tuple(names)
    _check_names(state, names)
    _refuse_if_merged(state, "change the active adapters")
    state.active = names


def set_scale(model: nn.Module, name: str, scale: float) -> None:
    state = get_state(model)
    _check_names(state, [name])
    _refuse_if_merged(state, "change a scale")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    state.scales[name] = float(scale)


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    return get_state(model).active


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Base model only inside the block (merged weights are unmerged meanwhile)."""
    state = get_state(model)
    merged = state.merged
    if merged:
        unmerge(model)
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous
        if merged:
            merge(model, merged)


@contextlib.contextmanager
def routing(model: nn.Module, adapter_per_row):
    """The adapters of each batch row inside the block: per row an adapter name, None
    for the base model, or a list of names (a concept and a style adapter) whose updates
    add, as `set_active` with those names would give that row.

    Rows that all agree run the unrouted forward. Differing rows cost about one adapter
    per adapter a row holds on the Linear layers of methods with a batched form (LoRA,
    KronA, WaRA, Block-LoRA: `AdapterModule.routed_add`); an adapter on every row runs
    unrouted; convs, attention layers, block adapters and other methods run a sub-batch
    per adapter (per set of adapters for attention layers)."""
    state = get_state(model)
    rows = tuple(_row_set(r, i) for i, r in enumerate(adapter_per_row))
    _check_names(state, list(dict.fromkeys(n for row in rows for n in row)))
    _refuse_if_merged(state, "route rows")
    previous, state.routing = state.routing, rows
    try:
        yield model
    finally:
        state.routing = previous


def _row_set(row, i: int) -> tuple[str, ...]:
    """One row of `routing` as a tuple of names: None -> (), "a" -> ("a",), ["a", "s"] kept
    in order with repeats dropped."""
    if row is None:
        return ()
    if isinstance(row, str):
        return (row,)
    if isinstance(row, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in row):
        return tuple(dict.fromkeys(sorted(row) if isinstance(row, (set, frozenset)) else row))
    raise TypeError(f"routing row {i} is {row!r}; give an adapter name, None, or a list of names")


# --- merge / remove ---------------------------------------------------------------
def merge(model: nn.Module, names=None, keep_original: bool = True) -> nn.Module:
    """Fold the active adapters (or ``names``) into the host weights. With keep_original
    (default) the host weights are kept, so unmerge restores them bit for bit."""
    state = get_state(model)
    if state.merged:
        raise RuntimeError(f"adapters {list(state.merged)} are already merged")
    names = state.active if names is None else ((names,) if isinstance(names, str) else tuple(names))
    _check_names(state, names)
    not_weight_space = [n for n in names if not get_method(state.configs[n].method).weight_space]
    if not_weight_space:
        raise ValueError(f"adapters {not_weight_space} have no weight-space form and cannot merge")
    layers = [m for m in adapted_layers(model).values() if any(n in m.adapters for n in names)]
    if not keep_original:
        # without kept copies a refusal halfway could only be undone by subtracting again,
        # which is not exact: every layer is checked before any is written
        for layer in layers:
            layer.merged_weights(names, state.scales)
    done = []
    try:
        for layer in layers:
            layer.merge(names, state.scales, keep_original)
            done.append(layer)
    except Exception:
        for layer in done:  # leave the model as it was
            layer.unmerge()
        raise
    state.merged = tuple(names)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    state = get_state(model)
    for layer in adapted_layers(model).values():
        layer.unmerge()
    state.merged = ()
    return model


def remove(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove one adapter (or all); layers left without adapters get their original
    module objects back, and parameters their requires_grad from before injection."""
    state = get_state(model)
    names = list(state.configs) if name is None else [name]
    _check_names(state, names)
    if state.merged:
        unmerge(model)
    for lname, layer in adapted_layers(model).items():
        for n in names:
            if n in layer.adapters:
                layer.remove_adapter(n)
        if not len(layer.adapters):
            layer.release()
            _set_submodule(model, lname, layer.base_layer)
    for mname, holder in trained_copies(model).items():
        for n in names:
            if n in holder.copies:
                del holder.copies[n]
        if not len(holder.copies):
            _set_submodule(model, mname, holder.base_layer)
    for n in names:
        del state.configs[n]
        del state.scales[n]
    state.active = tuple(a for a in state.active if a not in names)
    if not any(getattr(m, "needs_token_grid", False) for layer in adapted_layers(model).values()
               for mods in layer.adapters.values() for m in mods.values()):
        release_token_grid(model, state)
    if not state.configs:
        for pname, p in model.named_parameters():
            p.requires_grad_(state.frozen_flags.get(pname, p.requires_grad))
    return model


# --- inspection -----------------------------------------------------------------------
def _resolve_layer(model: nn.Module, module_name: str) -> tuple[AdaptedLayerBase, str | None]:
    layers = adapted_layers(model)
    if module_name in layers:
        return layers[module_name], None
    if module_name.endswith(".out_proj") and module_name[:-9] in layers:
        return layers[module_name[:-9]], "out_proj"
    from .targeting import close_names

    raise KeyError(f"{module_name!r} is not an adapted layer; closest: "
                   f"{close_names(module_name, layers) or list(layers)[:5]}")


def delta_weight(model: nn.Module, module_name: str, name: str | None = None) -> torch.Tensor:
    """dW that adapter ``name`` adds to ``module_name``'s weight (its scale included),
    full host shape, slices placed at their rows. For an nn.MultiheadAttention the
    in_proj's dW; ``"<mha>.out_proj"`` gives the out_proj's."""
    state = get_state(model)
    layer, key = _resolve_layer(model, module_name)
    if name is None:
        if len(layer.adapters) != 1:
            raise ValueError(f"{module_name} has adapters {list(layer.adapters)}; name one")
        name = next(iter(layer.adapters))
    _check_names(state, [name])
    with torch.no_grad():
        deltas = layer.deltas([name], state.scales)
    key = key or "weight"
    if key in deltas:
        return deltas[key]
    return torch.zeros_like(layer._weights()[key])


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class AdapterSummary:
    rows: list[dict]
    trainable: int
    total: int

    @property
    def adapter_parameters(self) -> int:
        return sum(r["params"] for r in self.rows)

    def __str__(self) -> str:
        head = ("module", "adapter", "method", "parts", "params")
        body = [(r["module"], r["adapter"], r["method"], ",".join(r["parts"]), f"{r['params']:,}")
                for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable params: {self.trainable:,} of {self.total:,} ({pct:.3f}%)")
        return "\n".join(lines)

    __repr__ = __str__


def summary(model: nn.Module) -> AdapterSummary:
    """Table of adapted modules with method, parts and parameter counts."""
    state = get_state(model)
    rows = []
    for lname, layer in adapted_layers(model).items():
        for name, parts in layer.adapters.items():
            rows.append({"module": lname, "adapter": name, "method": state.configs[name].method,
                         "parts": list(parts.keys()),
                         "params": sum(p.numel() for p in parts.parameters())})
    for mname, holder in trained_copies(model).items():
        for name, copy in holder.copies.items():
            rows.append({"module": mname, "adapter": name, "method": "full copy", "parts": ["full"],
                         "params": sum(p.numel() for p in copy.parameters())})
    ours = _adapter_parameter_ids(model)
    total = sum(p.numel() for p in model.parameters() if id(p) not in ours)
    return AdapterSummary(rows, trainable_parameters(model), total)
