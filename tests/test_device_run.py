"""The prepared GPU run (scripts/device_run.sh): its dry run takes every step at toy size on
CPU and must leave every step ok, with JSON that holds what the summary reads. The dry run
is the slowest test of the suite (1-2 minutes on 2 cores; marked ``slow``, not skipped).
Also the helpers' pure parts: which carried wheels get installed, and pytest's report."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["cuda_tests", "methods", "methods_compiled", "dreambooth", "switch", "cd"]
# `-m "not slow"` leaves the dry run out (the marker is registered in pyproject.toml)
SLOW = pytest.mark.slow


def _tools():
    spec = importlib.util.spec_from_file_location("device_tools", ROOT / "scripts" / "device_tools.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


HALVES = (STEPS[:3], STEPS[3:])  # the dry run's steps split in two runs side by side


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """Two dry runs at once, each taking half of the steps (``DEVICE_RUN_STEPS``): every
    step runs on one thread, mostly importing, so two side by side use both cores and
    halve the wait; together they cover every step."""
    bindir = str(Path(sys.executable).parent)
    # this interpreter both as $PYTHON and first on PATH (python3 / python resolve to it)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    runs = []
    for half in HALVES:
        out = tmp_path_factory.mktemp("device_run")
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "device_run.sh"), str(out), "--dry-run"], cwd=ROOT,
                                env={**env, "DEVICE_RUN_STEPS": " ".join(half)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        runs.append((proc, out, half))
    done = []
    for proc, out, half in runs:
        try:
            log, _ = proc.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        done.append((proc.returncode, log, out, half))
    return done


@SLOW
def test_dry_run_every_step_ok(dry_run):
    for rc, log, out, half in dry_run:
        assert rc == 0, log[-8000:]
        summary = (out / "summary.md").read_text()
        for step in half:
            assert re.search(rf"^\| {step} \| ok \|", summary, re.M), f"{step} not ok in summary.md:\n{summary[:3000]}"
        # what comes back from a device run: 8 files at most, all of them ours
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(["run.json", "summary.md", *(f"{s}.json" for s in half)]), names


@SLOW
def test_dry_run_json(dry_run):
    load = {}
    for rc, log, out, half in dry_run:
        assert rc == 0, log[-6000:]
        run = json.loads((out / "run.json").read_text())
        assert run["dry_run"] is True and run["budget_s"] > 0
        assert [s["name"] for s in run["steps"]] == list(half)
        assert all(s["status"] == "ok" and s["seconds"] > 0 and s["command"] for s in run["steps"])
        assert run["env"]["packages"]["torch"] and "install" in run
        load.update({p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "run"})
    assert set(load) == set(STEPS)

    tests = load["cuda_tests"]
    assert tests["failed"] == 0 and tests["errors"] == 0 and tests["tests"]
    # only CUDA tests were picked; without a GPU they skip, with one they pass
    assert all("cuda" in (t["name"] + t["message"]).lower() for t in tests["tests"])
    assert tests["skipped"] + tests["passed"] == len(tests["tests"])

    for name, ours in (("methods", {"krona", "wara", "snell"}), ("methods_compiled", {"snell_compiled",
                                                                                      "snella_compiled"})):
        host = load[name]["hosts"][0]
        assert host["host"] == "vit" and host["batch"] == 2 and load[name]["img"] == 64
        for key in ("step", "memory_mb", "peak_mb", "step_peak_mb", "trainable"):
            assert {"lora", "peft_lora"} | ours <= set(host[key]), (name, key, host[key])
        assert all(v["ms"] > 0 for v in host["step"].values())

    db = load["dreambooth"]
    assert db["dtype"] == "bf16" and db["unet"].startswith("toy")
    assert set(db["step"]) == set(db["memory_mb"]) == {"lora", "peft_lora", "krona", "wara"}

    sw = load["switch"]
    assert set(sw["visionpeft"]) == {"1", "10"} and set(sw["diffusers"]) == {"1", "3"}
    assert all(v["median_ms"] >= 0 for side in ("visionpeft", "diffusers") for v in sw[side].values())

    cd = load["cd"]
    assert cd["toy"] is True and set(cd["encoders"]) == {"hiera_b+", "dinov3_vit_b"}
    for enc in cd["encoders"].values():
        assert set(enc["step"]) == set(enc["memory_mb"]) == {"lora", "krona", "adapter", "frozen"}
        assert enc["sliding_window_tiles_per_s"] > 0


def _wheel(folder: Path, dist: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
        zf.writestr(f"{dist}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\n"
                    f"Version: {version}\n{meta}Requires-Dist: pytest; extra == \"test\"\n")
    return path


def test_carried_wheels_install_only_what_is_missing(tmp_path):
    tools = _tools()
    wheels = [_wheel(tmp_path, "diffusers", "0.42.1", ["huggingface-hub<3.0,>=1.32.0", "numpy", "Pillow"]),
              _wheel(tmp_path, "diffusers", "0.36.0", ["huggingface-hub<2.0,>=0.34.0", "numpy"]),
              _wheel(tmp_path, "PyWavelets", "1.9.0", ["numpy<3,>=1.25"]),
              _wheel(tmp_path, "filelock", "4.3.1", [])]

    def chosen(installed):
        picked, kept = tools.choose_wheels(wheels, installed)
        return {c["dist"]: (c["version"], bool(c["clash"])) for c in picked}, {k["dist"] for k in kept}

    # the newest diffusers the machine's hub allows; the machine's own filelock kept
    assert chosen({"huggingface-hub": "2.4.0", "numpy": "2.1", "filelock": "3.0"}) == (
        {"diffusers": ("0.42.1", False), "pywavelets": ("1.9.0", False)}, {"filelock"})
    assert chosen({"huggingface-hub": "1.0.1", "numpy": "2.1"})[0]["diffusers"] == ("0.36.0", False)
    # none fits: the newest, with the clash said
    assert chosen({"huggingface-hub": "0.20.0", "numpy": "2.1"})[0]["diffusers"] == ("0.42.1", True)
    # nothing carried is missing: nothing to install
    assert chosen({"diffusers": "0.42.1", "pywavelets": "1.9.0", "filelock": "4"})[0] == {}


def test_junit_report_requires_a_pass_on_the_gpu(tmp_path):
    tools = _tools()
    xml = tmp_path / "junit.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.test_dwt" name="test_cuda_matches_cpu" '
                   'time="0.1"><skipped message="needs CUDA"/></testcase></testsuite></testsuites>')
    out = tmp_path / "cuda_tests.json"
    assert tools.main(["junit", "--xml", str(xml), "--out", str(out), "--rc", "0"]) == 0  # a dry run
    assert json.loads(out.read_text())["skipped"] == 1
    assert tools.main(["junit", "--xml", str(xml), "--out", str(out), "--rc", "0", "--require-pass"]) == 1
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="test_cuda_x" time="1"/>'
                   '</testsuite></testsuites>')
    assert tools.main(["junit", "--xml", str(xml), "--out", str(out), "--rc", "0", "--require-pass"]) == 0
    assert tools.main(["junit", "--xml", str(xml), "--out", str(out), "--rc", "1"]) == 1
    assert tools.main(["junit", "--xml", str(tmp_path / "missing.xml"), "--out", str(out), "--rc", "4"]) == 1


def test_every_step_named_is_run_and_extra_steps_have_dry_run_sizes():
    """The step lists and the run_step lines agree (a step left out of a list would never run,
    one without a run_step line would be counted against the budget and never recorded); the
    steps run only when named (fewshot, points) have toy sizes for the dry run."""
    text = (ROOT / "scripts" / "device_run.sh").read_text()
    listed = re.search(r'^ALL_STEPS="([^"]+)"', text, re.M).group(1).split()
    extra = re.search(r'^EXTRA_STEPS="([^"]+)"', text, re.M).group(1).split()
    assert listed == STEPS and {"fewshot", "points"} <= set(extra)
    run = set(re.findall(r"^\s*run_step (\w+) ", text, re.M))
    assert run == set(listed) | set(extra), run
    start = text.index("if (( DRY )); then\n  # a few")
    dry = text[start:text.index("\nelse\n", start)]
    assert "FS=(--device cpu --quick)" in dry and "PTS=(--device cpu --quick)" in dry
    # 8 files come back from a device run: the default steps' JSONs and run.json + summary.md
    assert len(listed) + 2 <= 8
