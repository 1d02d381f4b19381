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
    assert resample(cloud[:50], 100, None).shape == (100, 3)  # a small cloud is padded with its own points


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
    run_config({**SMALL, "dataset": "scanobjectnn", "variant": "OBJ_BG", "data_root": str(root), "classes": None,
                "output_dir": str(out)})
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
    for bad, message in [("flat.npy", "3 columns or more"), ("nan.npy", "NaN"), ("none.ply", "cannot read")]:
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
