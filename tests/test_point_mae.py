"""The Point-MAE host: its forward against a functional re-implementation of the official
architecture from the state dict alone, the parameter count, and official checkpoints
written in their exact layout (pretraining ``base_model`` with ``module.`` and
``MAE_encoder.`` prefixes and decoder keys; fine-tuned ``blocks.blocks`` / ``cls_head_finetune``)."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from visionpeft.backbones import build_point_mae
from visionpeft.backbones.point_mae import PointMAE

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def _official_pretrain_keys(depth=12):
    """Our name -> the name in Point-MAE's pretrain.pth (written out by hand from its model)."""
    names = {}
    for seq in ("first_conv", "second_conv"):
        for i in (0, 3):
            for p in ("weight", "bias"):
                names[f"encoder.{seq}.{i}.{p}"] = f"module.MAE_encoder.encoder.{seq}.{i}.{p}"
        for p in BN:
            names[f"encoder.{seq}.1.{p}"] = f"module.MAE_encoder.encoder.{seq}.1.{p}"
    for i in (0, 2):
        for p in ("weight", "bias"):
            names[f"pos_embed.{i}.{p}"] = f"module.MAE_encoder.pos_embed.{i}.{p}"
    for b in range(depth):
        for k in BLOCK_KEYS:
            names[f"blocks.{b}.{k}"] = f"module.MAE_encoder.blocks.blocks.{b}.{k}"
    names["norm.weight"], names["norm.bias"] = "module.MAE_encoder.norm.weight", "module.MAE_encoder.norm.bias"
    return names


def _decoder_entries():
    """What pretrain.pth holds beyond the encoder (a classifier ignores these)."""
    extra = {"module.mask_token": torch.randn(1, 1, 384), "module.increase_dim.0.weight": torch.randn(96, 384, 1),
             "module.increase_dim.0.bias": torch.randn(96), "module.decoder_pos_embed.0.weight": torch.randn(128, 3),
             "module.MAE_decoder.norm.weight": torch.randn(384)}
    for k in BLOCK_KEYS:
        extra[f"module.MAE_decoder.blocks.0.{k}"] = torch.randn(3)
    return extra


