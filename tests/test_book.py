"""Tests of the book tooling: notebook execution and tidying, the offline HTML build, the browser check,
and the results summary notebook. The HTML build runs in a temporary copy of the book's files with
small notebooks executed by the test, so it never touches book/ and never needs the real notebooks."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ["regimes", "optimal_denoiser", "model_similarity", "jacobian_rank", "molrg_phase_transition"]
MATHJAX_CACHE = ROOT / ".cache" / "mathjax" / "package"
WIDE_PARAMETER = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16],
                  "dropout": 0.13, "augment_dim": 9, "embedding_type": "positional",
                  "encoder_type": "standard"}  # fmt: skip


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_book_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_book = _load_tool("build_book")
check_book = _load_tool("check_book")


def _notebook(cells, **metadata) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata.update(
        kernelspec={"display_name": "Python 3", "language": "python", "name": "python3"},
        language_info={"name": "python", "pygments_lexer": "ipython3"},
        **metadata,
    )
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    return nb


def tiny_figure_notebook(title: str, write_results: bool = True) -> nbformat.NotebookNode:
    """A figure notebook in miniature: parameters, maths, a PNG figure, a progress bar, a widget, results."""
    results = (
        f"if results_json and {write_results}:\n"
        "    Path(results_json).parent.mkdir(parents=True, exist_ok=True)\n"
        "    rows = [{'quantity': 'GL at N=8', 'setting': 'width 16', 'measured': 0.05, 'paper': 0.0,\n"
        "             'check': '<= 0.1', 'passed': True, 'note': 'MoLRG'},\n"
        "            {'quantity': 'RP at N=1024', 'setting': '16 vs 64', 'measured': 0.52, 'paper': 0.67,\n"
        "             'check': '>= 0.6', 'passed': False, 'note': ''}]\n"
        f"    Path(results_json).write_text(json.dumps({{'notebook': {title!r}, 'profile': profile,\n"
        "        'created': '2024-01-01T00:00:00', 'rows': rows}))\n"
    )
    return _notebook(
        [
            new_markdown_cell(
                f"# {title}\n\nThe rank ratio is $r/n$ and\n\n$$D(x;\\sigma) = \\mathbb{{E}}[x_0 \\mid x].$$"
            ),
            new_code_cell(
                "profile = 'companion'\nresults_json = None\nPARAM_MARKER = 'default'\n"
                f"network = {WIDE_PARAMETER!r}  # a parameter line longer than the column is wide",
                metadata={"tags": ["parameters"]},
            ),
            new_code_cell(
                "import json, sys\nfrom pathlib import Path\nimport matplotlib\nmatplotlib.use('Agg')\n"
                "import matplotlib.pyplot as plt\nfrom IPython.display import display\n"
                "sys.stderr.write('\\r 1' + '0%|#   |\\r 50%|##  |\\r100%|####|\\n')\n"
                "display({'application/vnd.jupyter.widget-view+json': {'model_id': 'x', 'version_major': 2,\n"
                "         'version_minor': 0}, 'text/plain': 'HB' + 'ox(children=())'}, raw=True)\n"
                "print('marker', PARAM_MARKER)"
            ),
            new_code_cell(
                "from IPython.display import Image\nimport io\nfig, ax = plt.subplots(figsize=(3, 2))\n"
                "ax.plot([1, 2, 3], [1, 4, 9])\nbuf = io.BytesIO()\nfig.savefig(buf, format='png', dpi=50)\n"
                "plt.close(fig)\nImage(buf.getvalue())"
            ),
            new_code_cell(results),
        ]
    )


def make_book_tree(dest: Path) -> Path:
    """A copy of the book's own files, with tiny figure notebooks in notebooks/."""
    for rel in [
        "_config.yml",
        "_toc.yml",
        "tools/build_book.py",
        "tools/check_book.py",
        "notebooks/summary.ipynb",
    ]:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    (dest / "book" / "_static").mkdir(parents=True, exist_ok=True)
    for src in (ROOT / "book").iterdir():
        if src.suffix in (".md", ".bib"):
            shutil.copy2(src, dest / "book" / src.name)
    for src in (ROOT / "book" / "_static").glob("*.css"):
        shutil.copy2(src, dest / "book" / "_static" / src.name)
    for name in CHAPTERS:
        nb = tiny_figure_notebook(name.replace("_", " ").capitalize(), name != "molrg_phase_transition")
        nbformat.write(nb, dest / "notebooks" / f"{name}.ipynb")
    (dest / "params" / "ci").mkdir(parents=True)
    (dest / "params" / "ci" / "regimes.yaml").write_text("PARAM_MARKER: from-yaml\n")
    return dest


