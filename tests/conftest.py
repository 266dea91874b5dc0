"""Shared test settings: one torch thread per process keeps xdist workers from oversubscribing."""

import os

import pytest
import torch

os.environ.setdefault(
    "NBHELPERS_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "nbh-cache")
)
torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(0)
