"""Remote-sensing semantic-segmentation data for the segmentation task.

Readers return a `SegSplit` (image/mask path pairs plus how to read the masks) for
LoveDA, ISPRS Potsdam and Vaihingen as distributed (colour-coded labels),
mmsegmentation's converted layout, a generic images/masks folder, and the synthetic
benchmark written here; torchgeo datasets get an adapter with the same fields.
`SegmentationDataset` turns a split into tensors: it cuts large tiles lazily (from
image sizes, not files on disk) and applies mmseg-style training augmentation, with
randomness from (seed, epoch, index) so a run can be replayed exactly.
"""
from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from . import scenes
from .change_detection import IMAGE_EXTS, _open

SegSample = tuple[str, str]
IGNORE = 255
LABEL_KINDS = ("index", "rgb")

LOVEDA_CLASSES = ["background", "building", "road", "water", "barren", "forest", "agriculture"]
# LoveDA masks: 0 is no-data, 1..7 the classes above
LOVEDA_REMAP = {raw: raw - 1 for raw in range(1, 8)}

ISPRS_CLASSES = ["impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"]
# class colours of the ISPRS 2D labelling benchmark; black marks the class boundaries
# that the eroded ground truth leaves out of scoring, so it is ignored here too
ISPRS_PALETTE = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (0, 255, 0): 3,
                 (255, 255, 0): 4, (255, 0, 0): 5, (0, 0, 0): -1}
_ISPRS_CODES = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in ISPRS_PALETTE))
_ISPRS_VALUES = np.array([ISPRS_PALETTE[(c >> 16, (c >> 8) & 255, c & 255)] for c in _ISPRS_CODES])
_ISPRS_NAMES = ("white (255, 255, 255) impervious surfaces, blue (0, 0, 255) building, cyan (0, 255, 255) "
                "low vegetation, green (0, 255, 0) tree, yellow (255, 255, 0) car, red (255, 0, 0) clutter, "
                "black (0, 0, 0) boundary")

# Train/val tiles of mmsegmentation's converters, copied from open-mmlab/mmsegmentation
# tools/dataset_converters/potsdam.py and vaihingen.py (`splits` in main()); val is the
# ISPRS benchmark's test set, whose labels were released later.
POTSDAM_SPLITS = {
    "train": ["2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11",
              "5_12", "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7",
              "7_8", "7_9"],
    "val": ["5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13",
            "4_13", "3_14", "7_13"],
}
VAIHINGEN_SPLITS = {
    "train": ["1", "11", "13", "15", "17", "21", "23", "26", "28", "3", "30", "32", "34", "37", "5", "7"],
    "val": ["6", "24", "35", "16", "14", "22", "10", "4", "2", "20", "8", "31", "33", "27", "38", "12",
            "29"],
}
DATASETS = ("loveda", "potsdam", "vaihingen", "mmseg", "folder", "synthetic", "torchgeo.<Class>")


@dataclass
class SegSplit:
    """Image/mask pairs and how to read the masks.

    `label_kind` "index": mask pixels are raw values, mapped through `remap` (raw ->
    class index; raw values not listed -> `ignore_index`) or, without a remap, taken as
    class indices. "rgb": ISPRS colour-coded masks, decoded to the ISPRS class order
    (`ISPRS_CLASSES`, black -> ignore), then mapped through `remap` if one is given.
    """
    pairs: list[SegSample]
    classes: list[str]
    ignore_index: int = IGNORE
    label_kind: str = "index"
    remap: dict[int, int] | None = None

    def __post_init__(self):
        if self.label_kind not in LABEL_KINDS:
            raise ValueError(f"label_kind must be one of {LABEL_KINDS}, got {self.label_kind!r}")
        if not self.classes:
            raise ValueError("a segmentation split needs at least one class name")
        if 0 <= self.ignore_index < len(self.classes):
            raise ValueError(f"ignore_index {self.ignore_index} is also class {self.classes[self.ignore_index]!r}; "
                             f"use a value outside 0..{len(self.classes) - 1}, e.g. 255")

    def __len__(self) -> int:
        return len(self.pairs)


# ----------------------------------------------------------------------------- reading

