"""Load pretrained host backbones through their own libraries.

One entry point covers every supported host family::

    model = load_backbone("timm", "vit_base_patch16_224.augreg_in21k")
    model = load_backbone("timm", "vit_tiny_patch16_224", checkpoint_path="vit.safetensors",
                          num_classes=5)
    model = load_backbone("transformers", "/ckpt/dinov2-small")
    model = load_backbone("diffusers_unet", "/ckpt/stable-diffusion-2-1")  # pipeline folder
    model = load_backbone("diffusers_transformer", "/ckpt/sd3-medium/transformer")
    model = load_backbone("open_clip", "ViT-B-32", tag="openai")

What ``name_or_path`` may be, per family:

* ``"timm"``: a timm model name, ``"hf-hub:org/repo"``, or a local folder in timm's
  hub layout (``config.json`` + weights).  A local ``.safetensors`` / ``.pth`` file
  goes in ``checkpoint_path`` next to the model name and the same model kwargs it
  was built with; it is loaded through timm's checkpoint filter, strictly, head
  included (call ``model.reset_classifier(n)`` afterwards for a new head).
* ``"transformers"``: a hub id or a ``save_pretrained`` folder, loaded with
  ``AutoModel`` or with ``model_class=`` (a class or its name in ``transformers``).
* ``"diffusers_unet"`` / ``"diffusers_transformer"``: a model folder or a full
  pipeline folder (its ``unet/`` or ``transformer/`` subfolder is then used); hub
  ids are taken to be pipeline repos unless ``subfolder=`` says otherwise.  The
  class comes from the config's ``_class_name`` for DiTs (SD3, Flux, ...) and is
  ``UNet2DConditionModel`` for UNets, unless ``model_class=`` is given.
* ``"open_clip"``: a built-in config name with ``tag=`` (a pretrained tag) or
  ``checkpoint_path=`` (a local file), ``"hf-hub:org/repo"``, or a local folder
  holding ``open_clip_config.json`` + weights (no global config registration);
  ``"embedded-clip"`` loads the packaged weights by default.

``pretrained=False`` builds the same architecture with random weights.  The model
is returned in eval mode, as ``from_pretrained`` does.  Remaining ``kwargs`` go to
the library call.  Hub ids are only resolved from the local cache when
``HF_HUB_OFFLINE=1``; a miss raises :class:`OfflineWeightsError`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["FAMILIES", "OfflineWeightsError", "UnknownModelError", "load_backbone"]

# Suffixes that only a file path (never a hub id or model name) ends with.
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
_SCHEMES = ("hf-hub:", "local-dir:")


class OfflineWeightsError(FileNotFoundError):
    """Weights named by a hub id are neither reachable nor in the local cache.

    An ``OSError`` because that is what transformers and diffusers raise for the
    same situation, so existing ``except OSError`` handlers keep working; a
    ``FileNotFoundError`` (the weights are missing here) so that callers which
    report missing files as user errors (the ``visionpeft`` command) report it too.
    """

    @classmethod
    def for_hub(cls, family: str, name: str, hint: str) -> OfflineWeightsError:
        """The error for ``family`` weights ``name`` missing from the cache; ``hint``
        says what to pass instead (a local file or folder)."""
        from huggingface_hub import constants

        state = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        return cls(
            f"{family} weights for {name!r} are not available offline: {state} and they "
            f"are not in the local Hugging Face cache. Download them where there is "
            f"network access, then pass {hint}."
        )


def check_timm_name(name: str) -> bool:
    """Refuse a timm registry name timm does not know (architecture or pretrained tag) with
    the closest names; names with a source (``hf-hub:``, ``local-dir:``, timm's aliases)
    are left to timm. -> whether ``name`` is a registry name."""
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    try:
        source, model = parse_model_name(name)
    except ValueError as err:  # a path or repo id without a source prefix: timm's own hint
        raise UnknownModelError(str(err)) from None
    if source is not None:
        return False
    arch, tag = split_model_name_tag(model)
    if not timm.is_model(arch):
        raise UnknownModelError.for_timm(model)
    if tag and not timm.list_pretrained(f"{arch}.{tag}"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
        raise UnknownModelError(f"timm's {arch} has no pretrained weights tagged {tag!r}; its tags: {tags[:8]}"
                                + (" ..." if len(tags) > 8 else ""))
    return True


class UnknownModelError(ValueError):
    """A model name the host library does not know (a ``ValueError``: a wrong setting)."""

    @classmethod
    def for_timm(cls, name: str) -> UnknownModelError:
        """The error for timm model ``name``, naming the closest registered names."""
        import difflib

        import timm

        arch = name.split(".", 1)[0]  # without a pretrained tag
        models = timm.list_models()
        close = difflib.get_close_matches(arch, models, n=5, cutoff=0.6)
        if close:
            hint = f"did you mean {', '.join(close)}?"
        else:
            family = arch.split("_", 1)[0]
            same = [m for m in models if m.startswith(family)] if family else []
            if same:
                near = difflib.get_close_matches(arch, same, n=5, cutoff=0.0)
                hint = (f"timm has {len(same)} models named {family}*, e.g. {', '.join(near)} "
                        f"(timm.list_models('{family}*') lists them)")
            else:
                hint = "timm.list_models('*pattern*') lists the known names"
        return cls(f"timm has no model {arch!r}: {hint}")


# --------------------------------------------------------------------------- #
# shared helpers
# --------------------------------------------------------------------------- #

def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything that exists, is absolute or
    # dot/home-relative, nests deeper or carries a weight-file suffix can only
    # be a path, and a missing one deserves a "no such path" error rather than
    # a confusing hub lookup.
    return (
        os.path.exists(os.path.expanduser(name))
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(_FILE_SUFFIXES)
    )


def _existing(path: str | os.PathLike, what: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    return path


def _source(name_or_path: str | os.PathLike) -> str:
    """A hub id unchanged, or a local path checked to exist."""
    name = os.fspath(name_or_path)
    return _existing(name, "local path") if _looks_local(name) else name


def _resolve_class(module: Any, model_class: Any, default: type) -> type:
    if model_class is None:
        return default
    if isinstance(model_class, str):
        try:
            return getattr(module, model_class)
        except AttributeError:
            raise ValueError(f"{module.__name__} has no class {model_class!r}") from None
    return model_class


def _no_checkpoint_file(family: str, checkpoint_path: str | None) -> None:
    # These libraries load a folder (config + weights); a lone weight file
    # has no config to build the architecture from.
    if checkpoint_path is not None:
        raise ValueError(
            f"family {family!r} loads a saved folder, not a weight file: pass the "
            "folder as name_or_path instead of checkpoint_path"
        )


def _is_cache_miss(err: BaseException | None) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    # Every library wraps the hub error differently (OSError, RuntimeError,
    # FileNotFoundError...), but the hub's own error is always in the chain.
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def _hub_errors(family: str, name: str, hint: str) -> Iterator[None]:
    try:
        yield
    except Exception as err:
        if not _is_cache_miss(err):
            raise
        raise OfflineWeightsError.for_hub(family, name, hint) from err


# --------------------------------------------------------------------------- #
# one loader per family
# --------------------------------------------------------------------------- #

def _load_timm(name_or_path: str, *, pretrained: bool, checkpoint_path: str | None, **kwargs) -> nn.Module:
    import timm

    from .embedded import ALIASES

    name = ALIASES.get(os.fspath(name_or_path), os.fspath(name_or_path))  # embedded-vit-s
    if name.startswith("local-dir:"):
        name = "local-dir:" + _existing(name[len("local-dir:"):], "local path")
    elif not name.startswith("hf-hub:") and _looks_local(name):
        path = _existing(name, "local path")
        if os.path.isfile(path):
            raise ValueError(
                "timm needs the architecture name to build the model: pass the model name "
                f"as name_or_path and {path!r} as checkpoint_path"
            )
        name = "local-dir:" + path
    if checkpoint_path is not None:
        if name.startswith(_SCHEMES):
            # timm would silently prefer the folder/repo's own weights.
            raise ValueError(f"checkpoint_path cannot be combined with {name!r}, which carries its own weights")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=checkpoint_path)
        # timm drops the classifier (and loads non-strictly) whenever the model's
        # num_classes differs from the pretrained cfg's; a local checkpoint of
        # this very model has this num_classes, so say so to keep its head.
        if "num_classes" in kwargs:
            overlay["num_classes"] = kwargs["num_classes"]
        kwargs["pretrained_cfg_overlay"] = overlay
    if not name.startswith(_SCHEMES):
        check_timm_name(name)  # timm's own errors are RuntimeErrors with a traceback
    with _hub_errors("timm", name, "a local file as checkpoint_path or a local timm folder"):
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def _load_transformers(
    name_or_path: str, *, pretrained: bool, checkpoint_path: str | None, model_class: Any = None, **kwargs
) -> nn.Module:
    _no_checkpoint_file("transformers", checkpoint_path)
    import transformers

    cls = _resolve_class(transformers, model_class, transformers.AutoModel)
    source = _source(name_or_path)
    with _hub_errors("transformers", source, "a local save_pretrained folder"):
        if pretrained:
            return cls.from_pretrained(source, **kwargs)
        # Random init: only the config is read; kwargs override its fields.
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)


def _diffusers_subfolder(source: str, component: str, kwargs: dict) -> str | None:
    if "subfolder" in kwargs:
        return kwargs.pop("subfolder")
    if not os.path.isdir(source):
        # A hub id: can't look inside without downloading, and diffusers
        # checkpoints are published as pipeline repos far more often than not.
        return component
    if os.path.isfile(os.path.join(source, component, "config.json")):
        return component
    if os.path.isfile(os.path.join(source, "config.json")):
        return None
    raise FileNotFoundError(f"{source!r} holds neither config.json nor {component}/config.json")


def _load_diffusers(
    name_or_path: str,
    *,
    component: str,
    default_class: str,
    pretrained: bool,
    checkpoint_path: str | None,
    model_class: Any = None,
    **kwargs,
) -> nn.Module:
    family = f"diffusers_{component}"
    _no_checkpoint_file(family, checkpoint_path)
    import diffusers

    cls = _resolve_class(diffusers, model_class, getattr(diffusers, default_class))
    source = _source(name_or_path)
    subfolder = _diffusers_subfolder(source, component, kwargs)
    with _hub_errors(family, source, "a local model or pipeline folder"):
        if pretrained:
            return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
        config = cls.load_config(source, subfolder=subfolder)
        if cls is diffusers.AutoModel:
            cls = getattr(diffusers, config["_class_name"])
        return cls.from_config(config, **kwargs)


def _load_diffusers_unet(name_or_path: str, **kwargs) -> nn.Module:
    return _load_diffusers(name_or_path, component="unet", default_class="UNet2DConditionModel", **kwargs)


def _load_diffusers_transformer(name_or_path: str, **kwargs) -> nn.Module:
    # AutoModel dispatches on the config's _class_name, so SD3, Flux and later
    # MM-DiTs load without a family per class.
    return _load_diffusers(name_or_path, component="transformer", default_class="AutoModel", **kwargs)


def _load_open_clip(
    name_or_path: str, *, pretrained: bool, checkpoint_path: str | None, tag: str | None = None, **kwargs
) -> nn.Module:
    import open_clip

    from . import embedded_clip  # registers embedded-clip with open_clip
    from .embedded import ALIASES

    name = ALIASES.get(os.fspath(name_or_path), os.fspath(name_or_path))  # embedded-vit-s
    if name.startswith("local-dir:"):
        name = name[len("local-dir:"):]
    if not name.startswith("hf-hub:") and _looks_local(name):
        # open_clip's local-dir: scheme reads the folder's own config, so a
        # custom architecture needs no entry in the global config registry.
        name = "local-dir:" + _existing(name, "local path")
    if name.startswith(_SCHEMES):
        if checkpoint_path is not None or tag is not None:
            # open_clip would silently ignore them in favour of the folder/repo.
            raise ValueError(f"tag/checkpoint_path cannot be combined with {name!r}, which carries its own weights")
        weights = None
    else:
        if pretrained and checkpoint_path is None and tag is None and name == embedded_clip.NAME:
            checkpoint_path = str(embedded_clip.weights_path())  # the packaged file (or how to make it)
        if pretrained and checkpoint_path is None and tag is None:
            raise ValueError(
                f"open_clip config {name!r} needs tag= (see open_clip.list_pretrained_tags_by_model) "
                "or checkpoint_path= to load pretrained weights"
            )
        weights = (checkpoint_path or tag) if pretrained else None
        if pretrained and checkpoint_path is not None and not str(checkpoint_path).endswith(".safetensors"):
            # a pickle is read tensors-only here, whatever open_clip version reads it after us
            torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    with _hub_errors("open_clip", name, "checkpoint_path= or a local open_clip folder"):
        return open_clip.create_model(name, pretrained=weights, load_weights=pretrained, **kwargs)


# --------------------------------------------------------------------------- #
# dispatcher
# --------------------------------------------------------------------------- #

_LOADERS: dict[str, Callable[..., nn.Module]] = {
    "timm": _load_timm,
    "transformers": _load_transformers,
    "diffusers_unet": _load_diffusers_unet,
    "diffusers_transformer": _load_diffusers_transformer,
    "open_clip": _load_open_clip,
}

FAMILIES: tuple[str, ...] = tuple(_LOADERS)


def load_backbone(
    family: str,
    name_or_path: str | os.PathLike,
    *,
    pretrained: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Load the host ``name_or_path`` of ``family`` (one of :data:`FAMILIES`).

    See the module docstring for what each family accepts.  Raises
    ``ValueError`` for an unknown family, :class:`UnknownModelError` (a
    ``ValueError``) for a timm model name timm does not know, ``FileNotFoundError``
    for a local path that does not exist (before the library is called) and
    :class:`OfflineWeightsError` (a ``FileNotFoundError``) for hub weights that
    cannot be had offline.
    """
    try:
        loader = _LOADERS[family]
    except KeyError:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {FAMILIES}") from None
    if checkpoint_path is not None:
        if not pretrained:
            raise ValueError("checkpoint_path was given with pretrained=False; drop one of them")
        checkpoint_path = _existing(checkpoint_path, "checkpoint_path")
    model = loader(name_or_path, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
    return model.eval()
