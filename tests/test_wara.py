"""WaRA's dW against pywt.waverec2 of the same sub-bands, gradients, both readings."""
import numpy as np
import pytest
import pywt
import torch
import torch.nn.functional as F
from conftest import Untouched, randomize_adapters
from torch import nn

import visionpeft as vp
from visionpeft.methods.wara import wara_delta_weight


def _inject(layer, **cfg):
    model = nn.Sequential(layer)
    vp.inject(model, vp.WaRAConfig(target_modules=["0"], **cfg))
    randomize_adapters(model)
    return model, model[0].adapters["default"]["full"]


def _wara_scale(r, alpha=None):
    """The README's scale, from the config alone: dW = (alpha / r) IDWT(...), alpha=None
    meaning alpha = r (the config's r, not the rank a small band is capped to)."""
    return (r if alpha is None else alpha) / r


def _pywt_reference(mod, shape, scale):
    """Same sub-bands through pywt.waverec2 (periodization), cropped to the layer."""
    bands = {k: v.detach().double().numpy() for k, v in mod.band_matrices().items()}
    coeffs = [bands["A"]]
    for level in range(mod.levels, 0, -1):
        coeffs.append(tuple(bands[f"{n}{level}"] for n in "HVD"))
    full = pywt.waverec2(coeffs, mod.wavelet, mode="periodization")
    return torch.from_numpy(np.ascontiguousarray(full[:shape[0], :shape[1]])) * scale


def _synthesis_matrix(n, channel, level, wavelet):
    """(n, n >> level) float64 matrix of pywt's 1-D periodized inverse transform of a
    coefficient vector placed in ``channel`` ("lo" / "hi") of ``level`` (finer levels zero),
    built column by column from unit vectors."""
    m = n >> level
    cols = []
    for i in range(m):
        e, z = np.eye(m)[i], np.zeros(m)
        coeffs = [e, z] if channel == "lo" else [z, e]
        coeffs += [np.zeros(n >> k) for k in range(level - 1, 0, -1)]
        cols.append(pywt.waverec(coeffs, wavelet, mode="periodization"))
    return torch.from_numpy(np.stack(cols, 1))


# pywt's 2-D bands: cH is high-pass along the rows axis, cV along the columns axis
_BAND_CHANNELS = {"A": ("lo", "lo"), "H": ("hi", "lo"), "V": ("lo", "hi"), "D": ("hi", "hi")}


