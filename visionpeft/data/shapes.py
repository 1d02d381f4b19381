"""Procedural 3-D shapes as point clouds: primitives and compositions sampled on their
surfaces, with the disorder real scans have (ScanObjectNN): noise, a random rotation about
the up axis (y), anisotropic scale, partial views (the far side of a random plane cut
away) and background clutter (a patch of floor and stray points).

Every cloud is centred and scaled into the unit sphere, like the readers' output. Used for
the tests, the embedded Point-MAE's pretraining and its adaptation table (held-out classes).
"""
from __future__ import annotations

import numpy as np

from .points import PointSplit, normalise_cloud


def _sphere(n, rng):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _box(n, rng, size=(1.0, 1.0, 1.0)):
    size = np.asarray(size, dtype=np.float64)
    areas = np.array([size[1] * size[2], size[0] * size[2], size[0] * size[1]]).repeat(2)
    face = rng.choice(6, size=n, p=areas / areas.sum())
    p = rng.uniform(-0.5, 0.5, size=(n, 3))
    axis, side = face // 2, np.where(face % 2 == 0, -0.5, 0.5)
    p[np.arange(n), axis] = side
    return p * size


def _cylinder(n, rng, radius=0.5, height=1.0, caps=True):
    wall, lids = 2 * np.pi * radius * height, 2 * np.pi * radius ** 2
    side = n if not caps else int(n * wall / (wall + lids))
    t = rng.uniform(0, 2 * np.pi, side)
    body = np.stack([radius * np.cos(t), rng.uniform(-height / 2, height / 2, side), radius * np.sin(t)], 1)
    if not caps:
        return body
    m = n - side
    r = radius * np.sqrt(rng.uniform(0, 1, m))
    t = rng.uniform(0, 2 * np.pi, m)
    cap = np.stack([r * np.cos(t), rng.choice([-height / 2, height / 2], m), r * np.sin(t)], 1)
    return np.concatenate([body, cap])


def _cone(n, rng):
    h = np.sqrt(rng.uniform(0, 1, n))  # area grows with the distance from the apex
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([0.5 * h * np.cos(t), 0.5 - h, 0.5 * h * np.sin(t)], 1)


def _torus(n, rng, major=0.5, minor=0.18):
    u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    ring = major + minor * np.cos(v)
    return np.stack([ring * np.cos(u), minor * np.sin(v), ring * np.sin(u)], 1)


def _pyramid(n, rng):
    base = rng.uniform(-0.5, 0.5, size=(n, 2))
    h = 1 - np.sqrt(rng.uniform(0, 1, n))  # height along the faces
    p = np.stack([base[:, 0] * (1 - h), h - 0.5, base[:, 1] * (1 - h)], 1)
    return p


def _parts(n, rng, parts):
    """Points on several (sampler, offset, scale) parts, split by each part's share."""
    shares = np.array([s for *_, s in parts], dtype=np.float64)
    counts = rng.multinomial(n, shares / shares.sum())
    out = [fn(c, rng) * np.asarray(scale) + np.asarray(offset) for (fn, offset, scale, _), c in zip(parts, counts)]
    return np.concatenate(out)


def _table(n, rng):
    legs = [(lambda m, r: _cylinder(m, r, caps=False), (x, -0.35, z), (0.08, 0.7, 0.08), 0.08)
            for x in (-0.4, 0.4) for z in (-0.25, 0.25)]
    return _parts(n, rng, [(_box, (0, 0.05, 0), (1.0, 0.06, 0.6), 0.6), *legs])


def _chair(n, rng):
    legs = [(lambda m, r: _cylinder(m, r, caps=False), (x, -0.3, z), (0.06, 0.5, 0.06), 0.05)
            for x in (-0.22, 0.22) for z in (-0.22, 0.22)]
    return _parts(n, rng, [(_box, (0, -0.02, 0), (0.5, 0.06, 0.5), 0.35),
                           (_box, (0, 0.3, -0.24), (0.5, 0.6, 0.05), 0.45), *legs])


