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

The shipped scheduler, 20 steps, the guidance (and guidance rescale) the model was evaluated
with (``embedded_sd.SAMPLING``, also the generation demo's defaults; ``--guidance``,
``--guidance-rescale``), for every generated image: class, validation and judged; seeded generators. Beside
each row: trainable parameters, the optimizer's state, the run's wall time (loading,
training, saving; the first run of a --work folder also makes the class images), and one
training step measured apart (`step_cost`: median wall time of forward, backward and
AdamW on 2 x batch rows, and the peak bytes torch's CPU allocator held above the weights).

    python scripts/dreambooth_table.py --work output/dbtable --output docs/dreambooth_table.json \
        --picture docs/dreambooth_table.png                                     # 5 methods x 3 seeds, ~40 min
    python scripts/dreambooth_table.py --quick --output /tmp/db.json            # a smoke run

The JSON holds every run and the table, rewritten whole after each run; a second call with
the same --output skips the runs it already holds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import visionpeft as vp
from visionpeft.backbones import embedded_sd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, when loaded by path
from bench_core import cpu_peak_bytes  # noqa: E402

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
STEPS = embedded_sd.SAMPLING["num_inference_steps"]


def sampling(args) -> dict:
    """The pipeline-call settings of every generated image (class, validation, judged)."""
    return {"num_inference_steps": STEPS, "guidance_scale": args.guidance, "guidance_rescale": args.guidance_rescale}


def load_pipe():
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones import embedded_sd_path

    pipe = StableDiffusionPipeline.from_pretrained(embedded_sd_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def judged(pipe, judge, prompt: str, n: int, seed: int, sample: dict) -> tuple[list[str], torch.Tensor]:
    """The judge's type for each of ``n`` images of ``prompt`` (one seeded generator, the
    pipeline-call settings ``sample``), and the images."""
    images = pipe([prompt] * n, **sample, generator=torch.Generator().manual_seed(seed), output_type="pt").images
    return [judge.classes[i] for i in judge.classify(images)], images


def scores(pipe, judge, scene: str, n: int, n_seen: int, seed: int, sample: dict,
           samples: Path | None = None) -> dict:
    """The row's numbers; with ``samples``, the first 6 "sks" images saved there (for --picture)."""
    from safetensors.torch import save_file

    from visionpeft.data.scenes import PRETRAIN_SCENES

    sks, images = judged(pipe, judge, SKS_PROMPT, n, seed, sample)
    if samples is not None:
        first = {"images": images[:6].contiguous()}
        vp.atomic_write_file(samples, lambda t: save_file(first, str(t)))
    seen = {s: judged(pipe, judge, SEEN_TEMPLATE.format(s), n_seen, seed + 1, sample)[0] for s in PRETRAIN_SCENES}
    return {"sks": round(sks.count(scene) / n, 4), "sks_judged": {t: sks.count(t) for t in sorted(set(sks))},
            "seen": round(sum(v.count(s) for s, v in seen.items()) / (n_seen * len(seen)), 4)}


def trainable_params(variant: str) -> int:
    from visionpeft.backbones.embedded_sd import build_unet

    unet = build_unet().requires_grad_(False)
    vp.inject(unet, vp.config_from_dict(VARIANTS[variant]), name="x")
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def instance_folder(work: Path, scene: str, seed: int, n: int) -> Path:
    """``n`` real scenes of ``scene`` (seed 1000 + ``seed``) in --work, written once: into a
    temporary folder renamed when complete, so a killed run never leaves a short one."""
    from visionpeft.data.scenes import write_scene_images

    folder = work / f"instance-{scene}-{seed}-{n}"
    if not folder.is_dir():
        partial = work / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_scene_images(partial, scene, n, seed=1000 + seed)
        partial.rename(folder)
    return folder


def train_adapter(variant: str, scene: str, seed: int, args, work: Path, prompt: str = SKS_PROMPT,
                  export: tuple = ()) -> tuple[Path, float, list[float]]:
    """One DreamBooth run of ``variant`` on ``args.instances`` images of ``scene`` as
    ``prompt``: (its output folder, wall seconds, losses). The class images are shared by
    every run of one --work folder at one guidance setting (the first run makes them, which
    its seconds include).
    A finished run of the same settings in --work is reused; an unfinished one is redone."""
    from visionpeft.train import run_config

    instance = instance_folder(work, scene, seed, args.instances)
    out = work / f"{variant}-{scene}-{prompt.split()[-1]}-{seed}"
    classes = work / f"class-g{args.guidance:g}-r{args.guidance_rescale:g}"  # made at these settings
    values = {"task": "dreambooth", "pretrained_model": "embedded-sd", "instance_data_dir": str(instance),
              "instance_prompt": prompt, "class_data_dir": str(classes), "class_prompt": CLASS_PROMPT,
              "with_prior_preservation": True, "num_class_images": args.class_images,
              "adapter": VARIANTS[variant], "max_train_steps": args.steps, "train_batch_size": args.batch,
              "learning_rate": LR[variant], "lr_scheduler": "constant", "seed": seed, "output_dir": str(out),
              "checkpointing_steps": args.steps, "cpu": True, "mixed_precision": "no",
              "guidance_scale": args.guidance, "guidance_rescale": args.guidance_rescale,
              "export_formats": list(export)}
    done = out / "table_run.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if record["values"] == values:
            return out, record["seconds"], record["losses"]
    shutil.rmtree(out, ignore_errors=True)  # unfinished, or of other settings
    start = time.time()
    result = run_config(values)
    seconds = time.time() - start
    body = json.dumps({"values": values, "seconds": seconds, "losses": result.losses})
    vp.atomic_write_file(done, lambda t: Path(t).write_text(body))
    return out, seconds, result.losses


def step_cost(variant: str, batch: int, repeats: int = 5) -> dict:
    """One training step of the embedded UNet with ``variant`` as a DreamBooth run with
    prior preservation takes it (2 x batch rows: instance and class): the median wall
    time of forward, backward and AdamW over ``repeats`` steps after one warm-up, and the
    peak bytes torch's CPU allocator held in one forward and backward above the weights
    (bench_core.cpu_peak_bytes)."""
    from visionpeft.backbones.embedded_sd import build_text_encoder, build_unet

    torch.manual_seed(0)
    unet = build_unet().requires_grad_(False)
    vp.inject(unet, vp.config_from_dict(VARIANTS[variant]), name="x")
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows, size = 2 * batch, unet.config.sample_size
    latents = torch.randn(rows, unet.config.in_channels, size, size)
    text = torch.randn(rows, build_text_encoder().config.max_position_embeddings, unet.config.cross_attention_dim)
    t = torch.randint(0, 1000, (rows,))

    def forward_backward():
        unet(latents, t, text).sample.pow(2).mean().backward()

    def step():
        forward_backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = cpu_peak_bytes(forward_backward)
    return {"step_ms": round(1000 * statistics.median(times), 1), "step_peak_mb": round(peak / 2 ** 20, 1)}


def run(variant: str, scene: str, seed: int, args, work: Path, judge) -> dict:
    from visionpeft.pipelines.clora import load_pipeline_adapter

    out, seconds, losses = train_adapter(variant, scene, seed, args, work)
    pipe = load_pipe()
    load_pipeline_adapter(pipe, out / "adapter", "sks")
    row = scores(pipe, judge, scene, args.n, args.n_seen, args.eval_seed, sampling(args),
                 out / "sks_samples.safetensors")
    params = sum(p.numel() for n, p in pipe.unet.named_parameters() if ".adapters." in n)
    return {"variant": variant, "scene": scene, "seed": seed, **row, "trainable": params,
            "optimizer_mb": round(params * 8 / 2 ** 20, 3), "run_s": round(seconds, 1),
            "final_loss": round(losses[-1], 5)}


def table(runs: list[dict], base: dict, cost: dict) -> list[dict]:
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
                     "optimizer_mb": mine[0]["optimizer_mb"], "run_s": stat("run_s"), **cost.get(variant, {})})
    return rows


