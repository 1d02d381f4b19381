"""SNELL kernels against loops over (i, j), exact sparsity, checkpointed memory; SNELLA
allocation against the global budget."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Untouched
from torch import nn

import visionpeft as vp
from visionpeft.methods.snell import kernel_matrix, sparsify, zero_count
from visionpeft.methods.snella import SNELLAAllocator, cubic_budget, split_budget


def _loop_kernel(A, B, kernel, scale):
    h = A.shape[1] // 2
    out = torch.empty(A.shape[0], B.shape[0], dtype=torch.float64)
    for i in range(A.shape[0]):
        for j in range(B.shape[0]):
            a, b = A[i].double(), B[j].double()
            if kernel == "linear":
                v = float(a @ b)
            elif kernel == "distance":
                v = float((a[:h] - b[:h]).norm() - (a[h:] - b[h:]).norm())
            else:
                v = math.exp(-float((a[:h] - b[:h]).square().sum()) / h) \
                    - math.exp(-float((a[h:] - b[h:]).square().sum()) / h)
            out[i, j] = v * scale
    return out


@pytest.mark.parametrize("kernel", ["distance", "linear", "rbf"])
def test_kernel_matches_a_loop_over_entries(kernel):
    torch.manual_seed(0)
    A, B = torch.randn(7, 6), torch.randn(5, 6)
    torch.testing.assert_close(kernel_matrix(A, B, kernel, 0.3).double(), _loop_kernel(A, B, kernel, 0.3),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.99])
def test_sparsify_zeroes_exactly_the_requested_fraction_of_smallest_entries(sparsity):
    torch.manual_seed(0)
    dW = torch.randn(37, 53)
    n_zero = zero_count(sparsity, dW.numel())
    assert n_zero == int(sparsity * dW.numel())
    out = sparsify(dW, n_zero)
    assert int((out == 0).sum()) == n_zero
    kept = out != 0
    assert torch.equal(out[kept], dW[kept])
    assert dW.abs()[~kept].max() <= dW.abs()[kept].min()
    torch.testing.assert_close(sparsify(dW, n_zero, reweight=True)[kept], (dW * dW.abs())[kept])


def _snell_scale(kernel, r, alpha=None):
    """The kernel scale from the config alone: alpha when given, else 0.1 for the distance
    kernel (the official constant), 1 / r for the linear one, 1 for the RBF one."""
    if alpha is not None:
        return float(alpha)
    return {"distance": 0.1, "linear": 1.0 / r, "rbf": 1.0}[kernel]


def _dense_kernel(A, B, kernel, scale):
    """k(a_i, b_j) for every (i, j) through cdist, nothing zeroed (h = r / 2 per half)."""
    h = A.shape[1] // 2
    if kernel == "linear":
        return A @ B.t() * scale
    if kernel == "distance":
        return (torch.cdist(A[:, :h], B[:, :h]) - torch.cdist(A[:, h:], B[:, h:])) * scale
    return (torch.exp(-torch.cdist(A[:, :h], B[:, :h]) ** 2 / h)
            - torch.exp(-torch.cdist(A[:, h:], B[:, h:]) ** 2 / h)) * scale


def _keep_largest(d, n_zero, reweight):
    """Entries with |d| above its n_zero-th smallest |d| (kthvalue), zero elsewhere; kept
    values times the detached |d| under reweight."""
    t = d.detach().abs().flatten().kthvalue(n_zero).values
    kept = torch.where(d.detach().abs() > t, d, torch.zeros_like(d))
    return kept * d.detach().abs() if reweight else kept


def _reference_delta(A, B, kernel, scale, n_zero, reweight=False):
    """SNELL's dW through plain autograd: cdist kernels, a kthvalue threshold, where()."""
    return _keep_largest(_dense_kernel(A, B, kernel, scale), n_zero, reweight)


def _plain_snella(A, B, kernel, scale, a, t, c, n_zero, reweight=False):
    """SNELLA's dW through plain autograd, every kernel: K = D + a softmax(D / t) + c with
    the softmax over the output index (dim 0 of (out, in)), then the same sparsification."""
    D = _dense_kernel(A, B, kernel, scale)
    return _keep_largest(D + a * torch.softmax(D / t, dim=0) + c, n_zero, reweight)


