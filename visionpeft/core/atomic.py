"""Crash-safe writes of folders and files: build in a hidden sibling, then swap it in.

A save builds ``.<name>.tmp-<random>`` next to its target and holds an advisory lock
(``flock``) on it until it is done; a replaced folder waits under ``.<name>.old-<random>``
(two-rename systems only), locked too. A lock dies with its process, whatever PID
namespace or host it ran in, so the next save to the same path can tell the leftovers of
a killed save (unlocked, older than a minute) from those of a save running now, remove
them, and put back a previous folder that only an ``.old-`` sibling still holds.
Replacing a folder is one atomic exchange on Linux (``renameat2`` with
``RENAME_EXCHANGE``); elsewhere it is two renames. Where there is no ``flock`` (Windows)
leftovers are left alone rather than guessed about.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# a leftover younger than this is never removed: it may be a save between creating its
# sibling and taking the lock on it
_MIN_AGE_S = 60.0
# files that file managers drop into any folder they show: not the user's data
_FILE_MANAGER_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _stem(path: Path) -> str:
    """The target's name as it appears in its siblings' names, kept short enough that
    ``.<stem>.tmp-<random>`` fits a 255-byte file name."""
    name = path.name
    if len(name.encode("utf-8", "surrogateescape")) <= 150:
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{name[:40]}~{digest}"


def _prefix(path: Path, kind: str) -> str:
    return f".{_stem(path)}.{kind}-"


def _lock(entry: Path, blocking: bool = True):
    """An open descriptor holding an exclusive flock on ``entry`` (a folder or a file), or
    None where it is held by someone else (non-blocking) or flock is not available."""
    if fcntl is None:
        return None
    fd = os.open(entry, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _abandoned(path: Path, kind: str) -> list[Path]:
    """Siblings of ``path`` of this ``kind`` that no save holds any more."""
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(_stem(path))}\.{kind}-[^/]+$")
    found = []
    for entry in path.parent.iterdir():
        if not pattern.match(entry.name) or entry.is_symlink():
            continue
        try:
            if time.time() - entry.lstat().st_mtime < _MIN_AGE_S:
                continue
            fd = _lock(entry, blocking=False)
        except OSError:  # gone meanwhile, or not ours to open
            continue
        if fd is not None:
            _unlock(fd)
            found.append(entry)
    return sorted(found)


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def recover(path: str | os.PathLike) -> None:
    """Undo what killed saves to ``path`` left behind: put a previous folder that only an
    ``.old-`` sibling holds back (when ``path`` is missing), and remove abandoned
    temporary siblings."""
    path = Path(path)
    for old in _abandoned(path, "old"):
        kept = old / path.name
        with contextlib.suppress(OSError):  # another process may be recovering it too
            if kept.is_dir() and not os.path.lexists(path):
                os.rename(kept, path)
        _remove(old)
    for tmp in _abandoned(path, "tmp"):
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


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDWR)  # Windows flushes only through a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_parent(path: Path) -> None:
    """Make a rename in ``path``'s folder durable (POSIX; Windows cannot open folders)."""
    if os.name != "posix":
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder: durability is best effort
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _finish_folder(folder: Path) -> None:
    """Flush what ``write`` put in the folder, and give the folder the mode a plain mkdir
    would have (mkdtemp makes it private, 0700, and a rename keeps that)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for entry in folder.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            _fsync(entry)


def _foreign_files(path: Path, new: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.name not in _FILE_MANAGER_FILES and not (new / p.relative_to(path)).exists())


def _resolve_link(path: Path) -> Path:
    """A symlink at ``path`` is saved through: the folder it points to is replaced, the
    link stays."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def write_dir(path: str | os.PathLike, write) -> None:
    """Write a folder's files into a temporary sibling (``write(folder)``), then swap it in,
    so that an interrupted save leaves the previous folder as it was. Only a folder such a
    save wrote is replaced: a file at ``path``, or a folder holding anything the new one
    would not (someone's other files), is refused before anything is touched."""
    path = _resolve_link(Path(path))
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; a save writes a folder there. Remove the file or choose "
                              f"another path")
    if os.path.lexists(path) and not path.exists():
        raise FileExistsError(f"{path} is a broken symlink; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path, "tmp"), dir=path.parent))
    held = _lock(tmp)
    try:
        write(tmp)
        _finish_folder(tmp)
        if not path.exists():
            os.rename(tmp, path)
            _fsync_parent(path)
            return
        foreign = _foreign_files(path, tmp)
        if foreign:
            more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
            raise FileExistsError(f"{path} holds {foreign[:5]}{more}, which this save would not write; it "
                                  f"replaces the whole folder, so it only overwrites a folder written by a "
                                  f"save. Choose a new path or remove those files")
        if _exchange(tmp, path):  # tmp now holds the previous folder
            _fsync_parent(path)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        _swap_by_renames(path, tmp)
        _fsync_parent(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _unlock(held)


def _swap_by_renames(path: Path, tmp: Path) -> None:
    """Replace the folder ``path`` by ``tmp`` with two renames, the previous folder kept
    under a locked ``.old-`` sibling in between (and put back if the second fails)."""
    old = Path(tempfile.mkdtemp(prefix=_prefix(path, "old"), dir=path.parent))
    held = _lock(old)
    try:
        try:
            os.rename(path, old / path.name)
        except OSError:
            shutil.rmtree(old, ignore_errors=True)
            raise
        try:
            os.rename(tmp, path)
        except BaseException:
            if not os.path.lexists(path):
                os.rename(old / path.name, path)
            raise
        # out of recover()'s reach before deleting: a half-deleted copy must never come back
        trash = old.with_name(old.name.replace(".old-", ".tmp-", 1))
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        _unlock(held)
        if old.exists() and not (old / path.name).exists():
            shutil.rmtree(old, ignore_errors=True)


def write_file(path: str | os.PathLike, write) -> None:
    """Write one file through a temporary sibling (``write(tmp_path_str)``) and
    ``os.replace`` it into place."""
    path = _resolve_link(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path, "tmp"), dir=path.parent)
    held = None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, fd = fd, None
        else:
            os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync_parent(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _unlock(held)
