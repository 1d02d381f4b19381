"""Crash-safe writes of folders and files: build in a hidden sibling, then swap it in.

A save builds ``.<name>.tmp-<12 hex>`` next to its target and holds an advisory lock
(``flock``) on it until it is done; a replaced folder waits under ``.<name>.old-<12 hex>``
(two-rename systems only), locked too. A lock dies with its process, whatever PID
namespace it ran in, so the next save to the same path can tell the leftovers of a killed
save (unlocked, older than a minute) from those of a save running now, remove them, and
put back a previous folder that only an ``.old-`` sibling still holds. Where locks cannot
be taken (Windows; NFS without lock support) nothing is ever removed, and a previous
folder is only moved back to a missing path, which destroys nothing. Replacing a folder
is one atomic exchange on Linux (``renameat2`` with ``RENAME_EXCHANGE``); elsewhere it is
two renames.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
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
_SUFFIX_HEX = 12
FREE, HELD, UNKNOWN = "free", "held", "unknown"


def _stem(path: Path) -> str:
    """The target's name as it appears in its siblings' names, kept short enough that
    ``.<stem>.tmp-<suffix>`` fits a 255-byte file name."""
    name = path.name
    if len(name.encode("utf-8", "surrogateescape")) <= 150:
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{name[:40]}~{digest}"


def _sibling(path: Path, kind: str, suffix: str | None = None) -> Path:
    return path.with_name(f".{_stem(path)}.{kind}-{suffix or secrets.token_hex(_SUFFIX_HEX // 2)}")


def _new_sibling(path: Path, kind: str, folder: bool):
    """Create a fresh hidden sibling with the modes a plain mkdir/open would give (the
    kernel applies the umask); -> (path, fd of a file or None)."""
    for _ in range(100):
        entry = _sibling(path, kind)
        try:
            if folder:
                os.mkdir(entry, 0o777)
                return entry, None
            return entry, os.open(entry, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary sibling of {path}")


def _plain_modes(tmp: Path, file_mode: int) -> None:
    """Give what ``write`` put at ``tmp`` (a file, or a folder's files and subfolders) the
    modes a plain open()/mkdir gives under this process's umask: writers that build their
    file through a private temporary of their own (safetensors' save_file does) leave it
    0600. ``file_mode`` is the mode the kernel gave our own fresh sibling (0o666 & ~umask);
    execute bits a writer set are kept where the umask allows them."""
    if os.name != "posix":
        return
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # r -> x: 0o644 -> 0o755
    entries = [tmp] if not tmp.is_dir() else [e for e in tmp.rglob("*")]
    for entry in entries:
        try:
            st = entry.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            continue  # a hard link to someone's file: its mode is theirs
        if stat.S_ISREG(st.st_mode):
            mode = file_mode | (st.st_mode & dir_mode & 0o111)
        elif stat.S_ISDIR(st.st_mode):
            mode = dir_mode
        else:  # links and the like keep theirs
            continue
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(entry, mode)


def _try_lock(fd: int, blocking: bool) -> str:
    """FREE (now locked by us), HELD (someone else holds it) or UNKNOWN (no locks here)."""
    if fcntl is None:
        return UNKNOWN
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return HELD
    except OSError:  # ENOLCK, ENOSYS, EBADF (NFS wants a writable fd): locks unsupported
        return UNKNOWN
    return FREE


def _lock(entry: Path):
    """An open descriptor holding an exclusive flock on ``entry`` (None where locks are
    not available: the save goes on unlocked)."""
    if fcntl is None:
        return None
    fd = os.open(entry, os.O_RDONLY)
    if _try_lock(fd, blocking=True) == FREE:
        return fd
    os.close(fd)
    return None


def _unlock(fd) -> None:
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


def _state(entry: Path) -> str:
    """Whether a leftover is abandoned (FREE), in use (HELD) or cannot be told (UNKNOWN)."""
    try:
        if time.time() - entry.lstat().st_mtime < _MIN_AGE_S:
            return HELD
        if fcntl is None:
            return UNKNOWN
        fd = os.open(entry, os.O_RDONLY)
    except OSError:  # gone meanwhile, or not ours to open
        return HELD
    try:
        return _try_lock(fd, blocking=False)
    finally:
        os.close(fd)  # also drops the lock we may just have taken


def _leftovers(path: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"^\.{re.escape(_stem(path))}\.{kind}-[0-9a-f]{{{_SUFFIX_HEX}}}$")
    try:
        return sorted(e for e in path.parent.iterdir() if pattern.match(e.name) and not e.is_symlink())
    except OSError:  # no parent, or not listable
        return []


def _discard(entry: Path, path: Path) -> None:
    """Delete a leftover, first renamed to a ``.tmp-`` name so that a deletion cut short
    can never be mistaken for a previous folder to put back."""
    if ".old-" in entry.name[-(_SUFFIX_HEX + 5):]:
        trash = _sibling(path, "tmp", entry.name[-_SUFFIX_HEX:])
        try:
            os.rename(entry, trash)
        except OSError:
            return
        entry = trash
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


def recover(path: str | os.PathLike) -> None:
    """Undo what killed saves to ``path`` left behind: put a previous folder that only an
    ``.old-`` sibling holds back (when ``path`` is missing), and remove abandoned
    siblings. Nothing is removed unless a lock says no save uses it, and an ``.old-``
    copy only once ``path`` holds a folder again."""
    path = Path(path)
    for old in _leftovers(path, "old"):
        state = _state(old)
        if state == HELD:
            continue
        kept = old / path.name
        if kept.is_dir() and not os.path.lexists(path):
            with contextlib.suppress(OSError):  # full disk, no permission, a racing recover
                os.rename(kept, path)
        if state == FREE and path.is_dir():  # put back, or superseded by a newer folder
            _discard(old, path)
    for tmp in _leftovers(path, "tmp"):
        if _state(tmp) == FREE:
            _discard(tmp, path)


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
    # Windows flushes only through a writable handle; POSIX reads are enough (and work on
    # read-only files)
    fd = os.open(file, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
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


def _foreign_files(path: Path, new: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if p.name not in _FILE_MANAGER_FILES and not (new / p.relative_to(path)).exists())


def _resolve_link(path: Path) -> Path:
    """A symlink at ``path`` is saved through: what it points to is replaced, the link
    stays."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp, _ = _new_sibling(path, "tmp", folder=True)
    held = None
    try:
        held = _lock(tmp)
        write(tmp)
        _plain_modes(tmp, stat.S_IMODE(tmp.stat().st_mode) & 0o666)
        for entry in tmp.rglob("*"):
            if entry.is_file() and not entry.is_symlink():
                _fsync(entry)
        if not path.exists():
            try:
                os.rename(tmp, path)
                _fsync_parent(path)
                return
            except OSError as err:  # another save created it meanwhile: replace that one
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.is_dir():
                    raise
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
    under a locked ``.old-`` sibling in between and put back if the second one fails."""
    old, _ = _new_sibling(path, "old", folder=True)
    held, moved = None, False
    try:
        held = _lock(old)
        os.rename(path, old / path.name)
        moved = True
        os.rename(tmp, path)
        moved = False
    finally:
        try:
            if moved and not os.path.lexists(path):
                os.rename(old / path.name, path)  # if this fails, the .old- copy stays for recover()
        finally:
            _unlock(held)
        if not (old / path.name).exists() or path.is_dir():
            _discard(old, path)  # renamed to .tmp- first: a cut-short deletion is never restored


def write_file(path: str | os.PathLike, write) -> None:
    """Write one file through a temporary sibling (``write(tmp_path_str)``) and
    ``os.replace`` it into place."""
    path = _resolve_link(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp, fd = _new_sibling(path, "tmp", folder=False)
    try:
        file_mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0o666 & ~umask, as the kernel made it
        if _try_lock(fd, blocking=True) != FREE:  # no locks here: go on unlocked
            os.close(fd)
            fd = None
        write(str(tmp))
        _plain_modes(tmp, file_mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_parent(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _unlock(fd)
