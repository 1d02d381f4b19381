"""Any weight-space adapter -> the host's own state dict with dW merged in: the keys are
exactly those of the model before injection, so the file loads with
``load_state_dict(strict=True)`` into a fresh host (no visionpeft needed)."""
from __future__ import annotations

import torch
from torch import nn

from ..core.layers import AdaptedBlock
from ..core.model_ops import adapted_layers, canonical_state_dict, get_state, trained_copies
from .formats import ExportReport, FileFormat, register_format, save_tensors_file, single_file


def merged_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Host weights + scale * dW of adapter ``name`` (merged in fp32, cast back, checked
    finite); modules trained in full for the adapter contribute their trained copy."""
    state = get_state(model)
    if state.merged:
        raise ValueError(f"adapters {list(state.merged)} are merged; vp.unmerge(model) first, "
                         "so that the export merges exactly one adapter")
    merged: dict[str, torch.Tensor] = {}  # parameter object id -> merged value
    for lname, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        weights = layer._weights()
        try:  # the one merge rule: at least fp32, checked finite in the dtype written
            values = layer.merged_weights([name], state.scales)
        except ValueError as err:
            raise ValueError(f"{lname}: {err}") from None
        merged.update({id(weights[key]): value for key, value in values.items()})
    layers = adapted_layers(model)
    blocks = {n for n, m in layers.items() if isinstance(m, AdaptedBlock)}
    block_params = {id(p) for n in blocks for p in layers[n].adapters.parameters()}
    wrappers = {**{n: "layer" for n in layers if n not in blocks},
                **{n: "copy" for n in trained_copies(model)}}
    copies = trained_copies(model)
    out: dict[str, torch.Tensor] = {}
    params = {id(p): p for p in model.parameters()}
    for key, tensor in canonical_state_dict(model).items():
        if id(tensor) in block_params:
            continue  # block adapters have no weight-space form and are not merged
        owner = next((w for w in wrappers if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = tensor
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # adapter parameters and other adapters' trained copies
        plain = f"{owner}.{rest[len('base_layer.'):]}"
        if wrappers[owner] == "copy" and name in copies[owner].copies:
            tensor = copies[owner].copies[name].state_dict(keep_vars=True)[rest[len('base_layer.'):]]
        out[plain] = merged.get(id(tensor), tensor) if id(tensor) in params else tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def _export(model, name, path, rank, prefix) -> ExportReport:
    target = single_file(path, "model.safetensors")
    save_tensors_file(merged_state_dict(model, name), target)
    layers = sum(1 for layer in adapted_layers(model).values() if name in layer.adapters)
    return ExportReport(target, "merged", layers)


register_format(FileFormat("merged", write=_export, factors_only=False))
