"""Export/import against the real loaders: PEFT's PeftModel, diffusers' load_lora_adapter
and lora_state_dict (its kohya conversion included), LyCORIS's create_lycoris_from_weights,
and load_state_dict(strict=True) for merged files."""
import copy

import pytest
import torch
from conftest import ToyNet, Untouched, randomize_adapters
from safetensors.torch import load_file, save_file
from torch import nn

import visionpeft as vp
from visionpeft.backbones.tiny import build_tiny, example_inputs, run_host

UNET_ATTN = "re:.*attn[12]\\.(to_q|to_k|to_v|to_out\\.0)"


class Small(nn.Module):
    """Linear and conv hosts with the names kohya/LyCORIS flatten without clashes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)

    def forward(self, img):
        h = self.conv(img).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def _img():
    return torch.randn(2, 3, 7, 7, generator=torch.Generator().manual_seed(1))


def _lora_small(seed=0, **kw):
    torch.manual_seed(seed)
    model = Small()
    vp.inject(model, vp.LoRAConfig(r=3, alpha=5, target_modules=["conv", "fc1", "fc2"], **kw), name="a")
    randomize_adapters(model, seed)
    return model


# --- PEFT -------------------------------------------------------------------------------
def test_peft_export_loads_in_peft_with_the_same_outputs(tmp_path):
    from peft import PeftModel

    model = _lora_small()
    vp.set_scale(model, "a", 0.7)
    x = _img()
    with torch.no_grad():
        ours = model(x)
    vp.export(model, tmp_path / "peft", name="a", format="peft")
    torch.manual_seed(0)
    theirs = PeftModel.from_pretrained(Small(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, atol=1e-4, rtol=1e-4)


def test_peft_export_of_qkv_slices_uses_a_rank_pattern(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = build_tiny("timm_vit")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["re:blocks\\.\\d+\\.attn\\.qkv[q,v]",
                                                        "re:blocks\\.\\d+\\.mlp\\.fc1"]), name="a")
    randomize_adapters(model)
    inputs = example_inputs("timm_vit")
    with torch.no_grad():
        ours = run_host("timm_vit", model, inputs)
    vp.export(model, tmp_path / "p", format="peft")
    theirs = PeftModel.from_pretrained(build_tiny("timm_vit"), tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(run_host("timm_vit", theirs, inputs), ours, atol=1e-4, rtol=1e-4)


def test_peft_files_import_with_peft_outputs(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    host = Small()
    fresh = copy.deepcopy(host)
    cfg = LoraConfig(r=4, lora_alpha=6, target_modules=["conv", "fc1", "fc2"], init_lora_weights=False,
                     rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 8})
    peft_model = get_peft_model(host, cfg).eval()
    peft_model.save_pretrained(tmp_path / "p")
    x = _img()
    vp.load_adapter(fresh, tmp_path / "p", name="imported")  # detected as PEFT
    assert vp.active_adapters(fresh) == ("imported",)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), peft_model(x), atol=1e-5, rtol=1e-5)


# --- diffusers and kohya ------------------------------------------------------------------
def _unet_with_lora(rank_pattern=()):
    unet = build_tiny("sd_unet")
    vp.inject(unet, vp.LoRAConfig(r=4, alpha=2, rank_pattern=rank_pattern, target_modules=[UNET_ATTN]), name="dog")
    randomize_adapters(unet, std=0.1)
    return unet


def test_diffusers_export_loads_in_diffusers_with_the_same_outputs(tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _unet_with_lora()
    inputs = example_inputs("sd_unet")
    with torch.no_grad():
        ours = run_host("sd_unet", unet, inputs)
    report = vp.export(unet, tmp_path, name="dog", format="diffusers")
    assert report.path.name == "pytorch_lora_weights.safetensors"
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(report.path))
    assert state_dict and all(k.startswith("unet.") for k in state_dict)
    theirs = build_tiny("sd_unet")
    theirs.load_lora_adapter(str(report.path), prefix="unet", adapter_name="dog")
    with torch.no_grad():
        torch.testing.assert_close(run_host("sd_unet", theirs, inputs), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_metadata", [False, True])
def test_diffusers_files_import_with_diffusers_outputs(tmp_path, with_metadata):
    """Written by diffusers' own save_lora_weights; with its adapter metadata the file's
    alpha (8 for r 4, scale 2) must be honoured, without it diffusers reads scale 1."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    alpha = 8 if with_metadata else 4
    cfg = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    lora = build_tiny("sd_unet")
    lora.add_adapter(cfg)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(lora),
        unet_lora_adapter_metadata=cfg.to_dict() if with_metadata else None)
    assert vp.detect_format(tmp_path) == "diffusers"
    state_dict, _, metadata = StableDiffusionPipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    theirs = build_tiny("sd_unet")  # what pipe.load_lora_weights does with the file
    theirs.load_lora_adapter(state_dict, prefix="unet", metadata=metadata)
    ours = build_tiny("sd_unet")
    vp.import_adapter(ours, tmp_path, name="x")
    inputs = example_inputs("sd_unet")
    with torch.no_grad():
        expected = run_host("sd_unet", theirs, inputs)
        torch.testing.assert_close(run_host("sd_unet", ours, inputs), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(run_host("sd_unet", lora, inputs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rank_pattern", [(), {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 2}])
def test_kohya_export_is_read_by_diffusers_conversion(tmp_path, rank_pattern):
    """With layers of other ranks too: the file pads every layer to one rank, since
    diffusers' conversion pairs per-layer alphas with the wrong layers."""
    from diffusers import StableDiffusionPipeline

    unet = _unet_with_lora(rank_pattern)
    inputs = example_inputs("sd_unet")
    with torch.no_grad():
        ours = run_host("sd_unet", unet, inputs)
    path = vp.export(unet, tmp_path / "k.safetensors", format="kohya").path
    keys = list(load_file(str(path)))
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.")
               for k in keys)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))  # kohya -> diffusers
    theirs = build_tiny("sd_unet")
    theirs.load_lora_adapter(state_dict, network_alphas=alphas, prefix="unet", adapter_name="k")
    with torch.no_grad():
        torch.testing.assert_close(run_host("sd_unet", theirs, inputs), ours, atol=1e-4, rtol=1e-4)


