"""DiffuseKronA against explicit block matrices, torch.kron, LyCORIS's LoKr and autograd."""
import pytest
import torch
import torch.nn.functional as F
from conftest import Untouched, randomize_adapters
from torch import nn

import visionpeft as vp
from visionpeft.methods.krona import (krona_add_linear, krona_conv, krona_delta_weight, krona_linear,
                                     sqrt_factor)


def _explicit_kron(A, B):
    """Block (i, j) of the result is A[i, j] * B, written out with loops."""
    a1, a2 = A.shape
    p, q = B.shape[:2]
    out = torch.zeros(a1 * p, a2 * q, *B.shape[2:])
    for i in range(a1):
        for j in range(a2):
            out[i * p:(i + 1) * p, j * q:(j + 1) * q] = A[i, j] * B
    return out


@pytest.mark.parametrize("b_shape", [(5, 7), (5, 7, 3, 2)])
def test_delta_weight_is_the_block_matrix_and_matches_lycoris(b_shape):
    from lycoris.functional.lokr import make_kron

    torch.manual_seed(0)
    A, B = torch.randn(3, 2), torch.randn(*b_shape)
    dW = krona_delta_weight(A, B, 0.5)
    torch.testing.assert_close(dW, 0.5 * _explicit_kron(A, B))
    torch.testing.assert_close(dW, make_kron(A, B, 0.5))
    if B.dim() == 2:
        torch.testing.assert_close(dW, 0.5 * torch.kron(A, B))


def test_factored_linear_forward_and_gradients_equal_the_built_matrix():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 21, requires_grad=True)
    A = torch.randn(3, 7, requires_grad=True)
    B = torch.randn(5, 3, requires_grad=True)
    out = krona_linear(x, A, B, 0.7)
    ref = F.linear(x, 0.7 * torch.kron(A, B))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, A, B), g), torch.autograd.grad(ref, (x, A, B), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_hand_written_backward_matches_autograd_of_the_built_matrix(fused):
    """The fast Function (host Linear + delta, or delta added to a given y) against
    F.linear with W + scale * torch.kron(A, B): values, every gradient, and gradcheck in
    double precision."""
    torch.manual_seed(0)
    dt = dict(dtype=torch.double)
    x = torch.randn(3, 5, 12, **dt, requires_grad=True)
    W = torch.randn(8, 12, **dt, requires_grad=True)
    b = torch.randn(8, **dt, requires_grad=True)
    y0 = torch.randn(3, 5, 8, **dt, requires_grad=True)
    A = torch.randn(2, 3, **dt, requires_grad=True)
    B = torch.randn(4, 4, **dt, requires_grad=True)
    if fused:
        inputs = (x, W, b, A, B)
        fast = lambda x, W, b, A, B: krona_add_linear(x, None, A, B, 0.7, W, b)  # noqa: E731
        ref = lambda x, W, b, A, B: F.linear(x, W + 0.7 * torch.kron(A, B), b)  # noqa: E731
    else:
        inputs = (x, y0, A, B)
        fast = lambda x, y0, A, B: krona_add_linear(x, y0, A, B, 0.7)  # noqa: E731
        ref = lambda x, y0, A, B: y0 + F.linear(x, 0.7 * torch.kron(A, B))  # noqa: E731
    out, expected = fast(*inputs), ref(*inputs)
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(expected, inputs, g)):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(fast, inputs)
    with torch.no_grad():  # the inference form, which writes into a given y: pass a copy
        copies = [t.clone() for t in inputs]
        torch.testing.assert_close(fast(*copies), expected)
        if not fused:
            torch.testing.assert_close(copies[1], expected)  # y itself updated in place


