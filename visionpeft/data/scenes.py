"""Procedural remote-sensing-like scenes with per-pixel land-cover classes and a scene
type: the data the embedded encoder is pretrained on and the quality benchmark's tasks.

Ten scene types, each a recipe over shared primitives (smooth noise, parcels, stripes,
roads, buildings with shadows, water bodies, tree crowns), followed by the photometric
shifts between acquisitions (season, sun, haze, sensor noise). Six types are used for
pretraining (`PRETRAIN_SCENES`); the other four (`HELD_OUT_SCENES`) are never seen
there, so classifying them is a task unlike pretraining. Everything is drawn from one
``numpy.random.Generator``: a seed gives the same images on every machine.
"""
from __future__ import annotations

import numpy as np
import torch

from .change_detection import _paint_building, _place_building, _smooth_field

CLASSES = ("soil", "vegetation", "forest", "water", "road", "building")
SCENE_TYPES = ("farmland", "forest", "urban", "suburban", "coast", "river",
               "desert", "industrial", "lake", "orchard")
PRETRAIN_SCENES = SCENE_TYPES[:6]
HELD_OUT_SCENES = SCENE_TYPES[6:]

SOIL, VEG, FOREST, WATER, ROAD, BUILDING = range(6)
_VEG = np.array([0.24, 0.40, 0.18])
_SOIL = np.array([0.55, 0.46, 0.35])
_FOREST = np.array([0.10, 0.24, 0.11])
_WATER = np.array([0.10, 0.18, 0.28])
_SAND = np.array([0.80, 0.70, 0.50])


def _grid(size):
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _jitter(rng, colour, amount=0.04):
    return colour + rng.normal(0, amount, 3)


def _ground(rng, size, soil=_SOIL, veg=_VEG, veg_share=0.5):
    """Soil / vegetation mix as smooth noise; returns (rgb, classes)."""
    mix = 0.6 * _smooth_field(rng, size, 3) + 0.4 * _smooth_field(rng, size, 9)
    is_veg = mix > np.quantile(mix, 1 - veg_share)
    rgb = np.where(is_veg[..., None], _jitter(rng, veg), _jitter(rng, soil)).astype(np.float32)
    rgb *= 1 + 0.15 * (_smooth_field(rng, size, 16)[..., None] - 0.5)
    return rgb, np.where(is_veg, VEG, SOIL).astype(np.uint8)


def _stripes(size, theta, period, yy, xx):
    return 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)


def _parcels(rng, rgb, cls, size, n, yy, xx):
    """Fields: a jittered grid of rectangular parcels, each a crop with row stripes."""
    edges = lambda: np.sort(np.r_[0, rng.choice(np.arange(4, size - 4), n - 1, replace=False), size])  # noqa: E731
    rows, cols = edges(), edges()
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            crop = rng.random() < 0.7
            colour = _jitter(rng, _VEG if crop else _SOIL, 0.07)
            tex = _stripes(size, rng.choice([0, np.pi / 2]), rng.uniform(2, 4), yy, xx)[r0:r1, c0:c1]
            rgb[r0:r1, c0:c1] = colour * (0.85 + 0.3 * tex[..., None])
            cls[r0:r1, c0:c1] = VEG if crop else SOIL


def _road(rng, rgb, cls, size, yy, xx, theta=None, offset=None, width=None):
    theta = rng.uniform(0, np.pi) if theta is None else theta
    width = rng.uniform(1.2, 2.5) * size / 64 if width is None else width
    offset = rng.uniform(0.15, 0.85) * size if offset is None else offset
    band = np.abs(xx * np.cos(theta) + yy * np.sin(theta) - offset) < width
    rgb[band] = 0.45 + rng.uniform(-0.06, 0.06)
    cls[band] = ROAD


def _buildings(rng, rgb, cls, size, count, big=False):
    occupied = cls == ROAD
    occupied |= cls == WATER
    for _ in range(count):
        box = _place_building(rng, size, occupied)
        if box is None:
            continue
        if big:  # industrial halls: grow the box where free
            top, left, h, w = box
            h, w = min(size - top - 1, h * 2), min(size - left - 1, w * 2)
            box = (top, left, h, w)
        _paint_building(rng, rgb, box)
        top, left, h, w = box
        cls[top:top + h, left:left + w] = BUILDING


