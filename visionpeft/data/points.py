"""Point-cloud classification data in the layouts users have on disk, and procedural shapes.

- ModelNet40, ``modelnet40_ply_hdf5_2048`` (PointNet's h5 files): ``ply_data_{train,test}<i>.h5``
  with ``data`` (n, 2048, 3) and ``label`` (n, 1), class names in ``shape_names.txt``.
- ModelNet40, ``modelnet40_normal_resampled`` (one ``.txt`` per shape, "x,y,z,nx,ny,nz" rows,
  ``modelnet40_shape_names.txt``, ``modelnet40_{train,test}.txt`` listing ``<class>_<nnnn>``):
  xyz only, centred and scaled into the unit sphere as Point-MAE reads them.
- ScanObjectNN (``h5_files/``): ``main_split/{training,test}_objectdataset_augmentedrot_scale75.h5``
  (PB_T50_RS, the hardest), ``main_split/{training,test}_objectdataset.h5`` (OBJ_BG) and
  ``main_split_nobg/...objectdataset.h5`` (OBJ_ONLY), ``data`` (n, 2048, 3), ``label`` (n,).

``read_point_split`` returns a `PointSplit` (clouds, labels, class names); the h5 readers
need h5py (``pip install visionpeft[points]``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..ops.points import farthest_point_sample, knn  # noqa: F401  (public here: visionpeft.data.points)

# ScanObjectNN's 15 classes, in its label order
SCANOBJECTNN_CLASSES = ("bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table",
                        "bed", "pillow", "sink", "sofa", "toilet")
SCANOBJECTNN_FILES = {  # variant -> (folder, file name pattern with {split})
    "PB_T50_RS": ("main_split", "{split}_objectdataset_augmentedrot_scale75.h5"),
    "OBJ_BG": ("main_split", "{split}_objectdataset.h5"),
    "OBJ_ONLY": ("main_split_nobg", "{split}_objectdataset.h5"),
}


@dataclass
class PointSplit:
    """One split: ``clouds`` a list of (N_i, 3) float32 arrays (or one (n, N, 3) array),
    ``labels`` (n,) int64, ``classes`` the names by label."""

    clouds: object
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _h5py():
    try:
        import h5py
    except ImportError:
        raise ImportError("reading ModelNet40 / ScanObjectNN h5 files needs h5py: pip install "
                          "'visionpeft[points]' (or pip install h5py)") from None
    return h5py


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            if "data" not in f or "label" not in f:
                raise ValueError(f"{path} holds {sorted(f.keys())}, not the 'data' and 'label' arrays of "
                                 f"ModelNet40 / ScanObjectNN h5 files")
            data = np.asarray(f["data"][:], dtype=np.float32)
            labels = np.asarray(f["label"][:]).reshape(-1).astype(np.int64)
    except OSError as err:
        raise ValueError(f"cannot read {path} as an h5 file: {err}") from None
    if data.ndim != 3 or data.shape[-1] < 3 or len(data) != len(labels):
        raise ValueError(f"{path}: 'data' is {data.shape} and 'label' {labels.shape}; expected (n, points, 3) "
                         f"and (n,)")
    return data[..., :3], labels


def _first_existing(root: Path, candidates: list[str]) -> Path | None:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def _modelnet_h5(root: Path, split: str) -> PointSplit:
    folder = root if root.name == "modelnet40_ply_hdf5_2048" else root / "modelnet40_ply_hdf5_2048"
    files = sorted(folder.glob(f"ply_data_{split}*.h5"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not files:
        raise FileNotFoundError(f"no {folder}/ply_data_{split}*.h5 (ModelNet40's modelnet40_ply_hdf5_2048 files)")
    parts = [_read_h5(f) for f in files]
    names_file = folder / "shape_names.txt"
    if not names_file.is_file():
        raise FileNotFoundError(f"no {names_file}: ModelNet40's class names, one per line")
    classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    return PointSplit(np.concatenate([d for d, _ in parts]), np.concatenate([lab for _, lab in parts]), classes)


def normalise_cloud(xyz: np.ndarray) -> np.ndarray:
    """Centred on its mean and scaled so that its farthest point is at distance 1 (Point-MAE's pc_norm)."""
    xyz = xyz - xyz.mean(axis=0)
    radius = np.sqrt((xyz ** 2).sum(axis=1)).max()
    return xyz / radius if radius > 0 else xyz


def _modelnet_txt(root: Path, split: str) -> PointSplit:
    folder = root if root.name == "modelnet40_normal_resampled" else root / "modelnet40_normal_resampled"
    names_file, list_file = folder / "modelnet40_shape_names.txt", folder / f"modelnet40_{split}.txt"
    for f in (names_file, list_file):
        if not f.is_file():
            raise FileNotFoundError(f"no {f} (ModelNet40's modelnet40_normal_resampled layout)")
    classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    clouds, labels = [], []
    for shape in (line.strip() for line in list_file.read_text().splitlines()):
        if not shape:
            continue
        cls = shape.rsplit("_", 1)[0]
        if cls not in index:
            raise ValueError(f"{list_file}: {shape!r} names class {cls!r}, not in {names_file.name}")
        path = folder / cls / f"{shape}.txt"
        try:
            rows = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path} as 'x,y,z[,nx,ny,nz]' rows: {err}") from None
        if rows.shape[1] < 3 or not len(rows):
            raise ValueError(f"{path}: expected rows of at least x,y,z, got shape {rows.shape}")
        clouds.append(normalise_cloud(rows[:, :3]).astype(np.float32))
        labels.append(index[cls])
    return PointSplit(clouds, np.asarray(labels, dtype=np.int64), classes)


