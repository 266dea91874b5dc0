"""A run store for sweeps: each grid cell lives under a key derived from its full config.

Layout of ``<root>`` (one folder that any number of jobs on any number of nodes may share):

- ``<prefix>-<hash>/``: a finished cell, holding ``config.json``, ``result.json``, ``provenance.json``
  (:func:`nbhelpers.provenance.collect`, plus the cell's wall time and its experiment's code version),
  optional ``arrays.npz`` and any files the cell wrote. It appears only when complete: it is built in a
  staging folder and renamed. A killed sweep resumes where it stopped; finished cells are only loaded.
- ``.claims/<key>/``: the cell's claim (:mod:`nbhelpers.claims`). A job claims a cell before computing
  it and renews the claim's lease while it computes, so two live jobs never compute one cell; a dead
  job's claim is taken over once its lease runs out (at once when it died on the same machine).
- ``.tmp-<key>-<token>/``: the staging folder of the job holding claim ``token``.
- ``.work-<key>-<token>/``: that job's persistent scratch folder (:func:`work_dir`), for resumable work
  such as training-state dumps. A job that takes a cell over renames the dead job's work folder to its
  own, so training resumes from the dead job's dumps while no two live jobs ever share a folder.

Stale leftovers are removed only when provably dead (:meth:`RunStore.clean`): staging folders of
expired or released claims, work folders of finished cells, and anything older than ``STALE_AGE``
(work folders: ``WORK_AGE``) that no live claim holds. Folders and the files the store writes are
group-readable: modes come from the umask, with owner rwx and group r-x added (shared file systems).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, provenance
from .atomic import atomic_path
from .claims import LEASE, Claims, Holder, dir_mode, make_dirs

STALE_AGE = 86400.0  # seconds: leftover staging folders and temporary files no claim explains
WORK_AGE = 30 * 86400.0  # seconds: work folders (resumable dumps) of unfinished cells nobody resumed
MISMATCH_CHOICES = ("warn", "error")


class CellsHeldError(TimeoutError):
    """Cells still held by other live jobs when ``run_grid``'s ``timeout`` ran out."""

    def __init__(self, message: str, held: dict[str, Holder]):
        super().__init__(message)
        self.held = held


class StaleCellError(ValueError):
    """Stored cells made by another code version than the running one (``on_mismatch='error'``)."""


class StaleCellWarning(UserWarning):
    """Stored cells made by another code version than the running one, reused (``on_mismatch='warn'``)."""


