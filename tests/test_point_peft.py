"""Point-PEFT on the Point-MAE host: the whole adapted forward against the method written
out sample by sample with brute-force geometry; the trainable count of the full-size
ScanObjectNN host against the official code's; samples of a batch kept apart; the
memory bank; save / load; and what it refuses."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BLOCK_METHOD_CONFIGS, randomize_adapters, ready_block_method

import visionpeft as vp
from visionpeft.backbones import build_point_mae
from visionpeft.backbones.tiny import build_tiny, example_inputs, run_host
from visionpeft.core.model_ops import adapted_layers, trained_copies


def _ln(x, m, bias_offset=0.0):
    return F.layer_norm(x, (x.shape[-1],), m.weight, m.bias, m.eps) + bias_offset


def _adapter(pair, x):
    z = x @ pair["down"].weight.T + pair["down"].bias
    return (z * torch.sigmoid(1.702 * z)) @ pair["up"].weight.T + pair["up"].bias


def _fps(pts, n):
    picked = [0]
    dist = ((pts - pts[0]) ** 2).sum(-1)
    for _ in range(1, n):
        picked.append(int(dist.argmax()))
        dist = torch.minimum(dist, ((pts - pts[picked[-1]]) ** 2).sum(-1))
    return picked


def _attention(x, qkv_w, proj_w, proj_b, heads, scale):
    n = x.shape[0]
    q, k, v = (x @ qkv_w.T).reshape(n, 3, heads, -1).unbind(1)
    att = torch.softmax(torch.einsum("nhd,mhd->hnm", q, k) * scale, -1)
    return torch.einsum("hnm,mhd->nhd", att, v).reshape(n, -1) @ proj_w.T + proj_b


def _tokens(model, cloud):
    """Patch tokens, position embedding and centres of one cloud (brute force)."""
    centres = cloud[_fps(cloud, model.num_group)]
    groups = torch.stack([cloud[((cloud - c) ** 2).sum(-1).argsort()[:model.group_size]] - c for c in centres])
    tokens = model.encoder(groups[None])[0]  # the frozen mini-PointNet (tested in test_point_mae)
    return tokens, model.pos_embed(centres), centres


def _block(block, x, heads, mods=None):
    """One Point-MAE block in eval mode; with the Point-PEFT tensors ``mods`` (offsets and
    MLP adapter) where given."""
    off = (lambda k: mods.bias[k]) if mods is not None else (lambda k: 0.0)
    attn = block.attn
    width = x.shape[-1]
    x = x + _attention(_ln(x, block.norm1, off("norm1")), attn.qkv.weight, attn.proj.weight, attn.proj.bias,
                       heads, (width // heads) ** -0.5) + off("proj")
    hidden = F.gelu(_ln(x, block.norm2, off("norm2")) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias + off("fc1"))
    f = hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias + off("fc2")
    if mods is None:
        return x + f
    return x + f + 0.7 * _adapter(mods.mlp_adapter, f)


def _reference(model, points, name="a", heads=6):
    """Point-PEFT's eval forward, one cloud at a time, from the method's description."""
    layers = adapted_layers(model)
    mods = [layers[f"blocks.{i}"].adapters[name]["full"] for i in range(len(model.blocks))]
    hosts = [layers[f"blocks.{i}"].base_layer for i in range(len(model.blocks))]
    shared = mods[0]
    cfg = vp.core.model_ops.get_state(model).configs[name]
    copies = trained_copies(model)
    norm, head = copies["norm"].copies[name], copies["head"].copies[name]
    out = []
    for cloud in points:
        tokens, pos, centres = _tokens(model, cloud)
        pos = torch.cat([model.cls_pos[0], pos])
        # the frozen pass: plain blocks, the host's own final norm, max over the tokens
        x = torch.cat([model.cls_token[0], tokens])
        for block in hosts:
            x = _block(block, x + pos, heads)
        query = _ln(x, model.norm)[1:].max(0).values
        sims = F.normalize(query, dim=0) @ shared.bank
        top = sims.argsort(descending=True)[:cfg.top_k]
        w = torch.softmax(sims[top], 0)
        retrieved = shared.bank[:, top].T
        cache = torch.cat([query[None], (w[:, None] * retrieved).sum(0, keepdim=True), retrieved])
        # the geometry: G/2 local centres by FPS over the token centres, k nearest each
        n_local = int(len(centres) * cfg.local_ratio)
        local = _fps(centres, n_local)
        hoods = [((centres - centres[c]) ** 2).sum(-1).argsort()[:cfg.local_k] for c in local]
        x = torch.cat([model.cls_token[0], tokens])
        for i, (block, mod) in enumerate(zip(hosts, mods)):
            h = x + pos
            h = torch.cat([h[:1] + shared.cls_pos + (shared.cls_token if i == 0 else 0), h[1:]])
            n_p = 0
            if i in cfg.prompt_blocks:
                prompts = mod.prompts + cache + _adapter(mod.prompt_adapter, cache)
                n_p = len(prompts)
                h = torch.cat([h[:1], prompts, h[1:]])
            h = _block(block, h, heads, mod)
            t = h[1 + n_p:]
            pooled = []
            for c, hood in zip(local, hoods):
                grp = t[hood]
                grp = grp + _attention(_ln(grp, shared.local_norm), shared.local_qkv.weight, shared.local_proj.weight,
                                       shared.local_proj.bias, cfg.local_heads,
                                       (cfg.local_heads * cfg.local_head_dim) ** -0.5)
                v = grp.max(0).values
                bn = mod.pool_norm
                v = (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
                pooled.append(F.gelu(v) + 0.3 * t[c])
            spread = []
            for j in range(len(t)):
                wj = torch.stack([1 / (((centres[j] - centres[c]) ** 2).sum() + 1e-8) for c in local])
                spread.append(sum(wj[m] / wj.sum() * pooled[m] for m in range(n_local)))
            t = t + 0.3 * torch.stack(spread)
            h = torch.cat([h[:1 + n_p], t])
            h = h + _adapter(mod.out_adapter, h)
            x = torch.cat([h[:1], h[1 + n_p:]])
        x = _ln(x, norm)
        feat = torch.cat([x[0], x[1:].max(0).values])[None]
        out.append(head.eval()(feat)[0])
    return torch.stack(out)


def _adapted(seed=0, **kw):
    model = build_tiny("point_mae")
    base = copy.deepcopy(model).requires_grad_(False)
    vp.inject(model, BLOCK_METHOD_CONFIGS["point_peft"](vp.presets.TIMM_BLOCKS, **kw), name="a")
    with torch.no_grad():
        randomize_adapters(model, seed=seed, std=0.1)
        for layer in adapted_layers(model).values():  # BN statistics away from 0 / 1 too
            bn = layer.adapters["a"]["full"].pool_norm
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    ready_block_method(model, "point_peft", "a", seed)
    return base, model.eval()


def test_forward_matches_the_method_written_out():
    _, model = _adapted()
    points = example_inputs("point_mae", batch=3)["points"]
    with torch.no_grad():
        ours = model(points)
        ref = _reference(model, points)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_samples_of_a_batch_stay_apart():
    # the official blocks 0-5 read other samples' rows for batches over one
    _, model = _adapted()
    points = example_inputs("point_mae", batch=4)["points"]
    with torch.no_grad():
        batch = model(points)
        for s in range(4):
            torch.testing.assert_close(model(points[s:s + 1])[0], batch[s], atol=1e-5, rtol=1e-5)


def test_trainable_count_of_the_scanobjectnn_host():
    model = build_point_mae(15, 2048, 128)
    assert sum(p.numel() for p in model.parameters()) == 22_093_327
    vp.inject(model, vp.PointPEFTConfig(), name="a")
    c, adapter, blocks = 384, 384 * 16 + 16 + 16 * 384 + 384, 12
    per_block = 2 * adapter + 2 * c + (4 * c + 4 * c)  # MLP and final adapters, BN, bias offsets (fc1: 4c)
    prompts = 6 * (10 * c + 384 * 8 + 8 + 8 * 384 + 384)
    shared = c * 54 + 18 * c + c + 2 * c + 2 * c  # local qkv, proj, its norm; cls token and pos offsets
    head = 768 * 256 + 256 + 512 + 256 * 256 + 256 + 512 + 256 * 15 + 15
    expected = blocks * per_block + prompts + shared + 2 * c + head  # + the final norm
    assert expected == 710_719  # the official 710,761 used: + 12 unused gates + 30 learned centre points
    assert vp.trainable_parameters(model) == expected


def test_disabled_is_the_host_and_removal_restores_it(tmp_path):
    base, model = _adapted()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    inputs = example_inputs("point_mae")
    with torch.no_grad():
        ref = run_host("point_mae", base, inputs)
        out = run_host("point_mae", model, inputs)
        with vp.disabled(model):
            assert torch.equal(run_host("point_mae", model, inputs), ref)
    assert (out - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no weight-space form"):
        vp.merge(model)
    vp.save_adapter(model, tmp_path / "a", name="a")
    fresh = build_tiny("point_mae")
    vp.load_adapter(fresh, tmp_path / "a")
    assert vp.core.model_ops.get_state(fresh).configs["a"].bank_size == 6
    with torch.no_grad():
        torch.testing.assert_close(run_host("point_mae", fresh.eval(), inputs), out)
    vp.remove(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()) and list(model.state_dict()) == list(sd)


def test_training_reaches_every_trainable_tensor_and_leaves_the_host():
    _, model = _adapted()
    model.train()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    tracked = model.encoder.first_conv[1].num_batches_tracked.clone()
    loss = model(example_inputs("point_mae", batch=3)["points"]).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    # the frozen pass for the bank query runs in eval mode: the host's BN statistics move
    # once, through the adapted forward itself (as any train-mode forward of the host)
    assert int(model.encoder.first_conv[1].num_batches_tracked) == int(tracked) + 1
    assert model.training and model.blocks[0].training  # and the modes come back


def test_a_new_bank_changes_the_prompts_and_is_checked():
    _, model = _adapted()
    points = example_inputs("point_mae")["points"]
    with torch.no_grad():
        before = model(points)
        vp.set_memory_bank(model, torch.randn(9, 36), name="a")
        assert not torch.allclose(model(points), before)
    assert vp.core.model_ops.get_state(model).configs["a"].bank_size == 9
    bank = adapted_layers(model)["blocks.0"].adapters["a"]["full"].bank
    torch.testing.assert_close(bank.norm(dim=0), torch.ones(9))
    for features, message in [(torch.randn(2, 36), "at least top_k=3"), (torch.randn(9, 5), r"\(samples, 36\)"),
                              (torch.full((9, 36), float("nan")), "NaN")]:
        with pytest.raises(ValueError, match=message):
            vp.set_memory_bank(model, features, name="a")
    with pytest.raises(ValueError, match="no Point-PEFT adapter named 'b'"):
        vp.set_memory_bank(model, torch.randn(9, 36), name="b")


def test_refusals_in_one_line():
    model = build_tiny("point_mae")
    vp.inject(model, BLOCK_METHOD_CONFIGS["point_peft"](vp.presets.TIMM_BLOCKS), name="a")
    with pytest.raises(RuntimeError, match="memory bank"):
        model(example_inputs("point_mae")["points"])
    vit = build_tiny("timm_vit")
    vp.inject(vit, BLOCK_METHOD_CONFIGS["point_peft"](vp.presets.TIMM_BLOCKS), name="a")
    with pytest.raises(TypeError, match="Block has no drop_path"):  # timm names it drop_path1 / drop_path2
        run_host("timm_vit", vit, example_inputs("timm_vit"))
    with pytest.raises(TypeError, match="token centres"):  # a Point-MAE block called without them
        model.blocks[2](torch.randn(2, 9, 36))
    for kw, message in [({"prompt_blocks": [7]}, r"prompt_blocks \[7\]"), ({"alpha": 2.0}, "no alpha"),
                        ({"local_ratio": 0}, "local_ratio"), ({"dropout": 1.0}, "dropout")]:
        with pytest.raises(ValueError, match=message):
            vp.inject(build_tiny("point_mae"), BLOCK_METHOD_CONFIGS["point_peft"](vp.presets.TIMM_BLOCKS, **kw))


def test_lora_and_the_adapter_work_on_this_host_too():
    model = build_tiny("point_mae")
    points = example_inputs("point_mae")["points"]
    with torch.no_grad():
        ref = model(points)
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=vp.presets.TIMM_VIT_QKV), name="l")
    vp.inject(model, vp.AdapterConfig(bottleneck=4, target_modules=vp.presets.TIMM_BLOCKS), name="b")
    randomize_adapters(model, std=0.1)
    with torch.no_grad():
        out = model(points)
        with vp.disabled(model):
            torch.testing.assert_close(model(points), ref)
    assert (out - ref).abs().max() > 1e-3


def test_a_bank_changed_in_place_is_used_at_once():
    # a hot-swap copies the bank into the same buffer: the cached lookup must not outlive it
    _, model = _adapted()
    points = example_inputs("point_mae")["points"]
    bank = adapted_layers(model)["blocks.0"].adapters["a"]["full"].bank
    with torch.no_grad():
        before = model(points)
        bank.copy_(F.normalize(torch.randn_like(bank), dim=0))
        assert not torch.allclose(model(points), before)
