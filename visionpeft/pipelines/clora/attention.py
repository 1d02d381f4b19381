"""Capturing cross-attention probabilities at one resolution of a diffusers UNet.

Only the cross-attention layers whose query length is the chosen grid's get an explicit
softmax (the probabilities have to exist there); every other layer, self-attention
included, keeps the processor it had (scaled-dot-product attention on torch 2). The
processors are put back when the `capture` block ends, so the pipeline is left as it was.
"""
from __future__ import annotations

import contextlib
import math

import torch


class MapStore:
    """Per batch row, the sum of the captured probabilities (queries, tokens) over layers
    and heads, and how many (layer, head) maps went in: their mean is the row's map.
    Summed out of place, so the latent's gradient reaches every captured layer."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid
        self.length = grid[0] * grid[1]
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, probs: torch.Tensor, heads: int) -> None:
        per_row = probs.unflatten(0, (-1, heads)).float().sum(1)  # (batch, queries, tokens)
        self.total = per_row if self.total is None else self.total + per_row
        self.count += heads

    def row_maps(self) -> torch.Tensor:
        """(batch, H, W, tokens): each row's mean map over the captured layers and heads."""
        if self.total is None:
            raise RuntimeError(f"no cross-attention layer ran at the {self.grid[0]}x{self.grid[1]} grid; "
                               "choose another attn_res")
        return (self.total / self.count).unflatten(1, self.grid)


class CaptureProcessor:
    """A cross-attention processor that, at the store's query length, computes the
    attention explicitly (as diffusers' classic ``AttnProcessor`` does) and records the
    probabilities; at any other length it hands the call to the layer's own processor."""

    def __init__(self, inner, store: MapStore):
        self.inner = inner
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        queries = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]
        if encoder_hidden_states is None or queries != self.store.length:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, tokens, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (batch * heads, queries, tokens)
        self.store.add(probs, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _halve(size: int, times: int) -> int:
    for _ in range(times):
        size = math.ceil(size / 2)  # a stride-2, padding-1, 3x3 downsampler
    return size


def cross_attention_levels(unet) -> list[int]:
    """The UNet levels (0 = full latent size, k = k halvings) that hold cross-attention,
    read from its block types."""
    cfg = unet.config
    downs = list(cfg.down_block_types)
    levels = {i for i, t in enumerate(downs) if "CrossAttn" in t}
    if cfg.mid_block_type and "CrossAttn" in cfg.mid_block_type:
        levels.add(len(downs) - 1)
    levels |= {len(downs) - 1 - j for j, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    return sorted(levels)


def choose_grid(unet, latent_hw: tuple[int, int], attn_res: int | None) -> tuple[int, int]:
    """(H, W) of the attention grid to capture. ``attn_res``: its width in tokens. None:
    a quarter of the latent's width, rounded up (CLoRA's ceil(width / 32): 16 at 512 px on
    SD 1.5) when cross-attention runs there, else the middle one of the UNet's
    cross-attention resolutions (so small and non-SD UNets need no flag)."""
    levels = cross_attention_levels(unet)
    if not levels:
        raise ValueError("this UNet has no cross-attention layers; CLoRA needs text cross-attention maps")
    grids = {lv: (_halve(latent_hw[0], lv), _halve(latent_hw[1], lv)) for lv in levels}
    if attn_res is not None:
        hits = [g for g in grids.values() if g[1] == attn_res]
        if not hits:
            raise ValueError(f"attn_res={attn_res}: this UNet's cross-attention grids at this size are "
                             f"{sorted({g[1] for g in grids.values()})} tokens wide")
        return hits[0]
    quarter = math.ceil(latent_hw[1] / 4)
    for g in grids.values():
        if g[1] == quarter:
            return g
    widths = sorted(set(grids.values()), key=lambda g: g[1])
    return widths[(len(widths) - 1) // 2]


@contextlib.contextmanager
def capture(unet, store: MapStore):
    """Inside the block, the UNet's cross-attention layers record into ``store``."""
    from diffusers.models.attention_processor import Attention

    original = dict(unet.attn_processors)
    cross = {f"{name}.processor" for name, m in unet.named_modules()
             if isinstance(m, Attention) and m.is_cross_attention}
    if not cross:
        raise ValueError("this UNet has no cross-attention layers; CLoRA needs text cross-attention maps")
    # set_attn_processor empties the dict it is given: pass copies
    unet.set_attn_processor({k: CaptureProcessor(p, store) if k in cross else p for k, p in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(dict(original))
