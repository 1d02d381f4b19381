"""WaRA's dW against pywt.waverec2 of the same sub-bands, gradients, both readings."""
import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F
from conftest import randomize_adapters
from torch import nn

import visionpeft as vp
from visionpeft.methods.wara import wara_delta_weight


def _inject(layer, **cfg):
    model = nn.Sequential(layer)
    vp.inject(model, vp.WaRAConfig(target_modules=["0"], **cfg))
    randomize_adapters(model)
    return model, model[0].adapters["default"]["full"]


def _pywt_reference(mod, shape):
    """Same sub-bands through pywt.waverec2 (periodization), cropped to the layer."""
    bands = {k: v.detach().double().numpy() for k, v in mod.band_matrices().items()}
    coeffs = [bands["A"]]
    for level in range(mod.levels, 0, -1):
        coeffs.append(tuple(bands[f"{n}{level}"] for n in "HVD"))
    full = pywt.waverec2(coeffs, mod.wavelet, mode="periodization")
    return torch.from_numpy(np.ascontiguousarray(full[:shape[0], :shape[1]])) * mod.scale


@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym4"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(24, 40), (19, 13)])  # even, and odd (padded, cropped)
def test_dW_is_pywt_inverse_of_the_subbands(wavelet, levels, shape):
    torch.manual_seed(0)
    model, mod = _inject(nn.Linear(shape[1], shape[0]), r=3, wavelet=wavelet, levels=levels, alpha=6.0)
    ref = _pywt_reference(mod, shape)
    torch.testing.assert_close(vp.delta_weight(model, "0").double(), ref, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, shape[1])
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, model[0].weight + ref.float(), model[0].bias),
                                   atol=1e-4, rtol=1e-4)


def test_gradients_match_finite_differences():
    # two levels of db2 on an (11, 7) update padded to (12, 8): level-2 bands (3, 2),
    # level-1 bands (6, 4)
    shapes = {"A": (3, 2), **{f"{n}2": (3, 2) for n in "HVD"}, **{f"{n}1": (6, 4) for n in "HVD"}}
    names = list(shapes)
    inputs = [torch.randn(*shapes[k], dtype=torch.float64, requires_grad=True) for k in names]

    def fn(*tensors):
        return wara_delta_weight(dict(zip(names, tensors)), (11, 7), 2, "db2", 0.5)

    assert torch.autograd.gradcheck(fn, inputs)


def test_shared_factors_reading():
    torch.manual_seed(0)
    model, mod = _inject(nn.Linear(16, 12), r=2, share_factors=True)
    ba = (mod.B["A"] @ mod.A["A"]).detach().double().numpy()
    ref = pywt.waverec2([ba, (np.zeros_like(ba), np.zeros_like(ba), ba)], "haar", mode="periodization")
    torch.testing.assert_close(vp.delta_weight(model, "0").double(), torch.from_numpy(ref) * mod.scale)
    assert vp.trainable_parameters(model) == 2 * (6 + 8)  # half of LoRA's 2 * (12 + 16)


def test_counts_and_zero_init():
    model = nn.Sequential(nn.Linear(32, 16))
    vp.inject(model, vp.WaRAConfig(r=4, levels=2, target_modules=["0"]))
    assert torch.count_nonzero(vp.delta_weight(model, "0")) == 0
    # bands: A2 (4, 8); H2 V2 D2 (4, 8); H1 V1 D1 (8, 16); rank min(4, h, w)
    assert vp.trainable_parameters(model) == 4 * 4 * (4 + 8) + 3 * 4 * (8 + 16)


def test_conv_and_dW_follow_the_factors():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model, mod = _inject(conv, r=2, wavelet="db2")
    dW = vp.delta_weight(model, "0")
    assert dW.shape == conv.weight.shape
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv2d(x, conv.weight + dW, conv.bias, padding=1),
                                   atol=1e-5, rtol=1e-5)
        mod.B["A"].add_(1.0)  # dW follows the factors
        assert not torch.allclose(vp.delta_weight(model, "0"), dW)


def test_bad_wavelet_and_levels_are_refused():
    with pytest.raises(vp.ConfigError, match="haar"):
        vp.WaRAConfig(wavelet="haarr", target_modules=["0"])
    with pytest.raises(vp.ConfigError, match="orthogonal"):
        vp.WaRAConfig(wavelet="bior2.2", target_modules=["0"])
    with pytest.raises(vp.ConfigError, match="levels=1"):
        vp.WaRAConfig(share_factors=True, levels=2, target_modules=["0"])
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="use r <= 4"):
        vp.inject(model, vp.WaRAConfig(r=5, target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)
    model = nn.Sequential(nn.Linear(5, 3))  # 3 x 5: one halving at most
    with pytest.raises(ValueError, match="levels <= 1 here"):
        vp.inject(model, vp.WaRAConfig(r=1, levels=2, target_modules=["0"]))
    assert isinstance(model[0], nn.Linear)


def test_layer_gradients_match_an_explicit_reference():
    """The fused path (dW folded into the host weight, rebuilt in backward) against
    autograd through F.linear(x, W + dW)."""
    torch.manual_seed(0)
    lin = nn.Linear(13, 10)
    model, mod = _inject(lin, r=2, wavelet="db2", levels=2)
    x = torch.randn(3, 5, 13, requires_grad=True)
    model(x).square().sum().backward()
    clones = {k: (mod.B[k].detach().clone().requires_grad_(True), mod.A[k].detach().clone().requires_grad_(True))
              for k in mod.A}
    bands = {k: b @ a for k, (b, a) in clones.items()}
    dW = wara_delta_weight(bands, (10, 13), 2, "db2", mod.scale)
    xr = x.detach().clone().requires_grad_(True)
    F.linear(xr, lin.weight + dW, lin.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)
    for k, (b, a) in clones.items():
        torch.testing.assert_close(mod.B[k].grad, b.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.A[k].grad, a.grad, atol=1e-4, rtol=1e-4)


def test_factors_are_cached_while_frozen_and_rebuilt_when_the_factors_change(monkeypatch):
    import visionpeft.methods.wara as wara

    calls = []
    real = wara.wara_factors
    monkeypatch.setattr(wara, "wara_factors", lambda *a: calls.append(1) or real(*a))
    model, mod = _inject(nn.Linear(16, 12), r=2, levels=2)
    x = torch.randn(3, 16)
    model(x).sum().backward()
    model(x)
    assert len(calls) == 2  # trainable: once per forward
    model.requires_grad_(False)
    first = model(x)
    assert torch.equal(model(x), first) and len(calls) == 3  # frozen: built once, then reused
    with torch.no_grad():
        mod.B["A"].add_(1.0)  # an in-place change (an optimizer step, load_state_dict) bumps the version
    changed = model(x)
    assert len(calls) == 4 and not torch.allclose(changed, first)
    ref = F.linear(x, model[0].base_layer.weight + mod.delta_weight(), model[0].base_layer.bias)
    torch.testing.assert_close(changed, ref)


def test_factors_cached_under_inference_mode_can_be_saved_by_a_later_training_step():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 12))
    vp.inject(model, vp.WaRAConfig(r=2, target_modules=["1"]))
    randomize_adapters(model)
    model[1].requires_grad_(False)  # the WaRA layer frozen, the Linear below it trained
    model[0].requires_grad_(True)
    x = torch.randn(3, 16)
    with torch.inference_mode():
        model(x)
    model(x).square().sum().backward()  # the cached factors are saved for backward here
    assert model[0].weight.grad is not None
