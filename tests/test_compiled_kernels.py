"""SNELL's compiled (torch.compile) kernels against autograd in float64, the exact
threshold, scratch-buffer reuse across layers, and the eager fallback."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
import visionpeft.methods.snell as snell
from visionpeft.ops import compiled as compiled_mod
from visionpeft.ops import kernels as kernels_mod
from visionpeft.ops import kth, snell_autograd, snell_kernels, snell_native
from visionpeft.ops.workspace import release_scratch, scratch

from test_snell import _plain_snella  # SNELLA through plain autograd, every kernel
from test_snell import _reference_delta as _reference  # autograd through cdist, kthvalue, where()
from test_snell import _snell_scale  # the kernel scale from the config alone


@pytest.fixture
def compiled_on():
    before = compiled_mod.compiled_kernels_enabled()
    vp.set_compiled_kernels(True)
    yield
    vp.set_compiled_kernels(before)
    release_scratch()


@pytest.mark.parametrize("kernel,reweight,shapes,native", [
    # (out, in) per layer; 512 x 256 takes the sampled-bracket threshold, two shapes in a
    # row share the scratch buffers. native: the distance kernel's backward in C
    # (snell_backward.c) or, with it off, the compiled loops over a dense g^T x
    ("distance", False, [(256, 512), (512, 256)], False),
    ("distance", False, [(256, 512), (512, 256)], True),
    ("rbf", True, [(40, 24)], False),
    ("distance", True, [(40, 24)], False),
    ("distance", True, [(40, 24)], True),
])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager would hide the compiled path
def test_compiled_forward_and_gradients_match_float64_autograd(compiled_on, monkeypatch, kernel, reweight, shapes,
                                                               native):
    calls = []
    taken = snell_native.native_sparse_grads if native else snell_kernels.fused_weight_and_grads
    monkeypatch.setattr(snell_autograd, taken.__name__, lambda *a: calls.append(1) or taken(*a))
    monkeypatch.setitem(kernels_mod._DEFAULTS, "native", native)
    torch.manual_seed(0)
    layers = [nn.Linear(i, o) for o, i in shapes]
    model = nn.Sequential(*layers)
    names = [str(k) for k in range(len(layers))]
    vp.inject(model, vp.SNELLConfig(r=8, sparsity=0.9, kernel=kernel, reweight=reweight, target_modules=names))
    x = torch.randn(2, 3, shapes[0][1])
    out = model(x)
    out.square().sum().backward()
    assert len(calls) == len(layers)  # every layer's backward took the compiled path

    # the same model in float64 through autograd
    mods = [model[k].adapters["default"]["full"] for k in range(len(layers))]
    params = [(m.A.detach().double().requires_grad_(True), m.B.detach().double().requires_grad_(True)) for m in mods]
    xr = x.double()
    for lin, m, (A, B) in zip(layers, mods, params):
        dW = _reference(A, B, kernel, _snell_scale(kernel, 8), int(m.n_zero), reweight)
        xr = F.linear(xr, lin.weight.double() + dW, lin.bias.double())
    torch.testing.assert_close(out.double(), xr, atol=2e-5, rtol=1e-4)
    xr.square().sum().backward()
    for m, (A, B) in zip(mods, params):
        torch.testing.assert_close(m.A.grad.double(), A.grad, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(m.B.grad.double(), B.grad, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("kernel,reweight,shape", [
    ("distance", True, (384, 512)),  # 196608 entries: the bracketed threshold search
    ("rbf", False, (11, 13)),
])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager would hide the compiled path
def test_compiled_snella_matches_the_eager_snella(compiled_on, monkeypatch, kernel, reweight, shape):
    """SNELLA's softmax term compiled (column statistics, then SNELL's loops on K) against
    the eager SNELLA path, which test_snell checks against the official layer and autograd:
    output and the gradients of all five parameters; and both against autograd through the
    formula written out in float64 (test_snell._plain_snella, the config's default scale)."""
    calls = []
    fused = snell_kernels.fused_mixed_weight_and_grads
    monkeypatch.setattr(snell_autograd, "fused_mixed_weight_and_grads", lambda *a: calls.append(1) or fused(*a))
    results = []
    for on in (True, False):
        vp.set_compiled_kernels(on)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(shape[1], shape[0]))
        vp.inject(model, vp.SNELLConfig(r=8, sparsity=0.9, kernel=kernel, reweight=reweight, softmax_term=True,
                                        target_modules=["0"]))
        mod = model[0].adapters["default"]["full"]
        with torch.no_grad():
            mod.mix_alpha.fill_(0.7)
            mod.temperature.fill_(0.3)
            mod.shift.fill_(0.01)
        x = torch.randn(6, shape[1], generator=torch.Generator().manual_seed(1))
        out = model(x)
        (out.sin() * 3).sum().backward()
        results.append([out.detach()] + [p.grad for p in (mod.A, mod.B, mod.mix_alpha, mod.temperature, mod.shift)])
    assert len(calls) == 1  # the compiled run's backward took the compiled path
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    leaves = [p.detach().double().requires_grad_(True)
              for p in (mod.A, mod.B, mod.mix_alpha, mod.temperature, mod.shift)]
    host = model[0].base_layer
    n_zero = snell.zero_count(0.9, shape[0] * shape[1])
    dW = _plain_snella(*leaves[:2], kernel, _snell_scale(kernel, 8), *leaves[2:], n_zero, reweight)
    plain = F.linear(x.double(), host.weight.double() + dW, host.bias.double())
    (plain.sin() * 3).sum().backward()
    effect = float((plain - F.linear(x.double(), host.weight.double(), host.bias.double())).detach().abs().max())
    sizes = [effect] + [float(p.grad.abs().max()) for p in leaves]  # the output's tolerance: the adapter's effect
    plain = [plain.detach()] + [p.grad for p in leaves]
    for result in results:
        for ours, ref, size in zip(result, plain, sizes):
            torch.testing.assert_close(ours.double(), ref, atol=1e-4 * size, rtol=1e-5)


