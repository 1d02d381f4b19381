"""LoRA values against hand-built references: dW = (alpha/r) B A, each layer kind, MHA."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters
from torch import nn

import visionpeft as vp
from visionpeft.methods.lora import lora_add_linear


def _single(layer, cfg, name="a", seed=0):
    model = nn.Sequential(layer)
    vp.inject(model, cfg, name=name)
    randomize_adapters(model, seed)
    return model


@pytest.mark.parametrize("rs", [False, True])
def test_linear_delta_weight_is_scaled_BA(rs):
    model = _single(nn.Linear(17, 11), vp.LoRAConfig(r=3, alpha=5.0, rank_stabilized=rs, target_modules=["0"]))
    mod = model[0].adapters["a"]["full"]
    scale = 5.0 / (math.sqrt(3) if rs else 3)
    expected = scale * mod.lora_B.detach() @ mod.lora_A.detach()
    torch.testing.assert_close(vp.delta_weight(model, "0"), expected, atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 4, 17)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, model[0].weight + expected, model[0].bias),
                                   atol=1e-5, rtol=1e-5)


def test_alpha_none_means_scale_one():
    model = _single(nn.Linear(6, 5), vp.LoRAConfig(r=2, target_modules=["0"]))
    mod = model[0].adapters["a"]["full"]
    torch.testing.assert_close(mod.delta_weight(), (mod.lora_B @ mod.lora_A).detach())


def test_init_starts_at_zero_delta():
    model = nn.Sequential(nn.Linear(6, 5))
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))
    assert torch.count_nonzero(vp.delta_weight(model, "0")) == 0
    assert model[0].adapters["default"]["full"].lora_A.abs().sum() > 0


CONVS = [
    dict(in_channels=3, out_channels=5, kernel_size=3),
    dict(in_channels=4, out_channels=7, kernel_size=(3, 2), stride=2, padding=1),
    dict(in_channels=5, out_channels=3, kernel_size=3, dilation=2, padding="same"),
    dict(in_channels=6, out_channels=4, kernel_size=3, groups=2, padding=1),
    dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1),  # depthwise
]


@pytest.mark.parametrize("kw", CONVS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_conv_forward_equals_conv_with_merged_kernel(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kw)
    model = _single(conv, vp.LoRAConfig(r=2, alpha=3.0, target_modules=["0"]))
    mod = model[0].adapters["a"]["full"]
    dW = 1.5 * (mod.lora_B @ mod.lora_A).detach().reshape(conv.weight.shape)
    torch.testing.assert_close(vp.delta_weight(model, "0"), dW, atol=1e-6, rtol=1e-6)
    x = torch.randn(2, kw["in_channels"], 9, 8)
    expected = F.conv2d(x, conv.weight + dW, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_qkv_slices_touch_only_their_rows():
    torch.manual_seed(0)
    lin = nn.Linear(10, 30)
    model = _single(lin, vp.LoRAConfig(r=2, target_modules=["0[q,v]"]))
    dW = vp.delta_weight(model, "0")
    assert torch.count_nonzero(dW[10:20]) == 0 and torch.count_nonzero(dW[:10]) > 0
    q, v = model[0].adapters["a"]["q"], model[0].adapters["a"]["v"]
    torch.testing.assert_close(dW[:10], (q.lora_B @ q.lora_A).detach())
    torch.testing.assert_close(dW[20:], (v.lora_B @ v.lora_A).detach())
    x = torch.randn(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, lin.weight + dW, lin.bias), atol=1e-5, rtol=1e-5)


def _manual_mha(x, w_in, b_in, w_out, b_out, heads):
    """Self-attention written out by hand (batch first), no dropout, no mask."""
    b, n, e = x.shape
    q, k, v = F.linear(x, w_in, b_in).chunk(3, -1)
    split = lambda t: t.view(b, n, heads, e // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = (q @ k.transpose(-1, -2) / math.sqrt(e // heads)).softmax(-1)
    out = (att @ v).transpose(1, 2).reshape(b, n, e)
    return F.linear(out, w_out, b_out), att.mean(1)


@pytest.mark.parametrize("targets", [["0"], ["0[q,v]"], ["0.out_proj"], ["0[k,out]"]])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_equals_manual_attention_with_updated_weights(targets, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)
    model = _single(mha, vp.LoRAConfig(r=2, target_modules=targets))
    d_in = vp.delta_weight(model, "0")
    d_out = vp.delta_weight(model, "0.out_proj")
    assert d_in.shape == (36, 12) and d_out.shape == (12, 12)
    assert torch.count_nonzero(d_in) + torch.count_nonzero(d_out) > 0
    x = torch.randn(2, 5, 12)
    ref, ref_w = _manual_mha(x, mha.in_proj_weight + d_in, mha.in_proj_bias,
                             mha.out_proj.weight + d_out, mha.out_proj.bias, 3)
    inp = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        out, w = model[0](inp, inp, inp, need_weights=True)
        out_fast, none = model[0](inp, inp, inp, need_weights=False)
    out = out if batch_first else out.transpose(0, 1)
    out_fast = out_fast if batch_first else out_fast.transpose(0, 1)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_fast, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, ref_w.detach(), atol=1e-6, rtol=1e-5)
    assert none is None


def test_mha_gradients_reach_the_factors():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = _single(mha, vp.LoRAConfig(r=2, target_modules=["0"]))
    x = torch.randn(2, 3, 8)
    model[0](x, x, x)[0].sum().backward()
    for part in ("in_proj", "out_proj"):
        mod = model[0].adapters["a"][part]
        assert mod.lora_A.grad is not None and mod.lora_A.grad.abs().sum() > 0


@pytest.mark.parametrize("targets", [["0"], ["0[q,v]"], ["0[k,out]"]])
@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_gradients_equal_autograd_through_hand_written_attention(targets, batch_first):
    """Gradients of every factor and of the input equal autograd through attention written
    out by hand with W + (alpha/r) B A, each dW built from leaf copies of the factors."""
    torch.manual_seed(0)
    e, heads, alpha, r = 12, 3, 5.0, 2
    mha = nn.MultiheadAttention(e, heads, batch_first=batch_first)
    model = _single(mha, vp.LoRAConfig(r=r, alpha=alpha, target_modules=targets))
    model.train()
    parts = model[0].adapters["a"]
    leaves = {p: (m.lora_A.detach().clone().requires_grad_(), m.lora_B.detach().clone().requires_grad_())
              for p, m in parts.items()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, e, generator=g)
    weight = torch.randn(2, 5, e, generator=g)  # a loss that weighs every output differently
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    inp = x_ours if batch_first else x_ours.transpose(0, 1)
    out = model[0](inp, inp, inp, need_weights=False)[0]
    ((out if batch_first else out.transpose(0, 1)) * weight).sum().backward()

    d_in, d_out = [], torch.zeros(e, e)
    for part in ("q", "k", "v"):
        whole = "in_proj" in leaves
        a, b = leaves["in_proj"] if whole else leaves.get(part, (None, None))
        if whole:
            d_in = [(alpha / r) * b @ a]
            break
        d_in.append(torch.zeros(e, e) if a is None else (alpha / r) * b @ a)
    d_in = torch.cat(d_in, 0)
    if "out_proj" in leaves:
        a, b = leaves["out_proj"]
        d_out = (alpha / r) * b @ a
    ref, _ = _manual_mha(x_ref, mha.in_proj_weight.detach() + d_in, mha.in_proj_bias.detach(),
                         mha.out_proj.weight.detach() + d_out, mha.out_proj.bias.detach(), heads)
    (ref * weight).sum().backward()

    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert set(parts) == {"0": {"in_proj", "out_proj"}, "0[q,v]": {"q", "v"}, "0[k,out]": {"k", "out_proj"}}[targets[0]]
    for p, mod in parts.items():
        a, b = leaves[p]
        assert b.grad.abs().max() > 1e-3, p  # randomised factors: both gradients are far from zero
        torch.testing.assert_close(mod.lora_A.grad, a.grad, atol=1e-5, rtol=1e-5, msg=f"{p} lora_A")
        torch.testing.assert_close(mod.lora_B.grad, b.grad, atol=1e-5, rtol=1e-5, msg=f"{p} lora_B")


@pytest.mark.parametrize("shape", [(5, 13), (2, 3, 13)])
def test_fused_add_gradients_match_autograd_reference(shape):
    """lora_add_linear (addmm-fused, in place) gives the same values and gradients as the
    plain two-linear form."""
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    y = torch.randn(*shape[:-1], 7, requires_grad=True)
    A = torch.randn(3, 13, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    # y as a host layer hands it over: a view of a 2-D matmul output
    y_host = (y.reshape(-1, 7) * 1.0).view(y.shape)
    out = lora_add_linear(x, y_host, A, B, 0.7)
    ref = y + 0.7 * F.linear(F.linear(x, A), B)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, y, A, B), g)
    ref_grads = torch.autograd.grad(ref, (x, y, A, B), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dropout_applies_only_in_training():
    model = _single(nn.Linear(20, 20), vp.LoRAConfig(r=4, dropout=0.5, target_modules=["0"]))
    x = torch.randn(8, 20)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        c = model(x)
    assert not torch.allclose(c, a)


def test_matches_peft_lora_outputs_and_gradients_on_a_timm_vit():
    """Independent reference: HF PEFT's LoRA on the same ViT with the same factors."""
    import copy

    import peft

    from visionpeft.backbones.tiny import build_tiny

    base = build_tiny("timm_vit").train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["qkv", "proj", "fc1", "fc2"], exclude_modules=["patch_embed.proj"]))
    ours = vp.inject(copy.deepcopy(base), vp.LoRAConfig(r=3, alpha=6, target_modules=vp.presets.TIMM_VIT_ALL))
    randomize_adapters(ours, std=0.1)
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if hasattr(layer, "adapters"):
                mod = layer.adapters["default"]["full"]
                peft_layer = theirs.base_model.model.get_submodule(name)
                peft_layer.lora_A["default"].weight.copy_(mod.lora_A)
                peft_layer.lora_B["default"].weight.copy_(mod.lora_B)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    n = 0
    for name, layer in ours.named_modules():
        if hasattr(layer, "adapters"):
            mod = layer.adapters["default"]["full"]
            peft_layer = theirs.base_model.model.get_submodule(name)
            torch.testing.assert_close(mod.lora_A.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(mod.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-4, rtol=1e-4)
            n += 1
    assert n == 8


@pytest.mark.parametrize("bias", [True, False])
def test_fused_host_and_lora_match_autograd_reference(bias):
    """lora_linear (host Linear + LoRA in one Function) against plain autograd, for the
    input, host weight and bias, and both factors."""
    from visionpeft.methods.lora import lora_linear

    torch.manual_seed(0)
    x = torch.randn(2, 5, 13, requires_grad=True)
    W = torch.randn(7, 13, requires_grad=True)
    b = torch.randn(7, requires_grad=True) if bias else None
    A = torch.randn(3, 13, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    out = lora_linear(x, W, b, A, B, 0.7)
    ref = F.linear(x, W, b) + 0.7 * F.linear(F.linear(x, A), B)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    leaves = [t for t in (x, W, b, A, B) if t is not None]
    g = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, W, b, A, B, 0.7), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [vp.LoRAConfig(r=2, target_modules=["0"]),
                                    vp.BlockLoRAConfig(r=2, n_blocks=2, target_modules=["0"]),
                                    vp.WaRAConfig(r=2, target_modules=["0"])])
