"""Pretrain the embedded text-to-image model (`embedded-sd`) and write it into the package.

Stages (``--stages``, each resumable with ``--resume latest``), all through the shared
training loop (visionpeft/train/pretrain_sd.py):

  vae      the AutoencoderKL: ``--vae-steps`` on random 32 px crops, then ``--vae64-steps``
           on whole 64 px scenes (so its attention sees the 16 x 16 latent grid); the
           latents' spread then sets the VAE's scaling_factor, and their per-channel mean
           and spread are recorded
  decoder  ``--vae-decoder-steps`` more for the decoder alone on whole scenes, the encoder
           frozen (so the latents, and the unet stage's input, stay the same)
  unet     the UNet and the text encoder jointly on the VAE's latents (min-SNR 5, 10%
           empty captions, EMA of the weights); ``--whiten-latents``: on latents made zero-mean
           with unit spread per channel by folding the vae stage's recorded statistics into
           the VAE (exact: the reconstructions do not change), and the shipped VAE is folded so
  assemble the EMA weights, the VAE, the byte-level tokenizer and a DDIM scheduler as one
           StableDiffusionPipeline folder, swapped whole into
           visionpeft/backbones/weights/embedded-sd/ (fp32, at most 20 MB)
  eval     the folder loaded back by diffusers' from_pretrained; ``--eval-n`` images per
           bare caption "a satellite image of {type}" (the folder's DDIM, 20 steps,
           ``--guidance`` / ``--guidance-rescale``, by default the shipped model's
           ``embedded_sd.SAMPLING``), scored by the scene judge (visionpeft.backbones.scene_judge);
           a sample grid, the curves and the settings go to docs/

    python scripts/pretrain_embedded_sd.py                     # the shipped model (~60 min, 2 cores)
    python scripts/pretrain_embedded_sd.py --stages unet --resume latest   # go on after an interruption
    python scripts/pretrain_embedded_sd.py --latent-channels 8 --output-dir output/sd-v6 \\
        --target /tmp/sd-v6 --docs /tmp/sd-v6-docs                 # an experiment (8 latent channels)
    python scripts/pretrain_embedded_sd.py --no-whiten-latents --prediction-type epsilon --no-zero-terminal-snr \\
        --guidance 7.5 --guidance-rescale 0 --output-dir output/sd-v3 --target /tmp/sd-v3 --docs ''   # v3's recipe
    python scripts/pretrain_embedded_sd.py --vae-steps 2 --vae64-steps 1 --vae-decoder-steps 1 --unet-steps 2 \\
        --pool 64 --eval-n 2 --target /tmp/sd --docs '' --output-dir /tmp/sd-run    # a smoke run
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
import torch.nn.functional as F

import visionpeft as vp
from visionpeft.backbones import embedded_sd
from visionpeft.data.scenes import HELD_OUT_SCENES, PRETRAIN_SCENES, SCENE_TYPES
from visionpeft.train import TrainConfig, train
from visionpeft.train.pretrain_sd import SDUnetConfig, SDUnetTask, SDVaeConfig, SDVaeTask, whiten_latents

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 20 * 2 ** 20  # the package folder's budget (its three safetensors files)
STAGES = ("vae", "decoder", "unet", "assemble", "eval")
SETUP_FILE = "unet_setup.json"  # in the unet stage's folder: what the UNet was trained on
EVAL_SEED = 2024
EVAL_STEPS = embedded_sd.SAMPLING["num_inference_steps"]


def loop_config(out: Path, args, steps: int, batch: int, lr: float, warmup: int) -> TrainConfig:
    return TrainConfig(output_dir=str(out), seed=args.seed, max_train_steps=steps, train_batch_size=batch,
                       learning_rate=lr, lr_scheduler="cosine", lr_warmup_steps=min(warmup, steps),
                       lr_min=lr / 50, adam_weight_decay=0.01, max_grad_norm=1.0,
                       checkpointing_steps=max(1, min(200, steps)), checkpoints_total_limit=2,
                       resume_from_checkpoint=args.resume, cpu=not torch.cuda.is_available())


def curve(folder: Path, keys: tuple[str, ...], points: int = 60) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    every = max(1, len(rows) // points)
    return [{k: round(r[k], 5) if isinstance(r.get(k), float) else r.get(k) for k in ("step", "loss", *keys)}
            for r in rows[::every] + rows[-1:]]


def stage_vae(args, out: Path, pool: dict) -> dict:
    start = time.time()
    losses = {"edge_weight": args.vae_edge_weight, "kl_weight": args.vae_kl_weight}
    crops = SDVaeConfig(crop=32, latent_channels=args.latent_channels, **losses, **pool)
    train(SDVaeTask(crops), loop_config(out / "vae32", args, args.vae_steps, args.vae_batch, args.vae_lr, 50))
    full = SDVaeConfig(crop=64, init_from=str(out / "vae32" / "adapter" / "vae"), **losses, **pool)
    result = train(SDVaeTask(full), loop_config(out / "vae64", args, args.vae64_steps, args.vae_batch // 2,
                                                 args.vae_lr / 5, 10))
    return {"wall_s": round(time.time() - start), "latents": result.report,
            "curve_32px": curve(out / "vae32", ("l1", "psnr", "kl", "latent_std")),
            "curve_64px": curve(out / "vae64", ("l1", "psnr", "kl", "latent_std"))}


def need_vae_stage(out: Path) -> None:
    if not (out / "vae64" / "adapter" / "vae" / "config.json").is_file():
        raise SystemExit(f"{out} holds no finished vae stage (vae64/adapter/vae): run --stages vae first, "
                         f"or give the --output-dir that has it")


def stage_decoder(args, out: Path, pool: dict) -> dict:
    need_vae_stage(out)
    start = time.time()
    cfg = SDVaeConfig(crop=64, init_from=str(out / "vae64" / "adapter" / "vae"), train_part="decoder",
                      edge_weight=args.vae_edge_weight, **pool)
    result = train(SDVaeTask(cfg), loop_config(out / "vaedec", args, args.vae_decoder_steps, args.vae_batch // 2,
                                               args.vae_lr / 2.5, 20))
    return {"wall_s": round(time.time() - start), "latents": result.report,
            "curve": curve(out / "vaedec", ("l1", "psnr"))}


def final_vae(out: Path) -> Path:
    """The VAE that ships: the decoder stage's when it ran, else the vae stage's. A decoder
    stage left unfinished, or trained on another encoder than the vae stage's now in
    ``out``, is an error: its decoder would not read the latents the UNet learnt."""
    from safetensors.torch import load_file

    encoder = out / "vae64" / "adapter" / "vae"
    if not (out / "vaedec").is_dir():
        return encoder
    decoder = out / "vaedec" / "adapter" / "vae"
    if not decoder.is_dir():
        raise SystemExit(f"{out / 'vaedec'} holds an unfinished decoder stage: run --stages decoder --resume latest "
                         f"(or delete it to ship the vae stage's decoder)")
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(encoder / weights)), load_file(str(decoder / weights))
    if any(not torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv."))):
        raise SystemExit(f"{decoder} was trained on another encoder than {encoder}: run --stages decoder again")
    return decoder


def whitened(vae_folder: Path, stats: dict | None):
    """The AutoencoderKL in ``vae_folder``; with ``stats`` (the vae stage's recorded channel
    means and spreads) folded in by whiten_latents, so its latents are zero-mean with unit
    spread per channel and scaling_factor is 1. Exact, so it can be done after the decoder
    stage, which leaves the encoder (and so those statistics) as they were."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder)
    if stats is not None:
        with torch.no_grad():
            whiten_latents(vae, stats["channel_mean"], stats["channel_std"])
        vae.register_to_config(scaling_factor=1.0)
    return vae


