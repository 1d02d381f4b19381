"""The common currency of the LoRA formats: per host module, dW = up @ down with every
scale folded into ``up``.

down (r, in) or (r, in, kh, kw) for a conv, up (out, r). Foreign formats store a scale
next to the factors (alpha / r); ours is folded in on export, so a file always says
alpha = r (scale 1), which every loader reads the same way. Getting factors out of a
model: a LoRA adapter gives its own (exact; fused-qkv slices become one factor pair for
the whole Linear with zero rows elsewhere); any other weight-space method goes through a
truncated SVD of dW at a chosen rank, with the relative error reported per layer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.targeting import canonical_modules
from ..core.model_ops import adapted_layers, get_state, inject
from ..core.registry import get_method


class InteropError(ValueError):
    """A file or adapter cannot be converted; the message says what was found."""


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


def _host_of(layer) -> nn.Module:
    base = layer.base_layer
    if isinstance(base, nn.MultiheadAttention):
        raise InteropError("nn.MultiheadAttention adapters have no LoRA-file layout in "
                           "diffusers/PEFT/kohya/LyCORIS; use format='merged' or vp.save_adapter")
    return base


def _lora_factors(layer, name: str, scale: float) -> Factors:
    """One LoRA adapter of one layer, slices stacked into a whole-layer pair."""
    out = layer.base_layer.weight.shape[0]
    downs, ups = [], []
    for part, mod in layer.adapters[name].items():
        s = mod.scale * scale
        up = mod.lora_B.detach().float() * s
        if part != "full":  # q/k/v rows of a fused Linear: zero rows for the others
            third = out // 3
            i = "qkv".index(part)
            full = up.new_zeros(out, up.shape[1])
            full[i * third:(i + 1) * third] = up
            up = full
        downs.append(mod.lora_A.detach().float().reshape(mod.lora_A.shape[0], *layer.base_layer.weight.shape[1:]))
        ups.append(up)
    return Factors(torch.cat(downs, 0), torch.cat(ups, 1))


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


def model_factors(model: nn.Module, name: str, rank: int | None = None
                  ) -> tuple[dict[str, Factors], dict[str, float]]:
    """{host module name: Factors} of adapter ``name`` and {module: relative SVD error}
    (empty for an exact LoRA export). ``rank`` is required for methods other than LoRA."""
    state = get_state(model)
    if name not in state.configs:
        raise KeyError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    if state.merged:
        raise InteropError(f"adapters {list(state.merged)} are merged into the weights; "
                           "vp.unmerge(model) before exporting factors")
    method = state.configs[name].method
    if not get_method(method).weight_space:
        raise InteropError(f"adapter {name!r} ({method}) has no weight-space form to export")
    if method != "lora" and rank is None:
        raise InteropError(f"adapter {name!r} is {method}, not LoRA: give rank=... to export it "
                           "as a LoRA by truncated SVD of dW (the error is reported per layer)")
    factors, errors = {}, {}
    for lname, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        _host_of(layer)
        if method == "lora" and rank is None:
            factors[lname] = _lora_factors(layer, name, state.scales[name])
            continue
        with torch.no_grad():
            dW = layer.deltas([name], state.scales, fp32=True)["weight"]
        factors[lname], errors[lname] = svd_factors(dW, rank)
    return factors, errors


def _plain_host(module: nn.Module) -> nn.Module:
    from ..core.layers import AdaptedLayerBase

    return module.base_layer if isinstance(module, AdaptedLayerBase) else module


def exact_targets(names) -> list[str]:
    """Target entries that match these layer names and nothing else (a plain name would
    also match by dotted suffix)."""
    return [f"re:{re.escape(n)}" for n in names]


def inject_factors(model: nn.Module, factors: dict[str, Factors], name: str) -> nn.Module:
    """Add a LoRA adapter ``name`` that reproduces ``factors`` exactly, scale 1, each
    layer at its file rank (a rank above what the layer can hold is first reduced exactly
    by SVD, dW's rank being at most that). Every module and shape is checked before the
    model is touched."""
    from ..methods.lora import LoRAConfig

    modules = canonical_modules(model)
    missing = [m for m in factors if m not in modules]
    if missing:
        raise InteropError(f"{len(missing)} module(s) of the file are not in this model: "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    problems, ranks = [], {}
    for mname, f in factors.items():
        host = _plain_host(modules[mname])
        if not isinstance(host, (nn.Linear, nn.Conv2d)):
            problems.append(f"{mname} is {type(host).__name__}, not Linear/Conv2d")
            continue
        got = (f.up.shape[0], *f.down.shape[1:])
        if got != tuple(host.weight.shape):
            problems.append(f"{mname}: file gives dW {got}, the layer's weight is {tuple(host.weight.shape)}")
            continue
        limit = min(f.up.shape[0], f.down[0].numel())
        if f.rank > limit:
            factors[mname] = svd_factors(f.delta_weight(), limit)[0]
        ranks[mname] = factors[mname].rank
    if problems:
        raise InteropError("the file does not fit this model: " + "; ".join(problems[:8]))
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    cfg = LoRAConfig(r=r, target_modules=exact_targets(factors),
                     rank_pattern={m: k for m, k in ranks.items() if k != r})
    inject(model, cfg, name=name)
    layers = adapted_layers(model)
    with torch.no_grad():
        for mname, f in factors.items():
            mod = layers[mname].adapters[name]["full"]
            mod.lora_A.copy_(f.down.reshape(f.rank, -1).to(mod.lora_A.dtype))
            mod.lora_B.copy_((f.up / mod.scale).to(mod.lora_B.dtype))
    return model


def hotswap_factors(model: nn.Module, factors: dict[str, Factors], name: str) -> nn.Module:
    """Write ``factors`` into the loaded LoRA adapter ``name`` in place: the same modules,
    ranks up to the adapter's r (zero-padded), and lora_B divided by the module's scale
    so the module's own constants stay (a compiled graph keeps them)."""
    state = get_state(model)
    if name not in state.configs or state.configs[name].method != "lora":
        raise InteropError(f"a LoRA file hot-swaps into a loaded LoRA adapter; {name!r} is "
                           f"{state.configs[name].method if name in state.configs else 'not loaded'}")
    layers = {m: layer for m, layer in adapted_layers(model).items() if name in layer.adapters}
    problems = []
    if set(layers) != set(factors):
        problems.append(f"modules only in the file: {sorted(set(factors) - set(layers))[:6]}, only in "
                        f"the adapter: {sorted(set(layers) - set(factors))[:6]}")
    for m in sorted(set(layers) & set(factors)):
        parts, f = layers[m].adapters[name], factors[m]
        if set(parts) != {"full"}:
            problems.append(f"{m}: the adapter holds parts {list(parts)}, a file holds whole layers")
        elif f.rank > (r := parts["full"].lora_A.shape[0]) \
                or tuple(parts["full"].lora_A.shape[1:]) != (f.down[0].numel(),) \
                or parts["full"].lora_B.shape[0] != f.up.shape[0]:  # r per layer (rank_pattern)
            problems.append(f"{m}: file rank {f.rank} / dW {(f.up.shape[0], *f.down.shape[1:])} does "
                            f"not fit rank {r} / {tuple(layers[m].base_layer.weight.shape)}")
    if problems:
        raise InteropError("cannot hot-swap: " + "; ".join(problems[:6]))
    with torch.no_grad():
        for m, f in factors.items():
            mod = layers[m].adapters[name]["full"]
            down = torch.zeros_like(mod.lora_A)
            up = torch.zeros_like(mod.lora_B)
            down[:f.rank] = f.down.reshape(f.rank, -1).to(down.dtype)
            up[:, :f.rank] = (f.up / mod.scale).to(up.dtype)
            mod.lora_A.copy_(down)
            mod.lora_B.copy_(up)
    return model
