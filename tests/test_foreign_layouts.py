"""LoRA files in the layouts diffusers converts on load, each written by the library that
writes it (diffusers' DreamBooth-example save, LyCORIS's kohya network), read with
convert_with_diffusers, applied as W += up @ down, and compared with what diffusers' own
``pipe.load_lora_weights`` makes of the same file on a tiny pipeline; then the same file
through ``vp.load_adapter`` into each model of a fresh pipeline, compared the same way."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from visionpeft.backbones.tiny import save_tiny_sd_pipeline
from visionpeft.interop.diffusers_layouts import (
    convert_with_diffusers,
    fit_names,
    looks_converted,
)
from visionpeft.interop.factors import InteropError

TOL = 1e-4
DIFFS: dict[str, float] = {}  # measured max |ours - diffusers|, printed with -s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    save_tiny_sd_pipeline(root / "sd")
    save_tiny_sd_pipeline(root / "sdxl", xl=True)
    return root


def _pipe(tiny, xl=False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    return cls.from_pretrained(tiny / ("sdxl" if xl else "sd"))


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    kw = {"sample": torch.randn(2, 4, 16, 16, generator=g), "timestep": torch.tensor([10, 500]),
          "encoder_hidden_states": torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(**kw, return_dict=False)[0]


def _te_out(te):
    ids = torch.randint(0, te.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return te(ids).last_hidden_state


def _apply(model, factors):
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            w = modules[name].weight  # a KeyError here: a name that is not in the model
            w += f.delta_weight().reshape(w.shape).to(w.dtype)
    return model


def _compare(label, ours, ref, base, run):
    """ours/ref/base: models; the LoRA must move the output, and ours must match ref."""
    b, r, o = run(base), run(ref), run(ours)
    assert (r - b).abs().max() > 1e-2, f"{label}: the LoRA does not change the output"
    DIFFS[label] = diff = (o - r).abs().max().item()
    print(f"{label}: max |ours - diffusers| = {diff:.2e} (LoRA moves it by {(r - b).abs().max():.2e})")
    assert diff < TOL, label


def _vp_loaded(tiny, file, components, xl=False, prefixes=None):
    """A fresh pipeline whose models each got the file through vp.load_adapter (the
    component read from which one fits the model, or from ``prefixes``)."""
    import visionpeft as vp

    pipe = _pipe(tiny, xl)
    for comp in components:
        vp.load_adapter(getattr(pipe, comp), file, name="x", prefix=(prefixes or {}).get(comp))
        assert vp.active_adapters(getattr(pipe, comp)) == ("x",)
    return pipe


def _randomize(module, marker, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if marker in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _dreambooth_file(tiny, folder, monkeypatch, with_metadata=False):
    """What diffusers' train_dreambooth_lora.py saves; returns the trained pipeline."""
    import transformers.integrations.peft as hf_peft
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # transformers 5 asks add_adapter for peft >= 0.22 (the venv has 0.21, whose LoRA layers
    # are the same); diffusers' own load path does not ask
    monkeypatch.setattr(hf_peft, "check_peft_version", lambda **kw: None)
    train = _pipe(tiny)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                          target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                        target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    train.unet.add_adapter(unet_cfg)
    train.text_encoder.add_adapter(te_cfg)
    _randomize(train.unet, "lora_B")
    _randomize(train.text_encoder, "lora_B", seed=1)
    extra = {}
    if with_metadata:
        extra = {"unet_lora_adapter_metadata": unet_cfg.to_dict(),
                 "text_encoder_lora_adapter_metadata": te_cfg.to_dict()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(train.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(train.text_encoder)),
        **extra)
    return train


