"""Saving and loading adapters: safetensors only, atomic writes, strict checks.

A saved adapter is a folder with
  adapter_config.json        format, version, method, config, every target layer with its
                             kind, parts and base weight shape
  adapter_model.safetensors  tensors keyed ``<layer>.<param>`` (whole layer) or
                             ``<layer>[<part>].<param>`` (a q/k/v/in_proj/out_proj part),
                             plus ``<module>.<param>`` for modules trained in full
Loading checks all of it against the model before the model is touched. This file
knows only this format; `visionpeft.files` dispatches paths to it or to the foreign
formats of `visionpeft.interop`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import HostSpec
from .atomic import write_dir
from .layers import AdaptedLayerBase
from .model_ops import InjectionPlan, adapted_layers, attach, get_state, is_block_method, plan_injection, trained_copies
from .registry import config_from_dict, get_method
from .targeting import adaptable_layers, canonical_modules
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "visionpeft"
FORMAT_VERSION = 1


class AdapterFileError(ValueError):
    """A saved adapter does not fit the model, or is not one of ours."""


def _key(layer: str, part: str, param: str) -> str:
    return f"{layer}.{param}" if part == "full" else f"{layer}[{part}].{param}"


def adapter_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (tensors, targets metadata) of one adapter, in the saved layout."""
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, dict] = {}
    for lname, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        parts = layer.adapters[name]
        targets[lname] = {"kind": layer.kind, "parts": list(parts.keys()),
                          "base_shape": base_shape(layer.kind, layer)}
        for part, mod in parts.items():
            for pname, tensor in mod.state_dict().items():
                tensors[_key(lname, part, pname)] = tensor.detach().contiguous()
    saved_modules = {}
    for mname, holder in trained_copies(model).items():
        if name in holder.copies:
            sd = holder.copies[name].state_dict()
            saved_modules[mname] = {k: list(v.shape) for k, v in sd.items()}
            for pname, tensor in sd.items():
                tensors[f"{mname}.{pname}"] = tensor.detach().contiguous()
    return tensors, {"targets": targets, "modules_to_save": saved_modules}


