"""scripts/bench_clora.py --quick, run as a user would: every (mode, N) cell is measured
and written (no timing threshold: how fast is the benchmark's job, not a test's)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_clora_benchmark_quick(tmp_path):
    out = tmp_path / "clora.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_clora.py"), "--quick", "--threads", "1",
                          "--output", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["quick"] and result["memory_method"]
    assert [row["concepts"] for row in result["results"]] == [1, 2]
    phases = {"batched": ("update", "forward"), "sequential": ("update", "forward"), "diffusers": ("forward",)}
    for row in result["results"]:
        n = row["concepts"]
        assert set(row["cells"]) == set(phases)
        for mode, wanted in phases.items():
            cell = row["cells"][mode]
            for phase in wanted:
                assert cell[phase]["ms"] > 0 and all(t > 0 for t in cell[phase]["ms_rounds"]), (n, mode, phase)
                assert cell[phase]["peak_mb"] > 0, (n, mode, phase)
        # one UNet pass a step batched, one per branch sequential: the modes are what they say
        assert row["cells"]["batched"]["unet_passes_per_step"] == 1
        assert row["cells"]["sequential"]["unet_passes_per_step"] == n + 1
        assert max(row["batched_vs_sequential_max_abs_diff"].values()) < 1e-3  # the same computation
        assert row["ratios"]["update_batched_over_sequential"]["median"] > 0
    assert "| N |" in run.stdout  # the markdown table
