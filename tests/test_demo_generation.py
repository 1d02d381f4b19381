"""demos/generation.py, the hub's Generation tab: plain sampling with adapters and CLoRA
composition on a tiny Stable Diffusion pipeline, through gradio_client and a headless browser."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CHROMIUM, CHROMIUM_FLAGS, randomize_adapters

import visionpeft as vp

pytest.importorskip("gradio")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a dog and a cat"  # the tiny tokenizer keeps 14 characters' tokens
CONCEPTS = "dog:a sks dog and a cat:sks dog\ncat:a dog and a sks cat:sks cat"
CONCEPT_DICTS = [{"adapter": "dog", "prompt": "a sks dog and a cat", "words": ["sks dog"]},
                 {"adapter": "cat", "prompt": "a dog and a sks cat", "words": ["sks cat"]}]
STEPS = 3
# compose's settings as the tests send them (the page's defaults but for the steps)
COMPOSE = dict(guidance=7.5, seed=0, mask_alpha=0.3, step_size=20, update_until=10, refine_rounds=2,
               guidance_rescale=0.0)


def _hub():
    if str(ROOT / "demos") not in sys.path:  # as tests/test_demos_hub.py imports the hub
        sys.path.insert(0, str(ROOT / "demos"))
    import app

    return app


def _gen():
    return _hub().load_demo("generation")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD 1.x pipeline folder and two LoRA adapters: dog (a folder of ours, UNet
    only) and cat (a folder per component: UNet and text encoder, as DreamBooth writes)."""
    from diffusers import StableDiffusionPipeline

    from visionpeft.backbones.tiny import save_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("generation")
    save_tiny_sd_pipeline(root / "sd")
    unet_lora = vp.LoRAConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    pipe = StableDiffusionPipeline.from_pretrained(root / "sd")
    vp.inject(pipe.unet, unet_lora, name="dog")
    randomize_adapters(pipe.unet, seed=1)
    vp.save_adapter(pipe.unet, root / "dog", name="dog")
    pipe = StableDiffusionPipeline.from_pretrained(root / "sd")
    vp.inject(pipe.unet, unet_lora, name="cat")
    vp.inject(pipe.text_encoder, vp.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), name="cat")
    randomize_adapters(pipe.unet, seed=2)
    randomize_adapters(pipe.text_encoder, seed=3)
    vp.save_adapter(pipe.unet, root / "cat" / "unet", name="cat")
    vp.save_adapter(pipe.text_encoder, root / "cat" / "text_encoder", name="cat")
    return root


def _adapters(sd):
    return f"dog={sd / 'dog'}\ncat={sd / 'cat'}"


@pytest.fixture(scope="module")
def direct(sd):
    """The same pipeline and adapters loaded apart from the demo, to call directly."""
    from diffusers import DiffusionPipeline

    from visionpeft.pipelines.clora import load_pipeline_adapter

    pipe = DiffusionPipeline.from_pretrained(sd / "sd")
    assert load_pipeline_adapter(pipe, sd / "dog", "dog") == ["unet"]
    assert load_pipeline_adapter(pipe, sd / "cat", "cat") == ["unet", "text_encoder"]
    pipe.set_progress_bar_config(disable=True)
    if torch.cuda.is_available():  # where the demo puts its pipeline
        pipe.to("cuda")
    return pipe


def _set(pipe, scales, active=None):
    for comp in (pipe.unet, pipe.text_encoder):
        for name, scale in scales.items():
            if name in vp.adapter_names(comp):
                vp.set_scale(comp, name, scale)
        if active is not None:
            vp.set_active(comp, [n for n in active if n in vp.adapter_names(comp)])


def _plain(pipe, seed, scales, active, rescale=0.0):
    """The pipeline's own image; ``rescale``: by default the page's for a folder other than
    embedded-sd (diffusers' 0)."""
    _set(pipe, scales, active)
    return np.asarray(pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, guidance_rescale=rescale,
                           generator=torch.Generator().manual_seed(seed)).images[0])


