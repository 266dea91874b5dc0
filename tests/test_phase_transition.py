"""The MoLRG sample-complexity experiment (molrg_phase_transition.ipynb): the low-rank model trained with
the diffusion loss, restarts kept by training loss, the K-subspaces reference, the U-Net panel."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from nbhelpers import profiles
from nbhelpers.experiments import cells
from nbhelpers.experiments import phase_transition as pt
from nbhelpers.molrg import LowRankDenoiser, subspace_distance

matplotlib.use("Agg")


def ci_params() -> dict:
    """The notebook's companion defaults overridden by its ci profile (as profiles.resolve does)."""
    nb = "molrg_phase_transition"
    return {**profiles.notebook_defaults(nb), **profiles.load_profile(nb, "ci"), "profile": "ci"}


def small_mixture(d: int = 3, res: int = 4, seed: int = 0):
    return cells.make_molrg(cells.molrg_spec(2, d, res, 3, seed))


# ----------------------------------------------------------------------------
# The K-subspaces reference solver.


@pytest.mark.parametrize("d", [2, 5])
def test_subspace_clustering_recovers_subspaces_once_nk_reaches_d(d):
    mix = small_mixture(d)
    g = torch.Generator().manual_seed(1)
    for nk in (d, d + 3):
        x, labels = mix.sample(nk, generator=nk)
        bases, found, residual = pt.subspace_clustering(x, 2, d, restarts=3, generator=g)
        assert bases.shape == (2, 48, d)
        assert subspace_distance(bases, mix.bases)[1] < 1e-6
        assert residual < 1e-8 * float(x.double().square().sum())
        agree = (found == labels).double().mean().item()
        assert max(agree, 1 - agree) == 1.0


def test_subspace_clustering_fails_below_d_and_bad_init():
    d = 4
    mix = small_mixture(d)
    x, _ = mix.sample(d - 2, generator=3)
    bases, _, _ = pt.subspace_clustering(x, 2, d, restarts=2, generator=torch.Generator().manual_seed(0))
    assert subspace_distance(bases, mix.bases)[1] > 0.3  # at least two of d directions unconstrained
    gram = torch.einsum("knd,kne->kde", bases, bases)
    assert torch.allclose(gram, torch.eye(d, dtype=gram.dtype).expand(2, d, d), atol=1e-10)
    with pytest.raises(ValueError, match="init"):
        pt.subspace_clustering(x, 2, 2, init="kmeans")


# ----------------------------------------------------------------------------
# Data and starts of (a).


def test_noisy_molrg_has_nk_points_per_class_and_noise_of_the_given_norm():
    spec = cells.molrg_spec(2, 3, 8, 3, seed=4)
    clean = pt.noisy_molrg(spec, 50, 0.0)
    noisy = pt.noisy_molrg(spec, 50, 0.5)
    mix = cells.make_molrg(spec)
    assert clean.shape == (100, 3, 8, 8) and torch.bincount(mix.nearest_class(clean)).tolist() == [50, 50]
    assert mix.off_subspace(clean).max() < 1e-6
    off = (noisy - clean).reshape(100, -1).norm(dim=1)
    assert off.mean() == pytest.approx(0.5, rel=0.1)
    assert torch.equal(pt.noisy_molrg(spec, 50, 0.5), noisy)  # seeded


def test_init_lowrank_gaussian_and_from_data_points():
    spec = cells.molrg_spec(2, 3, 4, 3, seed=0)
    x = pt.noisy_molrg(spec, 4, 0.0)
    a, b = pt.init_lowrank(spec, x, "gaussian", 1), pt.init_lowrank(spec, x, "gaussian", 1)
    assert torch.equal(a.U, b.U) and not torch.equal(a.U, pt.init_lowrank(spec, x, "gaussian", 2).U)
    net = pt.init_lowrank(spec, x, "data", 1)
    flat = x.reshape(len(x), -1)
    # every start direction is a training point
    cols = net.U.detach().permute(0, 2, 1).reshape(-1, 48)
    assert all(torch.isclose(flat, c).all(1).any() for c in cols)
    with pytest.raises(ValueError, match="init"):
        pt.init_lowrank(spec, x, "pca", 0)


# ----------------------------------------------------------------------------
# Restarts are kept by training loss alone.


