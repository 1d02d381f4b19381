"""Segmentation data: official layouts written in miniature, mask decoding checked against
hand-written expectations, tiling, augmentation, errors and the synthetic benchmark."""
import colorsys
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionpeft.data.segmentation import (ISPRS_CLASSES, LOVEDA_CLASSES, SegmentationDataset, SegSplit,
                                          _class_crop, _hsv_to_rgb, _rgb_to_hsv, find_split,
                                          torchgeo_dataset, write_synthetic_segmentation)

WHITE, BLUE, CYAN, GREEN = (255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0)
YELLOW, RED, BLACK = (255, 255, 0), (255, 0, 0), (0, 0, 0)


def _save(path: Path, arr) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)  # .tif suffix -> TIFF via PIL
    return str(path)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3))


def _mask(split, i=0):
    return SegmentationDataset(split)[i]["mask"].tolist()


# ----------------------------------------------------------------------------- LoveDA

def _loveda(root: Path):
    raw = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    for split, domain in (("Train", "Urban"), ("Train", "Rural"), ("Val", "Urban")):
        d = root / split / domain
        _save(d / "images_png" / f"{domain}1.png", _rgb(2, 4))
        _save(d / "masks_png" / f"{domain}1.png", raw)
    _save(root / "Test" / "Urban" / "images_png" / "9.png", _rgb(2, 4))  # labels withheld
    return root


def test_loveda_layout_and_names(tmp_path):
    root = _loveda(tmp_path)
    both = find_split("loveda", root, "train")
    assert [Path(i).parts[-3:] for i, _ in both.pairs] == [
        ("Rural", "images_png", "Rural1.png"), ("Urban", "images_png", "Urban1.png")]
    assert both.classes == LOVEDA_CLASSES and both.ignore_index == 255 and both.label_kind == "index"
    # raw 0 = no-data -> 255; 1..7 -> 0..6
    assert _mask(both) == [[255, 0, 1, 2], [3, 4, 5, 6]]
    assert len(find_split("loveda", root, "TRAIN", domain="rURAL").pairs) == 1
    val = find_split("loveda", root, "val", domain="urban")
    assert Path(val.pairs[0][1]).parts[-4:] == ("Val", "Urban", "masks_png", "Urban1.png")
    with pytest.raises(ValueError, match=r"masks_png.*Train or Val"):
        find_split("loveda", root, "test")
    with pytest.raises(ValueError, match=r"'trian'.*\['Test', 'Train', 'Val'\]"):
        find_split("loveda", root, "trian")
    with pytest.raises(ValueError, match=r"domain.*'Suburb'.*\['Urban'\]"):
        find_split("loveda", root, "val", domain="Suburb")


# ----------------------------------------------------------------------------- ISPRS

# one row of every ISPRS colour: expected impervious..clutter = 0..5, boundary -> 255
ISPRS_ROW = [WHITE, BLUE, CYAN, GREEN, YELLOW, RED, BLACK]


