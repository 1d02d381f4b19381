"""``task: point_classification``: a short run on procedural shapes end to end (Point-PEFT's
memory bank built, frozen BN statistics kept, metrics recomputed from the checkpoint), the
recipe's defaults, the augmentations and the config refusals."""
import json
import math

import numpy as np
import pytest
import torch

import visionpeft as vp
from visionpeft.data.points import augment, resample
from visionpeft.pipelines.pointcloud import PointClassificationConfig, PointClassificationTask, load_classifier
from visionpeft.train import run_config

SMALL = {"task": "point_classification", "dataset": "synthetic", "num_points": 128, "per_class": 4,
         "classes": ["sphere", "box", "torus"],
         "backbone": {"name": "point-mae", "pretrained": False, "num_group": 16, "group_size": 16, "dim": 36,
                      "depth": 3, "heads": 6},
         "epochs": 2, "train_batch_size": 4, "checkpointing_steps": 100, "seed": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("points") / "out"
    result = run_config({**SMALL, "output_dir": str(out)})
    return out, result


def test_short_run_writes_a_checkpoint_whose_metrics_recompute(trained):
    out, result = trained
    assert result.step == 2 * (12 // 4)  # 2 epochs of 3 full batches
    metrics = json.loads((out / "metrics.json").read_text())
    model, cfg = load_classifier(out)
    assert cfg["classes"] == ["sphere", "box", "torus"] and cfg["groups"] == [16, 16]
    task = PointClassificationTask(PointClassificationConfig.from_dict(
        {k: v for k, v in SMALL.items() if k not in ("task", "epochs", "train_batch_size", "checkpointing_steps")}))
    test = task.split("test")
    right = {c: [0, 0] for c in cfg["classes"]}
    with torch.no_grad():
        for cloud, label in zip(test.clouds, test.labels):
            points = torch.from_numpy(resample(cloud, 128, None))[None]
            pred = int(model(points).argmax())
            right[cfg["classes"][label]][0] += pred == label
            right[cfg["classes"][label]][1] += 1
    acc = sum(r for r, _ in right.values()) / sum(n for _, n in right.values())
    assert metrics["accuracy"] == pytest.approx(acc) and metrics["clouds"] == len(test)
    assert metrics["mean_class_accuracy"] == pytest.approx(np.mean([r / n for r, n in right.values()]))
    # Point-PEFT's bank: the 12 training clouds' frozen features, saved with the adapter
    assert vp.core.model_ops.get_state(model).configs["default"].bank_size == 12
    assert metrics["trainable_parameters"] == vp.trainable_parameters(model)


def test_frozen_batch_norms_keep_their_statistics():
    task = PointClassificationTask(PointClassificationConfig.from_dict(
        {k: v for k, v in SMALL.items() if k not in ("task", "epochs", "train_batch_size", "checkpointing_steps")}))
    task.setup(torch.device("cpu"), torch.float32)
    host_bn = task.model.encoder.first_conv[1]
    before = host_bn.running_mean.clone()
    task.model.train()
    points, labels = next(iter(torch.utils.data.DataLoader(task.train_dataset(), batch_size=4)))
    loss, logs = task.loss({"points": task.model}, (points, labels))
    loss.backward()
    assert torch.equal(host_bn.running_mean, before) and not host_bn.training
    assert task.model.head.copies["default"][1].training  # the trained head's BN trains


def test_recipe_defaults_follow_point_mae():
    task = PointClassificationTask(PointClassificationConfig.from_dict(
        {"dataset": "synthetic", "per_class": 16, "classes": ["box", "cone"], "epochs": 300}))
    d = task.loop_defaults({})
    assert (d["learning_rate"], d["adam_weight_decay"], d["max_grad_norm"], d["train_batch_size"]) == \
        (5e-4, 0.05, 10.0, 32)
    assert d["max_train_steps"] == 300 and d["lr_warmup_steps"] == 10 and d["lr_scheduler"] == "cosine"
    cfg = PointClassificationConfig(dataset="scanobjectnn", data_root="x")
    assert cfg.num_points == 2048 and cfg.groups == (128, 32) and cfg.adapter == {"method": "point_peft"}
    lora = PointClassificationConfig(dataset="synthetic", adapter={"method": "lora", "r": 4})
    assert lora.adapter["target_modules"] == list(vp.presets.TIMM_VIT_QKV) and lora.adapter["modules_to_save"] == \
        ["head"]
    # synthetic test split: a quarter of per_class per shape, or test_per_class
    sizes = {}
    for extra in ({}, {"test_per_class": 3}):
        task = PointClassificationTask(PointClassificationConfig.from_dict(
            {"dataset": "synthetic", "per_class": 8, "classes": ["box", "cone"], "num_points": 64, **extra}))
        sizes[len(extra)] = (len(task.split("train")), len(task.split("test")))
    assert sizes == {0: (16, 4), 1: (16, 6)}
    # max_train_steps instead of epochs: the warm-up keeps its 10-of-300 share of the run
    task = PointClassificationTask(PointClassificationConfig.from_dict(
        {"dataset": "synthetic", "per_class": 16, "classes": ["box", "cone"]}))
    assert task.loop_defaults({"max_train_steps": 600})["lr_warmup_steps"] == 20
    assert task.loop_defaults({})["lr_warmup_steps"] == 10  # 10 epochs of one step


def test_augmentations_and_resampling():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(300, 3)).astype(np.float32)
    out = augment(cloud, "scanobjectnn", np.random.default_rng(1))
    r = np.random.default_rng(1)
    scale = r.uniform(0.9, 1.1, size=3)
    a = r.uniform(-math.pi, math.pi)
    scaled = cloud * scale
    np.testing.assert_allclose(out[:, 1], scaled[:, 1], atol=1e-5)  # a rotation about y keeps y
    np.testing.assert_allclose(np.hypot(out[:, 0], out[:, 2]), np.hypot(scaled[:, 0], scaled[:, 2]), atol=1e-5)
    np.testing.assert_allclose(out[0, 0], math.cos(a) * scaled[0, 0] + math.sin(a) * scaled[0, 2], atol=1e-5)
    moved = augment(cloud, "modelnet40", np.random.default_rng(2))
    r = np.random.default_rng(2)
    np.testing.assert_allclose(moved, cloud * r.uniform(2 / 3, 3 / 2, 3) + r.uniform(-0.2, 0.2, 3), atol=1e-5)
    test = resample(cloud, 100, None)  # FPS: first point first, no repeats
    assert np.array_equal(test[0], cloud[0]) and len(np.unique(test, axis=0)) == 100
    train = resample(cloud, 100, np.random.default_rng(3))
    assert train.shape == (100, 3) and len(np.unique(train, axis=0)) == 100
    small = cloud[:50]
    for rng in (None, np.random.default_rng(4)):  # a small cloud: every point kept, padded with its own
        padded = resample(small, 100, rng)
        assert padded.shape == (100, 3) and {tuple(p) for p in padded} == {tuple(p) for p in small}
    assert np.array_equal(resample(cloud[:100], 100, None), cloud[:100])  # n of n: as it is


def test_training_draws_replay_by_epoch_and_index():
    from visionpeft.data.points import PointClouds
    from visionpeft.data.shapes import make_shape_split

    split = make_shape_split(["box", "cone"], 2, 200, seed=0)
    a, b = (PointClouds(split, 100, "scanobjectnn", train=True, seed=3) for _ in range(2))
    for ds in (a, b):
        ds.set_epoch(2)
    assert torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][0], a[1][0])  # a resumed run, or another worker
    b.set_epoch(3)
    assert not torch.equal(a[1][0], b[1][0])


