"""What a method sees of a host layer, and the contract an adapter module keeps.

A host layer is described once (`HostSpec`: kind, weight shape, op and op kwargs);
methods build their factors from it and never ``isinstance``-check host modules.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class HostWrapper(nn.Module):
    """Base of the wrappers visionpeft puts around host modules (core/layers.py): the host
    stays as ``base_layer``, and ``owned()`` holds what we added (adapters, trained
    copies), so code that walks a host can skip our pieces by identity, not by name."""

    owned_attr: str = ""

    def owned(self) -> nn.Module:
        return self._modules[self.owned_attr]


@dataclass(frozen=True)
class HostSpec:
    """The weight an adapter updates: a Linear (out, in) or a Conv2d (out, in/g, kh, kw).

    For a slice of a fused projection (``qkv[q]``, an MHA's in_proj slice) ``out_features``
    is the slice's height: the adapter sees only its rows.
    """

    kind: str  # "linear" | "conv2d" | "block" (any module: features in -> features out)
    out_features: int
    in_features: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """(out, in) for a Linear, the conv kernel's shape for a Conv2d; a block has no
        weight, and reports (out, in) features so that saved files record its size."""
        if self.kind in ("linear", "block"):
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features // self.groups, *self.kernel_size)

    @property
    def fan_in(self) -> int:
        """Columns of the weight viewed as a matrix (in/g * kh * kw for a conv)."""
        return math.prod(self.weight_shape[1:])

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The host's operation with another weight and no bias."""
        if self.kind == "linear":
            return F.linear(x, weight)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    @staticmethod
    def from_module(module: nn.Module, rows: int | None = None) -> "HostSpec":
        if isinstance(module, nn.Linear):
            return HostSpec("linear", rows or module.out_features, module.in_features)
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise TypeError(
                    f"Conv2d with padding_mode={module.padding_mode!r} is not supported; "
                    "only 'zeros' padding can be adapted"
                )
            return HostSpec("conv2d", rows or module.out_channels, module.in_channels,
                            tuple(module.kernel_size), tuple(module.stride), module.padding,
                            tuple(module.dilation), module.groups)
        raise TypeError(f"no host description for {type(module).__name__}")

    @staticmethod
    def for_block(module: nn.Module) -> "HostSpec":
        """A module seen as a block: feature sizes of what goes in and what comes out.

        Read from the module's own layers, in registration order: the input size from the
        first norm / Linear / Conv2d / MultiheadAttention, the output size from the last
        Linear / Conv2d (e.g. a ViT block: norm1 in, mlp.fc2 out; a Hiera block at a
        stage change: dim in, dim_out out). Layers of adapters inside it are skipped.
        Blocks that concatenate extra inputs (diffusers' up-blocks with their skip
        connections) are misread; the adapter then says so at the first forward.
        """
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            spec = HostSpec.from_module(module)
            return HostSpec("block", spec.out_features, spec.in_features)
        ours = set()  # our wrappers' adapters and copies, by identity: a host may name a submodule "adapters"
        for m in module.modules():
            if isinstance(m, HostWrapper):
                ours.update(id(x) for x in m.owned().modules())
        inner = [m for m in module.modules() if id(m) not in ours]
        first = next((_in_size(m) for m in inner if _in_size(m)), None)
        last = next((_out_size(m) for m in reversed(inner) if _out_size(m)), None)
        if last is None:  # norms only (a LayerNorm on its own): width in = width out
            last = next((_in_size(m) for m in reversed(inner) if _in_size(m)), None)
        if first is None or last is None:
            raise TypeError(f"cannot tell the feature sizes of {type(module).__name__}: it holds "
                            "no Linear, Conv2d or norm layer; target the block that contains it")
        return HostSpec("block", last, first)


def _in_size(m: nn.Module) -> int | None:
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.Conv2d):
        return m.in_channels
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim
    if type(m).__name__.endswith(("RMSNorm", "LayerNorm")) and getattr(m, "weight", None) is not None \
            and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 1:
        return m.weight.shape[0]  # RMSNorm and library LayerNorm variants
    return None


def _out_size(m: nn.Module) -> int | None:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    return None


