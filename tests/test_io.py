"""save_adapter / load_adapter: identical outputs, strict checks, atomic writes."""
import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (BLOCK_METHOD_CONFIGS, BLOCK_METHOD_HOSTS, METHOD_CONFIGS, TOY_TARGETS, ToyNet, Untouched,
                      make_config, randomize_adapters, ready_block_method, toy_inputs)
from safetensors import safe_open
from torch import nn

import visionpeft as vp
import visionpeft.core.io as vpio
from visionpeft.backbones import presets
from visionpeft.backbones.tiny import build_tiny, example_inputs, run_host

METHODS = sorted(METHOD_CONFIGS)


def _trained(method, dim=15, name="dog"):
    torch.manual_seed(0)
    model = ToyNet(dim=dim).eval()
    cfg = make_config(method, TOY_TARGETS)
    vp.inject(model, cfg, name=name)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_gives_identical_outputs(method, tmp_path):
    model = _trained(method)
    x, img = toy_inputs()
    with torch.no_grad():
        expected = model(x, img)
    vp.save_adapter(model, tmp_path / "dog", name="dog")
    assert sorted(p.name for p in (tmp_path / "dog").iterdir()) == [vpio.CONFIG_NAME, vpio.WEIGHTS_NAME]
    doc = json.loads((tmp_path / "dog" / vpio.CONFIG_NAME).read_text())
    assert doc["method"] == method and doc["format"] == "visionpeft"
    assert doc["targets"]["qkv"] == {"kind": "linear", "parts": ["q", "v"], "base_shape": [45, 15]}
    with safe_open(str(tmp_path / "dog" / vpio.WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["method"] == method
        assert "qkv[q].lora_A" in f.keys() or method != "lora"

    torch.manual_seed(0)
    fresh = ToyNet().eval()
    vp.load_adapter(fresh, tmp_path / "dog")
    assert vp.active_adapters(fresh) == ("dog",)
    with torch.no_grad():
        assert torch.equal(fresh(x, img), expected)
    assert vp.trainable_parameters(fresh) == vp.trainable_parameters(model)


def test_load_in_a_fresh_process_gives_identical_outputs(tmp_path):
    model = _trained("lora")
    x, img = toy_inputs()
    with torch.no_grad():
        expected = model(x, img)
    vp.save_adapter(model, tmp_path / "dog", name="dog")
    torch.save({"x": x, "img": img}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import ToyNet
        import visionpeft as vp
        torch.manual_seed(0)
        model = ToyNet().eval()
        vp.load_adapter(model, {str(tmp_path / 'dog')!r})
        inp = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            torch.save(model(inp["x"], inp["img"]), {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_load_into_other_shapes_raises_and_leaves_model_unchanged(tmp_path):
    vp.save_adapter(_trained("lora"), tmp_path / "dog", name="dog")
    other = ToyNet(dim=18).eval()
    kept = Untouched(other, tmp_path)
    with pytest.raises(vp.AdapterFileError, match=r"layer qkv: the adapter was saved for a linear weight of "
                                                  r"shape \(45, 15\), this model.s is a linear of shape \(54, 18\)"):
        vp.load_adapter(other, tmp_path / "dog")
    kept.check()


def test_tensor_shape_mismatch_names_the_tensor(tmp_path):
    model = _trained("lora")
    vp.save_adapter(model, tmp_path / "dog", name="dog")
    cfg = json.loads((tmp_path / "dog" / vpio.CONFIG_NAME).read_text())
    cfg["config"]["r"] = 2  # the file's tensors hold rank 3
    (tmp_path / "dog" / vpio.CONFIG_NAME).write_text(json.dumps(cfg))
    fresh = ToyNet().eval()
    kept = Untouched(fresh, tmp_path)
    with pytest.raises(vp.AdapterFileError,
                       match=r"qkv\[q\].lora_A: the file holds shape \(3, 15\), the model needs \(2, 15\)"):
        vp.load_adapter(fresh, tmp_path / "dog")
    kept.check()


def test_interrupted_save_leaves_previous_adapter_loadable(tmp_path, monkeypatch):
    model = _trained("lora")
    vp.save_adapter(model, tmp_path / "dog", name="dog")
    x, img = toy_inputs()
    with torch.no_grad():
        expected = model(x, img)
    randomize_adapters(model, seed=5)

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(vpio, "save_file", broken_save)
    kept = Untouched(model, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        vp.save_adapter(model, tmp_path / "dog", name="dog")
    kept.check()  # no temporary left behind, the model as it was
    torch.manual_seed(0)
    fresh = ToyNet().eval()
    vp.load_adapter(fresh, tmp_path / "dog")
    with torch.no_grad():
        assert torch.equal(fresh(x, img), expected)


def test_foreign_folders_go_to_import_and_future_versions_are_refused(tmp_path):
    host = ToyNet()  # one model for every refusal: each must leave it as it was
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / vpio.CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    kept = Untouched(host, tmp_path)
    with pytest.raises(vp.InteropError, match="no adapter_model.safetensors"):
        vp.load_adapter(host, tmp_path / "peft")  # read as PEFT, which has no weights here
    kept.check()
    vp.save_adapter(_trained("lora"), tmp_path / "dog", name="dog")
    doc = json.loads((tmp_path / "dog" / vpio.CONFIG_NAME).read_text())
    doc["format_version"] = 99
    (tmp_path / "dog" / vpio.CONFIG_NAME).write_text(json.dumps(doc))
    kept = Untouched(host, tmp_path)
    with pytest.raises(vp.AdapterFileError, match="upgrade visionpeft"):
        vp.load_adapter(host, tmp_path / "dog")
    kept.check()
    # a folder whose subfolders hold adapters (a DreamBooth run's adapter/) names them
    with pytest.raises(vp.AdapterFileError, match=r"has no adapter_config.json: its subfolders \['dog', 'peft'\]"):
        vp.load_adapter(host, tmp_path)
    kept.check()
    # and one level further (a DreamBooth output_dir holds adapter/unet, adapter/text_encoder)
    run = tmp_path / "run"
    vp.save_adapter(_trained("lora"), run / "adapter" / "unet", name="dog")
    (run / "checkpoint-5").mkdir()
    (tmp_path / "empty").mkdir()
    kept = Untouched(host, tmp_path)
    with pytest.raises(vp.AdapterFileError, match=r"its subfolders \['adapter/unet'\] hold adapters; pass the one "
                                                  r"for this model, e.g. .*run/adapter/unet"):
        vp.load_adapter(host, run)
    kept.check()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        vp.load_adapter(host, tmp_path / "empty")
    kept.check()


def test_two_adapters_saved_and_loaded_side_by_side(tmp_path):
    model = _trained("lora", name="dog")
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["proj"], modules_to_save=["head"]), name="style")
    randomize_adapters(model, seed=3)
    x, img = toy_inputs()
    with torch.no_grad():
        expected = model(x, img)
    vp.save_adapter(model, tmp_path / "dog", name="dog")
    vp.save_adapter(model, tmp_path / "style", name="style")
    torch.manual_seed(0)
    fresh = ToyNet().eval()
    vp.load_adapter(fresh, tmp_path / "dog")
    vp.load_adapter(fresh, tmp_path / "style")
    with torch.no_grad():
        assert torch.equal(fresh(x, img), expected)
    kept = Untouched(fresh, tmp_path)
    with pytest.raises(ValueError, match="already has an adapter named 'dog'"):
        vp.load_adapter(fresh, tmp_path / "dog")
    kept.check()


def _small_lora(seed, alpha=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    vp.inject(model, vp.LoRAConfig(r=2, alpha=alpha, target_modules=["0", "2"]), name="a")
    randomize_adapters(model, seed)
    return model


def test_hotswap_replaces_weights_in_place_without_recompiling(tmp_path):
    from torch._dynamo.testing import CompileCounter

    other = _small_lora(seed=7, alpha=6)  # another alpha: the scale ratio goes into lora_B
    vp.save_adapter(other, tmp_path / "b", name="a")
    x = torch.randn(4, 6)
    with torch.no_grad():
        expected = other(x)
    model = _small_lora(seed=1)
    params = {n: p for n, p in model.named_parameters()}
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        before = compiled(x)
        frames = counter.frame_count
        vp.load_adapter(model, tmp_path / "b", name="a", hotswap=True)
        after = compiled(x)
    assert counter.frame_count == frames, "hotswap triggered a recompile"
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=1e-6)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_hotswap_refuses_other_shapes_and_configs(tmp_path):
    model = _small_lora(seed=1)
    vp.save_adapter(model, tmp_path / "same", name="a")
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    vp.inject(wider, vp.LoRAConfig(r=3, target_modules=["0", "2"]), name="a")
    vp.save_adapter(wider, tmp_path / "r3", name="a")
    randomize_adapters(model, seed=2)  # tensors other than the file's, so that a partial copy shows
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.AdapterFileError, match=r"\['r'\]"):
        vp.load_adapter(model, tmp_path / "r3", name="a", hotswap=True)
    kept.check()
    with pytest.raises(KeyError, match="loaded adapter"):
        vp.load_adapter(model, tmp_path / "same", name="zzz", hotswap=True)
    kept.check()


# per registered method: a config field that is neither targeting, runtime nor folded, and
# a value for it that keeps every tensor's shape, so that only the config check can refuse
REFUSED_FIELD = {"lora": ("r", 4), "krona": ("a1", 3), "loha": ("r", 4), "wara": ("wavelet", "haar"),
                 "snell": ("sparsity", 0.25), "block_lora": ("rank_stabilized", True),
                 "adapter": ("activation", "relu"), "earth_adapter": ("cutoff_ratio", 0.25),
                 "point_peft": ("local_k", 2)}


def _any_method(method, seed, **kw):
    """``method`` on a host it adapts (weight-space methods on ToyNet's layers, block
    methods on the tiny ViT's blocks), its adapter "a" at random -> (model, forward)."""
    torch.manual_seed(0)
    if method in BLOCK_METHOD_CONFIGS:
        host = BLOCK_METHOD_HOSTS.get(method, "timm_vit")
        model = build_tiny(host)
        config, inputs = BLOCK_METHOD_CONFIGS[method](presets.TIMM_BLOCKS, **kw), example_inputs(host)
        forward = lambda m: run_host(host, m, inputs)  # noqa: E731
    else:
        model = ToyNet().eval()
        config, (x, img) = make_config(method, TOY_TARGETS, **kw), toy_inputs()
        forward = lambda m: m(x, img)  # noqa: E731
    vp.inject(model, config, name="a")
    randomize_adapters(model, seed=seed, std=0.05 if method in BLOCK_METHOD_CONFIGS else 0.2)
    ready_block_method(model, method, "a", seed)
    return model.eval(), forward


@pytest.mark.parametrize("method", vp.list_methods())
def test_hotswap_ignores_dropout_and_refuses_other_fields_for_every_method(tmp_path, method):
    """Every registered method: a file with other tensors hot-swaps in (the same
    parameter objects, the file's outputs). Where the config has a dropout (lora, loha,
    block_lora, adapter; krona, wara, snell and earth_adapter have none, so for them
    the file differs in tensors only), the file's dropout differs and is ignored: it
    touches no stored tensor and the loaded config keeps its own. A file that differs
    in a field that changes what the tensors mean is refused, the model untouched."""
    assert set(REFUSED_FIELD) == set(vp.list_methods()), "give a new method a field a hot-swap refuses"
    config_cls = vp.get_method(method).config_cls
    has_dropout = "dropout" in {f.name for f in dataclasses.fields(config_cls)}
    other, forward = _any_method(method, 7, **({"dropout": 0.3} if has_dropout else {}))
    vp.save_adapter(other, tmp_path / "d", name="a")
    model, _ = _any_method(method, 1)
    params = [id(p) for p in model.parameters()]
    with torch.no_grad():
        want = forward(other)
        assert not torch.allclose(forward(model), want)
    vp.load_adapter(model, tmp_path / "d", name="a", hotswap=True)
    assert [id(p) for p in model.parameters()] == params
    if has_dropout:
        assert vp.core.model_ops.get_state(model).configs["a"].dropout == 0.0
    with torch.no_grad():
        torch.testing.assert_close(forward(model), want)

    field, value = REFUSED_FIELD[method]
    refused, _ = _any_method(method, 3)
    vp.save_adapter(refused, tmp_path / "f", name="a")
    doc = json.loads((tmp_path / "f" / vpio.CONFIG_NAME).read_text())
    assert field in doc["config"] and doc["config"][field] != value
    doc["config"][field] = value
    (tmp_path / "f" / vpio.CONFIG_NAME).write_text(json.dumps(doc))
    kept = Untouched(model, tmp_path)
    with pytest.raises(vp.AdapterFileError, match=rf"config fields \['{field}'\] differ"):
        vp.load_adapter(model, tmp_path / "f", name="a", hotswap=True)
    kept.check()


def test_an_adapter_of_only_modules_to_save_round_trips(tmp_path):
    """Full fine-tuning of chosen modules (no target layers) saves and loads too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    fresh = copy.deepcopy(model)
    vp.inject(model, vp.LoRAConfig(target_modules=[], modules_to_save=["2"]), name="ft")
    with torch.no_grad():
        model[2].copies["ft"].weight.add_(1.0)
    vp.save_adapter(model, tmp_path / "ft", name="ft")
    vp.load_adapter(fresh, tmp_path / "ft")
    x = torch.randn(2, 4)
    torch.testing.assert_close(fresh(x), model(x))


def test_save_refuses_a_file_or_a_folder_holding_other_files_and_touches_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"someone's weights")
    kept = Untouched(model, tmp_path)
    with pytest.raises(FileExistsError, match="is a file"):
        vp.save_adapter(model, weights)
    kept.check()
    assert weights.read_bytes() == b"someone's weights"
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "notes.txt").write_text("keep me")
    kept = Untouched(model, tmp_path)
    for save in (lambda p: vp.save_adapter(model, p), lambda p: vp.export(model, p, format="peft")):
        with pytest.raises(FileExistsError, match="notes.txt"):
            save(project)
        kept.check()  # no file added, no temporaries left, the model as it was
    assert (project / "notes.txt").read_text() == "keep me"
    own = vp.save_adapter(model, tmp_path / "adapter")
    vp.save_adapter(model, own)  # a folder a save wrote is replaced
    assert sorted(p.name for p in own.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_hotswap_scales_each_layer_at_its_own_rank(tmp_path):
    """rank_pattern gives layers their own r, so the alpha ratio folded into lora_B differs
    per layer; a LoRA file whose rank exceeds one layer's is refused before any write."""
    def build(alpha, seed):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
        vp.inject(m, vp.LoRAConfig(r=4, alpha=alpha, rank_pattern={"2": 2}, target_modules=["0", "2"]))
        randomize_adapters(m, seed)
        return m.eval()

    src, dst = build(8, 7), build(None, 1)
    vp.save_adapter(src, tmp_path / "a")
    vp.load_adapter(dst, tmp_path / "a", hotswap=True)
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    wide = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    vp.inject(wide, vp.LoRAConfig(r=3, target_modules=["0", "2"]))
    randomize_adapters(wide, 3)
    vp.export(wide, tmp_path / "peft", format="peft")
    kept = Untouched(dst, tmp_path)
    with pytest.raises(vp.InteropError, match="file rank 3 .* rank 2"):
        vp.load_adapter(dst, tmp_path / "peft", name="default", hotswap=True)
    kept.check()


def test_export_to_a_factor_format_warns_that_modules_to_save_stay_behind(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    with pytest.warns(UserWarning, match=r"modules_to_save: \['2'\]"):
        vp.export(model, tmp_path / "k.safetensors", format="kohya")


def test_save_refuses_a_folder_with_a_foreign_file_in_a_subfolder_it_would_write(tmp_path):
    from visionpeft.core.atomic import write_dir

    def write(folder):
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.bin").write_bytes(b"new")

    write_dir(tmp_path / "out", write)
    (tmp_path / "out" / "unet" / "my_notes.txt").write_text("keep me")
    kept = Untouched(nn.Module(), tmp_path)  # no model here: the folder is what must stay
    with pytest.raises(FileExistsError, match="unet/my_notes.txt"):
        write_dir(tmp_path / "out", write)
    kept.check()
    assert (tmp_path / "out" / "unet" / "my_notes.txt").read_text() == "keep me"


def test_a_truncated_weights_file_is_an_adapter_file_error_naming_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4))
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))
    folder = vp.save_adapter(model, tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    fresh = nn.Sequential(nn.Linear(4, 4))
    kept = Untouched(fresh, tmp_path)
    with pytest.raises(vp.AdapterFileError, match="adapter_model.safetensors is not a readable"):
        vp.load_adapter(fresh, folder)
    kept.check()


@pytest.mark.parametrize("method, alphas", [("lora", (8.0, 3.0)), ("krona", (0.5, 2.0)), ("loha", (5.0, 2.0))])
def test_a_hotswap_with_another_alpha_refolds_it_and_draws_no_random_numbers(tmp_path, method, alphas):
    """The methods whose registry entry declares alpha folded take a saved adapter with
    another alpha: the loaded module keeps its own scale (a compiled graph's constant),
    its tensors change so that outputs equal the saved adapter's; the user's RNG stream
    is not touched by the saved module built to hand over its factors."""
    def build(alpha, seed):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Conv2d(10, 4, 1))
        cfg = {"lora": vp.LoRAConfig(r=3, alpha=alpha, target_modules=["0", "2"]),
               "krona": vp.KronAConfig(alpha=alpha, target_modules=["0", "2"]),
               "loha": vp.LoHaConfig(r=3, alpha=alpha, target_modules=["0", "2"])}[method]
        vp.inject(m, cfg)
        randomize_adapters(m, seed, std=0.5)
        return m.eval()

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner[1](self.inner[0](x))
            return self.inner[2](h[..., None, None])

    src, dst = build(alphas[0], 7), build(alphas[1], 1)
    vp.save_adapter(src, tmp_path / "a")
    scales = [m.scale for m in dst.modules() if hasattr(m, "scale") and isinstance(m.scale, float)]
    params = [id(p) for p in dst.parameters()]
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    vp.load_adapter(dst, tmp_path / "a", hotswap=True)
    assert torch.equal(torch.rand(3), expected_draw)
    assert [id(p) for p in dst.parameters()] == params
    assert [m.scale for m in dst.modules() if hasattr(m, "scale") and isinstance(m.scale, float)] == scales
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(Wrap(dst)(x), Wrap(src)(x), atol=1e-5, rtol=1e-5)


def test_export_as_visionpeft_is_save_adapter(tmp_path):
    model = _trained("lora")
    report = vp.export(model, tmp_path / "ours", format="visionpeft")
    assert report.format == "visionpeft" and report.layers == 6 and vp.detect_format(report.path) == "visionpeft"
    x, img = toy_inputs()
    torch.manual_seed(0)
    fresh = ToyNet().eval()
    vp.load_adapter(fresh, report.path)
    with torch.no_grad():
        assert torch.equal(fresh(x, img), model(x, img))
    kept = Untouched(model, tmp_path)
    with pytest.raises(ValueError, match="takes no rank or prefix"):
        vp.export(model, tmp_path / "again", format="visionpeft", rank=4)
    kept.check()
    with pytest.raises(ValueError,
                       match=r"format must be one of \['peft', 'lycoris', 'kohya', 'diffusers', 'merged'\]"):
        vp.export(model, tmp_path / "x", format="nope")
    kept.check()
