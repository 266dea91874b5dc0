"""Atomic writes, the download cache, profiles, the run store and results files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from nbhelpers import atomic, download, profiles, results, runs


def test_atomic_write_leaves_no_partial_file(tmp_path):
    dest = tmp_path / "a" / "out.bin"
    atomic.atomic_write_bytes(dest, b"hello")
    assert dest.read_bytes() == b"hello"
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert dest.read_bytes() == b"hello"
    assert [p.name for p in dest.parent.iterdir()] == ["out.bin"]


def test_download_file_url_goes_to_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBHELPERS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00" * 100)
    url = src.as_uri()
    assert download.is_url(url) and not download.is_url(str(src))
    local = download.resolve(url)
    assert local.parent == tmp_path / "cache" and local.read_bytes() == src.read_bytes()
    src.unlink()  # cached copy keeps working
    assert download.resolve(url) == local


def test_download_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("NBHELPERS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        download.resolve(tmp_path / "missing.pkl")
    with pytest.raises(download.DownloadError, match="not in the cache"):
        download.resolve("https://example.invalid/x.pkl", download=False)
    with pytest.raises(download.DownloadError, match="could not download"):
        download.resolve("http://127.0.0.1:9/x.pkl", timeout=2)
    assert not list((tmp_path / "cache").glob("*x.pkl"))


def _notebook(path, source):
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {"tags": ["parameters"]},
                "source": source,
                "outputs": [],
                "execution_count": None,
            }
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params" / "ci").mkdir(parents=True)
    _notebook(
        tmp_path / "notebooks" / "demo.ipynb", 'profile = ""\nsizes = [8, 16, 32]\nsteps = 4000\nname = "x"\n'
    )
    (tmp_path / "params" / "ci" / "demo.yaml").write_text("sizes: [8]\nsteps: 10\n")
    monkeypatch.setenv("NBHELPERS_ROOT", str(tmp_path))
    monkeypatch.delenv(profiles.ENV_VAR, raising=False)
    return tmp_path


def test_profiles_precedence(fake_root, monkeypatch):
    defaults = profiles.notebook_defaults("demo")
    assert defaults == {"profile": "", "sizes": [8, 16, 32], "steps": 4000, "name": "x"}
    ns = dict(defaults)
    p = profiles.resolve("demo", ns, verbose=False)
    assert p.profile == "companion" and p.steps == 4000
    ns = dict(defaults, profile="ci")  # papermill -p profile ci
    assert profiles.resolve("demo", ns, verbose=False)["sizes"] == [8]
    ns = dict(defaults, profile="ci", steps=7)  # injected values beat the profile file
    p = profiles.resolve("demo", ns, verbose=False)
    assert (p.steps, p.sizes, ns["steps"]) == (7, [8], 7)
    monkeypatch.setenv(profiles.ENV_VAR, "ci")  # how nbmake selects a profile
    assert profiles.resolve("demo", dict(defaults), verbose=False).steps == 10


def test_injected_values_win_even_when_equal_to_the_defaults(fake_root, monkeypatch):
    """papermill's injected cell runs after the parameters cell; every name it assigns beats the YAML."""
    defaults = profiles.notebook_defaults("demo")
    src = 'profile = ""\nsizes = [8, 16, 32]\nsteps = 4000\nname = "x"\n'
    injected = '# Parameters\nprofile = "ci"\nsizes = [8, 16, 32]\n'
    history = ["", src, injected, 'P = profiles.resolve("demo", globals())']
    ns = dict(defaults, profile="ci", _ih=history)
    p = profiles.resolve("demo", ns, verbose=False)
    assert (p.sizes, p.steps) == ([8, 16, 32], 10)  # sizes injected (= default), steps from the YAML
    assert profiles.injected_names(ns, src, set(defaults)) == {"profile", "sizes"}
    # a later cell (interactive use) counts too; cells before the parameters cell do not
    history = ["", "steps = 4000", src, injected, "steps = 4000", "P = ..."]
    assert profiles.resolve("demo", dict(defaults, profile="ci", _ih=history), verbose=False).steps == 4000
    history = ["", "steps = 4000", src, injected, "P = ..."]
    assert profiles.resolve("demo", dict(defaults, profile="ci", _ih=history), verbose=False).steps == 10
    # an edited parameters cell (not the file's source) is recognised by assigning every parameter
    edited = src.replace("4000", "5")
    history = ["", edited, injected, "P = ..."]
    assert (
        profiles.resolve("demo", dict(defaults, profile="ci", steps=5, _ih=history), verbose=False).steps == 5
    )
    # no history (plain Python): values equal to the defaults cannot be told apart and yield to the YAML
    assert profiles.resolve("demo", dict(defaults, profile="ci"), verbose=False).sizes == [8]