def _read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8; tifffile, when installed, reads TIFFs that PIL cannot."""
    try:
        return np.asarray(_open(path).convert("RGB"))
    except ValueError:
        arr = _read_tiff(path)
        if arr is None:
            raise
    if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
        raise ValueError(f"image file {path} has shape {arr.shape} and dtype {arr.dtype}; "
                         "expected 8-bit RGB (H, W, >=3)")
    return np.ascontiguousarray(arr[..., :3])


def _read_tiff(path: str) -> np.ndarray | None:
    if Path(path).suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile
    except ImportError:
        return None
    return tifffile.imread(path)


def _image_size(path: str) -> tuple[int, int]:
    """(H, W) from the file header only, so tiling large images reads no pixels."""
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except OSError as e:
        arr = _read_tiff(path)  # decodes, but only for TIFFs PIL cannot open
        if arr is None:
            raise ValueError(f"cannot read image file {path}: {e}") from e
        return arr.shape[0], arr.shape[1]


def _read_index_mask(path: str) -> np.ndarray:
    img = _open(path)
    arr = np.asarray(img)  # P, L, I;16, I keep the stored value; no palette lookup
    if arr.ndim == 3:  # a grey mask saved as RGB(A) is fine; a colour one is not
        if not (arr[..., :3] == arr[..., :1]).all():
            raise ValueError(f"mask file {path} is a colour image; expected a single-channel "
                             "index mask (or an ISPRS colour mask, label_kind='rgb')")
        arr = arr[..., 0]
    return arr.astype(np.int64)


def _decode_isprs(rgb: np.ndarray, path: str, ignore_index: int) -> np.ndarray:
    code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    pos = np.searchsorted(_ISPRS_CODES, code).clip(max=len(_ISPRS_CODES) - 1)
    known = _ISPRS_CODES[pos] == code
    if not known.all():
        row, col = divmod(int(np.flatnonzero(~known)[0]), rgb.shape[1])
        raise ValueError(f"label file {path} has colour {tuple(int(v) for v in rgb[row, col])} at "
                         f"row {row}, column {col}, which is no ISPRS class colour; expected "
                         f"{_ISPRS_NAMES}")
    out = _ISPRS_VALUES[pos]
    out[out < 0] = ignore_index
    return out


def _apply_remap(raw: np.ndarray, split, path: str) -> np.ndarray:
    """Map raw values to classes and refuse anything neither a class nor ignore."""
    out = raw
    if split.remap is not None:
        if raw.min(initial=0) < 0:
            raise ValueError(f"mask file {path} has negative values; expected raw values >= 0")
        lut = np.full(max(int(raw.max(initial=0)), split.ignore_index, *split.remap) + 1,
                      split.ignore_index, np.int64)
        for k, v in split.remap.items():
            lut[k] = v
        if split.ignore_index >= 0:  # ignore stays ignore whatever the remap says
            lut[split.ignore_index] = split.ignore_index
        out = lut[raw]
    bad = (out != split.ignore_index) & ((out < 0) | (out >= len(split.classes)))
    if bad.any():
        found = np.unique(raw[bad])[:10].tolist()
        raise ValueError(f"mask file {path} has values {found} that are neither a class index "
                         f"0..{len(split.classes) - 1} nor the ignore index {split.ignore_index}"
                         + (" after the remap" if split.remap is not None else ""))
    return out


def read_mask(path: str, split) -> np.ndarray:
    """Class-index mask (H, W) int64 of one mask file of `split`, ignore where unlabelled."""
    if split.label_kind == "rgb":
        raw = _decode_isprs(_read_rgb(path), path, split.ignore_index)
    else:
        raw = _read_index_mask(path)
    return _apply_remap(raw, split, path)


def _load_pair(split: SegSplit, k: int) -> tuple[np.ndarray, np.ndarray, str]:
    image_path, mask_path = split.pairs[k]
    image, mask = _read_rgb(image_path), read_mask(mask_path, split)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"size mismatch: mask {mask_path} is {mask.shape} (H, W) but image "
                         f"{image_path} is {image.shape[:2]}; they must be the same size")
    return image, mask, image_path


# ----------------------------------------------------------------------------- layouts

def _child(parent: Path, name: str, what: str) -> Path:
    """Sub-folder `name` of `parent`, case-insensitively ("val" finds "Val")."""
    if not parent.is_dir():
        raise ValueError(f"{what} {name!r}: folder {parent} does not exist")
    found = sorted(p.name for p in parent.iterdir() if p.is_dir())
    for sub in found:
        if sub.lower() == str(name).lower():
            return parent / sub
    raise ValueError(f"no {what} {name!r} in {parent}; folders there: {found or 'none'}")


def _images_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        there = sorted(p.name for p in folder.iterdir())[:10]
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTS))}) in {folder}; "
                         f"it holds: {there or 'nothing'}")
    return files


def _pairs_by_stem(image_dir: Path, mask_dir: Path) -> list[tuple[str, str]]:
    """Every image needs a mask with the same stem (masks may have another extension)."""
    if not mask_dir.is_dir():
        raise ValueError(f"mask folder {mask_dir} does not exist (images are in {image_dir})")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS}
    images = _images_in(image_dir)
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {image_dir} have no mask of the same name in "
                         f"{mask_dir}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return [(str(p), str(masks[p.stem])) for p in images]


def _options(opts: dict, dataset: str, **defaults) -> dict:
    """The reader's options with defaults; a typo fails instead of being ignored."""
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for dataset {dataset!r}; "
                         f"valid options: {sorted(defaults) or 'none'}")
    return {k: opts.get(k, v) for k, v in defaults.items()}


def _no_domain(dataset: str, domain) -> None:
    if domain is not None:
        raise ValueError(f"dataset {dataset!r} has no domains, got domain={domain!r}; pass domain=None")


