"""Every host family x every method, on tiny configs built locally (no hub)."""
import copy

import pytest
import torch
from torch import nn
from conftest import HOST_OVERRIDES, METHOD_CONFIGS, make_config, randomize_adapters
from test_counts import sdxl_unet_on_meta

import visionpeft as vp
from visionpeft.backbones import presets
from visionpeft.backbones.tiny import TINY_HOSTS, build_tiny, example_inputs, run_host
from visionpeft.core.targeting import resolve_targets

# each host with its usual preset, plus the presets that reach other layer kinds: UNet
# resnet Conv2d, DiT feed-forwards, whole MHA (in_proj + out_proj) next to MLP Linears
HOST_CASES = [(h, presets.HOST_PRESETS[h]) for h in TINY_HOSTS] + [
    ("sd_unet", "sd_unet_attn_conv"), ("sd3_dit", "dit_attn_ff"), ("open_clip", "clip_all"),
    ("timm_vit", "timm_vit_all"), ("hf_sam2_vision", "hf_sam2_all")]
CASES = [(h, p, m) for h, p in HOST_CASES for m in sorted(METHOD_CONFIGS)]


@pytest.mark.parametrize("host,preset,method", CASES)
def test_host_adapter_disable_merge_remove(host, preset, method):
    model = build_tiny(host)
    base = copy.deepcopy(model).requires_grad_(False)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = example_inputs(host)
    targets = presets.PRESETS[preset]
    vp.inject(model, make_config(method, targets, **HOST_OVERRIDES.get(method, {})), name="a")
    assert vp.summary(model).rows, "the preset adapted nothing"
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        ref = run_host(host, base, inputs)
        out = run_host(host, model, inputs)
        with vp.disabled(model):
            off = run_host(host, model, inputs)
        vp.merge(model)
        merged = run_host(host, model, inputs)
        vp.unmerge(model)
    assert torch.equal(off, ref)
    assert (out - ref).abs().max() > 1e-4
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(merged, out, atol=tol, rtol=1e-5)
    vp.remove(model)
    new_sd = model.state_dict()
    assert list(new_sd) == list(sd)
    assert all(torch.equal(new_sd[k], v) for k, v in sd.items())


# --- presets select exactly the layers they are meant for ----------------------------------
# What each preset is for (its comment in presets.py), written out by walking each model's
# structure (module classes and attributes, never the preset's names or regexes): tiny
# hosts and the full-size architectures the presets are named after, built from their
# configs on the meta device (no weights, no hub).
FULL = ("in_proj", "out_proj")  # a whole nn.MultiheadAttention


def _named(model):
    ids = {id(m): n for n, m in model.named_modules()}
    return lambda m: ids[id(m)]


def _unet_intent(model, preset):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    name = _named(model)
    tblocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    proj = lambda a: [a.to_q, a.to_k, a.to_v, a.to_out[0]]  # noqa: E731
    layers = {
        "sd_unet_attn": [p for b in tblocks for a in (b.attn1, b.attn2) for p in proj(a)],
        "sd_unet_self_attn": [p for b in tblocks for p in proj(b.attn1)],
        "sd_unet_cross_attn_kv": [p for b in tblocks for p in (b.attn2.to_k, b.attn2.to_v)],
        "sd_unet_attn_conv": ([p for b in tblocks for a in (b.attn1, b.attn2) for p in proj(a)]
                              + [c for r in resnets for c in (r.conv1, r.conv2)]),
        "sd_unet_transformer_blocks": tblocks,
        "sd_unet_resnets": resnets,
    }[preset]
    return {name(m): ("full",) for m in layers}


def _dit_intent(model, preset):
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    name = _named(model)
    joint = [m for m in model.modules() if isinstance(m, (JointTransformerBlock, FluxTransformerBlock))]
    single = [m for m in model.modules() if isinstance(m, FluxSingleTransformerBlock)]
    if preset == "dit_ff":
        return {name(b.ff): ("full",) for b in joint}
    layers = []
    for b in joint:  # image and text streams of the joint attention (the last SD3 block has no to_add_out)
        a = b.attn
        layers += [a.to_q, a.to_k, a.to_v, a.to_out[0], a.add_q_proj, a.add_k_proj, a.add_v_proj]
        layers += [a.to_add_out] if a.to_add_out is not None else []
        if preset == "dit_attn_ff":
            layers += [b.ff.net[0].proj, b.ff.net[2]]
            layers += [b.ff_context.net[0].proj, b.ff_context.net[2]] if b.ff_context is not None else []
    for b in single:  # Flux single-stream: q/k/v only (the output projection is folded into proj_out)
        layers += [b.attn.to_q, b.attn.to_k, b.attn.to_v]
    return {name(m): ("full",) for m in layers}


