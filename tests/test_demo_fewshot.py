"""demos/fewshot.py, the hub's Few-shot tab: load a few-shot CLIP checkpoint, classify an
upload, through gradio_client against a launched hub, on a tiny open_clip model trained here."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS

pytest.importorskip("gradio")
pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["red_thing", "blue thing", "green", "pale"]  # a space in a name, as CoOp's data sets have
CLIP_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
CLIP_PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _hub():
    if str(ROOT / "demos") not in sys.path:  # as tests/test_demos_hub.py imports the hub
        sys.path.insert(0, str(ROOT / "demos"))
    import app

    return app


def _fewshot():
    return _hub().load_demo("fewshot")


def _picture(rng, label: int, size=(40, 48)) -> np.ndarray:
    x = (rng.random((*size, 3)) * 80).astype(np.uint8)
    if label < 3:
        x[..., label] += 150
    else:
        x += 120
    return x


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A random tiny open_clip folder, a tiny CoOp-style data set, and two checkpoints on
    them: LoRA trained 3 steps (lora/) and zero-shot CLIP (zeroshot/)."""
    import open_clip
    from safetensors.torch import save_file

    from visionpeft.train import run_config

    root = tmp_path_factory.mktemp("fewshot_demo")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.CLIP(**CLIP_CFG)
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CFG,
                                                                     "preprocess_cfg": CLIP_PREPROCESS}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(root / "clip" / "open_clip_model.safetensors"))
    data, rng, split = root / "data" / "scenes", np.random.default_rng(0), {}
    for part, n in (("train", 3), ("val", 1), ("test", 1)):
        rows = []
        for label, name in enumerate(CLASSES):
            (data / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rel = f"{name}/{part}_{i}.png"
                Image.fromarray(_picture(rng, label)).save(data / rel)
                rows.append([rel, label, name])
        split[part] = rows
    (data / "split_zhou_scenes.json").write_text(json.dumps(split))
    common = {"task": "fewshot_clip", "dataset": "coop", "dataset_name": "scenes", "data_root": str(root / "data"),
              "shots": 2, "backbone": {"source": "open_clip", "name": str(root / "clip")}, "cpu": True}
    run_config({**common, "adapter": {"method": "lora", "r": 2}, "max_train_steps": 3, "train_batch_size": 4,
                "output_dir": str(root / "lora")})
    run_config({**common, "adapter": None, "output_dir": str(root / "zeroshot")})
    # a non-square upload (CLIP's resize + centre crop), and one that is not an image
    Image.fromarray(_picture(np.random.default_rng(7), 2, size=(45, 30))).save(root / "upload.png")
    (root / "notes.png").write_text("not an image")
    return root


def _direct(path, image, k):
    """predict_topk on a checkpoint loaded apart from the demo, as the endpoint should answer."""
    from visionpeft.pipelines.fewshot_clip import load_classifier, predict_topk

    clf, _ = load_classifier(path, device=_fewshot().DEVICE)
    return [[name, p] for name, p in predict_topk(clf, [Image.open(image).convert("RGB")], k=k)[0]]


def _same(shown, want):
    assert [n for n, _ in shown] == [n for n, _ in want]
    assert [p for _, p in shown] == pytest.approx([p for _, p in want], rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def served(ckpts):
    """The whole hub, its Few-shot tab pre-loading the LoRA checkpoint."""
    app = _hub().build_app(fewshot_checkpoint=str(ckpts / "lora"))
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield app
    finally:
        app.close()


def _client(app):
    from gradio_client import Client

    return Client(app.local_url, verbose=False)


def _error(client, endpoint, *args):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict(*args, api_name=endpoint)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def test_the_hub_builds_with_the_few_shot_tab(ckpts, served, tmp_path, monkeypatch, capsys):
    hub, fs = _hub(), _fewshot()
    labels = [t.label for t in hub.TABS]
    assert "Few-shot" in labels and labels[-1] == "Generation"
    assert [o.flag for o in hub.TABS[labels.index("Few-shot")].options] == ["--fewshot-checkpoint"]
    tabs = [c["props"]["label"] for c in served.config["components"] if c["type"] == "tabitem"]
    assert "Few-shot" in tabs
    names = [d.get("api_name") for d in served.config["dependencies"]]
    assert names.count("load_fewshot") == 1 and names.count("classify") == 1
    params = {k: [p["parameter_name"] for p in v["parameters"]]
              for k, v in _client(served).view_api(print_info=False, return_format="dict")["named_endpoints"].items()}
    assert params["/load_fewshot"] == ["checkpoint"] and params["/classify"] == ["image", "k"]
    # --fewshot-checkpoint fills the folder box and is loaded: the "loaded" line says what it is
    values = [c["props"].get("value") for c in served.config["components"] if c["type"] == "textbox"]
    cfg = json.loads((ckpts / "lora" / "adapter" / "fewshot_config.json").read_text())
    line = fs.describe(cfg, (ckpts / "lora" / "adapter").resolve())
    assert str(ckpts / "lora") in values and line in values
    assert line.startswith(f"backbone: open_clip {ckpts / 'clip'}; adapter: lora r=2; 4 classes (red_thing, "
                           "blue thing, green, pale); template ")
    slider = [c["props"] for c in served.config["components"] if c["type"] == "slider"
              and c["props"].get("label") == "top k" and c["props"].get("maximum") == fs.MAX_TOPK]
    assert len(slider) == 1 and slider[0]["value"] == 5
    # a bad --fewshot-checkpoint fails in one line before any tab is built
    monkeypatch.setattr(hub, "load_demo", lambda name: pytest.fail(f"built the {name} tab despite a bad option"))
    with pytest.raises(FileNotFoundError, match="holds no few-shot CLIP checkpoint"):
        hub.build_app(fewshot_checkpoint=str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        hub.main(["--fewshot-checkpoint", str(tmp_path)], prog="visionpeft demo")
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"visionpeft demo: {tmp_path} holds no few-shot CLIP checkpoint " \
                                      "(fewshot_config.json in it, in best/ or in adapter/)\n"


def test_classify_answers_as_predict_topk(ckpts, served):
    fs = _fewshot()
    from gradio_client import handle_file

    client, upload = _client(served), handle_file(str(ckpts / "upload.png"))
    lora, zeroshot = str(ckpts / "lora"), str(ckpts / "zeroshot")
    label, table = client.predict(upload, 2, api_name="/classify")  # the pre-loaded checkpoint
    want = _direct(lora, ckpts / "upload.png", 2)
    _same(table, want)
    assert len(table) == 2 and label["label"] == want[0][0]
    _same([(c["label"], c["confidence"]) for c in label["confidences"]], want)
    _, table = client.predict(upload, 10, api_name="/classify")  # k past the class count: every class
    _same(table, _direct(lora, ckpts / "upload.png", 10))
    assert sorted(n for n, _ in table) == sorted(CLASSES) and sum(p for _, p in table) == pytest.approx(1, abs=1e-5)
    # load another checkpoint: the session classifies with it
    line = client.predict(zeroshot, api_name="/load_fewshot")
    assert line.startswith(f"backbone: open_clip {ckpts / 'clip'}; adapter: zero-shot; 4 classes")
    assert line.endswith(f"from {(ckpts / 'zeroshot' / 'adapter').resolve()}")
    _, table = client.predict(upload, 5, api_name="/classify")
    _same(table, _direct(zeroshot, ckpts / "upload.png", 5))
    assert table != _direct(lora, ckpts / "upload.png", 5)  # the adapter matters
    # a folder that does not load: one line, and the session keeps the checkpoint it had
    missing = ckpts / "none"
    assert _error(client, "/load_fewshot", str(missing)) == \
        f"{missing} holds no few-shot CLIP checkpoint (fewshot_config.json in it, in best/ or in adapter/)"
    _, again = client.predict(upload, 5, api_name="/classify")
    assert again == table
    # another session starts from --fewshot-checkpoint, not from this one's choice
    _, other = _client(served).predict(upload, 2, api_name="/classify")
    _same(other, want)
    # loading a folder again does not reload it (the cache holds it once, the same object)
    cached = dict(fs._MODELS)
    assert client.predict(lora + "/", api_name="/load_fewshot").startswith("backbone: open_clip")
    assert client.predict(str(ckpts / "lora" / "adapter"), api_name="/load_fewshot").endswith(
        f"from {(ckpts / 'lora' / 'adapter').resolve()}")
    assert fs._MODELS.keys() == cached.keys() and all(fs._MODELS[k] is v for k, v in cached.items())
    assert len({k[0] for k in fs._MODELS}) == len(fs._MODELS)  # one model per folder


def test_bad_input_ends_in_one_line(ckpts, tmp_path):
    from gradio_client import handle_file

    fs = _fewshot()
    broken = tmp_path / "broken"
    shutil.copytree(ckpts / "lora" / "adapter", broken)
    (broken / "clip" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    garbled = tmp_path / "garbled"
    shutil.copytree(ckpts / "zeroshot" / "adapter", garbled)
    (garbled / "fewshot_config.json").write_text("{")
    demo = fs.build()  # the tab alone, nothing pre-loaded
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client, upload = _client(demo), handle_file(str(ckpts / "upload.png"))
        assert _error(client, "/classify", upload, 5) == \
            "no checkpoint loaded: enter a few-shot checkpoint folder (an output_dir of `visionpeft train` with " \
            "task: fewshot_clip, or its adapter/) and press Load"
        assert _error(client, "/load_fewshot", "  ").startswith("enter a few-shot checkpoint folder: ")
        assert _error(client, "/load_fewshot", str(tmp_path)).startswith(f"{tmp_path} holds no few-shot CLIP")
        assert _error(client, "/load_fewshot", str(broken)).startswith(  # load_classifier's own line
            f"checkpoint {broken.resolve()}: cannot load its adapter into backbone ")
        assert _error(client, "/load_fewshot", str(garbled)).startswith(
            f"cannot load the few-shot checkpoint {garbled.resolve()}: its config is not JSON: ")
        assert _error(client, "/classify", upload, 5).startswith("no checkpoint loaded")  # still none
        assert client.predict(str(ckpts / "lora"), api_name="/load_fewshot").startswith("backbone: ")
        assert _error(client, "/classify", handle_file(str(ckpts / "notes.png")), 5).startswith(
            "cannot read notes.png as an image")
        assert _error(client, "/classify", upload, 0) == "Value 0 is less than minimum value 1."  # the slider's
        assert len(client.predict(upload, 1, api_name="/classify")[1]) == 1
    finally:
        demo.close()
    with pytest.raises(SystemExit) as stop:  # the standalone demo's command line: one line, exit 2
        fs.main(["--checkpoint", str(garbled)])
    assert stop.value.code == 2


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_the_few_shot_tab_in_a_headless_browser(ckpts, served, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(served.local_url)
        page.get_by_role("tab", name="Few-shot").click()
        panel = page.get_by_role("tabpanel")
        folder = panel.get_by_label("few-shot checkpoint folder")
        folder.wait_for(state="visible", timeout=30000)
        assert folder.input_value() == str(ckpts / "lora")
        assert panel.get_by_label("loaded").input_value().startswith("backbone: open_clip")
        panel.locator("input[type=file][accept='image/*']").set_input_files(str(ckpts / "upload.png"))
        panel.get_by_role("button", name="Classify").click()
        want = _direct(str(ckpts / "lora"), ckpts / "upload.png", 5)

        def block(label, text):  # the text of the block labelled `label`, once it holds `text`
            return page.wait_for_function(
                "([label, text]) => { const l = [...document.querySelectorAll('[data-testid=block-label]')]"
                ".find(e => e.innerText.trim() === label); const b = l && l.closest('.block');"
                "return b && b.innerText.includes(text) && b.innerText }", arg=[label, text],
                timeout=60000).json_value()

        shown = block("top classes", want[-1][0])  # the gr.Label: every class, most probable first
        listed = block("top classes as [class, probability]", want[-1][0])
        page.screenshot(path=str(tmp_path / "fewshot.png"), full_page=True)
        browser.close()
    names = [n for n, _ in want]
    assert sorted(names, key=shown.index) == names and sorted(names, key=listed.index) == names
    assert shown.splitlines()[1].strip() == names[0]  # the heading under the block label: the top class
    assert (tmp_path / "fewshot.png").stat().st_size > 10_000
