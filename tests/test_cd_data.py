"""Change-detection data: layout readers, dataset, joint augmentation, synthetic set."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.data.change_detection import (ChangeDetectionDataset, find_triples,
                                              levir_triples, list_file_triples,
                                              s2looking_triples, write_synthetic_levir)


def _save(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return str(path)


def _triple(tmp: Path, name: str, a, b, label) -> tuple:
    return (_save(tmp / "A" / name, a), _save(tmp / "B" / name, b),
            _save(tmp / "label" / name, label))


def _rgb(h=12, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3))


def test_synthetic_roundtrip(tmp_path):
    root = write_synthetic_levir(tmp_path, n_train=6, n_val=2, n_test=2, size=32, seed=3)
    assert root == tmp_path
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        assert len(find_triples(root, split)) == n
    ds = ChangeDetectionDataset(find_triples(root, "train"))
    for i in range(len(ds)):
        item = ds[i]
        assert item["a"].shape == item["b"].shape == (3, 32, 32)
        assert item["a"].dtype == torch.float32 and 0 <= item["a"].min() <= item["a"].max() <= 1
        assert item["label"].shape == (32, 32) and item["label"].dtype == torch.long
        assert set(item["label"].unique().tolist()) == {0, 1}
        assert 0.01 < item["label"].float().mean() < 0.2
        # photometric pseudo-change: B differs from A where nothing changed
        same = item["label"] == 0
        assert (item["a"] - item["b"]).abs().mean(0)[same].mean() > 0.01
        assert item["name"].endswith(".png")


def test_synthetic_deterministic(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}
    first = files(write_synthetic_levir(tmp_path / "x", 3, 1, 1, size=32, seed=7))
    again = files(write_synthetic_levir(tmp_path / "y", 3, 1, 1, size=32, seed=7))
    other = files(write_synthetic_levir(tmp_path / "z", 3, 1, 1, size=32, seed=8))
    assert len(first) == 15 and first == again
    assert first.keys() == other.keys() and first != other


def test_joint_augmentation_keeps_alignment(tmp_path):
    # A == B == label pattern: any misaligned op would make them disagree
    pattern = (np.random.default_rng(0).random((20, 20)) > 0.5) * 255
    rgb = np.repeat(pattern[..., None], 3, axis=2)
    triples = [_triple(tmp_path, f"p{i}.png", rgb, rgb, pattern) for i in range(4)]
    ds = ChangeDetectionDataset(triples, augment=True, crop_size=13, seed=1)
    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["label"].shape == (13, 13)
            assert torch.equal(item["a"], item["b"])
            assert torch.equal(item["a"], item["label"].float().expand(3, -1, -1))
            seen.add(item["label"].numpy().tobytes())
    assert len(seen) > 5  # the augmentation really varies across epochs/indices
    ds.set_epoch(2)
    again = ChangeDetectionDataset(triples, augment=True, crop_size=13, seed=1)
    again.set_epoch(2)
    assert torch.equal(ds[1]["a"], again[1]["a"])  # (seed, epoch, index) replays exactly


def test_label_01_and_0255_agree(tmp_path):
    mask = np.random.default_rng(1).random((10, 10)) > 0.5
    rgb = _rgb(10, 10)
    t01 = _triple(tmp_path / "a", "x.png", rgb, rgb, mask * 1)
    t255 = _triple(tmp_path / "b", "x.png", rgb, rgb, mask * 255)
    l01 = ChangeDetectionDataset([t01])[0]["label"]
    assert torch.equal(l01, ChangeDetectionDataset([t255])[0]["label"])
    assert torch.equal(l01, torch.from_numpy(mask).long())


def test_bad_label_values(tmp_path):
    lab = np.zeros((8, 8))
    lab[0, :3] = [50, 2, 255]
    t = _triple(tmp_path, "bad.png", _rgb(8, 8), _rgb(8, 8), lab)
    with pytest.raises(ValueError, match=r"bad\.png.*\[2, 50\]"):
        ChangeDetectionDataset([t])[0]


def test_size_mismatch(tmp_path):
    t = _triple(tmp_path, "s.png", _rgb(12, 12), _rgb(10, 12), np.zeros((12, 12)))
    with pytest.raises(ValueError, match=r"B.s\.png.*\(12, 10\).*\(12, 12\)"):
        ChangeDetectionDataset([t])[0]


def test_unreadable_file(tmp_path):
    t = _triple(tmp_path, "u.png", _rgb(), _rgb(), np.zeros((12, 12)))
    Path(t[1]).write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"u\.png"):
        ChangeDetectionDataset([t])[0]


def test_levir_missing_b_file(tmp_path):
    for n in ("one.png", "two.png"):
        _triple(tmp_path / "train", n, _rgb(), _rgb(), np.zeros((12, 12)))
    (tmp_path / "train" / "B" / "two.png").unlink()
    with pytest.raises(ValueError, match=r"missing in .*B: two\.png"):
        levir_triples(tmp_path, "train")


def test_empty_split_and_unknown_layout(tmp_path):
    for sub in ("A", "B", "label"):
        (tmp_path / "val" / sub).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"val.A is empty"):
        find_triples(tmp_path, "val")
    with pytest.raises(ValueError, match=r"Image1.*test\.txt"):
        find_triples(tmp_path, "test")


def test_s2looking_layout(tmp_path):
    for n in ("b.png", "a.png"):
        for sub in ("Image1", "Image2"):
            _save(tmp_path / "train" / sub / n, _rgb())
        _save(tmp_path / "train" / "label" / n, np.zeros((12, 12)))
    triples = find_triples(tmp_path, "train")
    assert triples == s2looking_triples(tmp_path, "train")
    assert [Path(p).parts[-2:] for p in triples[0]] == [
        ("Image1", "a.png"), ("Image2", "a.png"), ("label", "a.png")]
    assert ChangeDetectionDataset(triples)[1]["name"] == "b.png"


def test_list_file_layout(tmp_path):
    t = _triple(tmp_path / "data", "x.png", _rgb(), _rgb(), np.zeros((12, 12)))
    rel = [str(Path(p).relative_to(tmp_path)) for p in t]
    (tmp_path / "train.txt").write_text(
        "# a comment\n\n" + " ".join(rel) + "  # trailing comment\n" + " ".join(t) + "\n")
    triples = find_triples(tmp_path, "train")
    assert triples == [t, t]  # relative and absolute paths resolve to the same files
    other = tmp_path / "lists" / "val.txt"
    other.parent.mkdir()
    other.write_text(" ".join(rel) + "\n")
    assert list_file_triples(other, root=tmp_path) == [t]
    bad = tmp_path / "bad.txt"
    bad.write_text(" ".join(rel) + "\n# ok\n" + " ".join(rel[:2]) + "\n")
    with pytest.raises(ValueError, match=r"line 3.*3 columns"):
        list_file_triples(bad, root=tmp_path)
