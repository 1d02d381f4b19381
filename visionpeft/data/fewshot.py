"""Image classification splits for CLIP few-shot runs, in the layouts users already have:

* ``coop``: the CoOp split files (``split_zhou_<Dataset>.json``, lists of ``[relative
  path, label, class name]`` under ``train``, ``val`` and ``test``) of the eleven usual
  data sets, found under either the folder names of CoOp's DATASETS.md (``eurosat``,
  ``oxford_pets``, ``caltech-101``, ...) or those of the CLIP-LoRA code (``OxfordPets``,
  ``Caltech101``, ``Flower102``, ...); FGVC-Aircraft in its own text files (``variants.txt``,
  ``images_variant_<split>.txt``), as CoOp reads it. Any other ``dataset_name`` is a
  folder ``<data_root>/<name>`` holding ``split_zhou_<name>.json`` with paths relative to it.
* ``imagenet``: ``imagenet/images/{train,val}/<wnid>/*`` (or ``imagenet/{train,val}``) with
  ``classnames.txt`` (``wnid name`` lines); the validation set is the test split, as in
  CoOp, and few-shot validation images are drawn from train.
* ``imagefolder``: ``<data_root>/{train,val,test}/<class>/*`` (``val`` optional: then the
  few-shot validation images are drawn from the training images not chosen as shots).

`fewshot_subset` draws k shots per class by seed (with replacement where a class has
fewer, as CoOp's ``generate_fewshot_dataset``), and a run writes what it drew
(`write_fewshot_split`) so that it can be audited and repeated.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Item:
    """One image: ``path`` relative to the split's ``root``, its label and class name."""

    path: str
    label: int
    classname: str


@dataclass
class ClassificationSplit:
    """The items of one split and where their paths start."""

    root: Path
    items: list[Item]
    classnames: list[str]
    name: str  # e.g. "EuroSAT" or the folder, for messages and templates

    def absolute(self, item: Item) -> Path:
        return self.root / item.path


# split-file stem -> (folder names: CoOp's DATASETS.md first, then the CLIP-LoRA code's where it
# differs; "EuroSAT" is a spelling users have, neither's; image folder)
COOP_DATASETS: dict[str, tuple[tuple[str, ...], str]] = {
    "OxfordPets": (("oxford_pets", "OxfordPets"), "images"),
    "Caltech101": (("caltech-101", "Caltech101"), "101_ObjectCategories"),
    "DescribableTextures": (("dtd", "DTD"), "images"),
    "EuroSAT": (("eurosat", "EuroSAT"), "2750"),
    "Food101": (("food-101", "Food101"), "images"),
    "OxfordFlowers": (("oxford_flowers", "Flower102"), "jpg"),
    "StanfordCars": (("stanford_cars", "StanfordCars"), ""),
    "SUN397": (("sun397", "SUN397"), "SUN397"),
    "UCF101": (("ucf101", "UCF101"), "UCF-101-midframes"),
}
FGVC = ("fgvc_aircraft", "FGVCAircraft")
# names users write for the same data set (case-insensitive)
ALIASES = {"dtd": "DescribableTextures", "flowers102": "OxfordFlowers", "flower102": "OxfordFlowers",
           "pets": "OxfordPets", "cars": "StanfordCars", "caltech": "Caltech101", "food": "Food101",
           "fgvc": "FGVCAircraft", "fgvcaircraft": "FGVCAircraft", "fgvc_aircraft": "FGVCAircraft",
           "aircraft": "FGVCAircraft", "sun": "SUN397", "ucf": "UCF101"}
ALIASES.update({k.lower(): k for k in COOP_DATASETS})
ALIASES.update({folder.lower(): k for k, (folders, _) in COOP_DATASETS.items() for folder in folders})

# CoOp's per-data-set prompt templates (``template: dataset``); "a photo of a {}." otherwise
DATASET_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.", "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.", "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.", "ImageNet": "a photo of a {}.",
}
DEFAULT_TEMPLATE = "a photo of a {}."
SPLITS = ("train", "val", "test")


