"""F.linear(x, W + scale * dW(theta), b) for methods whose update is built in weight space.

Applying dW as a second linear costs two extra full-size GEMMs in backward and keeps dW
(out x in) alive for it. This Function folds dW into the host weight for a single GEMM,
saves only x (and the parameters), and in backward rebuilds dW from theta, so memory
stays at LoRA's level and the GEMM count at host + one (the weight gradient):
forward x W'^T; backward g W' and g^T x, then g^T x pushed through dW(theta).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


class _WeightDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, W, b, scale, build, *params):
        with torch.no_grad():
            w_eff = W + build().to(W.dtype) * scale
        ctx.build, ctx.scale, ctx.has_bias = build, scale, b is not None
        ctx.save_for_backward(x2, W, *params)
        return F.linear(x2, w_eff, b)

    @staticmethod
    def backward(ctx, g):
        x2, W, *params = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        with torch.enable_grad():
            dW = ctx.build()
        grad_w_eff = g.t() @ x2
        grad_x = None
        if need_x:
            grad_x = g @ (W + dW.detach().to(W.dtype) * ctx.scale)
        grads = torch.autograd.grad(dW, params, (grad_w_eff * ctx.scale).to(dW.dtype),
                                    allow_unused=True)
        return (grad_x, grad_w_eff if need_W else None, g.sum(0) if need_b else None,
                None, None, *grads)


def linear_with_weight_delta(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                             scale: float, build: Callable[[], torch.Tensor],
                             params: list[torch.Tensor]) -> torch.Tensor | None:
    """``F.linear(x, W + scale * build(), b)``; ``build`` makes dW (W's shape) from
    ``params`` and is called again in backward. None under autocast or mixed dtypes (the
    caller then takes its general path)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype != W.dtype:
        return None
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in (x, W, *params))):
        return F.linear(x, W + build().to(W.dtype) * scale, b)
    x2 = x.reshape(-1, x.shape[-1])
    y = _WeightDeltaLinear.apply(x2, W, b, scale, build, *params)
    return y.view(*x.shape[:-1], W.shape[0])
