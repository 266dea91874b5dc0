"""Provenance: which code, library versions and machine made a result, and how long it took.

:func:`collect` returns one small dict (nbhelpers version, git commit and whether the tree was dirty,
torch version, device, host, time); it is cheap (git is asked once per process) and works where git or
the repository is absent (commit and dirty are then ``None``). The run store writes it into every cell
(``provenance.json``), the book tool into every executed notebook's metadata, and :func:`show` prints
the provenance line at the end of each chapter.

:func:`code_hash` fingerprints an experiment module (its syntax tree without docstrings, comments or
formatting, together with the modules of ``nbhelpers.experiments`` it imports). A test compares these
hashes with ``tests/data/experiment_versions.json``, so that a change of a cell's code forces a new
``VERSION`` of its module, and with it new run-store keys.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
EXPERIMENTS_DIR = PACKAGE_DIR / "experiments"
EXPERIMENTS = "nbhelpers.experiments"
# Paths whose uncommitted changes make a tree "dirty": the code and settings that make results (the
# executed notebooks the book tool writes into book/ do not count).
CODE_PATHS = ("nbhelpers", "notebooks", "params", "tools", "pyproject.toml")
_IMPORTED = time.time()


# ----------------------------------------------------------------------------------------------
# What made a result


def collect(device: Any = None, wall_seconds: float | None = None) -> dict[str, Any]:
    """Provenance of a result made now in this process: versions, commit, device, host, time.

    ``device`` is the device the result was computed on (default: the one ``devices.default_device``
    picks; ``"cpu"`` when torch was never imported, i.e. the result needed no torch).
    """
    info: dict[str, Any] = {"nbhelpers": __version__, **git_info(), "torch": _torch_version()}
    info["device"] = describe_device(device)
    info["python"] = platform.python_version()
    info["host"] = socket.gethostname()
    info["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if wall_seconds is not None:
        info["wall_seconds"] = round(float(wall_seconds), 3)
    return info


def git_info(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``root``.

    ``root`` defaults to the checkout this package was imported from; an installed package (no checkout
    around it, or one that is not this package's), a missing git binary or any git error gives ``None``s.
    Asked once per process and root: the code a process runs is the code it imported at its start.
    """
    return dict(_git_info(str(Path(root).resolve()) if root is not None else None))


@functools.lru_cache(maxsize=8)
def _git_info(root: str | None) -> tuple[tuple[str, Any], ...]:
    unknown = (("commit", None), ("dirty", None))
    folder = Path(root) if root is not None else PACKAGE_DIR.parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None:
        return unknown
    if root is None and not (Path(top) / "nbhelpers" / "__init__.py").is_file():
        return unknown  # an installed copy inside somebody else's repository
    if root is None and not os.path.samefile(Path(top) / "nbhelpers", PACKAGE_DIR):
        return unknown
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--", *CODE_PATHS)
    return (("commit", commit), ("dirty", None if status is None else bool(status.strip())))


