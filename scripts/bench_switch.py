"""Adapter switching cost with 1, 10 and 100 LoRAs loaded on an SD1.5-size UNet.

A switch is ``vp.set_active(model, [name])`` plus ``vp.set_scale(model, name, s)``; the
same model with the same adapters under diffusers (PEFT layers added with
``unet.add_adapter``) switches with ``unet.set_adapters([name], [s])``. The UNet is the
SD1.5 configuration with random weights (built here; nothing is downloaded); adapters are
LoRA r 4 on every attention to_q / to_k / to_v / to_out.0 (128 layers).

    python scripts/bench_switch.py --counts 1 10 100 --diffusers-counts 1 10
    python scripts/bench_switch.py --device cuda          # the UNet and its adapters on a GPU

``--unet toy`` builds a two-level UNet of the same block kinds (32 / 64 channels, text
dim 32) for smoke runs; ``--device cuda`` times each switch up to a synchronize.
"""
from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from datetime import date

import torch
from tqdm import tqdm

import visionpeft as vp
from bench_core import emit

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(  # the SD1.5 configuration
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def toy_unet():
    """The SD1.5 UNet's block kinds at toy size (to_q / to_k / to_v / to_out.0 in every
    attention), text embeddings of dim 32; for smoke runs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


UNETS = {"sd15": sd15_unet, "toy": toy_unet}


def _no_sync():
    pass


def time_switches(switch, names, n: int, sync=_no_sync) -> dict:
    rng = random.Random(0)
    times = []
    for _ in range(n):
        name = rng.choice(names)
        t0 = time.perf_counter()
        switch(name)
        sync()  # on CUDA: any kernel a switch launched is counted
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": round(1e3 * statistics.median(times), 4),
            "p90_ms": round(1e3 * times[int(0.9 * len(times))], 4)}


def ours(unet, count: int, switches: int, sync=_no_sync) -> dict:
    have = len(vp.adapter_names(unet))
    for i in tqdm(range(have, count), desc=f"visionpeft: inject up to {count}", leave=False):
        vp.inject(unet, vp.LoRAConfig(r=4, target_modules=TARGETS), name=f"a{i}")
    names = [f"a{i}" for i in range(count)]

    def switch(name):
        vp.set_active(unet, [name])
        vp.set_scale(unet, name, 0.8)

    return time_switches(switch, names, switches, sync)


def theirs(unet, count: int, switches: int, sync=_no_sync) -> dict:
    from peft import LoraConfig

    have = len(getattr(unet, "peft_config", {}) or {})
    for i in tqdm(range(have, count), desc=f"diffusers: add up to {count}", leave=False):
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(count)]
    return time_switches(lambda name: unet.set_adapters([name], [0.8]), names, switches, sync)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--diffusers-counts", type=int, nargs="*", default=[1, 10])
    p.add_argument("--switches", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where the UNet and its adapters live: cpu (the default) or cuda")
    p.add_argument("--unet", choices=list(UNETS), default="sd15", help="toy: a small UNet for smoke runs")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else _no_sync
    build = UNETS[args.unet]
    result = {"date": str(date.today()), "machine": platform.machine(), "torch": torch.__version__,
              "host": "SD1.5 UNet config, random init" if args.unet == "sd15" else "toy UNet config, random init",
              "adapters": "LoRA r 4 on 128 attention Linears" if args.unet == "sd15" else
              "LoRA r 4 on every attention to_q / to_k / to_v / to_out.0"}
    if device.type != "cpu":  # a key a CPU run never had
        result["device"] = str(device)
        result["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result.update({"visionpeft": {}, "diffusers": {}})
    unet = build().requires_grad_(False).to(device)
    for c in sorted(args.counts):
        result["visionpeft"][c] = ours(unet, c, args.switches, sync)
    del unet
    if args.diffusers_counts:
        unet = build().requires_grad_(False).to(device)
        for c in sorted(args.diffusers_counts):
            result["diffusers"][c] = theirs(unet, c, max(10, args.switches // 10), sync)
    return emit(result, args.json)


if __name__ == "__main__":
    main()
