"""Crash-safe folder/file writes: leftovers of killed saves are cleaned, a replaced
folder is never lost."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.core import atomic


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(parent, name, kind, pid, suffix="x1"):
    return parent / f".{name}.{kind}-{atomic._HOST}-{pid}-{suffix}"


def test_the_folder_swap_is_one_atomic_exchange_on_linux(tmp_path, monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    calls = []
    real = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: calls.append(real(a, b)) or calls[-1])
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("2"))
    assert calls == [True]
    assert (tmp_path / "out" / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_two_rename_fallback_replaces_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("2"))
    assert (tmp_path / "out" / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_a_dead_save_are_removed_and_a_live_saves_are_kept(tmp_path):
    gone, alive = dead_pid(), os.getpid()
    stale_dir = leftover(tmp_path, "out", "tmp", gone)
    stale_dir.mkdir()
    (stale_dir / "half.safetensors").write_bytes(b"12")
    stale_file = leftover(tmp_path, "out", "tmp", gone, "x2")
    stale_file.write_bytes(b"12")
    running = leftover(tmp_path, "out", "tmp", alive)
    running.mkdir()
    other_name = leftover(tmp_path, "other", "tmp", gone)
    other_name.mkdir()
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    assert not stale_dir.exists() and not stale_file.exists()
    assert running.exists() and other_name.exists()


def test_a_save_killed_between_the_renames_gets_its_folder_back(tmp_path):
    """The state a kill between the two renames leaves: the previous folder only under
    .old-, nothing at the path. Loading puts it back."""
    model = nn.Sequential(nn.Linear(4, 4))
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].adapters["default"]["full"].lora_B.fill_(0.5)
    saved = vp.save_adapter(model, tmp_path / "a")
    old = leftover(tmp_path, "a", "old", dead_pid())
    old.mkdir()
    os.rename(saved, old / "a")
    fresh = nn.Sequential(nn.Linear(4, 4))
    vp.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh[0].adapters["default"]["full"].lora_B, torch.full((4, 2), 0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_killed_save_leaves_the_old_folder_and_the_next_save_cleans_up(tmp_path):
    """A real process killed (SIGKILL) in the middle of writing the new folder."""
    target = tmp_path / "out"
    atomic.write_dir(target, lambda d: (d / "a.txt").write_text("old"))
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from visionpeft.core import atomic
        def write(d):
            (d / "a.txt").write_text("new, half")
            print("writing", flush=True)
            time.sleep(60)
        atomic.write_dir(Path({str(target)!r}), write)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    assert (target / "a.txt").read_text() == "old"
    assert len(list(tmp_path.glob(".out.tmp-*"))) == 1
    atomic.write_dir(target, lambda d: (d / "a.txt").write_text("next"))
    assert (target / "a.txt").read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_single_file_write_replaces_atomically_and_cleans_dead_leftovers(tmp_path):
    stale = leftover(tmp_path, "w.safetensors", "tmp", dead_pid())
    stale.write_bytes(b"half")
    atomic.write_file(tmp_path / "w.safetensors", lambda tmp: open(tmp, "wb").write(b"full"))
    assert (tmp_path / "w.safetensors").read_bytes() == b"full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]

    def fails(tmp):
        open(tmp, "wb").write(b"part")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_file(tmp_path / "w.safetensors", fails)
    assert (tmp_path / "w.safetensors").read_bytes() == b"full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
