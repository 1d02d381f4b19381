"""One file per method; importing this package registers them all."""
from .adapter import AdapterConfig
from .block_lora import BlockLoRAConfig
from .earth_adapter import EarthAdapterConfig
from .krona import KronAConfig
from .loha import LoHaConfig
from .lora import LoRAConfig
from .point_peft import PointPEFTConfig, set_memory_bank
from .snell import SNELLConfig
from .snella import SNELLAAllocator
from .wara import WaRAConfig

__all__ = ["AdapterConfig", "BlockLoRAConfig", "EarthAdapterConfig", "KronAConfig", "LoHaConfig", "LoRAConfig",
           "PointPEFTConfig", "set_memory_bank", "SNELLConfig", "SNELLAAllocator", "WaRAConfig"]
