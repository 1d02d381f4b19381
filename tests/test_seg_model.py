"""The segmentation model: ViT blocks brought to a stride-4..32 pyramid, smp's own decoder
modules on it (not copies), logits at the input size, gradients to the adapter and the
decoder, clear refusals."""
import pytest
import torch
import torch.nn.functional as F

import visionpeft as vp
from visionpeft.backbones.presets import TIMM_VIT_QKV
from visionpeft.backbones.tiny import build_tiny
from visionpeft.pipelines.change_detection.model import FeatureEncoder
from visionpeft.pipelines.segmentation.model import DECODERS, SegmentationModel, probe, probe_channels, to_pyramid

OPTIONS = {"upernet": {"channels": 16}, "fpn": {"channels": 32, "pyramid_channels": 32},
           "deeplabv3plus": {"channels": 16}, "unet": {"channels": (32, 16, 16, 8, 8)}, "dpt": {"channels": 16},
           "linear": {}}


def test_vit_maps_become_strides_4_to_32_and_a_pyramid_stays_as_it_is():
    maps = [torch.randn(2, 5, 6, 10) for _ in range(4)]
    out = to_pyramid(maps)
    assert [tuple(m.shape[-2:]) for m in out] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    assert out[2] is maps[2]
    # x0.5 bilinear without antialias on an even grid is the mean of each 2 x 2 cell
    torch.testing.assert_close(out[3], F.avg_pool2d(maps[3], 2))
    odd = to_pyramid([torch.randn(1, 2, 5, 7) for _ in range(4)])  # 37 x 37 grids (518 px, patch 14) are odd
    assert [tuple(m.shape[-2:]) for m in odd] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    pyramid = [torch.randn(1, 4, 16 // 2 ** i, 16 // 2 ** i) for i in range(4)]
    assert all(a is b for a, b in zip(to_pyramid(pyramid), pyramid))


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("host,size", [("timm_vit", 32), ("timm_sam2_hiera", 64)])
def test_every_decoder_gives_logits_at_the_input_size_and_trains_the_adapter(host, size, decoder):
    model = build_tiny(host)
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=TIMM_VIT_QKV if host == "timm_vit" else
                                   [r"re:blocks\.\d+\.attn\.qkv"]))
    enc = FeatureEncoder(model)
    channels, strides = probe(enc, size)
    seg = SegmentationModel(enc, channels, num_classes=6, decoder=decoder, options=OPTIONS[decoder],
                            strides=strides).train()
    if decoder != "linear":  # smp's module itself
        assert type(seg.decoder).__module__.startswith("segmentation_models_pytorch.decoders.")
    x = torch.randn(2, 3, size, size)
    logits = seg(x)
    assert logits.shape == (2, 6, size, size)
    F.cross_entropy(logits, torch.randint(0, 6, (2, size, size))).backward()
    trainable = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n, _ in trainable)
    assert all(p.grad is not None for n, p in trainable if "lora_" in n or n.startswith("head"))


def test_earth_adapter_and_decoder_leave_no_unused_parameter():
    """DDP without find_unused_parameters needs every trainable parameter in the graph."""
    model = build_tiny("hf_dinov2")
    vp.inject(model, vp.EarthAdapterConfig(target_modules=vp.presets.HF_VIT_LAYERS, bottleneck=4,
                                           frequency_blocks=[1]))
    enc = FeatureEncoder(model)
    seg = SegmentationModel(enc, probe_channels(enc, 32), 4, "upernet", {"channels": 16}).train()
    F.cross_entropy(seg(torch.randn(2, 3, 32, 48)), torch.randint(0, 4, (2, 32, 48))).backward()
    unused = [n for n, p in seg.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused


def test_bad_decoders_are_refused_clearly():
    enc = FeatureEncoder(build_tiny("timm_vit"))
    channels = probe_channels(enc, 32)
    with pytest.raises(ValueError, match="decoder 'segformer' is not one of"):
        SegmentationModel(enc, channels, 3, "segformer")
    with pytest.raises(ValueError, match="multiples of 32"):
        SegmentationModel(enc, channels, 3, "fpn", {"channels": 48})
    with pytest.raises(ValueError, match="feature strides of 4 x a power of two"):
        SegmentationModel(enc, channels, 3, "dpt", strides=[14, 14, 14, 14])
    with pytest.raises(ValueError, match="four feature maps"):
        SegmentationModel(enc, channels[:3], 3)


@pytest.mark.parametrize("decoder", DECODERS)
def test_odd_non_square_grids_run_through_every_decoder(decoder):
    """transformers DINOv2 at 40 x 56 px (patch 8): a 5 x 7 grid."""
    enc = FeatureEncoder(build_tiny("hf_dinov2"))
    channels, strides = probe(enc, 32)
    seg = SegmentationModel(enc, channels, 3, decoder, OPTIONS[decoder], strides).eval()
    with torch.no_grad():
        assert seg(torch.randn(2, 3, 40, 56)).shape == (2, 3, 40, 56)


def test_feature_blocks_pick_the_vit_blocks_read_and_are_checked():
    """The four blocks a plain ViT feeds the pyramid with (the official DINOv2-L reads 7,
    11, 15, 23): each map equals that block's output, normed, as timm gives it."""
    host = build_tiny("timm_vit")
    x = torch.randn(1, 3, 32, 32)
    maps = FeatureEncoder(host, [1, 0, 1, 0])(x)
    ref = host.forward_intermediates(x, indices=[0, 1], output_fmt="NCHW", intermediates_only=True, norm=True)
    for got, want in zip(maps, [ref[1], ref[0], ref[1], ref[0]]):
        torch.testing.assert_close(got, want)
    dinov2 = build_tiny("hf_dinov2")
    hidden = dinov2(pixel_values=x, output_hidden_states=True).hidden_states
    got = FeatureEncoder(dinov2, [0, 0, 1, 1])(x)
    torch.testing.assert_close(got[0], hidden[1][:, 1:].transpose(1, 2).reshape(1, -1, 4, 4))
    with pytest.raises(ValueError, match=r"four block indices in \[0, 2\)"):
        FeatureEncoder(host, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="not a plain ViT"):
        FeatureEncoder(build_tiny("timm_sam2_hiera"), [0, 1, 2, 3])
