"""DiffuseKronA (Marjit et al., 2024, arXiv 2402.17412): dW = alpha * kron(A, B).

A (a1, a2), B (out/a1, in/a2): a1 splits the output, a2 the input. A starts random and B
at zero, so dW = 0 at init. The layout is LyCORIS LoKr's (w1 = A, w2 = B), which keeps
kohya / ComfyUI export a renaming. For a Conv2d, B carries the kernel dims, as in LoKr:
B (out/a1, in/a2, kh, kw) and dW = kron(A[..., None, None], B).

The forward never builds dW: with x viewed as (..., a2, in/a2),
x @ kron(A, B)^T = A @ (X @ B^T) flattened, which costs N * (in * out / a1 + a1 * out)
multiply-adds instead of N * in * out. On a Linear the product is accumulated into the
host's fresh output and differentiated by hand (`_KronALinear`): of the activations only x
is saved, so memory stays at LoRA's level, and at ViT-B batch 32 the step fell from 1.50x
to 1.01x-1.17x of LoRA's (autograd had saved X B^T and formed its gradients through
copies of (N, out) tensors; docs/BENCHMARKS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import AdapterModule, HostSpec
from ..core.config import MethodConfig, ConfigError
from ..core.registry import register_method
from ..ops.factorize import divisors, sqrt_factor
from ..ops.routed import cached_stacks, routed_kron_add, scaled, stack_with_empty
from ..ops.weight_delta import host_linear, merge_pays


# --- pure math ------------------------------------------------------------------------
def krona_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """alpha * kron(A, B); for a conv B is (p, q, kh, kw) and A acts per kernel tap."""
    if B.dim() == 4:
        A = A[:, :, None, None]
    return torch.kron(A, B) * scale


def krona_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """x @ (scale * kron(A, B))^T without building the Kronecker product."""
    a1, a2 = A.shape
    p, q = B.shape
    X = x.reshape(-1, a2, q)
    Y = torch.matmul(A * scale, X @ B.t())  # (N, a1, p)
    return Y.reshape(*x.shape[:-1], a1 * p)


class _KronALinear(torch.autograd.Function):
    """y + scale * x kron(A, B)^T with a hand-written backward, where y is the host
    Linear's output x W^T + b (``W`` given) or a tensor the caller passes (``y2``).

    Per token, with X the input viewed (a2, q): the delta is A X B^T. Z = X B^T is one
    large GEMM over all tokens; A Z is a batch of small products accumulated straight into
    y (baddbmm_), so no (N, out) temporary is made and no pass is spent adding it.
    Autograd through the same two products saves Z and the batched product's operands
    and forms its gradients through transposed copies of (N, out) tensors; here x is the
    only activation saved (with W, A, B), Z is recomputed in backward, and every gradient
    is a large GEMM or a batch of small ones reduced over tokens (s = scale, G = dL/dy
    viewed (a1, p) per token):
      T = s A^T G, grad_X += T B, grad_B = sum_n T_n^T X_n, grad_A = s sum_n G_n Z_n^T.
    """

    @staticmethod
    def forward(ctx, x2, W, b, y2, A, B, scale):
        if W is not None:
            y = host_linear(x2, W, b)
        else:  # out of place, as in LoRA's add: y2 may be a view of the host's output
            y = y2.clone(memory_format=torch.contiguous_format)
        _accumulate_kron(y, x2, A, B, scale)
        ctx.save_for_backward(x2, W, A, B)
        ctx.scale, ctx.fused = scale, W is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, W, A, B = ctx.saved_tensors
        need_x, need_W, need_b, need_y, need_A, need_B = ctx.needs_input_grad[:6]
        (a1, a2), (p, q), n = A.shape, B.shape, x2.shape[0]
        G = g.reshape(n, a1, p)
        X = x2.reshape(n * a2, q)
        T = None
        if need_x or need_B:  # bmm of the expanded factor: 1.2-2.8x faster than matmul's
            # broadcast at ViT-B sizes on CPU (measured, 3152 tokens)
            T = torch.bmm((A.t() * ctx.scale).expand(n, a2, a1), G).view(n * a2, p)
        grad_x = None
        if need_x:
            if ctx.fused:
                grad_x = g @ W
                grad_x.view(n * a2, q).addmm_(T, B)
            else:
                grad_x = (T @ B).view(n, a2 * q)
        grad_W = g.t() @ x2 if ctx.fused and need_W else None
        grad_b = g.sum(0) if ctx.fused and need_b else None
        grad_B = (X.t() @ T).t() if need_B else None
        grad_A = None
        if need_A:
            Z = (X @ B.t()).view(n, a2, p)
            grad_A = torch.bmm(G, Z.transpose(1, 2)).sum(0).mul_(ctx.scale)
        return grad_x, grad_W, grad_b, (g if need_y else None), grad_A, grad_B, None


def _accumulate_kron(y: torch.Tensor, x2: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     scale: float) -> None:
    """y (N, out) += scale * x2 kron(A, B)^T, in place on a contiguous y."""
    (a1, a2), (p, q), n = A.shape, B.shape, x2.shape[0]
    Z = (x2.reshape(n * a2, q) @ B.t()).view(n, a2, p)
    y.view(n, a1, p).baddbmm_((A * scale).expand(n, a1, a2), Z)


def krona_add_linear(x: torch.Tensor, y: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                     scale: float, W: torch.Tensor | None = None,
                     b: torch.Tensor | None = None) -> torch.Tensor | None:
    """``y + scale * x kron(A, B)^T``, or with ``W`` given (y None) the host Linear and the
    delta in one op, ``F.linear(x, W, b) + scale * x kron(A, B)^T``. None where the fast
    form does not apply (autocast, mixed dtypes): the caller then uses `krona_linear`.
    Without autograd a contiguous ``y`` is updated in place and returned (the wrapper
    hands over the host's fresh output, as for `lora_add_linear`)."""
    tensors = [t for t in (x, y, A, B, W, b) if t is not None]
    if torch.is_autocast_enabled(x.device.type) or len({t.dtype for t in tensors}) > 1:
        return None
    out = W.shape[0] if W is not None else y.shape[-1]
    x2 = x.reshape(-1, x.shape[-1])
    y2 = None if y is None else y.reshape(-1, out)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        res = _KronALinear.apply(x2, W, b, y2, A, B, scale)
    elif W is not None and merge_pays(x2.shape[0], W):
        res = host_linear(x2, torch.kron(A, B).mul_(scale).add_(W), b)  # one GEMM (see merge_pays)
    elif W is not None:
        res = host_linear(x2, W, b)
        _accumulate_kron(res, x2, A, B, scale)
    elif y.is_contiguous():
        # in place, and y itself returned: a second view of the same memory with other
        # strides (a one-token column slice) would make the wrapper's write-back overlap
        _accumulate_kron(y.view(-1, out), x2, A, B, scale)
        return y
    else:
        res = y2.contiguous()
        _accumulate_kron(res, x2, A, B, scale)
    return res.view(*x.shape[:-1], out)


def krona_conv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
               host: HostSpec) -> torch.Tensor:
    """conv2d(x, scale * kron(A, B)) as a conv of each input group with B, mixed by A."""
    a1, a2 = A.shape
    p, q = B.shape[:2]
    n, _, h, w = x.shape
    z = F.conv2d(x.reshape(n * a2, q, h, w), B, None, host.stride, host.padding, host.dilation)
    z = z.reshape(n, a2, p, *z.shape[-2:])
    y = torch.einsum("ij,njphw->niphw", A * scale, z)
    return y.reshape(n, a1 * p, *y.shape[-2:])