def test_kohya_file_imports_with_its_alpha(tmp_path):
    """A hand-written kohya file: dW = alpha / r * up @ down, conv included."""
    torch.manual_seed(0)
    model = Small()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, host in (("fc1", model.fc1), ("conv", model.conv)):
        down = torch.randn(2, *host.weight.shape[1:], generator=g)
        up = torch.randn(host.weight.shape[0], 2, *([1, 1] if name == "conv" else []), generator=g)
        tensors.update({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                        f"lora_unet_{name}.alpha": torch.tensor(3.0)})
        with torch.no_grad():
            w = getattr(ref, name).weight
            w += 1.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    vp.import_adapter(model, tmp_path / "k.safetensors", name="k")
    x = _img()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_a_diffusers_file_hot_swaps_into_a_compiled_lora(tmp_path):
    from torch._dynamo.testing import CompileCounter

    source = _lora_small(seed=0)  # r 3 and alpha 5; the target below has r 4, alpha 2
    randomize_adapters(source, 5)
    path = vp.export(source, tmp_path / "f.safetensors", format="diffusers", prefix="m").path
    x = _img()
    with torch.no_grad():
        expected = source(x)
    torch.manual_seed(0)
    model = Small()
    vp.inject(model, vp.LoRAConfig(r=4, alpha=2, target_modules=["conv", "fc1", "fc2"]), name="a")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(x)
        frames = counter.frame_count
        vp.load_adapter(model, path, name="a", hotswap=True)
        out = compiled(x)
    assert counter.frame_count == frames
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # conv and fc1 would take the file's rank 3, fc2 cannot: the refusal must leave all three
    small = Small()
    vp.inject(small, vp.LoRAConfig(r=4, rank_pattern={"fc2": 2}, target_modules=["conv", "fc1", "fc2"]), name="a")
    randomize_adapters(small, 2)
    kept = Untouched(small, tmp_path)
    with pytest.raises(vp.InteropError, match="does not fit rank 2"):
        vp.load_adapter(small, path, name="a", hotswap=True)
    kept.check()


def _lycoris_network_file(path, seed, std, **kw):
    """A LyCORIS network on a Small host (create_lycoris(**kw)), its parameters set at
    random, saved by LyCORIS to ``path``: -> (an untouched copy of the host, the network's
    output on _img(), that input)."""
    from lycoris import create_lycoris

    torch.manual_seed(0)
    host = Small()
    fresh = copy.deepcopy(host)
    network = create_lycoris(host, 1.0, **kw)
    network.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    network.save_weights(str(path), torch.float32, None)
    x = _img()
    with torch.no_grad():
        return fresh, host(x), x


def test_lycoris_lora_file_imports_through_the_kohya_layout(tmp_path):
    """LyCORIS's LoCon writes lora_down / lora_up / alpha (the kohya layout) under
    prefix "lycoris", with alpha != r, Linear and conv."""
    fresh, expected, x = _lycoris_network_file(tmp_path / "locon.safetensors", 6, 0.3, linear_dim=4,
                                               linear_alpha=2, conv_dim=4, conv_alpha=8, algo="lora")
    assert vp.detect_format(tmp_path / "locon.safetensors") == "kohya"
    vp.import_adapter(fresh, tmp_path / "locon.safetensors", name="l")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


# --- LyCORIS LoKr -------------------------------------------------------------------------
def _krona_small():
    torch.manual_seed(0)
    model = Small()
    vp.inject(model, vp.KronAConfig(alpha=0.5, target_modules=["conv", "fc1", "fc2"]), name="kr")
    randomize_adapters(model)
    return model


def test_lycoris_export_loads_in_lycoris_with_the_same_outputs(tmp_path):
    from lycoris import create_lycoris_from_weights

    model = _krona_small()
    x = _img()
    with torch.no_grad():
        ours = model(x)
    path = vp.export(model, tmp_path / "lokr.safetensors", format="lycoris").path
    torch.manual_seed(0)
    host = Small()
    network, _ = create_lycoris_from_weights(1.0, str(path), host)
    assert len(network.loras) == 3
    network.apply_to()
    with torch.no_grad():
        torch.testing.assert_close(host(x), ours, atol=1e-5, rtol=1e-5)


def test_lycoris_lokr_file_imports_as_krona(tmp_path):
    fresh, expected, x = _lycoris_network_file(tmp_path / "lokr.safetensors", 4, 0.3, linear_dim=100000,
                                               linear_alpha=1, algo="lokr", factor=-1, full_matrix=True)
    vp.import_adapter(fresh, tmp_path / "lokr.safetensors", name="kr")
    assert vp.get_method(vp.core.model_ops.get_state(fresh).configs["kr"].method).name == "krona"
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)


def test_decomposed_lokr_is_refused_and_the_model_untouched(tmp_path):
    save_file({"lycoris_fc1.lokr_w1": torch.randn(3, 2), "lycoris_fc1.lokr_w2_a": torch.randn(4, 1),
               "lycoris_fc1.lokr_w2_b": torch.randn(1, 4)}, str(tmp_path / "d.safetensors"))
    model = Small()
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match=r"fc1 stores LoKr with low-rank w1/w2"):
        vp.import_adapter(model, tmp_path / "d.safetensors")
    kept.check()


# --- LyCORIS LoHa -------------------------------------------------------------------------
def _loha_small(alpha=5.0, r=3):
    torch.manual_seed(0)
    model = Small()
    vp.inject(model, vp.LoHaConfig(r=r, alpha=alpha, target_modules=["conv", "fc1", "fc2"]), name="lh")
    randomize_adapters(model, std=0.5)
    return model


def test_loha_export_loads_in_lycoris_and_reimports_to_the_same_file(tmp_path):
    from lycoris import create_lycoris_from_weights

    model = _loha_small()
    vp.set_scale(model, "lh", 0.7)  # folded into hada_w1_a
    x = _img()
    with torch.no_grad():
        ours = model(x)
    path = vp.export(model, tmp_path / "loha.safetensors", format="lycoris").path
    written = load_file(str(path))
    assert sorted(k.split(".", 1)[1] for k in written if k.startswith("lycoris_fc1.")) == \
        ["alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    assert float(written["lycoris_fc1.alpha"]) == 5.0  # the config's alpha, tensors as they are
    torch.manual_seed(0)
    host = Small()
    with torch.no_grad():
        assert (host(x) - ours).abs().max() > 1e-2
    network, _ = create_lycoris_from_weights(1.0, str(path), host)
    assert len(network.loras) == 3
    network.apply_to()  # LyCORIS's forward (its merge_to applies alpha / r twice: a LyCORIS bug)
    with torch.no_grad():
        torch.testing.assert_close(host(x), ours, atol=1e-5, rtol=1e-5)
    # our import of our export: the same adapter, and exported again the same file
    torch.manual_seed(0)
    fresh = Small()
    assert vp.detect_format(path) == "lycoris"
    vp.load_adapter(fresh, path, name="back")
    assert vp.core.model_ops.get_state(fresh).configs["back"].method == "loha"
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours, atol=1e-6, rtol=1e-6)
    again = load_file(str(vp.export(fresh, tmp_path / "again.safetensors", format="lycoris").path))
    assert written.keys() == again.keys()
    for k in written:
        torch.testing.assert_close(again[k], written[k], atol=0, rtol=0)


def test_lycoris_loha_network_imports_as_loha_and_hot_swaps(tmp_path):
    fresh, expected, x = _lycoris_network_file(tmp_path / "loha.safetensors", 5, 0.5, linear_dim=4,
                                               linear_alpha=2, conv_dim=2, conv_alpha=4, algo="loha")
    vp.import_adapter(fresh, tmp_path / "loha.safetensors", name="lh")
    with torch.no_grad():
        out = fresh(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # hot-swap the same file into a loaded LoHa of the same layers (the conv's rank 2 is
    # zero-padded to 4): the same parameter objects
    target = _loha_small(alpha=None, r=4)
    with torch.no_grad():
        target_before = target(x)
    params = [id(p) for p in target.parameters()]
    vp.load_adapter(target, tmp_path / "loha.safetensors", name="lh", hotswap=True)
    assert [id(p) for p in target.parameters()] == params
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, atol=1e-5, rtol=1e-5)
        assert (target_before - expected).abs().max() > 1e-2
    # a LoRA adapter cannot take LoHa factors
    lora = _lora_small()
    kept = Untouched(lora, tmp_path)
    with pytest.raises(vp.InteropError, match="holds loha factors; 'a' is lora"):
        vp.load_adapter(lora, tmp_path / "loha.safetensors", name="a", hotswap=True)
    kept.check()


def test_tucker_loha_is_refused_and_the_model_untouched(tmp_path):
    save_file({"lycoris_fc1.hada_w1_a": torch.randn(12, 2), "lycoris_fc1.hada_w1_b": torch.randn(2, 8),
               "lycoris_fc1.hada_w2_a": torch.randn(12, 2), "lycoris_fc1.hada_w2_b": torch.randn(2, 8),
               "lycoris_fc1.hada_t1": torch.randn(2, 2, 1, 1)}, str(tmp_path / "t.safetensors"))
    model = Small()
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match="fc1 stores LoHa's Tucker cores"):
        vp.import_adapter(model, tmp_path / "t.safetensors")
    kept.check()


# --- merged and SVD -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "krona", "block_lora", "wara", "snell", "loha"])
def test_merged_export_loads_strictly_into_a_fresh_host(tmp_path, method):
    from conftest import METHOD_CONFIGS

    torch.manual_seed(0)
    model = ToyNet()
    host_copy = copy.deepcopy(model)
    vp.inject(model, METHOD_CONFIGS[method](["qkv[q,v]", "proj", "conv", "attn"]), name="m")
    randomize_adapters(model)
    x, img = torch.randn(2, 5, 15), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ours = model(x, img)
    path = vp.export(model, tmp_path / "merged.safetensors", format="merged").path
    host_copy.load_state_dict(load_file(str(path)), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(host_copy(x, img), ours, atol=1e-5, rtol=1e-5)


def test_svd_export_reports_the_truncation_error(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = Small()
    vp.inject(model, vp.WaRAConfig(r=2, target_modules=["fc1", "fc2", "conv"]), name="w")
    randomize_adapters(model)
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match="rank="):
        vp.export(model, tmp_path / "x", format="peft")
    kept.check()
    dW = vp.delta_weight(model, "fc1")
    S = torch.linalg.svdvals(dW)
    report = vp.export(model, tmp_path / "r1", format="peft", rank=1)
    assert report.svd_error["fc1"] == pytest.approx(float(S[1:].norm() / S.norm()), rel=1e-4)
    full = vp.export(model, tmp_path / "full", format="peft", rank=12)
    assert full.max_error < 1e-6
    x = _img()
    with torch.no_grad():
        ours = model(x)
    torch.manual_seed(0)
    theirs = PeftModel.from_pretrained(Small(), tmp_path / "full").eval()  # same host weights
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, atol=1e-5, rtol=1e-5)


