"""The text-to-image captions of the procedural scenes: the acquisition's season and haze
come back from the same draws (the images do not change), and `sd_caption` writes the
prefix, the classes by area, the season and the haze exactly as documented."""
import numpy as np
import pytest
import torch

from visionpeft.data.captions import caption_set, sd_caption
from visionpeft.data.scenes import CLASSES, PRETRAIN_SCENES, SCENE_TYPES, make_scene


def _class_map(shares: dict[str, int]) -> np.ndarray:
    rows = [CLASSES.index(name) for name, n in shares.items() for _ in range(n)]
    assert len(rows) == 40
    return np.repeat(np.array(rows, np.uint8)[:, None], 40, 1)


def test_make_scene_reports_its_season_and_haze_from_the_same_draws():
    for i, scene in enumerate(SCENE_TYPES):
        rgb, cls = make_scene(np.random.default_rng(i), 32, scene)
        rgb2, cls2, drawn = make_scene(np.random.default_rng(i), 32, scene, info=True)
        assert np.array_equal(rgb, rgb2) and np.array_equal(cls, cls2)
        assert -0.06 <= drawn["green"] <= 0.06 and 0 <= drawn["haze"] <= 0.2
    # haze pulls every pixel towards 0.7: the hazier of two draws has less contrast on average
    stds = [(make_scene(np.random.default_rng(s), 32, "urban", info=True)) for s in range(40)]
    hazy = [r.std() for r, _, d in stds if d["haze"] > 0.15]
    clear = [r.std() for r, _, d in stds if d["haze"] < 0.05]
    assert hazy and clear and np.mean(hazy) < np.mean(clear)


def test_sd_caption_writes_prefix_classes_season_and_haze():
    cls = _class_map({"soil": 12, "vegetation": 20, "road": 7, "building": 1})  # 50, 30, 17.5, 2.5 %
    rng = np.random.default_rng(0)
    plain = {"green": 0.0, "haze": 0.0}
    assert sd_caption("farmland", cls, plain, rng, things_share=0.0) == "a satellite image of farmland"
    assert sd_caption("farmland", cls, {"green": -0.05, "haze": 0.15}, rng, things_share=1.0) == \
        "a satellite image of farmland with vegetation, bare soil and roads in autumn, hazy"
    assert sd_caption("forest", _class_map({"forest": 30, "water": 10}), {"green": 0.04, "haze": 0.1}, rng,
                      things_share=1.0) == "a satellite image of forest with trees and water in summer"
    four = _class_map({"soil": 10, "vegetation": 10, "road": 10, "building": 10})
    assert sd_caption("urban", four, plain, rng, things_share=1.0) == \
        "a satellite image of urban with bare soil, vegetation and roads"  # at most 3, ties in class order
    # the thresholds are strict: at them, nothing is said
    assert sd_caption("coast", cls, {"green": 0.03, "haze": 0.12}, rng, things_share=0.0) == \
        "a satellite image of coast"
    with pytest.raises(ValueError, match="unknown scene type"):
        sd_caption("moon", cls, plain, rng)


def test_caption_set_sd_style_keeps_the_images_and_starts_every_caption_with_the_type():
    images, captions, labels = caption_set(16, 32, seed=3, style="sd")
    ref_images, ref_captions, ref_labels = caption_set(16, 32, seed=3)
    assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels) and captions != ref_captions
    for k, text in zip(labels.tolist(), captions):
        assert text.startswith(f"a satellite image of {PRETRAIN_SCENES[k]}"), text
        assert not any(h in text for h in SCENE_TYPES[6:]), text  # no held-out type is named
    assert caption_set(16, 32, seed=3, style="sd")[1] == captions
    with pytest.raises(ValueError, match="style must be"):
        caption_set(4, 32, style="dalle")