def test_weight_decay_spares_1d_tensors_biases_and_tokens(monkeypatch, tmp_path):
    import visionpeft.train.loop as loop

    seen = {}
    real = loop._optimizer

    def spy(params, cfg, device):
        seen["groups"] = params
        return real(params, cfg, device)

    monkeypatch.setattr(loop, "_optimizer", spy)
    run_config({**SMALL, "epochs": 1, "max_train_steps": 1, "output_dir": str(tmp_path / "wd")})
    decay, spared = seen["groups"]
    assert spared["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05  # the recipe's, filled in by AdamW
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim <= 1 for p in spared["params"])
    assert sum(p.numel() for g in (decay, spared) for p in g["params"]) > 0


@pytest.mark.parametrize("change, message", [
    ({"dataset": "shapenet"}, "dataset must be one of"),
    ({"dataset": "modelnet40"}, "needs data_root"),
    ({"num_points": 0}, "num_points must be an integer >= 1"),
    ({"backbone": {"name": "point-mae"}}, "needs checkpoint_path"),
    ({"backbone": {"name": "pointnet"}}, "backbone must be"),
    ({"backbone": {"name": "point-mae", "pretrained": False, "width": 3}}, r"backbone keys \['width'\] unknown"),
    ({"adapter": {"method": "nope"}}, "unknown adapter method 'nope'"),
    ({"adapter": "lora"}, "adapter must be a mapping"),
    ({"epoch": 3}, "did you mean epochs"),
    ({"test_per_class": 0}, "test_per_class must be an integer >= 1"),
    ({"dataset": "scanobjectnn", "data_root": "x", "per_class": 8}, "per_class only apply to dataset: synthetic"),
])
def test_bad_configs_are_refused_in_one_line(change, message):
    values = {"dataset": "synthetic", **change}
    with pytest.raises(ValueError, match=message) as err:
        PointClassificationConfig.from_dict(values)
    assert "\n" not in str(err.value)


