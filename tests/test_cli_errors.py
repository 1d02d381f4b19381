"""Every error of the visionpeft command a new user met ends in one line on stderr, exit
code 2 and no traceback; each fails before any data is read or weights downloaded."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import visionpeft as vp
from visionpeft.backbones.tiny import build_tiny
from visionpeft.cli import main
from visionpeft.pipelines.change_detection.task import Detector, save_detector

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "cd_synthetic.yaml")
FIXTURE = ROOT / "tests" / "fixtures" / "saved_v0_1_0" / "lora"


def _one_line_error(capsys, argv, *expected):
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, code, err)
    assert len(lines) == 1 and lines[0].startswith("visionpeft "), (argv, err)
    assert "Traceback" not in out + err
    for text in expected:
        assert text in lines[0], (argv, text, lines[0])
    return lines[0]


def test_every_cli_error_is_one_line(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    # data_root does not exist and output_dir is fresh: an error about either, or a written
    # output_dir, would show a check ran too late (after data loading or the loop's start)
    train = ["train", CONFIG, "--set", f"data_root={tmp_path / 'no-data'}", "--set", f"output_dir={tmp_path / 'out'}"]

    # 1. a timm name timm does not know: the closest names
    _one_line_error(capsys, train + ["--set", "backbone.name=vit_nonexistent"], "'vit_nonexistent'", "vit_")
    line = _one_line_error(capsys, train + ["--set", "backbone.name=vit_tiny_patch16"], "did you mean")
    assert "vit_tiny_patch16_224" in line

    # 2. hub weights offline and not cached (an empty cache, so nothing is found or fetched)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    _one_line_error(capsys, train + ["--set", "backbone.name=vit_tiny_patch16_224"],
                    "'vit_tiny_patch16_224' are not available offline", "HF_HUB_OFFLINE=1")

    # 3. a mistyped key: the closest one first, then every task and loop key
    line = _one_line_error(capsys, train + ["--set", "max_train_step=20"],
                           "unknown key(s) ['max_train_step']", "learning_rate", "image_size")
    assert line.index("did you mean max_train_steps") < line.index("; known")

    # 4. YAML typos: file, line and column
    for i, (text, where) in enumerate([("task: x\nsteps: [1, 2\n", ":3:1:"), ("task: x\na: b: c\n", ":2:5:"),
                                       ("task: x\nb\nc: d\n", ":3:1:")]):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        line = _one_line_error(capsys, ["train", str(bad)], f"{bad}{where}", "not valid YAML")
    assert "simple key that started at line 2, column 1" in line
    _one_line_error(capsys, train + ["--set", "adapter.r=[1,"], "--set adapter.r", "line 1, column")

    # 7. --set without =, a missing config, a config that is not a mapping, a folder
    _one_line_error(capsys, train + ["--set", "max_train_steps"], "--set takes KEY=VALUE", "'max_train_steps'")
    _one_line_error(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml does not exist")
    listed = tmp_path / "list.yaml"
    listed.write_text("- task\n- x\n")
    _one_line_error(capsys, ["train", str(listed)], "must hold a mapping", "got a list")
    _one_line_error(capsys, ["train", str(tmp_path)], "is not a file")
    assert not (tmp_path / "out").exists()

    # info on a folder that holds no adapter, and on a missing one
    _one_line_error(capsys, ["info", str(tmp_path)], "has no adapter_config.json")
    _one_line_error(capsys, ["info", str(tmp_path / "missing")], "does not exist")

    # argparse's own errors: a usage line, then one line
    with pytest.raises(SystemExit) as info:
        main(["predict-cd", "a.png"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert [ln for ln in err.strip().splitlines() if not ln.startswith(("usage:", " "))] == \
        [err.strip().splitlines()[-1]]

    # 5. a reader that goes away (visionpeft info DIR | head -1): no traceback
    proc = subprocess.Popen([sys.executable, "-m", "visionpeft", "info", str(FIXTURE), "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # before the child writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert err == "", err


def _cd_checkpoint(folder: Path) -> Path:
    host = build_tiny("timm_sam2_hiera")
    vp.inject(host, vp.LoRAConfig(r=2, target_modules=["qkv"]))
    model = Detector(host, 64, 16, "layer").eval()
    config = {"backbone": {"name": "timm_sam2_hiera", "source": "tiny"}, "image_size": 64,
              "decoder_channels": 16, "exchange": "layer", "adapter": {"method": "lora", "r": 2,
                                                                        "target_modules": ["qkv"]}}
    save_detector(model, folder / "best", config, "default")
    return folder


def test_info_describes_peft_and_change_detection_folders_and_predict_makes_folders(tmp_path, capsys):
    # 5. a PEFT folder
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    save_file({"a.lora_A.weight": torch.zeros(4, 10), "a.lora_B.weight": torch.zeros(10, 4)},
              str(peft / "adapter_model.safetensors"))
    assert main(["info", str(peft)]) == 0
    out = capsys.readouterr().out
    for text in ("PEFT LORA", "r=4", "lora_alpha=8", "['q_proj', 'v_proj']", "2 tensors, 80 parameters",
                 "vp.load_adapter"):
        assert text in out, (text, out)

    # 5. a change-detection run folder and its best/
    run = _cd_checkpoint(tmp_path / "run")
    for path in (run, run / "best"):
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert "change-detection checkpoint" in out and "timm_sam2_hiera" in out, out
        assert "cd_config.json, decoder.safetensors, encoder/" in out, out
        assert f"adapter:   {run / 'best' / 'encoder'}" in out, out
    assert main(["info", str(run / "best" / "encoder")]) == 0  # the adapter itself, as before
    assert "method:      lora" in capsys.readouterr().out

    # 6. predict-cd makes the parent folders of --output and --overlay
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    mask, overlay = tmp_path / "new" / "sub" / "x.png", tmp_path / "other" / "o.png"
    assert main(["predict-cd", "--checkpoint", str(run), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "-o", str(mask), "--overlay", str(overlay)]) == 0
    assert mask.is_file() and overlay.is_file()