@pytest.mark.parametrize("shape", [(4, 12), (1, 12), (1, 1, 12), (12,)])
def test_fused_qkv_slice_without_autograd_any_token_count(shape):
    """On a q slice of a fused projection the wrapper writes the result back into its
    columns; a one-token slice counts as contiguous, and returning another view of it
    made that write-back overlap (found in review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 36))
    vp.inject(model, vp.KronAConfig(target_modules=["0[q]"]))
    randomize_adapters(model)
    k = model[0].adapters["default"]["q"]
    x = torch.randn(*shape)
    W = model[0].base_layer.weight.detach().clone()
    W[:12] += torch.kron(k.A, k.B).detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            torch.testing.assert_close(model(x), F.linear(x, W, model[0].base_layer.bias), atol=1e-5, rtol=1e-5)


def test_wrapper_paths_agree_fused_added_and_general():
    """One KronA active on a plain Linear takes the fused Function (host op inside); after
    a second active adapter it goes through add_delta. Both give the layer of the built
    matrix, with the same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8))
    vp.inject(model, vp.KronAConfig(a1=2, a2=3, alpha=0.5, target_modules=["0"]), name="k")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]), name="l")
    randomize_adapters(model)
    k = model[0].adapters["k"]["full"]
    x = torch.randn(4, 12)
    ref_out = F.linear(x, model[0].base_layer.weight + 0.5 * torch.kron(k.A, k.B), model[0].base_layer.bias)
    ref_grads = torch.autograd.grad(ref_out.sum(), (k.A, k.B))
    vp.set_scale(model, "l", 0.0)  # the LoRA adds nothing; with it active KronA is added second
    for active in (["k"], ["l", "k"]):
        vp.set_active(model, active)
        out = model(x)
        assert type(out.grad_fn.next_functions[0][0]).__name__ == "_KronALinearBackward"
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for a, e in zip(torch.autograd.grad(out.sum(), (k.A, k.B)), ref_grads):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2)])
def test_factored_conv_equals_conv_with_the_built_kernel(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 2), **kw)
    from visionpeft.core.adapter import HostSpec
    host = HostSpec.from_module(conv)
    A, B = torch.randn(2, 3), torch.randn(5, 2, 3, 2)
    x = torch.randn(2, 6, 9, 8)
    ref = F.conv2d(x, 1.3 * _explicit_kron(A, B), None, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(krona_conv(x, A, B, 1.3, host), ref, atol=1e-5, rtol=1e-5)


def test_auto_factors_are_balanced_and_counts_follow_the_formula():
    assert [sqrt_factor(n) for n in (1, 7, 12, 16, 360, 1280)] == [1, 1, 3, 4, 18, 32]
    model = nn.Sequential(nn.Linear(12, 16), nn.Conv2d(16, 6, 3))
    vp.inject(model, vp.KronAConfig(target_modules=["0", "1"]))
    lin, conv = (model[i].adapters["default"]["full"] for i in (0, 1))
    assert lin.A.shape == (4, 3) and lin.B.shape == (4, 4)
    assert conv.A.shape == (2, 4) and conv.B.shape == (3, 4, 3, 3)
    assert vp.trainable_parameters(model) == (4 * 3 + 4 * 4) + (2 * 4 + 3 * 4 * 9)
    assert torch.count_nonzero(vp.delta_weight(model, "0")) == 0  # B starts at zero


def test_layer_output_matches_explicit_matrix_with_given_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    vp.inject(model, vp.KronAConfig(a1=2, a2=5, alpha=2.0, target_modules=["0"]), name="k")
    randomize_adapters(model)
    mod = model[0].adapters["k"]["full"]
    dW = 2.0 * _explicit_kron(mod.A.detach(), mod.B.detach())
    x = torch.randn(3, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.linear(x, model[0].weight + dW, model[0].bias),
                                   atol=1e-5, rtol=1e-5)


def test_non_dividing_factors_list_the_valid_ones_and_leave_the_model():
    model = nn.Sequential(nn.Linear(10, 6))
    kept = Untouched(model)
    with pytest.raises(ValueError,
                       match=r"0: a1=4 does not divide the layer's output size \(6\); valid a1: \[1, 2, 3, 6\]"):
        vp.inject(model, vp.KronAConfig(a1=4, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"a2=3 does not divide .*valid a2: \[1, 2, 5, 10\]"):
        vp.inject(model, vp.KronAConfig(a2=3, target_modules=["0"]))
    kept.check()
    with pytest.raises(vp.ConfigError, match="a1 must be a positive integer"):
        vp.KronAConfig(a1=0, target_modules=["0"])


@pytest.mark.parametrize("fused", [True, False])
def test_backward_saves_only_the_input_besides_the_weights(fused):
    """The README's memory claim: the hand-written backward keeps x (as LoRA does) and the
    factors / host weight it already holds, no activation-sized product such as X B^T."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, requires_grad=True)
    W, b = torch.randn(8, 12), torch.randn(8)
    A, B = torch.randn(2, 3, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        if fused:
            krona_add_linear(x, None, A, B, 0.7, W, b)
        else:
            krona_add_linear(x, torch.randn(3, 5, 8), A, B, 0.7)
    weights = {A.data_ptr(), B.data_ptr(), W.data_ptr()}
    activations = [t for t in saved if t.data_ptr() not in weights]
    assert len(activations) == 1 and activations[0].data_ptr() == x.data_ptr()
    assert activations[0].numel() == x.numel()


def test_init_A_is_kaiming_uniform_and_B_is_zero():
    """README (KronA): A Kaiming-uniform (nn.Linear's init of an (a1, a2) weight: fan_in =
    a2, a = sqrt(5)), B = 0, so dW = 0 at init."""
    model = nn.Sequential(nn.Linear(24, 20))
    torch.manual_seed(11)
    vp.inject(model, vp.KronAConfig(a1=4, a2=6, target_modules=["0"]))
    mod = model[0].adapters["default"]["full"]
    torch.manual_seed(11)
    expected = nn.Linear(6, 4, bias=False).weight.detach()
    assert mod.A.shape == (4, 6) and mod.B.shape == (5, 4)
    torch.testing.assert_close(mod.A.detach(), expected, atol=0, rtol=0)
    assert torch.count_nonzero(mod.B) == 0
    assert torch.count_nonzero(vp.delta_weight(model, "0")) == 0
