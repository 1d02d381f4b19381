"""Parameter counts on the full-size SDXL UNet, built on the meta device (no weights)."""
import math

import pytest
import torch
from diffusers import UNet2DConditionModel

import visionpeft as vp


def sdxl_unet_on_meta():
    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20],
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)


@pytest.fixture(scope="module")
def attn_shapes():
    unet = sdxl_unet_on_meta()
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base UNet
    return [m.weight.shape for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
            and (".attn1." in n or ".attn2." in n)]


def test_sdxl_lora_r4_attention_count_is_the_dreambooth_baseline(attn_shapes):
    unet = sdxl_unet_on_meta()
    vp.inject(unet, vp.LoRAConfig(r=4, target_modules=vp.presets.SD_UNET_ATTN))
    s = vp.summary(unet)
    assert s.adapter_parameters == vp.trainable_parameters(unet) == 5_806_080
    assert s.adapter_parameters == sum(4 * (o + i) for o, i in attn_shapes)


def test_sdxl_krona_count_matches_its_formula(attn_shapes):
    def balanced(n):
        return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)

    unet = sdxl_unet_on_meta()
    vp.inject(unet, vp.KronAConfig(target_modules=vp.presets.SD_UNET_ATTN))
    expected = sum(balanced(o) * balanced(i) + (o // balanced(o)) * (i // balanced(i))
                   for o, i in attn_shapes)
    assert vp.trainable_parameters(unet) == expected
    assert len(vp.summary(unet).rows) == len(attn_shapes) == 560
