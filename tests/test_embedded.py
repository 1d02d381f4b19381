"""The embedded pretrained encoder: its scenes, its pretraining task, the shipped weights
and the paths that load them; the quality benchmark as a smoke test."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

import visionpeft as vp
from visionpeft.backbones.embedded import weights_file
from visionpeft.backbones.loaders import load_backbone
from visionpeft.data.scenes import CLASSES, HELD_OUT_SCENES, PRETRAIN_SCENES, SCENE_TYPES, make_scene, scene_set

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = weights_file("embedded_vit_s")


def test_scenes_are_deterministic_valid_and_every_type_draws_its_classes():
    a, b = scene_set(12, 32, SCENE_TYPES, seed=3), scene_set(12, 32, SCENE_TYPES, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    img, cls, lab = a
    assert img.shape == (12, 3, 32, 32) and img.min() >= 0 and img.max() <= 1
    assert cls.min() >= 0 and cls.max() < len(CLASSES) and lab.max() < len(SCENE_TYPES)
    expect = {"urban": "building", "coast": "water", "river": "water", "forest": "forest",
              "orchard": "forest", "industrial": "building", "lake": "water", "farmland": "vegetation"}
    rng = np.random.default_rng(0)
    for scene, cls_name in expect.items():
        _, classes = make_scene(rng, 64, scene)
        assert (classes == CLASSES.index(cls_name)).mean() > 0.02, scene
    assert not set(PRETRAIN_SCENES) & set(HELD_OUT_SCENES)
    with pytest.raises(ValueError, match="unknown scene"):
        scene_set(2, 32, ["moon"])


def test_the_pretraining_task_runs_and_its_encoder_loads_through_timm(tmp_path):
    """Two steps of the real script; the written encoder file loads strictly into the
    registered architecture through timm's checkpoint path."""
    out = tmp_path / "weights.safetensors"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_embedded.py"), "--steps", "2",
                          "--pool", "16", "--batch", "4", "--output-dir", str(tmp_path / "run"),
                          "--weights", str(out), "--docs", str(tmp_path / "docs"), "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "docs" / "embedded_loss.png").is_file()
    model = load_backbone("timm", "embedded-vit-s", checkpoint_path=str(out))
    sd = load_file(str(out))
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="embedded weights not generated yet")
def test_the_shipped_weights_load_the_same_through_every_path():
    assert WEIGHTS.stat().st_size <= 20 * 2 ** 20
    direct = timm.create_model("embedded_vit_s", pretrained=True)
    via_loader = load_backbone("timm", "embedded-vit-s")
    from visionpeft.pipelines.change_detection.task import build_backbone

    via_config = build_backbone({"name": "embedded-vit-s", "pretrained": True})
    sd = load_file(str(WEIGHTS))
    for model in (direct, via_loader, via_config):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    random = timm.create_model("embedded_vit_s", pretrained=False)
    assert not torch.equal(random.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    # adapters go on it like on any timm ViT
    vp.inject(via_loader, vp.LoRAConfig(r=2, target_modules=vp.presets.TIMM_VIT_QKV))
    assert via_loader(torch.rand(1, 3, 64, 64)).shape == (1, 192)


def test_missing_weights_say_how_to_make_them(monkeypatch, tmp_path):
    import visionpeft.backbones.embedded as emb

    monkeypatch.setattr(emb, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrain_embedded.py"):
        load_backbone("timm", "embedded-vit-s")


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="embedded weights not generated yet")
def test_quality_benchmark_smoke(monkeypatch):
    """Every task x variant for 2 steps: the pipeline runs and every number is finite
    (no quality threshold: that is what docs/QUALITY.md reports)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # for bench_quality's own lazy imports too
    import bench_quality

    result = bench_quality.main(["--smoke", "--threads", "1"])
    assert set(result["variants"]) == set(bench_quality.VARIANTS)
    for row in result["variants"].values():
        for task in ("scenes_cls", "scenes_seg", "change"):
            assert all(np.isfinite(s["mean"]) for k, s in row[task].items() if k != "runs")
    budgets = {v: row["scenes_cls"]["encoder_params"]["mean"] for v, row in result["variants"].items()}
    assert budgets["linear_probe"] == 0 and budgets["full"] > 100 * budgets["lora"]
    assert all(15_000 < budgets[v] < 21_000 for v in budgets if v not in ("linear_probe", "full"))