def _lamp(n, rng):
    return _parts(n, rng, [(_cylinder, (0, -0.45, 0), (0.5, 0.06, 0.5), 0.25),
                           (lambda m, r: _cylinder(m, r, caps=False), (0, 0, 0), (0.05, 0.85, 0.05), 0.15),
                           (_cone, (0, 0.4, 0), (0.6, 0.35, 0.6), 0.6)])


def _mug(n, rng):
    return _parts(n, rng, [(_cylinder, (0, 0, 0), (0.8, 1.0, 0.8), 0.8),
                           (_torus, (0.45, 0, 0), (0.45, 0.45, 0.45), 0.2)])


def _shelf(n, rng):
    boards = [(_box, (0, y, 0), (1.0, 0.04, 0.35), 0.15) for y in (-0.45, -0.15, 0.15, 0.45)]
    sides = [(_box, (x, 0, 0), (0.04, 0.95, 0.35), 0.2) for x in (-0.5, 0.5)]
    return _parts(n, rng, boards + sides)


def _dumbbell(n, rng):
    return _parts(n, rng, [(_sphere, (-0.45, 0, 0), (0.25,) * 3, 0.4), (_sphere, (0.45, 0, 0), (0.25,) * 3, 0.4),
                           (lambda m, r: _cylinder(m, r, caps=False), (0, 0, 0), (0.06, 0.7, 0.06), 0.2)])


SHAPES = {
    "sphere": _sphere, "box": lambda n, r: _box(n, r, (1.0, 0.7, 0.5)), "cylinder": _cylinder, "cone": _cone,
    "torus": _torus, "pyramid": _pyramid, "table": _table, "chair": _chair, "lamp": _lamp, "mug": _mug,
    "shelf": _shelf, "dumbbell": _dumbbell,
}


# the embedded Point-MAE pretrains on these; the adaptation table uses the held-out four
PRETRAIN_SHAPES = ("sphere", "box", "cylinder", "cone", "torus", "pyramid", "table", "chair")
HELD_OUT_SHAPES = ("lamp", "mug", "shelf", "dumbbell")


def shape_cloud(kind: str, n_points: int, rng: np.random.Generator, noise: float = 0.01, partial: float = 0.0,
                clutter: float = 0.0) -> np.ndarray:
    """One (n_points, 3) float32 cloud of shape ``kind``: random up-axis rotation and
    per-axis scale (0.8-1.2), Gaussian noise of ``noise`` (in unit-sphere units); with
    probability ``partial`` the far side of a random plane is cut away (a partial view),
    and a share ``clutter`` of the points is floor and stray background."""
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; choose from {sorted(SHAPES)}")
    n_object = n_points - int(round(clutter * n_points))
    cut = rng.uniform() < partial
    p = SHAPES[kind](n_object * (2 if cut else 1), rng)
    if cut:  # keep the half facing a random direction (points on the near side of a plane)
        d = _sphere(1, rng)[0]
        keep = np.argsort(p @ d)[:n_object]
        p = p[keep]
    p = p * rng.uniform(0.8, 1.2, size=3)
    a = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(a), np.sin(a)
    p = p @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]).T
    if n_points > n_object:
        m = n_points - n_object
        floor = np.stack([rng.uniform(-1, 1, m), np.full(m, p[:, 1].min()), rng.uniform(-1, 1, m)], 1)
        stray = rng.uniform(-1, 1, size=(m, 3))
        p = np.concatenate([p, np.where(rng.uniform(size=(m, 1)) < 0.7, floor, stray)])
    p = p + rng.normal(scale=noise, size=p.shape)
    return normalise_cloud(p[rng.permutation(len(p))]).astype(np.float32)


def make_shape_split(classes, per_class: int, n_points: int = 1024, seed: int = 0, **style) -> PointSplit:
    """``per_class`` clouds of each shape in ``classes`` (labels by position), shuffled;
    ``style``: noise, partial, clutter as `shape_cloud` takes them."""
    rng = np.random.default_rng(seed)
    clouds, labels = [], []
    for label, kind in enumerate(classes):
        for _ in range(per_class):
            clouds.append(shape_cloud(kind, n_points, rng, **style))
            labels.append(label)
    order = rng.permutation(len(labels))
    return PointSplit(np.stack(clouds)[order], np.asarray(labels, dtype=np.int64)[order], list(classes))
