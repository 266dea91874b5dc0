"""The ``smoke`` profile: every figure notebook on the ``paper`` profile's code path at toy size.

Each notebook runs under papermill with ``-p profile smoke`` (its inputs are the assets of
``nbhelpers.smoke``) and is checked for structure only: no error, every grid cell in the run store,
scores in range, figures drawn, results rows written. The papers' claims are checked in the
``companion`` and ``paper`` profiles.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from nbhelpers import profiles, smoke
from nbhelpers.runs import RunStore

pytestmark = [pytest.mark.notebook, pytest.mark.slow]

NOTEBOOK_DIR = profiles.repo_root() / "notebooks"
SCORE = re.compile(r"^(GL|pairwise RP|RP vs|RP between|MAE score|rank ratio|copy criterion|same criterion)")
DIFFERENCE = re.compile(r"minus|falls|wider")  # differences of scores, in [-1, 1] or log units


@pytest.fixture
def assets(monkeypatch):
    """The smoke assets, one thread per kernel (two notebooks share the 2 CI cores under -n 2), and
    the kernel's own inline backend, so that figures are drawn into the notebook (CI sets Agg)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return smoke.ensure_assets()


def smoke_params(notebook: str, **injected) -> profiles.Params:
    """The parameters a smoke run of ``notebook`` resolves to (defaults < smoke YAML < injected)."""
    return profiles.Params(
        {**profiles.notebook_defaults(notebook), **profiles.load_profile(notebook, "smoke"), **injected}
    )


