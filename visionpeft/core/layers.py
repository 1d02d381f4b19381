"""Wrapper layers: they hold the host layer and named adapters, and know no method.

Every wrapper of one model shares one `AdapterState` (active names, scales, disabled,
routing), so switching adapters changes one object, whatever the number of adapters or
layers. A wrapper replaces the host layer in its parent; the host layer itself is kept
untouched as ``base_layer`` (wrap, don't patch), and `remove` puts it back.
"""
from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import AdapterModule, HostSpec, HostWrapper


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half precision widened to fp32 for merging; fp32 and float64 kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class AdapterState:
    """Model-wide adapter settings read by every wrapper at forward time."""

    configs: dict = field(default_factory=dict)  # name -> MethodConfig
    active: tuple[str, ...] = ()
    scales: dict[str, float] = field(default_factory=dict)
    disabled: bool = False
    # per batch row, the adapters it runs (a tuple, () for the base model); None: not routed
    routing: tuple[tuple[str, ...], ...] | None = None
    merged: tuple[str, ...] = ()
    frozen_flags: dict[str, bool] = field(default_factory=dict)  # param -> requires_grad before inject
    # the patch grid recorder block adapters with ``needs_token_grid`` read (core.tokens)
    token_grid: object = field(default=None, repr=False, compare=False)
    # `routed_names` and `routing_slots` of the last routing seen, keyed on that tuple
    # object (it is immutable)
    _uniform: tuple = field(default=(None, None), repr=False, compare=False)
    _slots: tuple = field(default=(None, None), repr=False, compare=False)

    def routed_names(self) -> tuple[str, ...] | None:
        """Under routing, the adapters that every row uses when the rows agree (their
        tuple, () when no row names one); None when rows differ. Agreeing rows then take
        the unrouted path, with nothing gathered."""
        rows = self.routing
        key, names = self._uniform
        if key is not rows:
            first = rows[0] if rows else ()
            names = first if all(r == first for r in rows) else None
            self._uniform = (rows, names)
        return names

    def routing_slots(self) -> list[tuple[str | None, ...]]:
        """The routing as layers of one adapter (or None) per row, whose updates add up to
        every row's set: adapters that more rows share come first, so that a style adapter
        on every row fills one slot alone (a uniform slot: the unrouted path) and the
        per-row concepts the next. Weight-space updates add, so the order changes nothing
        but rounding."""
        rows = self.routing
        key, slots = self._slots
        if key is not rows:
            count: dict[str, int] = {}
            for row in rows:
                for n in row:
                    count[n] = count.get(n, 0) + 1
            rank = {n: i for i, n in enumerate(sorted(count, key=lambda n: -count[n]))}  # stable
            ordered = [sorted(row, key=rank.__getitem__) for row in rows]
            depth = max((len(r) for r in ordered), default=0)
            slots = [tuple(r[j] if j < len(r) else None for r in ordered) for j in range(depth)]
            self._slots = (rows, slots)
        return slots


def _rows(part: str, out_features: int) -> tuple[int, int] | None:
    """Row range of a slice in a fused (3 * d, in) weight; None for the whole weight."""
    if part in ("full", "in_proj"):
        return None
    d = out_features // 3
    i = "qkv".index(part)
    return i * d, (i + 1) * d


