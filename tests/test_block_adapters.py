"""Block methods (the bottleneck Adapter): math against hand-written references, each
placement against its formula, every host family, save/load, routing, errors."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK_METHOD_CONFIGS, randomize_adapters
from torch import nn

import visionpeft as vp
from visionpeft.backbones import presets
from visionpeft.core.adapter import HostSpec
from visionpeft.backbones.tiny import build_tiny, example_inputs, run_host
from visionpeft.methods.adapter import bottleneck_delta


def _params(seed, d_in, b, d_out):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in ((b, d_in), (b,), (d_out, b), (d_out,))]


def test_bottleneck_delta_matches_hand_written_forms():
    dw, db, uw, ub = _params(0, 7, 3, 5)
    h = torch.randn(2, 4, 7)
    ref = 0.3 * ((0.5 * (h @ dw.T + db) * (1 + torch.erf((h @ dw.T + db) / 2 ** 0.5))) @ uw.T + ub)
    torch.testing.assert_close(bottleneck_delta(h, dw, db, uw, ub, "gelu", 0.3), ref)
    relu = torch.clamp(h @ dw.T + db, min=0) @ uw.T + ub
    torch.testing.assert_close(bottleneck_delta(h, dw, db, uw, ub, "relu"), relu)
    # channels first: the same map as two 1x1 convolutions
    img = torch.randn(2, 7, 3, 5)
    conv = F.conv2d(F.silu(F.conv2d(img, dw[:, :, None, None], db)), uw[:, :, None, None], ub)
    torch.testing.assert_close(bottleneck_delta(img, dw, db, uw, ub, "silu", channels_first=True),
                               conv, rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    """A block that changes width (in 6 -> out 10), returns (hidden, extra) like a
    transformers layer, and takes a keyword."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 9)
        self.fc2 = nn.Linear(9, 10)

    def forward(self, x, gain=1.0):
        return self.fc2(torch.tanh(self.fc1(self.norm(x)))) * gain, "extra"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.lift = nn.Linear(10, 6)
        self.block2 = Block()

    def forward(self, x):
        h, _ = self.block(x, gain=2.0)
        return self.block2(self.lift(h))[0]


def _adapter(mod_or_model, name="block"):
    wrapper = dict(vp.core.model_ops.adapted_layers(mod_or_model))[name]
    return next(iter(wrapper.adapters.values()))["full"]


@pytest.mark.parametrize("kw,formula", [
    ({"placement": "sequential", "position": "output"}, "output"),
    ({"placement": "sequential", "position": "input"}, "input"),
    ({"placement": "parallel"}, "parallel"),
])
def test_each_placement_follows_its_formula(kw, formula):
    torch.manual_seed(0)
    model = Net()
    base = copy.deepcopy(model)
    if formula == "parallel":  # parallel needs out == in: adapt the width-keeping lift
        vp.inject(model, vp.AdapterConfig(bottleneck=3, alpha=0.7, target_modules=["lift"], **kw))
    else:
        vp.inject(model, vp.AdapterConfig(bottleneck=3, alpha=0.7, target_modules=["block"], **kw))
    randomize_adapters(model)
    x = torch.randn(2, 5, 6)
    vp.set_scale(model, "default", 0.5)
    s = 0.5 * 0.7
    with torch.no_grad():
        out = model(x)
        if formula == "parallel":
            mod = _adapter(model, "lift")
            f = lambda h: bottleneck_delta(h, mod.down.weight, mod.down.bias, mod.up.weight,  # noqa: E731
                                           mod.up.bias, "gelu")
            h, _ = base.block(x, gain=2.0)
            ref = base.block2(base.lift(h) + s * f(h))[0]
        else:
            mod = _adapter(model)
            f = lambda h: bottleneck_delta(h, mod.down.weight, mod.down.bias, mod.up.weight,  # noqa: E731
                                           mod.up.bias, "gelu")
            if formula == "output":
                h, _ = base.block(x, gain=2.0)
                h = h + s * f(h)
            else:
                h, _ = base.block(x + s * f(x), gain=2.0)
            ref = base.block2(base.lift(h))[0]
    torch.testing.assert_close(out, ref)
    assert (out - base(x)).abs().max() > 1e-3


