"""Point-cloud operations in pure torch: farthest point sampling, k nearest neighbours,
gathering, kNN grouping, inverse-distance interpolation and the Chamfer distance.

Point-MAE and Point-PEFT use compiled CUDA extensions for these (pointnet2_ops,
KNN_CUDA, a Chamfer kernel) that many users cannot build; these run on CPU and GPU from
a pip install. Shapes follow those extensions: points are (B, N, 3), features (B, N, C),
indices (B, ...) into the N axis.

Where the CUDA kernels behave oddly, these do not, on purpose: pointnet2_ops' FPS never
picks a point within 0.0316 of the origin (it skips |p|^2 <= 1e-3 except as the forced
first pick), so sampling all N of N points drops such points and repeats others; here
every point can be picked and N of N is a permutation.
"""
from __future__ import annotations

import torch


def _check_points(name: str, xyz: torch.Tensor) -> None:
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"{name} must be (batch, points, 3), got shape {tuple(xyz.shape)}")


def farthest_point_sample(xyz: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) indices of ``n`` points picked by farthest point sampling from (B, N, 3).

    The first pick is index 0 (as pointnet2_ops); each next one is the point farthest (in
    squared Euclidean distance) from those picked so far, the lowest index on ties. The
    result depends only on the points and their order: shuffle the order for random
    starts."""
    _check_points("xyz", xyz)
    b, total, _ = xyz.shape
    if not 1 <= n <= total:
        raise ValueError(f"cannot sample {n} points from clouds of {total}: give 1 <= n <= {total}")
    pts = xyz.detach().float()
    picked = torch.zeros(b, n, dtype=torch.long, device=xyz.device)
    # squared distance of every point to the nearest picked one, updated after each pick
    nearest = torch.full((b, total), float("inf"), device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    last = torch.zeros(b, dtype=torch.long, device=xyz.device)
    for i in range(1, n):
        d = ((pts - pts[rows, last].unsqueeze(1)) ** 2).sum(-1)
        nearest = torch.minimum(nearest, d)
        last = nearest.argmax(dim=1)  # argmax returns the first maximum: lowest index on ties
        picked[:, i] = last
    return picked


def gather_points(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values (B, N, C) at indices idx (B, ...) -> (B, ..., C); differentiable in values."""
    if values.dim() != 3 or idx.shape[0] != values.shape[0]:
        raise ValueError(f"gather_points takes values (B, N, C) and indices (B, ...) with the same B, "
                         f"got {tuple(values.shape)} and {tuple(idx.shape)}")
    b = values.shape[0]
    flat = idx.reshape(b, -1)
    out = values.gather(1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return out.reshape(*idx.shape, values.shape[-1])


def square_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, N) squared Euclidean distances between a (B, M, D) and b (B, N, D), computed
    from differences (exact, no |a|^2 + |b|^2 - 2ab cancellation)."""
    return ((a.unsqueeze(2) - b.unsqueeze(1)) ** 2).sum(-1)


def knn(query: torch.Tensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M, k) indices into ref (B, N, D) of the k nearest points to each query (B, M, D),
    nearest first (as KNN_CUDA): a query that is one of the points gets itself first."""
    if query.dim() != 3 or ref.dim() != 3 or query.shape[0] != ref.shape[0] or query.shape[-1] != ref.shape[-1]:
        raise ValueError(f"knn takes query (B, M, D) and ref (B, N, D), got {tuple(query.shape)} and "
                         f"{tuple(ref.shape)}")
    if not 1 <= k <= ref.shape[1]:
        raise ValueError(f"k={k} neighbours from {ref.shape[1]} points: give 1 <= k <= {ref.shape[1]}")
    with torch.no_grad():
        d = square_distance(query.detach().float(), ref.detach().float())
        return d.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-MAE's patches: ``num_group`` FPS centres and the ``group_size`` nearest points of
    each, centred on it. Returns (neighbourhoods (B, G, M, 3), centres (B, G, 3))."""
    centre_idx = farthest_point_sample(xyz, num_group)
    centres = gather_points(xyz, centre_idx)
    idx = knn(centres, xyz, group_size)
    neighbourhoods = gather_points(xyz, idx) - centres.unsqueeze(2)
    return neighbourhoods, centres


def inverse_distance_interpolate(xyz: torch.Tensor, ref_xyz: torch.Tensor, ref_values: torch.Tensor,
                                 k: int | None = 3, eps: float = 1e-8) -> torch.Tensor:
    """Values at xyz (B, M, 3) interpolated from ref_values (B, N, C) at ref_xyz (B, N, 3)
    with weights 1 / (d^2 + eps) over the k nearest references (PointNet++'s feature
    propagation uses 3), or over all of them with ``k=None`` (as Point-PEFT), normalised
    to sum to 1. d^2 is the squared distance. Returns (B, M, C)."""
    _check_points("xyz", xyz)
    _check_points("ref_xyz", ref_xyz)
    d = square_distance(xyz.float(), ref_xyz.float())  # float32 at least: eps underflows in half precision
    if k is not None:
        if not 1 <= k <= ref_xyz.shape[1]:
            raise ValueError(f"k={k} references of {ref_xyz.shape[1]}: give 1 <= k <= {ref_xyz.shape[1]} or None")
        d, idx = d.topk(k, dim=-1, largest=False)
    w = 1.0 / (d + eps)
    w = (w / w.sum(-1, keepdim=True)).to(ref_values.dtype)
    if k is not None:
        return (w.unsqueeze(-1) * gather_points(ref_values, idx)).sum(-2)  # (B, M, k, C) summed over k
    return torch.einsum("bmn,bnc->bmc", w, ref_values)  # every reference, without a (B, M, N, C) product


def chamfer_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The L2 Chamfer distance between point sets a (B, M, 3) and b (B, N, 3), as Point-MAE's
    ``cdl2`` loss: the mean squared distance from each point of a to its nearest in b,
    plus the same from b to a, averaged over the batch. Differentiable in both."""
    _check_points("a", a)
    _check_points("b", b)
    d = square_distance(a, b)
    return d.min(dim=2).values.mean() + d.min(dim=1).values.mean()