def _composed(pipe, scales=None, mask_alpha=COMPOSE["mask_alpha"]):
    from visionpeft.pipelines.clora import compose

    _set(pipe, scales or {"dog": 1.0, "cat": 1.0})
    c = COMPOSE
    return compose(pipe, PROMPT, concepts=CONCEPT_DICTS, style=None, num_inference_steps=STEPS,
                   guidance_scale=c["guidance"], step_size=c["step_size"], update_until=c["update_until"],
                   refine_at=(0, 10, 20), refine_rounds=c["refine_rounds"], mask_alpha=mask_alpha,
                   guidance_rescale=c["guidance_rescale"],
                   attn_res=None, batched=True, generator=torch.Generator().manual_seed(c["seed"]))


def _rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def served(sd):
    """The whole hub, its Generation tab defaulting to the tiny pipeline."""
    app = _hub().build_app(sd_pipeline=str(sd / "sd"))
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.local_url, verbose=False)


def test_the_tab_is_one_entry_with_named_endpoints(served, client, sd):
    hub = _hub()
    assert [t.label for t in hub.TABS][-1] == "Generation"
    assert [o.flag for o in hub.TABS[-1].options] == ["--sd-pipeline"]
    names = [d.get("api_name") for d in served.config["dependencies"]]
    assert {"generate", "compose", "load_pipeline"} <= set(names) and names.count("compose") == 1
    params = {k: [p["parameter_name"] for p in v["parameters"]]
              for k, v in client.view_api(print_info=False, return_format="dict")["named_endpoints"].items()}
    assert params["/generate"] == ["folder", "adapters", "prompt", "steps", "guidance", "seed", "use_1", "use_2",
                                   "use_3", "use_4", "scale_1", "scale_2", "scale_3", "scale_4", "guidance_rescale"]
    assert params["/compose"] == ["folder", "adapters", "prompt", "concepts", "style", "steps", "guidance", "seed",
                                  "mask_alpha", "step_size", "update_until", "refine_rounds", "scale_1", "scale_2",
                                  "scale_3", "scale_4", "guidance_rescale"]
    values = [c["props"].get("value") for c in served.config["components"] if c["type"] == "textbox"]
    assert str(sd / "sd") in values  # --sd-pipeline is the tab's default folder
    text = client.predict(str(sd / "sd"), _adapters(sd), api_name="/load_pipeline")
    assert text == f"StableDiffusionPipeline from {sd / 'sd'}; adapters: dog (unet); cat (unet, text_encoder)"


def test_generate_answers_as_the_pipeline_does(sd, client, direct):
    image, text = client.predict(folder=str(sd / "sd"), adapters=_adapters(sd), prompt=PROMPT, steps=STEPS,
                                 guidance=7.5, seed=3, use_1=True, use_2=True, scale_1=0.5, scale_2=1.5,
                                 guidance_rescale=0.0, api_name="/generate")
    want = _plain(direct, 3, {"dog": 0.5, "cat": 1.5}, ["dog", "cat"], rescale=0.0)
    assert want.shape == (32, 32, 3)
    np.testing.assert_array_equal(_rgb(image), want)
    assert text == f"adapters on: dog x0.5, cat x1.5; {STEPS} steps, guidance 7.5, seed 3"
    # diffusers' guidance_rescale reaches the pipeline's call and the settings line
    image, text = client.predict(folder=str(sd / "sd"), adapters=_adapters(sd), prompt=PROMPT, steps=STEPS,
                                 guidance=7.5, seed=3, use_1=True, use_2=True, scale_1=0.5, scale_2=1.5,
                                 guidance_rescale=0.7, api_name="/generate")
    rescaled = _plain(direct, 3, {"dog": 0.5, "cat": 1.5}, ["dog", "cat"], rescale=0.7)
    np.testing.assert_array_equal(_rgb(image), rescaled)
    assert np.abs(rescaled.astype(int) - want).max() > 0
    assert text == f"adapters on: dog x0.5, cat x1.5; {STEPS} steps, guidance 7.5 (rescale 0.7), seed 3"
    # only the ticked adapters run; the text encoder's cat is off with the UNet's
    image, text = client.predict(folder=str(sd / "sd"), adapters=_adapters(sd), prompt=PROMPT, steps=STEPS,
                                 guidance=7.5, seed=3, use_1=False, use_2=True, api_name="/generate")
    np.testing.assert_array_equal(_rgb(image), _plain(direct, 3, {"dog": 1.0, "cat": 1.0}, ["cat"]))
    assert text.startswith("adapters on: cat x1;")


