"""The CLIP-LoRA-style few-shot table: test accuracy for 1, 2, 4, 8 and 16 shots x 3 seeds, per
method, as mean ± std over the seeds.

Every adapter row is a `task: fewshot_clip` run through `visionpeft.train.run_config`
(CLIP-LoRA's recipe: q/k/v of both towers, r 2, alpha 1 at alpha / sqrt(r), dropout 0.25,
AdamW 2e-4, cosine to 1e-6, batch 32, 100 x cosine logits) with the step count
``--steps-per-shot`` x shots (500 in CLIP-LoRA), at most ``--max-steps`` when given (a CPU
budget; CLIP-LoRA has no cap). ``zero_shot`` is the same task with ``adapter: null`` (one
run: it depends on neither shots nor seed); ``linear_probe`` fits logistic regression on the
frozen image features of the same drawn shots, C chosen on the same validation shots.

    # the embedded CLIP on the four scene types it never saw (writes the data if missing)
    python scripts/fewshot_table.py --output docs/fewshot_table.json
    # a real data set, e.g. EuroSAT with open_clip's ViT-B-16 `openai` weights
    python scripts/fewshot_table.py --data-root DATA --dataset-name EuroSAT \\
        --backbone ViT-B-16 --pretrained openai --steps-per-shot 500 --output eurosat.json
    python scripts/fewshot_table.py --quick --output /tmp/t.json      # a smoke run

The template defaults to "a satellite photo of {}." on the embedded CLIP (the phrasing of
its captions) and to CLIP-LoRA's "a photo of a {}." otherwise. The JSON holds every run
(accuracy, trainable parameters, seconds) and the table, and is rewritten whole after each
run; a second call with the same --output skips the runs it already holds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, when loaded by path
from bench_core import write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_RS = {"alpha": 1, "rank_stabilized": True, "dropout": 0.25}
# name -> adapter spec (None: zero-shot); every weight method on the same q/k/v slices
VARIANTS = {
    "zero_shot": None,
    "linear_probe": "probe",
    "lora": {"method": "lora", "r": 2, **_RS},
    "block_lora_n2": {"method": "block_lora", "r": 2, "n_blocks": 2, **_RS},
    "block_lora_n4": {"method": "block_lora", "r": 2, "n_blocks": 4, **_RS},
    "block_lora_n8": {"method": "block_lora", "r": 2, "n_blocks": 8, **_RS},
    # matched budgets: LoRA r 2 trains 4d parameters on a d x d slice; LoHa r 1 and WaRA r 1
    # (one rank per sub-band of d/2 x d/2) the same; KronA a1 4 x a2 8 trains 32 + (d/4)(d/8)
    # per d x d slice, 7,968 in all on the embedded CLIP (d 128 and 64) against LoRA's 8,448
    # (ViT-B's 768 would want larger factors); WaRA and KronA have no dropout option
    "loha": {"method": "loha", "r": 1, "alpha": 1, "dropout": 0.25},
    "wara": {"method": "wara", "r": 1, "alpha": 1},
    "krona": {"method": "krona", "a1": 4, "a2": 8, "alpha": 1},
    # SNELL r 2 trains LoRA's count (r (in + out) per slice; sparsity 0.9, SNELL's kernel
    # default); the bottleneck Adapter around every residual block of both towers, 5 wide
    # (7,779 on the embedded CLIP against LoRA's 8,448), with the recipe's dropout
    "snell": {"method": "snell", "r": 2, "sparsity": 0.9},
    "adapter": {"method": "adapter", "bottleneck": 5, "dropout": 0.25},
}
DEFAULT_VARIANTS = list(VARIANTS)


def _key(variant: str, shots: int, seed: int) -> str:
    return f"{variant}/{shots}/{seed}"


def _steps(args, shots: int) -> int:
    steps = max(1, args.steps_per_shot * shots)
    return min(steps, args.max_steps) if args.max_steps else steps


def _base_config(args, shots: int, seed: int, out: Path) -> dict:
    backbone = {"source": "open_clip", "name": args.backbone}
    if args.pretrained is not None:
        backbone["pretrained"] = {"true": True, "false": False}.get(args.pretrained, args.pretrained)
    return {"task": "fewshot_clip", "dataset": args.dataset, "dataset_name": args.dataset_name,
            "data_root": str(args.data_root), "shots": shots, "seed": seed, "backbone": backbone,
            "template": args.template, "max_train_steps": _steps(args, shots),
            "train_batch_size": args.batch, "output_dir": str(out), "checkpointing_steps": 10 ** 9,
            "eval_batch_size": 128}


def run_adapter(args, variant: str, shots: int, seed: int) -> dict:
    from visionpeft.train import run_config

    out = Path(args.work_dir) / variant / f"shots{shots}-seed{seed}"
    if out.exists():
        import shutil

        shutil.rmtree(out)  # an interrupted run of this cell: start it again
    cfg = _base_config(args, shots, seed, out)
    cfg["adapter"] = VARIANTS[variant]
    start = time.perf_counter()
    run_config(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"accuracy": metrics["accuracy"], "per_class_accuracy": metrics["per_class_accuracy"],
            "trainable_parameters": metrics["trainable_parameters"],
            "steps": cfg["max_train_steps"] if cfg["adapter"] is not None else 0,  # zero-shot trains nothing
            "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def _features(model, dataset, batch: int = 128):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    xs, ys = [], []
    for images, labels in loader:
        xs.append(model.image_features(images.to(next(model.parameters()).device)).cpu())
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def run_probe(args, shots: int, seed: int) -> dict:
    """The task's own draw and data (zero-shot setup: nothing injected), then logistic
    regression on frozen image features of the shots, C chosen on the validation shots."""
    from visionpeft.data.fewshot import ClassificationImages
    from visionpeft.pipelines.fewshot_clip import FewShotCLIPConfig, FewShotCLIPTask
    from visionpeft.pipelines.fewshot_clip.probe import accuracy, linear_probe

    start = time.perf_counter()
    values = _base_config(args, shots, seed, Path("unused"))
    keep = {f for f in FewShotCLIPConfig.__dataclass_fields__}
    task = FewShotCLIPTask(FewShotCLIPConfig.from_dict({**{k: v for k, v in values.items() if k in keep},
                                                        "adapter": None}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task.setup(device, torch.float32)
    model = task.model.eval()
    plain = task.eval_sets["test"].transform
    tx, ty = _features(model, ClassificationImages(task.splits["train"], task.train_items, plain))
    vx, vy = _features(model, task.eval_sets["val"])
    sx, sy = _features(model, task.eval_sets["test"])
    w, b, c, scores = linear_probe(tx, ty, vx, vy, len(model.classnames))
    return {"accuracy": accuracy(w, b, sx, sy), "C": c, "val_by_C": {str(k): v for k, v in scores.items()},
            "trainable_parameters": w.numel() + b.numel(), "seconds": round(time.perf_counter() - start, 1)}


def table(results: dict, variants: list[str], shots: list[int]) -> str:
    head = "| method | trainable params | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |"
    lines = [head, "|" + "---|" * (len(shots) + 2)]
    for v in variants:
        cells, params = [], None
        for k in shots:
            runs = [r for key, r in results.items() if key.split("/")[0] == v and
                    (v == "zero_shot" or int(key.split("/")[1]) == k)]
            params = runs[0]["trainable_parameters"] if runs else params
            accs = [100 * r["accuracy"] for r in runs]
            if not accs:
                cells.append("")
            elif v == "zero_shot" or len(accs) == 1:
                cells.append(f"{accs[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}")
        lines.append(f"| {v} | {params if params is not None else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=None, help="default: datasets/fewshot_scenes (written if missing)")
    p.add_argument("--dataset", default="coop", choices=["coop", "imagenet", "imagefolder"])
    p.add_argument("--dataset-name", default="SceneTypes")
    p.add_argument("--backbone", default="embedded-clip")
    p.add_argument("--pretrained", default=None, help="an open_clip tag, a weights file, true or false")
    p.add_argument("--template", default=None,
                   help='default: "a satellite photo of {}." on embedded-clip, "a photo of a {}." otherwise')
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--steps-per-shot", type=int, default=500, help="CLIP-LoRA: 500")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on the steps of a run (a CPU budget; CLIP-LoRA has none)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--work-dir", default="output/fewshot-table")
    p.add_argument("--output", default=None, help="JSON of every run (resumed when it exists)")
    p.add_argument("--quick", action="store_true", help="tiny smoke settings")
    args = p.parse_args(argv)
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps {args.max_steps}: give a cap of 1 step or more, or leave it out")
    if args.data_root is None and (args.dataset != "coop" or args.dataset_name != "SceneTypes"):
        p.error(f"--data-root is needed for --dataset {args.dataset} --dataset-name {args.dataset_name}: "
                f"only the generated SceneTypes data is written when it is left out")
    if args.template is None:
        args.template = "a satellite photo of {}." if args.backbone == "embedded-clip" else "a photo of a {}."
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shots, args.seeds, args.steps_per_shot, args.batch = [1, 2], [1], 2, 4
    if args.data_root is None:
        from visionpeft.data.fewshot import write_scene_classification

        # --quick writes its tiny data set into the work dir, never where full runs read theirs
        args.data_root = Path(args.work_dir) / "data" if args.quick else ROOT / "datasets" / "fewshot_scenes"
        if not (args.data_root / args.dataset_name / f"split_zhou_{args.dataset_name}.json").is_file():
            counts = {"train": 4, "val": 2, "test": 4} if args.quick else None
            write_scene_classification(args.data_root, args.dataset_name, counts=counts)
    out = Path(args.output) if args.output else None
    doc = json.loads(out.read_text()) if out and out.is_file() else {}
    results = doc.get("runs", {})
    # what makes runs comparable; shots, seeds and variants may grow between calls
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("output", "shots", "seeds", "variants", "work_dir", "quick", "threads")}
    if Path(args.data_root).resolve().is_relative_to(ROOT):  # a table extended from another checkout
        settings["data_root"] = Path(args.data_root).resolve().relative_to(ROOT).as_posix()
    if doc and doc.get("settings") != settings:
        changed = sorted(k for k in settings if doc.get("settings", {}).get(k) != settings[k])
        raise SystemExit(f"{out} holds runs made with other settings ({', '.join(changed)}); "
                         f"use another --output to start a new table")
    for variant in args.variants:
        for shots in args.shots:
            for seed in args.seeds:
                key = _key(variant, shots, seed)
                if variant == "zero_shot":
                    key = _key(variant, 0, 0)
                if key in results:
                    continue
                print(f"== {key}", file=sys.stderr)
                if variant == "linear_probe":
                    results[key] = run_probe(args, shots, seed)
                else:
                    results[key] = run_adapter(args, variant, max(shots, 1), seed)
                print(f"   accuracy {results[key]['accuracy']:.4f} ({results[key]['seconds']} s)", file=sys.stderr)
                if out:
                    write_table(out, settings, results, table(results, args.variants, args.shots))
    text = table(results, args.variants, args.shots)
    if out:
        write_table(out, settings, results, text)
    print(text)
    return {"runs": results, "table": text}


if __name__ == "__main__":
    main()