@pytest.mark.parametrize("shape,kernel", [((96, 160), "distance"), ((101, 97), "rbf")])  # 97*101: 1 strip
def test_fused_threshold_equals_kthvalue_and_zeroes_the_requested_count(compiled_on, shape, kernel):
    torch.manual_seed(0)
    A, B = torch.randn(shape[0], 8) * 0.2, torch.randn(shape[1], 8) * 0.2
    n = shape[0] * shape[1]
    for sparsity in (0.5, 0.9, 0.99):
        k = snell.zero_count(sparsity, n)
        out = torch.empty(shape)
        # a small sample forces the bracket search at this size
        t = kth.fused_kernel_and_threshold(A, B, kernel, 0.1, k, out, sample=256)
        dense = snell.kernel_matrix(A.double(), B.double(), kernel, 0.1)
        torch.testing.assert_close(out.double(), dense, atol=1e-6, rtol=1e-5)
        assert t == float(out.abs().flatten().kthvalue(k).values)
        assert int((out.abs() <= t).sum()) == k  # no ties in continuous data


@pytest.mark.parametrize("bracket", [(10.0, 11.0), (0.0, 1e-9)])  # above / below every entry
def test_fused_threshold_falls_back_when_the_bracket_misses(compiled_on, monkeypatch, bracket):
    torch.manual_seed(0)
    A, B = torch.randn(64, 8) * 0.2, torch.randn(96, 8) * 0.2
    k = snell.zero_count(0.9, 64 * 96)
    monkeypatch.setattr(kth, "sample_bracket", lambda sub, q: bracket)
    out = torch.empty(64, 96)
    t = kth.fused_kernel_and_threshold(A, B, "distance", 0.1, k, out, sample=256)
    assert t == float(out.abs().flatten().kthvalue(k).values)


