#!/usr/bin/env python
"""Execute the book's notebooks with papermill and build the offline HTML book.

Commands (run from anywhere; paths are relative to the repository root):

    python tools/build_book.py execute [--profile companion] [--notebooks regimes,summary] [--workers 2]
    python tools/build_book.py html [--allow-missing]
    python tools/build_book.py all [--profile companion]
    python tools/build_book.py batch --profile paper --out /scratch/paper-run

``execute`` runs ``notebooks/<name>.ipynb`` into ``<out>/<name>.ipynb`` (default ``book/``) with the
profile's parameters, then tidies the result for the book; ``html`` renders the stored executed
notebooks with Jupyter Book (no execution), with MathJax served from the book itself; ``all`` does
both; ``batch`` executes a profile into another folder without building HTML (for GPU nodes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("ci", "smoke", "companion", "paper")  # = nbhelpers.profiles.PROFILES
SUMMARY = "summary"
KERNEL = "python3"
MATHJAX_SPEC = "mathjax@3"
MATHJAX_SCRIPT = "es5/tex-chtml-full.js"
MATHJAX_FONTS = "es5/output/chtml/fonts/woff-v2"
WIDGET_MIMES = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
VECTOR_MIMES = ("image/svg+xml", "application/pdf")
PARTIAL_SUPPRESS = ("ref.doc", "myst.xref_missing")  # links to chapters left out by --allow-missing
NOISY_CELL_METADATA = ("papermill", "execution", "ExecuteTime", "collapsed", "scrolled")


class BuildError(RuntimeError):
    """A build step failed; the message says which file and what to do."""


# ----------------------------------------------------------------------------------------------
# Notebook execution


def find_notebooks(root: Path, names: list[str] | None = None, with_summary: bool = True) -> list[Path]:
    """Notebooks in ``root/notebooks`` to execute, the summary notebook last.

    ``names`` selects notebooks by stem (``regimes`` or ``regimes.ipynb``); the summary is appended
    whenever it exists and ``with_summary`` is true, so the results table never lags behind.
    """
    folder = root / "notebooks"
    available = {p.stem: p for p in sorted(folder.glob("*.ipynb")) if not p.name.startswith((".", "_"))}
    if names:
        stems = [Path(n.strip()).stem for n in names if n.strip()]
        unknown = [s for s in stems if s not in available]
        if unknown:
            raise BuildError(
                f"no such notebook in {folder}: {', '.join(unknown)} (available: "
                f"{', '.join(available) or 'none'})"
            )
    else:
        stems = list(available)
    if with_summary and SUMMARY in available and SUMMARY not in stems:
        stems.append(SUMMARY)
    stems = list(dict.fromkeys(stems))
    if not with_summary:
        stems = [s for s in stems if s != SUMMARY]
    stems.sort(key=lambda s: s == SUMMARY)
    return [available[s] for s in stems]


def load_profile_params(root: Path, profile: str, stem: str) -> dict:
    """Parameters of ``params/<profile>/<stem>.yaml`` (empty when the file does not exist)."""
    import yaml

    path = root / "params" / profile / f"{stem}.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise BuildError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BuildError(
            f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}"
        )
    if profile == "smoke":  # its inputs live in the asset folder, which nbhelpers.smoke fills
        from nbhelpers import profiles, smoke

        smoke.ensure_assets()
        data = profiles.expand_smoke_assets(data)
    return data


def notebook_parameters(root: Path, nb: Path, profile: str, out: Path) -> dict:
    """Papermill parameters for one notebook: the profile's YAML, the profile, and the results paths.

    Paths are relative to the notebook's folder (the kernel's working directory), so the
    injected-parameters cell stays portable.
    """
    params = load_profile_params(root, profile, nb.stem)
    params["profile"] = profile
    results = out.resolve() / "results"
    if nb.stem == SUMMARY:
        params["results_dir"] = os.path.relpath(results, nb.parent.resolve())
    else:
        params["results_json"] = os.path.relpath(results / f"{nb.stem}.json", nb.parent.resolve())
    return params


def _collapse_carriage_returns(text: str) -> str:
    """Keep what a terminal would show: for each line, the text after its last carriage return."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def tidy_notebook(nb, profile: str):
    """Make an executed notebook lean for the book (in place; returns it).

    Tags papermill's injected-parameters cell ``remove-cell`` (kept in the file, not rendered),
    drops papermill/nbclient timing metadata and widget state, drops widget outputs and vector
    duplicates of PNG figures, and collapses progress-bar carriage returns in streams.
    """
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["nbhelpers"] = {"profile": profile}
    for cell in nb.cells:
        for key in NOISY_CELL_METADATA:
            cell.metadata.pop(key, None)
        tags = list(cell.metadata.get("tags", []))
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                previous = outputs[-1] if outputs else None
                if (
                    previous
                    and previous.get("output_type") == "stream"
                    and previous.get("name") == out.get("name")
                ):
                    previous["text"] += out.get("text", "")
                else:
                    outputs.append(out)
                continue
            data = out.get("data")
            if data is not None:
                if any(m in data for m in WIDGET_MIMES):
                    continue  # a widget (e.g. a tqdm bar): its text fallback says nothing useful
                if "image/png" in data:
                    for mime in VECTOR_MIMES:
                        data.pop(mime, None)
                out.get("metadata", {}).pop("papermill", None)
            outputs.append(out)
        for out in outputs:
            if out.get("output_type") == "stream":
                out["text"] = _collapse_carriage_returns(out.get("text", ""))
        cell["outputs"] = [o for o in outputs if o.get("output_type") != "stream" or o["text"].strip()]
    return nb


