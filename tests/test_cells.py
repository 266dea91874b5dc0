"""Shared grid-cell plumbing: data specs, nested pools, held-out samples, validated training configs."""

from __future__ import annotations

import pytest
import torch

from nbhelpers import results
from nbhelpers.experiments import cells


def test_molrg_pool_is_nested_and_fresh_samples_are_other_draws():
    spec = cells.molrg_spec(2, 3, 4, 3, seed=0, pool_size=64)
    pool = cells.load_pool(spec)
    assert pool.shape == (64, 3, 4, 4) and pool.dtype == torch.float32
    assert torch.equal(cells.training_set(spec, 10), pool[:10])
    fresh = cells.fresh_samples(spec, 32)
    assert fresh.shape == (32, 3, 4, 4)
    assert torch.cdist(fresh.reshape(32, -1), pool.reshape(64, -1)).min() > 1e-3  # no shared point
    x, y = cells.molrg_draw(spec, 9, seed=5, labels=True)
    assert torch.equal(cells.make_molrg(spec).nearest_class(x), y)
    with pytest.raises(ValueError, match="outside 1..64"):
        cells.training_set(spec, 65)


def test_fashion_mnist_fresh_samples_are_the_test_split(fashion_mnist_dir):
    spec = cells.fashion_mnist_spec(str(fashion_mnist_dir), resolution=8, pool_size=20)
    pool, fresh = cells.load_pool(spec), cells.fresh_samples(spec, 5)
    assert pool.shape == (20, 1, 8, 8) and pool.dtype == torch.uint8 and fresh.shape == (5, 1, 8, 8)
    assert cells.data_shape(spec) == (1, 8)


def test_train_config_is_validated_by_trainconfig():
    net = {"model_channels": 8}
    cfg = cells.train_config("ddpmpp", "edm", net, {"total_steps": 10, "lr": 1e-3}, batch_size=4, seed=1)
    assert cfg["seed"] == 1 and cfg["batch_size"] == 4 and cells.num_steps(cfg) == 10
    with pytest.raises(ValueError, match="unknown keys"):
        cells.train_config("ddpmpp", "edm", net, {"total_steps": 10, "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="set elsewhere"):
        cells.train_config("ddpmpp", "edm", net, {"total_steps": 10, "seed": 3}, seed=1)
    with pytest.raises(ValueError, match="exactly one of duration_kimg and total_steps"):
        cells.train_config("ddpmpp", "edm", net, {"lr": 1e-3})


def test_result_check_rows_report_margin_in_standard_errors():
    ok = results.check("GL", "N=16", 0.05, "<=", 0.1, se=0.02, kind="phenomenon")
    assert ok["passed"] is True and ok["margin"] == pytest.approx(2.5) and ok["kind"] == "phenomenon"
    bad = results.check("RP", "N=4096", 0.5, ">=", 0.6, se=0.05)
    assert bad["passed"] is False and bad["margin"] == pytest.approx(-2.0)
    assert results.check("x", "", float("nan"), ">=", 0.0, se=0.1)["passed"] is False
    raw = results.check("SNR of the minimum", "", 0.307, "<=", 0.12)  # no se: the margin in the value's units
    assert raw["margin"] is None and raw["note"].startswith("margin -0.187 (no se)")
    with pytest.raises(ValueError, match="kind"):
        results.row("x", "", 1.0, kind="other")