def canonical_name(dataset_name: str) -> str:
    """``EuroSAT`` for eurosat / EuroSAT / EUROSAT; other names are kept as written."""
    return ALIASES.get(str(dataset_name).lower(), str(dataset_name))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _first_folder(root: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"{root} holds no {what} folder (looked for {' or '.join(names)})")


def _label_classes(items: list[Item], where: str) -> list[str]:
    """Class names by label; labels must be 0..K-1, each with one name."""
    names: dict[int, str] = {}
    for it in items:
        if names.setdefault(it.label, it.classname) != it.classname:
            raise ValueError(f"{where}: label {it.label} is called both {names[it.label]!r} and {it.classname!r}")
    if not names:
        raise ValueError(f"{where}: the split is empty")
    k = max(names) + 1
    missing = [i for i in range(k) if i not in names]
    if missing or min(names) < 0:
        raise ValueError(f"{where}: labels must run 0..{k - 1} with images for each; no images for label(s) "
                         f"{missing[:10]}")
    return [names[i] for i in range(k)]


def read_split_file(path: Path, image_root: Path, split: str, name: str) -> ClassificationSplit:
    """One split of a CoOp ``split_zhou_*.json``; labels and names are checked."""
    _check_split(split)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"split file {path} does not exist") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a JSON split file") from None
    if not isinstance(data, dict) or split not in data:
        raise ValueError(f"{path} has no {split!r} list (a split file holds train, val and test lists of "
                         f"[path, label, class name])")
    items = []
    for k, row in enumerate(data[split]):
        if not (isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[1], int)):
            raise ValueError(f"{path}: {split}[{k}] is {row!r}, not [relative path, label, class name]")
        items.append(Item(str(row[0]), int(row[1]), str(row[2])))
    classes = _label_classes(items, f"{path} ({split})")
    return ClassificationSplit(Path(image_root), items, classes, name)


def _fgvc(folder: Path, split: str) -> ClassificationSplit:
    variants = folder / "variants.txt"
    if not variants.is_file():
        raise FileNotFoundError(f"{folder} has no variants.txt (FGVC-Aircraft's class list)")
    classes = [line.strip() for line in variants.read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    listing = folder / f"images_variant_{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{folder} has no {listing.name}")
    items = []
    for line in listing.read_text().splitlines():
        if not line.strip():
            continue
        image, _, cname = line.strip().partition(" ")
        if cname not in index:
            raise ValueError(f"{listing}: {cname!r} is not in variants.txt")
        items.append(Item(f"{image}.jpg", index[cname], cname))
    _label_classes(items, str(listing))
    return ClassificationSplit(folder / "images", items, classes, "FGVCAircraft")