def stage_unet(args, out: Path, pool: dict, summary: dict) -> dict:
    need_vae_stage(out)
    start = time.time()
    vae_folder, stats = out / "vae64" / "adapter" / "vae", None
    if args.whiten_latents:
        stats = summary.get("vae", {}).get("latents", {})
        if "channel_std" not in stats:
            raise SystemExit(f"--whiten-latents needs the vae stage's latent statistics in {out / 'summary.json'}: "
                             f"run --stages vae in this --output-dir first, or train on scaled latents with "
                             f"--no-whiten-latents")
        stats = {k: stats[k] for k in ("channel_mean", "channel_std")}
        vae = whitened(vae_folder, stats)
        vae_folder = out / "unet-vae"  # the encoder the UNet's latents come from
        vp.atomic_write_dir(vae_folder, lambda tmp: vae.save_pretrained(tmp))
    cfg = SDUnetConfig(vae=str(vae_folder), prediction_type=args.prediction_type,
                       zero_terminal_snr=args.zero_terminal_snr, **pool)
    train(SDUnetTask(cfg), loop_config(out / "unet", args, args.unet_steps, args.unet_batch, args.unet_lr,
                                       args.unet_warmup))
    # what the UNet learnt on, so assemble ships the matching scheduler and VAE whatever its own flags
    body = json.dumps({"prediction_type": cfg.prediction_type, "zero_terminal_snr": cfg.zero_terminal_snr,
                       "whitened_with": stats})
    vp.atomic_write_file(out / "unet" / SETUP_FILE, lambda tmp: Path(tmp).write_text(body))
    return {"wall_s": round(time.time() - start), "curve": curve(out / "unet", ("mse",)), "whitened_with": stats}


