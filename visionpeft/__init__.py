"""visionpeft: parameter-efficient adapters for vision and diffusion models.

    import visionpeft as vp
    vp.inject(model, vp.LoRAConfig(r=8, target_modules=vp.presets.TIMM_VIT_ALL), name="task")

``import visionpeft`` itself is cheap (no torch): the public API loads on the first
attribute read (``vp.inject``, ``from visionpeft import LoRAConfig``), so the ``visionpeft``
command answers ``--help`` and ``methods`` at once. Loading the API also registers the
packaged timm models (``embedded_vit_s``); ``import visionpeft.backbones`` does that alone
(and ``import visionpeft`` after timm does it at once).
"""
import importlib.util
import sys as _sys

from .core.version import __version__  # noqa: F401  (torch-free: setup tools and the CLI read it)

if "timm" in _sys.modules:
    # timm (and torch) are loaded already, so registering the packaged timm models costs
    # little, and `import timm, visionpeft; timm.create_model("embedded_vit_s")` keeps working
    from . import backbones as _backbones  # noqa: F401


# ruff: noqa: F401  (the imports below are read back through locals())
def _load_api() -> dict:
    """Import the public API once and return its names (module __getattr__, PEP 562)."""
    from .core.config import MethodConfig, ConfigError
    from .core.io import AdapterFileError, read_adapter_config, save_adapter
    from .core.model_ops import (active_adapters, adapter_names, delta_weight, disabled, inject, merge, remove,
                                 routing, set_active, set_scale, summary, trainable_parameters, unmerge)
    from .core.atomic import write_dir as atomic_write_dir, write_file as atomic_write_file
    from .core.registry import config_from_dict, get_method, list_methods, register_method
    from .core.targeting import TargetError
    from .methods import __all__ as method_names
    import importlib

    methods = importlib.import_module(f"{__name__}.methods")
    from .backbones import presets  # also registers the packaged timm models
    from .interop import ExportReport, InteropError
    from .files import detect_format, export, hotswap_adapter, import_adapter, list_formats, load_adapter
    from .ops.compiled import set_compiled_kernels
    from .ops.kernels import kernels
    from .ops.native import set_native_kernels
    from .ops.workspace import release_scratch

    api = {k: v for k, v in locals().items() if k not in ("methods", "method_names", "importlib")}
    api.update({name: getattr(methods, name) for name in method_names})
    api["__all__"] = [
        "MethodConfig", "ConfigError", "TargetError", "AdapterFileError",
        "inject", "adapter_names", "config_from_dict", "atomic_write_dir", "atomic_write_file",
        "set_active", "set_scale",
        "active_adapters", "disabled", "routing", "merge",
        "unmerge", "remove", "save_adapter", "load_adapter", "hotswap_adapter", "read_adapter_config", "summary",
        "trainable_parameters", "delta_weight", "list_methods", "get_method", "register_method",
        "presets", "export", "import_adapter", "detect_format", "list_formats", "ExportReport", "InteropError",
        "set_compiled_kernels", "set_native_kernels", "kernels", "release_scratch",
        *method_names,
    ]
    return api


def __getattr__(name: str):
    """Called only for names the module does not hold yet (PEP 562)."""
    if name.startswith("_") and name != "__all__" or not name.isidentifier():
        raise AttributeError(name)  # dunder and private probes (copy, pickle, IPython) load nothing
    import importlib

    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # vp.train, from visionpeft import cli
    if "__all__" not in globals():  # load once; later misses must not undo patched names
        for key, value in _load_api().items():
            globals().setdefault(key, value)
    if name in globals():
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    public = globals()["__all__"] if "__all__" in globals() else __getattr__("__all__")
    return sorted({k for k in globals() if not k.startswith("_")} | set(public) | {"__version__"})
