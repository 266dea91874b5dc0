"""The Jacobian-rank experiment (jacobian_rank.ipynb): configs, the D* Jacobian in closed form, rank
cells, the U-Net's training history, checks and figures."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from nbhelpers import profiles
from nbhelpers.experiments import cells
from nbhelpers.experiments import jacobian_rank as jr
from nbhelpers.experiments.calibration import calibrate_copy
from nbhelpers.jacobian import AUTHORS_SNR_GRID
from nbhelpers.optimal import OptimalDenoiser

matplotlib.use("Agg")


def ci_params() -> dict:
    nb = "jacobian_rank"
    return {**profiles.notebook_defaults(nb), **profiles.load_profile(nb, "ci"), "profile": "ci"}


def test_optimal_jacobian_matches_autograd_through_the_optimal_denoiser():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20, 1, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    net = OptimalDenoiser(y, dtype=torch.float64, device="cpu")
    for sigma in (0.3, 2.0):
        J = jr.optimal_jacobian(y, x, sigma)
        auto = torch.stack(
            [
                torch.autograd.functional.jacobian(
                    lambda v, s=sigma: net(v.reshape(1, 1, 4, 4), s).reshape(-1), x[i].reshape(-1)
                )
                for i in range(3)
            ]
        )
        torch.testing.assert_close(J, auto, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(J, J.transpose(1, 2))


def test_optimal_rank_profile_collapses_at_high_snr():
    y = cells.molrg_draw(cells.molrg_spec(2, 3, 4, 3, 0), 30, 1)
    df = jr.optimal_rank_profile(y, [0, 1], "authors", 0.99, torch.device("cpu"))
    assert len(df) == 2 * 18 and set(df.columns) >= {"point", "seed", "snr", "rank", "rank_ratio", "n"}
    assert (df[df.snr > 100]["rank"] == 0).all()  # D* returns the nearest training point
    assert df[df.snr < 0.05]["rank"].between(1, 6).all()  # the training set's covariance: <= K d directions


def test_nearest_paper_snr_and_paper_table():
    out = jr.nearest_paper_snr([500.0, 132.8, 43.6, 7.17, 1.708, 0.0125, 3.37])
    np.testing.assert_array_equal(out[:6], [500.0, 125.0, 50.0, 10.0, 1.67, 0.01])
    assert math.isnan(out[6])  # 3.37 is more than x1.6 away from 1.67 and from 10
    table = jr.paper_rank_table()
    low = table[table.model == "paper low-rank"].set_index("snr")["low"]
    assert low[500.0] == 0.125 and low[0.01] == 0.25 and 0.91 not in low.index
    assert set(table.panel) == {"real", "molrg"} and set(table.snr) <= set(AUTHORS_SNR_GRID)


def test_rank_configs_from_the_ci_profile():
    params = ci_params()
    configs = jr.rank_configs(params)
    # the trainings first, longest first (20, 20, then the probe's 10 steps)
    assert [(c["panel"], c["model"]) for c in configs] == [
        ("real", "unet"),
        ("molrg", "unet"),
        ("real", "unet"),
        ("real", "optimal"),
        ("molrg", "closed_form"),
        ("molrg", "lowrank"),
        ("molrg", "optimal"),
    ]
    assert configs[0]["points"]["snr_grid"] == list(AUTHORS_SNR_GRID)  # empty snr_grid: the authors' axis
    assert configs[5]["train"]["loss"] == "ve" and configs[5]["restarts"] == 2
    assert configs[1]["rank_steps"] == [10] and configs[1]["train"]["precond"] == "edm"
    probe = configs[2]
    assert probe["label"].startswith(jr.PROBE_LABEL) and probe["train"]["total_steps"] == 10
    assert probe["train"]["loss_kwargs"]["P_std"] == 1.2 and probe["train"]["lr"] == configs[0]["train"]["lr"]
    # the real panel's roles, whatever the order of its labels (at companion scale the probe sorts first)
    real = [c["label"] for c in configs if c["panel"] == "real"]
    roles = jr.real_roles(real[::-1] + real)
    assert roles["probe"] == [probe["label"]] and roles["unet"] == [configs[0]["label"]]
    assert roles["optimal"] == [
        c["label"] for c in configs if c["model"] == "optimal" and c["panel"] == "real"
    ]
    assert "image_probe" in params and not any(
        c["label"].startswith(jr.PROBE_LABEL) for c in jr.rank_configs({**params, "image_probe": {}})
    )
    ckpt = jr.rank_configs(
        {**params, "checkpoints": ["https://example.org/edm-cifar10-32x32-uncond-vp.pkl"], "image_train": {}}
    )
    ckpt = [c for c in ckpt if c["model"] == "checkpoint"]
    assert [c["label"] for c in ckpt] == ["edm-cifar10-32x32-uncond-vp"]
    with pytest.raises(ValueError, match="MoLRG model"):
        jr.rank_configs({**params, "molrg_models": ["transformer"]})
    with pytest.raises(ValueError, match="unknown keys"):
        jr.rank_configs({**params, "molrg_train": {"total_steps": 1, "warmup": 3}})
    with pytest.raises(ValueError, match="points"):
        jr.rank_configs({**params, "points": "random"})


def test_the_probe_sees_as_many_high_noise_samples_as_the_reference():
    """matched_p_mean moves EDM's ln-sigma mean so that the probe's count of samples at SNR <= snr
    equals the reference's; probe_exposure tabulates it; an impossible match is an error."""
    params = ci_params()
    params["image_probe"] = {"total_steps": 2000, "snr": 0.04, "reference_kimg": 200000}
    params["image_train"] = {**params["image_train"], "batch_size": 64}
    configs = jr.rank_configs(params)
    t = jr.probe_exposure(configs, 0.04, 200000).set_index("model")
    counts = t["kimg at SNR <= snr"]
    probe = next(c["label"] for c in configs if c["label"].startswith(jr.PROBE_LABEL))
    assert counts.iloc[0] == pytest.approx(23.1, abs=0.1)  # 200 Mimg x P(sigma >= 25) at N(-1.2, 1.2^2)
    assert counts[probe] == pytest.approx(counts.iloc[0], rel=1e-3) and t.loc[probe, "P_mean"] > 1.5
    with pytest.raises(ValueError, match="cannot hold"):
        jr.matched_p_mean(1.0, 200000, 0.04)
    with pytest.raises(ValueError, match="image_precond 'edm'"):
        jr.rank_configs({**params, "image_precond": "vp"})