def _loveda(root: Path, split: str, domain, opts) -> SegSplit:
    _options(opts, "loveda")
    split_dir = _child(root, split, "LoveDA split (Train, Val, Test)")
    if domain is not None:
        domain_dirs = [_child(split_dir, domain, "LoveDA domain (Urban, Rural)")]
    else:
        domain_dirs = [p for p in sorted(split_dir.iterdir()) if p.name.lower() in ("urban", "rural")]
        if not domain_dirs:
            raise ValueError(f"no Urban or Rural folder in {split_dir}; folders there: "
                             f"{sorted(p.name for p in split_dir.iterdir())}")
    pairs = []
    for d in domain_dirs:
        if not (d / "masks_png").is_dir():
            raise ValueError(f"no masks_png folder in {d} (LoveDA's Test labels are withheld "
                             "for the evaluation server); use the Train or Val split")
        pairs += _pairs_by_stem(d / "images_png", d / "masks_png")
    return SegSplit(pairs, list(LOVEDA_CLASSES), IGNORE, "index", dict(LOVEDA_REMAP))


def _isprs_ids(name: str, splits: dict, split: str) -> set[str]:
    key = split.lower()
    if key not in splits:
        raise ValueError(f"{name} has splits {sorted(splits)} (mmsegmentation's), got {split!r}")
    return set(splits[key])


def _isprs_split(name, image_dir: Path, pattern: str, ids: set[str], label_for, drop_clutter):
    """Images whose tile id is in `ids`; a missing image is skipped (partial download),
    a missing label for a present image is an error."""
    if not image_dir.is_dir():
        raise ValueError(f"{name} image folder {image_dir} does not exist")
    found = sorted(p for p in image_dir.iterdir() if re.fullmatch(pattern, p.name))
    chosen = [p for p in found if re.fullmatch(pattern, p.name).group(1) in ids]
    if not chosen:
        names = sorted(p.name for p in image_dir.iterdir())[:10]
        raise ValueError(f"no {name} images of this split in {image_dir} (names matching "
                         f"{pattern}, ids {sorted(ids)[:5]}...); it holds: {names or 'nothing'}")
    pairs, missing = [], []
    for p in chosen:
        candidates = label_for(p)
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append((p.name, candidates))
        else:
            pairs.append((str(p), str(hit)))
    if missing:
        image, looked = missing[0]
        raise ValueError(f"{len(missing)} {name} image(s) have no label file, e.g. {image}: looked for "
                         + ", ".join(str(c) for c in looked))
    classes = ISPRS_CLASSES[:5] if drop_clutter else list(ISPRS_CLASSES)
    remap = {k: k for k in range(5)} if drop_clutter else None  # clutter -> ignore
    return SegSplit(pairs, classes, IGNORE, "rgb", remap)


def _potsdam(root: Path, split: str, domain, opts) -> SegSplit:
    o = _options(opts, "potsdam", eroded=False, drop_clutter=False)
    _no_domain("potsdam", domain)
    folder = root / ("5_Labels_all_noBoundary" if o["eroded"] else "5_Labels_all")
    ends = ["_label_noBoundary.tif", "_label.tif"]
    ends = ends if o["eroded"] else ends[::-1]

    def label_for(image: Path) -> list[Path]:  # label folder first, then root (flat unzip)
        stem = image.name[:-len("_RGB.tif")]
        return [d / (stem + e) for d in (folder, root) for e in ends]
    return _isprs_split("Potsdam", root / "2_Ortho_RGB", r"top_potsdam_(\d+_\d+)_RGB\.tif",
                        _isprs_ids("Potsdam", POTSDAM_SPLITS, split), label_for, o["drop_clutter"])


def _vaihingen(root: Path, split: str, domain, opts) -> SegSplit:
    o = _options(opts, "vaihingen", eroded=False, drop_clutter=False)
    _no_domain("vaihingen", domain)
    folder = root / ("gts_eroded_for_participants" if o["eroded"] else "gts_for_participants")

    def label_for(image: Path) -> list[Path]:  # label folder first, then root (flat unzip)
        name = image.stem + "_noBoundary.tif" if o["eroded"] else image.name
        return [folder / name, root / name]
    return _isprs_split("Vaihingen", root / "top", r"top_mosaic_09cm_area(\d+)\.tif",
                        _isprs_ids("Vaihingen", VAIHINGEN_SPLITS, split), label_for, o["drop_clutter"])