def test_dreambooth_example_file_matches_load_lora_weights(tiny, tmp_path, monkeypatch):
    _dreambooth_file(tiny, tmp_path, monkeypatch)
    tensors = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    # the layout the issue reported: diffusers' PEFT -> "diffusers" renaming
    assert any(k.startswith("unet.") and k.endswith(".to_q.lora.down.weight") for k in tensors)
    assert any(k.startswith("text_encoder.") and k.endswith(".q_proj.lora_linear_layer.up.weight") for k in tensors)
    assert looks_converted(tensors)

    ref = _pipe(tiny)
    ref.load_lora_weights(tmp_path)
    ours, base = _pipe(tiny), _pipe(tiny)
    factors = convert_with_diffusers(tensors)
    assert set(factors) == {"unet", "text_encoder"}
    assert {f.rank for fs in factors.values() for f in fs.values()} == {4}
    _apply(ours.unet, factors["unet"])
    _apply(ours.text_encoder, fit_names(factors["text_encoder"], ours.text_encoder))
    _compare("dreambooth unet", ours.unet, ref.unet, base.unet, _unet_out)
    _compare("dreambooth text_encoder", ours.text_encoder, ref.text_encoder, base.text_encoder, _te_out)
    loaded = _vp_loaded(tiny, tmp_path, ["unet", "text_encoder"])  # the output folder itself
    _compare("dreambooth unet, vp.load_adapter", loaded.unet, ref.unet, base.unet, _unet_out)
    _compare("dreambooth text_encoder, vp.load_adapter", loaded.text_encoder, ref.text_encoder,
             base.text_encoder, _te_out)


def test_dreambooth_file_with_adapter_metadata_keeps_alpha_over_r(tiny, tmp_path, monkeypatch):
    """With the LoraConfig in the header diffusers applies alpha / r = 2 (without it, 1):
    the loaded LoRA then equals the trained one."""
    train = _dreambooth_file(tiny, tmp_path, monkeypatch, with_metadata=True)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    ref = _pipe(tiny)
    ref.load_lora_weights(tmp_path)
    ours, base = _pipe(tiny), _pipe(tiny)
    factors = convert_with_diffusers(load_file(path), metadata=header)
    _apply(ours.unet, factors["unet"])
    _apply(ours.text_encoder, factors["text_encoder"])
    _compare("dreambooth+metadata unet", ours.unet, ref.unet, base.unet, _unet_out)
    _compare("dreambooth+metadata text_encoder", ours.text_encoder, ref.text_encoder, base.text_encoder, _te_out)
    assert (_unet_out(train.unet) - _unet_out(ours.unet)).abs().max() < TOL
    loaded = _vp_loaded(tiny, path, ["unet", "text_encoder"])
    _compare("dreambooth+metadata unet, vp.load_adapter", loaded.unet, ref.unet, base.unet, _unet_out)
    no_header = convert_with_diffusers(load_file(path))["unet"]
    some = next(iter(no_header))
    torch.testing.assert_close(factors["unet"][some].up, 2 * no_header[some].up)


def _with_text_model(te):
    """kohya names CLIP modules from its text_model level, which transformers 5's
    CLIPTextModel no longer has."""
    if hasattr(te, "text_model"):
        return te
    view = nn.Module()
    view.text_model = te
    return view


# sd-scripts' LoRA + conv (LoCon) targets; LyCORIS's "full" preset also lists diffusers'
# TimestepEmbedding, whose linears then clash with its own time_embedding.* names
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def _lycoris_kohya(path, text_encoders, unet_view, **kw):
    """A kohya-format LoRA file written by LyCORIS's sd-scripts network (lycoris.kohya)."""
    from lycoris.kohya import create_network

    preset = path.with_suffix(".toml")
    preset.write_text(PRESET)
    with torch.random.fork_rng(devices=[]):  # lora_down starts from the global RNG
        torch.manual_seed(0)
        net = create_network(1.0, 4, 2.0, None, text_encoders, unet_view, preset=str(preset), **kw)
    net.apply_to(text_encoders, unet_view, True, True)  # as sd-scripts' train_network does
    _randomize(net, "lora_up", seed=2)
    net.save_weights(str(path), torch.float32, None)
    return load_file(path)


