"""The embedded CLIP: the caption recipe, the open_clip registration, the shipped
weights and the paths that load them, and the pretraining script on a tiny run."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visionpeft.backbones  # noqa: F401  (registers embedded-clip)
from visionpeft.backbones import embedded_clip, load_backbone
from visionpeft.data.captions import CLASS_WORDS, TEMPLATES, caption_set, classes_by_area, scene_caption
from visionpeft.data.scenes import CLASSES, PRETRAIN_SCENES, scene_set

ROOT = Path(__file__).resolve().parents[1]
NAME = embedded_clip.NAME


def _script():
    path = ROOT / "scripts" / "pretrain_embedded_clip.py"
    spec = importlib.util.spec_from_file_location("pretrain_embedded_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _class_map(shares: dict[str, int]) -> np.ndarray:
    """A 40 x 40 map whose classes cover ``shares`` rows each (40 rows in all)."""
    rows = [CLASSES.index(name) for name, n in shares.items() for _ in range(n)]
    assert len(rows) == 40
    return np.repeat(np.array(rows, np.uint8)[:, None], 40, 1)


def test_captions_name_the_type_and_the_classes_by_area_and_repeat_under_a_seed():
    # vegetation 50%, soil 30%, road 17.5%, building 2.5% (under the 5% floor)
    cls = _class_map({"soil": 12, "vegetation": 20, "road": 7, "building": 1})
    assert classes_by_area(cls) == ["vegetation", "soil", "road"]
    assert classes_by_area(cls, max_classes=2) == ["vegetation", "soil"]
    assert classes_by_area(cls, min_share=0.01) == ["vegetation", "soil", "road", "building"]
    assert classes_by_area(_class_map({"water": 20, "forest": 20})) == ["forest", "water"]  # a tie: class order
    for seed in range(20):
        text = scene_caption("farmland", cls, np.random.default_rng(seed), bare_share=0.0)
        assert text == scene_caption("farmland", cls, np.random.default_rng(seed), bare_share=0.0)
        assert "farmland" in text and text.endswith(".")
        assert any(text.startswith(t.split("{scene}")[0]) for t in TEMPLATES)
        where = [min((text.find(w) for w in CLASS_WORDS[c] if w in text), default=-1)
                 for c in ("vegetation", "soil", "road")]
        assert -1 not in where and where == sorted(where), text  # every kept class, largest first
        assert not any(w in text for w in CLASS_WORDS["building"]), text
    assert scene_caption("farmland", cls, np.random.default_rng(0), bare_share=1.0) == "a satellite photo of farmland."
    assert scene_caption("coast", _class_map({"water": 40}), np.random.default_rng(1), bare_share=0.0) in {
        t.format(scene="coast", things="water") for t in TEMPLATES}
    with pytest.raises(ValueError, match="unknown scene type"):
        scene_caption("moon", cls, np.random.default_rng(0))
    with pytest.raises(ValueError, match="class indices"):
        scene_caption("farmland", cls + 10, np.random.default_rng(0))


def test_caption_set_is_seeded_and_holds_the_scene_set_images():
    images, captions, labels = caption_set(12, 32, seed=5)
    again = caption_set(12, 32, seed=5)
    assert torch.equal(images, again[0]) and captions == again[1] and torch.equal(labels, again[2])
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32) and len(captions) == 12
    ref, _, ref_labels = scene_set(12, 32, seed=5)
    assert torch.equal(images, (ref * 255).round().to(torch.uint8)) and torch.equal(labels, ref_labels)
    assert all(PRETRAIN_SCENES[k] in c for k, c in zip(labels.tolist(), captions))
    assert caption_set(12, 32, seed=6)[1] != captions


def test_the_config_registers_and_a_file_in_the_shipped_layout_loads_back_exactly(tmp_path):
    assert NAME in open_clip.list_models()
    cfg = open_clip.get_model_config(NAME)
    assert cfg["embed_dim"] == 64 and cfg["vision_cfg"]["image_size"] == 64
    torch.manual_seed(0)
    model = open_clip.create_model(NAME)
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=str(path))
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == OPENAI_DATASET_MEAN and tuple(norm.std) == OPENAI_DATASET_STD
    tokens = open_clip.get_tokenizer(NAME)(["a satellite photo of river."])
    assert tokens.shape == (1, 32)
    assert loaded.encode_text(tokens).shape == (1, 64)


def test_the_shipped_weights_load_through_open_clip_and_load_backbone():
    path = embedded_clip.weights_path()
    assert path.stat().st_size <= 20 * 2 ** 20
    model, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=str(path))
    shipped = load_file(str(path))
    assert set(shipped) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in shipped.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["model"] == NAME
    again = load_backbone("open_clip", NAME)
    assert not again.training and all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    random = load_backbone("open_clip", NAME, pretrained=False)
    assert not torch.equal(random.visual.conv1.weight, model.visual.conv1.weight)


def test_missing_weights_say_how_to_regenerate_them_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded_clip, "WEIGHTS_FILE", tmp_path / "gone.safetensors")
    for call in (embedded_clip.weights_path, lambda: load_backbone("open_clip", NAME)):
        with pytest.raises(FileNotFoundError, match="scripts/pretrain_embedded_clip.py") as err:
            call()
        assert "\n" not in str(err.value) and "gone.safetensors" in str(err.value)
    assert load_backbone("open_clip", NAME, pretrained=False) is not None  # random init needs no file


def test_the_task_is_seeded_and_registered():
    from visionpeft.train import build_task
    from visionpeft.train.pretrain_clip import ClipPretrainConfig, ClipPretrainTask

    def setup():
        torch.manual_seed(0)
        task = ClipPretrainTask(ClipPretrainConfig(pool_size=6, chunk=4))
        task.setup(torch.device("cpu"), torch.float32)
        return task

    a, b = setup(), setup()
    assert a.pool.captions == b.pool.captions and torch.equal(a.pool.images, b.pool.images)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    assert a.pool.tokens.shape == (6, 32) and set(a.pool.labels.tolist()) <= set(range(len(PRETRAIN_SCENES)))
    assert isinstance(build_task("pretrain_clip", {"pool_size": 8}), ClipPretrainTask)
    with pytest.raises(ValueError, match="pool_siz"):
        build_task("pretrain_clip", {"pool_siz": 8})


def test_a_tiny_pretraining_run_writes_the_weights_atomically_and_reports(tmp_path):
    out = tmp_path / "pkg" / "clip.safetensors"
    out.parent.mkdir()
    (out.parent / "other.txt").write_text("kept")
    summary = _script().main(["--steps", "4", "--pool", "48", "--batch", "16", "--lr", "2e-3", "--warmup", "1",
                              "--weights", str(out), "--docs", str(tmp_path / "docs"), "--eval-n", "24",
                              "--output-dir", str(tmp_path / "run"), "--threads", "1"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.safetensors", "other.txt"]  # no temporaries left
    trained = load_file(str(tmp_path / "run" / "adapter" / "clip.safetensors"))
    shipped = load_file(str(out))
    assert all(torch.equal(shipped[k], v) and v.dtype == torch.float32 for k, v in trained.items())
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["steps"] == "4" and f.metadata()["pool"] == "48"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    log = json.loads((tmp_path / "docs" / "embedded_clip_pretrain.json").read_text())
    assert log["steps"] == 4 and log["sha256"] == summary["sha256"] and log["curve"]
    assert (tmp_path / "docs" / "embedded_clip_loss.png").is_file()
    for part, chance in (("seen", 1 / 6), ("held_out", 1 / 4)):
        assert summary["zero_shot"][part]["chance"] == round(chance, 4)
    # the reported zero-shot accuracy, recomputed image by image through open_clip's own
    # preprocess (PIL in) from the written file
    from PIL import Image

    from visionpeft.data.scenes import HELD_OUT_SCENES

    model, _, preprocess = open_clip.create_model_and_transforms("embedded-clip", pretrained=str(out))
    tokenizer = open_clip.get_tokenizer("embedded-clip")
    images, _, labels = scene_set(24, 64, tuple(HELD_OUT_SCENES), seed=777)
    with torch.no_grad():
        text = F.normalize(model.encode_text(tokenizer([f"a satellite photo of {s}." for s in HELD_OUT_SCENES])),
                           dim=-1)
        right = 0
        for img, label in zip(images, labels):
            pil = Image.fromarray((img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            feat = F.normalize(model.encode_image(preprocess(pil)[None]), dim=-1)
            right += int((feat @ text.T).argmax() == label)
    assert summary["zero_shot"]["held_out"]["accuracy"] == round(right / 24, 4)
    # deterministic: the same settings write the same weights (the metadata holds the date)
    _script().main(["--steps", "4", "--pool", "48", "--batch", "16", "--lr", "2e-3", "--warmup", "1",
                            "--weights", str(tmp_path / "again.safetensors"), "--eval-n", "24", "--docs", "",
                            "--output-dir", str(tmp_path / "run2"), "--threads", "1"])  # docs: never the repo's
    twice = load_file(str(tmp_path / "again.safetensors"))
    assert twice.keys() == shipped.keys() and all(torch.equal(twice[k], v) for k, v in shipped.items())
