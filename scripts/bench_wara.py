"""WaRA's training step against our LoRA of the same effective rank, one process.

A J-level WaRA at rank r is a LoRA of rank (3J + 1) r whose factors are 1-D wavelet
syntheses of thin matrices (methods/wara.py), so its step should cost about what that
LoRA's costs; this measures the ratio. Hosts: timm ViT-S/16 and ViT-B/16 (random init,
depth set per host), adapters on every block's qkv / proj / fc1 / fc2, a training step
(forward, backward, AdamW). Process CPU time on CPU (wall time on CUDA); every round runs
each variant for a few steps in a shuffled order, and a WaRA variant's ratio is the median
over rounds of its time over its LoRA's time in the same round (paired, so drift of a
shared machine cancels), with the interquartile range.

Variants: LoRA at r 8 and at every WaRA's effective rank, and WaRA as wavelet:levels:r
specs (default haar:1:8, haar:1:2, haar:2:4, sym4:1:8); plus a second copy of the first
WaRA's LoRA timed against the first ("_again"), whose ratio (1 in exact arithmetic) is the
noise of the measurement. AdamW fused by default, as the training loop runs it. Memory as in bench_core.py
(bytes saved for backward plus gradients on CPU).

    python scripts/bench_wara.py                          # ViT-S depth 4 and ViT-B depth 2, batch 4
    python scripts/bench_wara.py --hosts vit_small_patch16_224:4 --wara haar:1:8 --out wara.json
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import date

import timm
import torch

import visionpeft as vp
from bench_core import TARGET_RE, emit, measure_memory, step_fn, time_steps


def parse_wara(spec: str) -> tuple[str, int, int]:
    wavelet, levels, r = spec.split(":")
    return wavelet, int(levels), int(r)


def variant_config(kind):
    """("lora", r) or ("wara", wavelet, levels, r) -> our config on the ViT targets."""
    targets = [f"re:{TARGET_RE}"]
    if kind[0] == "lora":
        return vp.LoRAConfig(r=kind[1], alpha=2 * kind[1], target_modules=targets)
    _, wavelet, levels, r = kind
    return vp.WaRAConfig(r=r, wavelet=wavelet, levels=levels, alpha=2 * r, target_modules=targets)


def name_of(kind) -> str:
    if kind[0] == "lora":
        return f"lora_r{kind[1]}" + ("_again" if len(kind) > 2 else "")
    return f"wara_{kind[1]}_J{kind[2]}_r{kind[3]}"


def effective_rank(levels: int, r: int) -> int:
    return (3 * levels + 1) * r


def quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


def run_host(args, model_name: str, depth: int) -> dict:
    waras = [("wara", *parse_wara(s)) for s in args.wara]
    loras = sorted({args.r, *(effective_rank(w[2], w[3]) for w in waras)})
    kinds = [("lora", r) for r in loras] + waras
    if waras:  # the A/A control: a second, identical LoRA against the first, in the same rounds
        kinds.append(("lora", effective_rank(waras[0][2], waras[0][3]), "again"))
    device = args.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(device)
    models, steps = {}, {}
    for kind in kinds:
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, depth=depth, num_classes=10, img_size=args.img)
        model = vp.inject(model.to(device), variant_config(kind))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                **({"fused": True} if args.optimizer == "fused" else {}))
        name = name_of(kind)
        models[name], steps[name] = model, step_fn(model, x, y, opt)
        for _ in range(args.warmup):
            steps[name]()
    rng = random.Random(0)
    times = {k: [] for k in steps}
    for _ in range(args.rounds):
        order = list(steps)
        rng.shuffle(order)
        for k in order:
            times[k].append(time_steps(steps[k], device, args.steps, args.clock_fn))
    ref = name_of(("lora", args.r))
    step = {}
    for kind in kinds:
        k = name_of(kind)
        step[k] = {"ms": round(1e3 * statistics.median(times[k]), 2),
                   f"vs_{ref}": round(statistics.median(t / b for t, b in zip(times[k], times[ref])), 3)}
        if kind[0] == "wara" or len(kind) > 2:
            base = name_of(("lora", kind[1] if kind[0] == "lora" else effective_rank(kind[2], kind[3])))
            q = quartiles(sorted(t / b for t, b in zip(times[k], times[base])))
            step[k].update({"vs": base, "ratio": round(q[1], 3), "iqr": [round(q[0], 3), round(q[2], 3)]})
    mem = {k: measure_memory(m, x, y, device) for k, m in models.items()}
    return {"model": model_name, "depth": depth, "batch": args.batch, "step": step,
            "memory_mb": {k: round(v / 2**20, 2) for k, v in mem.items()},
            "trainable": {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", nargs="+", default=["vit_small_patch16_224:4", "vit_base_patch16_224:2"],
                   help="timm model:depth pairs")
    p.add_argument("--wara", nargs="+", default=["haar:1:8", "haar:1:2", "haar:2:4", "sym4:1:8"],
                   help="WaRA variants as wavelet:levels:r")
    p.add_argument("--r", type=int, default=8, help="rank of the reference LoRA row")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--optimizer", choices=["fused", "default"], default="fused",
                   help="AdamW fused (what the training loop runs on CPU and CUDA) or torch's default")
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="process CPU time (default on CPU) or wall time (default on CUDA)")
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    args.clock = args.clock or ("wall" if args.device.type == "cuda" else "cpu")
    args.clock_fn = time.process_time if args.clock == "cpu" else time.perf_counter
    result = {"date": str(date.today()), "machine": platform.machine(), "torch": torch.__version__,
              "device": str(args.device), "threads": args.threads, "clock": args.clock,
              "rounds": args.rounds, "steps": args.steps, "optimizer": args.optimizer,
              "hosts": [run_host(args, name, int(depth))
                        for name, depth in (h.rsplit(":", 1) for h in args.hosts)]}
    for host in result["hosts"]:
        for k, v in host["step"].items():
            if "ratio" in v:
                print(f"# {host['model']} depth {host['depth']}: {k} / {v['vs']} = {v['ratio']} "
                      f"(IQR {v['iqr'][0]}-{v['iqr'][1]})")
    return emit(result, args.out)


if __name__ == "__main__":
    main()
