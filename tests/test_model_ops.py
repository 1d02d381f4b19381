"""Shared bodies over every registered method on the toy host: switching, merge, remove."""
import copy

import pytest
import torch
from conftest import (BLOCK_METHOD_CONFIGS, METHOD_CONFIGS, TOY_TARGETS, ToyNet, Untouched, make_config,
                      randomize_adapters, toy_inputs)

import visionpeft as vp

METHODS = sorted(METHOD_CONFIGS)


def test_registry_covers_every_method():
    assert sorted(vp.list_methods()) == sorted([*METHODS, *BLOCK_METHOD_CONFIGS])
    assert all(vp.get_method(m).weight_space for m in METHODS)
    assert not any(vp.get_method(m).weight_space for m in BLOCK_METHOD_CONFIGS)


def _adapted(method, name="a", seed=0, batch_first=True, **kw):
    torch.manual_seed(0)
    model = ToyNet(batch_first=batch_first).eval()
    base = copy.deepcopy(model).requires_grad_(False)
    vp.inject(model, make_config(method, TOY_TARGETS, **kw), name=name)
    randomize_adapters(model, seed)
    return base, model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_disabled_is_base_and_adapter_changes_output(method, batch_first):
    base, model = _adapted(method, batch_first=batch_first)
    x, img = toy_inputs()
    with torch.no_grad():
        ref = base(x, img)
        out = model(x, img)
        with vp.disabled(model):
            off = model(x, img)
    assert torch.equal(off, ref)
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_round_trips(method):
    _, model = _adapted(method)
    x, img = toy_inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        live = model(x, img)
        vp.merge(model)
        merged = model(x, img)
        with vp.disabled(model):  # unmerges inside, merges again after
            pass
        again = model(x, img)
    torch.testing.assert_close(merged, live, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, merged, atol=0, rtol=0)
    vp.unmerge(model)
    for _ in range(100):
        vp.merge(model)
        vp.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_merge_is_exact_and_close(method, dtype):
    # LoHa's dW is quartic in its factors: at alpha 6 its whole effect on the output is a
    # few bfloat16 steps, too little to tell a merge from no merge
    _, model = _adapted(method, **({"alpha": 30.0} if method == "loha" else {}))
    model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, img = (t.to(dtype) for t in toy_inputs())
    with torch.no_grad():
        live = model(x, img).float()
        with vp.disabled(model):
            base = model(x, img).float()
        vp.merge(model)
        merged = model(x, img).float()
    vp.unmerge(model)
    for _ in range(20):
        vp.merge(model)
        vp.unmerge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the tolerance is a fraction of the adapter's own effect, which must stand well above
    # the dtype's resolution at the output's size: a merge that did nothing (error = effect)
    # or half of it fails
    effect = (live - base).abs().max().item()
    step = torch.finfo(dtype).eps * live.abs().max().item()
    assert effect > 4 * step, f"the adapter moves the output by {effect:.2e} only ({step:.2e} per step)"
    error = (merged - live).abs().max().item()
    assert error <= 0.1 * effect, f"merged differs from live by {error:.2e}; the adapter's effect is {effect:.2e}"


