"""Core benchmark: training-step time and memory of our LoRA against HF PEFT's LoRA.

Same model, rank, targets and batch in one process; variants alternate round by round and
each reports its median step time; ratios are to PEFT LoRA. Variants:
  floor     no adapter, base frozen, gradients still flow through every block (input
            requires grad): the cost any adapter pays at least
  full      full fine-tuning
  peft      peft.get_peft_model with LoraConfig(r, target_modules)
  ours      vp.inject with LoRAConfig(r, same targets)
  peft_lokr / peft_waveft  PEFT's nearest relatives of our later methods, for scale
Memory: CUDA peak allocated on a GPU; on CPU the bytes saved for backward (distinct
storages, via saved_tensors_hooks) plus gradients, which is what differs between methods.
Merged inference: our merged model against the bare model, eval, no grad.

    python scripts/bench_core.py                      # CPU defaults: depth 4, batch 4 and 16
    python scripts/bench_core.py --device cuda --depth 12 --batch 32
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from datetime import date

import timm
import torch

import visionpeft as vp

TARGETS = ["qkv", "proj", "fc1", "fc2"]
TARGET_RE = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def build(depth: int, device):
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, depth=depth,
                             num_classes=10).to(device)


def make_variant(kind: str, depth: int, r: int, device):
    model = build(depth, device)
    if kind == "full":
        return model
    if kind == "floor":
        return model.requires_grad_(False)
    if kind == "ours":
        return vp.inject(model, vp.LoRAConfig(r=r, alpha=2 * r, target_modules=[f"re:{TARGET_RE}"]))
    import peft

    cfgs = {
        "peft": lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGET_RE),
        "peft_lokr": lambda: peft.LoKrConfig(r=r, alpha=2 * r, target_modules=TARGET_RE),
        "peft_waveft": lambda: peft.WaveFTConfig(target_modules=TARGET_RE),
    }
    return peft.get_peft_model(model, cfgs[kind]())


class SavedBytes:
    """Bytes of distinct storages autograd saves for backward during one forward."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            self.seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def total(self) -> int:
        return sum(self.seen.values())


def step_fn(model, x, y, opt):
    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def measure_memory(model, x, y, device) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        rec = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        peak = rec.total() + sum(p.numel() * p.element_size() for p in params)
    model.zero_grad(set_to_none=True)
    return peak


def time_steps(fn, device, steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def bench_training(args, batch: int, device) -> dict:
    kinds = args.variants
    models = {k: make_variant(k, args.depth, args.r, device) for k in kinds}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.img, args.img, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    xg = x.clone().requires_grad_(True)  # the floor: gradients through every block
    steps = {}
    for k, m in models.items():
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        steps[k] = step_fn(m, xg if k == "floor" else x, y, opt)
        for _ in range(args.warmup):
            steps[k]()
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):  # alternate so drift hits every variant alike
        for k in kinds:
            times[k].append(time_steps(steps[k], device, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: measure_memory(m, xg if k == "floor" else x, y, device) for k, m in models.items()}
    ref = "peft" if "peft" in med else kinds[0]
    return {"batch": batch,
            "step_ms": {k: round(1e3 * v, 2) for k, v in med.items()},
            "step_ratio": {k: round(v / med[ref], 3) for k, v in med.items()},
            "step_ratio_range": {k: [round(min(times[k]) / med[ref], 3), round(max(times[k]) / med[ref], 3)]
                                 for k in kinds},
            "memory_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
            "memory_ratio": {k: round(v / mem[ref], 3) for k, v in mem.items()},
            "trainable": {k: sum(p.numel() for p in m.parameters() if p.requires_grad)
                          for k, m in models.items()}}


@torch.no_grad()
def bench_merged(args, batch: int, device) -> dict:
    bare = build(args.depth, device).eval()
    ours = vp.inject(copy.deepcopy(bare), vp.LoRAConfig(r=args.r, target_modules=[f"re:{TARGET_RE}"]))
    vp.merge(ours)
    x = torch.randn(batch, 3, args.img, args.img, device=device)
    fns = {"bare": lambda: bare(x), "merged": lambda: ours(x)}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            times[k].append(time_steps(f, device, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "ms": {k: round(1e3 * v, 2) for k, v in med.items()},
            "merged_over_bare": round(med["merged"] / med["bare"], 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+",
                   default=["floor", "full", "peft", "ours", "peft_lokr", "peft_waveft"])
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "threads": args.threads, "depth": args.depth, "img": args.img, "r": args.r,
              "training": [bench_training(args, b, device) for b in args.batch],
              "merged_inference": [bench_merged(args, b, device) for b in args.batch]}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