def test_kohya_sd15_file_with_text_encoder_and_conv_layers(tiny, tmp_path):
    """lora_unet_ (diffusers block names) + lora_te_, Linear and conv layers, conv at
    another rank and alpha than Linear (as kohya's conv_dim / conv_alpha)."""
    src = _pipe(tiny)
    tensors = _lycoris_kohya(tmp_path / "kohya.safetensors", _with_text_model(src.text_encoder), src.unet,
                             conv_dim=2, conv_alpha=1.0)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {1.0, 2.0}
    assert looks_converted(tensors)

    ref = _pipe(tiny)
    ref.load_lora_weights(tmp_path, weight_name="kohya.safetensors")
    ours, base = _pipe(tiny), _pipe(tiny)
    factors = convert_with_diffusers(tensors)
    assert set(factors) == {"unet", "text_encoder"}
    assert sum(map(len, factors.values())) == len({k.split(".")[0] for k in tensors})  # every entry placed
    assert {f.rank for f in factors["unet"].values()} == {2, 4}
    _apply(ours.unet, factors["unet"])
    _apply(ours.text_encoder, factors["text_encoder"])
    _compare("kohya sd1.5 unet", ours.unet, ref.unet, base.unet, _unet_out)
    _compare("kohya sd1.5 text_encoder", ours.text_encoder, ref.text_encoder, base.text_encoder, _te_out)
    loaded = _vp_loaded(tiny, tmp_path / "kohya.safetensors", ["unet", "text_encoder"])
    _compare("kohya sd1.5 unet, vp.load_adapter", loaded.unet, ref.unet, base.unet, _unet_out)
    _compare("kohya sd1.5 text_encoder, vp.load_adapter", loaded.text_encoder, ref.text_encoder,
             base.text_encoder, _te_out)


def _sgm_index(kind: str, block: int, layer: int, layers_per_block: int) -> int:
    """Original-SD (sgm) index of layer ``layer`` of diffusers down/up block ``block``:
    input_blocks.0 is conv_in, then each down block's layers and its downsampler; each
    up block has layers_per_block + 1 layers (the upsampler rides on the last)."""
    per = layers_per_block + 1
    return 1 + block * per + layer if kind == "input" else block * per + layer


def test_sgm_indices_are_those_of_real_sdxl_files():
    # SDXL (layers_per_block 2): down_blocks.1/2 and up_blocks.0/1 hold the attentions;
    # kohya SDXL files name them input_blocks_4/5/7/8 and output_blocks_0..5
    assert [_sgm_index("input", b, j, 2) for b in (1, 2) for j in (0, 1)] == [4, 5, 7, 8]
    assert [_sgm_index("output", b, j, 2) for b in (0, 1) for j in (0, 1, 2)] == [0, 1, 2, 3, 4, 5]


def _sgm_view(unet):
    """The UNet's transformer modules under original-SD block names, the module tree
    kohya's SDXL trainer names its LoRA keys from (inside a transformer the names agree)."""
    lpb, view = unet.config.layers_per_block, nn.Module()

    def put(path, module):
        node = view
        for part in path[:-1]:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(path[-1], module)

    for kind, blocks in (("input", unet.down_blocks), ("output", unet.up_blocks)):
        for b, blk in enumerate(blocks):
            for j, att in enumerate(getattr(blk, "attentions", None) or ()):
                put([f"{kind}_blocks", str(_sgm_index(kind, b, j, lpb)), "1"], att)
    put(["middle_block", "1"], unet.mid_block.attentions[0])  # resnet, attention, resnet
    return view


