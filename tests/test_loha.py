"""LoHa against an explicit einsum, LyCORIS's functional and module code, and files passed
both ways between visionpeft and LyCORIS (create_lycoris_from_weights, create_lycoris)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_file_refused, randomize_adapters
from safetensors.torch import save_file
from torch import nn

import visionpeft as vp
from visionpeft.core.adapter import HostSpec
from visionpeft.core.model_ops import adapted_layers
from visionpeft.methods.loha import FACTOR_KEYS, LoHaModule, loha_delta_weight

lycoris = pytest.importorskip("lycoris")


def _reference_dw(w1a, w1b, w2a, w2b, scale, shape):
    """scale * sum_i w1a[o,i] w1b[i,f] * sum_j w2a[o,j] w2b[j,f], as one einsum."""
    return (scale * torch.einsum("oi,if,oj,jf->of", w1a.double(), w1b.double(), w2a.double(),
                                 w2b.double())).reshape(shape).float()


def _loop_dw(w1a, w1b, w2a, w2b, scale):
    out = torch.zeros(w1a.shape[0], w1b.shape[1], dtype=torch.double)
    for o in range(w1a.shape[0]):
        for f in range(w1b.shape[1]):
            p1 = sum(float(w1a[o, i]) * float(w1b[i, f]) for i in range(w1a.shape[1]))
            p2 = sum(float(w2a[o, j]) * float(w2b[j, f]) for j in range(w2a.shape[1]))
            out[o, f] = scale * p1 * p2
    return out.float()


def _host(kind):
    if kind == "linear":
        return nn.Linear(11, 7)
    if kind == "conv":
        return nn.Conv2d(5, 13, (3, 2), stride=2, padding=(1, 2), dilation=(2, 1))
    return nn.Conv2d(6, 9, 3, padding=1, groups=3)


def _input(kind, g):
    if kind == "linear":
        return torch.randn(2, 5, 11, generator=g)
    return torch.randn(2, 5 if kind == "conv" else 6, 9, 7, generator=g)


def _host_op(layer, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


# --- the math ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
def test_delta_weight_equals_lycoris_functional_module_and_an_explicit_sum(kind):
    from lycoris.functional.loha import diff_weight
    from lycoris.modules.loha import LohaModule

    torch.manual_seed(0)
    host = _host(kind)
    shape = tuple(host.weight.shape)
    out, fan_in = shape[0], host.weight[0].numel()
    r, alpha = 3, 5.0
    w1a, w2a = torch.randn(out, r), torch.randn(out, r)
    w1b, w2b = torch.randn(r, fan_in), torch.randn(r, fan_in)
    scale = alpha / r
    dW = loha_delta_weight(w1a, w1b, w2a, w2b, scale, shape)
    assert dW.shape == shape
    torch.testing.assert_close(dW, _reference_dw(w1a, w1b, w2a, w2b, scale, shape))
    torch.testing.assert_close(dW.reshape(out, -1), _loop_dw(w1a, w1b, w2a, w2b, scale))
    # LyCORIS's functional form takes (down, up) pairs: w1d = hada_w1_b, w1u = hada_w1_a
    lyco = diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=torch.tensor(scale), backend="torch")
    torch.testing.assert_close(dW, lyco.reshape(shape))
    # and its module, with our factors in its parameters (same names, same shapes)
    mod = LohaModule("x", host, 1.0, lora_dim=r, alpha=alpha)
    assert [tuple(getattr(mod, k).shape) for k in FACTOR_KEYS] == [(out, r), (r, fan_in), (out, r), (r, fan_in)]
    with torch.no_grad():
        for k, t in zip(FACTOR_KEYS, (w1a, w1b, w2a, w2b)):
            getattr(mod, k).copy_(t)
    assert mod.scale == pytest.approx(scale) and float(mod.alpha) == alpha
    torch.testing.assert_close(dW, mod.get_weight(shape))


def test_lycoris_functional_factor_shapes_are_ours_for_a_linear():
    from lycoris.functional.loha import weight_gen

    w1d, w1u, _, _, t1, t2 = weight_gen(torch.empty(7, 11), 3, tucker=False)
    assert (tuple(w1u.shape), tuple(w1d.shape)) == ((7, 3), (3, 11)) and t1 is None and t2 is None


def test_init_is_identity_and_follows_lycoris_module_init():
    from lycoris.modules.loha import LohaModule

    torch.manual_seed(0)
    host = nn.Linear(301, 211)
    ours = LoHaModule(vp.LoHaConfig(r=16, alpha=4.0, target_modules="x"), HostSpec.from_module(host))
    theirs = LohaModule("x", host, 1.0, lora_dim=16, alpha=4.0)
    assert torch.equal(ours.delta_weight(), torch.zeros(211, 301))
    for mod in (ours, theirs):
        assert torch.equal(mod.hada_w2_a, torch.zeros(211, 16))
        assert mod.hada_w1_a.std().item() == pytest.approx(0.1, rel=0.05)
        assert mod.hada_w1_b.std().item() == pytest.approx(1.0, rel=0.05)
        assert mod.hada_w2_b.std().item() == pytest.approx(1.0, rel=0.05)
    # not dead at init: the zero factor has a gradient (the other three do not, yet)
    dW = ours.delta_weight()
    (dW * torch.randn_like(dW)).sum().backward()
    assert ours.hada_w2_a.grad.abs().max() > 0


# --- the module on its hosts -----------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
@pytest.mark.parametrize("train", [False, True])
def test_forward_is_the_host_op_with_w_plus_dw_and_gradients_match(kind, train):
    torch.manual_seed(0)
    model = _Holder(_host(kind))
    layer = copy.deepcopy(model.layer)
    vp.inject(model, vp.LoHaConfig(r=2, alpha=3.0, target_modules="layer"), name="a")
    randomize_adapters(model, std=0.4)
    mod = adapted_layers(model)["layer"].adapters["a"]["full"]
    model.train(train)
    x = _input(kind, torch.Generator().manual_seed(1)).requires_grad_(True)
    y = model(x)
    params = [mod.hada_w1_a, mod.hada_w1_b, mod.hada_w2_a, mod.hada_w2_b]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.detach().clone().requires_grad_(True)
    a1, b1, a2, b2 = leaves
    dW = 1.5 * ((a1 @ b1) * (a2 @ b2)).reshape(layer.weight.shape)
    ref = _host_op(layer, xr, layer.weight + dW, layer.bias)
    assert (dW.abs().max() > 1e-2) and ((ref - _host_op(layer, xr, layer.weight, layer.bias)).abs().max() > 1e-2)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], g)
    want = torch.autograd.grad(ref, [xr, *leaves], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dropout_acts_on_the_adapter_input_only_in_training():
    torch.manual_seed(0)
    model = _Holder(nn.Linear(11, 7))
    vp.inject(model, vp.LoHaConfig(r=2, dropout=0.5, target_modules="layer"), name="a")
    randomize_adapters(model, std=0.4)
    mod = adapted_layers(model)["layer"].adapters["a"]["full"]
    x = torch.randn(4, 11)
    base = model.layer.base_layer(x)
    with torch.no_grad():
        ev = model.eval()(x)
        torch.testing.assert_close(ev, base + F.linear(x, mod.delta_weight()), atol=1e-5, rtol=1e-5)
        torch.manual_seed(3)
        tr = model.train()(x)
        torch.manual_seed(3)
        expected = base + F.linear(F.dropout(x, 0.5, True), mod.delta_weight())
    torch.testing.assert_close(tr, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tr, ev)


def test_parameter_count_is_two_r_out_plus_fan_in():
    model = nn.Sequential(nn.Linear(11, 7), nn.Conv2d(6, 9, (3, 2), groups=3))
    vp.inject(model, vp.LoHaConfig(r=2, target_modules=["0", "1"]))
    assert vp.trainable_parameters(model) == 2 * 2 * (7 + 11) + 2 * 2 * (9 + 2 * 3 * 2)


# --- files: visionpeft -> LyCORIS and back ------------------------------------------------
class _Net(nn.Module):
    """A Linear in a submodule (dotted name), a strided conv, a grouped conv, and with
    ``small`` a Linear narrower than LyCORIS's default rank."""

    def __init__(self, small=False):
        super().__init__()
        self.block = nn.Module()
        self.block.fc = nn.Linear(13, 10)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.gconv = nn.Conv2d(6, 4, (3, 2), padding=1, groups=2)
        self.small = nn.Linear(10, 3) if small else None

    def forward(self, x, img):
        t = self.block.fc(x)
        if self.small is not None:
            t = self.small(t)
        return t, self.gconv(self.conv(img))