def _git(folder: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _torch_version() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        return version("torch")
    except Exception:  # no distribution metadata (a source build on the path)
        return None


def describe_device(device: Any = None) -> str:
    """``"cpu"``, or e.g. ``"cuda:0 (NVIDIA H200)"``; without ``device``, the default device of
    :func:`nbhelpers.devices.default_device` when torch is loaded, else ``"cpu"``."""
    if "torch" not in sys.modules and device is None:
        return "cpu"
    import torch  # provenance stays torch-free until asked (tools import it)

    from .devices import default_device

    dev = default_device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


# ----------------------------------------------------------------------------------------------
# The provenance line of a chapter

_CELLS: dict[str, Mapping[str, Any]] = {}  # cell folder -> provenance, for the cells this process loaded


def note_cells(cells: Mapping[str, Mapping[str, Any] | None]) -> None:
    """Remember the provenance of the grid cells a notebook used, by cell folder (called by the run
    store; a cell loaded twice counts once)."""
    _CELLS.update({str(k): dict(v) if v is not None else {} for k, v in cells.items()})


def process_seconds() -> float:
    """Seconds since this process (a notebook's kernel) started; since this module's import elsewhere."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return max(0.0, time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time() - _IMPORTED


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 5 s"``, ``"2 h 7 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{max(seconds, 0):.0f} s" if seconds >= 1 else f"{max(seconds, 0):.1f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _commit_text(info: Mapping[str, Any]) -> str:
    commit = info.get("commit")
    if not commit:
        return "commit unknown"
    return f"commit {commit[:10]}" + (" (dirty tree)" if info.get("dirty") else "")


def line(profile: str, t0: float | None = None, info: Mapping[str, Any] | None = None) -> str:
    """One line: profile, nbhelpers version, commit (dirty?), torch, device, wall time since ``t0``
    (a ``time.time()``; default: the process start), and a digest of the grid cells loaded."""
    info = dict(info or collect())
    seconds = time.time() - t0 if t0 is not None else process_seconds()
    parts = [
        f"profile {profile or 'companion'}",
        f"nbhelpers {info.get('nbhelpers')}",
        _commit_text(info),
        f"torch {info.get('torch')}",
        str(info.get("device")),
        f"wall time {duration(seconds)}",
    ]
    text = "Provenance: " + " · ".join(parts)
    cells = cells_digest(_CELLS.values())
    return f"{text}. {cells}" if cells else text


def cells_digest(records: Iterable[Mapping[str, Any]]) -> str:
    """``"Grid cells: 28, 3 h 2 min of compute on cpu, commit 288e6ff5a1"`` for cell provenance records."""
    records = list(records)
    if not records:
        return ""
    known = [r for r in records if r]
    seconds = sum(float(r.get("wall_seconds") or 0) for r in known)
    devices = sorted({str(r.get("device")) for r in known})
    text = f"Grid cells: {len(records)}, {duration(seconds)} of compute"
    if devices:
        text += " on " + ", ".join(devices)
    if known:
        text += ", " + _commits_text(known)
    span = _fill_span(known)
    if span is not None:
        text += f", filled in {duration(span)} of wall time (while any of its cells computed)"
    if len(known) < len(records):
        text += f", {len(records) - len(known)} without provenance"
    return text


def _commits_text(records: Sequence[Mapping[str, Any]]) -> str:
    """The commits the cells were made at, and how many of them came from a dirty tree."""
    shas = {r.get("commit") or None for r in records}
    dirty = sum(bool(r.get("dirty")) for r in records)
    text = _commit_text({"commit": next(iter(shas))}) if len(shas) == 1 else f"{len(shas)} commits"
    if dirty == len(records):
        return text + " (dirty tree)"
    return text + (f" ({dirty} of {len(records)} cells from a dirty tree)" if dirty else "")


def _fill_span(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds of wall time during which at least one cell was computing: the union of the cells'
    [start, end] intervals (end ``created``, start ``created`` minus ``wall_seconds``), so that the
    pauses of an interrupted run do not count. For a store filled by one run: its from-scratch time."""
    spans = []
    for r in records:
        try:
            end = datetime.fromisoformat(str(r["created"])).timestamp()
        except (KeyError, TypeError, ValueError):
            return None
        spans.append((end - float(r.get("wall_seconds") or 0), end))
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total if spans else None


def show(profile: str, t0: float | None = None) -> None:
    """Display the provenance line (Markdown) in a notebook; the full record rides in the output's
    metadata (``nbhelpers_provenance``), where ``tools/build_book.py`` picks it up."""
    from IPython.display import Markdown, display  # only inside a notebook

    info = collect()
    seconds = process_seconds() if t0 is None else time.time() - t0
    text = line(profile, time.time() - seconds, info)
    record = {**info, "profile": profile, "wall_seconds": round(seconds, 1)}
    if _CELLS:
        record["cells"] = cells_digest(_CELLS.values())
    display(Markdown(f"*{text}*"), metadata={"nbhelpers_provenance": record})


# ----------------------------------------------------------------------------------------------
# The code version of an experiment's cells


def experiment_modules(folder: str | os.PathLike = EXPERIMENTS_DIR) -> dict[str, int | None]:
    """Module name -> its ``VERSION`` literal (``None`` for shared modules without one), for every
    module file in ``nbhelpers/experiments/``; read from the source, nothing is imported."""
    out = {}
    for path in sorted(Path(folder).glob("*.py")):
        out[path.stem] = _version_literal(ast.parse(path.read_text(encoding="utf-8"), str(path)), path)
    return out


def _version_literal(tree: ast.Module, path: Path) -> int | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets
        ):
            value = node.value
            if not (isinstance(value, ast.Constant) and type(value.value) is int):
                raise ValueError(f"{path}: VERSION must be an integer literal")
            return value.value
    return None


