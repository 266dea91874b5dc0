"""Every notebook: a literal ``parameters`` cell that knows every profile key; papermill's values win.

The ``ci`` run of every notebook is ``NBHELPERS_PROFILE=ci pytest --nbmake notebooks/`` (``make test``),
which fails on any error output; the ``smoke`` runs are in test_smoke.py.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import yaml

from nbhelpers import profiles

NOTEBOOKS = sorted((profiles.repo_root() / "notebooks").glob("*.ipynb"))


def _ids(paths):
    return [p.stem for p in paths]


def _parameters_source(path) -> str:
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected exactly one cell tagged 'parameters', found {len(cells)}"
    src = cells[0]["source"]
    return "".join(src) if isinstance(src, list) else src


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/*.ipynb found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_parameters_cell_is_literal_and_covers_every_profile(path):
    src = _parameters_source(path)
    for node in ast.parse(src).body:
        assert isinstance(node, ast.Assign), f"{path.name}: only assignments belong in the parameters cell"
        ast.literal_eval(node.value)  # raises on anything but a literal
    defaults = profiles.notebook_defaults(path)
    assert "profile" in defaults, f"{path.name}: needs a 'profile' parameter"
    # papermill must see every parameter too (it cannot parse a line whose comment holds '='); a line it
    # misses is still injected, but with an 'Unable to parse' warning and no entry in --help-notebook.
    from papermill.translators import PythonTranslator

    seen = {p.name for p in PythonTranslator.inspect({"source": src})}
    assert seen == set(defaults), f"{path.name}: papermill does not parse {sorted(set(defaults) - seen)}"
    for profile in ("ci", "smoke", "paper"):
        file = profiles.repo_root() / "params" / profile / f"{path.stem}.yaml"
        if file.exists():
            overrides = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            unknown = sorted(set(overrides) - set(defaults))
            assert not unknown, f"{file}: keys missing from the notebook's parameters cell: {unknown}"


@pytest.mark.notebook
@pytest.mark.slow
def test_papermill_values_win_even_when_equal_to_the_defaults(tmp_path):
    """``-p profile paper -y 'widths: <companion default>'`` runs those widths, not the paper YAML's
    [64, 128, 256]; ``-p workers 2`` likewise beats the YAML's 1. A dry run prints what it resolved."""
    widths = profiles.notebook_defaults("regimes")["widths"]
    assert widths != profiles.load_profile("regimes", "paper")["widths"]
    out = tmp_path / "regimes.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(profiles.notebook_path("regimes")), str(out),
           "-k", "python3", "--cwd", str(tmp_path), "--no-progress-bar", "-p", "profile", "paper",
           "-p", "dry_run", "True",
           "-y", f"train_seeds: [0, 1]\nwidths: {widths}", "-p", "workers", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = json.loads(out.read_text(encoding="utf-8"))
    text = "".join(
        "".join(o.get("text", ""))
        for c in nb["cells"]
        for o in c.get("outputs", [])
        if o.get("name") == "stdout"
    )
    assert f"widths {widths}, training seeds [0, 1]" in text, text
    assert "profile: paper; injected: dry_run, train_seeds, widths, workers" in text, text
