"""Hosts: target presets, loaders for real checkpoints, tiny local builders (tests, demos)."""
from . import embedded, embedded_clip, presets  # noqa: F401  (register the packaged timm and open_clip models)
from .embedded import ALIASES
from .embedded_sd import embedded_sd_path
from .loaders import OfflineWeightsError, UnknownModelError, check_timm_name, load_backbone
from .point_mae import build_point_mae

__all__ = ["presets", "load_backbone", "ALIASES", "OfflineWeightsError", "UnknownModelError", "check_timm_name",
           "build_point_mae", "embedded_sd_path"]