# --- the commands, on a run trained from files in ScanObjectNN's layout --------------------
def _cli(args):
    """`visionpeft ARGS` in this process: (code, stdout, stderr)."""
    import contextlib
    import io

    from visionpeft.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """Procedural shapes written as ScanObjectNN's OBJ_BG files (labels 0-2 of its 15), and a
    short Point-PEFT run on them."""
    import h5py

    from visionpeft.data.shapes import make_shape_split

    root = tmp_path_factory.mktemp("scan")
    for split, name, seed in (("train", "training", 0), ("test", "test", 1)):
        data = make_shape_split(["sphere", "box", "torus"], 4 if split == "train" else 3, 160, seed=seed)
        (root / "main_split").mkdir(exist_ok=True)
        with h5py.File(root / "main_split" / f"{name}_objectdataset.h5", "w") as f:
            f.create_dataset("data", data=data.clouds)
            f.create_dataset("label", data=data.labels)
    out = root / "out"
    synthetic_only = ("classes", "per_class")
    run_config({**{k: v for k, v in SMALL.items() if k not in synthetic_only}, "dataset": "scanobjectnn",
                "variant": "OBJ_BG", "data_root": str(root), "output_dir": str(out)})
    return root, out


def test_evaluate_points_reproduces_the_runs_metrics(scan, tmp_path):
    root, out = scan
    code, stdout, err = _cli(["evaluate-points", "--checkpoint", str(out), "--data-root", str(root),
                              "--output", str(tmp_path / "m.json")])
    assert code == 0, err
    got, want = json.loads((tmp_path / "m.json").read_text()), json.loads((out / "metrics.json").read_text())
    assert (got["accuracy"], got["mean_class_accuracy"], got["clouds"]) == \
        (want["accuracy"], want["mean_class_accuracy"], want["clouds"])
    assert "mean-class accuracy" in stdout


