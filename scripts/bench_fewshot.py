"""Few-shot CLIP training step: Block-LoRA against LoRA and PEFT's LoRA (issue 23).

The step is CLIP-LoRA's few-shot step: a batch of images (batch, 3, 224, 224) through
`encode_image`, the class prompts ("a photo of a {}." for --classes names, tokenized with
`open_clip.get_tokenizer("ViT-B-16")`) through `encode_text` every step (the text tower is
adapted too, so its features change with every update), logits = 100 * cosine, cross
entropy, backward, AdamW (lr 2e-4, weight decay 1e-2) on the adapter parameters only.
Host: `open_clip.create_model("ViT-B-16", pretrained=None)` (random init, nothing
downloaded) with the first --layers residual blocks of each tower kept (12 is the whole
model). --quick: a tiny CLIP of the same kind (widths 64 / 32, 32 px) for a smoke run.

Variants, all on the same layers (the nn.MultiheadAttention of every kept block of both
towers), CLIP-LoRA's recipe r 2, alpha 1, scale alpha / sqrt(r), dropout 0.25:
  frozen         no adapter: the host frozen, gradients still flowing through every block
                 of both towers (the patch and token embeddings' outputs require grad), no
                 optimizer (but see below: on the CPU this is no floor)
  lora           vp.LoRAConfig on vp.presets.CLIP_QKV ("attn[q,k,v]"): three rank-r pairs
                 per attention, one per q / k / v slice of the fused in_proj (E x E each)
  block_lora_nN  vp.BlockLoRAConfig, the same slices, n_blocks N (2, 4, 8): A0 (r, E/N)
                 shared by the N input blocks, B (E, r)
  peft_lora      PEFT's LoraConfig(r, lora_alpha=alpha, use_rslora=True, lora_dropout)
                 on every `resblocks.N.attn`, i.e. PEFT's lora.MultiheadAttention layer
  lora_nodrop, block_lora_n8_nodrop
                 controls: the same with dropout 0, which puts vp on its weight-space path
How vp runs them: while training with adapter dropout, vp's attention adapters run
input-side, as CLIP-LoRA's per-projection layers do: q, k and v each from the host's slice
plus the adapter on its own dropped-out input (Block-LoRA: A0 on the sum of the input's n
chunks), then scaled dot-product attention. Without dropout (the _nodrop controls, or in
eval) they act in weight space: the host's own MHA forward with W + dW
(torch.func.functional_call), where Block-LoRA's dW = B [A0 ... A0] costs what LoRA's B A
does and the backward forms the full gradient of the (3E x E) in_proj over all tokens.
What PEFT (0.21.2) supports on nn.MultiheadAttention, and how peft_lora differs:
  - it adapts the whole fused in_proj as one (3E x E) matrix with one rank-r pair
    (A (r, E), B (3E, r)): one rank-r update shared by q, k and v, where CLIP-LoRA and
    `lora` have one rank-r update per slice (rank up to 3r over the in_proj);
  - it always adapts out_proj too, with its own rank-r pair (A (r, E), B (E, r)); there
    is no way to adapt in_proj alone, nor q / k / v slices, nor to give out_proj another
    rank (the MHA layer passes the same r to both);
  - per attention that makes r (4E) + r (2E) = 6 r E trainable parameters, as many as
    `lora`'s 3 r (2E), spread differently (the counts agree because r (3E + E) + r (E + E)
    happens to equal 3 r (E + E), not because the same matrices are adapted);
  - only `_qkv_same_embed_dim` attention (true in both CLIP towers), no DoRA;
  - it always acts in weight space: its forward merges B A into in_proj and out_proj,
    runs the host's MHA and unmerges, so lora_dropout is accepted but does nothing (no
    adapter input exists to drop out).
`dropout_in_effect` checks which variants' dropout acts (two train-mode forwards with the
adapters moved off their init differ or not).
`frozen` on the CPU: with its in_proj weight frozen, torch's nn.MultiheadAttention
(batch_first) runs the in_proj on the transposed (tokens, batch, E) input as a bmm with the
weight broadcast over the tokens, forward and backward; once the weight requires grad
(PEFT's merged weight, vp's W + dW) it takes plain mm, and vp's input-side path calls
F.linear on the batch-first input. At ViT-B width, 197 tokens, batch 8 that bmm costs
about 2.4x the mm in one attention's forward and backward on 2 cores, so an adapted step
can be cheaper than the frozen one: `frozen` is what the unmodified host costs, not a
lower bound of the adapters.

Recorded per variant: trainable parameters (per tower and their shapes); that at init
(B = 0) the logits equal the host's without adapters, in train mode, without autograd
and with it (the timed forward), against a control (the host with its in_proj weights
requiring grad, which makes torch pick other kernels: the scale of that check's noise;
vp's input-side path, other kernels again, sits at the same scale); that moved off init
the adapters change the logits, and whether their dropout acts; per
precision cell (fp32; on CUDA also fp16 autocast with a GradScaler, as CLIP-LoRA trains):
step time (median over shuffled rounds; the ratio to `lora` the median of per-round ratios
with its IQR, as bench_core.paired; the difference to `frozen`, the median of per-round
differences), and the peak memory of one step (forward, backward, optimizer step) above
what was held at its start, so the weights are left out (CPU: torch's allocator from
profiler events, bench_core.cpu_peak_bytes; CUDA: max_memory_allocated). Timing as in
bench_core: process CPU time on the CPU (all threads: about threads x wall time; a shared
VM's stolen time does not count), wall time with synchronisation on CUDA.

    python scripts/bench_fewshot.py                         # CPU: 4 blocks per tower, batch 8, 10 classes
    python scripts/bench_fewshot.py --quick --output /tmp/fewshot.json   # smoke run, tiny CLIP, seconds
    python scripts/bench_fewshot.py --device cuda --layers 12 --batch 32 --rounds 10

The JSON (default docs/bench_fewshot_<device>_<date>.json; --quick writes only with
--output) is written after the checks and after every precision cell, so a run cut short
keeps what it measured; a markdown table is printed at the end. Run time at the defaults
on 2 cores that other jobs partly used: 7 minutes (54 s building and checking the 8
variants, 368 s for 16 rounds, the warmup and the profiled steps: about 4.5 s of CPU time,
2.3 s wall, a step). --quick: about 10 s, most of it imports.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import statistics
import time
from collections import Counter
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import visionpeft as vp  # noqa: E402
from bench_core import cpu_peak_bytes, cuda_peak_bytes, machine, shuffled_rounds  # noqa: E402

# CLIP-LoRA's recipe (Zanella & Ben Ayed, 2024), the baseline Block-LoRA builds on
RECIPE = {"r": 2, "alpha": 1.0, "dropout": 0.25, "rank_stabilized": True}
LR, WEIGHT_DECAY = 2e-4, 1e-2
LOGIT_SCALE = 100.0
TEMPLATE = "a photo of a {}."
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BLOCKS = (2, 4, 8)
VARIANTS = ("frozen", "lora", *(f"block_lora_n{n}" for n in BLOCKS), "peft_lora", "lora_nodrop",
            "block_lora_n8_nodrop")
REFERENCE = "lora"
PEFT_TARGETS = r".*resblocks\.\d+\.attn"  # PEFT full-matches the module name: every MHA of both towers
# --quick: open_clip's CLIP class at toy widths (heads of width 32), the real tokenizer's 77 tokens
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
MEMORY_METHOD = {"cpu": "torch CPU allocator peak above the step's start, from torch.profiler allocation events "
                        "(bench_core.cpu_peak_bytes); weights and memory outside torch's allocator not counted",
                 "cuda": "torch.cuda.max_memory_allocated above the step's start (bench_core.cuda_peak_bytes)"}


# --- host and variants --------------------------------------------------------------------
def build_host(quick: bool, layers: int):
    """Random-init CLIP, frozen, with the first ``layers`` blocks of each tower kept."""
    import open_clip

    torch.manual_seed(0)
    if quick:
        model = open_clip.CLIP(**TINY)
    else:
        # open_clip says at WARNING that no pretrained weights were loaded: that is the point here
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            model = open_clip.create_model("ViT-B-16", pretrained=None)
        finally:
            logging.getLogger().setLevel(level)
    for tower in (model.visual.transformer, model.transformer):
        if layers > len(tower.resblocks):
            raise ValueError(f"--layers {layers}: the towers have {len(tower.resblocks)} blocks")
        tower.resblocks = torch.nn.ModuleList(list(tower.resblocks)[:layers])
        tower.layers = layers
    return model.requires_grad_(False)


def widths(model) -> dict:
    return {"vision": model.visual.transformer.width, "text": model.transformer.width}


def _requires_grad_out(module, inputs, out):
    return out.requires_grad_(True)


def make_variant(kind: str, host):
    """A deep copy of ``host`` with the variant's adapters (named after the variant)."""
    model = copy.deepcopy(host)
    r, alpha, dropout, rs = RECIPE["r"], RECIPE["alpha"], RECIPE["dropout"], RECIPE["rank_stabilized"]
    if kind.endswith("_nodrop"):  # the controls: vp's weight-space path
        kind, dropout = kind[:-len("_nodrop")], 0.0
    if kind == "frozen":
        # gradients through every block of both towers, none into the inputs' embeddings
        model.visual.conv1.register_forward_hook(_requires_grad_out)
        model.token_embedding.register_forward_hook(_requires_grad_out)
        return model
    if kind == "lora":
        return vp.inject(model, vp.LoRAConfig(r=r, alpha=alpha, dropout=dropout, rank_stabilized=rs,
                                              target_modules=list(vp.presets.CLIP_QKV)), name="lora")
    if kind.startswith("block_lora_n"):
        n = int(kind[len("block_lora_n"):])
        return vp.inject(model, vp.BlockLoRAConfig(r=r, n_blocks=n, alpha=alpha, dropout=dropout, rank_stabilized=rs,
                                                   target_modules=list(vp.presets.CLIP_QKV)), name=f"block_lora_n{n}")
    if kind == "peft_lora":
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, lora_dropout=dropout,
                              target_modules=PEFT_TARGETS)
        return peft.get_peft_model(model, cfg)
    raise ValueError(f"unknown variant {kind!r}; known: {', '.join(VARIANTS)}")


