"""Round trips through visionpeft.backbones.loaders for every host family.

Each tiny host is saved the way its library saves checkpoints, loaded back with
``load_backbone`` and compared tensor by tensor and output by output.  Nothing
is downloaded: hub ids are only used to check the offline error.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from visionpeft.backbones.loaders import FAMILIES, OfflineWeightsError, load_backbone
from visionpeft.backbones.tiny import TIMM_TINY_ARGS, build_tiny, example_inputs, run_host

# The timm tiny hosts' create_model kwargs (see tiny.py); a timm checkpoint file
# carries no config, so loading needs the same architecture arguments.
TIMM_KWARGS = {host: (name, {**overrides, "num_classes": 5})
               for host, (name, overrides) in TIMM_TINY_ARGS.items()}

MISSING_HUB_ID = "visionpeft-tests/no-such-repo"


def assert_same(host, ref, loaded):
    assert not loaded.training
    a, b = ref.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key, tensor in a.items():
        assert b[key].dtype == tensor.dtype, key
        assert torch.equal(b[key], tensor), key
    inputs = example_inputs(host)
    with torch.no_grad():
        assert torch.equal(run_host(host, ref, inputs), run_host(host, loaded, inputs))


# --------------------------------------------------------------------------- #
# round trips
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("host", list(TIMM_KWARGS))
def test_timm_safetensors_file(host, tmp_path):
    ref = build_tiny(host, seed=3)
    path = tmp_path / "model.safetensors"
    save_file(ref.state_dict(), str(path))
    name, kwargs = TIMM_KWARGS[host]
    assert_same(host, ref, load_backbone("timm", name, checkpoint_path=str(path), **kwargs))


def test_timm_pth_file_keeps_head(tmp_path):
    # timm's own training checkpoints nest the weights under "state_dict".
    ref = build_tiny("timm_vit", seed=4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": ref.state_dict(), "epoch": 1}, path)
    name, kwargs = TIMM_KWARGS["timm_vit"]
    assert_same("timm_vit", ref, load_backbone("timm", name, checkpoint_path=path, **kwargs))


def test_timm_local_folder(tmp_path):
    import timm.models

    ref = build_tiny("timm_vit", seed=5)
    name, kwargs = TIMM_KWARGS["timm_vit"]
    timm.models.save_for_hf(ref, str(tmp_path), model_args=kwargs, safe_serialization=True)
    assert_same("timm_vit", ref, load_backbone("timm", str(tmp_path)))


@pytest.mark.parametrize("host", ["hf_dinov2", "hf_dinov3", "hf_sam2_vision"])
def test_transformers_folder(host, tmp_path):
    ref = build_tiny(host, seed=6)
    ref.save_pretrained(tmp_path)
    loaded = load_backbone("transformers", str(tmp_path))
    assert type(loaded) is type(ref)
    assert_same(host, ref, loaded)


def test_transformers_model_class(tmp_path):
    ref = build_tiny("hf_dinov2", seed=7)
    ref.save_pretrained(tmp_path)
    for model_class in ("Dinov2Model", type(ref)):
        loaded = load_backbone("transformers", tmp_path, model_class=model_class)
        assert type(loaded) is type(ref)
        assert_same("hf_dinov2", ref, loaded)


@pytest.mark.parametrize("family, host, component", [
    ("diffusers_unet", "sd_unet", "unet"),
    ("diffusers_transformer", "sd3_dit", "transformer"),
])
@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_diffusers_folder(family, host, component, layout, tmp_path):
    ref = build_tiny(host, seed=8)
    if layout == "model":
        ref.save_pretrained(tmp_path)
    else:
        # The parts of a pipeline folder the loader relies on: the component's
        # subfolder next to model_index.json and other components.
        ref.save_pretrained(tmp_path / component)
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Pipeline"}))
        (tmp_path / "vae").mkdir()
    loaded = load_backbone(family, str(tmp_path))
    assert type(loaded) is type(ref)
    assert_same(host, ref, loaded)


def test_diffusers_random_init_from_config(tmp_path):
    ref = build_tiny("sd3_dit", seed=9)
    ref.save_pretrained(tmp_path / "transformer")
    loaded = load_backbone("diffusers_transformer", tmp_path, pretrained=False)
    assert type(loaded) is type(ref) and not loaded.training
    a, b = ref.state_dict(), loaded.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not all(torch.equal(a[k], b[k]) for k in a)


def _clip_model_cfg(model):
    # The tiny CLIP's constructor arguments, recovered from the model itself so
    # the test can't drift from tiny.py.
    visual, text_width = model.visual, model.transformer.width
    return {
        "embed_dim": model.text_projection.shape[1],
        "vision_cfg": {"width": visual.transformer.width, "layers": visual.transformer.layers,
                       "head_width": visual.transformer.width // visual.transformer.resblocks[0].attn.num_heads,
                       "image_size": visual.image_size[0], "patch_size": visual.patch_size[0]},
        "text_cfg": {"width": text_width, "heads": model.transformer.resblocks[0].attn.num_heads,
                     "layers": model.transformer.layers, "context_length": model.context_length,
                     "vocab_size": model.vocab_size},
    }


def test_open_clip_local_folder(tmp_path):
    ref = build_tiny("open_clip", seed=10)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": _clip_model_cfg(ref)}))
    save_file(ref.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    assert_same("open_clip", ref, load_backbone("open_clip", str(tmp_path)))


def test_open_clip_registered_config_and_file(tmp_path, monkeypatch):
    import open_clip.factory as factory

    ref = build_tiny("open_clip", seed=11)
    # add_model_config mutates two module globals; give it copies that
    # monkeypatch puts back, so no other test sees the extra config.
    monkeypatch.setattr(factory, "_MODEL_CONFIG_PATHS", list(factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(factory, "_MODEL_CONFIGS", dict(factory._MODEL_CONFIGS))
    config = tmp_path / "vp-tiny-clip.json"
    config.write_text(json.dumps(_clip_model_cfg(ref)))
    factory.add_model_config(config)
    weights = tmp_path / "tiny.pt"
    torch.save(ref.state_dict(), weights)
    assert_same("open_clip", ref, load_backbone("open_clip", "vp-tiny-clip", checkpoint_path=weights))


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #

def test_unknown_family():
    with pytest.raises(ValueError, match="unknown backbone family 'keras'") as info:
        load_backbone("keras", "resnet50")
    for family in FAMILIES:
        assert family in str(info.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_local_path(family, tmp_path, monkeypatch):
    import diffusers
    import open_clip
    import timm
    import transformers

    def fail(*args, **kwargs):
        raise AssertionError("the library was called for a missing path")

    # The path check must come before any library call.
    monkeypatch.setattr(timm, "create_model", fail)
    monkeypatch.setattr(open_clip, "create_model", fail)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail)
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", fail)
    monkeypatch.setattr(diffusers.AutoModel, "from_pretrained", fail)
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_backbone(family, str(missing))
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("family, name", [("timm", "vit_tiny_patch16_224"), ("open_clip", "ViT-B-32")])
def test_missing_checkpoint_file(family, name, tmp_path):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(FileNotFoundError, match="checkpoint_path .* does not exist"):
        load_backbone(family, name, checkpoint_path=missing)


@pytest.mark.parametrize("family, name", [
    ("timm", f"hf-hub:{MISSING_HUB_ID}"),
    ("transformers", MISSING_HUB_ID),
    ("diffusers_unet", MISSING_HUB_ID),
    ("diffusers_transformer", MISSING_HUB_ID),
    ("open_clip", f"hf-hub:{MISSING_HUB_ID}"),
])
def test_offline_hub_id(family, name):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (never reach the network from tests)")
    with pytest.raises(OfflineWeightsError, match="not available offline") as info:
        load_backbone(family, name)
    assert isinstance(info.value, OSError)
    assert "HF_HUB_OFFLINE=1" in str(info.value) and "local" in str(info.value)


def test_argument_conflicts(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="pretrained=False"):
        load_backbone("timm", "vit_tiny_patch16_224", pretrained=False, checkpoint_path=weights)
    with pytest.raises(ValueError, match="checkpoint_path"):
        load_backbone("timm", str(weights))
    with pytest.raises(ValueError, match="folder"):
        load_backbone("transformers", str(tmp_path), checkpoint_path=weights)
    with pytest.raises(ValueError, match="tag="):
        load_backbone("open_clip", "ViT-B-32")


def test_timm_names_are_checked_as_timm_reads_them():
    from visionpeft.backbones import UnknownModelError, check_timm_name

    assert check_timm_name("resnet18") and check_timm_name("vit_tiny_patch16_224.augreg_in21k")
    # names with a source (timm's deprecated hf_hub: alias, any case) are timm's to resolve
    assert not check_timm_name("hf_hub:timm/resnet18.a1_in1k") and not check_timm_name("HF-HUB:timm/resnet18")
    with pytest.raises(UnknownModelError, match=r"vit_tiny_patch16_224 has no pretrained weights tagged 'badtag'; "
                                                r"its tags: \['augreg_in21k'"):
        check_timm_name("vit_tiny_patch16_224.badtag")
    with pytest.raises(UnknownModelError, match="did you mean resnet18"):
        check_timm_name("resnet_18")
    with pytest.raises(UnknownModelError, match="Use 'hf-hub:timm/resnet18'"):
        check_timm_name("timm/resnet18")


def test_open_clip_pickle_checkpoints_are_read_tensors_only(tmp_path):
    """A .pt state dict of open_clip's layout loads (through torch.load(weights_only=True)),
    whatever open_clip version reads it; a pickle carrying code is refused, nothing run."""
    import pickle

    from visionpeft.backbones import load_backbone

    ref = load_backbone("open_clip", "embedded-clip", pretrained=False)
    good = tmp_path / "clip.pt"
    torch.save(ref.state_dict(), good)
    loaded = load_backbone("open_clip", "embedded-clip", checkpoint_path=str(good))
    for (k, a), b in zip(ref.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k

    class Code:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path(%r).touch()" % str(tmp_path / "ran"),))

    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Code()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_backbone("open_clip", "embedded-clip", checkpoint_path=str(bad))
    assert not (tmp_path / "ran").exists()
