"""Fast 1-D periodized wavelet synthesis of thin matrices (WaRA's factors).

WaRA's factor for a band at level ``j`` is the j-level 1-D synthesis of a thin matrix
along its long axis: the band's channel at level j, then the low channel of every finer
level. Being a periodized filter bank, that map is shift-invariant by P = 2^j: shifting the
input by one sample shifts the output by P. So with the polyphase table
``F[t, p] = s[P t + p]`` of the response ``s`` to a unit impulse,

    x[P k + p] = sum_t y[(k - t) mod Q] F[t, p],    Q = n / P,

and F is nonzero on a few cyclically consecutive t only (about filter length / P of them,
one for haar at any level): a short periodic extension and taps x P broadcast
multiply-adds against rows of a table, for all bands and levels of one side of a layer in
one autograd node (`synthesize_columns`). The direct form (``dwt.idwt1`` per band and
level: pads, rolls, stacks and a conv_transpose1d each) costs hundreds of tiny ops per
layer and step, and CPU convolutions this small are slow, more so with several threads.

The tables are read off the reference synthesis (``dwt.idwt1``) applied to an impulse in
float64, so wrap-around (filters longer than the signal at deep levels) and pywt's
periodization offsets come out right by construction. They are cached per (wavelet,
level, band length, column layout, dtype, device) and shared by every layer of a shape:
taps x 2^level x R numbers each.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dwt import idwt1

__all__ = ["Plan", "impulse_table", "synthesis_plan", "synthesize_columns"]


@functools.lru_cache(maxsize=256)
def impulse_table(name: str, channel: str, level: int, q: int) -> tuple[tuple[float, ...], ...]:
    """``F[t][p]`` (Q rows of P = 2^level) for a length-``q`` band in ``channel`` ("lo" or
    "hi") of ``level``, synthesized up to length q * 2^level: ``x[P k + p] = sum_t
    y[(k - t) mod q] F[t][p]``."""
    if channel not in ("lo", "hi"):
        raise ValueError(f"channel must be 'lo' or 'hi', got {channel!r}")
    if level < 1 or q < 1:
        raise ValueError(f"need level >= 1 and a non-empty band, got level={level}, length {q}")
    with torch.inference_mode(False), torch.no_grad():
        y = torch.zeros(1, q, dtype=torch.float64)
        y[0, 0] = 1.0
        x = idwt1(y, None, name) if channel == "lo" else idwt1(None, y, name)
        for _ in range(level - 1):
            x = idwt1(x, None, name)
    P = 1 << level
    return tuple(tuple(row) for row in x.reshape(q, P).tolist())


def _cyclic_support(nonzero: Sequence[bool]) -> tuple[int, int]:
    """(start, length) of the shortest cyclic run of rows covering every True one."""
    q = len(nonzero)
    on = [i for i, v in enumerate(nonzero) if v]
    if not on:
        return 0, 1
    if len(on) == q:
        return 0, q
    # the longest cyclic run of zero rows is what the window leaves out
    gap, start = max(((on[(k + 1) % len(on)] - on[k] - 1) % q, on[(k + 1) % len(on)]) for k in range(len(on)))
    return start, q - gap


@functools.lru_cache(maxsize=256)
def _plan(name: str, level: int, q: int, runs: tuple[tuple[str, int], ...]):
    tables = {ch: impulse_table(name, ch, level, q) for ch in {ch for ch, _ in runs}}
    support = [any(any(v != 0.0 for v in tables[ch][t]) for ch in tables) for t in range(q)]
    t0, taps = _cyclic_support(support)
    # window position s holds y[k - t0 - (taps - 1 - s)]
    rows = [(t0 + taps - 1 - s) % q for s in range(taps)]
    P = 1 << level
    # (taps, P, c): one column per factor column, so a run of columns shares its channel
    weights = [[[tables[ch][t][p] for ch, count in runs for _ in range(count)] for p in range(P)] for t in rows]
    return (-t0 - (taps - 1)) % q, taps, weights


class Plan(NamedTuple):
    """One level's synthesis for one column layout: x[P k + p] = sum_s y_ext[k + s] *
    table[s, p] with y_ext[i] = y[(i + start) mod q], i < q + taps - 1."""

    start: int
    taps: int
    table: Tensor  # (taps, P, c)
    entries: tuple  # table[s][p] as views, so that a step does not index the table again
    entries_t: tuple  # the same as (c, 1) columns, for the transposed layout
    pieces: tuple  # (first row of y, rows) runs that y_ext is made of, in order


def _pieces(start: int, length: int, q: int) -> tuple[tuple[int, int], ...]:
    out, pos = [], start
    while length:
        take = min(q - pos, length)
        out.append((pos, take))
        length, pos = length - take, 0
    return tuple(out)


@functools.lru_cache(maxsize=512)
def _cached_plan(name, level, q, runs, dtype, device) -> Plan:
    start, taps, weights = _plan(name, level, q, runs)
    # not inference tensors, should the first call come under inference_mode: later
    # training steps use them
    with torch.inference_mode(False):
        table = torch.tensor(weights, dtype=torch.float64).to(dtype=dtype, device=device)
        entries = tuple(tuple(row.unbind(0)) for row in table.unbind(0))
        entries_t = tuple(tuple(e.unsqueeze(1) for e in row) for row in entries)
    return Plan(start, taps, table, entries, entries_t, _pieces(start, q + taps - 1, q))


def synthesis_plan(name: str, level: int, q: int, runs: tuple[tuple[str, int], ...],
                   dtype: torch.dtype = torch.float32, device=None) -> Plan:
    """The `Plan` of a length-``q`` band at ``level`` for columns laid out as ``runs`` of
    (channel, count); cached per argument set, shared by every layer of that shape."""
    return _cached_plan(name, level, q, tuple(runs), dtype, torch.device(device or "cpu"))


class _Group(NamedTuple):
    plan: Plan
    blocks: range  # indices of the input blocks at this level
    cols: tuple  # (first, end) column of each of those blocks in the output
    first: int  # first output column of the group
    width: int


class _Layout(NamedTuple):
    n: int  # rows returned
    n_pad: int  # rows synthesized
    width: int  # columns
    transposed: tuple  # per block: given as (c, h) rather than (h, c)
    groups: tuple


@functools.lru_cache(maxsize=512)
def _layout(name: str, n: int, spec: tuple, dtype, device) -> _Layout:
    """spec: per block (h, c, channel, level, transposed)."""
    groups, k, col = [], 0, 0
    n_pad = spec[0][0] << spec[0][3]
    while k < len(spec):
        level, end = spec[k][3], k
        while end < len(spec) and spec[end][3] == level:
            end += 1
        q = spec[k][0]
        if any(h != q or h << level != n_pad for h, *_ in spec[k:end]):
            raise ValueError(f"blocks must all synthesize to the same length, got {spec}")
        cols, first = [], col
        for h, c, *_ in spec[k:end]:
            cols.append((col, col + c))
            col += c
        runs = tuple((ch, c) for _, c, ch, _, _ in spec[k:end])
        groups.append(_Group(synthesis_plan(name, level, q, runs, dtype, device), range(k, end), tuple(cols),
                             first, col - first))
        k = end
    if n_pad < n:
        raise ValueError(f"blocks synthesize to length {n_pad}, shorter than n={n}")
    return _Layout(n, n_pad, col, tuple(t for *_, t in spec), tuple(groups))


class _Synthesis(torch.autograd.Function):
    """Every block of one side of a layer -> its (n, R) factor, and the adjoint in
    backward: one autograd node for all bands and levels.

    Forward: positions run down the rows and factor columns along them, and each output
    phase p (rows P k + p) is accumulated on its own, straight into the output's rows for
    that phase, so every op is a pass over (q, c) blocks with one (c,) row of the table
    broadcast along them. Backward works on the transpose (see there). A (q, 1, c) x (P, c)
    broadcast product, or anything reducing along a tiny inner axis, runs several times
    slower on CPU, and autograd's adjoint of the forward's ops would take more nodes and
    passes than the taps x P fused multiply-adds here."""

    @staticmethod
    def forward(ctx, layout, *mats):
        out = mats[0].new_empty(layout.n_pad, layout.width)
        for grp in layout.groups:
            plan = grp.plan
            parts = [mats[i].t() if layout.transposed[i] else mats[i] for i in grp.blocks]
            y = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, 1)
            q, taps, entries = y.shape[0], plan.taps, plan.entries
            ext = y if len(plan.pieces) == 1 and taps == 1 else torch.cat([y[a:a + m] for a, m in plan.pieces])
            rows = out.view(q, len(entries[0]), layout.width)
            for p in range(len(entries[0])):
                dst = rows[:, p, grp.first:grp.first + grp.width]
                torch.mul(ext if taps == 1 else ext[:q], entries[0][p], out=dst)
                for s in range(1, taps):
                    dst.addcmul_(ext[s:s + q], entries[s][p])
        ctx.layout = layout
        return out if layout.n == layout.n_pad else out[:layout.n]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        layout = ctx.layout
        if layout.n < layout.n_pad:
            g = torch.cat([g, g.new_zeros(layout.n_pad - layout.n, layout.width)])
        # Worked in the transposed space (factor columns down the rows, positions along
        # them): LoRA's kernels hand the gradient back as the transpose of a contiguous
        # (R, n), and A's gradient wants that layout too.
        gt = g.t()
        grads = []
        for grp in layout.groups:
            if not any(ctx.needs_input_grad[1 + i] for i in grp.blocks):  # a frozen group
                grads += [None] * len(grp.blocks)
                continue
            plan = grp.plan
            taps, cols, pieces = plan.taps, plan.entries_t, plan.pieces
            P = len(cols[0])
            q = layout.n_pad // P
            inter = gt[grp.first:grp.first + grp.width].view(grp.width, q, P)
            # phases interleaved along the rows: read in place by a haar-like filter (one
            # tap), copied apart first for longer ones, which read each phase taps times
            phases = inter.unbind(2) if taps == 1 else inter.permute(2, 0, 1).contiguous().unbind(0)
            if taps == 1:
                ext = torch.mul(phases[0], cols[0][0])
                for p in range(1, P):
                    ext.addcmul_(phases[p], cols[0][p])
            else:
                ext = g.new_zeros(grp.width, q + taps - 1)
                for s in range(taps):
                    window = ext[:, s:s + q]
                    for p in range(P):
                        window.addcmul_(phases[p], cols[s][p])
            gy = ext
            if len(pieces) > 1 or taps > 1:
                # fold the extension back onto the positions of y it was copied from
                gy, offset = g.new_zeros(grp.width, q), 0
                for a, m in pieces:
                    gy[:, a:a + m] += ext[:, offset:offset + m]
                    offset += m
            for i, (c0, c1) in zip(grp.blocks, grp.cols):
                block = gy[c0 - grp.first:c1 - grp.first]
                grads.append(None if not ctx.needs_input_grad[1 + i]
                             else block if layout.transposed[i] else block.t())
        return (None, *grads)


def synthesize_columns(blocks: Sequence[tuple[Tensor, str, int]], n: int, name: str,
                       transposed: Sequence[bool] | None = None) -> Tensor:
    """Columns of every block synthesized to length ``n``: ``blocks`` are (M (h_i, c_i),
    channel, level) with h_i * 2^level the same padded length for all, or (c_i, h_i) where
    ``transposed[i]``; returns (n, sum c_i), the first n rows of a contiguous matrix,
    columns in the order given. Column j of M ends up equal to synthesizing it in
    ``channel`` at ``level``, then through the low channel of every finer level, with
    ``dwt.idwt1`` (which works along the last axis: the transpose of this layout)."""
    if not blocks:
        raise ValueError("synthesize_columns needs at least one block")
    transposed = tuple(bool(t) for t in (transposed or [False] * len(blocks)))
    mats = [m for m, _, _ in blocks]
    spec = tuple((*(m.shape[::-1] if t else m.shape), ch, level, t)
                 for (m, ch, level), t in zip(blocks, transposed))
    return _Synthesis.apply(_layout(name, n, spec, mats[0].dtype, mats[0].device), *mats)
