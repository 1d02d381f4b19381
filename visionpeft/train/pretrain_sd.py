"""Pretraining of the embedded text-to-image model (`visionpeft.backbones.embedded_sd`) from
scratch on captioned procedural scenes of the six pretraining types, in two tasks:

``pretrain_sd_vae``: the AutoencoderKL on random crops (``crop``) of the pool, each turned
by one of the 4 rotations and mirrored at random; loss L1(x, x^) + ``edge_weight`` x L1 of
the horizontal and vertical differences (a cheap stand-in for the perceptual loss of
Rombach et al., *High-Resolution Image Synthesis with Latent Diffusion Models*, CVPR 2022,
which needs pretrained VGG weights) + ``kl_weight`` x the posterior's KL to N(0, I), per
latent element. No adversarial term. ``finish`` measures the latents' spread on the pool
and records ``scaling_factor = 1 / std`` in the VAE's config, as Stable Diffusion's 0.18215
was found. With ``train_part="decoder"`` the encoder stays frozen and only the decoder goes
on training (the KL term, which then has no gradient, is left out), as Stable Diffusion's
ft-EMA / ft-MSE decoders were made: the latents, their ``scaling_factor`` and any denoiser
trained on them stay valid. SD pipelines apply no shift, so the channel means are
reported too: an offset m only moves the data the denoiser learns, and at the last
timestep it is scaled by sqrt(alpha_bar_T) = 0.07, so a mean of a few tenths of the std
is harmless.

``pretrain_sd_unet``: the UNet2DConditionModel and the CLIPTextModel trained jointly (one
AdamW) to predict the noise (DDPM, Ho et al. 2020) of the frozen VAE's latents, which are
encoded once and sampled from their posterior each step; Min-SNR-5 loss weighting (Hang et
al., *Efficient Diffusion Training via Min-SNR Weighting Strategy*, ICCV 2023); 10% of the
captions dropped to "" so classifier-free guidance (Ho & Salimans 2022) works; an
exponential moving average of the weights (decay warmed up as (1+t)/(10+t)), which is
what ships. The text encoder is trained because a random byte-level tower would condition
poorly and there is no pretrained one to start from.

The pool (images and captions, `visionpeft.data.captions.caption_set(style="sd")`) is
generated once from ``data_seed`` in chunks, and can be kept in ``pool_cache`` so both
tasks (and a resumed run) read the same one. The four held-out scene types are never seen:
neither their images nor their names.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from ..backbones.embedded_sd import LATENT_CHANNELS
from .task import Task, TrainingError, register_task, task_config


@dataclass
class SDPoolConfig:
    pool_size: int = 20000
    image_size: int = 64
    data_seed: int = 4321
    chunk: int = 1000  # scenes generated per seed: chunk i uses data_seed + i * chunk
    pool_cache: str | None = None  # a folder keeping the generated pool between runs

    def __post_init__(self):
        for name in ("pool_size", "image_size", "chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{self.task_name}: {name} must be a positive integer, got {v!r}")

    task_name = "pretrain_sd"

    def pool_settings(self) -> dict:
        return {"pool_size": self.pool_size, "image_size": self.image_size, "data_seed": self.data_seed,
                "chunk": self.chunk}


def build_sd_pool(cfg: SDPoolConfig) -> tuple[torch.Tensor, list[str]]:
    """(uint8 images (n, 3, s, s), captions) of the six pretraining types; read from
    ``cfg.pool_cache`` when it holds the pool of the same settings, written there otherwise."""
    import visionpeft as vp

    from ..data.captions import caption_set
    from ..data.scenes import PRETRAIN_SCENES

    settings = json.dumps(cfg.pool_settings(), sort_keys=True)
    cache = Path(cfg.pool_cache) / "pool.safetensors" if cfg.pool_cache else None
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            meta = f.metadata()
            if meta.get("settings") == settings:
                return f.get_tensor("images"), json.loads(meta["captions"])
    images, captions = [], []
    for start in range(0, cfg.pool_size, cfg.chunk):
        img, cap, _ = caption_set(min(cfg.chunk, cfg.pool_size - start), cfg.image_size, PRETRAIN_SCENES,
                                  seed=cfg.data_seed + start, style="sd")
        images.append(img)
        captions += cap
    images = torch.cat(images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        meta = {"settings": settings, "captions": json.dumps(captions)}
        vp.atomic_write_file(cache, lambda tmp: save_file({"images": images}, tmp, metadata=meta))
    return images, captions


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image."""
    n, _, h, w = images.shape
    if size >= h and size >= w:
        return images
    ys = torch.randint(0, h - size + 1, (n,), generator=generator)
    xs = torch.randint(0, w - size + 1, (n,), generator=generator)
    return torch.stack([img[:, y:y + size, x:x + size] for img, y, x in zip(images, ys.tolist(), xs.tolist())])


