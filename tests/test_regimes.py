"""The regimes experiment module at toy scale, the paper-profile dry run, and the shared plotting look."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from nbhelpers import plotting, profiles  # noqa: E402
from nbhelpers import scores as S  # noqa: E402
from nbhelpers.experiments import cells  # noqa: E402
from nbhelpers.experiments import regimes as R  # noqa: E402
from nbhelpers.runs import RunStore  # noqa: E402

TOY = dict(
    dataset="molrg",
    molrg_classes=2,
    molrg_dim=8,
    resolution=4,
    channels=3,
    data_seed=0,
    pool_size=64,
    dataset_path="",
    dataset_sizes=[4, 16],
    widths=[4, 8],
    width_key="model_channels",
    train_seeds=[0, 1],
    arch="ddpmpp",
    precond="edm",
    network={"channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "augment_dim": 0},
    train={"total_steps": 4, "lr": 2e-3, "lr_rampup_kimg": 0, "ema_beta": 0.9},
    batch_size=8,
    batch_at_most_n=True,
    history_sizes=[],
    history_steps=[],
    history_seeds="100000-100003",
    molrg_panel={},
    num_steps=4,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    sampler_order=2,
    eval_seeds="100000-100015",
    sample_batch=16,
    backend="relative",
    copy_threshold=0.0,
    same_threshold=0.0,
    sscd="",
    sscd_resize=320,
    calibration_samples=400,
    copy_noise=0.03,
    max_false_copy=0.01,
    min_true_copy=0.99,
    max_false_same=0.01,
    min_true_same=0.99,
    optimal_chunk=32,
)


def test_pool_is_nested_fixed_and_fresh_samples_are_new():
    spec = R.data_spec(TOY)
    pool = cells.load_pool(spec)
    assert pool.shape == (64, 3, 4, 4) and pool.dtype == torch.float32
    assert torch.equal(cells.training_set(spec, 16), pool[:16])
    fresh = cells.fresh_samples(spec, 32)
    d = torch.cdist(fresh.reshape(32, -1).double(), pool.reshape(64, -1).double())
    assert d.min() > 1e-3  # no fresh sample is a pool point
    assert R.cells.make_molrg(spec).off_subspace(pool).max() < 1e-5  # every point on one of the K subspaces
    with pytest.raises(ValueError, match="pool"):
        cells.training_set(spec, 65)
    with pytest.raises(ValueError, match="pool_size"):
        R.data_spec({**TOY, "dataset_sizes": [128]})
    with pytest.raises(ValueError, match="unknown dataset"):
        R.data_spec({**TOY, "dataset": "mnist"})


def test_image_sources_use_the_pool_and_the_images_after_it(tmp_path):
    from nbhelpers.data import write_dataset

    images = np.random.default_rng(0).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    path = write_dataset(images, tmp_path / "set.zip")
    spec = R.data_spec(
        {**TOY, "dataset": "images", "dataset_path": str(path), "pool_size": 12, "dataset_sizes": [4, 12]}
    )
    assert spec == {"source": "images", "path": str(path), "pool_size": 12}
    np.testing.assert_array_equal(cells.training_set(spec, 4).numpy(), images[:4])
    np.testing.assert_array_equal(cells.fresh_samples(spec, 5).numpy(), images[12:17])
    with pytest.raises(ValueError, match="dataset_path"):
        R.data_spec({**TOY, "dataset": "images"})


def test_panels_main_and_molrg():
    main = {**TOY, "dataset": "fashion_mnist", "resolution": 8, "channels": 1}
    ps = R.panels(
        {
            **main,
            "molrg_panel": {
                "dataset": "molrg",
                "resolution": 4,
                "channels": 3,
                "molrg_classes": 8,
                "molrg_dim": 4,
            },
        }
    )
    assert list(ps) == ["Fashion-MNIST 8x8", "MoLRG n=48, K=8, d=4"]
    assert ps["MoLRG n=48, K=8, d=4"]["widths"] == TOY["widths"]  # the rest comes from the main panel
    assert list(R.panels(TOY)) == ["MoLRG n=48, K=2, d=8"]
    with pytest.raises(ValueError, match="backend 'relative'"):
        R.panels({**main, "backend": "sscd", "molrg_panel": {"dataset": "molrg"}})


def test_train_configs_cover_the_grid_with_distinct_keys():
    from nbhelpers.runs import config_key

    configs = R.train_configs(TOY)
    assert len(configs) == 2 * 2 * 2
    assert len({config_key(c) for c in configs}) == len(configs)
    assert {c["train"]["batch_size"] for c in configs if c["n"] == 4} == {4}
    assert {c["train"]["batch_size"] for c in configs if c["n"] == 16} == {8}
    assert configs[0]["width"] == 8  # widest first
    assert all(c["train"]["network"]["model_channels"] == c["width"] for c in configs)
    hist = R.train_configs({**TOY, "history_sizes": [4], "history_steps": [1, 2]})
    assert {c["n"] for c in hist if "history" in c} == {4}
    with pytest.raises(ValueError, match="history_steps"):
        R.train_configs({**TOY, "history_sizes": [4], "history_steps": [4]})
    opt = R.optimal_configs(TOY, orders=(1, 2))
    assert sorted((c["n"], c["sampler"]["order"]) for c in opt) == [(4, 1), (4, 2), (16, 1), (16, 2)]
    with pytest.raises(ValueError, match="unknown keys"):
        R.train_configs({**TOY, "train": {"total_steps": 4, "bogus": 1}})
    with pytest.raises(ValueError, match="backend"):
        R.train_configs({**TOY, "backend": "clip"})
    plan = R.plan(configs)
    assert set(plan["width"]) == {4, 8} and (plan["params"] > 0).all()


def test_both_criteria_are_calibrated_on_held_out_data():
    """Copy: held-out samples flagged <= 1 % at every size, planted copies caught; same image: unrelated
    pairs <= 1 %, near-identical pairs caught. The two thresholds answer different questions."""
    copy, same = R.calibrate({**TOY, "dataset_sizes": [4, 16, 64]})
    assert copy.criterion.question == "copy" and same.criterion.question == "same"
    assert (copy.table["null_rate"] <= 0.01).all() and (copy.table["control_rate"] >= 0.99).all()
    assert (same.table["null_rate"] <= 0.01).all() and (same.table["control_rate"] >= 0.99).all()
    # the copy threshold is the loosest that keeps every size at <= 1 % (the largest set binds)
    null = copy.scores[copy.scores["kind"] == "held-out samples"]
    assert all((g["score"] <= copy.threshold).mean() <= 0.01 for _, g in null.groupby("n"))
    assert any((g["score"] <= copy.threshold + 0.001).mean() > 0.01 for _, g in null.groupby("n"))
    assert same.threshold != copy.threshold
    rows = copy.sanity_rows("toy") + same.sanity_rows("toy")
    assert all(r["kind"] == "sanity" and r["passed"] for r in rows)
    fixed, _ = R.calibrate({**TOY, "copy_threshold": 0.5})
    assert fixed.threshold == 0.5


def test_copy_criterion_flags_planted_copies_and_passes_fresh_samples_on_real_images(fashion_mnist_dir):
    """On (synthetic-format) Fashion-MNIST files: planted copies are copies, held-out images are not."""
    from nbhelpers.experiments import calibration

    spec = cells.fashion_mnist_spec(str(fashion_mnist_dir), resolution=8, pool_size=40)
    cal = calibration.calibrate_copy(spec, [10, 40], count=12, copy_noise=0.03)
    assert (cal.table["null_rate"] == 0).all() and (cal.table["control_rate"] == 1).all()


def _cell(n, width, seed, samples, train, **extra):
    rel, idx = S.nn_relative_distance(torch.as_tensor(samples), torch.as_tensor(train))
    arrays = {"samples": np.asarray(samples), "nn_rel": rel.numpy(), "nn_index": idx.numpy()}
    return {"n": n, "width": width, "seed": seed, "arrays": arrays, **extra}


def test_tables_on_synthetic_cells():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
    copies = train[rng.integers(0, 8, 10)] * 1.01  # memorized: near-exact copies
    novel = rng.standard_normal((10, 3, 2, 2)).astype(np.float32) * 3  # far from every training point
    copy, same = S.Criterion("copy", "relative", 0.05), S.Criterion("same", "relative", 0.2)
    cl = [
        _cell(8, 4, 0, copies, train),
        _cell(8, 8, 1, copies, train),
        _cell(64, 4, 0, novel, train),
        _cell(64, 8, 1, novel + 0.01, train),
        _cell(64, 8, 0, -novel, train),
    ]
    gl = R.gl_table(cl, copy)
    assert gl.groupby("n")["gl"].mean().to_dict() == {8: 0.0, 64: 1.0}
    rp = R.rp_table(cl, same)  # cross-seed pairs only
    assert set(zip(rp["n"], rp["seed_a"] != rp["seed_b"])) == {(8, True), (64, True)}
    at64 = rp[rp["n"] == 64].set_index(["width_a", "seed_a", "width_b", "seed_b"])["rp"]
    assert at64[(4, 0, 8, 1)] == 1.0 and at64[(8, 0, 8, 1)] == 0.0
    assert (rp["chance"] <= rp["rp"]).all()
    assert len(R.rp_table(cl, same, "same-seed")) == 1  # (64, 4, 0) with (64, 8, 0)
    opt = [_cell(8, None, None, copies, train, order=1), _cell(64, None, None, copies, train, order=1)]
    ro = R.rp_optimal_table(cl, opt, same)
    assert ro.groupby("n")["rp"].mean().to_dict() == {8: 1.0, 64: 0.0}
    assert R.optimal_gl_table(opt, copy)["gl"].tolist() == [0.0, 0.0]
    curves = R.rp_curves(cl, same, [0.0, 0.2, 10.0])
    assert curves[curves["threshold"] == 10.0]["rp"].min() == 1.0


def test_n_half_and_mean_se():
    t = pd.DataFrame(
        {
            "n": [8, 16, 32] * 2,
            "width": [4] * 3 + [8] * 3,
            "seed": 0,
            "samples": 100,
            "gl": [0, 0.25, 0.75, 0, 0, 1.0],
        }
    )
    h = R.n_half(t).set_index("width")["n_half"]
    assert h[4] == pytest.approx(2 ** (4 + 0.5)) and h[8] == pytest.approx(2 ** (4 + 0.5))
    assert math.isnan(R.n_half(t.assign(gl=0.0))["n_half"].iloc[0])
    table = R.mean_se(t, "n", "width", "gl")
    assert table.loc[32, 8].startswith("1.00 ± 0.0")


def _checks_input(gl_values, rp_values, sizes=(8, 32, 128)):
    gl = pd.DataFrame(
        [
            {"n": n, "width": w, "seed": s, "gl": v + 0.01 * s, "samples": 500}
            for w, off in ((4, 0), (8, 1))
            for s in (0, 1)
            for n, v in zip(sizes[off:] + sizes[:off], gl_values)
        ]
    )
    rp = pd.DataFrame(
        [
            {"n": n, "pair": "4 vs 8", "seed_a": 0, "seed_b": 1, "rp": v, "seeds": 500}
            for n, v in zip(sizes, rp_values)
        ]
    )
    return gl.sort_values(["width", "n"]), rp


def test_phenomenon_checks_pass_on_the_paper_shape_and_fail_otherwise():
    gl = pd.DataFrame(
        [
            {"n": n, "width": w, "seed": s, "gl": v, "samples": 500}
            for w, vs in ((4, [0.02, 0.7, 0.97]), (8, [0.01, 0.3, 0.95]))
            for s in (0, 1)
            for n, v in zip([8, 32, 128], vs)
        ]
    )
    rp = pd.DataFrame(
        [{"n": n, "pair": "4 vs 8", "rp": v, "seeds": 500} for n, v in zip([8, 32, 128], [0.7, 0.3, 0.8])]
    )
    rows = R.regime_checks(gl, rp, "toy")
    assert all(r["passed"] and r["kind"] == "phenomenon" for r in rows) and len(rows) == 4 + 3 + 1
    assert all(r["margin"] is None or r["margin"] > 0 for r in rows)
    bad = R.regime_checks(gl.assign(gl=0.5), rp.assign(rp=0.7), "toy")
    failed = {r["quantity"] for r in bad if not r["passed"]}
    assert failed == {
        "GL, smallest N (memorization)",
        "GL, largest N (generalization)",
        "pairwise RP dip: lower end minus transition minimum",
        "larger models need more data: log2 N(GL=0.5), wider minus narrower",
    }
    ro = pd.DataFrame(
        [
            {"n": n, "width": 4, "seed": 0, "order": 1, "rp": v, "seeds": 500}
            for n, v in zip([8, 32, 128], [0.5, 0.2, 0.0])
        ]
    )
    og = pd.DataFrame([{"n": n, "order": 1, "gl": 0.0, "samples": 500} for n in [8, 32, 128]])
    opt_rows = R.optimal_checks(ro, og, "toy")
    assert all(r["passed"] for r in opt_rows) and {r["kind"] for r in opt_rows} == {"sanity", "phenomenon"}
    assert not all(r["passed"] for r in R.optimal_checks(ro.assign(rp=[0.1, 0.2, 0.3]), og, "toy"))


@pytest.mark.slow
def test_cells_run_in_a_store_and_resume(tmp_path):
    store = RunStore(tmp_path / "runs")
    toy = {**TOY, "history_sizes": [16], "history_steps": [2]}
    configs = [c for c in R.train_configs(toy) if c["seed"] == 0 and c["width"] == 4]
    cl = store.run_grid(configs, R.run_train_cell, workers=1, progress=False)
    for c in cl:
        a = c["arrays"]
        assert a["samples"].shape == (16, 3, 4, 4) and a["samples"].dtype == np.float32
        assert (
            a["nn_rel"].shape == (16,)
            and a["off_subspace"].shape == (16,)
            and a["nearest_class"].shape == (16,)
        )
        assert c["steps"] == 4 and (tmp_path / "runs" / c["dir"].split("/")[-1] / "network.nbh").exists()
    assert cl[0]["arrays"]["history_copy"].shape == (1, 4) or cl[1]["arrays"]["history_copy"].shape == (1, 4)
    again = store.run_grid(configs, R.run_train_cell, workers=1, progress=False)  # loaded, not re-run
    assert [c["train_seconds"] for c in again] == [c["train_seconds"] for c in cl]
    opt = store.run_grid(R.optimal_configs(TOY, orders=(1,)), R.run_optimal_cell, workers=1, progress=False)
    copy = S.Criterion("copy", "relative", 0.01)
    assert R.optimal_gl_table(opt, copy)["gl"].max() == 0.0  # D* returns training points: all copies
    ro = R.rp_optimal_table([c for c in cl if c["n"] == 4], opt, S.Criterion("same", "relative", 0.3))
    assert len(ro) == 1 and 0 <= ro["rp"].iloc[0] <= 1


def _profile_params(notebook: str, profile: str) -> dict:
    return {**profiles.notebook_defaults(notebook), **profiles.load_profile(notebook, profile)}


@pytest.mark.parametrize("notebook", ["regimes", "optimal_denoiser"])
def test_paper_profile_dry_run_builds_every_config(notebook):
    P = _profile_params(notebook, "paper")
    ps = R.panels(P)
    main = next(iter(ps.values()))
    configs = R.train_configs(main)
    assert len(configs) == 10 * 3 * 2
    plan = R.plan(configs, (main["channels"], main["resolution"]))
    assert sorted(plan["n"].unique()) == [2**k for k in range(6, 16)]
    assert sorted(plan["width"].unique()) == [64, 128, 256]
    assert (plan["batch_size"] == 128).all() and np.allclose(plan["kimg"], 50000, rtol=1e-3)
    c = configs[0]
    assert c["data"]["source"] == "images" and c["data"]["pool_size"] == 32768
    assert c["train"]["precond"] == "vp" and c["train"]["augment_p"] == 0.12 and c["train"]["dropout"] == 0.13
    assert c["features"] == {"backend": "sscd", "model": P["sscd"], "resize": 320}
    assert c["sampler"] == {"num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "order": 2}
    assert len(configs[-1]["eval_seeds"]) and R.cells.num_steps(c["train"]) == 390625
    if notebook == "optimal_denoiser":
        assert len(R.optimal_configs(main, P["optimal_orders"])) == 10 * len(P["optimal_orders"])


def test_both_notebooks_share_the_sweep_parameters():
    for profile in ("companion", "ci", "paper"):
        a = (
            _profile_params("regimes", profile)
            if profile != "companion"
            else profiles.notebook_defaults("regimes")
        )
        b = (
            _profile_params("optimal_denoiser", profile)
            if profile != "companion"
            else profiles.notebook_defaults("optimal_denoiser")
        )
        shared = set(a) & set(b)
        assert shared >= {"dataset_sizes", "widths", "train", "runs_dir", "eval_seeds", "molrg_panel"}
        assert {k: a[k] for k in shared if k != "results_json"} == {
            k: b[k] for k in shared if k != "results_json"
        }
        for (na, pa), (nb, pb) in zip(R.panels(a).items(), R.panels(b).items()):
            assert na == nb and R.train_configs(pa) == R.train_configs(pb)


def test_plotting_helpers():
    with plotting.style():
        fig, ax = plt.subplots()
        t = pd.DataFrame({"n": [8, 16, 32, 8, 16, 32], "gl": [0, 0.5, 1, 0.1, 0.6, 1], "model": "a"})
        plotting.errorbar_lines(t, "n", "gl", hue="model", ax=ax)
        assert ax.get_xscale() == "log"
        mem, gen = plotting.regime_bounds(t, "n", "gl")
        assert (mem, gen) == (8.0, 32.0)
        plotting.shade_regimes(ax, mem, gen)
        labels = [tx.get_text() for tx in ax.texts]  # full names, or short ones in narrow bands
        assert len(labels) == 3 and all(
            t.rstrip(".") and t.rstrip(".") in n
            for t, n in zip(labels, ["memorization", "generalization", "transition"])
        )
        badge = plotting.profile_badge(fig, "ci")
        assert badge.get_text() == "profile: ci"
        ax2 = plotting.annotated_heatmap(np.array([[1, 0.5], [0.5, 1]]), ["a", "b"], triangle="upper")
        assert len([t for t in ax2.texts if t.get_text()]) == 3
        with pytest.raises(ValueError, match="labels"):
            plotting.annotated_heatmap(np.eye(2), ["a"])
        ax3 = plotting.image_grid(np.zeros((5, 1, 4, 4), dtype=np.uint8), nrow=2)
        assert ax3.images[0].get_array().shape == (2 * 5 + 1, 3 * 5 + 1)
        plt.close("all")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian dataset-fashion-mnist absent"
)
def test_both_criteria_on_real_fashion_mnist():
    """On the real test split: held-out images are not copies, planted copies are; unrelated pairs are
    not the same image, near-identical pairs are; and the copy threshold is far stricter."""
    from nbhelpers.experiments import calibration

    spec = cells.fashion_mnist_spec("/usr/share/datasets/fashion-mnist", resolution=8, pool_size=1024)
    copy = calibration.calibrate_copy(spec, [64, 1024], count=500, copy_noise=0.03)
    same = calibration.calibrate_same(spec, count=500, near_noise=0.03)
    assert (copy.table["null_rate"] <= 0.01).all() and (copy.table["control_rate"] >= 0.99).all()
    assert same.table["null_rate"].iloc[0] <= 0.01 and same.table["control_rate"].iloc[0] >= 0.99
    assert copy.threshold < same.threshold / 2


def test_narrative_states_the_measured_shape_either_way():
    """The generated prose follows the numbers: the paper's shape when it is there, 'not' when not."""
    base = {"main_nmin": 16, "main_nmax": 256, "main_w_narrow": 16, "main_w_wide": 32,
            "main_gl_narrow_nmin": 0.05, "main_gl_wide_nmin": 0.02, "main_gl_narrow_nmax": 0.97,
            "main_gl_wide_nmax": 0.95, "main_nhalf_narrow": 32.0, "main_nhalf_wide": 48.0,
            "main_rp_cross_nmin": 0.7, "main_rp_cross_nmax": 0.8, "main_chance_cross_nmin": 0.01,
            "main_chance_cross_nmax": 0.0, "main_rp_cross_dip": 0.3, "main_rp_cross_dip_n": 64,
            "main_hist_steps_memorized": 4000}  # fmt: skip
    text = R.narrative(base, "main", "Fashion-MNIST")
    assert "every width memorizes" in text and "every width generalizes" in text
    assert "gets there later, as in the paper" in text and "the paper's U-shape" in text
    assert "from step 4000" in text
    flat = {**base, "main_gl_wide_nmin": 0.4, "main_nhalf_wide": 20.0, "main_rp_cross_dip": 0.9,
            "main_hist_steps_memorized": float("nan")}  # fmt: skip
    text = R.narrative(flat, "main", "Fashion-MNIST")
    assert "not every width memorizes" in text and "does not get there later" in text and "no dip" in text
    assert "At no sampled step" in text


def test_optimal_narrative_follows_the_numbers():
    grid = {"width": [16, 16, 32, 32], "n": [16, 256, 16, 256]}
    rp = pd.DataFrame({"order": 1, **grid, "rp": [0.6, 0.2, 0.6, 0.0]})
    gl = pd.DataFrame({"width": [16, 16, 32, 32], "n": [16, 256, 16, 256], "gl": [0.05, 1.0, 0.04, 1.0]})
    text = R.optimal_narrative(rp, gl, "panel")
    assert "width 16: 0.60 at N = 16 (GL 0.05) and 0.20 at N = 256 (GL 1.00)" in text
    assert "falls with N for every width" in text and "stays at up to 0.20" in text
    assert "reaches about 0" in R.optimal_narrative(rp.assign(rp=[0.6, 0.0, 0.6, 0.01]), gl, "panel")