def code_hash(module: str, folder: str | os.PathLike = EXPERIMENTS_DIR) -> str:
    """Fingerprint of experiment module ``module`` (a stem such as ``"regimes"``) and of every module of
    the experiments package it imports, directly or not; blind to docstrings, comments and layout."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in sorted(code_modules(module, folder)):
        digest.update(f"{name}\n{_normal_dump(name, folder)}\n".encode())
    return digest.hexdigest()[:16]


def experiment_hashes(folder: str | os.PathLike = EXPERIMENTS_DIR) -> dict[str, tuple[int, str]]:
    """``{module: (VERSION, code_hash)}`` for every module of the experiments package with a VERSION."""
    return {m: (v, code_hash(m, folder)) for m, v in experiment_modules(folder).items() if v is not None}


def code_modules(module: str, folder: str | os.PathLike = EXPERIMENTS_DIR) -> set[str]:
    """``module`` and the modules of the experiments package it imports, directly or not: the code that
    counts as its cells' code."""
    folder = Path(folder)
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_local_imports(name, folder) - seen)
    return seen


def _local_imports(module: str, folder: Path) -> set[str]:
    """Stems of modules in ``folder`` (the experiments package) that ``module`` imports, anywhere in it."""
    tree = _parse(module, folder)
    local = {p.stem for p in folder.glob("*.py")}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                base = node.module.split(".")[0] if node.module else None
            elif node.level == 2 and node.module and _within(node.module, "experiments"):
                base = node.module.split(".")[1] if "." in node.module else None
            elif node.level == 0 and node.module and _within(node.module, EXPERIMENTS):
                rest = node.module[len(EXPERIMENTS) + 1 :]
                base = rest.split(".")[0] if rest else None
            else:
                continue
            names = [base] if base else [a.name for a in node.names]
            found.update(n for n in names if n in local)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(EXPERIMENTS + "."):
                    found.add(a.name[len(EXPERIMENTS) + 1 :].split(".")[0])
    return (found & local) - {module}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@functools.lru_cache(maxsize=64)
def _parse_text(text: str, path: str) -> ast.Module:
    return ast.parse(text, path)


def _parse(module: str, folder: Path) -> ast.Module:
    path = folder / f"{module}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment module")
    return _parse_text(path.read_text(encoding="utf-8"), str(path))


def _normal_dump(module: str, folder: Path) -> str:
    return repr(_normal(_parse(module, folder)))


_SKIP_FIELDS = {"ctx", "kind", "type_comment"}


def _normal(node: Any) -> Any:
    """A layout- and Python-version-stable form of a syntax tree: node names and non-empty fields,
    without docstrings (comments never reach the tree)."""
    if isinstance(node, ast.AST):
        fields = []
        for name, value in ast.iter_fields(node):
            if name in _SKIP_FIELDS or value is None or value == []:
                continue
            if name == "body" and isinstance(value, list):
                value = _without_docstring(node, value)
            fields.append((name, _normal(value)))
        return (type(node).__name__, tuple(fields))
    if isinstance(node, list):
        return tuple(_normal(v) for v in node)
    return node


def _without_docstring(node: ast.AST, body: list) -> list:
    docstring_owner = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    first = body[0] if body else None
    if (
        docstring_owner
        and isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return body[1:]
    return body


def code_version(fn: Callable) -> dict[str, Any] | None:
    """``{"module", "version", "hash"}`` of the experiment module defining cell function ``fn``, or
    ``None`` when ``fn`` does not come from ``nbhelpers.experiments`` (or its module has no VERSION)."""
    name = getattr(fn, "__module__", "") or ""
    module = sys.modules.get(name)
    if not name.startswith(EXPERIMENTS + ".") or module is None or getattr(module, "VERSION", None) is None:
        return None
    stem = name.rsplit(".", 1)[1]
    try:
        digest = code_hash(stem, Path(module.__file__).parent)
    except (OSError, SyntaxError, TypeError):
        digest = None
    return {"module": name, "version": module.VERSION, "hash": digest}
