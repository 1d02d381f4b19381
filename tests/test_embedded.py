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
    """Two steps of each stage of the real script; the dense stage starts from the MAE
    stage's encoder, and the written file is the dense stage's encoder, which loads
    strictly into the registered architecture through timm's checkpoint path."""
    out = tmp_path / "weights.safetensors"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_embedded.py"), "--steps", "2",
                          "--dense-steps", "2", "--pool", "16", "--batch", "4", "--output-dir", str(tmp_path / "run"),
                          "--weights", str(out), "--docs", str(tmp_path / "docs"), "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "docs" / "embedded_loss_mae.png").is_file()
    assert (tmp_path / "docs" / "embedded_loss_dense.png").is_file()
    model = load_backbone("timm", "embedded-vit-s", checkpoint_path=str(out))
    sd = load_file(str(out))
    assert set(sd) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    mae, dense = (load_file(str(tmp_path / "run" / s / "encoder.safetensors")) for s in ("mae", "dense"))
    assert all(torch.equal(dense[k], sd[k]) for k in sd)
    assert not all(torch.equal(mae[k], sd[k]) for k in sd)  # the dense stage trained on from it


def test_dense_stage_needs_an_mae_encoder_and_a_valid_block_list():
    from visionpeft.train import PretrainConfig, PretrainTask

    with pytest.raises(ValueError, match="init_weights"):
        PretrainTask(PretrainConfig(objective="dense", pool_size=2)).setup("cpu", torch.float32)
    with pytest.raises(ValueError, match="objective"):
        PretrainConfig(objective="supervised")
    for bad in (5, ["2"]):
        with pytest.raises(ValueError, match="dense_blocks must be a list"):
            PretrainConfig(objective="dense", dense_blocks=bad)
    with pytest.raises(ValueError, match="is not a file"):
        PretrainConfig(objective="dense", init_weights="/nowhere/mae.safetensors")
    from visionpeft.train.pretrain import DenseLandCover

    with pytest.raises(ValueError, match="dense_blocks"):
        DenseLandCover(timm.create_model("embedded_vit_s"), 6, 6, (6,))


def test_dense_head_logits_are_each_pixels_own_slice_of_its_patch_token():
    """The per-pixel logits against a loop over pixels: pixel (y, x) reads the head output
    of token (y // p, x // p) at offset ((y % p) * p + x % p) * K + k; every block is read
    through the encoder's final norm, as timm's forward_intermediates(norm=True) gives it."""
    from visionpeft.train.pretrain import DenseLandCover

    torch.manual_seed(0)
    enc = timm.create_model("embedded_vit_s", img_size=32, depth=3).eval()
    model = DenseLandCover(enc, 6, 5, (0, -1)).eval()
    img = torch.randn(2, 3, 32, 24)  # a non-square grid: 8 x 6 tokens
    with torch.no_grad():
        dense, scene = model(img)
        x = enc.norm_pre(enc._pos_embed(enc.patch_embed(img)))
        t0 = enc.norm(enc.blocks[0](x))
        t_last = enc.norm(enc.blocks[2](enc.blocks[1](enc.blocks[0](x))))
        inter = enc.forward_intermediates(img, indices=[0, 2], intermediates_only=True, norm=True,
                                          output_fmt="NLC")
    torch.testing.assert_close(inter[0], t0[:, 1:])  # the features the dense pipelines read
    p, k = 4, 5
    for out, tokens, head in ((dense[0], t0, model.heads[0]), (dense[1], t_last, model.heads[1])):
        assert out.shape == (2, k, 32, 24)
        flat = head(tokens[:, 1:])  # (B, 8 * 6, p * p * K)
        for y in range(32):
            for xx in range(24):
                ref = flat[:, (y // p) * 6 + xx // p, ((y % p) * p + xx % p) * k:((y % p) * p + xx % p + 1) * k]
                torch.testing.assert_close(out[:, :, y, xx], ref)
    torch.testing.assert_close(scene, model.scene_head(t_last[:, 0]))


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
