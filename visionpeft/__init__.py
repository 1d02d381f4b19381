"""visionpeft: parameter-efficient adapters for vision and diffusion models.

    import visionpeft as vp
    vp.inject(model, vp.LoRAConfig(r=8, target_modules=vp.presets.TIMM_VIT_ALL), name="task")
"""
from .core.version import __version__  # noqa: E402,F401
from .core.config import MethodConfig, ConfigError  # noqa: E402
from .core.io import AdapterFileError, read_adapter_config, save_adapter  # noqa: E402
from .core.model_ops import (  # noqa: E402
    active_adapters,
    adapter_names,
    delta_weight,
    disabled,
    inject,
    merge,
    remove,
    routing,
    set_active,
    set_scale,
    summary,
    trainable_parameters,
    unmerge,
)
from .core.atomic import write_dir as atomic_write_dir  # noqa: E402
from .core.registry import config_from_dict, get_method, list_methods, register_method  # noqa: E402
from .core.targeting import TargetError  # noqa: E402
from .methods import *  # noqa: E402,F401,F403
from .methods import __all__ as _method_names  # noqa: E402
from .backbones import presets  # noqa: E402
from .interop import ExportReport, InteropError  # noqa: E402
from .files import detect_format, export, hotswap_adapter, import_adapter, list_formats, load_adapter  # noqa: E402,E501
from .ops.compiled import set_compiled_kernels  # noqa: E402
from .ops.kernels import kernels  # noqa: E402
from .ops.native import set_native_kernels  # noqa: E402
from .ops.workspace import release_scratch  # noqa: E402

__all__ = [
    "MethodConfig", "ConfigError", "TargetError", "AdapterFileError",
    "inject", "adapter_names", "config_from_dict", "atomic_write_dir", "set_active", "set_scale",
    "active_adapters", "disabled", "routing", "merge",
    "unmerge", "remove", "save_adapter", "load_adapter", "hotswap_adapter", "read_adapter_config", "summary",
    "trainable_parameters", "delta_weight", "list_methods", "get_method", "register_method",
    "presets", "export", "import_adapter", "detect_format", "list_formats", "ExportReport", "InteropError",
    "set_compiled_kernels", "set_native_kernels", "kernels", "release_scratch",
    *_method_names,
]
