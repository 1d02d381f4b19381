"""SNELL's hand-written autograd engines: autograd through cdist, abs and where costs about
ten passes over the (out, in) matrix, these a few, from the formulas of ops/snell_math.py.

  SparseKernel  dW = keep_largest(k(A, B)) as a torch.autograd.Function (the checkpointed
                path, ``delta_weight``, merge)
  SNELLDelta    dW folded into the host GEMM (ops/weight_delta.py): eager, or with compiled
                kernels the forward and backward fused (ops/snell_kernels.py) and on CPU
                the backward in C (ops/snell_native.py)
  SNELLADelta   the same for SNELLA's mixed kernel K = D + a softmax(D / t) + c
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .compiled import compiled_kernels_enabled
from .kernels import current_kernels, kernels
from .kth import fused_kernel_and_threshold, sparsity_threshold
from .snell_kernels import (fused_column_stats, fused_effective_weight, fused_mixed_weight_and_grads,
                            fused_weight_and_grads)
from .snell_math import combine_halves, factor_grads, half_terms, keep_largest, mask_grad, raw_delta
from .snell_native import native_applies, native_sparse_grads
from .weight_delta import WeightDelta
from .workspace import scratch


class SparseKernel(torch.autograd.Function):
    """dW = keep_largest(k(A, B)) with the gradient from the saved kernel terms."""

    @staticmethod
    def forward(ctx, A, B, kernel, scale, n_zero, reweight):
        dW, terms = raw_delta(A, B, kernel, scale)
        threshold = sparsity_threshold(dW, n_zero)
        ctx.kernel, ctx.scale, ctx.reweight, ctx.threshold = kernel, scale, reweight, threshold
        ctx.save_for_backward(A, B, dW, *terms)
        return keep_largest(dW, threshold, reweight)

    @staticmethod
    @once_differentiable  # the gradient is written by hand from saved terms: no second derivative
    def backward(ctx, G):
        A, B, dW, *terms = ctx.saved_tensors
        G = mask_grad(G.clone(), dW, ctx.threshold, ctx.reweight)
        grads = factor_grads(A, B, [t.clone() for t in terms], G, ctx.kernel, ctx.scale)
        return *grads, None, None, None, None


class SNELLDelta(WeightDelta):
    """SNELL's dW for ``linear_with_weight_delta``: the forward builds in two (out, in)
    buffers and finds the threshold; the backward rebuilds with the same threshold and
    hands the kernel terms to the hand-written gradient. Factors in half precision are
    evaluated in fp32."""

    def __init__(self, A, B, kernel: str, scale: float, n_zero: int, reweight: bool, shape,
                 hint: dict | None = None):
        self.params, self.kernel, self.scale = [A, B], kernel, scale
        self.n_zero, self.reweight, self.shape = n_zero, reweight, shape
        self.threshold: float | None = None
        self.hint = hint  # the layer's last threshold, a starting guess for the compiled search
        self.stats: tuple | None = None  # set by a compiled forward: its backward is compiled too
        self.choices: dict = {}  # the kernel choices of a compiled forward, for its backward

    def _factors(self):
        A, B = self.params[:2]
        return (A.detach().float(), B.detach().float()) if A.dtype in (torch.float16, torch.bfloat16) \
            else (A.detach(), B.detach())

    def _kernel_in_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW, spare): the dense kernel matrix and a second (out, in) buffer the caller
        may overwrite (the other distance half, or a fresh one for the linear kernel)."""
        A, B = self._factors()
        if self.kernel == "linear":
            dW = (A @ B.t()).mul_(self.scale)
            return dW, torch.empty_like(dW)
        T1, spare = half_terms(A, B, self.kernel, self.scale)
        return combine_halves(T1, spare, self.kernel, self.scale, out=T1), spare

    def _sparsify_into(self, dW: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
        """Find the threshold of ``dW`` and write the kept entries into ``spare``."""
        self.threshold = sparsity_threshold(dW, self.n_zero)
        kept = dW if self.threshold is None else torch.ops.aten.hardshrink.out(dW, self.threshold, out=spare)
        return (kept.mul_(kept.abs()) if self.reweight else kept).reshape(self.shape)

    @torch.no_grad()
    def build(self) -> torch.Tensor:
        return self._sparsify_into(*self._kernel_in_buffers())

    @torch.no_grad()
    def rebuild(self):
        A, B = self._factors()
        dW, terms = raw_delta(A, B, self.kernel, self.scale)
        kept = keep_largest(dW, self.threshold, self.reweight)
        kept = kept.clone() if kept is dW else kept
        return kept.reshape(self.shape), (dW, terms)

    @torch.no_grad()
    def param_grads(self, state, grad_dW):
        dW, terms = state
        A, B = self._factors()
        G = mask_grad(grad_dW.reshape(dW.shape).to(dW.dtype), dW, self.threshold, self.reweight)
        gA, gB = factor_grads(A, B, terms, G, self.kernel, self.scale)
        return gA.to(self.params[0].dtype), gB.to(self.params[1].dtype)

    # compiled path: kernel, mask and W' fused per step (ops/snell_kernels.py), when turned on
    def _fused(self, W: torch.Tensor) -> bool:
        return compiled_kernels_enabled() and self.kernel != "linear" and W.dim() == 2

    def _scalars(self, like: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(threshold, host scale) as 0-d tensors, so new values never recompile; a
        threshold of -1 keeps every entry (|dW| >= 0)."""
        t = -1.0 if self.threshold is None else self.threshold
        return torch.tensor([t, float(scale)], dtype=like.dtype, device=like.device).unbind()

    def _kernel_stats(self, A, Bt) -> tuple:
        """What the compiled kernels need besides the factors: nothing for SNELL."""
        return None, None, None

    def _fused_grads(self, A, Bt, W, G, threshold, host_scale, w_eff) -> tuple:
        """The compiled backward: writes W' into ``w_eff``, returns the parameters' gradients."""
        return fused_weight_and_grads(A, Bt, W, G, threshold, self.kernel, self.scale, host_scale,
                                      self.reweight, w_eff)

    @torch.no_grad()
    def effective_weight(self, W, scale):
        if not self._fused(W):
            return super().effective_weight(W, scale)
        # the backward follows this forward's choices, wherever and whenever it runs
        self.choices = current_kernels()
        A, B = self._factors()
        self.stats = self._kernel_stats(A, B.t().contiguous())
        D = scratch(0, W.shape, A.dtype, W.device)
        self.threshold = fused_kernel_and_threshold(A, B, self.kernel, self.scale, self.n_zero, D, self.hint,
                                                    stats=self.stats)
        w_eff = scratch(1, W.shape, W.dtype, W.device)
        fused_effective_weight(D, W, *self._scalars(D, scale), self.reweight, w_eff)
        return w_eff

    def _native_grads(self, A, Bt, W, g, x2, scale, w_eff) -> tuple | None:
        """``native_sparse_grads`` where it applies, else None."""
        if not native_applies(self.kernel, self.threshold, 1 - self.n_zero / W.numel(), A, W, g, x2):
            return None
        return native_sparse_grads(A, Bt, W, g, x2, self.threshold, self.scale, float(scale), self.reweight, w_eff)

    @torch.no_grad()
    def backward(self, g, x2, W, scale, need_x, need_W):
        if self.stats is None:  # the forward ran eagerly
            return super().backward(g, x2, W, scale, need_x, need_W)
        # the forward's choices: autograd may run this after the forward's `with kernels(...)`
        # block ended, or on a device thread of its own that never saw the block
        with kernels(**self.choices):
            return self._fused_backward(g, x2, W, scale, need_x, need_W)

    def _fused_backward(self, g, x2, W, scale, need_x, need_W):
        A, B = self._factors()
        Bt = B.t().contiguous()
        w_eff = scratch(1, W.shape, W.dtype, W.device)
        grads = None if need_W else self._native_grads(A, Bt, W, g, x2, scale, w_eff)
        grad_W = None
        if grads is None:  # the dense weight gradient, then the compiled loops
            G = torch.mm(g.t(), x2, out=scratch(0, W.shape, g.dtype, g.device))
            grad_W = G.clone() if need_W else None
            threshold, host_scale = self._scalars(A, scale)
            grads = self._fused_grads(A, Bt, W, G, threshold, host_scale, w_eff)
        grad_x = g @ w_eff if need_x else None
        return grad_x, grad_W, tuple(gp.to(p.dtype) for gp, p in zip(grads, self.params))


class SNELLADelta(SNELLDelta):
    """SNELLA's mixed kernel K = D + a softmax(D / t) + c for ``linear_with_weight_delta``,
    its gradient written by hand like SNELL's. From G = dL/dK (masked), with S the softmax:
      grad_c = sum G, grad_a = sum G S, Z = a S (G - colsum(G S)) (the softmax backward
      over dim 0), grad_t = -sum Z D / t^2, dL/dD = G + Z / t,
    and dL/dD goes through SNELL's kernel gradient. Every step reuses (out, in) buffers:
    on CPU each fresh one costs page faults worth several passes. ViT-B step relative to
    LoRA (batch 4, CPU): 3.34x checkpointed, 2.76x folded with an autograd rebuild, 2.54x
    hand-written, 2.19x with the buffers reused (SNELL 1.86x in that run), 1.5x-1.6x with
    compiled kernels (column statistics, then SNELL's loops on K; docs/BENCHMARKS.md)."""

    def __init__(self, A, B, mix, kernel: str, scale: float, n_zero: int, reweight: bool, shape,
                 hint: dict | None = None):
        super().__init__(A, B, kernel, scale, n_zero, reweight, shape, hint)
        self.params = [A, B, *mix]

    def _mix(self):  # a, t, c in the precision the factors are evaluated in (fp32 or wider)
        return tuple(p.detach().float() if p.dtype in (torch.float16, torch.bfloat16) else p.detach()
                     for p in self.params[2:])

    # compiled path: the softmax's column statistics first, then SNELL's loops on K
    def _kernel_stats(self, A, Bt) -> tuple:
        mix = torch.stack(self._mix()).to(A.device)  # [a, t, c]
        return (*fused_column_stats(A, Bt, self.kernel, self.scale, mix), mix)

    def _fused_grads(self, A, Bt, W, G, threshold, host_scale, w_eff) -> tuple:
        gA, gB, grad_mix = fused_mixed_weight_and_grads(A, Bt, W, G, threshold, self.kernel, self.scale,
                                                        host_scale, self.reweight, *self.stats, w_eff)
        return gA, gB, *grad_mix.unbind()

    def _native_grads(self, A, Bt, W, g, x2, scale, w_eff) -> None:
        return None  # the C kernel knows SNELL's distance kernel only, not K's softmax term

    @torch.no_grad()
    def build(self) -> torch.Tensor:
        a, t, c = self._mix()
        D, spare = self._kernel_in_buffers()
        S = torch.softmax(torch.div(D, t, out=spare), dim=0)
        K = D.add_(c).addcmul_(S, a)  # D is not needed again here
        return self._sparsify_into(K, S)

    @torch.no_grad()
    def rebuild(self):
        a, t, c = self._mix()
        A, B = self._factors()
        D, terms = raw_delta(A, B, self.kernel, self.scale)
        scaled = D / t
        S = torch.softmax(scaled, dim=0)
        K = torch.add(D, c, out=scaled).addcmul_(S, a)
        kept = keep_largest(K, self.threshold, self.reweight)
        return (kept.clone() if kept is K else kept).reshape(self.shape), (K, D, S, terms)

    @torch.no_grad()
    def param_grads(self, state, grad_dW):
        K, D, S, terms = state
        A, B = self._factors()
        a, t, _ = self._mix()
        G = mask_grad(grad_dW.reshape(K.shape).to(K.dtype), K, self.threshold, self.reweight)
        GS = torch.mul(G, S, out=K)  # K's last use was the mask
        grad_a, grad_c, col = GS.sum(), G.sum(), GS.sum(0, keepdim=True)
        Z = torch.sub(G, col, out=K).mul_(S).mul_(a)
        grad_t = -torch.dot(Z.reshape(-1), D.reshape(-1)) / (t * t)
        gA, gB = factor_grads(A, B, terms, Z.div_(t).add_(G), self.kernel, self.scale)
        grads = (gA, gB, grad_a, grad_t, grad_c)
        return tuple(g.to(p.dtype) for g, p in zip(grads, self.params))
