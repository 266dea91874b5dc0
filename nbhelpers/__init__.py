"""Helpers for the diffusion-generalizability companion book.

One module per concept (the README's "Layout" table says what each holds): layers and networks,
checkpoints (safeload, edm_pickle), sampling and schedules, losses, augment and training, data,
molrg, optimal, features, scores, jacobian, runs (claims, provenance, atomic), download, devices,
profiles, smoke, results, plotting, cli; one module per figure in ``experiments``. Modules are
imported lazily (``nbhelpers.sampling`` on first use), so that ``import nbhelpers`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "atomic",
    "augment",
    "checkpoints",
    "claims",
    "cli",
    "data",
    "devices",
    "download",
    "edm_pickle",
    "features",
    "jacobian",
    "layers",
    "losses",
    "molrg",
    "networks",
    "optimal",
    "plotting",
    "profiles",
    "provenance",
    "results",
    "runs",
    "safeload",
    "sampling",
    "schedules",
    "scores",
    "smoke",
    "training",
    "experiments",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