def test_sizes_are_read_from_the_block_and_counted():
    model = Net()
    vp.inject(model, vp.AdapterConfig(bottleneck=3, target_modules=["block"]), name="out")
    vp.inject(model, vp.AdapterConfig(bottleneck=3, position="input", target_modules=["block2"]),
              name="in")
    assert (_adapter(model).d_in, _adapter(model).d_out) == (10, 10)
    wrapper = vp.core.model_ops.adapted_layers(model)["block2"]
    assert (wrapper.adapters["in"]["full"].d_in, wrapper.adapters["in"]["full"].d_out) == (6, 6)
    assert vp.trainable_parameters(model) == (3 * 10 + 3 + 10 * 3 + 10) + (3 * 6 + 3 + 6 * 3 + 6)
    assert vp.summary(model).adapter_parameters == vp.trainable_parameters(model)


# one block preset per host family (kwargs where the family needs them)
HOST_CASES = [
    ("timm_vit", "timm_blocks", {}),
    ("timm_vit", "timm_vit_mlp", {"placement": "parallel", "alpha": 0.1}),
    ("timm_dinov3", "timm_blocks", {"position": "input"}),
    ("timm_sam2_hiera", "timm_blocks", {}),  # stage changes: 16 -> 32 features
    ("hf_dinov2", "hf_vit_layers", {}),
    ("hf_dinov3", "hf_vit_layers", {"position": "input"}),
    ("hf_sam2_vision", "hf_sam2_blocks", {"position": "input"}),
    ("open_clip", "clip_blocks", {}),
    ("sd_unet", "sd_unet_transformer_blocks", {"placement": "parallel"}),
    ("sd_unet", "sd_unet_resnets", {"channels": "first"}),
    ("sd3_dit", "dit_ff", {}),
]


# the hosts each block method applies to: Earth-Adapter reads tokens as an image, so ViT
# and Hiera blocks (not CLIP's sequence-first blocks, UNets or DiT feed-forwards)
IMAGE_TOKEN_HOSTS = {"timm_vit", "timm_dinov3", "timm_sam2_hiera", "hf_dinov2", "hf_dinov3", "hf_sam2_vision"}
CASES = [("adapter", *case) for case in HOST_CASES] + [
    ("earth_adapter", h, p, {}) for h, p, _ in HOST_CASES if h in IMAGE_TOKEN_HOSTS and p != "timm_vit_mlp"]
# methods whose blocks need more than hidden states (Point-PEFT: token centres and a memory
# bank) have their own file of the same checks on their host
OWN_FILES = {"point_peft": "tests/test_point_peft.py"}
assert {m for m, *_ in CASES} | set(OWN_FILES) == set(BLOCK_METHOD_CONFIGS), "give a new block method its host cases"