def test_predict_points_reads_ply_npy_and_txt(scan, tmp_path):
    from plyfile import PlyData, PlyElement

    from visionpeft.data.shapes import shape_cloud

    _, out = scan
    cloud = shape_cloud("torus", 200, np.random.default_rng(9))
    np.save(tmp_path / "a.npy", cloud)
    np.savetxt(tmp_path / "b.txt", cloud)
    PlyData([PlyElement.describe(np.array([tuple(p) for p in cloud], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")]),
                                 "vertex")]).write(str(tmp_path / "c.ply"))
    files = [str(tmp_path / n) for n in ("a.npy", "b.txt", "c.ply")]
    code, _, err = _cli(["predict-points", "--checkpoint", str(out), *files, "--top", "3",
                         "--output", str(tmp_path / "p.json")])
    assert code == 0, err
    preds = json.loads((tmp_path / "p.json").read_text())
    assert [p["path"] for p in preds] == files
    for p in preds:
        probs = [q for _, q in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert p["top"] == preds[0]["top"]  # the same cloud in three formats
    np.save(tmp_path / "flat.npy", np.zeros((10, 2)))
    np.save(tmp_path / "nan.npy", np.full((10, 3), np.nan))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    (tmp_path / "empty.txt").write_text("\n")
    for bad, message in [("flat.npy", "3 columns or more"), ("nan.npy", "NaN"), ("none.ply", "cannot read"),
                         ("empty.npy", "the cloud is empty"), ("empty.txt", "the cloud is empty")]:
        code, _, err = _cli(["predict-points", "--checkpoint", str(out), str(tmp_path / bad)])
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_build_bank_rebuilds_it_from_a_split(scan, tmp_path):
    import shutil

    root, out = scan
    copy = tmp_path / "ckpt"
    shutil.copytree(out / "adapter", copy)
    code, stdout, err = _cli(["build-bank", "--checkpoint", str(copy), "--data-root", str(root), "--split", "test"])
    assert code == 0, err
    model, _ = load_classifier(copy)
    assert vp.core.model_ops.get_state(model).configs["default"].bank_size == 9  # the test split's 9 clouds
    code, _, err = _cli(["build-bank", "--checkpoint", str(copy), "--data-root", str(root), "--dataset",
                         "modelnet40"])
    assert code == 2 and "neither modelnet40_ply_hdf5_2048" in err


def test_the_point_cloud_tab_classifies_an_upload(scan, tmp_path):
    """The demo's endpoint through gradio_client: the same classes as predict-points, a 3-D
    figure, and bad uploads or checkpoints as readable errors."""
    import sys

    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from visionpeft.data.shapes import shape_cloud

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    if str(root / "demos") not in sys.path:
        sys.path.insert(0, str(root / "demos"))
    import points as demo

    _, out = scan
    cloud = shape_cloud("box", 300, np.random.default_rng(3))
    np.save(tmp_path / "box.npy", cloud)
    np.save(tmp_path / "bad.npy", np.zeros((5, 2)))
    code, _, _ = _cli(["predict-points", "--checkpoint", str(out), str(tmp_path / "box.npy"), "--top", "3",
                       "--output", str(tmp_path / "p.json")])
    want = json.loads((tmp_path / "p.json").read_text())[0]["top"]
    app = demo.build(str(out))
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        _, label, table = client.predict(handle_file(str(tmp_path / "box.npy")), str(out), 3,
                                         api_name="/classify_points")
        assert [c for c, _ in table] == [c for c, _ in want]
        assert [p for _, p in table] == pytest.approx([p for _, p in want], abs=1e-6)
        with pytest.raises(AppError, match="3 columns or more"):
            client.predict(handle_file(str(tmp_path / "bad.npy")), str(out), 3, api_name="/classify_points")
        with pytest.raises(AppError, match="holds no point-cloud classification checkpoint"):
            client.predict(handle_file(str(tmp_path / "box.npy")), str(tmp_path), 3, api_name="/classify_points")
    finally:
        app.close()


def test_full_fine_tuning_trains_and_saves_the_whole_model(tmp_path):
    from visionpeft.pipelines.pointcloud import evaluate
    from visionpeft.data.points import PointClouds

    out = tmp_path / "full"
    run_config({**SMALL, "adapter": None, "epochs": 1, "output_dir": str(out)})
    model, cfg = load_classifier(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adapter"] is None and metrics["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    task = PointClassificationTask(PointClassificationConfig.from_dict(
        {k: v for k, v in SMALL.items() if k not in ("task", "epochs", "train_batch_size", "checkpointing_steps")}))
    again = evaluate(model, PointClouds(task.split("test"), 128, "synthetic", train=False), cfg["classes"])
    assert again["accuracy"] == metrics["accuracy"]
    code, _, err = _cli(["build-bank", "--checkpoint", str(out), "--data-root", str(tmp_path)])
    assert code == 2 and "none (full fine-tuning)" in err and len(err.strip().splitlines()) == 1


def test_points_table_script(tmp_path, capsys):
    """scripts/points_table.py --quick on the embedded Point-MAE: the rows run once and count
    what they train, the JSON resumes without rerunning, other settings and bad arguments
    are refused."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "points_table", Path(__file__).resolve().parents[1] / "scripts" / "points_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "t.json"
    args = ["--quick", "--variants", "lora", "head_only", "linear_probe", "--work-dir", str(tmp_path / "w"),
            "--output", str(out)]
    first = script.main(args)
    doc = json.loads(out.read_text())
    assert sorted(doc["runs"]) == ["head_only/1", "linear_probe/1", "lora/1"] and doc["table"] == first["table"]
    assert all(r["test_clouds"] == 4 * 2 for r in doc["runs"].values())  # 4 held-out shapes x 2 (quick)
    # the head 2x192 -> 256 -> 256 -> 4 with two BNs; LoRA r 8 adds 8 x (192 + 576) per qkv of 6 blocks
    head = (384 * 256 + 256) + 512 + (256 * 256 + 256) + 512 + (256 * 4 + 4)
    assert doc["runs"]["head_only/1"]["trainable_parameters"] == head
    assert doc["runs"]["lora/1"]["trainable_parameters"] == head + 6 * 8 * (192 + 576)
    probe = doc["runs"]["linear_probe/1"]  # logistic regression on [cls, max] (2 x 192) -> 4 shapes
    assert probe["trainable_parameters"] == 2 * 192 * 4 + 4 and probe["C"] in [float(c) for c in probe["val_by_C"]]
    assert probe["accuracy"] == pytest.approx(sum(probe["per_class_accuracy"].values()) / 4)  # 2 test clouds each
    row = next(line for line in doc["table"].splitlines() if line.startswith("| lora |"))
    assert row.split(" | ")[2] == f"{100 * doc['runs']['lora/1']['accuracy']:.1f}"
    again = script.main([*args[:1], "--variants", "lora", *args[5:]])
    assert again["runs"] == first["runs"] and again["table"] == first["table"]  # nothing rerun, no row lost
    with pytest.raises(SystemExit, match="other settings \\(epochs\\)"):
        script.main([*args, "--epochs", "2"])
    script.main([*args, "--variant", "OBJ_BG"])  # ScanObjectNN's variant is no setting of a synthetic table
    for bad, msg in ((["--dataset", "scanobjectnn"], "needs --data-root"), (["--epochs", "0"], "--epochs 0"),
                     (["--checkpoint", "pretrain.pth"], "--checkpoint is for --backbone point-mae")):
        with pytest.raises(SystemExit):
            script.main(bad)
        assert msg in capsys.readouterr().err
