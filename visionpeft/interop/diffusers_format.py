"""LoRA <-> diffusers: the single safetensors file (``pytorch_lora_weights.safetensors``)
that `pipe.load_lora_weights`, `UNet2DConditionModel.load_lora_adapter` and
`StableDiffusionPipeline.lora_state_dict` read: PEFT key names under a component prefix
(``unet.``, ``text_encoder.``, ``transformer.``)."""
from __future__ import annotations

import json
import re

from .diffusers_layouts import fit_names, looks_converted, pick_component, read_converted
from .factors import Factors, export_lora_factors, lora_entries, peft_scale
from .names import file_module_names
from .formats import (ExportReport, FileFormat, InteropError, read_keys, read_tensors, register_format,
                      save_tensors_file, single_file, the_file)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"


def to_tensors(factors: dict[str, Factors], prefix: str) -> dict:
    out = {}
    for m, f in factors.items():
        up = f.up if f.down.dim() == 2 else f.up[:, :, None, None]
        out[f"{prefix}.{m}.lora_A.weight"] = f.down.contiguous()
        out[f"{prefix}.{m}.lora_B.weight"] = up.contiguous()
    return out


def looks_like(keys) -> bool:
    """PEFT keys under a component prefix, or the older layouts diffusers still converts
    (the DreamBooth example's ``.lora.down.weight``, ``lora_linear_layer``)."""
    return any(re.search(r"\.lora_[AB]\.weight$", k) for k in keys) or looks_converted(keys)


def _scales(metadata: dict | None, prefix: str):
    """module -> alpha / r from diffusers' ``lora_adapter_metadata`` header (the LoraConfig
    it saved, keys ``<prefix>.r`` ...); None without it: diffusers then uses scale 1."""
    if not metadata or METADATA_KEY not in metadata:
        return None
    cfg = {k[len(prefix) + 1:]: v for k, v in json.loads(metadata[METADATA_KEY]).items()
           if k.startswith(prefix + ".")}
    if "r" not in cfg:
        return None

    return lambda module: peft_scale(cfg, module)


def from_tensors(tensors: dict, prefix: str | None, where: str, metadata: dict | None = None,
                 model=None) -> dict[str, Factors]:
    """Scales come from the file's ``lora_adapter_metadata`` when diffusers wrote one, and
    are 1 otherwise, as diffusers does; ``prefix=None`` takes the file's one component
    prefix, or the one whose modules all exist in ``model``."""
    prefixes = sorted({k.split(".", 1)[0] for k in tensors})
    if prefix is None:
        by_prefix = {p: {k.split(".", 1)[1].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(p + ".")}
                     for p in prefixes}
        prefix = pick_component(by_prefix, model, None, where)
    pairs: dict[str, dict] = {}
    unplaced = []
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(prefix)}\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            if not key.startswith(prefix + "."):
                continue  # another component's LoRA
            unplaced.append(key)
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if unplaced:
        raise InteropError(f"{where}: {len(unplaced)} key(s) under {prefix!r} are not lora_A/lora_B "
                           f"weights (alphas, DoRA or text-encoder patches are not read): {unplaced[:8]}")
    if not pairs:
        raise InteropError(f"{where} has no LoRA under prefix {prefix!r}; it has {prefixes}")
    scale = _scales(metadata, prefix)
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InteropError(f"{where}: {module} has only lora_{''.join(ab)}")
        up = ab["B"].float().flatten(1)
        out[module] = Factors(ab["A"].float(), up * scale(module) if scale else up)
    return out


def _read(model, path, prefix):
    file = the_file(path)
    keys, metadata = read_keys(file)
    if looks_converted(keys):
        return lora_entries(read_converted(read_tensors(file), model, prefix, str(path), metadata))
    # files written against transformers 4 (and ComfyUI's) name CLIP modules from text_model
    return lora_entries(fit_names(from_tensors(read_tensors(file), prefix, str(path), metadata, model), model))


def _export(model, name, path, rank, prefix) -> ExportReport:
    factors, errors = export_lora_factors(model, name, rank, "diffusers", grouped_convs_ok=False)
    # CLIP modules named from text_model, as transformers 4 and ComfyUI name them; diffusers
    # drops the level itself where the installed CLIPTextModel has none
    renamed = file_module_names(model)
    factors = {renamed.get(m, m): f for m, f in factors.items()}
    target = single_file(path, WEIGHTS_NAME)
    save_tensors_file(to_tensors(factors, prefix), target)
    return ExportReport(target, "diffusers", len(factors), max((f.rank for f in factors.values()), default=0), errors)


register_format(FileFormat("diffusers", detect_keys=looks_like, read=_read, write=_export, default_prefix="unet"))
