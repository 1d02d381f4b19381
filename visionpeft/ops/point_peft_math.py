"""Point-PEFT's math as pure functions (Tang et al., "Point-PEFT: Parameter-Efficient
Fine-Tuning for 3D Pre-trained Models", AAAI 2024), on plain tensors, no modules.

- ``retrieve_cache_tokens``: the point-prior bank lookup. The query is a sample's feature
  from the frozen encoder (B, C); the bank holds the training set's features as L2-normalised
  columns (C, N). Cosine similarity to every column, the top k, a softmax over those k
  similarities (no temperature, as the official code), their weighted mean; the cache
  tokens are [query, weighted mean, the k retrieved features] (B, k + 2, C).
- ``bottleneck``: the adapters' 384-d-384 form with QuickGELU, z * sigmoid(1.702 z).
- ``local_geometry``: the geometry-aware adapter's token update: FPS of G/2 local centres
  over the G token centres, the k nearest tokens of each, a local self-attention inside each
  neighbourhood (shared by all blocks), max-pool, BN + GELU, + 0.3 x the centre token, and
  propagation back to every token with weights 1 / (d^2 + 1e-8) over all local centres,
  normalised, added with weight 0.3.

The official code applies the neighbour indices of its 128-centre grouping to the tensor of
10 prompts + 128 tokens in blocks 0-5, which for a batch of more than one sample reads rows
of other samples (and places tokens at the wrong centres even in the first sample); here
every sample's neighbourhoods index its own tokens at their own centres.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .points import farthest_point_sample, gather_points, inverse_distance_interpolate, knn

CENTRE_WEIGHT = 0.3  # the centre token added to its pooled neighbourhood (official, hard-coded)
PROPAGATE_WEIGHT = 0.3  # the propagated local feature added to every token (official, hard-coded)


def quick_gelu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(1.702 * z)


def bottleneck(x: torch.Tensor, down_w, down_b, up_w, up_b, dropout: float = 0.0,
               training: bool = False) -> torch.Tensor:
    """up(dropout(QuickGELU(down(x)))) over the last axis (no residual)."""
    z = quick_gelu(F.linear(x, down_w, down_b))
    if dropout:
        z = F.dropout(z, dropout, training)
    return F.linear(z, up_w, up_b)


def retrieve_cache_tokens(query: torch.Tensor, bank: torch.Tensor, k: int = 8) -> torch.Tensor:
    """(B, k + 2, C) cache tokens for query features (B, C) from a bank of L2-normalised
    columns (C, N): [query, softmax-weighted mean of the top k, the top k, best first]."""
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[0]:
        raise ValueError(f"the bank lookup takes query features (B, C) and a bank (C, N) of the same C, got "
                         f"{tuple(query.shape)} and {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[1]:
        raise ValueError(f"the bank holds {bank.shape[1]} features, fewer than k={k}: build it from more samples")
    q = F.normalize(query.float(), dim=-1)
    sims, idx = (q @ bank.float()).topk(k, dim=-1)  # (B, k), best first
    retrieved = bank.t()[idx].to(query.dtype)  # (B, k, C): constants, no gradient into the bank
    weights = sims.softmax(dim=-1).to(query.dtype)
    mean = (weights.unsqueeze(-1) * retrieved).sum(1, keepdim=True)
    return torch.cat([query.unsqueeze(1), mean, retrieved], dim=1)


def local_neighbourhoods(centres: torch.Tensor, n_local: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(local centre indices (B, L), neighbour indices (B, L, k)) into the G token centres
    (B, G, 3): FPS of L = ``n_local`` of them (the first is token 0), the k nearest tokens of
    each, nearest (itself) first."""
    local = farthest_point_sample(centres, n_local)
    return local, knn(gather_points(centres, local), centres, k)


def local_geometry(tokens: torch.Tensor, centres: torch.Tensor, local: torch.Tensor, neighbours: torch.Tensor,
                   attend, pool_norm) -> torch.Tensor:
    """The geometry-aware update of the patch tokens (B, G, C) at centres (B, G, 3), given
    the local centres and neighbours of ``local_neighbourhoods``. ``attend`` maps the
    neighbourhoods (B * L, k, C) to what the local attention adds to them; ``pool_norm`` maps
    the pooled (B, C, L) through BN (the block's own). Returns the updated tokens (B, G, C)."""
    b, _, c = tokens.shape
    n_local, k = neighbours.shape[1], neighbours.shape[2]
    groups = gather_points(tokens, neighbours).reshape(b * n_local, k, c)
    groups = groups + attend(groups)
    pooled = groups.max(dim=1).values.reshape(b, n_local, c)
    pooled = F.gelu(pool_norm(pooled.transpose(1, 2)).transpose(1, 2))
    pooled = pooled + CENTRE_WEIGHT * gather_points(tokens, local)
    spread = inverse_distance_interpolate(centres, gather_points(centres, local), pooled, k=None)
    return tokens + PROPAGATE_WEIGHT * spread


def local_attention(x: torch.Tensor, qkv_w: torch.Tensor, proj_w: torch.Tensor, proj_b: torch.Tensor,
                    heads: int) -> torch.Tensor:
    """Self-attention inside each neighbourhood x (N, k, C) through a narrow inner width
    (qkv: C -> 3 * heads * d, proj: heads * d -> C). The official scales the logits by
    (heads * d)^-1/2 (the whole inner width), not the usual d^-1/2; kept, as the
    checkpoints and numbers are for it."""
    n, k, _ = x.shape
    inner = qkv_w.shape[0] // 3
    q, key, v = F.linear(x, qkv_w).reshape(n, k, 3, heads, inner // heads).permute(2, 0, 3, 1, 4)
    att = (q @ key.transpose(-2, -1)) * inner ** -0.5
    out = att.softmax(dim=-1) @ v  # (n, heads, k, d)
    return F.linear(out.transpose(1, 2).reshape(n, k, inner), proj_w, proj_b)
