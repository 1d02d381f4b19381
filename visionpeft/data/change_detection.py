"""Bi-temporal change-detection data for the PeftCD pipeline.

Readers for the LEVIR-CD / WHU-CD, S2Looking and list-file layouts, a dataset that
returns aligned (A, B, label) tensors with optional joint augmentation, and a
deterministic synthetic LEVIR-style generator so demos and tests need no downloads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
Triple = tuple[str, str, str]


# ----------------------------------------------------------------------------- reading

def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here and not later
    except (OSError, ValueError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read image file {path}: {e}") from e
    return img


def _read_label(path: str) -> np.ndarray:
    """Binary change mask from a 0/255 or 0/1 label image; refuses anything ambiguous."""
    img = _open(path)
    # palette masks store the class in the index; integer/float modes carry raw values;
    # everything else (1, L, RGB...) goes through luminance so white means change
    arr = np.asarray(img) if img.mode in ("P", "I", "I;16", "F") else np.asarray(img.convert("L"))
    ok = (arr == 0) | (arr == 1) | (arr >= 128)
    if not ok.all():
        found = np.unique(arr[~ok])[:10].tolist()
        raise ValueError(f"label file {path} has values {found} that are neither 0, 1 "
                         "nor >= 128; expected a 0/1 or 0/255 change mask")
    return ((arr == 1) | (arr >= 128)).astype(np.int64)


class ChangeDetectionDataset(Dataset):
    """(A, B, label) triples as dicts of `a`, `b` (3,H,W floats in [0,1]), `label`
    ((H,W) long in {0,1}) and `name` (the A file name).

    `crop_size` takes a random crop; `augment` adds flips and rot90. Both act on A, B
    and label together, with randomness from (seed, epoch, index) so a run can be
    replayed exactly; call `set_epoch` each epoch to get fresh draws.
    """

    def __init__(self, triples: Sequence[Triple], augment: bool = False,
                 crop_size: int | None = None, seed: int = 0):
        if len(triples) == 0:
            raise ValueError("ChangeDetectionDataset needs at least one (A, B, label) triple")
        if crop_size is not None and crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        self.triples = [tuple(str(p) for p in t) for t in triples]
        self.augment, self.crop_size, self.seed, self.epoch = augment, crop_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.triples)

    def _generator(self, index: int) -> torch.Generator:
        # SeedSequence mixes the three numbers well, so neighbouring indices/epochs
        # do not get correlated streams
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def _load(self, index: int) -> torch.Tensor:
        path_a, path_b, path_l = self.triples[index]
        img_a, img_b = _open(path_a), _open(path_b)
        label = _read_label(path_l)
        size_l = (label.shape[1], label.shape[0])  # PIL sizes are (W, H)
        for path, size in ((path_b, img_b.size), (path_l, size_l)):
            if size != img_a.size:
                raise ValueError(f"size mismatch: {path} is {size} (W, H) but "
                                 f"{path_a} is {img_a.size}")
        a, b = (np.asarray(i.convert("RGB")) for i in (img_a, img_b))
        # one (7,H,W) stack so every geometric op hits A, B and label identically
        stack = np.concatenate([a, b], axis=2).transpose(2, 0, 1).astype(np.float32) / 255.0
        return torch.cat([torch.from_numpy(stack), torch.from_numpy(label[None]).float()])

    def _transform(self, stack: torch.Tensor, index: int) -> torch.Tensor:
        if self.crop_size is None and not self.augment:
            return stack
        g = self._generator(index)
        if self.crop_size is not None:
            h, w, c = stack.shape[1], stack.shape[2], self.crop_size
            if h < c or w < c:
                raise ValueError(f"crop_size {c} exceeds image size {(w, h)} (W, H) "
                                 f"of {self.triples[index][0]}")
            top = int(torch.randint(0, h - c + 1, (1,), generator=g))
            left = int(torch.randint(0, w - c + 1, (1,), generator=g))
            stack = stack[:, top:top + c, left:left + c]
        if self.augment:
            flips = torch.rand(2, generator=g) < 0.5
            if flips[0]:
                stack = stack.flip(-1)
            if flips[1]:
                stack = stack.flip(-2)
            stack = torch.rot90(stack, int(torch.randint(0, 4, (1,), generator=g)), dims=(1, 2))
        return stack.contiguous()

    def __getitem__(self, index: int) -> dict:
        stack = self._transform(self._load(index), index)
        return {"a": stack[0:3], "b": stack[3:6], "label": stack[6].round().long(),
                "name": Path(self.triples[index][0]).name}


# ----------------------------------------------------------------------------- layouts

def _image_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS}


def _folder_triples(split_dir: Path, subdirs: tuple[str, str, str]) -> list[Triple]:
    """Match files by name across three sibling folders; any unmatched name is an error."""
    for sub in subdirs:
        if not (split_dir / sub).is_dir():
            raise ValueError(f"missing folder {split_dir / sub}")
    names = [_image_names(split_dir / sub) for sub in subdirs]
    if not names[0]:
        raise ValueError(f"folder {split_dir / subdirs[0]} is empty (no image files)")
    every = set().union(*names)
    problems = []
    for sub, have in zip(subdirs, names):
        missing = sorted(every - have)
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            problems.append(f"{len(missing)} file(s) missing in {split_dir / sub}: {shown}")
    if problems:
        raise ValueError("unmatched change-detection files: " + "; ".join(problems))
    return [tuple(str(split_dir / sub / n) for sub in subdirs) for n in sorted(every)]


def levir_triples(root: str | Path, split: str) -> list[Triple]:
    """LEVIR-CD / WHU-CD layout: root/<split>/{A,B,label}/<same file name>."""
    return _folder_triples(Path(root) / split, ("A", "B", "label"))


def s2looking_triples(root: str | Path, split: str) -> list[Triple]:
    """S2Looking layout: root/<split>/{Image1,Image2,label}/<same file name>."""
    return _folder_triples(Path(root) / split, ("Image1", "Image2", "label"))


def list_file_triples(list_path: str | Path, root: str | Path | None = None) -> list[Triple]:
    """Text file of `pathA pathB pathLabel` lines; relative paths resolve against `root`
    (default: the list's folder). Blank lines and `#` comments are skipped."""
    list_path = Path(list_path)
    base = Path(root) if root is not None else list_path.parent
    triples = []
    for lineno, line in enumerate(list_path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        cols = line.split()
        if len(cols) != 3:
            raise ValueError(f"{list_path} line {lineno}: expected 3 columns "
                             f"(pathA pathB pathLabel), got {len(cols)}: {line!r}")
        paths = tuple(str(base / c) for c in cols)  # an absolute c overrides base
        for p in paths:
            if not Path(p).is_file():
                raise ValueError(f"{list_path} line {lineno}: file not found: {p}")
        triples.append(paths)
    if not triples:
        raise ValueError(f"list file {list_path} is empty (no triples)")
    return triples


def find_triples(root: str | Path, split: str) -> list[Triple]:
    """Detect the layout of `root` for `split` and return its triples."""
    root = Path(root)
    if (root / split / "A").is_dir():
        return levir_triples(root, split)
    if (root / split / "Image1").is_dir():
        return s2looking_triples(root, split)
    if (root / f"{split}.txt").is_file():
        return list_file_triples(root / f"{split}.txt", root)
    raise ValueError(f"no change-detection layout found for split {split!r} under {root}; "
                     f"looked for {root / split / 'A'} (LEVIR-CD/WHU-CD), "
                     f"{root / split / 'Image1'} (S2Looking) and {root / (split + '.txt')} "
                     "(list file)")


# ----------------------------------------------------------------------------- synthetic

def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0,1]: a coarse random grid bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    img = Image.fromarray(grid).resize((size, size), Image.BILINEAR)
    return np.asarray(img)


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray):
    """Vegetation/soil mix, water patches and roads; returns (rgb, occupied mask)."""
    mix = 0.6 * _smooth_field(rng, size, 3) + 0.4 * _smooth_field(rng, size, 8)
    veg = np.array([0.22, 0.38, 0.18]) + rng.normal(0, 0.03, 3)
    soil = np.array([0.55, 0.47, 0.36]) + rng.normal(0, 0.03, 3)
    rgb = mix[..., None] * veg + (1 - mix[..., None]) * soil
    rgb += rng.normal(0, 0.025, (size, size, 1))  # fine texture shared by all bands
    water = _smooth_field(rng, size, 4) > rng.uniform(0.78, 0.95)
    rgb[water] = np.array([0.12, 0.2, 0.3]) + rng.normal(0, 0.01, (int(water.sum()), 3))
    occupied = water.copy()
    for _ in range(rng.integers(1, 3)):  # roads as straight bands of random angle
        theta, width = rng.uniform(0, np.pi), rng.uniform(1.5, 3.0) * size / 64
        dist = np.abs(xx * np.cos(theta) + yy * np.sin(theta) - rng.uniform(0.2, 0.8) * size)
        road = dist < width
        rgb[road] = 0.45 + rng.uniform(-0.05, 0.05)
        occupied |= dist < width + 1
    return rgb, occupied


