"""CLoRA's tensor math: the contrastive loss on cross-attention maps, the masks drawn
from them, and the masked fusion of the branches' noise predictions (Meral et al.,
"CLoRA: A Contrastive Approach to Compose Multiple LoRA Models", arXiv 2403.19776).

Pure functions, no model: ``maps`` are (branches, H, W, tokens) cross-attention
probabilities, one map per branch averaged over the captured layers, heads and both
classifier-free-guidance rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# the official code divides by (max - min) with nothing added: a constant map (a token
# that attends nowhere in particular) gives 0/0 = NaN there, and NaN latents after it
NORMALISE_EPS = 1e-8


def minmax_normalise(v: torch.Tensor, eps: float = NORMALISE_EPS) -> torch.Tensor:
    """(v - min) / (max - min + eps) over the last dim."""
    lo = v.amin(-1, keepdim=True)
    hi = v.amax(-1, keepdim=True)
    return (v - lo) / (hi - lo + eps)


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) with cosine similarity.

    For every ordered positive pair (a, p), a != p with the same label,
    loss_ap = -log( e^{s_ap/t} / (e^{s_ap/t} + sum_{n: label_n != label_a} e^{s_an/t}) ),
    averaged over the positive pairs (the form of pytorch-metric-learning's NTXentLoss,
    which the official code calls): each positive competes with the anchor's negatives
    only, not with its other positives. No positive pair gives 0, as does an anchor with
    no negative (its terms are log 1).
    """
    z = F.normalize(embeddings, dim=1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    if not positive.any():
        return sim.sum() * 0.0
    neg = sim.masked_fill(same, float("-inf")).logsumexp(1, keepdim=True)  # (n, 1); -inf: none
    # -log(e^s / (e^s + N)) = log(1 + N e^{-s}) = softplus(log N - s)
    pair_loss = F.softplus(neg - sim)
    return pair_loss[positive].mean()


def contrastive_map_loss(maps: torch.Tensor, token_groups: list[list[list[int]]],
                         temperature: float = 0.5, eps: float = NORMALISE_EPS) -> torch.Tensor:
    """CLoRA's loss. ``token_groups[c][b]``: token indices of concept c in branch b's
    prompt. Every (concept, branch, token) map is flattened and min-max normalised; maps
    of one concept (in any branch) are positives, maps of different concepts (also in one
    branch) negatives."""
    rows, labels = [], []
    for concept, per_branch in enumerate(token_groups):
        for branch, tokens in enumerate(per_branch):
            for t in tokens:
                rows.append(maps[branch, :, :, t].reshape(-1))
                labels.append(concept)
    if not rows:
        raise ValueError("no concept tokens to compare: every concept needs words in the prompts")
    emb = minmax_normalise(torch.stack(rows), eps)
    return nt_xent(emb, torch.tensor(labels, device=maps.device), temperature)


def concept_masks(maps: torch.Tensor, mask_tokens: list[list[int]], alpha: float,
                  size: tuple[int, int]) -> torch.Tensor:
    """(branches, h, w) 0/1 masks at latent size ``size``. Branch b's mask: where any of
    its tokens' maps exceeds ``alpha`` times that map's own max; a branch with no tokens
    (the base, branch 0) gets nothing, and then branch 0 takes every position no mask
    covers. Upsampled by nearest neighbour, as the official code does."""
    masks = []
    for b, tokens in enumerate(mask_tokens):
        m = torch.zeros(maps.shape[1:3], dtype=torch.bool, device=maps.device)
        for t in tokens:
            token_map = maps[b, :, :, t]
            m |= token_map > alpha * token_map.max()
        masks.append(m)
    masks = torch.stack(masks)
    masks[0] |= ~masks.any(0)
    return F.interpolate(masks[:, None].to(maps.dtype), size=size, mode="nearest")[:, 0]


def fuse(noise: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_b m_b eps_b / sum_b m_b: ``noise`` (branches, C, h, w), ``masks`` (branches,
    h, w) with every position covered by at least one mask."""
    m = masks[:, None].to(noise.dtype)
    return (noise * m).sum(0) / m.sum(0)
