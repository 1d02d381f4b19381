"""`vp.routing` with a set of adapters per row (a concept and a style adapter, as CLoRA's
branches need): every row's output and gradients equal that row run alone with
`set_active` on its names, in float64, for the batched methods, the per-adapter fallback,
nn.MultiheadAttention, convs and block adapters (gradients: test_routing_batched.py)."""
import pytest
import torch
from conftest import TOY_TARGETS, ToyNet, make_config, randomize_adapters, toy_inputs

import visionpeft as vp
from visionpeft.backbones.tiny import build_tiny

VIT_BLOCK_LINEARS = [r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]
# CLoRA's layout: the base branch with the style only, then a concept each with the style;
# then sets that share nothing, repeat, or come in another order
ROWS = [("s",), ("a", "s"), ("b", "s"), ["s", "a"], None, "b", ("a", "b", "s")]


def _row_alone(model, call, names):
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    vp.set_active(model, names)
    return call()


def _vit(method, seed=0):
    model = build_tiny("timm_vit")
    for name in "abs":
        vp.inject(model, make_config(method, VIT_BLOCK_LINEARS), name=name)
    randomize_adapters(model, seed)
    vp.set_scale(model, "s", 0.7)  # scales are per adapter, also when sets add up
    return model.double().eval()


def _images(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("method", ["lora", "krona", "wara", "block_lora", "loha", "snell"])  # every weight-space one
def test_each_row_gets_the_sum_of_its_adapters(method):
    model = _vit(method)
    x = _images(len(ROWS))
    with torch.no_grad():
        with vp.routing(model, ROWS):
            mixed = model(x)
        ref = torch.cat([_row_alone(model, lambda i=i: model(x[i:i + 1]), r) for i, r in enumerate(ROWS)])
        only_first = torch.cat([_row_alone(model, lambda i=i: model(x[i:i + 1]),
                                           None if r is None else [r] if isinstance(r, str) else [r[0]])
                                for i, r in enumerate(ROWS)])
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)
    # a row's second adapter matters: dropping it would be caught
    assert (mixed - only_first).abs().max() > 1e-3


def test_attention_and_convs_take_sets_too():
    """ToyNet: a fused qkv Linear sliced, convs (stride, dilation, groups) and an
    nn.MultiheadAttention, where a set runs as one sub-batch with its summed dW."""
    torch.manual_seed(0)
    model = ToyNet().double().eval()
    for name in "abs":
        vp.inject(model, make_config("lora", TOY_TARGETS), name=name)
    randomize_adapters(model)
    rows = [("s",), ("a", "s"), ("b", "s"), None, ("a", "b")]
    tokens, img = (t.double() for t in toy_inputs(batch=len(rows)))
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(tokens, img)
        ref = torch.cat([_row_alone(model, lambda i=i: model(tokens[i:i + 1], img[i:i + 1]), r)
                         for i, r in enumerate(rows)])
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)


def test_block_adapters_apply_each_of_a_rows_adapters():
    model = build_tiny("timm_vit")
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=[r"re:blocks\.\d+"]), name="a")
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=[r"re:blocks\.\d+"]), name="s")
    randomize_adapters(model)
    model = model.double().eval()
    rows = [("s",), ("a", "s"), None]
    x = _images(len(rows))
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(x)
        ref = torch.cat([_row_alone(model, lambda i=i: model(x[i:i + 1]), r) for i, r in enumerate(rows)])
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)


def test_a_shared_adapter_runs_unrouted_and_the_concepts_batched(monkeypatch):
    """With the style on every row, the layers see two slots: the style alone on all rows
    (no gather) and one row-dependent slot for the concepts (one batched product)."""
    model = _vit("lora")
    rows = [("s",), ("a", "s"), ("b", "s")]
    from visionpeft.methods.lora import LoRAModule

    calls = []
    original = LoRAModule.routed_add.__func__

    def counting(cls, modules, scales, x, y, row_adapter, store=None):
        calls.append(tuple(row_adapter.tolist()))
        return original(cls, modules, scales, x, y, row_adapter, store)

    monkeypatch.setattr(LoRAModule, "routed_add", classmethod(counting))
    with torch.no_grad(), vp.routing(model, rows):
        model(_images(3))
    assert calls and set(calls) == {(-1, 0, 1)}  # only the concepts' slot is gathered


def test_bad_rows_are_refused():
    model = _vit("lora")
    with pytest.raises(TypeError, match="routing row 1 is 3; give an adapter name, None, or a list of names"):
        with vp.routing(model, ["a", 3]):
            pass
    with pytest.raises(KeyError, match="nope"):
        with vp.routing(model, [("a", "nope")]):
            pass


def test_trained_copies_follow_agreeing_rows_and_refuse_differing_ones():
    """modules_to_save: a module trained whole per adapter has one forward for the batch, so
    rows that agree run their adapter's copy and rows that differ are refused, not run
    silently with whichever copy is active."""
    torch.manual_seed(0)
    model = ToyNet().double().eval()
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["proj"], modules_to_save=["head"]), name="a")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["proj"]), name="b")
    randomize_adapters(model)
    tokens, img = (t.double() for t in toy_inputs(batch=2))
    vp.set_active(model, ["b"])
    with torch.no_grad():
        with vp.routing(model, [("a",), ("a",)]):
            routed = model(tokens, img)
        vp.set_active(model, ["a"])
        torch.testing.assert_close(routed, model(tokens, img), atol=1e-12, rtol=1e-12)
        vp.set_active(model, ["a"])
        with vp.routing(model, ["b", None]):  # no row runs "a": the base module for both
            base_rows = model(tokens, img)
        ref = torch.cat([_row_alone(model, lambda i=i: model(tokens[i:i + 1], img[i:i + 1]), r)
                         for i, r in enumerate(["b", None])])
        torch.testing.assert_close(base_rows, ref, atol=1e-12, rtol=1e-12)
        with pytest.raises(RuntimeError, match=r"adapters \['a'\] train their own copy of this module"):
            with vp.routing(model, ["a", "b"]):
                model(tokens, img)