def host_spec(base_layer: nn.Module, part: str) -> HostSpec:
    """What the adapter of one part sees of a host layer: its rows of the weight."""
    if isinstance(base_layer, nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise TypeError("MultiheadAttention with kdim/vdim != embed_dim keeps separate "
                            "q/k/v weights; only the packed in_proj layout can be adapted")
        e = base_layer.embed_dim
        return HostSpec("linear", 3 * e if part == "in_proj" else e, e)
    full = HostSpec.from_module(base_layer)
    rows = _rows(part, full.out_features)
    return full if rows is None else HostSpec.from_module(base_layer, rows[1] - rows[0])


def _is_autocast() -> bool:
    return torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")


def _apply_delta(mod: AdapterModule, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """y + scale * delta(x), casting when the adapter is kept in another dtype than the host."""
    dtype = mod.compute_dtype
    if x.dtype == dtype and y.dtype == dtype or _is_autocast():
        return mod.add_delta(x, y, scale)
    d = mod.delta(x.to(dtype))
    return y + (d * scale).to(y.dtype)


class AdaptedLayerBase(HostWrapper, abc.ABC):
    """Common bookkeeping: adapters by name and part, merge state, attribute fallthrough."""

    kind: str = ""
    owned_attr = "adapters"

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # name -> ModuleDict(part -> AdapterModule)
        self.state = state
        self.merged_names: tuple[str, ...] = ()
        self._merge_scales: dict[str, float] = {}  # what unmerge subtracts without a kept copy
        # kept copies of the host weights while merged: unmerge restores them bit for bit
        self._kept: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            # host code reads e.g. `.weight`, `.in_features`, `.batch_first` of its layers
            return getattr(self._modules["base_layer"], name)

    # --- adapters -------------------------------------------------------------
    def host_spec(self, part: str) -> HostSpec:
        return host_spec(self.base_layer, part)

    def add_adapter(self, name: str, parts: dict[str, AdapterModule]) -> None:
        self.adapters[name] = nn.ModuleDict(parts)

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]

    def parts(self, name: str):
        return self.adapters[name].items() if name in self.adapters else ()

    def release(self) -> None:
        """Called when the wrapper is taken out of the model (`remove`)."""

    # --- merge --------------------------------------------------------------
    @abc.abstractmethod
    def _weights(self) -> dict[str, nn.Parameter]:
        """{key: host parameter} that adapters of this layer update."""

    def deltas(self, names, scales, fp32: bool = False) -> dict[str, torch.Tensor]:
        """Sum of scale * dW per host weight, slices placed at their rows.

        Differentiable (the MHA forward uses it); merges call it under no_grad in fp32.
        """
        weights = self._weights()
        out: dict[str, torch.Tensor] = {}
        for name in names:
            for part, mod in self.parts(name):
                key = "out_proj" if part == "out_proj" else "weight"
                d = mod.delta_weight()
                d = (_at_least_fp32(d) if fp32 else d) * scales[name]
                rows = None if key == "out_proj" else _rows(part, weights[key].shape[0])
                if rows is not None:
                    pad = [d.new_zeros(d.shape)] * 3
                    pad["qkv".index(part)] = d
                    d = torch.cat(pad, 0)
                out[key] = out[key] + d if key in out else d
        return out

    @torch.no_grad()
    def merged_weights(self, names, scales) -> dict[str, torch.Tensor]:
        """{key: W + sum of scale * dW} in the host's dtype, written nowhere; refused when a
        value is not finite in that dtype (a float16 host overflows where fp32 would not)."""
        weights = self._weights()
        new = {}
        for key, total in self.deltas(names, scales, fp32=True).items():
            w = weights[key]
            merged = (_at_least_fp32(w) + total.to(w.device)).to(w.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError(f"merging {names} gives non-finite weights in {w.dtype}; nothing was merged")
            new[key] = merged
        return new

    @torch.no_grad()
    def merge(self, names, scales, keep_original: bool = True) -> None:
        if self.merged_names:
            raise RuntimeError("layer is already merged; unmerge first")
        weights = self._weights()
        new = self.merged_weights(names, scales)
        for key, value in new.items():
            w = weights[key]
            if keep_original:
                self._kept[key] = w.data
            w.data = value
        self.merged_names = tuple(n for n in names if n in self.adapters)
        self._merge_scales = {n: scales[n] for n in self.merged_names}

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_names:
            return
        weights = self._weights()
        if self._kept:
            for key, original in self._kept.items():
                weights[key].data = original
        else:  # merged without a kept copy: subtract in fp32 or wider (not bit-exact in half precision)
            for key, total in self.deltas(self.merged_names, self._merge_scales, fp32=True).items():
                w = weights[key]
                w.data = (_at_least_fp32(w) - total.to(w.device)).to(w.dtype)
        self._kept = {}
        self.merged_names = ()

    def _apply(self, fn, recurse=True):
        # kept copies follow .to()/.half() of the model like the weights they stand for
        out = super()._apply(fn, recurse)
        self._kept = {k: fn(v) for k, v in self._kept.items()}
        return out


class AdaptedLayer(AdaptedLayerBase):
    """nn.Linear or nn.Conv2d with adapters; q/k/v slices for a fused Linear."""

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__(base_layer, state)
        self.kind = "linear" if isinstance(base_layer, nn.Linear) else "conv2d"
        self._slices: dict[str, tuple[int, int] | None] = {}

    def _weights(self):
        return {"weight": self.base_layer.weight}

    def _plain_linear(self) -> bool:
        """The host is an nn.Linear running nn.Linear's own forward, with no hooks: then a
        method may compute host op and delta together (`AdapterModule.fused_linear`)."""
        b = self.base_layer
        return (type(b).forward is nn.Linear.forward and not b._forward_hooks
                and not b._forward_pre_hooks)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        live = not st.disabled and not self.merged_names
        active = st.active if st.routing is None or not live else self._agreeing_rows(st, x)
        if live and active is not None and len(active) == 1 and self.kind == "linear":
            parts = self.adapters[active[0]] if active[0] in self.adapters else None
            if parts is not None and len(parts) == 1 and "full" in parts and self._plain_linear():
                y = parts["full"].fused_linear(x, self.base_layer.weight, self.base_layer.bias,
                                               st.scales[active[0]])
                if y is not None:
                    return y
        y = self.base_layer(x, *args, **kwargs)
        if not live:
            return y
        if self.base_layer._forward_hooks:
            y = y.clone()  # a hook may hold y; adapters add into theirs in place
        if active is None:
            return self._routed(x, y, st)
        for name in active:
            if name not in self.adapters:
                continue
            scale = st.scales[name]
            for part, mod in self.adapters[name].items():
                y = self._add(mod, part, x, y, scale)
        return y

    def _add(self, mod, part, x, y, scale):
        rows = self._slices[part]
        if rows is None:
            return _apply_delta(mod, x, y, scale)
        s, e = rows
        y[..., s:e] = _apply_delta(mod, x, y[..., s:e], scale)
        return y

    @staticmethod
    def _agreeing_rows(st, x):
        _check_batch(st, x.shape[0], "this layer's input has batch size {} on dim 0")
        return st.routed_names()

    def _route_plan(self, routing, device):
        """[(part, method class, adapter names, their modules, row -> index into names
        or -1, the modules' dtype or None if they differ, a store the method may keep its
        stacked factors in)] for one slot of the routing (one adapter or None per row)
        whose rows differ: one entry per host part and method, so that each method batches
        all its adapters of a part at once. Kept until the routing, the adapters, or their
        device or dtype (`.to()`) change."""
        cached = self.__dict__.get("_plan")
        if cached is None or cached[0] != self.state.routing or cached[1] != device:
            cached = self.__dict__["_plan"] = (self.state.routing, device, {})
        if routing in cached[2]:
            return cached[2][routing]
        names = [n for n in dict.fromkeys(routing) if n is not None and n in self.adapters]
        groups: dict = {}
        for name in names:
            for part, mod in self.adapters[name].items():
                groups.setdefault((part, type(mod)), []).append(name)
        plan = []
        for (part, cls), members in groups.items():
            where = {n: i for i, n in enumerate(members)}
            rows = torch.tensor([where.get(r, -1) for r in routing], dtype=torch.long, device=device)
            mods = [self.adapters[n][part] for n in members]
            dtypes = {m.compute_dtype for m in mods}
            plan.append((part, cls, members, mods, rows, dtypes.pop() if len(dtypes) == 1 else None, {}))
        cached[2][routing] = plan
        return plan

    def _routed(self, x, y, st):
        for slot in st.routing_slots():
            first = slot[0]
            if all(r == first for r in slot):  # one adapter on every row: the unrouted add
                if first is not None and first in self.adapters:
                    for part, mod in self.adapters[first].items():
                        y = self._add(mod, part, x, y, st.scales[first])
                continue
            y = self._routed_slot(x, y, st, slot)
        return y

    def _routed_slot(self, x, y, st, slot):
        # methods batch their rows in the host's dtype; mixed dtypes and autocast take
        # the per-adapter path, which casts as the unrouted forward does
        same_dtype = x.dtype == y.dtype and not _is_autocast()
        for part, cls, names, mods, rows, dtype, store in self._route_plan(slot, x.device):
            scales = [st.scales[n] for n in names]
            span = self._slices[part]
            target = y if span is None else y[..., span[0]:span[1]]
            out = NotImplemented
            # only a hook the class defines itself: a subclass may change delta() (a
            # DoRA-like LoRA) and would silently get its parent's batched form
            if same_dtype and dtype == x.dtype and "routed_add" in vars(cls):
                out = cls.routed_add(mods, scales, x, target, rows, store)
            if out is NotImplemented or out is None:
                for name, mod, scale in zip(names, mods, scales):
                    idx = torch.tensor([i for i, r in enumerate(slot) if r == name], device=x.device)
                    yi = self._add(mod, part, x.index_select(0, idx), y.index_select(0, idx), scale)
                    # y is ours (the host's fresh output): written in place unless autograd tracks it
                    y = y.index_copy(0, idx, yi) if y.requires_grad else y.index_copy_(0, idx, yi)
            elif span is None:
                y = out
            elif out is not target:
                y[..., span[0]:span[1]] = out
        return y

    def add_adapter(self, name, parts):
        self.__dict__.pop("_plan", None)
        super().add_adapter(name, parts)
        out = self.base_layer.weight.shape[0]
        for part in parts:
            self._slices[part] = _rows(part, out)

    def remove_adapter(self, name):
        self.__dict__.pop("_plan", None)
        super().remove_adapter(name)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_plan", None)  # the plan holds row indices on a device and the adapters' dtype
        return super()._apply(fn, recurse)


def _check_batch(st, n: int, what: str) -> None:
    if n != len(st.routing):
        raise ValueError(f"routing gives {len(st.routing)} rows but " + what.format(n))


class AdaptedMultiheadAttention(AdaptedLayerBase):
    """nn.MultiheadAttention with adapters on its in_proj (whole or q/k/v) and out_proj.

    MHA's forward reads its weights directly instead of calling submodules, so adapters
    act in weight space here: the forward runs the host's own code (batch_first, masks,
    need_weights all unchanged) with W + dW through ``torch.func.functional_call``.
    dW is (E, E)-sized, small next to attention over a sequence.
    """

    kind = "mha"

    def _weights(self):
        return {"weight": self.base_layer.in_proj_weight,
                "out_proj": self.base_layer.out_proj.weight}

    def forward(self, *args, **kwargs):
        st = self.state
        if st.disabled or self.merged_names:
            return self.base_layer(*args, **kwargs)
        active = st.active
        if st.routing is not None:
            active = self._agreeing_rows(st, args, kwargs)
            if active is None:
                if not any(n in self.adapters for row in st.routing for n in row):
                    return self.base_layer(*args, **kwargs)  # no routed adapter here: one pass
                return self._routed(st, args, kwargs)
        return self._run([n for n in active if n in self.adapters], st, args, kwargs)

    def _agreeing_rows(self, st, args, kwargs):
        base = self.base_layer
        query = args[0] if args else kwargs.get("query")
        if not isinstance(query, torch.Tensor) or query.dim() != 3:
            raise ValueError("routing needs batched attention inputs (3-D query)")
        _check_batch(st, query.shape[0 if base.batch_first else 1], "this attention's input has batch size {}")
        return st.routed_names()

    def _run(self, names, st, args, kwargs):
        if not names:
            return self.base_layer(*args, **kwargs)
        if any(getattr(mod, "dropout", 0) and mod.training for n in names for _, mod in self.parts(n)):
            # dropout on an adapter's input has no weight-space form: run it input-side
            return self._run_input_side(names, st, args, kwargs)
        params = {}
        base = self.base_layer
        for key, total in self.deltas(names, st.scales).items():
            pname = "in_proj_weight" if key == "weight" else "out_proj.weight"
            w = base.in_proj_weight if key == "weight" else base.out_proj.weight
            params[pname] = w + total.to(w.dtype)
        return torch.func.functional_call(base, params, args, kwargs)

    def _run_input_side(self, names, st, args, kwargs):
        """MHA's forward with each adapter applied to its own (dropped-out) input, as a
        Linear adapter is: q = x W_q^T + b_q + s * delta_q(drop(x)), likewise k and v (one
        dropout mask per slice, as CLIP-LoRA's per-projection LoRA layers draw them) and
        out_proj; then scaled dot-product attention with the host's masks and dropout.
        Only while training with adapter dropout; otherwise the weight-space path runs."""
        import math

        import torch.nn.functional as F

        base = self.base_layer
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise ValueError("adapter dropout on a MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn "
                             "is not supported; set the adapter's dropout to 0")
        a = inspect.signature(base.forward).bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        unbatched = a["query"].dim() == 2
        xs = [a[k].unsqueeze(1 if not base.batch_first else 0) if unbatched else a[k]
              for k in ("query", "key", "value")]
        if not base.batch_first:
            xs = [x.transpose(0, 1) for x in xs]  # (N, L, E) below
        e, h = base.embed_dim, base.num_heads
        w, b = base.in_proj_weight, base.in_proj_bias
        proj = [F.linear(x, w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
                for i, x in enumerate(xs)]
        out_mods = []
        for name in names:
            scale = st.scales[name]
            for part, mod in self.parts(name):
                if part == "out_proj":
                    out_mods.append((mod, scale))
                elif part in ("q", "k", "v"):
                    i = "qkv".index(part)
                    proj[i] = _apply_delta(mod, xs[i], proj[i], scale)
                elif xs[0] is xs[1] is xs[2]:  # the whole in_proj on one input: one mask, as a Linear
                    d = _apply_delta(mod, xs[0], proj[0].new_zeros(*proj[0].shape[:-1], 3 * e), scale)
                    proj = [p + d[..., i * e:(i + 1) * e] for i, p in enumerate(proj)]
                else:
                    proj = [p + _apply_delta(mod, x, p.new_zeros(*p.shape[:-1], 3 * e), scale)[..., i * e:(i + 1) * e]
                            for i, (p, x) in enumerate(zip(proj, xs))]
        n, length, src = proj[0].shape[0], proj[0].shape[1], proj[1].shape[1]
        q, k, v = (p.reshape(n, -1, h, e // h).transpose(1, 2) for p in proj)
        mask = None
        if a["attn_mask"] is not None:
            m = a["attn_mask"]
            m = q.new_zeros(m.shape).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(q.dtype)
            mask = m.view(1, 1, length, src) if m.dim() == 2 else m.view(n, h, length, src)
        if a["key_padding_mask"] is not None:
            m = a["key_padding_mask"]
            m = q.new_zeros(m.shape).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(q.dtype)
            m = m.view(n, 1, 1, src)
            mask = m if mask is None else mask + m
        causal = bool(a.get("is_causal")) and mask is None
        p_drop = base.dropout if self.training else 0.0
        weights = None
        if a["need_weights"]:
            scores = q @ k.transpose(-2, -1) / math.sqrt(e // h)
            if mask is not None:
                scores = scores + mask
            if causal:
                scores = scores.masked_fill(torch.ones(length, src, dtype=torch.bool, device=q.device).triu(1),
                                            float("-inf"))
            weights = F.dropout(scores.softmax(-1), p_drop, True) if p_drop else scores.softmax(-1)
            o = weights @ v
            weights = weights.mean(1) if a["average_attn_weights"] else weights
            if unbatched:
                weights = weights.squeeze(0)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, is_causal=causal)
        o = o.transpose(1, 2).reshape(n, length, e)
        out = F.linear(o, base.out_proj.weight, base.out_proj.bias)
        for mod, scale in out_mods:
            out = _apply_delta(mod, o, out, scale)
        if not base.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not base.batch_first else 0)
        return out, weights

    def _routed(self, st, args, kwargs):
        """Attention mixes tokens, not rows: each adapter's rows run as one sub-batch with
        that adapter's weights, and the outputs are put back in row order."""
        base = self.base_layer
        bdim = 0 if base.batch_first else 1
        # every argument by name (masks may come by position), so each can be sliced
        call = dict(inspect.signature(base.forward).bind(*args, **kwargs).arguments)
        if call["query"].dim() != 3:
            raise ValueError("routing needs batched attention inputs (3-D query)")
        n = call["query"].shape[bdim]
        if n != len(st.routing):
            raise ValueError(f"routing gives {len(st.routing)} rows but this attention's input "
                             f"has batch size {n}")
        heads = base.num_heads

        def rows_of(name_, value, idx):
            if name_ in ("query", "key", "value"):
                return value.index_select(bdim, idx)
            if name_ == "key_padding_mask" and value is not None:
                return value.index_select(0, idx)
            if name_ == "attn_mask" and value is not None and value.dim() == 3:
                per_row = value.view(n, heads, *value.shape[1:]).index_select(0, idx)
                return per_row.reshape(-1, *value.shape[1:])
            return value

        out, weights = None, None
        for row_set in dict.fromkeys(st.routing):  # each distinct set of adapters, one sub-batch
            idx = torch.tensor([i for i, r in enumerate(st.routing) if r == row_set],
                               device=call["query"].device)
            sub = {k: rows_of(k, v, idx) for k, v in call.items()}
            o, w = self._run([n for n in row_set if n in self.adapters], st, (), sub)
            if out is None:
                out = o.new_zeros(*o.shape[:bdim], n, *o.shape[bdim + 1:])
                weights = None if w is None else w.new_zeros(n, *w.shape[1:])
            out = out.index_copy(bdim, idx, o)
            if w is not None:
                weights = weights.index_copy(0, idx, w)
        return out, weights


class TrainedCopy(HostWrapper):
    """A module trained in full for an adapter (`modules_to_save`): the base stays frozen
    and untouched; each adapter owns a copy; the active adapter's copy runs."""

    owned_attr = "copies"

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()
        self.state = state

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "copies"):
                raise
            return getattr(self._modules["base_layer"], name)

    def current(self) -> nn.Module:
        st = self.state
        if st.disabled:
            return self.base_layer
        active = st.active
        if st.routing is not None:
            active = st.routed_names()
            if active is None:  # rows differ: one module cannot run two copies in one forward
                routed = sorted({n for row in st.routing for n in row if n in self.copies})
                if routed:
                    raise RuntimeError(f"adapters {routed} train their own copy of this module (modules_to_save); "
                                       "rows routed to different adapters cannot share its forward: run them "
                                       "one adapter at a time")
                active = ()
        names = [n for n in active if n in self.copies]
        if len(names) > 1:
            raise RuntimeError(f"adapters {names} each train their own copy of this module; "
                               "activate only one of them")
        return self.copies[names[0]] if names else self.base_layer

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


def _hidden_in(args, kwargs) -> tuple[torch.Tensor, str | int]:
    """The tensor a block transforms: its first positional argument, or a keyword named
    like a hidden state. -> (tensor, where it was: index or keyword)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    for key in ("hidden_states", "x", "input", "inputs", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key], key
    raise TypeError("a block adapter needs the block's hidden states as its first argument "
                    "or as a keyword 'hidden_states' / 'x'")


def _with_hidden_in(args, kwargs, where, value):
    if where == 0:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, where: value}


def _hidden_out(out):
    """Blocks return a tensor, or a tuple/list whose first item is the hidden states
    (transformers layers)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"a block adapter needs the block to return a tensor or a tuple starting "
                    f"with one; it returned {type(out).__name__}")


def _with_hidden_out(out, value):
    if isinstance(out, torch.Tensor):
        return value
    return type(out)((value, *out[1:]))


class AdaptedBlock(AdaptedLayerBase):
    """Any module (a transformer block, an MLP, a Linear) with activation-space adapters
    around it. Each adapter module declares where it acts (``placement``):

      "input"     x <- x + s * delta(x) before the block (sequential, PeftCD's place)
      "output"    y <- y + s * delta(y) after the block (sequential, Houlsby/Pfeiffer)
      "parallel"  y <- y + s * delta(x) beside the block (AdaptFormer)
      "around"    y <- run_block(block, s, x, ...): the adapter runs the block itself through
                  the block's own submodules (methods that act inside it: deep prompts,
                  adapters on one branch); one such adapter at a time, not under vp.routing;
                  calling ``wrapper.base_layer`` directly skips it (the hooks below do not)

    and ``delta(h)`` on the hidden states; the wrapper knows no method. Block adapters
    have no weight-space form: no merge, no dW.

    The adapters act through a forward pre-hook and a forward hook on the host block,
    registered first (``prepend``) and removed with the wrapper: hooks that libraries
    put on the block (transformers records ``output_hidden_states`` that way, timm
    feature hooks too) then see the adapted hidden states, not the bare block's. The
    one place where we add to a host module (its hook tables; never its forward or its
    attributes): so calling ``wrapper.base_layer`` directly runs the adapters too, and
    `remove` (or `release`) takes the hooks off.
    """

    kind = "block"

    def __init__(self, base_layer: nn.Module, state: AdapterState):
        super().__init__(base_layer, state)
        self.spec = HostSpec.for_block(base_layer)
        base_layer.register_forward_pre_hook(self._before, prepend=True, with_kwargs=True)
        base_layer.register_forward_hook(self._after, prepend=True, with_kwargs=True)

    def release(self) -> None:
        """Take this wrapper's hooks off the host block. Found by owner rather than by
        handle: a deep copy of the model rebinds the hooks to the copied wrapper, while
        handles would still point into the original block's hook tables."""
        base = self.base_layer
        for table in (base._forward_pre_hooks, base._forward_hooks):
            for key in [k for k, hook in table.items() if getattr(hook, "__self__", None) is self]:
                del table[key]
                base._forward_hooks_with_kwargs.pop(key, None)
                base._forward_pre_hooks_with_kwargs.pop(key, None)

    def host_spec(self, part: str) -> HostSpec:
        return self.spec

    def _weights(self):
        return {}

    def deltas(self, names, scales, fp32: bool = False):
        if any(name in self.adapters for name in names):
            raise TypeError(f"adapters {[n for n in names if n in self.adapters]} act on "
                            "activations around a block and have no weight-space form")
        return {}

    def merge(self, names, scales, keep_original: bool = True) -> None:
        self.deltas(names, scales)

    def forward(self, *args, **kwargs):
        around = self._groups("around")
        if not around:
            return self.base_layer(*args, **kwargs)
        if len(around) > 1 or around[0][2] is not None:
            raise ValueError(f"{len(around)} adapters here run the block themselves ("
                             f"{', '.join(type(m).__name__ for _, m, _ in around)}): only one such adapter "
                             "can be active on a block, and not under vp.routing; set_active one of them")
        # the block's own forward (and so its hooks) does not run: apply the other
        # adapters' input and output placements here
        scale, mod, _ = around[0]
        changed = self._before(self.base_layer, args, kwargs)
        if changed is not None:
            args, kwargs = changed
        out = mod.run_block(self.base_layer, scale, *args, **kwargs)
        adapted = self._after(self.base_layer, args, kwargs, out)
        return out if adapted is None else adapted

    # --- the hooks ----------------------------------------------------------------
    def _groups(self, placement):
        """[(scale, module, row index or None)] of the adapters acting at ``placement``."""
        st = self.state
        if st.disabled:
            return []
        active = st.active if st.routing is None else st.routed_names()
        if active is not None:
            return [(st.scales[n], m, None) for n in active if n in self.adapters
                    for m in self.adapters[n].values() if m.placement == placement]
        out = []
        # block adapters act in sequence, so the order of a row's adapters matters: each
        # distinct set runs on its rows in its own order, as `set_active` would
        for row_set in dict.fromkeys(st.routing):
            idx = [i for i, r in enumerate(st.routing) if r == row_set]
            out += [(st.scales[n], m, idx) for n in row_set if n in self.adapters
                    for m in self.adapters[n].values() if m.placement == placement]
        return out

    def _check_rows(self, h):
        if self.state.routing is not None and h.shape[0] != len(self.state.routing):
            raise ValueError(f"routing gives {len(self.state.routing)} rows but this block's "
                             f"hidden states have batch size {h.shape[0]} on dim 0")

    @staticmethod
    def _add(target, source, scale, mod, idx, parallel=False):
        """target + scale * delta(source), on rows ``idx`` only when routed."""
        run = (lambda a, b: _parallel(mod, a, b)) if parallel else (lambda a, b: _run(mod, a))
        if idx is None:
            return target + scale * run(source, target)
        idx = torch.tensor(idx, device=target.device)
        rows = target.index_select(0, idx)
        return target.index_copy(0, idx, rows + scale * run(source.index_select(0, idx), rows))

    def _before(self, module, args, kwargs):
        groups = self._groups("input")
        if not groups:
            return None
        x, where = _hidden_in(args, kwargs)
        self._check_rows(x)
        for scale, mod, idx in groups:
            x = self._add(x, x, scale, mod, idx)
        return _with_hidden_in(args, kwargs, where, x)

    def _after(self, module, args, kwargs, out):
        parallel, output = self._groups("parallel"), self._groups("output")
        if not parallel and not output:
            return None
        y = _hidden_out(out)
        self._check_rows(y)
        if parallel:
            x, _ = _hidden_in(args, kwargs)
            for scale, mod, idx in parallel:
                y = self._add(y, x, scale, mod, idx, parallel=True)
        for scale, mod, idx in output:
            y = self._add(y, y, scale, mod, idx)
        return _with_hidden_out(out, y)


def _parallel(mod, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = _run(mod, x)
    if d.shape != y.shape:
        raise ValueError(f"a parallel adapter adds delta(input) to the output, but this block "
                         f"maps {tuple(x.shape)} to {tuple(y.shape)} (it pools or reshapes); "
                         "use placement='sequential' here, or exclude this block")
    return d


def _run(mod, h: torch.Tensor) -> torch.Tensor:
    """mod.delta(h) in the adapter's dtype, returned in h's dtype (adapters may stay fp32
    on a half-precision host)."""
    dtype = mod.compute_dtype
    if h.dtype == dtype or _is_autocast():
        return mod.delta(h)
    return mod.delta(h.to(dtype)).to(h.dtype)
