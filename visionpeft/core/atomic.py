"""Crash-safe writes of folders and files: build in a hidden sibling, then swap it in.

Hidden siblings are named ``.<name>.tmp-<host>-<pid>-<random>`` (and ``.old-`` for a
replaced folder on the way out), so the next save to the same path can tell leftovers of
a process that died (same host, pid gone) from those of a save running right now, and
clean them up. Replacing a folder is one atomic exchange on Linux (``renameat2`` with
``RENAME_EXCHANGE``); elsewhere it is two renames, and a save killed between them leaves
the previous folder as ``.old-``, which the next save to that path puts back first.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{_HOST}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _dead_leftovers(path: Path, kind: str) -> list[Path]:
    """Hidden siblings of ``path`` of this ``kind`` left by processes of this host that no
    longer run (never one of a live save: another host's or a running process's)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{kind}-{re.escape(_HOST)}-(\d+)-")
    found = []
    if not path.parent.is_dir():
        return found
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            found.append(entry)
    return sorted(found)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def recover(path: Path) -> None:
    """Undo what a killed save to ``path`` left behind: put a previous folder that is only
    under ``.old-`` back (when ``path`` is missing), and remove dead temporary siblings."""
    for old in _dead_leftovers(path, "old"):
        kept = old / path.name
        if kept.exists() and not path.exists():
            os.rename(kept, path)
        _remove(old)
    for tmp in _dead_leftovers(path, "tmp"):
        _remove(tmp)


@functools.lru_cache(maxsize=None)
def _renameat2():
    """glibc's renameat2 (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # old kernel or a filesystem without exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _foreign_files(path: Path, new: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not (new / p.relative_to(path)).exists())


def write_dir(path: str | os.PathLike, write) -> None:
    """Write a folder's files into a temporary sibling (``write(folder)``), then swap it in,
    so that an interrupted save leaves the previous folder as it was. Only a folder such a
    save wrote is replaced: a file at ``path``, or a folder holding anything the new one
    would not (someone's other files), is refused before anything is touched."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a save writes a folder there. Remove the file or choose "
                              f"another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, "tmp"), dir=path.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
            return
        foreign = _foreign_files(path, tmp)
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise FileExistsError(f"{path} holds {foreign[:5]}{more}, which this save would not write; it "
                                  f"replaces the whole folder, so it only overwrites a folder written by a "
                                  f"save. Choose a new path or remove those files")
        if _exchange(tmp, path):  # tmp now holds the previous folder
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = Path(tempfile.mkdtemp(prefix=_prefix(path, "old"), dir=path.parent))
        try:
            os.rename(path, old / path.name)
        except OSError:
            shutil.rmtree(old, ignore_errors=True)
            raise
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_file(path: str | os.PathLike, write) -> None:
    """Write one file through a temporary sibling (``write(tmp_path_str)``) and
    ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