def trainable(model) -> dict:
    """Trainable parameters: total, per tower, and how many tensors of each shape."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vision = sum(p.numel() for n, p in params if ".visual." in f".{n}")
    total = sum(p.numel() for _, p in params)
    shapes = Counter("x".join(map(str, p.shape)) for _, p in params)
    return {"total": total, "vision": vision, "text": total - vision, "tensors": len(params),
            "shapes": dict(sorted(shapes.items()))}


def n_attention(model) -> int:
    return sum(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


# --- the step ---------------------------------------------------------------------------
def logits_of(model, images, text):
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(text), dim=-1)
    return LOGIT_SCALE * img @ txt.T


def autocast(device, dtype):
    return (torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def make_step(model, images, text, labels, device, amp_dtype):
    """One few-shot training step: closure with its own optimizer (None for `frozen`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY) if params else None
    # fp16 autocast: loss scaling as CLIP-LoRA does (it unscales fp32 gradients only)
    scaler = (torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 and opt is not None
              and params[0].dtype == torch.float32 else None)

    def step():
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(logits_of(model, images, text), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if opt is not None:
                opt.step()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        else:  # frozen: only the inputs' embeddings got a gradient, and they are made anew every step
            model.zero_grad(set_to_none=True)
        return loss
    return step


# --- checks -------------------------------------------------------------------------------
def check_variant(model, host_logits, images, text) -> dict:
    """At init (B = 0) the logits equal the host's without adapters, without autograd and
    with it (the timed forward), up to the kernels' rounding (`autograd_control` gives its
    scale). Moved off init (every trainable tensor + N(0, 0.02))
    the adapters change the logits, and two forwards in train mode differ only if the
    adapters' dropout acts. Restores the init."""
    model.train()
    with torch.no_grad():
        exact = (logits_of(model, images, text) - host_logits).abs().max()
    out = {"init_max_abs_diff": float(exact),
           "init_max_abs_diff_autograd": float((logits_of(model, images, text) - host_logits).detach().abs().max())}
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        saved = [p.detach().clone() for p in params]
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn(p.shape, generator=g).to(p))
            a = logits_of(model, images, text)
            b = logits_of(model, images, text)
            out["moved_max_abs_diff_from_host"] = float((a - host_logits).abs().max())
            out["dropout_in_effect"] = bool((a - b).abs().max() > 0)
            for p, s in zip(params, saved):
                p.copy_(s)
    return out