def _water(rgb, cls, mask, rng):
    rgb[mask] = _jitter(rng, _WATER, 0.02) + 0.03 * rng.standard_normal((int(mask.sum()), 1))
    cls[mask] = WATER


def _crowns(rng, rgb, cls, size, yy, xx, spacing, regular):
    """Tree crowns: discs with a shaded side, on a grid (orchard) or scattered (forest)."""
    if regular:
        step = spacing
        cy, cx = np.mgrid[step / 2:size:step, step / 2:size:step]
        cy, cx = cy.ravel() + rng.normal(0, 0.3, cy.size), cx.ravel() + rng.normal(0, 0.3, cx.size)
    else:
        k = int(size * size / spacing ** 2)
        cy, cx = rng.uniform(0, size, k), rng.uniform(0, size, k)
    radius = spacing * (0.32 if regular else 0.6)
    for y, x in zip(cy, cx):
        d2 = (yy - y) ** 2 + (xx - x) ** 2
        disc = d2 < radius ** 2
        shade = 0.8 + 0.3 * ((xx - x) + (yy - y) < 0)
        rgb[disc] = (_jitter(rng, _FOREST, 0.03) * shade[disc][:, None])
        cls[disc] = FOREST


def make_scene(rng: np.random.Generator, size: int, scene: str, info: bool = False):
    """One scene of type ``scene``: (rgb float32 (size, size, 3) in [0, 1], classes uint8
    (size, size) indexing `CLASSES`); with ``info``, a third item: the acquisition's draws
    {"green": season shift in [-0.06, 0.06] (positive: greener), "haze": in [0, 0.2]}, from
    the same draws (the image is the same with or without it)."""
    yy, xx = _grid(size)
    if scene == "desert":
        rgb, cls = _ground(rng, size, soil=_SAND, veg=_SAND * 0.9, veg_share=0.1)
        cls[:] = SOIL
        warp = 6 * _smooth_field(rng, size, 3)
        dunes = _stripes(size, rng.uniform(0, np.pi), rng.uniform(6, 12), yy + warp, xx + warp)
        rgb *= (0.8 + 0.35 * dunes[..., None])
    else:
        share = {"forest": 0.8, "farmland": 0.5, "urban": 0.2, "industrial": 0.1}.get(scene, 0.45)
        rgb, cls = _ground(rng, size, veg_share=share)
    if scene == "farmland":
        _parcels(rng, rgb, cls, size, int(rng.integers(2, 5)), yy, xx)
        if rng.random() < 0.6:
            _road(rng, rgb, cls, size, yy, xx, theta=rng.choice([0, np.pi / 2]))
    elif scene == "forest":
        _crowns(rng, rgb, cls, size, yy, xx, spacing=rng.uniform(3.5, 5), regular=False)
        if rng.random() < 0.5:
            _road(rng, rgb, cls, size, yy, xx, width=1.0)
    elif scene == "urban":
        step = rng.uniform(14, 22) * size / 64
        for off in np.arange(rng.uniform(0, step), size, step):
            _road(rng, rgb, cls, size, yy, xx, theta=0.0, offset=off)
            _road(rng, rgb, cls, size, yy, xx, theta=np.pi / 2, offset=off)
        _buildings(rng, rgb, cls, size, 30)
    elif scene == "suburban":
        for _ in range(int(rng.integers(1, 3))):
            _road(rng, rgb, cls, size, yy, xx)
        _buildings(rng, rgb, cls, size, int(rng.integers(4, 9)))
        _crowns(rng, rgb, cls, size, yy, xx, spacing=9, regular=False)
    elif scene == "coast":
        theta = rng.uniform(0, 2 * np.pi)
        shore = xx * np.cos(theta) + yy * np.sin(theta) - size / 2 + 5 * (_smooth_field(rng, size, 4) - 0.5) * 4
        sand = (shore > -3) & (shore <= 0)
        rgb[sand] = _jitter(rng, _SAND, 0.03)
        cls[sand] = SOIL
        _water(rgb, cls, shore > 0, rng)
    elif scene == "river":
        theta = rng.uniform(0, np.pi)
        u = (xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)
        v = -(xx - size / 2) * np.sin(theta) + (yy - size / 2) * np.cos(theta)
        centre = rng.uniform(-8, 8) + rng.uniform(4, 10) * np.sin(2 * np.pi * u / rng.uniform(30, 60)
                                                                  + rng.uniform(0, 6))
        _water(rgb, cls, np.abs(v - centre) < rng.uniform(2.5, 5), rng)
    elif scene == "desert":
        if rng.random() < 0.5:
            _road(rng, rgb, cls, size, yy, xx, width=1.0)
    elif scene == "industrial":
        _road(rng, rgb, cls, size, yy, xx, theta=rng.choice([0, np.pi / 2]), width=3.0)
        lot = _smooth_field(rng, size, 3) > 0.6
        rgb[lot & (cls != ROAD)] = 0.55 + rng.uniform(-0.05, 0.05)
        cls[lot & (cls != ROAD)] = ROAD
        _buildings(rng, rgb, cls, size, 8, big=True)
    elif scene == "lake":
        lake = _smooth_field(rng, size, 2) > rng.uniform(0.5, 0.65)
        _crowns(rng, rgb, cls, size, yy, xx, spacing=8, regular=False)
        _water(rgb, cls, lake, rng)  # crowns end at the shore
    elif scene == "orchard":
        _crowns(rng, rgb, cls, size, yy, xx, spacing=rng.uniform(5, 7), regular=True)
    else:
        raise ValueError(f"unknown scene type {scene!r}; choose one of {SCENE_TYPES}")
    rgb, drawn = _acquisition(rng, rgb)
    return (rgb, cls, drawn) if info else (rgb, cls)