@pytest.mark.parametrize("kernel", ["distance", "linear", "rbf"])
@pytest.mark.parametrize("alpha,reweight", [(None, False), (0.3, False), (None, True)])
@pytest.mark.parametrize("path", ["fused", "general"])
def test_forward_and_gradients_match_an_autograd_reference(kernel, alpha, reweight, path):
    """Our hand-written gradients (fused host GEMM, or the checkpointed general path taken
    when two adapters are active) against autograd through cdist and where()."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    model = nn.Sequential(lin)
    cfg = vp.SNELLConfig(r=4, sparsity=0.7, kernel=kernel, alpha=alpha, reweight=reweight, target_modules=["0"])
    vp.inject(model, cfg)
    if path == "general":  # a second active adapter turns the fused path off
        vp.inject(model, cfg, name="off")
        vp.set_active(model, ["default", "off"])
        vp.set_scale(model, "off", 0.5)
    mod = model[0].adapters["default"]["full"]
    x = torch.randn(3, 12, requires_grad=True)
    out = model(x)
    A = mod.A.detach().clone().requires_grad_(True)
    B = mod.B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    dW = _reference_delta(A, B, kernel, _snell_scale(kernel, 4, alpha), 84, reweight)  # 0.7 of 120
    ref = F.linear(xr, lin.weight + dW, lin.bias)
    if path == "general":
        other = model[0].adapters["off"]["full"]
        ref = ref + 0.5 * F.linear(xr, _reference_delta(other.A.detach(), other.B.detach(), kernel,
                                                        _snell_scale(kernel, 4, alpha), 84, reweight))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in ((mod.A.grad, A.grad), (mod.B.grad, B.grad), (x.grad, xr.grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vp.delta_weight(model, "0", "default"), dW.detach(), atol=1e-6, rtol=1e-5)
    assert int((vp.delta_weight(model, "0", "default") == 0).sum()) == 84


@pytest.mark.parametrize("kernel", ["distance", "linear", "rbf"])
def test_kernel_gradients_pass_gradcheck(kernel):
    from visionpeft.methods.snell import snell_delta

    torch.manual_seed(0)
    A = torch.randn(7, 6, dtype=torch.double, requires_grad=True)
    B = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: snell_delta(a, b, kernel, -0.3, 20), (A, B))


@pytest.mark.parametrize("two_adapters", [False, True])  # fused path / general (checkpoint) path
def test_dense_dW_is_not_kept_for_backward(two_adapters):
    """Nothing of the (out, in) size but the host weight is saved between forward and
    backward: dW is rebuilt in backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    vp.inject(model, vp.SNELLConfig(r=8, sparsity=0.9, target_modules=["0"]))
    if two_adapters:
        vp.inject(model, vp.SNELLConfig(r=8, sparsity=0.9, target_modules=["0"]), name="b")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []  # sizes of the non-parameter tensors kept for backward

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved.append(t.numel())
        return t

    x = torch.randn(4, 256)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    assert saved and max(saved) < 256 * 256
    out.sum().backward()
    assert model[0].adapters["default"]["full"].A.grad is not None


@pytest.mark.parametrize("kernel", ["distance", "linear", "rbf"])
def test_conv_dW_has_the_kernel_shape(kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(conv)
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, kernel=kernel, target_modules=["0"]))
    mod = model[0].adapters["default"]["full"]
    dW = vp.delta_weight(model, "0")
    assert dW.shape == conv.weight.shape and int((dW == 0).sum()) == int(0.5 * dW.numel())
    # outside reference: the kernel written out (cdist, the config's default scale), the
    # kthvalue threshold, as the kernel of a plain F.conv2d
    ref = _reference_delta(mod.A.detach().double(), mod.B.detach().double(), kernel, _snell_scale(kernel, 4),
                           108, False).float().reshape(conv.weight.shape)  # 0.5 of 6 x 36
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        effect = F.conv2d(x, ref, padding=1).abs().max()
        torch.testing.assert_close(dW, ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-5)
        torch.testing.assert_close(model(x), F.conv2d(x, conv.weight + ref, conv.bias, padding=1),
                                   atol=1e-4 * float(effect), rtol=1e-5)


