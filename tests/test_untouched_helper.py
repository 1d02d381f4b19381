"""`Untouched` (tests/conftest.py), the check every refused operation's test uses, sees
each kind of change it promises to see, and a NaN that stays a NaN is no change."""
import pytest
import torch
from conftest import ToyNet, Untouched, make_config

import visionpeft as vp


def test_untouched_sees_each_kind_of_change(tmp_path):
    torch.manual_seed(0)
    m = ToyNet()
    (tmp_path / "old").write_text("a")
    for change in ("value", "grad", "module", "hook", "adapter", "file", "replaced", "cast", "rewritten", "eval",
                   "unhooked", "scale"):
        kept = Untouched(m, tmp_path)
        if change == "value":
            with torch.no_grad():
                m.proj.weight.add_(1e-3)
        elif change == "grad":
            m.proj.weight.requires_grad_(False)
        elif change == "module":
            m.head = torch.nn.Linear(11, 2)
        elif change == "hook":
            m.proj.register_forward_hook(lambda *a: None)
        elif change == "adapter":
            vp.inject(m, make_config("lora", ["proj"]), name="x")
        elif change == "file":
            (tmp_path / "f").write_text("x")
        elif change == "replaced":  # a new tensor with the same values
            m.conv.weight = torch.nn.Parameter(m.conv.weight.detach().clone())
        elif change == "cast":
            m.conv_grp.double()
        elif change == "rewritten":  # same name, other contents
            (tmp_path / "old").write_text("b")
        elif change == "eval":
            m.train(not m.training)
        elif change == "unhooked":
            m.proj.base_layer._forward_hooks.clear()  # the hook added above, on the Linear now wrapped
        else:
            vp.set_scale(m, "x", 0.5)
        with pytest.raises(AssertionError):
            kept.check()
    with torch.no_grad():
        m.conv.weight[0, 0, 0, 0] = float("nan")
    Untouched(m, tmp_path).check()
