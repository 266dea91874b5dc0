"""Atomic file writes: write to a temporary file in the destination folder, fsync, then rename.

A reader never sees a half-written file, and after a power loss the file is either the old one or
the complete new one (the file and its folder are fsynced). A crash leaves at most a stray
``.tmp-<name>-@<host>@<pid>@*`` file or staging folder (:func:`staging_dir`);
:func:`remove_stale_tmp` removes those whose process is gone.
OS errors name the destination.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

STALE_AFTER_S = 24 * 3600  # temporary files older than this are stale whoever made them
_GRACE_S = 60  # a dead process's file must also be this old (a same-named host elsewhere may own it)
_HOST = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname())[:32] or "host"
_TMP = re.compile(r"^\.(tmp|old)-.*-@(?P<host>[A-Za-z0-9.-]+)@(?P<pid>\d+)@[a-z0-9_]{8}(\.\w+)?$")


def _prefix(name: str, kind: str = "tmp") -> str:
    """``.<kind>-<name>-@<host>@<pid>@``: the name prefix of this process's temporaries, which
    :func:`remove_stale_tmp` reads back (``_TMP``) to tell a dead writer's leftovers."""
    return f".{kind}-{name[:80]}-@{_HOST}@{os.getpid()}@"


def _named(e: OSError, dest: Path) -> OSError:
    """``e`` with ``dest`` as its file name when the OS did not name one (e.g. ENOSPC on write)."""
    if e.errno is None or e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(dest))


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms and file systems cannot open folders: nothing to sync there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is fsynced and renamed onto ``dest``.

    ``suffix`` lets writers that infer the format from the extension (``np.savez``, PIL) see it.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(dest.name), suffix=suffix or dest.suffix, dir=dest.parent)
    except OSError as e:
        raise _named(e, dest) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the result the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~_umask())
            if fsync:
                _fsync(tmp_path)
        os.replace(tmp_path, dest)
        if fsync:
            _fsync(dest.parent, directory=True)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(e, OSError):
            raise _named(e, dest) from None
        raise


def check_writable(dest: str | os.PathLike, folder: bool = False) -> Path:
    """Fail now rather than after the compute: ``dest`` (a file, or with ``folder`` a folder) can be
    written. Missing folders are created; a path of the wrong kind is a ValueError, an unwritable,
    read-only or full location an OSError naming it."""
    dest = Path(dest)
    where = dest if folder else dest.parent
    if folder and dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest}: exists and is not a folder")
    if not folder and dest.is_dir():
        raise ValueError(f"{dest}: is a folder, expected the path of a file")
    try:
        where.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{dest}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise _named(e, dest) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix("probe"), dir=where)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise _named(e, dest) from None
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(dest: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh folder beside ``dest`` named ``.<kind>-<name>-@<host>@<pid>@*`` (``kind`` 'tmp' for
    what is being built, 'old' for what is being replaced), so that :func:`remove_stale_tmp` can tell
    a dead writer's leftovers from a live one's."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_prefix(dest.name, kind), dir=dest.parent))
    except OSError as e:
        raise _named(e, dest) from None


def remove_stale_tmp(folder: str | os.PathLike, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files and staging folders that :func:`atomic_path` and :func:`staging_dir`
    left in ``folder`` (not recursive): those of a process on this host that no longer runs (and at
    least a minute old), and any older than ``older_than_s``. Nothing else is touched. Returns the
    removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP.match(entry.name)
        if m is None:
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            if not (is_dir or entry.is_file(follow_symlinks=False)):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            pid = int(m["pid"])
            dead = m["host"] == _HOST and pid != os.getpid() and age > _GRACE_S and not _alive(pid)
            if dead or age > older_than_s:
                if is_dir:
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def atomic_write_bytes(dest: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``dest`` atomically and return the path."""
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``dest`` atomically and return the path."""
    return atomic_write_bytes(dest, text.encode("utf-8"))
