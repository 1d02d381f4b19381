"""scripts/bench_points.py --quick, run as a user would: both training variants are timed
and counted (full fine-tuning trains every parameter, Point-PEFT its own), and the point
ops against their references (no timing threshold: speed is the benchmark's figure)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_points_benchmark_quick(tmp_path):
    out = tmp_path / "points.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_points.py"), "--quick", "--threads", "1",
                          "--device", "cpu", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    full, peft = result["steps"]
    assert (full["variant"], peft["variant"]) == ("full_finetune", "point_peft")
    assert 0 < peft["trainable"] < full["trainable"] and all(r["step_s"] > 0 for r in result["steps"])
    assert [o["op"] for o in result["ops"]] == ["fps", "knn"] and all(o["ours_ms"] > 0 for o in result["ops"])
    assert result["point_peft_vs_full"]["trainable"] == round(peft["trainable"] / full["trainable"], 4)
