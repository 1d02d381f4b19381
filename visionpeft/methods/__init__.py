"""One file per method; importing this package registers them all."""
from .krona import KronAConfig
from .lora import LoRAConfig

__all__ = ["KronAConfig", "LoRAConfig"]
