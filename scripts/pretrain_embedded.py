"""Pretrain the embedded encoder and write its weights into the package.

MAE + scene-type head on procedural scenes (visionpeft.train.pretrain), through the
shared training loop (checkpoints, exact resume, metrics.jsonl, loss.png), then the
encoder's timm state dict goes to visionpeft/backbones/weights/<name>.safetensors and
the loss curve to docs/. Seeded throughout (scenes, init, data order, masks).

    python scripts/pretrain_embedded.py                      # the shipped weights (~1 h CPU)
    python scripts/pretrain_embedded.py --steps 20 --pool 500 --weights /tmp/w.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

from visionpeft.backbones.embedded import ALIASES, EMBEDDED, weights_file
from visionpeft.train import PretrainConfig, PretrainTask, TrainConfig, encoder_state_dict, train

ROOT = Path(__file__).resolve().parents[1]


def write_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the package file is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded-vit-s", choices=sorted(EMBEDDED))
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--pool", type=int, default=20000, help="scenes generated once, then augmented")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default=str(ROOT / "output" / "pretrain-embedded"))
    p.add_argument("--resume", default=None, help="'latest' to go on from the last checkpoint")
    p.add_argument("--weights", default=None, help="where the encoder goes (default: the package)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the loss curve and log go ('' = nowhere)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = PretrainTask(PretrainConfig(model=args.model, pool_size=args.pool))
    loop = TrainConfig(output_dir=args.output_dir, seed=args.seed, max_train_steps=args.steps,
                       train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler="cosine",
                       lr_warmup_steps=min(args.warmup, args.steps), adam_beta2=0.95,
                       adam_weight_decay=0.05, max_grad_norm=1.0,
                       checkpointing_steps=max(1, min(500, args.steps)), checkpoints_total_limit=2,
                       resume_from_checkpoint=args.resume, cpu=not torch.cuda.is_available())
    train(task, loop)
    out = Path(args.output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    encoder = encoder_state_dict(out / "adapter" / "mae.safetensors")
    target = Path(args.weights) if args.weights else weights_file(ALIASES[args.model])
    meta = {"model": args.model, "steps": args.steps, "batch": args.batch, "seed": args.seed,
            "pool": args.pool, "lr": args.lr, "date": str(date.today()),
            "final_loss": round(rows[-1]["loss"], 4)}
    write_atomic(encoder, target, meta)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        if (out / "loss.png").is_file():
            shutil.copyfile(out / "loss.png", docs / "embedded_loss.png")
        every = max(1, len(rows) // 60)  # a readable curve, not every step
        (docs / "embedded_pretrain.json").write_text(json.dumps(
            {**meta, "curve": rows[::every] + rows[-1:]}, indent=1))
    size = target.stat().st_size / 2 ** 20
    print(f"encoder weights: {target} ({size:.1f} MB); final loss {rows[-1]['loss']:.4f}")
    return target


if __name__ == "__main__":
    main()
