"""Experiment code behind the figure notebooks: grid configs, cell functions and aggregation tables.

One module per notebook family (``regimes`` serves ``regimes.ipynb`` and ``optimal_denoiser.ipynb``).
Cell functions are module-level so that :meth:`nbhelpers.runs.RunStore.run_grid` can run them in
worker processes.
"""

from __future__ import annotations
