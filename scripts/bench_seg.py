"""Segmentation under a domain shift: Earth-Adapter against LoRA, the bottleneck Adapter, a
frozen encoder (decoder only) and full fine-tuning.

quality  the synthetic domain-generalisation benchmark (`write_synthetic_segmentation`):
         train on the six pretraining scene types (source), pick the best validation step
         on the SOURCE's val split, report macro mIoU on the source's test split and on
         the target's (four scene types the encoder never saw, shifted sensor). Embedded
         encoder, UPerNet decoder, every adapter at about the same encoder budget, seeds.
cost     one training step at DINOv2-L width (1024 wide, 16 heads, patch 14, 448 px =
         the official 32 x 32 grid; random init, reduced depth so a CPU can run it): step
         time (paired shuffled rounds) and what autograd keeps for backward.

    python scripts/bench_seg.py --json docs/bench_seg_cpu_<date>.json
    python scripts/bench_seg.py --parts cost --depth 4 --rounds 5
    python scripts/bench_seg.py --smoke          # every variant, 2 steps (the test suite)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core beside this file

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import visionpeft as vp  # noqa: E402
from bench_core import EMBEDDED_FULL, emit, loss_memory, paired, summarise  # noqa: E402
from visionpeft.data.segmentation import SegmentationDataset, find_split, write_synthetic_segmentation  # noqa: E402
from visionpeft.pipelines.segmentation import evaluate, load_segmenter  # noqa: E402
from visionpeft.train import run_config  # noqa: E402

# encoder budgets at width 192, depth 6 (about 40k each): Earth-Adapter d 8 with the split
# in blocks 0-2 = 3 x 3,272 + 3 x (3 x 3,272 + 579) + 6 = 41,007; without the split, d 16 =
# 6 x 6,352 + 6 = 38,118; LoRA r 9 on qkv = 6 x 9 x (192 + 576) = 41,472; the bottleneck
# Adapter 16 wide before each block = 6 x 6,352 = 38,112. Weight methods take the qkv
# preset and block methods the block preset (no target_modules: what the task does).
VARIANTS = {
    "frozen": None,
    "earth_adapter": {"method": "earth_adapter", "bottleneck": 8, "cutoff_ratio": 0.3, "frequency_blocks": [0, 1, 2]},
    "earth_no_split": {"method": "earth_adapter", "bottleneck": 16, "frequency_blocks": []},
    "lora": {"method": "lora", "r": 9, "alpha": 18},
    "adapter": {"method": "adapter", "bottleneck": 16, "position": "input"},
    "full": {"method": "lora", "target_modules": [], "modules_to_save": EMBEDDED_FULL},
}
# everything else 1e-3 (the config's); the loop has one learning rate, so full fine-tuning's
# fresh decoder trains at 1e-4 too (said beside its figures)
LR = {"full": 1e-4}

# cost at DINOv2-L width: the official settings where there is one (Earth-Adapter on
# Vaihingen -> Potsdam: d 64, ratio 0.3, the split in every block of this reduced depth)
COST_VARIANTS = {
    "frozen": None,
    "earth_adapter": lambda depth: vp.EarthAdapterConfig(bottleneck=64, cutoff_ratio=0.3,
                                                         frequency_blocks=list(range(depth)),
                                                         target_modules=vp.presets.TIMM_BLOCKS),
    "lora": lambda depth: vp.LoRAConfig(r=16, alpha=32, target_modules=["qkv"]),
    "adapter": lambda depth: vp.AdapterConfig(bottleneck=64, position="input", target_modules=vp.presets.TIMM_BLOCKS),
    "full": "full",
}


def run_config_for(variant: str, data_root: str, steps: int, batch: int, seed: int, out: Path,
                   validation_steps: int) -> dict:
    cfg = {"task": "segmentation", "dataset": "synthetic", "data_root": data_root, "source_domain": "source",
           "target_domain": "target", "num_classes": 6, "image_size": 64,
           "backbone": {"name": "embedded-vit-s", "source": "timm", "pretrained": True},
           "decoder": {"name": "upernet", "channels": 64}, "select_on": "source",
           "train_batch_size": batch, "max_train_steps": steps, "learning_rate": LR.get(variant, 1e-3),
           "adam_weight_decay": 0.05, "lr_scheduler": "polynomial", "lr_power": 0.9, "seed": seed,
           "mixed_precision": "no", "validation_steps": validation_steps, "checkpointing_steps": 10 ** 6,
           "eval_batch_size": 32, "output_dir": str(out), "cpu": True}
    if VARIANTS[variant] is not None:
        cfg["adapter"] = dict(VARIANTS[variant])
    return cfg


def encoder_params(variant: str) -> int:
    """Trainable encoder parameters of a variant, injected the way the task does it."""
    from visionpeft.backbones import load_backbone
    from visionpeft.pipelines.segmentation import inject_adapter

    host = load_backbone("timm", "embedded-vit-s", pretrained=False)
    if VARIANTS[variant] is None:
        return 0
    inject_adapter(host, dict(VARIANTS[variant]), "default")
    return sum(p.numel() for p in host.parameters() if p.requires_grad)


def run_quality(variant: str, seed: int, data_root: str, steps: int, batch: int, work: Path,
                validation_steps: int) -> dict:
    out = work / f"{variant}-{seed}"
    t0 = time.process_time()
    run_config(run_config_for(variant, data_root, steps, batch, seed, out, validation_steps))
    row = {"cpu_minutes": (time.process_time() - t0) / 60}  # training and its validations
    model, _ = load_segmenter(out / "best")  # the step chosen on the source's val split
    model.eval()
    for domain in ("source", "target"):
        split = find_split("synthetic", data_root, "test", domain=domain)
        m = evaluate(model, SegmentationDataset(split), 64, 6, split.ignore_index, batch_size=32)
        row[f"{domain}_miou"] = m["miou"]
    rows = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    row["best_step"] = max(rows, key=lambda r: r["source_miou"])["step"]
    shutil.rmtree(out, ignore_errors=True)
    return row


def quality(args, work: Path) -> dict:
    data_root = str(work / "data")
    counts = write_synthetic_segmentation(data_root, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                          size=64, seed=0)["counts"]
    out = {"steps": args.steps, "batch": args.batch, "seeds": args.seeds, "counts": counts,
           "validation_steps": args.validation_steps, "variants": {}}
    for v in args.variants:
        runs = [run_quality(v, seed, data_root, args.steps, args.batch, work, args.validation_steps)
                for seed in range(args.seeds)]
        out["variants"][v] = {**summarise(runs), "encoder_params": encoder_params(v), "runs": runs}
        s = out["variants"][v]
        print(f"{v:>15}: source {s['source_miou']['mean']:.3f}±{s['source_miou']['sd']:.3f}  "
              f"target {s['target_miou']['mean']:.3f}±{s['target_miou']['sd']:.3f}  "
              f"params {s['encoder_params']:,}", flush=True)
    return out


def quality_table(q: dict) -> str:
    lines = ["| variant | encoder params | source test mIoU | target test mIoU | gap | CPU min / run |",
             "|---|---|---|---|---|---|"]
    for v, s in q["variants"].items():
        cell = lambda k: f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}"  # noqa: E731
        gap = s["source_miou"]["mean"] - s["target_miou"]["mean"]
        lines.append(f"| {v} | {s['encoder_params']:,} | {cell('source_miou')} | "
                     f"{cell('target_miou')} | {gap:.3f} | {s['cpu_minutes']['mean']:.1f} |")
    return "\n".join(lines)


def cost_model(variant: str, depth: int, size: int, toy: bool):
    import timm

    from visionpeft.pipelines.segmentation import Segmenter

    kw = dict(embed_dim=64, num_heads=2) if toy else {}
    host = timm.create_model("vit_large_patch14_dinov2", pretrained=False, img_size=size, depth=depth,
                             num_classes=0, **kw)
    spec = COST_VARIANTS[variant]
    if spec is None:
        host.requires_grad_(False)
    elif spec == "full":  # what modules_to_save trains in the quality part: blocks, patch embedding, norm
        host.requires_grad_(False)
        for name in ("blocks", "patch_embed", "norm"):
            getattr(host, name).requires_grad_(True)
    else:
        vp.inject(host, spec(depth))
    model = Segmenter(host, 6, {"name": "upernet", "channels": 64}, size)
    for name, p in model.net.named_parameters():
        if not name.startswith("encoder."):
            p.requires_grad_(True)
    return model.train()


def cost(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    s = args.cost_size
    x = torch.rand(args.cost_batch, 3, s, s, generator=g).to(device)
    y = torch.randint(0, 6, (args.cost_batch, s, s), generator=g).to(device)
    models = {v: cost_model(v, args.depth, s, args.smoke).to(device) for v in COST_VARIANTS}
    steps = {}
    for v, m in models.items():
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)

        def step(m=m, opt=opt):
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[v] = step
        step()  # warm: allocations and the optimizer's state
    timing = paired(steps, "frozen", args.rounds, 1, device, clock)
    memory = {}
    for v, m in models.items():
        params = [q for q in m.parameters() if q.requires_grad]
        memory[v] = round(loss_memory(lambda m=m: F.cross_entropy(m(x), y), params, device) / 2 ** 20, 1)
        m.zero_grad(set_to_none=True)
    trainable = {v: sum(q.numel() for n, q in m.named_parameters() if q.requires_grad and n.startswith("net.encoder."))
                 for v, m in models.items()}
    return {"device": str(device), "width": 64 if args.smoke else 1024, "depth": args.depth, "image_size": s,
            "batch": args.cost_batch, "step": timing, "memory_mb": memory, "encoder_trainable": trainable}


def cost_table(c: dict) -> str:
    lines = ["| variant | trainable encoder params | ms / step | ratio to frozen (IQR) | median ms / LoRA's "
             "| backward memory MB |", "|---|---|---|---|---|---|"]
    lora = c["step"]["lora"]["ms"]
    for v, t in c["step"].items():
        lines.append(f"| {v} | {c['encoder_trainable'][v]:,} | {t['ms']:.0f} | {t['ratio']:.2f} "
                     f"({t['iqr'][0]:.2f}-{t['iqr'][1]:.2f}) | {t['ms'] / lora:.2f} | {c['memory_mb'][v]} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["quality", "cost"], choices=["quality", "cost"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--validation-steps", type=int, default=40)
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--n-test", type=int, default=128)
    p.add_argument("--depth", type=int, default=4, help="cost: blocks of the DINOv2-L-wide encoder")
    p.add_argument("--cost-size", type=int, default=448)
    p.add_argument("--cost-batch", type=int, default=2, help="at least 2: UPerNet pools to 1 x 1 under BatchNorm")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="cost on the CPU even where CUDA is present")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny data and model, 2 steps, 1 seed")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.validation_steps = 1, 2, 2
        args.n_train, args.n_val, args.n_test = 8, 4, 4
        args.depth, args.cost_size, args.rounds = 2, 28, 1
    torch.set_num_threads(args.threads)
    result = {"date": str(date.today()), "machine": platform.machine(), "threads": args.threads,
              "torch": torch.__version__, "smoke": args.smoke}
    work = Path(tempfile.mkdtemp(prefix="vp-bench-seg-"))
    try:
        if "quality" in args.parts:
            result["quality"] = quality(args, work)
            result["quality"]["table"] = quality_table(result["quality"])
            print(result["quality"]["table"])
        if "cost" in args.parts:
            result["cost"] = cost(args)
            result["cost"]["table"] = cost_table(result["cost"])
            print(result["cost"]["table"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return emit(result, args.json)


if __name__ == "__main__":
    main()
