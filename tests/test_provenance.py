"""Provenance of results: what each run-store cell and each executed notebook records, the chapters'
provenance line, stale cells reported instead of silently reused, and experiment code versions that a
code change forces up."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nbhelpers
from nbhelpers import provenance, runs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = [p for p in sorted((ROOT / "notebooks").glob("*.ipynb")) if p.stem != "summary"]
FIELDS = {"nbhelpers", "commit", "dirty", "torch", "device", "python", "host", "created"}


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# What a result records


def test_collect_names_versions_commit_device_and_time():
    info = provenance.collect(wall_seconds=1.23456)
    assert FIELDS <= set(info) and info["wall_seconds"] == 1.235
    assert info["nbhelpers"] == nbhelpers.__version__
    assert info["torch"].split("+")[0] == __import__("torch").__version__.split("+")[0]
    assert info["device"] == str(__import__("nbhelpers.devices").devices.default_device())
    if (ROOT / ".git").exists():  # a checkout (a worktree has a .git file)
        assert len(info["commit"]) == 40 and isinstance(info["dirty"], bool)


def test_git_info_of_a_checkout_and_without_one(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "nbhelpers").mkdir(parents=True)
    (repo / "nbhelpers" / "x.py").write_text("a = 1\n")
    (repo / "book").mkdir()
    (repo / "book" / "chapter.ipynb").write_text("{}")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "x")
    provenance._git_info.cache_clear()
    info = provenance.git_info(repo)
    assert len(info["commit"]) == 40 and info["dirty"] is False
    (repo / "book" / "chapter.ipynb").write_text('{"executed": 1}')  # the book tool writes these
    provenance._git_info.cache_clear()
    assert provenance.git_info(repo)["dirty"] is False
    (repo / "nbhelpers" / "x.py").write_text("a = 2\n")
    provenance._git_info.cache_clear()
    assert provenance.git_info(repo)["dirty"] is True
    assert provenance.git_info(tmp_path / "elsewhere") == {"commit": None, "dirty": None}  # no repository
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no git binary at all
    provenance._git_info.cache_clear()
    try:
        assert provenance.git_info(repo) == {"commit": None, "dirty": None}
        assert provenance.collect()["commit"] is None
    finally:
        provenance._git_info.cache_clear()


def _slow_cell(config, staging):
    time.sleep(0.05)
    return {"n": config["n"]}, None


def test_every_cell_records_its_provenance_and_wall_time(tmp_path):
    store = runs.RunStore(tmp_path / "runs")
    result = store.run({"kind": "p", "n": 1}, _slow_cell)
    record = result["provenance"]
    assert FIELDS <= set(record) and record["wall_seconds"] >= 0.05
    assert record["code"] is None  # not a cell of nbhelpers.experiments: no code version
    on_disk = json.loads((store.path({"kind": "p", "n": 1}) / "provenance.json").read_text())
    assert on_disk == record


def _fake_regimes_cell(config, staging):
    return {"n": config["n"]}, None


def test_a_cell_of_other_code_is_reported_not_silently_reused(tmp_path, monkeypatch):
    from nbhelpers.experiments import regimes

    monkeypatch.setattr(_fake_regimes_cell, "__module__", regimes.__name__)  # as if regimes made it
    assert provenance.code_version(_fake_regimes_cell)["version"] == regimes.VERSION
    store = runs.RunStore(tmp_path / "runs")
    cfgs = [{"kind": "p", "n": n} for n in range(3)]
    store.run_grid(cfgs, _fake_regimes_cell, progress=False)
    with warnings_as_errors():
        store.run_grid(cfgs, _fake_regimes_cell, progress=False)  # same code: no report
    edit = lambda n, change: _edit_provenance(store.path(cfgs[n]), change)
    edit(0, lambda r: r["code"].update(version=regimes.VERSION - 1))
    edit(1, lambda r: r.update(nbhelpers="0.0.1"))
    (store.path(cfgs[2]) / "provenance.json").unlink()  # stored before provenance was recorded
    with pytest.warns(runs.StaleCellWarning) as caught:
        again = store.run_grid(cfgs, _fake_regimes_cell, progress=False)
    message = str(caught[0].message)
    assert "3 of 3 stored cells come from other code and are reused" in message
    assert f"VERSION {regimes.VERSION - 1} (running {regimes.VERSION})" in message
    assert (
        f"nbhelpers 0.0.1 (running {nbhelpers.__version__})" in message and "without a provenance" in message
    )
    assert [r["n"] for r in again] == [0, 1, 2]
    with pytest.raises(runs.StaleCellError, match="refused"):
        store.run_grid(cfgs, _fake_regimes_cell, progress=False, on_mismatch="error")
    with pytest.raises(ValueError, match="on_mismatch"):
        store.run_grid(cfgs, _fake_regimes_cell, on_mismatch="ignore")


def _edit_provenance(folder: Path, change) -> None:
    record = json.loads((folder / "provenance.json").read_text())
    change(record)
    (folder / "provenance.json").write_text(json.dumps(record))


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", runs.StaleCellWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_a_new_code_version_gets_new_cells_and_the_old_ones_are_noted(tmp_path, capsys):
    store = runs.RunStore(tmp_path / "runs")
    old = store.run_grid([{"kind": "p", "n": 1, "version": 1}], _slow_cell)
    capsys.readouterr()
    new = store.run_grid([{"kind": "p", "n": 1, "version": 2}], _slow_cell)
    lines = capsys.readouterr().out.splitlines()
    assert "(1 cells of older code versions are stored and not reused)" in lines[0]
    assert lines[-1].startswith("1 cells: 0 loaded, 1 computed")
    assert old[0]["dir"] != new[0]["dir"]


# ----------------------------------------------------------------------------------------------
# Code versions of the experiments


def test_experiment_code_matches_the_hash_recorded_for_its_version():
    """Fails when an experiment's code changed without a VERSION bump (stored cells would be reused)."""
    tool = _tool("experiment_versions")
    current = provenance.experiment_hashes()
    assert current, "no experiment module with a VERSION found"
    problems = tool.problems(tool.load(), current, provenance.EXPERIMENTS_DIR)
    assert not problems, "\n".join(problems)