def edge_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of the horizontal and vertical neighbour differences."""
    return ((x.diff(dim=-1) - y.diff(dim=-1)).abs().mean() + (x.diff(dim=-2) - y.diff(dim=-2)).abs().mean()) / 2


class _Indices(Dataset):
    """The loop batches indices; the task looks up its pool tensors itself (one gather
    per batch instead of a Python call per item)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _save_state(model: torch.nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))


# --- the autoencoder ----------------------------------------------------------------------

@dataclass
class SDVaeConfig(SDPoolConfig):
    crop: int = 32  # the VAE is convolutional: small crops train it faster; 64 lets its attention see the grid
    kl_weight: float = 1e-4
    edge_weight: float = 0.5
    init_from: str | None = None  # a diffusers AutoencoderKL folder to go on from (the 64 px phase)
    scaling_images: int = 4096  # pool images whose latents set scaling_factor in finish
    # "decoder": the encoder (and so the latent space a denoiser learns) stays frozen and only
    # the decoder trains, as Stable Diffusion's ft-EMA / ft-MSE decoders were made
    train_part: str = "all"
    latent_channels: int = LATENT_CHANNELS  # of a new VAE (one given by init_from keeps its own)
    # fold a per-channel shift and scale into the VAE at the end (whiten_latents), so its
    # latents have zero mean and unit spread per channel and scaling_factor is 1
    whiten_latents: bool = False

    task_name = "pretrain_sd_vae"

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.crop, int) and 8 <= self.crop <= self.image_size and self.crop % 4 == 0):
            raise ValueError(f"pretrain_sd_vae: crop must be a multiple of 4 in [8, image_size "
                             f"{self.image_size}], got {self.crop!r}")
        if not (isinstance(self.latent_channels, int) and 1 <= self.latent_channels <= 64):
            raise ValueError(f"pretrain_sd_vae: latent_channels must be an integer in [1, 64], "
                             f"got {self.latent_channels!r}")
        if self.train_part not in ("all", "decoder"):
            raise ValueError(f"pretrain_sd_vae: train_part must be 'all' or 'decoder', got {self.train_part!r}")
        if self.whiten_latents and self.train_part == "decoder":
            raise ValueError("pretrain_sd_vae: whiten_latents changes the encoder's output, which train_part "
                             "'decoder' keeps frozen; whiten in the run that trains the encoder")
        if self.train_part == "decoder" and not self.init_from:
            raise ValueError("pretrain_sd_vae: train_part 'decoder' needs init_from (the trained AutoencoderKL "
                             "folder whose encoder stays frozen)")

    @classmethod
    def from_dict(cls, values: dict) -> "SDVaeConfig":
        return task_config(cls, values, "pretrain_sd_vae")