def _plain_wara(pairs, shape, levels, wavelet, scale):
    """The formula written out, differentiable: dW = scale * crop(sum_S P_S B_S A_S Q_S^T)
    with P_S, Q_S pywt's synthesis matrices of band S along rows and columns (the 2-D
    inverse transform is separable), sizes padded to multiples of 2^levels. ``pairs`` is
    {band: (B_S, A_S)} in float64."""
    padded = [-(-s // 2 ** levels) * 2 ** levels for s in shape]
    dW = 0
    for band, (B, A) in pairs.items():
        level = levels if band == "A" else int(band[1:])
        row, col = _BAND_CHANNELS[band[0]]
        P = _synthesis_matrix(padded[0], row, level, wavelet)[:shape[0]]
        Q = _synthesis_matrix(padded[1], col, level, wavelet)[:shape[1]]
        dW = dW + P @ B @ A @ Q.t()
    return dW * scale


def _leaf_pairs(mod):
    """{band: (B_S, A_S)} as float64 leaves, the shared reading's one pair on A and D1."""
    leaves = {k: (mod.B[k].detach().double().clone().requires_grad_(True),
                  mod.A[k].detach().double().clone().requires_grad_(True)) for k in mod.A}
    pairs = {"A": leaves["A"], "D1": leaves["A"]} if mod.share else dict(leaves)
    return leaves, pairs


def test_plain_formula_is_pywt_waverec2():
    """The test's own matrix form of the inverse transform against pywt.waverec2."""
    torch.manual_seed(0)
    model, mod = _inject(nn.Linear(13, 19), r=3, wavelet="sym4", levels=2)
    model.double()  # band products in float64 on both sides
    _, pairs = _leaf_pairs(mod)
    torch.testing.assert_close(_plain_wara(pairs, (19, 13), 2, "sym4", 0.7).detach(),
                               _pywt_reference(mod, (19, 13), 0.7), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym4"])
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(24, 40), (19, 13)])  # even, and odd (padded, cropped)
def test_dW_is_pywt_inverse_of_the_subbands(wavelet, levels, shape):
    torch.manual_seed(0)
    model, mod = _inject(nn.Linear(shape[1], shape[0]), r=3, wavelet=wavelet, levels=levels, alpha=6.0)
    ref = _pywt_reference(mod, shape, _wara_scale(3, 6.0))
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


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_shared_factors_reading(alpha):
    torch.manual_seed(0)
    model, mod = _inject(nn.Linear(16, 12), r=2, share_factors=True, alpha=alpha)
    ba = (mod.B["A"] @ mod.A["A"]).detach().double().numpy()
    ref = pywt.waverec2([ba, (np.zeros_like(ba), np.zeros_like(ba), ba)], "haar", mode="periodization")
    torch.testing.assert_close(vp.delta_weight(model, "0").double(), torch.from_numpy(ref) * _wara_scale(2, alpha))
    assert vp.trainable_parameters(model) == 2 * (6 + 8)  # half of LoRA's 2 * (12 + 16)


def test_counts_and_zero_init():
    model = nn.Sequential(nn.Linear(32, 16))
    vp.inject(model, vp.WaRAConfig(r=4, levels=2, target_modules=["0"]))
    assert torch.count_nonzero(vp.delta_weight(model, "0")) == 0
    # bands: A2 (4, 8); H2 V2 D2 (4, 8); H1 V1 D1 (8, 16); rank min(4, h, w)
    assert vp.trainable_parameters(model) == 4 * 4 * (4 + 8) + 3 * 4 * (8 + 16)


@pytest.mark.parametrize("groups", [1, 2])  # the conv path and the grouped conv's host op with W + dW
def test_conv_and_dW_follow_the_factors(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    model, mod = _inject(conv, r=2, wavelet="db2", alpha=5.0)
    dW = vp.delta_weight(model, "0")
    assert dW.shape == conv.weight.shape
    # outside reference: pywt's inverse transform of the bands, scaled from the config,
    # as the kernel of a plain F.conv2d
    ref = _pywt_reference(mod, mod.shape, _wara_scale(2, 5.0)).float().reshape(conv.weight.shape)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        effect = F.conv2d(x, ref, padding=1, groups=groups).abs().max()
        assert effect > 0.1  # the tolerance below is far under the adapter's effect
        torch.testing.assert_close(model(x), F.conv2d(x, conv.weight + ref, conv.bias, padding=1, groups=groups),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dW, ref, atol=1e-6, rtol=1e-5)
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
    kept = Untouched(model)
    with pytest.raises(ValueError, match="use r <= 4"):
        vp.inject(model, vp.WaRAConfig(r=5, target_modules=["0"]))
    kept.check()
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 3))  # 3 x 5: one halving at most
    vp.inject(model, vp.WaRAConfig(r=1, target_modules=["1"]), name="first")  # a second inject is refused
    kept = Untouched(model)
    with pytest.raises(ValueError, match="levels <= 1 here"):
        vp.inject(model, vp.WaRAConfig(r=1, levels=2, target_modules=["0"]))
    kept.check()


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_layer_gradients_match_an_explicit_reference(alpha):
    """The fused path (dW folded into the host weight, rebuilt in backward) against
    autograd through F.linear(x, W + dW), dW written out from pywt's synthesis matrices
    and the config's scale (float64)."""
    torch.manual_seed(0)
    lin = nn.Linear(13, 10)
    model, mod = _inject(lin, r=2, wavelet="db2", levels=2, alpha=alpha)
    x = torch.randn(3, 5, 13, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    clones, pairs = _leaf_pairs(mod)
    dW = _plain_wara(pairs, (10, 13), 2, "db2", _wara_scale(2, alpha))
    xr = x.detach().double().requires_grad_(True)
    ref = F.linear(xr, lin.weight.double() + dW, lin.bias.double())
    ref.square().sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-4, rtol=1e-4)
    for k, (b, a) in clones.items():
        torch.testing.assert_close(mod.B[k].grad.double(), b.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mod.A[k].grad.double(), a.grad, atol=1e-4, rtol=1e-4)


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


# --- the polyphase fast path against the band-by-band synthesis it replaced ---------------
HOSTS = {"linear": lambda: nn.Linear(40, 24), "linear_odd": lambda: nn.Linear(13, 19),
         "conv": lambda: nn.Conv2d(6, 8, 3, padding=1)}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym4"])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("host", list(HOSTS))
