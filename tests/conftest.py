"""Shared fixtures: offline hub, small thread count, toy hosts, per-method tiny configs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import visionpeft as vp  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Debian's Chromium, which .ci/run installs, for the demos' headless-browser tests
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]

# One tiny config per registered method; test_registry_covers_every_method keeps this
# in step with the registry, so a new method is put under every shared test body.
METHOD_CONFIGS = {
    "lora": lambda targets, **kw: vp.LoRAConfig(r=3, alpha=6.0, target_modules=targets, **kw),
    "krona": lambda targets, **kw: vp.KronAConfig(alpha=1.5, target_modules=targets, **kw),
    "loha": lambda targets, alpha=6.0, **kw: vp.LoHaConfig(r=3, alpha=alpha, target_modules=targets, **kw),
    "wara": lambda targets, **kw: vp.WaRAConfig(r=2, wavelet="db2", levels=2, alpha=4.0,
                                                target_modules=targets, **kw),
    "snell": lambda targets, **kw: vp.SNELLConfig(r=4, sparsity=0.5, target_modules=targets, **kw),
    # every toy layer's input size (per group) is a multiple of 3; tiny hosts' of 2
    "block_lora": lambda targets, n_blocks=3, **kw: vp.BlockLoRAConfig(
        r=3, n_blocks=n_blocks, alpha=6.0, target_modules=targets, **kw),
}

# Block methods wrap whole modules (weight_space False); their shared bodies live in
# test_block_adapters.py and run on the block hosts there.
BLOCK_METHOD_CONFIGS = {
    "adapter": lambda targets, **kw: vp.AdapterConfig(**{"bottleneck": 4, "alpha": 1.5,
                                                         "target_modules": targets, **kw}),
    # zero_init, so that a new adapter is the identity as the shared body checks
    "earth_adapter": lambda targets, **kw: vp.EarthAdapterConfig(**{
        "bottleneck": 4, "zero_init": True, "frequency_blocks": [0], "cutoff_ratio": 0.5,
        "target_modules": targets, **kw}),
    # Point-PEFT runs Point-MAE blocks itself (centres, a memory bank): tests/test_point_peft.py
    # holds its own bodies; the shared ones that take any method use the host below
    "point_peft": lambda targets, **kw: vp.PointPEFTConfig(**{
        "prompt_blocks": [0, 1], "top_k": 3, "local_k": 4, "dropout": 0.0, "target_modules": targets, **kw}),
}
# the tiny host each block method runs on in the shared bodies (timm_vit where not named)
BLOCK_METHOD_HOSTS = {"point_peft": "point_mae"}


def ready_block_method(model: nn.Module, method: str, name: str, seed: int = 0) -> None:
    """What a block method needs before its first forward: Point-PEFT its memory bank."""
    if method == "point_peft":
        g = torch.Generator().manual_seed(seed)
        width = model.blocks[0].norm1.normalized_shape[0]
        vp.set_memory_bank(model, torch.randn(6, width, generator=g), name=name)


# overrides for the tiny hosts, whose layer sizes differ from the toy's
# LoHa's dW is quartic in the factors' size: at the host tests' std 0.05 it needs this
# alpha (scale 400) to be as large as LoRA's there
HOST_OVERRIDES = {"block_lora": {"n_blocks": 2}, "loha": {"alpha": 1200.0}}


def make_config(method, targets, **kw):
    return METHOD_CONFIGS[method](targets, **kw)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every adapter away from its zero init, so that no check passes by dW = 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".adapters." in name or ".copies." in name:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


class ToyNet(nn.Module):
    """Every layer kind at odd, prime and non-square sizes: a fused qkv Linear, convs
    with stride / padding / dilation / groups, and an nn.MultiheadAttention."""

    def __init__(self, dim=15, batch_first=True):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, 7)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1)
        self.conv_dil = nn.Conv2d(6, 6, (3, 2), stride=1, padding=2, dilation=2, bias=False)
        self.conv_grp = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.attn = nn.MultiheadAttention(dim, 3, batch_first=batch_first)
        self.batch_first = batch_first
        self.head = nn.Linear(7 + 4, 2)

    def forward(self, x, img):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        h, _ = self.attn(q, k, v, need_weights=False)
        if not self.batch_first:
            h = h.transpose(0, 1)
        t = self.proj(h).mean(1)
        c = self.conv_grp(self.conv_dil(self.conv(img))).mean((2, 3))
        return self.head(torch.cat([t, c], -1))


TOY_TARGETS = ["qkv[q,v]", "proj", "conv", "conv_dil", "conv_grp", "attn"]


def toy_inputs(batch=3, seq=5, dim=15, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, dim, generator=g), torch.randn(batch, 3, 11, 9, generator=g)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyNet().eval()


class Untouched:
    """What a refused load, import, hot-swap, inject or export must leave as it was: every
    parameter and buffer, persistent or not (the same objects, values, dtypes and
    devices), the requires_grad flags and .grad, the module object at every name and its
    training flag, every module's hook tables, the adapter state (configs, active set,
    scales, merged, disabled, routing, the flags `remove` restores); and, given a folder,
    its files and their contents (a refused export writes nothing). Take it before the
    refused call, check it after:

        kept = Untouched(model, tmp_path)
        with pytest.raises(...): ...
        kept.check()
    """

    HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                   "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
                   "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                   "_load_state_dict_post_hooks")

    def __init__(self, model: nn.Module, folder=None):
        self.model, self.folder = model, folder
        self.before = self._take(clone=True)

    def _take(self, clone: bool) -> dict:
        import hashlib
        from pathlib import Path

        from visionpeft.core.model_ops import get_state

        m = self.model
        # objects are kept (not their ids, which a freed object's replacement may reuse)
        tensors = {f"param:{k}": v for k, v in m.named_parameters(remove_duplicate=False)}
        tensors.update({f"buffer:{k}": v for k, v in m.named_buffers(remove_duplicate=False)})
        values = {k: (v.detach().clone() if clone else v.detach()) for k, v in tensors.items()}
        grads = {k: (None if v.grad is None else v.grad.clone() if clone else v.grad)
                 for k, v in m.named_parameters(remove_duplicate=False)}
        hooks = {}
        for name, mod in m.named_modules(remove_duplicate=False):
            for table in self.HOOK_TABLES:
                hooks[(name, table)] = list(getattr(mod, table, {}).items())
        state = get_state(m, required=False)
        adapters = None if state is None else (
            {n: c.to_dict() if hasattr(c, "to_dict") else repr(c) for n, c in state.configs.items()},
            state.active, dict(state.scales), state.merged, state.disabled, state.routing, dict(state.frozen_flags))
        files = None
        if self.folder is not None:
            root = Path(self.folder)
            files = {str(q.relative_to(root)): (hashlib.sha256(q.read_bytes()).hexdigest() if q.is_file() else "dir")
                     for q in sorted(root.rglob("*"))} if root.exists() else {}
        return {"tensors": tensors, "values": values, "grads": grads,
                "grad": {n: p.requires_grad for n, p in m.named_parameters()},
                "modules": dict(m.named_modules(remove_duplicate=False)),
                "training": {n: mod.training for n, mod in m.named_modules(remove_duplicate=False)},
                "hooks": hooks, "adapters": adapters, "files": files}

    def check(self) -> None:
        now, was = self._take(clone=False), self.before
        assert now["modules"].keys() == was["modules"].keys() and all(
            now["modules"][k] is v for k, v in was["modules"].items()), "module objects were replaced, added or removed"
        assert now["training"] == was["training"], "train/eval flags changed"
        assert now["hooks"].keys() == was["hooks"].keys() and all(
            len(now["hooks"][k]) == len(v) and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(now["hooks"][k], v))
            for k, v in was["hooks"].items()), "hooks were added or removed"
        assert now["grad"] == was["grad"], "requires_grad flags changed"
        assert now["adapters"] == was["adapters"], f"adapters changed: {was['adapters']} -> {now['adapters']}"
        assert now["tensors"].keys() == was["tensors"].keys(), "parameter / buffer names changed"
        for k, obj in was["tensors"].items():
            new = now["tensors"][k]
            assert new is obj, f"{k} was replaced"
            value = was["values"][k]
            assert new.dtype == value.dtype and new.device == value.device, f"{k} was cast or moved"
            # NaN equals NaN here: a model holding one is unchanged when it still holds it
            torch.testing.assert_close(now["values"][k], value, rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")
        for k, g in was["grads"].items():
            h = now["grads"][k]
            assert (g is None) == (h is None) and (g is None or torch.equal(g, h)), f"{k}.grad changed"
        if was["files"] is not None:
            names = set(now["files"]) | set(was["files"])
            changed = sorted(k for k in names if now["files"].get(k) != was["files"].get(k))
            assert not changed, f"files were written, changed or removed: {changed}"


def assert_file_refused(model, path, how: str, match: str, name: str = "a", folder=None) -> None:
    """``path`` refused by `load_adapter` (how="load"), `import_adapter` ("import") or a
    hot-swap into the loaded adapter ``name`` ("hotswap"), with ``match`` in the message and
    the model (and ``folder``) untouched."""
    kept = Untouched(model, folder)
    with pytest.raises(vp.InteropError, match=match):
        if how == "load":
            vp.load_adapter(model, path)
        elif how == "import":
            vp.import_adapter(model, path)
        else:
            vp.load_adapter(model, path, name=name, hotswap=True)
    kept.check()


def assert_best_is_checkpoint(out, best_step: int, steps) -> None:
    """A dense task's ``out/best`` holds exactly the decoder and encoder adapter of
    ``checkpoint-<best_step>`` and of no other step (the steps' weights all differ)."""
    from safetensors.torch import load_file

    names = ("decoder.safetensors", "encoder/adapter_model.safetensors")
    best = {n: load_file(str(out / "best" / n)) for n in names}
    for step in steps:
        at = {n: load_file(str(out / f"checkpoint-{step}" / n)) for n in names}
        same = all(best[n].keys() == at[n].keys() and all(torch.equal(best[n][k], at[n][k]) for k in best[n])
                   for n in names)
        assert same == (step == best_step), (step, best_step)