def autograd_control(host, host_logits, images, text) -> float:
    """The host alone with every attention's in_proj requiring grad, against the host:
    torch picks other kernels then (README: ~1e-7 relative), the floor of the autograd check."""
    control = copy.deepcopy(host).train()
    for m in control.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            m.in_proj_weight.requires_grad_(True)
    return float((logits_of(control, images, text) - host_logits).detach().abs().max())


# --- timing -------------------------------------------------------------------------------
def quartiles(values: list[float]) -> list[float]:
    vs = sorted(values)
    return statistics.quantiles(vs, n=4) if len(vs) > 1 else [vs[0]] * 3


def bench_cell(models: dict, images, text, labels, args, amp_dtype) -> dict:
    """One precision: every variant's step timed in shuffled paired rounds, then its peak."""
    device = args.device
    steps = {k: make_step(m, images, text, labels, device, amp_dtype) for k, m in models.items()}
    for k, f in steps.items():
        models[k].train()
        for _ in range(args.warmup):
            f()
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    times = shuffled_rounds(steps, args.rounds, args.steps, device, clock)
    ref = times.get(REFERENCE)
    peak_fn = cpu_peak_bytes if device.type == "cpu" else cuda_peak_bytes
    peaks = {k: peak_fn(f) for k, f in steps.items()}
    cell = {"autocast": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
            "reference": REFERENCE if ref else None, "step": {}, "peak_mb": {}, "peak_ratio": {}}
    for k, ts in times.items():
        row = {"ms": round(1e3 * statistics.median(ts), 1), "ms_rounds": [round(1e3 * t, 1) for t in ts]}
        if ref:
            q = quartiles([t / r for t, r in zip(ts, ref)])
            row["ratio"], row["iqr"] = round(q[1], 3), [round(q[0], 3), round(q[2], 3)]
        if "frozen" in times and k != "frozen":
            q = quartiles([t - f for t, f in zip(ts, times["frozen"])])
            row["minus_frozen_ms"] = round(1e3 * q[1], 1)
            row["minus_frozen_iqr_ms"] = [round(1e3 * q[0], 1), round(1e3 * q[2], 1)]
        cell["step"][k] = row
        cell["peak_mb"][k] = round(peaks[k] / 2**20, 1)
        if ref:
            cell["peak_ratio"][k] = round(peaks[k] / peaks[REFERENCE], 3)
    return cell