def _potsdam(root: Path):
    for tile in ("2_10", "2_13", "9_9"):  # train, val, in neither split
        _save(root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif", _rgb(2, 7))
        _save(root / "5_Labels_all" / f"top_potsdam_{tile}_label.tif", [ISPRS_ROW, ISPRS_ROW[::-1]])
        _save(root / "5_Labels_all_noBoundary" / f"top_potsdam_{tile}_label_noBoundary.tif",
              [[RED] * 7, [GREEN] * 7])
    return root


def test_potsdam_official_layout(tmp_path):
    root = _potsdam(tmp_path)
    train = find_split("potsdam", root, "Train")
    assert [Path(p).name for p in train.pairs[0]] == ["top_potsdam_2_10_RGB.tif", "top_potsdam_2_10_label.tif"]
    assert len(train.pairs) == 1 and train.classes == ISPRS_CLASSES and train.label_kind == "rgb"
    assert _mask(train) == [[0, 1, 2, 3, 4, 5, 255], [255, 5, 4, 3, 2, 1, 0]]
    val = find_split("potsdam", root, "VAL")
    assert [Path(p).name for p, _ in val.pairs] == ["top_potsdam_2_13_RGB.tif"]
    five = find_split("potsdam", root, "train", drop_clutter=True)
    assert five.classes == ISPRS_CLASSES[:5]
    assert _mask(five) == [[0, 1, 2, 3, 4, 255, 255], [255, 255, 4, 3, 2, 1, 0]]
    eroded = find_split("potsdam", root, "train", eroded=True)
    assert Path(eroded.pairs[0][1]).name == "top_potsdam_2_10_label_noBoundary.tif"
    assert _mask(eroded) == [[5] * 7, [3] * 7]
    with pytest.raises(ValueError, match=r"splits \['train', 'val'\].*'test'"):
        find_split("potsdam", root, "test")


def test_potsdam_missing_label_and_empty_split(tmp_path):
    root = _potsdam(tmp_path)
    (root / "5_Labels_all" / "top_potsdam_2_10_label.tif").unlink()
    with pytest.raises(ValueError, match=r"2_10_RGB\.tif: looked for .*5_Labels_all.top_potsdam_2_10_label"):
        find_split("potsdam", root, "train")
    for tile in ("2_10", "2_13"):
        (root / "2_Ortho_RGB" / f"top_potsdam_{tile}_RGB.tif").unlink()
    with pytest.raises(ValueError, match=r"no Potsdam images.*2_Ortho_RGB.*top_potsdam_9_9_RGB\.tif"):
        find_split("potsdam", root, "train")


def test_vaihingen_official_layout(tmp_path):
    for area in (1, 2, 9):  # train, val, in neither split
        name = f"top_mosaic_09cm_area{area}"
        _save(tmp_path / "top" / f"{name}.tif", _rgb(1, 7))
        _save(tmp_path / "gts_for_participants" / f"{name}.tif", [ISPRS_ROW])
        _save(tmp_path / "gts_eroded_for_participants" / f"{name}_noBoundary.tif", [[YELLOW] * 3 + [BLUE] * 4])
    train = find_split("vaihingen", tmp_path, "train")
    assert [Path(p).name for p in train.pairs[0]] == ["top_mosaic_09cm_area1.tif"] * 2
    assert Path(train.pairs[0][1]).parent.name == "gts_for_participants"
    assert _mask(train) == [[0, 1, 2, 3, 4, 5, 255]]
    assert [Path(p).name for p, _ in find_split("vaihingen", tmp_path, "Val").pairs] == ["top_mosaic_09cm_area2.tif"]
    eroded = find_split("vaihingen", tmp_path, "val", eroded=True, drop_clutter=True)
    assert Path(eroded.pairs[0][1]).name == "top_mosaic_09cm_area2_noBoundary.tif"
    assert _mask(eroded) == [[4, 4, 4, 1, 1, 1, 1]]


def test_unknown_isprs_colour(tmp_path):
    label = [[WHITE, WHITE, WHITE], [WHITE, BLUE, (10, 20, 30)], [(40, 50, 60), WHITE, WHITE]]
    _save(tmp_path / "top" / "top_mosaic_09cm_area1.tif", _rgb(3, 3))
    _save(tmp_path / "gts_for_participants" / "top_mosaic_09cm_area1.tif", label)
    split = find_split("vaihingen", tmp_path, "train")
    with pytest.raises(ValueError, match=r"area1\.tif has colour \(10, 20, 30\) at row 1, column 2.*white"):
        SegmentationDataset(split)[0]


# ----------------------------------------------------------------------------- mmseg / folder

def test_mmseg_layout(tmp_path):
    for split in ("train", "val"):
        _save(tmp_path / "img_dir" / split / "2_10_0_0_4_2.png", _rgb(2, 4))
        _save(tmp_path / "ann_dir" / split / "2_10_0_0_4_2.png", [[0, 1, 2, 255], [2, 2, 1, 0]])
    _save(tmp_path / "img_dir" / "train" / "b.jpg", _rgb(2, 4))  # matched by stem
    _save(tmp_path / "ann_dir" / "train" / "b.png", np.ones((2, 4)))
    split = find_split("mmseg", tmp_path, "Train", classes=["a", "b", "c"])
    assert [Path(p).name for p in split.pairs[1]] == ["b.jpg", "b.png"]
    assert _mask(split) == [[0, 1, 2, 255], [2, 2, 1, 0]]
    assert find_split("mmseg", tmp_path, "val", num_classes=3).classes == ["class0", "class1", "class2"]
    reduced = find_split("mmseg", tmp_path, "val", num_classes=2, reduce_zero_label=True)
    assert _mask(reduced) == [[255, 0, 1, 255], [1, 1, 0, 255]]
    with pytest.raises(ValueError, match=r"no `classes` or `num_classes`"):
        find_split("mmseg", tmp_path, "val")
    with pytest.raises(ValueError, match=r"ann_dir.*2_10_0_0_4_2\.png has values \[2\].*0\.\.1.*255"):
        _mask(find_split("mmseg", tmp_path, "val", num_classes=2))


def test_folder_layout(tmp_path):
    (tmp_path / "classes.txt").write_text("road\n\nroof\n")
    _save(tmp_path / "train" / "images" / "x.png", _rgb(2, 2))
    _save(tmp_path / "train" / "masks" / "x.png", [[0, 1], [255, 1]])
    split = find_split("folder", tmp_path, "TRAIN")
    assert split.classes == ["road", "roof"] and _mask(split) == [[0, 1], [255, 1]]
    assert find_split("folder", tmp_path, "train", classes=["a", "b", "c"]).classes == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"no split 'val' in .*folders there: \['train'\]"):
        find_split("folder", tmp_path, "val")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['clases'\].*'classes'"):
        find_split("folder", tmp_path, "train", clases=["a"])