# ----------------------------------------------------------------------------------------------
# Fast unit tests


def test_tidy_notebook_hides_injected_cell_and_strips_noise():
    nb = _notebook(
        [
            new_code_cell("a = 1", metadata={"tags": ["parameters"]}),
            new_code_cell(
                "a = 2", metadata={"tags": ["injected-parameters"], "papermill": {"duration": 1.0}}
            ),
            new_code_cell(
                "x",
                metadata={"execution": {"iopub.execute_input": "t"}},
                outputs=[
                    new_output("stream", name="stderr", text="\r 10%|#  |\r 90%|## "),
                    new_output("stream", name="stderr", text="\r100%|###|\nwarning: kept\n"),
                    new_output("display_data", data={"image/png": "iVBORw0KGgo=", "image/svg+xml": "<svg/>"}),
                    new_output(
                        "display_data",
                        data={
                            "application/vnd.jupyter.widget-view+json": {"model_id": "m"},
                            "text/plain": "HBox()",
                        },
                    ),  # fmt: skip
                    new_output("stream", name="stdout", text="\r\r"),
                ],
            ),
        ],
        papermill={"parameters": {"a": 2}},
        widgets={"application/vnd.jupyter.widget-state+json": {}},
    )
    build_book.tidy_notebook(nb, "ci")
    assert "papermill" not in nb.metadata and "widgets" not in nb.metadata
    assert nb.metadata["nbhelpers"] == {"profile": "ci"}
    assert nb.cells[0].metadata["tags"] == ["parameters"]
    assert nb.cells[1].metadata["tags"] == ["injected-parameters", "remove-cell"]
    assert "papermill" not in nb.cells[1].metadata and "execution" not in nb.cells[2].metadata
    outputs = nb.cells[2].outputs
    assert [o.output_type for o in outputs] == ["stream", "display_data"]
    assert outputs[0].text == "100%|###|\nwarning: kept\n"
    assert set(outputs[1].data) == {"image/png"}


def test_figure_notes_flag_heavy_and_vector_only_figures():
    big = base64.b64encode(b"\x89PNG" + bytes(2_000_000)).decode()
    nb = _notebook(
        [
            new_code_cell("a", outputs=[new_output("display_data", data={"image/png": big})]),
            new_code_cell("b", outputs=[new_output("display_data", data={"image/svg+xml": "<svg/>"})]),
            new_code_cell("c", outputs=[new_output("display_data", data={"image/png": "iVBORw0KGgo="})]),
        ]
    )
    notes = build_book.figure_notes(nb, "x.ipynb")
    assert len(notes) == 2 and "cell 0" in notes[0] and "kB" in notes[0] and "cell 1" in notes[1]


