"""Tests of the low-dimensional-structure experiments (jacobian_rank and molrg_phase_transition notebooks)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from nbhelpers import profiles
from nbhelpers.experiments import lowdim
from nbhelpers.molrg import LowRankDenoiser, subspace_distance

matplotlib.use("Agg")


def ci_params(notebook: str) -> dict:
    """The notebook's companion defaults overridden by its ci profile (as profiles.resolve does)."""
    return {**profiles.notebook_defaults(notebook), **profiles.load_profile(notebook, "ci"), "profile": "ci"}


def small_mixture(d: int = 3, res: int = 4, seed: int = 0):
    return lowdim.make_molrg(lowdim.molrg_spec(2, d, res, 3, seed))


# ----------------------------------------------------------------------------
# Subspace clustering (the low-rank model's training problem).


@pytest.mark.parametrize("d", [2, 5])
def test_subspace_clustering_recovers_subspaces_once_nk_reaches_d(d):
    mix = small_mixture(d)
    g = torch.Generator().manual_seed(1)
    for nk in (d, d + 3):
        x, labels = mix.sample(nk, generator=nk)
        bases, found, residual = lowdim.subspace_clustering(x, 2, d, restarts=3, generator=g)
        assert bases.shape == (2, 48, d)
        assert subspace_distance(bases, mix.bases)[1] < 1e-6
        assert residual < 1e-8 * float(x.double().square().sum())
        # the clusters agree with the classes up to a relabelling
        agree = (found == labels).double().mean().item()
        assert max(agree, 1 - agree) == 1.0


def test_subspace_clustering_fails_below_d_and_bases_stay_orthonormal():
    d = 4
    mix = small_mixture(d)
    x, _ = mix.sample(d - 2, generator=3)
    bases, _, _ = lowdim.subspace_clustering(x, 2, d, restarts=2, generator=torch.Generator().manual_seed(0))
    assert subspace_distance(bases, mix.bases)[1] > 0.3  # at least two of d directions unconstrained
    gram = torch.einsum("knd,kne->kde", bases, bases)
    assert torch.allclose(gram, torch.eye(d, dtype=gram.dtype).expand(2, d, d), atol=1e-10)


def test_subspace_clustering_random_init_and_bad_init():
    mix = small_mixture(2)
    x, _ = mix.sample(6, generator=0)
    bases, _, _ = lowdim.subspace_clustering(
        x, 2, 2, restarts=20, init="random", generator=torch.Generator().manual_seed(0)
    )
    assert subspace_distance(bases, mix.bases)[1] < 1e-6
    with pytest.raises(ValueError, match="init"):
        lowdim.subspace_clustering(x, 2, 2, init="kmeans")