def _randomised(model):
    """Give every parameter and BN statistic non-trivial values, so a mix-up shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.25 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))
    return model


def _reference_logits(sd, points, num_group, group_size, depth=12, heads=6):
    """The official PointTransformer's eval forward, written from its description with
    functional ops and brute-force grouping (first FPS pick 0, farthest next; k nearest
    sorted), from the state dict only."""
    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)

    def lin(x, p, bias=True):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"] if bias else None)

    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    out = []
    for cloud in points:
        picked = [0]
        dist = ((cloud - cloud[0]) ** 2).sum(-1)
        for _ in range(1, num_group):
            picked.append(int(dist.argmax()))
            dist = torch.minimum(dist, ((cloud - cloud[picked[-1]]) ** 2).sum(-1))
        centres = cloud[picked]
        groups = torch.stack([cloud[((cloud - c) ** 2).sum(-1).argsort()[:group_size]] - c for c in centres])
        x = groups.transpose(1, 2)  # (G, 3, M)
        f = F.conv1d(x, sd["encoder.first_conv.0.weight"], sd["encoder.first_conv.0.bias"])
        f = F.conv1d(F.relu(bn(f, "encoder.first_conv.1")), sd["encoder.first_conv.3.weight"],
                     sd["encoder.first_conv.3.bias"])
        f = torch.cat([f.max(2, keepdim=True).values.expand_as(f), f], 1)
        f = F.conv1d(f, sd["encoder.second_conv.0.weight"], sd["encoder.second_conv.0.bias"])
        f = F.conv1d(F.relu(bn(f, "encoder.second_conv.1")), sd["encoder.second_conv.3.weight"],
                     sd["encoder.second_conv.3.bias"])
        tokens = f.max(2).values
        pos = lin(F.gelu(lin(centres, "pos_embed.0")), "pos_embed.2")
        x = torch.cat([sd["cls_token"][0], tokens])
        pos = torch.cat([sd["cls_pos"][0], pos])
        for b in range(depth):
            p = f"blocks.{b}."
            x = x + pos
            q, k, v = lin(ln(x, p + "norm1"), p + "attn.qkv", bias=False).reshape(len(x), 3, heads, -1).unbind(1)
            att = torch.softmax(torch.einsum("nhd,mhd->hnm", q, k) * (384 // heads) ** -0.5, -1)
            x = x + lin(torch.einsum("hnm,mhd->nhd", att, v).reshape(len(x), -1), p + "attn.proj")
            x = x + lin(F.gelu(lin(ln(x, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        x = ln(x, "norm")
        h = torch.cat([x[0], x[1:].max(0).values])[None]
        h = F.relu(bn(lin(h, "head.0"), "head.1"))
        h = F.relu(bn(lin(h, "head.4"), "head.5"))
        out.append(lin(h, "head.8")[0])
    return torch.stack(out)


def _clouds(b=2, n=256, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(b, n, 3))).float()


def test_forward_matches_the_official_architecture():
    model = _randomised(PointMAE(15, num_points=256, num_group=16, group_size=8)).eval()
    points = _clouds()
    with torch.no_grad():
        ours = model(points)
        ref = _reference_logits(model.state_dict(), points, 16, 8)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_size_is_point_mae_s():
    # Point-MAE's classifier with 15 classes: 22,093,327 parameters (its PointTransformer, counted)
    assert sum(p.numel() for p in build_point_mae(15, 2048, 128).parameters()) == 22_093_327


def test_init_is_truncated_normal_and_zero_bias():
    model = PointMAE(40)
    w = model.blocks[3].mlp.fc1.weight
    assert abs(float(w.std()) - 0.02) < 0.001 and float(model.blocks[3].mlp.fc1.bias.abs().max()) == 0.0
    assert model.blocks[0].drop_path.p == 0.0 and model.blocks[11].drop_path.p == pytest.approx(0.1)
    assert model.blocks[0].attn.qkv.bias is None


def _write_pretrain(path, source, **extra):
    """``source``'s encoder saved as Point-MAE's pretrain.pth: {'base_model': {...}, ...}."""
    sd = source.state_dict()
    base = {official: sd[ours] for ours, official in _official_pretrain_keys().items()}
    base.update(_decoder_entries())
    torch.save({"base_model": base, "epoch": 300, "metrics": {}, "optimizer": {}, **extra}, path)


def test_official_pretrain_checkpoint_loads_the_encoder(tmp_path):
    source = _randomised(PointMAE(15))
    _write_pretrain(tmp_path / "pretrain.pth", source)
    model = build_point_mae(15, checkpoint_path=tmp_path / "pretrain.pth")
    ours, theirs = model.state_dict(), source.state_dict()
    for key in _official_pretrain_keys():
        assert torch.equal(ours[key], theirs[key]), key
    # what pretraining does not hold starts fresh: cls init, the head at PyTorch's default
    assert not torch.equal(ours["cls_token"], theirs["cls_token"])
    fresh = torch.nn.Linear(768, 256).weight
    assert float(ours["head.0.weight"].abs().max()) <= float(fresh.abs().max()) + 1e-6 and \
        float(ours["head.0.weight"].std()) > 0.02  # U(+-1/sqrt(768)), wider than trunc-normal 0.02


def test_fine_tuned_checkpoint_loads_whole_and_as_safetensors(tmp_path):
    source = _randomised(PointMAE(15, num_points=256, num_group=16, group_size=8)).eval()
    sd = source.state_dict()
    names = {**_official_pretrain_keys(), "cls_token": "module.cls_token", "cls_pos": "module.cls_pos"}
    for k in sd:
        if k.startswith("head."):
            names[k] = "module.cls_head_finetune." + k[len("head."):]
    names = {ours: official.replace("MAE_encoder.", "") for ours, official in names.items()}
    torch.save({"base_model": {names[k]: v for k, v in sd.items()}, "epoch": 12}, tmp_path / "ckpt-best.pth")
    save_file({names[k]: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ckpt.safetensors"))
    points = _clouds(n=256)
    for f in ("ckpt-best.pth", "ckpt.safetensors"):
        model = build_point_mae(15, 256, 16, 8, checkpoint_path=tmp_path / f).eval()
        with torch.no_grad():
            assert torch.equal(model(points), source(points))
    # another class count: the encoder loads, the head is new
    model = build_point_mae(40, 256, 16, 8, checkpoint_path=tmp_path / "ckpt-best.pth")
    assert torch.equal(model.blocks[5].attn.qkv.weight, source.blocks[5].attn.qkv.weight)
    assert model.head[8].out_features == 40


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch should_not_exist",))


def test_pickle_carrying_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"base_model": {"x": _Payload()}}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        build_point_mae(15, checkpoint_path=tmp_path / "evil.pth")
    assert not (tmp_path / "should_not_exist").exists()


def test_wrong_checkpoints_are_refused_in_one_line(tmp_path):
    source = PointMAE(15)
    torch.save({"base_model": {"module.foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    sd = source.state_dict()
    small = {official: sd[ours][..., :2] if ours == "norm.weight" else sd[ours]
             for ours, official in _official_pretrain_keys().items()}
    torch.save({"base_model": small}, tmp_path / "shape.pth")
    partial = {official: sd[ours] for ours, official in _official_pretrain_keys().items() if "blocks.11" not in ours}
    torch.save({"base_model": partial}, tmp_path / "partial.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    for name, message in [("other.pth", "keys a Point-MAE classifier does not have"),
                          ("shape.pth", r"norm.weight is \(2,\)"), ("partial.pth", "lacks 11 encoder weights"),
                          ("list.pth", "not a Point-MAE checkpoint"), ("missing.pth", "no Point-MAE checkpoint")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
            build_point_mae(15, checkpoint_path=tmp_path / name)
        assert "\n" not in str(err.value)


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match=r"\(batch, points, 3\)"):
        PointMAE(5, num_points=64, num_group=8, group_size=4)(torch.zeros(2, 64, 6))


def test_pretraining_model_is_point_mae_s_and_its_checkpoint_loads(tmp_path):
    from visionpeft.backbones.point_mae import PointMAEPretrain

    model = PointMAEPretrain()
    sd = model.state_dict()
    # the released pretrain.pth: 209 entries, 29,006,432 parameters (Point_MAE, counted)
    assert len(sd) == 209 and sum(p.numel() for p in model.parameters()) == 29_006_432
    encoder = {official.replace("module.", "") for official in _official_pretrain_keys().values()}
    assert encoder <= set(sd)
    assert {k.replace("module.", "") for k in _decoder_entries()} <= set(sd)
    torch.save({"base_model": {"module." + k: v for k, v in sd.items()}}, tmp_path / "pretrain.pth")
    clf = build_point_mae(15, checkpoint_path=tmp_path / "pretrain.pth")
    assert torch.equal(clf.blocks[11].mlp.fc2.weight, model.MAE_encoder.blocks.blocks[11].mlp.fc2.weight)
    assert torch.equal(clf.encoder.second_conv[1].running_var, model.MAE_encoder.encoder.second_conv[1].running_var)


def test_pretraining_loss_is_the_chamfer_distance_of_the_hidden_patches():
    from visionpeft.backbones.point_mae import PointMAEPretrain
    from visionpeft.ops.points import group_points

    torch.manual_seed(0)
    model = _randomised(PointMAEPretrain(num_group=8, group_size=4, dim=24, depth=2, heads=4, decoder_depth=1,
                                         mask_ratio=0.5)).eval()
    points = _clouds(b=2, n=64)
    torch.manual_seed(5)
    loss = model(points)
    torch.manual_seed(5)
    order = torch.rand(2, 8).argsort(dim=1)  # the same draw: hidden = the first half of a random order
    neigh, centres = group_points(points, 8, 4)
    enc, total = model.MAE_encoder, 0.0
    with torch.no_grad():
        for s in range(2):
            hid, vis = order[s, :4], order[s, 4:]
            x = enc.encoder(neigh[s, vis][None])[0]
            pos = enc.pos_embed(centres[s, vis])
            for blk in enc.blocks.blocks:
                x = blk((x + pos)[None])[0]
            x = torch.cat([enc.norm(x), model.mask_token[0].expand(4, -1)])
            dpos = model.decoder_pos_embed(torch.cat([centres[s, vis], centres[s, hid]]))
            for blk in model.MAE_decoder.blocks:
                x = blk((x + dpos)[None])[0]
            pred = model.increase_dim(model.MAE_decoder.norm(x[4:]).T[None])[0].T.reshape(4, 4, 3)
            for p, t in zip(pred, neigh[s, hid]):
                d = ((p[:, None] - t[None]) ** 2).sum(-1)
                total += (d.min(1).values.mean() + d.min(0).values.mean()) / 8  # a mean over the 8 hidden patches
    assert loss.item() == pytest.approx(float(total), rel=1e-5)


def test_embedded_point_mae_script_writes_an_encoder_build_point_mae_loads(tmp_path):
    import importlib.util

    from safetensors.torch import load_file

    from visionpeft.backbones.embedded_point_mae import SIZE

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("pretrain_epm", root / "scripts" / "pretrain_embedded_point_mae.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    summary = script.main(["--steps", "2", "--pool", "8", "--batch", "2", "--threads", "1", "--weights",
                           str(tmp_path / "w.safetensors"), "--docs", str(tmp_path / "docs"), "--output-dir",
                           str(tmp_path / "out")])
    tensors = load_file(str(tmp_path / "w.safetensors"))
    assert all(k.startswith("MAE_encoder.") for k in tensors) and summary["size_bytes"] < 20 * 2 ** 20
    model = build_point_mae(4, checkpoint_path=tmp_path / "w.safetensors", **SIZE)
    assert torch.equal(model.blocks[5].mlp.fc1.weight, tensors["MAE_encoder.blocks.blocks.5.mlp.fc1.weight"])
    assert (tmp_path / "docs" / "embedded_point_mae_pretrain.json").is_file()


def test_embedded_point_mae_loads_from_the_package_or_says_how_to_make_it(monkeypatch, tmp_path):
    from visionpeft.backbones import embedded_point_mae as emb
    from visionpeft.pipelines.pointcloud.task import build_model

    backbone = {"name": "embedded-point-mae", **emb.SIZE}
    if emb.WEIGHTS_FILE.is_file():  # the shipped file, through the checkpoint path of official weights
        model = build_model(backbone, 4, 1024, (64, 32))
        from safetensors.torch import load_file

        shipped = load_file(str(emb.WEIGHTS_FILE))
        assert torch.equal(model.blocks[0].attn.qkv.weight, shipped["MAE_encoder.blocks.blocks.0.attn.qkv.weight"])
    monkeypatch.setattr(emb, "WEIGHTS_FILE", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="python scripts/pretrain_embedded_point_mae.py"):
        build_model(backbone, 4, 1024, (64, 32))
