"""`vp.routing` with each method's batched form (one product for every row's adapter) and
with the per-adapter fallback: outputs and gradients against each row run alone, in
float64; rows that all agree take the unrouted path."""
import copy

import pytest
import torch
from conftest import ToyNet, make_config, randomize_adapters, toy_inputs

import visionpeft as vp
from visionpeft.backbones.tiny import build_tiny

VIT_BLOCK_LINEARS = [r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"]
BATCHED = ["lora", "krona", "wara", "block_lora"]
FALLBACK = ["loha", "snell"]  # no batched form: a sub-batch per adapter
ROUTES = {
    "repeats_and_none": ["a", None, "b", "a", "c", None],
    "all_distinct": ["c", "a", "b"],
    "adapter_and_base": ["b", None],
}


def _vit(configs: dict, seed: int = 0) -> torch.nn.Module:
    """The tiny timm ViT (dim 48, MLP 192) with adapters {name: config}, moved off their
    zero init, in float64."""
    model = build_tiny("timm_vit")
    for name, cfg in configs.items():
        vp.inject(model, cfg, name=name)
    randomize_adapters(model, seed)
    return model.double().eval()


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64)


def _row_alone(model, x, name):
    if name is None:
        with vp.disabled(model):
            return model(x)
    vp.set_active(model, [name] if isinstance(name, str) else list(name))  # a name, or a set of them
    return model(x)


def _each_row_alone(model, x, rows):
    return torch.cat([_row_alone(model, x[i:i + 1], name) for i, name in enumerate(rows)])


