"""The regimes experiment module at toy scale, the paper-profile dry run, and the shared plotting look."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from nbhelpers import plotting, profiles  # noqa: E402
from nbhelpers.experiments import cells  # noqa: E402
from nbhelpers.experiments import regimes as R  # noqa: E402
from nbhelpers.runs import RunStore  # noqa: E402

TOY = dict(
    dataset="molrg", molrg_classes=2, molrg_dim=8, resolution=4, channels=3, data_seed=0, pool_size=64,
    dataset_path="", dataset_sizes=[4, 16], widths=[4, 8], width_key="model_channels", train_seeds=[0, 1],
    arch="ddpmpp", precond="edm",
    network={"channel_mult": [1], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "augment_dim": 0},
    train={"total_steps": 4, "lr": 2e-3, "lr_rampup_kimg": 0, "ema_beta": 0.9}, batch_size=8, batch_at_most_n=True,
    num_steps=4, sigma_min=0.002, sigma_max=80.0, rho=7.0, sampler_order=2, eval_seeds="100000-100015",
    sample_batch=16, backend="pixel", sscd="", sscd_resize=320, optimal_chunk=32,
)  # fmt: skip


def test_pool_is_nested_fixed_and_fresh_samples_are_new():
    spec = R.data_spec(TOY)
    pool = R.load_pool(spec)
    assert pool.shape == (64, 3, 4, 4) and pool.dtype == torch.float32
    assert torch.equal(R.training_set(spec, 16), pool[:16])
    assert torch.equal(cells.molrg_draw(spec, 64, seed=1), cells.molrg_draw(spec, 64, seed=1))
    fresh = R.fresh_samples(spec, 32)
    d = torch.cdist(fresh.reshape(32, -1).double(), pool.reshape(64, -1).double())
    assert d.min() > 1e-3  # no fresh sample is a pool point
    # every point lies on one of the K subspaces
    assert R.off_subspace_distance(pool.numpy(), spec).max() < 1e-5
    with pytest.raises(ValueError, match="pool"):
        R.training_set(spec, 65)
    with pytest.raises(ValueError, match="pool_size"):
        R.data_spec({**TOY, "dataset_sizes": [128]})
    with pytest.raises(ValueError, match="unknown dataset"):
        R.data_spec({**TOY, "dataset": "mnist"})


def test_image_sources_use_the_pool_and_the_images_after_it(tmp_path):
    from nbhelpers.data import write_dataset

    images = np.random.default_rng(0).integers(0, 256, (20, 3, 8, 8), dtype=np.uint8)
    path = write_dataset(images, tmp_path / "set.zip")
    spec = R.data_spec({**TOY, "dataset": "images", "dataset_path": str(path), "pool_size": 12,
                        "dataset_sizes": [4, 12]})  # fmt: skip
    assert spec == {"source": "images", "path": str(path), "pool_size": 12}
    np.testing.assert_array_equal(R.training_set(spec, 4).numpy(), images[:4])
    np.testing.assert_array_equal(R.fresh_samples(spec, 5).numpy(), images[12:17])
    x = R.to_model_space(R.training_set(spec, 4))
    assert x.dtype == torch.float64 and -1 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="dataset_path"):
        R.data_spec({**TOY, "dataset": "images"})


def test_train_configs_cover_the_grid_with_distinct_keys():
    from nbhelpers.runs import config_key

    configs = R.train_configs(TOY)
    assert len(configs) == 2 * 2 * 2
    assert len({config_key(c) for c in configs}) == len(configs)
    assert {c["train"]["batch_size"] for c in configs if c["n"] == 4} == {4}
    assert {c["train"]["batch_size"] for c in configs if c["n"] == 16} == {8}
    assert configs[0]["width"] == 8  # widest first
    assert all(c["train"]["network"]["model_channels"] == c["width"] for c in configs)
    opt = R.optimal_configs(TOY, orders=(1, 2))
    assert sorted((c["n"], c["sampler"]["order"]) for c in opt) == [(4, 1), (4, 2), (16, 1), (16, 2)]
    with pytest.raises(ValueError, match="unsupported keys"):
        R.train_configs({**TOY, "train": {"total_steps": 4, "bogus": 1}})
    with pytest.raises(ValueError, match="backend"):
        R.train_configs({**TOY, "backend": "clip"})


def test_nearest_two_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, 2, 2, generator=g), torch.randn(50, 3, 2, 2, generator=g)
    st = R.nearest_two(x, y, chunk=7)
    d = torch.cdist(x.reshape(20, -1).double(), y.reshape(50, -1).double())
    best = d.sort(1)
    np.testing.assert_allclose(st["nn_dist"], best.values[:, :2].numpy(), rtol=1e-12)
    np.testing.assert_array_equal(st["nn_index"], best.indices[:, 0].numpy())
    np.testing.assert_allclose(
        st["nn_norm"], y.reshape(50, -1).double().norm(dim=1)[best.indices[:, 0]].numpy()
    )
    one = R.nearest_two(x, y[:1])
    assert np.isinf(one["nn_dist"][:, 1]).all()


def test_calibration_separates_fresh_samples_from_noisy_copies():
    spec = R.data_spec(TOY)
    t, table, distances = R.calibrate(spec, [4, 16, 64], fresh=400, copy_noise=0.1)
    assert 0 < t < 1
    assert (table["false_copy"] <= 0.01).all() and (table["true_copy"] >= 0.99).all()
    assert (table["unrelated_pairs"] <= 0.01).all()
    assert set(distances["kind"]) == {"fresh samples", "noisy copies"} and len(distances) == 3 * 2 * 400
    # the threshold is the largest 2-decimal value that keeps fresh samples below 1% at every size
    worst = distances[distances["kind"] == "fresh samples"].groupby("n")["rel"]
    assert all((g <= t).mean() <= 0.01 for _, g in worst)
    assert any((g <= t + 0.01).mean() > 0.01 for _, g in worst)


def _cell(n, width, seed, samples, train, **extra):
    st = R.nearest_two(torch.as_tensor(samples), torch.as_tensor(train))
    return {"n": n, "width": width, "seed": seed, "arrays": {"samples": np.asarray(samples), **st}, **extra}


def test_tables_and_criterion_on_synthetic_cells():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
    copies = train[rng.integers(0, 8, 10)] * 1.01  # memorized: near-exact copies
    novel = rng.standard_normal((10, 3, 2, 2)).astype(np.float32) * 3  # far from every training point
    crit = R.Criterion("relative", 0.2)
    cells = [_cell(8, 4, 0, copies, train), _cell(8, 8, 0, copies, train), _cell(64, 4, 0, novel, train),
             _cell(64, 8, 0, novel + 0.01, train)]  # fmt: skip
    gl = R.gl_table(cells, crit)
    assert gl.set_index(["n", "width"])["gl"].to_dict() == {
        (8, 4): 0.0,
        (8, 8): 0.0,
        (64, 4): 1.0,
        (64, 8): 1.0,
    }
    rp = R.pairwise_rp_table(cells, crit)
    assert list(rp["pair"]) == ["4 vs 8", "4 vs 8"] and list(rp["rp"]) == [1.0, 1.0]
    opt = [{"n": 8, "order": 1, "arrays": {"samples": copies, **R.nearest_two(torch.as_tensor(copies), torch.as_tensor(train))}},
           {"n": 64, "order": 1, "arrays": {"samples": copies, **R.nearest_two(torch.as_tensor(copies), torch.as_tensor(train))}}]  # fmt: skip
    ro = R.rp_optimal_table(cells, opt, crit)
    assert ro.groupby("n")["rp"].mean().to_dict() == {8: 1.0, 64: 0.0}
    assert R.optimal_gl_table(opt, crit)["gl"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        R.Criterion("l1", 0.1)
    cos = R.Criterion("cosine", 0.6)
    a = {"arrays": {"features": np.eye(3, dtype=np.float16), "max_cos": np.array([0.9, 0.5, 0.61])}}
    b = {"arrays": {"features": np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float16)}}
    assert cos.same(a, b).tolist() == [True, False, True]
    assert cos.memorized(a).tolist() == [True, False, True]


def test_n_half_mean_sd_and_wide():
    t = pd.DataFrame(
        {"n": [8, 16, 32] * 2, "width": [4] * 3 + [8] * 3, "seed": 0, "gl": [0, 0.25, 0.75, 0, 0, 1.0]}
    )
    h = R.n_half(t).set_index("width")["n_half"]
    assert h[4] == pytest.approx(2 ** (4 + 0.5)) and h[8] == pytest.approx(2 ** (4 + 0.5))
    assert math.isnan(R.n_half(t.assign(gl=0.0))["n_half"].iloc[0])
    two = pd.concat([t, t.assign(seed=1, gl=t["gl"] + 0.1)])
    table = R.mean_sd(two, "n", "width", "gl")
    assert table.loc[8, 4] == "0.05 ± 0.07" and R.mean_sd(t, "n", "width", "gl").loc[32, 8] == "1.00"
    assert list(R.wide(R.paper_gl(), "n", "model", "gl").columns) == ["UNet-64", "UNet-128", "UNet-256"]


def test_checks_pass_on_the_paper_shape_and_fail_otherwise():
    sizes = [8, 32, 128]
    gl = pd.DataFrame([{"n": n, "width": w, "seed": 0, "gl": v} for w in (4, 8)
                       for n, v in zip(sizes, [0.05, 0.5, 0.95])])  # fmt: skip
    rp = pd.DataFrame(
        [{"n": n, "pair": "4 vs 8", "seed": 0, "rp": v} for n, v in zip(sizes, [0.7, 0.3, 0.8])]
    )
    rows = R.regime_checks(gl, rp)
    assert all(r["passed"] for r in rows) and len(rows) == 4 + 3
    bad = R.regime_checks(gl.assign(gl=0.5), rp.assign(rp=0.7))
    assert sum(not r["passed"] for r in bad) == 2 + 2 + 1  # both GL ends for both widths, and the missing dip
    assert {r["setting"] for r in bad if not r["passed"]} >= {"width 4, N=8", "width 8, N=8"}
    ro = pd.DataFrame(
        [{"n": n, "width": 4, "seed": 0, "order": 1, "rp": v} for n, v in zip(sizes, [0.5, 0.2, 0.0])]
    )
    og = pd.DataFrame([{"n": n, "order": 1, "gl": 0.0} for n in sizes])
    assert all(r["passed"] for r in R.optimal_checks(ro, og))
    rising = ro.assign(rp=[0.5, 0.6, 0.0])
    assert not all(r["passed"] for r in R.optimal_checks(rising, og))


@pytest.mark.slow
def test_cells_run_in_a_store_and_resume(tmp_path):
    store = RunStore(tmp_path / "runs")
    configs = [c for c in R.train_configs(TOY) if c["seed"] == 0 and c["width"] == 4]
    cells = store.run_grid(configs, R.run_train_cell, workers=1, progress=False)
    for c in cells:
        a = c["arrays"]
        assert a["samples"].shape == (16, 3, 4, 4) and a["samples"].dtype == np.float32
        assert a["nn_dist"].shape == (16, 2) and a["off_subspace"].shape == (16,)
        assert c["steps"] == 4 and (tmp_path / "runs" / c["dir"].split("/")[-1] / "network.pkl").exists()
    again = store.run_grid(configs, R.run_train_cell, workers=1, progress=False)  # loaded, not re-run
    assert [c["train_seconds"] for c in again] == [c["train_seconds"] for c in cells]
    opt = store.run_grid(R.optimal_configs(TOY, orders=(1,)), R.run_optimal_cell, workers=1, progress=False)
    crit = R.Criterion("relative", 0.3)
    # the optimal denoiser returns training points: every sample is a copy
    assert R.optimal_gl_table(opt, crit)["gl"].max() == 0.0
    assert np.allclose(opt[0]["arrays"]["nn_dist"][:, 0], 0, atol=1e-4)
    same_noise = [c for c in cells if c["n"] == 4]
    ro = R.rp_optimal_table(same_noise, opt, crit)
    assert len(ro) == 1 and 0 <= ro["rp"].iloc[0] <= 1


def _profile_params(notebook: str, profile: str) -> dict:
    return {**profiles.notebook_defaults(notebook), **profiles.load_profile(notebook, profile)}


@pytest.mark.parametrize("notebook", ["regimes", "optimal_denoiser"])
def test_paper_profile_dry_run_builds_every_config(notebook):
    P = _profile_params(notebook, "paper")
    configs = R.train_configs(P)
    assert len(configs) == 10 * 3
    plan = R.validate_configs(configs)
    assert sorted(plan["n"].unique()) == [2**k for k in range(6, 16)]
    assert sorted(plan["width"].unique()) == [64, 128, 256]
    assert (plan["batch_size"] == 128).all() and np.allclose(plan["kimg"], 50000, rtol=1e-3)
    assert (plan["eval_seeds"] == 10000).all()
    c = configs[0]
    assert c["data"]["source"] == "images" and c["data"]["pool_size"] == 32768
    assert c["train"]["precond"] == "vp" and c["train"]["augment_p"] == 0.12 and c["train"]["dropout"] == 0.13
    assert c["features"] == {"backend": "sscd", "model": P["sscd"], "resize": 320}
    assert c["sampler"] == {"num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "order": 2}
    if notebook == "optimal_denoiser":
        assert len(R.optimal_configs(P, P["optimal_orders"])) == 10 * len(P["optimal_orders"])


def test_both_notebooks_share_the_sweep_parameters():
    for profile in ("companion", "ci", "paper"):
        a = (
            _profile_params("regimes", profile)
            if profile != "companion"
            else profiles.notebook_defaults("regimes")
        )
        b = (_profile_params("optimal_denoiser", profile) if profile != "companion"
             else profiles.notebook_defaults("optimal_denoiser"))  # fmt: skip
        shared = set(a) & set(b)
        assert shared >= {"dataset_sizes", "widths", "train", "runs_dir", "eval_seeds"}
        assert {k: a[k] for k in shared if k != "results_json"} == {
            k: b[k] for k in shared if k != "results_json"
        }
        assert R.train_configs(a) == R.train_configs(b)


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
        assert len(labels) == 3 and all(t.rstrip(".") and t.rstrip(".") in n for t, n in
                                        zip(labels, ["memorization", "generalization", "transition"]))  # fmt: skip
        badge = plotting.profile_badge(fig, "ci")
        assert badge.get_text() == "profile: ci"
        ax2 = plotting.annotated_heatmap(np.array([[1, 0.5], [0.5, 1]]), ["a", "b"], triangle="upper")
        assert len([t for t in ax2.texts if t.get_text()]) == 3
        with pytest.raises(ValueError, match="labels"):
            plotting.annotated_heatmap(np.eye(2), ["a"])
        ax3 = plotting.image_grid(np.zeros((5, 1, 4, 4), dtype=np.uint8), nrow=2)
        assert ax3.images[0].get_array().shape == (2 * 5 + 1, 3 * 5 + 1)
        plt.close("all")
