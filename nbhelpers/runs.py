"""A run store for sweeps: each grid cell lives under a key derived from its full config.

Layout: ``<root>/<prefix>-<hash>/`` holding ``config.json``, ``result.json`` and optional
``arrays.npz`` plus any files the cell wrote (e.g. a checkpoint). A cell folder appears only when
complete (it is built in a temporary folder and renamed), so a killed sweep resumes where it stopped,
finished cells are skipped, and disjoint subsets of a grid can run as separate jobs (papermill on
several nodes) against one shared ``root``. A long cell can also resume *inside* itself: files it keeps
in :func:`work_dir` (training-state dumps) survive a killed run and are removed once the cell is stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path


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
    """Persistent scratch folder of a cell, ``<root>/.work-<key>/``, for resumable work such as
    training-state dumps; given the staging folder a cell function receives. Removed on commit."""
    return Path(staging).parent / f".work-{config_key(config)}"


class RunStore:
    """Folder of finished grid cells keyed by config."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, config: dict[str, Any]) -> Path:
        """Folder of the cell for ``config`` (exists only once the cell is finished)."""
        return self.root / config_key(config)

    def done(self, config: dict[str, Any]) -> bool:
        """True when the cell for ``config`` has been stored."""
        return (self.path(config) / "result.json").exists()

    def load(self, config: dict[str, Any]) -> dict[str, Any]:
        """The stored result dict; arrays (if any) under ``result['arrays']`` as numpy arrays."""
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
        return result

    @contextlib.contextmanager
    def staging(self, config: dict[str, Any]) -> Iterator[Path]:
        """A temporary folder for the cell's files; renamed into place by :meth:`commit`."""
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{config_key(config)}-", dir=self.root))
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
    ) -> Path:
        """Write config/result/arrays into ``staging_dir`` and rename it to the cell folder."""
        (staging_dir / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True, default=_plain))
        if arrays:
            with atomic_path(staging_dir / "arrays.npz") as tmp:
                np.savez(tmp, **{k: _to_numpy(v) for k, v in arrays.items()})
        (staging_dir / "result.json").write_text(json.dumps(result, indent=1, default=_plain))
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

    def run(
        self, config: dict[str, Any], fn: Callable[[dict[str, Any], Path], tuple[dict, dict | None]]
    ) -> dict:
        """Load the cell if finished, else call ``fn(config, staging_dir) -> (result, arrays)`` and store it."""
        if self.done(config):
            return self.load(config)
        with self.staging(config) as tmp:
            result, arrays = fn(config, tmp)
            self.commit(tmp, config, result, arrays)
        return self.load(config)

    def run_grid(
        self,
        configs: Sequence[dict[str, Any]],
        fn: Callable,
        workers: int = 1,
        threads_per_worker: int = 1,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Run every unfinished cell (in ``workers`` processes when > 1) and return all results in order.

        ``fn`` must be a module-level function (picklable). Finished cells are only loaded.
        """
        todo = [c for c in _unique(configs) if not self.done(c)]
        t0 = time.time()
        if todo:
            if progress:
                print(
                    f"{len(configs) - len(todo)} of {len(configs)} cells already finished; running {len(todo)} "
                    f"with {min(workers, len(todo))} worker(s)",
                    flush=True,
                )
            if workers <= 1 or len(todo) == 1:
                for i, c in enumerate(todo):
                    self.run(c, fn)
                    if progress:
                        print(
                            f"  [{i + 1}/{len(todo)}] {config_key(c)} done ({time.time() - t0:.0f} s)",
                            flush=True,
                        )
            else:
                ctx = get_context("spawn")
                with ProcessPoolExecutor(
                    max_workers=min(workers, len(todo)),
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(threads_per_worker,),
                ) as pool:
                    futures = [pool.submit(_run_one, str(self.root), c, fn) for c in todo]
                    for i, fut in enumerate(futures):
                        fut.result()
                        if progress:
                            print(
                                f"  [{i + 1}/{len(todo)}] {config_key(todo[i])} done ({time.time() - t0:.0f} s)",
                                flush=True,
                            )
        return [self.load(c) for c in configs]


def _unique(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for c in configs:
        k = config_key(c)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _run_one(root: str, config: dict[str, Any], fn: Callable) -> str:
    RunStore(root).run(config, fn)
    return config_key(config)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
