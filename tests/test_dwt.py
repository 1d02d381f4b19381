"""visionpeft.ops.dwt against PyWavelets (mode="periodization"), plus gradients and errors."""
import numpy as np
import pytest
import pywt
import torch

from visionpeft.ops import dwt as D

WAVELETS = ["haar", "db2", "sym4", "coif1"]


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t(a, dtype=torch.float64):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _close(t, ref, atol=1e-10):
    np.testing.assert_allclose(t.detach().cpu().double().numpy(), ref, rtol=0, atol=atol)


# ------------------------------------------------------------------ 1-D building blocks
@pytest.mark.parametrize("name", WAVELETS + ["db4"])
@pytest.mark.parametrize("n", [2, 4, 16, 40])  # n < filter length exercises multi-wrap
def test_1d_analysis_and_synthesis_match_pywt(name, n):
    rng = _rng(1)
    x = rng.standard_normal((3, n))
    ana, syn = D._weights(name, torch.float64, torch.device("cpu"))
    y = D._analyze_last(_t(x), ana)
    a, d = pywt.dwt(x, name, mode="periodization")
    _close(y[:, 0], a)
    _close(y[:, 1], d)
    c = rng.standard_normal((3, 2, n // 2))
    ref = pywt.idwt(c[:, 0], c[:, 1], name, mode="periodization")
    _close(D._synthesize_last(_t(c), syn), ref)


# ------------------------------------------------------------------ 2-D single level
@pytest.mark.parametrize("name", WAVELETS)
@pytest.mark.parametrize("shape", [(16, 24), (8, 40)])
def test_dwt2_idwt2_match_pywt(name, shape):
    rng = _rng(2)
    x = rng.standard_normal(shape)
    cA, (cH, cV, cD) = D.dwt2(_t(x), name)
    rA, (rH, rV, rD) = pywt.dwt2(x, name, mode="periodization")
    for got, ref in ((cA, rA), (cH, rH), (cV, rV), (cD, rD)):
        assert tuple(got.shape) == ref.shape
        _close(got, ref)
    bands = [rng.standard_normal(rA.shape) for _ in range(4)]
    ref = pywt.idwt2((bands[0], tuple(bands[1:])), name, mode="periodization")
    _close(D.idwt2(_t(bands[0]), [_t(b) for b in bands[1:]], name), ref)


def test_band_order_and_sign_conventions():
    # columns alternate -> variation along axis -1 only -> lands in cV, not cH
    x = torch.zeros(4, 4, dtype=torch.float64)
    x[:, ::2] = 1.0
    cA, (cH, cV, cD) = D.dwt2(x, "haar")
    # zero up to rounding: a kernel that fuses multiply-adds (FMA) leaves 1/sqrt2 * 1/sqrt2's
    # rounding error, ~4e-17, where separate products cancel exactly
    assert cH.abs().max() < 1e-15 and cD.abs().max() < 1e-15 and cV.abs().max() > 0.5
    # pywt haar dec_hi = [-1/sqrt2, 1/sqrt2] applied as y[k] = sum_j h[j] x[2k+1-j]:
    # detail = (x[2k] - x[2k+1]) / sqrt2 per axis, so even-indexed ones give +1 here
    _close(cV, np.full((2, 2), 1.0))
    _close(cV, pywt.dwt2(x.numpy(), "haar", mode="periodization")[1][1])
    _close(D.dwt2(x.T.contiguous(), "haar")[1][0], np.full((2, 2), 1.0))  # rows -> cH


# ------------------------------------------------------------------ multi-level
# pywt warns when a level exceeds its filter-length "usefulness" bound; periodization is
# still exact there, and that is what is being compared
@pytest.mark.filterwarnings("ignore:Level value of:UserWarning")
@pytest.mark.parametrize("name", WAVELETS)
@pytest.mark.parametrize("shape", [(32, 48), (24, 64)])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_wavedec2_waverec2_match_pywt(name, shape, level):
    rng = _rng(3)
    x = rng.standard_normal(shape)
    got = D.wavedec2(_t(x), name, level)
    ref = pywt.wavedec2(x, name, mode="periodization", level=level)
    assert len(got) == len(ref) == level + 1
    _close(got[0], ref[0])
    for g, r in zip(got[1:], ref[1:]):
        for gb, rb in zip(g, r):
            assert tuple(gb.shape) == rb.shape
            _close(gb, rb)
    # reconstruction of arbitrary (not analysis-produced) coefficients
    rand = [rng.standard_normal(ref[0].shape)] + [
        tuple(rng.standard_normal(b.shape) for b in r) for r in ref[1:]
    ]
    out = D.waverec2([_t(rand[0])] + [tuple(_t(b) for b in r) for r in rand[1:]], name)
    _close(out, pywt.waverec2(rand, name, mode="periodization"))
    # perfect reconstruction
    _close(D.waverec2(got, name), x)


def test_subband_shapes_match_wavedec2():
    x = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0))
    coeffs = D.wavedec2(x, "db2", 3)
    shapes = D.subband_shapes(x.shape, 3)
    assert tuple(coeffs[0].shape) == shapes[0]
    for c, s in zip(coeffs[1:], shapes[1:]):
        assert tuple(tuple(b.shape) for b in c) == s
    assert D.subband_shapes((8, 8), 0) == [(8, 8)]
    assert D.wavedec2(x, "haar", 0)[0] is x