def _net_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 13, generator=g), torch.randn(2, 3, 9, 11, generator=g)


def _assert_outputs_close(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


def _lycoris_keys(name):
    return "lycoris_" + name.replace(".", "_")


LAYERS = ["block.fc", "conv", "gconv"]


@pytest.mark.parametrize("alpha,scale", [(6.0, 1.0), (6.0, 0.7), (None, 1.0)])
def test_exported_factors_load_in_lycoris_with_the_same_outputs(alpha, scale):
    torch.manual_seed(0)
    model = _Net().eval()
    fresh = copy.deepcopy(model)
    vp.inject(model, vp.LoHaConfig(r=3, alpha=alpha, target_modules=LAYERS), name="x")
    randomize_adapters(model, std=0.5)
    vp.set_scale(model, "x", scale)
    x, img = _net_inputs()
    with torch.no_grad():
        ours = model(x, img)
    sd = {}
    for name, layer in adapted_layers(model).items():
        mod = layer.adapters["x"]["full"]
        f = mod.export_factors(scale)
        assert sorted(f) == sorted([*FACTOR_KEYS, "alpha"]) and f["alpha"].dim() == 0
        rule = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * f["alpha"] / 3
        torch.testing.assert_close(rule.reshape(mod.host.weight_shape), scale * mod.delta_weight())
        if scale == 1.0:  # the parameters as they are, alpha the config's
            assert all(torch.equal(f[k], getattr(mod, k)) for k in FACTOR_KEYS)
            assert float(f["alpha"]) == (3.0 if alpha is None else alpha)
        sd.update({f"{_lycoris_keys(name)}.{k}": v for k, v in f.items()})
    net, _ = lycoris.create_lycoris_from_weights(1.0, "", fresh, weights_sd=sd)
    assert len(net.loras) == 3 and {type(m).__name__ for m in net.loras} == {"LohaModule"}
    net.apply_to()
    with torch.no_grad():
        _assert_outputs_close(fresh(x, img), ours)
    if alpha is None:  # scale 1: LyCORIS's merge (which applies alpha / r twice) agrees too
        net.restore()
        net.merge_to(1.0)
        with torch.no_grad():
            _assert_outputs_close(fresh(x, img), ours)


def _lycoris_network(model, **kw):
    net = lycoris.create_lycoris(model, 1.0, algo="loha", **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return net, sd


def _factors_by_layer(model, sd):
    out = {}
    for name, _ in model.named_modules():
        keys = {k: sd[f"{_lycoris_keys(name)}.{k}"] for k in (*FACTOR_KEYS, "alpha")
                if name and f"{_lycoris_keys(name)}.{k}" in sd}
        if keys:
            out[name] = keys
    return out


def _file_dw(f):
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * f["alpha"] / f["hada_w1_b"].shape[0]


def _inject_factors(model, config, factors):
    """Adapter "imp" from ``config``, each layer's factors written in: -> the adapted layers."""
    vp.inject(model, config, name="imp")
    layers = adapted_layers(model)
    for name, f in factors.items():
        layers[name].adapters["imp"]["full"].import_factors(f)
    return layers


def test_a_lycoris_network_imports_exactly_and_exports_the_same_file():
    torch.manual_seed(0)
    base = _Net().eval()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    _, sd = _lycoris_network(theirs, linear_dim=4, linear_alpha=2)
    x, img = _net_inputs()
    with torch.no_grad():
        expected = theirs(x, img)
        assert (expected[0] - base(x, img)[0]).abs().max() > 1e-2
    factors = _factors_by_layer(base, sd)
    assert sorted(factors) == sorted(LAYERS)
    config = vp.LoHaConfig.from_factors(factors, target_modules=sorted(factors))
    assert (config.r, config.alpha, config.rank_pattern) == (4, 2.0, ())
    layers = _inject_factors(ours, config, factors)
    with torch.no_grad():
        _assert_outputs_close(ours(x, img), expected)
    for name, f in factors.items():  # tensors round-trip bit for bit
        back = layers[name].adapters["imp"]["full"].export_factors()
        assert sorted(back) == sorted(f)
        assert all(torch.equal(back[k], f[k]) for k in f), name


def test_a_lycoris_network_with_per_layer_ranks_and_an_oversized_rank_imports():
    """Conv rank 2 / alpha 1, Linear rank 4 / alpha 3, and a (3, 10) Linear that LyCORIS gave
    rank 4 (more than it can hold): rank_pattern, alpha folded, rank reduced exactly."""
    torch.manual_seed(0)
    base = _Net(small=True).eval()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    _, sd = _lycoris_network(theirs, linear_dim=4, linear_alpha=3, conv_dim=2, conv_alpha=1)
    x, img = _net_inputs()
    with torch.no_grad():
        expected = theirs(x, img)
    factors = _factors_by_layer(base, sd)
    assert factors["small"]["hada_w1_a"].shape == (3, 4)
    config = vp.LoHaConfig.from_factors(factors, target_modules=sorted(factors))
    assert config.alpha is None and config.r in (2, 4)
    assert dict(config.rank_pattern) == {k: v for k, v in {"block.fc": 4, "small": 3, "conv": 2,
                                                           "gconv": 2}.items() if v != config.r}
    layers = _inject_factors(ours, config, factors)
    with torch.no_grad():
        _assert_outputs_close(ours(x, img), expected)
    for name, f in factors.items():  # exported back: the same dW by LyCORIS's rule
        mod = layers[name].adapters["imp"]["full"]
        torch.testing.assert_close(_file_dw(mod.export_factors()), _file_dw(f), atol=1e-5, rtol=1e-5)


def test_import_folds_alpha_and_zero_pads_a_lower_rank():
    torch.manual_seed(0)
    host = HostSpec.from_module(nn.Conv2d(6, 9, 3, groups=3))
    mod = LoHaModule(vp.LoHaConfig(r=5, alpha=2.0, target_modules="x"), host)
    f = {"hada_w1_a": torch.randn(9, 2), "hada_w1_b": torch.randn(2, 18),
         "hada_w2_a": torch.randn(9, 2), "hada_w2_b": torch.randn(2, 2, 3, 3),  # b as a kernel: flattened
         "alpha": torch.tensor(3.0)}
    params = [mod.hada_w1_a, mod.hada_w1_b, mod.hada_w2_a, mod.hada_w2_b]
    mod.import_factors(f)
    assert [p for p in mod.parameters()] == params  # written in place
    assert torch.equal(mod.hada_w1_b[2:], torch.zeros(3, 18)) and torch.equal(mod.hada_w2_a[:, 2:], torch.zeros(9, 3))
    torch.testing.assert_close(mod.delta_weight(), _file_dw({**f, "hada_w2_b": f["hada_w2_b"].flatten(1)})
                               .reshape(9, 2, 3, 3))
    back = mod.export_factors(0.5)
    torch.testing.assert_close(_file_dw(back).reshape(9, 2, 3, 3), 0.5 * mod.delta_weight())


# --- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"r": 0}, "r must be an integer >= 1"), ({"r": 2.5}, "r must be an integer"), ({"r": True}, "r must be"),
    ({"dropout": 1.0}, "dropout is a probability"), ({"dropout": -0.1}, "dropout"),
    ({"alpha": 0.0}, "alpha"), ({"rank_pattern": {"fc": 0}}, "rank_pattern ranks"),
    ({"rank_pattern": 3}, "rank_pattern must map"),
])
def test_bad_config_is_refused(kw, match):
    with pytest.raises(vp.ConfigError, match=match):
        vp.LoHaConfig(target_modules="fc", **kw)