def test_train_restarts_keeps_the_lowest_training_loss_not_the_best_recovery(monkeypatch):
    """The kept restart is the one with the lowest training loss even when another restart is the
    truth itself: selection never sees the true subspaces."""
    mix = small_mixture(2)
    x, _ = mix.sample(6, generator=0)
    truth = LowRankDenoiser(2, 2, 4, 3)
    with torch.no_grad():
        truth.U.copy_(mix.bases.float())
    nets = [truth, LowRankDenoiser(2, 2, 4, 3, generator=1), LowRankDenoiser(2, 2, 4, 3, generator=2)]
    fake = iter([0.5, 0.1, 0.9])  # the truth (restart 0) is given a worse loss than restart 1
    monkeypatch.setattr(cells, "training_loss", lambda *a, **k: next(fake))
    train = cells.train_config(
        "lowrank",
        "edm",
        {},
        {"total_steps": 1, "lr": 1e-9, "lr_rampup_kimg": 0, "ema_beta": 0.0, "loss": "ve"},
        batch_size=4,
    )
    trained, kept, facts = cells.train_restarts(train, x, nets, torch.device("cpu"))
    assert kept == 1 and [f["loss"] for f in facts] == [0.5, 0.1, 0.9]
    dists = [subspace_distance(n.orthonormal_bases(), mix.bases)[1] for n in trained]
    assert dists[0] < 1e-5 < dists[1]  # the best recovery was not kept


def _lowrank_train(steps: int = 30, **changes) -> dict:
    section = {
        "total_steps": steps,
        "lr": 0.05,
        "lr_rampup_kimg": 0,
        "ema_beta": 0.9,
        "loss": "ve",
        **changes,
    }
    return cells.train_config("lowrank", "edm", {}, section, batch_size=8, seed=0)


def test_stacked_fits_do_not_interact():
    """Trained in one stack, a fit ends where it ends beside any other fit: members share batch
    positions and sigma draws, never data, noise or parameters."""
    xs = [small_mixture(2, seed=s).sample(6, generator=s)[0] for s in range(3)]
    a, b, c = (LowRankDenoiser(2, 2, 4, 3, generator=s) for s in range(3))
    cpu = torch.device("cpu")
    with_b, info = cells.train_stacked(_lowrank_train(), [xs[0], xs[1]], [a, b], cpu)
    with_c, _ = cells.train_stacked(_lowrank_train(), [xs[0], xs[2]], [a, c], cpu)
    assert info["steps"] == 30 and len(with_b) == 2
    torch.testing.assert_close(with_b[0].U, with_c[0].U, atol=0, rtol=0)
    assert not torch.equal(with_b[0].U, a.U)  # it did train
    assert not torch.equal(with_b[1].U, with_c[1].U)
    with pytest.raises(ValueError, match="grad_clip"):
        cells.train_stacked(_lowrank_train(grad_clip=1.0), [xs[0]], [a], cpu)
    with pytest.raises(ValueError, match="one data set per net"):
        cells.train_stacked(_lowrank_train(), [xs[0]], [a, b], cpu)


def test_longer_fits_repeat_the_shorter_fits_step_for_step():
    """The 'more steps' variant's claim: a longer run of the same stack takes the same first steps
    (batches and noise are seeded per step, not per run length), so its per-step losses agree."""
    from nbhelpers.molrg import LowRankStack
    from nbhelpers.training import TrainConfig, train

    xs = [small_mixture(2, seed=s).sample(6, generator=s)[0] for s in range(2)]
    nets = [LowRankDenoiser(2, 2, 4, 3, generator=s) for s in range(2)]
    data = torch.cat(xs, dim=1)
    cpu = torch.device("cpu")
    hist = {}
    for steps in (10, 20):
        cfg = TrainConfig.from_dict({**_lowrank_train(steps), "log_every": 1})
        result = train(cfg, data, device=cpu, progress=False, net=LowRankStack(nets))
        hist[steps] = [h["loss"] for h in result.history]
    assert len(hist[10]) == 10 and hist[10] == hist[20][:10]


def test_training_loss_uses_common_random_numbers():
    mix = small_mixture(2)
    x, _ = mix.sample(5, generator=0)
    net = mix.denoiser()
    a = cells.training_loss(net, x, "ve", torch.device("cpu"), draws=8, seed=3)
    assert a == cells.training_loss(net, x, "ve", torch.device("cpu"), draws=8, seed=3)
    assert a != cells.training_loss(net, x, "ve", torch.device("cpu"), draws=8, seed=4)
    wrong = LowRankDenoiser(2, 2, 4, 3, generator=5)
    assert cells.training_loss(wrong, x, "ve", torch.device("cpu"), draws=8, seed=3) > a


def test_restarts_are_compared_with_the_loss_they_trained_with():
    # A config that moves EDM's ln-sigma distribution is judged by that loss, not by the default one.
    mix = small_mixture(2)
    x, _ = mix.sample(5, generator=0)
    nets = [mix.denoiser(), LowRankDenoiser(2, 2, 4, 3, generator=5)]
    cpu, moved = torch.device("cpu"), {"P_mean": 1.0, "P_std": 0.5}
    _, losses = cells.lowest_loss({"loss": "edm", "loss_kwargs": moved}, nets, x, cpu, draws=8, seed=3)
    assert losses == [cells.training_loss(n, x, "edm", cpu, 8, 3, loss_kwargs=moved) for n in nets]
    assert losses != cells.lowest_loss({"loss": "edm"}, nets, x, cpu, draws=8, seed=3)[1]


def test_lowrank_cell_trains_restarts_and_keeps_the_lowest_loss(tmp_path):
    params = {
        **ci_params(),
        "lowrank_resolutions": [4],
        "lowrank_dims": [2],
        "lowrank_ratios": [4],
        "trials": 2,
        "restarts": 3,
    }
    params["lowrank_train"] = {**params["lowrank_train"], "total_steps": 200}
    (config,) = pt.lowrank_configs(params)
    assert (
        config["per_class"] == 8 and config["train"]["batch_size"] == 16 and config["train"]["loss"] == "ve"
    )
    result, arrays = pt.run_lowrank_cell(config, tmp_path)
    assert result["n"] == 48 and len(arrays["loss"]) == 2 * 3 and len(arrays["truth_loss"]) == 2
    fits = pt.fits_table([{**result, "arrays": arrays}])
    for _, t in fits.groupby("trial"):
        assert t.kept.sum() == 1 and t[t.kept].loss.iloc[0] == t.loss.min()
    table = pt.lowrank_table([{**result, "arrays": arrays}], 0.1)
    assert table.solver_success.all()  # 8 points per class, d = 2: the solver recovers
    assert table.success.any()  # and 200 steps of training do too, on at least one of the 2 mixtures


def test_lowrank_cell_in_stacks_of_one_trial(tmp_path, monkeypatch):
    """With a stack bound below one trial's fits, each trial trains in its own stack; the cell's
    tables keep their shape and selection by loss."""
    params = {**ci_params(), "lowrank_resolutions": [4], "lowrank_dims": [2], "lowrank_ratios": [2]}
    (config,) = pt.lowrank_configs(params)
    monkeypatch.setattr(pt, "STACK_ELEMENTS", 1)
    result, arrays = pt.run_lowrank_cell(config, tmp_path)
    fits = pt.fits_table([{**result, "arrays": arrays}])
    assert len(fits) == config["trials"] * config["restarts"]
    for _, t in fits.groupby("trial"):
        assert t.kept.sum() == 1 and t[t.kept].loss.iloc[0] == t.loss.min()


# ----------------------------------------------------------------------------
# Tables, intervals, checks.


def test_wilson_interval():
    lo, hi = pt.wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    np.testing.assert_allclose(lo, [0.0, 0.2366, 0.7225], atol=1e-4)
    np.testing.assert_allclose(hi, [0.2775, 0.7634, 1.0], atol=1e-4)


def _fake_table(success: dict[float, list[bool]], n: int = 48, d: int = 2) -> pd.DataFrame:
    rows = []
    for ratio, s in success.items():
        for trial, ok in enumerate(s):
            rows.append(
                {
                    "n": n,
                    "d": d,
                    "per_class": max(1, round(ratio * d)),
                    "ratio": ratio,
                    "trial": trial,
                    "distance": 0.01 if ok else 0.5,
                    "loss": 1.0 if ok else (0.5 if ratio == 1 else 2.0),
                    "truth_loss": 1.0,
                    "oracle_distance": 0.01 if ok else 0.5,
                    "success": ok,
                    "solver_distance": 0.0,
                    "solver_success": ratio >= 1,
                }
            )
    return pd.DataFrame(rows)