def _read_classes_file(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class list {path} is empty; write one class name per line")
    return names


def _index_split(pairs, dataset: str, opts: dict, classes_file: Path | None) -> SegSplit:
    """Options shared by the index-mask layouts: classes / num_classes, ignore_index,
    remap, reduce_zero_label (mmseg's: 0 -> ignore, k -> k - 1)."""
    o = _options(opts, dataset, classes=None, num_classes=None, ignore_index=IGNORE, remap=None,
                 reduce_zero_label=False)
    classes = o["classes"]
    if classes is None and o["num_classes"] is not None:
        classes = [f"class{i}" for i in range(int(o["num_classes"]))]
    if classes is None and classes_file is not None and classes_file.is_file():
        classes = _read_classes_file(classes_file)
    if classes is None:
        where = f"no {classes_file} and " if classes_file is not None else ""
        raise ValueError(f"{dataset}: {where}no `classes` or `num_classes` option; "
                         "give the class names (one per line in classes.txt) or their number")
    remap = o["remap"]
    if o["reduce_zero_label"]:
        if remap is not None:
            raise ValueError(f"{dataset}: give remap or reduce_zero_label, not both")
        remap = {k: k - 1 for k in range(1, 256) if k != o["ignore_index"]}
    return SegSplit(pairs, list(classes), int(o["ignore_index"]), "index", remap)


def _mmseg(root: Path, split: str, domain, opts) -> SegSplit:
    _no_domain("mmseg", domain)
    image_dir = _child(_child(root, "img_dir", "folder"), split, "mmseg split in img_dir")
    mask_dir = _child(_child(root, "ann_dir", "folder"), split, "mmseg split in ann_dir")
    return _index_split(_pairs_by_stem(image_dir, mask_dir), "mmseg", opts, None)


def _folder_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    names = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    if split.lower() in names:
        base = names[split.lower()]
    elif "images" in names and "masks" in names:
        # no split folders at all: every split name reads the same files, so say so
        warnings.warn(f"{root} has no split folders; split {split!r} reads {root}/images", stacklevel=4)
        base = root
    else:
        raise ValueError(f"no split {split!r} in {root}: expected {root}/{split}/images and masks, "
                         f"or {root}/images and masks; folders there: {sorted(names) or 'none'}")
    return _pairs_by_stem(_child(base, "images", "folder"), base / "masks")


def _folder(root: Path, split: str, domain, opts) -> SegSplit:
    _no_domain("folder", domain)
    return _index_split(_folder_pairs(root, split), "folder", opts, root / "classes.txt")


def _synthetic(root: Path, split: str, domain, opts) -> SegSplit:
    domain_dir = _child(root, domain or "source", "synthetic domain (source, target)")
    return _index_split(_folder_pairs(domain_dir, split), "synthetic", opts, root / "classes.txt")


_READERS = {"loveda": _loveda, "potsdam": _potsdam, "vaihingen": _vaihingen, "mmseg": _mmseg,
            "folder": _folder, "synthetic": _synthetic}


def find_split(dataset: str, root, split: str, domain: str | None = None, **options):
    """The `SegSplit` of `split` of a dataset stored under `root`.

    dataset: loveda (domain Urban/Rural/None), potsdam and vaihingen (options eroded,
    drop_clutter; mmseg's train/val tiles), mmseg (img_dir/ann_dir), folder
    (<split>/images, <split>/masks, classes.txt), synthetic (domain source/target),
    or torchgeo.<Class> (returns a `TorchgeoSplit`; options go to the class).
    Split and domain names are case-insensitive.
    """
    key = dataset.lower()
    if key.startswith("torchgeo."):
        return torchgeo_dataset(dataset.split(".", 1)[1], root, split, domain, **options)
    if key not in _READERS:
        raise ValueError(f"unknown segmentation dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return _READERS[key](Path(root), str(split), domain, options)


# ----------------------------------------------------------------------------- torchgeo

@dataclass(frozen=True)
class _TorchgeoKnown:
    """A torchgeo class read like our own reader of the same data: our class order (and
    the remap of torchgeo's mask values into it), our split names -> torchgeo's, and
    what it looks for under root (for the error when nothing is there)."""
    classes: list[str]
    remap: dict[int, int]
    splits: dict[str, str]
    layout: str
    scenes: bool = False  # LoveDA: `domain` becomes its `scene` argument, masks are grey PNGs


# torchgeo's ISPRS classes start with clutter; any colour outside its palette (the black
# boundaries of the eroded labels too) becomes clutter, which no reader of it can undo
_TG_ISPRS_REMAP = {0: 5, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
# torchgeo's ISPRS "test" tiles are mmseg's "val" tiles (the same lists), so "val" reads them;
# "test" is refused, as our own ISPRS readers do (else a run could select and report on one set)
_TG_ISPRS_SPLITS = {"train": "train", "val": "test"}
_TORCHGEO_KNOWN = {
    "LoveDA": _TorchgeoKnown(
        LOVEDA_CLASSES, LOVEDA_REMAP, {"train": "train", "val": "val", "test": "test"},
        "{root}/{Split}/<Scene>/images_png/*.png and masks_png/ for every scene asked for ({scenes}; "
        "names as released: Train, Val, Test, Urban, Rural)", scenes=True),
    "Potsdam2D": _TorchgeoKnown(
        list(ISPRS_CLASSES), _TG_ISPRS_REMAP, _TG_ISPRS_SPLITS,
        "{root}/4_Ortho_RGBIR/top_potsdam_<id>_RGBIR.tif with labels {root}/top_potsdam_<id>_label.tif "
        "(or 4_Ortho_RGBIR.zip and 5_Labels_all.zip in {root})"),
    "Vaihingen2D": _TorchgeoKnown(
        list(ISPRS_CLASSES), _TG_ISPRS_REMAP, _TG_ISPRS_SPLITS,
        "{root}/top/top_mosaic_09cm_area<id>.tif with labels {root}/top_mosaic_09cm_area<id>.tif "
        "(or the two ISPRS Vaihingen zips in {root})"),
}


class TorchgeoSplit:
    """A torchgeo dataset seen as a `SegSplit` (same fields; `pairs` from its file list
    where it has one) whose items have `SegmentationDataset`'s format. `scale` brings
    the dataset's image values to 0..255."""
    label_kind = "index"

    def __init__(self, dataset, name: str, classes, ignore_index: int = IGNORE, remap=None, scale: float = 1.0):
        self.dataset, self.name, self.scale = dataset, name, float(scale)
        self.classes, self.ignore_index, self.remap = list(classes), ignore_index, remap
        files = getattr(dataset, "files", None) or []
        self.pairs = [(str(f["image"]), str(f["mask"])) for f in files
                      if isinstance(f, dict) and "image" in f and "mask" in f]

    def __len__(self) -> int:
        return len(self.dataset)

    def _path(self, index: int) -> str:
        return self.pairs[index][0] if len(self.pairs) == len(self) else f"torchgeo.{self.name}[{index}]"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        sample, path = self.dataset[index], self._path(index)
        if "mask" not in sample:
            raise ValueError(f"{path} has no mask (torchgeo gives none for this split); use a labelled split")
        image = torch.as_tensor(sample["image"])
        if image.ndim != 3 or image.shape[0] < 3:
            raise ValueError(f"{path}: image has shape {tuple(image.shape)}; expected (C>=3, H, W)")
        image = image[:3].permute(1, 2, 0).numpy().astype(np.float32) * np.float32(self.scale)
        lo, hi = float(image.min()), float(image.max())
        if lo < 0 or hi > 255.001:  # clipping would hide 16-bit data or a normalising transform
            raise ValueError(f"{path}: image values span {lo:g}..{hi:g}; expected 8-bit RGB values 0..255 "
                             "(a normalising transform, or no RGB data set?)")
        mask = torch.as_tensor(sample["mask"])
        mask = mask[0] if mask.ndim == 3 and mask.shape[0] == 1 else mask
        if tuple(mask.shape) != image.shape[:2]:
            raise ValueError(f"size mismatch: {path}: mask is {tuple(mask.shape)} but the image is "
                             f"{image.shape[:2]} (H, W); they must be the same size")
        return image, _apply_remap(mask.long().numpy(), self, path), path

    def __getitem__(self, index: int) -> dict:
        return _to_item(*self.load(index))


def _torchgeo_class(tgd, name: str):
    """(exported name, class), the name case-insensitively; only dataset classes."""
    names = getattr(tgd, "__all__", None) or [n for n in dir(tgd) if not n.startswith("_")]
    found = {n.lower(): n for n in names}.get(name.lower())
    cls = getattr(tgd, found, None) if found else None
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise ValueError(f"torchgeo.datasets has no dataset class {name!r}; e.g. LoveDA, Potsdam2D, Vaihingen2D")
    return found, cls


def _torchgeo_options(cls, label: str, opts: dict) -> None:
    """Refuse what the class would not take, before constructing it (a TypeError deep
    inside torchgeo says less)."""
    params = inspect.signature(cls.__init__).parameters
    if "root" not in params or "split" not in params:
        raise ValueError(f"{label} takes no root and split arguments; only torchgeo's data sets with "
                         "splits (LoveDA, Potsdam2D, Vaihingen2D, ...) can be read")
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted(set(params) - {"self", "root", "split"})
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {label}; valid options: {valid or 'none'} "
                         "(root and split come from data_root and the split)")


def _torchgeo_first(dataset, label: str) -> float:
    """For a class we do not know: check sample 0's keys and take the image scale from it
    once for the whole data set ([0, 1] floats -> x255), so a dark image is not
    brightened on its own."""
    sample = dataset[0]
    if not isinstance(sample, dict) or "image" not in sample or "mask" not in sample:
        keys = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(f"{label} gives samples with keys {keys}; a segmentation data set gives 'image' and 'mask'")
    image = torch.as_tensor(sample["image"])
    return 255.0 if image.is_floating_point() and float(image.max()) <= 1.0 else 1.0


def torchgeo_dataset(name: str, root, split: str, domain: str | None = None, **kwargs) -> TorchgeoSplit:
    """torchgeo.datasets.<name>(root=root, split=split, **kwargs) as a `TorchgeoSplit`.

    LoveDA, Potsdam2D and Vaihingen2D read as our loveda / potsdam / vaihingen readers
    do: their class lists and order (LoveDA's no-data ignored), "val" for the ISPRS val
    tiles (torchgeo's "test"), `domain` (LoveDA's Urban / Rural) as torchgeo's `scene`.
    Other classes keep torchgeo's classes and mask values.
    """
    try:
        import torchgeo.datasets as tgd
    except ImportError as e:
        raise ImportError(f"dataset 'torchgeo.{name}' needs torchgeo, which is not installed: "
                          "pip install torchgeo") from e
    name, cls = _torchgeo_class(tgd, name)
    label, known, opts = f"torchgeo.{name}", _TORCHGEO_KNOWN.get(name), dict(kwargs)
    if domain is not None:
        if known is None or not known.scenes:
            raise ValueError(f"domain is only understood for torchgeo.LoveDA (its scene), not {label}")
        if "scene" in opts:
            raise ValueError(f"{label}: give domain or the scene option, not both")
        scenes = tuple(getattr(cls, "scenes", ("urban", "rural")))
        if str(domain).lower() not in scenes:
            raise ValueError(f"{label} domain {domain!r}: choose one of {', '.join(scenes)} "
                             "(any case), or none for all")
        opts["scene"] = [str(domain).lower()]
    _torchgeo_options(cls, label, opts)
    if known is not None and str(split).lower() not in known.splits:
        extra = " (its val is torchgeo's test split, mmseg's val tiles)" if "val" in known.splits and \
            known.splits["val"] != "val" else ""
        raise ValueError(f"{label} has splits {sorted(known.splits)}{extra}, got {split!r}")
    tg_split = (known.splits if known else {}).get(str(split).lower(), str(split).lower())
    valid = getattr(cls, "splits", None)
    if valid is not None and tg_split not in valid:
        raise ValueError(f"{label} has splits {sorted(known.splits if known else valid)}, got {split!r}")
    scenes = list(opts.get("scene", getattr(cls, "scenes", ())))
    asked = tg_split if tg_split == str(split).lower() else f"{split} (torchgeo's {tg_split})"
    where = known.layout.format(root=root, Split=tg_split.capitalize(), scenes=", ".join(scenes)) if known else ""
    try:
        dataset = cls(root=str(root), split=tg_split, **opts)
    except FileNotFoundError as e:  # torchgeo's DatasetNotFoundError
        raise ValueError(f"{label}: no {asked} data under {root}: it looks for {where}" if known
                         else f"{label}: {e}") from e
    except AssertionError as e:  # torchgeo checks its arguments with assert, often without a message
        raise ValueError(f"{label} refused split={tg_split!r} with options {opts}: {e or 'invalid argument'}") from e
    if len(dataset) == 0:
        raise ValueError(f"{label} found no {asked} images under {root}" + (f"; it looks for {where}" * bool(known)))
    files = getattr(dataset, "files", None)
    if isinstance(files, list) and files and all(isinstance(f, dict) and "mask" not in f for f in files):
        why = " (LoveDA's Test labels are withheld for the evaluation server)" if known and known.scenes else ""
        raise ValueError(f"{label} split {tg_split!r} has no masks{why}; use a labelled split such as train or val")
    if known is None:
        classes = list(getattr(dataset, "classes", []) or [])
        if not classes:
            raise ValueError(f"{label} lists no classes; it is not a segmentation dataset")
        return TorchgeoSplit(dataset, name, classes, IGNORE, None, _torchgeo_first(dataset, label))
    split_ = TorchgeoSplit(dataset, name, known.classes, IGNORE, dict(known.remap))
    missing = [m for _, m in split_.pairs if not Path(m).is_file()]
    if missing:  # LoveDA lists masks by name only; say so now, not at the first epoch
        raise ValueError(f"{len(missing)} {label} image(s) have no mask file, e.g. {missing[0]}")
    if known.scenes and split_.pairs:
        with Image.open(split_.pairs[0][1]) as first:  # header only
            if first.mode == "P":  # torchgeo converts to grey, so palette colours' luminance, not indices
                raise ValueError(f"{split_.pairs[0][1]} is a palette PNG, which {label} reads as grey levels, "
                                 "not class indices; use dataset: loveda")
    return split_


# ----------------------------------------------------------------------------- augmentation

def tile_starts(size: int, tile: int) -> list[int]:
    """0, tile, 2*tile, ... and a last start at size - tile, so the last tile ends at the
    border (as mmseg's ISPRS converters cut); one start when the side is below `tile`."""
    return list(range(0, size - tile, tile)) + [max(size - tile, 0)]


def _random_resize(rng, image: np.ndarray, mask: np.ndarray, lo=0.5, hi=2.0):
    """Scale by a ratio in [lo, hi]: bilinear image, nearest mask on the same grid."""
    ratio = rng.uniform(lo, hi)
    size = (max(1, round(image.shape[0] * ratio)), max(1, round(image.shape[1] * ratio)))
    img = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=size, mode="bilinear",
                        align_corners=False)
    # nearest-exact samples pixel centres, the same grid as bilinear with align_corners=False
    msk = F.interpolate(torch.from_numpy(mask)[None, None].double(), size=size, mode="nearest-exact")
    return img[0].permute(1, 2, 0).numpy(), msk[0, 0].long().numpy()


def _class_crop(rng, image, mask, size: int, ignore: int, cat_max_ratio=0.75, tries=10):
    """mmseg's RandomCrop: redraw (up to `tries` times) while one class fills more than
    `cat_max_ratio` of the labelled pixels or only one class is present."""
    def box():
        return (int(rng.integers(0, max(mask.shape[0] - size, 0) + 1)),
                int(rng.integers(0, max(mask.shape[1] - size, 0) + 1)))
    top, left = box()
    for _ in range(tries):
        window = mask[top:top + size, left:left + size]
        counts = np.bincount(window[window != ignore].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        top, left = box()
    return image[top:top + size, left:left + size], mask[top:top + size, left:left + size]


def _rgb_to_hsv(rgb: np.ndarray):
    """rgb in [0, 1] -> h, s, v in [0, 1] (h as a fraction of the colour circle)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v, d = rgb.max(-1), rgb.max(-1) - rgb.min(-1)
    s = np.where(v > 0, d / np.where(v > 0, v, 1), 0)
    dd = np.where(d > 0, d, 1)
    h = np.where(v == r, (g - b) / dd, np.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))
    return np.where(d > 0, (h / 6) % 1.0, 0), s, v


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    i = np.floor(h * 6)
    f, i = h * 6 - i, i.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.stack([np.choose(i, [v, q, p, p, t, v]), np.choose(i, [t, v, v, q, p, p]),
                     np.choose(i, [p, p, t, v, v, q])], -1)


def _photometric(rng, image: np.ndarray) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on 0..255 floats: brightness +-32, contrast x0.5-1.5
    (before or after the colour steps), saturation x0.5-1.5, hue +-18 of 180; each step
    with probability 1/2. Every step is a function of the pixel alone, so equal input
    colours stay equal."""
    def contrast(x):
        return np.clip(x * rng.uniform(0.5, 1.5), 0, 255) if rng.integers(2) else x
    if rng.integers(2):
        image = np.clip(image + rng.uniform(-32, 32), 0, 255)
    mode = rng.integers(2)
    if mode == 1:
        image = contrast(image)
    sat = rng.uniform(0.5, 1.5) if rng.integers(2) else None
    hue = int(rng.integers(-18, 18)) / 180 if rng.integers(2) else None
    if sat is not None or hue is not None:
        h, s, v = _rgb_to_hsv(image / 255.0)
        s = np.clip(s * sat, 0, 1) if sat is not None else s
        h = (h + hue) % 1.0 if hue is not None else h
        image = _hsv_to_rgb(h, s, v) * 255.0
    if mode == 0:
        image = contrast(image)
    return image.astype(np.float32)


def _pad(image, mask, size: int, ignore: int):
    """Pad bottom/right to size x size: image with 0, mask with ignore."""
    dh, dw = max(size - mask.shape[0], 0), max(size - mask.shape[1], 0)
    if dh or dw:
        image = np.pad(image, ((0, dh), (0, dw), (0, 0)))
        mask = np.pad(mask, ((0, dh), (0, dw)), constant_values=ignore)
    return image, mask


def _to_item(image: np.ndarray, mask: np.ndarray, path: str) -> dict:
    chw = np.ascontiguousarray(np.asarray(image, np.float32).transpose(2, 0, 1)) / 255.0
    return {"image": torch.from_numpy(chw).clamp_(0, 1), "mask": torch.from_numpy(
        np.ascontiguousarray(mask, np.int64)), "path": path}


# ----------------------------------------------------------------------------- dataset

class SegmentationDataset(Dataset):
    """Items {"image": float32 (3, H, W) in [0, 1], "mask": int64 (H, W), "path"}.

    `tile` cuts every image into tile x tile windows (`tile_starts` on each side; the
    windows are listed in `self.tiles` as (pair, top, left, h, w) and read on demand).
    `train=True` needs `image_size` (the crop): random resize x0.5-2, a crop that avoids
    one-class windows (cat_max_ratio 0.75), horizontal flip, photometric distortion and
    padding to image_size (mask with ignore_index); `scale` multiplies the resize range
    (mmseg's LoveDA recipe works at half the 1024 px tiles: scale 0.5). Randomness comes from (seed, epoch,
    index); call `set_epoch` for fresh draws. `train=False` returns whole images or
    tiles unchanged (evaluation slides windows over them), whatever `image_size` is.
    """

    def __init__(self, split, image_size: int | None = None, train: bool = False, seed: int = 0,
                 tile: int | None = None, scale: float = 1.0):
        if len(split) == 0:
            raise ValueError("SegmentationDataset needs a split with at least one image")
        if train and image_size is None:
            raise ValueError("train=True needs image_size (the training crop size)")
        for name, value in (("image_size", image_size), ("tile", tile), ("scale", scale)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if tile is not None and isinstance(split, TorchgeoSplit):
            raise ValueError("tile needs file sizes, which a torchgeo split does not give; use tile=None")
        self.split, self.image_size, self.train, self.seed, self.epoch = split, image_size, train, seed, 0
        self.scale = float(scale)
        self.classes, self.ignore_index = list(split.classes), split.ignore_index
        self.tiles = self._index_tiles(tile) if tile is not None else None
        self._cache = None  # (pair index, loaded pair): consecutive tiles share one read

    def _index_tiles(self, tile: int) -> list[tuple[int, int, int, int, int]]:
        tiles = []
        for k, (image_path, mask_path) in enumerate(self.split.pairs):
            (h, w), mask_size = _image_size(image_path), _image_size(mask_path)
            if mask_size != (h, w):
                raise ValueError(f"size mismatch: mask {mask_path} is {mask_size} (H, W) but image "
                                 f"{image_path} is {(h, w)}; they must be the same size")
            tiles += [(k, top, left, min(tile, h), min(tile, w))
                      for top in tile_starts(h, tile) for left in tile_starts(w, tile)]
        return tiles

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.tiles) if self.tiles is not None else len(self.split)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))

    def _load(self, k: int):
        if self._cache is None or self._cache[0] != k:
            pair = self.split.load(k) if isinstance(self.split, TorchgeoSplit) else _load_pair(self.split, k)
            self._cache = (k, pair)
        return self._cache[1]

    def _augment(self, image, mask, index: int):
        rng, size = self._rng(index), self.image_size
        image, mask = _random_resize(rng, image, mask, 0.5 * self.scale, 2.0 * self.scale)
        image, mask = _class_crop(rng, image, mask, size, self.ignore_index)
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return _pad(_photometric(rng, image), mask, size, self.ignore_index)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        k, box = (index, None) if self.tiles is None else (self.tiles[index][0], self.tiles[index][1:])
        image, mask, path = self._load(k)
        if box is not None:
            top, left, h, w = box
            image, mask = image[top:top + h, left:left + w], mask[top:top + h, left:left + w]
        image = np.asarray(image, np.float32)
        if self.train:
            image, mask = self._augment(image, mask, index)
        return _to_item(image, mask, path)


