"""Adaptation quality: every method adapts the frozen embedded encoder to tasks unlike its
pretraining, at about the same trainable-parameter budget, over several seeds.

Tasks (data from the project's generators, nothing downloaded):
  scenes_cls  classify the 4 scene types held out of pretraining (accuracy)
  scenes_seg  segment the generator's 6 land-cover classes on all 10 types (mIoU)
  scenes_seg_held  the same on the 4 held-out types only (not in the default list)
  change      PeftCD change detection on the synthetic LEVIR set (F1 and IoU)
Variants: linear_probe (frozen encoder, head only) and full fine-tuning as lower and
upper references; LoRA, WaRA, KronA, Block-LoRA, SNELL and the bottleneck Adapter at
~18-20k encoder parameters. Every run goes through the shared training loop.

    python scripts/bench_quality.py --json docs/bench_quality_cpu_<date>.json --plot docs/quality.png
    python scripts/bench_quality.py --smoke     # every task x variant, 2 steps (the test suite)
    python scripts/bench_quality.py --tasks scenes_seg scenes_seg_held --variants linear_probe \
        --weights candidate.safetensors           # probe an encoder file before shipping it
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import visionpeft as vp  # noqa: E402
from visionpeft.backbones import load_backbone  # noqa: E402
from visionpeft.data.scenes import CLASSES, HELD_OUT_SCENES, SCENE_TYPES, scene_set  # noqa: E402
from visionpeft.pipelines.change_detection.metrics import ConfusionMatrix  # noqa: E402
from visionpeft.pipelines.segmentation import seg_metrics_from_confusion  # noqa: E402
from visionpeft.train import PRETRAIN_MEAN as MEAN, PRETRAIN_STD as STD  # noqa: E402
from visionpeft.train import Task, TrainConfig, run_config, train  # noqa: E402
from bench_core import EMBEDDED_FULL, summarise  # noqa: E402

# encoder budgets (ViT 192 wide, depth 6): LoRA r 4 on qkv = 18,432; WaRA haar J 1 has a
# pair per band, 4 x 2 x (288 + 96) x 6 = 18,432; Block-LoRA 5 x (48 + 576) x 6 = 18,720;
# SNELL 4 x (576 + 192) x 6 = 18,432; KronA (balanced factors) on all four Linears of a
# block = 16,812; Adapter 8 wide before each block = 19,632.
VARIANTS = {
    "linear_probe": None,
    "lora": {"method": "lora", "r": 4, "alpha": 8, "target_modules": ["qkv"]},
    "wara": {"method": "wara", "r": 2, "alpha": 4, "target_modules": ["qkv"]},
    "krona": {"method": "krona", "target_modules": ["qkv", "proj", "fc1", "fc2"]},
    "block_lora": {"method": "block_lora", "r": 5, "n_blocks": 4, "alpha": 10, "target_modules": ["qkv"]},
    "snell": {"method": "snell", "r": 4, "sparsity": 0.9, "target_modules": ["qkv"]},
    "adapter": {"method": "adapter", "bottleneck": 8, "position": "input",
                "target_modules": list(vp.presets.TIMM_BLOCKS)},
    "full": {"method": "lora", "target_modules": [], "modules_to_save": EMBEDDED_FULL},
}
LR = {"full": 2e-4}  # everything else 2e-3
TASKS = ("scenes_cls", "scenes_seg", "scenes_seg_held", "change")


@dataclass
class Sizes:
    train: int
    test: int
    steps: int
    batch: int
    cd_pairs: int


FULL_SIZES = Sizes(train=384, test=256, steps=40, batch=8, cd_pairs=64)
SMOKE_SIZES = Sizes(train=8, test=4, steps=2, batch=4, cd_pairs=4)


def encoder(variant: str, pretrained: bool | str) -> nn.Module:
    """The embedded encoder: the packaged weights (True), random init (False) or a file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random reference encoder is the same in every run
        if isinstance(pretrained, str):
            host = load_backbone("timm", "embedded-vit-s", checkpoint_path=pretrained)
        else:
            host = load_backbone("timm", "embedded-vit-s", pretrained=pretrained)
    if VARIANTS[variant] is None:
        return host.requires_grad_(False)
    vp.inject(host, vp.config_from_dict(VARIANTS[variant]))
    return host


def backbone_spec(pretrained: bool | str) -> dict:
    """The embedded encoder as a pipeline config names it (a file goes in checkpoint_path)."""
    spec = {"name": "embedded-vit-s", "source": "timm", "pretrained": bool(pretrained)}
    if isinstance(pretrained, str):
        spec["checkpoint_path"] = pretrained
    return spec


def encoder_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))


