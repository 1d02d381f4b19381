"""The point-cloud readers on files written in the exact layouts the data sets ship in, the
single-cloud reader's formats and refusals, and the procedural shapes."""
import h5py
import numpy as np
import pytest

from visionpeft.data.points import SCANOBJECTNN_CLASSES, normalise_cloud, read_cloud, read_point_split
from visionpeft.data.shapes import SHAPES, make_shape_split, shape_cloud


def _h5(path, data, labels, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=labels)
        for k, v in extra.items():
            f.create_dataset(k, data=v)


def test_modelnet40_h5_files_in_order(tmp_path):
    folder = tmp_path / "modelnet40_ply_hdf5_2048"
    rng = np.random.default_rng(0)
    parts = [(rng.normal(size=(n, 2048, 3)).astype(np.float32), rng.integers(0, 40, (n, 1)).astype(np.uint8))
             for n in (3, 2)]
    # PointNet's files: ply_data_train0.h5, ... with 'normal' and 'faceId' beside data / label
    for i, (d, lab) in enumerate(parts):
        _h5(folder / f"ply_data_train{i}.h5", d, lab, normal=d, faceId=lab[:, 0].astype(np.int32))
    _h5(folder / "ply_data_test0.h5", parts[1][0], parts[1][1])
    (folder / "shape_names.txt").write_text("\n".join(f"class{i}" for i in range(40)) + "\n")
    split = read_point_split("modelnet40", tmp_path, "train")
    assert split.clouds.shape == (5, 2048, 3) and split.clouds.dtype == np.float32
    np.testing.assert_array_equal(split.clouds, np.concatenate([parts[0][0], parts[1][0]]))
    np.testing.assert_array_equal(split.labels, np.concatenate([parts[0][1], parts[1][1]])[:, 0])
    assert split.classes[39] == "class39" and len(read_point_split("modelnet40", folder, "test")) == 2


def test_modelnet40_txt_layout_normalised(tmp_path):
    folder = tmp_path / "modelnet40_normal_resampled"
    (folder / "airplane").mkdir(parents=True)
    (folder / "night_stand").mkdir()
    rows = {"airplane_0001": np.random.default_rng(1).normal(size=(50, 6)) * 3 + 2,
            "night_stand_0007": np.random.default_rng(2).normal(size=(40, 6))}
    for shape, r in rows.items():
        np.savetxt(folder / shape.rsplit("_", 1)[0] / f"{shape}.txt", r, delimiter=",", fmt="%.6f")
    (folder / "modelnet40_shape_names.txt").write_text("airplane\nnight_stand\n")
    (folder / "modelnet40_train.txt").write_text("night_stand_0007\nairplane_0001\n")
    (folder / "modelnet40_test.txt").write_text("")
    split = read_point_split("modelnet40", tmp_path, "train")
    assert split.labels.tolist() == [1, 0] and split.classes == ["airplane", "night_stand"]
    xyz = np.loadtxt(folder / "airplane" / "airplane_0001.txt", delimiter=",")[:, :3]
    xyz = xyz - xyz.mean(0)
    np.testing.assert_allclose(split.clouds[1], xyz / np.sqrt((xyz ** 2).sum(1)).max(), atol=1e-5)
    assert np.sqrt((split.clouds[0] ** 2).sum(1)).max() == pytest.approx(1.0)


@pytest.mark.parametrize("variant, folder, name", [
    ("PB_T50_RS", "main_split", "{}_objectdataset_augmentedrot_scale75.h5"),
    ("OBJ_BG", "main_split", "{}_objectdataset.h5"),
    ("OBJ_ONLY", "main_split_nobg", "{}_objectdataset.h5")])
def test_scanobjectnn_variants(tmp_path, variant, folder, name):
    rng = np.random.default_rng(3)
    for split, n in (("training", 4), ("test", 2)):
        # ScanObjectNN's files hold 'mask' too; labels as a flat array
        _h5(tmp_path / "h5_files" / folder / name.format(split), rng.normal(size=(n, 2048, 3)).astype(np.float32),
            np.arange(n) % 15, mask=np.zeros((n, 2048)))
    train = read_point_split("scanobjectnn", tmp_path, "train", variant)
    test = read_point_split("scanobjectnn", tmp_path / "h5_files", "test", variant)
    assert (len(train), len(test)) == (4, 2) and train.classes == list(SCANOBJECTNN_CLASSES)
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0, 1, 2, 3]


def test_reader_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither modelnet40_ply_hdf5_2048"):
        read_point_split("modelnet40", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="main_split/training_objectdataset_augmentedrot_scale75.h5"):
        read_point_split("scanobjectnn", tmp_path, "train")
    with pytest.raises(ValueError, match="variant 'PB'"):
        read_point_split("scanobjectnn", tmp_path, "train", "PB")
    _h5(tmp_path / "main_split" / "test_objectdataset.h5", np.zeros((2, 5, 3), np.float32), np.array([0, 15]))
    with pytest.raises(ValueError, match="outside ScanObjectNN's 0..14"):
        read_point_split("scanobjectnn", tmp_path, "test", "OBJ_BG")
    with pytest.raises(ValueError, match="split must be train or test"):
        read_point_split("scanobjectnn", tmp_path, "val")


def test_single_clouds_in_three_formats(tmp_path):
    xyz = np.random.default_rng(4).normal(size=(30, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", np.concatenate([xyz, xyz], 1))  # extra columns (normals) are dropped
    np.savetxt(tmp_path / "b.txt", xyz, fmt="%.7f")
    np.savetxt(tmp_path / "c.txt", xyz, delimiter=",", fmt="%.7f")
    from plyfile import PlyData, PlyElement
    vertex = np.array([tuple(p) for p in xyz], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "d.ply"))
    for name in ("a.npy", "b.txt", "c.txt", "d.ply"):
        np.testing.assert_allclose(read_cloud(tmp_path / name), xyz, atol=1e-6)
    np.save(tmp_path / "flat.npy", np.zeros((4, 2)))
    np.save(tmp_path / "empty.npy", np.zeros((0, 3)))
    np.save(tmp_path / "nan.npy", np.array([[0, 0, np.nan]]))
    (tmp_path / "x.obj").write_text("v 0 0 0")
    for name, message in [("flat.npy", "3 columns or more"), ("empty.npy", "empty"), ("nan.npy", "NaN"),
                          ("x.obj", ".npy, .txt or .ply"), ("missing.npy", "cannot read")]:
        with pytest.raises(ValueError, match=message) as err:
            read_cloud(tmp_path / name)
        assert "\n" not in str(err.value)


def test_shapes_are_clouds_in_the_unit_sphere_and_deterministic():
    rng = np.random.default_rng(5)
    for kind in SHAPES:
        cloud = shape_cloud(kind, 300, rng, partial=0.5, clutter=0.2)
        assert cloud.shape == (300, 3) and np.isfinite(cloud).all()
        assert np.sqrt((cloud ** 2).sum(1)).max() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(cloud.mean(0), 0, atol=1e-5)
    a, b = make_shape_split(["box", "torus"], 3, 64, seed=7), make_shape_split(["box", "torus"], 3, 64, seed=7)
    np.testing.assert_array_equal(a.clouds, b.clouds)
    assert sorted(a.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(normalise_cloud(np.array([[2.0, 0, 0], [0, 0, 0]])), [[1, 0, 0], [-1, 0, 0]])
