"""PeftCD training step and sliding-window inference: LoRA, KronA and the bottleneck
Adapter on the encoder against a frozen encoder (decoder only), on SAM2 Hiera-B+ and DINOv3 ViT-B sizes with
random weights (built here; nothing downloaded).

    python scripts/bench_cd.py --image-size 128 --rounds 5
    python scripts/bench_cd.py --image-size 256 --batch 8      # on a GPU (picked when present)

``--toy`` shrinks both encoders (same timm classes, a few blocks, widths 32 / 64) for
smoke runs; ``--device`` overrides the choice of CUDA when present.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import timm
import torch

import visionpeft as vp
from bench_core import emit, loss_memory, paired
from visionpeft.pipelines.change_detection import Detector, predict_probs
from visionpeft.pipelines.change_detection.model import SiameseChangeDetector

ENCODERS = {"hiera_b+": "sam2_hiera_base_plus", "dinov3_vit_b": "vit_base_patch16_dinov3"}
VARIANTS = {
    "lora": lambda: vp.LoRAConfig(r=8, alpha=32, target_modules=["qkv"]),
    "krona": lambda: vp.KronAConfig(target_modules=["qkv"]),
    # PeftCD's bottleneck adapter (32) before every block
    "adapter": lambda: vp.AdapterConfig(bottleneck=32, position="input",
                                        target_modules=vp.presets.TIMM_BLOCKS),
    "frozen": None,
}
# --toy: the same timm classes cut down (Hiera: one block per stage but a global one in
# stage 3, which must not be a pooling block; DINOv3: 2 blocks of width 64); widths of at
# least 32, the Adapter variant's bottleneck
TOY = {"hiera_b+": dict(embed_dim=32, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                        window_spec=(4, 4, 4, 4), global_pos_size=(4, 4)),
       "dinov3_vit_b": dict(depth=2, embed_dim=64, num_heads=2)}


def build(encoder: str, variant: str, size: int, toy: bool = False) -> Detector:
    torch.manual_seed(0)
    kw = {"img_size": size} if "dinov3" in encoder else {}
    if toy:
        kw.update(TOY[encoder])
    host = timm.create_model(ENCODERS[encoder], pretrained=False, num_classes=0, **kw).requires_grad_(False)
    if VARIANTS[variant] is not None:
        vp.inject(host, VARIANTS[variant]())
    return Detector(host, size, 64, "layer")


def step_memory(model, a, b, label) -> int:
    params = [q for q in model.parameters() if q.requires_grad]
    peak = loss_memory(lambda: SiameseChangeDetector.loss(model(a, b), label), params, a.device)
    model.zero_grad(set_to_none=True)
    return peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--toy", action="store_true", help="tiny encoders of the same classes, for smoke runs")
    p.add_argument("--json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    s = args.image_size
    a, b = (torch.rand(args.batch, 3, s, s, generator=g).to(device) for _ in range(2))
    label = (torch.rand(args.batch, s, s, generator=g) > 0.9).long().to(device)
    result = {"date": str(date.today()), "machine": platform.machine(), "device": str(device),
              "torch": torch.__version__, "threads": args.threads, "image_size": s, "batch": args.batch,
              "encoders": {}}
    if device.type == "cuda":  # keys CPU runs at full size never had
        result["gpu"] = torch.cuda.get_device_name(device)
    if args.toy:
        result["toy"] = True
    for enc in args.encoders:
        models = {v: build(enc, v, s, args.toy).to(device).train() for v in VARIANTS}
        steps = {}
        for v, m in models.items():
            opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)

            def step(m=m, opt=opt):
                SiameseChangeDetector.loss(m(a, b), label).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            steps[v] = step
            step()
        timing = paired(steps, "lora", args.rounds, 1, device, clock)
        memory = {v: step_memory(mm, a, b, label) for v, mm in models.items()}
        m = models["lora"].eval()
        big = torch.rand(1, 3, 2 * s, 2 * s, generator=g).to(device)
        t0 = clock()
        predict_probs(m, big, big, s, s // 2)
        if device.type == "cuda":  # the windows' kernels done before the clock is read
            torch.cuda.synchronize()
        tiles = 9  # (2s / (s/2) - 1)^2 windows of a 2s x 2s image at half-tile stride
        result["encoders"][enc] = {
            "step": timing,
            "memory_mb": {v: round(x / 2**20, 1) for v, x in memory.items()},
            "trainable": {v: sum(q.numel() for q in mm.parameters() if q.requires_grad) for v, mm in models.items()},
            "sliding_window_tiles_per_s": round(tiles / (clock() - t0), 3)}
    return emit(result, args.json)


if __name__ == "__main__":
    main()
