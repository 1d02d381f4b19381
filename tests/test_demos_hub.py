"""demos/app.py, the Gradio hub with one tab per pipeline's demo, and `visionpeft demo`."""
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS

from visionpeft.data.change_detection import write_synthetic_levir
from visionpeft.data.segmentation import write_synthetic_segmentation
from visionpeft.train import run_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


def _hub():
    if str(ROOT / "demos") not in sys.path:  # as tests/test_change_detection.py imports the demo
        sys.path.insert(0, str(ROOT / "demos"))
    import app

    return app


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny change-detection checkpoint (test_change_detection.py's recipe, fewer steps)."""
    root = tmp_path_factory.mktemp("hub")
    write_synthetic_levir(root / "data", n_train=4, n_val=2, n_test=2, size=64, seed=0)
    run_config({"task": "change_detection", "data_root": str(root / "data"),
                "backbone": {"name": "timm_sam2_hiera", "source": "tiny"},
                "adapter": {"method": "lora", "r": 4, "alpha": 16, "target_modules": ["qkv"]},
                "image_size": 64, "decoder_channels": 16, "train_batch_size": 2, "max_train_steps": 2,
                "learning_rate": 3e-3, "validation_steps": 2, "checkpointing_steps": 2,
                "output_dir": str(root / "out"), "cpu": True})
    return root


@pytest.fixture(scope="module")
def seg_trained(tmp_path_factory):
    """A tiny segmentation checkpoint (test_segmentation.py's recipe: LoRA and a linear head, 2 steps)."""
    root = tmp_path_factory.mktemp("hub_seg")
    write_synthetic_segmentation(root / "data", n_train=8, n_val=2, n_test=2, size=32, seed=0)
    run_config({"task": "segmentation", "dataset": "synthetic", "data_root": str(root / "data"),
                "source_domain": "source", "target_domain": "target", "num_classes": 6, "image_size": 32,
                "backbone": {"name": "timm_vit", "source": "tiny"},
                "adapter": {"method": "lora", "r": 2, "target_modules": ["qkv"]}, "decoder": {"name": "linear"},
                "train_batch_size": 4, "max_train_steps": 2, "validation_steps": 2, "checkpointing_steps": 2,
                "seed": 0, "cpu": True, "output_dir": str(root / "out")})
    return root


SEG_CLASSES = ["soil", "vegetation", "forest", "water", "road", "building"]  # write_synthetic_segmentation's


def _seg_image(root, i):
    return sorted((root / "data" / "target" / "test" / "images").iterdir())[i]


def _seg_direct(root, image):
    """segment() called directly on an RGB array, as the tab's endpoint should answer."""
    return _hub().load_demo("segmentation").segment(image, str(root / "out"))


def _pair(root, i):
    return root / "data" / "test" / "A" / f"test_{i:04d}.png", root / "data" / "test" / "B" / f"test_{i:04d}.png"


def _direct(root, i):
    """detect() called directly, as the tab's endpoint should answer."""
    hub = _hub()
    a, b = _pair(root, i)
    def rgb(path):
        return np.asarray(Image.open(path).convert("RGB"))

    return hub.load_demo("change_detection").detect(rgb(a), rgb(b), str(root / "out"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_hub_answers_on_the_change_detection_endpoint_as_detect_does(trained):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    hub = _hub()
    app = hub.build_app(cd_checkpoint=str(trained / "out"))
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        a, b = _pair(trained, 1)
        mask, overlay, text = client.predict(handle_file(str(a)), handle_file(str(b)), str(trained / "out"),
                                             api_name="/detect")
        want_mask, want_overlay, want_text = _direct(trained, 1)
        assert text == want_text and text.startswith("changed area:")
        np.testing.assert_array_equal(np.asarray(Image.open(mask).convert("L")), want_mask)
        np.testing.assert_array_equal(np.asarray(Image.open(overlay).convert("RGB")), want_overlay)
        assert want_mask.shape == (64, 64) and 0 < want_mask.mean() < 255  # a mask with edges, not all one value
    finally:
        app.close()


def test_a_tab_is_one_entry_and_bad_options_fail_before_building(trained, seg_trained, tmp_path):
    import gradio as gr

    hub = _hub()
    assert [t.label for t in hub.TABS] == ["Change detection", "Segmentation", "Few-shot", "Point clouds",
                                           "Generation"]
    echo = hub.Tab("Echo", lambda: gr.Interface(lambda s: s, "text", "text", api_name="echo"))
    app = hub.build_app([*hub.TABS, echo], cd_checkpoint=str(trained / "out"), seg_checkpoint=str(seg_trained / "out"))
    tabs = [c["props"]["label"] for c in app.config["components"] if c["type"] == "tabitem"]
    # the hub's tabs, in order (the Generation tab has its own Plain / CLoRA tabs inside)
    assert [t for t in tabs if t not in ("Plain", "CLoRA")] == ["Change detection", "Segmentation", "Few-shot",
                                                                 "Point clouds", "Generation", "Echo"]
    names = [d.get("api_name") for d in app.config["dependencies"]]
    assert {"detect", "segment", "echo"} <= set(names) and names.count("segment") == 1
    # each checkpoint is its tab's default in the page
    values = [c["props"].get("value") for c in app.config["components"] if c["type"] == "textbox"]
    assert str(trained / "out") in values and str(seg_trained / "out") in values
    with pytest.raises(FileNotFoundError, match="no change-detection checkpoint"):
        hub.build_app(cd_checkpoint=str(tmp_path))
    with pytest.raises(TypeError, match="unknown demo option"):
        hub.build_app(checkpoint=str(trained / "out"))


def test_the_hub_answers_on_the_segmentation_endpoint_as_segment_does(seg_trained, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from visionpeft.pipelines.segmentation.render import class_colours

    # a non-square image wider than the 32 px tile: the sliding window, not one crop
    rgb = np.concatenate([np.asarray(Image.open(_seg_image(seg_trained, i)).convert("RGB")) for i in (0, 1)], 1)
    rgb = rgb[:, :56]
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    (tmp_path / "notes.png").write_text("not an image")
    hub = _hub()
    app = hub.build_app(seg_checkpoint=str(seg_trained / "out"))
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False)
        class_map, overlay, areas = client.predict(handle_file(str(tmp_path / "scene.png")), str(seg_trained / "out"),
                                                   api_name="/segment")
        want_map, want_overlay, want_areas = _seg_direct(seg_trained, rgb)
        shown_map = np.asarray(Image.open(class_map).convert("RGB"))
        assert shown_map.shape == want_map.shape == (32, 56, 3)
        np.testing.assert_array_equal(shown_map, want_map)
        np.testing.assert_array_equal(np.asarray(Image.open(overlay).convert("RGB")), np.asarray(want_overlay))
        assert Image.open(overlay).size[0] >= 56 and Image.open(overlay).size[1] > 32  # the legend below
        # the class map is flat colour: every pixel one class's colour, no blending with the image
        palette = class_colours(6).astype(np.uint8)
        assert (shown_map[:, :, None, :] == palette[None, None]).all(-1).any(-1).all()
        assert len(np.unique(shown_map.reshape(-1, 3), axis=0)) >= 2
        assert areas["headers"] == ["class", "colour", "pixels", "area (%)"]
        assert [r[0] for r in areas["data"]] == SEG_CLASSES == [r[0] for r in want_areas]
        assert [int(r[2]) for r in areas["data"]] == [r[2] for r in want_areas]
        assert sum(int(r[2]) for r in areas["data"]) == 32 * 56
        assert sum(float(r[3]) for r in areas["data"]) == pytest.approx(100, abs=0.05)
        # a bad upload or checkpoint is a readable error in the page, not gradio's bare "Error"
        with pytest.raises(AppError, match="cannot read notes.png as an image"):
            client.predict(handle_file(str(tmp_path / "notes.png")), str(seg_trained / "out"), api_name="/segment")
        with pytest.raises(AppError, match="holds no segmentation checkpoint"):
            client.predict(handle_file(str(tmp_path / "scene.png")), str(tmp_path), api_name="/segment")
    finally:
        app.close()
    assert not list((ROOT / "demos").glob("*.pyi"))  # gradio writes one for a component subclass


def test_a_bad_segmentation_checkpoint_fails_before_building(trained, seg_trained, tmp_path, monkeypatch, capsys):
    hub = _hub()
    def no_build(name):
        raise AssertionError(f"built the {name} tab despite a bad option")

    monkeypatch.setattr(hub, "load_demo", no_build)
    for bad in (tmp_path, trained / "out"):  # an empty folder; a change-detection checkpoint
        with pytest.raises(FileNotFoundError, match="holds no segmentation checkpoint"):
            hub.build_app(cd_checkpoint=str(trained / "out"), seg_checkpoint=str(bad))
    with pytest.raises(SystemExit) as stop:  # the hub's command line: one line, exit 2
        hub.main(["--seg-checkpoint", str(tmp_path)], prog="visionpeft demo")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"visionpeft demo: {tmp_path} holds no segmentation checkpoint (seg_config.json in it, " \
                  "in best/ or in adapter/)\n"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_the_hub_in_a_headless_browser(trained, seg_trained, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    hub = _hub()
    app = hub.build_app(cd_checkpoint=str(trained / "out"), seg_checkpoint=str(seg_trained / "out"))
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(app.local_url)
            tab = page.get_by_role("tab", name="Change detection")
            tab.wait_for(state="visible", timeout=30000)
            assert tab.get_attribute("aria-selected") == "true"  # the first tab, open on load
            inputs = page.locator("input[type=file]")
            inputs.first.wait_for(state="attached", timeout=30000)
            a, b = _pair(trained, 0)
            inputs.nth(0).set_input_files(str(a))
            inputs.nth(1).set_input_files(str(b))
            page.get_by_role("button", name="Detect changes").click()
            page.wait_for_function("() => [...document.querySelectorAll('textarea')].some("
                                   "t => t.value.startsWith('changed area'))", timeout=60000)
            src = page.wait_for_function(  # the image shown in the "change mask" block
                "() => { const l = [...document.querySelectorAll('[data-testid=block-label]')]"
                ".find(e => e.innerText.trim() === 'change mask'); const i = l && l.closest('.block')"
                ".querySelector('img'); return i && i.src }", timeout=30000).json_value()
            shown_mask = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("L"))
            shown = page.get_by_label("result").input_value()
            page.screenshot(path=str(tmp_path / "hub.png"), full_page=True)
            # the segmentation tab, with the --seg-checkpoint default in its textbox
            page.get_by_role("tab", name="Segmentation").click()
            panel = page.get_by_role("tabpanel")  # the open tab's (the hidden one has no role)
            panel.get_by_role("button", name="Segment").wait_for(state="visible", timeout=30000)
            assert panel.get_by_label("segmentation checkpoint folder").input_value() == str(seg_trained / "out")
            panel.locator("input[type=file][accept='image/*']").set_input_files(str(_seg_image(seg_trained, 0)))
            panel.get_by_role("button", name="Segment").click()
            seg_src = page.wait_for_function(
                "() => { const l = [...document.querySelectorAll('[data-testid=block-label]')]"
                ".find(e => e.innerText.trim() === 'class map'); const i = l && l.closest('.block')"
                ".querySelector('img'); return i && i.src }", timeout=60000).json_value()
            shown_map = np.asarray(Image.open(io.BytesIO(page.request.get(seg_src).body())).convert("RGB"))
            table = panel.get_by_role("grid", name="area per class")
            table.get_by_text("building", exact=True).wait_for(timeout=30000)
            shown_table = table.inner_text()
            page.screenshot(path=str(tmp_path / "seg.png"), full_page=True)
            browser.close()
        want_mask, _, want_text = _direct(trained, 0)
        assert shown == want_text
        np.testing.assert_array_equal(shown_mask, want_mask)
        assert (tmp_path / "hub.png").stat().st_size > 10_000
        want_map, _, want_areas = _seg_direct(seg_trained, np.asarray(Image.open(_seg_image(seg_trained, 0))
                                                                      .convert("RGB")))
        np.testing.assert_array_equal(shown_map, want_map)
        assert all(name in shown_table and str(pixels) in shown_table for name, _, pixels, _ in want_areas)
        assert (tmp_path / "seg.png").stat().st_size > 10_000
    finally:
        app.close()


def test_demo_with_a_missing_checkpoint_ends_in_one_line():
    run = subprocess.run([sys.executable, "-m", "visionpeft.cli", "demo", "--cd-checkpoint", "/nonexistent"],
                         capture_output=True, text=True, cwd=ROOT, env=QUIET, timeout=300)
    assert run.returncode == 2, run.stderr[-1500:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("visionpeft demo: /nonexistent"), run.stderr[-1500:]


def test_demo_without_gradio_or_outside_a_source_tree_ends_in_one_line(monkeypatch, tmp_path, capsys):
    import importlib.util

    from visionpeft import cli

    find_spec = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
        assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "visionpeft demo: gradio is not installed (pip install gradio)\n"
    # an installed (not editable) package has no demos/ next to it
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "visionpeft" / "cli.py"))
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the Gradio demos ship with the source tree" in err, err


def test_visionpeft_demo_serves_the_hub(trained, seg_trained):
    pytest.importorskip("gradio")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "visionpeft.cli", "demo", "--cd-checkpoint",
                             str(trained / "out"), "--seg-checkpoint", str(seg_trained / "out"), "--port", str(port)],
                            cwd=ROOT, env=QUIET, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status, page = time.monotonic() + 240, None, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    status, page = r.status, r.read().decode("utf-8", "replace")
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert status == 200 and "visionpeft demos" in page
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
