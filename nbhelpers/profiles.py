"""Notebook parameter profiles: ``ci``, ``companion`` (the notebook defaults) and ``paper``.

A figure notebook's ``parameters`` cell holds the companion defaults as literals. Other profiles
live in ``params/<profile>/<notebook>.yaml``. Precedence, lowest first: notebook defaults, the
profile's YAML, values injected by papermill (``-p``/``-f``). The profile is the ``profile``
parameter, else ``$NBHELPERS_PROFILE`` (how ``pytest --nbmake`` selects ``ci``), else companion.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("ci", "companion", "paper")
ENV_VAR = "NBHELPERS_PROFILE"


def repo_root() -> Path:
    """The project folder holding ``notebooks/`` and ``params/`` (``$NBHELPERS_ROOT`` overrides)."""
    env = os.environ.get("NBHELPERS_ROOT")
    return Path(env) if env else Path(__file__).resolve().parent.parent


def notebook_path(notebook: str) -> Path:
    """Source notebook ``notebooks/<notebook>.ipynb``."""
    return repo_root() / "notebooks" / f"{notebook}.ipynb"


def notebook_defaults(notebook: str | os.PathLike) -> dict[str, Any]:
    """Literal assignments of the cell tagged ``parameters`` in a notebook (name or path)."""
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
            return _literal_assignments(src, path)
    raise ValueError(f"{path}: no cell tagged 'parameters'")


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
    return data


class Params(dict):
    """The resolved parameters; keys also readable as attributes (``P.dataset_sizes``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve(notebook: str, namespace: dict[str, Any], verbose: bool = True) -> Params:
    """Merge defaults, profile YAML and injected values; update ``namespace`` and return them.

    ``namespace`` is the notebook's ``globals()`` after the parameters (and any injected) cell.
    """
    defaults = notebook_defaults(notebook)
    injected = {k: namespace[k] for k in defaults if k in namespace and namespace[k] != defaults[k]}
    profile = injected.get("profile") or os.environ.get(ENV_VAR) or "companion"
    overrides = load_profile(notebook, profile)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"params/{profile}/{notebook}.yaml: unknown parameters {unknown}")
    params = Params({**defaults, **overrides, **injected, "profile": profile})
    namespace.update(params)
    if verbose:
        changed = sorted(k for k in params if k != "profile" and params[k] != defaults[k])
        print(
            f"profile: {profile}"
            + (f"; differs from companion defaults in: {', '.join(changed)}" if changed else "")
        )
    return params
