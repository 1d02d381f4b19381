"""PeftCD: encoders on every supported host, exchange, symmetric prediction, sliding
windows, training on the synthetic set through the shared loop, and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visionpeft as vp
from conftest import CHROMIUM, CHROMIUM_FLAGS, assert_best_is_checkpoint, randomize_adapters
from visionpeft.backbones import presets
from visionpeft.backbones.tiny import build_tiny
from visionpeft.data.change_detection import write_synthetic_levir
from visionpeft.pipelines.change_detection import Detector, load_detector, predict_probs
from visionpeft.pipelines.change_detection.model import exchange
from visionpeft.train import run_config

ROOT = Path(__file__).resolve().parents[1]
HOSTS = {"timm_sam2_hiera": (64, "qkv"), "timm_dinov3": (32, "qkv"), "hf_dinov3": (32, "v_proj"),
         "hf_sam2_vision": (64, "qkv")}


BLOCKS = {"timm_sam2_hiera": presets.TIMM_BLOCKS, "timm_dinov3": presets.TIMM_BLOCKS,
          "hf_dinov3": presets.HF_VIT_LAYERS, "hf_sam2_vision": presets.HF_SAM2_BLOCKS}


def _detector(host, exchange_mode="layer", method="lora"):
    size, target = HOSTS[host]
    model = build_tiny(host)
    if method == "lora":  # away from B = 0, so that no check passes with a no-op adapter
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=[target]))
        randomize_adapters(model, std=0.2)
    else:  # PeftCD's bottleneck adapter before every block
        vp.inject(model, vp.AdapterConfig(bottleneck=4, position="input", target_modules=BLOCKS[host]))
        randomize_adapters(model, std=0.05)
    return Detector(model, size, 16, exchange_mode).eval(), size


@pytest.mark.parametrize("host,mode,method", [(h, m, "lora") for h in sorted(HOSTS) for m in ("layer", "channel")]
                         + [(h, "layer", "adapter") for h in sorted(HOSTS)])
def test_every_host_gives_full_size_logits_and_a_date_symmetric_prediction(host, mode, method):
    model, size = _detector(host, mode, method)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)
    with torch.no_grad():
        la, lb = model(a, b)
        ra, rb = model(b, a)
        with vp.disabled(model.host):
            base_a, base_b = model(a, b)
    assert la.shape == (2, 2, size, size)
    # the (random, non-zero) adapter moves both branches well above float rounding, and the
    # tolerance is a hundredth of that move: a model that adapted one date differently
    # from the other, or did not treat them alike, fails
    effect = min(float((la - base_a).abs().max()), float((lb - base_b).abs().max()))
    assert effect > 1e-4 * float(la.abs().max()), effect
    # exchanging the dates exchanges the branches, so the averaged prediction is symmetric
    torch.testing.assert_close(la, rb, atol=effect / 100, rtol=0)
    torch.testing.assert_close(lb, ra, atol=effect / 100, rtol=0)


def test_exchange_swaps_odd_levels_or_odd_channels():
    fa = [torch.full((1, 4, 2, 2), float(i)) for i in range(4)]
    fb = [torch.full((1, 4, 2, 2), 10.0 + i) for i in range(4)]
    xa, xb = exchange(fa, fb, "layer")
    assert [float(t[0, 0, 0, 0]) for t in xa] == [0, 11, 2, 13]
    assert [float(t[0, 0, 0, 0]) for t in xb] == [10, 1, 12, 3]
    ca, cb = exchange(fa, fb, "channel")
    assert ca[0][0, :, 0, 0].tolist() == [0, 10, 0, 10] and cb[0][0, :, 0, 0].tolist() == [10, 0, 10, 0]


def test_sliding_windows_average_the_overlaps():
    model, size = _detector("timm_sam2_hiera")
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, 3, 96, 128, generator=g), torch.rand(1, 3, 96, 128, generator=g)

    def window(y, x):
        with torch.no_grad():
            la, lb = model(a[..., y:y + 64, x:x + 64], b[..., y:y + 64, x:x + 64])
        return ((la + lb) / 2).softmax(1)[0, 1]

    probs = predict_probs(model, a, b, tile=64, stride=32)[0]
    assert probs.shape == (96, 128)
    torch.testing.assert_close(probs[:16, :16], window(0, 0)[:16, :16])  # one window only
    expect = (window(0, 32)[40, 0] + window(32, 32)[8, 0] + window(0, 0)[40, 32] + window(32, 0)[8, 32]) / 4
    torch.testing.assert_close(probs[40, 32], expect)  # four windows overlap here
    small = predict_probs(model, a[..., :40, :50], b[..., :40, :50], tile=64)
    assert small.shape == (1, 40, 50) and torch.isfinite(small).all()
    wide = predict_probs(model, a, b, tile=64, stride=100)  # clamped to the tile: no gaps
    assert torch.isfinite(wide).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cd")
    write_synthetic_levir(root / "data", n_train=12, n_val=4, n_test=4, size=64, seed=0)
    res = run_config({"task": "change_detection", "data_root": str(root / "data"),
                      "backbone": {"name": "timm_sam2_hiera", "source": "tiny"},
                      "adapter": {"method": "lora", "r": 4, "alpha": 16, "target_modules": ["qkv"]},
                      "image_size": 64, "decoder_channels": 16, "train_batch_size": 4, "max_train_steps": 6,
                      "learning_rate": 3e-3, "validation_steps": 3, "checkpointing_steps": 3,
                      "output_dir": str(root / "out"), "cpu": True})
    return root, res


def test_training_writes_a_checkpoint_the_cli_evaluates_and_predicts_with(trained):
    root, res = trained
    out = root / "out"
    assert res.step == 6 and res.losses[-1] < res.losses[0]
    assert {"cd_config.json", "decoder.safetensors", "encoder"} <= {p.name for p in (out / "best").iterdir()}
    rows = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]
    run = subprocess.run([sys.executable, "-m", "visionpeft.cli", "evaluate-cd", "--checkpoint", str(out),
                          "--data-root", str(root / "data"), "--split", "test", "--output", str(out / "m.json")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-1500:]
    metrics = json.loads((out / "m.json").read_text())
    assert all(np.isfinite(metrics[k]) for k in ("oa", "kappa", "precision", "recall", "f1", "iou"))
    # the CLI's numbers are the loaded checkpoint's, through the same inference path
    from visionpeft.data.change_detection import ChangeDetectionDataset, find_triples
    from visionpeft.pipelines.change_detection import evaluate

    model, cfg = load_detector(out)
    again = evaluate(model, ChangeDetectionDataset(find_triples(root / "data", "test")), cfg["image_size"])
    assert again["iou"] == pytest.approx(metrics["iou"]) and again["oa"] == pytest.approx(metrics["oa"])
    a, b = root / "data" / "test" / "A" / "test_0000.png", root / "data" / "test" / "B" / "test_0000.png"
    run = subprocess.run([sys.executable, "-m", "visionpeft.cli", "predict-cd", "--checkpoint", str(out),
                          str(a), str(b), "-o", str(out / "mask.png"), "--overlay", str(out / "ov.png")],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "changed area" in run.stdout, run.stderr[-1500:]
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}


def test_predict_cd_refuses_pairs_of_different_sizes_and_unreadable_files(trained, tmp_path):
    root, _ = trained
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_bytes(b"nope")
    for args, expected in (((tmp_path / "a.png", tmp_path / "b.png"), "64x64 but"),
                           ((tmp_path / "a.png", tmp_path / "bad.png"), "cannot read image")):
        run = subprocess.run([sys.executable, "-m", "visionpeft.cli", "predict-cd", "--checkpoint",
                              str(root / "out"), *map(str, args), "-o", str(tmp_path / "m.png")],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 2 and "Traceback" not in run.stderr and expected in run.stderr, run.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("cd_*.yaml")))
def test_every_shipped_cd_config_runs(trained, tmp_path, name):
    import yaml

    root, _ = trained
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    size = 64
    host = values["backbone"]
    if host.get("pretrained") and host["name"] != "embedded-vit-s":  # no hub: a tiny host
        dinov3 = "dinov3" in host["name"]
        host = {"name": "timm_dinov3" if dinov3 else "timm_sam2_hiera", "source": "tiny"}
        size = 32 if dinov3 else 64
    values.update(data_root=str(root / "data"), backbone=host, image_size=size, max_train_steps=2,
                  train_batch_size=2, validation_steps=2, checkpointing_steps=2, mixed_precision="no",
                  output_dir=str(tmp_path), cpu=True, resume_from_checkpoint=None)
    res = run_config(values)
    assert res.step == 2 and all(np.isfinite(res.losses))


def test_the_gradio_demo_answers_through_gradio_client(trained):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    sys.path.insert(0, str(ROOT / "demos"))
    import change_detection as demo_module

    root, _ = trained
    demo = demo_module.build(str(root / "out"))
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        a = root / "data" / "test" / "A" / "test_0001.png"
        b = root / "data" / "test" / "B" / "test_0001.png"
        mask, overlay, text = client.predict(handle_file(str(a)), handle_file(str(b)), str(root / "out"),
                                             api_name="/detect")
        assert text.startswith("changed area:") and text.endswith("%")
        m = np.asarray(Image.open(mask))
        assert m.shape[:2] == (64, 64) and set(np.unique(m)) <= {0, 255}
        assert np.asarray(Image.open(overlay)).shape[:2] == (64, 64)
    finally:
        demo.close()




@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_the_demo_in_a_headless_browser(trained, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    sys.path.insert(0, str(ROOT / "demos"))
    import change_detection as demo_module

    root, _ = trained
    demo = demo_module.build(str(root / "out"))
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(demo.local_url)
            inputs = page.locator("input[type=file]")
            inputs.first.wait_for(state="attached", timeout=30000)
            inputs.nth(0).set_input_files(str(root / "data" / "test" / "A" / "test_0002.png"))
            inputs.nth(1).set_input_files(str(root / "data" / "test" / "B" / "test_0002.png"))
            page.get_by_role("button", name="Detect changes").click()
            result = page.get_by_label("result")
            page.wait_for_function("() => [...document.querySelectorAll('textarea')].some("
                                   "t => t.value.startsWith('changed area'))", timeout=60000)
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            assert result.input_value().startswith("changed area")
            browser.close()
        assert (tmp_path / "demo.png").stat().st_size > 10_000
    finally:
        demo.close()


def test_a_random_init_backbone_is_rebuilt_identically_from_its_checkpoint():
    from visionpeft.pipelines.change_detection.task import build_backbone

    spec = {"name": "vit_tiny_patch16_224", "source": "timm", "pretrained": False, "img_size": 32,
            "depth": 1, "init_seed": 3}
    torch.manual_seed(123)
    first = build_backbone(spec).state_dict()
    torch.manual_seed(456)  # the global RNG state must not matter
    second = build_backbone(spec).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_pretrained_backbone_loads_from_a_local_checkpoint(tmp_path):
    """The real-weights path (timm's loader with checkpoint_path), on a tiny ViT saved here."""
    import timm
    from safetensors.torch import save_file

    from visionpeft.pipelines.change_detection.task import build_backbone

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    torch.manual_seed(7)
    saved = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    save_file(saved.state_dict(), str(tmp_path / "vit.safetensors"))
    host = build_backbone({"name": "vit_tiny_patch16_224", "source": "timm", "pretrained": True,
                           "checkpoint_path": str(tmp_path / "vit.safetensors"), **kw})
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in host.state_dict().items())
    model = Detector(host, 32, 16, "layer")
    assert model(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32))[0].shape == (1, 2, 32, 32)


