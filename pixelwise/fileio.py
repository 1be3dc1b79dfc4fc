"""Atomic writes: an output is either the old file, the new file, or absent; never half-written.

A failed write names its target: `atomic_path` re-raises an `OSError` with the output's path (not its
temporary's), and a library that hides the cause (torch.save says "iostream error", safetensors wraps
it) is reported as ENOSPC or EROFS when the file system says so. `describe_os_error` turns one into
the CLI's one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pixelwise.errors import UserError


def _read_umask() -> int:
    """The process umask; reading it means setting it, so this runs once, at import, before any threads."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On an exception the temporary file is removed and `path` is left as it was; a file-system error is
    raised as an `OSError` naming `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        # mkstemp makes 0600 (and a writer may have replaced the file): give it the mode open() would have
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.filename is None or Path(os.fsdecode(e.filename)).name.startswith(f".{path.name}."):
            raise OSError(e.errno, e.strerror, str(path)) from e  # the output the user named, not our temporary
        raise
    except UserError:
        raise
    except Exception as e:
        cause = _full_or_read_only(path.parent)  # before the temporary is removed and frees its space
        if cause is None:
            raise
        raise OSError(cause, os.strerror(cause), str(path)) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _full_or_read_only(directory: Path) -> int | None:
    """ENOSPC or EROFS when `directory`'s file system is full or read-only, else None."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < 2**20:  # less than 1 MiB left: a write that failed here ran out of space
        return errno.ENOSPC
    return None


# errno -> (what happened, the way out), for the file-system errors a user can fix
_OS_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or write to another disk"),
    errno.EROFS: (
        "the file system is read-only (was it remounted after an error?)",
        "write to a writable folder, or remount the disk read-write",
    ),
    errno.EACCES: ("permission denied", "fix the permissions or choose another folder"),
    errno.EPERM: ("operation not permitted", "fix the permissions or choose another folder"),
    errno.EEXIST: ("exists and is not a folder", "remove or rename it, or choose another output folder"),
    errno.ENOTDIR: (
        "a part of this path is a file, not a folder",
        "remove or rename that file, or choose another output folder",
    ),
    errno.EISDIR: ("is a folder where a file is needed", "remove it or choose another name"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EIO: ("input/output error: the disk or network file system failed", "check the disk and retry"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or use fewer --workers"),
}


def describe_os_error(e: OSError) -> str | None:
    """One line for a file-system error a user can fix (`path: what happened [ERRNO]; the way out`),
    or None for any other OSError (a bug: let its traceback show)."""
    if e.errno not in _OS_ERRORS:
        return None
    what, fix = _OS_ERRORS[e.errno]
    where = os.fsdecode(e.filename) if e.filename is not None else "a file (the system did not say which)"
    return f"{where}: {what} [{errno.errorcode[e.errno]}]; {fix}"


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_path` left in `directory` when its process was killed.

    Only names of the form `.NAME.XXXXXXXX.tmp` are touched; returns the paths removed.
    """
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        if p.is_file() and p.name.count(".") >= 3:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
