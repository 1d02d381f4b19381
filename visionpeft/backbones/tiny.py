"""Tiny, randomly initialised instances of every supported host family.

These exist for tests and examples: each model is built locally from a config
(never from the hub), is small enough to build and run in well under a second
on a CPU, and is deterministic for a given seed.  The module layout (names,
layer types, fused/unfused projections) mirrors the full-size architectures so
that target-module presets validated here carry over to real checkpoints.

Public API::

    TINY_HOSTS                       # names of all hosts
    HOSTS[name](seed) -> (model, runner)   # runner(model, inputs) -> tensor
    build_tiny(name, seed=0)         # model in eval mode, float32
    example_inputs(name, batch=2, seed=0)  # kwargs for model(**inputs)
    run_host(name, model, inputs)    # one float tensor output
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["HOSTS", "TINY_HOSTS", "build_tiny", "example_inputs", "run_host"]

Runner = Callable[[nn.Module, dict], Any]


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    # fork_rng keeps the caller's global RNG stream untouched while still
    # giving every builder a reproducible initialisation.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fn()
    return model.float().eval()


# --------------------------------------------------------------------------- #
# diffusers
# --------------------------------------------------------------------------- #

def _build_sd_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    # Same block ordering as SD1.x/2.x (cross-attention in the high-resolution
    # blocks, plain resnets in the lowest one), just two levels deep.
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _inputs_sd_unet(batch: int, g: torch.Generator) -> dict:
    return {
        "sample": torch.randn(batch, 4, 16, 16, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
    }


def _run_sample(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _build_sd3_dit() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    # inner dim = heads * head_dim = 16; caption_projection_dim must equal it.
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
    )


def _inputs_sd3_dit(batch: int, g: torch.Generator) -> dict:
    return {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, 32, generator=g),
        "pooled_projections": torch.randn(batch, 16, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
    }


# --------------------------------------------------------------------------- #
# timm
# --------------------------------------------------------------------------- #

def _timm_with_live_head(model: nn.Module) -> nn.Module:
    # timm zero-initialises or scales the classifier down by 1e-3 (Hiera: all
    # zeros, Eva: x0.001), which would make the logits blind to every adapter.
    # A plain Linear init keeps the head realistic yet sensitive.
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        head.reset_parameters()
    return model


# timm variants as data: the model name and the overrides that make it tiny
TIMM_TINY_ARGS = {
    "timm_vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=2,
                                              num_heads=3)),
    # the non-"qkvb" DINOv3 variant: its fused qkv Linear is called as a module (the qkvb
    # variants feed qkv.weight to F.linear directly); its layer scale starts at 1e-5,
    # which would hide every block (and any adapter in it) in a random model
    "timm_dinov3": ("vit_small_patch16_dinov3", dict(img_size=32, patch_size=8, embed_dim=32,
                                                     depth=2, num_heads=2, init_values=1.0)),
    # 4 stages like the real model (q-pooling between stages, one global attention block
    # in stage 3); windows shrunk to fit a 64px input
    "timm_sam2_hiera": ("sam2_hiera_tiny", dict(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1),
                                                global_att_blocks=(3,), window_spec=(8, 4, 2, 1),
                                                global_pos_size=(4, 4))),
}


def _build_timm(host: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        name, overrides = TIMM_TINY_ARGS[host]
        return _timm_with_live_head(timm.create_model(name, pretrained=False, num_classes=5,
                                                      **overrides))

    return build


def _image_inputs(size: int) -> Callable[[int, torch.Generator], dict]:
    def make(batch: int, g: torch.Generator) -> dict:
        return {"x": torch.randn(batch, 3, size, size, generator=g)}

    return make


def _run_plain(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)


# --------------------------------------------------------------------------- #
# transformers
# --------------------------------------------------------------------------- #

def _build_hf_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
    )
    return Dinov2Model(cfg)


def _build_hf_dinov3() -> nn.Module:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
    )
    return DINOv3ViTModel(cfg)


def _build_hf_sam2_vision() -> nn.Module:
    from transformers import Sam2HieraDetConfig, Sam2VisionConfig, Sam2VisionModel

    dims = [16, 32, 64, 128]
    backbone = Sam2HieraDetConfig(
        hidden_size=dims[0],
        num_attention_heads=1,
        image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[1, 2, 4, 8],
        window_size_per_stage=[8, 4, 2, 1],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    cfg = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=dims[::-1],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=16,
    )
    return Sam2VisionModel(cfg)


def _pixel_inputs(size: int) -> Callable[[int, torch.Generator], dict]:
    def make(batch: int, g: torch.Generator) -> dict:
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}

    return make


def _run_last_hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs).last_hidden_state


# --------------------------------------------------------------------------- #
# open_clip
# --------------------------------------------------------------------------- #

_CLIP_VOCAB = 100
_CLIP_CONTEXT = 16


def _build_open_clip() -> nn.Module:
    import open_clip

    # head_width must be set explicitly: the vision tower derives its head
    # count as width // head_width (default 64), which would be 0 here.
    vision_cfg = dict(width=32, layers=2, head_width=16, image_size=32, patch_size=8)
    text_cfg = dict(
        width=32,
        heads=2,
        layers=2,
        context_length=_CLIP_CONTEXT,
        vocab_size=_CLIP_VOCAB,
    )
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg)


def _inputs_open_clip(batch: int, g: torch.Generator) -> dict:
    return {
        "image": torch.randn(batch, 3, 32, 32, generator=g),
        "text": torch.randint(0, _CLIP_VOCAB, (batch, _CLIP_CONTEXT), generator=g),
    }


def _run_open_clip(model: nn.Module, inputs: dict) -> torch.Tensor:
    image_features, text_features, _ = model(**inputs)
    return torch.cat([image_features, text_features], dim=-1)


def _build_point_mae() -> nn.Module:
    from .point_mae import PointMAE

    # 36 wide: 6 heads of 6, and room for Point-PEFT's 6 x 3 local attention
    return PointMAE(num_classes=5, num_points=64, num_group=8, group_size=8, dim=36, depth=3, heads=6)


def _inputs_point_mae(batch: int, g: torch.Generator) -> dict:
    return {"points": torch.randn(batch, 64, 3, generator=g)}


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #

# name -> (builder, input maker, runner)
_SPECS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, torch.Generator], dict], Runner]] = {
    "sd_unet": (_build_sd_unet, _inputs_sd_unet, _run_sample),
    "sd3_dit": (_build_sd3_dit, _inputs_sd3_dit, _run_sample),
    "timm_vit": (_build_timm("timm_vit"), _image_inputs(32), _run_plain),
    "timm_dinov3": (_build_timm("timm_dinov3"), _image_inputs(32), _run_plain),
    "timm_sam2_hiera": (_build_timm("timm_sam2_hiera"), _image_inputs(64), _run_plain),
    "hf_dinov2": (_build_hf_dinov2, _pixel_inputs(32), _run_last_hidden),
    "hf_dinov3": (_build_hf_dinov3, _pixel_inputs(32), _run_last_hidden),
    "hf_sam2_vision": (_build_hf_sam2_vision, _pixel_inputs(64), _run_last_hidden),
    "open_clip": (_build_open_clip, _inputs_open_clip, _run_open_clip),
    "point_mae": (_build_point_mae, _inputs_point_mae, _run_plain),
}

TINY_HOSTS: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str):
    try:
        return _SPECS[name]
    except KeyError:
        raise KeyError(f"unknown tiny host {name!r}; expected one of {TINY_HOSTS}") from None


def build_tiny(name: str, seed: int = 0) -> nn.Module:
    """Build the tiny host ``name`` with weights drawn from ``seed``."""
    builder, _, _ = _spec(name)
    return _seeded(seed, builder)


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> dict:
    """Keyword arguments for ``model(**inputs)`` matching the tiny host ``name``."""
    _, make_inputs, _ = _spec(name)
    # A private generator: inputs are reproducible without touching global RNG.
    g = torch.Generator().manual_seed(seed)
    return make_inputs(batch, g)


def run_host(name: str, model: nn.Module, inputs: dict) -> torch.Tensor:
    """Call ``model`` on ``inputs`` and reduce its output to one float tensor."""
    _, _, runner = _spec(name)
    return runner(model, inputs)


def _host_factory(name: str) -> Callable[[int], tuple[nn.Module, Runner]]:
    runner = _SPECS[name][2]

    def factory(seed: int = 0) -> tuple[nn.Module, Runner]:
        return build_tiny(name, seed), runner

    factory.__name__ = f"tiny_{name}"
    return factory


HOSTS: dict[str, Callable[[int], tuple[nn.Module, Runner]]] = {
    name: _host_factory(name) for name in TINY_HOSTS
}


def save_tiny_sd_pipeline(folder, seed: int = 0, xl: bool = False):
    """Write a complete tiny Stable Diffusion pipeline (UNet, VAE, CLIP text encoder(s),
    tokenizer(s), DDPM scheduler) with ``save_pretrained``, so that it loads back through
    diffusers' own ``from_pretrained``: an offline stand-in for a hub checkpoint.
    ``xl=True`` writes the SDXL layout (two text encoders, added time/text conditioning)."""
    from pathlib import Path

    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .embedded_sd import byte_level_tokenizer, byte_level_vocab

    folder = Path(folder)
    torch.manual_seed(seed)
    vocab = byte_level_vocab()
    tokenizer = byte_level_tokenizer(max_length=16)
    text_cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                              bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                              pad_token_id=vocab["<|endoftext|>"], projection_dim=32)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False)
    unet_kw = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                   norm_num_groups=8)
    if not xl:
        unet = UNet2DConditionModel(cross_attention_dim=32, **unet_kw)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_cfg), tokenizer=tokenizer,
                                       unet=unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    else:
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    transformer_layers_per_block=1, **unet_kw)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_cfg), tokenizer=tokenizer,
                                         text_encoder_2=CLIPTextModelWithProjection(text_cfg),
                                         tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder
