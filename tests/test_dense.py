"""The shared sliding window of dense tasks, against a per-pixel brute-force reference:
non-square images, images smaller than a tile (reflect / replicate padding), strides that
do not divide, several inputs, batched windows, full coverage, and the errors."""
import numpy as np
import pytest
import torch

from visionpeft.pipelines.dense import sliding_window


def _toy_predict(a, b):
    """(N, 2, t, t) from two inputs; each window adds its own mean, so a pixel gets a
    different value from every window covering it and only a correct average matches."""
    local = a.sum(1, keepdim=True) * b[:, :1] + a.mean((1, 2, 3), keepdim=True)
    return torch.cat([local, (b ** 2).sum(1, keepdim=True) - 2 * b.mean((1, 2, 3), keepdim=True)], 1)


def _starts(size, tile, stride):
    """Written apart from the library: step by stride, then one more flush with the border."""
    starts, s = [], 0
    while s + tile <= size:
        starts.append(s)
        s += stride
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _brute_force(predict, inputs, tile, stride):
    n, _, h, w = inputs[0].shape
    stride = min(stride or max(1, tile // 2), tile)
    ph, pw = max(0, tile - h), max(0, tile - w)
    mode = "reflect" if ph < h and pw < w else "edge"  # numpy's names for torch's reflect / replicate
    padded = [torch.from_numpy(np.pad(t.numpy(), ((0, 0), (0, 0), (0, ph), (0, pw)), mode=mode)) for t in inputs]
    H, W = h + ph, w + pw
    outs = {(y, x): predict(*(t[..., y:y + tile, x:x + tile] for t in padded))
            for y in _starts(H, tile, stride) for x in _starts(W, tile, stride)}
    k = next(iter(outs.values())).shape[1]
    ref = torch.empty(n, k, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            covering = [o[..., i - y, j - x] for (y, x), o in outs.items() if y <= i < y + tile and x <= j < x + tile]
            ref[..., i, j] = torch.stack(covering).double().mean(0)
    return ref


@pytest.mark.parametrize("h,w,tile,stride", [
    (13, 21, 8, 3),    # non-square, stride divides neither axis
    (12, 17, 8, None),  # default stride tile // 2
    (5, 7, 8, None),   # smaller than the tile on both axes: reflect
    (3, 20, 8, 5),     # too thin to reflect: replicate
    (10, 9, 4, 10),    # stride wider than the tile: capped
    (8, 8, 8, 2),      # exactly one window
])
def test_matches_a_per_pixel_brute_force(h, w, tile, stride):
    g = torch.Generator().manual_seed(h * 100 + w)
    a, b = torch.rand(2, 3, h, w, generator=g), torch.rand(2, 2, h, w, generator=g)  # channels may differ
    out = sliding_window(_toy_predict, [a, b], tile, stride)
    assert out.shape == (2, 2, h, w) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _brute_force(_toy_predict, [a, b], tile, stride), rtol=1e-5, atol=1e-5)


def test_one_tensor_and_batched_windows_give_the_same_result():
    x = torch.rand(2, 3, 11, 19, generator=torch.Generator().manual_seed(0))

    def predict(t):
        return t * t.mean((1, 2, 3), keepdim=True)

    calls = []
    one = sliding_window(predict, x, 6, 4)
    batched = sliding_window(lambda t: calls.append(t.shape[0]) or predict(t), [x], 6, 4, batch=4)
    torch.testing.assert_close(batched, one)
    torch.testing.assert_close(one.double(), _brute_force(predict, [x], 6, 4))
    assert calls == [8, 8, 8, 6]  # 3 x 5 windows of N=2, four at a time


@pytest.mark.parametrize("h,w,tile,stride", [(37, 23, 8, 3), (30, 30, 7, 7), (9, 50, 16, 5), (64, 65, 32, None)])
def test_every_pixel_is_covered_and_the_last_window_meets_the_border(h, w, tile, stride):
    # inputs that hold their own coordinates tell where predict was called
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    grid = torch.stack([ys, xs])[None]
    seen = torch.zeros(max(h, tile), max(w, tile), dtype=torch.int64)
    starts = set()

    def predict(t):
        y, x = int(t[0, 0, 0, 0]), int(t[0, 1, 0, 0])
        starts.add((y, x))
        seen[y:y + tile, x:x + tile] += 1
        return torch.ones(1, 1, tile, tile)

    out = sliding_window(predict, grid, tile, stride)
    assert bool((out == 1).all())  # every pixel averaged over at least one window
    assert bool((seen[:h, :w] > 0).all())
    step = min(stride or tile // 2, tile)
    if h >= tile and w >= tile:
        assert {y for y, _ in starts} == set(_starts(h, tile, step))
        assert {x for _, x in starts} == set(_starts(w, tile, step))


def test_half_precision_outputs_are_summed_in_float32():
    x = torch.rand(1, 1, 10, 10)
    out = sliding_window(lambda t: t.half(), x, 4, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x, atol=1e-3, rtol=0)


@pytest.mark.parametrize("call,message", [
    (lambda p, x: sliding_window(p, [x, torch.rand(1, 3, 8, 9)], 4), "share N, H, W"),
    (lambda p, x: sliding_window(p, [x, torch.rand(2, 3, 8, 8)], 4), "share N, H, W"),
    (lambda p, x: sliding_window(p, [], 4), "at least one input"),
    (lambda p, x: sliding_window(p, x[0], 4), r"\(N, C, H, W\)"),
    (lambda p, x: sliding_window(p, x[..., :0], 4), "empty input"),
    (lambda p, x: sliding_window(p, x, 0), "tile must be"),
    (lambda p, x: sliding_window(p, x, 4, 0), "stride must be"),
    (lambda p, x: sliding_window(p, x, 4, -2), "stride must be"),
    (lambda p, x: sliding_window(p, x, 4, batch=0), "batch must be"),
    (lambda p, x: sliding_window(lambda t: t[..., :2, :], x, 4), r"must return \(1, K, 4, 4\)"),
    (lambda p, x: sliding_window(lambda t: t[:, 0], x, 4), r"must return \(1, K, 4, 4\)"),
    (lambda p, x: sliding_window(p, x, 4, num_channels=2), "3 channels, expected 2"),
])
def test_errors_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call(lambda t: t, torch.rand(1, 3, 8, 8))
