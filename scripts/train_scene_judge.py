"""Fit the scene-type judge shipped as visionpeft/backbones/weights/embedded_scene_judge.safetensors:
multinomial logistic regression on the frozen embedded-vit-s features of real generator
images of all ten scene types, C chosen on a validation draw, accuracy reported on a test
draw that neither saw. The file is written only when the test accuracy reaches
``--min-accuracy`` (0.95: a judge that misreads real images would misjudge generated ones).

    python scripts/train_scene_judge.py                      # the shipped file (about 3 minutes on 2 cores)
    python scripts/train_scene_judge.py --output /tmp/j.safetensors --train 200 --val 100 --test 100

Deterministic: the three draws are `visionpeft.data.scenes.scene_set` with their own seeds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import visionpeft as vp
from visionpeft.backbones.scene_judge import ENCODER, JUDGE_FILE, encoder_features, judge_state, load_encoder
from visionpeft.data.scenes import SCENE_TYPES, scene_set
from visionpeft.pipelines.fewshot_clip.probe import accuracy, linear_probe

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=3000, help="training images (all ten types, drawn uniformly)")
    p.add_argument("--val", type=int, default=1000, help="validation images (choose C)")
    p.add_argument("--test", type=int, default=1000, help="test images (the reported accuracy)")
    p.add_argument("--seeds", type=int, nargs=3, default=[505, 606, 707], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--output", default=str(JUDGE_FILE))
    p.add_argument("--report", default=None, help="a JSON of the settings and results (the shipped run: "
                   "docs/embedded_scene_judge.json)")
    args = p.parse_args(argv)
    for name in ("train", "val", "test"):
        if getattr(args, name) < len(SCENE_TYPES):
            p.error(f"--{name} {getattr(args, name)}: give at least {len(SCENE_TYPES)} images (one per type)")
    start = time.perf_counter()
    torch.manual_seed(0)
    encoder = load_encoder()
    feats = {}
    for split, n, seed in zip(("train", "val", "test"), (args.train, args.val, args.test), args.seeds):
        images, _, labels = scene_set(n, 64, SCENE_TYPES, seed=seed)
        feats[split] = (encoder_features(encoder, images), labels)
        print(f"{split}: {n} images encoded ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    mean = feats["train"][0].mean(0)
    std = feats["train"][0].std(0).clamp_min(1e-6)
    z = {k: ((x - mean) / std, y) for k, (x, y) in feats.items()}
    w, b, c, scores = linear_probe(*z["train"], *z["val"], len(SCENE_TYPES))
    test_acc = accuracy(w, b, *z["test"])
    pred = (z["test"][0].double() @ w.t() + b).argmax(-1)
    per_type = {t: float((pred[z["test"][1] == i] == i).double().mean()) for i, t in enumerate(SCENE_TYPES)}
    result = {"encoder": ENCODER, "classes": list(SCENE_TYPES), "train": args.train, "val": args.val,
              "test": args.test, "seeds": args.seeds, "C": c, "val_by_C": {str(k): v for k, v in scores.items()},
              "val_accuracy": scores[c], "test_accuracy": test_acc, "test_accuracy_by_type": per_type,
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({k: result[k] for k in ("C", "val_accuracy", "test_accuracy", "test_accuracy_by_type")}),
          file=sys.stderr)
    if test_acc < args.min_accuracy:
        raise SystemExit(f"the judge scores {test_acc:.4f} on the test draw, under --min-accuracy "
                         f"{args.min_accuracy}; nothing written")
    meta = {"format": "visionpeft-scene-judge", "classes": json.dumps(list(SCENE_TYPES)), "encoder": ENCODER,
            "C": str(c), "test_accuracy": f"{test_acc:.4f}", "seeds": json.dumps(args.seeds)}
    state = judge_state(w, b, mean, std)
    vp.atomic_write_file(Path(args.output), lambda tmp: save_file(state, tmp, metadata=meta))
    if args.report:
        text = json.dumps({**result, "date": time.strftime("%Y-%m-%d")}, indent=1)
        vp.atomic_write_file(Path(args.report), lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.output} (test accuracy {test_acc:.4f})", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