def test_rank_above_the_layer_is_refused_with_both_sizes():
    model = _Holder(nn.Conv2d(4, 5, 1))
    with pytest.raises(ValueError, match=r"layer: rank r=6 .*\(5, 4, 1, 1\).*r <= 4"):
        vp.inject(model, vp.LoHaConfig(r=6, target_modules="layer"))
    vp.inject(model, vp.LoHaConfig(r=6, rank_pattern={"layer": 4}, target_modules="layer"))
    assert adapted_layers(model)["layer"].adapters["default"]["full"].hada_w1_b.shape == (4, 4)


def test_import_of_wrong_shapes_or_layouts_raises():
    mod = LoHaModule(vp.LoHaConfig(r=3, target_modules="x"), HostSpec.from_module(nn.Linear(11, 7)))
    before = [p.detach().clone() for p in mod.parameters()]
    good = {"hada_w1_a": torch.randn(7, 2), "hada_w1_b": torch.randn(2, 11),
            "hada_w2_a": torch.randn(7, 2), "hada_w2_b": torch.randn(2, 11), "alpha": torch.tensor(1.0)}
    for bad, match in [({"hada_w1_a": torch.randn(8, 2), "hada_w2_a": torch.randn(8, 2)}, r"\(8, 2\).*\(7, 3\)"),
                       ({"hada_w1_b": torch.randn(2, 12)}, r"\(2, 12\).*\(3, 11\)"),
                       ({"hada_w2_a": torch.randn(7, 3)}, r"do not give"),
                       ({k: torch.randn(*s) for k, s in [("hada_w1_a", (7, 4)), ("hada_w1_b", (4, 11)),
                                                          ("hada_w2_a", (7, 4)), ("hada_w2_b", (4, 11))]},
                        r"rank 4, above this layer's rank 3.*\(7, 3\)"),
                       ({"hada_t1": torch.randn(2, 2, 3, 3)}, "Tucker"),
                       ({"hada_w2_b": None}, "lack")]:
        f = {k: v for k, v in {**good, **bad}.items() if v is not None}
        with pytest.raises(ValueError, match=match):
            mod.import_factors(f)
    assert all(torch.equal(a, b) for a, b in zip(before, mod.parameters()))  # nothing written