def _scanobjectnn(root: Path, split: str, variant: str) -> PointSplit:
    if variant not in SCANOBJECTNN_FILES:
        raise ValueError(f"ScanObjectNN variant {variant!r}: choose one of {sorted(SCANOBJECTNN_FILES)}")
    folder, pattern = SCANOBJECTNN_FILES[variant]
    name = pattern.format(split="training" if split == "train" else "test")
    base = _first_existing(root, [folder, f"h5_files/{folder}"])
    if base is None and root.name == folder:
        base = root
    if base is None or not (base / name).is_file():
        raise FileNotFoundError(f"no {folder}/{name} under {root} (ScanObjectNN's h5_files layout, variant "
                                f"{variant})")
    data, labels = _read_h5(base / name)
    if labels.min() < 0 or labels.max() >= len(SCANOBJECTNN_CLASSES):
        raise ValueError(f"{base / name}: labels {labels.min()}..{labels.max()} outside ScanObjectNN's 0..14")
    return PointSplit(data, labels, list(SCANOBJECTNN_CLASSES))


def read_point_split(dataset: str, data_root, split: str, variant: str | None = None) -> PointSplit:
    """``dataset`` modelnet40 (h5 or .txt layout, whichever ``data_root`` holds) or
    scanobjectnn (``variant`` PB_T50_RS, OBJ_BG or OBJ_ONLY); ``split`` train or test."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_root {root} is not a folder")
    if dataset == "modelnet40":
        if (root / "modelnet40_ply_hdf5_2048").is_dir() or root.name == "modelnet40_ply_hdf5_2048":
            return _modelnet_h5(root, split)
        if (root / "modelnet40_normal_resampled").is_dir() or root.name == "modelnet40_normal_resampled":
            return _modelnet_txt(root, split)
        raise FileNotFoundError(f"{root} holds neither modelnet40_ply_hdf5_2048/ nor modelnet40_normal_resampled/")
    if dataset == "scanobjectnn":
        return _scanobjectnn(root, split, variant or "PB_T50_RS")
    raise ValueError(f"dataset {dataset!r}: choose modelnet40 or scanobjectnn (or synthetic in the task)")


def read_cloud(path) -> np.ndarray:
    """One cloud from a ``.npy`` ((N, >=3) array), ``.txt`` (rows "x y z ..." or "x,y,z,...") or
    ``.ply`` (its vertex x, y, z; needs plyfile) file, as (N, 3) float32, checked: no empty
    cloud, no NaN or inf."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            xyz = np.load(path, allow_pickle=False)
        elif suffix == ".txt":
            text = path.read_text()
            if not text.strip():
                raise ValueError(f"{path}: the cloud is empty")
            xyz = np.loadtxt(path, delimiter="," if "," in text.split("\n", 1)[0] else None, ndmin=2)
        elif suffix == ".ply":
            try:
                from plyfile import PlyData
            except ImportError:
                raise ImportError("reading .ply clouds needs plyfile: pip install 'visionpeft[points]'") from None
            vertex = PlyData.read(str(path))["vertex"]
            xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
        else:
            raise ValueError(f"{path}: a cloud is a .npy, .txt or .ply file, got {suffix or 'no suffix'}")
    except (OSError, ValueError, KeyError) as err:
        if str(err).startswith(str(path)):
            raise ValueError(str(err)) from None
        raise ValueError(f"cannot read {path} as a point cloud: {' '.join(str(err).split())}") from None
    xyz = np.asarray(xyz, dtype=np.float32)
    if xyz.size == 0:
        raise ValueError(f"{path}: the cloud is empty")
    if xyz.ndim != 2 or xyz.shape[1] < 3:
        raise ValueError(f"{path}: a cloud has rows of x, y, z (3 columns or more), got shape {xyz.shape}")
    if not len(xyz):
        raise ValueError(f"{path}: the cloud is empty")
    xyz = xyz[:, :3]
    if not np.isfinite(xyz).all():
        raise ValueError(f"{path}: the cloud holds NaN or inf coordinates")
    return xyz


