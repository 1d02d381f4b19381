"""The embedded Point-MAE, ``embedded-point-mae``: a small Point-MAE pretrained by visionpeft
with masked point modelling on procedural shapes (`scripts/pretrain_embedded_point_mae.py`,
docs/EMBEDDED.md) and shipped inside the package, for point-cloud runs where Point-MAE's
released weights cannot be downloaded. Its file holds the encoder in the official
``pretrain.pth`` key layout (``MAE_encoder.*``), so it loads through the same path::

    from visionpeft.backbones import build_point_mae
    from visionpeft.backbones.embedded_point_mae import SIZE, weights_path
    model = build_point_mae(4, checkpoint_path=weights_path(), **SIZE)
"""
from __future__ import annotations

from pathlib import Path

NAME = "embedded-point-mae"
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "embedded_point_mae.safetensors"
REGENERATE = "python scripts/pretrain_embedded_point_mae.py"
# the transformer's size (Point-MAE's is 384 x 12, 6 heads) and its patches: 64 groups of 32
# points of 1024, as Point-MAE's pretraining
SIZE = {"dim": 192, "depth": 6, "heads": 3}
GROUPS = {"num_points": 1024, "num_group": 64, "group_size": 32}


def weights_path() -> Path:
    """The packaged weights; a FileNotFoundError saying how to regenerate them when missing."""
    if not WEIGHTS_FILE.is_file():
        raise FileNotFoundError(f"the embedded Point-MAE weights {WEIGHTS_FILE} are missing; regenerate them with "
                                f"`{REGENERATE}` (see docs/EMBEDDED.md)")
    return WEIGHTS_FILE