def _timm_intent(model, preset):
    name = _named(model)
    blocks = list(model.blocks)
    if preset == "timm_blocks":
        return {name(b): ("full",) for b in blocks}
    if preset == "timm_vit_mlp":
        return {name(b.mlp): ("full",) for b in blocks}
    if preset in ("timm_vit_qkv", "timm_hiera_qkv"):
        return {name(b.attn.qkv): ("full",) for b in blocks}
    if preset == "timm_vit_qv":
        return {name(b.attn.qkv): ("q", "v") for b in blocks}
    assert preset in ("timm_vit_all", "timm_hiera_all")
    return {name(m): ("full",) for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)}


def _hf_vit_intent(model, preset):
    name = _named(model)
    layers = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "layer" and isinstance(m, nn.ModuleList)]
    assert len(layers) == 1
    blocks = list(layers[0])
    if preset == "hf_vit_layers":
        return {name(b): ("full",) for b in blocks}
    qkv = [m for b in blocks for m in (b.attention.q_proj, b.attention.k_proj, b.attention.v_proj)]
    if preset.endswith("_qkv"):
        return {name(m): ("full",) for m in qkv}
    mlp = [(b.mlp.fc1, b.mlp.fc2) if preset == "hf_dinov2_all" else (b.mlp.up_proj, b.mlp.down_proj) for b in blocks]
    return {name(m): ("full",) for m in qkv + [b.attention.o_proj for b in blocks] + [m for pair in mlp for m in pair]}


def _hf_sam2_intent(model, preset):
    name = _named(model)
    blocks = list(model.backbone.blocks)
    layers = {"hf_sam2_blocks": blocks, "hf_sam2_qkv": [b.attn.qkv for b in blocks],
              "hf_sam2_all": [m for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.proj_in, b.mlp.proj_out)]}
    return {name(m): ("full",) for m in layers[preset]}


def _clip_intent(model, preset):
    from open_clip.transformer import ResidualAttentionBlock

    name = _named(model)
    both = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
    visual = [m for m in model.visual.modules() if isinstance(m, ResidualAttentionBlock)]
    assert visual and len(visual) < len(both)
    return {"clip_qkv": {name(b.attn): ("q", "k", "v") for b in both},
            "clip_qv": {name(b.attn): ("q", "v") for b in both},
            "clip_attn": {name(b.attn): FULL for b in both},
            "clip_all": {**{name(b.attn): FULL for b in both},
                         **{name(m): ("full",) for b in both for m in (b.mlp.c_fc, b.mlp.c_proj)}},
            "clip_vision_attn": {name(b.attn): FULL for b in visual},
            "clip_vision_qkv": {name(b.attn): ("q", "k", "v") for b in visual},
            "clip_blocks": {name(b): ("full",) for b in both}}[preset]


def _full_size(host):
    """The full-size architecture, random init, on the meta device."""
    import open_clip
    import timm
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model, Sam2VisionConfig,
                              Sam2VisionModel)

    with torch.device("meta"):
        if host == "sd15_unet":  # runwayml/stable-diffusion-v1-5 unet/config.json
            return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        if host == "sdxl_unet":  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
            return sdxl_unet_on_meta()
        if host == "sd3_medium":  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
            return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                         caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                         pos_embed_max_size=192)
        if host == "flux_dev":  # black-forest-labs/FLUX.1-dev: 19 double-, 38 single-stream blocks
            return FluxTransformer2DModel(guidance_embeds=True)
        if host in ("vit_base_patch16_224", "vit_base_patch16_dinov3", "sam2_hiera_base_plus"):
            return timm.create_model(host, pretrained=False)
        if host == "dinov2_base":
            return Dinov2Model(Dinov2Config())
        if host == "dinov3_vits16":
            return DINOv3ViTModel(DINOv3ViTConfig())
        if host == "sam2_vision":
            return Sam2VisionModel(Sam2VisionConfig())
        if host == "clip_vit_l_14":
            return open_clip.CLIP(**open_clip.get_model_config("ViT-L-14"))
    raise KeyError(host)


# family, tiny hosts, full-size hosts, presets
FAMILIES = [
    (_unet_intent, ["sd_unet"], ["sd15_unet", "sdxl_unet"],
     ["sd_unet_attn", "sd_unet_self_attn", "sd_unet_cross_attn_kv", "sd_unet_attn_conv",
      "sd_unet_transformer_blocks", "sd_unet_resnets"]),
    (_dit_intent, ["sd3_dit"], ["sd3_medium", "flux_dev"], ["dit_attn", "dit_attn_ff", "dit_ff"]),
    (_timm_intent, ["timm_vit", "timm_dinov3", "point_mae"], ["vit_base_patch16_224", "vit_base_patch16_dinov3"],
     ["timm_vit_all", "timm_vit_qkv", "timm_vit_qv", "timm_vit_mlp", "timm_blocks"]),
    (_timm_intent, ["timm_sam2_hiera"], ["sam2_hiera_base_plus"], ["timm_hiera_qkv", "timm_hiera_all", "timm_blocks"]),
    (_hf_vit_intent, ["hf_dinov2"], ["dinov2_base"], ["hf_dinov2_qkv", "hf_dinov2_all", "hf_vit_layers"]),
    (_hf_vit_intent, ["hf_dinov3"], ["dinov3_vits16"], ["hf_dinov3_qkv", "hf_dinov3_all", "hf_vit_layers"]),
    (_hf_sam2_intent, ["hf_sam2_vision"], ["sam2_vision"], ["hf_sam2_qkv", "hf_sam2_all", "hf_sam2_blocks"]),
    (_clip_intent, ["open_clip"], ["clip_vit_l_14"],
     ["clip_qkv", "clip_qv", "clip_attn", "clip_all", "clip_vision_attn", "clip_vision_qkv", "clip_blocks"]),
]
TINY_CASES = [(intent, h, p) for intent, tiny, _, names in FAMILIES for h in tiny for p in names]
FULL_CASES = [(intent, h, names) for intent, _, full, names in FAMILIES for h in full]