def test_folder_flat_layout_warns(tmp_path):
    _save(tmp_path / "images" / "x.png", _rgb(2, 2))
    _save(tmp_path / "masks" / "x.png", [[0, 1], [1, 0]])
    with pytest.warns(UserWarning, match="no split folders"):
        split = find_split("folder", tmp_path, "val", num_classes=2)
    assert _mask(split) == [[0, 1], [1, 0]]


def test_missing_mask_and_empty_folder(tmp_path):
    _save(tmp_path / "train" / "images" / "a.png", _rgb(2, 2))
    _save(tmp_path / "train" / "images" / "b.png", _rgb(2, 2))
    _save(tmp_path / "train" / "masks" / "a.png", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"1 image\(s\) in .*train.images have no mask .*: b\.png"):
        find_split("folder", tmp_path, "train", num_classes=2)
    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "images" / "notes.txt").write_text("x")
    (tmp_path / "val" / "masks").mkdir()
    with pytest.raises(ValueError, match=r"no image files .* in .*val.images; it holds: \['notes\.txt'\]"):
        find_split("folder", tmp_path, "val", num_classes=2)


def test_size_mismatch_and_unknown_dataset(tmp_path):
    _save(tmp_path / "train" / "images" / "s.png", _rgb(4, 6))
    _save(tmp_path / "train" / "masks" / "s.png", np.zeros((4, 5)))
    split = find_split("folder", tmp_path, "train", num_classes=2)
    with pytest.raises(ValueError, match=r"size mismatch: mask .*s\.png is \(4, 5\).*s\.png is \(4, 6\)"):
        SegmentationDataset(split)[0]
    with pytest.raises(ValueError, match=r"size mismatch: mask .*s\.png is \(4, 5\)"):
        SegmentationDataset(split, tile=2)  # found while indexing tiles, before any read
    with pytest.raises(ValueError, match=r"unknown segmentation dataset 'isaid'.*loveda.*potsdam.*torchgeo"):
        find_split("isaid", tmp_path, "train")
    with pytest.raises(ValueError, match=r"train=True needs image_size"):
        SegmentationDataset(split, train=True)


# ----------------------------------------------------------------------------- tiling

