"""The embedded CLIP, ``embedded-clip``: a small open_clip model pretrained by visionpeft
on captioned procedural scenes (`scripts/pretrain_embedded_clip.py`, docs/EMBEDDED.md)
and shipped inside the package, for the pipelines that need an image-text model where no
hub weights can be downloaded.

Importing `visionpeft.backbones` registers the architecture (``weights/embedded-clip.json``,
open_clip's own config layout) with open_clip, so open_clip's public API handles it like
one of its built-in configs::

    import open_clip, visionpeft.backbones
    from visionpeft.backbones.embedded_clip import weights_path
    model, _, preprocess = open_clip.create_model_and_transforms("embedded-clip", pretrained=str(weights_path()))
    tokenizer = open_clip.get_tokenizer("embedded-clip")       # open_clip's bundled BPE, context 32
    model = visionpeft.backbones.load_backbone("open_clip", "embedded-clip")  # the same file

``preprocess`` resizes to 64 px and normalises with open_clip's OPENAI_DATASET_MEAN/STD,
as pretraining did.
"""
from __future__ import annotations

from pathlib import Path

NAME = "embedded-clip"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CONFIG_FILE = WEIGHTS_DIR / f"{NAME}.json"  # open_clip names a config after its file's stem
WEIGHTS_FILE = WEIGHTS_DIR / "embedded_clip.safetensors"
REGENERATE = "python scripts/pretrain_embedded_clip.py"


def register() -> None:
    """Add ``embedded-clip`` to open_clip's config registry (once per process)."""
    import open_clip

    if NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_FILE)


def weights_path() -> Path:
    """The packaged weights; a FileNotFoundError saying how to regenerate them when missing
    (a source checkout before the pretraining script ran, or a build that dropped package data)."""
    if not WEIGHTS_FILE.is_file():
        raise FileNotFoundError(f"the embedded CLIP weights {WEIGHTS_FILE} are missing; regenerate them with "
                                f"`{REGENERATE}` (see docs/EMBEDDED.md) or use pretrained: false")
    return WEIGHTS_FILE


register()
