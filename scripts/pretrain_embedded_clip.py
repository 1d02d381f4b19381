"""Pretrain the embedded CLIP (`embedded-clip`) and write its weights into the package.

Contrastive image-text pretraining from scratch (task ``pretrain_clip``,
visionpeft/train/pretrain_clip.py) on captioned procedural scenes of the six pretraining
types, through the shared training loop (checkpoints, exact resume, metrics.jsonl,
loss.png). Then the model's full open_clip state_dict goes atomically to
visionpeft/backbones/weights/embedded_clip.safetensors (the settings in its metadata),
the curve and settings to docs/embedded_clip_pretrain.json (+ docs/embedded_clip_loss.png),
and a zero-shot report ("a satellite photo of {type}.") on fresh scenes of the six seen
and the four held-out types is printed and logged. Seeded throughout.

    python scripts/pretrain_embedded_clip.py                  # the shipped weights (~31 min, 2 cores)
    python scripts/pretrain_embedded_clip.py --resume latest  # go on after an interruption
    python scripts/pretrain_embedded_clip.py --steps 4 --pool 64 --batch 16 --weights /tmp/c.safetensors --docs ''
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
from visionpeft.backbones import embedded_clip  # registers embedded-clip with open_clip
from visionpeft.data.scenes import HELD_OUT_SCENES, PRETRAIN_SCENES
from visionpeft.train import TrainConfig, train
from visionpeft.train.pretrain_clip import ClipPretrainConfig, ClipPretrainTask, zero_shot_accuracy

ROOT = Path(__file__).resolve().parents[1]

MAX_BYTES = 20 * 2 ** 20  # the package file's budget
EVAL_SEED = 777  # fresh scenes for the zero-shot report: the pool uses data_seed 1234 + i * 1000


def write_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors at ``path``, written whole or not at all (readers never see half a
    file, and an interrupted run leaves the old one)."""
    meta = {k: str(v) for k, v in metadata.items()}
    vp.atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def shipped_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Contiguous fp32 tensors, or fp16 when fp32 would exceed the 20 MB budget."""
    fp32 = sum(v.numel() * 4 for v in state.values() if v.is_floating_point())
    dtype = torch.float32 if fp32 <= MAX_BYTES - 2 ** 16 else torch.float16
    return ({k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
            str(dtype).replace("torch.", ""))


def zero_shot_report(weights: Path, n: int, seed: int = EVAL_SEED) -> dict:
    """Load ``weights`` the way users will (open_clip's create_model_and_transforms) and
    classify fresh scenes zero-shot among the seen and among the held-out type names."""
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(embedded_clip.NAME, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(embedded_clip.NAME)
    return {"seen": zero_shot_accuracy(model, tokenizer, PRETRAIN_SCENES, n=n, seed=seed),
            "held_out": zero_shot_accuracy(model, tokenizer, HELD_OUT_SCENES, n=n, seed=seed)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--pool", type=int, default=20000, help="captioned scenes generated once, then augmented")
    p.add_argument("--data-seed", type=int, default=1234)
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order, augmentation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-n", type=int, default=1200, help="fresh scenes per zero-shot report")
    p.add_argument("--output-dir", default=str(ROOT / "output" / "pretrain-embedded-clip"))
    p.add_argument("--resume", default=None, choices=["latest"], help="go on from the last checkpoint")
    p.add_argument("--weights", default=None, help="where the model goes (default: the package)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where the curve and log go ('' = nowhere)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "pool", "eval_n", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    torch.set_num_threads(args.threads)
    target = Path(args.weights) if args.weights else embedded_clip.WEIGHTS_FILE
    out = Path(args.output_dir)

    task = ClipPretrainTask(ClipPretrainConfig(pool_size=args.pool, data_seed=args.data_seed))
    loop = TrainConfig(output_dir=str(out), seed=args.seed, max_train_steps=args.steps,
                       train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler="cosine",
                       lr_warmup_steps=min(args.warmup, args.steps), adam_beta2=0.98,
                       adam_weight_decay=args.weight_decay, adam_epsilon=1e-6, max_grad_norm=1.0,
                       checkpointing_steps=max(1, min(200, args.steps)), checkpoints_total_limit=2,
                       resume_from_checkpoint=args.resume, cpu=not torch.cuda.is_available())
    start = time.time()
    train(task, loop)
    wall = time.time() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    tensors, dtype = shipped_tensors(load_file(str(out / "adapter" / f"{ClipPretrainTask.name}.safetensors")))
    settings = {"model": embedded_clip.NAME, "objective": "symmetric InfoNCE (open_clip ClipLoss)",
                "steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": min(args.warmup, args.steps),
                "schedule": "cosine", "adam_betas": "0.9, 0.98", "weight_decay": args.weight_decay,
                "pool": args.pool, "data_seed": args.data_seed, "seed": args.seed, "threads": args.threads,
                "dtype": dtype, "scenes": " ".join(PRETRAIN_SCENES), "date": str(date.today())}
    write_atomic(tensors, target, settings)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    report = zero_shot_report(target, args.eval_n)
    final = rows[-1]
    summary = {**settings, "wall_clock_s": round(wall), "resumed": bool(args.resume),
               "final_loss": round(final["loss"], 4), "final_logit_scale": round(final.get("logit_scale", 0), 3),
               "size_bytes": target.stat().st_size, "sha256": sha, "zero_shot": report}
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        every = max(1, len(rows) // 60)  # a readable curve, not every step
        curve = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows[::every]]
        body = json.dumps({**summary, "curve": curve + rows[-1:]}, indent=1)
        vp.atomic_write_file(docs / "embedded_clip_pretrain.json", lambda tmp: Path(tmp).write_text(body))
        if (out / "loss.png").is_file():
            vp.atomic_write_file(docs / "embedded_clip_loss.png", lambda tmp: shutil.copyfile(out / "loss.png", tmp))
    size = target.stat().st_size / 2 ** 20
    print(f"embedded CLIP weights: {target} ({size:.1f} MB, {dtype}, sha256 {sha})")
    print(f"{args.steps} steps in {wall / 60:.1f} min; final loss {final['loss']:.4f}")
    for part, names in (("seen", PRETRAIN_SCENES), ("held_out", HELD_OUT_SCENES)):
        r = report[part]
        print(f"zero-shot, {part} types ({', '.join(names)}): accuracy {r['accuracy']:.3f} "
              f"(chance {r['chance']:.3f}, n={r['n']}); per type {r['per_type']}")
    return summary


if __name__ == "__main__":
    main()
