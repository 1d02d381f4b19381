"""The composition table on the embedded text-to-image model: two DreamBooth adapters, each
a scene type the model never saw, asked for in one image.

Two LoRA r 4 DreamBooth runs (`dreambooth_table.train_adapter`: 5 instance images, prior
preservation, the same settings as the DreamBooth table) learn scene A as "a satellite
image of sks" and scene B as "a satellite image of zwx". Then, for the prompt "a satellite
image of sks and zwx", ``--n`` images each (image i from a generator seeded eval-seed + i,
so every method starts from the same noise):

- ``base``: no adapter;
- ``only A`` / ``only B``: one adapter at a time (diffusers' ``set_adapters([name])``);
- ``sum 0.5`` / ``sum 1``: diffusers' weighted-sum composition, both LoRAs loaded from the
  diffusers files the runs export (``pipe.load_lora_weights``) and on at once with
  ``set_adapters([A, B], [w, w])``;
- ``clora``: `visionpeft.pipelines.clora.compose`, concept A the word "sks" with its
  adapter, concept B "zwx" with its (the update phase over the first half of the steps,
  refinement rounds at 0, 1/5 and 2/5 of them);
- ``real``: a control with no model: the left half a real generator image of A, the
  right half one of B, so the metric's ceiling is in the table.

The scene judge (`visionpeft.backbones.scene_judge`, a probe no adapter trained against)
classifies each image whole and its four 32 px quadrants (resized to its 64 px). A concept
is *found* in an image when the whole image or a quadrant is judged its type; ``both`` is
the share of images where A and B are both found. For CLoRA, whose masks say where each
concept was drawn, ``in mask`` also asks that a quadrant its mask covers (at least half of
it; else the one it covers most) is judged its type. The judge's accuracy on real
quadrants, measured here too, says how far a quadrant verdict can be trusted.

    python scripts/compose_table.py --output docs/compose_table.json --picture docs/compose_table.png   # ~15 min
    python scripts/compose_table.py --quick --output /tmp/compose.json     # a smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import visionpeft as vp
from visionpeft.backbones import embedded_sd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # dreambooth_table, when loaded by path
from dreambooth_table import STEPS, image_grid, load_pipe, sampling, train_adapter  # noqa: E402

WORDS = ("sks", "zwx")
PROMPT = "a satellite image of sks and zwx"


def quadrants(images: torch.Tensor) -> torch.Tensor:
    """(n, 4, 3, H/2, W/2): each image's four quadrants (top-left, top-right, bottom-left,
    bottom-right); the judge resizes them to its 64 px."""
    h, w = images.shape[-2:]
    return torch.stack([images[:, :, :h // 2, :w // 2], images[:, :, :h // 2, w // 2:],
                        images[:, :, h // 2:, :w // 2], images[:, :, h // 2:, w // 2:]], 1)


def verdicts(judge, images: torch.Tensor) -> tuple[list[str], list[list[str]]]:
    """The judge's type of each image and of each of its quadrants."""
    whole = [judge.classes[i] for i in judge.classify(images)]
    q = quadrants(images)
    flat = [judge.classes[i] for i in judge.classify(q.flatten(0, 1))]
    return whole, [flat[4 * i:4 * i + 4] for i in range(len(images))]


