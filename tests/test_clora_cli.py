"""Adapters into a pipeline from every layout users have (`load_pipeline_adapter`), and
`visionpeft compose`: its files, and bad input refused in one line with nothing written."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import visionpeft as vp
from visionpeft.backbones.tiny import save_tiny_sd_pipeline
from visionpeft.cli import main
from visionpeft.pipelines.clora import load_pipeline_adapter

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny SD folder and one trained-looking adapter (UNet + text encoder) written in
    each layout: ours per component, a diffusers file, a kohya file."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("clora_cli")
    folder = save_tiny_sd_pipeline(root / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    vp.inject(pipe.unet, vp.LoRAConfig(r=4, target_modules=ATTN), name="dog")
    vp.inject(pipe.text_encoder, vp.LoRAConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
              name="dog")
    g = torch.Generator().manual_seed(0)
    for model in (pipe.unet, pipe.text_encoder):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".adapters." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = root / "dreambooth_out" / "adapter"
    for comp in ("unet", "text_encoder"):
        vp.save_adapter(getattr(pipe, comp), ours / comp, name="dog")
        vp.export(getattr(pipe, comp), root / "peft" / comp, name="dog", format="peft")  # a folder per component
    files = {}
    for fmt, te_prefix, unet_prefix in (("diffusers", "text_encoder", "unet"), ("kohya", "lora_te", "lora_unet")):
        parts = {}
        for comp, prefix in (("unet", unet_prefix), ("text_encoder", te_prefix)):
            piece = root / f"{fmt}_{comp}.safetensors"
            vp.export(getattr(pipe, comp), piece, name="dog", format=fmt, prefix=prefix)
            parts.update(load_file(str(piece)))
        files[fmt] = root / f"{fmt}.safetensors"
        save_file(parts, str(files[fmt]))
    x = torch.randn(1, 4, 16, 16, generator=g)
    ids = pipe.tokenizer("a sks dog", return_tensors="pt").input_ids
    with torch.no_grad():
        want = (pipe.unet(x, 10, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample)
    files["peft"] = root / "peft"
    return {"folder": folder, "root": root, "ours": ours.parent, "files": files, "x": x, "ids": ids, "want": want}


def _fresh(made):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(made["folder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _output(pipe, made):
    with torch.no_grad():
        return pipe.unet(made["x"], 10, encoder_hidden_states=pipe.text_encoder(made["ids"])[0]).sample


@pytest.mark.parametrize("layout", ["ours", "diffusers", "kohya", "peft"])
def test_every_layout_loads_into_unet_and_text_encoder(made, layout):
    pipe = _fresh(made)
    path = made["ours"] if layout == "ours" else made["files"][layout]
    assert load_pipeline_adapter(pipe, path, "dog") == ["unet", "text_encoder"]
    torch.testing.assert_close(_output(pipe, made), made["want"], atol=1e-5, rtol=1e-5)


def test_a_lycoris_lokr_file_loads_as_a_krona_concept(made, tmp_path):
    from diffusers import StableDiffusionPipeline

    src = StableDiffusionPipeline.from_pretrained(made["folder"])
    vp.inject(src.unet, vp.KronAConfig(a1=4, a2=4, target_modules=ATTN), name="cat")
    with torch.no_grad():
        for n, p in src.unet.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.1)
    vp.export(src.unet, tmp_path / "cat.safetensors", name="cat", format="lycoris")
    pipe = _fresh(made)
    assert load_pipeline_adapter(pipe, tmp_path / "cat.safetensors", "cat") == ["unet"]
    torch.testing.assert_close(_output(pipe, made), _output(src, made), atol=1e-5, rtol=1e-5)


def test_an_sdxl_file_reaches_both_text_encoders(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = save_tiny_sd_pipeline(tmp_path / "xl", xl=True)
    src = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {}
    for comp, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te1"), ("text_encoder_2", "lora_te2")):
        model = getattr(src, comp)
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=ATTN if comp == "unet" else ["q_proj", "v_proj"]),
                  name="dog")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".adapters." in n:
                    p.normal_(0, 0.1)
        vp.export(model, tmp_path / f"{comp}.safetensors", name="dog", format="kohya", prefix=prefix)
        parts.update(load_file(str(tmp_path / f"{comp}.safetensors")))
    save_file(parts, str(tmp_path / "dog.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert load_pipeline_adapter(pipe, tmp_path / "dog.safetensors", "dog") == ["unet", "text_encoder",
                                                                               "text_encoder_2"]
    ids = pipe.tokenizer("a sks dog", return_tensors="pt").input_ids
    with torch.no_grad():
        for comp in ("text_encoder", "text_encoder_2"):
            torch.testing.assert_close(getattr(pipe, comp)(ids)[0], getattr(src, comp)(ids)[0])
        with vp.disabled(pipe.text_encoder_2):
            assert (pipe.text_encoder_2(ids)[0] - src.text_encoder_2(ids)[0]).abs().max() > 1e-4


def test_a_file_that_is_not_safetensors_is_one_line(made, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a file of tensors")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_pipeline_adapter(_fresh(made), tmp_path / "x.safetensors", "dog")


def test_an_adapter_for_another_model_is_refused_and_nothing_stays(made, tmp_path):
    pipe = _fresh(made)
    good = load_file(str(made["files"]["diffusers"]))
    # the text-encoder half fits, the UNet half was made for a wider model
    bad = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.startswith("unet.") and "lora_A" in k else v)
           for k, v in good.items()}
    save_file(bad, str(tmp_path / "other.safetensors"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter 'dog' \(unet\): .*the file gives dW"):
        load_pipeline_adapter(pipe, tmp_path / "other.safetensors", "dog")
    assert vp.adapter_names(pipe.unet) == [] and vp.adapter_names(pipe.text_encoder) == []
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    # the UNet half fits, the text encoder's is for another encoder: the UNet's is taken out again
    bad = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.startswith("text_encoder.") and "lora_A" in k else v)
           for k, v in good.items()}
    save_file(bad, str(tmp_path / "other_te.safetensors"))
    with pytest.raises(ValueError, match=r"adapter 'dog' \(text_encoder\)"):
        load_pipeline_adapter(pipe, tmp_path / "other_te.safetensors", "dog")
    assert vp.adapter_names(pipe.unet) == [] and vp.adapter_names(pipe.text_encoder) == []
    assert set(pipe.unet.state_dict()) == set(before)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline_adapter(pipe, tmp_path / "nope", "dog")


ARGS = ["--prompt", "a dog and a cat", "--concept", "dog:a sks dog and a cat:sks dog",
        "--steps", "3", "--refine-rounds", "1", "--update-until", "2"]


def test_compose_writes_image_masks_and_settings(made, tmp_path):
    out = tmp_path / "o" / "img.png"
    code = main(["compose", "--pipeline", str(made["folder"]), "--adapter", f"dog={made['files']['kohya']}",
                 *ARGS, "--scale", "dog=0.5", "-o", str(out)])
    assert code == 0
    from PIL import Image

    assert Image.open(out).size == (32, 32)
    masks = Image.open(tmp_path / "o" / "img.masks.png")
    assert masks.size[0] >= 32 and masks.size[1] > 32  # the masks at the image's size, a legend below
    report = json.loads((tmp_path / "o" / "img.json").read_text())
    # one concept has nothing to contrast with: no latent update, one pass a step
    assert report["unet_calls"] == 3 and report["losses"] == [0.0, 0.0, 0.0]
    assert report["branches"][1]["adapters"] == ["dog"] and report["settings"]["batched"] is True
    # a folder other than embedded-sd: plain guidance 7.5 unless told
    assert report["settings"]["guidance_scale"] == 7.5 and report["settings"]["guidance_rescale"] == 0.0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img.json", "img.masks.png", "img.png"]


@pytest.mark.parametrize("extra,message", [
    (["--concept", "bird:a bird:bird"], r"the concepts name adapters \['bird'\] that no --adapter NAME=PATH loads"),
    (["--concept", "dog-a sks dog"], r"give ADAPTER:PROMPT:WORDS"),
    (["--scale", "dog=big"], r"give NAME=NUMBER"),
    (["--guidance-rescale", "1.5"], r"--guidance-rescale 1.5: give 0 \(off\) to 1"),
])
def test_bad_arguments_end_in_one_line_before_loading(made, tmp_path, capsys, extra, message):
    out = tmp_path / "img.png"
    code = main(["compose", "--pipeline", str(made["folder"]), "--adapter", f"dog={made['ours']}", *ARGS, *extra,
                 "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("visionpeft compose: ")
    import re

    assert re.search(message, err), err
    assert not tmp_path.joinpath("img.png").exists() and list(tmp_path.iterdir()) == []


def test_words_not_in_the_prompt_and_a_bad_pipeline_end_in_one_line(made, tmp_path, capsys):
    code = main(["compose", "--pipeline", str(made["folder"]), "--adapter", f"dog={made['ours']}",
                 "--prompt", "a dog and a cat", "--concept", "dog:a sks dog and a cat:sks bird", "-o",
                 str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert code == 2 and "the word 'sks bird' is not in its prompt" in err and "whose tokens are 1:a 2:s" in err
    code = main(["compose", "--pipeline", str(tmp_path), "--adapter", f"dog={made['ours']}", *ARGS,
                 "-o", str(tmp_path / "b.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not a diffusers pipeline folder (no model_index.json)" in err
    assert list(tmp_path.iterdir()) == []
