"""``task: segmentation`` end to end on the synthetic domain-generalisation set: training
with validation on source and target, the best checkpoint, evaluate-seg against metrics
computed here from its own predictions, predict-seg, and refused configs."""
import json

import numpy as np
import pytest
import torch
from conftest import assert_best_is_checkpoint
from PIL import Image

from visionpeft.cli import main
from visionpeft.core.model_ops import get_state
from visionpeft.data.segmentation import SegmentationDataset, find_split, write_synthetic_segmentation
from visionpeft.pipelines.segmentation import SegmentationConfig, load_segmenter, predict_probs
from visionpeft.train import TrainingError, run_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    write_synthetic_segmentation(root, n_train=8, n_val=2, n_test=2, size=32, seed=0)
    return root


def _config(data, out, **kw):
    cfg = {"task": "segmentation", "dataset": "synthetic", "data_root": str(data), "source_domain": "source",
           "target_domain": "target", "num_classes": 6, "image_size": 32,
           "backbone": {"name": "timm_vit", "source": "tiny"},
           "adapter": {"method": "earth_adapter", "bottleneck": 4, "frequency_blocks": [1],
                       "target_modules": ["re:blocks\\.\\d+"]},
           "decoder": {"name": "upernet", "channels": 16}, "train_batch_size": 4, "max_train_steps": 4,
           "learning_rate": 1e-3, "validation_steps": 2, "checkpointing_steps": 2, "seed": 0, "cpu": True,
           "output_dir": str(out)}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    run_config(_config(data, out))
    return out


