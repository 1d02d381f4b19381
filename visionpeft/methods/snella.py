"""SNELLA's bi-level sparsity allocation (Shen et al., 2025, arXiv 2510.24037) for SNELL
adapters, as a training callback.

Across layers, parameters compete by importance: for every SNELL layer the callback
keeps an EMA of I = |theta * grad| over its factors A and B and an EMA of the
uncertainty |I - EMA(I)|; a layer's score is mean(EMA(I) * U) over A plus over B. The
global budget of non-zero dW entries moves from its initial value to the target under a
cubic schedule, and is split across layers in proportion to their scores (capped at each
layer's size, the surplus handed on). Inside a layer, entries compete by magnitude: the
SNELL forward keeps the largest |dW| up to the layer's share.

    alloc = SNELLAAllocator(model, target_sparsity=0.9, total_steps=1000)
    for step in range(1000):
        loss.backward(); alloc.step(step); opt.step(); opt.zero_grad()

In `vp.train`, a task calls it from its ``after_backward`` hook and returns
``alloc.state_dict()`` from its ``state_dict`` so that checkpoints resume it exactly
(visionpeft/train/task.py). ``name=None`` takes the model's active SNELL adapters: an
inactive one gets no gradients and would only lose its budget.

Defaults follow the official code (beta1 = beta2 = 0.85). SNELLA's learnable softmax term
in the kernel is `SNELLConfig(softmax_term=True)` (methods/snell.py), eager or compiled.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..core.model_ops import active_adapters, adapted_layers
from ..core.registry import get_method


def cubic_budget(step: int, total_steps: int, initial: float, target: float,
                 init_warmup: int = 0, final_warmup: int = 0) -> float:
    """Initial budget until init_warmup, the target from total - final_warmup on, and a
    cubic descent in between: target + (initial - target) * (1 - progress)^3."""
    if step <= init_warmup:
        return initial
    span = total_steps - final_warmup - init_warmup
    if step >= total_steps - final_warmup or span <= 0:
        return target
    progress = (step - init_warmup) / span
    return target + (initial - target) * (1.0 - progress) ** 3


def split_budget(budget: int, scores: list[float], sizes: list[int]) -> list[int]:
    """Share ``budget`` entries among layers by score, each capped at its size; what a full
    layer cannot take goes to the others, again by score."""
    share = [0] * len(sizes)
    scores = [s if math.isfinite(s) else 0.0 for s in scores]  # an overflowed score takes no share
    left = min(int(budget), sum(sizes))
    open_ = [i for i in range(len(sizes))]
    while left > 0 and open_:
        total = sum(max(scores[i], 0.0) for i in open_)
        weights = {i: (max(scores[i], 0.0) / total if total > 0 else 1.0 / len(open_)) for i in open_}
        given = 0
        for i in open_:
            add = min(int(left * weights[i]), sizes[i] - share[i])
            share[i] += add
            given += add
        if given == 0:  # rounding left a remainder smaller than one entry per layer
            for i in sorted(open_, key=lambda i: -weights[i]):
                if left - given <= 0:
                    break
                if share[i] < sizes[i]:
                    share[i] += 1
                    given += 1
        left -= given
        open_ = [i for i in open_ if share[i] < sizes[i]]
    return share


class SNELLAAllocator:
    def __init__(self, model: nn.Module, target_sparsity: float, total_steps: int,
                 name: str | None = None, init_warmup: int = 0, final_warmup: int = 0,
                 interval: int = 1, beta1: float = 0.85, beta2: float = 0.85):
        if not 0.0 < target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
        # SNELL's module class through the registry: methods do not import one another
        snell_module = get_method("snell").module_cls
        self.modules: list[nn.Module] = []
        names = active_adapters(model) if name is None else (name,)
        for layer in adapted_layers(model).values():
            for adapter, parts in layer.adapters.items():
                if adapter in names:
                    self.modules += [m for m in parts.values() if isinstance(m, snell_module)]
        if not self.modules:
            raise ValueError("the model has no SNELL adapter" + (f" named {name!r}" if name else " active"))
        self.sizes = [m.numel for m in self.modules]
        self.initial = float(sum(n - int(m.n_zero) for m, n in zip(self.modules, self.sizes)))
        # rounded to 1e-6 of an entry first: (1 - 0.9) * 1200 is 119.99999999999997 in floats
        self.target = float(round((1.0 - target_sparsity) * sum(self.sizes), 6))
        self.total_steps, self.interval = total_steps, interval
        self.init_warmup, self.final_warmup = init_warmup, final_warmup
        self.beta1, self.beta2 = beta1, beta2
        self.ema = [{} for _ in self.modules]
        self.unc = [{} for _ in self.modules]

    @torch.no_grad()
    def update_importance(self) -> bool:
        """Fold this step's |theta * grad| into the EMAs. A step whose gradients are not all
        finite (a loss scaler's overflow, which the optimizer skips too) changes nothing and
        returns False. Under fp16 loss scaling the gradients are still scaled here (one
        factor for every layer, so the layers' ranking within a step is unaffected)."""
        grads = [p.grad for m in self.modules for p in (m.A, m.B) if p.grad is not None]
        if not grads and self.modules:
            raise RuntimeError(
                "SNELLAAllocator.step saw no gradient on any SNELL factor: call it after backward and "
                "before zero_grad. Under FSDP, wrap the model with use_orig_params=True (FSDP's flattened "
                "parameters otherwise hold the gradients, not the factors)")
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return False
        for ema, unc, m in zip(self.ema, self.unc, self.modules):
            for key, p in (("A", m.A), ("B", m.B)):
                if p.grad is None:
                    continue
                imp = (p * p.grad).abs().nan_to_num_(0.0)
                if key not in ema:  # both EMAs start at zero, as in the official allocator
                    ema[key], unc[key] = torch.zeros_like(imp), torch.zeros_like(imp)
                ema[key].mul_(self.beta1).add_(imp, alpha=1 - self.beta1)
                unc[key].mul_(self.beta2).add_((imp - ema[key]).abs(), alpha=1 - self.beta2)
        return True

    def scores(self) -> list[float]:
        return [sum((ema[k] * unc[k]).mean().item() for k in ema) for ema, unc in zip(self.ema, self.unc)]

    def budget(self, step: int) -> float:
        return cubic_budget(step, self.total_steps, self.initial, self.target,
                            self.init_warmup, self.final_warmup)

    @torch.no_grad()
    def allocate(self, budget: float) -> list[float]:
        """Set every layer's sparsity from its share of ``budget`` non-zero entries."""
        shares = split_budget(int(round(budget, 6)), self.scores(), self.sizes)
        for m, share, n in zip(self.modules, shares, self.sizes):
            m.n_zero.fill_(n - max(share, 1))  # keep at least one entry per layer
        return [m.sparsity for m in self.modules]

    def state_dict(self) -> dict:
        """What a resumed run needs: the starting budget and both EMAs per layer (the
        layers' sparsities are buffers saved with the adapter)."""
        return {"initial": self.initial, "ema": [dict(e) for e in self.ema], "unc": [dict(u) for u in self.unc]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["ema"]) != len(self.modules):
            raise ValueError(f"the state holds {len(state['ema'])} SNELL layers, this allocator has "
                             f"{len(self.modules)}: built for another model or adapter")
        self.initial = float(state["initial"])
        devices = [m.A.device for m in self.modules]
        self.ema = [{k: v.to(d) for k, v in e.items()} for e, d in zip(state["ema"], devices)]
        self.unc = [{k: v.to(d) for k, v in u.items()} for u, d in zip(state["unc"], devices)]

    def step(self, step: int) -> None:
        """Call after backward, before the gradients are cleared."""
        if not self.update_importance():
            return
        final = step > self.total_steps - self.final_warmup  # at the target: every step
        if step > self.init_warmup and (final or step % self.interval == 0):
            self.allocate(self.budget(step))