# success per trial by N_k / d: never below d, rarely at d, mostly at 2d, always at 4d
_MIXED = {
    0.5: [False] * 4,
    1.0: [False, False, False, True],
    2.0: [True, True, True, False],
    4.0: [True] * 4,
}


def test_success_table_failure_causes_transitions_and_checks():
    t = pd.concat([_fake_table(_MIXED, 48), _fake_table(_MIXED, 192)], ignore_index=True)
    s = pt.success_table(t)
    assert (
        list(s[s.n == 48].rate) == [0.0, 0.25, 0.75, 1.0]
        and (s.low <= s.rate).all()
        and (s.high >= s.rate).all()
    )
    causes = pt.failure_causes(t).set_index("ratio")
    assert causes.loc[1.0, "loss prefers wrong"] == 6 and causes.loc[2.0, "optimizer stuck"] == 2
    tr = pt.lowrank_transitions(t, reps=50)
    assert 1.0 < tr.ratio_star.iloc[0] < 2.0
    rows = {(r["quantity"], r["setting"]): r for r in pt.lowrank_checks(t, tr)}
    below = rows[("low-rank, trained: success rate with N_k < d", "n=48")]
    assert below["kind"] == "sanity" and below["passed"] is True
    at_d = rows[("low-rank, trained: success rate at N_k = d", "n=48, 4 trials")]
    assert at_d["kind"] == "phenomenon" and at_d["passed"] is False and at_d["margin"] < 0
    spread = [
        r for r in rows.values() if r["quantity"].startswith("low-rank, trained: N_k*/d at the largest n")
    ]
    assert spread[0]["passed"] is True and spread[0]["measured"] == 1.0


def test_generated_prose_follows_the_numbers():
    """The chapter's prose: numbers from the tables, and the words change when the numbers do."""
    from nbhelpers.experiments import phase_text

    good = {0.5: [False] * 4, 1.0: [True] * 4, 2.0: [True] * 4, 4.0: [True] * 4}
    texts = {}
    for name, grid in (("poor", _MIXED), ("good", good)):
        t = pd.concat([_fake_table(grid, 48), _fake_table(grid, 192)], ignore_index=True)
        trans = pt.lowrank_transitions(t, reps=20)
        texts[name] = phase_text.lowrank_text(t, trans, 0.1, 4, 500)
        causes = pt.failure_causes(t)
        texts[name + " paper"] = phase_text.against_paper(t, causes, (50, 60), 2.2, (45.0, 22.5, 4000, 2000))
    assert (
        "succeeds in fewer than half of the trials (rate 0.25" in texts["poor"]
        and "succeeds reliably (rate 1.00" in texts["good"]
    )
    assert "no fit succeeds, trained or solved" in texts["poor"]
    assert "share 0.88 of the trials (0.88 at n = 48, 0.88 at n = 192)" in texts["poor"]
    assert "at N_k = d the loss itself does not single out the truth" in texts["poor paper"]
    assert "measured reasons" not in texts["good paper"]  # nothing failed at or above N_k = d
    assert "Training longer moves the transition up, towards the paper" in texts["good paper"]
    assert phase_text._length_verdict(2.0, 2.0, 10, 20) == "Training shorter does not move the transition"
    assert phase_text._length_verdict(1.0, 2.0, 40, 20) == "Training longer moves the transition down"
    t = pd.concat([_fake_table(_MIXED, 48)], ignore_index=True)
    causes, single = pt.failure_causes(t), pd.DataFrame({"ratio": [2.0, 4.0], "single_fit_rate": [0.3, 0.6]})
    text = phase_text.causes_text(causes, single, pd.Series([1.0, 1.0, 2.0, np.nan]), t, 4)
    assert "At N_k = d, 3 of the 3 failed trials" in text and "so restarts matter" in text
    assert (
        "Of the 4 single fits" in text
        and "a share 0.50 sit at distance sqrt(1/d) " in text
        and "0.25 at sqrt(2/d)" in text
    )
    var = pd.DataFrame(
        {
            "variant": ["this chapter", "EDM loss", "4x the steps", "init from data points"],
            "loss": ["ve", "edm", "ve", "ve"],
            "loss weight at sigma < 0.01": [0.0, 0.33, 0.0, 0.0],
            "lr": [0.05] * 4,
            "steps": [500, 500, 2000, 500],
            "init": ["gaussian", "gaussian", "gaussian", "data"],
            "single fit": [0.5, 0.2, 0.9, 0.4],
            "kept": [0.75, 0.5, 1.0, 0.75],
            "kept 95% low": [0.3] * 4,
            "kept 95% high": [0.9] * 4,
        }
    )
    text = phase_text.variants_text(var, {"d": 4, "nk": 8, "n": 48}, (7, 10))
    assert "- **EDM loss**: single fits 0.20 (-0.30)" in text and "\n\n- **EDM loss**" in text
    assert "0.33 (EDM loss) of their weight" in text and "recover less" in text
    assert "4 times the steps give single fits 0.90" in text and "7 of the 10 fits" in text
    assert "no better than a Gaussian start" in text


