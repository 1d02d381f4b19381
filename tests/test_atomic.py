"""Crash-safe folder/file writes: leftovers of killed saves are cleaned, those of running
saves kept, a replaced folder is never lost."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.core import atomic

posix_only = pytest.mark.skipif(atomic.fcntl is None, reason="leftovers are only cleaned where flock exists")


def leftover(parent, name, kind, suffix="1", folder=True, age_s=600):
    entry = parent / f".{name}.{kind}-{suffix * 12}"
    entry.mkdir() if folder else entry.write_bytes(b"half")
    then = time.time() - age_s
    os.utime(entry, (then, then))
    return entry


def names(folder):
    return sorted(p.name for p in folder.iterdir())


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
    assert names(tmp_path) == ["out"]


def test_the_two_rename_fallback_replaces_the_folder_and_undoes_a_failed_second_rename(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("2"))
    assert (tmp_path / "out" / "a.txt").read_text() == "2"
    assert names(tmp_path) == ["out"]

    real_rename = os.rename

    def second_fails(src, dst):
        if ".tmp-" in str(src) and str(dst).endswith("out"):
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", second_fails)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("3"))
    assert (tmp_path / "out" / "a.txt").read_text() == "2"
    assert names(tmp_path) == ["out"]


@posix_only
def test_abandoned_leftovers_are_removed_and_those_of_running_or_new_saves_kept(tmp_path):
    stale_dir = leftover(tmp_path, "out", "tmp", "a")
    (stale_dir / "half.safetensors").write_bytes(b"12")
    os.utime(stale_dir, (time.time() - 600,) * 2)
    stale_file = leftover(tmp_path, "out", "tmp", "b", folder=False)
    running = leftover(tmp_path, "out", "tmp", "c")
    young = leftover(tmp_path, "out", "tmp", "d", age_s=0)
    other_name = leftover(tmp_path, "out2", "tmp", "e")
    held = atomic._lock(running)  # a save in progress holds its sibling locked
    try:
        atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    finally:
        atomic._unlock(held)
    assert not stale_dir.exists() and not stale_file.exists()
    assert running.exists() and young.exists() and other_name.exists()


@posix_only
def test_a_folder_only_an_old_sibling_holds_is_put_back_on_load(tmp_path):
    """The state a kill between the two renames leaves: the previous folder only under
    .old-, nothing at the path. Loading puts it back."""
    model = nn.Sequential(nn.Linear(4, 4))
    vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].adapters["default"]["full"].lora_B.fill_(0.5)
    saved = vp.save_adapter(model, tmp_path / "a")
    old = leftover(tmp_path, "a", "old")
    os.rename(saved, old / "a")
    os.utime(old, (time.time() - 600,) * 2)
    fresh = nn.Sequential(nn.Linear(4, 4))
    vp.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh[0].adapters["default"]["full"].lora_B, torch.full((4, 2), 0.5))
    assert names(tmp_path) == ["a"]


@posix_only
def test_a_killed_save_leaves_the_old_folder_and_a_later_save_cleans_up(tmp_path):
    """A real process killed (SIGKILL) while writing the new folder."""
    target = tmp_path / "out"
    atomic.write_dir(target, lambda d: (d / "a.txt").write_text("old"))
    script = textwrap.dedent(f"""
        import time
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
    (left,) = tmp_path.glob(".out.tmp-*")
    atomic.write_dir(target, lambda d: (d / "a.txt").write_text("soon after"))
    assert left.exists()  # too young to tell from a save that has not locked it yet
    os.utime(left, (time.time() - 600,) * 2)
    atomic.write_dir(target, lambda d: (d / "a.txt").write_text("next"))
    assert (target / "a.txt").read_text() == "next"
    assert names(tmp_path) == ["out"]


def test_a_single_file_write_replaces_atomically_and_keeps_the_old_file_on_failure(tmp_path):
    atomic.write_file(tmp_path / "w.safetensors", lambda tmp: open(tmp, "wb").write(b"full"))
    assert (tmp_path / "w.safetensors").read_bytes() == b"full"

    def fails(tmp):
        open(tmp, "wb").write(b"part")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_file(tmp_path / "w.safetensors", fails)
    assert (tmp_path / "w.safetensors").read_bytes() == b"full"
    assert names(tmp_path) == ["w.safetensors"]


