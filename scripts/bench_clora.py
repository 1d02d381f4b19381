"""CLoRA composition per denoising step: batched against sequential, and diffusers' weighted sum.

Host: an SD1.5-size UNet (diffusers UNet2DConditionModel built from SD 1.5's config, random
init, nothing downloaded) at a reduced resolution on the CPU (--latent 16: 128 px), text
length 77 with random encoder hidden states of width 768. Each of the N concepts is a LoRA
r 4 on every to_q / to_k / to_v / to_out.0 (`vp.inject(..., name="cK")`, factors random).
The timed code is what `visionpeft.pipelines.clora.compose` runs per step: its own
`BranchPredictor` over N + 1 branches (branch 0 no adapter, branch K adapter cK), with the
cross-attention maps captured by its `capture` at its `choose_grid` grid, and the loss
`contrastive_map_loss` (2 tokens per concept, temperature 0.5). Cells, per N:
  batched     one UNet pass of all 2 (N + 1) rows, each routed to its branch (`vp.routing`)
  sequential  N + 1 passes of 2 rows, an adapter switch before each (the authors' code)
  diffusers   the cheap baseline: diffusers' weighted-sum composition, one pass of 2 rows
              (uncond, cond) with all N PEFT LoRAs on at once (`unet.add_adapter` +
              `unet.set_adapters(names, weights)`, on a separate copy of the UNet)
Phases of batched and sequential:
  update      the steps before update_until: latent.requires_grad_(True); predict;
              loss; torch.autograd.grad(loss, latent) (forward + backward to the latent)
  forward     the steps after: predict and loss under no_grad
(diffusers has only a forward: weighted-sum sampling never updates the latent.)
Timing as in bench_core.py: process CPU time (all threads: about threads x wall time;
stolen time of a shared VM does not count), paired rounds in a shuffled order, a ratio
the median over rounds of the per-round ratio, with its interquartile range. The
switching cost is the batched / sequential ratio (sequential pays N + 1 switches and
N + 1 smaller passes per step, batched one pass); `switch_us` is the bare switch alone.
Peak memory: the most bytes torch's CPU allocator held during one step above what it
held at its start (bench_core.cpu_peak_bytes: the profiler's allocation events), so the
weights are left out; memory allocated outside torch's allocator is not seen.
Recorded per N besides: UNet passes per step, the largest difference between batched and
sequential (noise, maps, latent gradient) and the loss: 0 at N = 1, where one concept has
nothing to contrast: compose then skips the update, so N = 1's update row is what the
step would cost, not what compose pays.

    python scripts/bench_clora.py                    # N 1 2 4 8, 4 rounds: about 15 min on 2 quiet cores
    python scripts/bench_clora.py --quick --output /tmp/clora.json   # smoke run, tiny UNet, < 1 min
    python scripts/bench_clora.py --concepts 2 --modes batched sequential --rounds 2

The JSON (default docs/bench_clora_cpu_<date>.json; --quick writes only with --output) is
written after each N, so a run cut short keeps what it measured; a markdown table is
printed at the end. Run time, estimated from one N = 2 cell (batched and sequential, 4
rounds: 4 s setup, 134 s measuring, on 2 cores another job was partly using) and steps
growing with UNet passes and rows: per N about (rounds + 2.3) rounds' worth of steps (the
warmup, the precheck and the profiled memory steps on top), most of it at N = 8 (its
sequential step is 9 UNet passes): about 15 min at the defaults on 2 quiet cores, up to
twice that on busy ones. --quick: under 30 s.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import time
import types
import warnings
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import visionpeft as vp  # noqa: E402
from bench_core import cpu_peak_bytes, cuda_peak_bytes, machine, shuffled_rounds  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# SD 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json, the keys that differ
# from diffusers' defaults or that say what it is)
SD15 = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
# --quick: the same blocks at toy widths
QUICK = {**SD15, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32}
MODES = ("batched", "sequential", "diffusers")
PHASES = {"batched": ("update", "forward"), "sequential": ("update", "forward"), "diffusers": ("forward",)}
TEMPERATURE = 0.5
TOKENS_PER_CONCEPT = 2
MEMORY_METHOD = ("torch CPU allocator peak above the step's start, from torch.profiler allocation events "
                 "(bench_core.cpu_peak_bytes); weights and memory outside torch's allocator not counted")


def build_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval().requires_grad_(False)


def sd15_scheduler():
    """SD 1.5's scheduler (PNDM, PLMS steps); compose calls only its scale_model_input."""
    from diffusers import PNDMScheduler

    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    sched.set_timesteps(50)
    return sched


