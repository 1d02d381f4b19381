"""LyCORIS files: ``<prefix>_<module with dots as underscores>.<key>``, read by
`lycoris.create_lycoris_from_weights` (prefix ``lycoris``) and ComfyUI (also
``lora_unet`` / ``lora_te`` prefixes). Entries by their keys:

- LoKr, full factors: ``lokr_w1`` (a1, a2), ``lokr_w2`` (out/a1, in/a2[, kh, kw]), ``alpha``
  (ignored by LyCORIS and ComfyUI when both factors are full: scale 1);
- LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, ``alpha``
  (dW = (w1a w1b) * (w2a w2b) * alpha / r);
- LoCon (LyCORIS's LoRA): ``lora_down.weight``, ``lora_up.weight``, ``alpha``.

An export writes the layout the adapter's method declares (``factor_layout``), from its
modules' ``export_factors``; an import reads each entry into its layout, and the
registry finds the method that holds it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.model_ops import adapted_layers, get_state
from ..core.registry import get_method
from .factors import LORA, Factors
from .formats import ExportReport, FileFormat, InteropError, read_tensors, register_format, save_tensors_file
from .formats import single_file, the_file
from .names import file_module_names, flat_name, module_lookup, split_stem

# layout -> (keys an entry must have, keys it may have)
LAYOUTS = {
    "lokr": ({"lokr_w1", "lokr_w2"}, {"alpha"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"alpha"}),
    LORA: ({"lora_down.weight", "lora_up.weight"}, {"alpha"}),
}
# what these layouts can also hold and we cannot represent, with the reason
UNSUPPORTED = {
    "lokr_w1_a": "LoKr with low-rank w1/w2", "lokr_w1_b": "LoKr with low-rank w1/w2",
    "lokr_w2_a": "LoKr with low-rank w1/w2", "lokr_w2_b": "LoKr with low-rank w1/w2", "lokr_t2": "LoKr's Tucker core",
    "hada_t1": "LoHa's Tucker cores", "hada_t2": "LoHa's Tucker cores", "lora_mid.weight": "LoCon's Tucker core",
    "dora_scale": "DoRA's magnitude vector",
}
PREFIXES = ["lycoris", "lora_unet", "lora_te", "lora_te1", "lora_te2"]


def looks_like(keys) -> bool:
    return any(".lokr_" in k or ".hada_" in k for k in keys)


def _layout(stem: str, leaves: dict, where: str) -> str:
    odd = sorted(set(leaves) & set(UNSUPPORTED))
    if odd:
        raise InteropError(f"{where}: {stem} stores {UNSUPPORTED[odd[0]]} ({odd}); visionpeft's methods hold "
                           "full LoKr factors, LoHa without Tucker cores and plain LoCon")
    for layout, (need, may) in LAYOUTS.items():
        if need <= set(leaves) <= need | may:
            return layout
    raise InteropError(f"{where}: {stem} has {sorted(leaves)}, which is not a LoKr, LoHa or LoCon entry")


def _entry(layout: str, leaves: dict) -> dict:
    if layout == LORA:  # the LoRA layout folds alpha / r into up
        down, up = leaves["lora_down.weight"].float(), leaves["lora_up.weight"].float().flatten(1)
        alpha = float(leaves["alpha"]) if "alpha" in leaves else float(down.shape[0])
        f = Factors(down, up * (alpha / down.shape[0]))
        return {"down": f.down, "up": f.up}
    out = {k: v.float() for k, v in leaves.items() if k != "alpha"}
    if layout == "loha":  # LyCORIS's default alpha is the rank: scale 1
        out["alpha"] = leaves["alpha"].float() if "alpha" in leaves else torch.tensor(float(out["hada_w1_b"].shape[0]))
    return out


def from_tensors(tensors: dict, model: nn.Module, prefix: str | None, where: str) -> dict:
    """-> {module: (layout, tensors of that layout)}."""
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        stem, _, leaf = key.partition(".")
        groups.setdefault(stem, {})[leaf] = t
    table = module_lookup(model)
    out, unplaced = {}, []
    for stem, leaves in groups.items():
        if prefix is not None and not stem.startswith(prefix + "_"):
            continue
        layout = _layout(stem, leaves, where)
        hit = split_stem(stem, table, [prefix] if prefix else PREFIXES)
        if hit is None:
            unplaced.append(stem)
            continue
        out[hit[1]] = (layout, _entry(layout, leaves))
    if unplaced:
        raise InteropError(f"{where}: {len(unplaced)} LyCORIS key(s) match no module of this model: "
                           f"{unplaced[:8]}")
    if not out:
        raise InteropError(f"{where} has no LyCORIS entries" + (f" under prefix {prefix!r}" if prefix else ""))
    return out


def to_tensors(model: nn.Module, name: str, prefix: str) -> dict:
    state = get_state(model)
    method = state.configs[name].method
    layout = get_method(method).factor_layout
    if layout not in ("lokr", "loha"):
        raise InteropError(f"format='lycoris' writes LoKr or LoHa files, from a KronA or LoHa adapter; "
                           f"{name!r} is {method} (export it as a LoRA: format='kohya' with rank=...)")
    out = {}
    renamed = file_module_names(model)  # the names LyCORIS and ComfyUI key on (text_model. of CLIP)
    for lname, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        parts = layer.adapters[name]
        if set(parts) != {"full"} or isinstance(layer.base_layer, nn.MultiheadAttention):
            raise InteropError(f"{lname}: LyCORIS files hold whole Linear/Conv2d layers; this adapter "
                               f"has parts {list(parts)} (use format='merged')")
        key = f"{prefix}_{flat_name(renamed.get(lname, lname))}"
        if any(k.startswith(key + ".") for k in out):
            raise InteropError(f"two adapted layers flatten to the LyCORIS name {key!r}")
        tensors = parts["full"].export_factors(state.scales[name])
        tensors.setdefault("alpha", torch.tensor(1.0))  # LoKr: both factors full, alpha unused
        out.update({f"{key}.{k}": v.detach().float().contiguous() for k, v in tensors.items()})
    return out


def _export(model, name, path, rank, prefix) -> ExportReport:
    tensors = to_tensors(model, name, prefix)
    target = single_file(path, "lycoris_weights.safetensors")
    save_tensors_file(tensors, target)
    return ExportReport(target, "lycoris", sum(k.endswith(".alpha") for k in tensors))


register_format(FileFormat(
    "lycoris", detect_keys=looks_like, write=_export, default_prefix="lycoris",
    read=lambda model, path, prefix: from_tensors(read_tensors(the_file(path)), model, prefix, str(path))))