def _assert_exactly_intended(model, preset, intent):
    expected = intent(model, preset)
    assert expected, f"{preset}: nothing intended on this host"
    got = {n: parts for n, (_, parts) in
           resolve_targets(model, presets.PRESETS[preset], blocks=preset in presets.BLOCK_PRESETS).items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"{preset}: misses {missing[:6]}, also hits {extra[:6]}"
    assert got == expected, f"{preset}: wrong parts {[(n, got[n], expected[n]) for n in got if got[n] != expected[n]]}"
    return got


def test_every_preset_has_its_hosts():
    assert sorted({p for _, _, _, names in FAMILIES for p in names}) == sorted(presets.PRESETS)
    assert {h for _, tiny, _, _ in FAMILIES for h in tiny} == set(TINY_HOSTS)
    assert all(presets.HOST_PRESETS[h] in names for _, tiny, _, names in FAMILIES for h in tiny)


@pytest.mark.parametrize("intent,host,name", TINY_CASES, ids=[f"{h}-{p}" for _, h, p in TINY_CASES])
def test_every_preset_matches_exactly_its_layers_on_its_tiny_hosts(intent, host, name):
    _assert_exactly_intended(build_tiny(host), name, intent)


@pytest.mark.parametrize("intent,host,names", FULL_CASES, ids=[h for _, h, _ in FULL_CASES])
def test_every_preset_matches_exactly_its_layers_on_the_full_size_architectures(intent, host, names):
    model = _full_size(host)
    for name in names:
        _assert_exactly_intended(model, name, intent)


def test_full_size_layer_counts_are_the_published_ones():
    """An outside anchor for the structural walks: SD1.5 has 16 transformer blocks (128
    attention projections) and 22 resnets; SDXL 70 blocks (560); ViT-B/16 12 blocks;
    SD3-medium 24 joint blocks, the last without to_add_out; Flux 19 + 38 blocks; CLIP
    ViT-L/14 24 vision + 12 text blocks."""
    def count(host, preset):
        model = _full_size(host)
        return len(resolve_targets(model, presets.PRESETS[preset], blocks=preset in presets.BLOCK_PRESETS))

    assert count("sd15_unet", "sd_unet_attn") == 128 and count("sd15_unet", "sd_unet_resnets") == 22
    assert count("sdxl_unet", "sd_unet_attn") == 560
    assert count("vit_base_patch16_224", "timm_vit_all") == 48
    assert count("sd3_medium", "dit_attn") == 24 * 8 - 1 and count("sd3_medium", "dit_ff") == 24
    assert count("flux_dev", "dit_attn") == 19 * 8 + 38 * 3
    assert count("clip_vit_l_14", "clip_blocks") == 36 and count("clip_vit_l_14", "clip_vision_attn") == 24


def test_clip_vision_qkv_touches_only_the_vision_tower():
    model = build_tiny("open_clip")
    found = resolve_targets(model, presets.CLIP_VISION_QKV)
    assert found and all(n.startswith("visual.") for n in found)
    assert all(parts == ("q", "k", "v") for _, parts in found.values())


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS) + ["snella"])
def test_host_gradient_checkpointing_gives_the_same_gradients(method):
    """timm's block checkpointing runs each adapted layer's forward twice (once more in
    the backward): gradients must equal those of the plain run, bit for bit or nearly
    (SNELL's threshold hint and SNELLA's statistics must not drift between the two)."""
    grads = []
    for checkpointing in (False, True):
        model = build_tiny("timm_vit")
        model.set_grad_checkpointing(checkpointing)
        targets = presets.PRESETS["timm_vit_all"]
        config = (vp.SNELLConfig(r=4, sparsity=0.5, softmax_term=True, target_modules=targets)
                  if method == "snella" else make_config(method, targets, **HOST_OVERRIDES.get(method, {})))
        vp.inject(model, config)
        randomize_adapters(model, std=0.05)
        model.train()
        run_host("timm_vit", model, example_inputs("timm_vit")).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)