def record_provenance(nb, profile: str, seconds: float):
    """Record what made an executed notebook in its metadata (in place; returns it): the profile, the
    wall time of the execution, and the provenance its last provenance cell displayed
    (``nbhelpers.provenance.show``: nbhelpers version, commit and dirty tree, torch, device, host), or
    this tool's own when the notebook has none (then without a device: the kernel chose it)."""
    record = None
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            record = out.get("metadata", {}).get("nbhelpers_provenance", record)
    if record is None:
        record = _tool_provenance()
    nb.metadata["nbhelpers"] = {
        **nb.metadata.get("nbhelpers", {}),
        "profile": profile,
        "wall_seconds": round(seconds, 1),
        "provenance": record,
    }
    return nb


def _tool_provenance() -> dict:
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # an installed nbhelpers still comes first
    try:
        from nbhelpers import provenance
    except ImportError:
        return {"nbhelpers": None}
    record = provenance.collect()
    record.pop("device", None)
    return record


def figure_notes(nb, name: str, max_png_bytes: int = 1_000_000) -> list[str]:
    """Warnings about figures that make the book heavy or that the book cannot show as PNG."""
    import base64

    notes = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            png = data.get("image/png")
            if png and len(base64.b64decode(png)) > max_png_bytes:
                notes.append(
                    f"{name}: cell {index} has a PNG over {max_png_bytes // 1000} kB (lower the dpi)"
                )
            if not png and any(m in data for m in VECTOR_MIMES):
                notes.append(f"{name}: cell {index} has a vector-only figure; the book expects PNG figures")
    return notes


