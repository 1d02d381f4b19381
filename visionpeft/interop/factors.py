"""The LoRA layout, common to the PEFT, diffusers and kohya formats: per host module,
dW = up @ down with every scale folded into ``up``.

down (r, in) or (r, in, kh, kw) for a conv, up (out, r). Foreign formats store a scale
next to the factors (alpha / r); ours is folded in on export, so a file always says
alpha = r (scale 1), which every loader reads the same way. Getting factors out of a
model: a method whose modules hold the "lora" layout gives its own (exact; fused-qkv
slices become one factor pair for the whole Linear with zero rows elsewhere); any other
weight-space method goes through a truncated SVD of dW at a chosen rank, with the
relative error reported per layer.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..core.adapter import HostWrapper
from ..core.model_ops import adapted_layers, get_state
from ..core.registry import get_method
from ..core.targeting import canonical_modules
from .formats import Entries, InteropError

LORA = "lora"  # the layout name


@dataclass
class Factors:
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor    # (out, r)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta_weight(self) -> torch.Tensor:
        d = self.up.float() @ self.down.float().flatten(1)
        return d.reshape(self.up.shape[0], *self.down.shape[1:])


def peft_scale(config: dict, module: str) -> float:
    """alpha / r (or alpha / sqrt(r) with use_rslora) of one module under a PEFT LoraConfig
    (as a dict: r, lora_alpha, rank_pattern, alpha_pattern), PEFT's pattern rule: a
    pattern key must match a suffix of the module's name. PEFT folders and diffusers'
    ``lora_adapter_metadata`` header both carry one."""
    def value(patterns: dict, default):
        for key, v in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return v
        return default

    r = value(config.get("rank_pattern"), config["r"])
    alpha = value(config.get("alpha_pattern"), config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def lora_entries(factors: dict[str, Factors]) -> Entries:
    return {m: (LORA, {"down": f.down, "up": f.up}) for m, f in factors.items()}


def plain_host(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, HostWrapper) else module


def exact_targets(names) -> list[str]:
    """Target entries that match these layer names and nothing else (a plain name would
    also match by dotted suffix)."""
    return [f"re:{re.escape(n)}" for n in names]


def svd_factors(dW: torch.Tensor, rank: int) -> tuple[Factors, float]:
    """Best rank-``rank`` factors of dW (Eckart-Young) and the relative Frobenius error."""
    mat = dW.detach().float().reshape(dW.shape[0], -1)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, S.numel())
    up = U[:, :k] * S[:k]
    down = Vh[:k]
    norm = float(torch.linalg.vector_norm(S))
    err = float(torch.linalg.vector_norm(S[k:])) / norm if norm > 0 else 0.0
    return Factors(down.reshape(k, *dW.shape[1:]), up), err


def conv_layout_problem(host: nn.Module) -> str | None:
    """Why a LoRA on this conv cannot be a (down conv, 1x1 up conv) pair, as PEFT and
    diffusers build it: their down conv takes the host's kernel, stride and padding but
    neither dilation nor groups."""
    if isinstance(host, nn.Conv2d) and (host.groups > 1 or tuple(host.dilation) != (1, 1)):
        return f"groups={host.groups}, dilation={tuple(host.dilation)}"
    return None


def _whole_layer(layer, name: str, scale: float) -> Factors:
    """The adapter's exact "lora" factors of one layer, slices stacked into one pair for
    the whole fused Linear (zero rows for the projections a slice does not cover)."""
    weight_shape = tuple(layer.base_layer.weight.shape)
    downs, ups = [], []
    for part, mod in layer.adapters[name].items():
        f = mod.export_factors(scale)
        up = f["up"]
        if part != "full":
            third = weight_shape[0] // 3
            i = "qkv".index(part)
            full = up.new_zeros(weight_shape[0], up.shape[1])
            full[i * third:(i + 1) * third] = up
            up = full
        downs.append(f["down"].reshape(f["down"].shape[0], *weight_shape[1:]))
        ups.append(up)
    return Factors(torch.cat(downs, 0), torch.cat(ups, 1))


def lora_factors(model: nn.Module, name: str, rank: int | None = None
                 ) -> tuple[dict[str, Factors], dict[str, float]]:
    """{host module name: Factors} of adapter ``name`` and {module: relative SVD error}
    (empty for an exact export). ``rank`` is required unless the method's modules hold
    the "lora" layout; with it, dW is truncated by SVD."""
    state = get_state(model)
    if name not in state.configs:
        raise KeyError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    if state.merged:
        raise InteropError(f"adapters {list(state.merged)} are merged into the weights; "
                           "vp.unmerge(model) before exporting factors")
    method = state.configs[name].method
    spec = get_method(method)
    if not spec.weight_space:
        raise InteropError(f"adapter {name!r} ({method}) has no weight-space form to export")
    exact = spec.factor_layout == LORA and rank is None
    if not exact and rank is None:
        raise InteropError(f"adapter {name!r} is {method}, whose layers are not LoRA factors: give rank=... "
                           "to export it as a LoRA by truncated SVD of dW (the error is reported per layer)")
    factors, errors = {}, {}
    for lname, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        if isinstance(layer.base_layer, nn.MultiheadAttention):
            raise InteropError("nn.MultiheadAttention adapters have no LoRA-file layout in "
                               "diffusers/PEFT/kohya/LyCORIS; use format='merged' or vp.save_adapter")
        if exact:
            factors[lname] = _whole_layer(layer, name, state.scales[name])
            continue
        with torch.no_grad():
            dW = layer.deltas([name], state.scales, fp32=True)["weight"]
        factors[lname], errors[lname] = svd_factors(dW, rank)
    return factors, errors


def export_lora_factors(model: nn.Module, name: str, rank: int | None, format: str,
                        grouped_convs_ok: bool) -> tuple[dict[str, Factors], dict[str, float]]:
    """`lora_factors` plus the check every LoRA format needs: loaders that build a LoRA
    conv (PEFT, diffusers) have no groups or dilation, weight-patching loaders (kohya's
    users: ComfyUI, A1111) apply any conv exactly."""
    factors, errors = lora_factors(model, name, rank)
    modules = canonical_modules(model)
    odd = {m: why for m in factors if (why := conv_layout_problem(plain_host(modules[m])))}
    if odd and not grouped_convs_ok:
        raise InteropError(f"{format} builds a LoRA conv without groups or dilation, so these "
                           f"layers would load wrong: {odd}; use format='kohya' (weight-patching "
                           "loaders such as ComfyUI apply it exactly) or 'merged'")
    if odd:
        warnings.warn(f"{format} export of convs with {odd}: loaders that patch weights (ComfyUI, "
                      "A1111) apply it exactly, loaders that build LoRA conv layers "
                      "(diffusers' kohya conversion) do not", stacklevel=3)
    return factors, errors