def test_threshold_hint_is_used_stays_exact_and_recovers_from_a_miss(compiled_on, monkeypatch):
    """The previous threshold brackets the next search (no sample drawn); a hint that is
    far off, or for another sparsity, still gives the exact k-th value."""
    torch.manual_seed(0)
    A, B = torch.randn(96, 8) * 0.2, torch.randn(160, 8) * 0.2
    n, k = 96 * 160, snell.zero_count(0.9, 96 * 160)
    samples, misses = [], []
    sample, exact_search = kth.fused_sample, kth.kth_smallest
    monkeypatch.setattr(kth, "fused_sample", lambda *a: samples.append(1) or sample(*a))
    monkeypatch.setattr(kth, "kth_smallest", lambda *a: misses.append(1) or exact_search(*a))
    out, hint = torch.empty(96, 160), {}

    def exact():
        return float(out.abs().flatten().kthvalue(k).values)

    assert kth.fused_kernel_and_threshold(A, B, "distance", 0.1, k, out, hint, sample=256) == exact()
    assert len(samples) == 1 and hint["threshold"] == exact() and hint["n_zero"] == k
    A += 1e-4 * torch.randn_like(A)  # a small training step: the hint brackets the new value
    assert kth.fused_kernel_and_threshold(A, B, "distance", 0.1, k, out, hint, sample=256) == exact()
    assert (len(samples), len(misses)) == (1, 0)
    for wrong in (hint["threshold"] * 3, hint["threshold"] / 3):  # a miss on either side
        hint.update(threshold=wrong, width=1e-4)
        assert kth.fused_kernel_and_threshold(A, B, "distance", 0.1, k, out, hint, sample=256) == exact()
        assert hint["threshold"] == exact() and hint["width"] == kth.HINT_WIDTH[1]
    assert (len(samples), len(misses)) == (1, 2)
    k = snell.zero_count(0.5, n)  # another sparsity: the hint is not used
    assert kth.fused_kernel_and_threshold(A, B, "distance", 0.1, k, out, hint, sample=256) == exact()
    assert len(samples) == 2


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager would hide the compiled path
def test_training_with_the_threshold_hint_equals_training_without(compiled_on, monkeypatch):
    """Several AdamW steps with the hint (used from the second step on) give bit for bit
    the parameters of the same steps searched from a fresh sample every time: the hint
    only narrows an exact search."""
    samples = []
    sample, search = kth.fused_sample, kth.fused_kernel_and_threshold
    monkeypatch.setattr(kth, "fused_sample", lambda *a: samples.append(1) or sample(*a))
    torch.manual_seed(0)
    # 384 x 512 = 196608 entries, above 4 x 32768: the bracketed search, not plain kthvalue
    models = [nn.Sequential(nn.Linear(512, 384), nn.GELU(), nn.Linear(384, 512)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:
        vp.inject(m, vp.SNELLConfig(r=8, sparsity=0.9, target_modules=["0", "2"]))
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(4, 512)
    for m, hinted in zip(models, (True, False)):
        if not hinted:
            monkeypatch.setattr(snell_autograd, "fused_kernel_and_threshold",
                                lambda *a, **k: search(*a[:6], None, **k))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(4):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        if hinted:
            hinted_samples = len(samples)
            assert hinted_samples < 8  # 2 layers x 4 steps: later steps started from the hint
    assert len(samples) - hinted_samples == 8  # without the hint: a sample every time
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_inference_then_training_and_a_new_scale_do_not_break_or_recompile(compiled_on):
    """Scratch buffers first made under inference_mode stay writable in training; the
    adapter scale is a tensor argument, so changing it reuses the compiled kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40))
    vp.inject(model, vp.SNELLConfig(r=8, sparsity=0.9, target_modules=["0"]))
    x = torch.randn(5, 24)
    with torch.inference_mode():
        model(x)
    model(x).sum().backward()
    sizes = (len(snell_kernels.fused_effective_weight.signatures), len(snell_kernels.fused_weight_and_grads.signatures))
    for s in (0.5, 0.7):
        vp.set_scale(model, "default", s)
        out = model(x)
        out.sum().backward()
        vp.set_compiled_kernels(False)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
        vp.set_compiled_kernels(True)
    assert (len(snell_kernels.fused_effective_weight.signatures),
            len(snell_kernels.fused_weight_and_grads.signatures)) == sizes


def test_bracketed_kth_smallest_takes_bfloat16():
    v = torch.rand(131_077).bfloat16()
    assert snell.kth_smallest(v, 1000) == float(v.float().kthvalue(1000).values)


def test_failed_compilation_runs_eagerly_after_one_warning(compiled_on, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    f = compiled_mod.compiled(lambda a: a * 2 + 1)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 3.0))


def test_an_input_error_is_raised_and_keeps_compilation_on(compiled_on):
    f = compiled_mod.compiled(lambda a, b: a + b)
    with pytest.raises(RuntimeError, match="size of tensor"):
        f(torch.ones(3), torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(f(torch.ones(3), torch.ones(3)), torch.full((3,), 2.0))


def test_switch_refuses_non_bool_and_scratch_reuses_memory():
    with pytest.raises(TypeError, match="True or False"):
        vp.set_compiled_kernels("yes")
    a = scratch(7, (4, 8), torch.float32, torch.device("cpu"))
    b = scratch(7, (2, 3), torch.float32, torch.device("cpu"))
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    release_scratch()


_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env,expected", [
    ({}, {"compiled": False, "native": True}),  # the defaults: compiled off, native on
    ({"VISIONPEFT_COMPILED_KERNELS": "1", "VISIONPEFT_NATIVE_KERNELS": "0"}, {"compiled": True, "native": False}),
])
def test_environment_switches_set_the_process_defaults(env, expected):
    """README: `VISIONPEFT_COMPILED_KERNELS=1` turns the compiled kernels on,
    `VISIONPEFT_NATIVE_KERNELS=0` turns the C kernels off (read at import: a fresh process
    with the variable set), as the public getters report them."""
    code = ("import json, visionpeft as vp\n"
            "from visionpeft.ops.compiled import compiled_kernels_enabled\n"
            "from visionpeft.ops.native import native_kernels_enabled\n"
            "from visionpeft.ops.kernels import current_kernels\n"
            "vp.set_compiled_kernels\n"  # the package's public API loads first, as a user's script does
            "print(json.dumps({'file': vp.__file__, 'compiled': compiled_kernels_enabled(),\n"
            "                  'native': native_kernels_enabled(), 'current': current_kernels()}))\n")
    child = {k: v for k, v in os.environ.items() if not k.startswith("VISIONPEFT_")}
    child.update(env)
    child["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child, cwd=_ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(_ROOT)  # this checkout's package
    assert {"compiled": got["compiled"], "native": got["native"]} == expected
    assert got["current"] == expected