def test_saved_folders_and_files_get_the_modes_of_a_plain_mkdir_and_open(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    atomic.write_file(tmp_path / "w.bin", lambda tmp: open(tmp, "wb").write(b"1"))
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_symlinked_target_is_saved_through_and_the_link_kept(tmp_path):
    atomic.write_dir(tmp_path / "real", lambda d: (d / "a.txt").write_text("1"))
    (tmp_path / "link").symlink_to(tmp_path / "real")
    atomic.write_dir(tmp_path / "link", lambda d: (d / "a.txt").write_text("2"))
    assert (tmp_path / "link").is_symlink()
    assert (tmp_path / "real" / "a.txt").read_text() == "2"
    assert names(tmp_path) == ["link", "real"]


def test_long_names_and_file_manager_files_do_not_stop_a_save(tmp_path):
    long = tmp_path / ("adapter_" + "x" * 230)
    atomic.write_dir(long, lambda d: (d / "a.txt").write_text("1"))
    (long / ".DS_Store").write_bytes(b"finder")
    atomic.write_dir(long, lambda d: (d / "a.txt").write_text("2"))
    assert (long / "a.txt").read_text() == "2"
    assert names(tmp_path) == [long.name]


@posix_only
def test_recover_keeps_the_old_copy_when_putting_it_back_fails(tmp_path, monkeypatch):
    old = leftover(tmp_path, "out", "old")
    (old / "out").mkdir()
    (old / "out" / "weights.bin").write_bytes(b"only copy")
    os.utime(old, (time.time() - 600,) * 2)

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "rename", no_space)
    atomic.recover(tmp_path / "out")
    assert (old / "out" / "weights.bin").read_bytes() == b"only copy"
    monkeypatch.undo()
    atomic.recover(tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == b"only copy"
    assert names(tmp_path) == ["out"]


def test_without_locks_saves_still_work_and_leftovers_are_only_put_back_never_removed(tmp_path, monkeypatch):
    if atomic.fcntl is None:
        pytest.skip("no fcntl")

    def no_locks(fd, op):
        raise OSError(37, "No locks available")  # ENOLCK: NFS without lockd

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    open_fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    atomic.write_file(tmp_path / "w.bin", lambda tmp: open(tmp, "wb").write(b"1"))
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("1"))
    assert (tmp_path / "w.bin").read_bytes() == b"1" and (tmp_path / "out" / "a.txt").read_text() == "1"
    if open_fds is not None:
        assert len(os.listdir("/proc/self/fd")) == open_fds
    stale = leftover(tmp_path, "out", "tmp")
    old = leftover(tmp_path, "gone", "old")
    (old / "gone").mkdir()
    os.utime(old, (time.time() - 600,) * 2)
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("2"))
    atomic.recover(tmp_path / "gone")
    assert stale.exists()  # cannot tell whether a save uses it: kept
    assert (tmp_path / "gone").is_dir()  # moving a copy back to a missing path destroys nothing


@posix_only
def test_a_target_whose_name_looks_like_a_sibling_keeps_its_own_leftovers(tmp_path):
    """`run` and `run.old-1`: the second's hidden copy is not the first's leftover."""
    theirs = tmp_path / f".run.old-1.old-{'a' * 12}"
    theirs.mkdir()
    (theirs / "run.old-1").mkdir()
    os.utime(theirs, (time.time() - 600,) * 2)
    atomic.write_dir(tmp_path / "run", lambda d: (d / "a.txt").write_text("1"))
    assert (theirs / "run.old-1").is_dir()


@posix_only
def test_an_old_copy_superseded_by_a_newer_folder_is_removed(tmp_path):
    """Concurrent two-rename saves can leave a previous folder under .old- while another
    save's folder already stands at the path: a later save removes it, never restores it."""
    atomic.write_dir(tmp_path / "out", lambda d: (d / "a.txt").write_text("new"))
    old = leftover(tmp_path, "out", "old")
    (old / "out").mkdir()
    (old / "out" / "a.txt").write_text("older")
    os.utime(old, (time.time() - 600,) * 2)
    atomic.recover(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert names(tmp_path) == ["out"]


def test_saved_adapters_and_exports_are_0644_under_umask_022_though_safetensors_writes_0600(tmp_path):
    from safetensors.torch import save_file
    mask = os.umask(0o022)
    try:
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        vp.inject(model, vp.LoRAConfig(r=2, target_modules=["0"]))
        vp.save_adapter(model, tmp_path / "adapter")
        vp.export(model, tmp_path / "peft", format="peft")
        vp.export(model, tmp_path / "kohya.safetensors", format="kohya")
        # a writer's own private temporary (mkstemp: 0600), a subfolder and an executable
        atomic.write_dir(tmp_path / "out", lambda d: (save_file({"a": torch.zeros(2)}, str(d / "w.safetensors")),
                                                      (d / "sub").mkdir(mode=0o700),
                                                      (d / "sub" / "run.sh").write_text("#!/bin/sh\n"),
                                                      os.chmod(d / "sub" / "run.sh", 0o700)))
        atomic.write_file(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
    finally:
        os.umask(mask)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"adapter": 0o755, "adapter/adapter_config.json": 0o644,
                     "adapter/adapter_model.safetensors": 0o644,
                     "peft": 0o755, "peft/adapter_config.json": 0o644, "peft/adapter_model.safetensors": 0o644,
                     "kohya.safetensors": 0o644, "out": 0o755, "out/w.safetensors": 0o644, "out/sub": 0o755,
                     "out/sub/run.sh": 0o744, "w.safetensors": 0o644}  # its own x bit kept
    # a writer that hard-links someone's private file into the folder leaves its mode alone
    private = tmp_path.parent / f"{tmp_path.name}-private.txt"
    private.write_text("mine")
    os.chmod(private, 0o600)
    atomic.write_dir(tmp_path / "linked", lambda d: os.link(private, d / "mine.txt"))
    assert private.stat().st_mode & 0o777 == 0o600
