"""Tests of the model-similarity experiment: paper matrices, configs, outside samples, caches, matrices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from nbhelpers.experiments import similarity as sim
from nbhelpers.features import FeatureSet
from nbhelpers.sampling import save_images


def _params(**kw):
    p = {
        "dataset": "molrg",
        "dataset_path": "",
        "molrg_classes": 2,
        "molrg_dim": 2,
        "resolution": 4,
        "channels": 3,
        "data_seed": 0,
        "num_train": 64,
        "models": [
            {"name": "MLP a", "arch": "mlp", "precond": "edm", "seed": 0},
            {"name": "MLP b", "arch": "mlp", "precond": "vp", "seed": 1},
        ],
        "arch_network": {"mlp": {"hidden_dim": 16, "num_layers": 1, "emb_dim": 8}},
        "train": {
            "total_steps": 3,
            "batch_size": 16,
            "lr": 0.001,
            "lr_rampup_kimg": 0,
            "ema_halflife_kimg": 1,
        },
        "eval_seeds": "0-7",
        "sample_batch": 8,
        "num_steps": 18,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
        "sampler_order": 2,
        "backend": "relative",
        "calibration_pairs": 400,
        "near_noise": 0.03,
        "max_false_rate": 0.01,
        "rp_threshold": None,
        "mae_threshold": None,
        "diagnostic_count": 8,
        "reference": True,
        "molrg_panel": {},
    }
    p.update(kw)
    return p


def _source(name, x, seeds, origin="test"):
    return sim.SampleSource(name, np.asarray(x), np.asarray(seeds), origin=origin, key=f"k-{name}")


def _uint8(n, seed=0, shape=(3, 4, 4)):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# ----------------------------------------------------------------------------
# The authors' numbers.


def test_paper_matrices_match_reference():
    rp, mae = sim.paper_rp_matrix(), sim.paper_mae_matrix()
    for m in (rp, mae):
        assert list(m.index) == sim.PAPER_MODELS == list(m.columns)
        np.testing.assert_array_equal(m.to_numpy(), m.to_numpy().T)
        np.testing.assert_array_equal(np.diag(m.to_numpy()), 1.0)
    assert rp.loc["DDPMv4", "DDPMv6"] == 0.89 and rp.loc["CT", "Progressivev1"] == 0.91
    assert rp.loc["UViT", "CT"] == 0.70 and mae.loc["UViT", "CT"] == 0.68
    assert mae.loc["Progressivev1", "DDPMv4"] == 0.88
    off = sim.off_diagonal(rp)
    assert len(off) == 42 and off.min() == 0.70 and off.max() == 0.91


# ----------------------------------------------------------------------------
# Configs.


def test_model_configs_and_errors():
    cfgs = sim.model_configs(_params())
    assert list(cfgs) == ["MLP a", "MLP b"]
    a = cfgs["MLP a"]
    assert a["kind"] == sim.KIND_MODEL and a["train"]["network"] == {
        "hidden_dim": 16,
        "num_layers": 1,
        "emb_dim": 8,
    }
    assert a["train"]["precond"] == "edm" and cfgs["MLP b"]["train"]["seed"] == 1
    assert sim.reference_config(_params())["kind"] == sim.KIND_REFERENCE
    table = sim.validate_configs(cfgs)
    assert list(table["steps"]) == [3, 3] and (table["params"] > 0).all()
    vp = table.set_index("model").loc["MLP b"]
    assert vp["sigma_first"] == pytest.approx(80.0) and vp["sigma_last"] == pytest.approx(0.002)
    assert sim.model_configs(_params(models=[])) == {}  # outside samples only
    assert sim.cells_table({}).empty and "sigma_last" in sim.cells_table({}).columns
    dup = _params(models=[{"name": "x", "arch": "mlp", "precond": "edm", "seed": 0}] * 2)
    with pytest.raises(ValueError, match="used twice"):
        sim.model_configs(dup)
    with pytest.raises(ValueError, match="unknown keys"):
        sim.model_configs(_params(train={"total_steps": 3, "bogus": 1}))
    assert list(sim.grid(_params())) == ["MLP a", "MLP b", sim.REFERENCE_NAME]
    with pytest.raises(ValueError, match="lacks"):
        sim.model_configs(_params(models=[{"name": "x", "arch": "mlp"}]))
    with pytest.raises(ValueError, match="dataset_path"):
        sim.data_spec(_params(dataset="images"))


def test_ve_schedule_is_clamped_to_its_range():
    from nbhelpers.networks import make_network

    net = make_network("mlp", "ve", 4, 3, hidden_dim=8, num_layers=1, emb_dim=8)
    from nbhelpers.experiments import cells

    r = sim.sigma_range(net, cells.sampler_spec(_params()))
    assert r["sigma_first"] == pytest.approx(80.0) and r["sigma_last"] == pytest.approx(0.02)


# ----------------------------------------------------------------------------
# Thresholds.


def test_rp_and_mae_criteria_are_calibrated_on_unrelated_pairs():
    rp, mae = sim.calibrate(_params())
    assert rp.criterion.statistic == "relative" and mae.criterion.statistic == "mae"
    for cal in (rp, mae):
        assert cal.table["null_rate"].iloc[0] <= 0.01 and cal.table["control_rate"].iloc[0] >= 0.99
    fixed, _ = sim.calibrate(_params(rp_threshold=0.25))
    assert fixed.threshold == 0.25


# ----------------------------------------------------------------------------
# Outside samples.


@pytest.mark.parametrize("kind", ["folder", "zip", "subdirs"])
def test_load_sample_folder(tmp_path, kind):
    images, seeds = _uint8(5), [3, 1, 1004, 7, 2]
    out = tmp_path / ("s.zip" if kind == "zip" else "s")
    save_images(images, seeds, out, subdirs=kind == "subdirs")
    src = sim.load_sample_folder("outside", out)
    order = np.argsort(src.seeds)
    np.testing.assert_array_equal(src.seeds[order], sorted(seeds))
    np.testing.assert_array_equal(src.samples[order], images[np.argsort(seeds)])
    assert src.key.startswith("outside-") and src.origin == str(out)


def test_load_sample_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        sim.load_sample_folder("x", tmp_path / "missing")
    save_images(_uint8(2), ["cat", "dog"], tmp_path / "named")
    with pytest.raises(ValueError, match="distinct seeds"):
        sim.load_sample_folder("x", tmp_path / "named")


def test_check_same_seeds(tmp_path):
    x = _uint8(4)
    a, b = _source("a", x, [0, 1, 2, 3]), _source("b", x[::-1], [3, 2, 1, 0])
    np.testing.assert_array_equal(sim.check_same_seeds([a, b], expected=range(4)), [0, 1, 2, 3])
    c = _source("C-model", x, [0, 1, 2, 9], origin="/data/c.zip")
    with pytest.raises(ValueError, match=r"'C-model' \(/data/c.zip\) lacks 3 and has extra 9"):
        sim.check_same_seeds([a, c])
    with pytest.raises(ValueError, match="lacks 3"):
        sim.check_same_seeds([a, b, _source("d", x[:3], [0, 1, 2])], expected=range(4))
    with pytest.raises(ValueError, match="image shapes"):
        sim.check_same_seeds([a, _source("e", _uint8(4, shape=(1, 4, 4)), range(4))])
    with pytest.raises(ValueError, match="no sample sources"):
        sim.check_same_seeds([])


# ----------------------------------------------------------------------------
# Features and matrices.


def test_source_features_are_cached(tmp_path, monkeypatch):
    x = _uint8(6)
    src = _source("My model / VP", x, range(6))
    fs = sim.source_features(src, "pixel", tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("my-model-vp-pixel-")
    np.testing.assert_array_equal(FeatureSet.load(files[0]).seeds.numpy(), np.arange(6))

    def boom(*a, **k):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr("nbhelpers.features.extract_features", boom)
    again = sim.source_features(src, "pixel", tmp_path)
    torch.testing.assert_close(again.features, fs.features)
    rel = sim.source_features(src, "relative", tmp_path)
    torch.testing.assert_close(rel.features, torch.from_numpy(x).double().reshape(6, -1).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="backend"):
        sim.source_features(src, "bogus", tmp_path)


def test_matrices_pair_by_seed_with_bootstrap_errors(tmp_path):
    from nbhelpers import scores

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 4, generator=g) * 0.3
    y = x + 0.01 * torch.randn(50, 3, 4, 4, generator=g)  # nearly the same samples
    z = torch.randn(50, 3, 4, 4, generator=g) * 0.3  # unrelated
    h = torch.where(torch.arange(50)[:, None, None, None] < 25, y, z)  # half the same as x
    perm = torch.randperm(50, generator=g)
    sources = {
        "x": _source("x", x, range(50)),
        "y": _source("y", y[perm], perm),
        "z": _source("z", z, range(50)),
        "h": _source("h", h, range(50)),
    }
    feats = {k: sim.source_features(s, "relative", tmp_path) for k, s in sources.items()}
    rp, se = sim.score_matrix(feats, scores.Criterion("same", "relative", 0.2), boot=100)
    assert rp.loc["x", "y"] == 1.0 and rp.loc["y", "x"] == 1.0 and rp.loc["x", "z"] == 0.0
    assert rp.loc["x", "h"] == 0.5 and 0.03 < se.loc["x", "h"] < 0.12 and se.loc["x", "y"] == 0.0
    np.testing.assert_array_equal(np.diag(rp.to_numpy()), 1.0)
    mae, _ = sim.score_matrix(
        {k: sim.sorted_samples(s) for k, s in sources.items()}, scores.Criterion("same", "mae", 0.02), boot=10
    )
    assert mae.loc["x", "y"] == 1.0 and mae.loc["x", "z"] == 0.0
    cos, _ = sim.score_matrix(
        {k: sim.source_features(s, "pixel", tmp_path) for k, s in sources.items()},
        scores.Criterion("same", "cosine", 0.6),
        boot=10,
    )
    assert cos.loc["x", "y"] == 1.0 and cos.loc["z", "x"] == 0.0
    table = sim.summary_table(rp, mae, ["x", "y", "z"])
    assert table.loc["RP", "max"] == 1.0 and table.loc["RP", "paper min"] == 0.70
    rows = sim.similarity_checks(rp, se, ["x", "y", "z"], "toy", pd.DataFrame(), seeds=50)
    assert [r["passed"] for r in rows] == [True, False, False] and all(r["margin"] is not None for r in rows)
    with pytest.raises(ValueError, match="numbers of seeds"):
        sim.score_matrix({"x": x.numpy(), "w": x[:10].numpy()}, scores.Criterion("same", "mae", 0.1))


@pytest.mark.slow
def test_in_house_and_outside_models_in_one_matrix(tmp_path):
    from nbhelpers.runs import RunStore
    from nbhelpers.sampling import parse_seeds

    params = _params()
    configs = sim.model_configs(params)
    grid = list(configs.values()) + [sim.reference_config(params)]
    cells = RunStore(tmp_path / "runs").run_grid(grid, sim.run_cell, workers=1, progress=False)
    assert cells[0]["steps"] == 3 and cells[0]["arrays"]["samples"].dtype == np.float32
    sources = {n: sim.cell_source(n, c) for n, c in zip(configs, cells)}
    ref = sim.cell_source(sim.REFERENCE_NAME, cells[-1])
    sources[sim.REFERENCE_NAME] = ref
    # an outside code base: the reference's samples, quantised to PNGs in a zip, seeds in shuffled order
    images = (torch.from_numpy(ref.samples).double() * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()
    order = np.random.default_rng(0).permutation(len(images))
    save_images(images[order], [int(s) for s in ref.seeds[order]], tmp_path / "outside.zip")
    sources["outside"] = sim.load_sample_folder("outside", tmp_path / "outside.zip")
    seeds = sim.check_same_seeds(list(sources.values()), expected=parse_seeds(params["eval_seeds"]))
    assert list(seeds) == list(range(8))
    from nbhelpers import scores

    feats = {n: sim.source_features(s, "relative", tmp_path / "features") for n, s in sources.items()}
    rp, _ = sim.score_matrix(feats, scores.Criterion("same", "relative", 0.1), boot=10)
    assert rp.shape == (4, 4)
    assert rp.loc["outside", sim.REFERENCE_NAME] == 1.0  # quantisation alone keeps them the same
    mae, _ = sim.score_matrix(
        {n: sim.sorted_samples(s) for n, s in sources.items()}, scores.Criterion("same", "mae", 0.05), boot=10
    )
    assert mae.loc["outside", sim.REFERENCE_NAME] == 1.0
    assert sim.diagnostics_table(dict(zip(configs, cells))).shape == (2, len(sim.DIAGNOSTIC_SIGMAS))
    assert set(sim.cells_table(dict(zip(configs, cells))).columns) >= {"params", "sigma_first", "sigma_last"}
    # a folder missing one seed is a clear error
    save_images(images[:7], list(range(7)), tmp_path / "short")
    short = sim.load_sample_folder("short", tmp_path / "short")
    with pytest.raises(ValueError, match=r"'short' .* lacks 7"):
        sim.check_same_seeds([*sources.values(), short], expected=range(8))


def test_copy_quality_sees_support_and_copies():
    from nbhelpers import scores
    from nbhelpers.experiments import cells

    spec = sim.data_spec(_params())
    train = sim.training_data(spec)
    fresh = cells.fresh_samples(spec, 40)
    noise = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sources = {
        "copies": _source("copies", train[:40], range(40)),
        "fresh": _source("fresh", fresh, range(40)),
        "noise": _source("noise", noise, range(40)),
    }
    q = sim.copy_quality(sources, spec, scores.Criterion("copy", "relative", 0.05))
    assert q.loc["copies", "nearest training point (rel.)"] == 0.0 and q.loc["copies", "GL"] == 0.0
    assert q.loc["fresh", "nearest training point (rel.)"] > 0.1 and q.loc["fresh", "GL"] >= 0.95
    assert q.loc["fresh", "off-subspace (rel.)"] < 1e-5 and q.loc["noise", "off-subspace (rel.)"] > 0.5


def test_narrative_follows_the_numbers():
    names = ["A", "B", "C"]
    rp = pd.DataFrame(np.array([[1, 0.8, 0.9], [0.8, 1, 0.75], [0.9, 0.75, 1]]), index=names, columns=names)
    text = sim.narrative(rp, names, "panel", rp_min=0.7)
    assert "from 0.75 (B | C) to 0.90" in text and ": shown" in text
    assert "not shown" in sim.narrative(rp, names, "panel", rp_min=0.8)


def test_outliers_text_names_the_model_that_fails_at_high_noise():
    names = ["A", "B", "C"]
    diag = pd.DataFrame({"sigma 1": [0.3, 0.3, 0.35], "sigma 80": [0.6, 0.65, 6.5]}, index=names)
    rp = pd.DataFrame(np.array([[1, 0.8, 0.1], [0.8, 1, 0.2], [0.1, 0.2, 1]]), index=names, columns=names)
    text = sim.outliers_text(diag, rp, names)
    assert "**C**: denoising error 6.50 at sigma 80" in text and "mean RP to the other models is 0.15" in text
    assert "A" not in text.split("**C**")[0].replace("Models that fail", "")
    assert text.startswith("Models that fail")
    assert "No model" in sim.outliers_text(diag.assign(**{"sigma 80": 0.6}), rp, names)