def _fps_numpy(cloud: np.ndarray, n: int) -> np.ndarray:
    idx = farthest_point_sample(torch.from_numpy(cloud)[None], n)[0].numpy()
    return cloud[idx]


def _pad(cloud: np.ndarray, n: int, rng: np.random.Generator | None) -> np.ndarray:
    """A cloud of fewer than n points made n long with repeats of its own points (every
    point kept; the repeats the first points for a test, random ones in training)."""
    extra = np.arange(n - len(cloud)) % len(cloud) if rng is None else rng.choice(len(cloud), n - len(cloud))
    out = np.concatenate([cloud, cloud[extra]])
    return out if rng is None else out[rng.permutation(n)]


def resample(cloud: np.ndarray, n: int, rng: np.random.Generator | None) -> np.ndarray:
    """Training (``rng`` given): FPS from a random start to 1.2 n points (all of them if
    fewer), then n of those at random; test: FPS to n (a cloud of exactly n points as it
    is: FPS of all of them is only a reordering). Smaller clouds are padded with repeats
    of their own points."""
    if len(cloud) < n:
        return _pad(cloud, n, rng)
    if rng is None:
        return cloud if len(cloud) == n else _fps_numpy(cloud, n)
    pool = math.ceil(1.2 * n)
    if len(cloud) > pool:  # FPS starts at point 0: shuffle first, for another thinning each draw
        cloud = _fps_numpy(cloud[rng.permutation(len(cloud))], pool)
    return cloud[rng.choice(len(cloud), n, replace=False)]


def augment(cloud: np.ndarray, dataset: str, rng: np.random.Generator) -> np.ndarray:
    if dataset == "scanobjectnn":  # Point-PEFT's: per-axis scale 0.9-1.1, a rotation about y
        cloud = cloud * rng.uniform(0.9, 1.1, size=3)
        a = rng.uniform(-math.pi, math.pi)
        c, s = math.cos(a), math.sin(a)
        return cloud @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float32).T
    return cloud * rng.uniform(2 / 3, 3 / 2, size=3) + rng.uniform(-0.2, 0.2, size=3)  # Point-MAE's


class PointClouds(torch.utils.data.Dataset):
    """(points (num_points, 3) float32, label) pairs of a split; ``train`` draws the
    resampling and augmentation from (seed, epoch, index): the training loop sets the epoch
    (``set_epoch``), so a resumed run and any number of loader workers draw the same."""

    def __init__(self, split: PointSplit, num_points: int, dataset: str, train: bool, seed: int = 0):
        self.split, self.n, self.dataset, self.train, self.seed = split, num_points, dataset, train, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        cloud = np.asarray(self.split.clouds[i], dtype=np.float32)
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            cloud = augment(resample(cloud, self.n, rng), self.dataset, rng)
        else:
            cloud = resample(cloud, self.n, None)
        return torch.from_numpy(np.ascontiguousarray(cloud, dtype=np.float32)), int(self.split.labels[i])