# ----------------------------------------------------------------------------- synthetic

def _sensor_shift(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Another sensor and season on top of the usual acquisition: a gamma curve, a
    colour cast, lower contrast and more noise, so the target differs in look too."""
    gamma = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.6)
    rgb = rgb ** gamma * rng.normal(1.0, 0.08, 3)
    rgb = (rgb - rgb.mean()) * rng.uniform(0.6, 0.85) + rgb.mean()
    return np.clip(rgb + rng.normal(0, 0.025, rgb.shape), 0, 1).astype(np.float32)


def _write_split(folder: Path, split: str, n: int, size: int, kinds, shift: bool, rng) -> dict:
    """n scenes, types as evenly spread over `kinds` as n allows (the leftover types drawn
    at random, so a small split is not always the first types), shuffled; returns counts."""
    extra = list(rng.choice(kinds, n % len(kinds), replace=False))
    order = rng.permutation(list(kinds) * (n // len(kinds)) + extra)
    for sub in ("images", "masks"):
        (folder / split / sub).mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(order):
        rgb, cls = scenes.make_scene(rng, size, str(kind))
        rgb = _sensor_shift(rng, rgb) if shift else rgb
        name = f"{split}_{i:04d}_{kind}.png"
        Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).save(folder / split / "images" / name)
        Image.fromarray(cls.astype(np.uint8)).save(folder / split / "masks" / name)
    return {k: int((order == k).sum()) for k in kinds}


def write_synthetic_segmentation(root, n_train: int = 32, n_val: int = 8, n_test: int = 8, size: int = 64,
                                 seed: int = 0, source_scenes=None, target_scenes=None) -> dict:
    """Write a domain-generalisation benchmark from `scenes` in the folder layout:
    root/source/{train,val,test} (default `scenes.PRETRAIN_SCENES`, usual acquisition),
    root/target/{val,test} (default `scenes.HELD_OUT_SCENES`, shifted sensor), each with
    images/ and masks/ PNGs (mask = index into `scenes.CLASSES`), and root/classes.txt.
    Each (domain, split) has its own random stream, so a seed gives the same bytes and
    changing one count leaves the other splits alone. Returns what was written."""
    source = list(source_scenes or scenes.PRETRAIN_SCENES)
    target = list(target_scenes or scenes.HELD_OUT_SCENES)
    unknown = [s for s in source + target if s not in scenes.SCENE_TYPES]
    if unknown:
        raise ValueError(f"unknown scene types {unknown}; choose from {scenes.SCENE_TYPES}")
    if min(n_train, n_val, n_test) < 1 or size < 16:
        raise ValueError(f"need n_train, n_val, n_test >= 1 and size >= 16, got "
                         f"{n_train}, {n_val}, {n_test}, size={size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(c + "\n" for c in scenes.CLASSES))
    jobs = [("source", "train", n_train), ("source", "val", n_val), ("source", "test", n_test),
            ("target", "val", n_val), ("target", "test", n_test)]
    written = {}
    for d, (domain, split, n) in enumerate(jobs):
        rng = np.random.default_rng(np.random.SeedSequence([seed, d]))
        kinds = source if domain == "source" else target
        written[f"{domain}/{split}"] = _write_split(root / domain, split, n, size, kinds,
                                                    domain == "target", rng)
    return {"root": str(root), "classes": list(scenes.CLASSES), "size": size, "seed": seed,
            "source_scenes": source, "target_scenes": target,
            "counts": {k: sum(v.values()) for k, v in written.items()}, "scene_counts": written}
