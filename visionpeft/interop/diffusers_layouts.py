"""LoRA files in the layouts diffusers' Stable Diffusion loaders convert on the way in,
read through diffusers' own converters, so the factors are what ``pipe.load_lora_weights``
would run.

Layouts: the DreamBooth example's file (``unet.<m>.lora.down.weight``, text encoders as
``text_encoder.<m>.lora_linear_layer.down.weight``), the older attention-processor keys
(``...attn1.processor.to_q_lora.down.weight``), kohya / A1111 files (``lora_unet_``,
``lora_te_``, ``lora_te1_``, ``lora_te2_`` with ``.alpha``), SDXL kohya files with
original-SD block names (``lora_unet_input_blocks_4_1_...``: needs the UNet's config),
and plain PEFT keys under a component prefix.

Scales: diffusers builds one peft ``LoraConfig`` per component from the file (ranks, the
kohya alphas, or the ``lora_adapter_metadata`` header) and peft resolves each module's r
and alpha from it; the same config and the same resolution are used here, quirks
included: with no alphas and no header the scale is 1, and when a kohya file's alphas
differ between modules diffusers' alpha_pattern misses the attention projections, which
then get the most common alpha.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Collection, Mapping
from types import SimpleNamespace

import torch

from ..core.targeting import canonical_modules
from .factors import Factors, plain_host
from .formats import InteropError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_SGM = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_")
_LAYOUTS = re.compile(r"\.lora\.(down|up)\.weight$|\.lora_linear_layer\.|_lora\.(down|up)\.weight$"
                      r"|^lora_te[12]?_|^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb)_")
# the CLIP projections diffusers reads text-encoder ranks from (diffusers _load_lora_into_text_encoder)
_CLIP_PROJ = tuple(f".{p}.lora_B.weight" for p in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))


def looks_converted(keys) -> bool:
    """True for a key set only diffusers' converters read (see the module docstring);
    plain PEFT keys and kohya keys with diffusers module names are not included."""
    return any(_LAYOUTS.search(k) for k in keys)


@functools.cache
def _flat(component: str) -> bool:
    """Whether the installed transformers' class for this component has no ``text_model``
    level (CLIPTextModel is flattened in transformers 5, CLIPTextModelWithProjection is
    not): diffusers then strips ``text_model.`` from the keys, but not from the alphas."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        return not hasattr(cls(cfg), "text_model")


def _component(sd: dict, alphas: dict | None, meta: dict | None, comp: str, flat: bool) -> dict[str, Factors]:
    """Mirrors UNet2DConditionModel.load_lora_adapter (unet) / _load_lora_into_text_encoder."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from peft.utils.other import get_pattern_key

    unet = comp == "unet"
    try:
        if unet:  # diffusers converts only when the first key lacks lora_A; converting always is the same for PEFT keys
            sd = convert_unet_state_dict_to_peft(sd)
        else:
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            if flat:
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    except ValueError as e:
        raise InteropError(f"diffusers cannot convert the {comp} keys: {e}") from e
    rank = {("^" + k if unet else k): v.shape[1] for k, v in sd.items()
            if "lora_B" in k and v.ndim > 1 and (unet or k.endswith(_CLIP_PROJ))}
    if not rank and meta is None:
        raise InteropError(f"{comp}: diffusers finds no rank to build a LoraConfig from: {list(sd)[:6]}")
    if alphas is not None:
        alphas = {k.removeprefix(comp + "."): v for k, v in alphas.items() if k.split(".")[0] == comp}
    cfg = _create_lora_config(sd, alphas, meta, rank, is_unet=unet)
    pairs: dict[str, dict] = {}
    for key, t in sd.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise InteropError(f"{comp}: {key} is not a LoRA down/up weight (a LoRA bias or other "
                               "extra has no place in factors)")
        pairs.setdefault(m[1], {})[m[2]] = t
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise InteropError(f"{comp}: {name} has only lora_{''.join(ab)}")
        # peft's LoraModel._create_and_replace, on the module's name in the model
        r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), name), cfg.r)
        alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), name), cfg.lora_alpha)
        if r != ab["A"].shape[0]:
            raise InteropError(f"{comp}: diffusers would build {name} at rank {r}; the file has rank "
                               f"{ab['A'].shape[0]}")
        scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
        out[name] = Factors(ab["A"].float(), ab["B"].float().flatten(1) * scale)
    return out


def convert_with_diffusers(tensors: dict[str, torch.Tensor], unet_config=None, metadata: dict | None = None,
                           flat_text_encoders: Collection[str] | None = None
                           ) -> dict[str, dict[str, Factors]] | None:
    """{component: {module name in that component: Factors}}, components among
    ``unet``, ``text_encoder`` (kohya ``lora_te_`` / ``lora_te1_``), ``text_encoder_2``
    (``lora_te2_``); None when the keys are none of diffusers' SD layouts.

    ``unet_config``: the UNet's config (``unet.config`` or a dict), required for
    original-SD block names, which it maps as the SDXL pipeline does. ``metadata``: the
    file's ``lora_adapter_metadata`` (parsed, or the raw safetensors header holding it).
    ``flat_text_encoders``: components whose model has no ``text_model`` level (default:
    as the installed CLIPTextModel / CLIPTextModelWithProjection are built); their names
    lose ``text_model.``, the others keep what the file has.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    keys = list(tensors)
    if not looks_converted(keys) and not any(k.split(".", 1)[0] in COMPONENTS for k in keys):
        return None
    dora = [k for k in keys if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:  # diffusers drops kohya DoRA magnitudes with a warning; factors cannot hold them
        raise InteropError(f"{len(dora)} DoRA magnitude key(s), which LoRA factors cannot represent: {dora[:6]}")
    if unet_config is None and any(_SGM.match(k) for k in keys):
        raise InteropError("the file names UNet modules by original-SD blocks (input_blocks / middle_block / "
                           "output_blocks); give unet_config=unet.config to map them")
    if isinstance(unet_config, Mapping):  # diffusers reads it by attribute
        unet_config = SimpleNamespace(**unet_config)
    try:
        sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors), unet_config=unet_config)
    except ValueError as e:
        raise InteropError(f"diffusers cannot convert this file: {e}") from e
    odd = [k for k in sd if "lora" not in k or k.split(".", 1)[0] not in COMPONENTS]
    if odd:
        raise InteropError(f"{len(odd)} key(s) are no LoRA weight of {COMPONENTS}: {odd[:8]}")
    if metadata is not None and "lora_adapter_metadata" in metadata:
        metadata = json.loads(metadata["lora_adapter_metadata"])
    elif metadata is not None and not any(k.split(".", 1)[0] in COMPONENTS for k in metadata):
        metadata = None  # a raw safetensors header without diffusers' LoraConfig ({"format": "pt"})
    if alphas and metadata:
        raise InteropError("the file has both kohya alphas and a lora_adapter_metadata header; diffusers "
                           "refuses it")
    flat = set(flat_text_encoders) if flat_text_encoders is not None else {c for c in COMPONENTS[1:] if _flat(c)}
    out = {}
    for comp in COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in sd.items() if k.startswith(comp + ".")}
        if part:
            meta = None if metadata is None else \
                {k[len(comp) + 1:]: v for k, v in metadata.items() if k.startswith(comp + ".")}
            out[comp] = _component(part, alphas, meta, comp, comp in flat)
    return out


