"""The pure-torch point ops against brute-force Python loops (numpy, one point at a time)."""
import numpy as np
import pytest
import torch

from visionpeft.ops.points import (chamfer_distance, farthest_point_sample, gather_points, group_points,
                                   inverse_distance_interpolate, knn)


def _clouds(b=3, n=200, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(b, n, 3))).float()


def _fps_loop(pts: np.ndarray, n: int) -> list[int]:
    """Farthest point sampling the textbook way, one cloud, float64."""
    picked = [0]
    for _ in range(1, n):
        best, best_d = None, -1.0
        for j, p in enumerate(pts):
            d = min(float(((p - pts[i]) ** 2).sum()) for i in picked)
            if d > best_d:  # strict: the lowest index wins a tie
                best, best_d = j, d
        picked.append(best)
    return picked


def test_fps_matches_the_loop_and_starts_at_zero():
    xyz = _clouds(b=2, n=60)
    idx = farthest_point_sample(xyz, 12)
    assert idx.shape == (2, 12) and idx.dtype == torch.long
    for b in range(2):
        assert idx[b].tolist() == _fps_loop(xyz[b].double().numpy(), 12)


def test_fps_of_all_points_is_a_permutation_even_at_the_origin():
    xyz = _clouds(b=1, n=40)
    xyz[0, 5] = 0.0  # pointnet2_ops' kernel never picks a point this close to the origin
    idx = farthest_point_sample(xyz, 40)
    assert sorted(idx[0].tolist()) == list(range(40))


def test_fps_picks_the_lowest_index_on_ties():
    # a square: from corner 0 the opposite corner 2 is farthest; then 1 and 3 tie, 1 wins
    xyz = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]])
    assert farthest_point_sample(xyz, 4)[0].tolist() == [0, 2, 1, 3]


def test_knn_matches_the_loop_nearest_first():
    xyz = _clouds(b=2, n=80, seed=1)
    query = _clouds(b=2, n=7, seed=2)
    idx = knn(query, xyz, 5)
    for b in range(2):
        for m in range(7):
            d = [float(((xyz[b, j] - query[b, m]).double() ** 2).sum()) for j in range(80)]
            assert idx[b, m].tolist() == sorted(range(80), key=lambda j: d[j])[:5]


def test_group_points_centres_are_fps_and_neighbourhoods_centred():
    xyz = _clouds(b=2, n=100, seed=3)
    neigh, centres = group_points(xyz, num_group=8, group_size=6)
    assert neigh.shape == (2, 8, 6, 3) and centres.shape == (2, 8, 3)
    fps = farthest_point_sample(xyz, 8)
    for b in range(2):
        assert torch.equal(centres[b], xyz[b, fps[b]])
        for g in range(8):
            d = ((xyz[b] - centres[b, g]) ** 2).sum(-1)
            nearest = xyz[b, d.argsort()[:6]]
            assert torch.allclose(neigh[b, g], nearest - centres[b, g])
            assert torch.equal(neigh[b, g, 0], torch.zeros(3))  # the centre is its own nearest point


def test_gather_points_any_index_shape_and_gradient():
    values = torch.randn(2, 10, 4, requires_grad=True)
    idx = torch.tensor([[[1, 2], [3, 3]], [[0, 9], [9, 9]]])
    out = gather_points(values, idx)
    assert out.shape == (2, 2, 2, 4)
    assert torch.equal(out[1, 1, 0], values[1, 9]) and torch.equal(out[0, 0, 1], values[0, 2])
    out.sum().backward()
    assert values.grad[1, 9].tolist() == [3.0] * 4 and values.grad[0, 3].tolist() == [2.0] * 4


@pytest.mark.parametrize("k", [3, None])
def test_interpolation_matches_the_loop(k):
    xyz, ref = _clouds(b=2, n=9, seed=4), _clouds(b=2, n=6, seed=5)
    values = torch.randn(2, 6, 5)
    out = inverse_distance_interpolate(xyz, ref, values, k=k)
    for b in range(2):
        for m in range(9):
            d = np.array([float(((xyz[b, m] - ref[b, j]).double() ** 2).sum()) for j in range(6)])
            use = np.argsort(d)[:k] if k else np.arange(6)
            w = 1.0 / (d[use] + 1e-8)
            expected = (w[:, None] * values[b, use].double().numpy()).sum(0) / w.sum()
            np.testing.assert_allclose(out[b, m].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_interpolation_at_a_reference_point_copies_its_value():
    ref = _clouds(b=1, n=5, seed=6)
    values = torch.randn(1, 5, 3)
    out = inverse_distance_interpolate(ref[:, 2:3], ref, values, k=None)
    assert torch.allclose(out[0, 0], values[0, 2], atol=1e-5)


def test_chamfer_matches_the_loop_and_is_zero_on_itself():
    a, b = _clouds(b=2, n=7, seed=7), _clouds(b=2, n=5, seed=8)
    total = 0.0
    for i in range(2):
        pa, pb = a[i].double().numpy(), b[i].double().numpy()
        ab = np.mean([min(((p - q) ** 2).sum() for q in pb) for p in pa])
        ba = np.mean([min(((q - p) ** 2).sum() for p in pa) for q in pb])
        total += (ab + ba) / 2  # each direction is a mean over the batch's points
    assert chamfer_distance(a, b).item() == pytest.approx(total, rel=1e-5)
    assert chamfer_distance(a, a[:, torch.randperm(7)]).item() == 0.0


@pytest.mark.parametrize("call, message", [
    (lambda: farthest_point_sample(torch.zeros(1, 5, 3), 6), "cannot sample 6 points from clouds of 5"),
    (lambda: farthest_point_sample(torch.zeros(1, 5, 2), 2), r"\(batch, points, 3\)"),
    (lambda: knn(torch.zeros(1, 2, 3), torch.zeros(1, 4, 3), 5), "k=5 neighbours from 4 points"),
    (lambda: knn(torch.zeros(2, 2, 3), torch.zeros(1, 4, 3), 1), "same|knn takes"),
])
def test_bad_shapes_are_refused_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)
