"""Captions for the procedural scenes of `visionpeft.data.scenes`, written from the
generator's own labels: the scene type and the land-cover classes that cover the image.

The recipe (`scene_caption`) is pure and seeded: a scene type, its per-pixel class map
and a ``numpy.random.Generator`` give one caption, e.g.::

    a satellite photo of farmland with vegetation, bare soil and roads.
    an aerial view of coast: water, vegetation and bare soil.
    a satellite photo of urban.

1. The classes covering more than ``min_share`` of the pixels are kept, largest area
   first (ties in class order), at most ``max_classes`` of them.
2. Each kept class is written with one of its wordings in `CLASS_WORDS`.
3. One of `TEMPLATES` puts the scene type (its name in `SCENE_TYPES`, verbatim) and the
   list together; with probability ``bare_share`` the caption is the type alone,
   ``"a satellite photo of {scene}."``, the prompt zero-shot classification uses.

Everything true of a caption stays true under rotations and flips of the image (no
"left", "top", "north"), so these are safe augmentations for image-text training. The
rng only chooses wordings: which classes are named, and in which order, comes from the
labels alone. The embedded CLIP (`visionpeft.train.pretrain_clip`) is pretrained on
these captions.

`sd_caption` is the text-to-image wording: always starting "a satellite image of
{scene}" (so that this prefix alone is a prompt for the type), then with probability
``things_share`` " with " and the plain names of at most three classes, then the season
and haze the acquisition drew where they are strong enough to see: " in summer" (green
shift above ``season_at``), " in autumn" (below ``-season_at``), ", hazy" (haze above
``hazy_at``), e.g. "a satellite image of farmland with vegetation and roads in autumn".
"""
from __future__ import annotations

import numpy as np
import torch

from .scenes import CLASSES, PRETRAIN_SCENES, SCENE_TYPES, make_scene

# how each land-cover class may be named; the first wording is the plain one. The forest
# class is "trees", so that the word "forest" in a caption always means the scene type
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "soil": ("bare soil", "soil"),
    "vegetation": ("vegetation", "grass"),
    "forest": ("trees", "tree cover"),
    "water": ("water",),
    "road": ("roads", "a road"),
    "building": ("buildings", "houses"),
}
# {scene}: the scene type; {things}: the classes, e.g. "trees, water and roads"
TEMPLATES: tuple[str, ...] = (
    "a satellite photo of {scene} with {things}.",
    "an aerial view of {scene}: {things}.",
    "a satellite image of {scene}, showing {things}.",
    "{scene} seen from above, with {things}.",
)
BARE_TEMPLATE = "a satellite photo of {scene}."
SD_PREFIX = "a satellite image of {scene}"


def listed(words: list[str]) -> str:
    """``["a"]`` -> "a"; ``["a", "b", "c"]`` -> "a, b and c"."""
    if not words:
        raise ValueError("nothing to list")
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def classes_by_area(classes: np.ndarray, min_share: float = 0.05, max_classes: int = 4) -> list[str]:
    """The names of the classes covering more than ``min_share`` of ``classes`` (a map of
    indices into `CLASSES`), largest first, ties in class order; at most ``max_classes``
    and at least the largest one."""
    classes = np.asarray(classes)
    if classes.ndim != 2 or classes.size == 0:
        raise ValueError(f"classes must be a non-empty (H, W) map, got shape {classes.shape}")
    if classes.min() < 0 or classes.max() >= len(CLASSES):
        raise ValueError(f"class indices must lie in [0, {len(CLASSES)}), got {classes.min()}..{classes.max()}")
    share = np.bincount(classes.ravel().astype(np.int64), minlength=len(CLASSES)) / classes.size
    order = np.argsort(-share, kind="stable")  # stable: equal areas keep class order
    kept = [int(k) for k in order if share[k] > min_share][:max_classes]
    return [CLASSES[k] for k in (kept or order[:1])]


def scene_caption(scene: str, classes: np.ndarray, rng: np.random.Generator, min_share: float = 0.05,
                  max_classes: int = 4, bare_share: float = 0.1) -> str:
    """One caption for a scene of type ``scene`` whose pixels have land-cover ``classes``
    (H x W indices into `CLASSES`); ``rng`` picks the wording (see the module docstring)."""
    if scene not in SCENE_TYPES:
        raise ValueError(f"unknown scene type {scene!r}; choose one of {SCENE_TYPES}")
    names = classes_by_area(classes, min_share, max_classes)
    if rng.random() < bare_share:
        return BARE_TEMPLATE.format(scene=scene)
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    words = [CLASS_WORDS[n][int(rng.integers(len(CLASS_WORDS[n])))] for n in names]
    return template.format(scene=scene, things=listed(words))


def sd_caption(scene: str, classes: np.ndarray, drawn: dict, rng: np.random.Generator, things_share: float = 0.8,
               max_classes: int = 3, min_share: float = 0.05, season_at: float = 0.03,
               hazy_at: float = 0.12) -> str:
    """The text-to-image caption of a scene (module docstring): ``drawn`` is the
    acquisition's {"green", "haze"} from ``make_scene(..., info=True)``; ``rng`` only
    decides whether the classes are named."""
    if scene not in SCENE_TYPES:
        raise ValueError(f"unknown scene type {scene!r}; choose one of {SCENE_TYPES}")
    text = SD_PREFIX.format(scene=scene)
    if rng.random() < things_share:
        text += " with " + listed([CLASS_WORDS[n][0] for n in classes_by_area(classes, min_share, max_classes)])
    if drawn["green"] > season_at:
        text += " in summer"
    elif drawn["green"] < -season_at:
        text += " in autumn"
    if drawn["haze"] > hazy_at:
        text += ", hazy"
    return text


def caption_set(n: int, size: int = 64, scenes=PRETRAIN_SCENES, seed: int = 0, style: str = "clip",
                **caption_kwargs):
    """n captioned scenes, types drawn uniformly from ``scenes``: (images uint8 (n, 3, size,
    size), captions list of n str, scene index into ``scenes`` int64 (n,)).

    The images are those of ``scene_set(n, size, scenes, seed)`` (the same draws), as uint8
    (``round(255 x)``: a 20,000-scene pool takes 245 MB); the captions' wordings come from
    a second generator seeded from ``seed``, so they never shift the images.
    ``style``: "clip" (`scene_caption`) or "sd" (`sd_caption`); ``caption_kwargs`` go to it."""
    if style not in ("clip", "sd"):
        raise ValueError(f"style must be 'clip' or 'sd', got {style!r}")
    if n <= 0 or size < 16:
        raise ValueError(f"need n > 0 and size >= 16, got n={n}, size={size}")
    unknown = [s for s in scenes if s not in SCENE_TYPES]
    if unknown:
        raise ValueError(f"unknown scene types {unknown}; choose from {SCENE_TYPES}")
    rng = np.random.default_rng(seed)  # the draw order of scenes.scene_set
    words = np.random.default_rng([seed, 1])
    images = np.empty((n, 3, size, size), np.uint8)
    labels = rng.integers(0, len(scenes), n)
    captions = []
    for i, k in enumerate(labels):
        rgb, cls, drawn = make_scene(rng, size, scenes[k], info=True)
        images[i] = np.round(rgb.transpose(2, 0, 1) * 255)
        if style == "sd":
            captions.append(sd_caption(scenes[k], cls, drawn, words, **caption_kwargs))
        else:
            captions.append(scene_caption(scenes[k], cls, words, **caption_kwargs))
    return torch.from_numpy(images), captions, torch.from_numpy(labels)