@torch.no_grad()
def randomise(model, keep, seed: int) -> None:
    """Move the adapter factors (the parameters ``keep(name)`` picks) off their init
    (LoRA's B = 0 would make the adapters' products trivially zero)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if keep(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def ours(base, n: int, r: int):
    """``base`` with concept adapters c1 .. cN injected (our LoRA), factors random."""
    for k in range(1, n + 1):
        vp.inject(base, vp.LoRAConfig(r=r, target_modules=TARGETS), name=f"c{k}")
    randomise(base, lambda name: ".adapters." in name, seed=1)
    return base


def theirs(base, n: int, r: int):
    """A copy of ``base`` with N PEFT LoRAs added the diffusers way, all on at once with
    weights 1 / N (the weighted sum)."""
    from peft import LoraConfig

    unet = copy.deepcopy(base)
    names = [f"c{k}" for k in range(1, n + 1)]
    with warnings.catch_warnings():  # PEFT warns at every adapter after the first; several is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name in names:
            unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS), adapter_name=name)
    randomise(unet, lambda name: "lora_" in name, seed=2)
    unet.set_adapters(names, [1.0 / n] * n)
    return unet


def plan(n: int, text_len: int, width: int, seed: int):
    """Branches, embeddings {"uncond", "cond"}: (N + 1, text_len, width), and
    token_groups[concept][branch]: concept k's tokens, the same in every branch."""
    from visionpeft.pipelines.clora.compose import Branch

    if 1 + TOKENS_PER_CONCEPT * n > text_len:
        raise ValueError(f"{n} concepts need {1 + TOKENS_PER_CONCEPT * n} text tokens; --text-len is {text_len}")
    tokens = [list(range(1 + TOKENS_PER_CONCEPT * k, 1 + TOKENS_PER_CONCEPT * (k + 1))) for k in range(n)]
    branches = [Branch("base prompt", (), [])]
    branches += [Branch(f"concept {k} prompt", (f"c{k}",), tokens[k - 1]) for k in range(1, n + 1)]
    g = torch.Generator().manual_seed(seed)
    embeds = {key: torch.randn(n + 1, text_len, width, generator=g) for key in ("uncond", "cond")}
    groups = [[tokens[k]] * (n + 1) for k in range(n)]
    return branches, embeds, groups


def switch_us(unet, branches, calls: int = 2000) -> float:
    """Wall microseconds of one bare switch of the sequential mode: entering and leaving
    `vp.routing` with one branch's adapters on its 2 rows, no forward."""
    rows = [[br.adapters] * 2 for br in branches]
    t0 = time.perf_counter()
    for i in range(calls):
        with vp.routing(unet, rows[i % len(rows)]):
            pass
    return 1e6 * (time.perf_counter() - t0) / calls


def rounds_of(fns: dict, rounds: int, steps: int, device) -> dict[str, list[float]]:
    """Per variant, its seconds per step in every round (process CPU time on the CPU, wall
    time with the device synchronised on CUDA), the raw times kept so that any two
    variants can be paired."""
    return shuffled_rounds(fns, rounds, steps, device, time.process_time if device.type == "cpu" else time.perf_counter)


def ratio(num: list[float], den: list[float]) -> dict:
    """Median and quartiles of the per-round ratios num / den."""
    rs = sorted(a / b for a, b in zip(num, den))
    q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
    return {"median": round(q[1], 3), "iqr": [round(q[0], 3), round(q[2], 3)]}


