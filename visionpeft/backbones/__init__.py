"""Hosts: target presets, tiny local builders (tests, demos) and backbone loaders."""
from . import presets

__all__ = ["presets"]