def test_every_module_with_cell_functions_has_a_version():
    import ast

    for path in sorted(provenance.EXPERIMENTS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        cells = [f.name for f in tree.body if isinstance(f, ast.FunctionDef)
                 and [a.arg for a in f.args.args][:2] == ["config", "staging"]]  # fmt: skip
        if cells:
            assert provenance.experiment_modules()[path.stem] is not None, (
                f"{path.name}: cells {cells}, no VERSION"
            )


def _package(folder: Path, exp: str, cells: str, other: str = "def g():\n    return 0\n") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "exp.py").write_text(exp)
    (folder / "cells.py").write_text(cells)
    (folder / "other.py").write_text(other)
    return folder


EXP = '''"""An experiment."""
from .cells import f

VERSION = 3


def run_cell(config, staging):
    """Docstring."""
    return f(config["n"]), None  # a comment
'''


def test_code_hash_follows_the_code_and_its_imports_not_docstrings_or_layout(tmp_path):
    pkg = _package(tmp_path / "p", EXP, "def f(n):\n    return n + 1\n")
    base = provenance.code_hash("exp", pkg)
    assert provenance.experiment_modules(pkg) == {"cells": None, "exp": 3, "other": None}
    assert provenance.code_modules("exp", pkg) == {"exp", "cells"}
    layout = EXP.replace('"""Docstring."""', '"""Another docstring."""').replace("# a comment", "")
    layout = layout.replace("return f(", "return (f(").replace("), None", ")), None")
    _package(pkg, layout, "def f(n):\n    return n + 1\n", "def g():\n    return 1\n")
    assert provenance.code_hash("exp", pkg) == base  # docstrings, comments, brackets, an unused module
    _package(pkg, EXP, '"""Shared code."""\n\n\ndef f(n):\n    return n + 2\n')
    assert provenance.code_hash("exp", pkg) != base  # the shared module's code counts
    _package(pkg, EXP.replace('config["n"]', 'config["m"]'), "def f(n):\n    return n + 1\n")
    assert provenance.code_hash("exp", pkg) != base
    (pkg / "exp.py").write_text(EXP.replace("VERSION = 3", "VERSION = cells.VERSION"))
    with pytest.raises(ValueError, match="integer literal"):
        provenance.experiment_modules(pkg)


def test_version_tool_says_what_to_do(tmp_path):
    tool = _tool("experiment_versions")
    pkg = _package(tmp_path / "experiments", EXP, "def f(n):\n    return n + 1\n")
    recorded = tool.updated({}, provenance.experiment_hashes(pkg))
    assert tool.problems(recorded, provenance.experiment_hashes(pkg), pkg) == []
    _package(pkg, EXP, "def f(n):\n    return n * 2\n")
    (problem,) = tool.problems(recorded, provenance.experiment_hashes(pkg), pkg)
    assert problem == (
        "code of experiments/exp.py (or of what it imports: cells.py) changed since VERSION 3 was recorded: "
        "bump VERSION, or run `python tools/experiment_versions.py --update` if results cannot change"
    )
    (pkg / "exp.py").write_text(EXP.replace("VERSION = 3", "VERSION = 4"))
    (problem,) = tool.problems(recorded, provenance.experiment_hashes(pkg), pkg)
    assert "VERSION 4 has no recorded code hash" in problem
    recorded = tool.updated(recorded, provenance.experiment_hashes(pkg))
    assert list(recorded["exp"]) == ["3", "4"]  # the history stays
    (pkg / "exp.py").write_text(EXP.replace("VERSION = 3", "VERSION = 2"))
    (problem,) = tool.problems(recorded, provenance.experiment_hashes(pkg), pkg)
    assert "versions only go up" in problem