def test_a_second_derivative_is_refused_not_silently_wrong(config):
    """The fused Functions save x A^T without its graph: create_graph would differentiate
    a constant, so they are once_differentiable (an error, not a wrong number)."""
    model = nn.Sequential(nn.Linear(8, 6))
    vp.inject(model, config)
    randomize_adapters(model)
    x = torch.randn(5, 8)
    loss = model(x).square().sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sum(g.square().sum() for g in grads).backward()


def test_alpha_must_be_finite():
    with pytest.raises(vp.ConfigError, match="finite"):
        vp.LoRAConfig(r=2, alpha=float("inf"), target_modules=["0"])


# --- init (README, LoRA: "B = 0 at init and A Kaiming-uniform (as nn.Linear inits a weight
# of that shape, and as PEFT does)"; init="gaussian": PEFT's normal init of A, std 1/r) ----
@pytest.mark.parametrize("host,fan_in", [(lambda: nn.Linear(40, 24), 40),
                                         (lambda: nn.Conv2d(6, 8, 3, padding=1), 6 * 3 * 3)])
def test_kaiming_init_of_A_is_nn_linears_and_B_is_zero(host, fan_in):
    """A is drawn as nn.Linear(fan_in, r) draws its weight from the same generator state
    (kaiming_uniform_ with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))); B is zero."""
    r = 5
    model = nn.Sequential(host())
    torch.manual_seed(123)
    vp.inject(model, vp.LoRAConfig(r=r, target_modules=["0"]))
    mod = model[0].adapters["default"]["full"]
    torch.manual_seed(123)
    expected = nn.Linear(fan_in, r, bias=False).weight.detach()
    torch.manual_seed(123)
    also = nn.init.kaiming_uniform_(torch.empty(r, fan_in), a=math.sqrt(5))
    assert mod.lora_A.shape == (r, fan_in)
    torch.testing.assert_close(mod.lora_A.detach(), expected, atol=0, rtol=0)
    torch.testing.assert_close(expected, also, atol=0, rtol=0)
    assert float(mod.lora_A.detach().abs().max()) <= 1 / math.sqrt(fan_in)
    assert torch.count_nonzero(mod.lora_B) == 0 and mod.lora_B.shape == (model[0].base_layer.weight.shape[0], r)
    assert torch.count_nonzero(vp.delta_weight(model, "0")) == 0


def test_gaussian_init_of_A_is_peft_normal_with_std_one_over_r():
    """init="gaussian": A ~ N(0, (1/r)^2) (PEFT's `init_lora_weights="gaussian"`), drawn
    from the same generator state as nn.init.normal_; B still zero."""
    r, fan_in = 4, 300
    model = nn.Sequential(nn.Linear(fan_in, 200))
    torch.manual_seed(7)
    vp.inject(model, vp.LoRAConfig(r=r, init="gaussian", target_modules=["0"]))
    mod = model[0].adapters["default"]["full"]
    torch.manual_seed(7)
    expected = nn.init.normal_(torch.empty(r, fan_in), std=1.0 / r)
    torch.testing.assert_close(mod.lora_A.detach(), expected, atol=0, rtol=0)
    assert abs(float(mod.lora_A.detach().std()) - 1.0 / r) < 0.1 / r  # 1200 draws: a loose sanity bound
    assert torch.count_nonzero(mod.lora_B) == 0
