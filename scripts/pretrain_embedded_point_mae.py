"""Pretrain the embedded Point-MAE and write its encoder into the package.

Point-MAE's masked point modelling (task ``pretrain_point_mae``, visionpeft.train.pretrain_points)
on the eight pretraining shapes of visionpeft.data.shapes, through the shared training loop
(checkpoints, exact resume, metrics.jsonl, loss.png); AdamW with Point-MAE's weight decay
0.05 (none on 1-D tensors, biases and the mask token) and a cosine schedule after a
warm-up. The encoder's tensors (the ``MAE_encoder.*`` keys of Point-MAE's pretrain.pth) go
to visionpeft/backbones/weights/embedded_point_mae.safetensors, which
`build_point_mae(checkpoint_path=...)` reads like the released file; the curve and the
settings go to docs/.

    python scripts/pretrain_embedded_point_mae.py                    # the shipped weights (~55 min, 2 cores)
    python scripts/pretrain_embedded_point_mae.py --steps 20 --pool 200 --weights /tmp/w.safetensors --docs ''
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft.backbones import embedded_point_mae as emb
from visionpeft.data.shapes import HELD_OUT_SHAPES, PRETRAIN_SHAPES
from visionpeft.train import TrainConfig, train
from visionpeft.train.pretrain_points import PointPretrainConfig, PointPretrainTask

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 20 * 2 ** 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4, help="Point-MAE's 1e-3 is for batch 128")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--pool", type=int, default=20000, help="clouds per epoch (each drawn from the data seed and "
                                                          "its index)")
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order, masks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default=str(ROOT / "output" / "pretrain-embedded-point-mae"))
    p.add_argument("--resume", default=None, choices=["latest"], help="go on from the last checkpoint")
    p.add_argument("--weights", default=None, help="where the encoder goes (default: the package)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the curve and settings go ('' = nowhere)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pool", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    torch.set_num_threads(args.threads)
    target = Path(args.weights) if args.weights else emb.WEIGHTS_FILE
    out = Path(args.output_dir)
    cfg = PointPretrainConfig(pool_size=args.pool, data_seed=args.data_seed, num_points=emb.GROUPS["num_points"],
                              num_group=emb.GROUPS["num_group"], group_size=emb.GROUPS["group_size"], **emb.SIZE)
    loop = TrainConfig(output_dir=str(out), seed=args.seed, max_train_steps=args.steps, train_batch_size=args.batch,
                       learning_rate=args.lr, lr_scheduler="cosine", lr_warmup_steps=min(args.warmup, args.steps),
                       lr_min=1e-6, adam_weight_decay=0.05, max_grad_norm=10.0,
                       checkpointing_steps=max(1, min(500, args.steps)), checkpoints_total_limit=2,
                       resume_from_checkpoint=args.resume, cpu=not torch.cuda.is_available())
    start = time.time()
    train(PointPretrainTask(cfg), loop)
    wall = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    state = load_file(str(out / "adapter" / "point_mae.safetensors"))
    encoder = {k: v.contiguous() for k, v in state.items() if k.startswith("MAE_encoder.")}
    size = sum(v.numel() * v.element_size() for v in encoder.values())
    if size > MAX_BYTES:
        raise SystemExit(f"the encoder is {size / 2 ** 20:.1f} MB, over the 20 MB the package may hold")
    settings = {"model": emb.NAME, "objective": "masked point modelling, L2 Chamfer (Point-MAE)", **emb.SIZE,
                **emb.GROUPS, "mask_ratio": cfg.mask_ratio, "decoder_depth": cfg.decoder_depth,
                "steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": min(args.warmup, args.steps),
                "weight_decay": 0.05, "pool": args.pool, "data_seed": args.data_seed, "seed": args.seed,
                "shapes": " ".join(PRETRAIN_SHAPES), "held_out": " ".join(HELD_OUT_SHAPES), "date": str(date.today())}
    vp.atomic_write_file(target, lambda tmp: save_file(encoder, tmp, metadata={k: str(v) for k, v in
                                                                               settings.items()}))
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    final = rows[-1]
    summary = {**settings, "wall_clock_s": round(wall), "resumed": bool(args.resume),
               "final_loss": round(final["loss"], 5), "size_bytes": target.stat().st_size, "sha256": sha}
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        every = max(1, len(rows) // 60)
        curve = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows[::every]]
        body = json.dumps({**summary, "curve": curve + rows[-1:]}, indent=1)
        vp.atomic_write_file(docs / "embedded_point_mae_pretrain.json", lambda tmp: Path(tmp).write_text(body))
        if (out / "loss.png").is_file():
            vp.atomic_write_file(docs / "embedded_point_mae_loss.png",
                                 lambda tmp: shutil.copyfile(out / "loss.png", tmp))
    print(f"embedded Point-MAE encoder: {target} ({target.stat().st_size / 2 ** 20:.1f} MB, sha256 {sha})")
    print(f"{args.steps} steps in {wall / 60:.1f} min; final Chamfer L2 {final['loss']:.5f}")
    return summary


if __name__ == "__main__":
    main()