# --- module -----------------------------------------------------------------------------
def _factor(requested: int | None, size: int, what: str, field: str) -> int:
    if requested is None:
        return sqrt_factor(size)
    if size % requested:
        raise ValueError(f"{field}={requested} does not divide the layer's {what} ({size}); "
                         f"valid {field}: {divisors(size)}")
    return requested


class KronAModule(AdapterModule):
    def __init__(self, config: "KronAConfig", host: HostSpec):
        super().__init__(config, host)
        in_ch = host.in_features // host.groups
        a1 = _factor(config.a1, host.out_features, "output size", "a1")
        a2 = _factor(config.a2, in_ch, "input size" + (" per group" if host.groups > 1 else ""), "a2")
        self.scale = 1.0 if config.alpha is None else float(config.alpha)
        self.A = nn.Parameter(torch.empty(a1, a2))
        b_shape = (host.out_features // a1, in_ch // a2)
        if host.kind == "conv2d":
            b_shape += tuple(host.kernel_size)
        self.B = nn.Parameter(torch.zeros(b_shape))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return krona_delta_weight(self.A, self.B, self.scale)

    def fused_linear(self, x, weight, bias, scale):
        return krona_add_linear(x, None, self.A, self.B, self.scale * scale, weight, bias)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        if self.host.kind == "linear":
            out = krona_add_linear(x, y, self.A, self.B, self.scale * scale)
            if out is not None:
                return out
        return super().add_delta(x, y, scale)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.host.kind == "linear":
            return krona_linear(x, self.A, self.B, self.scale)
        if self.host.groups == 1:
            return krona_conv(x, self.A, self.B, self.scale, self.host)
        return self.host.op(x, self.delta_weight())  # grouped conv: exact via dW

    @classmethod
    def routed_add(cls, modules, scales, x, y, row_adapter, store=None):
        """Every row's KronA as one batched product (`routed_kron_add`), once per split
        (a1, a2) among the adapters: one pass in the usual case of a shared config."""
        if any(m.host.kind != "linear" for m in modules):
            return NotImplemented
        splits: dict[tuple, list[int]] = {}
        for k, m in enumerate(modules):
            splits.setdefault(tuple(m.A.shape), []).append(k)
        for split, members in splits.items():
            rows = row_adapter
            if len(members) < len(modules):
                # this split's index of each adapter, -1 for the others; the extra last
                # entry is what a row without adapter (-1) reads
                local = [-1] * (len(modules) + 1)
                for i, k in enumerate(members):
                    local[k] = i
                rows = torch.tensor(local, device=row_adapter.device)[row_adapter]
            group = [modules[k] for k in members]

            def build(group=group, members=members):
                return (scaled(stack_with_empty([m.A for m in group]),
                               [m.scale * scales[k] for m, k in zip(group, members)]),
                        stack_with_empty([m.B for m in group]))

            A, B = cached_stacks(None if store is None else store.setdefault(split, {}),
                                 [p for m in group for p in (m.A, m.B)],
                                 tuple(scales[k] for k in members), build)
            y = routed_kron_add(x, y, A, B, rows)
        return y

    # --- the "lokr" file layout (LyCORIS LoKr, full factors): dW = kron(w1, w2) ----------
    def export_factors(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        # with both factors stored in full, LyCORIS and ComfyUI apply scale 1 whatever
        # alpha says, so every scale goes into w1
        return {"lokr_w1": self.A.detach().float() * (self.scale * scale),
                "lokr_w2": self.B.detach().float()}

    @torch.no_grad()
    def import_factors(self, factors: dict[str, torch.Tensor]) -> None:
        w1, w2 = factors["lokr_w1"], factors["lokr_w2"]
        if tuple(w1.shape) != tuple(self.A.shape) or tuple(w2.shape) != tuple(self.B.shape):
            raise ValueError(f"LoKr factors {tuple(w1.shape)} x {tuple(w2.shape)} do not match this "
                             f"layer's KronA factors {tuple(self.A.shape)} x {tuple(self.B.shape)}")
        self.A.copy_(w1.float() / self.scale)
        self.B.copy_(w2)


@register_method("krona", KronAModule, layer_kinds=("linear", "conv2d"), factor_layout="lokr",
                 folded_fields=("alpha",))
@dataclass(frozen=True)
class KronAConfig(MethodConfig):
    """a1: output factor (A has a1 rows, B out/a1); a2: input factor (A has a2 columns, B
    in/a2). None picks, per layer, the most balanced divisor (the largest one not above
    the square root of the size). alpha: plain multiplier of kron(A, B) (None = 1).
    Trainable per layer: a1 * a2 + (out/a1) * (in/a2) [* kh * kw]."""

    a1: int | None = None
    a2: int | None = None

    @classmethod
    def from_factors(cls, factors: dict[str, dict], target_modules: list[str]) -> "KronAConfig":
        """alpha 1; the file's (a1, a2) when every layer shares them, or None when each layer
        has its balanced split."""
        shapes = {m: tuple(f["lokr_w1"].shape) for m, f in factors.items()}
        sizes = {m: (f["lokr_w1"].shape[0] * f["lokr_w2"].shape[0], f["lokr_w1"].shape[1] * f["lokr_w2"].shape[1])
                 for m, f in factors.items()}
        if all(s == (sqrt_factor(sizes[m][0]), sqrt_factor(sizes[m][1])) for m, s in shapes.items()):
            return cls(alpha=1.0, target_modules=target_modules)
        if len(set(shapes.values())) == 1:
            a1, a2 = next(iter(shapes.values()))
            return cls(a1=a1, a2=a2, alpha=1.0, target_modules=target_modules)
        raise ConfigError(f"the LoKr factors differ per layer ({sorted(set(shapes.values()))[:6]}) and are "
                          "not each layer's balanced split; one KronA config cannot hold them")

    def validate(self) -> None:
        for name in ("a1", "a2"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"KronAConfig.{name} must be a positive integer or None "
                                  f"(balanced per layer), got {v!r}")
