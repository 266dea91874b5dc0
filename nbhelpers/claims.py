"""Claims with expiring leases in a shared folder: at most one live holder per name.

The run store claims each grid cell before computing it, so that jobs on many nodes sharing one
``runs_dir`` never compute one cell twice, and a dead job's cell is taken over.

Protocol. A claim on ``name`` is a series of generation files ``<folder>/<name>/<g>.json``; the one with
the highest ``g`` is current. Each file is written in full under a temporary name and hard-linked to
its final name; ``link`` fails when that name exists (atomically, on local file systems and on NFS),
so exactly one job creates each generation. The holder of the current generation owns the name while
its lease runs: ``expires``, renewed from a background thread every ``lease / 4`` seconds. A name is
free when it has no file, when its holder released it, when the lease ran out, or when the holder's
process is gone from this machine (same host and pid namespace: seen at once, without waiting for the
lease). A job takes a free name by creating the next generation. A holder that finds a newer
generation than its own has lost the claim (its lease ran out while it lived, e.g. while suspended).

Leases compare the wall clocks of different nodes: keep them in sync (NTP) to well within a lease.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEASE = 300.0  # seconds a claim lives without renewal; its holder renews every LEASE / 4


@dataclass(frozen=True)
class Holder:
    """The content of one claim generation file."""

    generation: int
    token: str
    host: str
    pid: int
    start: int | None  # the process's start time in clock ticks since boot (Linux), against pid reuse
    machine: str | None  # boot id and pid namespace: where `pid` means this process
    acquired: float
    expires: float
    state: str  # "held", "released" or "done"

    def dead_here(self) -> bool:
        """True when the holder ran on this machine and its process is gone (or its pid was reused)."""
        if self.machine is None or self.machine != machine_id() or self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: it exists
            pass
        except OSError:
            return False
        info = _process_info(self.pid)
        if info is None:  # /proc hides it (hidepid): only the lease can tell
            return False
        state, start = info
        return state in "ZX" or (self.start is not None and start != self.start)

    def live(self, now: float | None = None) -> bool:
        """True while the holder holds the claim: not released, lease running, process not known dead."""
        now = time.time() if now is None else now
        return self.state == "held" and self.expires > now and not self.dead_here()

    def describe(self) -> str:
        """``"node12 pid 4242 (since 10:01:02, lease until 10:06:07)"``."""
        clock = lambda t: time.strftime("%H:%M:%S", time.localtime(t))
        return f"{self.host} pid {self.pid} (since {clock(self.acquired)}, lease until {clock(self.expires)})"


class Claims:
    """Claims on names in ``folder`` (shared by every job), each lasting ``lease`` seconds unless renewed."""

    def __init__(self, folder: str | os.PathLike, lease: float = LEASE):
        if not lease > 0:
            raise ValueError(f"lease must be positive, got {lease}")
        self.folder = Path(folder)
        self.lease = float(lease)

    def current(self, name: str) -> Holder | None:
        """The holder of the newest generation of ``name`` (live or not), or None when never claimed."""
        for _ in range(20):
            gens = self.generations(name)
            if not gens:
                return None
            holder = self._read(name, gens[-1])
            if holder is not None:
                return holder
        return None

    def generations(self, name: str) -> list[int]:
        """Generation numbers of ``name`` present, ascending."""
        try:
            entries = os.listdir(self.folder / name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e[:-5]) for e in entries if e.endswith(".json") and e[:-5].isdigit())

    def holders(self, name: str) -> list[Holder]:
        """Every generation's holder of ``name`` (oldest first), for cleaning up after dead holders."""
        found = (self._read(name, g) for g in self.generations(name))
        return [h for h in found if h is not None]

    def _read(self, name: str, generation: int) -> Holder | None:
        path = self.folder / name / f"{generation}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Holder(generation=generation, **{k: data[k] for k in _FIELDS})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: treat as a dead holder
            return Holder(generation, "", "?", -1, None, None, 0.0, 0.0, "corrupt")

    def acquire(self, name: str) -> Claim | None:
        """Take ``name`` when it is free and return the running claim (renewed until released);
        None when another live holder has it."""
        top = self.current(name)
        for _ in range(1000):
            if top is not None and top.live():
                return None
            claim = Claim(self, name, 0 if top is None else top.generation + 1)
            try:
                claim.create()
            except FileExistsError:  # another job created this generation first: look at it
                top = self._read(name, claim.generation) or self.current(name)
                continue
            except FileNotFoundError:  # the claim folder was removed meanwhile (its cell finished)
                top = self.current(name)
                continue
            return claim.start()
        raise RuntimeError(f"{self.folder / name}: could not settle a claim after 1000 tries")


