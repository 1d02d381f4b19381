"""The DreamBooth table on the embedded text-to-image model: each adapter learns a scene
type the model never saw from 5 instance images, as "a satellite image of sks".

Every run is a `task: dreambooth` config through `visionpeft.train.run_config` on
``pretrained_model: embedded-sd`` (64 px, UNet adapters on to_q/to_k/to_v/to_out.0 at
about the same trainable-parameter budget, prior preservation with 50 class images of
"a satellite image" made by the base model). The scene judge
(`visionpeft.backbones.scene_judge`, a probe no adapter trained against) then scores:

- ``sks``: the share of ``--n`` images of "a satellite image of sks" judged as the
  instance type (the base model's share is the "before" column);
- ``seen``: the judge's accuracy of the intended type on ``--n-seen`` images for each of
  the six training-type captions, with the adapter on (the base model's accuracy minus
  this is what prior preservation keeps small).

DDIM 20 steps, guidance 7.5 (the generation demo's defaults), seeded generators. Beside
each row: trainable parameters, the optimizer's state, and the run's wall time (loading,
training, saving; the first run of a --work folder also makes the class images).

    python scripts/dreambooth_table.py --output docs/dreambooth_table.json      # 5 methods x 3 seeds
    python scripts/dreambooth_table.py --quick --output /tmp/db.json            # a smoke run

The JSON holds every run and the table, rewritten whole after each run; a second call with
the same --output skips the runs it already holds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import visionpeft as vp

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
# trainable parameters on the embedded UNet's attention Linears (printed by --budgets):
# LoRA r 4, WaRA r 2 (a pair per band) and SNELL r 4 = 30,464; Block-LoRA r 7 in 4 blocks
# 30,800; KronA with a1 4, a2 2 = 37,568 (the nearest split: a1 = a2 = 4 gives 19,456)
VARIANTS = {
    "lora": {"method": "lora", "r": 4, "alpha": 4, "target_modules": ATTN},
    "krona": {"method": "krona", "a1": 4, "a2": 2, "target_modules": ATTN},
    "wara": {"method": "wara", "r": 2, "alpha": 2, "target_modules": ATTN},
    "block_lora": {"method": "block_lora", "r": 7, "n_blocks": 4, "alpha": 7, "target_modules": ATTN},
    "snell": {"method": "snell", "r": 4, "sparsity": 0.9, "target_modules": ATTN},
}
LR = {"lora": 1e-3, "krona": 1e-3, "wara": 1e-3, "block_lora": 1e-3, "snell": 1e-3}
SEEN_TEMPLATE = "a satellite image of {}"
SKS_PROMPT = "a satellite image of sks"
CLASS_PROMPT = "a satellite image"
STEPS, GUIDANCE = 20, 7.5


def load_pipe():
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones import embedded_sd_path

    pipe = StableDiffusionPipeline.from_pretrained(embedded_sd_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def judged(pipe, judge, prompt: str, n: int, seed: int) -> list[str]:
    """The judge's type for each of ``n`` images of ``prompt`` (one seeded generator)."""
    images = pipe([prompt] * n, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return [judge.classes[i] for i in judge.classify(images)]


def scores(pipe, judge, scene: str, n: int, n_seen: int, seed: int) -> dict:
    from visionpeft.data.scenes import PRETRAIN_SCENES

    sks = judged(pipe, judge, SKS_PROMPT, n, seed)
    seen = {s: judged(pipe, judge, SEEN_TEMPLATE.format(s), n_seen, seed + 1) for s in PRETRAIN_SCENES}
    return {"sks": round(sks.count(scene) / n, 4), "sks_judged": {t: sks.count(t) for t in set(sks)},
            "seen": round(sum(v.count(s) for s, v in seen.items()) / (n_seen * len(seen)), 4)}


def trainable_params(variant: str) -> int:
    from visionpeft.backbones.embedded_sd import build_unet

    unet = build_unet().requires_grad_(False)
    vp.inject(unet, vp.config_from_dict(VARIANTS[variant]), name="x")
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def run(variant: str, scene: str, seed: int, args, work: Path, judge) -> dict:
    from visionpeft.data.scenes import write_scene_images
    from visionpeft.pipelines.clora import load_pipeline_adapter
    from visionpeft.train import run_config

    instance = work / f"instance-{scene}-{seed}"
    if not instance.is_dir():
        write_scene_images(instance, scene, args.instances, seed=1000 + seed)
    out = work / f"{variant}-{scene}-{seed}"
    values = {"task": "dreambooth", "pretrained_model": "embedded-sd", "instance_data_dir": str(instance),
              "instance_prompt": SKS_PROMPT, "class_data_dir": str(work / "class"), "class_prompt": CLASS_PROMPT,
              "with_prior_preservation": True, "num_class_images": args.class_images,
              "adapter": VARIANTS[variant], "max_train_steps": args.steps, "train_batch_size": args.batch,
              "learning_rate": LR[variant], "lr_scheduler": "constant", "seed": seed, "output_dir": str(out),
              "checkpointing_steps": args.steps, "cpu": True, "mixed_precision": "no"}
    start = time.time()
    result = run_config(values)
    seconds = time.time() - start
    pipe = load_pipe()
    load_pipeline_adapter(pipe, out / "adapter", "sks")
    row = scores(pipe, judge, scene, args.n, args.n_seen, args.eval_seed)
    params = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".adapters." in n)
    return {"variant": variant, "scene": scene, "seed": seed, **row, "trainable": params,
            "optimizer_mb": round(params * 8 / 2 ** 20, 3), "run_s": round(seconds, 1),
            "final_loss": round(result.losses[-1], 5)}