def test_a_scale_changes_the_image_without_reloading(sd, client, direct, monkeypatch):
    import visionpeft.pipelines.clora as clora

    gen = _gen()
    pipe = gen.pipeline(str(sd / "sd"))
    client.predict(str(sd / "sd"), _adapters(sd), api_name="/load_pipeline")
    lora = dict(pipe.unet.named_parameters())
    loads = []
    monkeypatch.setattr(clora, "load_pipeline_adapter", lambda *a, **k: loads.append(a))

    def run(scale):
        image, _ = client.predict(folder=str(sd / "sd"), adapters=_adapters(sd), prompt=PROMPT, steps=STEPS,
                                  guidance=7.5, seed=0, use_1=True, use_2=False, scale_1=scale, api_name="/generate")
        return _rgb(image)

    full, none, again = run(1.0), run(0.0), run(1.0)
    assert np.abs(full.astype(int) - none).max() > 0
    np.testing.assert_array_equal(full, again)
    with vp.disabled(direct.unet), vp.disabled(direct.text_encoder):  # scale 0: the base model's image
        np.testing.assert_array_equal(none, _plain(direct, 0, {}, None))
    assert loads == [] and gen.pipeline(str(sd / "sd")) is pipe
    assert all(p is lora[n] for n, p in pipe.unet.named_parameters())  # the very same adapter tensors
    assert vp.adapter_names(pipe.unet) == ["dog", "cat"]


def test_compose_answers_as_compose_does(sd, client, direct):
    # alpha 0.95: masks that differ on the tiny random pipeline (lower ones cover everything)
    image, masks, losses = client.predict(str(sd / "sd"), _adapters(sd), PROMPT, CONCEPTS, "", STEPS,
                                          COMPOSE["guidance"], COMPOSE["seed"], 0.95, COMPOSE["step_size"],
                                          COMPOSE["update_until"], COMPOSE["refine_rounds"], 0.8, 1.0, 1.0, 1.0,
                                          COMPOSE["guidance_rescale"], api_name="/compose")
    want = _composed(direct, scales={"dog": 0.8, "cat": 1.0}, mask_alpha=0.95)
    np.testing.assert_array_equal(_rgb(image), np.asarray(want.images[0]))
    assert len(want.losses) == STEPS and len(want.refine_losses[0]) == COMPOSE["refine_rounds"]
    assert losses.splitlines()[0] == f"loss per step ({STEPS}): " + ", ".join(f"{x:.4f}" for x in want.losses)
    assert losses.splitlines()[1].startswith("refinement at step 0 (2 rounds): ")
    # the mask picture: 32x32 on top, each latent cell (2x2 px) in its branches' colour; a legend below
    picture = _rgb(masks)
    assert picture.shape[0] > 32 and picture.shape[1] >= 32
    top = picture[:32, :32].astype(int)
    m = want.masks.numpy() > 0.5
    assert m.shape == (3, 16, 16)
    np.testing.assert_array_equal(top, np.repeat(np.repeat(top[::2, ::2], 2, 0), 2, 1))  # nearest neighbour
    from visionpeft.pipelines.clora.pictures import branch_colours  # the picture's own palette

    colours = branch_colours(3)
    cells = top[::2, ::2]
    alone = [m[b] & (m.sum(0) == 1) for b in range(3)]
    for b in range(3):
        assert (cells[alone[b]] == colours[b].astype(int)).all()
    assert (cells[m.sum(0) == 0] == 0).all()
    mixed = m.sum(0) > 1
    assert sum(a.any() for a in alone) >= 2 and mixed.any()  # the picture shows several kinds of cell
    want_mixed = np.rint(np.einsum("bhw,bc->hwc", m.astype(np.float32), colours) / np.maximum(m.sum(0), 1)[..., None])
    assert (cells[mixed] == want_mixed[mixed]).all()
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 3  # the legend's text and swatches


