"""Core benchmark: training-step time and memory of our LoRA against HF PEFT's LoRA.

Same model, rank, targets and batch in one process, timed in process CPU time on CPU
(steadier than wall time on a shared VM) and wall time on CUDA. Every round runs each variant for a
few steps in a shuffled order; a variant's ratio is the median over rounds of its time
divided by PEFT LoRA's time in the same round (paired, so drift of this shared machine
cancels), with the interquartile range of those per-round ratios. Variants:
  floor     no adapter, base frozen, gradients still flow through every block (the patch
            embedding's output requires grad): the cost any adapter pays at least
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
import os
import platform
import random
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
        # gradients through every block, none into the image (no adapter needs that)
        model.patch_embed.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
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
    """Bytes of distinct storages autograd saves for backward during one forward, weights
    left out (they are held whether saved or not)."""

    def __init__(self, model):
        self.seen: dict[int, int] = {}
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in self.weights:
                self.seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def total(self) -> int:
        return sum(self.seen.values())


def _call(model, x, unpack: bool):
    return model(*x) if unpack else model(x)


def step_fn(model, x, y, opt, unpack: bool = False):
    def step():
        loss = torch.nn.functional.cross_entropy(_call(model, x, unpack), y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def measure_memory(model, x, y, device, unpack: bool = False) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.nn.functional.cross_entropy(_call(model, x, unpack), y).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        rec = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(_call(model, x, unpack), y)
        loss.backward()
        peak = rec.total() + sum(p.numel() * p.element_size() for p in params)
    model.zero_grad(set_to_none=True)
    return peak


def cpu_peak_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator holds while ``fn()`` runs, above what it
    held at the start: the CPU analogue of CUDA's ``max_memory_allocated() - base``. Read
    from the profiler's allocation events (every tensor, temporary or kept, of this
    thread, where CPU autograd also runs the backward); memory allocated outside torch
    (e.g. a C kernel's own malloc) is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        todo.extend(e.children)
        if type(e.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(events, key=lambda t: t[0]):
        held += size
        peak = max(peak, held)
    return peak


def cuda_peak_bytes(fn) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated at the start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def step_peak_memory(model, x, y, unpack: bool = False, opt=None, device=None) -> int:
    """Peak above the start of one forward + backward (gradients start at None and are
    counted), and of the optimizer step and zero_grad too when ``opt`` is given; what the
    optimizer held before the step is left out like CUDA's base. On CPU (``device`` None
    or CPU) the allocator's peak from the profiler, on CUDA ``max_memory_allocated``."""
    model.zero_grad(set_to_none=True)

    def step():
        torch.nn.functional.cross_entropy(_call(model, x, unpack), y).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    on_cuda = device is not None and torch.device(device).type == "cuda"
    peak = cuda_peak_bytes(step) if on_cuda else cpu_peak_bytes(step)
    model.zero_grad(set_to_none=True)
    return peak