def canonical_json(config: dict[str, Any]) -> str:
    """Stable JSON text of a config (sorted keys, no whitespace); tuples become lists."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), default=_plain)


def _plain(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"config value of type {type(x).__name__} is not JSON-serialisable")


def config_key(config: dict[str, Any], prefix: str | None = None) -> str:
    """``<prefix>-<sha256[:16]>`` of the canonical config; prefix defaults to ``config['kind']``."""
    digest = hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]
    prefix = prefix or str(config.get("kind", "cell"))
    return f"{prefix}-{digest}"


def work_dir(staging: Path, config: dict[str, Any]) -> Path:
    """Persistent scratch folder of a cell for resumable work such as training-state dumps, given the
    staging folder the cell function receives: ``<root>/.work-<key>-<token>/``. It outlives a killed
    job (the job that takes the cell over inherits it) and is removed once the cell is stored."""
    staging, key = Path(staging), config_key(config)
    prefix = f".tmp-{key}-"
    if staging.name.startswith(prefix):
        return staging.parent / f".work-{key}-{staging.name[len(prefix) :]}"
    return staging.parent / f".work-{key}"


# .tmp-<key>-<token> and .work-<key>[-<token>]; a key ends in 16 hex digits
_PRIVATE = re.compile(r"^\.(tmp|work)-(.+?-[0-9a-f]{16})(?:-(.+))?$")


class RunStore:
    """Folder of finished grid cells keyed by config, shared safely by concurrent jobs.

    ``lease``: seconds a job's claim on a cell lives without renewal (renewed every lease / 4 while the
    cell computes); a killed job's cells are taken over after at most this long.
    """

    def __init__(self, root: str | os.PathLike, lease: float = LEASE):
        self.root = Path(root)
        make_dirs(self.root)
        self.claims = Claims(self.root / ".claims", lease)
        self.lease = self.claims.lease
        self.poll = min(max(self.lease / 20, 0.02), 5.0)  # seconds between looks at cells others hold

    def path(self, config: dict[str, Any]) -> Path:
        """Folder of the cell for ``config`` (exists only once the cell is finished)."""
        return self.root / config_key(config)

    def done(self, config: dict[str, Any]) -> bool:
        """True when the cell for ``config`` has been stored."""
        return (self.path(config) / "result.json").exists()

    def _done_key(self, key: str) -> bool:
        return (self.root / key / "result.json").exists()

    def load(self, config: dict[str, Any]) -> dict[str, Any]:
        """The stored result dict; arrays (if any) under ``result['arrays']`` as numpy arrays, the
        provenance record under ``result['provenance']`` (None for cells stored before it existed)."""
        folder = self.path(config)
        try:
            result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder}: cell not finished (no result.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'result.json'}: corrupt result ({e})") from None
        arrays_file = folder / "arrays.npz"
        if arrays_file.exists():
            with np.load(arrays_file, allow_pickle=False) as z:
                result["arrays"] = {k: z[k] for k in z.files}
        result["dir"] = str(folder)
        result["provenance"] = _read_json(folder / "provenance.json")
        return result

    @contextlib.contextmanager
    def staging(self, config: dict[str, Any], token: str | None = None) -> Iterator[Path]:
        """A private staging folder ``.tmp-<key>-<token>`` for the cell's files; renamed into place by
        :meth:`commit`, removed otherwise."""
        tmp = self.root / f".tmp-{config_key(config)}-{token or secrets.token_hex(8)}"
        os.mkdir(tmp)
        os.chmod(tmp, dir_mode())
        try:
            yield tmp
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def commit(
        self,
        staging_dir: Path,
        config: dict[str, Any],
        result: dict[str, Any],
        arrays: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> Path:
        """Write config/result/arrays/provenance into ``staging_dir``, rename it to the cell folder and
        remove the cell's work folder."""
        _write_json(staging_dir / "config.json", config)
        if arrays:
            with atomic_path(staging_dir / "arrays.npz") as tmp:
                np.savez(tmp, **{k: _to_numpy(v) for k, v in arrays.items()})
        if provenance is not None:
            _write_json(staging_dir / "provenance.json", provenance)
        _write_json(staging_dir / "result.json", result)
        _group_readable(staging_dir)
        dest = self.path(config)
        try:
            os.replace(staging_dir, dest)
        except OSError:
            if not (dest / "result.json").exists():  # a stale partial folder: replace it
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(staging_dir, dest)
            # else another job finished the same cell first: keep theirs (same config, same result)
        shutil.rmtree(work_dir(staging_dir, config), ignore_errors=True)
        return dest

    def run(self, config: dict[str, Any], fn: Callable, timeout: float | None = None) -> dict:
        """Load the cell if finished, else call ``fn(config, staging_dir) -> (result, arrays)`` and store
        it; waits (up to ``timeout`` s) while another live job computes it."""
        return self.run_grid([config], fn, progress=False, timeout=timeout)[0]

    # ------------------------------------------------------------------------------------------
    # One cell

    def attempt(self, config: dict[str, Any], fn: Callable) -> tuple[str, Holder | None]:
        """Compute the cell unless finished or held: ("loaded" | "computed", None) or ("held", holder)."""
        key = config_key(config)
        if self._done_key(key):
            return "loaded", None
        claim = self.claims.acquire(key)
        if claim is None:
            return "held", self.claims.current(key)
        with claim:
            if self._done_key(key):  # finished by another job between our look and our claim
                claim.release("done")
                return "loaded", None
            self._take_over(key, claim.token)
            with self.staging(config, claim.token) as staging:
                t0 = time.perf_counter()
                result, arrays = fn(config, staging)
                record = provenance.collect(wall_seconds=time.perf_counter() - t0)
                record["code"] = provenance.code_version(fn)
                if claim.lost:
                    record["lease_lost"] = True  # another job took over while this one computed
                self.commit(staging, config, result, arrays, record)
            claim.release("done")
        return "computed", None

    def _take_over(self, key: str, token: str) -> None:
        """As the cell's live holder: inherit the newest work folder of earlier (dead) holders, and
        remove their other work and staging folders."""
        mine = self.root / f".work-{key}-{token}"
        work, staging = [], []
        for entry in _scandir(self.root):
            m = _PRIVATE.match(entry.name)
            if m and m.group(2) == key and entry.is_dir(follow_symlinks=False) and m.group(3) != token:
                (work if m.group(1) == "work" else staging).append(Path(entry.path))
        if work:
            newest = max(work, key=_newest_mtime)
            with contextlib.suppress(FileNotFoundError):
                os.rename(newest, mine)
            work.remove(newest)
        for folder in work + staging:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------------------------------
    # A grid

    def run_grid(
        self,
        configs: Sequence[dict[str, Any]],
        fn: Callable,
        workers: int = 1,
        threads_per_worker: int = 1,
        progress: bool = True,
        verbose: bool = False,
        timeout: float | None = None,
        on_mismatch: str = "warn",
    ) -> list[dict[str, Any]]:
        """Run every unfinished cell (in ``workers`` processes when > 1) and return all results in order.

        ``fn`` must be a module-level function (picklable). Finished cells are only loaded; cells that
        other live jobs hold are waited for (at most ``timeout`` seconds once this job has nothing else
        to do, then :class:`CellsHeldError` names them and their holders) and loaded when finished.
        ``progress`` prints a start line and a one-line summary; ``verbose`` adds a line per cell.
        Stored cells made by another code version (see :meth:`check_versions`) are reused with a
        :class:`StaleCellWarning` (``on_mismatch='warn'``) or refused (``'error'``).
        """
        if on_mismatch not in MISMATCH_CHOICES:
            raise ValueError(f"on_mismatch must be one of {MISMATCH_CHOICES}, got {on_mismatch!r}")
        t0 = time.time()
        unique = _unique(configs)
        self.clean()
        pending = [c for c in unique if not self.done(c)]
        tally = Counter(loaded=len(unique) - len(pending))
        if progress and pending:
            older = self.older_versions(pending)
            note = f" ({older} cells of older code versions are stored and not reused)" if older else ""
            print(
                f"{self.root}: {len(unique)} cells, {tally['loaded']} finished; running {len(pending)} "
                f"with {max(1, min(workers, len(pending)))} worker(s){note}",
                flush=True,
            )
        with _Workers(workers, threads_per_worker) as pool:
            computed = self._drive(pending, fn, pool, tally, timeout, progress, verbose)
        results = [self.load(c) for c in configs]
        by_key = dict(zip(map(config_key, configs), results))
        self.check_versions([r for k, r in by_key.items() if k not in computed], fn, on_mismatch)
        provenance.note_cells({r["dir"]: r["provenance"] for r in by_key.values()})
        if progress:
            print(self._summary(len(unique), tally, time.time() - t0), flush=True)
        return results

    def _drive(self, pending, fn, pool, tally, timeout, progress, verbose) -> set[str]:
        """Compute or wait for every pending cell, counting outcomes into ``tally``; returns the keys
        this job computed."""
        computed: set[str] = set()
        t0, waiting_since, announced = time.time(), None, False
        while pending:
            free, held = [], {}
            for c in pending:
                key = config_key(c)
                holder = None if self._done_key(key) else self.claims.current(key)
                if self._done_key(key):
                    tally["others"] += 1
                    _say(verbose, f"  {key} finished by another job")
                elif holder is not None and holder.live():
                    held[key] = (c, holder)
                else:
                    free.append(c)
            for c, (outcome, holder) in pool.attempt_all(self, free, fn):
                key = config_key(c)
                if outcome == "held":
                    held[key] = (c, holder)
                    continue
                tally["computed" if outcome == "computed" else "others"] += 1
                if outcome == "computed":
                    computed.add(key)
                what = "computed" if outcome == "computed" else "finished by another job"
                _say(verbose, f"  {key} {what} ({time.time() - t0:.0f} s)")
            pending = [c for c, _ in held.values()]
            if not pending or free:
                continue
            waiting_since = waiting_since or time.time()
            waited = time.time() - waiting_since
            if timeout is not None and waited >= timeout:
                raise CellsHeldError(_held_message(held, waited), {k: h for k, (_, h) in held.items()})
            if progress and not announced:
                print(f"waiting for {len(held)} cell(s) held by other jobs: {_held_list(held)}", flush=True)
                announced = True
            time.sleep(self.poll)
        tally["waited"] = time.time() - waiting_since if waiting_since else 0.0
        return computed

    def _summary(self, n: int, tally: Counter, seconds: float) -> str:
        text = f"{n} cells: {tally['loaded']} loaded, {tally['computed']} computed"
        if tally["others"]:
            text += f", {tally['others']} computed by other jobs"
        if tally["waited"] >= 1:
            text += f" (waited {provenance.duration(tally['waited'])})"
        return f"{text}; {provenance.duration(seconds)}"

    # ------------------------------------------------------------------------------------------
    # Code versions

    def older_versions(self, configs: Sequence[dict[str, Any]]) -> int:
        """How many of ``configs`` have a stored cell for an older integer ``version`` of their code."""
        count = 0
        for c in configs:
            v = c.get("version")
            if isinstance(v, int) and not isinstance(v, bool):
                count += any(self.done({**c, "version": old}) for old in range(max(0, v - 20), v))
        return count

    def check_versions(
        self, results: Sequence[dict[str, Any]], fn: Callable, on_mismatch: str = "warn"
    ) -> None:
        """Report stored cells made by other code than the running one: without a provenance record,
        by another nbhelpers version, or by another ``VERSION`` of ``fn``'s experiment module.

        The key of a cell includes its experiment's ``VERSION`` (in the config), so a new VERSION never
        finds old cells; this catches what the key cannot: cells from before provenance was recorded,
        other package versions, and configs without a version. ``on_mismatch``: ``"warn"`` reuses them
        with a :class:`StaleCellWarning`, ``"error"`` raises :class:`StaleCellError`.
        """
        code = provenance.code_version(fn)
        reasons: Counter = Counter()
        example: dict[str, str] = {}
        for r in results:
            reason = _mismatch(r.get("provenance"), __version__, code)
            if reason:
                reasons[reason] += 1
                example.setdefault(reason, Path(r["dir"]).name)
        if not reasons:
            return
        what = "; ".join(f"{n} {reason} (e.g. {example[reason]})" for reason, n in reasons.items())
        verb = "refused" if on_mismatch == "error" else "reused"
        message = (
            f"{self.root}: {sum(reasons.values())} of {len(results)} stored cells come from other code "
            f"and are {verb}: {what}. Delete those cell folders to recompute them."
        )
        if on_mismatch == "error":
            raise StaleCellError(message)
        warnings.warn(message, StaleCellWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # Leftovers

    def clean(self, stale_age: float = STALE_AGE, work_age: float = WORK_AGE) -> list[Path]:
        """Remove leftovers that are provably dead, and return them.

        Staging folders (``.tmp-<key>-<token>``) go when their claim expired or was released, when their
        cell is finished, or when older than ``stale_age`` s with no live claim; work folders
        (``.work-*``) when their cell is finished or when older than ``work_age`` s with no live claim
        (until then a job that takes the cell over inherits their dumps); stray ``.tmp-*`` files when
        older than ``stale_age``; claim folders of finished cells.
        """
        now, removed = time.time(), []
        for entry in _scandir(self.root):
            name = entry.name
            if not name.startswith((".tmp-", ".work-")):
                continue
            age = now - _mtime(entry, now)
            if entry.is_dir(follow_symlinks=False):
                m = _PRIVATE.match(name)
                dead = self._dead_folder(*m.groups(), age, stale_age, work_age) if m else age > stale_age
            else:
                dead = name.startswith(".tmp-") and age > stale_age
            if dead:
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
        for entry in _scandir(self.claims.folder):
            top = self.claims.current(entry.name)
            if top is not None and top.live():
                continue
            if self._done_key(entry.name) or top is None or now - top.expires > work_age:
                _remove(Path(entry.path))
                removed.append(Path(entry.path))
        return removed

    def _dead_folder(
        self, kind: str, key: str, token: str | None, age: float, stale_age: float, work_age: float
    ) -> bool:
        holders = self.claims.holders(key)
        if holders and token is not None and holders[-1].token == token and holders[-1].live():
            return False
        if self._done_key(key):
            return True
        if kind == "tmp":
            return age > stale_age or any(h.token == token for h in holders)
        return age > work_age


class _Workers:
    """Runs cell attempts in this process, or in a pool of ``workers`` spawned processes."""

    def __init__(self, workers: int, threads_per_worker: int):
        self.workers, self.threads = workers, threads_per_worker
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)

    def attempt_all(self, store: RunStore, configs: list[dict[str, Any]], fn: Callable):
        """Yield ``(config, (outcome, holder))`` per config as attempts finish; re-raise the first error
        once every attempt has ended."""
        if self.pool is None and (self.workers <= 1 or len(configs) <= 1):
            for c in configs:
                yield c, store.attempt(c, fn)
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads,),
            )
        futures = {
            self.pool.submit(_attempt_in_worker, str(store.root), store.lease, c, fn): c for c in configs
        }
        error = None
        for fut in as_completed(futures):
            try:
                outcome = fut.result()
            except Exception as e:  # let the other cells finish, then raise
                error = error or e
                continue
            yield futures[fut], outcome
        if error is not None:
            raise error


