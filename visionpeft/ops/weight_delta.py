"""F.linear(x, W + scale * dW(theta), b) for methods whose update is built in weight space.

Applying dW as a second linear costs two extra full-size GEMMs in backward and keeps dW
(out x in) alive for it. This Function folds dW into the host weight for a single GEMM,
saves only x (and the parameters), and in backward rebuilds dW from theta, so memory
stays at LoRA's level and the GEMM count at host + one (the weight gradient):
forward x W'^T; backward g W' and g^T x, then g^T x pushed through dW(theta).

A method describes its dW with a ``WeightDelta``: ``build`` for the forward, and
``rebuild`` + ``param_grads`` for the backward, so a method with a hand-written gradient
(SNELL) can keep what its gradient needs from the rebuild and skip autograd. The dW that
``build``/``rebuild`` return belongs to the caller, which turns it into W' in place: on
CPU every fresh (out x in) tensor costs page faults, a sizeable part of these layers' time.
A method that fuses the whole step (SNELL's compiled kernels) overrides the two steps the
Function runs, ``effective_weight`` and ``backward``, instead.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class WeightDelta:
    """dW(theta) through autograd; subclass and override the three methods to hand-write
    the gradient."""

    def __init__(self, build: Callable[[], torch.Tensor], params: list[torch.Tensor]):
        self._build, self.params = build, list(params)

    def build(self) -> torch.Tensor:
        """dW for the forward (no gradient needed), a tensor the caller may overwrite."""
        with torch.no_grad():
            return self._build().clone()

    def rebuild(self) -> tuple[torch.Tensor, Any]:
        """dW again in backward, and the state ``param_grads`` needs."""
        with torch.enable_grad():
            dW = self._build()
        return dW.detach().clone(), dW

    def param_grads(self, state: Any, grad_dW: torch.Tensor) -> tuple:
        """Gradients of ``params`` given dL/d(dW); may overwrite ``grad_dW``."""
        return torch.autograd.grad(state, self.params, grad_dW.to(state.dtype), allow_unused=True)

    # The two steps the Function runs. A method that fuses building W' with its
    # gradient (SNELL's compiled kernels) overrides them; the rest use build/rebuild.
    def effective_weight(self, W: torch.Tensor, scale: float) -> torch.Tensor:
        """W' = W + scale * dW for the forward."""
        return _effective_weight(self.build(), W, scale)

    def backward(self, g: torch.Tensor, x2: torch.Tensor, W: torch.Tensor, scale: float,
                 need_x: bool, need_W: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple]:
        """(dL/dx, dL/dW (a trainable host weight), gradients of ``params``). W' is
        rebuilt and freed before g^T x is formed: one of the two (out, in) products alive."""
        dW, state = self.rebuild()
        grad_x = g @ _effective_weight(dW, W, scale) if need_x else None
        del dW
        grad_w_eff = g.t() @ x2
        grad_W = grad_w_eff.clone() if need_W else None
        return grad_x, grad_W, self.param_grads(state, grad_w_eff.mul_(scale))


def host_linear(x2: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x2 W^T + b for 2-D x2 as one GEMM into a fresh tensor the caller may accumulate into
    (F.linear may return a view or fuse differently)."""
    return torch.addmm(b, x2, W.t()) if b is not None else x2 @ W.t()


# Without autograd, x (W + dW)^T beats x W^T + (factored update) once a layer sees this
# many tokens: building W + dW costs about one pass over (out x in), 0.15-0.25 ms at ViT-S
# width on 2 CPU threads, about a 200-token GEMM's extra for a rank-32 factored update,
# while the factored form's cost grows with the tokens (scripts/bench_routing.py).
MERGE_AT_TOKENS = 1024


def merge_pays(n_tokens: int, W: torch.Tensor) -> bool:
    """Whether a no-grad forward of ``n_tokens`` rows should fold its update into a
    temporary copy of W. Only in float32 / float64: in half precision W + dW would round
    the update to W's precision, which the factored form does not."""
    return n_tokens >= MERGE_AT_TOKENS and W.dtype in (torch.float32, torch.float64)


def _effective_weight(dW: torch.Tensor, W: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * dW, written over dW when the dtypes allow."""
    if dW.dtype != W.dtype:
        return torch.add(W, dW.to(W.dtype), alpha=scale)
    return dW.mul_(scale).add_(W)


class _WeightDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, W, b, scale, delta, *params):
        with torch.no_grad():
            w_eff = delta.effective_weight(W, scale)
        ctx.delta, ctx.scale = delta, scale
        ctx.save_for_backward(x2, W)
        # dW is rebuilt from the parameters in backward: note their versions, so that one
        # changed in place in between is an error (as autograd's saved tensors give), not a
        # gradient of other values
        ctx.versions = [p._version for p in params]
        return F.linear(x2, w_eff, b)

    @staticmethod
    @once_differentiable  # the parameter gradients are hand-written: no double backward
    def backward(ctx, g):
        changed = [i for i, (p, v) in enumerate(zip(ctx.delta.params, ctx.versions)) if p._version != v]
        if changed:
            raise RuntimeError(f"parameters {changed} of this layer's adapter were modified in place between the "
                               f"forward and the backward (an optimizer step or an edit before backward()); "
                               f"its dW is rebuilt from them, so the gradient would be wrong")
        x2, W = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_W, grads = ctx.delta.backward(g, x2, W, ctx.scale, need_x, need_W)
        return (grad_x, grad_W, g.sum(0) if need_b else None, None, None, *grads)


def linear_with_weight_delta(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                             scale: float, delta: WeightDelta) -> torch.Tensor | None:
    """``F.linear(x, W + scale * dW, b)`` with dW described by ``delta``, rebuilt in
    backward. None under autocast or mixed dtypes (the caller then takes its general path)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != W.dtype:
        return None
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in (x, W, *delta.params))):
        return F.linear(x, delta.effective_weight(W, scale), b)
    x2 = x.reshape(-1, x.shape[-1])
    y = _WeightDeltaLinear.apply(x2, W, b, scale, delta, *delta.params)
    return y.view(*x.shape[:-1], W.shape[0])
