"""Pretrain the embedded encoder and write its weights into the package.

Two stages on procedural scenes (visionpeft.train.pretrain), each through the shared
training loop (checkpoints, exact resume, metrics.jsonl, loss.png): ``mae`` (masked
autoencoding + scene-type head, from random init) then ``dense`` (per-pixel land cover
from two blocks + scene-type head, from the MAE encoder). The last stage's encoder (timm
keys) goes to visionpeft/backbones/weights/<name>.safetensors, the curves to docs/.
Seeded throughout (scenes, init, data order, masks).

    python scripts/pretrain_embedded.py                       # the shipped weights (~80 min, 2 cores)
    python scripts/pretrain_embedded.py --stages dense --init mae_encoder.safetensors
    python scripts/pretrain_embedded.py --steps 20 --dense-steps 10 --pool 500 --weights /tmp/w.safetensors
"""
from __future__ import annotations

import argparse
import hashlib
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
DENSE_STEPS, DENSE_LR = 600, 5e-4


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
    p.add_argument("--stages", nargs="+", default=["mae", "dense"], choices=["mae", "dense"])
    p.add_argument("--init", default=None, help="encoder file the first stage starts from (dense alone needs it)")
    p.add_argument("--steps", type=int, default=2400, help="MAE stage")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="MAE stage")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--dense-steps", type=int, default=DENSE_STEPS)
    p.add_argument("--dense-lr", type=float, default=DENSE_LR)
    p.add_argument("--pool", type=int, default=20000, help="scenes generated once, then augmented")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-dir", default=str(ROOT / "output" / "pretrain-embedded"))
    p.add_argument("--resume", default=None, choices=["latest"],
                   help="go on from each stage's last checkpoint (a finished stage is skipped over)")
    p.add_argument("--weights", default=None, help="where the encoder goes (default: the package)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the loss curve and log go ('' = nowhere)")
    args = p.parse_args(argv)
    if args.stages not in (["mae"], ["dense"], ["mae", "dense"]):
        p.error(f"--stages {' '.join(args.stages)}: give mae, dense, or mae dense (in that order, each once)")
    if args.init and not Path(args.init).is_file():
        p.error(f"--init {args.init} is not a file; give the encoder safetensors the first stage starts from")
    if args.stages[0] == "dense" and not args.init:
        p.error("--stages dense starts from an MAE encoder: give --init FILE (or run --stages mae dense)")
    torch.set_num_threads(args.threads)
    target = Path(args.weights) if args.weights else weights_file(ALIASES[args.model])
    init, meta, curves = args.init, {}, {}
    for stage in args.stages:
        steps, lr = (args.steps, args.lr) if stage == "mae" else (args.dense_steps, args.dense_lr)
        out = Path(args.output_dir) / stage
        task = PretrainTask(PretrainConfig(model=args.model, pool_size=args.pool, objective=stage,
                                           init_weights=init))
        loop = TrainConfig(output_dir=str(out), seed=args.seed, max_train_steps=steps,
                           train_batch_size=args.batch, learning_rate=lr, lr_scheduler="cosine",
                           lr_warmup_steps=min(args.warmup, steps), adam_beta2=0.95,
                           adam_weight_decay=0.05, max_grad_norm=1.0,
                           checkpointing_steps=max(1, min(500, steps)), checkpoints_total_limit=2,
                           resume_from_checkpoint=args.resume, cpu=not torch.cuda.is_available())
        train(task, loop)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        stage_file = out / "encoder.safetensors"  # each stage's encoder stays, for the next or a rerun
        write_atomic(encoder_state_dict(out / "adapter" / f"{stage}.safetensors"), stage_file, {})
        init = str(stage_file)
        meta[stage] = {"steps": steps, "lr": lr, "final_loss": round(rows[-1]["loss"], 4)}
        every = max(1, len(rows) // 60)  # a readable curve, not every step
        curves[stage] = rows[::every] + rows[-1:]
        if args.docs and (out / "loss.png").is_file():
            Path(args.docs).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "loss.png", Path(args.docs) / f"embedded_loss_{stage}.png")
    settings = {"model": args.model, "stages": " ".join(args.stages), "batch": args.batch, "seed": args.seed,
                "pool": args.pool, **{f"{s}_{k}": v for s, m in meta.items() for k, v in m.items()}}
    if args.init:  # where the first stage started: the file and its bytes
        settings.update(init=args.init, init_sha256=hashlib.sha256(Path(args.init).read_bytes()).hexdigest())
    write_atomic(encoder_state_dict(Path(args.output_dir) / args.stages[-1] / "adapter"
                                    / f"{args.stages[-1]}.safetensors"), target, settings)
    if args.docs:
        log = Path(args.docs) / "embedded_pretrain.json"
        # a run of one stage keeps the other stage's record (the docs describe both)
        old = json.loads(log.read_text()) if log.is_file() else {}
        stages = {**old.get("stages_run", {}), **{s: {**m, "date": str(date.today()), "curve": curves[s]}
                                                  for s, m in meta.items()}}
        record = {k: v for k, v in settings.items() if not k.startswith(tuple(f"{s}_" for s in meta))}
        log.write_text(json.dumps({**record, "stages_run": stages}, indent=1))
    size = target.stat().st_size / 2 ** 20
    print(f"encoder weights: {target} ({size:.1f} MB); final loss {rows[-1]['loss']:.4f}")
    return target


if __name__ == "__main__":
    main()
