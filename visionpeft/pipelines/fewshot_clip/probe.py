"""The linear-probe baseline of the CLIP few-shot tables (Radford et al. 2021; CoOp's
tables): L2-regularised multinomial logistic regression on frozen, L2-normalised CLIP
image features, the regularisation strength C chosen on the few-shot validation images.

The objective is scikit-learn's ``LogisticRegression(C=C)`` (lbfgs, multinomial):
C * sum_i CE_i + ||W||^2 / 2, the bias not penalised, solved here in float64 with
torch's L-BFGS so that no further dependency is needed."""
from __future__ import annotations

import torch
import torch.nn.functional as F

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, c: float, iters: int = 500):
    """(W (classes, d), b (classes,)) minimising C * sum CE + ||W||^2 / 2."""
    x = x.double()
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = c * F.cross_entropy(x @ w.t() + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(w, b, x, y) -> float:
    return float(((x.double() @ w.t() + b).argmax(-1) == y).double().mean())


def linear_probe(train_x, train_y, val_x, val_y, classes: int, grid=C_GRID):
    """Fit on the training features for every C in ``grid`` and keep the fit that is best
    on validation (the smallest C on ties): the validation images choose C only, as the
    adapters' runs use them for nothing. Returns (W, b, chosen C, {C: val accuracy})."""
    fits, scores = {}, {}
    for c in grid:
        fits[c] = fit_logistic(train_x, train_y, classes, c)
        scores[c] = accuracy(*fits[c], val_x, val_y)
    best = max(scores.values())
    chosen = min(c for c, s in scores.items() if s == best)
    return (*fits[chosen], chosen, scores)