# --- bad input ----------------------------------------------------------------------------
def test_bad_files_are_refused_with_what_was_found(tmp_path):
    model = Small()
    good = _lora_small()
    path = vp.export(good, tmp_path / "k.safetensors", format="kohya").path
    data = path.read_bytes()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"weird.key": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    save_file({"lora_unet_nope.lora_down.weight": torch.zeros(2, 8), "lora_unet_nope.lora_up.weight":
               torch.zeros(12, 2)}, str(tmp_path / "nomatch.safetensors"))
    save_file({"lora_unet_fc1.lora_down.weight": torch.zeros(2, 9), "lora_unet_fc1.lora_up.weight":
               torch.zeros(12, 2)}, str(tmp_path / "shape.safetensors"))
    kept, kept_good = Untouched(model, tmp_path), Untouched(good, tmp_path)
    for file, match in (("junk", "not a readable safetensors"), ("cut", "truncated"),
                        ("other", "no known adapter layout"), ("nomatch", "lora_unet_nope"), ("shape", "fc1")):
        with pytest.raises(vp.InteropError, match=match):
            vp.import_adapter(model, tmp_path / f"{file}.safetensors")
        kept.check()
    with pytest.raises(ValueError, match="format must be one of"):
        vp.export(good, tmp_path / "x", format="ckpt")
    kept_good.check()
    with pytest.raises(vp.InteropError, match="KronA"):
        vp.export(good, tmp_path / "x.safetensors", format="lycoris")
    kept_good.check()