def test_adapter_null_trains_the_decoder_on_a_frozen_encoder(trained, tmp_path):
    """The lower reference of the benchmarks: no adapter, the encoder frozen, only the
    decoder in the checkpoint; evaluation rebuilds the same encoder."""
    root, _ = trained
    before = build_tiny("timm_sam2_hiera").state_dict()
    res = run_config({"task": "change_detection", "data_root": str(root / "data"),
                      "backbone": {"name": "timm_sam2_hiera", "source": "tiny"}, "adapter": None,
                      "image_size": 64, "decoder_channels": 16, "train_batch_size": 4,
                      "max_train_steps": 2, "validation_steps": 2, "checkpointing_steps": 2,
                      "output_dir": str(tmp_path), "cpu": True})
    assert res.step == 2 and all(np.isfinite(res.losses))
    assert not (tmp_path / "best" / "encoder").exists()
    model, _ = load_detector(tmp_path)
    assert all(torch.equal(model.host.state_dict()[k], v) for k, v in before.items())
    assert not any(p.requires_grad for p in model.host.parameters())
    out = subprocess.run([sys.executable, "-m", "visionpeft.cli", "evaluate-cd", "--checkpoint", str(tmp_path),
                          "--data-root", str(root / "data"), "--split", "test", "--output",
                          str(tmp_path / "m.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 0.0 <= json.loads((tmp_path / "m.json").read_text())["iou"] <= 1.0


def test_best_holds_the_checkpoint_of_the_highest_validation_iou(trained, tmp_path, monkeypatch):
    """README: training keeps the best checkpoint by IoU in output_dir/best. The IoUs a
    tiny run reaches are whatever they are, so the validation's real metrics have their
    IoU replaced by a fixed sequence whose best is neither the first nor the last: best/
    must hold the adapter and decoder of that step's checkpoint, not another's."""

    from visionpeft.pipelines.change_detection import task as cd_task

    root, _ = trained
    real, ious = cd_task.evaluate, iter([0.2, 0.6, 0.4])

    def scripted(*args, **kwargs):
        return {**real(*args, **kwargs), "iou": next(ious)}

    monkeypatch.setattr(cd_task, "evaluate", scripted)
    out = tmp_path / "out"
    run_config({"task": "change_detection", "data_root": str(root / "data"),
                "backbone": {"name": "timm_sam2_hiera", "source": "tiny"},
                "adapter": {"method": "lora", "r": 4, "alpha": 16, "target_modules": ["qkv"]},
                "image_size": 64, "decoder_channels": 16, "train_batch_size": 4, "max_train_steps": 3,
                "learning_rate": 3e-3, "validation_steps": 1, "checkpointing_steps": 1,
                "output_dir": str(out), "cpu": True})
    rows = [json.loads(line) for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["iou"]) for r in rows] == [(1, 0.2), (2, 0.6), (3, 0.4)]
    best_step = max(rows, key=lambda r: r["iou"])["step"]
    assert_best_is_checkpoint(out, best_step, (1, 2, 3))
