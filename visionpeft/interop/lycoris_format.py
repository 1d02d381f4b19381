"""DiffuseKronA <-> LyCORIS LoKr: ``<prefix>_<module with dots as underscores>`` with
``.lokr_w1`` (= our A, (a1, a2)), ``.lokr_w2`` (= our B, (out/a1, in/a2[, kh, kw])) and
``.alpha``. With both factors stored in full, LyCORIS and ComfyUI apply scale 1 whatever
alpha says, so our alpha is folded into w1. Prefixes: ``lycoris`` (what
`lycoris.create_lycoris_from_weights` looks for on any module) or ``lora_unet`` /
``lora_te`` for kohya-style UNet / text-encoder files."""
from __future__ import annotations

import torch
from torch import nn

from ..core.targeting import canonical_modules
from ..core.model_ops import adapted_layers, get_state
from .factors import InteropError
from .factors import exact_targets
from .kohya_format import flat_name, module_lookup, split_stem

FULL_KEYS = {"lokr_w1", "lokr_w2", "alpha"}
DECOMPOSED_KEYS = {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}


def looks_like(keys) -> bool:
    return any(".lokr_" in k for k in keys)


def to_tensors(model: nn.Module, name: str, prefix: str) -> dict:
    state = get_state(model)
    method = state.configs[name].method
    if method != "krona":
        raise InteropError(f"format='lycoris' writes LoKr files from a KronA adapter; {name!r} is "
                           f"{method} (export it as a LoRA: format='kohya' with rank=...)")
    out = {}
    for lname, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        parts = layer.adapters[name]
        if set(parts) != {"full"} or isinstance(layer.base_layer, nn.MultiheadAttention):
            raise InteropError(f"{lname}: LoKr files hold whole Linear/Conv2d layers; this adapter "
                               f"has parts {list(parts)} (use format='merged')")
        mod = parts["full"]
        key = f"{prefix}_{flat_name(lname)}"
        if f"{key}.alpha" in out:
            raise InteropError(f"two adapted layers flatten to the LyCORIS name {key!r}")
        out[f"{key}.lokr_w1"] = (mod.A.detach().float() * (mod.scale * state.scales[name])).contiguous()
        out[f"{key}.lokr_w2"] = mod.B.detach().float().contiguous()
        out[f"{key}.alpha"] = torch.tensor(1.0)
    return out


def from_tensors(tensors: dict, model: nn.Module, prefix: str | None, where: str):
    """-> {module: (w1, w2)} with the scale folded into w1."""
    groups: dict[str, dict] = {}
    for key, t in tensors.items():
        stem, _, leaf = key.partition(".")
        groups.setdefault(stem, {})[leaf] = t
    table = module_lookup(model)
    out, unplaced = {}, []
    for stem, leaves in groups.items():
        if prefix is not None and not stem.startswith(prefix + "_"):
            continue
        if set(leaves) & DECOMPOSED_KEYS:
            raise InteropError(f"{where}: {stem} stores LoKr factors decomposed "
                               f"({sorted(set(leaves) & DECOMPOSED_KEYS)}); KronA represents "
                               "only full lokr_w1 and lokr_w2 (no low-rank w1/w2, no Tucker core)")
        if set(leaves) - FULL_KEYS or not {"lokr_w1", "lokr_w2"} <= set(leaves):
            raise InteropError(f"{where}: {stem} has {sorted(leaves)}; a LoKr entry needs lokr_w1 "
                               "and lokr_w2 (and optionally alpha)")
        hit = split_stem(stem, table, [prefix] if prefix else
                         ["lycoris", "lora_unet", "lora_te", "lora_te1", "lora_te2"])
        if hit is None:
            unplaced.append(stem)
            continue
        module = hit[1]
        out[module] = (leaves["lokr_w1"].float(), leaves["lokr_w2"].float())
    if unplaced:
        raise InteropError(f"{where}: {len(unplaced)} LoKr key(s) match no module of this model: "
                           f"{unplaced[:8]}")
    if not out:
        raise InteropError(f"{where} has no LoKr entries" + (f" under prefix {prefix!r}" if prefix else ""))
    return out


def inject_kron(model: nn.Module, pairs: dict, name: str) -> nn.Module:
    """A KronA adapter holding ``pairs`` exactly (alpha 1). The file's factors must be the
    same (a1, a2) for every layer or each layer's balanced default."""
    from ..methods.krona import KronAConfig, sqrt_factor

    modules = canonical_modules(model)
    shapes = {}
    from ..core.layers import AdaptedLayerBase

    for m, (w1, w2) in pairs.items():
        host = modules[m].base_layer if isinstance(modules[m], AdaptedLayerBase) else modules[m]
        if not isinstance(host, (nn.Linear, nn.Conv2d)):
            raise InteropError(f"{m} is {type(host).__name__}; LoKr entries go on Linear/Conv2d")
        dw = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
        if dw != tuple(host.weight.shape):
            raise InteropError(f"{m}: kron(w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}) is {dw}, "
                               f"the layer's weight is {tuple(host.weight.shape)}")
        shapes[m] = tuple(w1.shape)
    sizes = {m: (pairs[m][0].shape[0] * pairs[m][1].shape[0], pairs[m][0].shape[1] * pairs[m][1].shape[1])
             for m in pairs}
    balanced = all(s == (sqrt_factor(sizes[m][0]), sqrt_factor(sizes[m][1])) for m, s in shapes.items())
    if balanced:
        cfg = KronAConfig(alpha=1.0, target_modules=exact_targets(pairs))
    elif len(set(shapes.values())) == 1:
        a1, a2 = next(iter(shapes.values()))
        cfg = KronAConfig(a1=a1, a2=a2, alpha=1.0, target_modules=exact_targets(pairs))
    else:
        raise InteropError(f"the LoKr factors differ per layer ({sorted(set(shapes.values()))[:6]}) "
                           "and are not each layer's balanced split; one KronA config cannot hold them")
    from ..core.model_ops import inject

    inject(model, cfg, name=name)
    layers = adapted_layers(model)
    with torch.no_grad():
        for m, (w1, w2) in pairs.items():
            mod = layers[m].adapters[name]["full"]
            mod.A.copy_(w1)
            mod.B.copy_(w2)
    return model