def _locate_failure(path: Path) -> str:
    """Describe the cell that was running or raised in a partly executed notebook, if any."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception:  # the partial file may be unreadable; the caller has the exception itself
        return ""
    for index, cell in enumerate(nb.cells):
        status = cell.metadata.get("papermill", {}).get("status")
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if status == "running" or errors:
            first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
            what = f"{errors[0].get('ename')}: {errors[0].get('evalue')}" if errors else "still running"
            return f"cell {index} (starts with {first[:80]!r}): {what}"
    return ""


def execute_notebook(
    nb: Path,                   # source notebook, notebooks/<name>.ipynb
    out: Path,                  # folder that receives <name>.ipynb
    parameters: dict,           # papermill parameters
    profile: str,               # recorded in the notebook's metadata
    timeout: float | None,      # per-cell limit in seconds, None for no limit
    log_output: bool = False,   # echo the notebook's output while it runs
) -> Path:  # fmt: skip
    """Execute one notebook into ``out/<name>.ipynb`` atomically; raise BuildError naming the cell."""
    import nbformat
    import papermill

    nb, out = nb.resolve(), out.resolve()  # papermill saves partial output from inside the kernel's cwd
    out.mkdir(parents=True, exist_ok=True)
    dest = out / nb.name
    failed = out / f"{nb.stem}.failed.ipynb"
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{nb.stem}-", suffix=".ipynb", dir=out)
    os.close(fd)
    tmp = Path(tmp_name)
    start = time.monotonic()
    try:
        try:
            papermill.execute_notebook(
                str(nb),
                str(tmp),
                parameters=parameters,
                kernel_name=KERNEL,
                cwd=str(nb.parent),
                progress_bar=False,
                log_output=log_output,
                execution_timeout=timeout,
            )
        except papermill.PapermillExecutionError as exc:
            os.replace(tmp, failed)
            first = next((ln for ln in exc.source.splitlines() if ln.strip()), "")
            raise BuildError(
                f"{nb.name} failed in cell {exc.cell_index} (In "
                f"[{exc.exec_count}], starts with {first[:80]!r}): "
                f"{exc.ename}: {exc.evalue}\n    the partly executed notebook is {failed}"
            ) from None
        except Exception as exc:
            where = _locate_failure(tmp)
            if tmp.exists():
                os.replace(tmp, failed)
            raise BuildError(
                f"{nb.name} failed{' in ' + where if where else ''}: {type(exc).__name__}: {exc}"
                + (f"\n    the partly executed notebook is {failed}" if failed.exists() else "")
            ) from None
        executed = tidy_notebook(nbformat.read(tmp, as_version=4), profile)
        record_provenance(executed, profile, time.monotonic() - start)
        for note in figure_notes(executed, nb.name):
            print(f"note: {note}", flush=True)
        nbformat.write(executed, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 is not what a book file should have
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    if failed.exists():
        failed.unlink()
    return dest


def _execute_job(args: tuple) -> tuple[str, float, str | None]:
    """Worker entry point: returns (name, seconds, error message or None)."""
    nb, out, params, profile, timeout, log_output = args
    start = time.monotonic()
    try:
        execute_notebook(nb, out, params, profile, timeout, log_output)
    except BuildError as exc:
        return nb.stem, time.monotonic() - start, str(exc)
    return nb.stem, time.monotonic() - start, None


def execute_all(
    root: Path,                     # repository root
    profile: str,                   # ci | companion | paper
    out: Path,                      # destination folder of the executed notebooks
    names: list[str] | None,        # subset of notebooks by stem, None for all
    workers: int = 1,               # notebooks executed at once (the summary always runs last, alone)
    timeout: float | None = None,   # per-cell limit in seconds
    with_summary: bool = True,      # also re-run the summary notebook
    log_output: bool = False,       # echo notebook output
) -> list[Path]:  # fmt: skip
    """Execute the selected notebooks (figure notebooks in parallel, then the summary)."""
    notebooks = find_notebooks(root, names, with_summary)
    if not notebooks:
        raise BuildError(f"no notebooks to execute in {root / 'notebooks'}")
    jobs = [
        (nb, out, notebook_parameters(root, nb, profile, out), profile, timeout, log_output)
        for nb in notebooks
    ]
    figure_jobs = [j for j in jobs if j[0].stem != SUMMARY]
    summary_jobs = [j for j in jobs if j[0].stem == SUMMARY]
    failures: list[str] = []
    total = len(jobs)
    done = 0

    def report(result: tuple[str, float, str | None]) -> None:
        nonlocal done
        done += 1
        name, seconds, error = result
        state = "FAILED" if error else "done"
        print(f"[{done}/{total}] {name}: {state} in {seconds:.0f} s", flush=True)
        if error:
            failures.append(error)

    print(f"executing {total} notebook(s) with profile {profile!r} into {out}", flush=True)
    if workers > 1 and len(figure_jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_execute_job, job) for job in figure_jobs]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
    else:
        for job in figure_jobs:
            print(f"  running {job[0].stem} ...", flush=True)
            report(_execute_job(job))
    if failures:
        raise BuildError("notebook execution failed:\n  " + "\n  ".join(failures))
    for job in summary_jobs:
        report(_execute_job(job))
    if failures:
        raise BuildError("notebook execution failed:\n  " + "\n  ".join(failures))
    return [out / nb.name for nb in notebooks]


# ----------------------------------------------------------------------------------------------
# HTML


def toc_entries(toc: dict) -> list[str]:
    """Every document named in a Jupyter Book ``_toc.yml`` (root first), as written there."""
    found = [toc["root"]] if "root" in toc else []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return found


def document_exists(root: Path, entry: str) -> bool:
    """True when a toc entry resolves to a source file (with or without its extension)."""
    path = root / entry
    return path.is_file() or any(
        path.with_name(path.name + ext).is_file() for ext in (".md", ".ipynb", ".rst")
    )


def prune_toc(toc: dict, missing: set[str]) -> dict:
    """A copy of the toc without the missing documents and without parts left empty."""

    def prune(node):
        if isinstance(node, list):
            kept = [prune(item) for item in node]
            return [item for item in kept if item is not None]
        if isinstance(node, dict):
            if node.get("file") in missing:
                return None
            new = {k: prune(v) if isinstance(v, list | dict) else v for k, v in node.items()}
            for key in ("chapters", "sections"):
                if key in new and not new[key]:
                    del new[key]
            if set(new) <= {"caption", "numbered"}:
                return None
            return new
        return node

    return {k: (prune(v) if k != "root" else v) for k, v in toc.items()}


def _npm_fetch_mathjax(cache: Path) -> Path:
    """Download the MathJax 3 package tarball with npm into ``cache``; return the tarball path."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "MathJax is not cached and npm is not installed: install npm (apt-get install -y npm), "
            "or pass --mathjax with a MathJax 3 package folder or "
            f"mathjax-3.*.tgz, or unpack one into {cache}/package"
        )
    proc = subprocess.run(
        [npm, "pack", MATHJAX_SPEC, "--pack-destination", str(cache), "--silent"],
        capture_output=True,
        text=True,
        cwd=cache,
    )
    tarballs = sorted(cache.glob("mathjax-3*.tgz"))
    if proc.returncode != 0 or not tarballs:
        raise BuildError(
            f"`npm pack {MATHJAX_SPEC}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    return tarballs[-1]


def _extract_package(tarball: Path, dest: Path) -> None:
    """Unpack an npm tarball (members under ``package/``) into ``dest`` without leaving it."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            name = Path(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise BuildError(f"{tarball}: refusing to unpack suspicious member {member.name!r}")
            members.append(member)
        tar.extractall(dest, members=members)


def _ignore_folder(folder: Path) -> None:
    """Mark a generated folder as ignored by git (a .gitignore that ignores everything in it)."""
    (folder / ".gitignore").write_text("# generated by tools/build_book.py\n*\n", encoding="utf-8")


def vendor_mathjax(root: Path, source: Path | None = None) -> Path:
    """Copy MathJax 3 (script and CHTML fonts) into ``book/_static/mathjax``; return the script path.

    The package comes from ``source`` (a package folder or ``.tgz``) or from the cache
    ``.cache/mathjax`` (filled with ``npm pack mathjax@3`` when empty).
    """
    cache = root / ".cache" / "mathjax"
    if source is not None:
        source = Path(source)
        if source.is_file():
            package = cache / "from-tarball"
            shutil.rmtree(package, ignore_errors=True)
            package.mkdir(parents=True)
            _extract_package(source, package)
            package = package / "package"
        else:
            package = source
    else:
        package = cache / "package"
        if not (package / MATHJAX_SCRIPT).is_file():
            cache.mkdir(parents=True, exist_ok=True)
            (root / ".cache" / ".gitignore").write_text(
                "# generated by tools/build_book.py\n*\n", encoding="utf-8"
            )
            print(f"fetching {MATHJAX_SPEC} with npm into {cache}", flush=True)
            tarball = _npm_fetch_mathjax(cache)
            shutil.rmtree(package, ignore_errors=True)
            _extract_package(tarball, cache)
    script, fonts = package / MATHJAX_SCRIPT, package / MATHJAX_FONTS
    if not script.is_file() or not fonts.is_dir():
        raise BuildError(
            f"{package}: not a MathJax 3 package (expected {MATHJAX_SCRIPT} and {MATHJAX_FONTS})"
        )
    dest = root / "book" / "_static" / "mathjax"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "output" / "chtml" / "fonts").mkdir(parents=True)
    shutil.copy2(script, dest / script.name)
    shutil.copytree(fonts, dest / "output" / "chtml" / "fonts" / fonts.name)
    license_file = package / "LICENSE"
    if license_file.is_file():
        shutil.copy2(license_file, dest / "LICENSE")
    _ignore_folder(dest)
    return dest / script.name


def _check_mathjax_config(root: Path) -> None:
    """The book's config must point Sphinx at the vendored MathJax, or pages would load a CDN copy."""
    import yaml

    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")) or {}
    sphinx_config = (config.get("sphinx") or {}).get("config") or {}
    expected = "mathjax/" + Path(MATHJAX_SCRIPT).name
    if sphinx_config.get("mathjax_path") != expected:
        raise BuildError(
            f"{root / '_config.yml'}: sphinx.config.mathjax_path must be {expected!r} (vendored MathJax)"
        )


def build_html(
    root: Path,                     # repository root (holds _config.yml and _toc.yml)
    allow_missing: bool = False,    # build with the chapters that exist instead of failing
    mathjax: Path | None = None,    # MathJax package folder or tarball instead of the npm cache
    path_output: Path | None = None,  # folder that receives _build/ (default: the root)
    quiet: bool = False,            # pass -q to Jupyter Book
) -> Path:  # fmt: skip
    """Build the HTML book from stored executed notebooks; return the ``index.html`` path."""
    import yaml

    toc_path = root / "_toc.yml"
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    entries = toc_entries(toc)
    missing = [e for e in entries if not document_exists(root, e)]
    if missing and (not allow_missing or toc.get("root") in missing):
        hint = {
            e: f"run `python tools/build_book.py execute --notebooks {Path(e).name}`"
            for e in missing
            if (root / "notebooks" / f"{Path(e).name}.ipynb").is_file()
        }
        lines = [f"{e}  ({hint.get(e, 'no such page or executed notebook')})" for e in missing]
        raise BuildError(
            "these chapters of _toc.yml have no source file yet:\n  "
            + "\n  ".join(lines)
            + "\nexecute them, or pass --allow-missing to build the book without them"
        )
    _check_mathjax_config(root)
    vendor_mathjax(root, mathjax)
    output_root = (path_output or root).resolve()
    build_dir = output_root / "_build"
    build_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(root),
        "--path-output",
        str(output_root),
        "-W",
        "--keep-going",
        "--all",
    ]
    if missing:
        # A partial book: a toc without the missing chapters, and a config that tolerates the
        # cross-references other pages make to them (every other warning is still an error).
        print("building without missing chapters: " + ", ".join(missing), flush=True)
        partial_toc = build_dir / "toc-available.yml"
        partial_toc.write_text(
            yaml.safe_dump(prune_toc(toc, set(missing)), sort_keys=False), encoding="utf-8"
        )
        config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8")) or {}
        sphinx_config = config.setdefault("sphinx", {}).setdefault("config", {}) or {}
        config["sphinx"]["config"] = sphinx_config
        sphinx_config["suppress_warnings"] = [*sphinx_config.get("suppress_warnings", []), *PARTIAL_SUPPRESS]
        partial_config = build_dir / "config-available.yml"
        partial_config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        command += ["--toc", str(partial_toc), "--config", str(partial_config)]
    if quiet:
        command.append("-q")
    proc = subprocess.run(command, cwd=root)
    html = build_dir / "html"
    if proc.returncode != 0:
        raise BuildError(
            f"jupyter-book build failed (exit {proc.returncode}); the warnings above are errors (-W)"
        )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from check_book import scan_static

    problems = scan_static(html)
    if problems:
        raise BuildError("the built HTML references the network:\n  " + "\n  ".join(problems))
    index = html / "index.html"
    print(f"book built: {index}", flush=True)
    return index