def test_tiles_align_last_row_and_column_to_border(tmp_path):
    h, w = 7, 10
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([yy * 20, xx * 20, np.zeros_like(yy)], -1)  # pixel colour = its position
    _save(tmp_path / "train" / "images" / "big.png", image)
    _save(tmp_path / "train" / "masks" / "big.png", yy * w + xx)  # mask value = its position
    ds = SegmentationDataset(find_split("folder", tmp_path, "train", num_classes=70), image_size=4, tile=4)
    # columns start 0, 4 and 6 (= 10 - 4); rows 0 and 3 (= 7 - 4)
    assert [t[1:3] for t in ds.tiles] == [(0, 0), (0, 4), (0, 6), (3, 0), (3, 4), (3, 6)]
    assert len(ds) == 6
    last = ds[5]
    assert last["image"].shape == (3, 4, 4) and last["path"].endswith("big.png")
    assert last["mask"][0].tolist() == [36, 37, 38, 39] and last["mask"][3].tolist() == [66, 67, 68, 69]
    assert torch.allclose(last["image"][1, 0] * 255, torch.tensor([120.0, 140, 160, 180]))
    assert ds[3]["mask"][:, 0].tolist() == [30, 40, 50, 60]
    assert SegmentationDataset(ds.split, tile=8).tiles == [(0, 0, 0, 7, 8), (0, 0, 2, 7, 8)]


# ----------------------------------------------------------------------------- augmentation

COLOURS = {0: (200, 60, 40), 1: (40, 160, 60), 2: (60, 80, 200)}


def _block_scene(tmp_path, n=3):
    """Images made of rectangles whose colour gives the class of the mask there."""
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros((40, 48), np.uint8)
        for _ in range(6):
            top, left = rng.integers(0, 30), rng.integers(0, 38)
            mask[top:top + rng.integers(8, 20), left:left + rng.integers(8, 20)] = rng.integers(0, 3)
        image = np.array([COLOURS[c] for c in range(3)])[mask]
        _save(tmp_path / "train" / "images" / f"{i}.png", image)
        _save(tmp_path / "train" / "masks" / f"{i}.png", mask)
    return find_split("folder", tmp_path, "train", num_classes=3)


def _interior(mask):
    """Pixels whose 3x3 neighbourhood is one class (bilinear blends only at edges)."""
    m = mask.numpy()
    same = np.ones_like(m, bool)
    same[[0, -1], :] = same[:, [0, -1]] = False
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same[1:-1, 1:-1] &= m[1 + dy:m.shape[0] - 1 + dy, 1 + dx:m.shape[1] - 1 + dx] == m[1:-1, 1:-1]
    return same & (m != 255)


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    ds = SegmentationDataset(_block_scene(tmp_path), image_size=32, train=True, seed=3)
    checked = 0
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
            assert item["image"].dtype == torch.float32 and item["mask"].dtype == torch.int64
            assert 0 <= item["image"].min() and item["image"].max() <= 1
            inside, pixels = _interior(item["mask"]), item["image"].permute(1, 2, 0)
            seen = {}
            for c in item["mask"][torch.from_numpy(inside)].unique().tolist():
                colours = pixels[torch.from_numpy(inside) & (item["mask"] == c)]
                # photometric steps act per pixel: one class, one colour after them
                assert (colours - colours[0]).abs().max() < 1e-4, (epoch, i, c)
                seen[c] = colours[0]
                checked += 1
            values = list(seen.values())
            assert all((a - b).abs().max() > 1e-3 for k, a in enumerate(values) for b in values[k + 1:])
    assert checked > 20


