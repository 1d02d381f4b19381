"""Earth-Adapter: the frequency split against numpy's FFT written from the paper's formula,
the adapted block against a numpy reference (prefix tokens untouched, non-square grids,
registers), gradients, hosts, counts, save / load, and clear refusals."""
import numpy as np
import pytest
import timm
import torch
from torch import nn

import visionpeft as vp
from visionpeft.backbones.presets import HF_VIT_LAYERS, TIMM_BLOCKS
from visionpeft.backbones.tiny import build_tiny, example_inputs, run_host
from visionpeft.core.model_ops import get_state
from visionpeft.methods.earth_adapter import frequency_split


def _numpy_split(f: np.ndarray, ratio: float):
    """The official recipe on (B, H, W, C): centred spectrum, the square low-pass block
    [H//2 - c, H//2 + c) x [W//2 - c, W//2 + c), each band through its own inverse FFT."""
    rows, cols = f.shape[1:3]
    c = int(min(rows, cols) * ratio // 2)
    spec = np.fft.fftshift(np.fft.fft2(f, axes=(1, 2), norm="ortho"), axes=(1, 2))
    mask = np.zeros((rows, cols))
    mask[rows // 2 - c:rows // 2 + c, cols // 2 - c:cols // 2 + c] = 1
    mask = mask[None, :, :, None]

    def back(s):
        return np.fft.ifft2(np.fft.ifftshift(s, axes=(1, 2)), axes=(1, 2), norm="ortho").real

    return back(spec * mask), back(spec * (1 - mask))


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (7, 5), (32, 32)])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5, 0.0])
def test_frequency_split_is_the_official_fft_mask(grid, ratio):
    f = torch.randn(2, *grid, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = frequency_split(f, ratio)
    ref_low, ref_high = _numpy_split(f.numpy(), ratio)
    np.testing.assert_allclose(low.numpy(), ref_low, atol=1e-12)
    np.testing.assert_allclose(high.numpy(), ref_high, atol=1e-12)
    if int(min(grid) * ratio // 2):
        assert np.abs(ref_low).max() > 0.05 and np.abs(ref_high).max() > 0.05


def _relu_mlp(x, lin1, lin2):
    w1, b1 = lin1.weight.detach().double().numpy(), lin1.bias.detach().double().numpy()
    w2, b2 = lin2.weight.detach().double().numpy(), lin2.bias.detach().double().numpy()
    return np.maximum(x @ w1.T + b1, 0) @ w2.T + b2


def _reference(y: np.ndarray, mod, prefix: int, grid, ratio: float, scale: float, split: bool):
    """The adapted block output from the block's bare output y (B, N, C), in numpy."""
    f = y[:, prefix:]
    e = [(m[0], m[2]) for m in mod.experts]
    out = _relu_mlp(f, *e[0])
    if split:
        low, high = _numpy_split(f.reshape(f.shape[0], *grid, f.shape[-1]), ratio)
        logits = f @ mod.router.weight.detach().double().numpy().T + mod.router.bias.detach().double().numpy()
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out = (w[..., :1] * out + w[..., 1:2] * _relu_mlp(low.reshape(f.shape), *e[1])
               + w[..., 2:3] * _relu_mlp(high.reshape(f.shape), *e[2]))
    expected = y.copy()
    expected[:, prefix:] += scale * out
    return expected


def _vit(img, patch=8, reg_tokens=0):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch,
                             embed_dim=24, depth=2, num_heads=2, reg_tokens=reg_tokens,
                             num_classes=3).double().eval()


def _block_output(model, block, x):
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.setdefault("y", out.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["y"]


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("img,reg_tokens", [((48, 80), 0), ((40, 24), 4), ((32, 32), 1)])
def test_the_adapted_block_equals_the_formula_and_leaves_prefix_tokens_alone(img, reg_tokens, split):
    model = _vit(img, reg_tokens=reg_tokens)
    x = torch.randn(2, 3, *img, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bare = _block_output(model, model.blocks[1], x).numpy()
    cfg = vp.EarthAdapterConfig(target_modules=["blocks.1"], bottleneck=6, cutoff_ratio=0.4,
                                frequency_blocks=[0] if split else [])
    vp.inject(model, cfg)
    mod = model.blocks[1].adapters["default"]["full"]
    assert (mod.router is not None) == split and len(mod.experts) == (3 if split else 1)
    got = _block_output(model, model.blocks[1].base_layer, x).numpy()
    prefix, grid = 1 + reg_tokens, (img[0] // 8, img[1] // 8)
    ref = _reference(bare, mod, prefix, grid, 0.4, 0.1, split)
    np.testing.assert_allclose(got, ref, atol=1e-10)
    np.testing.assert_array_equal(got[:, :prefix], bare[:, :prefix])  # prefix tokens untouched
    assert np.abs(got - bare).max() > 1e-3  # the official init acts from step 0


def test_zero_init_starts_at_the_host():
    model = _vit((32, 32))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        vp.inject(model, vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, zero_init=True, frequency_blocks=[1]))
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_every_trainable_parameter_gets_a_gradient_in_one_backward():
    model = _vit((32, 48)).float().train()
    vp.inject(model, vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, bottleneck=4, frequency_blocks=[1],
                                           cutoff_ratio=0.5))
    model.forward_features(torch.randn(2, 3, 32, 48)).sum().backward()  # every token, not the class token
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == (4 + 1) + (3 * 4 + 2 + 1)  # block 0: one expert, scale; 1: three, router, scale
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("host,preset", [("hf_dinov2", HF_VIT_LAYERS), ("hf_dinov3", HF_VIT_LAYERS),
                                         ("timm_dinov3", TIMM_BLOCKS), ("timm_sam2_hiera", TIMM_BLOCKS)])
def test_hosts_run_with_their_grid_and_registers(host, preset):
    """transformers DINOv2 / DINOv3 (4 registers), timm DINOv3 (Eva, registers, RoPE) and
    SAM2 Hiera ((B, H, W, C) tokens, widths that change between stages)."""
    model = build_tiny(host)
    inputs = example_inputs(host)
    with torch.no_grad():
        before = run_host(host, model, inputs)
    vp.inject(model, vp.EarthAdapterConfig(target_modules=preset, bottleneck=4, frequency_blocks=[0, 1],
                                           cutoff_ratio=0.5))
    with torch.no_grad():
        after = run_host(host, model, inputs)
    assert after.shape == before.shape and (after - before).abs().max() > 1e-4
    grid = get_state(model).token_grid  # the recorded patch grid
    if host != "timm_sam2_hiera":
        assert grid.shape == (4, 4)


def test_dinov2_large_with_the_split_in_blocks_21_to_23_trains_1_02m_parameters():
    """The paper's Rural -> Urban adaptation setting (DINOv2-L, d 16, split in the last three
    blocks), built on the meta device: 24 x (2 d C + d + C) + 3 x (2 (2 d C + d + C) + 3 C + 3)
    + 24 = 1.02M."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                         patch_size=14, image_size=518))
    vp.inject(model, vp.EarthAdapterConfig(target_modules=HF_VIT_LAYERS, bottleneck=16,
                                           frequency_blocks=[21, 22, 23], cutoff_ratio=0.2))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, c = 16, 1024
    assert n == 24 * (2 * d * c + d + c) + 3 * (2 * (2 * d * c + d + c) + 3 * c + 3) + 24 == 1_023_489


def test_save_load_round_trip_and_remove_takes_the_grid_hook_off(tmp_path):
    model = _vit((32, 48))
    hooks_before = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    cfg = vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, bottleneck=5, frequency_blocks=[1], cutoff_ratio=0.3)
    vp.inject(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    vp.save_adapter(model, tmp_path / "earth")
    fresh = _vit((32, 48))
    vp.load_adapter(fresh, tmp_path / "earth")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=1e-12)
    vp.remove(model)
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == hooks_before


def test_refusals_are_clear_and_leave_the_model_alone():
    model = _vit((32, 32))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(vp.ConfigError, match=r"frequency_blocks \[5\] index the adapted blocks.*use indices 0-1"):
        vp.inject(model, vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, frequency_blocks=[0, 5]))
    assert get_state(model, required=False) is None
    assert not any(type(m).__name__ == "AdaptedBlock" for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(vp.ConfigError, match="no alpha"):
        vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, alpha=2.0)
    with pytest.raises(vp.ConfigError, match="cutoff_ratio"):
        vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, cutoff_ratio=1.5)
    with pytest.raises(vp.ConfigError, match="frequency_blocks"):
        vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, frequency_blocks=["last"])
    vp.inject(model, vp.EarthAdapterConfig(target_modules=TIMM_BLOCKS, frequency_blocks=[0]))
    with pytest.raises(ValueError, match="no weight-space form"):
        vp.merge(model)


def test_tokens_that_fit_no_grid_are_refused_with_the_shapes():
    class Host(nn.Module):  # no patch embedding: the grid is guessed from the token count
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))

        def forward(self, x):
            return self.block(x)

    model = Host()
    vp.inject(model, vp.EarthAdapterConfig(target_modules=["block"], bottleneck=2, frequency_blocks=[0]))
    with pytest.raises(ValueError, match="cannot lay 60 tokens out as an image"):
        model(torch.randn(1, 60, 8))  # no square within 8 prefix tokens
    model(torch.randn(1, 17, 8))  # 16 patches after one class token: a 4 x 4 grid
