"""Gradio demo: load a few-shot CLIP checkpoint, upload an image, see its top classes.

    python demos/fewshot.py --checkpoint output/fewshot-scenes-embedded [--port 7860]

A checkpoint is what `visionpeft train` writes for ``task: fewshot_clip`` (an output_dir
or its adapter/: ``fewshot_config.json``, and ``clip/`` with the adapter unless it is
zero-shot CLIP). Loading is `visionpeft.pipelines.fewshot_clip.load_classifier`; the top
classes are `predict_topk`, the same as `visionpeft predict-fewshot`.

**Load** picks the checkpoint of this page (each browser session keeps its own); a folder
that does not load leaves the one loaded before in place. Models are cached: loading the
same folder again costs nothing unless its files changed.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from demo_common import image_input, one_line, serve

MAX_MODELS = 4  # checkpoints kept loaded (a ViT-L CLIP is about 1.7 GB)
MAX_TOPK = 20  # the slider's end (gradio holds the endpoint's k to 1..20 too); capped at the class count
SHOWN_CLASSES = 5  # class names listed in the "loaded" line
MAX_PIXELS = 8192 * 8192  # refuse larger uploads in one line
CHECKPOINT_HELP = "an output_dir of `visionpeft train` with task: fewshot_clip, or its adapter/"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_LOCK = threading.Lock()  # one load at a time (two sessions asking for one folder load it once)
_MODELS: OrderedDict[tuple, tuple] = OrderedDict()  # (folder, files stamp) -> (model, cfg)


def _stamp(folder: Path) -> tuple:
    """The checkpoint's files with their sizes and times: a retrained folder loads again."""
    return tuple((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                 for f in sorted(folder.rglob("*")) if f.is_file())


def model(checkpoint) -> tuple:
    """(classifier, config, checkpoint folder) of ``checkpoint`` (an output_dir or its
    adapter/), loaded once and again only when the folder's files change. Raises
    FileNotFoundError / ValueError in one line."""
    from visionpeft.pipelines.fewshot_clip import find_checkpoint, load_classifier

    folder = find_checkpoint(Path(str(checkpoint).strip()).expanduser()).resolve()
    with _LOCK:
        key = (str(folder), _stamp(folder))
        if key in _MODELS:
            _MODELS.move_to_end(key)
        else:
            try:
                loaded = load_classifier(folder, device=DEVICE)
            except FileNotFoundError as err:
                raise FileNotFoundError(one_line(err)) from None
            except ValueError as err:
                if not isinstance(err, json.JSONDecodeError):  # load_classifier's own: they name the folder
                    raise ValueError(one_line(err)) from None
                raise ValueError(f"cannot load the few-shot checkpoint {folder}: its config is not JSON: "
                                 f"{one_line(err)}") from None
            except Exception as err:  # a broken config or weights file: one line, not gradio's bare "Error"
                raise ValueError(f"cannot load the few-shot checkpoint {folder}: {type(err).__name__}: "
                                 f"{one_line(err)}") from None
            for old in [k for k in _MODELS if k[0] == key[0]]:  # the folder's files changed: drop the old one
                del _MODELS[old]
            _MODELS[key] = loaded
            while len(_MODELS) > MAX_MODELS:
                _MODELS.popitem(last=False)
        clf, cfg = _MODELS[key]
    return clf, cfg, folder


def describe(cfg: dict, folder) -> str:
    """The "loaded" line: backbone, adapter method (or zero-shot), classes, template, folder."""
    backbone = cfg.get("backbone") or {}
    name = f"{backbone.get('source', 'open_clip')} {backbone.get('name')}"
    if backbone.get("pretrained") not in (None, True):
        name += f" ({backbone['pretrained']})"
    adapter = cfg.get("adapter")
    method = "zero-shot" if not adapter else adapter.get("method", "?")
    if adapter and adapter.get("r") is not None:
        method += f" r={adapter['r']}"
    classes = list(cfg.get("classnames") or [])
    listed = ", ".join(classes[:SHOWN_CLASSES]) + (", ..." if len(classes) > SHOWN_CLASSES else "")
    return (f"backbone: {name}; adapter: {method}; {len(classes)} classes ({listed}); "
            f"template {cfg.get('template')!r}; from {folder}")


def load_fewshot(checkpoint: str, current: str | None = None) -> tuple[str, str]:
    """(the "loaded" line, the folder now loaded). A bad folder raises gr.Error in one line
    and leaves ``current`` (the page's state) as it was."""
    import gradio as gr

    checkpoint = (checkpoint or "").strip()
    if not checkpoint:
        raise gr.Error(f"enter a few-shot checkpoint folder: {CHECKPOINT_HELP}")
    try:
        _, cfg, folder = model(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise gr.Error(one_line(err)) from None
    return describe(cfg, folder), str(folder)


def _pil(image):
    """An RGB PIL image from what the Image component (or a Python caller) hands over."""
    import gradio as gr
    import numpy as np
    from PIL import Image

    if image is None:
        raise gr.Error("upload an image")
    if not isinstance(image, Image.Image):
        x = np.asarray(image)
        if x.dtype != np.uint8 or x.ndim not in (2, 3):
            raise gr.Error(f"expected an 8-bit image, got an array of {x.dtype} values and shape {x.shape}")
        image = Image.fromarray(x[..., :3] if x.ndim == 3 else x)
    if min(image.size) < 1:
        raise gr.Error(f"the image is empty ({image.size[0]}x{image.size[1]})")
    if image.size[0] * image.size[1] > MAX_PIXELS:
        raise gr.Error(f"the image is {image.size[0]}x{image.size[1]}; this demo takes at most {MAX_PIXELS:,} pixels")
    return image.convert("RGB")


def classify(image, k: int = 5, current: str | None = None) -> tuple[dict, list]:
    """({class: probability}, [[class, probability], ...]): the top ``k`` classes of the
    image under the checkpoint loaded in the page (``current``), most probable first."""
    import gradio as gr

    from visionpeft.pipelines.fewshot_clip import predict_topk

    if not current:
        raise gr.Error(f"no checkpoint loaded: enter a few-shot checkpoint folder ({CHECKPOINT_HELP}) and press Load")
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise gr.Error(f"top k must be a whole number, got {k!r}") from None
    if k < 1:
        raise gr.Error(f"top k={k}: give 1 or more")
    picture = _pil(image)
    try:
        clf = model(current)[0]
    except (FileNotFoundError, ValueError) as err:  # the loaded folder went away or broke since Load
        raise gr.Error(one_line(err)) from None
    top = predict_topk(clf, [picture], k=k)[0]
    return {name: p for name, p in top}, [[name, p] for name, p in top]


def build(default_checkpoint: str = ""):
    """The tab; ``default_checkpoint`` is loaded now and is every new session's model (a bad
    one raises FileNotFoundError / ValueError in one line)."""
    import gradio as gr

    shown, folder = "nothing loaded yet: enter a checkpoint folder and press Load", None
    if default_checkpoint:
        _, cfg, folder = model(default_checkpoint)
        shown, folder = describe(cfg, folder), str(folder)
    with gr.Blocks(title="visionpeft few-shot classification") as demo:
        gr.Markdown("## Few-shot classification (CLIP with an adapter)\nLoad a `task: fewshot_clip` checkpoint, "
                    "upload an image, see its most probable classes.")
        current = gr.State(folder)  # this session's loaded folder; the models themselves are cached by folder
        with gr.Row():
            ckpt = gr.Textbox(label="few-shot checkpoint folder", value=default_checkpoint, info=CHECKPOINT_HELP,
                              scale=4)
            load = gr.Button("Load", scale=1)
        loaded = gr.Textbox(label="loaded", value=shown, interactive=False)
        with gr.Row():
            image = image_input("pil")
            with gr.Column():
                k = gr.Slider(1, MAX_TOPK, value=5, step=1, label="top k")
                run = gr.Button("Classify", variant="primary")
                label = gr.Label(label="top classes")
                table = gr.JSON(label="top classes as [class, probability]")
        load.click(load_fewshot, [ckpt, current], [loaded, current], api_name="load_fewshot")
        ckpt.submit(load_fewshot, [ckpt, current], [loaded, current], api_visibility="private")
        run.click(classify, [image, k, current], [label, table], api_name="classify")
    return demo


def main(argv=None):
    serve(build, __doc__, CHECKPOINT_HELP, argv=argv)


if __name__ == "__main__":
    main()