def test_fast_factors_equal_the_band_by_band_synthesis(host, levels, wavelet, dtype, tol):
    from visionpeft.methods.wara import wara_factors, wara_factors_reference

    torch.manual_seed(0)
    model, mod = _inject(HOSTS[host](), r=3, wavelet=wavelet, levels=levels)
    model.to(dtype)
    pairs = mod.band_factors()
    got, ref = wara_factors(pairs, mod.shape, mod.levels, wavelet), wara_factors_reference(
        pairs, mod.shape, mod.levels, wavelet)
    params = [t for pair in pairs.values() for t in pair]
    seeds = [torch.randn_like(t) for t in ref]
    grads = [torch.autograd.grad(f, params, seeds) for f in (got, ref)]
    scale = max(t.abs().max().item() for t in ref)
    for a, b in zip(got, ref):
        assert a.dtype == dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=tol)
    gscale = max(g.abs().max().item() for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=tol * gscale, rtol=tol)


@pytest.mark.parametrize("frozen", [{"A", "H2", "D1"}, {"A", "H2", "V2", "D2"}, {"H1", "V1", "D1"}])
def test_frozen_bands_get_no_gradient_and_the_others_the_reference_one(frozen):
    """Some bands frozen (requires_grad False), part of a level or a whole level (one group
    of the synthesis, skipped in backward): the synthesis hands them None and the trainable
    bands the gradients of the band-by-band form."""
    from visionpeft.methods.wara import wara_factors, wara_factors_reference

    model, mod = _inject(nn.Linear(40, 24), r=3, wavelet="sym4", levels=2)
    model.double()
    for band in frozen:
        mod.A[band].requires_grad_(False)
        mod.B[band].requires_grad_(False)
    pairs = mod.band_factors()
    U, V = wara_factors(pairs, mod.shape, mod.levels, mod.wavelet)
    Ur, Vr = wara_factors_reference(pairs, mod.shape, mod.levels, mod.wavelet)
    seeds = [torch.randn_like(U), torch.randn_like(V)]
    trainable = [t for pair in pairs.values() for t in pair if t.requires_grad]
    got = torch.autograd.grad((U, V), trainable, seeds)
    ref = torch.autograd.grad((Ur, Vr), trainable, seeds)
    assert len(trainable) == 2 * (len(pairs) - len(frozen))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (U * seeds[0]).sum().backward()
    assert all(mod.B[band].grad is None for band in frozen)
    assert all(mod.B[band].grad is not None for band in pairs if band not in frozen)