def execute(notebook: str, tmp_path, **params) -> dict:
    """Run ``notebooks/<notebook>.ipynb`` with the smoke profile as build_book does (cwd notebooks/)."""
    import papermill

    out = tmp_path / f"{notebook}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK_DIR / f"{notebook}.ipynb"),
        str(out),
        kernel_name="python3",
        cwd=str(NOTEBOOK_DIR),
        progress_bar=False,
        parameters={"profile": "smoke", **params},
    )
    nb = json.loads(out.read_text(encoding="utf-8"))
    outputs = [o for c in nb["cells"] for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join("".join(o.get("text", "")) for o in outputs if o.get("name") == "stdout")
    assert "profile: smoke" in text
    nb["figures"] = sum("image/png" in o.get("data", {}) for o in outputs)
    return nb


def check_results(path, notebook: str) -> list[dict]:
    """The results file exists, names the notebook and profile, and every score lies in [0, 1]."""
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["notebook"] == notebook and data["profile"] == "smoke" and data["rows"]
    for row in data["rows"]:
        assert {
            "quantity",
            "setting",
            "measured",
            "paper",
            "check",
            "passed",
            "kind",
            "margin",
            "note",
        } <= set(row)
        value = row["measured"]
        if (
            SCORE.match(row["quantity"])
            and not DIFFERENCE.search(row["quantity"])
            and isinstance(value, float)
        ):
            assert not math.isnan(value) and 0 <= value <= 1, row
    return data["rows"]


def check_cells(root, configs) -> list[tuple[dict, dict]]:
    """Every config of the grid is a finished cell of the run store at ``root``; (config, cell) pairs."""
    store = RunStore(root)
    missing = [c for c in configs if not store.done(c)]
    assert not missing, f"{len(missing)} of {len(configs)} grid cells missing"
    return [(c, store.load(c)) for c in configs]


def test_regimes_and_optimal_denoiser(tmp_path, assets):
    """Teacher pickle -> prepare_teacher_dataset -> VP students with augmentation and dropout -> SSCD."""
    from nbhelpers.checkpoints import load_network
    from nbhelpers.data import load_images
    from nbhelpers.experiments import regimes

    shared = dict(runs_dir=str(tmp_path / "runs"), dataset_path=str(tmp_path / "teacher.zip"))
    nb = execute("regimes", tmp_path, results_json=str(tmp_path / "regimes.json"), **shared)
    P = smoke_params("regimes", **shared)
    images, _ = load_images(P.dataset_path)  # made by the teacher through prepare_teacher_dataset
    assert images.shape == (P.teacher_images, 3, 8, 8)
    panels = regimes.panels(P)
    cells = check_cells(P.runs_dir, regimes.train_configs(P))  # the main panel: teacher images, SSCD
    check_cells(P.runs_dir, [c for p in panels.values() for c in regimes.train_configs(p)])
    for _, c in cells:
        a = c["arrays"]
        assert (
            a["features"].shape[0] == len(a["samples"]) and ((a["max_cos"] >= -1) & (a["max_cos"] <= 1)).all()
        )
    net = load_network(f"{cells[0][1]['dir']}/network.nbh")
    assert type(net).__name__ == "VPPrecond" and net.model.map_augment is not None
    assert {(c["train"]["dropout"], c["train"]["augment_p"]) for c, _ in cells} == {(0.13, 0.12)}
    assert nb["figures"] >= 2
    rows = check_results(tmp_path / "regimes.json", "regimes")
    main = next(iter(panels))
    assert {
        r["setting"] for r in rows if r["quantity"].startswith("GL,") and r["setting"].startswith(main)
    } == {f"{main}, width {w}, N={n}" for w in P.widths for n in (min(P.dataset_sizes), max(P.dataset_sizes))}
    assert {r["kind"] for r in rows} == {"sanity", "phenomenon"}

    nb = execute("optimal_denoiser", tmp_path, results_json=str(tmp_path / "optimal.json"), **shared)
    P = smoke_params("optimal_denoiser", **shared)
    check_cells(
        P.runs_dir,
        [c for p in regimes.panels(P).values() for c in regimes.optimal_configs(p, P.optimal_orders)],
    )
    assert nb["figures"] >= 1
    check_results(tmp_path / "optimal.json", "optimal_denoiser")


def test_model_similarity(tmp_path, assets):
    """Five model settings on an EDM image zip, two outside sample sources, SSCD from a TorchScript file."""
    from nbhelpers.experiments import similarity as sim

    runs = str(tmp_path / "runs")
    nb = execute("model_similarity", tmp_path, runs_dir=runs, results_json=str(tmp_path / "sim.json"))
    P = smoke_params("model_similarity", runs_dir=runs)
    configs = sim.model_configs(P)
    check_cells(runs, list(configs.values()))
    cached = sorted(p.name for p in (tmp_path / "runs" / "features").glob("*-sscd-*.npz"))
    assert len(cached) == len(configs) + len(P.outside_samples), cached
    assert sum(name.startswith("edm-teacher") for name in cached) == 2
    assert nb["figures"] >= 2
    check_results(tmp_path / "sim.json", "model_similarity")


def test_jacobian_rank(tmp_path, assets):
    """The real-image panel from EDM snapshot pickles given by path, and the MoLRG panel."""
    from nbhelpers.experiments import jacobian_rank

    runs = str(tmp_path / "runs")
    nb = execute("jacobian_rank", tmp_path, runs_dir=runs, results_json=str(tmp_path / "rank.json"))
    P = smoke_params("jacobian_rank", runs_dir=runs)
    cells = check_cells(runs, jacobian_rank.rank_configs(P))
    real = [c for c, _ in cells if c["model"] == "checkpoint"]
    assert len(real) == len(P.checkpoints) == 2
    for _, c in cells:
        ratio = c["arrays"]["rank_ratio"]
        low = 0 if c["model"] == "optimal" else 1e-12  # D* has rank 0 where it returns a training point
        assert len(ratio) and ((ratio >= low) & (ratio <= 1)).all()
    assert nb["figures"] >= 2
    rows = check_results(tmp_path / "rank.json", "jacobian_rank")
    assert any(r["setting"] == "real images" for r in rows)


def test_molrg_phase_transition(tmp_path, assets):
    from nbhelpers.experiments import phase_transition as pt

    runs = str(tmp_path / "runs")
    nb = execute("molrg_phase_transition", tmp_path, runs_dir=runs, results_json=str(tmp_path / "pt.json"))
    P = smoke_params("molrg_phase_transition", runs_dir=runs)
    grid = (
        pt.lowrank_configs(P)
        + list(pt.variant_configs(P).values())
        + pt.unet_configs(P)
        + pt.length_configs(P)
    )
    check_cells(runs, grid)
    assert nb["figures"] >= 1
    check_results(tmp_path / "pt.json", "molrg_phase_transition")