def test_augmentation_is_deterministic_and_varies(tmp_path):
    split = _block_scene(tmp_path, n=2)
    a, b = (SegmentationDataset(split, image_size=24, train=True, seed=5) for _ in range(2))
    for i in range(2):
        assert torch.equal(a[i]["image"], b[i]["image"]) and torch.equal(a[i]["mask"], b[i]["mask"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["image"], b[0]["image"])
    other = SegmentationDataset(split, image_size=24, train=True, seed=6)
    assert not torch.equal(other[0]["image"], b[0]["image"])
    # evaluation: whole image, untouched, whatever image_size says
    plain = SegmentationDataset(split, image_size=24)[0]
    assert plain["image"].shape == (3, 40, 48)
    assert torch.equal(plain["mask"], torch.from_numpy(np.array(Image.open(split.pairs[0][1]))).long())


def test_crop_prefers_windows_without_a_dominant_class():
    image, mask = np.zeros((8, 16, 3), np.float32), np.repeat([[0] * 8 + [1] * 8], 8, axis=0)
    good = 0
    for seed in range(60):
        _, crop = _class_crop(np.random.default_rng(seed), image, mask, 8, 255)
        good += max(crop.mean(), 1 - crop.mean()) < 0.75
    # a single uniform draw is balanced 3 times in 9; ten redraws almost always are
    assert good >= 54


def test_hsv_matches_colorsys():
    rgb = np.random.default_rng(0).random((50, 3))
    h, s, v = _rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    assert np.allclose(np.stack([h, s, v], 1), expected, atol=1e-9)
    assert np.allclose(_hsv_to_rgb(h, s, v), rgb, atol=1e-9)


# ----------------------------------------------------------------------------- synthetic

def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_benchmark_layout_and_determinism(tmp_path):
    info = write_synthetic_segmentation(tmp_path / "a", n_train=4, n_val=2, n_test=3, size=32, seed=1)
    again = write_synthetic_segmentation(tmp_path / "b", n_train=4, n_val=2, n_test=3, size=32, seed=1)
    other = write_synthetic_segmentation(tmp_path / "c", n_train=4, n_val=2, n_test=3, size=32, seed=2)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b") and first != _files(tmp_path / "c")
    assert info["counts"] == {"source/train": 4, "source/val": 2, "source/test": 3, "target/val": 2,
                              "target/test": 3} and info["counts"] == again["counts"] == other["counts"]
    assert sorted(p.name for p in (tmp_path / "a" / "target").iterdir()) == ["test", "val"]
    assert len(first) == 1 + 2 * (4 + 2 + 3 + 2 + 3)
    assert first["classes.txt"].decode().split() == info["classes"]
    assert info["source_scenes"] == ["farmland", "forest", "urban", "suburban", "coast", "river"]
    assert info["target_scenes"] == ["desert", "industrial", "lake", "orchard"]
    root = tmp_path / "a"
    train = find_split("synthetic", root, "train")
    assert len(train.pairs) == 4 and train.classes == info["classes"]
    assert all(Path(p).stem.split("_")[-1] in info["source_scenes"] for p, _ in train.pairs)
    target = find_split("synthetic", root, "Test", domain="TARGET")
    assert all(Path(p).stem.split("_")[-1] in info["target_scenes"] for p, _ in target.pairs)
    item = SegmentationDataset(target)[0]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["mask"].min() <= item["mask"].max() < 6
    with pytest.raises(ValueError, match=r"no split 'train' in .*target.*\['test', 'val'\]"):
        find_split("synthetic", root, "train", domain="target")


# ----------------------------------------------------------------------------- torchgeo

def test_torchgeo_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchgeo", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install torchgeo"):
        torchgeo_dataset("LoveDA", "data", "train")
    with pytest.raises(ImportError, match=r"pip install torchgeo"):
        find_split("torchgeo.LoveDA", "data", "train")


def _stand_in(monkeypatch, **classes):
    datasets = types.SimpleNamespace(**classes)
    monkeypatch.setitem(sys.modules, "torchgeo", types.SimpleNamespace(datasets=datasets))
    monkeypatch.setitem(sys.modules, "torchgeo.datasets", datasets)