def check_rank(r: int, host: HostSpec, fan_in: int | None = None, note: str = "") -> None:
    """Refuse a rank above what the layer (as an out x fan_in matrix) can hold."""
    fan_in = host.fan_in if fan_in is None else fan_in
    limit = min(host.out_features, fan_in)
    if r > limit:
        raise ValueError(f"rank r={r} is larger than the layer allows (weight "
                         f"{tuple(host.weight_shape)}, as a matrix {host.out_features} x "
                         f"{fan_in}{note}); use r <= {limit}")


class AdapterModule(nn.Module, abc.ABC):
    """Base of every method's per-layer module.

    Subclasses define ``delta_weight()`` (the full update of the host weight, the
    method's own scale included) and may override ``delta(x)`` with a cheaper
    activation-space form and ``add_delta(x, y, scale)`` with a fused one. The defaults
    fall back to the host op applied with ``delta_weight()``, which is exact for any
    layer kind (grouped convs included) but builds dW every call.
    """

    def __init__(self, config, host: HostSpec):
        super().__init__()
        self.config = config
        self.host = host

    @abc.abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """dW with the host weight's shape, the method's own scale included."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.host.op(x, self.delta_weight())

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """``y + scale * delta(x)``; methods fuse this where it saves a pass over y, and may
        write into ``y``: the wrapper passes a tensor it owns."""
        d = self.delta(x)
        return y + d if scale == 1.0 else y + scale * d

    def fused_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     scale: float) -> torch.Tensor | None:
        """Optional: ``F.linear(x, weight, bias) + scale * delta(x)`` as one op, for a plain
        nn.Linear host with this adapter alone active. None means "not offered here" and
        the wrapper runs the host op and `add_delta` instead."""
        return None

    @classmethod
    def routed_add(cls, modules: list["AdapterModule"], scales: list[float], x: torch.Tensor,
                   y: torch.Tensor, row_adapter: torch.Tensor, store: dict | None = None):
        """Optional, for `vp.routing`: ``y`` plus, on every batch row b (dim 0) with
        k = row_adapter[b] >= 0, ``scales[k] * modules[k].delta(x[b])``; rows with -1 get
        nothing. ``modules`` are this class's modules of one host part, one per adapter;
        x, y and the modules share one dtype; row_adapter is a long tensor on x's device;
        y may be a column slice of the host output (a fused qkv part). Like `add_delta`
        it may write into y. ``store``: a dict the caller keeps as long as this routing
        and these adapters (its plan), where the method may keep what it built for them
        (stacked factors in eval); None: keep nothing.

        A method that can run every row's update as one batched product (one adapter's
        cost, whatever the number of adapters) overrides this. NotImplemented (the
        default) or None means "not offered here": the wrapper then runs each adapter on
        its own rows, a sub-batch per adapter."""
        return NotImplemented

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype

    # --- capabilities for files and hot-swap (methods with a registry factor_layout) ---
    def export_factors(self, scale: float = 1.0) -> dict[str, torch.Tensor] | None:
        """This layer's update as the tensors of its method's file layout
        (``MethodSpec.factor_layout``), with the method's scale and ``scale`` (the
        adapter's `vp.set_scale` multiplier) folded in so the layout's own rule gives
        exactly ``scale * delta_weight()``; None where the method has no such form."""
        return None

    def import_factors(self, factors: dict[str, torch.Tensor]) -> None:
        """Write tensors of the method's file layout into this module in place (same
        parameter objects), so that ``delta_weight()`` equals the update they describe."""
        raise TypeError(f"{type(self).__name__} has no file layout to import factors into")

    def extra_repr(self) -> str:
        return f"{self.host.kind} {tuple(self.host.weight_shape)}"


class BlockAdapterModule(nn.Module, abc.ABC):
    """Base of a method whose module acts on a block's hidden states (bottleneck
    adapters, Earth-Adapter): ``delta(h)`` is what the wrapper adds, scaled, at the
    method's ``placement`` ("input", "output" or "parallel"; see `AdaptedBlock`). With
    placement "around" the module instead defines ``run_block(block, scale, *args, **kwargs)``
    and runs the block itself. A module that defines ``bind_model(model, name)`` is handed
    the root model and its adapter's name once attached (to find the parts its adapter's
    modules share, or to run the host)."""

    placement: str = "output"

    def __init__(self, config, host: HostSpec):
        super().__init__()
        self.config = config
        self.host = host

    @abc.abstractmethod
    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """What the adapter adds, before the wrapper's scale."""

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype

    def extra_repr(self) -> str:
        return f"{self.placement}, {self.host.in_features} -> {self.host.out_features}"