def save(state: dict, output: Path) -> None:
    """The JSON rewritten whole, table included, so a killed call loses at most one run."""
    state["table"] = table(state["runs"], state["base"], state.get("cost", {}))
    state["date"] = str(date.today())
    body = json.dumps(state, indent=1)
    vp.atomic_write_file(output, lambda t: Path(t).write_text(body))


def markdown(state: dict) -> str:
    """The table as docs/QUALITY.md shows it: mean ± std over seeds."""
    def pm(cell):
        return f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    lines = ["| method | trainable | seeds | sks judged as the type: before -> after | training types: before -> after "
             "| step (ms) | step peak (MB) | run (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in state["table"]:
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['seeds']} | {r['sks_before']:.2f} -> "
                     f"{pm(r['sks_after'])} | {r['seen_before']:.2f} -> {pm(r['seen_after'])} | "
                     f"{r.get('step_ms', float('nan')):.0f} | {r.get('step_peak_mb', float('nan')):.1f} | "
                     f"{r['run_s']['mean']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--scene", default="lake", help="the held-out type learned (desert, industrial, lake, orchard)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--n", type=int, default=64, help="images of the sks prompt per run")
    p.add_argument("--n-seen", type=int, default=16, help="images per training-type caption per run")
    p.add_argument("--eval-seed", type=int, default=7)
    p.add_argument("--guidance", type=float, default=embedded_sd.SAMPLING["guidance_scale"],
                   help="classifier-free guidance of every generated image (default: the model's evaluated one)")
    p.add_argument("--guidance-rescale", type=float, default=embedded_sd.SAMPLING["guidance_rescale"],
                   help="diffusers' guidance_rescale, in [0, 1]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 steps, 1 seed, 2 images: a smoke run")
    p.add_argument("--budgets", action="store_true", help="print each variant's trainable parameters and stop")
    p.add_argument("--work", default=None, help="instance/class images and runs (default: a temporary folder)")
    p.add_argument("--picture", default=None,
                   help="a PNG of instance images and samples before and after (needs --work)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if args.picture and not args.work:
        p.error("--picture reads the samples each run saved in --work: give --work")
    from visionpeft.data.scenes import HELD_OUT_SCENES

    if args.scene not in HELD_OUT_SCENES:
        p.error(f"--scene must be a held-out type {HELD_OUT_SCENES}, got {args.scene!r}")
    if not 0 <= args.guidance_rescale <= 1:
        p.error(f"--guidance-rescale must be within [0, 1], got {args.guidance_rescale}")
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
    local = ("output", "work", "variants", "budgets", "threads", "picture")
    settings = {k: v for k, v in vars(args).items() if k not in local}
    if state.get("settings") not in (None, settings):
        p.error(f"{output} holds runs of other settings {state['settings']}; choose another --output")
    state["settings"] = settings
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "base" not in state:
            state["base"] = scores(load_pipe(), judge, args.scene, args.n, args.n_seen, args.eval_seed, sampling(args),
                                   work / "base_samples.safetensors")
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
                save(state, output)
            cost = state.setdefault("cost", {})
            if variant not in cost and any(r["variant"] == variant for r in runs):
                cost[variant] = step_cost(variant, args.batch, 1 if args.quick else 5)
                save(state, output)
    state["table"] = table(state.get("runs", []), state["base"], state.get("cost", {}))
    if args.picture:
        picture(Path(args.work), args, Path(args.picture))
    print(markdown(state))
    return state


def picture(work: Path, args, path: Path) -> None:
    """Rows: the instance images, then "a satellite image of sks" before (the base model)
    and after each variant's first seed, from the samples its run saved in --work."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    seed = args.seeds[0]
    base = work / "base_samples.safetensors"
    if not base.is_file():
        raise SystemExit(f"--picture: {base} is missing (the base row was scored in another --work); "
                         "give the --work of the first call or a new --output")
    instance = sorted(instance_folder(work, args.scene, seed, args.instances).iterdir())
    rows = {f"{args.scene}\n(instances)": [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                                           / 255 for f in instance]}
    rows["before"] = list(load_file(str(base))["images"])
    for variant in args.variants:
        f = work / f"{variant}-{args.scene}-sks-{seed}" / "sks_samples.safetensors"
        if f.is_file():
            rows[variant] = list(load_file(str(f))["images"])
    image_grid(rows, path)


def image_grid(rows: dict[str, list], path: Path, k: int | None = None) -> None:
    """One row of images (CHW in [0, 1]) per name, at most ``k`` a row (default: the longest
    row's length; shorter rows leave blank cells), written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = k or max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), k, figsize=(1.2 * k, 1.3 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(k):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("on" if c < len(images) else "off")
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    vp.atomic_write_file(path, lambda t: fig.savefig(t, format="png", dpi=100))
    plt.close(fig)


if __name__ == "__main__":
    main()
