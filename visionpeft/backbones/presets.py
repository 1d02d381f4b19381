"""Target-module presets for the supported host families.

Each preset is a tuple of target patterns in visionpeft's syntax:

* ``"to_q"`` matches a module whose full dotted name equals the entry or ends
  with ``"." + entry``;
* ``"re:<regex>"`` is a Python full-match regex over the full dotted name;
* a non-regex entry may end with a slice selector such as ``"attn.qkv[q,v]"``,
  restricting adaptation to those thirds of a fused qkv ``nn.Linear`` (or to
  the q/k/v slices of an ``nn.MultiheadAttention``'s packed in_proj);
* a bare ``nn.MultiheadAttention`` name adapts its whole in_proj and its
  out_proj.

Every entry of every preset has been checked to match at least one
``nn.Linear`` / ``nn.Conv2d`` / ``nn.MultiheadAttention`` (block presets: one
module) on the matching tiny host (``visionpeft.backbones.tiny``) and on the full-size architecture the
preset is named after.  Regexes start with ``(?:.*\\.)?`` so they keep
matching when the host is nested inside a wrapper (e.g. ``"base_model."``).
"""

from __future__ import annotations

__all__ = [
    "SD_UNET_ATTN",
    "SD_UNET_SELF_ATTN",
    "SD_UNET_CROSS_ATTN_KV",
    "SD_UNET_ATTN_CONV",
    "DIT_ATTN",
    "DIT_ATTN_FF",
    "TIMM_VIT_ALL",
    "TIMM_VIT_QKV",
    "TIMM_VIT_QV",
    "TIMM_HIERA_QKV",
    "TIMM_HIERA_ALL",
    "HF_DINOV2_QKV",
    "HF_DINOV2_ALL",
    "HF_DINOV3_QKV",
    "HF_DINOV3_ALL",
    "HF_SAM2_QKV",
    "HF_SAM2_ALL",
    "CLIP_QKV",
    "CLIP_QV",
    "CLIP_ATTN",
    "CLIP_ALL",
    "CLIP_VISION_ATTN",
    "CLIP_VISION_QKV",
    "TIMM_BLOCKS",
    "TIMM_VIT_MLP",
    "HF_VIT_LAYERS",
    "HF_SAM2_BLOCKS",
    "CLIP_BLOCKS",
    "SD_UNET_TRANSFORMER_BLOCKS",
    "SD_UNET_RESNETS",
    "DIT_FF",
    "BLOCK_PRESETS",
    "PRESETS",
    "HOST_PRESETS",
    "get_preset",
]

_ANY = r"(?:.*\.)?"

# --------------------------------------------------------------------------- #
# Stable Diffusion UNet (diffusers UNet2DConditionModel; SD1.x/2.x/XL)
# --------------------------------------------------------------------------- #

SD_UNET_ATTN: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

SD_UNET_SELF_ATTN: tuple[str, ...] = (
    rf"re:{_ANY}attn1\.(?:to_q|to_k|to_v|to_out\.0)",
)

# Only the projections that read the text embedding: the classic recipe for
# re-targeting concepts without touching spatial self-attention.
SD_UNET_CROSS_ATTN_KV: tuple[str, ...] = (rf"re:{_ANY}attn2\.to_[kv]",)

# Anchored on "resnets.N." so conv_in/conv_out, the 1x1 conv_shortcut and the
# down/upsampler convs stay frozen.
SD_UNET_ATTN_CONV: tuple[str, ...] = (
    rf"re:{_ANY}attn[12]\.(?:to_q|to_k|to_v|to_out\.0)",
    rf"re:{_ANY}resnets\.\d+\.conv[12]",
)

# --------------------------------------------------------------------------- #
# MM-DiT (diffusers SD3Transformer2DModel; also fits FluxTransformer2DModel)
# --------------------------------------------------------------------------- #

# Image-stream and text-stream projections of the joint attention.  The last
# SD3 block is context_pre_only, so it has no to_add_out; Flux single-stream
# blocks have to_q/k/v but fold the output projection into proj_out.
DIT_ATTN: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)

DIT_ATTN_FF: tuple[str, ...] = DIT_ATTN + (
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)