def _acquisition(rng, rgb):
    """Season, sun, haze and sensor: what changes between two images of one place; the
    image and the season and haze drawn."""
    green = rng.uniform(-0.06, 0.06)  # season: more or less green
    rgb = rgb + np.array([-green / 2, green, -green / 2])
    rgb = rgb * rng.uniform(0.8, 1.2) + rng.normal(0, 0.03, 3)  # sun and white balance
    haze = rng.uniform(0, 0.2)
    rgb = rgb * (1 - haze) + haze * 0.7
    rgb = rgb + rng.normal(0, 0.012, rgb.shape)
    return np.clip(rgb, 0, 1).astype(np.float32), {"green": float(green), "haze": float(haze)}


def scene_set(n: int, size: int = 64, scenes=PRETRAIN_SCENES, seed: int = 0):
    """n scenes with types drawn uniformly from ``scenes``: (images float32 (n, 3, size,
    size) in [0, 1], classes int64 (n, size, size), scene index into ``scenes`` (n,))."""
    if n <= 0 or size < 16:
        raise ValueError(f"need n > 0 and size >= 16, got n={n}, size={size}")
    unknown = [s for s in scenes if s not in SCENE_TYPES]
    if unknown:
        raise ValueError(f"unknown scene types {unknown}; choose from {SCENE_TYPES}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, size, size), np.float32)
    classes = np.empty((n, size, size), np.int64)
    labels = rng.integers(0, len(scenes), n)
    for i, k in enumerate(labels):
        rgb, cls = make_scene(rng, size, scenes[k])
        images[i], classes[i] = rgb.transpose(2, 0, 1), cls
    return torch.from_numpy(images), torch.from_numpy(classes), torch.from_numpy(labels)


def write_scene_images(folder, scene: str, n: int, size: int = 64, seed: int = 0) -> list:
    """Write ``n`` scenes of one type as PNG files ``{scene}_{i:03d}.png`` into ``folder``
    (created): DreamBooth's instance or class images, e.g. five held-out "lake" scenes for
    the embedded text-to-image model. Returns the paths."""
    from pathlib import Path

    from PIL import Image

    images, _, _ = scene_set(n, size, (scene,), seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{scene}_{i:03d}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths
