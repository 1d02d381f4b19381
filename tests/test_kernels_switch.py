"""``kernels(compiled=..., native=...)``: a block's choices hold inside it only (restored on
an exception too, nested, invisible to other threads and asyncio tasks), the process
defaults stay settable, and a SNELL layer computed inside a compiled block equals the eager
one, its backward following the forward's choices wherever it runs."""
import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.ops import kernels as kernels_mod
from visionpeft.ops import snell_autograd, snell_kernels, snell_native
from visionpeft.ops.compiled import compiled_kernels_enabled, set_compiled_kernels
from visionpeft.ops.kernels import current_kernels, kernels
from visionpeft.ops.native import native_kernels_enabled, set_native_kernels
from visionpeft.ops.workspace import release_scratch


@pytest.fixture(autouse=True)
def defaults(monkeypatch):
    """Known process defaults (whatever the environment says), restored afterwards."""
    monkeypatch.setitem(kernels_mod._DEFAULTS, "compiled", False)
    monkeypatch.setitem(kernels_mod._DEFAULTS, "native", True)


def test_a_block_sets_its_choices_and_restores_them_on_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with kernels(compiled=True, native=False):
            assert (compiled_kernels_enabled(), native_kernels_enabled()) == (True, False)
            raise RuntimeError("inside")
    assert current_kernels() == {"compiled": False, "native": True}


def test_blocks_nest_and_none_leaves_a_choice_as_it_is():
    with kernels(compiled=True):
        assert current_kernels() == {"compiled": True, "native": True}
        with kernels(native=False):  # compiled=None: the outer block's True holds
            assert current_kernels() == {"compiled": True, "native": False}
            with kernels(compiled=False):
                assert current_kernels() == {"compiled": False, "native": False}
            assert current_kernels() == {"compiled": True, "native": False}
        assert current_kernels() == {"compiled": True, "native": True}
    assert current_kernels() == {"compiled": False, "native": True}


def test_set_functions_set_the_process_default_which_a_block_overrides():
    set_compiled_kernels(True)
    set_native_kernels(False)
    assert current_kernels() == {"compiled": True, "native": False}
    with kernels(compiled=False, native=True):
        set_compiled_kernels(True)  # the default changes, the block still decides here
        assert current_kernels() == {"compiled": False, "native": True}
    assert current_kernels() == {"compiled": True, "native": False}


@pytest.mark.parametrize("bad", ["yes", 1, 0.0])
def test_non_bool_choices_are_refused_and_change_nothing(bad):
    with pytest.raises(TypeError, match="True, False or None"):
        with kernels(compiled=True, native=bad):
            pass
    assert current_kernels() == {"compiled": False, "native": True}


def test_a_block_does_not_leak_into_other_threads():
    seen = {}
    entered, leave = threading.Event(), threading.Event()

    def other():
        seen["other sees main's block"] = compiled_kernels_enabled()
        with kernels(native=False):
            entered.set()
            assert leave.wait(10)
        seen["other after its block"] = native_kernels_enabled()

    with kernels(compiled=True):
        thread = threading.Thread(target=other)
        thread.start()
        assert entered.wait(10)  # the other thread is inside its own block now
        seen["main sees other's block"] = not native_kernels_enabled()
        seen["main's own block"] = compiled_kernels_enabled()
        leave.set()
        thread.join()
    # a pool thread, as many frameworks run work on, does not see the block either
    with kernels(compiled=True), ThreadPoolExecutor(1) as pool:
        seen["pool thread sees main's block"] = pool.submit(compiled_kernels_enabled).result()
    assert seen == {"other sees main's block": False, "main sees other's block": False, "main's own block": True,
                    "other after its block": True, "pool thread sees main's block": False}


def test_asyncio_tasks_keep_their_own_choices():
    async def task(flag, out):
        with kernels(compiled=flag):
            for _ in range(3):
                await asyncio.sleep(0)  # the other task runs its block in between
                out.append((flag, compiled_kernels_enabled()))

    async def main():
        out = []
        await asyncio.gather(task(True, out), task(False, out))
        return out

    out = asyncio.run(main())
    assert len(out) == 6 and all(flag == seen for flag, seen in out)
    assert not compiled_kernels_enabled()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a fallback to eager would hide the compiled path
def test_compiled_block_equals_eager_and_the_backward_follows_the_forward(monkeypatch):
    """Output and factor gradients of a small SNELL layer, forward inside
    ``kernels(compiled=True, native=False)``, backward after the block on a pool thread
    (which sees none of it): the compiled backward runs (not the C one, which the default
    allows), and the values equal the eager run's."""
    calls = []
    real = snell_kernels.fused_weight_and_grads
    monkeypatch.setattr(snell_autograd, "fused_weight_and_grads", lambda *a: calls.append(1) or real(*a))
    native = []  # C backwards that ran (None: the library was not allowed)
    real_native = snell_native.native_sparse_grads

    def counted(*args):
        grads = real_native(*args)
        native.extend([] if grads is None else [1])
        return grads

    monkeypatch.setattr(snell_autograd, "native_sparse_grads", counted)

    def run(block):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 40))
        vp.inject(model, vp.SNELLConfig(r=8, sparsity=0.9, target_modules=["0"]))
        x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1))
        with block:
            out = model(x)
        loss = (out.sin() * 3).sum()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(loss.backward).result()
        mod = model[0].adapters["default"]["full"]
        return out.detach(), mod.A.grad, mod.B.grad

    try:
        eager = run(contextlib.nullcontext())
        assert not calls
        compiled = run(kernels(compiled=True, native=False))
    finally:
        release_scratch()
    assert (len(calls), len(native)) == (1, 0)
    for ours, ref in zip(compiled, eager):
        torch.testing.assert_close(ours, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
