"""Gradio demo: upload an image, pick a trained segmentation checkpoint, see the class map,
an overlay with a legend and each class's share of the area.

    python demos/segmentation.py --checkpoint output/seg-synthetic-earth [--port 7860]

Inference is `visionpeft.pipelines.segmentation.predict_probs`, the same sliding-window
path as `visionpeft predict-seg`; the overlay is the one `predict-seg --overlay` writes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from demo_common import image_input, serve

MAX_PIXELS = 4096 * 4096  # a CPU demo: refuse larger uploads in one line rather than run for minutes
AREA_HEADERS = ["class", "colour", "pixels", "area (%)"]


@lru_cache(maxsize=4)
def _cached(folder: str, stamp: tuple):
    from visionpeft.pipelines.segmentation import load_segmenter

    return load_segmenter(folder)


def _model(checkpoint: str):
    """(model, cfg), loaded once per checkpoint and again when its files change (a run that
    is still training rewrites best/)."""
    from visionpeft.pipelines.segmentation import find_checkpoint

    folder = find_checkpoint(checkpoint)  # FileNotFoundError naming what is missing
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in sorted(folder.rglob("*")) if f.is_file())
    return _cached(str(folder.resolve()), stamp)


def _classes(cfg: dict) -> list[str]:
    n = int(cfg["num_classes"])
    named = list(cfg.get("classes") or [])[:n]
    return named + [f"class {i}" for i in range(len(named), n)]


def _rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 from what the Image component (or a Python caller) hands over."""
    import gradio as gr

    if image is None:
        raise gr.Error("upload an image")
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise gr.Error(f"expected an 8-bit image, got {x.dtype} values")
    if x.ndim == 2:  # grayscale
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise gr.Error(f"expected an RGB image (H, W, 3), got an array of shape {x.shape}")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    if min(x.shape[:2]) < 1:
        raise gr.Error(f"the image is empty ({x.shape[1]}x{x.shape[0]})")
    if x.shape[0] * x.shape[1] > MAX_PIXELS:
        raise gr.Error(f"the image is {x.shape[1]}x{x.shape[0]}; this demo takes at most {MAX_PIXELS:,} pixels")
    return np.ascontiguousarray(x[..., :3])


def segment(image, checkpoint: str):
    """(class map, overlay, areas) for one RGB array (H, W, 3): the class map in each class's
    colour (H, W, 3 uint8, no blending), the overlay with its legend (a PIL image, as
    `predict-seg --overlay` writes it) and a table of [class, colour, pixels, area %] rows."""
    import gradio as gr

    from visionpeft.pipelines.segmentation import predict_probs
    from visionpeft.pipelines.segmentation.render import class_colours, colour_overlay

    rgb = _rgb(image)
    checkpoint = (checkpoint or "").strip()
    if not checkpoint:
        raise gr.Error("enter a checkpoint folder: an output_dir of `visionpeft train` with task: segmentation, "
                       "its best/ or adapter/")
    try:
        model, cfg = _model(checkpoint)
    except FileNotFoundError as err:  # find_checkpoint's message names the folder and what it lacks
        raise gr.Error(str(err)) from None
    except Exception as err:  # a checkpoint folder that does not load: say so in the page, not as "Error"
        raise gr.Error(f"cannot load the segmentation checkpoint {checkpoint}: {type(err).__name__}: {err}") from None
    classes = _classes(cfg)
    x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mask = predict_probs(model, x, int(cfg["image_size"]), cfg.get("eval_stride"),
                         cfg.get("base_scale", 1.0))[0].argmax(0).numpy()
    colours = class_colours(len(classes))
    class_map = colours[mask].astype(np.uint8)
    overlay = colour_overlay(rgb.astype(np.float32) / 255.0, mask, classes)
    counts = np.bincount(mask.ravel(), minlength=len(classes))[:len(classes)]
    areas = [[name, "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colour)), int(n),
              round(100 * float(n) / mask.size, 2)] for name, colour, n in zip(classes, colours, counts)]
    return class_map, overlay, areas


def build(default_checkpoint: str = ""):
    import gradio as gr

    with gr.Blocks(title="visionpeft segmentation") as demo:
        gr.Markdown("## Semantic segmentation\nOne image; each pixel gets a class of the checkpoint.")
        with gr.Row():
            image = image_input("numpy")
            with gr.Column():
                ckpt = gr.Textbox(label="segmentation checkpoint folder", value=default_checkpoint)
                run = gr.Button("Segment", variant="primary")
        with gr.Row():
            class_map = gr.Image(label="class map", format="png")  # lossless: one exact colour per class
            overlay = gr.Image(label="overlay with legend", format="png")
        areas = gr.Dataframe(headers=AREA_HEADERS, datatype=["str", "str", "number", "number"],
                             label="area per class", interactive=False)
        run.click(segment, [image, ckpt], [class_map, overlay, areas], api_name="segment")
    return demo


def main(argv=None):
    serve(build, __doc__, argv=argv)


if __name__ == "__main__":
    main()