def test_find_notebooks_puts_summary_last_and_rejects_unknown(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in ["summary", "b", "a", ".hidden", "_private"]:
        nbformat.write(_notebook([]), tmp_path / "notebooks" / f"{name}.ipynb")
    assert [p.stem for p in build_book.find_notebooks(tmp_path)] == ["a", "b", "summary"]
    assert [p.stem for p in build_book.find_notebooks(tmp_path, ["b.ipynb"])] == ["b", "summary"]
    assert [p.stem for p in build_book.find_notebooks(tmp_path, ["b"], with_summary=False)] == ["b"]
    with pytest.raises(build_book.BuildError, match="no such notebook.*zzz"):
        build_book.find_notebooks(tmp_path, ["zzz"])


def test_notebook_parameters_merge_yaml_profile_and_relative_results(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "params" / "paper").mkdir(parents=True)
    (tmp_path / "params" / "paper" / "regimes.yaml").write_text("widths: [64, 128]\nprofile: ignored\n")
    nb = tmp_path / "notebooks" / "regimes.ipynb"
    params = build_book.notebook_parameters(tmp_path, nb, "paper", tmp_path / "book")
    assert params == {"widths": [64, 128], "profile": "paper", "results_json": "../book/results/regimes.json"}
    summary = build_book.notebook_parameters(
        tmp_path, tmp_path / "notebooks" / "summary.ipynb", "ci", tmp_path / "out"
    )
    assert summary == {"profile": "ci", "results_dir": "../out/results"}
    (tmp_path / "params" / "paper" / "bad.yaml").write_text("- a list\n")
    with pytest.raises(build_book.BuildError, match="bad.yaml.*mapping"):
        build_book.load_profile_params(tmp_path, "paper", "bad")


def test_smoke_profile_parameters_name_the_asset_folder(tmp_path, monkeypatch):
    from nbhelpers import profiles, smoke

    assert build_book.PROFILES == profiles.PROFILES
    made = []
    monkeypatch.setattr(smoke, "ensure_assets", lambda folder=None: made.append(folder))
    monkeypatch.setenv(smoke.ENV_VAR, str(tmp_path / "assets"))
    params = build_book.notebook_parameters(
        ROOT, ROOT / "notebooks" / "regimes.ipynb", "smoke", tmp_path / "out"
    )
    assert made and params["profile"] == "smoke"
    assert params["teacher"] == str(tmp_path / "assets" / smoke.FILES["teacher"])


def test_toc_entries_and_prune():
    toc = {
        "format": "jb-book",
        "root": "book/intro",
        "parts": [
            {"caption": "A", "chapters": [{"file": "book/x"}]},
            {"caption": "B", "chapters": [{"file": "book/y"}, {"file": "book/z"}]},
        ],
    }
    assert build_book.toc_entries(toc) == ["book/intro", "book/x", "book/y", "book/z"]
    pruned = build_book.prune_toc(toc, {"book/x", "book/z"})
    assert pruned["parts"] == [{"caption": "B", "chapters": [{"file": "book/y"}]}]
    assert pruned["root"] == "book/intro"


def test_html_refuses_missing_chapters_with_their_names(tmp_path):
    make_book_tree(tmp_path)
    with pytest.raises(build_book.BuildError) as info:
        build_book.build_html(tmp_path)
    message = str(info.value)
    for name in [*CHAPTERS, "summary"]:
        assert f"book/{name}" in message
    assert "--allow-missing" in message and "execute --notebooks regimes" in message


def _fake_mathjax_tarball(path: Path, evil: bool = False) -> Path:
    src = path.parent / "fake-src" / "package"
    (src / "es5" / "output" / "chtml" / "fonts" / "woff-v2").mkdir(parents=True)
    (src / "es5" / "tex-chtml-full.js").write_text("/* fake */")
    (src / "es5" / "output" / "chtml" / "fonts" / "woff-v2" / "MathJax_Main-Regular.woff").write_bytes(
        b"wOF2"
    )
    (src / "LICENSE").write_text("Apache-2.0")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="package")
        if evil:
            tar.add(src / "LICENSE", arcname="../escape.txt")
    return path


def test_vendor_mathjax_from_tarball_and_refuses_traversal(tmp_path):
    root = tmp_path / "root"
    (root / "book").mkdir(parents=True)
    script = build_book.vendor_mathjax(root, _fake_mathjax_tarball(tmp_path / "mathjax-3.2.2.tgz"))
    dest = root / "book" / "_static" / "mathjax"
    assert script == dest / "tex-chtml-full.js" and script.read_text() == "/* fake */"
    assert (dest / "output" / "chtml" / "fonts" / "woff-v2" / "MathJax_Main-Regular.woff").is_file()
    assert (dest / ".gitignore").read_text().strip().endswith("*")
    evil_dir = tmp_path / "evil"
    evil_dir.mkdir()
    with pytest.raises(build_book.BuildError, match="suspicious"):
        build_book.vendor_mathjax(root, _fake_mathjax_tarball(evil_dir / "mathjax-3.2.2.tgz", evil=True))
    assert not (root / ".cache" / "escape.txt").exists()


def test_scan_static_finds_remote_assets_but_not_links(tmp_path):
    (tmp_path / "_static").mkdir()
    (tmp_path / "index.html").write_text(
        '<html><head><script src="_static/a.js"></script><link rel="stylesheet" href="https://cdn.example/x.css">'
        '<link rel="canonical" href="https://example.org/"></head><body><a href="https://arxiv.org">paper</a>'
        '<img src="//cdn.example/i.png"><img src="http://127.0.0.1:8000/local.png"></body></html>'
    )
    (tmp_path / "_static" / "t.css").write_text("@font-face { src: url(https://fonts.example/f.woff2); }")
    problems = check_book.scan_static(tmp_path)
    assert len(problems) == 3
    assert any("x.css" in p for p in problems) and any("i.png" in p for p in problems)
    assert any("t.css" in p for p in problems)


def test_remote_requests_ignores_browser_internals(tmp_path):
    log = tmp_path / "net.json"
    events = [
        {"params": {"initiator": "not an origin", "url": "https://update.googleapis.com/x"}},
        {"params": {"initiator": "http://127.0.0.1:1234", "url": "http://127.0.0.1:1234/_static/a.js"}},
        {"params": {"initiator": "http://127.0.0.1:1234", "url": "https://cdn.example/mathjax.js"}},
    ]
    log.write_text(json.dumps({"constants": {}, "events": events}))
    assert check_book.remote_requests(log) == ["https://cdn.example/mathjax.js"]
    # A log that Chromium did not close properly is still read line by line.
    log.write_text('{"constants": {},\n"events": [\n' + ",\n".join(json.dumps(e) for e in events) + ",\n")
    assert check_book.remote_requests(log) == ["https://cdn.example/mathjax.js"]


