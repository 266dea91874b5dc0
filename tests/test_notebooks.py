"""Every notebook: a literal ``parameters`` cell that knows every profile key, and a clean ``ci`` run."""

from __future__ import annotations

import ast
import json

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
    for profile in ("ci", "paper"):
        file = profiles.repo_root() / "params" / profile / f"{path.stem}.yaml"
        if file.exists():
            overrides = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            unknown = sorted(set(overrides) - set(defaults))
            assert not unknown, f"{file}: keys missing from the notebook's parameters cell: {unknown}"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_with_the_ci_profile(path, tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / path.name
    papermill.execute_notebook(
        str(path), str(out), kernel_name="python3", cwd=str(profiles.repo_root()), progress_bar=False,
        parameters={"profile": "ci", "runs_dir": str(tmp_path / "runs")},
    )  # fmt: skip
    nb = json.loads(out.read_text(encoding="utf-8"))
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