def coop_split(data_root, dataset_name: str, split: str) -> ClassificationSplit:
    """A split of a CoOp-layout data set under ``data_root``."""
    _check_split(split)
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} is not a folder")
    name = canonical_name(dataset_name)
    if name == "FGVCAircraft":
        return _fgvc(_first_folder(root, FGVC, "FGVC-Aircraft"), split)
    if name in COOP_DATASETS:
        folders, images = COOP_DATASETS[name]
        folder = _first_folder(root, folders, name)
        return read_split_file(folder / f"split_zhou_{name}.json", folder / images, split, name)
    # a data set of one's own in the same layout: data_root/<name>/split_zhou_<name>.json,
    # or data_root itself holding that file
    folder = root / name if (root / name / f"split_zhou_{name}.json").is_file() else root
    if not (folder / f"split_zhou_{name}.json").is_file():
        raise FileNotFoundError(
            f"no split_zhou_{name}.json in {root / name} or {root}; known CoOp data sets: "
            f"{sorted([*COOP_DATASETS, 'FGVCAircraft'])} (or write split_zhou_<name>.json for your own)")
    return read_split_file(folder / f"split_zhou_{name}.json", folder, split, name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def imagefolder_split(data_root, split: str, classnames: list[str] | None = None,
                      name: str | None = None) -> ClassificationSplit:
    """``<data_root>/<split>/<class>/*`` (torchvision's ImageFolder layout); classes are the
    sorted folder names unless ``classnames`` (one per folder, in sorted order) are given."""
    _check_split(split)
    folder = Path(data_root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist (an image folder data set holds train/, test/ and "
                                f"optionally val/, each with one folder per class)")
    dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not dirs:
        raise ValueError(f"{folder} holds no class folders")
    listed = [_images_in(d) for d in dirs]  # once: an ImageNet train/ holds 1.28M files
    empty = [d.name for d, images in zip(dirs, listed) if not images]
    if empty:
        raise ValueError(f"{folder}: class folder(s) with no images: {empty[:10]}")
    names = [d.name for d in dirs] if classnames is None else list(classnames)
    if len(names) != len(dirs):
        raise ValueError(f"{folder} has {len(dirs)} class folders but {len(names)} class names were given")
    items = [Item(str(p.relative_to(Path(data_root))), label, names[label])
             for label, images in enumerate(listed) for p in images]
    return ClassificationSplit(Path(data_root), items, names, name or Path(data_root).name)


def imagenet_split(data_root, split: str) -> ClassificationSplit:
    """CoOp's ImageNet: ``imagenet/images/{train,val}`` (or ``imagenet/{train,val}``, the
    CLIP-LoRA code's layout) + ``imagenet/classnames.txt``; the test split is ``val``
    (ImageNet's labelled validation set), as in CoOp and CLIP-LoRA; ``val`` here is the same
    folder, so a few-shot run draws its validation images from train instead (`has_split`)."""
    _check_split(split)
    folder = Path(data_root) / "imagenet" if (Path(data_root) / "imagenet").is_dir() else Path(data_root)
    names_file = folder / "classnames.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"{folder} has no classnames.txt ('<wnid> <class name>' per line)")
    names = {}
    for line in names_file.read_text().splitlines():
        wnid, _, cname = line.strip().partition(" ")
        if wnid:
            names[wnid] = cname.strip() or wnid
    if split == "val":  # it would be the test images under another name
        raise ValueError("ImageNet has no validation split of its own: its labelled val/ is the test split "
                         "(use split test); a few-shot run draws its validation images from train/")
    which = "train" if split == "train" else "val"
    images = folder / "images" if (folder / "images").is_dir() else folder
    found = imagefolder_split(images, which, name="ImageNet")
    wnids = sorted(p.name for p in (images / which).iterdir() if p.is_dir())
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise ValueError(f"{names_file} names no class for folder(s) {unknown[:5]}")
    classes = [names[w] for w in wnids]
    found.items = [Item(it.path, it.label, classes[it.label]) for it in found.items]
    found.classnames = classes
    return found


def find_classification_split(dataset: str, data_root, split: str, dataset_name: str | None = None,
                              classnames: list[str] | None = None) -> ClassificationSplit:
    """``dataset`` is ``coop`` (with ``dataset_name``), ``imagenet`` or ``imagefolder``."""
    if dataset == "coop":
        if not dataset_name:
            raise ValueError("dataset: coop needs dataset_name, e.g. EuroSAT (reads split_zhou_EuroSAT.json)")
        return coop_split(data_root, dataset_name, split)
    if dataset == "imagenet":
        return imagenet_split(data_root, split)
    if dataset == "imagefolder":
        return imagefolder_split(data_root, split, classnames)
    raise ValueError(f"dataset must be coop, imagenet or imagefolder, got {dataset!r}")


def has_split(dataset: str, data_root, split: str, dataset_name: str | None = None) -> bool:
    """Whether the layout has ``split`` of its own: an image folder may lack val/, and
    ImageNet's labelled val/ is its test split, so its validation images come from train/
    (the images not drawn as shots), as CoOp and CLIP-LoRA draw them."""
    if dataset == "imagefolder":
        return (Path(data_root) / split).is_dir()
    if dataset == "imagenet":
        return split != "val"
    return True


def check_files(split: ClassificationSplit, items: list[Item] | None = None, where: str = "") -> None:
    """Refuse, naming the first few, items whose image file does not exist."""
    items = split.items if items is None else items
    missing = [it.path for it in items if not os.path.isfile(split.absolute(it))]
    if missing:
        raise FileNotFoundError(f"{where or split.name}: {len(missing)} of {len(items)} images are missing under "
                                f"{split.root}, e.g. {missing[:3]}")


def fewshot_subset(items: list[Item], shots: int, seed: int, exclude: set | None = None) -> list[Item]:
    """k items per class by seed: without replacement where a class has k or more, with
    replacement where it has fewer (CoOp's rule). Classes in label order; ``exclude`` (item
    indices by path) are not drawn where enough others remain."""
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[Item]] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    out = []
    for label in sorted(by_label):
        pool = by_label[label]
        if exclude:
            rest = [it for it in pool if it.path not in exclude]
            pool = rest if rest else pool
        if len(pool) >= shots:
            picked = rng.choice(len(pool), shots, replace=False)
        else:
            picked = rng.choice(len(pool), shots, replace=True)
        out.extend(pool[i] for i in sorted(picked.tolist()))
    return out


def write_fewshot_split(path, train: list[Item], val: list[Item]) -> None:
    """The drawn lists as a split file (``train`` and ``val`` of [path, label, class name])."""
    from visionpeft.core.atomic import write_file

    body = json.dumps({"train": [[it.path, it.label, it.classname] for it in train],
                       "val": [[it.path, it.label, it.classname] for it in val]}, indent=1)
    write_file(Path(path), lambda tmp: Path(tmp).write_text(body))


class ClassificationImages(torch.utils.data.Dataset):
    """(image tensor, label) of ``items`` under ``root`` through ``transform`` (PIL in)."""

    def __init__(self, split: ClassificationSplit, items: list[Item], transform):
        self.split, self.items, self.transform = split, list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        it = self.items[i]
        path = self.split.absolute(it)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        return self.transform(image), it.label


def write_scene_classification(root, name: str = "SceneTypes", scenes=None, counts=None, size: int = 64,
                               seed: int = 0) -> Path:
    """A CoOp-layout data set of procedural scenes (`visionpeft.data.scenes`), one class per
    scene type (default: the four types the embedded models never saw in pretraining):
    ``<root>/<name>/<type>/<split>_<i>.png`` + ``split_zhou_<name>.json``. Returns the
    folder. Seeded: the same images on every machine. Written into a temporary folder and
    renamed, so an interrupted call leaves nothing half-written."""
    from PIL import Image

    from visionpeft.core.atomic import write_dir

    from .scenes import HELD_OUT_SCENES, make_scene

    scenes = list(HELD_OUT_SCENES if scenes is None else scenes)
    counts = dict(counts or {"train": 32, "val": 8, "test": 64})
    folder = Path(root) / name

    def write(tmp):
        tmp = Path(tmp)
        split = {}
        for s_index, s in enumerate(SPLITS):
            rows = []
            for label, scene in enumerate(scenes):
                # one stream per (split, class): adding classes or images leaves the others as they were
                rng = np.random.default_rng([seed, s_index, label])
                (tmp / scene).mkdir(exist_ok=True)
                for i in range(counts.get(s, 0)):
                    rgb, _ = make_scene(rng, size, scene)
                    path = f"{scene}/{s}_{i:04d}.png"
                    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(tmp / path)
                    rows.append([path, label, scene])
            split[s] = rows
        (tmp / f"split_zhou_{name}.json").write_text(json.dumps(split))

    Path(root).mkdir(parents=True, exist_ok=True)
    write_dir(folder, write)
    return folder