def bench_size(args, cfg: dict, n: int, sched) -> dict:
    # every piece from compose's own namespace: the very objects compose runs, wherever they are defined
    from visionpeft.pipelines.clora.compose import (BranchPredictor, MapStore, capture, choose_grid,
                                                    contrastive_map_loss)

    t_setup = time.perf_counter()
    device, dtype = args.device, args.dtype
    base = build_unet(cfg)
    diff = theirs(base, n, args.r).to(device, dtype) if "diffusers" in args.modes else None
    unet = ours(base, n, args.r).to(device, dtype)
    branches, embeds, groups = plan(n, args.text_len, cfg["cross_attention_dim"], seed=3)
    embeds = {k: v.to(device, dtype) for k, v in embeds.items()}
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(1, cfg["in_channels"], args.latent, args.latent, generator=g).to(device, dtype)
    t = sched.timesteps[0]
    grid = choose_grid(unet, (args.latent, args.latent), args.attn_res)
    store = MapStore(grid)
    pipe = types.SimpleNamespace(unet=unet, scheduler=sched)  # all BranchPredictor reads of a pipeline
    preds = {m: BranchPredictor(pipe, branches, embeds, store, batched=(m == "batched"))
             for m in ("batched", "sequential") if m in args.modes}

    def update(pred):
        def step():
            lat = latents.detach().requires_grad_(True)
            eps_u, eps_c, maps = pred(lat, t)
            loss = contrastive_map_loss(maps, groups, TEMPERATURE)
            (grad,) = torch.autograd.grad(loss, lat)
            return grad
        return step

    def forward(pred):
        @torch.no_grad()
        def step():
            eps_u, eps_c, maps = pred(latents, t)
            return float(contrastive_map_loss(maps, groups, TEMPERATURE))
        return step

    fns = {}
    for m, pred in preds.items():
        fns[f"{m}/update"] = update(pred)
        fns[f"{m}/forward"] = forward(pred)
    if diff is not None:
        hidden = torch.cat([embeds["uncond"][:1], embeds["cond"][:1]])  # the base prompt's two rows

        @torch.no_grad()
        def weighted_sum():
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            return diff(x, t, encoder_hidden_states=hidden, return_dict=False)[0]

        fns["diffusers/forward"] = weighted_sum

    row = {"concepts": n, "branches": n + 1, "rows_per_step": 2 * (n + 1), "attn_grid": list(grid), "cells": {}}
    with capture(unet, store):
        setup_s = time.perf_counter() - t_setup
        t_bench = time.perf_counter()
        # one pass of each: the two modes compute the same thing, and how many UNet passes a step takes
        with torch.no_grad():
            outs = {}
            for m, pred in preds.items():
                before = pred.calls
                outs[m] = pred(latents, t)
                row["cells"][m] = {"unet_passes_per_step": pred.calls - before}
            if outs:  # with one concept there is nothing to contrast: the loss and its gradient are 0
                row["loss"] = round(float(contrastive_map_loss(next(iter(outs.values()))[2], groups, TEMPERATURE)), 4)
        if len(outs) == 2:
            row["batched_vs_sequential_max_abs_diff"] = {
                k: float((a - b).abs().max()) for k, a, b in zip(("eps_uncond", "eps_cond", "maps"),
                                                                  outs["batched"], outs["sequential"])}
        if diff is not None:
            row["cells"]["diffusers"] = {"unet_passes_per_step": 1, "adapter_weights": [round(1.0 / n, 4)] * n}
        grads = {}
        for key, f in fns.items():
            for _ in range(args.warmup):
                got = f()
            if key.endswith("/update") and args.warmup:
                grads[key] = got
        if len(grads) == 2:  # and the same latent gradient
            b, s = grads["batched/update"], grads["sequential/update"]
            row["batched_vs_sequential_max_abs_diff"]["latent_grad"] = float((b - s).abs().max())
            row["latent_grad_max_abs"] = float(s.abs().max())
        times = rounds_of(fns, args.rounds, args.steps, device)
        peak = {k: (cpu_peak_bytes if device.type == "cpu" else cuda_peak_bytes)(f) for k, f in fns.items()}
        if "sequential" in preds:
            row["switch_us"] = round(switch_us(unet, branches), 2)
            row["switches_per_step"] = {"batched": 0, "sequential": n + 1}
    for key, ts in times.items():
        m, phase = key.split("/")
        row["cells"][m][phase] = {"ms": round(1e3 * statistics.median(ts), 1),
                                  "ms_rounds": [round(1e3 * s, 1) for s in ts],
                                  "peak_mb": round(peak[key] / 2**20, 1)}
    ratios = {}
    for phase in ("update", "forward"):
        b, s = times.get(f"batched/{phase}"), times.get(f"sequential/{phase}")
        if b and s:
            ratios[f"{phase}_batched_over_sequential"] = ratio(b, s)
            ratios[f"{phase}_peak_batched_over_sequential"] = round(peak[f"batched/{phase}"]
                                                                    / peak[f"sequential/{phase}"], 3)
        if "diffusers/forward" in times:
            for m in ("batched", "sequential"):
                if f"{m}/{phase}" in times:
                    ratios[f"{phase}_{m}_over_diffusers"] = ratio(times[f"{m}/{phase}"], times["diffusers/forward"])
    row["ratios"] = ratios
    row["seconds"] = {"setup": round(setup_s, 1), "bench": round(time.perf_counter() - t_bench, 1)}
    return row


def fmt_ratio(r: dict | None) -> str:
    return "-" if r is None else f"{r['median']:.2f} ({r['iqr'][0]:.2f}-{r['iqr'][1]:.2f})"