def test_fit_lowrank_gives_the_closed_form_denoiser():
    mix = small_mixture(3)
    x, _ = mix.sample(10, generator=0)
    net = lowdim.fit_lowrank(x, 2, 3, restarts=2, generator=torch.Generator().manual_seed(0))
    assert isinstance(net, LowRankDenoiser)
    probe = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for sigma in (0.05, 1.0, 20.0):
        torch.testing.assert_close(net(probe, sigma), mix.denoiser()(probe, sigma), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------
# Small measurements.


def test_off_subspace_distance():
    mix = small_mixture(3)
    on, _ = mix.sample(4, generator=0)
    assert lowdim.off_subspace(on, mix.bases).max() < 1e-6
    q = torch.randn(48, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flat = mix.bases.permute(1, 0, 2).reshape(48, 6)
    orth = (q - flat @ (flat.T @ q)).T.contiguous()  # 5 points orthogonal to both subspaces
    np.testing.assert_allclose(lowdim.off_subspace(orth, mix.bases), 1.0, rtol=1e-9)


def test_nearest_paper_snr_and_paper_table():
    out = lowdim.nearest_paper_snr([500.0, 132.8, 43.6, 7.17, 1.708, 0.0125, 3.37])
    np.testing.assert_array_equal(out[:6], [500.0, 125.0, 50.0, 10.0, 1.67, 0.01])
    assert math.isnan(out[6])  # 3.37 is more than x1.6 away from 1.67 and from 10
    table = lowdim.paper_rank_table()
    low = table[table.model == "paper low-rank"].set_index("snr")["low"]
    assert low[500.0] == 0.125 and low[0.01] == 0.25 and 0.91 not in low.index
    assert set(table.panel) == {"real", "molrg"}


def test_transition_point():
    t = pd.DataFrame({"x": [1, 2, 4, 8, 8], "y": [0.0, 0.2, 0.8, 1.0, 0.6]})
    assert lowdim.transition_point(t, "x", "y", 0.5, interpolate=False) == 4
    assert lowdim.transition_point(t, "x", "y", 0.5) == pytest.approx(2 * 2**0.5)
    assert math.isnan(lowdim.transition_point(t, "x", "y", 0.95))


def test_unet_transitions_report_the_spread_over_training_seeds():
    # seed 0 crosses GL = 0.5 x fresh exactly at N_k = 4, seed 1 at N_k = 8; the mean curve in between.
    gl = {0: [0.0, 0.2, 0.5, 0.9], 1: [0.0, 0.1, 0.3, 0.5]}
    table = pd.DataFrame([{"d": 2, "per_class": nk, "seed": sd, "gl": g, "gl_fresh": 1.0}
                          for sd, gls in gl.items() for nk, g in zip([1, 2, 4, 8], gls)])  # fmt: skip
    (tr,) = lowdim.unet_transitions(table).itertuples()
    assert (tr.nk_star_min, tr.nk_star_max, tr.seeds) == pytest.approx((4.0, 8.0, 2)) and 4 < tr.nk_star < 8
    one = lowdim.unet_transitions(table[table.seed == 0])
    assert one.nk_star.iloc[0] == 4.0 and one.seeds.iloc[0] == 1
    two_d = pd.concat([table, table.assign(d=4, per_class=table.per_class * 2)])
    rows = lowdim.unet_checks(two_d, lowdim.unet_transitions(two_d))
    assert (
        rows[-2]["passed"] is True
        and rows[-2]["measured"].startswith("d=2: 2.")
        and "(2.0-4.0)" in rows[-2]["measured"]
    )
    assert rows[-1]["measured"] == pytest.approx(1.0)

    # a seed that never crosses leaves no per-seed range, but the seed-mean N_k* is still plotted
    stuck = table.assign(gl=np.where(table.seed == 1, 0.3, table.gl))
    trans = lowdim.unet_transitions(stuck)
    assert np.isnan(trans.nk_star_min.iloc[0]) and trans.nk_star.notna().all()
    fig = lowdim.plot_phase_transition(None, stuck, trans, "ci", 0.1)
    assert fig.axes[1].lines, "the N_k* vs d panel is empty"


# ----------------------------------------------------------------------------
# Configs from the notebooks' parameters.


def test_rank_configs_from_the_ci_profile():
    params = ci_params("jacobian_rank")
    configs = lowdim.rank_configs(params)
    assert [c["model"] for c in configs] == ["unet", "closed_form", "lowrank", "unet"]
    assert [c["panel"] for c in configs] == ["real", "molrg", "molrg", "molrg"]
    params = {
        **params,
        "checkpoints": ["https://example.org/edm-cifar10-32x32-uncond-vp.pkl"],
        "image_train": {},
    }
    configs = lowdim.rank_configs(params)
    assert configs[0]["label"] == "edm-cifar10-32x32-uncond-vp" and configs[0]["model"] == "checkpoint"
    with pytest.raises(ValueError, match="MoLRG model"):
        lowdim.rank_configs({**params, "molrg_models": ["transformer"]})
    with pytest.raises(ValueError, match="unsupported keys"):
        lowdim.rank_configs({**params, "molrg_train": {"total_steps": 1, "warmup": 3}})
    with pytest.raises(ValueError, match="points"):
        lowdim.rank_configs({**params, "points": "random"})


def test_paper_profiles_are_consistent():
    for nb in ("jacobian_rank", "molrg_phase_transition"):
        params = {**profiles.notebook_defaults(nb), **profiles.load_profile(nb, "paper")}
        assert set(profiles.load_profile(nb, "paper")) <= set(profiles.notebook_defaults(nb))
        if nb == "jacobian_rank":
            configs = lowdim.rank_configs(params)
            assert sum(c["model"] == "checkpoint" for c in configs) == 3
        else:
            assert len(lowdim.subspace_configs(params)) == 3 * len(params["lowrank_dims"])
            assert len(lowdim.unet_configs(params)) == 5 * 8 * 2


def test_unet_configs_batch_and_order():
    params = ci_params("molrg_phase_transition")
    configs = lowdim.unet_configs(params)
    assert params["train_seeds"] == [0, 1]
    cells = sorted((c["data"]["intrinsic_dim"], c["per_class"], c["seed"]) for c in configs)
    assert cells == [(d, nk, seed) for d, nk in [(2, 2), (2, 8), (4, 4), (4, 16)] for seed in (0, 1)]
    for c in configs:
        assert c["train"]["batch_size"] == min(32, 2 * c["per_class"])
    assert configs[0]["per_class"] == 16  # the largest batch first


# ----------------------------------------------------------------------------
# Cells at toy scale.


@pytest.mark.slow
def test_rank_cell_closed_form_and_checks(tmp_path):
    params = {**ci_params("jacobian_rank"), "molrg_models": ["closed_form"], "image_train": {}}
    (config,) = lowdim.rank_configs(params)
    result, arrays = lowdim.run_rank_cell(config, tmp_path)
    assert result["n"] == 48 and len(arrays["snr"]) == 18 * 2
    table = lowdim.rank_table([{**result, "arrays": arrays}])
    summ = lowdim.rank_summary(table)
    top = summ[summ.snr > 100]["mean"]
    bottom = summ[summ.snr < 0.05]["mean"]
    assert (top == 6 / 48).all() and (bottom == 12 / 48).all()
    checks = lowdim.rank_checks(table, 48, 2, 6)
    assert len(checks) == 2 and all(c["passed"] for c in checks)
    comparison = lowdim.rank_comparison(table)
    assert len(comparison) == 12 and comparison.paper.notna().sum() == 11
    fig = lowdim.plot_rank(table, "ci", 48, 2, 6)
    assert len(fig.axes) == 1


def test_rank_cell_grid_mode_lowrank(tmp_path):
    params = {**ci_params("jacobian_rank"), "molrg_models": ["lowrank"], "image_train": {}, "points": "grid",
              "snr_grid": [100.0, 0.01], "lowrank_train": {"total_steps": 2, "batch_size": 16, "lr": 1e-4,
                                                             "lr_rampup_kimg": 0, "ema_beta": 0.0}}  # fmt: skip
    (config,) = lowdim.rank_configs(params)
    result, arrays = lowdim.run_rank_cell(config, tmp_path)
    assert result["clustering_distance"] < 1e-6 and result["subspace_distance"] < 0.05
    np.testing.assert_allclose(sorted(set(arrays["snr"])), [0.01, 100.0])
    np.testing.assert_allclose(arrays["rank_ratio"][arrays["snr"] == 100.0], 6 / 48)


def test_rank_checks_u_net_floor_near_d_over_n():
    def unet(floor):
        curve = {500.0: 0.98, 2.0: floor, 1.0: floor + 0.02, 0.01: 0.6}
        return pd.DataFrame([{"panel": "molrg", "model": "unet", "label": "U-Net", "n": 48, "point": 0,
                              "sigma": 1 / s, "snr": s, "rank": 0, "rank_ratio": r} for s, r in curve.items()])  # fmt: skip

    near = {c["quantity"]: c for c in lowdim.rank_checks(unet(0.15), 48, 2, 6)}
    far = {c["quantity"]: c for c in lowdim.rank_checks(unet(0.25), 48, 2, 6)}
    key = "rank ratio, U-Net on MoLRG, min over SNR 0.5-4"
    assert near[key]["passed"] is True and near[key]["note"].startswith("= 1.20 d/n")
    assert far[key]["passed"] is False
    assert lowdim.rank_checks(unet(0.25), 48, 2, 6, unet_floor=2.5)[1]["passed"] is True


def test_rank_checks_flag_a_wrong_curve():
    rows = [{"panel": "molrg", "model": "closed_form", "label": "closed-form", "n": 48, "point": 0, "sigma": 1 / s,
             "snr": s, "rank": 12, "rank_ratio": 0.25} for s in (500.0, 0.01)]  # fmt: skip
    checks = lowdim.rank_checks(pd.DataFrame(rows), 48, 2, 6)
    assert [c["passed"] for c in checks] == [False, True]


def test_subspace_cell_table_checks_and_plot(tmp_path):
    params = {**ci_params("molrg_phase_transition"), "lowrank_resolutions": [4], "lowrank_dims": [2, 3]}
    configs = lowdim.subspace_configs(params)
    cells = []
    for c in configs:
        result, arrays = lowdim.run_subspace_cell(c, tmp_path)
        cells.append({**result, "arrays": arrays})
    table = lowdim.subspace_table(cells, threshold=0.1)
    assert len(table) == 2 * 4 * 2
    assert not table[table.per_class < table.d].success.any()
    assert table[table.per_class >= table.d].success.all()
    checks = lowdim.subspace_checks(table)
    assert all(c["passed"] for c in checks) and checks[2]["measured"] == 1.0


@pytest.mark.slow
def test_unet_cell_end_to_end(tmp_path):
    params = {**ci_params("molrg_phase_transition"), "unet_ratios": [1], "unet_dims": [2, 3], "eval_seeds": "0-7",
              "fresh_samples": 8, "unet_train": {"total_steps": 3, "batch_size": 4, "lr": 0.002, "lr_rampup_kimg": 0,
                                                 "ema_beta": 0.9}}  # fmt: skip
    cells = []
    for c in lowdim.unet_configs(params):
        result, arrays = lowdim.run_unet_cell(c, tmp_path)
        assert arrays["ratio"].shape == (8,) and arrays["fresh_ratio"].shape == (8,)
        assert np.all((arrays["off_subspace"] >= 0) & (arrays["off_subspace"] <= 1))
        cells.append({**result, "arrays": arrays})
    table = lowdim.unet_table(cells)
    assert list(table.d) == [2, 2, 3, 3] and list(table.seed) == [0, 1, 0, 1] and table.gl.between(0, 1).all()
    trans = lowdim.unet_transitions(table)
    checks = lowdim.unet_checks(table, trans)
    assert len(checks) == 6 and checks[-1]["passed"] is None
    sub = pd.DataFrame({"n": 48, "d": [2, 2], "per_class": [1, 2], "trial": 0, "distance": [0.7, 1e-15],
                        "success": [False, True]})  # fmt: skip
    fig = lowdim.plot_phase_transition(sub, table, trans, "ci", 0.1)
    assert fig.axes


@pytest.mark.slow
def test_unet_rank_history_and_resume(tmp_path):
    """The MoLRG U-Net's profile at earlier training steps comes from EMA snapshots; a killed training
    resumes from its state dump in the cell's work folder and gives the same profiles; the folder goes."""
    from nbhelpers import runs

    train = {"total_steps": 4, "batch_size": 16, "lr": 0.002, "lr_rampup_kimg": 0, "ema_beta": 0.9}
    params = {**ci_params("jacobian_rank"), "molrg_models": ["unet"], "image_train": {}, "rank_seeds": [0, 1],
              "molrg_train": train, "molrg_rank_steps": [2], "molrg_gl_samples": 8}  # fmt: skip
    (config,) = lowdim.rank_configs(params)
    assert config["rank_steps"] == [2]  # the final step (4) joins the history anyway
    fresh = runs.RunStore(tmp_path / "fresh").run(config, lowdim.run_rank_cell)
    assert not list((tmp_path / "fresh").glob(".work-*")) and not list((tmp_path / "fresh").glob(".tmp-*"))
    hist = lowdim.rank_history([fresh])
    assert sorted(hist.train_steps.unique()) == [2, 4] and len(hist) == 2 * 2 * 18
    last = hist[hist.train_steps == 4].sort_values(["point", "sigma"])
    final = lowdim.rank_table([fresh]).sort_values(["point", "sigma"])
    np.testing.assert_array_equal(last["rank"].to_numpy(), final["rank"].to_numpy())

    # A run killed after 2 steps left its state dump in the work folder: the cell resumes from it.
    store = runs.RunStore(tmp_path / "resumed")
    work = runs.work_dir(store.root / "staging", config)
    spec = config["data"]
    x = lowdim.molrg_training_set(spec, config["per_class"], seed=spec["seed"] * 1000 + 1)
    lowdim._train_unet(x, config["network"], {**train, "total_steps": 2}, torch.device("cpu"), outdir=work,
                       snapshot_steps=2)  # fmt: skip
    assert list(work.glob("training-state-*.pt"))
    resumed = store.run(config, lowdim.run_rank_cell)
    assert not work.exists()
    for key in ("history_train_steps", "history_rank", "rank", "copies_nn_ratio"):
        np.testing.assert_array_equal(resumed["arrays"][key], fresh["arrays"][key])
    assert resumed["train_seconds"] > 0

    floor = lowdim.rank_floor(hist)
    assert list(floor.train_steps) == [2, 4] and floor.floor.between(0, 1).all()
    empty = lowdim.rank_history([{**fresh, "arrays": {}}])
    assert empty.empty and lowdim.rank_floor(empty).empty and lowdim.rank_floor_checks(empty, 48, 6) == []
    gl = lowdim.rank_generalization([fresh])
    assert list(gl.train_steps) == [2, 4] and list(gl.samples) == [8, 8] and gl.gl.between(0, 1).all()
    assert lowdim.rank_generalization([{**fresh, "arrays": {}}]).empty
    (falls, generalizes) = lowdim.rank_floor_checks(hist, 48, 6, gl.assign(gl=[0.5, 0.95]))[::-1]
    assert generalizes["passed"] is True and generalizes["measured"] == 0.95
    assert lowdim.rank_floor_checks(hist, 48, 6, gl.assign(gl=0.5))[0]["passed"] is False
    fig = lowdim.plot_rank_floor(hist, "ci", 48, 6, gl)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="molrg_rank_steps"):
        lowdim.run_rank_cell({**config, "rank_steps": [2, 8]}, tmp_path / "bad")


def test_rank_floor_checks_need_a_falling_floor():
    def hist(floors):
        return pd.DataFrame([{"panel": "molrg", "label": "U-Net", "n": 48, "train_steps": s, "point": p, "sigma": 1.0,
                              "snr": 1.0, "rank": 0, "rank_ratio": f} for s, f in floors for p in (0, 1)])  # fmt: skip

    (ok,) = lowdim.rank_floor_checks(hist([(100, 0.4), (200, 0.2)]), 48, 6)
    (bad,) = lowdim.rank_floor_checks(hist([(100, 0.2), (200, 0.3)]), 48, 6)
    assert ok["passed"] is True and bad["passed"] is False and ok["measured"] == "1.60 vs 3.20 d/n"