def mask_quadrants(mask: torch.Tensor) -> list[int]:
    """The quadrants a 0/1 mask covers at least half of, else the one it covers most."""
    h, w = mask.shape
    cover = torch.stack([mask[:h // 2, :w // 2].float().mean(), mask[:h // 2, w // 2:].float().mean(),
                         mask[h // 2:, :w // 2].float().mean(), mask[h // 2:, w // 2:].float().mean()])
    chosen = [i for i in range(4) if cover[i] >= 0.5]
    return chosen or [int(cover.argmax())]


def score(judge, images: torch.Tensor, scenes: tuple[str, str], masks: list | None = None) -> dict:
    whole, quads = verdicts(judge, images)
    found = [[s == w or s in q for w, q in zip(whole, quads)] for s in scenes]
    row = {"found_a": sum(found[0]) / len(images), "found_b": sum(found[1]) / len(images),
           "both": sum(a and b for a, b in zip(*found)) / len(images),
           "whole": {t: whole.count(t) for t in sorted(set(whole))}}
    if masks is not None:
        inside = [[any(quads[i][k] == s for k in mask_quadrants(masks[i][c])) for i in range(len(images))]
                  for c, s in enumerate(scenes)]
        row.update(in_mask_a=sum(inside[0]) / len(images), in_mask_b=sum(inside[1]) / len(images),
                   both_in_mask=sum(a and b for a, b in zip(*inside)) / len(images))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@torch.no_grad()
def diffusers_images(pipe, n: int, seed: int, sample: dict) -> torch.Tensor:
    return pipe([PROMPT] * n, **sample, generator=generators(seed, n), output_type="pt").images


def clora_images(folders, n: int, seed: int, sample: dict) -> tuple[torch.Tensor, list]:
    from visionpeft.pipelines.clora import compose, load_pipeline_adapter

    pipe = load_pipe()
    for word, folder in zip(WORDS, folders):
        load_pipeline_adapter(pipe, folder / "adapter", word)
    concepts = [{"adapter": w, "prompt": PROMPT, "words": [w]} for w in WORDS]
    images, masks = [], []
    for g in generators(seed, n):
        r = compose(pipe, PROMPT, concepts, **sample, update_until=STEPS // 2,
                    refine_at=(0, STEPS // 5, 2 * STEPS // 5), generator=g, output_type="pt")
        images.append(r.images[0] if r.images.dim() == 4 else r.images)
        masks.append(r.masks[1:])
    return torch.stack(images).clamp(0, 1), masks


def real_scenes(rng, scene: str, n: int) -> torch.Tensor:
    """(n, 3, 64, 64) in [0, 1]: ``n`` generator images of ``scene``, drawn in order from ``rng``."""
    from visionpeft.data.scenes import make_scene

    return torch.stack([torch.from_numpy(make_scene(rng, 64, scene)[0]).permute(2, 0, 1) for _ in range(n)])


def real_pairs(scenes, n: int, seed: int) -> torch.Tensor:
    """Left half scene A, right half scene B: real generator images, the metric's ceiling."""
    import numpy as np

    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        a, b = (real_scenes(rng, s, 1)[0] for s in scenes)
        out.append(torch.cat([a[:, :, :32], b[:, :, 32:]], 2))
    return torch.stack(out)


class LandCoverJudge:
    """A second judge, from land cover instead of appearance: a segmentation checkpoint
    (`task: segmentation` on the scenes' six land-cover classes) maps an image to its share
    of each class, and the verdict is the scene type whose mean shares over real generator
    images are nearest (L1). It has the scene judge's interface (``classes``, ``classify``),
    so every count above applies to it unchanged."""

    def __init__(self, segment, centroids: torch.Tensor, classes: tuple[str, ...]):
        self.segment, self.centroids, self.classes = segment, centroids, list(classes)

    def shares(self, images: torch.Tensor) -> torch.Tensor:
        labels = self.segment(images)  # (n, H, W) class indices
        k = self.centroids.shape[1]
        return torch.stack([torch.bincount(m.flatten(), minlength=k)[:k].float() / m.numel() for m in labels])

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self.shares(images), self.centroids, p=1).argmin(1)

    @classmethod
    def fit(cls, segment, num_classes: int, n: int, seed: int) -> "LandCoverJudge":
        """Centroids from ``n`` real scenes of each of the ten types, whole and quartered
        (the table asks about both)."""
        from visionpeft.data.scenes import SCENE_TYPES

        import numpy as np

        rng = np.random.default_rng(seed)
        judge = cls(segment, torch.zeros(len(SCENE_TYPES), num_classes), SCENE_TYPES)
        rows = []
        for s in SCENE_TYPES:
            x = real_scenes(rng, s, n)
            rows.append(torch.cat([judge.shares(x), judge.shares(quadrants(x).flatten(0, 1))]).mean(0))
        judge.centroids = torch.stack(rows)
        return judge


def segmenter(checkpoint: str):
    """(segment, number of classes) of a segmentation checkpoint: class indices of images in
    [0, 1], each resized to the checkpoint's window first (quadrants are 32 px)."""
    import torch.nn.functional as F

    from visionpeft.pipelines.segmentation import load_segmenter, predict_probs

    model, cfg = load_segmenter(checkpoint)
    size = cfg["image_size"]

    @torch.no_grad()
    def segment(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return torch.cat([predict_probs(model, x[i:i + 64], size).argmax(1) for i in range(0, len(x), 64)])

    return segment, cfg["num_classes"]


def judge_on_real(judge, n: int, seed: int, quartered: bool = False) -> float:
    """The judge's accuracy on ``n`` real images of each of the ten types, whole or (with
    ``quartered``) on each of their four quadrants."""
    from visionpeft.data.scenes import SCENE_TYPES

    import numpy as np

    rng = np.random.default_rng(seed)
    right = total = 0
    for s in SCENE_TYPES:
        x = real_scenes(rng, s, n)
        types = judge.classify(quadrants(x).flatten(0, 1) if quartered else x)
        right += int((types == judge.classes.index(s)).sum())
        total += types.numel()
    return round(right / total, 4)


def judge_on_quadrants(judge, n: int, seed: int) -> float:
    """The judge's accuracy on quadrants of real images of all ten types."""
    return judge_on_real(judge, n, seed, quartered=True)


def main(argv=None):
    from visionpeft.data.scenes import HELD_OUT_SCENES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", nargs=2, default=["lake", "industrial"], metavar=("A", "B"),
                   help=f"two held-out types, {HELD_OUT_SCENES}")
    p.add_argument("--seed", type=int, default=0, help="the DreamBooth runs' seed")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--n", type=int, default=32, help="images per method")
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guidance", type=float, default=embedded_sd.SAMPLING["guidance_scale"],
                   help="classifier-free guidance of every generated image (default: the model's evaluated one)")
    p.add_argument("--guidance-rescale", type=float, default=embedded_sd.SAMPLING["guidance_rescale"],
                   help="diffusers' guidance_rescale, in [0, 1]")
    p.add_argument("--quick", action="store_true", help="2 steps, 2 images: a smoke run")
    p.add_argument("--work", default=None, help="instance/class images and runs (default: a temporary folder)")
    p.add_argument("--picture", default=None, help="a PNG: a row of images per method")
    p.add_argument("--segmenter", default=None,
                   help="a segmentation checkpoint on the scenes' land covers (e.g. output/seg-synthetic-earth): "
                        "every row is also scored by the land-cover judge it makes")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    scenes = tuple(args.scenes)
    if not set(scenes) <= set(HELD_OUT_SCENES) or scenes[0] == scenes[1]:
        p.error(f"--scenes must be two different held-out types {HELD_OUT_SCENES}, got {list(scenes)}")
    if not 0 <= args.guidance_rescale <= 1:
        p.error(f"--guidance-rescale must be within [0, 1], got {args.guidance_rescale}")
    if args.quick:
        args.steps, args.n, args.class_images, args.instances = 2, 2, 2, 2
    torch.set_num_threads(args.threads)
    from visionpeft.backbones.scene_judge import load_scene_judge

    judge = load_scene_judge()
    state = {"settings": {k: v for k, v in vars(args).items() if k not in ("output", "work", "picture", "threads")},
             "prompt": PROMPT, "judge_on_real_quadrants": judge_on_quadrants(judge, 8 if args.quick else 50, 99)}
    land = None
    if args.segmenter:  # loaded and fitted before any training, so a bad checkpoint fails first
        from visionpeft.data.scenes import CLASSES

        try:
            segment, k = segmenter(args.segmenter)
        except (OSError, ValueError, KeyError) as err:
            p.error(f"--segmenter {args.segmenter}: {str(err).splitlines()[0]} (give a `task: segmentation` "
                    f"checkpoint folder, e.g. output/seg-synthetic-earth)")
        if k != len(CLASSES):
            p.error(f"--segmenter {args.segmenter} has {k} classes; the scenes' land covers are {len(CLASSES)} "
                    f"({', '.join(CLASSES)})")
        land = LandCoverJudge.fit(segment, k, 4 if args.quick else 50, 98)
        state["land_cover_judge_on_real"] = judge_on_real(land, 8 if args.quick else 50, 99)
        state["land_cover_judge_on_real_quadrants"] = judge_on_quadrants(land, 8 if args.quick else 50, 99)
    images = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        start = time.time()
        folders = [train_adapter("lora", s, args.seed, args, work, f"a satellite image of {w}",
                                 export=("diffusers",))[0] for s, w in zip(scenes, WORDS)]
        state["train_s"] = round(time.time() - start, 1)
        pipe = load_pipe()
        images["base"] = diffusers_images(pipe, args.n, args.eval_seed, sampling(args))
        for w, folder in zip(WORDS, folders):
            pipe.load_lora_weights(str(folder / "export" / "diffusers"), weight_name="pytorch_lora_weights.safetensors",
                                   adapter_name=w)
        for w, name in zip(WORDS, ("only A", "only B")):
            pipe.set_adapters([w])
            images[name] = diffusers_images(pipe, args.n, args.eval_seed, sampling(args))
        for weight in (0.5, 1.0):
            pipe.set_adapters(list(WORDS), [weight, weight])
            images[f"sum {weight:g}"] = diffusers_images(pipe, args.n, args.eval_seed, sampling(args))
        start = time.time()
        images["clora"], masks = clora_images(folders, args.n, args.eval_seed, sampling(args))
        state["clora_s_per_image"] = round((time.time() - start) / args.n, 2)
    images["real"] = real_pairs(scenes, args.n, args.eval_seed)
    state["rows"] = {name: score(judge, x, scenes, masks if name == "clora" else None) for name, x in images.items()}
    if land is not None:
        state["land_cover_rows"] = {name: score(land, x, scenes, masks if name == "clora" else None)
                                    for name, x in images.items()}
    state["date"] = str(date.today())
    body = json.dumps(state, indent=1)
    vp.atomic_write_file(Path(args.output), lambda t: Path(t).write_text(body))
    if args.picture:
        image_grid({name: list(v) for name, v in images.items()}, Path(args.picture), k=min(6, args.n))
    print(markdown(state, scenes))
    if land is not None:
        print(markdown(state, scenes, "land_cover_rows"))
    return state


def markdown(state: dict, scenes, rows: str = "rows") -> str:
    """The table as docs/QUALITY.md shows it (``rows``: the scene judge's, or the land-cover
    judge's ``land_cover_rows``)."""
    a, b = scenes
    lines = [f"| images of \"{PROMPT}\" | {a} found | {b} found | both found | both in their CLoRA masks |",
             "|---|---|---|---|---|"]
    for name, row in state[rows].items():
        mask = f"{row['both_in_mask']:.2f}" if "both_in_mask" in row else "-"
        lines.append(f"| {name} | {row['found_a']:.2f} | {row['found_b']:.2f} | {row['both']:.2f} | {mask} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