class SDVaeTask(Task):
    """Trains every VAE parameter, or with ``train_part="decoder"`` the decoder and
    post_quant_conv only; checkpoints and the final folder hold it as diffusers writes it
    (``vae/config.json`` + ``diffusion_pytorch_model.safetensors``)."""

    name = "vae"

    def __init__(self, cfg: SDVaeConfig):
        self.cfg = cfg

    def setup(self, device, dtype):
        from diffusers import AutoencoderKL

        from ..backbones.embedded_sd import build_vae

        self.vae = AutoencoderKL.from_pretrained(self.cfg.init_from) if self.cfg.init_from else \
            build_vae(self.cfg.latent_channels)
        self.vae.train()
        if self.cfg.train_part == "decoder":
            for module in (self.vae.encoder, self.vae.quant_conv):
                module.requires_grad_(False)
        self.images, _ = build_sd_pool(self.cfg)

    def models(self):
        return {self.name: self.vae}

    def train_dataset(self):
        return _Indices(len(self.images))

    def loss(self, models, batch):
        from .pretrain_clip import rotate_flip

        vae = models[self.name]
        batch = batch.cpu()  # the loop moves batches to the device; the pool stays on the CPU
        x = to_unit_range(rotate_flip(random_crops(self.images[batch], self.cfg.crop)))
        x = x.to(next(vae.parameters()).device)
        frozen = self.cfg.train_part == "decoder"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            posterior = vae.encode(x).latent_dist
        # sampled latents also when only the decoder trains: the denoiser learns (and so
        # generates) samples of the posterior, not its mean
        recon = vae.decode(posterior.sample()).sample
        l1 = (recon - x).abs().mean()
        edge = edge_l1(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
        loss = l1 + self.cfg.edge_weight * edge + (0 if frozen else self.cfg.kl_weight * kl)
        with torch.no_grad():
            mse = F.mse_loss(recon.clamp(-1, 1), x)
            psnr = 10 * math.log10(4 / max(mse.item(), 1e-12))  # the range is 2
        return loss, {"l1": l1.item(), "kl": kl.item(), "psnr": psnr, "latent_std": posterior.std.mean().item()}

    def save_adapters(self, models, folder: Path) -> None:
        models[self.name].save_pretrained(folder / self.name)

    def load_adapters(self, models, folder: Path) -> None:
        models[self.name].load_state_dict(load_file(str(folder / self.name / "diffusion_pytorch_model.safetensors")))

    def finish(self, models, output_dir: Path) -> dict:
        import visionpeft as vp

        vae = models[self.name]
        stats = latent_stats(vae, self.images[:self.cfg.scaling_images])
        if self.cfg.train_part == "decoder":  # the latents are the init's: so is their factor
            stats["scaling_factor"] = vae.config.scaling_factor
        elif self.cfg.whiten_latents:
            whiten_latents(vae, stats["channel_mean"], stats["channel_std"])
            stats = {**latent_stats(vae, self.images[:self.cfg.scaling_images]), "scaling_factor": 1.0,
                     "before_whitening": stats}
        vae.register_to_config(scaling_factor=stats["scaling_factor"])
        # the final folder again, now with the factor, swapped in whole
        vp.atomic_write_dir(output_dir / "adapter" / self.name, lambda tmp: vae.save_pretrained(tmp))
        return stats


@torch.no_grad()
def whiten_latents(vae, mean: list[float], std: list[float]) -> None:
    """Make the latents ``(z - mean) / std`` per channel without changing what the VAE
    reconstructs: the shift and scale go into quant_conv's mean rows (and its log-variance
    rows, by -2 log std) and their inverse into post_quant_conv. Stable Diffusion pipelines
    scale latents by one number and shift them by none; a denoiser started from zero-mean
    noise otherwise has to learn each channel's offset, and a sampler carries the noise's
    own channel means into the image as a colour cast."""
    m = torch.tensor(mean, dtype=vae.quant_conv.weight.dtype, device=vae.quant_conv.weight.device)
    s = torch.tensor(std, dtype=m.dtype, device=m.device)
    c = vae.quant_conv.out_channels // 2
    if len(m) != c or len(s) != c:
        raise ValueError(f"whiten_latents: the VAE has {c} latent channels, got {len(m)} means and {len(s)} stds")
    if (s <= 0).any():
        raise ValueError(f"whiten_latents: every channel's std must be positive, got {std!r}")
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= s.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * torch.log(s)
    p.bias += p.weight[:, :, 0, 0] @ m  # with the old weight: post_quant_conv(s z' + m)
    p.weight *= s.view(1, -1, 1, 1)


@torch.no_grad()
def latent_stats(vae, images: torch.Tensor, batch: int = 256) -> dict:
    """Per-channel means and the overall std of sampled latents; ``scaling_factor`` = 1/std."""
    was = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    g = torch.Generator(device).manual_seed(0)
    try:
        z = torch.cat([vae.encode(to_unit_range(images[i:i + batch]).to(device)).latent_dist.sample(g).cpu()
                       for i in range(0, len(images), batch)])
    finally:
        vae.train(was)
    std = z.std().item()
    return {"scaling_factor": round(1 / std, 6), "std": round(std, 5),
            "channel_mean": [round(v, 5) for v in z.mean((0, 2, 3)).tolist()],
            "channel_std": [round(v, 5) for v in z.std((0, 2, 3)).tolist()]}


# --- the denoiser and the text encoder ------------------------------------------------------

def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or a v target:
    min(snr, gamma) / snr and min(snr, gamma) / (snr + 1). The v weight's SNR is floored at
    one, so the last steps (SNR near or, with a zero-terminal-SNR schedule, at 0), which set
    an image's layout and colours, still train instead of getting weight ~0."""
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma).clamp(min=1) / (snr + 1)
    return snr.clamp(max=gamma) / snr