@pytest.mark.filterwarnings("ignore:Level value of:UserWarning")
def test_float32_matches_pywt():
    rng = _rng(4)
    x = rng.standard_normal((32, 48))
    got = D.waverec2(D.wavedec2(_t(x, torch.float32), "sym4", 3), "sym4")
    assert got.dtype == torch.float32
    _close(got, x, atol=1e-5)
    cA = D.wavedec2(_t(x, torch.float32), "sym4", 3)[0]
    _close(cA, pywt.wavedec2(x, "sym4", mode="periodization", level=3)[0], atol=1e-4)


def test_batch_dims():
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 16, 24))
    got = D.wavedec2(_t(x), "db2", 2)
    ref = pywt.wavedec2(x, "db2", mode="periodization", level=2)  # pywt: axes=(-2, -1)
    _close(got[0], ref[0])
    for g, r in zip(got[1:], ref[1:]):
        for gb, rb in zip(g, r):
            _close(gb, rb)
    _close(D.waverec2(got, "db2"), x)


# ------------------------------------------------------------------ gradients
def test_gradcheck_waverec2_and_wavedec2():
    g = torch.Generator().manual_seed(6)
    shapes = D.subband_shapes((4, 8), 2)
    leaves = [torch.randn(shapes[0], dtype=torch.float64, generator=g)]
    for s in shapes[1:]:
        leaves += [torch.randn(b, dtype=torch.float64, generator=g) for b in s]
    leaves = [t.requires_grad_() for t in leaves]

    def rec(*ts):
        return D.waverec2([ts[0], ts[1:4], ts[4:7]], "db2")

    assert torch.autograd.gradcheck(rec, leaves)
    x = torch.randn(4, 8, dtype=torch.float64, generator=g, requires_grad=True)

    def dec(x):
        c = D.wavedec2(x, "coif1", 2)
        return torch.cat([c[0].flatten()] + [b.flatten() for t in c[1:] for b in t])

    assert torch.autograd.gradcheck(dec, (x,))