# --------------------------------------------------------------------------- #
# timm ViT family (VisionTransformer, Eva incl. DINOv3) and Hiera (SAM2)
# --------------------------------------------------------------------------- #

# A bare "proj" would also hit patch_embed.proj (a Conv2d), hence the anchors.
TIMM_VIT_ALL: tuple[str, ...] = (
    rf"re:{_ANY}blocks\.\d+\.attn\.qkv",
    rf"re:{_ANY}blocks\.\d+\.attn\.proj",
    rf"re:{_ANY}blocks\.\d+\.mlp\.fc1",
    rf"re:{_ANY}blocks\.\d+\.mlp\.fc2",
)

TIMM_VIT_QKV: tuple[str, ...] = ("attn.qkv",)

TIMM_VIT_QV: tuple[str, ...] = ("attn.qkv[q,v]",)

TIMM_HIERA_QKV: tuple[str, ...] = ("attn.qkv",)

# Hiera also has a block-level "blocks.N.proj" Linear at each stage change
# (the residual's channel projection); anchoring on attn./mlp. skips it.
TIMM_HIERA_ALL: tuple[str, ...] = TIMM_VIT_ALL

# --------------------------------------------------------------------------- #
# transformers vision backbones
# --------------------------------------------------------------------------- #

# transformers >= 5 names these q_proj/k_proj/v_proj/o_proj (4.x used
# attention.attention.query/key/value).
HF_DINOV2_QKV: tuple[str, ...] = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
)

HF_DINOV2_ALL: tuple[str, ...] = HF_DINOV2_QKV + (
    "attention.o_proj",
    "mlp.fc1",
    "mlp.fc2",
)

HF_DINOV3_QKV: tuple[str, ...] = (
    "attention.q_proj",
    "attention.k_proj",
    "attention.v_proj",
)