# --- report -------------------------------------------------------------------------------
def table(result: dict) -> str:
    """Per variant: trainable parameters, init check, and per cell step time and peak."""
    cells = result["cells"]
    head = "| variant | trainable | vision / text | init diff (no grad / autograd) |"
    rule = "|---|---|---|---|"
    for c in cells:
        tag = result["dtype"] if c["autocast"] is None else f"autocast {c['autocast']}"
        head += f" step ms ({tag}) | / lora (IQR) | minus frozen ms | peak MB | peak / lora |"
        rule += "---|---|---|---|---|"
    lines = [f"Step time: {result['clock']}, median over {result['rounds']} rounds; ratios: median (IQR) of "
             "per-round ratios; minus frozen: median of per-round differences; peak: one step above its start; "
             f"init diff: max abs logit difference to the host (logits up to {result['max_abs_logit']:.1f}; "
             f"autograd control {result['autograd_control_max_abs_diff']:.0e})",
             "", head, rule]
    for k, v in result["variants"].items():
        t = v["trainable"]
        line = (f"| {k} | {t['total']:,} | {t['vision']:,} / {t['text']:,} "
                f"| {v['checks']['init_max_abs_diff']:.0e} / {v['checks']['init_max_abs_diff_autograd']:.0e} |")
        for c in cells:
            s = c["step"].get(k)
            if s is None:
                line += " - | - | - | - | - |"
                continue
            ratio = f"{s['ratio']:.3f} ({s['iqr'][0]:.3f}-{s['iqr'][1]:.3f})" if "ratio" in s else "-"
            over = f"{s['minus_frozen_ms']:.0f}" if "minus_frozen_ms" in s else "-"
            pr = f"{c['peak_ratio'][k]:.3f}" if k in c["peak_ratio"] else "-"
            line += f" {s['ms']:.0f} | {ratio} | {over} | {c['peak_mb'][k]:.1f} | {pr} |"
        lines.append(line)
    return "\n".join(lines)


