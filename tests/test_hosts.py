"""Every host family x every method, on tiny configs built locally (no hub)."""
import copy

import pytest
import torch
from conftest import HOST_OVERRIDES, METHOD_CONFIGS, make_config, randomize_adapters

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


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_resolves_on_some_tiny_host(name):
    preset = presets.PRESETS[name]
    hits = []
    for host in TINY_HOSTS:
        try:
            hits.append(resolve_targets(build_tiny(host), preset,
                                        blocks=name in presets.BLOCK_PRESETS))
        except vp.TargetError:
            continue
    assert any(hits), f"preset {name} matches no tiny host"


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
