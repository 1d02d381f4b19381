"""scripts/bench_fewshot.py --quick, run as a user would: every variant is built, checked,
timed and written, and its trainable parameters are the hand-computed count for CLIP-LoRA's
r on the tiny CLIP's widths (no timing threshold: how fast is the benchmark's job, not a
test's)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("open_clip")
pytest.importorskip("peft")

VARIANTS = ["frozen", "lora", "block_lora_n2", "block_lora_n4", "block_lora_n8", "peft_lora", "lora_nodrop",
            "block_lora_n8_nodrop"]


def per_attention(kind: str, r: int, e: int) -> int:
    """Trainable parameters of one adapted nn.MultiheadAttention of width e."""
    kind = kind.removesuffix("_nodrop")  # dropout changes no parameter
    if kind == "frozen":
        return 0
    if kind == "lora":  # q, k, v slices: A (r, e) and B (e, r) each
        return 3 * (r * e + e * r)
    if kind.startswith("block_lora_n"):  # q, k, v slices: A0 (r, e / n) shared by the n blocks, B (e, r)
        n = int(kind.rsplit("n", 1)[1])
        return 3 * (r * (e // n) + e * r)
    if kind == "peft_lora":  # the whole in_proj: A (r, e), B (3e, r); and out_proj: A (r, e), B (e, r)
        return (r * e + 3 * e * r) + (r * e + e * r)
    raise AssertionError(kind)


def test_fewshot_benchmark_quick(tmp_path):
    out = tmp_path / "fewshot.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_fewshot.py"), "--quick", "--threads", "1",
                          "--output", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["complete"] and result["quick"] and result["memory_method"]
    assert result["recipe"]["r"] == 2 and result["recipe"]["dropout"] == 0.25
    assert result["recipe"]["scale"] == pytest.approx(result["recipe"]["alpha"] / 2 ** 0.5)
    assert result["widths"] == {"vision": 64, "text": 32}  # the tiny CLIP
    assert result["text_tokens"] == [result["classes"], 77]  # the real tokenizer's context
    layers, r, w = result["layers_per_tower"], result["recipe"]["r"], result["widths"]
    assert list(result["variants"]) == VARIANTS
    for kind, v in result["variants"].items():
        t = v["trainable"]
        assert v["attentions"] == 2 * layers, kind
        assert t["vision"] == layers * per_attention(kind, r, w["vision"]), kind
        assert t["text"] == layers * per_attention(kind, r, w["text"]), kind
        assert t["total"] == t["vision"] + t["text"], kind
        c = v["checks"]
        # B = 0: the host's logits, up to the kernels' rounding (float32)
        assert c["init_max_abs_diff"] <= 1e-5 * result["max_abs_logit"], kind
        assert c["init_max_abs_diff_autograd"] <= 1e-5 * result["max_abs_logit"], kind
        if kind != "frozen":
            assert c["moved_max_abs_diff_from_host"] > 0, kind  # the adapters reach the logits
            assert isinstance(c["dropout_in_effect"], bool), kind
    assert result["autograd_control_max_abs_diff"] <= 1e-5 * result["max_abs_logit"]
    # vp applies CLIP-LoRA's dropout on the attention's inputs in training; without dropout nothing is random
    for kind in ("lora", "block_lora_n2", "block_lora_n4", "block_lora_n8"):
        assert result["variants"][kind]["checks"]["dropout_in_effect"] is True, kind
    for kind in ("lora_nodrop", "block_lora_n8_nodrop"):
        assert result["variants"][kind]["checks"]["dropout_in_effect"] is False, kind
    # PEFT's MHA layer: one pair over the whole in_proj and one on out_proj, per attention
    e = w["vision"]
    shapes = result["variants"]["peft_lora"]["trainable"]["shapes"]
    assert shapes[f"{3 * e}x{r}"] == layers and shapes[f"{e}x{r}"] == layers and shapes[f"{r}x{e}"] == 2 * layers
    # ours: a pair per q / k / v slice
    assert result["variants"]["lora"]["trainable"]["shapes"][f"{e}x{r}"] == 3 * layers
    assert [c["autocast"] for c in result["cells"]] == [None]  # CPU: fp32 only
    cell = result["cells"][0]
    assert cell["reference"] == "lora" and list(cell["step"]) == VARIANTS
    for kind, s in cell["step"].items():
        assert s["ms"] > 0 and len(s["ms_rounds"]) == result["rounds"] and s["ratio"] > 0, kind
        assert cell["peak_mb"][kind] > 0 and cell["peak_ratio"][kind] > 0, kind
        assert ("minus_frozen_ms" in s) == (kind != "frozen"), kind
    assert cell["step"]["lora"]["ratio"] == 1.0 and cell["peak_ratio"]["lora"] == 1.0
    assert "| variant |" in run.stdout  # the markdown table
