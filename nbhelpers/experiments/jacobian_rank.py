"""Jacobian rank of denoisers against SNR (P2 Fig. 3; ``jacobian_rank.ipynb``).

``run_rank_cell`` is the grid cell (:meth:`nbhelpers.runs.RunStore.run_grid`): it builds or trains one
denoiser and tabulates the effective rank of its Jacobian along sampling trajectories (the authors'
procedure) or on a sigma grid. Models: a released EDM checkpoint; a U-Net trained on downscaled
Fashion-MNIST; on MoLRG the closed-form posterior mean, P2's low-rank model (trained with the
diffusion loss from random starts, the restart with the lowest training loss kept) and a U-Net (with its
profile at earlier training steps and the GL of its samples there); and, as the memorization reference,
the empirical optimal denoiser D* of a training set, whose Jacobian has the closed form
J = Cov_w(y) / sigma^2 (the posterior covariance of the training points; :func:`optimal_jacobian`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import model_space
from ..jacobian import AUTHORS_SNR_GRID, effective_rank
from ..losses import EDMLoss
from ..scores import share_se
from . import cells, paper

KIND_RANK = "jacobian-rank"
VERSION = 1

# The authors' numbers (P2 Fig. 3), kept in paper.py with every chapter's; named here for the notebook.
PAPER_REAL, PAPER_REAL_N = paper.P2_RANK_REAL, paper.P2_RANK_REAL_N
PAPER_MOLRG_UNET, PAPER_MOLRG_LOWRANK = paper.P2_RANK_MOLRG_UNET, paper.P2_RANK_MOLRG_LOWRANK
PAPER_MOLRG_N, PAPER_MOLRG_K = paper.P2_RANK_MOLRG_N, paper.P2_RANK_MOLRG_K
PAPER_MOLRG_D = paper.P2_RANK_MOLRG_D


def paper_rank_table() -> pd.DataFrame:
    """The authors' rank ratios: columns ``panel`` ('real', 'molrg'), ``model``, ``snr``, ``low``,
    ``high``."""
    rows = [
        {"panel": "real", "model": "paper (real data)", "snr": s, "low": lo, "high": hi}
        for s, (lo, hi) in PAPER_REAL.items()
    ]
    rows += [
        {"panel": "molrg", "model": "paper U-Net", "snr": s, "low": v, "high": v}
        for s, v in PAPER_MOLRG_UNET.items()
    ]
    for s in AUTHORS_SNR_GRID:
        if s >= 1.67 or s <= 0.3:
            v = PAPER_MOLRG_LOWRANK["high_snr" if s >= 1.67 else "low_snr"]
            rows.append({"panel": "molrg", "model": "paper low-rank", "snr": s, "low": v, "high": v})
    return pd.DataFrame(rows)


def nearest_paper_snr(snr: float | np.ndarray, max_factor: float = 1.6) -> np.ndarray:
    """The paper's grid value nearest (in log) to each SNR, NaN when farther than ``max_factor``."""
    s = np.atleast_1d(np.asarray(snr, dtype=float))
    grid = np.asarray(AUTHORS_SNR_GRID)
    dist = np.abs(np.log(s[:, None]) - np.log(grid[None, :]))
    idx = dist.argmin(1)
    out = grid[idx].astype(float)
    out[dist[np.arange(len(s)), idx] > math.log(max_factor)] = np.nan
    return out


# ----------------------------------------------------------------------------
# The empirical optimal denoiser's Jacobian in closed form.


