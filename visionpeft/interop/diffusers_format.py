"""LoRA <-> diffusers: the single safetensors file (``pytorch_lora_weights.safetensors``)
that `pipe.load_lora_weights`, `UNet2DConditionModel.load_lora_adapter` and
`StableDiffusionPipeline.lora_state_dict` read: PEFT key names under a component prefix
(``unet.``, ``text_encoder.``, ``transformer.``)."""
from __future__ import annotations

import re

from .factors import Factors, InteropError

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def to_tensors(factors: dict[str, Factors], prefix: str) -> dict:
    out = {}
    for m, f in factors.items():
        up = f.up if f.down.dim() == 2 else f.up[:, :, None, None]
        out[f"{prefix}.{m}.lora_A.weight"] = f.down.contiguous()
        out[f"{prefix}.{m}.lora_B.weight"] = up.contiguous()
    return out


def looks_like(keys) -> bool:
    return any(re.search(r"\.lora_[AB]\.weight$", k) for k in keys)


def from_tensors(tensors: dict, prefix: str | None, where: str) -> dict[str, Factors]:
    """Scale 1 is assumed, as diffusers does for a file without alphas; ``prefix=None``
    takes the one component prefix the file has."""
    prefixes = sorted({k.split(".", 1)[0] for k in tensors})
    if prefix is None:
        if len(prefixes) != 1:
            raise InteropError(f"{where} holds LoRAs for {prefixes}; say which with prefix=...")
        prefix = prefixes[0]
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
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InteropError(f"{where}: {module} has only lora_{''.join(ab)}")
        out[module] = Factors(ab["A"].float(), ab["B"].float().flatten(1))
    return out