def assemble(out: Path, target: Path) -> dict:
    """The pipeline folder from the trained parts (the EMA weights of UNet and text encoder),
    with the DDIM scheduler of the noise schedule the unet stage trained on and the final VAE,
    whitened as the UNet's latents were."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    need_vae_stage(out)
    if not (out / "unet" / "adapter" / "ema" / "unet.safetensors").is_file():
        raise SystemExit(f"{out} holds no finished unet stage (unet/adapter/ema): run --stages unet first")
    # what the unet stage recorded; noise_schedule.json in runs of 2026-12-04 (the schedule only), neither in
    # runs from before (SD's epsilon schedule, no whitening)
    found = [f for f in (out / "unet" / SETUP_FILE, out / "unet" / "noise_schedule.json") if f.is_file()]
    setup = json.loads(found[0].read_text()) if found else {}
    vae_folder = final_vae(out)
    vae = whitened(vae_folder, setup.pop("whitened_with", None))
    unet, text_encoder = embedded_sd.build_unet(vae.config.latent_channels), embedded_sd.build_text_encoder()
    unet.load_state_dict(load_file(str(out / "unet" / "adapter" / "ema" / "unet.safetensors")))
    text_encoder.load_state_dict(load_file(str(out / "unet" / "adapter" / "ema" / "text_encoder.safetensors")))
    scheduler = embedded_sd.noise_scheduler("ddim", **setup)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=embedded_sd.byte_level_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    def write(tmp):
        pipe.save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
        if size > MAX_BYTES:  # refused before the swap: the folder in place stays as it was
            raise SystemExit(f"the pipeline's weights are {size / 2**20:.1f} MB, over the 20 MB budget")

    vp.atomic_write_dir(target, write)
    files = sorted(target.rglob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    sha = {str(f.relative_to(target)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    return {"vae": str(vae_folder.relative_to(out)), "size_bytes": size, "sha256": sha}


@torch.no_grad()
def evaluate(target: Path, n: int, docs: Path | None, recon_n: int = 600,
             guidance: float = embedded_sd.SAMPLING["guidance_scale"],
             guidance_rescale: float = embedded_sd.SAMPLING["guidance_rescale"]) -> dict:
    """Judge accuracy of the intended type for ``n`` images per bare caption (seen types),
    the held-out captions as a negative control, and the judge on VAE reconstructions."""
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones.scene_judge import load_scene_judge
    from visionpeft.data.scenes import scene_set

    pipe = StableDiffusionPipeline.from_pretrained(target)
    pipe.set_progress_bar_config(disable=True)
    judge = load_scene_judge()
    report, grid = {"seen": {}, "held_out": {}}, []
    for part, types in (("seen", PRETRAIN_SCENES), ("held_out", HELD_OUT_SCENES)):
        for scene in types:
            g = torch.Generator().manual_seed(EVAL_SEED)
            images = pipe([f"a satellite image of {scene}"] * n, num_inference_steps=EVAL_STEPS,
                          guidance_scale=guidance, guidance_rescale=guidance_rescale, generator=g,
                          output_type="pt").images
            found = [judge.classes[i] for i in judge.classify(images)]
            report[part][scene] = {"accuracy": round(sum(f == scene for f in found) / n, 4),
                                   "judged": {t: found.count(t) for t in SCENE_TYPES if found.count(t)}}
            grid.append(images[:8])
    seen = [r["accuracy"] for r in report["seen"].values()]
    report["seen_accuracy"] = round(sum(seen) / len(seen), 4)
    real, _, labels = scene_set(recon_n, 64, PRETRAIN_SCENES, seed=EVAL_SEED)
    recon = torch.cat([pipe.vae.decode(pipe.vae.encode(real[i:i + 100] * 2 - 1).latent_dist.mean).sample
                       for i in range(0, recon_n, 100)]).clamp(-1, 1) / 2 + 0.5
    # the judge's ceiling through this decoder, beside the same scenes as drawn and blurred by a 3 x 3 box
    for key, images in (("judge_on_real", real), ("judge_on_blurred_real", F.avg_pool2d(real, 3, 1, 1)),
                        ("judge_on_vae_reconstructions", recon)):
        names = [judge.classes[i] for i in judge.classify(images)]
        right = [nm == PRETRAIN_SCENES[k] for nm, k in zip(names, labels.tolist())]
        report[key] = round(sum(right) / len(right), 4)
        report[key + "_per_type"] = {s: round(sum(r for r, k in zip(right, labels.tolist()) if k == i) /
                                              max(1, int((labels == i).sum())), 4)
                                     for i, s in enumerate(PRETRAIN_SCENES)}
    report["psnr_vae_reconstructions"] = round(
        (10 * torch.log10(1 / ((recon - real) ** 2).mean())).item(), 2)
    sampler = f"{type(pipe.scheduler).__name__} {EVAL_STEPS} steps, guidance {guidance:g}" + (
        f", rescale {guidance_rescale:g}" if guidance_rescale else "")
    report.update(n=n, steps=EVAL_STEPS, guidance=guidance, guidance_rescale=guidance_rescale, seed=EVAL_SEED,
                  scheduler=type(pipe.scheduler).__name__,
                  timestep_spacing=pipe.scheduler.config.timestep_spacing)
    if docs is not None:
        save_grid(torch.cat(grid), [*PRETRAIN_SCENES, *HELD_OUT_SCENES], docs / "embedded_sd_samples.png", sampler)
    return report


def save_grid(images: torch.Tensor, rows: list[str], path: Path, sampler: str) -> None:
    """One row of 8 samples per caption, labelled, written atomically."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")
    cols = len(images) // len(rows)
    fig = Figure(figsize=(cols * 0.9 + 1.2, len(rows) * 0.9))
    for r, name in enumerate(rows):
        for c in range(cols):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            ax.imshow(images[r * cols + c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f'"a satellite image of <type>" ({sampler}); last 4 rows: never-seen types', fontsize=8)
    vp.atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae64-steps", type=int, default=150)
    p.add_argument("--vae-decoder-steps", type=int, default=1200, help="the decoder alone, encoder frozen")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--vae-edge-weight", type=float, default=1.0, help="weight of the L1 of neighbour differences")
    p.add_argument("--latent-channels", type=int, default=embedded_sd.LATENT_CHANNELS,
                   help="channels of the VAE's 16 x 16 latents (and of the UNet's input and output)")
    p.add_argument("--whiten-latents", action=argparse.BooleanOptionalAction, default=True,
                   help="train the UNet on latents made zero-mean with unit spread per channel (the vae stage's "
                        "statistics folded into the VAE, scaling_factor 1); the shipped VAE is folded the same way")
    p.add_argument("--vae-kl-weight", type=float, default=1e-4, help="weight of the KL per latent element")
    p.add_argument("--prediction-type", default="v_prediction", choices=["epsilon", "v_prediction"])
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale the betas to SNR 0 at the last step (needs v_prediction), trailing DDIM steps")
    p.add_argument("--unet-steps", type=int, default=1800)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--unet-warmup", type=int, default=100)
    p.add_argument("--pool", type=int, default=20000, help="captioned scenes generated once")
    p.add_argument("--data-seed", type=int, default=4321)
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order, noise")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-n", type=int, default=64, help="images per caption in the evaluation")
    p.add_argument("--guidance", type=float, default=embedded_sd.SAMPLING["guidance_scale"],
                   help="the evaluation's classifier-free guidance")
    p.add_argument("--guidance-rescale", type=float, default=embedded_sd.SAMPLING["guidance_rescale"],
                   help="the evaluation's guidance_rescale (diffusers'; 0.7 suits zero terminal SNR)")
    p.add_argument("--recon-n", type=int, default=600, help="real scenes judged after a VAE round trip")
    p.add_argument("--output-dir", default=str(ROOT / "output" / "pretrain-embedded-sd"))
    p.add_argument("--resume", default=None, choices=["latest"], help="go on from each stage's last checkpoint")
    p.add_argument("--target", default=None, help="where the pipeline folder goes (default: the package)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where curves, samples and log go ('' = nowhere)")
    args = p.parse_args(argv)
    for name in ("vae_steps", "vae64_steps", "vae_decoder_steps", "vae_batch", "unet_steps", "unet_batch", "pool",
                 "eval_n", "recon_n", "threads", "latent_channels"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.guidance_rescale <= 1:
        p.error(f"--guidance-rescale must be within [0, 1], got {args.guidance_rescale}")
    if args.zero_terminal_snr and args.prediction_type != "v_prediction":
        p.error("--zero-terminal-snr needs --prediction-type v_prediction (an epsilon target is undefined at SNR 0); "
                "with epsilon add --no-zero-terminal-snr")
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    target = Path(args.target) if args.target else embedded_sd.FOLDER
    docs = Path(args.docs) if args.docs else None
    pool = {"pool_size": args.pool, "data_seed": args.data_seed, "pool_cache": str(out / "pool")}
    log_path = out / "summary.json"
    summary = json.loads(log_path.read_text()) if log_path.is_file() else {}
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("stages", "resume", "docs", "target")}
    for stage in args.stages:
        t = time.time()
        if stage == "vae":
            summary["vae"] = stage_vae(args, out, pool)
        elif stage == "decoder":
            summary["decoder"] = stage_decoder(args, out, pool)
        elif stage == "unet":
            summary["unet"] = stage_unet(args, out, pool, summary)
        elif stage == "assemble":
            summary["files"] = assemble(out, target)
        else:
            summary["eval"] = evaluate(target, args.eval_n, docs, args.recon_n, args.guidance, args.guidance_rescale)
        print(f"stage {stage}: {(time.time() - t) / 60:.1f} min")
        out.mkdir(parents=True, exist_ok=True)
        body = json.dumps(summary, indent=1)
        vp.atomic_write_file(log_path, lambda tmp: Path(tmp).write_text(body))
    summary["date"] = str(date.today())
    if docs is not None:
        body = json.dumps(summary, indent=1)
        vp.atomic_write_file(docs / "embedded_sd_pretrain.json", lambda tmp: Path(tmp).write_text(body))
        for name, folder in (("vae", "vae32"), ("vae_decoder", "vaedec"), ("unet", "unet")):
            if (out / folder / "loss.png").is_file():
                vp.atomic_write_file(docs / f"embedded_sd_{name}_loss.png",
                                     lambda tmp, f=folder: shutil.copyfile(out / f / "loss.png", tmp))
    if "eval" in summary:
        e = summary["eval"]
        print(f"judge accuracy of the intended type, seen captions: {e['seen_accuracy']:.3f} "
              f"({ {k: v['accuracy'] for k, v in e['seen'].items()} }); on VAE reconstructions "
              f"{e['judge_on_vae_reconstructions']:.3f}")
    return summary


if __name__ == "__main__":
    main()
