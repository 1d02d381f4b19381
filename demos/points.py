"""Gradio demo: upload a point cloud (.ply, .npy or .txt), see it in 3-D and the classes a
point-cloud classification checkpoint gives it.

    python demos/points.py --checkpoint output/points-shapes-embedded [--port 7860]

A checkpoint is what `visionpeft train` writes for ``task: point_classification`` (an
output_dir, its best/ or adapter/: ``points_config.json`` and ``model/``). Reading the cloud
is `visionpeft.data.points.read_cloud` and the prediction the one of `visionpeft
predict-points` (FPS to the checkpoint's point count, softmax of the logits).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from demo_common import one_line, serve

MAX_TOPK = 10
SHOWN_POINTS = 4096  # drawn in the 3-D view (a random subset of larger clouds)
CHECKPOINT_HELP = "an output_dir of `visionpeft train` with task: point_classification, its best/ or adapter/"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_LOCK = threading.Lock()
_MODELS: dict = {}  # (folder, files stamp) -> (model, cfg); the last few


def model(checkpoint):
    """(classifier, config) of a checkpoint folder, loaded once per version of its files;
    FileNotFoundError / ValueError in one line."""
    from visionpeft.pipelines.pointcloud import find_checkpoint, load_classifier

    folder = find_checkpoint(Path(str(checkpoint).strip()).expanduser()).resolve()
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in sorted(folder.rglob("*")) if f.is_file())
    with _LOCK:
        key = (str(folder), stamp)
        if key not in _MODELS:
            try:
                loaded = load_classifier(folder, DEVICE)
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(one_line(err)) from None
            except Exception as err:  # a broken file: one line, not gradio's bare "Error"
                raise ValueError(f"cannot load the checkpoint {folder}: {type(err).__name__}: {one_line(err)}") \
                    from None
            while len(_MODELS) >= 2:
                _MODELS.pop(next(iter(_MODELS)))
            _MODELS[key] = loaded
        return _MODELS[key]


def figure(cloud: np.ndarray, title: str = ""):
    """A matplotlib 3-D scatter of the cloud (y up, as the data sets have it)."""
    from matplotlib.figure import Figure  # not pyplot: its figures would pile up across requests

    if len(cloud) > SHOWN_POINTS:
        cloud = cloud[np.random.default_rng(0).choice(len(cloud), SHOWN_POINTS, replace=False)]
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(cloud[:, 0], cloud[:, 2], cloud[:, 1], c=cloud[:, 1], s=2, cmap="viridis")
    ax.set_xlabel("x")
    ax.set_ylabel("z")
    ax.set_zlabel("y")
    ax.set_title(title)
    return fig


def classify(cloud_file, checkpoint: str, k: int = 5):
    """(3-D figure, {class: probability}, [[class, probability], ...]) of an uploaded cloud."""
    import gradio as gr

    from visionpeft.data.points import read_cloud, resample

    if cloud_file is None:
        raise gr.Error("upload a point cloud: a .ply, .npy or .txt file")
    path = getattr(cloud_file, "name", None) or str(cloud_file)
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise gr.Error(f"top k must be a whole number, got {k!r}") from None
    if not 1 <= k <= MAX_TOPK:
        raise gr.Error(f"top k={k}: give 1 to {MAX_TOPK}")
    try:
        cloud = read_cloud(path)
    except (ValueError, ImportError) as err:
        raise gr.Error(one_line(str(err).replace(str(path), Path(path).name))) from None
    try:
        clf, cfg = model(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise gr.Error(one_line(err)) from None
    # one forward at a time: Point-PEFT's frozen pass switches the model's shared state
    with _LOCK, torch.no_grad():
        points = torch.from_numpy(resample(cloud, cfg["num_points"], None))[None].to(DEVICE)
        probs = torch.softmax(clf(points).float(), -1)[0].cpu()
    top = probs.topk(min(k, len(probs)))
    pairs = [[cfg["classes"][i], float(p)] for p, i in zip(top.values.tolist(), top.indices.tolist())]
    return figure(cloud, f"{len(cloud)} points"), {c: p for c, p in pairs}, pairs


def build(default_checkpoint: str = ""):
    """The tab; a ``default_checkpoint`` that does not load raises FileNotFoundError /
    ValueError in one line before anything is built."""
    import gradio as gr

    if default_checkpoint:
        model(default_checkpoint)
    with gr.Blocks(title="visionpeft point clouds") as demo:
        gr.Markdown("## Point-cloud classification\nUpload a cloud (.ply, .npy or .txt rows of x y z); see it in "
                    "3-D and its most probable classes.")
        ckpt = gr.Textbox(label="checkpoint folder", value=default_checkpoint, info=CHECKPOINT_HELP)
        with gr.Row():
            with gr.Column():
                cloud = gr.File(label="point cloud", file_types=[".ply", ".npy", ".txt"])
                k = gr.Slider(1, MAX_TOPK, value=5, step=1, label="top k")
                run = gr.Button("Classify", variant="primary")
            view = gr.Plot(label="the cloud")
        with gr.Row():
            label = gr.Label(label="top classes")
            table = gr.JSON(label="top classes as [class, probability]")
        run.click(classify, [cloud, ckpt, k], [view, label, table], api_name="classify_points")
    return demo


def main(argv=None):
    serve(build, __doc__, CHECKPOINT_HELP, argv=argv)


if __name__ == "__main__":
    main()