class Nested(nn.Module):
    """`fc1` and `head.fc1` (a suffix trap), `a_b` and `a.b` (the same kohya name), a
    grouped and a dilated conv."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.head = nn.ModuleDict({"fc1": nn.Linear(8, 8)})
        self.a_b = nn.Linear(8, 8)
        self.a = nn.ModuleDict({"b": nn.Linear(8, 8)})
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        h = self.a["b"](self.a_b(self.head["fc1"](self.fc1(x))))
        return h, self.dilated(self.grouped(x.view(-1, 4, 1, 2).expand(-1, 4, 3, 2).contiguous()))


def test_exact_targets_mixed_ranks_and_layouts_other_tools_cannot_hold(tmp_path):
    from peft import PeftModel

    x = torch.randn(3, 8)
    torch.manual_seed(0)
    model = Nested()
    vp.inject(model, vp.WaRAConfig(r=4, target_modules=["re:fc1", "re:a_b"]), name="w")
    randomize_adapters(model)
    with torch.no_grad():
        ours = model(x)[0]
    # rank 12 > 8: written at each layer's full rank; only fc1 and a_b, not head.fc1
    report = vp.export(model, tmp_path / "p", format="peft", rank=12)
    assert report.rank == 8 and report.max_error < 1e-5
    torch.manual_seed(0)
    theirs = PeftModel.from_pretrained(Nested(), tmp_path / "p")
    assert {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_parameters() if ".lora_A" in n} == \
        {"base_model.model.fc1", "base_model.model.a_b"}
    with torch.no_grad():
        torch.testing.assert_close(theirs(x)[0], ours, atol=1e-5, rtol=1e-5)
    # back into ours, beside the adapter already on those layers, at per-layer ranks
    vp.import_adapter(model, tmp_path / "p", name="back")
    vp.set_active(model, ["back"])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ours, atol=1e-5, rtol=1e-5)
    # kohya: a prefix with underscores is found; a_b and a.b cannot be told apart
    small = _lora_small()
    path = vp.export(small, tmp_path / "k.safetensors", format="kohya", prefix="my_model").path
    torch.manual_seed(0)
    again = Small()
    vp.import_adapter(again, path, name="k")
    with torch.no_grad():
        torch.testing.assert_close(again(_img()), small(_img()), atol=1e-5, rtol=1e-5)
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["re:a_b", "re:a\\.b"]), name="clash")
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match="flatten to the kohya name"):
        vp.export(model, tmp_path / "c.safetensors", name="clash", format="kohya")
    kept.check()
    save_file({"lora_unet_a_b.lora_down.weight": torch.zeros(1, 8), "lora_unet_a_b.lora_up.weight":
               torch.zeros(8, 1)}, str(tmp_path / "ab.safetensors"))
    nested = Nested()
    kept = Untouched(nested, tmp_path)
    with pytest.raises(vp.InteropError, match="share the kohya name"):
        vp.import_adapter(nested, tmp_path / "ab.safetensors")
    kept.check()


def test_grouped_and_dilated_convs_are_refused_where_loaders_build_conv_layers(tmp_path):
    model = Nested()
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["grouped", "dilated"]), name="c")
    randomize_adapters(model)
    kept = Untouched(model, tmp_path)
    for fmt in ("peft", "diffusers"):
        with pytest.raises(vp.InteropError, match="groups=2"):
            vp.export(model, tmp_path / fmt, format=fmt)
        kept.check()
    with pytest.warns(UserWarning, match="weight-patching|patch weights"):
        path = vp.export(model, tmp_path / "k.safetensors", format="kohya").path
    x = torch.randn(3, 8)
    with torch.no_grad():
        ours = model(x)[1]
    fresh = copy.deepcopy(model)
    vp.remove(fresh)
    vp.import_adapter(fresh, path, name="k")  # our reader patches weights: exact
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[1], ours, atol=1e-5, rtol=1e-5)


# --- review fixes: component picking, dW shapes, mismatched ranks, our own folders ------
def test_a_diffusers_file_for_two_models_goes_to_the_one_that_fits(tmp_path):
    model = _lora_small()
    vp.export(model, tmp_path / "one.safetensors", format="diffusers")
    tensors = load_file(str(tmp_path / "one.safetensors"))
    other = {"text_encoder.encoder.layers.0.q_proj.lora_A.weight": torch.randn(2, 8),
             "text_encoder.encoder.layers.0.q_proj.lora_B.weight": torch.randn(8, 2)}
    save_file({**tensors, **other}, str(tmp_path / "two.safetensors"))
    x = _img()
    with torch.no_grad():
        expected = model(x)
    torch.manual_seed(0)
    fresh = Small()
    vp.load_adapter(fresh, tmp_path / "two.safetensors", name="u")  # only unet.* fits Small
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, atol=1e-5, rtol=1e-5)
    both = {**tensors, **{k.replace("unet.", "transformer.", 1): v.clone() for k, v in tensors.items()}}
    save_file(both, str(tmp_path / "both.safetensors"))
    torch.manual_seed(0)
    blank = Small()
    kept = Untouched(blank, tmp_path)
    with pytest.raises(vp.InteropError, match=r"holds LoRAs for \['transformer', 'unet'\]; say which with prefix"):
        vp.load_adapter(blank, tmp_path / "both.safetensors")
    kept.check()
    vp.load_adapter(blank, tmp_path / "both.safetensors", prefix="transformer")
    with torch.no_grad():
        torch.testing.assert_close(blank(x), expected, atol=1e-5, rtol=1e-5)


def test_a_file_whose_dw_has_another_shape_is_refused_naming_both(tmp_path):
    # a (1, 9) kernel has as many entries as the conv's (3, 3): only the full shape tells
    save_file({"lora_unet_conv.lora_down.weight": torch.randn(2, 3, 1, 9),
               "lora_unet_conv.lora_up.weight": torch.randn(8, 2, 1, 1)}, str(tmp_path / "k.safetensors"))
    model = Small()
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match=r"conv: the file gives dW \(8, 3, 1, 9\), the layer's weight is "
                                              r"\(8, 3, 3, 3\)"):
        vp.load_adapter(model, tmp_path / "k.safetensors")
    kept.check()
    # a file for a wider layer: named as a shape problem, not as a rank
    save_file({"unet.fc1.lora_A.weight": torch.randn(8, 64), "unet.fc1.lora_B.weight": torch.randn(64, 8)},
              str(tmp_path / "wide.safetensors"))
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match=r"fc1: the file gives dW \(64, 64\), the layer's weight is \(12, 8\)"):
        vp.load_adapter(model, tmp_path / "wide.safetensors")
    kept.check()
    loaded = _lora_small()
    kept = Untouched(loaded, tmp_path)
    with pytest.raises(vp.InteropError, match=r"fc1: the file gives dW \(64, 64\)"):
        vp.load_adapter(loaded, tmp_path / "wide.safetensors", name="a", hotswap=True)
    kept.check()


def test_a_lora_pair_of_two_ranks_is_refused_with_the_module(tmp_path):
    save_file({"unet.fc1.lora_A.weight": torch.randn(2, 8), "unet.fc1.lora_B.weight": torch.randn(12, 3)},
              str(tmp_path / "r.safetensors"))
    model = Small()
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.InteropError, match="fc1: down has rank 2, up rank 3"):
        vp.load_adapter(model, tmp_path / "r.safetensors")
    kept.check()


def test_interop_calls_on_our_own_folder_say_what_it_is(tmp_path):
    from visionpeft import interop

    vp.save_adapter(_lora_small(), tmp_path / "ours", name="a")
    assert vp.detect_format(tmp_path / "ours") == "visionpeft"
    with pytest.raises(vp.InteropError, match="is a vp.save_adapter folder, not a foreign format"):
        interop.detect_format(tmp_path / "ours")


# --- PEFT modules_to_save -----------------------------------------------------------------
class _Headed(nn.Module):
    """A LoRA target, a trained head (a Sequential: dotted parameter names) and a module
    whose name ends like the head's (PEFT matches modules_to_save by plain suffix)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.subhead = nn.Linear(12, 12)
        self.head = nn.Sequential(nn.Linear(12, 5), nn.LayerNorm(5))

    def forward(self, x):
        return self.head(torch.relu(self.subhead(torch.relu(self.fc1(x)))))


