"""Low-rank products shared by the LoRA family (LoRA, WaRA, Block-LoRA): the scale rule,
dW = scale * B A, and fused autograd Functions that add a low-rank update to a Linear's
output in one GEMM. Pure tensor code: a conv's geometry comes in as any object with
``in_features``, ``out_features``, ``kernel_size``, ``stride``, ``padding`` and
``dilation`` (a HostSpec)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .weight_delta import host_linear, merge_pays


def lora_scale(alpha: float | None, r: int, rank_stabilized: bool = False) -> float:
    alpha = float(r) if alpha is None else float(alpha)
    return alpha / (math.sqrt(r) if rank_stabilized else r)


def lora_delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float,
                      weight_shape: tuple[int, ...]) -> torch.Tensor:
    return (B @ A).mul_(scale).reshape(weight_shape)


class _LoRAAddLinear(torch.autograd.Function):
    """y + scale * (x A^T) B^T in one GEMM, with a hand-written backward.

    Autograd's generic linear backward forms grad_B as g^T h and grad_h as g B; with
    r << out those skinny products run 3-5x slower on CPU BLAS than the transposed
    forms used here (B^T g^T)^T and (h^T g)^T (measured in scripts/bench_core.py).
    """

    @staticmethod
    def forward(ctx, x2, y2, A, B, scale):
        # out of place: y is often a view of the host's matmul output, and a custom
        # Function that dirties a view loses track of it in backward
        h = x2 @ A.t()
        ctx.save_for_backward(x2, h, A, B)
        ctx.scale = scale
        return torch.addmm(y2, h, B.t(), alpha=scale)

    @staticmethod
    @once_differentiable  # h = x A^T is saved without its graph: a second derivative would be wrong
    def backward(ctx, g):
        x2, h, A, B = ctx.saved_tensors
        gh = (B.t() @ g.t()).t().mul(ctx.scale)
        grad_x = gh @ A if ctx.needs_input_grad[0] else None
        grad_A = gh.t() @ x2 if ctx.needs_input_grad[2] else None
        grad_B = (h.t() @ g).t().mul(ctx.scale) if ctx.needs_input_grad[3] else None
        return grad_x, g, grad_A, grad_B, None


def _block_sum(x2: torch.Tensor, blocks: int) -> torch.Tensor:
    """(N, in) -> (N, in/blocks): the sum of ``blocks`` consecutive column chunks."""
    # explicit sizes, not -1: an input with zero rows has no size to infer
    return x2 if blocks == 1 else x2.view(x2.shape[0], blocks, x2.shape[1] // blocks).sum(1)


class _LoRALinear(torch.autograd.Function):
    """x W^T + b + scale * (x_s A^T) B^T: the host Linear and LoRA in one Function, where
    x_s is x itself, or with ``blocks`` > 1 the sum of x's column chunks (Block-LoRA,
    whose A0 is shared by every chunk).

    Owning the host op lets the backward accumulate LoRA's input gradient into the host's
    inside one GEMM (``grad_x.addmm_(grad_h, A)``, or a broadcast add over the chunks)
    instead of autograd adding two (N, in) tensors, and lets the forward add into its own
    fresh output. Only x_s is saved. Products use the fast layouts of `_LoRAAddLinear`.
    """

    @staticmethod
    def forward(ctx, x2, W, b, A, B, scale, blocks):
        y = host_linear(x2, W, b)
        xs = _block_sum(x2, blocks)
        h = xs @ A.t()
        y.addmm_(h, B.t(), alpha=scale)
        ctx.save_for_backward(xs, h, W, A, B)
        ctx.scale, ctx.blocks, ctx.x_shape = scale, blocks, x2.shape
        return y

    @staticmethod
    @once_differentiable  # h = x A^T is saved without its graph: a second derivative would be wrong
    def backward(ctx, g):
        xs, h, W, A, B = ctx.saved_tensors
        need_x, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        gh = (B.t() @ g.t()).t().mul(ctx.scale) if (need_x or need_A) else None
        grad_x = None
        if need_x:
            grad_x = g @ W
            if ctx.blocks == 1:
                grad_x.addmm_(gh, A)
            else:
                grad_x.view(g.shape[0], ctx.blocks, grad_x.shape[1] // ctx.blocks).add_((gh @ A).unsqueeze(1))
        grad_W = g.t() @ xs if need_W else None  # blocks == 1 here: see lora_linear
        grad_b = g.sum(0) if need_b else None
        grad_A = gh.t() @ xs if need_A else None
        grad_B = (h.t() @ g).t().mul(ctx.scale) if need_B else None
        return grad_x, grad_W, grad_b, grad_A, grad_B, None, None


def lora_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scale: float, blocks: int = 1) -> torch.Tensor | None:
    """F.linear(x, W, b) + scale * x_s A^T B^T in one autograd node (x_s: x, or the sum of
    its ``blocks`` column chunks); None where the fused form does not apply (mixed dtypes,
    autocast), so the caller takes the general path."""
    if torch.is_autocast_enabled(x.device.type) or not (
            x.dtype == W.dtype == A.dtype == B.dtype and (b is None or b.dtype == x.dtype)):
        return None
    if blocks > 1 and W.requires_grad:
        return None  # a trainable host weight needs all of x saved: the general path has it
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, W, b, A, B)):
        y = _LoRALinear.apply(x2, W, b, A, B, scale, blocks)
    elif merge_pays(x2.shape[0], W):
        # one GEMM through W + scale * B [A ... A] (A repeated over the column blocks)
        y = host_linear(x2, torch.addmm(W, B, A.repeat(1, blocks) if blocks > 1 else A, alpha=scale), b)
    else:
        y = host_linear(x2, W, b)
        y.addmm_(_block_sum(x2, blocks) @ A.t(), B.t(), alpha=scale)
    return y.view(*x.shape[:-1], W.shape[0])


def lora_add_linear(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """y + scale * x A^T B^T with the sum fused into the second GEMM (no pass over y for
    the scale, none for the sum). Without autograd it accumulates into y in place: the
    wrapper hands over a y it owns, the host op's fresh output."""
    same = x.dtype == y.dtype == A.dtype == B.dtype
    if not same or not y.is_contiguous() or torch.is_autocast_enabled(x.device.type):
        d = F.linear(F.linear(x, A), B)
        return y + (d * scale).to(y.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or y.requires_grad):
        y2 = y.view(-1, y.shape[-1])
        return _LoRAAddLinear.apply(x2, y2, A, B, scale).view(y.shape)
    y.view(-1, y.shape[-1]).addmm_(x2 @ A.t(), B.t(), alpha=scale)
    return y


def lora_delta_conv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, host) -> torch.Tensor:
    r = A.shape[0]
    kernel = A.view(r, host.in_features, *host.kernel_size)
    h = F.conv2d(x, kernel, None, host.stride, host.padding, host.dilation)
    return F.conv2d(h, (B * scale).view(host.out_features, r, 1, 1))
