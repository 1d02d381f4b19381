"""Block-LoRA against an explicit block matrix B [A0 ... A0], for Linear and Conv2d."""
import pytest
import torch
import torch.nn.functional as F
from conftest import Untouched, randomize_adapters
from torch import nn

import visionpeft as vp


def test_linear_dW_is_B_times_repeated_A0_and_forward_sums_chunks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    vp.inject(model, vp.BlockLoRAConfig(r=2, n_blocks=4, alpha=3.0, target_modules=["0"]))
    randomize_adapters(model)
    mod = model[0].adapters["default"]["full"]
    A0, B = mod.A0.detach(), mod.B.detach()
    assert A0.shape == (2, 3) and B.shape == (7, 2)
    explicit = torch.cat([A0, A0, A0, A0], dim=1)  # [A0 A0 A0 A0], written out
    dW = 1.5 * B @ explicit
    torch.testing.assert_close(vp.delta_weight(model, "0"), dW)
    x = torch.randn(5, 12)
    by_chunks = 1.5 * (x[:, 0:3] + x[:, 3:6] + x[:, 6:9] + x[:, 9:12]) @ A0.t() @ B.t()
    with torch.no_grad():
        torch.testing.assert_close(model(x) - F.linear(x, model[0].weight, model[0].bias), by_chunks,
                                   atol=1e-5, rtol=1e-5)
    assert vp.trainable_parameters(model) == 2 * (12 // 4 + 7)


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, dilation=2, padding=2)])
def test_conv_blocks_are_input_channel_groups(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, **kw)
    model = nn.Sequential(conv)
    vp.inject(model, vp.BlockLoRAConfig(r=2, n_blocks=3, target_modules=["0"]))
    randomize_adapters(model)
    mod = model[0].adapters["default"]["full"]
    A0 = mod.A0.detach().view(2, 2, 3, 3)  # (r, in/n, kh, kw)
    kernel_A = torch.cat([A0, A0, A0], dim=1)  # the same A0 for channels 0-1, 2-3, 4-5
    dW = torch.einsum("or,rihw->oihw", mod.B.detach(), kernel_A)
    torch.testing.assert_close(vp.delta_weight(model, "0"), dW, atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.conv2d(x, conv.weight + dW, conv.bias, conv.stride,
                                                      conv.padding, conv.dilation), atol=1e-5, rtol=1e-5)


def test_gradients_match_the_explicit_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    vp.inject(model, vp.BlockLoRAConfig(r=2, n_blocks=2, target_modules=["0"]))
    randomize_adapters(model)
    mod = model[0].adapters["default"]["full"]
    x = torch.randn(3, 4, 8, requires_grad=True)
    model(x).square().sum().backward()
    A0 = mod.A0.detach().clone().requires_grad_(True)
    B = mod.B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    ref = F.linear(xr, model[0].weight + B @ torch.cat([A0, A0], 1), model[0].bias)
    ref.square().sum().backward()
    torch.testing.assert_close(mod.A0.grad, A0.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mod.B.grad, B.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-4, rtol=1e-4)


def test_non_dividing_blocks_list_the_valid_ones():
    model = nn.Sequential(nn.Linear(8, 10), nn.Linear(10, 6))
    kept = Untouched(model)
    # the refused layer comes second: layer 0, which fits, must be left as it was too
    with pytest.raises(ValueError, match=r"1: n_blocks=4 does not divide the layer's input size \(10\); "
                                         r"valid n_blocks: \[1, 2, 5, 10\]"):
        vp.inject(model, vp.BlockLoRAConfig(n_blocks=4, r=1, target_modules=["0", "1"]))
    kept.check()
    with pytest.raises(ValueError, match=r"rank r=3 is larger .* use r <= 2"):
        vp.inject(model, vp.BlockLoRAConfig(n_blocks=5, r=3, target_modules=["1"]))
    kept.check()
    assert isinstance(model[1], nn.Linear)


def test_rank_stabilized_scale_and_input_dropout():
    """CLIP-LoRA's conventions as options: alpha / sqrt(r), and dropout on the adapter's
    input only (the host sees x untouched; eval mode drops nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7))
    vp.inject(model, vp.BlockLoRAConfig(r=4, n_blocks=3, alpha=1.0, rank_stabilized=True,
                                        dropout=0.25, target_modules=["0"]))
    randomize_adapters(model)
    mod = model[0].adapters["default"]["full"]
    A0, B = mod.A0.detach(), mod.B.detach()
    torch.testing.assert_close(vp.delta_weight(model, "0"), 0.5 * B @ A0.repeat(1, 3))  # 1 / sqrt(4)
    x = torch.randn(5, 12)
    host = F.linear(x, model[0].weight, model[0].bias)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), host + 0.5 * F.linear(x, B @ A0.repeat(1, 3)),
                                   atol=1e-5, rtol=1e-5)
        model.train()
        torch.manual_seed(1)
        out = model(x)
        torch.manual_seed(1)
        xd = F.dropout(x, 0.25, True)
        torch.testing.assert_close(out, host + 0.5 * F.linear(xd, B @ A0.repeat(1, 3)),
                                   atol=1e-5, rtol=1e-5)
    kept = Untouched(model)
    with pytest.raises(vp.ConfigError, match="dropout"):
        vp.inject(model, vp.BlockLoRAConfig(r=4, n_blocks=3, dropout=1.0, target_modules=["0"]), name="dropped")
    kept.check()


def test_an_input_with_zero_rows_gives_an_empty_output_and_gradient():
    model = nn.Sequential(nn.Linear(8, 6))
    vp.inject(model, vp.BlockLoRAConfig(r=1, n_blocks=2, target_modules=["0"]))
    x = torch.randn(0, 8, requires_grad=True)
    y = model(x)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