def test_pad_crop_round_trip_and_adjoint():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 13, 21, dtype=torch.float64, generator=g)
    xp, orig = D.pad_to_multiple(x, 3)
    assert orig == (13, 21) and tuple(xp.shape) == (2, 16, 24)
    assert torch.equal(xp[..., 13:, :], torch.zeros_like(xp[..., 13:, :]))
    coeffs = D.wavedec2(xp, "sym4", 3)
    back = D.crop(D.waverec2(coeffs, "sym4"), orig)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    # what an adapter needs: dW = crop(waverec2(c)); its gradient w.r.t. c is the analysis
    # of the zero-padded upstream gradient (orthogonality), and autograd computes exactly that
    flat = [coeffs[0]] + [b for t in coeffs[1:] for b in t]
    leaves = [c.detach().clone().requires_grad_() for c in flat]
    nested = [leaves[0]] + [tuple(leaves[i:i + 3]) for i in range(1, len(leaves), 3)]
    dw = D.crop(D.waverec2(nested, "sym4"), orig)
    up = torch.randn(dw.shape, dtype=torch.float64, generator=g)
    (dw * up).sum().backward()
    ref = D.wavedec2(D.pad_to_multiple(up, 3)[0], "sym4", 3)
    ref = [ref[0]] + [b for t in ref[1:] for b in t]
    for leaf, r in zip(leaves, ref):
        torch.testing.assert_close(leaf.grad, r, rtol=0, atol=1e-10)
    # already divisible: untouched
    y = torch.zeros(8, 16)
    assert D.pad_to_multiple(y, 3)[0] is y


# ------------------------------------------------------------------ filters, levels, errors
def test_wavelet_filters_are_pywt_and_orthogonal():
    dec_lo, dec_hi, rec_lo, rec_hi = D.wavelet_filters("db4", dtype=torch.float64)
    w = pywt.Wavelet("db4")
    _close(dec_lo, w.dec_lo)
    _close(dec_hi, w.dec_hi)
    _close(rec_lo, w.rec_lo)
    _close(rec_hi, w.rec_hi)
    assert torch.equal(rec_lo, dec_lo.flip(0)) and torch.equal(rec_hi, dec_hi.flip(0))
    assert D.wavelet_filters("haar")[0].dtype == torch.float32


def test_unknown_and_biorthogonal_wavelets_raise():
    x = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="unknown wavelet.*haar") as err:
        D.wavedec2(x, "nope", 1)
    listed = str(err.value).split(": ", 1)[1].split(", ")
    assert listed == [n for n in pywt.wavelist(kind="discrete") if pywt.Wavelet(n).orthogonal]
    assert "db2" in listed and "sym4" in listed and "bior2.2" not in listed
    with pytest.raises(ValueError, match="unknown wavelet"):
        D.wavelet_filters("morl")  # continuous, not discrete
    with pytest.raises(ValueError, match="only orthogonal"):
        D.dwt2(x, "bior2.2")
    with pytest.raises(ValueError, match="unknown wavelet"):
        D.max_level((8, 8), "db999")


def test_max_level_and_level_errors():
    assert D.max_level((32, 48), "db2") == 4
    assert D.max_level((24, 64), "sym4") == 3
    assert D.max_level((5, 3, 7, 8), "haar") == 0
    assert D.max_level((4, 4), "db8") == 2  # filter longer than signal is still exact
    x = torch.zeros(24, 64)
    D.wavedec2(x, "haar", 3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*4"):
        D.wavedec2(x, "haar", 4)
    with pytest.raises(ValueError, match="level"):
        D.wavedec2(x, "haar", -1)
    with pytest.raises(ValueError):
        D.dwt2(torch.zeros(7, 8), "haar")
    with pytest.raises(ValueError):
        D.subband_shapes((12, 8), 3)
    with pytest.raises(ValueError, match="at least 2 dims"):
        D.wavedec2(torch.zeros(8), "haar", 1)
    with pytest.raises(ValueError, match="same shape"):
        z = torch.zeros(2, 2)
        D.idwt2(z, (z, torch.zeros(2, 3), z), "haar")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 32, 48, dtype=torch.float64, generator=g)
    cpu = D.wavedec2(x, "sym4", 3)
    gpu = D.wavedec2(x.cuda().requires_grad_(), "sym4", 3)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    rec = D.waverec2(gpu, "sym4")
    rec.sum().backward()
    torch.testing.assert_close(rec.detach().cpu(), x)
