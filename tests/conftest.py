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


def write_idx(path, arr) -> None:
    """Write ``arr`` (uint8) as an uncompressed IDX file."""
    import numpy as np

    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    with open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fashion_mnist_dir(tmp_path):
    """A folder of small Fashion-MNIST-format IDX files: 40 train and 12 test images (28x28, seeded)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 12)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count))
    return tmp_path
