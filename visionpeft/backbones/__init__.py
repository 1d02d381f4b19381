"""Hosts: target presets, loaders for real checkpoints, tiny local builders (tests, demos)."""
from . import presets
from .loaders import load_backbone

__all__ = ["presets", "load_backbone"]