def _headed_with_trained_head():
    torch.manual_seed(0)
    model = _Headed()
    vp.inject(model, vp.LoRAConfig(r=3, alpha=5, target_modules=["fc1"], modules_to_save=["head"]), name="a")
    randomize_adapters(model, 0)
    with torch.no_grad():
        for p in model.head.copies["a"].parameters():
            p.add_(torch.randn_like(p))
    return model


def test_peft_export_writes_modules_to_save_as_peft_does_and_peft_loads_them(tmp_path):
    import json
    import warnings

    from peft import PeftModel

    model = _headed_with_trained_head()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "modules_to_save are not written" warning for peft
        vp.export(model, tmp_path / "peft", format="peft")
    keys = sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert keys == ["base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight",
                    "base_model.model.head.0.bias", "base_model.model.head.0.weight",
                    "base_model.model.head.1.bias", "base_model.model.head.1.weight",
                    "base_model.model.subhead.bias", "base_model.model.subhead.weight"]  # as PEFT writes
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
    torch.manual_seed(0)
    theirs = PeftModel.from_pretrained(_Headed(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, atol=1e-5, rtol=1e-5)
    # and back: the trained head comes back as a trained copy of the imported adapter
    torch.manual_seed(0)
    fresh = _Headed()
    vp.import_adapter(fresh, tmp_path / "peft", name="back")
    # subhead too: PEFT wraps it as well (suffix match), with its own weights
    assert vp.core.model_ops.get_state(fresh).configs["back"].modules_to_save == ("head", "subhead")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ours, atol=1e-5, rtol=1e-5)
        vp.set_active(fresh, [])
        torch.testing.assert_close(fresh(x), _Headed_untrained_output(x), atol=1e-6, rtol=1e-6)
    vp.set_active(fresh, ["back"])
    vp.save_adapter(fresh, tmp_path / "ours", name="back")  # our own format keeps the head too
    torch.manual_seed(0)
    again = vp.load_adapter(_Headed(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours, atol=1e-5, rtol=1e-5)


class _Neck(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 12)
        self.head = nn.Linear(12, 12)  # PEFT's suffix match for "head" catches neck.head too

    def forward(self, x):
        return self.head(torch.relu(self.lin(x)))


class _Necked(_Headed):
    def __init__(self):
        super().__init__()
        self.neck = _Neck()

    def forward(self, x):
        return self.head(self.neck(torch.relu(self.fc1(x))))


def test_peft_export_writes_what_peft_also_catches_inside_another_adapters_trained_module(tmp_path):
    """Adapter "b" trains neck in full; exporting "a" (modules_to_save head) must still
    write neck.head, which PEFT wraps on a fresh host by suffix, with the host's weights."""
    from peft import PeftModel

    torch.manual_seed(0)
    model = _Necked()
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["fc1"], modules_to_save=["neck"]), name="b")
    vp.inject(model, vp.LoRAConfig(r=3, target_modules=["fc1"], modules_to_save=["head"]), name="a")
    randomize_adapters(model, 0)
    with torch.no_grad():
        for copy_ in (model.head.copies["a"], model.neck.copies["b"]):
            for p in copy_.parameters():
                p.add_(torch.randn_like(p))
    vp.set_active(model, "a")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(x)
    vp.export(model, tmp_path / "peft", name="a", format="peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.neck.head.weight" in keys
    torch.manual_seed(0)
    theirs = PeftModel.from_pretrained(_Necked(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours, atol=1e-5, rtol=1e-5)


def _Headed_untrained_output(x):
    torch.manual_seed(0)
    with torch.no_grad():
        return _Headed()(x)


def test_a_peft_folder_with_a_trained_head_from_peft_imports_and_misfits_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    host = _Headed()
    fresh, small = copy.deepcopy(host), Small()
    peft_model = get_peft_model(host, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], init_lora_weights=False,
                                                 modules_to_save=["head"])).eval()
    with torch.no_grad():
        for p in peft_model.base_model.model.head.modules_to_save["default"].parameters():
            p.add_(1.0)
    peft_model.save_pretrained(tmp_path / "p")
    x = torch.randn(3, 8)
    vp.load_adapter(fresh, tmp_path / "p", name="imported")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), peft_model(x), atol=1e-5, rtol=1e-5)
    randomize_adapters(fresh, 5)  # other factors than the file's, so that a partial write shows
    kept = Untouched(fresh, tmp_path)
    with pytest.raises(vp.InteropError, match="also holds modules trained in full"):
        vp.load_adapter(fresh, tmp_path / "p", name="imported", hotswap=True)
    kept.check()
    kept = Untouched(small, tmp_path)
    with pytest.raises(vp.InteropError):
        vp.import_adapter(small, tmp_path / "p")
    kept.check()


