"""Every registered method against our LoRA and PEFT's nearest relative, one process.

Hosts (random init, built here):
  vit   timm vit_base_patch16_224 (depth set by --depth), adapters on every block Linear
  unet  SD1.5-size attention: diffusers Attention layers at 64x64 latents (4096 tokens,
        dim 320) as self-attention and as cross-attention over 77 x 768 text tokens,
        adapters on to_q / to_k / to_v / to_out.0
Variants: our methods (lora, krona, block_lora, and wara / snell / snella (SNELL with SNELLA's
softmax term) / snell_compiled, snella_compiled (inside vp.kernels(compiled=True)) and
snell_compiled_gemm (the same without SNELL's C backward) when registered),
PEFT LoRA, LoKr (nearest to KronA), WaveFT (nearest to WaRA), and for SNELL a dense
masked-gradient sparse-tuning baseline (the weights themselves trainable, gradients masked
to the same sparsity: what SNELL's memory saving is measured against).
Timing and memory as in bench_core.py: paired shuffled rounds, process CPU time on CPU.
Memory three ways: the bytes saved for backward plus gradients (memory_mb); the true
peak of one forward + backward above the start, every temporary included (peak_mb: CPU
allocator events via the profiler; SNELL's scratch buffers are released first so they
count); and the peak of a whole training step, AdamW's update included, plus the moments
AdamW holds between steps (step_peak_mb; adamw_state_mb alone). Frozen weights are left
out of all three. --grad-checkpointing runs the ViT with timm's block checkpointing;
--memory-only skips the timing. --device cuda runs it on a GPU: wall time around
synchronized steps, and all three memory figures become CUDA's max_memory_allocated
above the start (memory_mb of one forward + backward, the same as peak_mb there).
--img and --width set the ViT's input size and width (toy runs; 224 and ViT-B's 768 by
default, heads = width / 64).

    python scripts/bench_methods.py --host vit unet
    python scripts/bench_methods.py --sweep --depth 1 --rounds 3 --json docs/bench_sweep.json
    python scripts/bench_methods.py --device cuda --host vit --depth 12 --batch 32 --only krona snell_compiled
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import timm
import torch
from torch import nn

import visionpeft as vp
from bench_core import emit, measure_memory, paired, step_fn, step_peak_memory

VIT_IMG = 224  # vit_base_patch16_224's own input size

VIT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
UNET_TARGETS = r".*(to_q|to_k|to_v|to_out\.0)"

# matched-ish budgets per method; a method appears only when it is registered
OUR_CONFIGS = {
    "lora": lambda t: vp.LoRAConfig(r=8, alpha=16, target_modules=[f"re:{t}"]),
    "krona": lambda t: vp.get_method("krona").config_cls(target_modules=[f"re:{t}"]),
    "block_lora": lambda t: vp.get_method("block_lora").config_cls(r=8, n_blocks=4, target_modules=[f"re:{t}"]),
    "wara": lambda t: vp.get_method("wara").config_cls(r=8, target_modules=[f"re:{t}"]),
    "loha": lambda t: vp.get_method("loha").config_cls(r=8, target_modules=[f"re:{t}"]),
    "snell": lambda t: vp.get_method("snell").config_cls(r=8, sparsity=0.9, target_modules=[f"re:{t}"]),
    "snella": lambda t: vp.get_method("snell").config_cls(r=8, sparsity=0.9, softmax_term=True,
                                                          target_modules=[f"re:{t}"]),
    "snell_compiled": lambda t: vp.get_method("snell").config_cls(r=8, sparsity=0.9, target_modules=[f"re:{t}"]),
    "snella_compiled": lambda t: vp.get_method("snell").config_cls(r=8, sparsity=0.9, softmax_term=True,
                                                                   target_modules=[f"re:{t}"]),
    "snell_compiled_gemm": lambda t: vp.get_method("snell").config_cls(r=8, sparsity=0.9,
                                                                       target_modules=[f"re:{t}"]),
}
# variants that are a setting of another method
METHOD_OF = {"snella": "snell", "snell_compiled": "snell", "snella_compiled": "snell", "snell_compiled_gemm": "snell"}
# run inside vp.kernels(compiled=True) (compiled during warm-up); the _gemm variant with
# SNELL's C backward off (ops/native.py): the dense g^T x and the compiled loops instead
COMPILED = {"snell_compiled", "snella_compiled", "snell_compiled_gemm"}
NATIVE_OFF = {"snell_compiled_gemm"}
PEFT_CONFIGS = {
    "peft_lora": lambda peft, t: peft.LoraConfig(r=8, lora_alpha=16, target_modules=t),
    "peft_lokr": lambda peft, t: peft.LoKrConfig(r=8, alpha=16, target_modules=t),
    "peft_loha": lambda peft, t: peft.LoHaConfig(r=8, alpha=8, target_modules=t),
    "peft_waveft": lambda peft, t: peft.WaveFTConfig(target_modules=t),
}


class SDAttention(nn.Module):
    """An SD1.5 down-block-1 pair: self-attention and cross-attention at dim 320."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn1 = Attention(320, heads=8, dim_head=40)
        self.attn2 = Attention(320, cross_attention_dim=768, heads=8, dim_head=40)
        self.head = nn.Linear(320, 10)

    def forward(self, x, context):
        x = x + self.attn1(x)
        x = x + self.attn2(x, encoder_hidden_states=context)
        return self.head(x.mean(1))