# ----------------------------------------------------------------------------------------------
# Notebook execution (a kernel per notebook: a few seconds each)


def _write_results(folder: Path, name: str, rows: list[dict], profile: str = "companion") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"notebook": name, "profile": profile, "created": "2024-01-01T00:00:00", "rows": rows}
    (folder / f"{name}.json").write_text(json.dumps(data))


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


@pytest.mark.slow
def test_summary_notebook_reports_rows_missing_and_broken_files(tmp_path):
    import papermill

    results = tmp_path / "results"
    row = {"quantity": "GL at N=64", "setting": "UNet-64", "measured": 0.123456, "paper": None,
           "check": "<= 0.1", "passed": False, "kind": "phenomenon", "margin": -1.5,
           "note": "small"}  # fmt: skip
    sanity = {**row, "quantity": "copy criterion: held-out samples flagged", "kind": "sanity", "margin": None}
    _write_results(
        results, "regimes",
        [row, {**row, "quantity": "GL at N=1024", "passed": True, "paper": 0.99, "margin": 2.0}, sanity],
    )  # fmt: skip
    _write_results(results, "jacobian_rank", [{**row, "quantity": "rank ratio", "kind": None}], profile="ci")
    (results / "model_similarity.json").write_text("{not json")
    out = tmp_path / "summary.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "summary.ipynb"), str(out), parameters={"results_dir": str(results)},
        kernel_name="python3", progress_bar=False, cwd=str(ROOT / "notebooks"),
    )  # fmt: skip
    text = _outputs_text(nbformat.read(out, as_version=4))
    assert "GL at N=1024" in text and "rank ratio" in text and "0.123" in text
    assert "FAIL" in text and "not shown" in text and "(-1.5 se)" in text
    assert "Sanity checks: 0 of 1 pass, 1 FAIL." in text
    assert (
        "Phenomenon checks: 1 of 2 shown, 1 not shown." in text
        and "Unclassified checks: 0 of 1 passed" in text
    )
    for name in ["optimal_denoiser", "molrg_phase_transition"]:
        assert f"**{name}**: no results file" in text
    assert "**model_similarity**" in text and "cannot be read" in text
    assert "holds results of the `ci` profile" in text
    # A fresh clone: no results folder at all.
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "summary.ipynb"), str(out),
        parameters={"results_dir": str(tmp_path / "none")}, kernel_name="python3", progress_bar=False,
        cwd=str(ROOT / "notebooks"),
    )  # fmt: skip
    text = _outputs_text(nbformat.read(out, as_version=4))
    assert "No results to show yet" in text and text.count(": no results file") == 5


