"""Sliding-window inference shared by every dense (per-pixel) task: change detection,
segmentation. One path, so that every task tiles, pads and averages the same way.

Images larger than the model's input are cut into windows of ``tile`` pixels every
``stride`` pixels, the last window of each row and column aligned to the border; each
pixel's output is the mean of the outputs of every window that covers it. Images smaller
than a tile are padded at the bottom and right (reflect where the image is large enough,
else replicate) and the result is cropped back.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sliding_window", "window_starts"]


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``size >= tile`` pixels: every
    ``stride`` pixels, plus one window flush with the far border so that no pixel is
    left out when ``stride`` does not divide ``size - tile``."""
    return sorted({*range(0, size - tile + 1, stride), size - tile})


def _check_inputs(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not inputs:
        raise ValueError("sliding_window: give at least one input tensor")
    for t in inputs:
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"sliding_window: inputs must be (N, C, H, W) tensors, got {shape}")
    n, _, h, w = inputs[0].shape
    for t in inputs[1:]:
        if (t.shape[0], *t.shape[-2:]) != (n, h, w):
            raise ValueError(f"sliding_window: inputs must share N, H, W; got {tuple(inputs[0].shape)} "
                             f"and {tuple(t.shape)}")
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"sliding_window: empty input {tuple(inputs[0].shape)}")
    return inputs


def _pad_to_tile(inputs: list[torch.Tensor], tile: int) -> list[torch.Tensor]:
    h, w = inputs[0].shape[-2:]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if not (ph or pw):
        return inputs
    # reflect needs each pad shorter than its axis; replicate (edge pixels) works always
    mode = "reflect" if ph < h and pw < w else "replicate"
    return [F.pad(t, (0, pw, 0, ph), mode=mode) for t in inputs]


def _crops(t: torch.Tensor, group: list[tuple[int, int]], tile: int) -> torch.Tensor:
    """The windows of ``group`` stacked along N; one window stays a view (no copy)."""
    parts = [t[..., y:y + tile, x:x + tile] for y, x in group]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_output(out, n: int, tile: int, num_channels: int | None) -> None:
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != n or out.shape[-2:] != (tile, tile):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"sliding_window: predict must return ({n}, K, {tile}, {tile}), got {shape}")
    if num_channels is not None and out.shape[1] != num_channels:
        raise ValueError(f"sliding_window: predict returned {out.shape[1]} channels, expected {num_channels}")


@torch.no_grad()
def sliding_window(predict: Callable[..., torch.Tensor], inputs: torch.Tensor | Sequence[torch.Tensor], tile: int,
                   stride: int | None = None, num_channels: int | None = None, *, batch: int = 1) -> torch.Tensor:
    """Per-pixel outputs (N, K, H, W) of ``predict`` over images of any size.

    ``predict(*crops)`` gets the same window of every input, each (N, C_i, tile, tile),
    and returns (N, K, tile, tile): logits or probabilities, whichever the caller wants
    averaged. ``inputs`` is one tensor or a list of tensors (N, C_i, H, W) sharing N, H, W.
    ``stride`` defaults to tile // 2 and is capped at ``tile`` (a wider one would leave
    pixels uncovered). ``num_channels``, if given, is the K that every output must have.
    ``batch`` windows go through ``predict`` in one call (stacked along N), which saves
    Python overhead on small tiles at the cost of ``batch`` times the activations; with
    the default 1 every call sees exactly the caller's N. Runs under ``torch.no_grad``.
    The sum of outputs is kept in float32 at least, so fp16 outputs average accurately.
    """
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"sliding_window: tile must be a positive int, got {tile!r}")
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise ValueError(f"sliding_window: stride must be a positive int or None, got {stride!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"sliding_window: batch must be a positive int, got {batch!r}")
    inputs = _check_inputs(inputs)
    n, _, h, w = inputs[0].shape
    stride = min(stride or max(1, tile // 2), tile)
    inputs = _pad_to_tile(inputs, tile)
    H, W = inputs[0].shape[-2:]
    ys, xs = window_starts(H, tile, stride), window_starts(W, tile, stride)
    windows = [(y, x) for y in ys for x in xs]

    total = None
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        out = predict(*(_crops(t, group, tile) for t in inputs))
        _check_output(out, n * len(group), tile, num_channels)
        if total is None:
            total = out.new_zeros(n, out.shape[1], H, W, dtype=torch.promote_types(out.dtype, torch.float32))
            num_channels = out.shape[1]  # later calls must agree with the first
        for (y, x), part in zip(group, out.split(n)):
            total[..., y:y + tile, x:x + tile] += part
    # how many windows cover each pixel: the product of the per-axis counts
    cy = torch.zeros(H, dtype=total.dtype, device=total.device)
    cx = torch.zeros(W, dtype=total.dtype, device=total.device)
    for y in ys:
        cy[y:y + tile] += 1
    for x in xs:
        cx[x:x + tile] += 1
    return (total / (cy[:, None] * cx[None, :]))[..., :h, :w]