def write(result: dict, path: Path | None) -> None:
    if path is None:
        return
    import visionpeft as vp

    body = json.dumps(result, indent=1)
    vp.atomic_write_file(path, lambda tmp: Path(tmp).write_text(body))  # whole or not at all


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="residual blocks kept in each tower (12: all of ViT-B/16)")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--classes", type=int, default=10, help="class prompts per step")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (then wall time and CUDA peak memory)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="the weights' dtype, adapters included (autocast wants float32)")
    p.add_argument("--autocast", nargs="+", choices=["none", "float16", "bfloat16"], default=None,
                   help="precision cells: none is plain --dtype; default none on CPU, none and float16 on CUDA")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny CLIP (widths 64 / 32, 2 blocks, 32 px), batch 2, 3 classes, one round")
    p.add_argument("--output", help="the JSON (default docs/bench_fewshot_<device>_<date>.json; with --quick, none)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.quick:
        args.layers, args.batch, args.classes, args.rounds, args.steps, args.warmup = 2, 2, 3, 1, 1, 1
    if min(args.layers, args.batch, args.classes, args.rounds, args.steps) < 1 or args.warmup < 0:
        p.error("--layers, --batch, --classes, --rounds and --steps must be at least 1, --warmup at least 0")
    if args.autocast is None:
        args.autocast = ["none", "float16"] if args.device.type == "cuda" else ["none"]
    amp = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = getattr(torch, args.dtype)
    args.variants = [v for v in VARIANTS if v in args.variants]
    docs = Path(__file__).resolve().parents[1] / "docs"
    out = (Path(args.output) if args.output else None if args.quick
           else docs / f"bench_fewshot_{args.device.type}_{date.today()}.json")
    torch.set_num_threads(args.threads)
    import open_clip
    import peft

    t0 = time.perf_counter()
    host = build_host(args.quick, args.layers).to(args.device, dtype)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class {i}" for i in range(args.classes)]
    g = torch.Generator().manual_seed(1)
    size = host.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(args.batch, 3, size, size, generator=g).to(args.device, dtype)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(args.device)
    text = tokenizer([TEMPLATE.format(n) for n in names]).to(args.device)
    with torch.no_grad():
        host_logits = logits_of(host.train(), images, text)

    w = widths(host)
    result = {"date": str(date.today()), **machine(), "torch": torch.__version__,
              "open_clip": open_clip.__version__, "peft": peft.__version__, "threads": args.threads,
              "device": str(args.device),
              "gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else None,
              "dtype": args.dtype,
              "clock": ("process_time (CPU time of all threads: about threads x wall time)"
                        if args.device.type == "cpu" else "perf_counter with torch.cuda.synchronize (wall time)"),
              "host": ("tiny CLIP (open_clip.CLIP, --quick)" if args.quick
                       else "open_clip ViT-B-16, random init") + f", first {args.layers} blocks of each tower",
              "host_config": TINY if args.quick else open_clip.get_model_config("ViT-B-16"),
              "layers_per_tower": args.layers, "widths": w, "image_size": size, "batch": args.batch,
              "classes": args.classes, "prompts": [TEMPLATE.format(n) for n in names],
              "text_tokens": list(text.shape),
              "host_parameters": sum(p.numel() for p in host.parameters()),
              "recipe": {**RECIPE, "scale": RECIPE["alpha"] / RECIPE["r"] ** 0.5, "lr": LR,
                         "weight_decay": WEIGHT_DECAY, "logit_scale": LOGIT_SCALE, "optimizer": "AdamW"},
              "memory_method": MEMORY_METHOD[args.device.type],
              "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
              "max_abs_logit": float(host_logits.abs().max()),
              "autograd_control_max_abs_diff": autograd_control(host, host_logits, images, text),
              "complete": False, "variants": {}, "cells": []}
    models = {}
    for kind in args.variants:
        model = make_variant(kind, host)
        models[kind] = model
        result["variants"][kind] = {"trainable": trainable(model), "attentions": n_attention(host),
                                    "checks": check_variant(model, host_logits, images, text)}
    result["seconds"] = {"setup": round(time.perf_counter() - t0, 1)}
    write(result, out)
    print(f"setup and checks {result['seconds']['setup']:.0f} s: "
          + ", ".join(f"{k} {v['trainable']['total']:,}" for k, v in result["variants"].items()), flush=True)
    for name in args.autocast:
        t_cell = time.perf_counter()
        cell = bench_cell(models, images, text, labels, args, amp[name])
        cell["seconds"] = round(time.perf_counter() - t_cell, 1)
        result["cells"].append(cell)
        result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        write(result, out)  # after every cell: a run cut short keeps what it measured
        print(f"{name}: " + ", ".join(f"{k} {s['ms']:.0f} ms" for k, s in cell["step"].items())
              + f" ({cell['seconds']:.0f} s)", flush=True)
        gc.collect()
    result["complete"] = True
    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    write(result, out)
    print(table(result))
    if out is not None:
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