def test_bad_sparsity_and_rank_are_refused():
    for s in (0, 0.0, 1.0, 1.5, -0.1):
        with pytest.raises(vp.ConfigError, match=r"must be in \(0, 1\)"):
            vp.SNELLConfig(sparsity=s, target_modules=["0"])
    model = nn.Sequential(nn.Linear(4, 4))
    kept = Untouched(model)
    with pytest.raises(ValueError, match="r must be even"):
        vp.inject(model, vp.SNELLConfig(r=3, target_modules=["0"]))
    kept.check()
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4))
    vp.inject(model, vp.SNELLConfig(r=2, target_modules=["1"]), name="first")  # a second inject is refused
    kept = Untouched(model)
    with pytest.raises(ValueError, match=r"0: rank r=8 is larger .* use r <= 4"):
        vp.inject(model, vp.SNELLConfig(r=8, target_modules=["0"]))
    kept.check()


def test_cubic_budget_schedule():
    assert cubic_budget(0, 100, 1000, 100) == 1000
    assert cubic_budget(100, 100, 1000, 100) == 100
    assert cubic_budget(50, 100, 1000, 100) == pytest.approx(100 + 900 * 0.5 ** 3)
    assert cubic_budget(5, 100, 1000, 100, init_warmup=10) == 1000
    assert cubic_budget(95, 100, 1000, 100, final_warmup=10) == 100


def test_split_budget_respects_caps_and_total():
    share = split_budget(100, [10.0, 1.0, 1.0], [30, 200, 200])
    assert share[0] == 30 and sum(share) == 100
    assert split_budget(10_000, [1, 1], [30, 40]) == [30, 40]


def _allocate(model, alloc, steps: int) -> torch.Tensor:
    """SGD steps on a 16-input toy with SNELLA's allocator stepping after each backward;
    returns the batch it trained on."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(32, 16)
    for step in range(steps):
        model(x).square().mean().backward()
        alloc.step(step)
        opt.step()
        opt.zero_grad()
    return x


def test_snella_allocation_meets_the_global_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, target_modules=["0", "2", "4"]))
    alloc = SNELLAAllocator(model, target_sparsity=0.8, total_steps=10)
    _allocate(model, alloc, steps=11)
    sizes = [16 * 24, 24 * 8, 8 * 4]
    nonzero = [int((vp.delta_weight(model, n) != 0).sum()) for n in ("0", "2", "4")]
    target = 0.2 * sum(sizes)
    assert abs(sum(nonzero) - target) <= len(sizes)
    levels = [m.sparsity for m in alloc.modules]
    assert len(set(levels)) > 1, "layers should receive different shares"


def test_snella_importance_emas_follow_the_official_update():
    """Both EMAs start at zero: after g1, EMA = (1-b1) I1 and U = (1-b2) |I1 - EMA|; after
    g2 the recursion again, with U using the updated EMA."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    vp.inject(model, vp.SNELLConfig(r=2, sparsity=0.5, target_modules=["0"]))
    alloc = SNELLAAllocator(model, target_sparsity=0.8, total_steps=10, beta1=0.8, beta2=0.7)
    mod = alloc.modules[0]
    imps = []
    for _ in range(2):
        mod.A.grad = torch.randn_like(mod.A)
        imps.append((mod.A * mod.A.grad).abs().detach())
        alloc.update_importance()
    ema1 = 0.2 * imps[0]
    unc1 = 0.3 * (imps[0] - ema1).abs()
    ema2 = 0.8 * ema1 + 0.2 * imps[1]
    unc2 = 0.7 * unc1 + 0.3 * (imps[1] - ema2).abs()
    torch.testing.assert_close(alloc.ema[0]["A"], ema2)
    torch.testing.assert_close(alloc.unc[0]["A"], unc2)
    assert alloc.scores()[0] == pytest.approx(float((ema2 * unc2).mean()), rel=1e-6)