def test_torchgeo_adapter_with_a_stand_in(monkeypatch, tmp_path):
    """For machines without torchgeo; the real library is checked in the tests below."""
    class LoveDA(torch.utils.data.Dataset):  # as torchgeo's: float image 0..255 (C, H, W), raw long mask
        splits, scenes = ("train", "val", "test"), ("urban", "rural")

        def __init__(self, root, split="train", scene=("urban", "rural"), transforms=None):
            self.args = (root, split, list(scene))
            self.files = [{"image": _save(tmp_path / f"{i}.png", _rgb(4, 4)),
                           "mask": _save(tmp_path / f"m{i}.png", np.ones((4, 4)))} for i in range(2)]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.full((3, 4, 4), 51.0), "mask": torch.tensor([[0, 1, 7, 3]] * 4)}

    class Unit(LoveDA):  # a class we do not know: floats in [0, 1], the first image sets the scale
        classes = ["a", "b"]

        def __getitem__(self, i):
            return {"image": torch.full((3, 2, 2), (0.5, 0.002)[i]), "mask": torch.zeros(1, 2, 2, dtype=torch.long)}
    _stand_in(monkeypatch, LoveDA=LoveDA, Unit=Unit)
    split = find_split("torchgeo.LoveDA", "data", "Train", domain="Urban")
    assert split.dataset.args == ("data", "train", ["urban"]) and split.classes == LOVEDA_CLASSES
    item = split[1]
    assert item["path"] == str(tmp_path / "1.png") and item["mask"][0].tolist() == [255, 0, 6, 2]
    assert torch.allclose(item["image"], torch.full((3, 4, 4), 0.2))
    aug = SegmentationDataset(split, image_size=3, train=True)[0]
    assert aug["image"].shape == (3, 3, 3) and aug["mask"].shape == (3, 3)
    unit = find_split("torchgeo.unit", "data", "val")
    assert unit.classes == ["a", "b"] and unit.scale == 255.0
    # the dark second image stays dark: one scale for the data set
    assert torch.allclose(unit[1]["image"], torch.full((3, 2, 2), 0.002)) and unit[1]["mask"].shape == (2, 2)
    with pytest.raises(ValueError, match=r"no dataset class 'Nope'"):
        torchgeo_dataset("Nope", "data", "train")


def _tg():
    tg = pytest.importorskip("torchgeo")
    warnings.filterwarnings("ignore", module="rasterio")  # plain TIFFs have no georeference
    return tg


def _tg_loveda(root: Path):
    """torchgeo's LoveDA layout: root/{Train,Val,Test}/{Urban,Rural}/images_png + masks_png."""
    raw = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    images = {}
    for split, domain, seed in (("Train", "Urban", 1), ("Train", "Rural", 2), ("Val", "Urban", 3),
                                ("Val", "Rural", 4)):
        d = root / split / domain
        images[d / "images_png" / "1.png"] = _rgb(2, 4, seed)
        _save(d / "masks_png" / "1.png", raw)
    images[root / "Train" / "Rural" / "images_png" / "2.png"] = np.ones((2, 4, 3))  # dark: stays dark
    _save(root / "Train" / "Rural" / "masks_png" / "2.png", raw[::-1])
    for domain in ("Urban", "Rural"):  # labels withheld
        images[root / "Test" / domain / "images_png" / "9.png"] = _rgb(2, 4)
    for path, rgb in images.items():
        _save(path, rgb)
    return {str(p): v for p, v in images.items()}


def _same_items(a, b):
    assert [Path(p).name for p, _ in a.pairs] == [Path(p).name for p, _ in b.pairs] and len(a) == len(b)
    for x, y in zip(SegmentationDataset(a), SegmentationDataset(b)):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]), x["path"]


def test_torchgeo_loveda_reads_as_our_loveda_reader(tmp_path):
    _tg()
    written = _tg_loveda(tmp_path)
    train = find_split("torchgeo.LoveDA", tmp_path, "Train")
    assert type(train.dataset).__module__.startswith("torchgeo.") and train.classes == LOVEDA_CLASSES
    assert [Path(p).parts[-3:] for p, _ in train.pairs] == [
        ("Rural", "images_png", "1.png"), ("Rural", "images_png", "2.png"), ("Urban", "images_png", "1.png")]
    _same_items(train, find_split("loveda", tmp_path, "train"))
    for item in SegmentationDataset(train):  # the pixels written, the raw mask mapped
        assert np.array_equal(np.rint(item["image"].permute(1, 2, 0).numpy() * 255), written[item["path"]])
    assert _mask(train, 0) == [[255, 0, 1, 2], [3, 4, 5, 6]] and _mask(train, 1) == [[3, 4, 5, 6], [255, 0, 1, 2]]
    assert SegmentationDataset(train)[1]["image"].max() == pytest.approx(1 / 255)
    val = find_split("torchgeo.loveda", tmp_path, "VAL", domain="RURAL")  # names in any case
    assert val.dataset.scene == ["rural"] and len(val) == 1
    _same_items(val, find_split("loveda", tmp_path, "val", domain="rural"))
    aug = SegmentationDataset(train, image_size=3, train=True)[2]
    assert aug["image"].shape == (3, 3, 3) and aug["mask"].dtype == torch.int64