def loss_memory(loss_fn, params, device) -> int:
    """Memory of one backward of ``loss_fn()``: on CPU the bytes autograd saves for
    backward (distinct storages, parameters left out) plus the trainable gradients; on
    CUDA the peak allocated above the start."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    seen, total = set(), 0

    def pack(x):
        nonlocal total
        key = x.untyped_storage().data_ptr()
        if key not in seen and not isinstance(x, torch.nn.Parameter):
            seen.add(key)
            total += x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn()
    loss.backward()
    return total + sum(p.numel() * p.element_size() for p in params)


def machine() -> dict:
    """CPU model and count, Python version, and the load average at the start (a shared
    machine's other work shows there)."""
    info = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        if model:
            info["cpu_model"] = model
    except OSError:
        pass
    try:
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation of every key over runs (seeds)."""
    out = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


# full fine-tuning of the embedded encoder (depth 6): every block, the patch embedding, the
# final norm (as modules_to_save), what bench_quality and bench_seg both call "full"
EMBEDDED_FULL = [f"blocks.{i}" for i in range(6)] + ["patch_embed", "norm"]


def time_steps(fn, device, steps: int, clock=time.perf_counter) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) / steps


def shuffled_rounds(fns: dict, rounds: int, steps: int, device, clock, seed: int = 0) -> dict[str, list[float]]:
    """Per variant, its seconds per step in every round; every variant runs once a round,
    in an order shuffled every round, so that any two can be paired round by round."""
    rng = random.Random(seed)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            times[k].append(time_steps(fns[k], device, steps, clock))
    return times


def paired(fns: dict, ref: str, rounds: int, steps: int, device, clock, seed: int = 0) -> dict:
    """Per variant: median step time, and the median / quartiles of its per-round ratio
    to ``ref`` timed in the same round (`shuffled_rounds`)."""
    times = shuffled_rounds(fns, rounds, steps, device, clock, seed)
    out = {}
    for k, ts in times.items():
        ratios = sorted(t / r for t, r in zip(ts, times[ref]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[k] = {"ms": round(1e3 * statistics.median(ts), 2), "ratio": round(q[1], 3),
                  "iqr": [round(q[0], 3), round(q[2], 3)]}
    return out


def bench_training(args, batch: int, device) -> dict:
    kinds = args.variants
    models = {k: make_variant(k, args.depth, args.r, device) for k in kinds}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.img, args.img, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    steps = {}
    for k, m in models.items():
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        steps[k] = step_fn(m, x, y, opt)
        for _ in range(args.warmup):
            steps[k]()
    ref = "peft" if "peft" in kinds else kinds[0]
    timing = paired(steps, ref, args.rounds, args.steps, device, args.clock_fn)
    mem = {k: measure_memory(m, x, y, device) for k, m in models.items()}
    return {"batch": batch, "reference": ref, "step": timing,
            "memory_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
            "memory_ratio": {k: round(v / mem[ref], 3) for k, v in mem.items()},
            "trainable": {k: sum(p.numel() for p in m.parameters() if p.requires_grad)
                          for k, m in models.items()}}


@torch.no_grad()
def bench_merged(args, batch: int, device) -> dict:
    """Merged model against the bare one, and a second bare copy as the noise control."""
    bare = build(args.depth, device).eval()
    control = copy.deepcopy(bare)
    ours = vp.inject(copy.deepcopy(bare), vp.LoRAConfig(r=args.r, target_modules=[f"re:{TARGET_RE}"]))
    vp.merge(ours)
    x = torch.randn(batch, 3, args.img, args.img, device=device)
    fns = {"bare": lambda: bare(x), "bare_copy": lambda: control(x), "merged": lambda: ours(x)}
    for f in fns.values():
        f()
    timing = paired(fns, "bare", args.rounds * 2, args.steps, device, args.clock_fn)
    # Timing noise here is a few percent; two deterministic checks bound the real cost:
    # the merged model runs the very same ATen ops, and the wrappers' Python cost per
    # call, measured on a tiny layer, times the number of wrappers, over the forward time.
    same_ops = aten_ops(bare, x) == aten_ops(ours, x)
    per_call = wrapper_overhead_s()
    n_wrappers = len(vp.summary(ours).rows)
    wall_s = timing["bare"]["ms"] / 1e3 / (args.threads if args.clock == "cpu" else 1)
    bound = per_call * n_wrappers / wall_s
    return {"batch": batch, "inference": timing, "same_aten_ops": same_ops,
            "wrapper_overhead_us_per_call": round(per_call * 1e6, 2), "wrappers": n_wrappers,
            "overhead_bound": round(1 + bound, 5)}


def aten_ops(model, x) -> dict:
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))


@torch.no_grad()
def wrapper_overhead_s(calls: int = 20000) -> float:
    """Extra seconds per call of a merged wrapper over its bare nn.Linear (8 x 8, one row)."""
    lin = torch.nn.Linear(8, 8)
    wrapped = vp.merge(vp.inject(torch.nn.Sequential(copy.deepcopy(lin)),
                                 vp.LoRAConfig(r=2, target_modules=["0"])))[0]
    x = torch.randn(1, 8)
    best = {}
    for name, m in (("bare", lin), ("wrapped", wrapped)) * 3:
        t0 = time.perf_counter()
        for _ in range(calls):
            m(x)
        best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / calls)
    return max(best["wrapped"] - best["bare"], 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+",
                   default=["floor", "full", "peft", "ours", "peft_lokr", "peft_waveft"])
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="cpu: process CPU time (default on CPU: a shared VM's stolen time "
                        "does not count, so paired ratios are steadier); wall: elapsed time "
                        "(default on CUDA)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    args.clock_fn = time.process_time if args.clock == "cpu" else time.perf_counter
    result = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "threads": args.threads, "clock": args.clock, "depth": args.depth, "img": args.img, "r": args.r,
              "training": [bench_training(args, b, device) for b in args.batch],
              "merged_inference": [bench_merged(args, b, device) for b in args.batch]}
    return emit(result, args.json)


def write_table(out, settings: dict, results: dict, text: str) -> None:
    """An adaptation table's JSON (settings, date, every run, the markdown table), written
    whole: the table scripts rewrite it after each run, so a cut run keeps what it did."""
    from pathlib import Path

    body = json.dumps({"settings": settings, "date": time.strftime("%Y-%m-%d"), "runs": results, "table": text},
                      indent=1)
    vp.atomic_write_file(out, lambda tmp: Path(tmp).write_text(body))


def emit(result: dict, path: str | None) -> dict:
    """Print the results, and write them to ``path`` when given."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