def test_kohya_sdxl_file_with_original_sd_block_names(tiny, tmp_path):
    src = _pipe(tiny, xl=True)
    tensors = _lycoris_kohya(tmp_path / "sdxl.safetensors",
                             [_with_text_model(src.text_encoder), src.text_encoder_2], _sgm_view(src.unet))
    stems = {k.split(".")[0] for k in tensors}
    # tiny SDXL: layers_per_block 1, attentions in down_blocks.0, the mid block and up_blocks.1
    for stem in ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                 "lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_output_blocks_2_1_proj_in",
                 "lora_te1_text_model_encoder_layers_1_mlp_fc2",
                 "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"):
        assert stem in stems, stem
    assert looks_converted(tensors)

    with pytest.raises(InteropError, match="unet_config"):
        convert_with_diffusers(tensors)

    ref = _pipe(tiny, xl=True)
    ref.load_lora_weights(tmp_path, weight_name="sdxl.safetensors")
    ours, base = _pipe(tiny, xl=True), _pipe(tiny, xl=True)
    factors = convert_with_diffusers(tensors, unet_config=dict(ours.unet.config))
    assert set(factors) == {"unet", "text_encoder", "text_encoder_2"}
    assert sum(map(len, factors.values())) == len(stems)
    assert "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q" in factors["unet"]
    for comp in factors:
        _apply(getattr(ours, comp), factors[comp])
    _compare("kohya sdxl (sgm names) unet", ours.unet, ref.unet, base.unet, _unet_out)
    _compare("kohya sdxl text_encoder (lora_te1_)", ours.text_encoder, ref.text_encoder, base.text_encoder, _te_out)
    _compare("kohya sdxl text_encoder_2 (lora_te2_)", ours.text_encoder_2, ref.text_encoder_2,
             base.text_encoder_2, _te_out)
    import visionpeft as vp

    # the tiny SDXL's two text encoders have the same module names and shapes (the real
    # ones differ in width), so which one a file entry is for must be said
    with pytest.raises(vp.InteropError, match=r"holds LoRAs for \['text_encoder', 'text_encoder_2'\]; say which"):
        vp.load_adapter(_pipe(tiny, xl=True).text_encoder, tmp_path / "sdxl.safetensors")
    loaded = _vp_loaded(tiny, tmp_path / "sdxl.safetensors", ["unet", "text_encoder", "text_encoder_2"], xl=True,
                        prefixes={"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"})
    _compare("kohya sdxl unet, vp.load_adapter", loaded.unet, ref.unet, base.unet, _unet_out)
    _compare("kohya sdxl text_encoder, vp.load_adapter", loaded.text_encoder, ref.text_encoder,
             base.text_encoder, _te_out)
    _compare("kohya sdxl text_encoder_2, vp.load_adapter", loaded.text_encoder_2, ref.text_encoder_2,
             base.text_encoder_2, _te_out)


def test_refusals_and_other_layouts():
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    plain = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down}
    assert not looks_converted(plain)
    assert convert_with_diffusers({"blocks.0.attn.qkv.lora_A.weight": down}) is None
    dora = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
            "lora_te_text_model_encoder_layers_0_mlp_fc1.dora_scale": torch.ones(1, 32)}
    with pytest.raises(InteropError, match=r"DoRA.*mlp_fc1\.dora_scale"):
        convert_with_diffusers(dora)
    # the pre-PEFT attention-processor keys of diffusers' older examples
    old = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up}
    assert looks_converted(old)
    f = convert_with_diffusers(old)["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    torch.testing.assert_close(f.delta_weight(), up @ down)


def test_text_encoder_exports_use_text_model_names_and_read_back(tiny, tmp_path):
    """Files for kohya's tools (ComfyUI, A1111) and diffusers files written under
    transformers 4 name CLIP modules from the text_model level transformers 5 dropped: our
    writers add it back, our readers take either form."""
    import visionpeft as vp
    from conftest import randomize_adapters

    te = _pipe(tiny).text_encoder
    ids = torch.randint(0, te.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    for method, fmt, prefix, named in (
            (vp.LoHaConfig(r=2, target_modules=["q_proj", "fc1"]), "lycoris", "lora_te", "lora_te_text_model_encoder_"),
            (vp.LoRAConfig(r=2, target_modules=["q_proj", "fc1"]), "kohya", "lora_te", "lora_te_text_model_encoder_"),
            (vp.LoRAConfig(r=2, target_modules=["q_proj", "fc1"]), "diffusers", "text_encoder",
             "text_encoder.text_model.encoder.")):
        model = _pipe(tiny).text_encoder
        vp.inject(model, method, name="te")
        randomize_adapters(model)
        path = tmp_path / f"{fmt}.safetensors"
        vp.export(model, path, name="te", format=fmt, prefix=prefix)
        keys = list(load_file(path))
        assert keys and all(k.startswith(named) for k in keys), keys[:4]
        back = _pipe(tiny).text_encoder
        vp.load_adapter(back, path, prefix=prefix)
        with torch.no_grad():
            torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(te(ids)[0], model(ids)[0], atol=1e-4)