def test_config_round_trips_and_per_layer_rank():
    cfg = vp.LoHaConfig(r=4, alpha=2.0, dropout=0.1, rank_pattern={"b": 2, "a": 3}, target_modules=["a", "b", "c"])
    assert cfg.rank_pattern == (("a", 3), ("b", 2))
    again = vp.config_from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg and type(again) is vp.LoHaConfig
    assert cfg.for_layer("a").r == 3 and cfg.for_layer("a").rank_pattern == () and cfg.for_layer("c") is cfg
    spec = vp.get_method("loha")
    assert (spec.factor_layout, spec.folded_fields, spec.layer_kinds) == ("loha", ("alpha",), ("linear", "conv2d"))


def test_from_factors_keeps_one_alpha_and_folds_mixed_ones():
    def f(out, fan_in, r, alpha=None):
        d = {"hada_w1_a": torch.randn(out, r), "hada_w1_b": torch.randn(r, fan_in),
             "hada_w2_a": torch.randn(out, r), "hada_w2_b": torch.randn(r, fan_in)}
        return d if alpha is None else {**d, "alpha": torch.tensor(alpha)}

    make = vp.LoHaConfig.from_factors
    assert (make({"a": f(5, 7, 2, 3.0), "b": f(6, 4, 2, 3.0)}, ["a", "b"]).alpha) == 3.0
    for same_scale_1 in ({"a": f(5, 7, 2), "b": f(6, 4, 2)}, {"a": f(5, 7, 2, 0.0), "b": f(6, 4, 2, 0.0)}):
        cfg = make(same_scale_1, ["a", "b"])
        assert (cfg.r, cfg.alpha, cfg.rank_pattern) == (2, None, ())
    cfg = make({"a": f(5, 7, 2, 1.0), "b": f(6, 4, 2, 3.0), "c": f(6, 9, 5, 1.0)}, ["a", "b", "c"])
    assert (cfg.r, cfg.alpha, cfg.rank_pattern) == (2, None, (("c", 5),))
    # each layer's own alpha / r lands in its w1_a
    host = HostSpec.from_module(nn.Linear(4, 6))
    mod = LoHaModule(cfg.for_layer("b"), host)
    fb = f(6, 4, 2, 3.0)
    mod.import_factors(fb)
    torch.testing.assert_close(mod.delta_weight(), _file_dw(fb))
    torch.testing.assert_close(mod.hada_w1_a, fb["hada_w1_a"] * 1.5)