@pytest.mark.parametrize("method,host,preset,kw", CASES)
def test_block_adapter_on_every_host(tmp_path, method, host, preset, kw):
    model = build_tiny(host)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    base = copy.deepcopy(model).requires_grad_(False)
    inputs = example_inputs(host)
    config = BLOCK_METHOD_CONFIGS[method](presets.PRESETS[preset], **kw)
    vp.inject(model, config, name="a")
    with torch.no_grad():
        ref = run_host(host, base, inputs)
        torch.testing.assert_close(run_host(host, model, inputs), ref)  # zero-init: identity
    randomize_adapters(model, std=0.05)
    with torch.no_grad():
        out = run_host(host, model, inputs)
        with vp.disabled(model):
            off = run_host(host, model, inputs)
    assert torch.equal(off, ref)
    assert (out - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no weight-space form"):
        vp.merge(model)
    # save, then load into a fresh host through the saved config
    vp.save_adapter(model, tmp_path / "a", name="a")
    fresh = build_tiny(host)
    vp.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(run_host(host, fresh, inputs), out)
    vp.remove(model)
    new_sd = model.state_dict()
    assert list(new_sd) == list(sd)
    assert all(torch.equal(new_sd[k], v) for k, v in sd.items())


def test_names_and_files_do_not_depend_on_injection_order(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    lora = vp.LoRAConfig(r=2, target_modules=presets.TIMM_VIT_QKV)
    adapter = vp.AdapterConfig(bottleneck=4, target_modules=presets.TIMM_BLOCKS)
    a = build_tiny("timm_vit")
    vp.inject(a, lora, name="l")
    vp.inject(a, adapter, name="b")
    randomize_adapters(a)
    b = build_tiny("timm_vit")
    vp.inject(b, adapter, name="b")
    vp.inject(b, lora, name="l")  # the qkv layers now sit inside block wrappers
    assert sorted(vp.core.model_ops.adapted_layers(a)) == sorted(vp.core.model_ops.adapted_layers(b))
    vp.save_adapter(a, tmp_path / "l", name="l")
    vp.save_adapter(a, tmp_path / "b", name="b")
    for name in ("l", "b"):
        vp.remove(b, name)
        vp.load_adapter(b, tmp_path / name)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
        with vp.disabled(a):
            plain = a(x)
    # LoRA inside a block wrapper still merges, unmerges and exports
    vp.set_active(b, ["l"])
    with torch.no_grad():
        lora_only = b(x)
        vp.merge(b)
        torch.testing.assert_close(b(x), lora_only, atol=1e-5, rtol=1e-5)
        vp.unmerge(b)
    vp.export(b, tmp_path / "l.safetensors", name="l", format="peft")
    vp.remove(b)
    with torch.no_grad():
        torch.testing.assert_close(b(x), plain)
    assert set(b.state_dict()) == set(build_tiny("timm_vit").state_dict())


def test_routing_gives_each_row_its_adapter():
    torch.manual_seed(0)
    model = Net()
    vp.inject(model, vp.AdapterConfig(bottleneck=3, target_modules=["block"]), name="o")
    vp.inject(model, vp.AdapterConfig(bottleneck=3, position="input", target_modules=["block"]),
              name="i")
    vp.inject(model, vp.AdapterConfig(bottleneck=3, placement="parallel", target_modules=["lift"]),
              name="p")
    randomize_adapters(model)
    x = torch.randn(4, 5, 6)
    rows = ["o", None, "p", "i"]
    with torch.no_grad():
        with vp.routing(model, rows):
            routed = model(x)
        for i, name in enumerate(rows):
            vp.set_active(model, [] if name is None else [name])
            torch.testing.assert_close(routed[i], model(x[i:i + 1])[0])


def test_only_adapters_train_and_fp32_adapters_run_on_a_bf16_host():
    model = build_tiny("timm_vit")
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=presets.TIMM_BLOCKS))
    randomize_adapters(model)
    inputs = example_inputs("timm_vit")
    run_host("timm_vit", model, inputs).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters." in n for n in grads)
    model.to(torch.bfloat16)
    for n, p in model.named_parameters():
        if ".adapters." in n:
            p.data = p.data.float()
    with torch.no_grad():
        out = run_host("timm_vit", model, {"x": inputs["x"].to(torch.bfloat16)})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_hotswap_replaces_tensors_in_place(tmp_path):
    model = build_tiny("timm_vit")
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=presets.TIMM_BLOCKS), name="a")
    params = [p for n, p in model.named_parameters() if ".adapters." in n]
    randomize_adapters(model, seed=1)
    vp.save_adapter(model, tmp_path / "one", name="a")
    x = example_inputs("timm_vit")
    with torch.no_grad():
        want = run_host("timm_vit", model, x)
    randomize_adapters(model, seed=2)
    vp.load_adapter(model, tmp_path / "one", name="a", hotswap=True)
    assert [p for n, p in model.named_parameters() if ".adapters." in n] == params
    with torch.no_grad():
        torch.testing.assert_close(run_host("timm_vit", model, x), want)


