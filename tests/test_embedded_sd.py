"""The embedded text-to-image model (`embedded-sd`): the shipped folder loads through
diffusers' own from_pretrained and generates; DreamBooth and composition run on it by
name; its tokenizer, its name resolution and its pretraining tasks (tiny seeded runs)."""
import json

import pytest
import torch
from safetensors import safe_open

import visionpeft as vp
from visionpeft.backbones import embedded_sd
from visionpeft.backbones.embedded_sd import byte_level_tokenizer, embedded_sd_path, resolve
from visionpeft.data.captions import caption_set
from visionpeft.data.scenes import PRETRAIN_SCENES, write_scene_images


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(embedded_sd_path())
    p.set_progress_bar_config(disable=True)
    return p


def test_the_shipped_folder_is_a_stable_diffusion_checkpoint_within_20_mb(pipe):
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    files = sorted(embedded_sd_path().rglob("*.safetensors"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 20 * 2 ** 20
    for f in files:
        with safe_open(str(f), "pt") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} <= {"F32", "I64"}, f
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and pipe.tokenizer.model_max_length == 96
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.steps_offset == 1
    channels = embedded_sd.LATENT_CHANNELS  # the builders' default is what ships
    assert pipe.vae.config.latent_channels == channels == pipe.unet.config.in_channels == pipe.unet.config.out_channels
    # the trained VAE's latents were whitened per channel (an untrained VAE keeps diffusers' default 0.18215),
    # and the UNet was trained for v-prediction on a zero-terminal-SNR schedule, which the scheduler keeps
    assert pipe.vae.config.scaling_factor == 1.0
    sched = pipe.scheduler.config
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr
    assert sched.timestep_spacing == "trailing"
    index = json.loads((embedded_sd_path() / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]


def test_it_generates_64_px_images_from_a_caption(pipe):
    g = torch.Generator().manual_seed(0)
    out = pipe("a satellite image of farmland", num_inference_steps=2, generator=g, output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1
    again = pipe("a satellite image of farmland", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    torch.testing.assert_close(out, again)  # seeded: the same image


def test_the_byte_level_tokenizer_is_one_token_per_character_and_fits_every_caption():
    tok = byte_level_tokenizer()
    vocab = embedded_sd.byte_level_vocab()
    ids = tok("ab c").input_ids
    assert ids == [vocab["<|startoftext|>"], vocab["a"], vocab["b</w>"], vocab["c</w>"], vocab["<|endoftext|>"]]
    _, captions, _ = caption_set(300, 16, PRETRAIN_SCENES, seed=3, style="sd")
    lengths = [len(tok(c).input_ids) for c in captions]
    assert max(lengths) <= tok.model_max_length == 96
    assert all(c.startswith("a satellite image of ") for c in captions)


def test_the_name_resolves_to_the_packaged_folder_and_a_missing_one_says_how_to_make_it(tmp_path, monkeypatch):
    assert resolve("embedded-sd") == str(embedded_sd.FOLDER) and resolve("some/hub-id") == "some/hub-id"
    assert resolve(tmp_path) == tmp_path
    import transformers

    with monkeypatch.context() as m:  # its text encoder is in transformers 5's key layout
        m.setattr(transformers, "__version__", "4.57.0")
        with pytest.raises(ValueError, match=r"needs transformers >= 5 \(installed: 4.57.0\)"):
            embedded_sd_path()
    monkeypatch.setattr(embedded_sd, "FOLDER", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="scripts/pretrain_embedded_sd.py") as err:
        resolve("embedded-sd")
    assert len(str(err.value).splitlines()) == 1


def test_the_packaged_model_is_known_by_name_or_path_and_gets_its_guidance(tmp_path):
    """embedded-sd (the name or its folder, however written) is sampled at its evaluated
    guidance; any other model at diffusers' 7.5 and 0."""
    ours = {"guidance_scale": embedded_sd.SAMPLING["guidance_scale"],
            "guidance_rescale": embedded_sd.SAMPLING["guidance_rescale"]}
    for name in ("embedded-sd", " embedded-sd ", embedded_sd.FOLDER, str(embedded_sd.FOLDER / ".." / "embedded-sd")):
        assert embedded_sd.is_embedded(name) and embedded_sd.guidance_defaults(name) == ours, name
    for other in ("runwayml/stable-diffusion-v1-5", tmp_path, "", None):
        assert not embedded_sd.is_embedded(other)
        assert embedded_sd.guidance_defaults(other) == {"guidance_scale": 7.5, "guidance_rescale": 0.0}
    assert ours != embedded_sd.guidance_defaults(tmp_path)  # the test would mean nothing otherwise


def test_dreambooth_and_compose_run_on_it_by_name(tmp_path):
    """Two 2-step DreamBooth runs (two held-out types) on `pretrained_model: embedded-sd` at
    its own 64 px, then both adapters composed with CLoRA through `visionpeft compose`."""
    from PIL import Image

    from visionpeft.cli import main
    from visionpeft.train import run_config

    outs = {}
    for scene in ("desert", "lake"):
        write_scene_images(tmp_path / scene, scene, 2, seed=1)
        result = run_config({"task": "dreambooth", "pretrained_model": "embedded-sd",
                             "instance_data_dir": str(tmp_path / scene), "instance_prompt": "a satellite image of sks",
                             "adapter": {"method": "lora", "r": 2, "target_modules": ["to_q", "to_k", "to_v"]},
                             "max_train_steps": 2, "learning_rate": 1e-3, "output_dir": str(tmp_path / f"db-{scene}"),
                             "cpu": True, "seed": 0})
        assert result.step == 2 and result.losses and all(map(lambda v: v == v, result.losses))
        outs[scene] = tmp_path / f"db-{scene}"
        assert vp.read_adapter_config(outs[scene] / "adapter" / "unet")["method"] == "lora"
    image = tmp_path / "both.png"
    code = main(["compose", "--pipeline", "embedded-sd", "--adapter", f"desert={outs['desert']}",
                 "--adapter", f"lake={outs['lake']}", "--prompt", "a satellite image of sks and sks",
                 "--concept", "desert:a satellite image of sks:sks", "--concept", "lake:a satellite image of sks:sks",
                 "--steps", "2", "--refine-rounds", "1", "--update-until", "1", "-o", str(image)])
    assert code == 0 and Image.open(image).size == (64, 64)


def test_the_pretraining_script_is_seeded_and_writes_a_loadable_folder(tmp_path):
    """A tiny run of every stage twice: the same weights byte for byte, a folder diffusers
    loads, and nothing in the package touched."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_embedded_sd.py"
    spec = importlib.util.spec_from_file_location("pretrain_embedded_sd", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = {p: p.stat().st_mtime_ns for p in embedded_sd.FOLDER.rglob("*")}
    tiny = ["--vae-steps", "2", "--vae64-steps", "1", "--vae-decoder-steps", "2", "--vae-batch", "4",
            "--unet-steps", "2", "--unet-batch", "4", "--pool", "24", "--eval-n", "1", "--recon-n", "8", "--docs", ""]
    variant = ["--latent-channels", "3", "--whiten-latents", "--prediction-type", "v_prediction",
               "--zero-terminal-snr"]

    def main(run, stages, flags):
        return module.main([*tiny, *flags, "--output-dir", str(tmp_path / run), "--target", str(tmp_path / f"sd-{run}"),
                            "--stages", *stages])

    # twice the same variant run; b assembles in a call of its own, without the variant's flags
    a = main("a", ["vae", "decoder", "unet", "assemble", "eval"], variant)
    main("b", ["vae", "decoder", "unet"], variant)
    summary = main("b", ["assemble"], [])
    assert a["files"]["sha256"] == summary["files"]["sha256"] and len(summary["files"]["sha256"]) == 3
    assert set(a["eval"]["seen"]) == set(PRETRAIN_SCENES) and "eval" not in summary
    stats = summary["vae"]["latents"]  # recorded by the vae stage, folded in for the unet stage and assemble
    assert summary["unet"]["whitened_with"] == {k: stats[k] for k in ("channel_mean", "channel_std")}
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd-b")
    shipped = loaded.vae
    assert shipped.config.scaling_factor == 1.0
    # --latent-channels reaches the VAE and, through its config, the UNet's input and output
    assert shipped.config.latent_channels == 3 == loaded.unet.config.in_channels == loaded.unet.config.out_channels
    # the scheduler that ships is the one the UNet trained on, not the assembling call's flags
    assert loaded.scheduler.config.prediction_type == "v_prediction" and loaded.scheduler.config.rescale_betas_zero_snr
    # the decoder stage (what ships) trained the decoder alone: the encoder, so the latents the
    # UNet learnt, are the vae stage's bit for bit; whitened after it, the shipped VAE encodes
    # the unet stage's latents and reconstructs as the decoder stage's VAE does
    from diffusers import AutoencoderKL

    encoder_stage = AutoencoderKL.from_pretrained(tmp_path / "b" / "vae64" / "adapter" / "vae").state_dict()
    final = shipped.state_dict()
    assert all(torch.equal(final[k], v) for k, v in encoder_stage.items() if k.startswith("encoder."))
    assert not all(torch.equal(final[k], v) for k, v in encoder_stage.items() if k.startswith("decoder."))
    unet_vae = AutoencoderKL.from_pretrained(tmp_path / "b" / "unet-vae").state_dict()
    assert all(torch.equal(final[k], unet_vae[k]) for k in final if k.startswith(("encoder.", "quant_conv.")))
    decoder_stage = AutoencoderKL.from_pretrained(tmp_path / "b" / "vaedec" / "adapter" / "vae")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = shipped.encode(x).latent_dist
        z_raw = decoder_stage.encode(x).latent_dist
        m, s = (torch.tensor(stats[k]).view(1, -1, 1, 1) for k in ("channel_mean", "channel_std"))
        torch.testing.assert_close(z.mean, (z_raw.mean - m) / s, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(shipped.decode(z.mean).sample, decoder_stage.decode(z_raw.mean).sample,
                                   atol=1e-5, rtol=1e-4)
    # v3's recipe (4 channels, scaled not whitened, SD's epsilon schedule), all three defaults turned off
    plain = main("c", ["vae", "unet", "assemble"], ["--no-whiten-latents", "--prediction-type", "epsilon",
                                                    "--no-zero-terminal-snr"])
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd-c")
    assert loaded.vae.config.scaling_factor == plain["vae"]["latents"]["scaling_factor"] != 1.0
    assert plain["unet"]["whitened_with"] is None and not (tmp_path / "c" / "unet-vae").exists()
    assert loaded.vae.config.latent_channels == embedded_sd.LATENT_CHANNELS == loaded.unet.config.in_channels
    assert loaded.scheduler.config.prediction_type == "epsilon" and not loaded.scheduler.config.rescale_betas_zero_snr
    with pytest.raises(SystemExit):  # argparse's one line, before any stage runs (zero SNR is on by default)
        main("d", ["vae"], ["--prediction-type", "epsilon"])
    assert not (tmp_path / "d").exists()
    assert before == {p: p.stat().st_mtime_ns for p in embedded_sd.FOLDER.rglob("*")}


def test_the_decoder_stage_refuses_what_would_not_fit(tmp_path):
    """train_part is checked, a decoder-only run needs the VAE it goes on from, and the
    script will not ship an unfinished decoder stage's folder."""
    import importlib.util
    from pathlib import Path

    from visionpeft.train.pretrain_sd import SDVaeConfig

    with pytest.raises(ValueError, match="train_part must be 'all' or 'decoder'"):
        SDVaeConfig(train_part="encoder")
    with pytest.raises(ValueError, match="needs init_from"):
        SDVaeConfig(train_part="decoder")
    with pytest.raises(ValueError, match="latent_channels must be an integer in"):
        SDVaeConfig(latent_channels=0)
    script = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_embedded_sd.py"
    spec = importlib.util.spec_from_file_location("pretrain_embedded_sd", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for stage in (module.stage_decoder, module.stage_unet):  # a stage that needs the vae stage's folder
        with pytest.raises(SystemExit, match="holds no finished vae stage"):
            stage(None, tmp_path, {}, {}) if stage is module.stage_unet else stage(None, tmp_path, {})
    with pytest.raises(SystemExit, match="holds no finished vae stage"):
        module.assemble(tmp_path, tmp_path / "target")
    assert not (tmp_path / "target").exists()
    assert module.final_vae(tmp_path) == tmp_path / "vae64" / "adapter" / "vae"  # no decoder stage
    (tmp_path / "vaedec" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(SystemExit, match="unfinished decoder stage"):
        module.final_vae(tmp_path)


def test_the_wheel_ships_every_file_of_the_folder():
    """pyproject's package-data globs (setuptools': ``*`` stays within one folder) cover each
    file of the nested folder, so an installed package has the model too."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "visionpeft.backbones"]
    package = root / "visionpeft" / "backbones"
    files = [f.relative_to(package).as_posix() for f in embedded_sd_path().rglob("*") if f.is_file()]
    assert len(files) >= 9  # model_index.json and each part's config and weights
    patterns = [re.compile("".join("[^/]*" if c == "*" else re.escape(c) for c in g) + "$") for g in globs]
    for rel in files:
        assert any(p.match(rel) for p in patterns), rel


def test_the_denoiser_task_resumes_exactly_with_its_moving_average(tmp_path):
    """pretrain_sd_unet for 4 steps against 2 steps then a resume to 4: the same weights and
    the same moving average byte for byte; a checkpoint without ema/ is refused."""
    import shutil

    from safetensors.torch import load_file

    from visionpeft.train import run_config
    from visionpeft.train.pretrain_sd import SDUnetTask

    vae = tmp_path / "vae"
    embedded_sd.build_vae().save_pretrained(vae)
    base = {"task": "pretrain_sd_unet", "vae": str(vae), "pool_size": 12, "pool_cache": str(tmp_path / "pool"),
            "train_batch_size": 4, "learning_rate": 1e-3, "checkpointing_steps": 2, "cpu": True, "seed": 3}
    run_config({**base, "max_train_steps": 4, "output_dir": str(tmp_path / "whole")})
    run_config({**base, "max_train_steps": 2, "output_dir": str(tmp_path / "cut")})
    run_config({**base, "max_train_steps": 4, "output_dir": str(tmp_path / "cut"), "resume_from_checkpoint": "latest"})
    for part in ("ema/unet.safetensors", "ema/text_encoder.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        a, b = (load_file(str(tmp_path / run / "adapter" / part)) for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    ema = load_file(str(tmp_path / "whole" / "adapter" / "ema" / "unet.safetensors"))
    raw = load_file(str(tmp_path / "whole" / "adapter" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # an average, not a copy
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "whole" / "adapter", broken)
    shutil.rmtree(broken / "ema")
    task = SDUnetTask.__new__(SDUnetTask)
    models = {"unet": embedded_sd.build_unet(), "text_encoder": embedded_sd.build_text_encoder()}
    with pytest.raises(Exception, match="holds no ema/"):
        task.load_adapters(models, broken)


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dreambooth_table_script_runs_scores_and_resumes(tmp_path):
    """--quick: one run of LoRA on a held-out type, its row's parameters those the variant
    injects, the base row shared, the JSON resumed without rerunning; bad input refused."""
    script = _script("dreambooth_table")
    out = tmp_path / "db.json"
    args = ["--quick", "--variants", "lora", "--scene", "lake", "--work", str(tmp_path / "w"), "--output", str(out)]
    first = script.main(args)
    doc = json.loads(out.read_text())
    (row,) = doc["runs"]
    assert (row["variant"], row["scene"], row["seed"]) == ("lora", "lake", 0)
    # LoRA r 4 on to_q/to_k/to_v/to_out.0: the sum over those Linears of 4 x (in + out)
    unet = embedded_sd.build_unet()
    want = sum(4 * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0"))
    assert row["trainable"] == want == script.trainable_params("lora")
    assert sum(row["sks_judged"].values()) == 2 and row["sks"] == row["sks_judged"].get("lake", 0) / 2
    (t,) = doc["table"]
    assert t["sks_before"] == doc["base"]["sks"] and t["sks_after"]["mean"] == row["sks"]
    assert t["step_ms"] > 0 and t["step_peak_mb"] > 0
    assert f"| lora | {want:,} | 1 | {doc['base']['sks']:.2f} -> {row['sks']:.2f} ± 0.00 |" in script.markdown(first)
    assert script.main(args)["runs"] == first["runs"]  # nothing rerun
    with pytest.raises(SystemExit):
        script.main([*args[:-2], "--eval-seed", "8", "--output", str(out)])  # other settings, same file
    with pytest.raises(SystemExit):
        script.main(["--scene", "forest", "--output", str(tmp_path / "x.json")])  # a training type
    with pytest.raises(SystemExit):
        script.main([*args[:-2], "--guidance-rescale", "1.5", "--output", str(tmp_path / "y.json")])
    # every image of the run (class, validation, judged) at the model's evaluated sampling
    values = json.loads((tmp_path / "w" / "lora-lake-sks-0" / "table_run.json").read_text())["values"]
    sampling = embedded_sd.SAMPLING
    assert (values["guidance_scale"], values["guidance_rescale"]) == (sampling["guidance_scale"],
                                                                      sampling["guidance_rescale"]) == (
        doc["settings"]["guidance"], doc["settings"]["guidance_rescale"])


def test_the_composition_table_counts_a_concept_where_the_judge_finds_it():
    """The metric on real generator images, where the answer is known: a half-desert,
    half-lake image has both; a whole desert image only one; quadrants a mask covers."""
    from visionpeft.backbones.scene_judge import load_scene_judge

    script = _script("compose_table")
    judge = load_scene_judge()
    pairs = script.real_pairs(("desert", "lake"), 4, seed=3)
    assert torch.equal(script.quadrants(pairs)[:, 0], pairs[:, :, :32, :32])
    assert torch.equal(script.quadrants(pairs)[:, 3], pairs[:, :, 32:, 32:])
    whole, quads = script.verdicts(judge, pairs)
    assert [q[0] for q in quads] == [q[2] for q in quads] == ["desert"] * 4  # left halves: real desert
    row = script.score(judge, pairs, ("desert", "lake"))
    assert row["found_a"] == 1.0 and row["both"] == row["found_b"] >= 0.5
    assert row["whole"] == {t: whole.count(t) for t in set(whole)}
    desert = script.real_pairs(("desert", "desert"), 4, seed=3)
    assert script.score(judge, desert, ("desert", "lake"))["found_b"] == 0.0
    mask = torch.zeros(16, 16)
    mask[:, :8] = 1  # the left half: quadrants 0 and 2
    assert script.mask_quadrants(mask) == [0, 2]
    corner = torch.zeros(16, 16)
    corner[:3, 12:] = 1  # a corner of the top-right quadrant, under half of it
    assert script.mask_quadrants(corner) == [1]
    # a concept counts in its mask only where the judge finds it there: masks on the
    # right sides keep both, swapped masks lose the desert (every right half is lake)
    right = [torch.stack([mask, 1 - mask])] * 4
    swapped = [torch.stack([1 - mask, mask])] * 4
    kept = script.score(judge, pairs, ("desert", "lake"), right)
    assert kept["in_mask_a"] == 1.0 and kept["both_in_mask"] == kept["in_mask_b"] == row["found_b"]
    lost = script.score(judge, pairs, ("desert", "lake"), swapped)
    lake_left = sum(any(q[k] == "lake" for k in (0, 2)) for q in quads) / 4
    assert lost["in_mask_a"] == sum(any(q[k] == "desert" for k in (1, 3)) for q in quads) / 4 < 1.0
    assert lost["in_mask_b"] == lake_left == 0.0


def test_the_land_cover_judge_is_the_nearest_mean_of_segmented_class_shares():
    """LandCoverJudge with a known segmenter (each pixel's class = the scene generator's own
    label map, looked up by image): its shares are the label maps' class fractions, its
    centroids their means per type over whole images and quadrants, and its verdict the
    L1-nearest centroid, checked by a brute-force loop."""
    import numpy as np

    from visionpeft.data.scenes import CLASSES, SCENE_TYPES, make_scene

    script = _script("compose_table")
    labels = {}  # image bytes -> the generator's class map, so the fake segmenter is exact

    def segment(images):
        out = []
        for x in images:
            hit = labels.get(x.numpy().tobytes())
            out.append(hit if hit is not None else torch.zeros(x.shape[-2:], dtype=torch.long))
        return torch.stack(out)

    rng = np.random.default_rng(5)
    made = {}
    for s in SCENE_TYPES[:3]:
        rgb, cls = make_scene(rng, 64, s)[:2]
        x = torch.from_numpy(rgb).permute(2, 0, 1)
        labels[x.numpy().tobytes()] = torch.from_numpy(np.asarray(cls)).long()
        made[s] = x
    judge = script.LandCoverJudge(segment, torch.rand(len(SCENE_TYPES), len(CLASSES),
                                                      generator=torch.Generator().manual_seed(0)), SCENE_TYPES)
    x = torch.stack(list(made.values()))
    shares = judge.shares(x)
    for i, s in enumerate(made):
        cls = labels[made[s].numpy().tobytes()]
        want = torch.tensor([(cls == k).float().mean().item() for k in range(len(CLASSES))])
        torch.testing.assert_close(shares[i], want)
    verdict = judge.classify(x)
    for i in range(len(x)):  # brute force: the smallest sum of absolute differences
        d = [sum(abs(float(shares[i, k]) - float(judge.centroids[t, k])) for k in range(len(CLASSES)))
             for t in range(len(SCENE_TYPES))]
        assert int(verdict[i]) == int(np.argmin(d))
    # fit, with a segmenter that reads brightness: each centroid is the mean of the shares of
    # that type's n whole images and their 4n quadrants, drawn in order from one generator
    def bright(images):
        return (images.mean(1) * len(CLASSES)).long().clamp(max=len(CLASSES) - 1)

    fitted = script.LandCoverJudge.fit(bright, len(CLASSES), 2, seed=1)
    rng = np.random.default_rng(1)
    for t, s in enumerate(SCENE_TYPES):
        x = torch.stack([torch.from_numpy(make_scene(rng, 64, s)[0]).permute(2, 0, 1) for _ in range(2)])
        parts = [x[i] for i in range(2)] + [q for i in range(2) for q in script.quadrants(x)[i]]
        want = torch.stack([torch.tensor([(bright(p[None])[0] == k).float().mean().item() for k in range(len(CLASSES))])
                            for p in parts]).mean(0)
        torch.testing.assert_close(fitted.centroids[t], want)


def test_the_composition_table_script_runs_every_row_and_reuses_its_adapters(tmp_path):
    """--quick end to end: two DreamBooth runs exported in diffusers' format and loaded by
    diffusers itself for the weighted sums, CLoRA through compose, the real control row;
    a second call reuses the finished runs in --work instead of training again."""
    script = _script("compose_table")
    work, out = tmp_path / "w", tmp_path / "c.json"
    args = ["--quick", "--work", str(work), "--output", str(out)]
    first = script.main(args)
    doc = json.loads(out.read_text())
    assert list(doc["rows"]) == ["base", "only A", "only B", "sum 0.5", "sum 1", "clora", "real"]
    assert set(doc["rows"]["clora"]) >= {"in_mask_a", "in_mask_b", "both_in_mask"}
    assert "in_mask_a" not in doc["rows"]["sum 1"]
    from visionpeft.backbones.scene_judge import load_scene_judge

    real = script.score(load_scene_judge(), script.real_pairs(("lake", "industrial"), 2, 7), ("lake", "industrial"))
    assert doc["rows"]["real"] == real
    runs = sorted(work.glob("lora-*/table_run.json"))
    assert [r.parent.name for r in runs] == ["lora-industrial-zwx-0", "lora-lake-sks-0"]
    assert all((r.parent / "export" / "diffusers" / "pytorch_lora_weights.safetensors").is_file() for r in runs)
    # the same run asked again: the finished one is reused, not trained again
    from types import SimpleNamespace

    stamp, record = runs[1].stat().st_mtime_ns, json.loads(runs[1].read_text())
    quick = SimpleNamespace(instances=2, class_images=2, steps=2, batch=4,
                            guidance=embedded_sd.SAMPLING["guidance_scale"],
                            guidance_rescale=embedded_sd.SAMPLING["guidance_rescale"])
    folder, seconds, losses = script.train_adapter("lora", "lake", 0, quick, work, "a satellite image of sks",
                                                   export=("diffusers",))
    assert folder == runs[1].parent and runs[1].stat().st_mtime_ns == stamp
    assert (seconds, losses) == (record["seconds"], record["losses"]) and len(losses) == 2
    assert first["settings"]["steps"] == 2


def test_whitening_the_latents_keeps_the_reconstructions_and_centres_each_channel():
    """whiten_latents against the plain affine map: the new posterior mean is (z - m) / s
    per channel, its std is the old one / s, and decode(encode(x)) is unchanged."""
    from visionpeft.train.pretrain_sd import SDVaeConfig, whiten_latents

    torch.manual_seed(0)
    vae = embedded_sd.build_vae(latent_channels=3).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        recon = vae.decode(before.mean).sample
    m, s = [0.5, -1.0, 2.0], [2.0, 0.5, 1.5]
    whiten_latents(vae, m, s)
    with torch.no_grad():
        after = vae.encode(x).latent_dist
        recon_after = vae.decode(after.mean).sample
    shift, scale = torch.tensor(m).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1)
    torch.testing.assert_close(after.mean, (before.mean - shift) / scale, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.std, before.std / scale, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(recon_after, recon, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="every channel's std must be positive"):
        whiten_latents(vae, [0.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="has 3 latent channels, got 3 means and 1 stds"):
        whiten_latents(vae, [0.0, 0.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="whiten in the run that trains the encoder"):
        SDVaeConfig(train_part="decoder", init_from="x", whiten_latents=True)


def test_zero_terminal_snr_ends_in_pure_noise_and_trains_a_v_target(tmp_path):
    """With zero_terminal_snr the last training step keeps none of the signal (SD's own betas
    keep sqrt(alpha_bar) = 0.068), DDIM starts sampling there, the v weight is finite at
    SNR 0 (hand-computed Min-SNR values), a run trains, and epsilon with SNR 0 is refused."""
    from visionpeft.train import run_config
    from visionpeft.train.pretrain_sd import SDUnetConfig, min_snr_weights

    plain = embedded_sd.noise_scheduler("ddpm")
    zero = embedded_sd.noise_scheduler("ddpm", "v_prediction", zero_terminal_snr=True)
    assert plain.alphas_cumprod[-1].sqrt() == pytest.approx(0.068, abs=1e-3)
    assert zero.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-9)
    ddim = embedded_sd.noise_scheduler("ddim", "v_prediction", zero_terminal_snr=True)
    ddim.set_timesteps(20)
    assert ddim.timesteps[0] == 999 and ddim.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="needs prediction_type 'v_prediction'"):
        embedded_sd.noise_scheduler("ddim", "epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction_type 'v_prediction'"):
        SDUnetConfig(vae="x", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="prediction_type must be 'epsilon' or 'v_prediction'"):
        SDUnetConfig(vae="x", prediction_type="sample")
    snr = torch.tensor([0.0, 0.5, 3.0, 20.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([1.0, 1 / 1.5, 3 / 4, 5 / 21]))
    torch.testing.assert_close(min_snr_weights(snr[1:], 5.0, "epsilon"), torch.tensor([1.0, 1.0, 5 / 20]))
    vae = tmp_path / "vae"
    embedded_sd.build_vae().save_pretrained(vae)
    run_config({"task": "pretrain_sd_unet", "vae": str(vae), "pool_size": 8, "pool_cache": str(tmp_path / "pool"),
                "train_batch_size": 4, "max_train_steps": 1, "cpu": True, "seed": 0,
                "prediction_type": "v_prediction", "zero_terminal_snr": True, "output_dir": str(tmp_path / "run")})
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < v < float("inf") for v in losses)


def test_the_v_target_is_diffusers_velocity_with_min_snr_weights(tmp_path):
    """One loss of pretrain_sd_unet with v_prediction and a UNet that predicts 0: it must be
    the Min-SNR-weighted mean of the squared velocity that diffusers' get_velocity gives for
    the step's own latents, noise and timesteps (recorded as the task draws them)."""
    from types import SimpleNamespace

    from visionpeft.train.pretrain_sd import SDUnetConfig, SDUnetTask, min_snr_weights

    vae = tmp_path / "vae"
    embedded_sd.build_vae().save_pretrained(vae)
    task = SDUnetTask(SDUnetConfig(vae=str(vae), pool_size=8, pool_cache=str(tmp_path / "pool"),
                                   prediction_type="v_prediction", zero_terminal_snr=True))
    task.setup(torch.device("cpu"), torch.float32)
    seen = {}
    add_noise, get_velocity = task.scheduler.add_noise, task.scheduler.get_velocity

    def record_noise(latents, noise, t):
        seen.update(t=t)
        return add_noise(latents, noise, t)

    def record_velocity(latents, noise, t):
        seen.update(v=get_velocity(latents, noise, t), t_v=t)
        return seen["v"]

    task.scheduler.add_noise, task.scheduler.get_velocity = record_noise, record_velocity
    class Zero(torch.nn.Module):  # predicts 0: the loss is then the weighted mean square of the target
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))  # the task reads its device from a parameter

        def forward(self, x, t, text):
            return SimpleNamespace(sample=torch.zeros_like(x))

    unet = Zero()
    torch.manual_seed(0)
    loss, _ = task.loss({"unet": unet, "text_encoder": task.text_encoder}, torch.arange(4))
    assert torch.equal(seen["t"], seen["t_v"])
    snr = task.scheduler.alphas_cumprod[seen["t"]] / (1 - task.scheduler.alphas_cumprod[seen["t"]])
    expected = (seen["v"].pow(2).mean((1, 2, 3)) * min_snr_weights(snr, 5.0, "v_prediction")).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