HF_DINOV3_ALL: tuple[str, ...] = HF_DINOV3_QKV + (
    "attention.o_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

HF_SAM2_QKV: tuple[str, ...] = ("attn.qkv",)

# As in timm's Hiera, "backbone.blocks.N.proj" exists at stage changes and the
# neck holds 1x1 Conv2d layers; neither is selected here.
HF_SAM2_ALL: tuple[str, ...] = (
    rf"re:{_ANY}blocks\.\d+\.attn\.qkv",
    rf"re:{_ANY}blocks\.\d+\.attn\.proj",
    rf"re:{_ANY}blocks\.\d+\.mlp\.proj_in",
    rf"re:{_ANY}blocks\.\d+\.mlp\.proj_out",
)

# --------------------------------------------------------------------------- #
# open_clip CLIP (nn.MultiheadAttention in both towers)
# --------------------------------------------------------------------------- #

# "attn" is the nn.MultiheadAttention of every residual block in both towers.
CLIP_QKV: tuple[str, ...] = ("attn[q,k,v]",)

CLIP_QV: tuple[str, ...] = ("attn[q,v]",)

CLIP_ATTN: tuple[str, ...] = ("attn",)

CLIP_ALL: tuple[str, ...] = ("attn", "mlp.c_fc", "mlp.c_proj")

# One tower only needs a regex: the whole attention (in_proj and out_proj), or, with a
# trailing selector, only the q/k/v slices of the in_proj.
CLIP_VISION_ATTN: tuple[str, ...] = (
    rf"re:{_ANY}visual\.transformer\.resblocks\.\d+\.attn",
)

CLIP_VISION_QKV: tuple[str, ...] = (
    rf"re:{_ANY}visual\.transformer\.resblocks\.\d+\.attn[q,k,v]",
)

# --------------------------------------------------------------------------- #
# Blocks, for block methods (the bottleneck Adapter): whole modules whose first
# argument and first output are the hidden states.  Hiera/ViT/DINO/CLIP blocks carry
# tokens channels-last; UNet resnets are channels-first (AdapterConfig channels="first").
# DiT joint blocks return (context, hidden) and are not listed; adapt their ``ff``.
# --------------------------------------------------------------------------- #

TIMM_BLOCKS: tuple[str, ...] = (rf"re:{_ANY}blocks\.\d+",)  # timm ViT, DINOv3 (Eva), SAM2 Hiera
TIMM_VIT_MLP: tuple[str, ...] = (rf"re:{_ANY}blocks\.\d+\.mlp",)  # AdaptFormer's place
HF_VIT_LAYERS: tuple[str, ...] = (rf"re:{_ANY}layer\.\d+",)  # transformers DINOv2 / DINOv3
HF_SAM2_BLOCKS: tuple[str, ...] = (rf"re:{_ANY}backbone\.blocks\.\d+",)
CLIP_BLOCKS: tuple[str, ...] = (rf"re:{_ANY}resblocks\.\d+",)
SD_UNET_TRANSFORMER_BLOCKS: tuple[str, ...] = (rf"re:{_ANY}transformer_blocks\.\d+",)
SD_UNET_RESNETS: tuple[str, ...] = (rf"re:{_ANY}resnets\.\d+",)
DIT_FF: tuple[str, ...] = (rf"re:{_ANY}transformer_blocks\.\d+\.ff",)

# --------------------------------------------------------------------------- #
# registries
# --------------------------------------------------------------------------- #

PRESETS: dict[str, tuple[str, ...]] = {
    "sd_unet_attn": SD_UNET_ATTN,
    "sd_unet_self_attn": SD_UNET_SELF_ATTN,
    "sd_unet_cross_attn_kv": SD_UNET_CROSS_ATTN_KV,
    "sd_unet_attn_conv": SD_UNET_ATTN_CONV,
    "dit_attn": DIT_ATTN,
    "dit_attn_ff": DIT_ATTN_FF,
    "timm_vit_all": TIMM_VIT_ALL,
    "timm_vit_qkv": TIMM_VIT_QKV,
    "timm_vit_qv": TIMM_VIT_QV,
    "timm_hiera_qkv": TIMM_HIERA_QKV,
    "timm_hiera_all": TIMM_HIERA_ALL,
    "hf_dinov2_qkv": HF_DINOV2_QKV,
    "hf_dinov2_all": HF_DINOV2_ALL,
    "hf_dinov3_qkv": HF_DINOV3_QKV,
    "hf_dinov3_all": HF_DINOV3_ALL,
    "hf_sam2_qkv": HF_SAM2_QKV,
    "hf_sam2_all": HF_SAM2_ALL,
    "clip_qkv": CLIP_QKV,
    "clip_qv": CLIP_QV,
    "clip_attn": CLIP_ATTN,
    "clip_all": CLIP_ALL,
    "clip_vision_attn": CLIP_VISION_ATTN,
    "clip_vision_qkv": CLIP_VISION_QKV,
    "timm_blocks": TIMM_BLOCKS,
    "timm_vit_mlp": TIMM_VIT_MLP,
    "hf_vit_layers": HF_VIT_LAYERS,
    "hf_sam2_blocks": HF_SAM2_BLOCKS,
    "clip_blocks": CLIP_BLOCKS,
    "sd_unet_transformer_blocks": SD_UNET_TRANSFORMER_BLOCKS,
    "sd_unet_resnets": SD_UNET_RESNETS,
    "dit_ff": DIT_FF,
}

# Presets that name whole modules, for block methods (resolved with blocks=True).
BLOCK_PRESETS: frozenset[str] = frozenset({
    "timm_blocks", "timm_vit_mlp", "hf_vit_layers", "hf_sam2_blocks", "clip_blocks",
    "sd_unet_transformer_blocks", "sd_unet_resnets", "dit_ff"})

# Tiny host name (see visionpeft.backbones.tiny.TINY_HOSTS) -> preset name.
HOST_PRESETS: dict[str, str] = {
    "sd_unet": "sd_unet_attn",
    "sd3_dit": "dit_attn",
    "timm_vit": "timm_vit_qkv",
    "timm_dinov3": "timm_vit_qkv",
    "timm_sam2_hiera": "timm_hiera_qkv",
    "hf_dinov2": "hf_dinov2_qkv",
    "hf_dinov3": "hf_dinov3_qkv",
    "hf_sam2_vision": "hf_sam2_qkv",
    "open_clip": "clip_qkv",
    "point_mae": "timm_vit_qkv",  # Point-MAE's blocks carry timm's names
}


def get_preset(name: str) -> tuple[str, ...]:
    """Look up a preset by its case-insensitive name."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None