@pytest.mark.parametrize("method", METHODS)
def test_merge_without_kept_copy_is_close(method):
    _, model = _adapted(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(100):
        vp.merge(model, keep_original=False)
        vp.unmerge(model)
    worst = max((v - before[k]).abs().max().item() for k, v in model.state_dict().items())
    assert worst <= 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_remove_restores_modules_and_state_dict(method):
    torch.manual_seed(0)
    model = ToyNet()
    originals = {n: m for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.head.weight.requires_grad_(False)
    flags["head.weight"] = False
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    vp.inject(model, make_config(method, TOY_TARGETS), name="a")
    vp.inject(model, make_config(method, ["proj", "qkv[k]"]), name="b")
    randomize_adapters(model)
    vp.merge(model)
    vp.remove(model, "a")
    assert list(model.proj.adapters) == ["b"] and vp.active_adapters(model) == ("b",)
    vp.remove(model)
    assert all(model.get_submodule(n) is m for n, m in originals.items() if n)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    new_sd = model.state_dict()
    assert list(new_sd) == list(sd)
    assert all(torch.equal(new_sd[k], v) for k, v in sd.items())


@pytest.mark.parametrize("method", METHODS)
def test_two_adapters_active_set_and_scale(method):
    _, model = _adapted(method, name="a")
    vp.inject(model, make_config(method, ["proj", "conv", "attn[k]"]), name="b")
    randomize_adapters(model, seed=1)
    x, img = toy_inputs()
    with torch.no_grad():
        vp.set_active(model, ["a"])
        ya = model(x, img)
        vp.set_active(model, "b")
        yb = model(x, img)
        vp.set_active(model, [])
        y0 = model(x, img)
        vp.set_active(model, ["a", "b"])
        yab = model(x, img)
        vp.set_scale(model, "b", 0.0)
        ya_again = model(x, img)
        vp.set_scale(model, "b", 1.0)
    assert not torch.allclose(ya, yb)
    torch.testing.assert_close(ya_again, ya, atol=1e-6, rtol=0)
    assert not torch.allclose(yab, ya) and not torch.allclose(yab, yb)
    with torch.no_grad(), vp.disabled(model):
        torch.testing.assert_close(model(x, img), y0, atol=0, rtol=0)
    # merged weights of both adapters match the live sum
    with torch.no_grad():
        vp.merge(model)
        torch.testing.assert_close(model(x, img), yab, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        vp.set_active(model, ["a"])
    vp.unmerge(model)


@pytest.mark.parametrize("method", METHODS)
def test_scale_is_linear_in_delta(method):
    """set_scale(s) moves the output of a single adapted Linear by s * delta."""
    lin = torch.nn.Sequential(torch.nn.Linear(12, 11))
    x = torch.randn(4, 12)
    vp.inject(lin, make_config(method, ["0"]), name="a")
    randomize_adapters(lin)
    with torch.no_grad():
        y1 = lin(x)
        vp.set_scale(lin, "a", 2.5)
        y25 = lin(x)
        with vp.disabled(lin):
            y0 = lin(x)
    torch.testing.assert_close(y25 - y0, 2.5 * (y1 - y0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_routing_equals_each_row_alone(method):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 12), torch.nn.GELU(), torch.nn.Linear(12, 5))
    vp.inject(model, make_config(method, ["0", "2"]), name="a")
    vp.inject(model, make_config(method, ["2"]), name="b")
    randomize_adapters(model)
    x = torch.randn(4, 3, 9)
    rows = ["a", None, "b", "a"]
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(x)
        for i, name in enumerate(rows):
            if name is None:
                with vp.disabled(model):
                    alone = model(x[i:i + 1])
            else:
                vp.set_active(model, [name])
                alone = model(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_routing_reaches_every_layer_kind(method, batch_first):
    """ToyNet: fused-qkv slices, convs and an nn.MultiheadAttention (adapted in_proj and
    out_proj, batch on dim 0 or 1): each routed row equals that row run alone."""
    torch.manual_seed(0)
    model = ToyNet(batch_first=batch_first)
    vp.inject(model, make_config(method, ["qkv[q,v]", "conv", "attn", "proj"]), name="a")
    vp.inject(model, make_config(method, ["attn", "conv"]), name="b")
    randomize_adapters(model)
    x, img = torch.randn(4, 5, 15), torch.randn(4, 3, 9, 9)
    rows = ["b", None, "a", "b"]
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(x, img)
        for i, name in enumerate(rows):
            if name is None:
                with vp.disabled(model):
                    alone = model(x[i:i + 1], img[i:i + 1])
            else:
                vp.set_active(model, [name])
                alone = model(x[i:i + 1], img[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_training_updates_only_adapters(toy):
    vp.inject(toy, make_config("lora", TOY_TARGETS), name="a")
    names = [n for n, p in toy.named_parameters() if p.requires_grad]
    assert names and all(".adapters.a." in n for n in names)
    assert vp.trainable_parameters(toy) == sum(p.numel() for p in toy.parameters() if p.requires_grad)
    x, img = toy_inputs()
    toy.train()
    base_before = {n: p.clone() for n, p in toy.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in toy.parameters() if p.requires_grad], lr=0.1)
    toy(x, img).square().mean().backward()
    opt.step()
    assert all(torch.equal(p, base_before[n]) for n, p in toy.named_parameters() if not p.requires_grad)
    b = toy.proj.adapters["a"]["full"].lora_B
    assert b.abs().sum() > 0, "B should have moved off zero after one step"


def test_modules_to_save_trains_a_copy(toy):
    x, img = toy_inputs()
    with torch.no_grad():  # MHA picks its kernel by requires_grad: compare frozen to frozen
        ref = copy.deepcopy(toy).requires_grad_(False)(x, img)
    vp.inject(toy, vp.LoRAConfig(r=2, target_modules=["proj"], modules_to_save=["head"]), name="a")
    assert toy.head.copies["a"].weight.requires_grad and not toy.head.base_layer.weight.requires_grad
    with torch.no_grad():
        toy.head.copies["a"].weight.add_(1.0)
        with vp.disabled(toy):
            assert torch.equal(toy(x, img), ref)
        assert not torch.allclose(toy(x, img), ref)


def test_bad_input_leaves_model_untouched(toy):
    kept = Untouched(toy)
    with pytest.raises(ValueError, match=r"rank r=40 is larger.*use r <= 15"):
        vp.inject(toy, vp.LoRAConfig(r=40, target_modules=["proj", "qkv"]))
    with pytest.raises(vp.TargetError, match="closest adaptable module names: .*'proj'"):
        vp.inject(toy, vp.LoRAConfig(target_modules=["projj"]))
    with pytest.raises(KeyError, match="unknown method"):
        vp.get_method("nope")
    kept.check()
    vp.inject(toy, vp.LoRAConfig(r=2, target_modules=["proj"]), name="a")
    kept = Untouched(toy)  # a model with an adapter: a refused second inject leaves both as they were
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        vp.inject(toy, vp.LoRAConfig(r=2, target_modules=["qkv"]), name="a")
    with pytest.raises(KeyError, match="no adapter named"):
        vp.set_active(toy, ["zzz"])
    kept.check()


def test_adapter_follows_host_dtype_and_fp32_adapter_on_half_host():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 6)).to(torch.bfloat16)
    vp.inject(lin, vp.LoRAConfig(r=2, target_modules=["0"]), name="a")
    assert lin[0].adapters["a"]["full"].lora_A.dtype == torch.bfloat16
    lin[0].adapters["a"].float()  # keep the adapter in fp32, as a training loop may
    randomize_adapters(lin)
    x = torch.randn(3, 8, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = lin(x)
        mod = lin[0].adapters["a"]["full"]
        base = lin[0].base_layer(x).float()
        ref = base + x.float() @ mod.delta_weight().t()
    assert y.dtype == torch.bfloat16
    # tolerances relative to the adapter's own effect: an output without it (or with it
    # at half strength) must fail
    effect = (ref - base).abs().max().item()
    assert effect > 8 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    error = (y.float() - ref).abs().max().item()
    assert error <= 0.1 * effect, f"error {error:.2e}, adapter effect {effect:.2e}"


def test_forward_hook_on_the_host_layer_keeps_the_base_output():
    """Adapters add into the host output in place; a hook registered on the host layer
    before injection must still see the host's own output."""
    lin = torch.nn.Linear(6, 4)
    seen = []
    lin.register_forward_hook(lambda m, i, o: seen.append(o))
    model = torch.nn.Sequential(lin)
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]), name="a")
    randomize_adapters(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(seen[-1], torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert not torch.allclose(out, seen[-1])


def test_adapters_follow_the_hosts_eval_mode():
    """Injecting into a model in eval mode must not switch adapter dropout on."""
    model = torch.nn.Sequential(torch.nn.Linear(20, 20)).eval()
    vp.inject(model, vp.LoRAConfig(r=4, dropout=0.5, target_modules=["0"]), name="a")
    randomize_adapters(model)
    assert not any(m.training for m in model.modules())
    x = torch.randn(8, 20)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_a_second_adapter_leaves_the_first_trainable(toy):
    vp.inject(toy, vp.LoRAConfig(r=2, target_modules=["proj"]), name="a")
    vp.inject(toy, vp.LoRAConfig(r=2, target_modules=["proj", "qkv"]), name="b")
    trainable = {n for n, p in toy.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable) and any(".adapters.b." in n for n in trainable)
    assert all(".adapters." in n for n in trainable)


def test_routing_slices_attention_masks_given_by_position():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(12, 3, batch_first=True))
    vp.inject(model, make_config("lora", ["0"]), name="a")
    randomize_adapters(model)
    attn = model[0]
    q = torch.randn(3, 5, 12)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, -2:] = True
    mask = torch.randn(3 * 3, 5, 5)  # per row and head
    rows = ["a", None, "a"]
    with torch.no_grad():
        with vp.routing(model, rows):
            out, w = attn(q, q, q, pad, True, mask, average_attn_weights=False)
        for i, name in enumerate(rows):
            one = slice(i, i + 1)
            args = (q[one], q[one], q[one], pad[one], True, mask[3 * i:3 * i + 3])
            if name is None:
                with vp.disabled(model):
                    ref, ref_w = attn(*args, average_attn_weights=False)
            else:
                ref, ref_w = attn(*args, average_attn_weights=False)
            torch.testing.assert_close(out[one], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(w[one], ref_w, atol=1e-5, rtol=1e-5)


def test_merging_float64_weights_keeps_float64_precision():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5)).double()
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))  # B = 0: dW is exactly zero
    before = model[0].base_layer.weight.detach().clone()
    vp.merge(model, keep_original=False)
    assert torch.equal(model[0].base_layer.weight, before)
    vp.unmerge(model)
    assert torch.equal(model[0].base_layer.weight, before)