_FIELDS = ("token", "host", "pid", "start", "machine", "acquired", "expires", "state")


class Claim:
    """A claim this process holds; a context manager that releases it on exit."""

    def __init__(self, claims: Claims, name: str, generation: int):
        self.claims, self.name, self.generation = claims, name, generation
        self.token = secrets.token_hex(8)
        self.path = claims.folder / name / f"{generation}.json"
        self.acquired = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def record(self, state: str = "held") -> dict[str, Any]:
        """The file content: owner, lease expiry and state."""
        pid = os.getpid()
        return {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": pid,
            "start": _process_start(pid),
            "machine": machine_id(),
            "acquired": self.acquired,
            "expires": time.time() + self.claims.lease,
            "state": state,
        }

    def _write_tmp(self, state: str) -> Path:
        folder = self.path.parent
        tmp = folder / f".tmp-{self.token}-{self.generation}-{secrets.token_hex(3)}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.record(state), f)
        os.chmod(tmp, file_mode())
        return tmp

    def create(self) -> None:
        """Create this generation's file; FileExistsError when another job did first."""
        make_dirs(self.path.parent)
        tmp = self._write_tmp("held")
        try:
            os.link(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def superseded(self) -> bool:
        """True when a newer generation exists: another job took over after this lease ran out."""
        return (self.path.parent / f"{self.generation + 1}.json").exists()

    def renew(self) -> bool:
        """Extend the lease; False (and ``lost``) when another job took the claim over."""
        with self._lock:
            if self.lost or self.superseded():
                self.lost = True
                return False
            os.replace(self._write_tmp("held"), self.path)
            return True

    def start(self) -> Claim:
        """Start the heartbeat thread that renews the lease every lease / 4 seconds."""
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.claims.lease / 4):
            try:
                if not self.renew():
                    return
            except OSError:  # a file system hiccup: try again at the next beat
                continue

    def release(self, state: str = "released") -> None:
        """Stop renewing and mark the claim ``state`` ("released", or "done" once the work is stored)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self.lost or self.superseded():
                self.lost = True
                return
            with contextlib.suppress(FileNotFoundError):  # the folder may be gone: the cell is finished
                os.replace(self._write_tmp(state), self.path)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.release()


# ----------------------------------------------------------------------------------------------
# Machine identity and modes


@functools.lru_cache(maxsize=1)
def machine_id() -> str | None:
    """Boot id and pid namespace of this machine (Linux), so that a pid can be checked here; else None."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _process_info(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks since boot) of process ``pid`` from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_start(pid: int) -> int | None:
    info = _process_info(pid)
    return None if info is None else info[1]


def umask() -> int:
    """The process's umask: from /proc (Linux, no change to the process), else set and restored."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(ln for ln in f if ln.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    """Mode of folders the store makes: from the umask, always owner rwx and group r-x (shared stores)."""
    return (0o777 & ~umask()) | 0o750


def file_mode() -> int:
    """Mode of files the store makes: from the umask, always owner rw and group r."""
    return (0o666 & ~umask()) | 0o640


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with :func:`dir_mode` for the folders it creates."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    os.chmod(path, dir_mode())