def build_host(host: str, depth: int, img: int = VIT_IMG, width: int | None = None):
    torch.manual_seed(0)
    if host == "vit":
        # sizes passed only when they differ, so the default build is the one it always was
        kw = {} if img == VIT_IMG else {"img_size": img}
        if width is not None:
            kw.update(embed_dim=width, num_heads=max(1, width // 64))
        return (timm.create_model("vit_base_patch16_224", pretrained=False, depth=depth, num_classes=10, **kw),
                VIT_TARGETS)
    return SDAttention(), UNET_TARGETS


def host_inputs(host: str, batch: int, img: int = VIT_IMG, device=torch.device("cpu")):
    # drawn on the CPU generator, then moved: the same numbers on every device
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (batch,), generator=g)
    if host == "vit":
        xs = (torch.randn(batch, 3, img, img, generator=g),)
    else:
        xs = (torch.randn(batch, 4096, 320, generator=g), torch.randn(batch, 77, 768, generator=g))
    return tuple(t.to(device) for t in xs), y.to(device)


def dense_masked(model: nn.Module, targets: str, sparsity: float) -> nn.Module:
    """Sparse tuning the classic way: target weights trainable in full, gradients masked."""
    import re

    model.requires_grad_(False)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and re.fullmatch(targets, name):
            m.weight.requires_grad_(True)
            keep = (torch.rand_like(m.weight) >= sparsity).to(m.weight.dtype)
            m.weight.register_hook(lambda g, keep=keep: g * keep)
    return model


def make(kind: str, host: str, depth: int, grad_checkpointing: bool = False, img: int = VIT_IMG,
         device=torch.device("cpu"), width: int | None = None):
    model, targets = build_host(host, depth, img, width)
    # moved before the adapters go in: they are built on their base layer's device, and
    # dense_masked's masks on the weight's
    model = model.to(device)
    if grad_checkpointing:
        if host != "vit":
            raise SystemExit("--grad-checkpointing applies to the vit host (timm's set_grad_checkpointing)")
        model.set_grad_checkpointing(True)
    if kind in OUR_CONFIGS:
        return vp.inject(model, OUR_CONFIGS[kind](targets))
    if kind == "dense_sparse":
        return dense_masked(model, targets, 0.9)
    import peft

    return peft.get_peft_model(model, PEFT_CONFIGS[kind](peft, targets))


def compiled_kernels(fn, on: bool = True, native: bool = True):
    """fn run inside vp.kernels(compiled=on, native=native)."""

    def run():
        with vp.kernels(compiled=on, native=native):
            return fn()
    return run


def run_host(args, host: str) -> dict:
    kinds = [k for k in OUR_CONFIGS if METHOD_OF.get(k, k) in vp.list_methods()] + list(PEFT_CONFIGS)
    if args.only:  # the two references always run: every ratio is taken against them
        kinds = [k for k in kinds if k in ("lora", "peft_lora", *args.only)]
    if "snell" in kinds:
        kinds.append("dense_sparse")
    device = args.device
    models = {k: make(k, host, args.depth, args.grad_checkpointing, args.img, device, args.width) for k in kinds}
    xs, y = host_inputs(host, args.batch, args.img, device)
    steps = {}
    opt_state, opts = {}, {}
    for k, m in models.items():
        m.train()
        opt = opts[k] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        steps[k] = step_fn(m, xs, y, opt, unpack=True)
        if k in COMPILED:
            steps[k] = compiled_kernels(steps[k], native=k not in NATIVE_OFF)
        for _ in range(max(1, args.warmup)):
            steps[k]()
        opt_state[k] = sum(t.numel() * t.element_size() for st in opt.state.values()
                           for t in st.values() if torch.is_tensor(t))
    timing = {} if args.memory_only else paired(steps, "lora", args.rounds, args.steps, device, args.clock_fn)
    mem = {k: compiled_kernels(lambda: measure_memory(m, xs, y, device, unpack=True),
                               k in COMPILED, k not in NATIVE_OFF)() for k, m in models.items()}
    peak, step_peak = {}, {}
    for k, m in models.items():
        for out, opt in ((peak, None), (step_peak, opts[k])):
            vp.release_scratch()
            out[k] = compiled_kernels(lambda: step_peak_memory(m, xs, y, unpack=True, opt=opt, device=device),
                                      k in COMPILED, k not in NATIVE_OFF)()
    peft_ms = timing["peft_lora"]["ms"] if timing else None
    return {"host": host, "batch": args.batch, "grad_checkpointing": args.grad_checkpointing,
            "step": {k: {**v, "vs_peft_lora": round(v["ms"] / peft_ms, 3)} for k, v in timing.items()},
            "memory_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
            "memory_vs_lora": {k: round(v / mem["lora"], 3) for k, v in mem.items()},
            "peak_mb": {k: round(v / 2**20, 1) for k, v in peak.items()},
            "peak_vs_lora": {k: round(v / peak["lora"], 3) for k, v in peak.items()},
            "step_peak_mb": {k: round((v + opt_state[k]) / 2**20, 1) for k, v in step_peak.items()},
            "step_peak_vs_dense_sparse": ({k: round((v + opt_state[k]) / (step_peak["dense_sparse"]
                                                                        + opt_state["dense_sparse"]), 3)
                                           for k, v in step_peak.items()} if "dense_sparse" in step_peak else {}),
            # what AdamW keeps between steps (two moments per trainable value), which the
            # memory figure above leaves out; SNELL's paper counts it
            "adamw_state_mb": {k: round(v / 2**20, 1) for k, v in opt_state.items()},
            "trainable": {k: sum(p.numel() for p in m.parameters() if p.requires_grad)
                          for k, m in models.items()}}


# --sweep: ViT widths (heads = width / 64, as ViT-S/B/L have) x batches, so that no ratio
# hides a fixed per-layer cost behind wide layers; each method against our LoRA and PEFT's
# nearest relative (SNELL: dense masked sparse tuning, what it replaces)
SWEEP_WIDTHS = {"ViT-S": 384, "ViT-B": 768, "ViT-L": 1024}
SWEEP_BATCHES = (1, 4, 32)
NEAREST = {"lora": "peft_lora", "block_lora": "peft_lora", "krona": "peft_lokr", "wara": "peft_waveft",
           "loha": "peft_loha", "snell": "dense_sparse"}


def sweep(args) -> dict:
    """Every (width, batch) of the sweep as one run_host each; tables per method."""
    import copy

    runs = []
    wanted = args.only or list(NEAREST)
    for label, width in SWEEP_WIDTHS.items():
        if args.sweep_widths and label not in args.sweep_widths:
            continue
        for batch in SWEEP_BATCHES:
            a = copy.copy(args)
            a.width, a.batch = width, batch
            a.only = sorted({*wanted, *(NEAREST[m] for m in wanted if m in NEAREST)} - {"dense_sparse"})
            print(f"sweep: {label} (width {width}) batch {batch}", flush=True)
            runs.append({"vit": label, "width": width, **run_host(a, "vit")})
            if args.json:  # written after every size, so a long sweep cut short keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump({"partial": True, "runs": runs}, fh, indent=1)
    tables = {}
    for m in wanted:
        ref = NEAREST.get(m)
        rows = []
        for r in runs:
            if m not in r["step"] and not r["peak_mb"].get(m):
                continue
            ms = r["step"].get(m, {}).get("ms")
            ref_ms = r["step"].get(ref, {}).get("ms") if ref else None
            rows.append({"vit": r["vit"], "batch": r["batch"],
                         "step_vs_lora": r["step"].get(m, {}).get("ratio"),
                         "step_vs_nearest": round(ms / ref_ms, 3) if ms and ref_ms else None,
                         "peak_vs_lora": r["peak_vs_lora"].get(m),
                         "peak_vs_nearest": (round(r["peak_mb"][m] / r["peak_mb"][ref], 3)
                                             if ref in r["peak_mb"] and r["peak_mb"][ref] else None),
                         "step_peak_mb": r["step_peak_mb"].get(m)})
        tables[m] = {"nearest": ref, "rows": rows}
    return {"runs": runs, "tables": tables}


def sweep_markdown(tables: dict) -> str:
    """One table per method: step time and fwd+bwd peak memory against our LoRA and the
    nearest other method, for each ViT width and batch."""
    out = []
    for m, t in tables.items():
        out += [f"**{m}** (nearest: {t['nearest']})", "",
                "| ViT | batch | step / our LoRA | step / nearest | peak / our LoRA | peak / nearest |",
                "|---|---|---|---|---|---|"]
        for r in t["rows"]:
            cells = [r["step_vs_lora"], r["step_vs_nearest"], r["peak_vs_lora"], r["peak_vs_nearest"]]
            out.append(f"| {r['vit']} | {r['batch']} | " + " | ".join("-" if c is None else f"{c:.2f}"
                                                                      for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    import time

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", nargs="+", default=["vit", "unet"], choices=["vit", "unet"])
    p.add_argument("--depth", type=int, default=2, help="ViT-B/16 blocks (12 for the full model)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default=None,
                   help="process CPU time (steadier on a shared VM; the default on CPU) or wall-clock "
                        "time (the default on CUDA, around synchronized steps)")
    p.add_argument("--device", default="cpu", help="cpu (the default) or cuda")
    p.add_argument("--img", type=int, default=VIT_IMG, help="ViT input size (vit host)")
    p.add_argument("--width", type=int, default=None, help="ViT width (vit host; default ViT-B's 768)")
    p.add_argument("--only", nargs="+", help="variants to run besides lora and peft_lora")
    p.add_argument("--memory-only", action="store_true", help="measure memory, skip the timing rounds")
    p.add_argument("--grad-checkpointing", action="store_true", help="timm block checkpointing (vit host)")
    p.add_argument("--sweep", action="store_true",
                   help="ViT-S/B/L widths x batch 1, 4, 32 (at --depth), a table per method; --only picks methods")
    p.add_argument("--sweep-widths", nargs="+", choices=list(SWEEP_WIDTHS), help="only these widths of the sweep")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    on_cuda = args.device.type == "cuda"
    args.clock = args.clock or ("wall" if on_cuda else "cpu")
    args.clock_fn = time.process_time if args.clock == "cpu" else time.perf_counter
    result = {"date": str(date.today()), "machine": platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "clock": args.clock, "depth": args.depth}
    # keys a CPU run at the default size never had are added only when they say something
    if args.device.type != "cpu":
        result["device"] = str(args.device)
        result["gpu"] = torch.cuda.get_device_name(args.device) if on_cuda else None
        result["memory"] = "max_memory_allocated above the start (memory_mb = peak_mb: one forward + backward)"
    if args.img != VIT_IMG:
        result["img"] = args.img
    if args.width is not None:
        result["width"] = args.width
    if args.sweep:
        result["sweep"] = sweep(args)
        emit(result, args.json)
        print(sweep_markdown(result["sweep"]["tables"]))
        return result
    result["hosts"] = [run_host(args, h) for h in args.host]
    return emit(result, args.json)


if __name__ == "__main__":
    main()