@pytest.mark.parametrize("host", list(HOSTS))
@pytest.mark.parametrize("share", [False, True])
def test_layer_forward_and_gradients_equal_the_reference_formulation(host, share, monkeypatch):
    """The whole layer (fused Linear path, conv path, the shared reading) in float64 with
    the fast factors, then with the band-by-band ones swapped in, and both against autograd
    through the formula written out here (pywt's synthesis matrices, the config's scale)
    applied by F.linear / F.conv2d."""
    import visionpeft.methods.wara as wara

    torch.manual_seed(0)
    cfg = dict(r=2, wavelet="db2", levels=1) if share else dict(r=2, wavelet="sym4", levels=2)
    model, mod = _inject(HOSTS[host](), share_factors=share, alpha=3.0, **cfg)
    model.double()
    x = {"linear": (3, 40), "linear_odd": (3, 13), "conv": (2, 6, 5, 5)}[host]
    x = torch.randn(*x, dtype=torch.float64)

    def run():
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        out.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in mod.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.detach(), xr.grad, grads

    fast = run()
    monkeypatch.setattr(wara, "wara_factors", wara.wara_factors_reference)
    ref = run()
    torch.testing.assert_close(fast[0], ref[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-12, rtol=1e-12)
    for k in ref[2]:
        torch.testing.assert_close(fast[2][k], ref[2][k], atol=1e-12, rtol=1e-12)

    leaves, pairs = _leaf_pairs(mod)
    base = model[0].base_layer
    dW = _plain_wara(pairs, mod.shape, cfg["levels"], cfg["wavelet"], _wara_scale(2, 3.0))
    xr = x.clone().requires_grad_(True)
    if host == "conv":
        plain = F.conv2d(xr, base.weight + dW.reshape(base.weight.shape), base.bias, padding=1)
    else:
        plain = F.linear(xr, base.weight + dW, base.bias)
    plain.square().sum().backward()
    assert (plain - (F.conv2d(x, base.weight, base.bias, padding=1) if host == "conv"
                     else F.linear(x, base.weight, base.bias))).abs().max() > 0.1  # the adapter's effect
    torch.testing.assert_close(fast[0], plain.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast[1], xr.grad, atol=1e-10, rtol=1e-10)
    for k, (b, a) in leaves.items():
        torch.testing.assert_close(fast[2][f"B.{k}"], b.grad, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(fast[2][f"A.{k}"], a.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("wavelet,levels,n", [("db8", 3, 8), ("sym4", 2, 4), ("coif2", 1, 2), ("db2", 3, 24)])
def test_synthesis_wraps_filters_longer_than_the_signal(wavelet, levels, n):
    """Deep levels of long filters wrap around the periodized signal several times."""
    from visionpeft.methods.wara import synthesize_factor
    from visionpeft.ops.wara_math import synthesize_columns

    torch.manual_seed(0)
    blocks, leaves = [], []
    for level in range(levels, 0, -1):
        for channel in (["lo", "hi"] if level == levels else ["hi"]):
            m = torch.randn(2, n >> level, dtype=torch.float64, requires_grad=True)
            leaves.append(m)
            blocks.append((m, channel, level))
    got = synthesize_columns([(m.t(), ch, lv) for m, ch, lv in blocks], n - 1, wavelet)
    ref = torch.cat([synthesize_factor(m, ch, lv, wavelet) for m, ch, lv in blocks], 0)[:, :n - 1].t()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)
    seed = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, leaves, seed), torch.autograd.grad(ref, leaves, seed)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_synthesis_plan_first_built_under_inference_mode_serves_training():
    from visionpeft.methods.wara import wara_factors

    torch.manual_seed(0)
    model, mod = _inject(nn.Linear(22, 18), r=2, wavelet="coif3", levels=1)  # a shape no other test uses
    x = torch.randn(4, 22)
    with torch.inference_mode():  # the plans (tables cached per shape) are first built here
        wara_factors(mod.band_factors(), mod.shape, mod.levels, mod.wavelet)
        first = model(x)
    out = model(x)
    out.square().sum().backward()
    torch.testing.assert_close(out.detach(), first)
    assert all(p.grad is not None for p in mod.parameters())


@pytest.mark.parametrize("host", ["linear", "conv"])
def test_effective_factors_are_the_lora_that_wara_is(host):
    torch.manual_seed(0)
    model, mod = _inject(HOSTS[host](), r=2, wavelet="db2", levels=2, alpha=3.0)
    up, down = mod.effective_factors()
    assert up.shape == (mod.shape[0], down.shape[0]) and down.shape[1] == mod.shape[1]
    assert down.shape[0] == sum(b.shape[1] for b in mod.B.values())
    torch.testing.assert_close((up @ down).reshape(mod.host.weight_shape), mod.delta_weight())
    _, pairs = _leaf_pairs(mod)  # and the formula, scale alpha / r = 1.5 from the config
    plain = _plain_wara(pairs, mod.shape, 2, "db2", _wara_scale(2, 3.0)).float()
    torch.testing.assert_close(up @ down, plain.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cast", [lambda m: m.double(), lambda m: m.to(torch.float64)], ids=["double", "to"])
def test_factors_cached_while_frozen_are_rebuilt_after_a_dtype_change(cast):
    """README: the factors cached while frozen are rebuilt after `.to()`. The cache is built
    in float32 (frozen, no_grad), the model cast to float64: the output is the float64
    formula, not the float32 factors (stale, or rebuilt and cast up) in a float64 product."""
    torch.manual_seed(0)
    lin = nn.Linear(40, 24)
    model, mod = _inject(lin, r=3, wavelet="db2", levels=2, alpha=2.0)
    model.requires_grad_(False).eval()
    x = torch.randn(5, 40)
    with torch.no_grad():
        model(x)
        model(x)  # the float32 factors are cached here
    assert mod.__dict__.get("_factor_cache") is not None
    cast(model)
    x64 = x.double()
    with torch.no_grad():
        out = model(x64)
        _, pairs = _leaf_pairs(mod)  # the float64 parameters after the cast
        dW = _plain_wara(pairs, (24, 40), 2, "db2", _wara_scale(3, 2.0))
        ref = F.linear(x64, model[0].base_layer.weight + dW, model[0].base_layer.bias)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(vp.delta_weight(model, "0"), dW, atol=1e-12, rtol=1e-12)
