"""Target resolution: exact, suffix, regex, slices, exclusions, errors with close names."""
import pytest
from conftest import ToyNet
from torch import nn

import visionpeft as vp
from visionpeft.core.targeting import parse_entry, resolve_targets


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_out": nn.ModuleList(
            [nn.Linear(4, 4), nn.Dropout()]), "attn": nn.MultiheadAttention(4, 1)}) for _ in range(2))
        self.to_q = nn.Conv2d(2, 2, 1)


def test_exact_and_suffix_matching():
    m = Nested()
    got = resolve_targets(m, ["to_q"])
    assert list(got) == ["blocks.0.to_q", "blocks.1.to_q", "to_q"]
    assert got["to_q"] == ("conv2d", ("full",))
    assert list(resolve_targets(m, ["blocks.1.to_q"])) == ["blocks.1.to_q"]
    assert list(resolve_targets(m, ["to_out.0"])) == ["blocks.0.to_out.0", "blocks.1.to_out.0"]
    # a suffix must end at a dot boundary: "q" is not a suffix of "to_q"
    with pytest.raises(vp.TargetError):
        resolve_targets(m, ["q"])


def test_regex_is_full_match_over_adaptable_layers():
    m = Nested()
    assert list(resolve_targets(m, [r"re:blocks\.\d+\.to_.*"])) == [
        "blocks.0.to_q", "blocks.0.to_out.0", "blocks.1.to_q", "blocks.1.to_out.0"]
    with pytest.raises(vp.TargetError):
        resolve_targets(m, [r"re:blocks.0.to_out"])  # full match: to_out.0 is not hit


def test_exclude_and_slices():
    m = ToyNet()
    got = resolve_targets(m, ["qkv[q,v]", "attn", "re:conv.*"], exclude_modules=["conv_grp", "attn[out]"])
    assert got == {"qkv": ("linear", ("q", "v")), "conv": ("conv2d", ("full",)),
                   "conv_dil": ("conv2d", ("full",)), "attn": ("mha", ("in_proj",))}


def test_mha_out_proj_goes_through_the_mha_wrapper():
    m = ToyNet()
    assert resolve_targets(m, ["attn.out_proj"]) == {"attn": ("mha", ("out_proj",))}
    assert resolve_targets(m, ["attn[k, out]"]) == {"attn": ("mha", ("k", "out_proj"))}


def test_parse_entry_regex_selector_vs_char_class():
    assert parse_entry(r"re:.*\.attn[q,v]") == (r".*\.attn", ("q", "v"), True)
    assert parse_entry(r"re:layer[0-9]") == (r"layer[0-9]", None, True)
    assert parse_entry("qkv[q, out]") == ("qkv", ("q", "out_proj"), False)


@pytest.mark.parametrize("entry,message", [
    ("projj", r"closest adaptable module names: \['proj'"),
    ("qkv[x]", r"unknown slice\(s\) \['x'\]"),
    ("proj[q]", "multiple of 3"),
    ("conv[q]", "not to Conv2d"),
])
def test_errors_say_what_is_wrong(entry, message):
    with pytest.raises(vp.TargetError, match=message):
        resolve_targets(ToyNet(), [entry])


def test_container_target_lists_its_adaptable_children():
    m = Nested()
    with pytest.raises(vp.TargetError, match=r"not an adaptable layer.*children: \['to_q', 'to_out.0', 'attn'\]"):
        resolve_targets(m, ["blocks.0"])


def test_whole_and_slice_overlap_is_refused():
    with pytest.raises(vp.TargetError, match="both as a whole and by slices"):
        resolve_targets(ToyNet(), ["qkv", "qkv[q]"])


def test_config_validation_and_json_round_trip():
    cfg = vp.LoRAConfig(r=4, alpha=8, target_modules="re:.*qkv", dropout=0.1)
    assert cfg.target_modules == ("re:.*qkv",)
    again = vp.LoRAConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert again == cfg
    from visionpeft.core.registry import config_from_dict
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(vp.ConfigError, match="r must be an integer >= 1"):
        vp.LoRAConfig(r=0, target_modules=["x"])
    with pytest.raises(vp.ConfigError, match="target_modules is empty"):
        vp.LoRAConfig()
    with pytest.raises(vp.ConfigError, match=r"no field\(s\) \['rank'\]"):
        vp.LoRAConfig.from_dict({"method": "lora", "rank": 4, "target_modules": ["x"]})
    with pytest.raises(vp.ConfigError, match="init='svd' is not allowed"):
        vp.LoRAConfig(init="svd", target_modules=["x"])
    with pytest.raises(vp.ConfigError, match="dropout"):
        vp.LoRAConfig(dropout=1.5, target_modules=["x"])


def test_inject_never_mutates_the_config():
    cfg = vp.LoRAConfig(r=2, target_modules=["proj"])
    before = cfg.to_dict()
    vp.inject(ToyNet(), cfg)
    assert cfg.to_dict() == before


def test_exclusions_that_remove_every_target_are_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(vp.TargetError, match="removes every layer"):
        vp.inject(model, vp.LoRAConfig(r=1, target_modules=["0", "1"], exclude_modules=["re:.*"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(type(m) is nn.Linear for m in model)


def test_an_invalid_regex_names_the_entry():
    with pytest.raises(vp.TargetError, match="not a valid regular expression"):
        vp.inject(nn.Sequential(nn.Linear(4, 4)), vp.LoRAConfig(r=1, target_modules=["re:["]))