def test_training_validates_on_source_and_target_and_keeps_the_best_on_the_source(trained):
    rows = [json.loads(line) for line in (trained / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["selected_on"] == "source" and {"source_miou", "target_miou", "target_oa"} <= set(r) for r in rows)
    best_step = max(rows, key=lambda r: r["source_miou"])["step"]  # the first of equals
    saved = json.loads((trained / "best" / "seg_config.json").read_text())
    assert saved["classes"] == ["soil", "vegetation", "forest", "water", "road", "building"]
    # best/ holds the weights of that step's checkpoint (decoder and adapter), and not the other's
    from safetensors.torch import load_file

    other = 4 if best_step == 2 else 2
    for name in ("decoder.safetensors", "encoder/adapter_model.safetensors"):
        best = load_file(str(trained / "best" / name))
        same = load_file(str(trained / f"checkpoint-{best_step}" / name))
        assert best.keys() == same.keys() and all(torch.equal(best[k], same[k]) for k in best)
    later = load_file(str(trained / f"checkpoint-{other}" / "decoder.safetensors"))
    assert any(not torch.equal(best_k, later[k]) for k, best_k in load_file(
        str(trained / "best" / "decoder.safetensors")).items())


def test_a_decoder_file_that_does_not_fit_is_refused(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(trained / "best", bad)
    weights = load_file(str(bad / "decoder.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("head.")}, str(bad / "decoder.safetensors"))
    with pytest.raises(ValueError, match="does not fit this decoder.*missing \\['head"):
        load_segmenter(bad)


def test_evaluate_seg_equals_a_confusion_counted_here(trained, data, tmp_path):
    out = tmp_path / "m" / "metrics.json"
    assert main(["evaluate-seg", "--checkpoint", str(trained), "--data-root", str(data), "--domain", "target",
                 "--split", "test", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    assert {"oa", "miou", "mf1", "per_class_iou", "per_class_f1"} <= set(got)
    model, cfg = load_segmenter(trained)
    split = find_split("synthetic", data, "test", domain="target")
    cm = np.zeros((6, 6), dtype=np.int64)
    for item in SegmentationDataset(split):
        pred = predict_probs(model, item["image"][None], 32)[0].argmax(0).numpy()
        keep = item["mask"].numpy() != 255
        np.add.at(cm, (item["mask"].numpy()[keep], pred[keep]), 1)
    tp = np.diag(cm).astype(float)
    present = (cm.sum(0) + cm.sum(1)) > 0
    iou = tp / (cm.sum(0) + cm.sum(1) - tp).clip(min=1)
    assert got["oa"] == pytest.approx(tp.sum() / cm.sum())
    assert got["miou"] == pytest.approx(iou[present].mean())


def test_predict_seg_writes_class_indices_and_an_overlay(trained, data, tmp_path, capsys):
    image = sorted((data / "target" / "test" / "images").iterdir())[0]
    mask, overlay = tmp_path / "o" / "mask.png", tmp_path / "o" / "overlay.png"
    assert main(["predict-seg", "--checkpoint", str(trained), str(image), "-o", str(mask),
                 "--overlay", str(overlay)]) == 0
    m = np.asarray(Image.open(mask))
    assert m.shape == (32, 32) and m.max() < 6
    assert Image.open(overlay).size[1] > 32  # the legend below the image
    assert "soil" in capsys.readouterr().out


def test_select_on_target_picks_the_best_target_validation(data, tmp_path):
    out = tmp_path / "t"
    run_config(_config(data, out, select_on="target", max_train_steps=4, adapter=None,
                       decoder={"name": "linear"}))
    rows = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert all(r["selected_on"] == "target" for r in rows)
    assert not (out / "best" / "encoder").exists()  # a frozen encoder: the probe alone is saved
    model, _ = load_segmenter(out)
    assert not any(p.requires_grad for p in model.host.parameters())


@pytest.mark.parametrize("change,message", [
    ({"decoder": {"name": "segformer"}}, "decoder.name must be one of"),
    ({"select_on": "target", "target_domain": None}, "needs a target"),
    ({"num_clases": 6}, "did you mean num_classes"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2"),
])
def test_bad_configs_are_refused_in_one_line(data, tmp_path, change, message):
    values = {k: v for k, v in _config(data, tmp_path / "x").items()
              if k in {f for f in SegmentationConfig.__dataclass_fields__} or k in change}
    values.update(change)
    with pytest.raises(ValueError, match=message):
        SegmentationConfig.from_dict(values)


@pytest.mark.parametrize("method,expect", [("earth_adapter", "blocks"), ("lora", "attn.qkv")])
def test_an_adapter_without_targets_takes_the_host_preset(data, tmp_path, method, expect):
    out = tmp_path / method
    run_config(_config(data, out, max_train_steps=2, adapter={"method": method}))
    saved = json.loads((out / "best" / "seg_config.json").read_text())["adapter"]["target_modules"]
    assert any(expect in t for t in saved)
    model, _ = load_segmenter(out)
    assert [c.method for c in get_state(model.host).configs.values()] == [method]


def test_an_ignore_index_the_data_does_not_use_stops_before_training(data, tmp_path):
    with pytest.raises(TrainingError, match="ignore_index is 254 but synthetic's masks mark ignored pixels with 255"):
        run_config(_config(data, tmp_path / "z", ignore_index=254))


def test_a_class_count_that_does_not_match_the_data_stops_before_training(data, tmp_path):
    with pytest.raises(TrainingError, match="num_classes is 5 but synthetic has 6 classes"):
        run_config(_config(data, tmp_path / "y", num_classes=5))


def test_two_processes_train_earth_adapter_without_unused_parameters(data, tmp_path):
    """Two DDP processes on CPU (gloo) through accelerate launch. DDP runs without
    find_unused_parameters, so a trainable parameter outside the graph (the official code's
    E2, E3 and router in blocks without the frequency split) would stop the second step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(data, tmp_path / "ddp", max_train_steps=3, train_batch_size=2,
                                          validation_steps=3, checkpointing_steps=3)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "visionpeft.cli", "train", str(cfg)],
                         env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    sums = json.loads((tmp_path / "ddp" / "train_report.json").read_text())["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


@pytest.mark.parametrize("name", ["seg_synthetic_earth.yaml", "seg_loveda_r2u_dinov2_earth.yaml",
                                  "seg_potsdam2vaihingen_dinov2_earth.yaml"])
def test_every_shipped_config_is_a_valid_segmentation_config(name):
    from pathlib import Path

    import yaml

    from visionpeft.train.loop import TrainConfig

    values = yaml.safe_load((Path(__file__).parents[1] / "configs" / name).read_text())
    assert values.pop("task") == "segmentation"
    loop = {f for f in TrainConfig.__dataclass_fields__}
    cfg = SegmentationConfig.from_dict({k: v for k, v in values.items() if k not in loop})
    TrainConfig(**{k: v for k, v in values.items() if k in loop})
    assert cfg.adapter["method"] == "earth_adapter"


def test_a_resumed_run_redoes_the_validations_after_its_checkpoint(data, tmp_path):
    out = tmp_path / "r"
    run_config(_config(data, out, max_train_steps=2, adapter=None, decoder={"name": "linear"}))
    (out / "val_metrics.jsonl").write_text((out / "val_metrics.jsonl").read_text() + '{"step": 3}\n')  # a later row
    run_config(_config(data, out, max_train_steps=4, adapter=None, decoder={"name": "linear"},
                       resume_from_checkpoint="latest"))
    rows = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


def test_base_scale_halves_what_the_model_sees_and_answers_at_full_size(data, tmp_path):
    """base_scale 0.5 (mmseg's LoveDA recipe): evaluation runs the model on the half-size
    image and brings the probabilities back to the labels' size."""
    out = tmp_path / "s"
    run_config(_config(data, out, max_train_steps=2, adapter=None, decoder={"name": "linear"}, base_scale=0.5,
                       image_size=32))
    model, cfg = load_segmenter(out)
    assert cfg["base_scale"] == 0.5
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    image = torch.rand(1, 3, 64, 64)
    probs = predict_probs(model, image, 32, scale=0.5)
    assert probs.shape == (1, 6, 64, 64) and seen == [(32, 32)]
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 64, 64))
    half = predict_probs(model, torch.nn.functional.interpolate(image, scale_factor=0.5, mode="bilinear"), 32)
    up = torch.nn.functional.interpolate(half, size=(64, 64), mode="bilinear")
    torch.testing.assert_close(probs, up)


def test_empty_targets_with_modules_to_save_fine_tune_those_modules_whole(data, tmp_path):
    """target_modules: [] + modules_to_save is full fine-tuning of the named modules; it
    must not fall back to the host preset (which would add a LoRA on qkv)."""
    out = tmp_path / "full"
    adapter = {"method": "lora", "target_modules": [], "modules_to_save": ["blocks.0", "norm"]}
    run_config(_config(data, out, max_train_steps=2, adapter=adapter))
    saved = json.loads((out / "best" / "seg_config.json").read_text())["adapter"]
    assert saved["target_modules"] == [] and saved["modules_to_save"] == ["blocks.0", "norm"]
    model, _ = load_segmenter(out)
    assert not any("qkv.adapters" in n or "lora" in n.lower() for n, _ in model.host.named_parameters())
    from visionpeft.pipelines.change_detection.task import build_backbone

    fresh = dict(build_backbone({"name": "timm_vit", "source": "tiny"}).named_parameters())
    trained = dict(model.host.named_parameters())
    copies = {n.replace("copies.default.", ""): p for n, p in trained.items() if ".copies.default." in n}
    assert {n.split(".copies")[0] for n in trained if ".copies.default." in n} == {"blocks.0", "norm"}
    assert all(not torch.equal(copies[n], fresh[n]) for n in copies if n.startswith("blocks.0.") and "weight" in n)
    assert all(torch.equal(p, fresh[n]) for n, p in trained.items() if n.startswith("blocks.1."))

    with pytest.raises(ValueError, match="train nothing"):
        run_config(_config(data, tmp_path / "none", adapter={"method": "lora", "target_modules": []}))


def test_segmentation_benchmark_smoke(monkeypatch):
    """Every variant of scripts/bench_seg.py for 2 steps on tiny data, and the cost part on
    a toy-width encoder: it runs and every number is finite (no quality threshold: that is
    docs/QUALITY.md's job)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_seg

    result = bench_seg.main(["--smoke", "--threads", "1"])
    q = result["quality"]["variants"]
    assert set(q) == set(bench_seg.VARIANTS)
    assert all(np.isfinite(q[v][k]["mean"]) for v in q for k in ("source_miou", "target_miou"))
    assert q["frozen"]["encoder_params"] == 0 and q["full"]["encoder_params"] > 50 * q["lora"]["encoder_params"]
    budgets = [q[v]["encoder_params"] for v in ("earth_adapter", "earth_no_split", "lora", "adapter")]
    assert max(budgets) / min(budgets) < 1.1  # matched budgets
    assert set(result["cost"]["step"]) == set(bench_seg.COST_VARIANTS)


def _rows(out):
    return [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]


def test_evaluate_seg_reproduces_the_validation_with_the_checkpoints_tiles_stride_and_scale(tmp_path):
    """README: evaluate-seg reuses the checkpoint's cut_tiles, eval_stride and base_scale,
    so it reproduces the validation's figures. Non-default values of all three (96 px
    images cut into 80 px tiles, seen at 0.75, windows of 32 every 5 px): evaluate-seg on
    each checkpoint's val split gives that step's val_metrics.jsonl row, source and target.
    Each setting matters here (dropping any one of them changes the figures), so a reader
    that lost one would be caught."""
    from visionpeft.pipelines.segmentation import evaluate

    data = tmp_path / "data"
    write_synthetic_segmentation(data, n_train=4, n_val=2, n_test=1, size=96, seed=1)
    out = tmp_path / "out"
    run_config(_config(data, out, cut_tiles=80, eval_stride=5, base_scale=0.75, adapter=None,
                       decoder={"name": "linear"}, learning_rate=3e-2))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        ckpt = out / f"checkpoint-{row['step']}"
        for domain in ("source", "target"):
            got_file = tmp_path / f"{row['step']}-{domain}.json"
            assert main(["evaluate-seg", "--checkpoint", str(ckpt), "--data-root", str(data), "--domain", domain,
                         "--split", "val", "--output", str(got_file)]) == 0
            got = json.loads(got_file.read_text())
            for k in ("oa", "miou", "mf1"):
                assert got[k] == pytest.approx(row[f"{domain}_{k}"], rel=1e-9, abs=1e-12), (row["step"], domain, k)
    model, cfg = load_segmenter(out / "checkpoint-4")
    assert (cfg["cut_tiles"], cfg["eval_stride"], cfg["base_scale"]) == (80, 5, 0.75)
    row = rows[-1]
    for dropped in ("cut_tiles", "eval_stride", "base_scale"):
        figures = []
        for domain in ("source", "target"):
            split = find_split("synthetic", data, "val", domain=domain)
            m = evaluate(model, SegmentationDataset(split, tile=None if dropped == "cut_tiles" else 80), 32, 6, 255,
                         None if dropped == "eval_stride" else 5, scale=1.0 if dropped == "base_scale" else 0.75)
            figures += [(m[k], row[f"{domain}_{k}"]) for k in ("oa", "miou", "mf1")]
        assert any(a != pytest.approx(b, rel=1e-9) for a, b in figures), dropped


def test_select_on_target_keeps_the_checkpoint_of_the_highest_target_miou(data, tmp_path, monkeypatch):
    """The validation's real metrics with their mIoU replaced by fixed sequences (the
    source's best at step 1, the target's at step 2, neither the last): with select_on:
    target, best/ holds step 2's adapter and decoder, and no other step's."""

    from visionpeft.pipelines.segmentation import task as seg_task

    real = seg_task.evaluate
    mious = iter([0.5, 0.2, 0.1, 0.6, 0.3, 0.4])  # (source, target) at steps 1, 2, 3

    def scripted(*args, **kwargs):
        return {**real(*args, **kwargs), "miou": next(mious)}

    monkeypatch.setattr(seg_task, "evaluate", scripted)
    out = tmp_path / "t"
    run_config(_config(data, out, select_on="target", max_train_steps=3, validation_steps=1, checkpointing_steps=1,
                       adapter={"method": "lora", "r": 2, "target_modules": ["qkv"]}))
    rows = _rows(out)
    assert [(r["step"], r["source_miou"], r["target_miou"]) for r in rows] == [(1, 0.5, 0.2), (2, 0.1, 0.6),
                                                                              (3, 0.3, 0.4)]
    best_step = max(rows, key=lambda r: r["target_miou"])["step"]
    assert_best_is_checkpoint(out, best_step, (1, 2, 3))


def test_eval_stride_defaults_to_two_thirds_of_the_window(trained):
    """With no stride, windows of 32 start every 32 * 2 // 3 = 21 px, plus one flush with
    the far border: the model is called on exactly those windows, through predict_probs
    and through evaluate (the validation's and evaluate-seg's path). Each pixel of the
    spied image holds its own coordinates, so each window says where it was cut."""
    from visionpeft.pipelines.segmentation import evaluate

    model, cfg = load_segmenter(trained)
    tile, (h, w) = cfg["image_size"], (75, 53)
    assert tile == 32 and cfg["eval_stride"] is None
    stride = tile * 2 // 3

    def starts(size):
        return sorted({*range(0, size - tile + 1, stride), size - tile})

    expect = sorted((y, x) for y in starts(h) for x in starts(w))
    assert expect == sorted((y, x) for y in (0, 21, 42, 43) for x in (0, 21))
    image = torch.zeros(1, 3, h, w)
    image[0, 0] = torch.arange(h, dtype=torch.float32)[:, None]
    image[0, 1] = torch.arange(w, dtype=torch.float32)[None, :]
    seen = []

    def spy(module, args):
        crop = args[0]
        assert crop.shape[-2:] == (tile, tile)
        seen.append((int(crop[0, 0, 0, 0]), int(crop[0, 1, 0, 0])))

    handle = model.register_forward_pre_hook(spy)
    try:
        predict_probs(model, image, tile)
        assert sorted(seen) == expect
        seen.clear()
        evaluate(model, [{"image": image[0], "mask": torch.zeros(h, w, dtype=torch.long)}], tile, 6, 255)
        assert sorted(seen) == expect
    finally:
        handle.remove()
