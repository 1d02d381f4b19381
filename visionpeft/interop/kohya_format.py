"""LoRA <-> kohya / ComfyUI / A1111: ``<prefix>_<module with dots as underscores>``
with ``.lora_down.weight`` (r, in[, kh, kw]), ``.lora_up.weight`` (out, r[, 1, 1]) and
``.alpha`` (scale = alpha / r). Prefixes: ``lora_unet`` for a UNet, ``lora_te`` (or
``lora_te1`` / ``lora_te2``) for text encoders."""
from __future__ import annotations

import re

import torch
from torch import nn

from .factors import Factors, InteropError


def flat_name(module: str) -> str:
    return module.replace(".", "_")


def to_tensors(factors: dict[str, Factors], prefix: str) -> dict:
    out = {}
    for m, f in factors.items():
        key = f"{prefix}_{flat_name(m)}"
        up = f.up if f.down.dim() == 2 else f.up[:, :, None, None]
        out[f"{key}.lora_down.weight"] = f.down.contiguous()
        out[f"{key}.lora_up.weight"] = up.contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(f.rank))  # scale folded into up: alpha = r
    return out


def looks_like(keys) -> bool:
    return any(k.endswith(".lora_down.weight") for k in keys)


def module_lookup(model: nn.Module) -> dict[str, str]:
    """{flattened name: dotted name}; two modules that flatten alike are refused."""
    table: dict[str, str] = {}
    for name, _ in model.named_modules():
        flat = flat_name(name)
        if flat in table and table[flat] != name:
            raise InteropError(f"modules {table[flat]!r} and {name!r} have the same kohya name {flat!r}")
        table[flat] = name
    return table


def from_tensors(tensors: dict, model: nn.Module, prefix: str | None, where: str) -> dict[str, Factors]:
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        stem, _, leaf = key.partition(".")
        groups.setdefault(stem, {})[leaf] = t
    stems = sorted(groups)
    if prefix is None:
        heads = sorted({re.match(r"(lora_(?:unet|te\d?|transformer)|[^_]+)", s).group(1) for s in stems})
        if len(heads) != 1:
            raise InteropError(f"{where} holds LoRAs for {heads}; say which with prefix=...")
        prefix = heads[0]
    table = module_lookup(model)
    out, unplaced = {}, []
    for stem, leaves in groups.items():
        if not stem.startswith(prefix + "_"):
            continue
        extra = set(leaves) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if extra:
            raise InteropError(f"{where}: {stem} has {sorted(extra)}; only lora_down/lora_up/alpha "
                               "convert (LoHa, LoKr or DoRA entries are other formats)")
        module = table.get(stem[len(prefix) + 1:])
        if module is None:
            unplaced.append(stem)
            continue
        down, up = leaves["lora_down.weight"].float(), leaves["lora_up.weight"].float().flatten(1)
        r = down.shape[0]
        alpha = float(leaves["alpha"]) if "alpha" in leaves else float(r)
        out[module] = Factors(down, up * (alpha / r))
    if unplaced:
        raise InteropError(f"{where}: {len(unplaced)} kohya key(s) match no module of this model "
                           f"(prefix {prefix!r}): {unplaced[:8]}")
    if not out:
        raise InteropError(f"{where} has no LoRA under prefix {prefix!r}")
    return out