@pytest.mark.parametrize("dist", ["normal", "skewed", "ties"])
def test_bucketed_kth_smallest_equals_kthvalue(dist):
    from visionpeft.methods.snell import kth_smallest

    g = torch.Generator().manual_seed(0)
    v = torch.randn(200_003, generator=g)
    if dist == "skewed":
        v = v.abs() ** 6  # most values crowd near zero
    if dist == "ties":
        v = torch.randint(0, 50, (200_003,), generator=g).float()
    for k in (1, 17, 100_000, 180_000, 200_003):
        assert kth_smallest(v, k) == v.kthvalue(k).values


def _official_snella(A, B, a, t, c, sparsity, reweight=False):
    """SNELLA's layer as the official code writes it: factors per rank half in (in, r/2)
    and (out, r/2), D = 0.1 cdist(in1, out1) - 0.1 cdist(in2, out2) of shape (in, out),
    W = D + a softmax(D / t, -1) + c, entries with |W| at or below the quantile zeroed
    (with reweight, as the official `sparsify`: W times the detached, thresholded |W|);
    the layer uses W^T."""
    h = A.shape[1] // 2
    D = 0.1 * torch.cdist(B[:, :h], A[:, :h]) - 0.1 * torch.cdist(B[:, h:], A[:, h:])
    W = D + a * torch.softmax(D / t, dim=-1) + c
    k = int(sparsity * W.numel())
    thr = W.detach().abs().flatten().kthvalue(k).values
    if reweight:
        return (W * F.threshold(W.detach().abs(), float(thr), 0.0)).t()
    return torch.where(W.abs() > thr, W, torch.zeros_like(W)).t()


