"""The patch grid of a ViT-like host, for block adapters that see tokens as an image.

A ViT block receives (batch, prefix + rows * cols, width): the prefix tokens (class token,
registers) first, then the patches row by row. The block alone cannot tell rows from
columns (a 14 x 20 grid and a 20 x 14 grid hold the same count), so a `TokenGrid` records
the grid of every forward from the host's patch embedding: a forward hook on its first
patchifying convolution (kernel size = stride: timm's ``patch_embed.proj``, transformers'
DINOv2 / DINOv3 ``patch_embeddings``), whose output is (batch, width, rows, cols). The
prefix count then follows from the token count, so registers need no configuration.

One grid per model, kept on its `AdapterState`, shared by every adapter module that sets
``needs_token_grid``; its hook comes off when the last such adapter is removed. Hosts
whose blocks already see (batch, rows, cols, width) (timm Hiera) need no grid.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn


class TokenGrid:
    """(rows, cols) of the last forward through the host's patch embedding, or None."""

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None

    def record(self, module: nn.Module, args, out) -> None:
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            self.shape = (int(out.shape[-2]), int(out.shape[-1]))

    def split(self, n_tokens: int) -> tuple[int, tuple[int, int]]:
        """(prefix count, (rows, cols)) for a block input of ``n_tokens`` tokens."""
        if self.shape is not None:
            rows, cols = self.shape
            if rows * cols <= n_tokens:
                return n_tokens - rows * cols, (rows, cols)
        return square_split(n_tokens, self.shape)


def square_split(n_tokens: int, recorded=None) -> tuple[int, tuple[int, int]]:
    """Without a recorded grid (a host with no patchifying conv): a square grid after the
    fewest prefix tokens (0-8: none, a class token, up to 7 registers more) that leave one."""
    for prefix in range(0, 9):
        side = math.isqrt(n_tokens - prefix) if n_tokens > prefix else 0
        if side and side * side == n_tokens - prefix:
            if recorded is None:  # a guess: a 16 x 64 grid holds as many tokens as 32 x 32
                warnings.warn(f"no patch grid was recorded (no Conv2d with kernel size = stride in the model); "
                              f"{n_tokens} tokens read as {prefix} prefix tokens and a {side} x {side} grid",
                              stacklevel=3)
            return prefix, (side, side)
    seen = f"the patch embedding last gave a {recorded[0]} x {recorded[1]} grid" if recorded else \
        "no patch embedding (a Conv2d with kernel size = stride) was found in the model"
    raise ValueError(f"cannot lay {n_tokens} tokens out as an image: {seen}, and {n_tokens} is not a "
                     "square plus up to 8 prefix tokens. Run the model on images through its patch "
                     "embedding, or give the block (batch, rows, cols, width) tokens")


def find_patch_embedding(model: nn.Module) -> nn.Conv2d | None:
    """The first Conv2d in module order with kernel size = stride > 1."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride) and max(m.kernel_size) > 1:
            return m
    return None


def bind_token_grid(model: nn.Module, state) -> TokenGrid:
    """The model's `TokenGrid` (made and hooked on first use)."""
    grid = getattr(state, "token_grid", None)
    if grid is None:
        grid = TokenGrid()
        conv = find_patch_embedding(model)
        if conv is not None:
            conv.register_forward_hook(grid.record)
        state.token_grid = grid
    return grid


def release_token_grid(model: nn.Module, state) -> None:
    """Take the grid's hook off (found by owner: a deep copy rebinds hooks to its copy)."""
    grid = getattr(state, "token_grid", None)
    if grid is None:
        return
    for m in model.modules():
        for key in [k for k, hook in m._forward_hooks.items() if getattr(hook, "__self__", None) is grid]:
            del m._forward_hooks[key]
    state.token_grid = None
