"""Backbones pretrained by this project and shipped inside the package.

No hub weights can be downloaded where visionpeft is built and tested, and a frozen
random encoder makes every adapter look useless, so the project pretrains a small ViT on
its own procedural scenes (`scripts/pretrain_embedded.py`, docs/EMBEDDED.md) and ships
the weights here. They are registered as ordinary timm models whose pretrained config
names the packaged file, so ``timm.create_model("embedded_vit_s", pretrained=True)``,
``load_backbone("timm", "embedded-vit-s")`` and ``backbone: {name: embedded-vit-s,
pretrained: true}`` all go through timm's own loader.

Only timm's public API is used: `register_model`, `generate_default_cfgs` and
`build_model_with_cfg` from ``timm.models``, the `VisionTransformer` class and its
`checkpoint_filter_fn` (what timm's own ViT entry points pass to the same builder).
`register_model` reads this module's ``default_cfgs``, as it does for timm's modules.
"""
from __future__ import annotations

from pathlib import Path

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# name users write -> (timm name, architecture). A ViT with 4 px patches: 64 px scenes
# give a 16 x 16 token grid, fine enough for 5-12 px buildings; 2.7M parameters.
EMBEDDED = {
    "embedded-vit-s": ("embedded_vit_s", dict(img_size=64, patch_size=4, embed_dim=192, depth=6,
                                              num_heads=3, mlp_ratio=4.0, dynamic_img_size=True)),
}
ALIASES = {name: timm_name for name, (timm_name, _) in EMBEDDED.items()}


def weights_file(timm_name: str) -> Path:
    return WEIGHTS_DIR / f"{timm_name}.safetensors"


def check_weights(timm_name: str) -> None:
    """A clear error when the packaged weights are missing (a source checkout before
    `scripts/pretrain_embedded.py` ran, or a build that dropped package data)."""
    path = weights_file(timm_name)
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded weights {path} are missing; regenerate them with "
            "`python scripts/pretrain_embedded.py` (see docs/EMBEDDED.md) or use pretrained: false")


default_cfgs = generate_default_cfgs({
    f"{timm_name}.synthetic": {
        "file": str(weights_file(timm_name)), "num_classes": 0, "input_size": (3, 64, 64),
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "crop_pct": 1.0,
        "license": "apache-2.0",
    }
    for timm_name, _ in EMBEDDED.values()
})


@register_model
def embedded_vit_s(pretrained: bool = False, **kwargs):
    """ViT (192 wide, depth 6, 3 heads, 4 px patches at 64 px) pretrained by visionpeft
    on its synthetic remote-sensing scenes (MAE, then per-pixel land cover from two blocks,
    with a scene-type head throughout); weights in the package."""
    if pretrained and not (kwargs.get("pretrained_cfg_overlay") or {}).get("file"):
        check_weights("embedded_vit_s")  # the packaged file, unless a checkpoint is given
    args = dict(EMBEDDED["embedded-vit-s"][1], num_classes=0)
    kwargs = dict(args, **kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(VisionTransformer, "embedded_vit_s", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs)