def test_bad_input_ends_in_one_line(sd, client, tmp_path):
    from gradio_client.exceptions import AppError

    def error(endpoint, *args):
        with pytest.raises(AppError) as err:
            client.predict(*args, api_name=endpoint)
        message = str(err.value)
        assert "\n" not in message and "Traceback" not in message, message
        return message

    folder, good = str(sd / "sd"), _adapters(sd)
    gen = _gen()
    before = vp.adapter_names(gen.pipeline(folder).unet)
    assert error("/generate", folder, good + "\ndog", PROMPT) == \
        "adapter line 3 'dog': write NAME=PATH, e.g. dog=output/dreambooth-dog"
    assert vp.adapter_names(gen.pipeline(folder).unet) == before  # nothing loaded or removed
    assert error("/generate", folder, f"dog={sd / 'dog'}\ndog={sd / 'cat'}", PROMPT) == \
        "adapter line 2: the name 'dog' is taken by an earlier line"
    missing = tmp_path / "none"
    assert error("/load_pipeline", folder, f"{good}\nbird={missing}") == f"adapter 'bird': {missing} does not exist"
    assert error("/load_pipeline", str(tmp_path), good).startswith(f"{tmp_path} holds no diffusers pipeline")
    assert error("/generate", str(missing), good, PROMPT).startswith(f"{missing} does not exist")
    assert error("/compose", folder, good, PROMPT, "bird:a sks bird and a cat:sks bird") == \
        "concept line 1 names the adapter 'bird', which is not among the adapters (dog, cat)"
    assert error("/compose", folder, good, PROMPT, "dog a sks dog") == \
        "concept line 1 'dog a sks dog': write ADAPTER:PROMPT:WORDS, e.g. dog:a sks dog and a cat:sks dog"
    assert error("/compose", folder, good, PROMPT, "dog:a sks dog and a cat:sks dgo", "", 1).startswith(
        "concept 'dog': the word 'sks dgo' is not in its prompt 'a sks dog and a cat', whose tokens are ")
    assert error("/compose", folder, good, PROMPT, CONCEPTS, "bird", 1) == \
        "the style adapter 'bird' is not among the adapters (dog, cat)"
    import gradio as gr  # the slider refuses 1.5 before the function runs; called directly, the function does

    with pytest.raises(gr.Error, match=r"guidance rescale=1.5: give 0 \(off\) to 1"):
        gen.generate(folder, good, PROMPT, guidance_rescale=1.5)
    # the sliders start at embedded-sd's evaluated settings for it, at diffusers' defaults elsewhere
    assert gen.page_sampling("embedded-sd") == gen.page_sampling(str(gen.embedded_sd.FOLDER)) == (
        gen.embedded_sd.SAMPLING["guidance_scale"], gen.embedded_sd.SAMPLING["guidance_rescale"])
    assert gen.page_sampling(folder) == (7.5, 0.0)
    assert vp.adapter_names(gen.pipeline(folder).unet) == ["dog", "cat"]