@dataclass
class SDUnetConfig(SDPoolConfig):
    vae: str = ""  # the trained AutoencoderKL folder (pretrain_sd_vae's adapter/vae), scaling_factor set
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    prediction_type: str = "epsilon"  # or "v_prediction"
    zero_terminal_snr: bool = False  # embedded_sd.noise_scheduler's; needs v_prediction
    ema_decay: float = 0.999
    encode_batch: int = 256

    task_name = "pretrain_sd_unet"

    def __post_init__(self):
        super().__post_init__()
        if not self.vae:
            raise ValueError("pretrain_sd_unet: vae must name the trained AutoencoderKL folder "
                             "(pretrain_sd_vae's output_dir/adapter/vae)")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"pretrain_sd_unet: caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"pretrain_sd_unet: ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"pretrain_sd_unet: prediction_type must be 'epsilon' or 'v_prediction', "
                             f"got {self.prediction_type!r}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("pretrain_sd_unet: zero_terminal_snr needs prediction_type 'v_prediction'")

    @classmethod
    def from_dict(cls, values: dict) -> "SDUnetConfig":
        return task_config(cls, values, "pretrain_sd_unet")


class SDUnetTask(Task):
    """Trains the UNet and the text encoder together; checkpoints and the final folder hold
    both as diffusers / transformers write them, plus their moving averages (``ema/``)."""

    def __init__(self, cfg: SDUnetConfig):
        self.cfg = cfg
        self.ema: dict[str, torch.Tensor] = {}

    def setup(self, device, dtype):
        from diffusers import AutoencoderKL

        from ..backbones.embedded_sd import build_text_encoder, build_unet, byte_level_tokenizer, noise_scheduler

        channels = AutoencoderKL.load_config(self.cfg.vae)["latent_channels"]  # (draws no random numbers)
        self.unet, self.text_encoder = build_unet(channels), build_text_encoder()  # random init, the loop's seed
        self.unet.train()
        self.text_encoder.train()
        self.scheduler = noise_scheduler("ddpm", self.cfg.prediction_type, self.cfg.zero_terminal_snr)
        vae = AutoencoderKL.from_pretrained(self.cfg.vae)
        self.scaling_factor = vae.config.scaling_factor
        images, captions = build_sd_pool(self.cfg)
        tok = byte_level_tokenizer()
        # the pipeline's own tokenisation: padded to the maximum length with the end token
        self.tokens = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
        self.empty = tok([""], padding="max_length", max_length=tok.model_max_length,
                         return_tensors="pt").input_ids[0]
        self.mean, self.std = encode_pool(vae.to(device), images, self.cfg.encode_batch)

    def models(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def train_dataset(self):
        return _Indices(len(self.tokens))

    def loss(self, models, batch):
        from diffusers.training_utils import compute_snr

        from .pretrain_clip import rotate_flip

        unet, text_encoder = models["unet"], models["text_encoder"]
        device = next(unet.parameters()).device
        batch = batch.cpu()  # the loop moves batches to the device; the pool stays on the CPU
        latents = self.mean[batch] + self.std[batch] * torch.randn_like(self.mean[batch])
        latents = rotate_flip(latents * self.scaling_factor).to(device)  # the captions hold under D4
        ids = self.tokens[batch].clone()
        ids[torch.rand(len(ids)) < self.cfg.caption_dropout] = self.empty
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids.to(device))[0]).sample
        snr = compute_snr(self.scheduler, t)
        v = self.cfg.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(latents, noise, t) if v else noise
        weights = min_snr_weights(snr, self.cfg.snr_gamma, self.cfg.prediction_type)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean((1, 2, 3))
        return (per_sample * weights).mean(), {"mse": per_sample.mean().item()}

    # the moving average -----------------------------------------------------------------
    def _named(self, models):
        for name in ("unet", "text_encoder"):
            model = getattr(models[name], "module", models[name])
            for key, p in model.state_dict().items():
                yield f"{name}.{key}", p

    @torch.no_grad()
    def after_backward(self, models, step: int) -> None:
        # called before the optimizer applies step ``step``: the average trails by one step
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        for key, p in self._named(models):
            if key not in self.ema or not p.is_floating_point():
                self.ema[key] = p.detach().clone()
            else:
                if self.ema[key].device != p.device:  # loaded on the CPU by a resume
                    self.ema[key] = self.ema[key].to(p.device)
                self.ema[key].lerp_(p.detach(), 1 - decay)

    def ema_state(self, name: str) -> dict[str, torch.Tensor]:
        prefix = name + "."
        return {k[len(prefix):]: v.contiguous().cpu() for k, v in self.ema.items() if k.startswith(prefix)}

    def save_adapters(self, models, folder: Path) -> None:
        for name in ("unet", "text_encoder"):
            models[name].save_pretrained(folder / name)
        if self.ema:
            (folder / "ema").mkdir(parents=True, exist_ok=True)
            for name in ("unet", "text_encoder"):
                save_file(self.ema_state(name), str(folder / "ema" / f"{name}.safetensors"))

    def load_adapters(self, models, folder: Path) -> None:
        files = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
        for name, file in files.items():
            models[name].load_state_dict(load_file(str(folder / name / file)))  # strict: a mismatch is an error
        if not (folder / "ema").is_dir():
            raise TrainingError(f"{folder} holds no ema/ (the weights' moving average): not a checkpoint of "
                                f"pretrain_sd_unet, or an incomplete one")
        self.ema = {f"{name}.{k}": v for name in files
                    for k, v in load_file(str(folder / "ema" / f"{name}.safetensors")).items()}


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of every pool image (computed once; each step then
    samples from them, as DreamBooth's latent cache does)."""
    from tqdm.auto import tqdm

    vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encoding the pool", leave=False):
        dist = vae.encode(to_unit_range(images[i:i + batch]).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


register_task("pretrain_sd_vae", lambda values: SDVaeTask(SDVaeConfig.from_dict(values)))
register_task("pretrain_sd_unet", lambda values: SDUnetTask(SDUnetConfig.from_dict(values)))
