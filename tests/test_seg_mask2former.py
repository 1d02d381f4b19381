"""decoder: mask2former — transformers' Mask2Former pixel decoder, masked-attention transformer
and set loss on our pyramid: semantic scores as Mask2Former computes them, a loss that reaches
every head parameter, a tiny run through the real task with evaluate-seg / predict-seg on its
checkpoint, a clear error without scipy, and one-line refusals."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import visionpeft as vp
from visionpeft.backbones.presets import TIMM_VIT_QKV
from visionpeft.backbones.tiny import build_tiny
from visionpeft.pipelines.change_detection.model import FeatureEncoder
from visionpeft.pipelines.segmentation.mask2former import (build_criterion, scores_to_probs,
                                                            semantic_targets)
from visionpeft.pipelines.segmentation.model import SegmentationModel, probe, to_pyramid

TINY = {"hidden_size": 32, "num_queries": 6, "decoder_layers": 2, "encoder_layers": 1, "dim_feedforward": 64,
        "encoder_feedforward_dim": 64, "train_num_points": 256}


def _model(host="timm_vit", size=32, num_classes=5, lora=False, **options):
    model = build_tiny(host)
    if lora:
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=TIMM_VIT_QKV))
    enc = FeatureEncoder(model)
    channels, strides = probe(enc, size)
    return SegmentationModel(enc, channels, num_classes, "mask2former", {**TINY, **options}, strides)


@pytest.mark.parametrize("host,size,shape", [("timm_vit", 32, (32, 32)), ("hf_dinov2", 32, (40, 56)),
                                             ("timm_sam2_hiera", 64, (64, 64))])
def test_scores_are_class_probs_times_mask_probs_summed_over_queries(host, size, shape):
    torch.manual_seed(0)
    seg = _model(host, size).eval()
    assert type(seg.decoder.pixel_decoder).__module__ == "transformers.models.mask2former.modeling_mask2former"
    assert type(seg.decoder.transformer).__module__ == "transformers.models.mask2former.modeling_mask2former"
    x = torch.randn(2, 3, *shape)
    with torch.no_grad():
        out = seg(x, queries=True)
        scores = seg(x)
        finest = to_pyramid(seg.encoder(x))[0]
    assert out.masks[-1].shape == (2, 6, *finest.shape[-2:])
    # the queries' first prediction and one per layer; masks at stride 4, classes K + 1 (no-object last)
    assert len(out.classes) == len(out.masks) == TINY["decoder_layers"] + 1
    assert out.classes[-1].shape == (2, 6, 5 + 1)
    assert scores.shape == (2, 5, *shape)
    # by hand: masks upsampled to the input (logits, bilinear), then sigmoid, times class probabilities
    masks = F.interpolate(out.masks[-1], size=shape, mode="bilinear", align_corners=False).sigmoid()
    probs = out.classes[-1].softmax(-1)[..., :5]
    want = torch.zeros(2, 5, *shape)
    for q in range(6):
        want += probs[:, q, :, None, None] * masks[:, q, None]
    torch.testing.assert_close(scores, want)


def test_weights_start_as_transformers_initialises_its_own_model():
    """Deformable attention starts from transformers' fixed sampling grid, not torch's random Linear."""
    from transformers import Mask2FormerConfig, Mask2FormerModel

    ours = _model().decoder.pixel_decoder.encoder.layers[0].self_attn
    cfg = _model().decoder.config.to_dict()
    cfg["backbone_config"] = {"model_type": "swin", "embed_dim": 8, "depths": [1, 1, 1, 1],
                                   "num_heads": [1, 1, 1, 1], "out_features": ["stage1", "stage2", "stage3", "stage4"]}
    theirs = Mask2FormerModel(Mask2FormerConfig(**cfg)).pixel_level_module.decoder.encoder.layers[0].self_attn
    for name in ("sampling_offsets", "attention_weights"):
        assert not getattr(ours, name).weight.any()
        torch.testing.assert_close(getattr(ours, name).bias, getattr(theirs, name).bias)
    assert ours.sampling_offsets.bias.abs().max() == 4  # n_points = 4 rings of the grid


def test_semantic_targets_one_mask_per_present_class_and_ignored_pixels_in_none():
    labels = torch.tensor([[[0, 0, 3], [3, 255, 255]], [[255, 255, 255], [255, 255, 255]]])
    masks, classes = semantic_targets(labels, 255)
    assert classes[0].tolist() == [0, 3] and classes[1].tolist() == []
    assert masks[0].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [1, 0, 0]]]
    assert masks[1].shape == (0, 2, 3)


def test_loss_is_weighted_as_mask2former_is_finite_and_reaches_every_head_parameter():
    torch.manual_seed(0)
    seg = _model(lora=True).train()
    crit = build_criterion(seg.decoder.config)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[0, :8] = 255
    out = seg(torch.randn(2, 3, 32, 32), queries=True)
    torch.manual_seed(1)
    loss, logs = crit.semantic(out, labels, 255)
    assert torch.isfinite(loss) and set(logs) == {"loss_class", "loss_mask", "loss_dice"}
    # the same draws again: class 2, mask 5, dice 5 on the output and on each earlier prediction
    torch.manual_seed(1)
    masks, classes = semantic_targets(labels, 255)
    aux = [{"masks_queries_logits": m, "class_queries_logits": c} for c, m in zip(out.classes[:-1], out.masks[:-1])]
    terms = crit.loss(out.masks[-1], out.classes[-1], masks, classes, aux)
    assert len(terms) == 3 * (TINY["decoder_layers"] + 1)
    weight = {"cross_entropy": 2.0, "mask": 5.0, "dice": 5.0}
    want = sum(weight[k.removeprefix("loss_").rstrip("_0123456789")] * v for k, v in terms.items())
    torch.testing.assert_close(loss, want)
    loss.backward()
    head = [(n, p) for n, p in seg.named_parameters() if not n.startswith("encoder.")]
    assert head and all(p.requires_grad for _, p in head)
    assert [n for n, p in head if p.grad is None] == []  # DDP needs no find_unused_parameters
    assert all(p.grad is not None for n, p in seg.named_parameters() if "lora_A" in n)


def test_a_batch_with_every_pixel_ignored_gives_a_finite_loss():
    seg = _model().train()
    crit = build_criterion(seg.decoder.config)
    loss, _ = crit.semantic(seg(torch.randn(2, 3, 32, 32), queries=True), torch.full((2, 32, 32), 255), 255)
    assert torch.isfinite(loss)
    loss.backward()


def test_training_without_scipy_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match="needs scipy: pip install scipy"):
        build_criterion(_model().decoder.config)


@pytest.mark.parametrize("options,message", [
    ({"queries": 10}, r"decoder mask2former: unknown option\(s\) \['queries'\]; known: "),
    ({"hidden_size": 48}, "hidden_size must be a multiple of 32"),
    ({"num_queries": 0}, "num_queries must be a positive integer"),
    ({"decoder_layers": 2.5}, "decoder_layers must be a positive integer"),
    ({"importance_sample_ratio": 2.0}, r"importance_sample_ratio must lie in \[0, 1\]"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message) as err:
        _model(**options)
    assert "\n" not in str(err.value)


def test_scores_become_probabilities_by_normalising_not_softmax():
    scores = torch.tensor([[[[0.2]], [[0.6]], [[0.0]]]])
    torch.testing.assert_close(scores_to_probs(scores), torch.tensor([[[[0.25]], [[0.75]], [[0.0]]]]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from visionpeft.data.segmentation import write_synthetic_segmentation

    root = tmp_path_factory.mktemp("seg")
    write_synthetic_segmentation(root, n_train=8, n_val=2, n_test=2, size=32, seed=0)
    return root


def test_a_tiny_run_trains_saves_and_evaluates_through_the_task(data, tmp_path):
    from safetensors.torch import load_file

    from visionpeft.cli import main
    from visionpeft.data.segmentation import SegmentationDataset, find_split
    from visionpeft.pipelines.segmentation import load_segmenter, predict_probs
    from visionpeft.train import run_config

    out = tmp_path / "run"
    run_config({"task": "segmentation", "dataset": "synthetic", "data_root": str(data), "source_domain": "source",
                "target_domain": "target", "num_classes": 6, "image_size": 32,
                "backbone": {"name": "timm_vit", "source": "tiny"},
                "adapter": {"method": "earth_adapter", "bottleneck": 4, "frequency_blocks": [1],
                            "target_modules": ["re:blocks\\.\\d+"]},
                "decoder": {"name": "mask2former", **TINY}, "train_batch_size": 4, "max_train_steps": 4,
                "learning_rate": 1e-3, "validation_steps": 2, "checkpointing_steps": 2, "seed": 0, "cpu": True,
                "output_dir": str(out)})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite([r["loss"], r["loss_class"], r["loss_mask"], r["loss_dice"]]).all()
                                  for r in rows)
    val = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val] == [2, 4] and all(0 <= r["target_miou"] <= 1 for r in val)

    # the head comes back whole (strict load) and equals the saved file
    model, cfg = load_segmenter(out)
    assert cfg["decoder"]["name"] == "mask2former" and model.net.decoder_name == "mask2former"
    saved = load_file(str(out / "best" / "decoder.safetensors"))
    assert saved and all(torch.equal(saved[k], v) for k, v in model.trained_head().items())

    item = SegmentationDataset(find_split("synthetic", data, "test", domain="target"))[0]
    probs = predict_probs(model, item["image"][None], 32)
    with torch.no_grad():
        scores = model(item["image"][None])
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 32, 32))
    assert torch.equal(probs.argmax(1), scores.argmax(1))  # one window: the same pixels win
    wide = predict_probs(model, F.pad(item["image"][None], (0, 16)), 32)  # two overlapping windows
    assert wide.shape == (1, 6, 32, 48) and torch.allclose(wide.sum(1), torch.ones(1, 32, 48))

    metrics = tmp_path / "m.json"
    assert main(["evaluate-seg", "--checkpoint", str(out), "--data-root", str(data), "--domain", "target",
                 "--split", "test", "--output", str(metrics)]) == 0
    assert 0 <= json.loads(metrics.read_text())["miou"] <= 1
    image = sorted((data / "target" / "test" / "images").iterdir())[0]
    assert main(["predict-seg", "--checkpoint", str(out), str(image), "-o", str(tmp_path / "mask.png")]) == 0
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "mask.png")).max() < 6