def test_a_missing_sd_pipeline_fails_before_building(sd, tmp_path, monkeypatch, capsys):
    hub = _hub()
    def no_build(**kwargs):
        raise AssertionError("built the Generation tab despite a bad --sd-pipeline")

    monkeypatch.setattr(hub.load_demo("generation"), "build", no_build)
    with pytest.raises(FileNotFoundError, match="holds no diffusers pipeline"):
        hub.build_app(sd_pipeline=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.build_app(sd_pipeline=str(tmp_path / "none"))
    with pytest.raises(SystemExit) as stop:  # the hub's command line: one line, exit 2
        hub.main(["--sd-pipeline", str(tmp_path / "none")], prog="visionpeft demo")
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"visionpeft demo: {tmp_path / 'none'} does not exist (give a diffusers " \
                                      "pipeline folder: Stable Diffusion 1.x/2.x or SDXL)\n"


def test_sdxl_generates_and_composes(tmp_path):
    """An SDXL folder (two text encoders, added conditioning) through the tab's functions."""
    from diffusers import StableDiffusionXLPipeline

    from visionpeft.backbones.tiny import save_tiny_sd_pipeline

    save_tiny_sd_pipeline(tmp_path / "xl", xl=True)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl")
    for seed, name in enumerate(("dog", "cat")):
        vp.inject(pipe.unet, vp.LoRAConfig(r=2, target_modules=["to_k", "to_v"]), name=name)
        randomize_adapters(pipe.unet, seed=seed)
        vp.save_adapter(pipe.unet, tmp_path / name, name=name)
    gen = _gen()
    adapters = f"dog={tmp_path / 'dog'}\ncat={tmp_path / 'cat'}"
    image, text = gen.generate(str(tmp_path / "xl"), adapters, PROMPT, 2, 5.0, 1)
    assert type(gen.pipeline(str(tmp_path / "xl"))).__name__ == "StableDiffusionXLPipeline"
    assert image.size == (32, 32) and text.startswith("adapters on: dog x1, cat x1;")
    image, masks, losses = gen.compose(str(tmp_path / "xl"), adapters, PROMPT, CONCEPTS, "", 2, refine_rounds=0)
    assert image.size == (32, 32) and masks.size[1] > 32 and losses.startswith("loss per step (2): ")
    # lines removed, changed, put back: the pipeline follows them
    xl = gen.pipeline(str(tmp_path / "xl"))
    gen.generate(str(tmp_path / "xl"), "", PROMPT, 1)
    assert vp.adapter_names(xl.unet) == []
    assert gen.load_pipeline(str(tmp_path / "xl"), f"cat={tmp_path / 'cat'}\ndog={tmp_path / 'dog'}").endswith(
        "adapters: cat (unet); dog (unet)")
    assert vp.adapter_names(xl.unet) == ["cat", "dog"]
    gen.load_pipeline(str(tmp_path / "xl"), f"cat={tmp_path / 'dog'}")
    assert vp.adapter_names(xl.unet) == ["cat"] and gen.pipeline(str(tmp_path / "xl")) is xl


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed (.ci/run installs it)")
def test_the_generation_tab_in_a_headless_browser(sd, served, direct, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")

    def shown(page, label):  # the image in the block labelled `label`, as the page shows it
        src = page.wait_for_function(
            "(label) => { const l = [...document.querySelectorAll('[data-testid=block-label]')]"
            ".find(e => e.innerText.trim() === label); const i = l && l.closest('.block')"
            ".querySelector('img'); return i && i.src }", arg=label, timeout=60000).json_value()
        return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.goto(served.local_url)
        page.get_by_role("tab", name="Generation").click()
        folder = page.get_by_label("pipeline folder")
        folder.wait_for(state="visible", timeout=30000)
        assert folder.input_value() == str(sd / "sd")
        page.get_by_label("adapters", exact=False).first.fill(_adapters(sd))
        page.get_by_label("dog scale").first.wait_for(state="attached", timeout=30000)  # a slot per line
        page.get_by_role("tab", name="CLoRA").click()
        page.get_by_label("concepts").fill(CONCEPTS)
        steps = page.get_by_label("number input for compose steps")
        steps.fill(str(STEPS))
        steps.press("Enter")
        page.get_by_role("button", name="Compose").click()
        image, masks = shown(page, "composed image"), shown(page, "concept masks")
        losses = page.get_by_label("contrastive loss").input_value()
        page.screenshot(path=str(tmp_path / "generation.png"), full_page=True)
        # the other tabs' panels are still found alone (test_demos_hub.py's locators)
        page.get_by_role("tab", name="Segmentation").click()
        page.get_by_role("button", name="Segment").wait_for(state="visible", timeout=30000)
        assert page.get_by_role("tabpanel").count() == 1
        browser.close()
    want = _composed(direct)
    np.testing.assert_array_equal(image, np.asarray(want.images[0]))
    assert masks.shape[0] > 32 and losses.startswith(f"loss per step ({STEPS}): ")
    assert (tmp_path / "generation.png").stat().st_size > 10_000