def _attempt_in_worker(
    root: str, lease: float, config: dict[str, Any], fn: Callable
) -> tuple[str, Holder | None]:
    return RunStore(root, lease).attempt(config, fn)


def _init_worker(threads: int) -> None:
    import torch  # the run store itself needs no torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _mismatch(record: dict[str, Any] | None, version: str, code: dict[str, Any] | None) -> str | None:
    if record is None:
        return "without a provenance record (stored before it was recorded)"
    if record.get("nbhelpers") != version:
        return f"made by nbhelpers {record.get('nbhelpers')} (running {version})"
    if code is not None:
        old = (record.get("code") or {}).get("version")
        if old != code["version"]:
            return f"made by {code['module']} VERSION {old} (running {code['version']})"
    return None


def _held_list(held: dict[str, tuple[dict, Holder]], most: int = 3) -> str:
    items = [f"{k} ({h.host} pid {h.pid})" for k, (_, h) in list(held.items())[:most]]
    return ", ".join(items) + (f" and {len(held) - most} more" if len(held) > most else "")


def _held_message(held: dict[str, tuple[dict, Holder]], waited: float) -> str:
    cells = "; ".join(f"{k} by {h.describe()}" for k, (_, h) in held.items())
    return (
        f"{len(held)} cell(s) still held by other live jobs after waiting {provenance.duration(waited)}: "
        f"{cells}. Their jobs renew their leases; wait longer (timeout=None waits while they live)."
    )


def _say(on: bool, text: str) -> None:
    if on:
        print(text, flush=True)


def _unique(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for c in configs:
        k = config_key(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(
        json.dumps(obj, indent=1, sort_keys=path.name == "config.json", default=_plain), encoding="utf-8"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _group_readable(folder: Path) -> None:
    """Add owner/group read (and folder traversal) bits to everything under ``folder``."""
    for dirpath, _, filenames in os.walk(folder):
        _add_mode(Path(dirpath), 0o750)
        for name in filenames:
            _add_mode(Path(dirpath) / name, 0o640)


def _add_mode(path: Path, bits: int) -> None:
    st = path.lstat()
    if not path.is_symlink() and st.st_mode & bits != bits:
        os.chmod(path, st.st_mode | bits)


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _mtime(entry: os.DirEntry, default: float) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return default


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    times += [e.stat(follow_symlinks=False).st_mtime for e in _scandir(folder)]
    return max(times)


def _remove(path: Path) -> None:
    """Best effort (a read-only store keeps its leftovers)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