def test_profiles_errors(fake_root):
    defaults = profiles.notebook_defaults("demo")
    with pytest.raises(FileNotFoundError, match="paper"):
        profiles.resolve("demo", dict(defaults, profile="paper"), verbose=False)
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.resolve("demo", dict(defaults, profile="huge"), verbose=False)
    (fake_root / "params" / "ci" / "demo.yaml").write_text("sizez: [8]\n")
    with pytest.raises(ValueError, match="unknown parameters.*sizez"):
        profiles.resolve("demo", dict(defaults, profile="ci"), verbose=False)
    _notebook(fake_root / "notebooks" / "bad.ipynb", "import os\nx = os.getcwd()\n")
    with pytest.raises(ValueError, match="must be a literal"):
        profiles.notebook_defaults("bad")


def _square_cell(config, staging):
    (staging / "note.txt").write_text("made")
    x = np.arange(config["n"]) ** 2
    return {"sum": int(x.sum())}, {"x": x}


def _failing_cell(config, staging):
    (staging / "partial.txt").write_text("half")
    raise RuntimeError("killed")


def test_run_store_skips_finished_and_is_atomic(tmp_path):
    store = runs.RunStore(tmp_path / "runs")
    cfg = {"kind": "sq", "n": 4}
    assert runs.config_key(cfg) == runs.config_key({"n": 4, "kind": "sq"})
    assert runs.config_key(cfg) != runs.config_key({"kind": "sq", "n": 5})
    with pytest.raises(RuntimeError):
        store.run(cfg, _failing_cell)
    assert not store.done(cfg) and not any(p.name.startswith(".tmp") for p in store.root.iterdir())
    r = store.run(cfg, _square_cell)
    assert r["sum"] == 14 and list(r["arrays"]["x"]) == [0, 1, 4, 9]
    assert (store.path(cfg) / "note.txt").read_text() == "made"
    assert store.run(cfg, _failing_cell)["sum"] == 14  # finished: fn is not called again


def test_run_grid_parallel_matches_serial(tmp_path):
    cfgs = [{"kind": "sq", "n": n} for n in (3, 5, 7, 3)]
    par = runs.RunStore(tmp_path / "a").run_grid(cfgs, _square_cell, workers=2, progress=False)
    ser = runs.RunStore(tmp_path / "b").run_grid(cfgs, _square_cell, workers=1, progress=False)
    assert [r["sum"] for r in par] == [r["sum"] for r in ser] == [5, 30, 91, 5]


def test_results_round_trip(tmp_path):
    rows = [
        results.row("GL at N=8", "width 16", np.float64(0.05), 0.0, "<= 0.1", True, kind="phenomenon"),
        results.row("RP", "16 vs 64", float("nan")),
    ]
    with pytest.raises(ValueError, match="needs a kind"):  # a check is either sanity or phenomenon
        results.row("GL at N=8", "width 16", 0.05, 0.0, "<= 0.1", True)
    path = results.write_results(tmp_path / "r" / "demo.json", "demo", "companion", rows)
    assert results.write_results("", "demo", "ci", rows) is None
    docs, problems = results.load_results(tmp_path / "r", ["demo", "absent"], profile="companion")
    assert list(docs) == ["demo"] and docs["demo"]["rows"][0]["measured"] == 0.05
    assert docs["demo"]["rows"][1]["measured"] == "nan"
    assert len(problems) == 1 and "**absent**: no results file" in problems[0]
    path.write_text("{not json")
    docs, problems = results.load_results(tmp_path / "r", ["demo"])
    assert docs == {} and "demo.json" in problems[0] and "cannot be read" in problems[0]
    assert os.path.exists(path)


def test_atomic_write_gives_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