def test_torchgeo_loveda_errors(tmp_path):
    _tg()
    _tg_loveda(tmp_path)
    with pytest.raises(ValueError, match=r"split 'test' has no masks \(LoveDA's Test labels are withheld"):
        find_split("torchgeo.LoveDA", tmp_path, "test")
    with pytest.raises(ValueError, match=r"has splits \['test', 'train', 'val'\], got 'trian'"):
        find_split("torchgeo.LoveDA", tmp_path, "trian")
    with pytest.raises(ValueError, match=r"domain 'Suburb': choose one of urban, rural"):
        find_split("torchgeo.LoveDA", tmp_path, "val", domain="Suburb")
    with pytest.raises(ValueError, match=r"give domain or the scene option, not both"):
        find_split("torchgeo.LoveDA", tmp_path, "val", domain="urban", scene=["rural"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['eroded'\] for torchgeo.LoveDA.*'checksum'"):
        find_split("torchgeo.LoveDA", tmp_path, "val", eroded=True)
    with pytest.raises(ValueError, match=r"domain is only understood for torchgeo.LoveDA.*Potsdam2D"):
        find_split("torchgeo.Potsdam2D", tmp_path, "val", domain="urban")
    with pytest.raises(ValueError, match=r"no dataset class 'DatasetNotFoundError'"):
        torchgeo_dataset("DatasetNotFoundError", tmp_path, "train")
    with pytest.raises(ValueError, match=r"no val data under .*empty: it looks for .*empty.Val.<Scene>.images_png"):
        find_split("torchgeo.LoveDA", tmp_path / "empty", "val")
    (tmp_path / "Val" / "Rural" / "masks_png" / "1.png").unlink()
    with pytest.raises(ValueError, match=r"1 torchgeo.LoveDA image\(s\) have no mask file, e.g. .*Val.Rural.masks_png"):
        find_split("torchgeo.LoveDA", tmp_path, "val")
    palette = Image.fromarray(np.ones((2, 4), np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 255, 255] * 128)
    palette.save(tmp_path / "Val" / "Rural" / "masks_png" / "1.png")
    with pytest.raises(ValueError, match=r"palette PNG, which torchgeo.LoveDA reads as grey levels.*dataset: loveda"):
        find_split("torchgeo.LoveDA", tmp_path, "val")


def _tg_isprs(root: Path, name: str, ids, rgb_dir: str, rgb_name, label_dir: str, label_name, ours: bool, bands=3):
    """A tile per id in torchgeo's layout (images in rgb_dir, labels flat in root) and,
    with `ours`, in the distributed one our reader reads; the same pixels in both."""
    row = [WHITE, BLUE, CYAN, GREEN, YELLOW, RED]  # no black: the full (not eroded) labels
    for k, tile in enumerate(ids):
        rgb, label = _rgb(2, 6, k), [row, row[::-1]]
        if bands == 4:  # Potsdam's RGBIR tiles: R, G, B, then near infrared
            rgbir = np.concatenate([rgb, _rgb(2, 6, 9)[..., :1]], -1).astype(np.uint8)
            path = root / "4_Ortho_RGBIR" / f"top_potsdam_{tile}_RGBIR.tif"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgbir, "RGBA").save(path)
        else:
            _save(root / "top" / rgb_name(tile), rgb)
        _save(root / label_name(tile), label)
        if ours:
            _save(root / rgb_dir / rgb_name(tile), rgb)
            _save(root / label_dir / label_name(tile), label)


@pytest.mark.parametrize("name", ["potsdam", "vaihingen"])
def test_torchgeo_isprs_reads_as_our_isprs_readers(tmp_path, name):
    _tg()
    if name == "potsdam":
        cls, ids = "Potsdam2D", ["2_10", "2_13", "6_7"]  # train, val, train
        _tg_isprs(tmp_path, name, ids, "2_Ortho_RGB", lambda t: f"top_potsdam_{t}_RGB.tif", "5_Labels_all",
                  lambda t: f"top_potsdam_{t}_label.tif", True, bands=4)
    else:
        cls, ids = "Vaihingen2D", ["1", "2", "3"]  # train, val, train
        _tg_isprs(tmp_path, name, ids, "top", lambda t: f"top_mosaic_09cm_area{t}.tif", "gts_for_participants",
                  lambda t: f"top_mosaic_09cm_area{t}.tif", True)
    for split, n in (("train", 2), ("val", 1)):
        tg, ours = find_split(f"torchgeo.{cls}", tmp_path, split), find_split(name, tmp_path, split)
        assert tg.classes == ours.classes == ISPRS_CLASSES and len(tg) == n
        items = SegmentationDataset(tg)
        by_id = {Path(p).name.replace("_RGBIR", "_RGB"): items[k] for k, (p, _) in enumerate(tg.pairs)}
        for k, (image, _) in enumerate(ours.pairs):
            mine, theirs = SegmentationDataset(ours)[k], by_id[Path(image).name]
            assert torch.equal(mine["image"], theirs["image"]) and torch.equal(mine["mask"], theirs["mask"])
            assert mine["mask"].tolist() == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    with pytest.raises(ValueError, match=r"has splits \['train', 'val'\] \(its val is torchgeo's test split"):
        find_split(f"torchgeo.{cls}", tmp_path, "Test")  # refused like our readers: no set to select and report on
    # torchgeo makes any colour outside its palette clutter, the boundary black too (ours ignores it)
    label = tmp_path / Path(find_split(f"torchgeo.{cls}", tmp_path, "val").pairs[0][1]).name
    _save(label, [[BLACK, BLUE, (10, 20, 30), WHITE, WHITE, WHITE]] * 2)
    assert _mask(find_split(f"torchgeo.{cls}", tmp_path, "val"))[0] == [5, 1, 5, 0, 0, 0]
    with pytest.raises(ValueError, match=r"has splits \['train', 'val'\].*, got 'eval'"):
        find_split(f"torchgeo.{cls}", tmp_path, "eval")
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['drop_clutter'\] for torchgeo.{cls}"):
        find_split(f"torchgeo.{cls}", tmp_path, "val", drop_clutter=True)
    with pytest.raises(ValueError, match=rf"torchgeo.{cls}: no val \(torchgeo's test\) data under"):
        find_split(f"torchgeo.{cls}", tmp_path / "nothing", "val")
    with pytest.raises(ValueError, match=r"tile needs file sizes"):
        SegmentationDataset(find_split(f"torchgeo.{cls}", tmp_path, "val"), tile=2)


def test_segsplit_rejects_unknown_label_kind():
    with pytest.raises(ValueError, match=r"label_kind must be one of"):
        SegSplit([("a.png", "b.png")], ["x"], 255, "palette")
    with pytest.raises(ValueError, match=r"ignore_index 1 is also class 'b'.*outside 0\.\.2"):
        SegSplit([("a.png", "b.png")], ["a", "b", "c"], 1)


def test_scale_multiplies_the_training_resize_range(tmp_path, monkeypatch):
    """scale 0.5 (mmseg's LoveDA recipe at 512 of 1024): the random resize draws from
    x0.25-1 instead of x0.5-2."""
    import visionpeft.data.segmentation as seg

    seg.write_synthetic_segmentation(tmp_path, n_train=2, n_val=1, n_test=1, size=32)
    seen = []
    real = seg._random_resize

    def spy(rng, image, mask, lo=0.5, hi=2.0):
        seen.append((lo, hi))
        return real(rng, image, mask, lo, hi)

    monkeypatch.setattr(seg, "_random_resize", spy)
    split = seg.find_split("synthetic", tmp_path, "train")
    seg.SegmentationDataset(split, image_size=16, train=True, scale=0.5)[0]
    seg.SegmentationDataset(split, image_size=16, train=True)[0]
    assert seen == [(0.25, 1.0), (0.5, 2.0)]
    with pytest.raises(ValueError, match="scale must be positive"):
        seg.SegmentationDataset(split, image_size=16, train=True, scale=0)
