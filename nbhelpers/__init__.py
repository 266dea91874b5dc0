"""Helpers for the diffusion-generalizability companion book.

One module per concept (see ``DESIGN`` in the README): networks, checkpoints, sampling,
training, data, molrg, optimal, features, scores, jacobian, runs, profiles, plotting, cli.
Modules are imported lazily so that ``import nbhelpers`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "atomic",
    "download",
    "devices",
    "networks",
    "checkpoints",
    "sampling",
    "training",
    "data",
    "molrg",
    "optimal",
    "features",
    "scores",
    "jacobian",
    "runs",
    "profiles",
    "plotting",
    "cli",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