def test_probe_text_says_whether_the_minimum_moved():
    main = _curve("U-Net, Fashion-MNIST 8x8", "real", {500.0: 0.98, 1.0: 0.3, 0.3: 0.1, 0.05: 0.2}, n=64)
    exposure = pd.DataFrame(
        {
            "model": [
                "reference (200000 kimg)",
                "U-Net, Fashion-MNIST 8x8",
                "U-Net probe, Fashion-MNIST 8x8",
            ],
            "kimg": [200000.0, 512.0, 128.0],
            "P_mean": [-1.2, -1.2, 2.0],
            "P_std": [1.2, 1.2, 1.2],
            "kimg at SNR <= snr": [23.1, 0.06, 23.1],
        }
    )
    for curve, word in (
        ({500.0: 0.98, 0.3: 0.2, 0.05: 0.05}, "moves toward low SNR"),
        ({500.0: 0.98, 0.3: 0.05, 0.05: 0.2}, "does not move by more than a factor 1.5"),
    ):
        probe = _curve("U-Net probe, Fashion-MNIST 8x8", "real", curve, n=64)
        text = jr.probe_text(jr.rank_summary(pd.concat([main, probe], ignore_index=True)), exposure, 0.04)
        assert word in text and "23.1k noisy samples at SNR <= 0.04" in text
    assert jr.probe_text(jr.rank_summary(main), exposure, 0.04) == ""