def test_transition_point():
    t = pd.DataFrame({"x": [1, 2, 4, 8, 8], "y": [0.0, 0.2, 0.8, 1.0, 0.6]})
    assert pt.transition_point(t, "x", "y", 0.5, interpolate=False) == 4
    assert pt.transition_point(t, "x", "y", 0.5) == pytest.approx(2 * 2**0.5)
    assert math.isnan(pt.transition_point(t, "x", "y", 0.95))


def _unet_table(star: dict[int, float], seeds=(0, 1)) -> pd.DataFrame:
    """GL curves that cross 0.5 at N_k = star[d] (log-linear in N_k), every seed alike."""
    rows = []
    for d, s in star.items():
        for ratio in (0.5, 1, 2, 4, 8):
            nk = ratio * d
            gl = float(np.clip(0.5 + 0.5 * np.log2(nk / s), 0, 1))
            rows += [
                {
                    "d": d,
                    "per_class": nk,
                    "ratio": ratio,
                    "seed": sd,
                    "gl": gl,
                    "gl_se": 0.02,
                    "gl_fresh": 1.0,
                }
                for sd in seeds
            ]
    return pd.DataFrame(rows)


def test_unet_transitions_slopes_and_checks():
    table = _unet_table({4: 8.0, 8: 16.0, 12: 24.0})
    tr = pt.unet_transitions(table)
    np.testing.assert_allclose(tr.nk_star, [8.0, 16.0, 24.0])
    slopes = pt.unet_slopes(table, reps=50)
    assert slopes["slope"] == pytest.approx(2.0) and slopes["exponent"] == pytest.approx(1.0)
    assert slopes["slope_low"] <= 2.0 <= slopes["slope_high"]
    rows = pt.unet_checks(table, slopes)
    assert [r["passed"] for r in rows if "smallest" in r["quantity"]] == [True] * 3
    assert [r["passed"] for r in rows if "largest" in r["quantity"]] == [True] * 3
    assert (
        rows[-2]["passed"] is True
        and rows[-1]["measured"] == pytest.approx(2.0)
        and rows[-1]["check"] is None
    )
    quadratic = pt.unet_slopes(_unet_table({2: 2.0, 4: 8.0, 8: 32.0}), reps=20)
    assert quadratic["exponent"] == pytest.approx(2.0)
    assert pt.unet_checks(_unet_table({2: 2.0, 4: 8.0, 8: 32.0}), quadratic)[-2]["passed"] is False


# ----------------------------------------------------------------------------
# Configs from the notebook's parameters.


def test_configs_from_the_ci_profile():
    params = ci_params()
    lowrank = pt.lowrank_configs(params)
    assert len(lowrank) == 2 * 1 * 3 and {c["per_class"] for c in lowrank} == {1, 2, 4}
    variants = pt.variant_configs(params)
    assert list(variants)[0] == "this chapter" and variants["this chapter"] in lowrank  # shared with the grid
    assert (
        variants["init from data points"]["init"] == "data" and variants["EDM loss"]["train"]["loss"] == "edm"
    )
    unet = pt.unet_configs(params)
    assert sorted((c["data"]["intrinsic_dim"], c["per_class"], c["seed"]) for c in unet) == [
        (d, nk, s) for d, nk in [(2, 2), (2, 8), (3, 3), (3, 12)] for s in (0, 1)
    ]
    assert all(c["train"]["batch_size"] == 32 for c in unet)  # not capped by the training-set size
    spec = unet[0]["data"]
    assert torch.equal(cells.training_set(spec, 4), cells.training_set(spec, 16)[:4])  # nested
    probe = pt.length_configs(params)
    assert [c["train"]["total_steps"] for c in probe] == [10, 10] and all(c not in unet for c in probe)
    with pytest.raises(ValueError, match="unknown keys"):
        pt.lowrank_configs({**params, "lowrank_train": {**params["lowrank_train"], "warmup": 3}})