def _place_building(rng, size, occupied) -> tuple[int, int, int, int] | None:
    """A free rectangle (top, left, h, w), or None after a few tries."""
    lo, hi = max(3, size // 12), max(4, size // 5)
    for _ in range(20):
        h, w = rng.integers(lo, hi + 1, 2)
        top, left = rng.integers(1, size - h - 1), rng.integers(1, size - w - 1)
        if not occupied[top - 1:top + h + 2, left - 1:left + w + 2].any():  # keep a gap
            occupied[top - 1:top + h + 2, left - 1:left + w + 2] = True
            return int(top), int(left), int(h), int(w)
    return None


def _paint_building(rng, rgb: np.ndarray, box) -> None:
    top, left, h, w = box
    rgb[top + 1:top + h + 1, left + 1:left + w + 1] *= 0.55  # shadow, offset down-right
    roof = rng.choice([[0.7, 0.3, 0.25], [0.75, 0.75, 0.75], [0.35, 0.45, 0.6],
                       [0.6, 0.55, 0.5], [0.9, 0.9, 0.88]]) + rng.normal(0, 0.05, 3)
    rgb[top:top + h, left:left + w] = roof
    if rng.random() < 0.5:  # gabled roof: one half in shade along the longer side
        if h >= w:
            rgb[top:top + h, left:left + w // 2] *= 0.8
        else:
            rgb[top:top + h // 2, left:left + w] *= 0.8


def _synthetic_pair(rng: np.random.Generator, size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rgb, occupied = _background(rng, size, yy, xx)
    a, b = rgb.copy(), rgb.copy()
    # changed buildings first, so the free space goes to them and the change fraction
    # lands near its target; each is built (only in B) or demolished (only in A)
    label = np.zeros((size, size), bool)
    target = rng.uniform(0.02, 0.12)
    for _ in range(12):
        if label.mean() >= target:
            break
        box = _place_building(rng, size, occupied)
        if box is None or label.mean() + box[2] * box[3] / size ** 2 > 0.15:
            continue
        _paint_building(rng, a if rng.random() < 0.5 else b, box)
        label[box[0]:box[0] + box[2], box[1]:box[1] + box[3]] = True
    for _ in range(rng.integers(2, 6)):  # buildings standing at both dates
        box = _place_building(rng, size, occupied)
        if box is not None:
            _paint_building(rng, a, box)
            rows, cols = slice(box[0], box[0] + box[2] + 1), slice(box[1], box[1] + box[3] + 1)
            b[rows, cols] = a[rows, cols]  # roof and shadow, identical at both dates
    return a, _pseudo_change(rng, b), label


def _pseudo_change(rng: np.random.Generator, b: np.ndarray) -> np.ndarray:
    """Unlabelled photometric differences of date B: season, sun and sensor."""
    mean = b.mean(axis=(0, 1))
    contrast = rng.uniform(0.8, 1.2)
    shift = rng.choice([-1, 1]) * rng.uniform(0.03, 0.1) + rng.normal(0, 0.03, 3)
    b = (b - mean) * contrast + mean + shift
    return b + rng.normal(0, 0.015, b.shape)


def write_synthetic_levir(root: str | Path, n_train: int = 32, n_val: int = 8,
                          n_test: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write a deterministic LEVIR-CD-style set of PNGs under root/{train,val,test}/
    {A,B,label}; label is 255 where a building appeared or vanished. Returns root."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    root, rng = Path(root), np.random.default_rng(seed)
    jobs = [(s, i) for s, n in (("train", n_train), ("val", n_val), ("test", n_test))
            for i in range(n)]
    if len(jobs) > 200:
        from tqdm import tqdm
        jobs = tqdm(jobs, desc="synthetic LEVIR", unit="pair")
    for split, i in jobs:
        a, b, label = _synthetic_pair(rng, size)
        name = f"{split}_{i:04d}.png"
        for sub, arr in (("A", a), ("B", b), ("label", label * 255.0)):
            folder = root / split / sub
            folder.mkdir(parents=True, exist_ok=True)
            arr = np.clip(arr * (255.0 if sub != "label" else 1.0), 0, 255) + 0.5
            Image.fromarray(arr.astype(np.uint8)).save(folder / name)
    return root