def test_a_host_submodule_called_adapters_is_frozen_and_counted_as_base():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.adapters = torch.nn.ModuleList([torch.nn.Linear(8, 8)])  # the host's own layers

        def forward(self, x):
            return self.adapters[0](self.proj(x))

    model = torch.nn.Sequential(Block())
    vp.inject(model, vp.KronAConfig(target_modules=["0.proj"]))
    assert not model[0].adapters[0].weight.requires_grad
    assert vp.trainable_parameters(model) == sum(p.numel() for p in model[0].proj.adapters.parameters())
    assert vp.summary(model).total == 2 * (8 * 8 + 8)


def test_scales_must_be_finite_and_bool_fields_must_be_bools():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    vp.inject(model, vp.LoRAConfig(r=1, target_modules=["0"]))
    with pytest.raises(ValueError, match="finite"):
        vp.set_scale(model, "default", float("nan"))
    with pytest.raises(vp.ConfigError, match="true or false"):
        vp.SNELLConfig(reweight="False", target_modules=["0"])


def test_adapters_and_modules_trained_in_full_do_not_nest():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.fc(x))

    model = torch.nn.Sequential(Block(), Block())
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0.fc"], modules_to_save=["1"]), name="A")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["fc"]), name="B")  # not inside A's copy of block 1
    assert [r["module"] for r in vp.summary(model).rows if r["adapter"] == "B"] == ["0.fc"]
    with pytest.raises(vp.TargetError, match="train in full"):
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=["1.fc"]), name="C")
    with pytest.raises(vp.TargetError, match=r"\['0'\]: a module cannot both"):  # block 0 holds A's, B's LoRA
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0.fc"], modules_to_save=["0"]), name="D")


