"""LoRA <-> kohya / ComfyUI / A1111: ``<prefix>_<module with dots as underscores>``
with ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]) and
``.alpha`` (scale = alpha / r). Prefixes: ``lora_unet`` for a UNet, ``lora_te`` (or
``lora_te1`` / ``lora_te2``) for text encoders."""
from __future__ import annotations

import torch
from torch import nn

from .factors import Factors, export_lora_factors, lora_entries
from .diffusers_layouts import looks_converted, read_converted
from .names import file_module_names, flat_name, module_lookup, split_stem
from .formats import (ExportReport, FileFormat, InteropError, read_tensors, register_format, save_tensors_file,
                      single_file, the_file)


def to_tensors(factors: dict[str, Factors], prefix: str) -> dict:
    out: dict = {}
    # every layer at the file's largest rank (zero-padded): diffusers' kohya conversion
    # pairs alphas with layers wrongly when ranks differ, so one alpha must serve all
    rank = max((f.rank for f in factors.values()), default=0)
    for m, f in factors.items():
        key = f"{prefix}_{flat_name(m)}"
        if f"{key}.alpha" in out:
            raise InteropError(f"two adapted layers flatten to the kohya name {key!r}; kohya keys "
                               "cannot tell them apart (use format='peft' or 'diffusers')")
        down = torch.cat([f.down, f.down.new_zeros(rank - f.rank, *f.down.shape[1:])])
        up = torch.cat([f.up, f.up.new_zeros(f.up.shape[0], rank - f.rank)], 1)
        up = up if f.down.dim() == 2 else up[:, :, None, None]
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(rank))  # scale folded into up: alpha = r
    return out


def looks_like(keys) -> bool:
    return any(k.endswith(".lora_down.weight") for k in keys)


def from_tensors(tensors: dict, model: nn.Module, prefix: str | None, where: str) -> dict[str, Factors]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        stem, _, leaf = key.partition(".")
        groups.setdefault(stem, {})[leaf] = t
    table = module_lookup(model)
    found = {stem: split_stem(stem, table, [prefix] if prefix else None) for stem in groups}
    if prefix is None:
        heads = sorted({hit[0] for hit in found.values() if hit})
        if len(heads) > 1:
            raise InteropError(f"{where} holds LoRAs for {heads}; say which with prefix=...")
        prefix = heads[0] if heads else None
    out, unplaced = {}, []
    for stem, leaves in groups.items():
        if prefix is not None and not stem.startswith(prefix + "_"):
            continue
        extra = set(leaves) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if extra:
            raise InteropError(f"{where}: {stem} has {sorted(extra)}; only lora_down/lora_up/alpha "
                               "convert (LoHa, LoKr or DoRA entries are other formats)")
        if not found[stem] or found[stem][0] != prefix:
            unplaced.append(stem)
            continue
        module = found[stem][1]
        if not {"lora_down.weight", "lora_up.weight"} <= set(leaves):
            raise InteropError(f"{where}: {stem} lacks lora_down or lora_up")
        down, up = leaves["lora_down.weight"].float(), leaves["lora_up.weight"].float().flatten(1)
        r = down.shape[0]
        alpha = float(leaves["alpha"]) if "alpha" in leaves else float(r)
        out[module] = Factors(down, up * (alpha / r))
    if unplaced:
        raise InteropError(f"{where}: {len(unplaced)} kohya key(s) match no module of this model "
                           f"(prefix {prefix!r}): {unplaced[:8]}")
    if not out:
        raise InteropError(f"{where} has no LoRA entry that matches a module of this model")
    return out


def _export(model, name, path, rank, prefix) -> ExportReport:
    factors, errors = export_lora_factors(model, name, rank, "kohya", grouped_convs_ok=True)
    renamed = file_module_names(model)  # the names kohya's tools key on (text_model. of CLIP)
    factors = {renamed.get(m, m): f for m, f in factors.items()}
    target = single_file(path, "lora_weights.safetensors")
    save_tensors_file(to_tensors(factors, prefix), target)
    return ExportReport(target, "kohya", len(factors), max((f.rank for f in factors.values()), default=0), errors)


def _read(model, path, prefix):
    """Keys that name this model's modules are read as kohya writes them (each module's
    own alpha / r, as kohya and ComfyUI apply it); a file they do not place (original-SD
    block names of SDXL files, text encoders whose model dropped a ``text_model`` level)
    goes through diffusers' conversion, as ``pipe.load_lora_weights`` reads it."""
    tensors = read_tensors(the_file(path))
    try:
        return lora_entries(from_tensors(tensors, model, prefix, str(path)))
    except InteropError:
        if not looks_converted(list(tensors)):
            raise
    return lora_entries(read_converted(tensors, model, prefix, str(path)))


register_format(FileFormat("kohya", detect_keys=looks_like, read=_read, write=_export, default_prefix="lora_unet"))
