"""Gradio demo: upload two dates of the same scene, pick a trained PeftCD checkpoint, see
the change mask, an overlay and the changed-area percentage.

    python demos/change_detection.py --checkpoint output/cd-synthetic [--port 7860]

Inference is `visionpeft.pipelines.change_detection.predict_probs`, the same sliding-
window path as `visionpeft predict-cd`.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from demo_common import image_input, serve


@lru_cache(maxsize=4)
def _model(checkpoint: str):
    from visionpeft.pipelines.change_detection import load_detector

    return load_detector(checkpoint)


def detect(image_a, image_b, checkpoint: str):
    """(mask, overlay, text) for two RGB arrays (H, W, 3) of the same size."""
    import gradio as gr

    from visionpeft.pipelines.change_detection import predict_probs

    if image_a is None or image_b is None:
        raise gr.Error("upload both dates")
    a, b = np.asarray(image_a), np.asarray(image_b)
    if a.shape != b.shape:
        raise gr.Error(f"the two dates differ in size: {a.shape[1]}x{a.shape[0]} and {b.shape[1]}x{b.shape[0]}")
    try:
        model, cfg = _model(checkpoint.strip())
    except (FileNotFoundError, ValueError) as err:
        raise gr.Error(str(err)) from None
    def to_tensor(x):
        return torch.from_numpy(x[..., :3].astype(np.float32) / 255.0).permute(2, 0, 1)[None]

    probs = predict_probs(model, to_tensor(a), to_tensor(b), cfg["image_size"])[0].numpy()
    changed = probs > 0.5
    mask = changed.astype(np.uint8) * 255
    overlay = b[..., :3].astype(np.float32)
    overlay[changed] = 0.5 * overlay[changed] + 0.5 * np.array([255.0, 0.0, 0.0])
    return mask, overlay.astype(np.uint8), f"changed area: {100 * changed.mean():.2f}%"


def build(default_checkpoint: str = ""):
    import gradio as gr

    with gr.Blocks(title="visionpeft change detection") as demo:
        gr.Markdown("## Change detection (PeftCD)\nTwo dates of the same scene; the mask marks what changed.")
        with gr.Row():
            a = image_input("numpy", "date A")
            b = image_input("numpy", "date B")
        ckpt = gr.Textbox(label="checkpoint folder", value=default_checkpoint)
        run = gr.Button("Detect changes", variant="primary")
        with gr.Row():
            mask = gr.Image(label="change mask", format="png")  # lossless: the mask stays 0/255
            overlay = gr.Image(label="overlay on date B", format="png")
        area = gr.Textbox(label="result")
        run.click(detect, [a, b, ckpt], [mask, overlay, area], api_name="detect")
    return demo


def main(argv=None):
    serve(build, __doc__, argv=argv)


if __name__ == "__main__":
    main()
