"""The visionpeft command and the quickstart script, run as a user would."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOY_TARGETS, ToyNet, randomize_adapters

import visionpeft as vp
from visionpeft.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in vp.list_methods())


def test_info_describes_a_saved_adapter(tmp_path, capsys):
    model = ToyNet()
    vp.inject(model, vp.LoRAConfig(r=3, target_modules=TOY_TARGETS), name="dog")
    randomize_adapters(model)
    vp.save_adapter(model, tmp_path / "dog", name="dog")
    assert main(["info", str(tmp_path / "dog"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "method:      lora" in out
    assert f"trainable:   {vp.trainable_parameters(model):,} parameters" in out
    assert "  qkv       linear  base (45, 15)  parts q,v\n" in out
    assert "  attn      mha     base (45, 15)  parts in_proj,out_proj\n" in out


def test_info_on_a_non_adapter_folder_fails_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "visionpeft.cli", "--help"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert "methods" in out and "info" in out


def test_vit_lora_example_short_run(tmp_path):
    """The ViT LoRA example: a few steps, every stage runs, the checks hold."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import example_vit_lora as quickstart
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    result = quickstart.main(["--steps", "60", "--out", str(tmp_path)])
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert result["merge_diff"] < 1e-4
    assert result["after"] > result["before"]


def test_quickstart_short_run(tmp_path):
    """The main job (PeftCD on the synthetic set): a few steps, every output written."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    result = quickstart.main(["--steps", "4", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")])
    assert all(0.0 <= result["metrics"][k] <= 1.0 for k in ("oa", "precision", "recall", "f1", "iou"))
    assert len(result["maps"]) == 4 and all(p.is_file() for p in result["maps"])
    assert result["figure"].stat().st_size > 0 and (tmp_path / "out" / "best" / "cd_config.json").is_file()


def test_config_values_in_exponent_notation_are_numbers(tmp_path):
    from visionpeft.cli import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1e-4\nother: 2E5\nname: 1e-4x\n")
    values = load_config(str(cfg), ["adapter.alpha=3e1", "weight_decay=1.0e-2"])
    assert values == {"learning_rate": 1e-4, "other": 2e5, "name": "1e-4x",
                      "adapter": {"alpha": 30.0}, "weight_decay": 1e-2}


def test_python_dash_m_visionpeft_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "visionpeft", "methods"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "snell" in done.stdout


def test_info_on_a_folder_of_model_folders_describes_each(tmp_path, capsys):
    for name in ("unet", "text_encoder"):
        model = ToyNet()
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=TOY_TARGETS), name="dog")
        vp.save_adapter(model, tmp_path / "adapter" / name, name="dog")
    assert main(["info", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'adapter'} holds 2 adapter folders, one per model: text_encoder, unet")
    assert out.count("method:      lora") == 2


def test_methods_catalog_is_the_registry():
    """`visionpeft methods` prints from methods/catalog.json (no torch import): the file must
    say what the registry says. If this fails after a method or field changed: make methods-catalog"""
    import json

    from visionpeft.cli import METHODS_CATALOG, describe_methods_live

    assert json.loads(METHODS_CATALOG.read_text()) == describe_methods_live(), \
        "methods/catalog.json is stale: run `make methods-catalog`"


def test_help_and_methods_import_no_torch():
    """The package root is lazy: --help, --version and methods answer without torch or host
    libraries (a second or more each), and the API still loads on first use."""
    code = ("import sys, contextlib, io\n"
            "from visionpeft.cli import main\n"
            "for argv in (['--help'], ['--version'], ['train', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try: main(argv)\n"
            "        except SystemExit: pass\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert main(['methods', '-v']) == 0\n"
            "heavy = [m for m in ('torch', 'timm', 'diffusers', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert 'LoRAConfig' in out.getvalue()\n"
            "import visionpeft as vp, timm\n"
            "assert vp.LoRAConfig(r=2, target_modules=['fc']).r == 2 and 'torch' in sys.modules\n"
            "assert 'embedded_vit_s' in timm.list_models('embedded_*')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_train_help_lists_every_registered_task_and_methods_v_every_field(capsys):
    from visionpeft.cli import TASKS
    from visionpeft.train import task_names

    assert sorted(TASKS) == task_names()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(t in out for t in TASKS) and "(default: None)" in out
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    for name in vp.list_methods():
        for f in dataclasses.fields(vp.get_method(name).config_cls):
            assert f"      {f.name} = " in out, (name, f.name)