@pytest.mark.slow
def test_execute_reports_the_failing_cell(tmp_path):
    (tmp_path / "notebooks").mkdir()
    nb = _notebook(
        [
            new_code_cell("profile = 'companion'", metadata={"tags": ["parameters"]}),
            new_code_cell("x = 1"),
            new_code_cell("raise ValueError('broken on purpose')"),
        ]
    )
    nbformat.write(nb, tmp_path / "notebooks" / "boom.ipynb")
    out = tmp_path / "out"
    with pytest.raises(build_book.BuildError) as info:
        build_book.execute_all(tmp_path, "ci", out, ["boom"])
    message = str(info.value)
    assert "boom.ipynb failed in cell 3" in message  # papermill's injected cell shifts the index by one
    assert "raise ValueError" in message and "broken on purpose" in message
    assert (out / "boom.failed.ipynb").is_file() and not (out / "boom.ipynb").exists()
    assert not list(out.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# The whole book: execute tiny notebooks, build the HTML with -W, check it in Chromium


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    if not (MATHJAX_CACHE / build_book.MATHJAX_SCRIPT).is_file():
        pytest.skip(
            f"MathJax is not cached in {MATHJAX_CACHE}: run `python tools/build_book.py html` once (uses npm)"
        )
    tree = make_book_tree(tmp_path_factory.mktemp("booktree"))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    tool = [sys.executable, str(tree / "tools" / "build_book.py")]
    subprocess.run([*tool, "execute", "--profile", "ci", "--workers", "2"], cwd=tree, env=env, check=True)
    proc = subprocess.run(
        [*tool, "html", "--mathjax", str(MATHJAX_CACHE), "--quiet"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tree


@pytest.mark.slow
def test_executed_notebooks_are_tidy(built_book):
    regimes = nbformat.read(built_book / "book" / "regimes.ipynb", as_version=4)
    injected = [c for c in regimes.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata["tags"]
    assert 'results_json = "../book/results/regimes.json"' in injected[0].source
    text = _outputs_text(regimes)
    assert "marker from-yaml" in text and "HBox" not in text and "\r" not in text
    assert any("image/png" in o.get("data", {}) for c in regimes.cells for o in c.get("outputs", []))
    assert not any("papermill" in c.metadata for c in regimes.cells)
    assert json.loads((built_book / "book" / "results" / "regimes.json").read_text())["profile"] == "ci"


@pytest.mark.slow
def test_html_is_offline_and_hides_injected_parameters(built_book):
    html = built_book / "_build" / "html"
    assert (html / "_static" / "mathjax" / "tex-chtml-full.js").stat().st_size > 100_000
    assert list((html / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert check_book.scan_static(html) == []
    page = (html / "book" / "regimes.html").read_text()
    assert "mathjax/tex-chtml-full.js" in page and "cdn.jsdelivr" not in page
    assert "<span class=\"s1\">'default'</span>" in page  # the notebook's own parameters cell is shown ...
    assert page.count("from-yaml") == 1  # ... the injected one is not: only the printed output has the value
    assert "book/results/regimes.json" not in page
    assert "HBox" not in page and "10%|#" not in page  # widget and progress bar (stderr) are not rendered
    assert list((html / "_images").glob("*.png"))
    summary = (html / "book" / "summary.html").read_text()
    assert "GL at N=8" in summary and "regimes.json" not in summary.split("<table")[0].split("</pre>")[-1]
    assert "<strong>molrg_phase_transition</strong>: no results file" in summary
    assert summary.count(">pass<") == 4 and summary.count(">FAIL<") == 4


@pytest.mark.slow
def test_html_allow_missing_builds_without_absent_chapters(built_book, tmp_path):
    tree = tmp_path / "partial"
    shutil.copytree(built_book, tree, ignore=shutil.ignore_patterns("_build", "_static"))
    (tree / "book" / "model_similarity.ipynb").unlink()
    (tree / "book" / "jacobian_rank.ipynb").unlink()
    index = build_book.build_html(tree, allow_missing=True, mathjax=MATHJAX_CACHE, quiet=True)
    html = index.parent
    assert (html / "book" / "regimes.html").is_file()
    assert not (html / "book" / "model_similarity.html").exists()


@pytest.mark.slow
def test_chromium_renders_every_page(built_book, tmp_path):
    browser = check_book.find_browser(None)
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    html = built_book / "_build" / "html"
    # Pages with maths, a figure, the results table and the bibliography (every page costs a browser start).
    wanted = ["book/intro.html", "book/regimes.html", "book/summary.html", "book/references.html"]
    pages, failures = check_book.check_book(html, tmp_path / "shots", browser, patterns=wanted)
    assert failures == []
    assert sorted(p.relative_to(html).as_posix() for p in pages) == sorted(wanted)
    assert all((tmp_path / "shots" / f"book__{p.stem}.png").stat().st_size > 10_000 for p in pages)
    # The checker itself fails on a broken page ...
    page = (html / "book" / "regimes.html").read_text(encoding="utf-8")
    wide = (
        "<table><tr>"
        + "".join(f"<td>column{i:02d}_holding_a_long_value</td>" for i in range(12))
        + "</tr></table>"
    )
    (html / "book" / "wide.html").write_text(
        page.replace("</article>", wide + "</article>", 1), encoding="utf-8"
    )
    long_line = "<pre style='white-space: pre; overflow-x: auto'>" + "x = 1;" * 200 + "</pre>"
    (html / "book" / "scroll.html").write_text(page.replace("</article>", long_line + "</article>", 1))
    pages, failures = check_book.check_book(
        html, tmp_path / "shots3", browser, patterns=["book/wide.html", "book/scroll.html"]
    )
    assert len(pages) == 2, failures
    assert any(
        f.startswith("book/wide.html: overflows the content column") and "column00" in f for f in failures
    )
    assert any(
        f.startswith("book/scroll.html: overflows the content column") and "needs" in f for f in failures
    )
    # ... and on missing files.
    (html / "_images").rename(html / "_images_gone")
    pages, failures = check_book.check_book(
        html, tmp_path / "shots2", browser, patterns=["book/regimes.html"]
    )
    (html / "_images_gone").rename(html / "_images")
    assert any("does not exist" in f for f in failures) and any("404" in f for f in failures)