class SceneModel(nn.Module):
    """Encoder + head: a linear classifier on the class token, or a 1x1 conv over the
    patch grid upsampled to pixels."""

    def __init__(self, host: nn.Module, classes: int, dense: bool):
        super().__init__()
        self.host, self.dense = host, dense
        self.head = nn.Conv2d(host.embed_dim, classes, 1) if dense else nn.Linear(host.embed_dim, classes)

    def forward(self, img):
        img = (img - MEAN.to(img.device)) / STD.to(img.device)
        if not self.dense:
            return self.head(self.host(img))
        tokens = self.host.forward_features(img)[:, self.host.num_prefix_tokens:]
        h = w = img.shape[-1] // self.host.patch_embed.patch_size[0]
        grid = tokens.transpose(1, 2).reshape(img.shape[0], -1, h, w)
        return F.interpolate(self.head(grid), size=img.shape[-2:], mode="bilinear", align_corners=False)


class SceneTask(Task):
    def __init__(self, model: SceneModel, data: tuple, dense: bool):
        self.model, self.data, self.dense = model, data, dense

    def setup(self, device, dtype):
        pass

    def models(self):
        return {"model": self.model}

    def train_dataset(self):
        return torch.utils.data.TensorDataset(*self.data)

    def loss(self, models, batch):
        img, target = batch
        return F.cross_entropy(models["model"](img), target), {}

    def save_adapters(self, models, folder):  # nothing to keep: the bench evaluates in memory
        folder.mkdir(parents=True, exist_ok=True)

    def load_adapters(self, models, folder):
        raise RuntimeError("the quality benchmark does not resume")


def scene_data(task: str, sizes: Sizes):
    if task == "scenes_cls":
        make = lambda n, seed: scene_set(n, 64, HELD_OUT_SCENES, seed=seed)  # noqa: E731
        train, test = make(sizes.train, 101), make(sizes.test, 202)
        return (train[0], train[2]), (test[0], test[2]), len(HELD_OUT_SCENES)
    if task == "scenes_seg_held":
        train, test = scene_set(sizes.train, 64, HELD_OUT_SCENES, 505), scene_set(sizes.test, 64, HELD_OUT_SCENES, 606)
    else:
        train, test = scene_set(sizes.train, 64, SCENE_TYPES, 303), scene_set(sizes.test, 64, SCENE_TYPES, 404)
    return (train[0], train[1]), (test[0], test[1]), len(CLASSES)


@torch.no_grad()
def scene_metric(model: SceneModel, test, classes: int, dense: bool) -> dict:
    model.eval()
    cm = ConfusionMatrix(classes)
    for i in range(0, len(test[0]), 64):
        pred = model(test[0][i:i + 64]).argmax(1)
        cm.update(pred, test[1][i:i + 64])
    m = cm.matrix.double()
    if not dense:
        return {"accuracy": float(m.diag().sum() / m.sum())}
    return {"miou": seg_metrics_from_confusion(cm.matrix)["miou"]}  # macro, over the classes present


