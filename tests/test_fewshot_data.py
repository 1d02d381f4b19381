"""Few-shot classification data: the CoOp split files under both folder conventions,
FGVC-Aircraft's text files, ImageNet with classnames.txt, image folders, the per-class
few-shot draw, and the one-line refusals."""
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from visionpeft.data.fewshot import (ClassificationImages, check_files, coop_split, fewshot_subset,
                                     find_classification_split, imagefolder_split, imagenet_split,
                                     write_fewshot_split, write_scene_classification)


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _coop(folder, image_dir, stem, classes=("Forest", "Sea or Lake"), per=3, write_images=True):
    split = {}
    for s in ("train", "val", "test"):
        rows = []
        for label, c in enumerate(classes):
            for i in range(per):
                rel = f"{c.replace(' ', '')}/{s}_{i}.jpg"
                rows.append([rel, label, c])
                if write_images:
                    _png(folder / image_dir / rel, label * 40 + i)
        split[s] = rows
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"split_zhou_{stem}.json").write_text(json.dumps(split))
    return split


@pytest.mark.parametrize("folder", ["eurosat", "EuroSAT"])  # CoOp's DATASETS.md name, the CLIP-LoRA code's
def test_coop_split_both_folder_names(tmp_path, folder):
    split = _coop(tmp_path / folder, "2750", "EuroSAT")
    for name in ("EuroSAT", "eurosat"):
        got = coop_split(tmp_path, name, "test")
        assert [[it.path, it.label, it.classname] for it in got.items] == split["test"]
        assert got.root == tmp_path / folder / "2750" and got.classnames == ["Forest", "Sea or Lake"]
        assert got.absolute(got.items[0]).is_file()


# split file stem, image folder, CoOp's DATASETS.md folder, the CLIP-LoRA code's folder (written out by hand)
_LAYOUTS = [("OxfordPets", "images", "oxford_pets", "OxfordPets"),
            ("Caltech101", "101_ObjectCategories", "caltech-101", "Caltech101"),
            ("DescribableTextures", "images", "dtd", "DTD"),
            ("EuroSAT", "2750", "eurosat", "EuroSAT"),
            ("Food101", "images", "food-101", "Food101"),
            ("OxfordFlowers", "jpg", "oxford_flowers", "Flower102"),
            ("StanfordCars", "", "stanford_cars", "StanfordCars"),
            ("SUN397", "SUN397", "sun397", "SUN397"),
            ("UCF101", "UCF-101-midframes", "ucf101", "UCF101")]


@pytest.mark.parametrize("stem,images,folder", [(s, i, f) for s, i, *folders in _LAYOUTS for f in folders])
def test_coop_layouts(tmp_path, stem, images, folder):
    split = _coop(tmp_path / folder, images, stem)
    got = coop_split(tmp_path, stem, "train")
    assert got.root == tmp_path / folder / images if images else got.root == tmp_path / folder
    assert [[it.path, it.label, it.classname] for it in got.items] == split["train"]
    check_files(got)


def test_own_coop_dataset_and_unknown_name(tmp_path):
    _coop(tmp_path / "Mine", "", "Mine")
    assert len(coop_split(tmp_path, "Mine", "val").items) == 6
    with pytest.raises(FileNotFoundError, match="no split_zhou_Other.json.*known CoOp data sets"):
        coop_split(tmp_path, "Other", "val")


def test_fgvc_text_files(tmp_path):
    root = tmp_path / "fgvc_aircraft"
    (root / "images").mkdir(parents=True)
    (root / "variants.txt").write_text("707-320\nA300B4\n")
    for s in ("train", "val", "test"):
        (root / f"images_variant_{s}.txt").write_text("0001 707-320\n0002 A300B4\n0003 A300B4\n")
    got = coop_split(tmp_path, "fgvc", "val")
    assert [(it.path, it.label, it.classname) for it in got.items] == [
        ("0001.jpg", 0, "707-320"), ("0002.jpg", 1, "A300B4"), ("0003.jpg", 1, "A300B4")]
    assert got.root == root / "images"


def test_imagenet_classnames_and_val_as_test(tmp_path):
    root = tmp_path / "imagenet"
    for s in ("train", "val"):
        for w, v in (("n01", 0), ("n02", 100)):
            _png(root / "images" / s / w / f"{s}{v}.JPEG", v)
    (root / "classnames.txt").write_text("n01 tench\nn02 goldfish\n")
    test = imagenet_split(tmp_path, "test")
    assert test.classnames == ["tench", "goldfish"]
    assert [it.path for it in test.items] == ["val/n01/val0.JPEG", "val/n02/val100.JPEG"]
    (root / "classnames.txt").write_text("n01 tench\n")
    with pytest.raises(ValueError, match=r"names no class for folder\(s\) \['n02'\]"):
        imagenet_split(tmp_path, "train")
    with pytest.raises(ValueError, match="ImageNet has no validation split of its own"):
        imagenet_split(tmp_path, "val")