def _loha_entry(prefix, extra):
    g = torch.Generator().manual_seed(0)
    shapes = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 27), "hada_w2_a": (8, 2), "hada_w2_b": (2, 27)}
    out = {f"{prefix}.{k}": torch.randn(*s, generator=g) for k, s in shapes.items()}
    out[f"{prefix}.alpha"] = torch.tensor(2.0)
    return {**out, **{f"{prefix}.{k}": torch.randn(*s, generator=g) for k, s in extra.items()}}


@pytest.mark.parametrize("extra,match", [
    ({"hada_t1": (2, 2, 3, 3), "hada_t2": (2, 2, 3, 3)}, r"lycoris_conv stores LoHa's Tucker cores \(\['hada_t1', "
                                                         r"'hada_t2'\]\)"),
    ({"dora_scale": (8, 1)}, r"lycoris_conv stores DoRA's magnitude vector \(\['dora_scale'\]\)"),
])
@pytest.mark.parametrize("how", ["load", "import", "hotswap"])
def test_a_tucker_or_dora_loha_file_is_refused_and_the_model_untouched(tmp_path, extra, match, how):
    """README: LoHa with Tucker cores and DoRA entries are refused with what was found,
    by load, import and hot-swap alike, and the model is left as it was."""
    path = tmp_path / "loha.safetensors"
    save_file(_loha_entry("lycoris_conv", extra), str(path))
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3, padding=1)})
    if how == "hotswap":
        vp.inject(model, vp.LoHaConfig(r=2, alpha=2.0, target_modules="conv"), name="lh")
        randomize_adapters(model)
    assert_file_refused(model, path, how, match, "lh", tmp_path)


def test_a_weight_decomposed_loha_is_refused_by_the_layer_itself():
    mod = LoHaModule(vp.LoHaConfig(r=2, target_modules="x"), HostSpec.from_module(nn.Linear(11, 7)))
    before = [p.detach().clone() for p in mod.parameters()]
    factors = {"hada_w1_a": torch.randn(7, 2), "hada_w1_b": torch.randn(2, 11), "hada_w2_a": torch.randn(7, 2),
               "hada_w2_b": torch.randn(2, 11), "dora_scale": torch.ones(7, 1)}
    with pytest.raises(ValueError, match=r"LoHa factors with \['dora_scale'\] .*weight-decomposed"):
        mod.import_factors(factors)
    assert all(torch.equal(a, b) for a, b in zip(before, mod.parameters()))
