"""The release number, kept at the bottom so that any layer may record it (saved files do)."""
__version__ = "0.1.0"