def test_paper_profile_is_consistent():
    nb = "jacobian_rank"
    assert set(profiles.load_profile(nb, "paper")) <= set(profiles.notebook_defaults(nb))
    params = {**profiles.notebook_defaults(nb), **profiles.load_profile(nb, "paper")}
    configs = jr.rank_configs(params)
    assert sum(c["model"] == "checkpoint" for c in configs) == 3 and configs[-1]["model"] == "optimal"


@pytest.mark.slow
def test_rank_cells_closed_form_optimal_and_checks(tmp_path):
    params = {**ci_params(), "molrg_models": ["closed_form"], "image_train": {}}
    (config,) = jr.rank_configs(params)
    result, arrays = jr.run_rank_cell(config, tmp_path)
    assert result["n"] == 48 and len(arrays["snr"]) == 18 * 2
    opt = {**config, "model": "optimal", "label": "D* (MoLRG samples)"}
    r2, a2 = jr.run_rank_cell(opt, tmp_path)
    table = jr.rank_table([{**result, "arrays": arrays}, {**r2, "arrays": a2}])
    summ = jr.rank_summary(table)
    cf = summ[summ.label == "closed-form"]
    assert (cf[cf.snr > 100]["rank"] == 6).all() and (cf[cf.snr < 0.05]["rank"] == 12).all()
    checks = jr.rank_checks(table, 48, 2, 6)
    assert [c["kind"] for c in checks] == ["sanity"] * 3 and all(c["passed"] for c in checks)
    comparison = jr.rank_comparison(table)
    assert comparison[comparison.model == "closed-form"].paper.notna().sum() == 11
    assert comparison.measured_rank.notna().all()
    fig = jr.plot_rank(table, "ci", 48, 2, 6)
    assert len(fig.axes) == 1


def test_rank_cell_lowrank_trained_by_loss_in_grid_mode(tmp_path):
    params = {
        **ci_params(),
        "molrg_models": ["lowrank"],
        "image_train": {},
        "points": "grid",
        "snr_grid": [100.0, 0.01],
        "restarts": 3,
        "lowrank_train": {
            "total_steps": 300,
            "batch_size": 64,
            "lr": 0.05,
            "lr_rampup_kimg": 0,
            "ema_beta": 0.95,
            "loss": "ve",
        },
    }
    (config,) = jr.rank_configs(params)
    result, arrays = jr.run_rank_cell(config, tmp_path)
    kept = result["kept_restart"]
    assert result["restart_losses"][kept] == min(result["restart_losses"])  # kept by training loss
    assert result["subspace_distance"] == result["restart_distances"][kept] < 0.1  # 40 points per class
    np.testing.assert_allclose(sorted(set(arrays["snr"])), [0.01, 100.0])
    np.testing.assert_allclose(arrays["rank_ratio"][arrays["snr"] == 100.0], 6 / 48)


def _curve(label: str, panel: str, curve: dict[float, float], n: int = 48) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "panel": panel,
                "model": "unet",
                "label": label,
                "n": n,
                "point": p,
                "sigma": 1 / s,
                "snr": s,
                "rank": r * n,
                "rank_ratio": r,
            }
            for s, r in curve.items()
            for p in (0, 1)
        ]
    )


