"""Mixed-adapter batches: the cost of `vp.routing` against the bare model.

timm vit_small_patch16_224 (random init, depth set by --depth), eval, no grad; adapters
of one method (LoRA r 8, KronA with its balanced split, WaRA r 8 (a LoRA of rank 32),
WaRA r 2 (`wara_rank_r`: rank 8, LoRA's), Block-LoRA r 8 with 4 blocks) on every block's
qkv / proj / fc1 / fc2. Per method and batch size, variants:
  bare      the model without adapters (the reference)
  merged    one adapter merged into the weights
  single    one adapter active, no routing
  route_K   routing with K distinct adapters over the rows (row i gets adapter i mod K;
            K = 1 is every row on one adapter)
Timing as in bench_core.py: process CPU time (steadier than wall time on a shared VM),
paired shuffled rounds, each variant's ratio the median over rounds of its time over the
bare model's in the same round, with the interquartile range of those ratios.

    python scripts/bench_routing.py                     # batch 32 and 128, K 1 4 32 128
    python scripts/bench_routing.py --quick             # smoke check: 64px, depth 1, batch 8
    python scripts/bench_routing.py --methods lora --batch 32 --distinct 1 32 --profile
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import date

import timm
import torch

import visionpeft as vp
from bench_core import paired

TARGETS = [r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]
CONFIGS = {
    "lora": lambda r: vp.LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS),
    "krona": lambda r: vp.KronAConfig(target_modules=TARGETS),
    "wara": lambda r: vp.WaRAConfig(r=r, target_modules=TARGETS),
    # WaRA at the effective rank of the LoRA row: one level, 4 bands of rank r / 4
    "wara_rank_r": lambda r: vp.WaRAConfig(r=max(1, r // 4), target_modules=TARGETS),
    "block_lora": lambda r: vp.BlockLoRAConfig(r=r, n_blocks=4, target_modules=TARGETS),
}


def build(depth: int, img: int):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=depth, img_size=img).eval()


@torch.no_grad()
def with_adapters(bare, method: str, count: int, r: int):
    """A copy of ``bare`` with ``count`` adapters a0, a1, ... of ``method``, moved off
    their zero init (B = 0 would make a few products trivially cheap)."""
    model = copy.deepcopy(bare)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        vp.inject(model, CONFIGS[method](r), name=f"a{i}")
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def variants(args, method: str, batch: int, bare, adapted, merged, x) -> dict:
    fns = {"bare": lambda: bare(x), "merged": lambda: merged(x)}

    def single():
        vp.set_active(adapted, ["a0"])
        return adapted(x)

    fns["single"] = single
    for k in args.distinct:
        if k > batch:
            continue
        rows = [f"a{i % k}" for i in range(batch)]

        def routed(rows=rows):
            with vp.routing(adapted, rows):
                return adapted(x)

        fns[f"route_{k}"] = routed
    return fns


def profile_top(fn, n: int = 12) -> list[dict]:
    """The ``n`` ATen ops with the most self CPU time in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 2), "calls": e.count,
             "shapes": str(e.input_shapes)} for e in events[:n]]


@torch.no_grad()
def bench_method(args, method: str) -> list[dict]:
    bare = build(args.depth, args.img)
    count = max(k for k in args.distinct if k <= max(args.batch))
    adapted = with_adapters(bare, method, count, args.r)
    merged = vp.merge(with_adapters(bare, method, 1, args.r))
    out = []
    for batch in args.batch:
        x = torch.randn(batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(1))
        fns = variants(args, method, batch, bare, adapted, merged, x)
        for f in fns.values():
            for _ in range(args.warmup):
                f()
        timing = paired(fns, "bare", args.rounds, args.steps, torch.device("cpu"), time.process_time)
        row = {"method": method, "batch": batch, "adapters": count, "timing": timing}
        if args.profile:
            worst = max((k for k in fns if k.startswith("route_")), key=lambda k: int(k.split("_")[1]))
            row["profile"] = {k: profile_top(fns[k]) for k in ("bare", "single", worst)}
        out.append(row)
        print(f"  {method} batch {batch}: " + ", ".join(f"{k} {v['ratio']}" for k, v in timing.items()),
              flush=True)
    return out


def table(rows: list[dict], distinct: list[int]) -> str:
    cols = ["merged", "single"] + [f"route_{k}" for k in distinct]
    lines = ["| method | batch | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for c in cols:
            t = row["timing"].get(c)
            cells.append("-" if t is None else f"{t['ratio']:.3f} ({t['iqr'][0]:.2f}-{t['iqr'][1]:.2f})")
        lines.append(f"| {row['method']} | {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    p.add_argument("--distinct", type=int, nargs="+", default=[1, 4, 32, 128],
                   help="numbers of distinct adapters over the rows (those above the batch are skipped)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=1, help="forwards per variant per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="also record the top ATen ops of bare, single and the most-routed variant")
    p.add_argument("--quick", action="store_true",
                   help="smoke check: depth 1, 64px, batch 8, K 1 and 8, 3 rounds of 10 forwards")
    p.add_argument("--out", help="also write the results here (JSON)")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.img, args.batch, args.distinct, args.rounds, args.steps = 1, 64, [8], [1, 8], 3, 10
    args.distinct = sorted(set(args.distinct))
    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        rows += bench_method(args, method)
    result = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "clock": "process_time",
              "host": f"timm vit_small_patch16_224 depth {args.depth}, {args.img}px, eval, no grad",
              "r": args.r, "rounds": args.rounds, "steps": args.steps, "results": rows}
    print(table(rows, args.distinct))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
