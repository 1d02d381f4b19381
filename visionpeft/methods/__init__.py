"""One file per method; importing this package registers them all."""
from .lora import LoRAConfig

__all__ = ["LoRAConfig"]