def run_scene(task, variant, seed, sizes, pretrained, data, workdir):
    train_data, test, classes = data
    torch.manual_seed(seed)
    dense = task.startswith("scenes_seg")
    model = SceneModel(encoder(variant, pretrained), classes, dense)
    loop = TrainConfig(output_dir=str(workdir), seed=seed, max_train_steps=sizes.steps,
                       train_batch_size=sizes.batch, learning_rate=LR.get(variant, 2e-3),
                       lr_scheduler="cosine", lr_warmup_steps=max(1, sizes.steps // 10),
                       checkpointing_steps=10 ** 6, cpu=True)
    t0 = time.process_time()
    train(SceneTask(model, train_data, dense), loop)
    seconds = time.process_time() - t0
    return {**scene_metric(model, test, classes, dense), "encoder_params": encoder_params(model.host),
            "s_per_step": seconds / sizes.steps}


def run_change(variant, seed, sizes, pretrained, data_root, workdir):
    from visionpeft.data.change_detection import ChangeDetectionDataset, find_triples
    from visionpeft.pipelines.change_detection import evaluate, load_detector

    adapter = VARIANTS[variant]  # None: decoder only on the frozen encoder
    values = {"task": "change_detection", "data_root": str(data_root), "output_dir": str(workdir),
              "backbone": backbone_spec(pretrained),
              "adapter": adapter, "image_size": 64, "decoder_channels": 64, "exchange": "layer",
              "train_batch_size": max(2, sizes.batch // 2), "max_train_steps": sizes.steps,
              "learning_rate": LR.get(variant, 2e-3), "lr_scheduler": "cosine",
              "lr_warmup_steps": max(1, sizes.steps // 10), "seed": seed,
              "validation_steps": sizes.steps, "checkpointing_steps": 10 ** 6, "cpu": True}
    t0 = time.process_time()
    run_config(values)
    seconds = time.process_time() - t0
    model, cfg = load_detector(workdir)
    metrics = evaluate(model, ChangeDetectionDataset(find_triples(data_root, "test")), 64)
    return {"f1": metrics["f1"], "iou": metrics["iou"], "encoder_params": encoder_params(model.host),
            "s_per_step": seconds / sizes.steps}


def peak_memory_mb(variant: str, pretrained: bool, batch: int) -> float:
    """What autograd saves for backward plus trainable gradients, one classification step."""
    from bench_core import loss_memory

    model = SceneModel(encoder(variant, pretrained), 4, False)
    img = torch.rand(batch, 3, 64, 64)
    label = torch.zeros(batch, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    return round(loss_memory(lambda: F.cross_entropy(model(img), label), params, img.device) / 2 ** 20, 1)


def table(result: dict) -> str:
    head = ("| variant | encoder params | classify held-out (acc) | segment (mIoU) | segment held-out types "
            "(mIoU) | change F1 | change IoU | s / step (seg) | memory MB |")
    lines = [head, "|" + "---|" * 9]
    for v, row in result["variants"].items():
        cell = lambda t, k: (f"{row[t][k]['mean']:.3f} ± {row[t][k]['sd']:.3f}"  # noqa: E731
                             if t in row else "n/a")
        params = row.get("scenes_seg", row.get("scenes_cls", {})).get("encoder_params", {}).get("mean", 0)
        speed = row.get("scenes_seg", {}).get("s_per_step", {}).get("mean", float("nan"))
        lines.append(f"| {v} | {int(params):,} | {cell('scenes_cls', 'accuracy')} | "
                     f"{cell('scenes_seg', 'miou')} | {cell('scenes_seg_held', 'miou')} | "
                     f"{cell('change', 'f1')} | {cell('change', 'iou')} | "
                     f"{speed:.2f} | {row.get('memory_mb', 'n/a')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("scenes_cls", "accuracy", "classify held-out types"), ("scenes_seg", "miou", "segment (mIoU)"),
               ("scenes_seg_held", "miou", "segment held-out types (mIoU)"),
               ("change", "iou", "change detection (IoU)")]
    names = list(result["variants"])
    metrics = [m for m in metrics if any(m[0] in result["variants"][v] for v in names)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.7 * len(metrics), 3.8), squeeze=False)
    axes = axes[0]
    for ax, (task, key, title) in zip(axes, metrics):
        means = [result["variants"][v].get(task, {}).get(key, {}).get("mean", 0) for v in names]
        sds = [result["variants"][v].get(task, {}).get(key, {}).get("sd", 0) for v in names]
        ax.bar(range(len(names)), means, yerr=sds, capsize=3,
               color=["#999" if v in ("linear_probe", "full") else "#4a7ab5" for v in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", nargs="+", default=["scenes_cls", "scenes_seg", "change"], choices=TASKS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--random-encoder", action="store_true", help="random init instead of the embedded weights")
    p.add_argument("--weights", help="an encoder safetensors file instead of the packaged weights")
    p.add_argument("--smoke", action="store_true", help="tiny data, 2 steps, 1 seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SMOKE_SIZES if args.smoke else FULL_SIZES
    seeds = range(1 if args.smoke else args.seeds)
    if args.weights and args.random_encoder:
        p.error("--weights and --random-encoder exclude each other")
    pretrained = args.weights or not args.random_encoder
    label = f" ({args.weights})" if args.weights else "" if pretrained else " (random)"
    result = {"date": str(date.today()), "machine": platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "encoder": "embedded-vit-s" + label,
              "sizes": vars(sizes), "seeds": len(seeds), "variants": {}}
    work = Path(tempfile.mkdtemp(prefix="vp-quality-"))
    try:
        data = {t: scene_data(t, sizes) for t in args.tasks if t != "change"}
        if "change" in args.tasks:
            from visionpeft.data.change_detection import write_synthetic_levir

            cd_root = write_synthetic_levir(work / "cd", n_train=sizes.cd_pairs, n_val=4,
                                            n_test=max(4, sizes.cd_pairs // 3), size=64, seed=7)
        for v in args.variants:
            row = result["variants"].setdefault(v, {})
            for t in args.tasks:
                runs = []
                for seed in seeds:
                    folder = work / f"{t}-{v}-{seed}"
                    runs.append(run_change(v, seed, sizes, pretrained, cd_root, folder) if t == "change"
                                else run_scene(t, v, seed, sizes, pretrained, data[t], folder))
                    shutil.rmtree(folder, ignore_errors=True)
                row[t] = summarise(runs)
                row[t]["runs"] = runs
                print(f"{v:>12} {t:>10}: " + ", ".join(f"{k} {s['mean']:.3f}±{s['sd']:.3f}"
                                                       for k, s in row[t].items() if k != "runs"), flush=True)
            row["memory_mb"] = peak_memory_mb(v, pretrained, sizes.batch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["table"] = table(result)
    print(result["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, Path(args.plot))
    return result


if __name__ == "__main__":
    main()
