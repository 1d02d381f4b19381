"""SNELL's C backward (ops/snell_backward.c, built by ops/native.py): the same W' bit
for bit and the same factor gradients as the compiled loops over a dense g^T x, the cases
that keep the dense path, and a failed build."""
import warnings

import pytest
import torch
from torch import nn

import visionpeft as vp
import visionpeft.methods.snell as snell
from visionpeft.ops import kernels as kernels_mod
from visionpeft.ops import kth, snell_autograd, snell_kernels, snell_native
from visionpeft.ops import native as native_mod
from visionpeft.ops.workspace import release_scratch

pytestmark = pytest.mark.skipif(native_mod._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def native_on(monkeypatch):
    monkeypatch.setitem(kernels_mod._DEFAULTS, "native", True)
    yield
    release_scratch()


def _threshold(A, B, scale, sparsity):
    D = torch.empty(A.shape[0], B.shape[0])
    vp.set_compiled_kernels(True)  # the forward's own search
    try:
        return kth.fused_kernel_and_threshold(A, B, "distance", scale, snell.zero_count(sparsity, D.numel()), D)
    finally:
        vp.set_compiled_kernels(False)


@pytest.mark.parametrize("out,fan_in,tokens,r,scale,host_scale,reweight", [
    (64, 48, 10, 8, 0.1, 1.0, False),
    (100, 77, 150, 4, -0.2, 0.7, True),  # odd sizes, negative kernel scale; 3 token chunks
    (33, 300, 129, 12, 0.1, -1.5, False),  # several column blocks, a tail of 1 token
    (90, 20, 64, 2, 0.3, 2.0, True),  # one coordinate per half
])
def test_native_backward_equals_the_loops_over_dense_g_x(native_on, monkeypatch, out, fan_in, tokens, r, scale,
                                                         host_scale, reweight):
    monkeypatch.setattr(snell_native, "_TOKEN_CHUNK", 64)  # chunked tokens and small column blocks on small shapes
    monkeypatch.setattr(snell_native, "_CACHE_FLOATS", 64 * 40)
    torch.manual_seed(0)
    A, B, W = torch.randn(out, r) * 0.3, torch.randn(fan_in, r) * 0.3, torch.randn(out, fan_in) * 0.02
    g, x = torch.randn(tokens, out), torch.randn(tokens, fan_in)
    t = _threshold(A, B, scale, 0.9)
    Bt = B.t().contiguous()
    w_ref, w_native = torch.empty_like(W), torch.empty_like(W)
    # the compiled loops the C kernel replaces (compiled: eager torch multiplies by a Python
    # float in double precision, inductor and the C kernel in float, as the compiled forward)
    vp.set_compiled_kernels(True)
    try:
        gA, gB = snell_kernels.fused_weight_and_grads(A, Bt, W, g.t() @ x, torch.tensor(t), "distance", scale,
                                              torch.tensor(host_scale), reweight, w_ref)
    finally:
        vp.set_compiled_kernels(False)
    # every input in another layout: A column-major, g and x transposed views
    nA, nB = snell_native.native_sparse_grads(A.t().contiguous().t(), Bt, W, g.t().contiguous().t(),
                                              x.t().contiguous().t(), t, scale, host_scale, reweight, w_native)
    assert torch.equal(w_native, w_ref)  # the mask and W' are the forward's, bit for bit
    # rounding differs (dot products against one GEMM, other summation orders) and
    # sum_j H (a - b) cancels (r = 2 most: both paths are ~1e-4 of the largest entry off
    # float64 there): agreement to that level
    for native, reference in ((nA, gA), (nB, gB)):
        torch.testing.assert_close(native, reference, rtol=1e-4, atol=2e-4 * float(reference.abs().max()))


def _step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["snell", "host_trainable", "snella", "dense_mask", "float64"])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager would hide the compiled path
def test_native_path_is_taken_where_it_applies_and_matches_the_dense_path(native_on, monkeypatch, case):
    calls = []
    real = snell_native.native_sparse_grads

    def counted(*args):
        grads = real(*args)
        calls.extend([] if grads is None else [1])  # None: the library is switched off
        return grads

    monkeypatch.setattr(snell_autograd, "native_sparse_grads", counted)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 56), nn.GELU(), nn.Linear(56, 24))
    cfg = dict(r=8, sparsity=0.5 if case == "dense_mask" else 0.9, softmax_term=case == "snella")
    vp.inject(model, vp.SNELLConfig(target_modules=["0", "2"], **cfg))
    if case == "host_trainable":
        model[0].base_layer.weight.requires_grad_(True)
    dtype = torch.float64 if case == "float64" else torch.float32
    model.to(dtype)
    x = torch.randn(3, 7, 40, dtype=dtype)
    vp.set_compiled_kernels(True)
    try:
        native = _step(model, x)
        native_mod.set_native_kernels(False)
        dense = _step(model, x)
    finally:
        vp.set_compiled_kernels(False)
        native_mod.set_native_kernels(True)
    # dense masks (a 50% kept fraction), a trainable host weight (layer 0 only), SNELLA's K
    # and float64 keep the GEMM
    assert len(calls) == {"snell": 2, "host_trainable": 1}.get(case, 0)
    assert native.keys() == dense.keys() and native
    for name in native:
        torch.testing.assert_close(native[name], dense[name], rtol=1e-4, atol=1e-6)


def test_a_failed_build_warns_once_and_returns_none(monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    lib = native_mod.CLibrary(snell_native.LIBRARY.source, {})
    with pytest.warns(RuntimeWarning, match="snell_backward.c"):
        assert lib.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lib.get() is None  # not retried, not warned again


def test_switch_refuses_non_bool():
    with pytest.raises(TypeError, match="True or False"):
        native_mod.set_native_kernels(1)


def test_cc_may_carry_a_launcher_or_flags(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("CC", f"env {native_mod._compiler()[0]}")  # two words, one command
    lib = native_mod.CLibrary(snell_native.LIBRARY.source,
                              {"transpose_f32": snell_native.LIBRARY.functions["transpose_f32"]})
    assert lib.get() is not None
