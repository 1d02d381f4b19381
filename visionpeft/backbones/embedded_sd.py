"""The embedded text-to-image model, ``embedded-sd``: a small latent diffusion pipeline
(AutoencoderKL, UNet2DConditionModel, CLIPTextModel with a byte-level CLIPTokenizer, DDIM
scheduler) pretrained by visionpeft on captioned procedural scenes of the six pretraining
types (`scripts/pretrain_embedded_sd.py`, docs/EMBEDDED.md) and shipped inside the package
as a diffusers folder, so DreamBooth, composition and the generation demo produce images
one can judge where no Stable Diffusion weights can be downloaded.

The folder is an ordinary Stable Diffusion checkpoint; diffusers loads it itself::

    from diffusers import StableDiffusionPipeline
    from visionpeft.backbones import embedded_sd, embedded_sd_path
    pipe = StableDiffusionPipeline.from_pretrained(embedded_sd_path())
    image = pipe("a satellite image of farmland", **embedded_sd.SAMPLING).images[0]  # 64 x 64

and ``pretrained_model: embedded-sd`` names it in a DreamBooth config (``resolve``). Its
captions start "a satellite image of <scene type>"; the held-out types (desert,
industrial, lake, orchard) were never named or shown, so they stay new concepts.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

NAME = "embedded-sd"
FOLDER = Path(__file__).resolve().parent / "weights" / NAME
REGENERATE = "python scripts/pretrain_embedded_sd.py"
MAX_LENGTH = 96  # tokens: the longest caption ("... with a, b and c in autumn, hazy") is under 90
RESOLUTION = 64  # pixels: the UNet's 16 x 16 latents times the VAE's factor 4
LATENT_CHANNELS = 4  # per latent position, each standing for 4 x 4 pixels
# the sampling the shipped folder was evaluated with (docs/EMBEDDED.md), the default of the
# generation demo and the DreamBooth / composition tables; pass them to the pipeline's call
# (its scheduler ends at zero SNR, so guidance is rescaled as Lin et al. 2024 advise)
SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0, "guidance_rescale": 0.7}
PLAIN_GUIDANCE = {"guidance_scale": 7.5, "guidance_rescale": 0.0}  # diffusers' defaults, for any other model


def is_embedded(model) -> bool:
    """Whether ``model`` (a name, hub id or folder) is the packaged pipeline, by name or path."""
    name = str(model or "").strip()
    return name == NAME or (bool(name) and Path(name).resolve() == FOLDER.resolve())


def guidance_defaults(model) -> dict:
    """guidance_scale and guidance_rescale to sample ``model`` with when none are given:
    embedded-sd's evaluated ones (it ends at zero SNR), diffusers' 7.5 and 0 otherwise."""
    return {k: SAMPLING[k] for k in PLAIN_GUIDANCE} if is_embedded(model) else dict(PLAIN_GUIDANCE)


def embedded_sd_path() -> Path:
    """The packaged pipeline folder; a FileNotFoundError saying how to regenerate it when
    missing (a source checkout before the pretraining script ran, or a build that dropped
    package data)."""
    if not (FOLDER / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded text-to-image model {FOLDER} is missing; regenerate it with "
                                f"`{REGENERATE}` in a source checkout (see docs/EMBEDDED.md) or name a Stable "
                                f"Diffusion folder")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        # its text encoder was saved in transformers 5's key layout, which 4.x would not match (random weights)
        raise ValueError(f"embedded-sd needs transformers >= 5 (installed: {transformers.__version__}); "
                           f"upgrade with pip install -U 'transformers>=5'")
    return FOLDER


def resolve(name_or_path):
    """``embedded-sd`` -> the packaged folder; anything else (a hub id, a folder) unchanged."""
    if isinstance(name_or_path, str) and name_or_path == NAME:
        return str(embedded_sd_path())
    return name_or_path


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (each of the 256 symbols, alone and with ``</w>``) plus
    the start and end tokens: enough for CLIPTokenizer to run with no merges (514 tokens)."""
    # the GPT-2/CLIP byte alphabet: printable Latin-1 bytes stand for themselves, the
    # other bytes are shifted to code points from 256 up
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}


def byte_level_tokenizer(max_length: int = MAX_LENGTH):
    """transformers' CLIPTokenizer over the byte-level vocabulary with no merges: one token
    per character (plus ``</w>`` on each word's last), so no BPE file needs shipping."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(byte_level_vocab()))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             model_max_length=max_length)


def build_vae(latent_channels: int = LATENT_CHANNELS):
    """The autoencoder: 3 levels (factor 4), 64 px -> 16 x 16 x ``latent_channels`` latents,
    about 0.95M parameters."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=16, sample_size=RESOLUTION)


def build_unet(latent_channels: int = LATENT_CHANNELS):
    """The denoiser: 16 x 16 x ``latent_channels`` latents, cross-attention on 128-d text
    states, 3.2M parameters."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=RESOLUTION // 4, in_channels=latent_channels,
                                out_channels=latent_channels, layers_per_block=1,
                                block_out_channels=(32, 64, 128),
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)


def build_text_encoder():
    """CLIPTextModel: 3 layers of width 128 over the 514 byte-level tokens, 96 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = byte_level_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=128,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    return CLIPTextModel(cfg)


def noise_scheduler(kind: str = "ddim", prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """Stable Diffusion 1's noise schedule (scaled_linear 0.00085-0.012, 1000 steps): DDIM for
    sampling (what the folder ships), DDPM for training. ``zero_terminal_snr`` rescales the
    betas so the last step is pure noise and samples from it ("trailing" steps; Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): with SD's own
    betas the last step keeps sqrt(alpha_bar) = 0.068 of the signal, and on a 16 x 16 latent
    the starting noise's per-channel mean (std 1/16) is as large as that signal's, so the
    seed, not the caption, sets each image's overall colour. It needs ``v_prediction``
    (an epsilon target says nothing about the image at SNR 0)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"noise_scheduler: prediction_type must be 'epsilon' or 'v_prediction', "
                         f"got {prediction_type!r}")
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("noise_scheduler: zero_terminal_snr needs prediction_type 'v_prediction' (an epsilon "
                         "target is undefined at SNR 0)")
    common = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, steps_offset=1, prediction_type=prediction_type,
                  rescale_betas_zero_snr=zero_terminal_snr)
    if zero_terminal_snr:
        common["timestep_spacing"] = "trailing"
    if kind == "ddim":
        return DDIMScheduler(set_alpha_to_one=False, **common)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"noise_scheduler: kind must be 'ddim' or 'ddpm', got {kind!r}")