def _two_layers_second_non_finite(dtype=torch.float32):
    """Two adapted Linears; the second's merged weight is +-inf (or NaN): its LoRA has an
    inf in B. The first layer is merged before the second is reached."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(dtype)
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0", "1"]), name="a")
    randomize_adapters(model)
    with torch.no_grad():
        model[1].adapters["a"]["full"].lora_B[0, 0] = float("inf")
    return model


@pytest.mark.parametrize("keep_original", [True, False])  # False: every layer is checked before any is written
def test_a_non_finite_merge_is_refused_and_the_model_untouched(keep_original):
    model = _two_layers_second_non_finite()
    kept = Untouched(model)
    with pytest.raises(ValueError, match=r"merging \('a',\) gives non-finite weights in torch.float32; nothing"):
        vp.merge(model, keep_original=keep_original)
    kept.check()
    assert vp.core.model_ops.get_state(model).merged == ()
    assert all(not layer.merged_names for layer in vp.core.model_ops.adapted_layers(model).values())
    x = torch.randn(2, 5)
    with torch.no_grad(), vp.disabled(model):  # the host weights are finite and in use
        assert torch.isfinite(model(x)).all()


def test_a_merge_that_overflows_the_half_precision_host_is_refused():
    """W + dW is checked in the host's dtype: a float16 sum above 65504 is finite in fp32
    and inf once cast."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    with torch.no_grad():
        model[1].weight.fill_(60000.0)  # finite in float16 (max 65504)
    vp.inject(model, vp.LoRAConfig(r=1, target_modules=["0", "1"]), name="a")
    with torch.no_grad():
        mod = model[1].adapters["a"]["full"]
        mod.lora_A.fill_(100.0)
        mod.lora_B.fill_(100.0)  # dW = 1e4, finite in float16; W + dW = 7e4 is not
    assert torch.isfinite(mod.delta_weight()).all()
    kept = Untouched(model)
    with pytest.raises(ValueError, match="gives non-finite weights in torch.float16; nothing was merged"):
        vp.merge(model)
    kept.check()


