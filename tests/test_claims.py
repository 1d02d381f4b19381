"""README promises with no other home: foreign files with LoKr Tucker factors, LoCon Tucker
cores or DoRA entries are refused, by load, import and hot-swap, with what was found, and
the model is left untouched (LoHa Tucker cores: test_loha.py)."""
import json

import pytest
import torch
from conftest import assert_file_refused, randomize_adapters
from safetensors.torch import save_file
from torch import nn

import visionpeft as vp


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)

    def forward(self, img):
        return self.fc1(self.conv(img).mean((2, 3)))


def _t(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


# name -> (file tensors, or a PEFT folder's (tensors, config); the refusal; the adapter a
# hot-swap would write into)
LORA_FC1 = vp.LoRAConfig(r=2, target_modules=["fc1"])
REFUSED = {
    "lokr_tucker": ({"lycoris_conv.lokr_w1": _t(2, 1), "lycoris_conv.lokr_w2_a": _t(4, 2),
                     "lycoris_conv.lokr_w2_b": _t(2, 3), "lycoris_conv.lokr_t2": _t(2, 2, 3, 3)},
                    r"lycoris_conv stores LoKr's Tucker core \(\['lokr_t2'", vp.KronAConfig(target_modules=["conv"])),
    "lokr_low_rank": ({"lycoris_fc1.lokr_w1": _t(3, 2), "lycoris_fc1.lokr_w2_a": _t(4, 1),
                       "lycoris_fc1.lokr_w2_b": _t(1, 4)},
                      r"lycoris_fc1 stores LoKr with low-rank w1/w2", vp.KronAConfig(target_modules=["fc1"])),
    "locon_tucker": ({"lycoris_conv.lora_down.weight": _t(2, 3, 1, 1), "lycoris_conv.lora_mid.weight": _t(2, 2, 3, 3),
                      "lycoris_conv.lora_up.weight": _t(8, 2, 1, 1)},
                     r"lycoris_conv has \['lora_mid.weight'\]", vp.LoRAConfig(r=2, target_modules=["conv"])),
    "lycoris_dora": ({"lycoris_conv.lokr_w1": _t(2, 1), "lycoris_conv.lokr_w2": _t(4, 3, 3, 3),
                      "lycoris_conv.dora_scale": _t(8, 1)},
                     r"lycoris_conv stores DoRA's magnitude vector \(\['dora_scale'\]\)",
                     vp.KronAConfig(target_modules=["conv"])),
    "kohya_dora": ({"lora_unet_fc1.lora_down.weight": _t(2, 8), "lora_unet_fc1.lora_up.weight": _t(12, 2),
                    "lora_unet_fc1.alpha": torch.tensor(2.0), "lora_unet_fc1.dora_scale": _t(1, 8)},
                   r"lora_unet_fc1 has \['dora_scale'\]; only lora_down/lora_up/alpha convert .*DoRA", LORA_FC1),
    "diffusers_dora": ({"unet.fc1.lora_A.weight": _t(2, 8), "unet.fc1.lora_B.weight": _t(12, 2),
                        "unet.fc1.lora_magnitude_vector": _t(12)},
                       r"not lora_A/lora_B weights \(alphas, DoRA .*\['unet.fc1.lora_magnitude_vector'\]", LORA_FC1),
    "peft_dora": (({"base_model.model.fc1.lora_A.weight": _t(2, 8), "base_model.model.fc1.lora_B.weight": _t(12, 2),
                    "base_model.model.fc1.lora_magnitude_vector": _t(12)},
                   {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc1"], "use_dora": True}),
                  r"is a DoRA adapter \(use_dora\); its magnitude vector has no LoRA form", LORA_FC1),
}


def _write(tmp_path, name):
    content = REFUSED[name][0]
    if isinstance(content, tuple):  # a PEFT folder
        folder = tmp_path / name
        folder.mkdir()
        save_file(content[0], str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(content[1]))
        return folder
    path = tmp_path / f"{name}.safetensors"
    save_file(content, str(path))
    return path


@pytest.mark.parametrize("how", ["load", "import", "hotswap"])
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_tucker_low_rank_and_dora_files_are_refused_and_the_model_untouched(tmp_path, name, how):
    path = _write(tmp_path, name)
    _, match, swap_into = REFUSED[name]
    torch.manual_seed(0)
    model = Small()
    if how == "hotswap":  # a loaded adapter of the method that holds the layout, on the file's layer
        vp.inject(model, swap_into, name="a")
        randomize_adapters(model)
    assert_file_refused(model, path, how, match, "a", tmp_path)
