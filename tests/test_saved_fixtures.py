"""Adapter folders saved by visionpeft 0.1.0 (tests/fixtures/saved_v0_1_0, written once by
make_saved_adapters.py and never regenerated) still load and give the outputs they gave."""
from pathlib import Path

import pytest
import torch
from conftest import ToyNet, toy_inputs
from safetensors.torch import load_file

import visionpeft as vp

FIXTURES = Path(__file__).parent / "fixtures" / "saved_v0_1_0"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_the_fixtures_are_there():
    assert {"lora", "krona", "wara", "snell", "block_lora", "lora_pattern_and_head", "adapter_block"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_a_folder_saved_by_0_1_0_loads_with_its_outputs(case):
    torch.manual_seed(0)
    model = ToyNet().eval()
    x, img = toy_inputs()
    with torch.no_grad():
        base = model(x, img)
    vp.load_adapter(model, FIXTURES / case)
    assert vp.active_adapters(model) == (case,)
    expected = load_file(str(FIXTURES / case / "expected_output.safetensors"))["output"]
    with torch.no_grad():
        out = model(x, img)
    assert not torch.allclose(out, base)  # the adapter does something
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