@pytest.fixture
def no_sub_batches(monkeypatch):
    """Fail if a layer falls back to a sub-batch per adapter (its index_copy)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a routed layer ran a sub-batch per adapter")
    monkeypatch.setattr(torch.Tensor, "index_copy", refuse)
    monkeypatch.setattr(torch.Tensor, "index_copy_", refuse)


def _three(method, **kw):
    return {n: make_config(method, VIT_BLOCK_LINEARS, **kw) for n in "abc"}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("method", BATCHED)
def test_batched_routing_equals_each_row_alone(method, route, no_sub_batches):
    model = _vit(_three(method))
    rows = ROUTES[route]
    x = _images(len(rows))
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(x)
        ref = _each_row_alone(model, x, rows)
        with vp.disabled(model):
            base = model(x)
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)
    assert (mixed - base).abs().max() > 1e-3  # the adapters act: the check has teeth


@pytest.mark.parametrize("method", FALLBACK)
def test_methods_without_a_batched_form_route_per_adapter(method):
    model = _vit(_three(method))
    rows = ROUTES["repeats_and_none"]
    x = _images(len(rows))
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(x)
        ref = _each_row_alone(model, x, rows)
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method,rows", [(m, ["a", None, "b", "a", "c"]) for m in BATCHED + ["loha"]]
                         + [("lora", [("c",), ("a", "c"), ("b", "c"), None, "b"])])  # sets of adapters per row
def test_routed_gradients_equal_each_row_alone(method, rows):
    """Training under routing: the adapters' and the input's gradients equal those of
    each row run alone with its adapter(s) (summed over the rows)."""
    model = _vit(_three(method)).train()
    twin = copy.deepcopy(model)
    x = _images(len(rows)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = torch.randn(len(rows), 5, dtype=torch.float64)
    with vp.routing(model, rows):
        (model(x) * w).sum().backward()
    for i, name in enumerate(rows):
        (_row_alone(twin, x_ref[i:i + 1], name) * w[i]).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], atol=1e-10, rtol=1e-10, msg=n)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", BATCHED + ["loha"])
@pytest.mark.parametrize("rows", [["b"] * 4, [None] * 4])
def test_agreeing_rows_take_the_unrouted_path(method, rows, monkeypatch):
    """Every row on one adapter (or none): the very ops of the unrouted forward, so the
    result is bit for bit that of the adapter set active, with nothing gathered."""
    model = _vit(_three(method))
    x = _images(len(rows))
    with torch.no_grad():
        if rows[0] is None:
            with vp.disabled(model):
                ref = model(x)
        else:
            vp.set_active(model, [rows[0]])
            ref = model(x)
        vp.set_active(model, ["a"])
        for name in ("index_select", "index_copy", "index_copy_"):
            monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("rows were gathered"))
        with vp.routing(model, rows):
            out = model(x)
    assert torch.equal(out, ref)


def test_agreeing_rows_keep_loras_fused_host_path(monkeypatch):
    model = _vit({"a": make_config("lora", VIT_BLOCK_LINEARS), "b": make_config("lora", VIT_BLOCK_LINEARS)})
    cls = vp.get_method("lora").module_cls
    calls = []
    fused = cls.fused_linear
    monkeypatch.setattr(cls, "fused_linear", lambda self, *a: calls.append(1) or fused(self, *a))
    with torch.no_grad(), vp.routing(model, ["b"] * 3):
        model(_images(3))
    assert len(calls) == 8  # qkv, proj, fc1, fc2 of both blocks


def test_mixed_ranks_are_padded_exactly(no_sub_batches):
    configs = {"a": vp.LoRAConfig(r=2, alpha=3.0, target_modules=VIT_BLOCK_LINEARS),
               "b": vp.LoRAConfig(r=5, alpha=4.0, target_modules=VIT_BLOCK_LINEARS),
               "c": vp.LoRAConfig(r=3, target_modules=VIT_BLOCK_LINEARS,
                                  rank_pattern={"blocks.0.mlp.fc1": 7})}
    _check_against_rows_alone(configs)


@pytest.mark.parametrize("splits", [(2, 4), (2, 3)])
def test_block_lora_with_different_block_counts(splits, no_sub_batches):
    configs = {"a": make_config("block_lora", VIT_BLOCK_LINEARS, n_blocks=splits[0]),
               "b": make_config("block_lora", VIT_BLOCK_LINEARS, n_blocks=splits[1]),
               "c": vp.BlockLoRAConfig(r=4, n_blocks=splits[0], target_modules=VIT_BLOCK_LINEARS)}
    _check_against_rows_alone(configs)


def test_krona_with_different_splits_and_wara_with_different_ranks(no_sub_batches):
    _check_against_rows_alone({"a": vp.KronAConfig(a1=4, a2=4, alpha=0.7, target_modules=VIT_BLOCK_LINEARS),
                               "b": make_config("krona", VIT_BLOCK_LINEARS),
                               "c": vp.KronAConfig(a1=4, a2=4, target_modules=VIT_BLOCK_LINEARS)})
    _check_against_rows_alone({"a": vp.WaRAConfig(r=2, target_modules=VIT_BLOCK_LINEARS),
                               "b": make_config("wara", VIT_BLOCK_LINEARS),
                               "c": vp.WaRAConfig(r=3, share_factors=True, target_modules=VIT_BLOCK_LINEARS)})


def test_methods_mixed_in_one_model(no_sub_batches):
    """LoRA, KronA, WaRA and Block-LoRA adapters on the same layers, routed together:
    each method batches its own adapters, and the scales set per adapter apply."""
    configs = {"a": make_config("lora", VIT_BLOCK_LINEARS), "b": make_config("krona", VIT_BLOCK_LINEARS),
               "c": make_config("wara", VIT_BLOCK_LINEARS), "d": make_config("block_lora", VIT_BLOCK_LINEARS),
               "e": make_config("lora", VIT_BLOCK_LINEARS)}
    model = _vit(configs)
    vp.set_scale(model, "e", 0.3)
    vp.set_scale(model, "b", 1.7)
    _check_against_rows_alone(configs, ["a", "b", None, "c", "d", "e", "b", "a"], model=model)


def test_mixed_with_a_method_that_falls_back():
    configs = {"a": make_config("lora", VIT_BLOCK_LINEARS), "b": make_config("loha", VIT_BLOCK_LINEARS),
               "c": make_config("krona", VIT_BLOCK_LINEARS)}
    _check_against_rows_alone(configs)


def test_fused_qkv_slices_are_batched(no_sub_batches):
    targets = ["re:blocks\\.\\d+\\.attn\\.qkv[q,v]", "re:blocks\\.\\d+\\.mlp\\.fc1"]
    _check_against_rows_alone({"a": make_config("lora", targets), "b": make_config("krona", targets),
                               "c": vp.LoRAConfig(r=2, target_modules=["re:blocks\\.\\d+\\.attn\\.qkv[k]"])})


def _check_against_rows_alone(configs, rows=("a", None, "b", "c", "a", "b"), model=None):
    model = _vit(configs) if model is None else model
    x = _images(len(rows))
    with torch.no_grad():
        with vp.routing(model, list(rows)):
            mixed = model(x)
        ref = _each_row_alone(model, x, rows)
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", BATCHED)
def test_kept_stacks_follow_parameter_and_scale_changes(method):
    """Stacks kept between no-grad forwards are rebuilt when a factor is changed in place
    (an optimizer step) or an adapter's scale changes."""
    model = _vit(_three(method))
    rows = ["a", "b", None, "c"]
    x = _images(len(rows))
    with torch.no_grad():
        with vp.routing(model, rows):
            model(x)
            for n, p in model.named_parameters():
                if ".adapters.b." in n:
                    p.mul_(1.5).add_(0.01)
            vp.set_scale(model, "c", 0.4)
            mixed = model(x)
        ref = _each_row_alone(model, x, rows)
    torch.testing.assert_close(mixed, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", BATCHED)
def test_float32_and_rows_without_tokens(method):
    """Linear layers fed (batch, features), no token axis, in float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.GELU(), torch.nn.Linear(24, 6))
    for name in "abc":
        vp.inject(model, make_config(method, ["0", "2"]), name=name)
    randomize_adapters(model)
    x = torch.randn(7, 12)
    rows = ["a", "c", None, "b", "b", "a", None]
    with torch.no_grad():
        with vp.routing(model, rows):
            mixed = model(x)
        ref = _each_row_alone(model, x, rows)
    torch.testing.assert_close(mixed, ref, atol=1e-5, rtol=1e-5)


def test_dropout_under_routing_trains():
    """Adapters sharing a dropout rate drop once for all rows; differing rates fall back
    to a sub-batch per adapter. Both train (finite outputs and gradients)."""
    for rates in ((0.3, 0.3), (0.3, 0.1)):
        model = _vit({"a": make_config("lora", VIT_BLOCK_LINEARS, dropout=rates[0]),
                      "b": make_config("lora", VIT_BLOCK_LINEARS, dropout=rates[1])}).train()
        with vp.routing(model, ["a", "b", None, "a"]):
            model(_images(4)).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_batch_size_must_match_the_routing():
    model = _vit(_three("lora"))
    for rows in (["a", "b"], ["a", "a"]):  # differing rows, and agreeing ones
        with torch.no_grad(), vp.routing(model, rows), pytest.raises(ValueError, match="routing gives 2 rows"):
            model(_images(3))


def test_convs_and_attention_route_per_adapter_exactly():
    """ToyNet's convs (grouped too), fused-qkv slices and nn.MultiheadAttention: Linear
    layers batch, the others run a sub-batch per adapter; an attention layer that none
    of the routed adapters adapts runs once."""
    torch.manual_seed(0)
    model = ToyNet()
    vp.inject(model, make_config("lora", ["qkv[q,v]", "conv", "conv_grp", "attn", "proj"]), name="a")
    vp.inject(model, make_config("krona", ["qkv[q,v]", "conv", "proj"]), name="b")
    vp.inject(model, make_config("lora", ["proj", "conv_dil"]), name="c")
    randomize_adapters(model)
    model = model.double().eval()
    x, img = (t.double() for t in toy_inputs(batch=6))
    for rows in (["a", None, "b", "c", "a", "b"], ["b", "c", None, "c", "b", "b"]):
        with torch.no_grad():
            with vp.routing(model, rows):
                mixed = model(x, img)
            alone = []
            for i, name in enumerate(rows):
                one = (x[i:i + 1], img[i:i + 1])
                if name is None:
                    with vp.disabled(model):
                        alone.append(model(*one))
                else:
                    vp.set_active(model, [name])
                    alone.append(model(*one))
        torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", BATCHED)
def test_a_wide_no_grad_batch_folds_the_update_into_the_weight_with_equal_values(method, monkeypatch):
    """Without autograd, from MERGE_AT_TOKENS rows on, one adapter runs as one GEMM through
    W + dW: the values equal the factored path (taken below the threshold) chunk by chunk,
    in float64, and the fold happens only in full precision."""
    import visionpeft.methods.krona as krona_module
    import visionpeft.ops.low_rank as low_rank
    from visionpeft.ops.weight_delta import MERGE_AT_TOKENS, merge_pays

    folded = []

    def spy(n, W):
        folded.append(merge_pays(n, W))
        return folded[-1]

    monkeypatch.setattr(low_rank, "merge_pays", spy)
    monkeypatch.setattr(krona_module, "merge_pays", spy)
    model = torch.nn.Sequential(torch.nn.Linear(42, 56))  # 42: n_blocks 3 divides it
    vp.inject(model, make_config(method, ["0"]))
    randomize_adapters(model)
    model.double().eval()
    x = torch.randn(MERGE_AT_TOKENS + 3, 42, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        wide = model(x)
        assert folded == [True]
        narrow = torch.cat([model(chunk) for chunk in x.split(MERGE_AT_TOKENS // 2)])
        assert not any(folded[1:])
        base = model[0].base_layer(x)
    effect = (narrow - base).abs().max()
    assert effect > 0.1
    torch.testing.assert_close(wide, narrow, rtol=0, atol=1e-12 * float(effect) * 1e3)
    assert not merge_pays(MERGE_AT_TOKENS, torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not merge_pays(MERGE_AT_TOKENS - 1, torch.zeros(2, 2))
