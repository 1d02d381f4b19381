"""One adapter per batch row at the cost of one adapter: the host op runs once for the
whole batch, and each row's update runs with that row's factors, gathered from a stack of
every adapter's, as one batched product (the segmented-gather idea of Punica and S-LoRA).
The alternative, a sub-batch per adapter, pays an index_select and an index_copy of the
whole output per adapter, so its cost grows with the number of distinct adapters.

Rows are given as ``row_adapter`` (batch,), an index into the stack or -1 for "no
adapter". Stacks carry one extra all-zero entry at the end, and -1 is sent there by a
remainder (-1 mod (n + 1) = n), so no row needs a branch or a host-device sync.
Pure tensor code; the scales are folded into the factors by the caller.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F


def stack_with_empty(mats: list[torch.Tensor], pad_dims: tuple[int, ...] = ()) -> torch.Tensor:
    """(n + 1, ...) stack of ``mats``, the last entry zeros. Sizes along ``pad_dims`` (of
    each matrix) may differ and are zero-padded at the end to the largest, which leaves a
    low-rank product unchanged when the padded dims are the rank."""
    ref = mats[0]
    size = list(ref.shape)
    for d in pad_dims:
        size[d] = max(m.shape[d] for m in mats)
    padded = []
    for m in mats:
        if list(m.shape) != size:
            pad = []
            for d in reversed(range(m.dim())):
                pad += [0, size[d] - m.shape[d]]
            m = F.pad(m, pad)
        padded.append(m)
    padded.append(ref.new_zeros(size))
    return torch.stack(padded)


def scaled(stack: torch.Tensor, scales: list[float]) -> torch.Tensor:
    """stack[k] * scales[k] for the adapters, the empty entry left at zero."""
    s = torch.tensor([*scales, 0.0], dtype=stack.dtype, device=stack.device)
    return stack * s.view(-1, *([1] * (stack.dim() - 1)))


def cached_stacks(store: dict | None, sources: list[torch.Tensor], extra: tuple, build):
    """``build()`` (the stacks of a group of adapters), kept in ``store`` (the caller's
    routing plan, dropped when the routing, the adapters or their device change; None: not
    kept) while no gradient is wanted and every tensor in ``sources`` is the same object
    with the same storage, dtype and version counter: an optimizer step,
    ``load_state_dict`` or ``.to()`` rebuilds it (an edit through ``p.data`` is not seen,
    as for WaRA's factors). ``extra``: whatever else the stacks depend on (the adapters'
    scales). The kept copy costs memory equal to the group's factors, once per plan."""
    if store is None or torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return build()
    try:
        key = (tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in sources), extra)
    except RuntimeError:  # inference tensors have no version counter: no cache
        return build()
    hit = store.get("_routed_stacks")
    # the sources are held weakly, so a freed tensor whose id and address come back
    # (another adapter loaded in its place) cannot match
    if hit is None or hit[0] != key or any(r() is not t for r, t in zip(hit[2], sources)):
        # normal tensors even under inference_mode, as a later training step may run them
        with torch.inference_mode(False), torch.no_grad():
            hit = store["_routed_stacks"] = (key, build(), [weakref.ref(t) for t in sources])
    return hit[1]


def row_slots(row_adapter: torch.Tensor, n: int) -> torch.Tensor:
    """Stack entry of every row: its adapter, or the empty entry n for -1."""
    return torch.remainder(row_adapter, n + 1)


def dropped_once(x: torch.Tensor, rates: list[float]) -> torch.Tensor | None:
    """x with input dropout applied once for every row, when all the adapters drop at one
    rate (the rows' masks are independent, as each adapter's own would be); None when the
    rates differ, since each row would need its own adapter's."""
    if len(set(rates)) > 1:
        return None
    return F.dropout(x, rates[0], True) if rates[0] else x


def _accumulate(y3: torch.Tensor, a: torch.Tensor, b: torch.Tensor, in_place: bool) -> torch.Tensor:
    return y3.baddbmm_(a, b) if in_place else torch.baddbmm(y3, a, b)


def _in_place_ok(y: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Write into y only where autograd is not watching and y is a plain block of memory:
    the caller hands over a y it owns, as for `lora_add_linear`."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (y, *tensors))
    return not grad and y.is_contiguous()


def routed_low_rank_add(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        row_adapter: torch.Tensor) -> torch.Tensor:
    """y + x_b A_k^T B_k^T for every row b (dim 0) with k = row_adapter[b].

    x (batch, ..., in), y (batch, ..., out); A (n + 1, r, in), B (n + 1, out, r) stacks as
    from `stack_with_empty`, scales folded in. Everything between the batch and the
    feature dim (tokens, or nothing) is one token axis of the batched products.
    """
    batch, fan_in, out = x.shape[0], x.shape[-1], y.shape[-1]
    slots = row_slots(row_adapter, A.shape[0] - 1)
    x3 = x.reshape(batch, -1, fan_in)
    h = torch.bmm(x3, A.index_select(0, slots).transpose(1, 2))  # (batch, tokens, r)
    Bt = B.index_select(0, slots).transpose(1, 2)  # (batch, r, out)
    if _in_place_ok(y, x, A, B):
        _accumulate(y.view(batch, -1, out), h, Bt, True)
        return y
    return _accumulate(y.reshape(batch, -1, out), h, Bt, False).view(y.shape)


def routed_kron_add(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    row_adapter: torch.Tensor) -> torch.Tensor:
    """y + x_b kron(A_k, B_k)^T for every row b with k = row_adapter[b], without building
    a Kronecker product. A (n + 1, a1, a2) with the scales folded in, B (n + 1, p, q).

    Per token, with x viewed (a2, q): the update is A Z, Z = X B^T. Z is one batched
    product over the rows (each row's tokens against its B); A's product is the one the
    unrouted form runs per token, here with each token's row's A, the per-row A expanded
    over the row's tokens (batched products take one batch stride, not two).
    """
    (_, a1, a2), (p, q) = A.shape, B.shape[1:]
    batch, out = x.shape[0], y.shape[-1]
    slots = row_slots(row_adapter, A.shape[0] - 1)
    tokens = x.numel() // (batch * a2 * q)
    Z = torch.bmm(x.reshape(batch, tokens * a2, q), B.index_select(0, slots).transpose(1, 2))
    Ae = A.index_select(0, slots)[:, None].expand(batch, tokens, a1, a2).reshape(batch * tokens, a1, a2)
    Z = Z.view(batch * tokens, a2, p)
    if _in_place_ok(y, x, A, B):
        _accumulate(y.view(batch * tokens, a1, p), Ae, Z, True)
        return y
    return _accumulate(y.reshape(batch * tokens, a1, p), Ae, Z, False).view(*y.shape[:-1], out)