def test_imagenet_without_images_folder(tmp_path):
    """The CLIP-LoRA code's layout: imagenet/{train,val} without images/."""
    root = tmp_path / "imagenet"
    for s in ("train", "val"):
        _png(root / s / "n02" / f"{s}.JPEG")
        _png(root / s / "n01" / f"{s}.JPEG")
    (root / "classnames.txt").write_text("n02 goldfish\nn01 tench\n")
    got = imagenet_split(tmp_path, "train")
    assert got.root == root and got.classnames == ["tench", "goldfish"]
    assert [(it.path, it.label) for it in got.items] == [("train/n01/train.JPEG", 0), ("train/n02/train.JPEG", 1)]


def test_imagefolder_and_empty_class(tmp_path):
    for c in ("a_b", "c"):
        for i in range(2):
            _png(tmp_path / "train" / c / f"{i}.png")
    got = find_classification_split("imagefolder", tmp_path, "train")
    assert got.classnames == ["a_b", "c"] and [it.label for it in got.items] == [0, 0, 1, 1]
    (tmp_path / "train" / "d").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) with no images: \['d'\]"):
        imagefolder_split(tmp_path, "train")


def test_fewshot_draw_against_a_count():
    from visionpeft.data.fewshot import Item

    pool = [Item(f"{c}/{i}", c, str(c)) for c in range(3) for i in range([5, 2, 1][c])]
    for seed in range(5):
        got = fewshot_subset(pool, 3, seed)
        per = Counter(it.label for it in got)
        assert per == {0: 3, 1: 3, 2: 3}
        # a class with enough images gives distinct ones; fewer: repeats, only its own
        assert len({it.path for it in got if it.label == 0}) == 3
        assert {it.path for it in got if it.label == 2} == {"2/0"}
        assert {it.path for it in got if it.label == 1} <= {"1/0", "1/1"}
        assert fewshot_subset(pool, 3, seed) == got  # seeded
    draws = {tuple(it.path for it in fewshot_subset(pool, 2, s) if it.label == 0) for s in range(10)}
    assert len(draws) > 3  # seeds differ
    assert {it.path for it in fewshot_subset(pool, 2, 0, exclude={"0/0", "0/1", "0/2"}) if it.label == 0} \
        <= {"0/3", "0/4"}
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        fewshot_subset(pool, 0, 0)


def test_refusals(tmp_path):
    _coop(tmp_path / "eurosat", "2750", "EuroSAT", write_images=False)
    split = coop_split(tmp_path, "EuroSAT", "train")
    with pytest.raises(FileNotFoundError, match=r"6 of 6 images are missing .*e\.g\. \['Forest/train_0.jpg'"):
        check_files(split)
    data = json.loads((tmp_path / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    data["train"] = [r for r in data["train"] if r[1] != 0] + [[p, 2, "River"] for p, *_ in data["train"][:1]]
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"no images for label\(s\) \[0\]"):
        coop_split(tmp_path, "EuroSAT", "train")
    data["train"] = [["x.jpg", 0, "Forest"], ["y.jpg", 0, "Wood"]]
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="label 0 is called both 'Forest' and 'Wood'"):
        coop_split(tmp_path, "EuroSAT", "train")
    with pytest.raises(ValueError, match="dataset must be coop, imagenet or imagefolder"):
        find_classification_split("folder", tmp_path, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        coop_split(tmp_path, "EuroSAT", "validation")


def test_written_split_round_trips(tmp_path):
    folder = write_scene_classification(tmp_path, "S", scenes=["desert", "lake"], counts={"train": 3, "val": 1,
                                                                                          "test": 2})
    train = coop_split(tmp_path, "S", "train")
    assert train.classnames == ["desert", "lake"] and len(train.items) == 6
    again = write_scene_classification(tmp_path / "again", "S", scenes=["desert", "lake"],
                                       counts={"train": 3, "val": 1, "test": 2})
    a = np.asarray(Image.open(folder / train.items[4].path))
    assert np.array_equal(a, np.asarray(Image.open(again / train.items[4].path)))  # seeded
    shots = fewshot_subset(train.items, 2, 0)
    write_fewshot_split(tmp_path / "out" / "fewshot_split.json", shots, shots[:2])
    back = json.loads((tmp_path / "out" / "fewshot_split.json").read_text())
    assert back["train"] == [[it.path, it.label, it.classname] for it in shots] and len(back["val"]) == 2
    image, label = ClassificationImages(train, shots, lambda im: np.asarray(im))[0]
    assert image.shape == (64, 64, 3) and label == shots[0].label