def test_factor_formats_still_warn_that_modules_to_save_stay_behind(tmp_path):
    model = _headed_with_trained_head()
    with pytest.warns(UserWarning, match=r"modules_to_save: \['head'\]"):
        vp.export(model, tmp_path / "k.safetensors", format="kohya")


def test_a_hot_swapped_file_runs_under_the_adapters_own_scale(tmp_path):
    """The loaded adapter's `set_scale` multiplies the file's dW: after a hot-swap at scale
    0.5 the model is the file's source model at scale 0.5."""
    source = _lora_small(seed=0)  # the same host weights as the target's, other factors
    randomize_adapters(source, seed=7)
    vp.export(source, tmp_path / "f.safetensors", name="a", format="diffusers")
    target = _lora_small(seed=0)
    vp.set_scale(target, "a", 0.5)
    vp.load_adapter(target, tmp_path / "f.safetensors", name="a", hotswap=True)
    vp.set_scale(source, "a", 0.5)
    x = _img()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=1e-5)
        vp.set_scale(source, "a", 1.0)
        assert (target(x) - source(x)).abs().max() > 1e-3  # the scale matters here


def test_every_written_lora_file_says_alpha_equals_its_rank(tmp_path):
    """Each LoRA file carries its scale in the up factor and states alpha = r, so every
    reader applies alpha / r = 1: kohya's per-module `.alpha`, PEFT's `lora_alpha` (and no
    per-module alpha pattern that says otherwise), diffusers' files (no alphas: scale 1)."""
    import json

    from safetensors.torch import load_file

    model = _lora_small()  # r 3, alpha 5: the written files must fold 5 / 3 in
    vp.export(model, tmp_path / "k.safetensors", name="a", format="kohya")
    kohya = load_file(str(tmp_path / "k.safetensors"))
    alphas = {k: float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    downs = {k[:-len(".lora_down.weight")]: v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight")}
    assert len(alphas) == len(downs) == 3
    assert all(alphas[f"{stem}.alpha"] == rank for stem, rank in downs.items())
    vp.export(model, tmp_path / "p", name="a", format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 3
    assert all(cfg.get("alpha_pattern", {}).get(k, cfg["r"]) == cfg.get("rank_pattern", {}).get(k, cfg["r"])
               for k in set(cfg.get("alpha_pattern", {})) | set(cfg.get("rank_pattern", {})))
    vp.export(model, tmp_path / "d.safetensors", name="a", format="diffusers")
    assert not any("alpha" in k for k in load_file(str(tmp_path / "d.safetensors")))
    x = _img()  # and the written up factors carry the 5 / 3: the file's LoRA is the model's
    torch.manual_seed(0)
    fresh = Small()  # the host weights _lora_small(seed=0) has
    vp.load_adapter(fresh, tmp_path / "k.safetensors", name="a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)
