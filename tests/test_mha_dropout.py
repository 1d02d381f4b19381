"""Adapter dropout on nn.MultiheadAttention (open_clip's attention in both towers): while
training, each q/k/v adapter sees its own dropped-out input, as CLIP-LoRA's per-projection
LoRA layers do. Checked against torch's own attention (F.multi_head_attention_forward with
identity projections) fed q/k/v written out by hand from the LoRA factors and the same
seeded masks; the input-side path itself against the weight-space path when no dropout acts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp


def _mha(batch_first, seed=0):
    torch.manual_seed(seed)
    host = nn.Sequential()
    host.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    return host


def _randomize(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _reference(mha, factors, x, p, seed, attn_mask=None, batch_first=True):
    """q/k/v = x W^T + b + scale * B A drop(x), one mask per projection (q, k, v order),
    then torch's own attention core through identity projections."""
    torch.manual_seed(seed)
    e = mha.embed_dim
    xs = x if batch_first else x.transpose(0, 1)
    proj = []
    for i, part in enumerate("qkv"):
        y = F.linear(xs, mha.in_proj_weight[i * e:(i + 1) * e], mha.in_proj_bias[i * e:(i + 1) * e])
        if part in factors:
            a, b, scale = factors[part]
            y = y + scale * F.linear(F.linear(F.dropout(xs, p, True), a), b)
        proj.append(y.transpose(0, 1))  # (L, N, E) for the functional form
    eye = torch.eye(e)
    out, _ = F.multi_head_attention_forward(
        proj[0], proj[1], proj[2], e, mha.num_heads, in_proj_weight=None, in_proj_bias=torch.zeros(3 * e),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=mha.out_proj.weight,
        out_proj_bias=mha.out_proj.bias, training=True, need_weights=False, attn_mask=attn_mask,
        use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye)
    return out.transpose(0, 1) if batch_first else out


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("parts", ["attn[q,k,v]", "attn[q,v]"])
def test_training_dropout_equals_clip_lora_per_projection_layers(batch_first, parts):
    host = _mha(batch_first)
    vp.inject(host, vp.LoRAConfig(r=2, alpha=1, rank_stabilized=True, dropout=0.3, target_modules=[parts]),
              name="a")
    _randomize(host)
    host.train()
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    causal = torch.full((5, 5), float("-inf")).triu(1)  # open_clip's text tower mask
    wrapped = host.attn
    factors = {part: (mod.lora_A, mod.lora_B, mod.scale) for part, mod in wrapped.adapters["a"].items()}
    for mask in (None, causal):
        torch.manual_seed(7)
        ours = host.attn(x, x, x, need_weights=False, attn_mask=mask)[0]
        ref = _reference(wrapped.base_layer, factors, x, 0.3, 7, mask, batch_first)
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    torch.manual_seed(8)
    again = host.attn(x, x, x, need_weights=False)[0]
    torch.manual_seed(7)
    assert not torch.allclose(again, host.attn(x, x, x, need_weights=False)[0])  # the masks act
    ours.sum().backward()
    assert all(mod.lora_B.grad is not None for _, mod in wrapped.adapters["a"].items())


@pytest.mark.parametrize("batch_first", [True, False])
def test_input_side_path_equals_weight_space_path_without_dropout(batch_first):
    """With dropout inactive (eval), the input-side forward (masks, padding, weights,
    out_proj adapters, the whole in_proj) gives the weight-space path's outputs."""
    host = _mha(batch_first)
    vp.inject(host, vp.LoRAConfig(r=2, dropout=0.5, target_modules=["attn[q,k,v]"]), name="a")
    vp.inject(host, vp.LoRAConfig(r=3, dropout=0.5, target_modules=["attn"]), name="b")
    vp.set_active(host, ["a", "b"])
    _randomize(host)
    host.eval()
    w = host.attn
    n = 2
    x = torch.randn(n, 4, 8) if batch_first else torch.randn(4, n, 8)
    y = torch.randn(n, 6, 8) if batch_first else torch.randn(6, n, 8)
    kpm = torch.tensor([[False, False, True, False, False, True], [False] * 6])
    bool_mask = torch.rand(4, 6) > 0.7
    st = w.state
    for args, kwargs in [((x, x, x), {"need_weights": False}),
                         ((x, y, y), {"key_padding_mask": kpm}),
                         ((x, y, y), {"attn_mask": bool_mask, "average_attn_weights": False}),
                         ((x, y, y), {"attn_mask": torch.randn(n * 2, 4, 6), "key_padding_mask": kpm})]:
        want = w._run(["a", "b"], st, args, kwargs)
        got = w._run_input_side(["a", "b"], st, args, kwargs)
        assert torch.allclose(got[0], want[0], atol=1e-5)
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            assert torch.allclose(got[1], want[1], atol=1e-6)
    unbatched = torch.randn(4, 8)
    assert torch.allclose(w._run_input_side(["a"], st, (unbatched,) * 3, {})[0],
                          w._run(["a"], st, (unbatched,) * 3, {})[0], atol=1e-5)
