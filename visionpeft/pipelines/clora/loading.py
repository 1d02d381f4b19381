"""One adapter into a diffusers pipeline's UNet and text encoders, under one name, from
whatever a user has: a DreamBooth output folder, a folder per pipeline component (ours
or PEFT's), one of our adapter folders, or a single diffusers / kohya / LyCORIS file
holding the UNet's and the text encoders' keys."""
from __future__ import annotations

from pathlib import Path

import visionpeft as vp

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# the key prefixes of each component in single-file formats (diffusers, then kohya / LyCORIS)
FILE_PREFIXES = {"unet": ("unet", "lora_unet"), "text_encoder": ("text_encoder", "lora_te", "lora_te1"),
                 "text_encoder_2": ("text_encoder_2", "lora_te2")}


def _file_parts(path: Path) -> dict[str, str | None]:
    """{component: prefix} of the components a single file has keys for."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors' own error type differs across versions
        raise ValueError(f"{path} is not a safetensors file ({err}); give an adapter folder or a "
                         ".safetensors file") from None
    found = {}
    for comp, prefixes in FILE_PREFIXES.items():
        for pre in prefixes:
            sep = "." if not pre.startswith("lora_") else "_"
            if any(k.startswith(pre + sep) for k in keys):
                found[comp] = pre
                break
    return found or {"unet": None}


def _plan(path: Path) -> dict[str, tuple[Path, str | None]]:
    """{component: (file or folder, prefix)} to load."""
    if path.is_dir() and (path / "adapter").is_dir() and not (path / "adapter_config.json").exists():
        path = path / "adapter"  # a DreamBooth training output
    if path.is_dir():
        subs = {c: (path / c, None) for c in COMPONENTS if (path / c).is_dir()}
        if subs:
            return subs
        files = sorted(path.glob("*.safetensors"))
        if not (path / "adapter_config.json").exists() and len(files) == 1:
            path = files[0]  # export/diffusers/ and the like: a folder around one file
        else:
            return {"unet": (path, None)}
    return {comp: (path, pre) for comp, pre in _file_parts(path).items()}


def load_pipeline_adapter(pipe, path, name: str) -> list[str]:
    """Load the adapter at ``path`` as ``name`` into ``pipe``'s components; returns the
    components that received it. The UNet must receive it; a text-encoder part for an
    encoder the pipeline lacks is refused. On any error every component is left as it
    was (the parts already loaded are removed again)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter {name!r}: {path} does not exist")
    plan = _plan(path)
    if "unet" not in plan:
        raise ValueError(f"adapter {name!r}: {path} holds no UNet part (found {sorted(plan)})")
    missing = [c for c in plan if getattr(pipe, c, None) is None]
    if missing:
        raise ValueError(f"adapter {name!r}: {path} has parts for {missing}, which this pipeline does not have "
                         "(an adapter for another base model?)")
    for comp in plan:
        if name in vp.adapter_names(getattr(pipe, comp)):
            raise ValueError(f"the pipeline's {comp} already has an adapter named {name!r}; choose another name")
    done = []
    try:
        for comp, (where, prefix) in plan.items():
            kw = {"prefix": prefix} if prefix is not None else {}
            try:
                vp.load_adapter(getattr(pipe, comp), where, name=name, **kw)
            except (ValueError, KeyError, TypeError) as err:  # said as one ValueError, whatever the kind
                msg = err.args[0] if isinstance(err, KeyError) and err.args else err
                raise ValueError(f"adapter {name!r} ({comp}): {msg}") from err
            done.append(comp)
    except BaseException:
        for comp in done:
            vp.remove(getattr(pipe, comp), name)
        raise
    return done