def test_rank_checks_u_net_floor_in_directions_and_real_minimum():
    def unet(floor):
        return _curve("U-Net", "molrg", {500.0: 0.98, 2.0: floor, 1.0: floor + 0.02, 0.01: 0.6})

    ok = {c["quantity"]: c for c in jr.rank_checks(unet(7 / 48), 48, 2, 6)}
    edge = {c["quantity"]: c for c in jr.rank_checks(unet(8.5 / 48), 48, 2, 6)}
    key = "U-Net on MoLRG: floor of the rank over SNR 0.5-4 (directions)"
    assert ok[key]["passed"] is True and ok[key]["kind"] == "phenomenon" and ok[key]["check"] == "<= 8"
    assert edge[key]["passed"] is False  # within 1.5 d = 9 directions, but by less than one direction
    top = "U-Net: rank ratio at SNR 500"
    assert ok[top]["kind"] == "sanity" and ok[top]["passed"] is True
    real = _curve("U-Net, Fashion-MNIST 8x8", "real", {500.0: 0.98, 1.0: 0.3, 0.3: 0.09, 0.05: 0.2}, n=64)
    rows = {c["quantity"]: c for c in jr.rank_checks(real, 48, 2, 6)}
    assert rows["U-Net, Fashion-MNIST 8x8: minimum rank ratio over SNR"]["passed"] is True
    assert rows["U-Net, Fashion-MNIST 8x8: SNR of the minimum rank"]["passed"] is False  # 0.3 > 0.12


@pytest.mark.slow
def test_unet_rank_history_generalization_and_resume(tmp_path):
    """The MoLRG U-Net's profile at earlier training steps comes from EMA snapshots; a killed training
    resumes from its state dump in the cell's work folder and gives the same profiles; the folder goes."""
    from nbhelpers import runs

    train = {"total_steps": 4, "batch_size": 16, "lr": 0.002, "lr_rampup_kimg": 0, "ema_beta": 0.9}
    params = {
        **ci_params(),
        "molrg_models": ["unet"],
        "image_train": {},
        "optimal_reference": False,
        "rank_seeds": [0, 1],
        "molrg_train": train,
        "molrg_rank_steps": [2],
        "molrg_gl_samples": 8,
    }
    (config,) = jr.rank_configs(params)
    fresh = runs.RunStore(tmp_path / "fresh").run(config, jr.run_rank_cell)
    hist = jr.rank_history([fresh])
    assert sorted(hist.train_steps.unique()) == [2, 4] and len(hist) == 2 * 2 * 18
    last = hist[hist.train_steps == 4].sort_values(["point", "sigma"])
    final = jr.rank_table([fresh]).sort_values(["point", "sigma"])
    np.testing.assert_array_equal(last["rank"].to_numpy(), final["rank"].to_numpy())

    store = runs.RunStore(tmp_path / "resumed")
    work = runs.work_dir(store.root / "staging", config)
    x = jr.training_data(config)
    cells.train_model(
        {**config["train"], "total_steps": 2},
        x,
        torch.device("cpu"),
        workdir=work,
        snapshot_steps=2,
        state_dump_steps=2,
    )
    assert list(work.glob("training-state-*.pt"))
    resumed = store.run(config, jr.run_rank_cell)
    assert not work.exists()
    for key in ("history_train_steps", "history_rank", "rank", "copies_rel"):
        np.testing.assert_array_equal(resumed["arrays"][key], fresh["arrays"][key])

    spec = config["data"]
    cal = calibrate_copy(spec, [spec["pool_size"]], count=100, copy_noise=0.03)
    gl = jr.rank_generalization([fresh], cal)
    assert list(gl.train_steps) == [2, 4] and list(gl.samples) == [8, 8] and gl.gl.between(0, 1).all()
    assert jr.rank_generalization([{**fresh, "arrays": {}}], cal).empty
    floor = jr.rank_floor(hist)
    assert list(floor.train_steps) == [2, 4] and floor.floor_rank.between(0, 48).all()
    rows = jr.rank_floor_rows(hist, 48, 6, gl.assign(gl=[0.5, 0.95]))
    assert rows[0]["kind"] == "phenomenon" and rows[0]["passed"] is True and rows[1]["passed"] is None
    assert len(jr.plot_rank_floor(hist, "ci", 48, 6, gl).axes) == 2
    empty = jr.rank_history([{**fresh, "arrays": {}}])
    assert empty.empty and jr.rank_floor(empty).empty and jr.rank_floor_rows(empty, 48, 6) == []
    with pytest.raises(ValueError, match="molrg_rank_steps"):
        jr.run_rank_cell({**config, "rank_steps": [2, 8]}, tmp_path / "bad")