def test_bad_input_is_refused_with_what_would_work(tmp_path):
    model = Net()
    with pytest.raises(vp.TargetError, match="nest"):
        vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["re:block.*"]))
    with pytest.raises(vp.TargetError, match="drop the"):
        vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["lift[q]"]))
    with pytest.raises(ValueError, match="bottleneck <= 10"):
        vp.inject(model, vp.AdapterConfig(bottleneck=11, target_modules=["block"]))
    with pytest.raises(vp.ConfigError, match="placement"):
        vp.AdapterConfig(bottleneck=2, placement="serial", target_modules=["block"])
    hiera = build_tiny("timm_sam2_hiera")  # its stage blocks pool tokens: no parallel there
    vp.inject(hiera, vp.AdapterConfig(bottleneck=2, placement="parallel",
                                      target_modules=presets.TIMM_BLOCKS))
    with pytest.raises(ValueError, match="placement='sequential'"):
        run_host("timm_sam2_hiera", hiera, example_inputs("timm_sam2_hiera"))
    # a parallel adapter may change width with its block (down 6 -> 2, up 2 -> 10)
    vp.inject(model, vp.AdapterConfig(bottleneck=2, placement="parallel", target_modules=["block"]))
    assert model(torch.randn(1, 2, 6)).shape == (1, 2, 10)
    vp.remove(model)
    assert vp.core.model_ops.get_state(model, required=False) is None
    vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["lift"]), name="b")
    with pytest.raises(vp.TargetError, match="wrapped whole"):
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=["lift"]), name="l")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["fc1"]), name="l")
    with pytest.raises(vp.TargetError, match="cannot wrap the same layer"):
        vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["block.fc1"]), name="c")
    with pytest.raises(TypeError, match="no weight-space form"):
        vp.delta_weight(model, "lift", name="b")
    with pytest.raises(Exception, match="weight-space|no weight"):
        vp.export(model, tmp_path / "b.safetensors", name="b", format="peft")
    assert not (tmp_path / "b.safetensors").exists()
    channels = vp.AdapterConfig(bottleneck=2, channels="first", target_modules=["block2"])
    vp.inject(model, channels, name="c")
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 2, 6))


@pytest.mark.parametrize("host,preset", [("hf_dinov3", "hf_vit_layers"),
                                         ("hf_sam2_vision", "hf_sam2_blocks")])
def test_hooks_of_the_host_see_adapted_hidden_states(host, preset):
    """transformers collects output_hidden_states with hooks on its layer classes: they
    must record what the next layer receives, adapters included."""
    model = build_tiny(host).eval()
    vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=presets.PRESETS[preset]))
    randomize_adapters(model)
    seen = {}
    for i, layer in enumerate(vp.core.model_ops.adapted_layers(model).values()):
        layer.register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hidden = model(**example_inputs(host), output_hidden_states=True).hidden_states
    assert len(seen) >= 2
    for i, out in seen.items():
        torch.testing.assert_close(hidden[i + 1], out, rtol=0, atol=0)


def test_remove_takes_the_hooks_off_and_copies_stay_independent():
    model = build_tiny("timm_vit")
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=presets.TIMM_BLOCKS))
    randomize_adapters(model)
    twin = copy.deepcopy(model)
    x = example_inputs("timm_vit")
    with torch.no_grad():
        want = run_host("timm_vit", model, x)
        vp.remove(twin)  # must not touch the original's hooks
        torch.testing.assert_close(run_host("timm_vit", model, x), want)
        with vp.disabled(model):
            plain = run_host("timm_vit", model, x)
        torch.testing.assert_close(run_host("timm_vit", twin, x), plain)
    vp.remove(model)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.blocks)


def _effect(model, x, name):
    with torch.no_grad():
        vp.set_active(model, [name])
        on = model(x)
        vp.set_active(model, [])
        off = model(x)
    vp.set_active(model, list(vp.core.model_ops.get_state(model).configs))
    return (on - off).abs().max().item()


def test_direct_children_of_an_adapted_block_stay_reachable(tmp_path):
    """A LoRA, a trained copy or another block adapter on a direct child of a wrapped
    block lands in the host block (not on the wrapper) and acts, saves and removes."""
    torch.manual_seed(0)
    model = Net()
    base = copy.deepcopy(model)
    x = torch.randn(2, 5, 6)
    vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["block"]), name="b")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["block.fc1"]), name="l")
    vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["block.fc2"]), name="inner")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["lift"], modules_to_save=["block.norm"]),
              name="t")
    randomize_adapters(model)
    layers = vp.core.model_ops.adapted_layers(model)
    assert {"block", "block.fc1", "block.fc2", "lift"} <= set(layers)
    assert "block.norm" in vp.core.model_ops.trained_copies(model)
    assert set(dict(model.block.named_children())) == {"base_layer", "adapters"}
    for name in ("b", "l", "inner", "t"):
        assert _effect(model, x, name) > 1e-4, name
    vp.save_adapter(model, tmp_path / "l", name="l")
    vp.save_adapter(model, tmp_path / "t", name="t")
    assert "block.norm" in json.loads((tmp_path / "t" / "adapter_config.json").read_text())["modules_to_save"]
    vp.remove(model, "b")  # the inner wrappers stay and keep working
    assert _effect(model, x, "inner") > 1e-4 and _effect(model, x, "l") > 1e-4
    vp.remove(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    assert list(model.state_dict()) == list(base.state_dict())


def test_clip_lora_on_qkv_after_adapters_on_the_resblocks():
    model = build_tiny("open_clip")
    vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=presets.CLIP_BLOCKS), name="b")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=presets.CLIP_QKV), name="l")
    randomize_adapters(model)
    inputs = example_inputs("open_clip")
    lora_layers = [n for n, m in vp.core.model_ops.adapted_layers(model).items() if "l" in m.adapters]
    assert len(lora_layers) == 4
    with torch.no_grad():
        vp.set_active(model, ["l"])
        on = run_host("open_clip", model, inputs)
        with vp.disabled(model):
            off = run_host("open_clip", model, inputs)
    assert (on - off).abs().max() > 1e-4


