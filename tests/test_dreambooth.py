"""DreamBooth on a tiny Stable Diffusion pipeline written with save_pretrained and loaded
back through diffusers' from_pretrained: learning, exact resume (in process and after
kill -9), two-process DDP, every shipped config, and one-line CLI errors."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from visionpeft.backbones.tiny import save_tiny_sd_pipeline
from visionpeft.pipelines.dreambooth import DreamBoothConfig, DreamBoothTask
from visionpeft.train import TrainConfig, run_config, train

ROOT = Path(__file__).resolve().parents[1]
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    save_tiny_sd_pipeline(root / "sd")
    save_tiny_sd_pipeline(root / "sdxl", xl=True)
    inst = root / "instance"
    inst.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # non-square, to exercise resize and crop
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(inst / f"{i}.png")
    return root


def _values(tiny, out, **kw):
    base = {"task": "dreambooth", "pretrained_model": str(tiny / "sd"), "instance_data_dir": str(tiny / "instance"),
            "instance_prompt": "a photo of sks dog", "resolution": 32, "max_train_steps": 6,
            "learning_rate": 1e-3, "checkpointing_steps": 3, "output_dir": str(out), "cpu": True,
            "adapter": {"method": "lora", "r": 4, "target_modules": ATTN}}
    return {**base, **kw}


def _weights(out: Path) -> dict:
    return load_file(str(out / "adapter" / "unet" / "adapter_model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _task(values: dict, cls=DreamBoothTask) -> DreamBoothTask:
    """The task of ``values`` (a run_config mapping), not yet set up."""
    loop_keys = set(TrainConfig.__dataclass_fields__)
    return cls(DreamBoothConfig.from_dict({k: v for k, v in values.items() if k not in loop_keys and k != "task"}))


def _v_pipeline(tiny, tmp_path) -> Path:
    """The tiny SD pipeline with a v-prediction scheduler (SD 2.x-style)."""
    import json
    import shutil

    pipe = tmp_path / "sd-v"
    shutil.copytree(tiny / "sd", pipe)
    cfg_file = pipe / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "v_prediction"}))
    return pipe


def _fixed_loss(values: dict, adapter_dir: Path | None) -> float:
    """The loss on all instance images with fixed noise and timesteps (mean of 4 draws)."""
    task = _task(values)
    task.setup(torch.device("cpu"), torch.float32)
    if adapter_dir is not None:
        task.load_adapters(task.models(), adapter_dir)
    batch = {"instance": torch.arange(3), "class": None}
    torch.manual_seed(0)
    with torch.no_grad():
        return sum(float(task.loss(task.models(), batch)[0]) for _ in range(4)) / 4


@pytest.mark.parametrize("method,lr", [("lora", 5e-3), ("krona", 2e-2)])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny, tmp_path, method, lr):
    adapter = {"method": method, "target_modules": ATTN, **({"r": 4} if method == "lora" else {})}
    values = _values(tiny, tmp_path, max_train_steps=15, learning_rate=lr, adapter=adapter,
                     train_batch_size=3, checkpointing_steps=100)
    before = _fixed_loss(values, None)
    run_config(values)
    after = _fixed_loss(values, tmp_path / "adapter")
    assert after < 0.9 * before, (before, after)


def _unet_inputs(unet, batch: int):
    """Seeded latents (8 x 8) and text states for comparing UNets by output."""
    torch.manual_seed(0)
    return (torch.randn(batch, unet.config.in_channels, 8, 8),
            torch.randn(batch, 77, unet.config.cross_attention_dim))


def test_prior_preservation_validation_snr_cache_and_exports(tiny, tmp_path):
    """... and each exported file, read by the tool that reads it, computes what the trained
    UNet (the one in memory at the end of the run) computes. alpha 8 at r 4 (scale 2), so
    that a format that dropped or doubled the scale fails."""
    trained = {}

    class Keeping(DreamBoothTask):
        def finish(self, models, output_dir):
            trained.update(models)
            return super().finish(models, output_dir)

    values = _values(tiny, tmp_path / "out", with_prior_preservation=True, class_data_dir=str(tmp_path / "cls"),
                     class_prompt="a dog", num_class_images=2, validation_prompt="a sks dog",
                     validation_steps=3, num_validation_images=2, validation_inference_steps=2,
                     snr_gamma=5.0, cache_latents=True, export_formats=["diffusers", "kohya", "peft"],
                     learning_rate=1e-2, adapter={"method": "lora", "r": 4, "alpha": 8.0, "target_modules": ATTN})
    loop_cfg, _ = TrainConfig.split({k: v for k, v in values.items() if k != "task"})
    res = train(_task(values, Keeping), loop_cfg)
    assert len(list((tmp_path / "cls").glob("*.png"))) == 2  # generated by the base pipeline
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000003.png", "step-000006.png"]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 6 and "prior_loss" in rows[0]
    assert {k for k in res.report if k.startswith("export_")} == {"export_diffusers", "export_kohya", "export_peft"}
    # one folder per format, each holding one weights file a loader pointed at it finds
    export = out / "export"
    assert sorted(p.relative_to(export).as_posix() for p in export.rglob("*")) == [
        "diffusers", "diffusers/pytorch_lora_weights.safetensors", "kohya", "kohya/default.safetensors",
        "peft", "peft/unet", "peft/unet/adapter_config.json", "peft/unet/adapter_model.safetensors"]
    assert res.report["export_diffusers"] == str(export / "diffusers" / "pytorch_lora_weights.safetensors")
    assert res.report["export_peft"] == str(export / "peft")

    import visionpeft as vp
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel

    def fresh_unet():
        return UNet2DConditionModel.from_pretrained(tiny / "sd", subfolder="unet").eval()

    def pipe_unet(weights):  # what pipe.load_lora_weights puts on the pipeline's UNet
        pipe = StableDiffusionPipeline.from_pretrained(tiny / "sd", safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(weights)
        return pipe.unet.eval()

    by_adapter_call = fresh_unet()
    by_adapter_call.load_lora_adapter(res.report["export_diffusers"], prefix="unet")
    ours = fresh_unet()
    vp.load_adapter(ours, out / "adapter" / "unet")
    loaded = {"diffusers, unet.load_lora_adapter": by_adapter_call,
              "diffusers, pipe.load_lora_weights": pipe_unet(export / "diffusers"),
              "kohya, pipe.load_lora_weights": pipe_unet(str(export / "kohya" / "default.safetensors")),
              "peft, PeftModel": PeftModel.from_pretrained(fresh_unet(), export / "peft" / "unet").eval(),
              "adapter folder, vp.load_adapter": ours}
    unet = trained["unet"].eval()
    lat, hidden = _unet_inputs(unet, 2)
    with torch.no_grad():
        want = unet(lat, 10, hidden).sample
        effect = float((want - fresh_unet()(lat, 10, hidden).sample).abs().max())
        assert effect > 1e-3 * float(want.abs().max()), effect  # the adapter does change the output
        for how, model in loaded.items():
            got = model(lat, 10, hidden).sample
            err = float((got - want).abs().max())
            assert err <= 1e-3 * effect, (how, err, effect)  # a thousandth of the adapter's own effect


def test_resume_after_an_interruption_equals_an_uninterrupted_run(tiny, tmp_path):
    run_config(_values(tiny, tmp_path / "full"))

    class Crashing(DreamBoothTask):
        calls = 0

        def loss(self, models, batch):
            Crashing.calls += 1
            if Crashing.calls == 5:
                raise KeyboardInterrupt
            return super().loss(models, batch)

    values = _values(tiny, tmp_path / "cut")
    loop_cfg, rest = TrainConfig.split({k: v for k, v in values.items() if k != "task"})
    with pytest.raises(KeyboardInterrupt):
        train(Crashing(DreamBoothConfig.from_dict(rest)), loop_cfg)
    run_config({**values, "resume_from_checkpoint": "latest"})
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "visionpeft.cli", *args], env=env, capture_output=True,
                          text=True, cwd=ROOT, **kw)


def _write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_kill_9_mid_run_then_resume(tiny, tmp_path):
    values = _values(tiny, tmp_path / "killed", max_train_steps=40, checkpointing_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # the uninterrupted run beside the one to kill (one thread each, as _cli runs the resume)
    full_cfg = _write_config(tmp_path / "full.yaml", {**values, "output_dir": str(tmp_path / "full")})
    full_log = tmp_path / "full.log"
    with full_log.open("w") as log:
        full = subprocess.Popen([sys.executable, "-m", "visionpeft.cli", "train", str(full_cfg)], env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=log)
    cfg = _write_config(tmp_path / "cfg.yaml", values)
    proc = subprocess.Popen([sys.executable, "-m", "visionpeft.cli", "train", str(cfg)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "killed" / "checkpoint-6").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "killed" / "adapter").exists()
        assert full.wait(timeout=300) == 0, full_log.read_text()[-2000:]
    finally:  # a failed assertion leaves no process running
        for p in (full, proc):
            if p.poll() is None:
                p.kill()
    done = _cli(["train", str(cfg), "--set", "resume_from_checkpoint=latest"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "killed"))


def test_two_processes_keep_the_adapter_identical(tiny, tmp_path):
    """Two DDP processes on CPU (gloo). accelerate's own --cpu flag starts a single process
    unless MPI is set up, so the two processes come from its torchrun launcher
    (--multi_gpu) and the config's ``cpu: true`` keeps them on the CPU. Each process draws
    its own noise and batches; DDP must keep the adapters equal."""
    cfg = _write_config(tmp_path / "cfg.yaml", _values(tiny, tmp_path / "ddp", max_train_steps=3,
                                                       train_batch_size=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "visionpeft.cli", "train", str(cfg)],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "ddp" / "train_report.json").read_text())
    sums = report["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    single = run_config(_values(tiny, tmp_path / "one", max_train_steps=3, train_batch_size=1))
    assert single.report["param_checksums"][0] != sums[0]  # the second process did contribute


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("dreambooth_*.yaml")))
def test_every_shipped_config_runs_on_a_tiny_pipeline(tiny, tmp_path, name):
    values = yaml.safe_load((ROOT / "configs" / name).read_text())
    if "embedded" not in name:  # the embedded model's own config runs on it, at its own 64 px
        values.update(pretrained_model=str(tiny / ("sdxl" if "sdxl" in name else "sd")), resolution=32)
    values.update(instance_data_dir=str(tiny / "instance"), class_data_dir=str(tmp_path / "cls"),
                  num_class_images=1, max_train_steps=2, output_dir=str(tmp_path / "out"),
                  mixed_precision="no", validation_steps=2, validation_inference_steps=1,
                  num_validation_images=1, cpu=True, checkpointing_steps=2)
    res = run_config(values)
    assert res.step == 2 and all(np.isfinite(res.losses))
    for key, path in res.report.items():
        if key.startswith("export_") and not key.endswith("error"):
            assert Path(path).exists()


def test_bad_input_ends_in_one_line_at_the_cli(tiny, tmp_path, capsys):
    """In process (the CLI's own main: one subprocess below shows the real entry point)."""
    from visionpeft.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    cases = {
        "does not exist": {"instance_data_dir": str(tmp_path / "missing")},
        "has no images": {"instance_data_dir": str(empty)},
        "cannot read image": {"instance_data_dir": str(broken)},
        "unknown adapter method 'no_such_method'": {"adapter": {"method": "no_such_method", "target_modules": ATTN}},
        "unknown key(s) ['instance_prompts']": {"instance_prompts": "x"},
    }
    for expected, change in cases.items():
        cfg = _write_config(tmp_path / "cfg.yaml", _values(tiny, tmp_path / "out", **change))
        code = main(["train", str(cfg)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("visionpeft train:")]
        assert code == 2 and "Traceback" not in err, err[-1500:]
        assert len(lines) == 1 and expected in lines[0], err[-800:]
    run = _cli(["train", str(tmp_path / "nope.yaml")])
    assert run.returncode == 2 and "does not exist" in run.stderr


def test_the_diffusers_style_script_maps_its_flags(tiny, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_dreambooth

    args = ["--pretrained_model_name_or_path", str(tiny / "sd"), "--instance_data_dir", str(tiny / "instance"),
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path), "--resolution", "32",
            "--max_train_steps", "2", "--learning_rate", "1e-3", "--adapter", "krona",
            "--adapter_args", "{alpha: 2.0}", "--checkpointing_steps", "2"]
    values = train_dreambooth.parse(args)
    assert values["pretrained_model"] == str(tiny / "sd") and values["adapter"]["alpha"] == 2.0
    assert train_dreambooth.main(args + ["--seed", "3"]) == 0
    import visionpeft as vp

    assert vp.read_adapter_config(tmp_path / "adapter" / "unet")["method"] == "krona"


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_dreambooth

    return train_dreambooth


BASE_ARGS = ["--pretrained_model_name_or_path", "sd", "--instance_data_dir", "inst", "--instance_prompt", "x"]


@pytest.mark.parametrize("method,field", [("lora", "r"), ("wara", "r"), ("block_lora", "r"), ("snell", "r"),
                                          ("loha", "r"), ("adapter", "bottleneck")])
def test_the_script_maps_rank_to_each_methods_rank_field(method, field):
    import visionpeft as vp

    script = _script()
    adapter = script.parse(BASE_ARGS + ["--adapter", method, "--rank", "8"])["adapter"]
    assert adapter == {"method": method, "target_modules": ATTN, field: 8}
    assert getattr(vp.config_from_dict(adapter), field) == 8  # the config takes it
    # without --rank: LoRA keeps diffusers' default 4, the others their own config defaults
    plain = script.parse(BASE_ARGS + ["--adapter", method])["adapter"]
    assert plain == {"method": method, "target_modules": ATTN, **({"r": 4} if method == "lora" else {})}
    # --adapter_args may repeat the same rank, not contradict it
    same = script.parse(BASE_ARGS + ["--adapter", method, "--rank", "8", "--adapter_args", f"{{{field}: 8}}"])
    assert same["adapter"][field] == 8
    with pytest.raises(ValueError, match=rf"^--rank 8 and --adapter_args {field}: 2 disagree"):
        script.parse(BASE_ARGS + ["--adapter", method, "--rank", "8", "--adapter_args", f"{{{field}: 2}}"])


def test_the_script_refuses_rank_for_a_method_without_one(tmp_path, capsys):
    script = _script()
    assert "rank" not in script.parse(BASE_ARGS + ["--adapter", "krona"])["adapter"]  # no --rank: fine
    with pytest.raises(ValueError) as err:
        script.parse(BASE_ARGS + ["--adapter", "krona", "--rank", "8"])
    msg = str(err.value)
    assert "\n" not in msg and "'krona'" in msg and "a1/a2" in msg and "fields: " in msg
    assert "a1" in msg.split("fields: ")[1] and "a2" in msg.split("fields: ")[1]
    # main: one line on stderr, exit code 2, nothing trained
    assert script.main(BASE_ARGS + ["--adapter", "krona", "--rank", "8", "--output_dir", str(tmp_path / "o")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_dreambooth: --rank does not apply to 'krona'")
    assert not (tmp_path / "o").exists()
    # a method without a rank field and no hint of its own gets the generic one-line error
    import dataclasses

    import visionpeft as vp

    @dataclasses.dataclass
    class _NoRank:
        alpha: float = 1.0
        target_modules: list = dataclasses.field(default_factory=list)

    real = vp.get_method
    script.vp.get_method = lambda name: (type("Spec", (), {"config_cls": _NoRank})() if name == "norank"
                                         else real(name))
    try:
        with pytest.raises(ValueError, match=r"^--rank does not apply to 'norank', which has no rank field "
                                             r"\(its fields: alpha\); set its size with --adapter_args$"):
            script.adapter_spec("norank", 4, "to_q", {})
    finally:
        script.vp.get_method = real
    with pytest.raises(ValueError, match=r"^--adapter: unknown method 'nope'; registered: \["):
        script.parse(BASE_ARGS + ["--adapter", "nope", "--rank", "8"])


def test_dreambooth_moved_to_pipelines_with_a_deprecation_path():
    import visionpeft.train
    from visionpeft import pipelines
    from visionpeft.train import build_task, task_names

    with pytest.warns(DeprecationWarning, match=r"from visionpeft\.pipelines\.dreambooth import DreamBoothTask") as rec:
        from visionpeft.train import DreamBoothTask as Old
    assert Old is DreamBoothTask and len(rec) == 1  # one warning per import, not two
    with pytest.warns(DeprecationWarning, match=r"visionpeft\.pipelines\.dreambooth"):
        assert visionpeft.train.DreamBoothConfig is DreamBoothConfig
    assert pipelines.DreamBoothTask is DreamBoothTask
    assert {"dreambooth", "change_detection", "pretrain_embedded"} <= set(task_names())
    with pytest.raises(ValueError, match=r"unknown task 'nope'; known tasks: \[.*'dreambooth'"):
        build_task("nope", {})
    with pytest.raises(AttributeError):
        visionpeft.train.NoSuchThing  # noqa: B018
    # the old module path too (a fresh import, so that its warning fires here)
    import importlib
    import sys

    sys.modules.pop("visionpeft.train.dreambooth", None)
    with pytest.warns(DeprecationWarning, match=r"visionpeft\.train\.dreambooth moved"):
        old_module = importlib.import_module("visionpeft.train.dreambooth")
    assert old_module.DreamBoothTask is DreamBoothTask and old_module.DreamBoothConfig is DreamBoothConfig


def test_run_config_finds_pipeline_tasks_in_a_fresh_process():
    """``task: dreambooth`` needs nothing but visionpeft.train imported: the registry
    loads the pipelines package, whose recipes register themselves."""
    code = ("import sys, visionpeft.train as t\n"
            "assert not any(m.startswith('visionpeft.pipelines') for m in sys.modules)\n"
            "task = t.build_task('dreambooth', {'pretrained_model': 'x', 'instance_data_dir': 'i',\n"
            "    'instance_prompt': 'p', 'adapter': {'method': 'lora', 'r': 2, 'target_modules': ['to_q']}})\n"
            "print(type(task).__module__, task.unet_config.r)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["visionpeft.pipelines.dreambooth.task", "2"]


def test_register_task_refuses_a_second_loader_for_a_name():
    from visionpeft.train import register_task

    with pytest.raises(ValueError, match=r"task 'dreambooth' is already registered .*replace=True"):
        register_task("dreambooth", lambda values: None)
    with pytest.raises(TypeError, match="must be callable"):
        register_task("x_not_callable", "visionpeft.pipelines.dreambooth")


@pytest.mark.parametrize("pipe", ["sd", "sdxl"])
def test_text_encoder_adapters_train_beside_the_unet(tiny, tmp_path, pipe):
    values = _values(tiny, tmp_path, pretrained_model=str(tiny / pipe), max_train_steps=3,
                     text_encoder_adapter={"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    run_config(values)
    encoders = ["text_encoder"] + (["text_encoder_2"] if pipe == "sdxl" else [])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted(["unet", *encoders])
    for name in encoders:
        w = load_file(str(tmp_path / "adapter" / name / "adapter_model.safetensors"))
        trained = [float(v.abs().sum()) > 0 for k, v in w.items() if k.endswith("lora_B")]
        # away from the zero init; SDXL reads the penultimate hidden states, so its last
        # layer's adapters get no gradient, as in diffusers
        assert trained and (all(trained) if pipe == "sd" else sum(trained) >= len(trained) // 2)


def test_v_prediction_models_train_on_the_velocity(tiny, tmp_path):
    """SD 2.x-style schedulers predict v: the target is the scheduler's velocity, and
    min-SNR weights use snr / (snr + 1)."""
    values = _values(tiny, tmp_path / "out", pretrained_model=str(_v_pipeline(tiny, tmp_path)), max_train_steps=2,
                     snr_gamma=5.0)
    task = _task(values)
    task.setup(torch.device("cpu"), torch.float32)
    seen = {}
    real = task.noise_scheduler.get_velocity
    task.noise_scheduler.get_velocity = lambda *a: seen.setdefault("v", real(*a))
    loss, _ = task.loss(task.models(), {"instance": torch.arange(2), "class": None})
    assert "v" in seen and torch.isfinite(loss)
    assert run_config(values).step == 2


def _class_images(folder: Path, n: int) -> Path:
    """``n`` class images already there, so that none is generated."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"class-{i:05d}.png")
    return folder


@pytest.mark.parametrize("prediction,snr_gamma", [("epsilon", True), ("v_prediction", True), ("epsilon", None)])
def test_the_loss_is_the_min_snr_weighted_mse_plus_the_weighted_prior_loss(tiny, tmp_path, prediction, snr_gamma):
    """The loss recomputed from what the UNet was given and what it predicted, with every
    rule written here from its formula: the target is the noise (epsilon) or
    alpha_t^0.5 * noise - (1 - alpha_t)^0.5 * x0 (v-prediction), alpha_t the scheduler's
    alphas_cumprod; each instance sample's MSE is weighted by min(snr, gamma) / snr (epsilon)
    or min(snr, gamma) / (snr + 1) (v), snr = alpha_t / (1 - alpha_t) (Hang et al., arXiv
    2303.09556; snr also checked against diffusers' compute_snr), the class samples' not (as
    diffusers' DreamBooth scripts); the loss is the instance mean + prior_loss_weight * the
    class mean. gamma is put between the instance rows' SNRs, so both sides of the min occur."""
    from diffusers.training_utils import compute_snr

    pipe = tiny / "sd" if prediction == "epsilon" else _v_pipeline(tiny, tmp_path)
    values = _values(tiny, tmp_path / "out", pretrained_model=str(pipe), with_prior_preservation=True,
                     class_data_dir=str(_class_images(tmp_path / "cls", 2)), class_prompt="a dog",
                     num_class_images=2, prior_loss_weight=0.3, snr_gamma=1.0 if snr_gamma else None)
    task = _task(values)
    task.setup(torch.device("cpu"), torch.float32)
    sched = task.noise_scheduler
    assert sched.config.prediction_type == prediction
    seen = {}
    real_add_noise = sched.add_noise

    def add_noise(x0, noise, t):  # what the loss noised (the scheduler's own function runs)
        seen.update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.clone())
        return real_add_noise(x0, noise, t)

    sched.add_noise = add_noise
    task.unet.register_forward_hook(lambda m, args, out: seen.update(pred=out.sample.detach().clone()))
    batch = {"instance": torch.arange(3), "class": torch.arange(2)}  # 3 instance, 2 class rows
    alphas = sched.alphas_cumprod.double()
    if snr_gamma:  # a dry run shows the timesteps this seed draws: put gamma between their SNRs,
        torch.manual_seed(0)  # so that both sides of min(snr, gamma) occur
        task.loss(task.models(), batch)
        inst_t = seen["t"][:3]  # the instance rows: the only ones weighted
        snrs = (alphas[inst_t] / (1 - alphas[inst_t])).sort().values
        assert snrs[0] < snrs[-1], snrs
        task.cfg.snr_gamma = float((snrs[0] * snrs[-1]).sqrt())
    torch.manual_seed(0)
    with torch.no_grad():
        loss, logs = task.loss(task.models(), batch)
    x0, noise, t, pred = (seen[k].double() for k in ("x0", "noise", "t", "pred"))
    t = seen["t"]
    assert x0.shape[0] == 5 and pred.shape == x0.shape
    a = alphas[t].view(-1, 1, 1, 1)
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction == "v_prediction":  # the scheduler's velocity is that formula
        torch.testing.assert_close(sched.get_velocity(seen["x0"], seen["noise"], t).double(), target,
                                   rtol=1e-5, atol=1e-6)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr = alphas[t] / (1 - alphas[t])
    torch.testing.assert_close(compute_snr(sched, t).double(), snr, rtol=1e-5, atol=0)  # diffusers' helper
    if snr_gamma:
        gamma = task.cfg.snr_gamma
        assert (snr[:3] > gamma).any() and (snr[:3] < gamma).any()
        weight = snr.clamp(max=gamma) / (snr if prediction == "epsilon" else snr + 1)
    else:
        weight = torch.ones_like(snr)
    # the instance rows weighted, the prior rows not (as diffusers' DreamBooth scripts)
    instance, prior = (weight[:3] * mse[:3]).mean(), mse[3:].mean()
    torch.testing.assert_close(logs["instance_loss"].double(), instance, rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["prior_loss"].double(), prior, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), instance + 0.3 * prior, rtol=1e-5, atol=0)
    # the rules under test move the loss by far more than the tolerance: the prior weight,
    # and the SNR weight (away from 1 on both sides of gamma for v, above gamma for epsilon)
    assert float(prior) > 1e-3 * float(loss)
    if snr_gamma:
        assert float((weight[:3] - 1).abs().max()) > 1e-2


def test_mixed_precision_validation_and_random_crops(tiny, tmp_path):
    """bf16 on CPU: frozen VAE and text encoder in bf16, validation images still decode;
    center_crop false takes a fresh random crop per step (the images are 40 x 48)."""
    values = _values(tiny, tmp_path, max_train_steps=2, mixed_precision="bf16", validation_prompt="a sks dog",
                     validation_steps=2, num_validation_images=1, validation_inference_steps=1,
                     center_crop=False)
    res = run_config(values)
    assert res.step == 2 and all(np.isfinite(res.losses))
    assert (tmp_path / "validation" / "step-000002.png").is_file()


def test_without_center_crop_each_step_takes_a_fresh_random_window_of_the_resized_image(tiny, tmp_path):
    """center_crop: false resizes the shorter side to the resolution (40 x 48 -> 32 x 38)
    and crops a resolution-square window at a position drawn anew at every step: every
    image the VAE encodes during training is exactly one window of one resized image, and
    the same image is cropped at more than one position over the steps."""
    crops = []

    class Recording(DreamBoothTask):
        def setup(self, device, dtype):
            super().setup(device, dtype)
            encode = self.vae.encode

            def spy(pixels, *args, **kwargs):
                crops.extend(pixels.detach().float().clone())
                return encode(pixels, *args, **kwargs)

            self.vae.encode = spy

    values = _values(tiny, tmp_path, max_train_steps=4, train_batch_size=3, center_crop=False,
                     checkpointing_steps=100)
    loop_cfg, _ = TrainConfig.split({k: v for k, v in values.items() if k != "task"})
    task = _task(values, Recording)
    assert train(task, loop_cfg).step == 4
    # the resized images, checked against PIL's own resize (up to rounding to 8 bits)
    resized = task.instance_pixels
    for path, image in zip(task.instance_images, resized):
        assert image.shape == (3, 32, 38)
        with Image.open(path) as im:
            pil = torch.from_numpy(np.asarray(im.convert("RGB").resize((38, 32), Image.BILINEAR)).copy())
        torch.testing.assert_close(image, pil.permute(2, 0, 1).float() / 127.5 - 1, atol=2 / 127.5, rtol=0)
    assert len(crops) == 4 * 3  # every image at every step
    offsets: dict[int, list] = {}
    for crop in crops:
        assert crop.shape == (3, 32, 32)
        found = [(i, top, left) for i, image in enumerate(resized) for top in range(image.shape[1] - 31)
                 for left in range(image.shape[2] - 31) if torch.equal(crop, image[:, top:top + 32, left:left + 32])]
        assert len(found) == 1, found  # a true window of one image (random images: no two windows alike)
        offsets.setdefault(found[0][0], []).append(found[0][1:])
    assert sorted(offsets) == [0, 1, 2] and all(len(o) == 4 for o in offsets.values())
    assert all(len(set(o)) > 1 for o in offsets.values()), offsets  # a fresh position per step


def test_bad_export_formats_and_a_missing_export_rank_are_refused_when_the_config_is_built(tiny, tmp_path):
    def build(**kw):
        values = _values(tiny, tmp_path, **kw)
        loop_keys = set(TrainConfig.__dataclass_fields__)
        return DreamBoothConfig.from_dict({k: v for k, v in values.items() if k not in loop_keys and k != "task"})

    with pytest.raises(ValueError, match=r"'safetensor' is not a format vp\.export writes; choose from "
                                         r"\['visionpeft', 'peft', 'lycoris', 'kohya', 'diffusers', 'merged'\]"):
        build(export_formats=["diffusers", "safetensor"])
    wara = {"method": "wara", "r": 4, "target_modules": ATTN}
    with pytest.raises(ValueError, match=r"\['diffusers', 'kohya'\] write LoRA factors; adapter is wara.*"
                                         r"set export_rank"):
        build(adapter=wara, export_formats=["diffusers", "kohya", "merged"])
    te_loha = {"method": "loha", "r": 2, "target_modules": ["q_proj"]}
    with pytest.raises(ValueError,  # every format holds the text encoders too
                       match=r"\['peft', 'kohya'\] write LoRA factors; text_encoder_adapter is loha.*export_rank"):
        build(text_encoder_adapter=te_loha, export_formats=["peft", "kohya", "merged"])
    with pytest.raises(ValueError, match="'lycoris' writes LoKr .krona. or LoHa factors; text_encoder_adapter is lora"):
        build(adapter={"method": "loha", "r": 2, "target_modules": ATTN}, export_formats=["lycoris"],
              text_encoder_adapter={"method": "lora", "r": 2, "target_modules": ["q_proj"]})
    build(text_encoder_adapter=te_loha, export_formats=["peft", "kohya", "merged"], export_rank=2)
    with pytest.raises(ValueError, match="export_rank must be a positive integer"):
        build(adapter=wara, export_formats=["diffusers"], export_rank=0)
    with pytest.raises(ValueError, match="'lycoris' writes LoKr .krona. or LoHa factors; adapter is wara"):
        build(adapter=wara, export_formats=["lycoris"], export_rank=4)
    with pytest.raises(ValueError, match="'lycoris' writes LoKr .krona. or LoHa factors; adapter is lora: use kohya"):
        build(export_formats=["lycoris"])
    build(adapter=wara, export_formats=["diffusers", "merged", "visionpeft"], export_rank=4)  # fine
    build(export_formats=["peft", "diffusers", "kohya", "merged", "visionpeft"])  # LoRA: no rank
    build(adapter={"method": "loha", "r": 2, "target_modules": ATTN}, export_formats=["lycoris"])


def test_class_image_generation_says_how_many_at_what_size_and_how_long(tiny, tmp_path, capsys):
    values = _values(tiny, tmp_path / "out", with_prior_preservation=True, class_data_dir=str(tmp_path / "cls"),
                     class_prompt="a dog", num_class_images=3, sample_batch_size=1, max_train_steps=1)
    run_config(values)
    said = capsys.readouterr()
    text = said.out + said.err
    assert "generating 3 class images of 'a dog' at 32x32" in text
    assert "the first batch of 1 took" in text and "more for the other 2" in text


@pytest.mark.parametrize("pipe", ["sd", "sdxl"])
def test_every_export_holds_unet_and_text_encoders_and_loads_in_their_tools(tiny, tmp_path, pipe):
    """Each export folder holds the UNet's and the text encoders' adapters, and the tool
    that reads it computes what the trained models compute: diffusers'
    pipe.load_lora_weights for the diffusers and kohya files (kohya through diffusers' own
    converter), PEFT's PeftModel for each peft/<model> folder, load_state_dict(strict) for
    each merged file, vp.load_adapter for our folders."""
    import visionpeft as vp
    from diffusers import DiffusionPipeline
    from peft import PeftModel

    out = tmp_path / "out"
    formats = ["diffusers", "kohya", "peft", "merged", "visionpeft"]
    values = _values(tiny, out, pretrained_model=str(tiny / pipe), max_train_steps=3, learning_rate=5e-2,
                     export_formats=formats,  # (diffusers reads a kohya text encoder only with out_proj in it)
                     text_encoder_adapter={"method": "lora", "r": 2,
                                           "target_modules": ["q_proj", "v_proj", "out_proj"]})
    res = run_config(values)
    encoders = ["text_encoder"] + (["text_encoder_2"] if pipe == "sdxl" else [])
    parts = ["unet", *encoders]
    export = out / "export"
    assert sorted(p.name for p in (export / "diffusers").iterdir()) == ["pytorch_lora_weights.safetensors"]
    keys = load_file(str(export / "diffusers" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".", 1)[0] for k in keys} == set(parts)
    kohya = load_file(str(export / "kohya" / "default.safetensors"))
    te_prefixes = {"lora_te"} if pipe == "sd" else {"lora_te1", "lora_te2"}
    assert {k.split("_text_model", 1)[0] for k in kohya if not k.startswith("lora_unet_")} == te_prefixes
    for fmt in ("peft", "visionpeft"):
        assert sorted(p.name for p in (export / fmt).iterdir()) == sorted(parts)
    assert sorted(p.name for p in (export / "merged").iterdir()) == sorted(f"{m}.safetensors" for m in parts)
    assert res.report["export_peft"] == str(export / "peft")
    assert res.report["export_merged"] == str(export / "merged")

    def fresh():
        return DiffusionPipeline.from_pretrained(tiny / pipe)

    ours = fresh()
    for name in parts:
        vp.load_adapter(getattr(ours, name), out / "adapter" / name)
    by_diffusers = fresh()
    by_diffusers.load_lora_weights(export / "diffusers")
    by_kohya = fresh()
    by_kohya.load_lora_weights(str(export / "kohya" / "default.safetensors"))
    merged, by_peft, by_us = fresh(), fresh(), fresh()
    for name in parts:
        getattr(merged, name).load_state_dict(load_file(str(export / "merged" / f"{name}.safetensors")), strict=True)
        setattr(by_peft, name, PeftModel.from_pretrained(getattr(by_peft, name), export / "peft" / name).eval())
        vp.load_adapter(getattr(by_us, name), export / "visionpeft" / name)

    torch.manual_seed(0)
    ids = ours.tokenizer(["a photo of sks dog"], padding="max_length", max_length=ours.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    lat = torch.randn(1, ours.unet.config.in_channels, 8, 8)
    hidden = torch.randn(1, ids.shape[1], ours.unet.config.cross_attention_dim)
    kw = {}
    if pipe == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, ours.text_encoder_2.config.projection_dim),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        base = {name: getattr(fresh(), name)(ids)[0] for name in encoders}
        for theirs in (by_diffusers, by_kohya, merged, by_peft, by_us):
            for name in encoders:
                a = getattr(theirs, name)(ids, output_hidden_states=True)
                b = getattr(ours, name)(ids, output_hidden_states=True)
                torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)
                assert not torch.allclose(base[name], b[0], atol=1e-4)  # the text encoder's LoRA changed it
            torch.testing.assert_close(theirs.unet(lat, 10, hidden, **kw).sample,
                                       ours.unet(lat, 10, hidden, **kw).sample, atol=1e-4, rtol=1e-4)


def test_an_export_folder_holding_other_files_is_refused_before_training(tiny, tmp_path):
    """The folder is replaced whole at the end and someone's files are never deleted, so a
    stale file there stops the run at setup, not after training."""
    from visionpeft.train import TrainingError

    out = tmp_path / "out"
    (out / "export" / "kohya").mkdir(parents=True)
    (out / "export" / "kohya" / "old_name.safetensors").write_bytes(b"x")
    with pytest.raises(TrainingError, match=r"export/kohya holds \['old_name.safetensors'\], which this run's "
                                            r"kohya export would not write \(it writes \['default.safetensors'\]\)"):
        run_config(_values(tiny, out, export_formats=["diffusers", "kohya"]))
    assert not (out / "adapter").exists() and not (out / "export" / "diffusers").exists()


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_the_krona_configs_lycoris_export_loads_in_lycoris_with_the_trained_unets_outputs(tiny, tmp_path, alpha):
    """README: the "lycoris" export (what configs/dreambooth_krona_sd15.yaml writes) is read
    by lycoris.create_lycoris_from_weights. The shipped config (its adapter and export
    formats) on the tiny pipeline, a larger learning rate so that the adapter moves the
    UNet well above float rounding: LyCORIS's network built from the file's UNet entries
    (LyCORIS names them lycoris_<module>; the file uses the lora_unet_ prefix ComfyUI and
    kohya read) on a fresh UNet gives the trained UNet's outputs, to a thousandth of the
    adapter's effect. Once as shipped (alpha 1) and once with alpha 0.5, which the file
    must fold into its factors (LyCORIS applies scale 1 to full LoKr factors)."""
    import visionpeft as vp
    from diffusers import UNet2DConditionModel
    from lycoris import create_lycoris_from_weights

    values = yaml.safe_load((ROOT / "configs" / "dreambooth_krona_sd15.yaml").read_text())
    assert values["export_formats"] == ["lycoris"] and values["adapter"]["method"] == "krona"
    if alpha is not None:
        values["adapter"] = {**values["adapter"], "alpha": alpha}
    out = tmp_path / "out"
    values.update(pretrained_model=str(tiny / "sd"), instance_data_dir=str(tiny / "instance"),
                  with_prior_preservation=False, class_data_dir=None, validation_prompt=None, resolution=32,
                  max_train_steps=2, learning_rate=5e-2, output_dir=str(out), mixed_precision="no", cpu=True,
                  checkpointing_steps=2, resume_from_checkpoint=None)
    res = run_config(values)
    files = sorted((out / "export" / "lycoris").iterdir())
    assert [Path(res.report["export_lycoris"])] == files and files[0].suffix == ".safetensors"
    written = load_file(str(files[0]))
    assert written and all(k.startswith("lora_unet_") for k in written)
    unet_sd = {"lycoris_" + k[len("lora_unet_"):]: v for k, v in written.items()}

    def fresh():
        return UNet2DConditionModel.from_pretrained(tiny / "sd", subfolder="unet").eval()

    ours = fresh()
    vp.load_adapter(ours, out / "adapter" / "unet")
    layers = {k.split(".", 1)[0] for k in unet_sd}
    theirs = fresh()
    network, _ = create_lycoris_from_weights(1.0, "", theirs, weights_sd=unet_sd)
    assert len(network.loras) == len(layers) > 0
    assert {type(m).__name__ for m in network.loras} == {"LokrModule"}
    network.apply_to()
    lat, hidden = _unet_inputs(ours, 1)
    with torch.no_grad():
        expect = ours(lat, 10, hidden).sample
        effect = float((expect - fresh()(lat, 10, hidden).sample).abs().max())
        got = theirs(lat, 10, hidden).sample
    assert effect > 1e-3 * float(expect.abs().max()), effect
    torch.testing.assert_close(got, expect, atol=effect / 1000, rtol=0)


def test_class_images_follow_the_guidance_settings_as_the_pipeline_does(tiny, tmp_path):
    """guidance_scale / guidance_rescale reach the class images: each is the folder's own
    pipeline's image at those settings (zero-terminal-SNR models such as embedded-sd need the
    rescale), and a rescale outside [0, 1] is refused when the config is built."""
    from diffusers import StableDiffusionPipeline

    settings = {"guidance_scale": 3.0, "guidance_rescale": 0.7}
    values = _values(tiny, tmp_path / "out", with_prior_preservation=True, class_data_dir=str(tmp_path / "cls"),
                     class_prompt="a dog", num_class_images=1, sample_batch_size=1, max_train_steps=1, **settings)
    run_config(values)
    made = np.asarray(Image.open(tmp_path / "cls" / "class-00000.png"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def image(**kw):
        return np.asarray(pipe(["a dog"], height=32, width=32, generator=torch.Generator().manual_seed(1234),
                               **kw).images[0])

    np.testing.assert_array_equal(made, image(**settings))
    assert np.abs(made.astype(int) - image(guidance_scale=3.0)).max() > 0  # the rescale did something
    with pytest.raises(ValueError, match=r"guidance_rescale must be a number within \[0, 1\]"):
        _task(_values(tiny, tmp_path / "o2", guidance_rescale=1.5))
    with pytest.raises(ValueError, match=r"guidance_scale must be a number within \[0, 100\]"):
        _task(_values(tiny, tmp_path / "o2", guidance_scale="high"))
    # left out: diffusers' 7.5 and 0 for this folder, the packaged model's evaluated ones for embedded-sd
    from visionpeft.backbones import embedded_sd
    from visionpeft.pipelines.dreambooth.task import sampling_defaults

    plain = _task(_values(tiny, tmp_path / "o3")).cfg
    assert sampling_defaults(plain, tiny / "sd") == {"guidance_scale": 7.5, "guidance_rescale": 0.0}
    assert sampling_defaults(plain, embedded_sd.FOLDER) == {k: embedded_sd.SAMPLING[k]
                                                           for k in ("guidance_scale", "guidance_rescale")}