def optimal_jacobian(train: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Jacobian of D*(x; sigma) = sum_i w_i y_i, w = softmax(-||x - y_i||^2 / (2 sigma^2)), at each row of
    ``x`` (B, ...): (B, n, n) float64, J = (sum_i w_i y_i y_i^T - D* D*^T) / sigma^2 (symmetric, PSD).

    ``train`` (N, ...) in model space. d w_i / dx = w_i (y_i - D*) / sigma^2 gives the formula.
    """
    y = torch.as_tensor(train).reshape(len(train), -1).double()
    q = torch.as_tensor(x).reshape(len(x), -1).double().to(y.device)
    logits = -(torch.cdist(q, y).square()) / (2 * float(sigma) ** 2)
    w = torch.softmax(logits, dim=1)  # (B, N)
    mean = w @ y  # (B, n)
    second = torch.einsum("bi,ij,ik->bjk", w, y, y)
    return (second - mean[:, :, None] * mean[:, None, :]) / float(sigma) ** 2


def optimal_rank_profile(
    train: torch.Tensor, seeds: Sequence[int], rule: str, ratio: float, device: torch.device
) -> pd.DataFrame:
    """Rank profile of D* of ``train`` (N, C, R, R) along its own 18-step Heun trajectories from ``seeds``,
    columns as :func:`nbhelpers.jacobian.rank_profile` (point, seed, step, sigma, snr, rank, rank_ratio,
    n)."""
    from ..optimal import OptimalDenoiser
    from ..sampling import SeedNoise, edm_sampler

    net = OptimalDenoiser(train, device=device, dtype=torch.float64)
    latents = SeedNoise(list(seeds), device=device).randn(list(train.shape[1:]), dtype=torch.float32)
    with torch.no_grad():
        _, traj = edm_sampler(net, latents, return_trajectory=True)
    y = model_space(train, dtype=torch.float64)
    n = int(np.prod(train.shape[1:]))
    rows = []
    for step, (sigma, x_t, _) in enumerate(traj):
        if sigma <= 0:
            continue
        ev = torch.linalg.eigvalsh(optimal_jacobian(y, x_t, sigma)).clamp_min(0).flip(-1)
        for i, r in enumerate(effective_rank(ev, ratio=ratio, rule=rule).tolist()):
            rows.append(
                {
                    "point": i,
                    "seed": int(seeds[i]),
                    "step": step,
                    "sigma": float(sigma),
                    "snr": 1 / float(sigma),
                    "rank": int(r),
                    "rank_ratio": r / n,
                    "n": n,
                    "rule": rule,
                    "ratio": float(ratio),
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# Configs.


def _snr_grid(params: Mapping[str, Any]) -> list[float]:
    return [float(s) for s in (params["snr_grid"] or AUTHORS_SNR_GRID)]


def rank_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per model of the figure, from the notebook parameters.

    Real images: ``checkpoints`` (EDM .pkl paths/URLs) and, when ``image_train`` is non-empty, a U-Net
    trained on Fashion-MNIST at ``image_resolution`` with ``image_precond``. MoLRG: ``molrg_models``
    among 'closed_form', 'lowrank', 'unet'. With ``optimal_reference`` also D* of each trained model's
    training set. Points: ``points`` = 'trajectory' (the start of each step of the 18-step Heun sampler
    from ``rank_seeds``) or 'grid' (held-out clean points plus noise at sigma = 1/SNR, ``snr_grid`` or
    the authors' grid).
    """
    points = {
        "mode": str(params["points"]),
        "seeds": [int(s) for s in params["rank_seeds"]],
        "snr_grid": _snr_grid(params),
        "rule": str(params["rank_rule"]),
        "ratio": float(params["rank_ratio"]),
    }
    if points["mode"] not in ("trajectory", "grid"):
        raise ValueError(f"points must be 'trajectory' or 'grid', got {points['mode']!r}")
    base = {"kind": KIND_RANK, "version": VERSION, "points": points}
    configs = []
    for path in params["checkpoints"]:
        name = Path(str(path)).name.removesuffix(".pkl")
        configs.append(
            {**base, "panel": "real", "model": "checkpoint", "label": name, "checkpoint": str(path)}
        )
    spec = cells.fashion_mnist_spec(
        params["fashion_mnist"], params["image_resolution"], pool_size=params["image_count"]
    )
    r = int(params["image_resolution"])
    if params["image_train"]:
        train = cells.train_config(
            "ddpmpp", params["image_precond"], params["image_network"], params["image_train"]
        )
        configs.append(
            {
                **base,
                "panel": "real",
                "model": "unet",
                "data": spec,
                "train": train,
                "label": f"U-Net, Fashion-MNIST {r}x{r}",
            }
        )
        if params["image_probe"]:
            configs.append({**base, **_probe_config(params, train), "data": spec})
        if params["optimal_reference"]:
            configs.append(
                {
                    **base,
                    "panel": "real",
                    "model": "optimal",
                    "data": spec,
                    "label": f"{OPTIMAL_LABEL}, Fashion-MNIST {r}x{r}",
                }
            )
    mspec = cells.molrg_spec(
        params["molrg_classes"],
        params["molrg_dim"],
        params["molrg_resolution"],
        params["molrg_channels"],
        params["data_seed"],
        pool_size=params["molrg_classes"] * params["molrg_per_class"],
    )
    labels = {"closed_form": "closed-form", "lowrank": "low-rank model", "unet": "U-Net"}
    for model in params["molrg_models"]:
        if model not in labels:
            raise ValueError(f"unknown MoLRG model {model!r}; expected one of {sorted(labels)}")
        cfg = {**base, "panel": "molrg", "model": model, "label": labels[model], "data": mspec}
        if model == "unet":
            cfg["train"] = cells.train_config("ddpmpp", "edm", params["molrg_network"], params["molrg_train"])
            steps = sorted({int(s) for s in params["molrg_rank_steps"]})
            if steps:
                cfg["rank_steps"] = steps
                cfg["gl_samples"] = int(params["molrg_gl_samples"])
        if model == "lowrank":
            section = dict(params["lowrank_train"])
            cfg["train"] = cells.train_config("lowrank", "edm", {}, section)
            cfg["restarts"] = int(params["restarts"])
        configs.append(cfg)
    if params["optimal_reference"] and "unet" in params["molrg_models"]:
        configs.append(
            {
                **base,
                "panel": "molrg",
                "model": "optimal",
                "label": f"{OPTIMAL_LABEL} (MoLRG samples)",
                "data": mspec,
            }
        )
    # the longest trainings first (two workers: the MoLRG U-Net beside the image U-Nets); stable otherwise
    return sorted(configs, key=lambda c: -cells.num_steps(c["train"]) if c.get("model") == "unet" else 0)


PROBE_LABEL = "U-Net probe"  # label prefix of the high-noise probe (real images)
OPTIMAL_LABEL = "D*"  # label prefix of the empirical optimal denoiser (both panels)


def real_roles(labels: Iterable[str]) -> dict[str, list[str]]:
    """The real-image panel's labels by role, in order of first appearance: 'unet' (the EDM-recipe
    U-Nets), 'probe' (the high-noise probes) and 'optimal' (D*)."""
    labels = list(dict.fromkeys(labels))
    return {
        "unet": [lab for lab in labels if not lab.startswith((PROBE_LABEL, OPTIMAL_LABEL))],
        "probe": [lab for lab in labels if lab.startswith(PROBE_LABEL)],
        "optimal": [lab for lab in labels if lab.startswith(OPTIMAL_LABEL)],
    }


EDM_P_MEAN, EDM_P_STD = EDMLoss().P_mean, EDMLoss().P_std  # EDM's ln-sigma distribution (-1.2, 1.2)


def high_noise_share(snr: float, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD) -> float:
    """Share of EDM-loss draws, ln sigma ~ N(p_mean, p_std^2), at SNR <= ``snr`` (sigma >= 1/snr)."""
    from statistics import NormalDist

    return 1 - NormalDist(p_mean, p_std).cdf(math.log(1 / snr))


def matched_p_mean(
    kimg: float, reference_kimg: float, snr: float, p_mean: float = EDM_P_MEAN, p_std: float = EDM_P_STD
) -> float:
    """The P_mean of EDM's ln-sigma distribution (``p_std`` kept) at which ``kimg`` thousand noisy samples
    hold as many at SNR <= ``snr`` (sigma >= 1/snr) as ``reference_kimg`` drawn at (p_mean, p_std)."""
    from statistics import NormalDist

    z = math.log(1 / snr)
    tail = high_noise_share(snr, p_mean, p_std)  # of the reference
    share = tail * reference_kimg / kimg
    if not 0 < share < 1:
        raise ValueError(f"{kimg} kimg cannot hold the {tail * reference_kimg:.0f}k samples of the reference")
    return z - p_std * NormalDist().inv_cdf(1 - share)


def _probe_config(params: Mapping[str, Any], train: Mapping[str, Any]) -> dict[str, Any]:
    """The real-image probe: the chapter's U-Net trained ``image_probe['total_steps']`` steps with EDM's
    ln-sigma mean moved so that it sees as many samples at SNR <= ``image_probe['snr']`` as a model
    trained ``reference_kimg`` at EDM's (-1.2, 1.2)."""
    probe = params["image_probe"]
    if str(params["image_precond"]) != "edm" or train.get("loss") not in (None, "edm"):
        raise ValueError("image_probe moves the EDM loss's noise distribution: it needs image_precond 'edm'")
    steps, batch = int(probe["total_steps"]), int(train["batch_size"])
    pm = matched_p_mean(steps * batch / 1000, float(probe["reference_kimg"]), float(probe["snr"]))
    ptrain = {k: v for k, v in train.items() if k not in ("total_steps", "duration_kimg")}
    ptrain.update(total_steps=steps, loss_kwargs={"P_mean": round(pm, 4), "P_std": EDM_P_STD})
    r = int(params["image_resolution"])
    label = f"{PROBE_LABEL}, Fashion-MNIST {r}x{r}"
    return {"panel": "real", "model": "unet", "train": ptrain, "label": label, "probe": dict(probe)}


def probe_exposure(configs: Sequence[Mapping[str, Any]], snr: float, reference_kimg: float) -> pd.DataFrame:
    """Per trained real-image U-Net and the reference: kimg, the EDM ln-sigma mean and std, and how many
    thousand noisy samples fall at SNR <= ``snr``."""
    edm = {"P_mean": EDM_P_MEAN, "P_std": EDM_P_STD}
    rows = [{"model": f"reference ({reference_kimg:g} kimg)", "kimg": reference_kimg, **edm}]
    for c in configs:
        if c.get("panel") == "real" and c.get("model") == "unet":
            kw = {**edm, **c["train"].get("loss_kwargs", {})}
            kimg = cells.num_steps(c["train"]) * int(c["train"]["batch_size"]) / 1000
            rows.append({"model": c["label"], "kimg": kimg, **kw})
    t = pd.DataFrame(rows)
    t["share at SNR <= snr"] = [high_noise_share(snr, m, sd) for m, sd in zip(t.P_mean, t.P_std)]
    t["kimg at SNR <= snr"] = t.kimg * t["share at SNR <= snr"]
    return t


# ----------------------------------------------------------------------------
# Building the models and the rank cell.

DUMP_STEPS = 5000  # training-state dump interval of resumable U-Net trainings (minutes of CPU time)


def training_data(config: Mapping[str, Any]) -> torch.Tensor:
    """The training set of a config's data spec (MoLRG float points or Fashion-MNIST uint8 images)."""
    spec = config["data"]
    return cells.training_set(spec, spec["pool_size"])


def _held_out(config: Mapping[str, Any], count: int) -> torch.Tensor:
    x = cells.fresh_samples(config["data"], count)
    return model_space(x, dtype=torch.float64)


def _train_lowrank(config: Mapping[str, Any], x: torch.Tensor, device: torch.device) -> tuple[Any, dict]:
    """P2's low-rank model trained with the diffusion loss from ``restarts`` Gaussian random starts; the
    restart with the lowest training loss is kept."""
    from ..molrg import LowRankDenoiser, subspace_distance

    spec = config["data"]
    K, d = spec["num_classes"], spec["intrinsic_dim"]
    seed = int(config["train"].get("seed", 0))
    nets = [
        LowRankDenoiser(K, d, spec["resolution"], spec["channels"], generator=seed + r)
        for r in range(config["restarts"])
    ]
    t0 = time.perf_counter()
    trained, kept, facts = cells.train_restarts(config["train"], x, nets, device)
    truth = cells.make_molrg(spec).bases
    info = {
        "train_seconds": time.perf_counter() - t0,
        "kept_restart": kept,
        "restart_losses": [f["loss"] for f in facts],
        "restart_distances": [subspace_distance(n.orthonormal_bases(), truth)[1] for n in trained],
    }
    info["subspace_distance"] = info["restart_distances"][kept]
    return trained[kept], info


def build_rank_model(
    config: Mapping[str, Any], device: torch.device, work: Path | None = None
) -> tuple[Any, dict]:
    """The denoiser of a rank config and training facts (checkpoint, U-Net, closed form, low-rank model).

    A MoLRG U-Net with ``rank_steps`` trains resumably in ``work`` and leaves EMA snapshots there.
    """
    model = config["model"]
    if model == "checkpoint":
        from ..checkpoints import load_network

        return load_network(config["checkpoint"], device=device), {}
    if model == "closed_form":
        return cells.make_molrg(config["data"]).denoiser().to(device), {}
    x = training_data(config)
    if model == "lowrank":
        return _train_lowrank(config, x, device)
    steps = config.get("rank_steps", [])
    total = cells.num_steps(config["train"])
    if steps and (steps[-1] > total or steps[0] < 1):
        raise ValueError(f"molrg_rank_steps {steps} must lie in [1, total_steps = {total}]")
    extra = {"snapshot_steps": math.gcd(*steps, total), "state_dump_steps": DUMP_STEPS} if steps else {}
    return cells.train_model(config["train"], x, device, workdir=work if steps else None, **extra)


def _profile(model: Any, config: Mapping[str, Any], device: torch.device) -> pd.DataFrame:
    from ..jacobian import rank_profile

    pts = config["points"]
    kwargs = dict(rule=pts["rule"], ratio=pts["ratio"], device=device)
    if pts["mode"] == "trajectory":
        return rank_profile(model, seeds=pts["seeds"], trajectory=True, **kwargs)
    if config["model"] == "checkpoint":
        raise ValueError(f"{config['label']}: points='grid' needs clean data; use points='trajectory'")
    held_out = _held_out(config, len(pts["seeds"])).to(device)
    return rank_profile(
        model, clean=held_out, sigmas=[1 / s for s in pts["snr_grid"]], seeds=pts["seeds"], **kwargs
    )


def _history(net: Any, config: Mapping[str, Any], df: pd.DataFrame, work: Path, device: torch.device) -> dict:
    """The U-Net's rank profile and the copy statistic of its samples at each of ``rank_steps``."""
    from ..checkpoints import load_network
    from ..training import snapshot_path
    from .calibration import copy_scores

    total, batch = cells.num_steps(config["train"]), int(config["train"]["batch_size"])
    x = training_data(config)
    frames, copies = [], []
    for s in sorted({*config["rank_steps"], total}):  # the final model always ends the history
        model = net if s == total else load_network(snapshot_path(work, s * batch), device=device)
        frames.append((df if s == total else _profile(model, config, device)).assign(train_steps=s))
        if config.get("gl_samples", 0) > 0:  # is the model still generalizing? copies among its samples
            samples = cells.sample(model, cells.EDM_SAMPLER, range(config["gl_samples"]), 256, device)
            copies.append(pd.DataFrame({"train_steps": s, "rel": copy_scores(samples, x, "relative")}))
    hist = pd.concat(frames, ignore_index=True)
    cols = ("train_steps", "point", "sigma", "snr", "rank", "rank_ratio")
    arrays = {f"history_{c}": hist[c].to_numpy(dtype=float) for c in cols}
    if copies:
        c = pd.concat(copies, ignore_index=True)
        arrays.update(copies_train_steps=c["train_steps"].to_numpy(float), copies_rel=c["rel"].to_numpy())
    return arrays


def run_rank_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Build/train the model of ``config`` and store its rank profile (one row per point and sigma)."""
    from ..runs import work_dir

    device = cells.device()
    if config["model"] == "optimal":
        t0 = time.perf_counter()
        if config["points"]["mode"] != "trajectory":
            raise ValueError("D*: points='grid' is not supported; use points='trajectory'")
        pts = config["points"]
        df = optimal_rank_profile(training_data(config), pts["seeds"], pts["rule"], pts["ratio"], device)
        info = {"jacobian_seconds": time.perf_counter() - t0}
    else:
        work = work_dir(staging, config) if config.get("rank_steps") else None
        net, info = build_rank_model(config, device, work)
        t0 = time.perf_counter()
        df = _profile(net, config, device)
    cols = ("point", "sigma", "snr", "rank", "rank_ratio")
    arrays = {c: df[c].to_numpy(dtype=float) for c in cols}
    if config["model"] != "optimal" and config.get("rank_steps"):
        arrays.update(_history(net, config, df, work, device))
        info["jacobian_seconds"] = time.perf_counter() - t0
    elif config["model"] != "optimal":
        info["jacobian_seconds"] = time.perf_counter() - t0
    info["n"] = int(df["n"].iloc[0])
    return {"panel": config["panel"], "model": config["model"], "label": config["label"], **info}, arrays


# ----------------------------------------------------------------------------
# Tables.


def rank_table(cells_: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Tidy rank table: panel, model, label, n, point, sigma, snr, rank, rank_ratio."""
    frames = []
    for c in cells_:
        a = c["arrays"]
        frames.append(
            pd.DataFrame(
                {
                    "panel": c["panel"],
                    "model": c["model"],
                    "label": c["label"],
                    "n": c["n"],
                    **{k: a[k] for k in ("point", "sigma", "snr", "rank", "rank_ratio")},
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def rank_history(cells_: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rank profiles at several training steps (cells with ``rank_steps``): panel, label, n, train_steps,
    point, sigma, snr, rank, rank_ratio; empty when no cell has them."""
    frames = []
    cols = ("train_steps", "point", "sigma", "snr", "rank", "rank_ratio")
    for c in cells_:
        a = c.get("arrays", {})
        if "history_train_steps" in a:
            frames.append(
                pd.DataFrame(
                    {
                        "panel": c["panel"],
                        "label": c["label"],
                        "n": c["n"],
                        **{k: a[f"history_{k}"] for k in cols},
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=["panel", "label", "n", *cols])
    out = pd.concat(frames, ignore_index=True)
    out["train_steps"] = out["train_steps"].astype(int)
    return out


def rank_generalization(cells_: Sequence[Mapping[str, Any]], cal: Any) -> pd.DataFrame:
    """GL (share of samples that are not copies under the calibrated copy criterion ``cal`` of the
    training set, :func:`calibration.calibrate_copy`) of the U-Net at each step of its rank history,
    with its binomial standard error: columns label, train_steps, gl, gl_se, samples, threshold."""
    rows = []
    for c in cells_:
        a = c.get("arrays", {})
        if "copies_train_steps" not in a:
            continue
        t = pd.DataFrame({"train_steps": a["copies_train_steps"].astype(int), "rel": a["copies_rel"]})
        for s, g in t.groupby("train_steps"):
            gl = 1.0 - float(cal.criterion.flags(g.rel.to_numpy()).mean())
            se = share_se(gl, len(g))
            rows.append(
                {
                    "label": c["label"],
                    "train_steps": int(s),
                    "gl": gl,
                    "gl_se": se,
                    "samples": len(g),
                    "threshold": cal.threshold,
                }
            )
    return pd.DataFrame(rows, columns=["label", "train_steps", "gl", "gl_se", "samples", "threshold"])


def rank_floor(table: pd.DataFrame, lo: float = 0.5, hi: float = 4.0) -> pd.DataFrame:
    """Lowest mean rank over SNR in [lo, hi] per label (and per train_steps when present): columns label,
    [train_steps,] floor (ratio), floor_rank (directions), snr_at_floor, floor_se (over points)."""
    keys = ["label", "train_steps"] if "train_steps" in table.columns else ["label"]
    cols = [*keys, "floor", "floor_rank", "snr_at_floor", "floor_se"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    band = table[(table.snr >= lo) & (table.snr <= hi)]
    if band.empty:
        raise ValueError(f"no rank ratios with SNR in [{lo}, {hi}]")
    g = (
        band.groupby([*keys, "snr"])
        .agg(
            floor=("rank_ratio", "mean"),
            floor_rank=("rank", "mean"),
            sd=("rank", "std"),
            count=("rank", "size"),
        )
        .reset_index()
    )
    g["floor_se"] = g["sd"].fillna(0) / np.sqrt(g["count"])
    best = g.loc[g.groupby(keys)["floor"].idxmin()].rename(columns={"snr": "snr_at_floor"})
    return best[cols].sort_values(keys).reset_index(drop=True)


def rank_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd, min and max rank ratio and mean rank per (panel, label, snr), with the nearest paper SNR."""
    g = table.groupby(["panel", "label", "snr"], sort=False)
    out = g["rank_ratio"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    out["rank"] = g["rank"].mean().to_numpy()
    out["rank_sd"] = g["rank"].std().to_numpy()
    out["n"] = g["n"].first().to_numpy()
    out["paper_snr"] = nearest_paper_snr(out["snr"].to_numpy())
    return out.sort_values(["panel", "label", "snr"], ascending=[True, True, False], ignore_index=True)


def rank_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Companion rank ratio (and rank) next to the paper's at each paper SNR (nearest measured SNR
    within x1.6)."""
    summ = rank_summary(table).dropna(subset=["paper_snr"])
    summ = summ.assign(gap=(np.log(summ["snr"]) - np.log(summ["paper_snr"])).abs())
    summ = summ.loc[summ.groupby(["label", "paper_snr"])["gap"].idxmin()]
    paper = paper_rank_table()
    rows = []
    for _, r in summ.iterrows():
        if r["panel"] == "real":
            ref = paper[(paper.panel == "real") & (paper.snr == r["paper_snr"])]
        else:
            name = {
                "U-Net": "paper U-Net",
                "closed-form": "paper low-rank",
                "low-rank model": "paper low-rank",
            }
            ref = paper[(paper.model == name.get(r["label"], "")) & (paper.snr == r["paper_snr"])]
        p = None
        if len(ref):
            lo, hi = float(ref["low"].iloc[0]), float(ref["high"].iloc[0])
            p = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
        rows.append(
            {
                "panel": r["panel"],
                "model": r["label"],
                "paper_snr": r["paper_snr"],
                "snr": r["snr"],
                "measured": r["mean"],
                "measured_rank": r["rank"],
                "n": int(r["n"]),
                "paper": p,
            }
        )
    return pd.DataFrame(rows).sort_values(
        ["panel", "model", "paper_snr"], ascending=[True, True, False], ignore_index=True
    )


# ----------------------------------------------------------------------------
# Checks.


def _band(summ: pd.DataFrame, label: str, lo: float, hi: float) -> pd.DataFrame:
    s = summ[(summ.label == label) & (summ.snr >= lo) & (summ.snr <= hi)]
    if s.empty:
        raise ValueError(f"no {label!r} rank ratios with SNR in [{lo}, {hi}]")
    return s


def _se(s: pd.DataFrame) -> float:
    """Standard error of a row's mean rank over points (in directions)."""
    return float(s["rank_sd"].fillna(0).iloc[0] / math.sqrt(max(int(s["count"].iloc[0]), 1)))


def rank_checks(table: pd.DataFrame, n: int, K: int, d: int) -> list[dict[str, Any]]:
    """Result rows: sanity (true by construction) and phenomenon (P2 Fig. 3's claims) checks.

    Sanity: closed form and low-rank model at d (SNR >= 1.5) and Kd (SNR <= 0.35) within one direction;
    every trained network near the identity at its highest SNR (rank >= 0.9 n: c_skip -> 1); D* at its
    highest SNR of rank <= 1 (it returns the nearest training point). Phenomenon: the MoLRG U-Net's
    floor over SNR 0.5-4 at most 1.5 d - 1 directions (the paper's U-Net: 1.0 d at SNR 1.67, 1.5 d at
    0.91; one direction of resolution), and its rank at the lowest SNR above 1.5 x that floor (the rise);
    real images: a minimum rank ratio <= 0.1 (the paper's value at SNR 1.67, above its minimum 0.005),
    reached at SNR <= 0.12 (within x3 of the paper's 0.04).
    """
    summ = rank_summary(table)
    setting = f"MoLRG n={n}, K={K}, d={d}"
    return (
        _exact_rank_rows(summ, setting, K, d)
        + _identity_rows(summ)
        + _unet_floor_rows(summ, setting, d)
        + _real_minimum_rows(summ)
    )


def _exact_rank_rows(summ: pd.DataFrame, setting: str, K: int, d: int) -> list[dict[str, Any]]:
    """Sanity: the closed form and the low-rank model at d (SNR >= 1.5) and Kd (SNR <= 0.35)."""
    from ..results import check

    labels = set(summ["label"])
    out = []
    for label in ("closed-form", "low-rank model"):
        if label not in labels:
            continue
        for lo, hi, target, what in ((1.5, math.inf, d, "d"), (0, 0.35, K * d, "Kd")):
            s = _band(summ, label, lo, hi)
            dev = float((s["rank"] - target).abs().max())
            out.append(
                check(
                    f"{label}: largest |rank - {what}| over SNR {'>= 1.5' if lo else '<= 0.35'}",
                    setting,
                    dev,
                    "<=",
                    1.0,
                    kind="sanity",
                    paper=f"{what} = {target}",
                    note="directions",
                )
            )
    return out


def _identity_rows(summ: pd.DataFrame) -> list[dict[str, Any]]:
    """Sanity: every trained network near the identity at its highest SNR; D* of rank <= 1 there."""
    from ..results import check

    out = []
    for label in summ["label"].unique():
        r = summ[summ.label == label]
        top = r.loc[[r.snr.idxmax()]]
        if label.startswith(OPTIMAL_LABEL):
            out.append(
                check(
                    f"{label}: rank at SNR {float(top.snr.iloc[0]):.0f}",
                    r.panel.iloc[0],
                    float(top["rank"].iloc[0]),
                    "<=",
                    1.0,
                    kind="sanity",
                    paper="0 (memorization)",
                    note="returns the nearest training point: Jacobian ~ 0",
                )
            )
        elif label not in ("closed-form", "low-rank model"):
            out.append(
                check(
                    f"{label}: rank ratio at SNR {float(top.snr.iloc[0]):.0f}",
                    r.panel.iloc[0],
                    float(top["mean"].iloc[0]),
                    ">=",
                    0.9,
                    kind="sanity",
                    paper=0.95,
                    note="near the identity at small sigma (c_skip -> 1)",
                )
            )
    return out


def _unet_floor_rows(summ: pd.DataFrame, setting: str, d: int) -> list[dict[str, Any]]:
    """Phenomenon: the MoLRG U-Net's floor over SNR 0.5-4 (directions) and its rise at low SNR."""
    from ..results import check

    out = []
    if "U-Net" in set(summ["label"]):
        band = _band(summ, "U-Net", 0.5, 4.0)
        low = band.loc[[band["mean"].idxmin()]]
        floor = float(low["rank"].iloc[0])
        out.append(
            check(
                "U-Net on MoLRG: floor of the rank over SNR 0.5-4 (directions)",
                f"{setting}, SNR {float(low.snr.iloc[0]):.2f}",
                floor,
                "<=",
                1.5 * d - 1,
                se=_se(low),
                paper=f"d = {d} at SNR 1.67, 1.5 d at 0.91",
                note=f"= {floor / d:.2f} d; threshold 1.5 d minus one direction",
            )
        )
        u = summ[summ.label == "U-Net"]
        bottom = float(u.loc[u.snr.idxmin(), "mean"])
        out.append(
            check(
                "U-Net on MoLRG: rank at the lowest SNR / floor",
                setting,
                bottom / float(low["mean"].iloc[0]),
                ">",
                1.5,
                paper=round(PAPER_MOLRG_UNET[min(PAPER_MOLRG_UNET)] / PAPER_MOLRG_UNET[1.67], 2),
                note="the rise at low SNR",
            )
        )
    return out


def _real_minimum_rows(summ: pd.DataFrame) -> list[dict[str, Any]]:
    """Phenomenon: the real-image models' minimum rank ratio and the SNR where it is reached."""
    from ..results import check

    out = []
    for label in summ[(summ.panel == "real") & ~summ.label.str.startswith(OPTIMAL_LABEL)]["label"].unique():
        r = summ[summ.label == label]
        low = r.loc[[r["mean"].idxmin()]]
        out.append(
            check(
                f"{label}: minimum rank ratio over SNR",
                f"{int(low['n'].iloc[0])} pixels",
                float(low["mean"].iloc[0]),
                "<=",
                0.1,
                se=_se(low) / float(low["n"].iloc[0]),
                paper="{:g}-{:g}".format(*PAPER_REAL[min(PAPER_REAL)]),
                note="0.1: the paper's ratio at SNR 1.67",
            )
        )
        out.append(
            check(
                f"{label}: SNR of the minimum rank",
                "real images",
                float(low.snr.iloc[0]),
                "<=",
                0.12,
                paper=f"~{min(PAPER_REAL):g}",
                note="within x3 of the paper's",
            )
        )
    return out


def rank_floor_rows(
    history: pd.DataFrame, n: int, d: int, gl: pd.DataFrame | None = None
) -> list[dict[str, Any]]:
    """Rows on the U-Net's training history: its floor after the first and the last snapshot (reported),
    and the phenomenon check that its final model generalizes (GL >= 0.9; the paper's U-Net at N_k = 350)."""
    from ..results import check, row

    floor = rank_floor(history)
    out = []
    for label, t in gl.groupby("label") if gl is not None else []:
        last = t.sort_values("train_steps").iloc[-1]
        out.append(
            check(
                f"GL of the {label}'s samples after {int(last.train_steps)} steps",
                f"MoLRG n={n}, d={d}",
                float(last.gl),
                ">=",
                0.9,
                se=float(last.gl_se),
                paper="~1 (generalizing)",
                note=f"{int(last.samples)} samples; copy threshold {float(last.threshold):.3f} (calibrated)",
            )
        )
    for label, t in floor.groupby("label"):
        t = t.sort_values("train_steps")
        if len(t) >= 2:
            first, last = t.iloc[0], t.iloc[-1]
            out.append(
                row(
                    f"{label} rank floor (min over SNR 0.5-4) after {int(first.train_steps)} and "
                    f"{int(last.train_steps)} steps",
                    f"MoLRG n={n}, d={d}",
                    f"{first.floor_rank:.2f} -> {last.floor_rank:.2f} directions",
                    f"d = {d}",
                )
            )
    return out


def probe_text(summ: pd.DataFrame, exposure: pd.DataFrame, snr: float) -> str:
    """How the probe's rank profile compares with the chapter's U-Net's (and D*'s), in markdown:
    where each stays near the identity, where its minimum lands and how deep, and what happens below it
    (``summ``: :func:`rank_summary`; ``exposure``: :func:`probe_exposure`)."""
    real = summ[summ.panel == "real"]
    labels = list(real.label.unique())
    roles = real_roles(labels)
    mains, probes, opt = roles["unet"], roles["probe"], roles["optimal"]
    if not probes or not mains:
        return ""
    curve = {lab: real[real.label == lab].sort_values("snr", ascending=False) for lab in labels}
    low = {lab: c.loc[c["mean"].idxmin()] for lab, c in curve.items()}
    m, q, qc, mc = low[mains[0]], low[probes[0]], curve[probes[0]], curve[mains[0]]

    def near_identity(c: pd.DataFrame) -> float:  # the lowest SNR down to which rank >= 0.9 n holds
        below = c[c["mean"] < 0.9]
        return float(c.snr.iloc[0] if below.empty else c.snr[c.snr > below.snr.iloc[0]].min())

    ex = exposure.set_index("model")
    e_ref, e_main, e_probe = ex.iloc[0], ex.loc[mains[0]], ex.loc[probes[0]]
    col = "kimg at SNR <= snr"
    moved = "moves toward low SNR" if q.snr < m.snr / 1.5 else "does not move by more than a factor 1.5"
    bottom = {lab: float(c["rank"].iloc[-1]) for lab, c in curve.items()}
    rises = bottom[probes[0]] > 1.5 * float(q["rank"])
    tail = (
        f"Below its minimum the probe's rank still rises, to {bottom[probes[0]]:.1f} directions at SNR "
        f"{float(qc.snr.iloc[-1]):.3g} (the chapter's U-Net {bottom[mains[0]]:.1f}"
        + (f", D* {bottom[opt[0]]:.1f}" if opt else "")
        + f"): the high-noise samples of a {e_ref.kimg / 1000:g} Mimg run move the minimum, but do not make "
        "this small network as precise at high noise as the optimal denoiser."
        if rises
        else f"Below its minimum the probe's rank stays low ({bottom[probes[0]]:.1f} directions at the "
        "lowest SNR)."
    )
    return (
        f"**What it shows.** The probe trains the same U-Net for {e_probe.kimg:g} kimg with "
        f"ln sigma ~ N({e_probe.P_mean:.2f}, {e_probe.P_std:g}^2), so it sees "
        f"{e_probe[col]:.3g}k noisy samples at SNR <= {snr:g}, as many as the reference's {e_ref[col]:.3g}k "
        f"({e_ref.kimg:g} kimg at EDM's N({e_ref.P_mean:g}, {e_ref.P_std:g}^2)); "
        f"the chapter's U-Net sees {e_main[col]:.3g}k. "
        f"The probe's whole profile shifts: it keeps at least 0.9 n directions down to SNR "
        f"{near_identity(qc):.3g} (the chapter's U-Net down to {near_identity(mc):.3g}), because it is "
        f"rarely trained at low noise, and its minimum, {q['rank']:.1f} directions (ratio {q['mean']:.3f}), "
        f"lies at SNR {q.snr:.2f} against {m['rank']:.1f} at SNR {m.snr:.2f} for the chapter's U-Net: the "
        f"minimum {moved} when the model is trained where the noise is high. {tail}"
    )


# ----------------------------------------------------------------------------
# Figures.


def plot_rank(table: pd.DataFrame, profile: str, n: int, K: int, d: int):
    """P2 Fig. 3 look-alike: rank ratio vs SNR (log-log, mean +- sd over points) per panel, the paper's
    values dashed or shaded; for real images also the absolute rank (directions) beside the paper's
    ratios times n = 3072 (CIFAR-10)."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    from ..plotting import colors, profile_badge, style

    summ = rank_summary(table)
    paper = paper_rank_table()
    panels = [p for p in ("real", "molrg") if (summ.panel == p).any()]
    axes_spec = [(p, "ratio") for p in panels] + ([("real", "rank")] if "real" in panels else [])
    with style():
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(4.3 * len(axes_spec), 4.6), squeeze=False)
        for ax, (panel, what) in zip(axes[0], axes_spec):
            s = summ[summ.panel == panel]
            labels = list(dict.fromkeys(s["label"]))
            cols = colors(len(labels) + 2)
            for i, label in enumerate(labels):
                t = s[s.label == label].sort_values("snr")
                y, err = (t["mean"], t["std"]) if what == "ratio" else (t["rank"], t["rank_sd"])
                wide = label == "closed-form"  # drawn wide and pale: the low-rank model lies on top of it
                ls = ":" if label.startswith(OPTIMAL_LABEL) else "-"
                ax.errorbar(
                    t["snr"],
                    y.clip(lower=1e-3 if what == "ratio" else 0.1),
                    yerr=err.fillna(0),
                    marker="o",
                    ms=6 if wide else 3.5,
                    capsize=2,
                    lw=4 if wide else 1.3,
                    alpha=0.45 if wide else 1,
                    color=cols[i],
                    ls=ls,
                    label=label,
                    zorder=2 if wide else 3,
                )
            ref = paper[paper.panel == panel]
            for j, (name, t) in enumerate(ref.groupby("model", sort=False)):
                t = t.sort_values("snr")
                scale = PAPER_REAL_N if what == "rank" else 1
                if panel == "real":
                    lab = name + (f" x n = {PAPER_REAL_N}" if what == "rank" else "") + " +-10%"
                    ax.fill_between(
                        t["snr"],
                        t["low"] * 0.9 * scale,
                        t["high"] * 1.1 * scale,
                        color="0.6",
                        alpha=0.3,
                        lw=0,
                        label=lab,
                    )
                else:
                    ax.plot(
                        t["snr"],
                        t["low"],
                        ls="--",
                        lw=1,
                        marker="x",
                        ms=4,
                        color=cols[len(labels) + j],
                        label=name,
                    )
            if panel == "molrg":
                for v, txt in ((d / n, "d/n"), (K * d / n, "Kd/n")):
                    ax.axhline(v, color="0.3", lw=0.8, ls=":")
                    ax.text(0.012, v * 1.05, txt, fontsize=8, color="0.3")
                ax.set_ylim(min(0.1, d / n * 0.8), 1.1)
                ax.set_title(f"MoLRG: n={n}, K={K}, d={d}")
            else:
                ax.set_title(
                    "real images: rank ratio" if what == "ratio" else "real images: rank (directions)"
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
            ax.invert_xaxis()
            ax.set_xlabel("SNR = 1/sigma")
            ax.set_ylabel("rank ratio (rank / n)" if what == "ratio" else "rank (directions)")
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
        fig.tight_layout()
        profile_badge(fig, profile)
    return fig


def plot_rank_floor(history: pd.DataFrame, profile: str, n: int, d: int, gl: pd.DataFrame | None = None):
    """Floor of the rank (min over SNR 0.5-4, in directions, mean +- se over points) against training
    steps, with d, the threshold 1.5 d - 1 and, on a second axis, the GL of the model's samples."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    from ..plotting import colors, profile_badge, style

    floor = rank_floor(history)
    with style():
        fig, ax = plt.subplots(figsize=(5.8, 3.6))
        for color, (label, t) in zip(colors(max(1, floor["label"].nunique())), floor.groupby("label")):
            t = t.sort_values("train_steps")
            ax.errorbar(
                t["train_steps"],
                t["floor_rank"],
                yerr=t["floor_se"].fillna(0),
                marker="o",
                ms=4,
                capsize=2,
                color=color,
                label=f"{label} rank floor (+- se over points)",
            )
        ax.axhline(d, color="0.3", lw=0.8, ls=":", label=f"d = {d}")
        ax.axhline(1.5 * d - 1, color="0.5", lw=1, ls="--", label="check: 1.5 d - 1")
        steps = sorted(floor["train_steps"].unique())
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(mpl.ticker.FixedLocator(steps))
        ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        ax.set_xlabel("training steps")
        ax.set_ylabel("min rank over SNR 0.5-4 (directions)")
        ax.set_ylim(0, None)
        handles, labels = ax.get_legend_handles_labels()
        if gl is not None and len(gl):
            ax2 = ax.twinx()
            for label, t in gl.groupby("label"):
                t = t.sort_values("train_steps")
                ax2.plot(
                    t["train_steps"],
                    t["gl"],
                    color="0.35",
                    ls="-.",
                    marker="s",
                    ms=3,
                    label=f"GL of {label} samples (right axis)",
                )
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("GL (share of non-copies)")
            ax2.grid(False)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, loc="lower left")
        fig.tight_layout()
        profile_badge(fig, profile)
    return fig