def _graph_has(t: torch.Tensor, node: str) -> bool:
    """Whether the autograd graph behind ``t`` contains a node of this class name."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == node:
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("path", ["fused", "checkpointed"])
def test_snella_softmax_term_matches_the_official_layer_values_and_gradients(path, reweight):
    """Both forms: dW folded into the host GEMM (a plain Linear) and the checkpointed
    delta (a hook on the host makes the wrapper run host and delta apart)."""
    torch.manual_seed(0)
    host = nn.Linear(13, 11)
    model = nn.Sequential(host)
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.6, softmax_term=True, reweight=reweight,
                                    target_modules=["0"]))
    if path == "checkpointed":
        model[0].base_layer.register_forward_hook(lambda m, i, o: None)
    mod = model[0].adapters["default"]["full"]
    with torch.no_grad():
        mod.mix_alpha.fill_(0.7)
        mod.temperature.fill_(0.3)
        mod.shift.fill_(0.01)
    ref_params = [p.detach().clone().requires_grad_(True)
                  for p in (mod.A, mod.B, mod.mix_alpha, mod.temperature, mod.shift)]
    ref = _official_snella(*ref_params[:2], *ref_params[2:], 0.6, reweight)
    dW = vp.delta_weight(model, "0")
    torch.testing.assert_close(dW, ref.detach(), rtol=1e-5, atol=1e-6)
    assert int((dW == 0).sum()) == int(0.6 * dW.numel())
    x = torch.randn(3, 13)
    out = model(x)
    assert _graph_has(out, "_WeightDeltaLinearBackward") == (path == "fused")
    (out ** 2).sum().backward()
    (F.linear(x, host.weight + ref, host.bias) ** 2).sum().backward()
    for ours, theirs in zip((mod.A, mod.B, mod.mix_alpha, mod.temperature, mod.shift), ref_params):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    assert vp.trainable_parameters(model) == 4 * (11 + 13) + 3


@pytest.mark.parametrize("kernel,reweight", [("distance", True), ("rbf", False), ("linear", True)])
def test_snella_hand_written_gradient_equals_autograd(kernel, reweight):
    """The fused SNELLA path (hand-written softmax and kernel backward) against autograd
    through the same math (the checkpointed path), for every kernel and with reweight, and
    both against autograd through the formula written out here (float64, the config's
    default scale)."""
    grads = {}
    for path in ("fused", "autograd"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 9))
        torch.manual_seed(1)
        vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, kernel=kernel, reweight=reweight,
                                        softmax_term=True, target_modules=["0"]))
        mod = model[0].adapters["default"]["full"]
        with torch.no_grad():
            mod.mix_alpha.fill_(0.6)
            mod.temperature.fill_(0.4)
            mod.shift.fill_(-0.02)
        if path == "autograd":
            model[0].base_layer.register_forward_hook(lambda m, i, o: None)
        x = torch.randn(5, 10, generator=torch.Generator().manual_seed(2))
        out = model(x)
        assert _graph_has(out, "_WeightDeltaLinearBackward") == (path == "fused")
        (out.sin() * 3).sum().backward()
        grads[path] = [p.grad.clone() for p in (mod.A, mod.B, mod.mix_alpha, mod.temperature, mod.shift)]
    for ours, ref in zip(grads["fused"], grads["autograd"]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    leaves = [p.detach().double().requires_grad_(True)
              for p in (mod.A, mod.B, mod.mix_alpha, mod.temperature, mod.shift)]
    host = model[0].base_layer
    dW = _plain_snella(*leaves[:2], kernel, _snell_scale(kernel, 4), *leaves[2:], 45, reweight)  # 0.5 of 90
    plain = F.linear(x.double(), host.weight.double() + dW, host.bias.double())
    (plain.sin() * 3).sum().backward()
    torch.testing.assert_close(out.double(), plain.detach(), rtol=1e-5, atol=1e-6)
    for path in grads:
        for ours, ref in zip(grads[path], leaves):
            torch.testing.assert_close(ours.double(), ref.grad, rtol=1e-4, atol=1e-4 * float(ref.grad.abs().max()))


def test_snella_budget_is_exact_takes_active_adapters_and_resumes_from_its_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 30))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, target_modules=["0", "2"]))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, target_modules=["0", "2"]), name="style")
    vp.set_active(model, ["default"])
    alloc = SNELLAAllocator(model, target_sparsity=0.9, total_steps=4)
    assert len(alloc.modules) == 2  # the inactive "style" adapter is left alone
    x = torch.randn(8, 30)
    for step in range(3):
        model(x).square().mean().backward()
        alloc.step(step)
        model.zero_grad()
    saved = alloc.state_dict()
    resumed = SNELLAAllocator(model, target_sparsity=0.9, total_steps=4)
    resumed.load_state_dict(saved)
    assert resumed.initial == alloc.initial == 600.0
    for a, b in zip(alloc.ema + alloc.unc, resumed.ema + resumed.unc):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    alloc.allocate(alloc.budget(4))
    kept = sum(m.numel - int(m.n_zero) for m in alloc.modules)
    assert kept == 120  # (1 - 0.9) * 1200: not 119 from 119.99999999999997
    from visionpeft.core.model_ops import adapted_layers

    style = [m for layer in adapted_layers(model).values() for m in layer.adapters["style"].values()]
    assert [int(m.n_zero) for m in style] == [300, 300]
    with pytest.raises(ValueError, match="holds 3 SNELL layers"):
        resumed.load_state_dict({"initial": 1.0, "ema": [{}] * 3, "unc": [{}] * 3})


@pytest.mark.parametrize("kernel,softmax_term", [("distance", False), ("rbf", False), ("linear", False),
                                                 ("distance", True)])
def test_autocast_trains_and_keeps_the_kernel_in_fp32(kernel, softmax_term):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.8, kernel=kernel, softmax_term=softmax_term,
                                    target_modules=["0"]))
    reference = vp.delta_weight(model, "0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vp.delta_weight(model, "0"), reference)  # not a bf16 distance expansion
        model(torch.randn(5, 24)).float().square().sum().backward()
    mod = model[0].adapters["default"]["full"]
    assert mod.A.grad is not None and mod.A.grad.dtype == torch.float32 and torch.isfinite(mod.A.grad).all()


def test_zero_count_is_not_fooled_by_float_rounding():
    assert [zero_count(s, 100) for s in (0.29, 0.57, 0.58, 0.9)] == [29, 57, 58, 90]
    assert zero_count(0.9, 1001) == 900


def test_a_factor_changed_between_forward_and_backward_is_an_error_not_a_wrong_gradient():
    model = nn.Sequential(nn.Linear(12, 10))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, target_modules=["0"]))
    loss = model(torch.randn(3, 12)).square().sum()
    with torch.no_grad():
        model[0].adapters["default"]["full"].A.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place between the forward and the backward"):
        loss.backward()


def test_snella_skips_a_step_whose_gradients_overflowed():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, target_modules=["0", "2"]))
    alloc = SNELLAAllocator(model, target_sparsity=0.8, total_steps=4)
    model(torch.randn(4, 16)).square().mean().backward()
    alloc.step(1)
    before = ([int(m.n_zero) for m in alloc.modules], [{k: v.clone() for k, v in e.items()} for e in alloc.ema])
    alloc.modules[0].A.grad[0, 0] = float("inf")  # what a loss scaler's overflow step leaves
    alloc.step(2)
    assert [int(m.n_zero) for m in alloc.modules] == before[0]
    assert all(torch.equal(e[k], b[k]) for e, b in zip(alloc.ema, before[1]) for k in e)


def test_snella_step_without_gradients_says_where_they_went():
    """Called before backward, after zero_grad, or under FSDP without use_orig_params
    (the factors never get .grad): an error, not an allocator that silently stops."""
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, target_modules=["0", "2"]))
    alloc = SNELLAAllocator(model, target_sparsity=0.8, total_steps=4)
    kept = Untouched(model)  # the refused step moves no layer's sparsity
    with pytest.raises(RuntimeError, match="use_orig_params=True"):
        alloc.step(1)
    kept.check()


def test_snella_default_betas_are_the_official_0_85():
    """README: the importance EMAs use beta 0.85 (both) unless told otherwise: after one
    gradient, EMA = 0.15 I and U = 0.15 |I - EMA| (both start at zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    vp.inject(model, vp.SNELLConfig(r=2, sparsity=0.5, target_modules=["0"]))
    alloc = SNELLAAllocator(model, target_sparsity=0.8, total_steps=10)
    assert (alloc.beta1, alloc.beta2) == (0.85, 0.85)
    mod = alloc.modules[0]
    mod.A.grad = torch.randn_like(mod.A)
    imp = (mod.A * mod.A.grad).abs().detach()
    alloc.update_importance()
    ema = 0.15 * imp
    torch.testing.assert_close(alloc.ema[0]["A"], ema)
    torch.testing.assert_close(alloc.unc[0]["A"], 0.15 * (imp - ema).abs())


@pytest.mark.parametrize("softmax_term", [False, True])
def test_snella_per_layer_counts_are_saved_with_the_adapter(tmp_path, softmax_term):
    """README: each layer's count (n_zero) set by the allocation is a buffer saved with the
    adapter: save_adapter, then load_adapter into a fresh copy of the host gives the same
    counts (not the config's sparsity) and the same outputs."""
    def host():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))

    from visionpeft.core.model_ops import adapted_layers

    model = host()
    vp.inject(model, vp.SNELLConfig(r=4, sparsity=0.5, softmax_term=softmax_term, target_modules=["0", "2", "4"]))
    alloc = SNELLAAllocator(model, target_sparsity=0.8, total_steps=6)
    x = _allocate(model, alloc, steps=5)
    counts = [int(m.n_zero) for m in alloc.modules]
    defaults = [zero_count(0.5, n) for n in (16 * 24, 24 * 8, 8 * 4)]
    assert counts != defaults and len(set(m.sparsity for m in alloc.modules)) > 1  # the allocation moved them
    vp.save_adapter(model, tmp_path / "ad")
    fresh = host()
    vp.load_adapter(fresh, tmp_path / "ad")
    loaded = [int(m.n_zero) for layer in adapted_layers(fresh).values()
              for m in layer.adapters["default"].values()]
    assert loaded == counts
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
        for n in ("0", "2", "4"):
            assert torch.equal(vp.delta_weight(fresh, n), vp.delta_weight(model, n))
