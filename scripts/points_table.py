"""The point-cloud adaptation table: test accuracy of Point-PEFT, full fine-tuning, LoRA, the
bottleneck Adapter and a probe on one data set, 3 seeds, as mean ± std over the seeds.

Every row is a `task: point_classification` run through `visionpeft.train.run_config` with
Point-MAE's fine-tuning recipe (AdamW 5e-4, weight decay 0.05 off 1-D tensors and tokens,
cosine with warm-up, batch 32, clipping 10); only the epochs are capped (``--epochs``: a CPU
budget; Point-MAE and Point-PEFT train 300). The rows:

- ``point_peft``: Point-PEFT with its defaults (prompts in the first half of the blocks,
  memory bank of the training clouds, geometry-aware adapters, bias offsets, the head);
- ``full_ft``: ``adapter: null``, every parameter trains (Point-MAE's fine-tuning);
- ``lora``: LoRA r 8 on every qkv, the head trained;
- ``adapter``: the bottleneck Adapter (64 wide) after every block, the head trained;
- ``head_only``: the frozen encoder and Point-MAE's 3-layer classification head trained
  (its MLP-3 probe, not a linear classifier: LoRA on no layer, ``modules_to_save: [head]``);
- ``linear_probe``: multinomial logistic regression on the frozen encoder's pooled features
  (the head's input: the cls token and the max over the patch tokens, standardised), C chosen
  on the last quarter of the training clouds and refitted on all of them; no augmentation;
- ``head_only_random`` and ``scratch``: the probe and full fine-tuning on a randomly
  initialised encoder of the same size (``pretrained: false``): what the pretraining buys.

    # the embedded Point-MAE on the four shapes it never saw (lamp, mug, shelf, dumbbell)
    python scripts/points_table.py --output docs/points_table.json \\
        --variants point_peft full_ft lora adapter head_only head_only_random scratch
    # ScanObjectNN PB_T50_RS with Point-MAE's pretrain.pth, the full 300 epochs
    python scripts/points_table.py --dataset scanobjectnn --data-root DATA/h5_files \\
        --backbone point-mae --checkpoint pretrain.pth --epochs 300 --output scanobjectnn.json
    python scripts/points_table.py --quick --output /tmp/t.json       # a smoke run

The JSON holds every run (accuracy, mean-class accuracy, trainable parameters, seconds) and
the table, and is rewritten whole after each run; a second call with the same --output skips
the runs it already holds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, when loaded by path
from bench_core import write_table  # noqa: E402

# name -> the task's adapter value (None: full fine-tuning)
VARIANTS = {
    "point_peft": {"method": "point_peft"},
    "full_ft": None,
    "lora": {"method": "lora", "r": 8},
    "adapter": {"method": "adapter", "bottleneck": 64},
    "head_only": {"method": "lora", "target_modules": [], "modules_to_save": ["head"]},
    "linear_probe": None,  # no training run: logistic regression on frozen features (run_linear_probe)
    "head_only_random": {"method": "lora", "target_modules": [], "modules_to_save": ["head"]},
    "scratch": None,
}
RANDOM_ENCODER = {"head_only_random", "scratch"}  # pretrained: false
DEFAULT_VARIANTS = ["point_peft", "full_ft", "lora", "adapter", "head_only", "linear_probe"]


def _config(args, variant: str, seed: int, out: Path) -> dict:
    backbone = {"name": args.backbone}
    if variant in RANDOM_ENCODER:
        backbone["pretrained"] = False
    elif args.checkpoint:
        backbone["checkpoint_path"] = str(args.checkpoint)
    cfg = {"task": "point_classification", "dataset": args.dataset, "seed": seed, "backbone": backbone,
           "adapter": VARIANTS[variant], "epochs": args.epochs, "train_batch_size": args.batch,
           "output_dir": str(out), "checkpointing_steps": 10 ** 9}
    if args.dataset == "synthetic":
        cfg["per_class"], cfg["test_per_class"] = args.per_class, args.test_per_class
    else:
        cfg["data_root"] = str(args.data_root)
        if args.dataset == "scanobjectnn":
            cfg["variant"] = args.variant
    return cfg


def run(args, variant: str, seed: int) -> dict:
    from visionpeft.train import run_config

    out = Path(args.work_dir) / variant / f"seed{seed}"
    if out.exists():
        shutil.rmtree(out)  # an interrupted run of this cell: start it again
    start = time.perf_counter()
    run_config(_config(args, variant, seed, out))
    m = json.loads((out / "metrics.json").read_text())
    return {"accuracy": m["accuracy"], "mean_class_accuracy": m["mean_class_accuracy"],
            "per_class_accuracy": m["per_class_accuracy"], "test_clouds": m["clouds"],
            "trainable_parameters": m["trainable_parameters"], "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def _pooled_features(model, dataset, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for points, labels in torch.utils.data.DataLoader(dataset, batch_size=batch):
        xs.append(model.pooled(model.forward_features(points)))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def run_linear_probe(args, seed: int) -> dict:
    """The task's own data and frozen host (nothing injected, eval mode), then logistic
    regression on the pooled features; C from the last quarter of the training clouds."""
    from visionpeft.data.points import PointClouds
    from visionpeft.pipelines.fewshot_clip.probe import accuracy, fit_logistic, linear_probe
    from visionpeft.pipelines.pointcloud import PointClassificationConfig, PointClassificationTask

    start = time.perf_counter()
    values = {k: v for k, v in _config(args, "linear_probe", seed, Path("unused")).items()
              if k in PointClassificationConfig.__dataclass_fields__}
    task = PointClassificationTask(PointClassificationConfig.from_dict(values))
    task.setup(torch.device("cpu"), torch.float32)
    model = task.model.eval()
    c = task.cfg
    train = PointClouds(task.split("train"), c.num_points, c.dataset, train=False)  # no augmentation
    tx, ty = _pooled_features(model, train)
    sx, sy = _pooled_features(model, task.test_set)
    mean, std = tx.mean(0), tx.std(0).clamp_min(1e-6)
    tx, sx = (tx - mean) / std, (sx - mean) / std
    cut = len(tx) - len(tx) // 4
    k = len(task.classes)
    _, _, chosen, scores = linear_probe(tx[:cut], ty[:cut], tx[cut:], ty[cut:], k)
    w, b = fit_logistic(tx, ty, k, chosen)
    pred = (sx.double() @ w.t() + b).argmax(-1)
    per_class = {name: float((pred[sy == i] == i).double().mean()) for i, name in enumerate(task.classes)}
    return {"accuracy": accuracy(w, b, sx, sy), "mean_class_accuracy": sum(per_class.values()) / k,
            "per_class_accuracy": per_class, "test_clouds": len(sy), "C": chosen,
            "val_by_C": {str(key): v for key, v in scores.items()}, "trainable_parameters": w.numel() + b.numel(),
            "seconds": round(time.perf_counter() - start, 1)}


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict) -> str:
    """Every variant the runs hold, in `VARIANTS` order (a call for a few variants keeps the others' rows)."""
    lines = ["| method | trainable params | accuracy (%) | mean-class accuracy (%) | seeds | s per run |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        runs = [r for key, r in results.items() if key.split("/")[0] == v]
        if not runs:
            continue
        acc = [100 * r["accuracy"] for r in runs]
        mca = [100 * r["mean_class_accuracy"] for r in runs]
        secs = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {v} | {runs[0]['trainable_parameters']:,} | {_cell(acc)} | {_cell(mca)} | {len(runs)} | "
                     f"{secs:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "scanobjectnn", "modelnet40"])
    p.add_argument("--data-root", default=None, help="the data set's folder (not for synthetic)")
    p.add_argument("--variant", default="PB_T50_RS", help="scanobjectnn: PB_T50_RS, OBJ_BG or OBJ_ONLY")
    p.add_argument("--backbone", default="embedded-point-mae", choices=["embedded-point-mae", "point-mae"])
    p.add_argument("--checkpoint", default=None, help="point-mae: Point-MAE's pretrain.pth")
    p.add_argument("--per-class", type=int, default=40,
                   help="synthetic: training clouds per shape")
    p.add_argument("--test-per-class", type=int, default=50, help="synthetic: test clouds per shape")
    p.add_argument("--epochs", type=int, default=20, help="Point-MAE / Point-PEFT: 300 (20: a CPU budget here)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--work-dir", default="output/points-table")
    p.add_argument("--output", default=None, help="JSON of every run (resumed when it exists)")
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (flags given beside it still apply)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:
        p.set_defaults(seeds=[1], epochs=1, batch=4, per_class=4, test_per_class=2)
    args = p.parse_args(argv)
    if args.dataset != "synthetic" and not args.data_root:
        p.error(f"--dataset {args.dataset} needs --data-root (the folder holding its files)")
    if args.backbone == "point-mae" and not args.checkpoint:
        p.error("--backbone point-mae needs --checkpoint (Point-MAE's pretrain.pth)")
    if args.backbone == "embedded-point-mae" and args.checkpoint:
        p.error("--checkpoint is for --backbone point-mae (Point-MAE's 384-wide pretrain.pth); the embedded "
                "Point-MAE loads its packaged weights")
    for name in ("epochs", "batch", "per_class", "test_per_class"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: give 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output) if args.output else None
    doc = json.loads(out.read_text()) if out and out.is_file() else {}
    results = doc.get("runs", {})
    # what makes runs comparable; seeds and variants may grow between calls
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("output", "seeds", "variants", "work_dir", "quick", "threads")}
    if args.dataset != "scanobjectnn":
        del settings["variant"]  # ScanObjectNN's alone
    if args.dataset != "synthetic":
        del settings["per_class"], settings["test_per_class"]
    if doc and doc.get("settings") != settings:
        changed = sorted(k for k in settings if doc.get("settings", {}).get(k) != settings[k])
        raise SystemExit(f"{out} holds runs made with other settings ({', '.join(changed)}); "
                         f"use another --output to start a new table")
    for variant in args.variants:
        for seed in args.seeds:
            key = f"{variant}/{seed}"
            if key in results:
                continue
            print(f"== {key}", file=sys.stderr)
            results[key] = run_linear_probe(args, seed) if variant == "linear_probe" else run(args, variant, seed)
            print(f"   accuracy {results[key]['accuracy']:.4f} ({results[key]['seconds']} s)", file=sys.stderr)
            if out:
                write_table(out, settings, results, table(results))
    text = table(results)
    if out:
        write_table(out, settings, results, text)
    print(text)
    return {"runs": results, "table": text}


if __name__ == "__main__":
    main()