def table(rows: list[dict]) -> str:
    """Step time (process CPU ms, median over rounds) and peak memory per N."""
    def cell(row, m, phase, key="ms"):
        c = row["cells"].get(m, {}).get(phase)
        return "-" if c is None else f"{c[key]:.0f}" if key == "ms" else f"{c[key]:.1f}"

    lines = ["Step time, ms (process CPU time on the CPU, wall time on CUDA; median over rounds); ratios: "
             "median (IQR) of per-round ratios",
             "",
             "| N | rows | update batched | update sequential | update batched/seq | forward batched "
             "| forward sequential | forward batched/seq | diffusers weighted sum | forward batched/diffusers "
             "| switch us x per step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["ratios"]
        sw = (f"{row['switch_us']:.0f} x {row['switches_per_step']['sequential']}" if "switch_us" in row else "-")
        lines.append(f"| {row['concepts']} | {row['rows_per_step']} | {cell(row, 'batched', 'update')} "
                     f"| {cell(row, 'sequential', 'update')} | {fmt_ratio(r.get('update_batched_over_sequential'))} "
                     f"| {cell(row, 'batched', 'forward')} | {cell(row, 'sequential', 'forward')} "
                     f"| {fmt_ratio(r.get('forward_batched_over_sequential'))} "
                     f"| {cell(row, 'diffusers', 'forward')} | {fmt_ratio(r.get('forward_batched_over_diffusers'))} "
                     f"| {sw} |")
    lines += ["", "Peak memory of one step, MB above its start (torch's allocator)", "",
              "| N | update batched | update sequential | forward batched | forward sequential "
              "| diffusers weighted sum |",
              "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['concepts']} | " + " | ".join(
            cell(row, m, ph, "peak_mb") for m, ph in (("batched", "update"), ("sequential", "update"),
                                                      ("batched", "forward"), ("sequential", "forward"),
                                                      ("diffusers", "forward"))) + " |")
    return "\n".join(lines)


def write(result: dict, path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)  # whole or not at all


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of concepts N")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--latent", type=int, default=16, help="latent width and height (8 px each: 16 is 128 px)")
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--attn-res", type=int, help="captured grid width (compose's attn_res; default its choice)")
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (then wall time and CUDA peak memory)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the same UNet blocks at toy widths (32, 32, 64, 64; text width 32), "
                        "N 1 and 2, one round")
    p.add_argument("--output", help="the JSON (default docs/bench_clora_cpu_<date>.json; with --quick, none)")
    args = p.parse_args(argv)
    args.device, args.dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.quick:
        args.concepts, args.rounds, args.steps, args.warmup = [1, 2], 1, 1, 1
    if min(args.concepts) < 1:
        p.error("--concepts: every N must be at least 1")
    cfg = QUICK if args.quick else SD15
    args.concepts = sorted(set(args.concepts))
    args.modes = [m for m in MODES if m in args.modes]
    docs = Path(__file__).resolve().parents[1] / "docs"
    out = (Path(args.output) if args.output else None if args.quick
           else docs / f"bench_clora_{args.device.type}_{date.today()}.json")
    torch.set_num_threads(args.threads)
    import diffusers
    import peft

    t0 = time.perf_counter()
    result = {"date": str(date.today()), **machine(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "peft": peft.__version__, "threads": args.threads, "device": str(args.device),
              "dtype": str(args.dtype).replace("torch.", ""),
              "clock": ("process_time (CPU time of all threads: about threads x wall time)" if args.device.type == "cpu"
                        else "perf_counter with torch.cuda.synchronize (wall time)"),
              "host": ("SD1.5 UNet config, random init" if not args.quick else "SD1.5 UNet blocks at toy widths"),
              "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "latent": args.latent, "pixels": 8 * args.latent, "text_len": args.text_len,
              "adapters": f"per concept: LoRA r {args.r} on every {' / '.join(TARGETS)} (vp.inject; PEFT "
                          "LoraConfig for diffusers), factors random",
              "tokens_per_concept": TOKENS_PER_CONCEPT, "temperature": TEMPERATURE,
              "memory_method": MEMORY_METHOD if args.device.type == "cpu" else
              "torch.cuda.max_memory_allocated above the step's start (bench_core.cuda_peak_bytes)",
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              "modes": args.modes, "quick": args.quick, "complete": False, "results": []}
    sched = sd15_scheduler()
    for n in args.concepts:
        row = bench_size(args, cfg, n, sched)
        gc.collect()  # this N's UNets, before the next N builds its own
        result["results"].append(row)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        write(result, out)  # after every N: a run cut short keeps what it measured
        r = row["ratios"]
        print(f"N {n}: " + ", ".join(f"{m}/{ph} {c[ph]['ms']:.0f} ms"
                                     for m, c in row["cells"].items() for ph in PHASES[m] if ph in c)
              + (f"; update batched/seq {fmt_ratio(r['update_batched_over_sequential'])}"
                 if "update_batched_over_sequential" in r else "")
              + f" ({row['seconds']['setup'] + row['seconds']['bench']:.0f} s)", flush=True)
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write(result, out)
    print(table(result["results"]))
    if out is not None:
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
