"""Dataset readers and synthetic generators."""
from .synthetic import grating_classes

__all__ = ["grating_classes"]
