"""Point-PEFT's pure math against the formulas written out one sample and one token at a time."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visionpeft.ops.point_peft_math import (bottleneck, local_attention, local_geometry, local_neighbourhoods,
                                            quick_gelu, retrieve_cache_tokens)


def test_quick_gelu_and_bottleneck():
    z = torch.linspace(-4, 4, 9)
    assert torch.allclose(quick_gelu(z), z / (1 + torch.exp(-1.702 * z)))
    x = torch.randn(3, 5, 12)
    dw, db, uw, ub = torch.randn(4, 12), torch.randn(4), torch.randn(12, 4), torch.randn(12)
    h = x @ dw.T + db
    assert torch.allclose(bottleneck(x, dw, db, uw, ub), (h * torch.sigmoid(1.702 * h)) @ uw.T + ub, atol=1e-5)


def test_bank_lookup_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(16, 30, generator=g), dim=0)
    query = torch.randn(3, 16, generator=g) * 4  # not unit length: the first cache token keeps its size
    out = retrieve_cache_tokens(query, bank, k=5)
    assert out.shape == (3, 7, 16)
    for b in range(3):
        q = query[b].double() / query[b].double().norm()
        sims = [float(q @ bank[:, j].double()) for j in range(30)]
        top = sorted(range(30), key=lambda j: -sims[j])[:5]
        w = np.exp([sims[j] for j in top])
        w /= w.sum()
        mean = sum(w[i] * bank[:, j].double().numpy() for i, j in enumerate(top))
        assert torch.equal(out[b, 0], query[b])
        np.testing.assert_allclose(out[b, 1].numpy(), mean, rtol=1e-5, atol=1e-6)
        for i, j in enumerate(top):
            assert torch.equal(out[b, 2 + i], bank[:, j])


def test_bank_lookup_refuses_a_small_bank_or_other_width():
    with pytest.raises(ValueError, match="fewer than k=8"):
        retrieve_cache_tokens(torch.randn(2, 4), torch.randn(4, 5), k=8)
    with pytest.raises(ValueError, match="same C"):
        retrieve_cache_tokens(torch.randn(2, 4), torch.randn(5, 20))


def test_local_attention_matches_the_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 12, generator=g)
    qkv, pw, pb = torch.randn(18, 12, generator=g), torch.randn(12, 6, generator=g), torch.randn(12, generator=g)
    out = local_attention(x, qkv, pw, pb, heads=3)
    for n in range(4):
        t = x[n].double() @ qkv.double().T  # (k, 18): q | k | v, each 3 heads of 2
        heads = []
        for h in range(3):
            q, k, v = (t[:, part * 6 + 2 * h: part * 6 + 2 * h + 2] for part in range(3))
            att = torch.softmax(q @ k.T / math.sqrt(6), dim=-1)  # scaled by the whole inner width 6
            heads.append(att @ v)
        expected = torch.cat(heads, dim=1) @ pw.double().T + pb.double()
        assert torch.allclose(out[n].double(), expected, atol=1e-5)


def test_geometry_update_matches_the_loop():
    g = torch.Generator().manual_seed(2)
    b, n_tok, c, n_local, k = 2, 12, 8, 6, 4
    tokens, centres = torch.randn(b, n_tok, c, generator=g), torch.randn(b, n_tok, 3, generator=g)
    local, neighbours = local_neighbourhoods(centres, n_local, k)
    bn = torch.nn.BatchNorm1d(c).eval()
    bn.running_mean.normal_(generator=g)
    bn.running_var.uniform_(0.5, 2.0, generator=g)
    attend_w = torch.randn(c, c, generator=g) * 0.3
    out = local_geometry(tokens, centres, local, neighbours, lambda h: torch.tanh(h @ attend_w), bn)
    for s in range(b):
        # the neighbourhoods: FPS from token 0 over the centres, each its k nearest centres, itself first
        assert local[s, 0] == 0
        for i in range(n_local):
            d = ((centres[s] - centres[s, local[s, i]]) ** 2).sum(-1)
            assert neighbours[s, i].tolist() == d.argsort()[:k].tolist()
        pooled = []
        for i in range(n_local):
            grp = tokens[s, neighbours[s, i]]
            grp = grp + torch.tanh(grp @ attend_w)
            v = grp.max(0).values
            v = (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            pooled.append(F.gelu(v) + 0.3 * tokens[s, local[s, i]])
        for t in range(n_tok):
            w = torch.stack([1 / (((centres[s, t] - centres[s, local[s, i]]) ** 2).sum() + 1e-8)
                             for i in range(n_local)])
            spread = sum(w[i] / w.sum() * pooled[i] for i in range(n_local))
            assert torch.allclose(out[s, t], tokens[s, t] + 0.3 * spread, atol=1e-4)


def test_geometry_update_keeps_samples_apart():
    # the official blocks 0-5 read other samples' tokens for batches over 1; here a sample's
    # result is the same alone and in a batch
    g = torch.Generator().manual_seed(3)
    tokens, centres = torch.randn(3, 10, 4, generator=g), torch.randn(3, 10, 3, generator=g)
    bn = torch.nn.BatchNorm1d(4).eval()

    def run(t, c):
        local, nb = local_neighbourhoods(c, 5, 3)
        return local_geometry(t, c, local, nb, lambda h: 0.5 * h, bn)

    batch = run(tokens, centres)
    for s in range(3):
        assert torch.allclose(batch[s], run(tokens[s:s + 1], centres[s:s + 1])[0], atol=1e-6)
