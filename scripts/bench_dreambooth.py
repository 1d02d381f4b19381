"""DreamBooth training step: our adapters against the diffusers example's LoRA (PEFT
layers added with ``unet.add_adapter``, as train_dreambooth_lora.py does).

The step is the example's: noise and timesteps drawn, latents noised, the UNet predicts
the noise, MSE, backward, AdamW step. Latents and text embeddings are fixed random
tensors of the right shapes (the frozen VAE and text encoder cost the same for every
variant). UNet: the SD1.5 configuration, random init, built here. On CPU the image size
is reduced (``--resolution``); on CUDA use 512 and ``--dtype bf16``.

    python scripts/bench_dreambooth.py --resolution 256 --rounds 5
    python scripts/bench_dreambooth.py --resolution 512 --dtype bf16    # on a GPU

``--unet toy`` builds a two-level UNet of the same block kinds (bench_switch.toy_unet)
for smoke runs; ``--device`` overrides the choice of CUDA when present.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F

import visionpeft as vp
from bench_core import emit, loss_memory, paired
from bench_switch import UNETS

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
OURS = {
    "lora": lambda: vp.LoRAConfig(r=4, target_modules=TARGETS),
    "krona": lambda: vp.KronAConfig(target_modules=TARGETS),
    "wara": lambda: vp.WaRAConfig(r=4, target_modules=TARGETS),
}


def build(kind: str, device, dtype, unet_kind: str = "sd15"):
    unet = UNETS[unet_kind]().requires_grad_(False)
    if kind == "peft_lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    else:
        vp.inject(unet, OURS[kind]())
    unet.to(device)
    for p in unet.parameters():  # as the example: trainable parameters in fp32, the rest in dtype
        p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
    return unet


def step_fn(unet, latents, text, device, dtype):
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)

    def step():
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g).to(device)
        noisy = latents + noise * (t.float().view(-1, 1, 1, 1) / 1000)  # schedule-independent cost
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noisy.to(dtype), t, text.to(dtype)).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def saved_bytes(unet, latents, text, dtype) -> int:
    params = [p for p in unet.parameters() if p.requires_grad]
    t = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)

    def loss():
        with torch.autocast(latents.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return unet(latents.to(dtype), t, text.to(dtype)).sample.float().square().mean()

    peak = loss_memory(loss, params, latents.device)
    unet.zero_grad(set_to_none=True)
    return peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--variants", nargs="+", default=["lora", "peft_lora", "krona", "wara"])
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--unet", choices=list(UNETS), default="sd15", help="toy: a small UNet for smoke runs")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # the models first: their init draws from the global seed, the inputs from g alone, so
    # the order changes no number; the text width is the UNet's own
    models = {k: build(k, device, dtype, args.unet) for k in args.variants}
    text_dim = next(iter(models.values())).config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    side = args.resolution // 8
    latents = torch.randn(args.batch, 4, side, side, generator=g).to(device)
    text = torch.randn(args.batch, 77, text_dim, generator=g).to(device)
    steps = {k: step_fn(m, latents, text, device, dtype) for k, m in models.items()}
    for fn in steps.values():
        fn()  # warm-up
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    timing = paired(steps, "lora", args.rounds, args.steps, device, clock)
    mem = {k: saved_bytes(m, latents, text, dtype) for k, m in models.items()}
    result = {"date": str(date.today()), "machine": platform.machine(), "device": str(device),
              "torch": torch.__version__, "threads": args.threads, "clock": "cpu" if device.type == "cpu" else "wall",
              "unet": "SD1.5 config, random init" if args.unet == "sd15" else "toy UNet config, random init",
              "resolution": args.resolution, "batch": args.batch,
              "dtype": args.dtype,
              "step": {k: {**v, "steps_per_s": round(1e3 / v["ms"], 4)} for k, v in timing.items()},
              "memory_mb": {k: round(v / 2**20, 1) for k, v in mem.items()},
              "memory_vs_lora": {k: round(v / mem["lora"], 3) for k, v in mem.items()},
              "trainable": {k: sum(q.numel() for q in m.parameters() if q.requires_grad) for k, m in models.items()}}
    if device.type == "cuda":  # which GPU: a key CPU runs never had
        result["gpu"] = torch.cuda.get_device_name(device)
    return emit(result, args.json)


if __name__ == "__main__":
    main()