def table(runs: list[dict], base: dict) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue

        def stat(key):
            vals = [r[key] for r in mine]
            return {"mean": round(statistics.mean(vals), 4),
                    "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0}
        rows.append({"variant": variant, "seeds": len(mine), "sks_before": base["sks"], "sks_after": stat("sks"),
                     "seen_before": base["seen"], "seen_after": stat("seen"), "trainable": mine[0]["trainable"],
                     "optimizer_mb": mine[0]["optimizer_mb"], "run_s": stat("run_s")})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--scene", default="desert", help="the held-out type learned (desert, industrial, lake, orchard)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--n", type=int, default=64, help="images of the sks prompt per run")
    p.add_argument("--n-seen", type=int, default=16, help="images per training-type caption per run")
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 steps, 1 seed, 2 images: a smoke run")
    p.add_argument("--budgets", action="store_true", help="print each variant's trainable parameters and stop")
    p.add_argument("--work", default=None, help="instance/class images and runs (default: a temporary folder)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    from visionpeft.data.scenes import HELD_OUT_SCENES

    if args.scene not in HELD_OUT_SCENES:
        p.error(f"--scene must be a held-out type {HELD_OUT_SCENES}, got {args.scene!r}")
    if args.quick:
        args.steps, args.seeds, args.n, args.n_seen, args.class_images, args.instances = 2, [0], 2, 1, 2, 2
    torch.set_num_threads(args.threads)
    if args.budgets:
        for v in args.variants:
            print(f"{v}: {trainable_params(v):,} trainable parameters")
        return None
    from visionpeft.backbones.scene_judge import load_scene_judge

    judge = load_scene_judge()
    output = Path(args.output)
    state = json.loads(output.read_text()) if output.is_file() else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "work", "variants", "budgets", "threads")}
    if state.get("settings") not in (None, settings):
        p.error(f"{output} holds runs of other settings {state['settings']}; choose another --output")
    state["settings"] = settings
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if "base" not in state:
            state["base"] = scores(load_pipe(), judge, args.scene, args.n, args.n_seen, args.eval_seed)
        runs = state.setdefault("runs", [])
        for variant in args.variants:
            for seed in args.seeds:
                if any(r["variant"] == variant and r["seed"] == seed for r in runs):
                    continue
                row = run(variant, args.scene, seed, args, work, judge)
                runs.append(row)
                print(f"{variant} seed {seed}: sks {state['base']['sks']:.2f} -> {row['sks']:.2f}, "
                      f"seen {state['base']['seen']:.2f} -> {row['seen']:.2f}, {row['trainable']:,} params, "
                      f"{row['run_s']:.0f} s", flush=True)
                state["table"] = table(runs, state["base"])
                state["date"] = str(date.today())
                body = json.dumps(state, indent=1)
                vp.atomic_write_file(output, lambda t: Path(t).write_text(body))
    state["table"] = table(state.get("runs", []), state["base"])
    return state


if __name__ == "__main__":
    main()