def test_norm_only_modules_and_containers():
    model = Net()
    vp.inject(model, vp.AdapterConfig(bottleneck=2, target_modules=["block.norm"]))
    assert _adapter(model, "block.norm").d_in == 6
    vit = build_tiny("hf_dinov3")  # its layers sit in a ModuleList
    with pytest.raises(vp.TargetError, match=r"no forward of its own.*re:model\\.layer"):
        vp.inject(vit, vp.AdapterConfig(bottleneck=2, target_modules=["model.layer"]))


def test_block_sizes_read_a_host_submodule_called_adapters_and_skip_our_own():
    """A host may call its own layers "adapters": they count for the block's sizes; the
    adapters we inject into it (a LoRA inside the block) do not."""
    class HostBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapters = nn.Sequential(nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 10))

        def forward(self, x):
            return self.adapters(x)

    host = nn.Sequential(HostBlock())
    assert HostSpec.for_block(host[0]).weight_shape == (10, 6)
    vp.inject(host, vp.LoRAConfig(r=2, target_modules=["0.adapters.2"]), name="inner")
    assert HostSpec.for_block(host[0]).weight_shape == (10, 6)
    # a wrapped last layer whose own adapter ends in another width still reads the host's
    layer = host[0].adapters[2]
    layer.adapters["inner"]["full"].register_module("tail", nn.Linear(2, 3))
    assert HostSpec.for_block(host[0]).weight_shape == (10, 6)


def test_calling_the_wrapped_block_directly_runs_its_adapters():
    """The adapters act through hooks on the host block, so code that holds the block
    itself (``wrapper.base_layer``) gets the adapted output too."""
    torch.manual_seed(0)
    model = Net()
    vp.inject(model, vp.AdapterConfig(bottleneck=3, target_modules=["block2"]), name="o")
    randomize_adapters(model)
    wrapper = dict(vp.core.model_ops.adapted_layers(model))["block2"]
    h = torch.randn(2, 5, 6)
    with torch.no_grad():
        through_wrapper = wrapper(h)[0]
        direct = wrapper.base_layer(h)[0]
        with vp.disabled(model):
            bare = wrapper.base_layer(h)[0]
    torch.testing.assert_close(direct, through_wrapper)
    assert (direct - bare).abs().max() > 1e-3


def test_down_is_nn_linears_default_init_and_up_is_zero():
    """README (Adapter): `down` Kaiming-uniform (nn.Linear's init, bias included) from the
    same generator state, `up` zero-initialised: a new adapter is the identity."""
    model = nn.Sequential(nn.Linear(12, 10))
    torch.manual_seed(5)
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=["0"]))
    mod = _adapter(model, "0")
    torch.manual_seed(5)
    expected = nn.Linear(10, 4)  # placement sequential, position output: d_in = 10
    torch.testing.assert_close(mod.down.weight.detach(), expected.weight.detach(), atol=0, rtol=0)
    torch.testing.assert_close(mod.down.bias.detach(), expected.bias.detach(), atol=0, rtol=0)
    assert torch.count_nonzero(mod.up.weight) == 0 and torch.count_nonzero(mod.up.bias) == 0
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[0].base_layer(x), atol=0, rtol=0)