# ----------------------------------------------------------------------------------------------
# Command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="build_book.py",
        description="Execute the notebooks with papermill and build the offline HTML book.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python tools/build_book.py all                       # companion profile, then HTML\n"
            "  python tools/build_book.py execute --notebooks regimes --workers 2\n"
            "  python tools/build_book.py html --allow-missing      # HTML from stored notebooks only\n"
            "  python tools/build_book.py batch --profile paper --out /scratch/paper-run"
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_execute_options(p: argparse.ArgumentParser, out_required: bool = False) -> None:
        p.add_argument(
            "--profile", choices=PROFILES, default="companion", help="parameter profile (default: companion)"
        )
        p.add_argument(
            "--notebooks", default="", help="comma-separated notebook names (default: all in notebooks/)"
        )
        p.add_argument(
            "--out",
            type=Path,
            required=out_required,
            default=None if out_required else ROOT / "book",
            help="folder for the executed notebooks (default: book/)",
        )
        p.add_argument("--workers", type=int, default=1, help="notebooks executed in parallel (default: 1)")
        p.add_argument(
            "--timeout", type=float, default=None, help="per-cell time limit in seconds (default: none)"
        )
        p.add_argument("--no-summary", action="store_true", help="do not re-run the summary notebook")
        p.add_argument("--log-output", action="store_true", help="echo each notebook's output while it runs")

    def add_html_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--allow-missing", action="store_true", help="build without chapters not executed yet")
        p.add_argument(
            "--mathjax", type=Path, default=None, help="MathJax 3 package folder or .tgz (default: npm)"
        )
        p.add_argument(
            "--path-output", type=Path, default=None, help="folder that receives _build/ (default: root)"
        )
        p.add_argument("--quiet", action="store_true", help="less Sphinx output")

    add_execute_options(sub.add_parser("execute", help="execute notebooks into book/ (or --out)"))
    add_html_options(sub.add_parser("html", help="build the HTML from the stored executed notebooks"))
    p_all = sub.add_parser("all", help="execute, then build the HTML")
    add_execute_options(p_all)
    add_html_options(p_all)
    add_execute_options(sub.add_parser("batch", help="execute a profile into another folder, no HTML"), True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command in ("execute", "all", "batch"):
            if args.workers < 1:
                raise BuildError("--workers must be at least 1")
            if args.command == "batch" and args.out.resolve() == (ROOT / "book").resolve():
                raise BuildError(
                    "batch writes into another folder than book/; use `execute` to update the book"
                )
            names = [n for n in args.notebooks.split(",") if n.strip()] or None
            execute_all(
                ROOT,
                args.profile,
                args.out,
                names,
                args.workers,
                args.timeout,
                not args.no_summary,
                args.log_output,
            )
        if args.command in ("html", "all"):
            build_html(ROOT, args.allow_missing, args.mathjax, args.path_output, args.quiet)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