def base_shape(kind: str, module: nn.Module) -> list[int]:
    """What a saved file records of a target's size: its weight's shape, or a block's
    (out, in) features."""
    base = module.base_layer if isinstance(module, AdaptedLayerBase) else module
    if kind == "block":
        return list(HostSpec.for_block(base).weight_shape)
    return list((base.in_proj_weight if kind == "mha" else base.weight).shape)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's safetensors, or an AdapterFileError naming the file (a truncated or
    foreign file raises safetensors' own error without the path otherwise)."""
    file = folder / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({err}); it may be truncated") from None


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` to the folder ``path`` (created or replaced atomically)."""
    state = get_state(model)
    if name not in state.configs:
        raise KeyError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    config = state.configs[name]
    spec = get_method(config.method)
    tensors, meta = adapter_tensors(model, name)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "visionpeft_version": __version__,
           "name": name, "method": config.method, "method_version": spec.version,
           "config": config.to_dict(), **meta,
           "trainable_parameters": sum(t.numel() for t in tensors.values())}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "method": config.method,
              "name": name}

    def write(folder: Path):
        save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME), metadata=header)
        (folder / CONFIG_NAME).write_text(json.dumps(doc, indent=2))  # model order

    path = Path(path)
    write_dir(path, write)
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; is it an adapter folder?")
    doc = json.loads(cfg_file.read_text())
    if doc.get("format") != FORMAT:
        kind = "a PEFT adapter" if "peft_type" in doc else "not a visionpeft adapter"
        raise AdapterFileError(f"{cfg_file} is {kind}; vp.load_adapter reads folders written "
                               "by vp.save_adapter")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise AdapterFileError(f"{cfg_file} has format_version {doc['format_version']}; this "
                               f"visionpeft reads up to {FORMAT_VERSION}: upgrade visionpeft")
    return doc


def is_saved_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by `save_adapter`."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, OSError):
        return False


def load_saved(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Inject an adapter from a folder written by `save_adapter`. Everything (method,
    version, layers, every tensor's shape) is checked before the model changes."""
    path = Path(path)
    doc = read_adapter_config(path)
    name = name or doc.get("name", "default")
    spec = get_method(doc["method"])
    if int(doc.get("method_version", 1)) != spec.version:
        raise AdapterFileError(f"{path}: saved with {doc['method']} layout version "
                               f"{doc.get('method_version')}, this visionpeft has {spec.version}")
    config = config_from_dict(doc["config"])
    tensors = _read_weights(path)
    plan = _plan_from_file(model, config, name, doc, tensors, path)
    return attach(model, plan)


def _plan_from_file(model, config, name, doc, tensors, path) -> InjectionPlan:
    state = get_state(model, required=False)
    if state is not None and name in state.configs:
        raise ValueError(f"the model already has an adapter named {name!r}")
    layers = adaptable_layers(model, blocks=is_block_method(get_method(config.method)))
    targets, problems = {}, []
    for lname, info in doc["targets"].items():
        if lname not in layers:
            problems.append(f"layer {lname!r} is not in this model (or is not a "
                            "Linear/Conv2d/MultiheadAttention here)")
            continue
        kind, module = layers[lname]
        try:
            shape = base_shape(kind, module)
        except TypeError as err:
            problems.append(f"layer {lname}: {err}")
            continue
        if kind != info["kind"] or shape != list(info["base_shape"]):
            what = "block of (out, in) features" if info["kind"] == "block" else f"{info['kind']} weight of shape"
            problems.append(f"layer {lname}: the adapter was saved for a {what} "
                            f"{tuple(info['base_shape'])}, this model's is a {kind} "
                            f"of shape {tuple(shape)}")
            continue
        targets[lname] = (kind, tuple(info["parts"]))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterFileError(f"{path} does not fit this model: " + "; ".join(problems[:5]) + more)
    # modules_to_save come from the file's list, not from re-matching patterns
    plan = plan_injection(model, config, name, targets=targets, match_saved=False)
    expected: dict[str, torch.Tensor] = {}
    for lname, (_, mods) in plan.layers.items():
        for part, mod in mods.items():
            for pname, t in mod.state_dict().items():
                expected[_key(lname, part, pname)] = t
    named = canonical_modules(model)
    for mname, shapes in doc.get("modules_to_save", {}).items():
        if mname not in named:
            raise AdapterFileError(f"{path}: module {mname!r} (trained in full) is not in this model")
        module = named[mname]
        sd = (module.base_layer if hasattr(module, "copies") else module).state_dict()
        for pname, t in sd.items():
            expected[f"{mname}.{pname}"] = t
        plan.save_modules.append(mname)
        plan.module_states[mname] = {p: f"{mname}.{p}" for p in sd}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{path}: tensors missing from the file: {missing[:8]}; tensors "
                               f"the model has no place for: {unexpected[:8]}")
    wrong = [f"{key}: the file holds shape {tuple(tensors[key].shape)}, the model needs "
             f"{tuple(t.shape)}" for key, t in expected.items()
             if tuple(tensors[key].shape) != tuple(t.shape)]
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise AdapterFileError(f"{path}: " + "; ".join(wrong[:5]) + more)
    for lname, (_, mods) in plan.layers.items():
        for part, mod in mods.items():
            prefix = _key(lname, part, "")
            mod.load_state_dict({k: tensors[prefix + k] for k in mod.state_dict()})
    plan.module_states = {m: {p: tensors[k] for p, k in keys.items()}
                          for m, keys in plan.module_states.items()}
    return plan


# fields that only choose layers: the tensors are compared key by key instead
_TARGETING_FIELDS = {"target_modules", "exclude_modules", "modules_to_save"}


def hotswap_saved(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Copy a saved adapter's tensors into the loaded adapter ``name`` (default: the saved
    name) in place: the same parameter objects, so a compiled model keeps its graphs. The
    saved config must equal the loaded one except in the fields the method's registry
    entry lets differ: ``runtime_fields`` (touch no tensor) and ``folded_fields`` (their
    effect is re-folded into the tensors, e.g. a LoRA's alpha, so the module's own scale,
    a constant a compiled graph may hold, stays). Everything is checked first."""
    path = Path(path)
    state = get_state(model)
    doc = read_adapter_config(path)
    name = name or doc.get("name", "default")
    if name not in state.configs:
        raise KeyError(f"hotswap replaces a loaded adapter; this model has {list(state.configs)}, "
                       f"not {name!r}")
    if state.merged:
        raise RuntimeError(f"adapters {list(state.merged)} are merged; unmerge before a hotswap")
    current = state.configs[name]
    saved = config_from_dict(doc["config"])
    if saved.method != current.method:
        raise AdapterFileError(f"{path} holds a {saved.method} adapter; {name!r} is {current.method}")
    spec = get_method(current.method)
    free = _TARGETING_FIELDS | set(spec.runtime_fields) | set(spec.folded_fields)
    a, b = current.to_dict(), saved.to_dict()
    differ = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if differ:
        raise AdapterFileError(f"{path}: config fields {differ} differ from the loaded {name!r} "
                               f"({ {k: b.get(k) for k in differ} } vs { {k: a.get(k) for k in differ} }); "
                               "a hotswap keeps the config, load it as a new adapter instead")
    refold = any(a.get(k) != b.get(k) for k in spec.folded_fields)
    tensors = _read_weights(path)
    now, _ = adapter_tensors(model, name)
    missing, unexpected = sorted(set(now) - set(tensors)), sorted(set(tensors) - set(now))
    wrong = [k for k in now if k in tensors and tuple(tensors[k].shape) != tuple(now[k].shape)]
    if missing or unexpected or wrong:
        raise AdapterFileError(f"{path} does not match the loaded {name!r}: missing {missing[:6]}, "
                               f"unexpected {unexpected[:6]}, other shapes {wrong[:6]}")
    with torch.no_grad():
        for lname, layer in adapted_layers(model).items():
            for part, mod in layer.parts(name):
                new = {p: tensors[_key(lname, part, p)] for p in mod.state_dict()}
                if refold:  # the saved module, built from its own config, hands over its factors
                    with torch.random.fork_rng(devices=[]):  # its init draws numbers: not the user's
                        saved_mod = spec.module_cls(saved.for_layer(lname), mod.host)
                    saved_mod.load_state_dict(new)
                    mod.import_factors(saved_mod.export_factors())
                    continue
                for pname, t in mod.state_dict(keep_vars=True).items():
                    t.copy_(new[pname].to(t.dtype))
        for mname, holder in trained_copies(model).items():
            if name in holder.copies:
                for pname, t in holder.copies[name].state_dict(keep_vars=True).items():
                    t.copy_(tensors[f"{mname}.{pname}"].to(t.dtype))
    return model
