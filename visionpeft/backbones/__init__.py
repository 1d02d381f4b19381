"""Hosts: target presets, loaders for real checkpoints, tiny local builders (tests, demos)."""
from . import embedded, presets  # noqa: F401  (embedded: registers the packaged timm models)
from .loaders import load_backbone

__all__ = ["presets", "load_backbone"]