def test_paper_profile_is_consistent():
    nb = "molrg_phase_transition"
    assert set(profiles.load_profile(nb, "paper")) <= set(profiles.notebook_defaults(nb))
    params = {**profiles.notebook_defaults(nb), **profiles.load_profile(nb, "paper")}
    assert len(pt.lowrank_configs(params)) == 3 * 5 * 8 and len(pt.unet_configs(params)) == 5 * 8 * 2


# ----------------------------------------------------------------------------
# The U-Net cell end to end, and the figures.


@pytest.mark.slow
def test_unet_cell_calibration_table_and_plots(tmp_path):
    params = {
        **ci_params(),
        "unet_ratios": [1, 2],
        "unet_dims": [3],
        "train_seeds": [0],
        "eval_seeds": "0-7",
        "unet_train": {"total_steps": 3, "batch_size": 4, "lr": 0.002, "lr_rampup_kimg": 0, "ema_beta": 0.9},
    }
    cells_ = []
    for c in pt.unet_configs(params):
        result, arrays = pt.run_unet_cell(c, tmp_path)
        assert arrays["rel"].shape == (8,) and np.all(
            (arrays["off_subspace"] >= 0) & (arrays["off_subspace"] <= 1)
        )
        cells_.append({**result, "arrays": arrays})
    cals = pt.unet_calibrations(params)
    assert set(cals) == {3} and cals[3].table.null_rate.max() <= 0.01
    table = pt.unet_table(cells_, cals)
    assert (
        list(table.per_class) == [3, 6]
        and table.gl.between(0, 1).all()
        and table.gl_fresh.between(0.99, 1).all()
    )
    trans = pt.unet_transitions(table)
    fig = pt.plot_unet(
        table, trans, {"slope": 1.0, "slope_low": 0.5, "slope_high": 2.0}, "ci", table.assign(nk_star=3.0)
    )
    assert len(fig.axes) == 2


def test_lowrank_plots():
    grid = {0.5: [False] * 3, 1.0: [False, True, False], 2.0: [True] * 3}
    t = pd.concat([_fake_table(grid, 48), _fake_table(grid, 192)], ignore_index=True)
    fig = pt.plot_lowrank(pt.success_table(t), "ci", 0.1)
    assert len(fig.axes) == 2
    fits = t.assign(restart=0, kept=True)
    assert len(pt.plot_landscape(fits, "ci", 0.1).axes) == 2


def test_unet_transitions_with_a_seed_that_never_crosses():
    table = _unet_table({4: 8.0, 8: 16.0})
    stuck = table.assign(gl=np.where(table.seed == 1, 0.3, table.gl))
    tr = pt.unet_transitions(stuck)
    assert tr.nk_star_min.isna().all() and tr.nk_star.notna().all()  # the seed-mean curve still crosses
    fig = pt.plot_unet(stuck, tr, pt.unet_slopes(stuck, reps=10), "ci")
    assert fig.axes[1].lines, "the N_k* vs d panel is empty"


def test_loss_weight_share():
    assert pt.loss_weight_share("ve", 0.01, draws=10_000) == 0.0  # VE draws sigma >= 0.02
    ve = pt.loss_weight_share("ve", 0.05, draws=200_000)
    assert ve == pytest.approx(
        (0.02**-2 - 0.05**-2) / (0.02**-2 - 100.0**-2), abs=0.02
    )  # log-uniform, 1/sigma^2
    assert (
        pt.loss_weight_share("vp", 0.01, draws=10_000) > pt.loss_weight_share("edm", 0.01, draws=10_000) > 0
    )
    # A train config's loss_kwargs move the sigma distribution: EDM centred lower puts more weight below 0.01.
    low = pt.loss_weight_share("edm", 0.01, draws=10_000, loss_kwargs={"P_mean": -4.0})
    assert low > pt.loss_weight_share("edm", 0.01, draws=10_000)
