"""LoRA <-> HF PEFT: a folder with adapter_config.json + adapter_model.safetensors that
`PeftModel.from_pretrained(model, folder)` reads (keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``). Modules trained in full
(modules_to_save) are written as PEFT's ``save_pretrained`` writes them: their tensors
under ``base_model.model.<module>.<param>`` (no ``modules_to_save.<adapter>`` hop: PEFT
puts it back on load) and their names in the config's ``modules_to_save``."""
from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..core.atomic import write_dir
from ..core.layers import HostWrapper, TrainedCopy
from ..core.model_ops import trained_copies
from ..core.targeting import canonical_modules
from .apply import SAVED_MODULE
from .factors import Factors, export_lora_factors, lora_entries, peft_scale
from .formats import ExportReport, FileFormat, InteropError, register_format

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def is_peft_folder(path: Path) -> bool:
    cfg = path / CONFIG_NAME
    return path.is_dir() and cfg.is_file() and "peft_type" in json.loads(cfg.read_text())


def write(factors: dict[str, Factors], folder: Path, saved: dict[str, dict] | None = None,
          to_save: list[str] | None = None) -> None:
    r"""Scale 1 everywhere: lora_alpha = r, and per-module ranks (slices, SVD) go to
    rank_pattern / alpha_pattern. PEFT matches list targets by dotted suffix and pattern
    keys as ``(.*\.)?(key)$``: targets are written as one full-match regex and pattern
    keys anchored with ``^``, so no other layer (``head.fc1`` for ``fc1``) is caught.
    ``saved``: {module: state_dict} of the modules trained in full, and of those PEFT
    also wraps for the names ``to_save`` (default: all of them) since it matches
    modules_to_save by plain suffix."""
    saved = saved or {}
    ranks = {m: f.rank for m, f in factors.items()}
    r = max(ranks.values(), default=1)
    pattern = {"^" + re.escape(m): k for m, k in ranks.items() if k != r}
    targets = "|".join(re.escape(m) for m in sorted(factors))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": f"(?:{targets})",
              "rank_pattern": pattern, "alpha_pattern": dict(pattern), "lora_dropout": 0.0,
              "bias": "none", "task_type": None, "base_model_name_or_path": None,
              "inference_mode": True, "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": to_save or sorted(saved) or None}
    tensors = {}
    for m, f in factors.items():
        up = f.up if f.down.dim() == 2 else f.up[:, :, None, None]
        tensors[f"{PREFIX}{m}.lora_A.weight"] = f.down.contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = up.contiguous()
    for m, sd in saved.items():
        for pname, t in sd.items():
            tensors[f"{PREFIX}{m}.{pname}"] = t.detach().contiguous()
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def _saved_module(path: str, entries: list[str], modules) -> str | None:
    """The module a non-LoRA key ``<module>.<param>`` belongs to: the shortest dotted
    prefix that ends with a modules_to_save entry (PEFT's suffix match) and, when
    ``modules`` is given, is a module of the model."""
    atoms = path.split(".")
    for i in range(1, len(atoms)):
        module = ".".join(atoms[:i])
        if any(module.endswith(e) for e in entries) and (modules is None or module in modules):
            return module
    return None


def read_all(folder: Path, model=None) -> tuple[dict[str, Factors], dict[str, dict]]:
    """-> (LoRA factors, {module: state_dict} of the modules trained in full)."""
    if not is_peft_folder(folder):
        raise InteropError(f"{folder} is not a PEFT adapter folder (adapter_config.json with peft_type)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("peft_type") != "LORA":
        raise InteropError(f"{folder} is a PEFT {config.get('peft_type')} adapter; only LORA converts")
    if config.get("use_dora"):
        raise InteropError(f"{folder} is a DoRA adapter (use_dora); its magnitude vector has no LoRA form")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise InteropError(f"{folder} has no {WEIGHTS_NAME} (pickled .bin files are not read)")
    tensors = load_file(str(weights))
    to_save = config.get("modules_to_save") or []
    to_save = [to_save] if isinstance(to_save, str) else list(to_save)
    modules = None if model is None else canonical_modules(model)
    pairs: dict[str, dict] = {}
    saved: dict[str, dict] = {}
    unplaced = []
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is not None:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
            continue
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module = _saved_module(path, to_save, modules) if to_save else None
        if module is None:
            unplaced.append(key)
            continue
        saved.setdefault(module, {})[path[len(module) + 1:]] = t
    if unplaced:
        what = "LoRA A/B weights" + (f" nor of the modules_to_save {to_save}" if to_save else "")
        raise InteropError(f"{folder}: {len(unplaced)} key(s) are not {what}: {unplaced[:8]}")
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InteropError(f"{folder}: {module} has only lora_{''.join(ab)}")
        down, up = ab["A"].float(), ab["B"].float().flatten(1)
        out[module] = Factors(down, up * peft_scale(config, module))
    return out, saved


def read(folder: Path) -> dict[str, Factors]:
    return read_all(folder)[0]


def _entries(model, path: Path, prefix):
    factors, saved = read_all(path, model)
    entries = lora_entries(factors)
    entries.update({m: (SAVED_MODULE, sd) for m, sd in saved.items()})
    return entries


def _host_modules(model):
    """(name, module) of every module a fresh host has, as PEFT will walk it: canonical
    names, and inside a module another adapter trains in full (a TrainedCopy, a leaf
    there) the submodules of its frozen original, which PEFT also suffix-matches."""
    for m, module in canonical_modules(model).items():
        yield m, module
        if isinstance(module, TrainedCopy):
            for sub, inner in module.base_layer.named_modules():
                if sub:
                    yield f"{m}.{sub}", inner


def _also_caught(model, saved: dict[str, dict], factors) -> dict[str, dict]:
    """The other modules PEFT wraps for these modules_to_save names: it matches by plain
    suffix (``head`` also catches ``subhead`` and ``neck.head``) and then expects their
    tensors in the file. They are written as PEFT would save them, with the host's own
    weights, so they compute what they did."""
    if not saved:
        return {}
    extra, refused = {}, []
    for m, module in _host_modules(model):
        if not m or m in saved or not any(m.endswith(e) for e in saved) or any(
                m.startswith(s + ".") for s in saved):
            continue
        host = module.base_layer if isinstance(module, TrainedCopy) else module
        if m in factors or any(isinstance(x, HostWrapper) for x in host.modules()):
            refused.append(m)
            continue
        extra[m] = host.state_dict()
    if refused:
        raise InteropError(f"PEFT matches modules_to_save {sorted(saved)} by plain suffix, which also "
                           f"catches {refused[:6]}; they carry adapters, so PEFT could not load this folder. "
                           "Use vp.save_adapter, or format='merged'")
    return extra


def _export(model, name, path: Path, rank, prefix) -> ExportReport:
    factors, errors = export_lora_factors(model, name, rank, "peft", grouped_convs_ok=False)
    saved = {m: holder.copies[name].state_dict() for m, holder in sorted(trained_copies(model).items())
             if name in holder.copies}
    to_save = sorted(saved)
    saved.update(_also_caught(model, saved, factors))
    write_dir(path, lambda folder: write(factors, folder, saved, to_save))
    return ExportReport(path, "peft", len(factors), max((f.rank for f in factors.values()), default=0), errors)


register_format(FileFormat("peft", detect_folder=is_peft_folder, read=_entries, write=_export,
                           factors_only=False))