def test_a_non_finite_merged_export_is_refused_and_writes_nothing(tmp_path):
    model = _two_layers_second_non_finite()
    kept = Untouched(model, tmp_path)
    with pytest.raises(ValueError, match=r"1: merging \['a'\] gives non-finite weights"):
        vp.export(model, tmp_path / "merged.safetensors", format="merged")
    kept.check()


def test_inject_adds_to_the_active_set_and_both_updates_add():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    base = copy.deepcopy(model)
    vp.inject(model, make_config("lora", ["0"]), name="a")
    vp.inject(model, make_config("lora", ["0"]), name="b")
    randomize_adapters(model, seed=3)
    assert vp.active_adapters(model) == ("a", "b")  # the new one beside those already active
    x = torch.randn(4, 6)
    with torch.no_grad():
        both, ref = model(x), base(x)
        vp.set_active(model, ["a"])
        only_a = model(x)
        vp.set_active(model, ["b"])
        only_b = model(x)
    torch.testing.assert_close(both - ref, (only_a - ref) + (only_b - ref), atol=1e-6, rtol=1e-5)
    assert (only_a - ref).abs().max() > 1e-2 and (only_b - ref).abs().max() > 1e-2


@pytest.mark.parametrize("keep_original", [True, False])
def test_disabled_on_a_merged_model_gives_the_base_and_the_merge_back(keep_original):
    base, model = _adapted("lora")
    x, img = toy_inputs()
    with torch.no_grad():
        live, ref = model(x, img), base(x, img)
        vp.merge(model, keep_original=keep_original)
        with vp.disabled(model):
            inside = model(x, img)
        after = model(x, img)
    torch.testing.assert_close(inside, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, live, atol=1e-5, rtol=1e-5)
    assert vp.core.model_ops.get_state(model).merged == ("a",)
    assert (live - ref).abs().max() > 1e-2


def test_the_weights_kept_while_merged_follow_to():
    """merge keeps the host weights; .double() while merged casts the kept copies too, so
    unmerge and remove give the cast originals bit for bit."""
    base, model = _adapted("lora")
    vp.merge(model)
    model.double()
    vp.unmerge(model)
    vp.remove(model)
    want = base.double().state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("batch_first", [True, False])
def test_an_adapted_mha_with_masks_is_torchs_mha_at_w_plus_dw(batch_first):
    """Masks (key padding, a per-head float mask, causal), need_weights and batch_first
    behave as in torch: the wrapper equals a plain nn.MultiheadAttention whose in_proj and
    out_proj weights are W + dW, built in the test from the LoRA factors."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(12, 3, batch_first=batch_first)
    plain = copy.deepcopy(attn)
    model = torch.nn.Sequential(attn)
    vp.inject(model, vp.LoRAConfig(r=2, alpha=4, target_modules=["0"]), name="a")  # in_proj and out_proj
    randomize_adapters(model)
    with torch.no_grad():
        for key, target in (("in_proj", plain.in_proj_weight), ("out_proj", plain.out_proj.weight)):
            (mod,) = [m for n, m in model.named_modules() if n.endswith(f"adapters.a.{key}")]
            target += 2.0 * mod.lora_B @ mod.lora_A  # alpha / r = 2, from the config
    q = torch.randn(3, 5, 12) if batch_first else torch.randn(5, 3, 12)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, -2:] = True
    per_head = torch.randn(3 * 3, 5, 5)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for kwargs in ({"key_padding_mask": pad, "attn_mask": per_head, "average_attn_weights": False},
                       {"attn_mask": causal, "is_causal": True}, {"key_padding_mask": pad, "need_weights": False}):
            got, got_w = model[0](q, q, q, **kwargs)
            want, want_w = plain(q, q, q, **kwargs)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert (got_w is None) == (want_w is None)
            if want_w is not None:
                torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-5)
            with vp.disabled(model):
                assert (model[0](q, q, q, **kwargs)[0] - got).abs().max() > 1e-3  # the adapter acts
