"""Notebook parameter profiles: ``ci``, ``smoke``, ``companion`` (the notebook defaults) and ``paper``.

A figure notebook's ``parameters`` cell holds the companion defaults as literals. Other profiles
live in ``params/<profile>/<notebook>.yaml``. Precedence, lowest first: notebook defaults, the
profile's YAML, values injected by papermill (``-p``/``-y``/``-f``). The profile is the ``profile``
parameter, else ``$NBHELPERS_PROFILE`` (how ``pytest --nbmake`` selects ``ci``), else companion.

Injected values win whatever their value, also when it equals the notebook default. Papermill runs
its injected cell right after the ``parameters`` cell, so :func:`injected_names` reads the kernel's
input history (IPython's ``_ih``, which ``globals()`` holds) and takes every parameter assigned by a
cell executed after the parameters cell. Without that history (plain Python, a foreign kernel) a
value counts as injected when it differs from the notebook default.

The ``smoke`` profile is the ``paper`` code path at toy size. Its YAML files name their inputs as
``{smoke_assets}/<file>``; the placeholder becomes the asset folder (``smoke.asset_dir()``) and
``resolve`` makes the assets there first when they are missing (``smoke.ensure_assets``).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("ci", "smoke", "companion", "paper")
SCIENTIFIC = ("companion", "paper")  # profiles whose notebooks assert the papers' claims
ENV_VAR = "NBHELPERS_PROFILE"
SMOKE_PLACEHOLDER = "{smoke_assets}"


def checks_on(profile: str) -> bool:
    """Whether a notebook asserts its scientific checks in ``profile`` (companion, paper); ``ci`` and
    ``smoke`` only exercise the code, at a size where the phenomena need not appear."""
    return profile in SCIENTIFIC


def repo_root() -> Path:
    """The project folder holding ``notebooks/`` and ``params/`` (``$NBHELPERS_ROOT`` overrides)."""
    env = os.environ.get("NBHELPERS_ROOT")
    return Path(env) if env else Path(__file__).resolve().parent.parent


def notebook_path(notebook: str) -> Path:
    """Source notebook ``notebooks/<notebook>.ipynb``."""
    return repo_root() / "notebooks" / f"{notebook}.ipynb"


def _parameters_cell(notebook: str | os.PathLike) -> tuple[str, Path]:
    """Source of the cell tagged ``parameters`` in a notebook (name or path), and the notebook's path."""
    path = Path(notebook) if str(notebook).endswith(".ipynb") else notebook_path(str(notebook))
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: notebook not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a notebook ({e})") from None
    for cell in nb.get("cells", []):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            return src, path
    raise ValueError(f"{path}: no cell tagged 'parameters'")


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """Literal assignments of the cell tagged ``parameters`` in a notebook (name or path)."""
    src, path = _parameters_cell(notebook)
    return _literal_assignments(src, path)


def _literal_assignments(src: str, where: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                out[name] = ast.literal_eval(node.value)
            except ValueError:
                raise ValueError(f"{where}: parameter {name!r} must be a literal") from None
    return out


def load_profile(notebook: str, profile: str) -> dict[str, Any]:
    """Overrides of ``profile`` for ``notebook``; ``companion`` has none (it is the defaults)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    path = repo_root() / "params" / profile / f"{notebook}.yaml"
    if not path.exists():
        if profile == "companion":
            return {}
        raise FileNotFoundError(f"{path}: no {profile!r} parameter file for notebook {notebook!r}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of parameter names to values")
    return expand_smoke_assets(data) if profile == "smoke" else data


def expand_smoke_assets(value: Any) -> Any:
    """``value`` with ``{smoke_assets}`` set to the smoke asset folder in every string, nested ones too."""
    from .smoke import asset_dir  # smoke imports this module, and torch

    folder = str(asset_dir())

    def expand(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace(SMOKE_PLACEHOLDER, folder)
        if isinstance(v, list):
            return [expand(x) for x in v]
        if isinstance(v, dict):
            return {k: expand(x) for k, x in v.items()}
        return v

    return expand(value)


class Params(dict):
    """The resolved parameters; keys also readable as attributes (``P.dataset_sizes``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _assigned_names(src: Any) -> set[str]:
    """Names bound by plain assignments at the top level of a cell's source (empty if it does not parse)."""
    if not isinstance(src, str):
        return set()
    try:
        body = ast.parse(src).body
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        else:
            continue
        for t in targets:
            elts = t.elts if isinstance(t, ast.Tuple | ast.List) else [t]
            names |= {e.id for e in elts if isinstance(e, ast.Name)}
    return names


def injected_names(namespace: dict[str, Any], parameters_source: str, names: set[str]) -> set[str] | None:
    """Parameters assigned by cells that ran after the ``parameters`` cell (papermill's injected cell),
    read from the kernel's input history ``namespace['_ih']``; None when there is no such history.

    The parameters cell is the last history entry equal to ``parameters_source``, else the last one
    that assigns every parameter (an edited copy); the final entry is the cell calling this.
    """
    history = namespace.get("_ih", namespace.get("In"))
    if not isinstance(history, list) or len(history) < 2:
        return None
    before = history[:-1]
    wanted = parameters_source.strip()
    exact = [i for i, src in enumerate(before) if isinstance(src, str) and src.strip() == wanted]
    full = [i for i, src in enumerate(before) if names <= _assigned_names(src)]
    start = exact[-1] if exact else (full[-1] if full else None)
    if start is None:
        return None
    found: set[str] = set()
    for src in before[start + 1 :]:
        found |= _assigned_names(src) & names
    return found


def resolve(notebook: str, namespace: dict[str, Any], verbose: bool = True) -> Params:
    """Merge defaults, profile YAML and injected values; update ``namespace`` and return them.

    ``namespace`` is the notebook's ``globals()`` after the parameters (and any injected) cell; every
    parameter that a later cell assigned (see :func:`injected_names`) beats the profile's YAML.
    """
    src, path = _parameters_cell(notebook)
    defaults = _literal_assignments(src, path)
    names = injected_names(namespace, src, set(defaults)) or set()
    # values that differ from the defaults were set somewhere too (papermill without a history, an edit)
    names |= {k for k in defaults if k in namespace and namespace[k] != defaults[k]}
    injected = {k: namespace[k] for k in sorted(names) if k in namespace}
    profile = injected.get("profile") or os.environ.get(ENV_VAR) or "companion"
    overrides = load_profile(notebook, profile)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"params/{profile}/{notebook}.yaml: unknown parameters {unknown}")
    params = Params({**defaults, **overrides, **injected, "profile": profile})
    if profile == "smoke":
        from .smoke import ensure_assets  # smoke imports this module, and torch

        ensure_assets()
    namespace.update(params)
    if verbose:
        changed = sorted(k for k in params if k != "profile" and params[k] != defaults[k])
        given = sorted(k for k in injected if k != "profile")
        print(
            f"profile: {profile}"
            + (f"; injected: {', '.join(given)}" if given else "")
            + (f"; differs from companion defaults in: {', '.join(changed)}" if changed else "")
        )
    return params