def fit_names(factors: dict[str, Factors], model) -> dict[str, Factors]:
    """Text-encoder factors named for ``model``: drop ``text_model.`` where the model
    has no such level, as diffusers does (a no-op for a UNet)."""
    if model is None or hasattr(model, "text_model"):
        return factors
    if not isinstance(factors, Mapping):  # a collection of module names
        return {k.removeprefix("text_model.") for k in factors}
    return {k.removeprefix("text_model."): f for k, f in factors.items()}


# kohya key prefixes -> diffusers components
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}


def _fits(factors, modules: dict) -> bool:
    """Every module exists in the model and, where ``factors`` maps names to Factors
    (not a plain collection of names), has dW's shape."""
    for name in factors:
        if name not in modules:
            return False
        f = factors[name] if isinstance(factors, Mapping) else None
        weight = getattr(plain_host(modules[name]), "weight", None)
        if isinstance(f, Factors) and (weight is None or
                                       (f.up.shape[0], *f.down.shape[1:]) != tuple(weight.shape)):
            return False
    return True


def pick_component(components: dict[str, dict], model, prefix: str | None, where: str) -> str:
    """The component of a multi-model file (UNet and text encoders) that ``model`` is:
    the one ``prefix`` names, the only one, or the only one whose modules all exist in
    the model (with dW's shape, where a component maps names to Factors; a set of
    module names is checked by name only)."""
    if prefix is not None:
        if prefix not in components:
            raise InteropError(f"{where} has no LoRA under prefix {prefix!r}; it has {sorted(components)}")
        return prefix
    if len(components) == 1:
        return next(iter(components))
    modules = canonical_modules(model) if model is not None else {}
    fits = [c for c, factors in components.items() if _fits(fit_names(factors, model), modules)]
    if len(fits) != 1:
        raise InteropError(f"{where} holds LoRAs for {sorted(components)}; say which with prefix=...")
    return fits[0]


def read_converted(tensors: dict, model, prefix: str | None, where: str, metadata: dict | None = None
                   ) -> dict[str, Factors]:
    """The factors, for ``model``, of a file in one of the layouts above: converted by
    diffusers, the component chosen by ``prefix`` (a component or a kohya prefix) or by
    which one fits the model, names fitted to the model's text_model level."""
    config = getattr(model, "config", None)
    unet_config = config if isinstance(config, Mapping) and "layers_per_block" in config else None
    if unet_config is None:  # not a UNet: its original-SD block names cannot be mapped, nor are they needed
        tensors = {k: v for k, v in tensors.items() if not _SGM.match(k)}
    components = convert_with_diffusers(tensors, unet_config, metadata)
    if not components:
        raise InteropError(f"{where}: no LoRA layout diffusers converts")
    components = {c: fit_names(f, model) for c, f in components.items()}
    return components[pick_component(components, model, KOHYA_COMPONENTS.get(prefix, prefix), where)]
