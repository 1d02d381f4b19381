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
}


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
    parameter and buffer (the same objects, values, dtypes and devices), the requires_grad
    flags, the module object at every name, every module's hooks, the adapters and their
    active set; and, given a folder, its files (a refused export writes nothing). Take it
    before the refused call, check it after:

        kept = Untouched(model, tmp_path)
        with pytest.raises(...): ...
        kept.check()
    """

    def __init__(self, model: nn.Module, folder=None):
        self.model, self.folder = model, folder
        self.before = self._take()

    def _take(self) -> dict:
        from pathlib import Path

        m = self.model
        tensors = {k: (id(v), v.detach().clone(), v.dtype, v.device) for k, v in m.state_dict(keep_vars=True).items()}
        hooks = {}
        for name, mod in m.named_modules(remove_duplicate=False):
            for table in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                          "_state_dict_hooks", "_load_state_dict_pre_hooks"):
                hooks[(name, table)] = [(k, id(h)) for k, h in getattr(mod, table, {}).items()]
        from visionpeft.core.model_ops import get_state

        state = get_state(m, required=False)
        files = None
        if self.folder is not None:
            root = Path(self.folder)
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []
        return {"tensors": tensors,
                "grad": {n: p.requires_grad for n, p in m.named_parameters()},
                "modules": {n: id(mod) for n, mod in m.named_modules(remove_duplicate=False)},
                "hooks": hooks,
                "adapters": None if state is None else (list(state.configs), state.active, dict(state.scales)),
                "files": files}

    def check(self) -> None:
        now, was = self._take(), self.before
        assert now["modules"] == was["modules"], "module objects were replaced, added or removed"
        assert now["hooks"] == was["hooks"], "hooks were added or removed"
        assert now["grad"] == was["grad"], "requires_grad flags changed"
        assert now["adapters"] == was["adapters"], f"adapters changed: {was['adapters']} -> {now['adapters']}"
        assert now["tensors"].keys() == was["tensors"].keys(), "state_dict keys changed"
        for k, (ident, value, dtype, device) in was["tensors"].items():
            n_ident, n_value, n_dtype, n_device = now["tensors"][k]
            assert n_ident == ident and n_dtype == dtype and n_device == device, f"{k} was replaced or moved"
            # NaN equals NaN here: a model holding one is unchanged when it still holds it
            torch.testing.assert_close(n_value, value, rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")
        assert now["files"] == was["files"], f"files were left: {sorted(set(now['files']) - set(was['files']))}"