# ----------------------------------------------------------------------------------------------
# Chapters and executed notebooks


def test_provenance_line_names_profile_versions_commit_device_and_wall_time(monkeypatch):
    info = {
        "nbhelpers": "0.1.0",
        "commit": "0123456789abcdef",
        "dirty": True,
        "torch": "2.13.0",
        "device": "cpu",
    }
    monkeypatch.setattr(provenance, "_CELLS", {})
    text = provenance.line("companion", time.time() - 125, info)
    assert text == ("Provenance: profile companion · nbhelpers 0.1.0 · commit 0123456789 (dirty tree) · "
                    "torch 2.13.0 · cpu · wall time 2 min 5 s")  # fmt: skip
    cell = {"wall_seconds": 3600, "device": "cuda:0 (NVIDIA H200)", "commit": "abc"}
    provenance.note_cells({"runs/a": cell, "runs/b": None})
    provenance.note_cells({"runs/a": cell})  # loaded again: counted once
    cells = ". Grid cells: 2, 1 h 0 min of compute on cuda:0 (NVIDIA H200), commit abc, 1 without provenance"
    assert text + cells == provenance.line("companion", time.time() - 125, info)
    monkeypatch.setattr(provenance, "_CELLS", {})  # a store filled by one run: every cell knows its time
    provenance.note_cells(
        {
            "runs/c": {**cell, "created": "2026-12-01T10:00:00+00:00", "wall_seconds": 600},
            "runs/e": {**cell, "created": "2026-12-01T10:01:00+00:00", "wall_seconds": 300},
            "runs/d": {**cell, "created": "2026-12-01T10:30:00+00:00", "wall_seconds": 60},
        }
    )
    line = provenance.line("companion", time.time() - 125, info)  # 9:50-10:01 and 10:29-10:30: not the pause
    assert "filled in 12 min" in line and "while any of its cells computed" in line, line
    assert "commit unknown" in provenance.line("ci", None, {**info, "commit": None})
    clean, dirty = {"commit": "abcdef012345", "dirty": False}, {"commit": "abcdef012345", "dirty": True}
    assert ", commit abcdef0123 (1 of 3 cells from a dirty tree)" in provenance.cells_digest(
        [clean, clean, dirty]
    )
    assert ", commit abcdef0123 (dirty tree)" in provenance.cells_digest([dirty])
    assert ", 2 commits (1 of 2" in provenance.cells_digest([dirty, {"commit": "f" * 12, "dirty": False}])
    assert 0 < provenance.process_seconds() < 1e6


def test_show_displays_the_line_with_the_record_in_its_metadata(monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, metadata=None: shown.append((obj, metadata)))
    provenance.show("ci")
    ((obj, metadata),) = shown
    assert obj.data.startswith("*Provenance: profile ci · nbhelpers ")
    assert FIELDS | {"profile", "wall_seconds"} <= set(metadata["nbhelpers_provenance"])


def test_figure_notebooks_end_with_an_output_free_provenance_cell():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        last = cells[-1]
        assert last["cell_type"] == "code" and "provenance.show(P.profile)" in "".join(last["source"]), (
            path.name
        )
        assert "remove-input" in last["metadata"].get("tags", [])
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code"), (
            f"{path.name} has outputs"
        )


def test_executed_notebooks_record_provenance_in_their_metadata():
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    build_book = _tool("build_book")
    record = {"nbhelpers": "0.1.0", "commit": "c0ffee", "device": "cuda:0 (NVIDIA H200)"}
    shown = new_output("display_data", data={"text/markdown": "*Provenance…*"},
                       metadata={"nbhelpers_provenance": record})  # fmt: skip
    nb = new_notebook(
        cells=[new_code_cell("x = 1"), new_code_cell("provenance.show(P.profile)", outputs=[shown])]
    )
    nb = build_book.tidy_notebook(nb, "paper")
    build_book.record_provenance(nb, "paper", 3600.04)
    assert nb.metadata["nbhelpers"] == {"profile": "paper", "wall_seconds": 3600.0, "provenance": record}
    plain = build_book.record_provenance(nbformat.v4.new_notebook(cells=[new_code_cell("1")]), "ci", 2.0)
    tool = plain.metadata["nbhelpers"]["provenance"]
    assert tool["nbhelpers"] == nbhelpers.__version__ and "device" not in tool  # the tool cannot know it
