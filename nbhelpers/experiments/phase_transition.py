"""P2's sample complexity on MoLRG (``molrg_phase_transition.ipynb``): the low-rank model trained with
the diffusion loss, and a U-Net's memorization-to-generalization transition.

Grid cells are module-level functions for :meth:`nbhelpers.runs.RunStore.run_grid`:

- ``run_lowrank_cell``: for one (n, d, N_k), ``trials`` independent mixtures; on each, train
  ``restarts`` randomly initialised :class:`nbhelpers.molrg.LowRankDenoiser` with the project's
  training loop and the diffusion loss (all fits of the cell as one stack:
  :func:`cells.train_stacked`), keep the restart with the lowest *training loss*
  (:func:`cells.lowest_loss`), and store every restart's loss and subspace distance, the training
  loss of the true subspaces (same draws) and the K-subspaces solver's distance as a reference.
- ``run_unet_cell``: train a U-Net on K N_k MoLRG samples, sample it, and store the threshold-free
  statistic of the copy criterion (relative distance to the nearest training point) for its samples,
  for held-out samples of the mixture and for planted noisy copies of training points.

Data of (a): x = U_k a + (noise / sqrt(n)) e with e ~ N(0, I_n): the isotropic off-subspace part has
expected norm ``noise`` whatever n, so N_k >= d points no longer span their subspace exactly and the
residual of the true subspaces is not zero.

Success (a): the largest distance between a true subspace and its matched learned one is below
``threshold``, with :func:`nbhelpers.molrg.subspace_distance` (``||P - Q||_F / sqrt(2d)``: 0 for equal
subspaces, 1 for orthogonal ones, ``1/sqrt(d)`` when one of d directions is wrong).

Copy criterion (b): a sample x is a copy when ||x - NN(x)|| / ||NN(x)|| < t, NN(x) its nearest training
point; t is calibrated per d on data (:func:`calibrate_copy`): at most 1 % of held-out samples and at
least 99 % of planted noisy copies flagged, at every N_k of that d. GL is the share of non-copies.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..scores import share_se
from . import cells
from .paper import P2_PHASE as PAPER  # the authors' numbers (re-exported: the notebook reads them here)
from .phase_text import against_paper, causes_text, lowrank_text, unet_text, variants_text  # noqa: F401

KIND_LOWRANK = "phase-lowrank"
KIND_UNET = "phase-unet"
VERSION = 2

STACK_ELEMENTS = 2**25  # a stack of low-rank fits holds at most this many batch elements (whole trials)
_NOISE_STREAM = 3  # seed stream of the off-subspace noise of (a) (cells: 1 pool, 2 fresh)


# ----------------------------------------------------------------------------
# Data.


def noisy_molrg(spec: Mapping[str, Any], per_class: int, noise: float) -> torch.Tensor:
    """``per_class`` points of each class of the spec's MoLRG plus isotropic noise of expected norm
    ``noise``: float32 (K * per_class, C, R, R), classes shuffled."""
    count = int(spec["num_classes"]) * int(per_class)
    x = cells.molrg_draw(spec, count, cells.molrg_stream(spec, 1))
    if noise > 0:
        g = torch.Generator().manual_seed(cells.molrg_stream(spec, _NOISE_STREAM))
        e = torch.randn(x.shape, generator=g, dtype=torch.float64)
        x = (x.double() + float(noise) / math.sqrt(x[0].numel()) * e).float()
    return x


def trial_spec(config: Mapping[str, Any], trial: int) -> dict[str, Any]:
    """The MoLRG spec of one trial of a low-rank cell: its own random bases, shared by every N_k."""
    seed = int(config["seed"]) * 100003 + 7919 * int(config["intrinsic_dim"]) + int(trial)
    return cells.molrg_spec(
        config["num_classes"], config["intrinsic_dim"], config["resolution"], config["channels"], seed
    )


# ----------------------------------------------------------------------------
# The K-subspaces solver: the reference for (a), not the model under test.


def _fit_bases(x: torch.Tensor, labels: torch.Tensor, K: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Top-d left singular vectors of each cluster (N, n); random orthonormal fill where rank < d."""
    n = x.shape[1]
    bases = torch.empty(K, n, d, dtype=x.dtype)
    for k in range(K):
        pts = x[labels == k]
        fill = torch.randn(n, d, generator=g, dtype=x.dtype)
        if len(pts):
            u, s, _ = torch.linalg.svd(pts.T, full_matrices=False)
            r = min(int((s > s[0] * 1e-9).sum()) if s[0] > 0 else 0, d)
            top = u[:, :r]
            fill = fill - top @ (top.T @ fill)
            basis = torch.cat([top, torch.linalg.qr(fill).Q[:, : d - r]], 1)
        else:
            basis = torch.linalg.qr(fill).Q
        bases[k] = basis
    return bases


def _seeded_labels(x: torch.Tensor, K: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Initial clusters: for each k a seed point (drawn with probability ~ its residual to the clusters
    so far, as k-means++) with its d - 1 most correlated points (|cos|); others by best fit."""
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (unit @ unit.T).abs()
    bases = []
    residual = torch.ones(len(x), dtype=x.dtype)
    for _ in range(K):
        seed = int(torch.multinomial(residual.clamp_min(0) + 1e-12, 1, generator=g))
        members = cos[seed].topk(min(d, len(x))).indices
        u, s, _ = torch.linalg.svd(x[members].T, full_matrices=False)
        bases.append(u[:, : int((s > s[0] * 1e-9).sum())])
        residual = 1 - torch.stack([(unit @ b).square().sum(1) for b in bases], 1).amax(1)
    return torch.stack([(unit @ b).square().sum(1) for b in bases], 1).argmax(1)


def subspace_clustering(
    x: torch.Tensor,  # Data (N, ...) flattened to (N, n).
    num_classes: int,  # K.
    intrinsic_dim: int,  # d.
    restarts: int = 10,  # Restarts; the lowest residual wins.
    max_iter: int = 50,  # Alternations per restart (stops early when labels settle).
    generator: torch.Generator | None = None,
    init: str = "seeded",  # 'seeded' (see _seeded_labels) or 'random' (random assignment).
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Maximise sum_i max_k ||U_k^T x_i||^2 (K-subspaces): returns bases (K, n, d), labels (N,), residual.

    The residual is sum_i ||x_i||^2 - max_k ||U_k^T x_i||^2 (float64). Each restart starts from an
    initial clustering and alternates assignment and per-cluster SVD until the labels settle.
    """
    if init not in ("seeded", "random"):
        raise ValueError(f"init must be 'seeded' or 'random', got {init!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    xf = torch.as_tensor(x).reshape(len(x), -1).double().cpu()
    K, d = int(num_classes), int(intrinsic_dim)
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    total = float(xf.square().sum())
    for _ in range(max(1, int(restarts))):
        labels = (
            _seeded_labels(xf, K, d, g) if init == "seeded" else torch.randint(0, K, (len(xf),), generator=g)
        )
        for _ in range(int(max_iter)):
            bases = _fit_bases(xf, labels, K, d, g)
            new = torch.einsum("knd,bn->bkd", bases, xf).square().sum(-1).argmax(1)
            if torch.equal(new, labels):
                break
            labels = new
        bases = _fit_bases(xf, labels, K, d, g)
        energy = torch.einsum("knd,bn->bkd", bases, xf).square().sum(-1)
        residual = total - float(energy.amax(1).sum())
        if best is None or residual < best[2] - 1e-12 * max(total, 1.0):
            best = (bases, energy.argmax(1), residual)
    return best


# ----------------------------------------------------------------------------
# (a) The low-rank model trained with the diffusion loss.


def lowrank_train(params: Mapping[str, Any], per_class: int, **changes: Any) -> dict[str, Any]:
    """The TrainConfig dict of one low-rank fit: ``lowrank_train`` with ``changes``, batch <= K N_k."""
    section = {**dict(params["lowrank_train"]), **changes}
    batch = min(int(section.pop("batch_size", 64)), int(params["molrg_classes"]) * int(per_class))
    return cells.train_config("lowrank", "edm", {}, section, batch_size=batch)


def lowrank_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One cell per (resolution, d, N_k = ratio * d): ``trials`` mixtures x ``restarts`` fits each."""
    configs = []
    for res, d, ratio in itertools.product(
        params["lowrank_resolutions"], params["lowrank_dims"], params["lowrank_ratios"]
    ):
        configs.append(
            _lowrank_config(params, int(res), int(d), float(ratio), {}, "gaussian", int(params["trials"]))
        )
    return configs


def _lowrank_config(
    params, res: int, d: int, ratio: float, changes: Mapping[str, Any], init: str, trials: int
):
    nk = max(1, int(round(ratio * d)))
    return {
        "kind": KIND_LOWRANK,
        "version": VERSION,
        "num_classes": int(params["molrg_classes"]),
        "channels": int(params["molrg_channels"]),
        "resolution": res,
        "intrinsic_dim": d,
        "ratio": ratio,
        "per_class": nk,
        "noise": float(params["lowrank_noise"]),
        "trials": trials,
        "restarts": int(params["restarts"]),
        "init": init,
        "seed": int(params["data_seed"]),
        "train": lowrank_train(params, nk, **changes),
    }


def variant_configs(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The training variants of the investigation at one grid point, by label: the chapter's setting
    ('this chapter') and each entry of ``lowrank_variants`` (train changes, plus 'init': 'data')."""
    p = params["lowrank_probe"]
    res, d, ratio = int(p["resolution"]), int(p["d"]), float(p["ratio"])
    out = {"this chapter": _lowrank_config(params, res, d, ratio, {}, "gaussian", int(params["trials"]))}
    for label, change in params["lowrank_variants"].items():
        change = dict(change)
        init = str(change.pop("init", "gaussian"))
        out[label] = _lowrank_config(params, res, d, ratio, change, init, int(params["trials"]))
    return out


def variant_table(
    variants: Mapping[str, Mapping[str, Any]], var_cells: Sequence[Mapping[str, Any]], threshold: float
) -> pd.DataFrame:
    """One row per training variant (:func:`variant_configs`, in order, with its cell): loss, its weight
    share below sigma 0.01, lr, steps, init, single-fit and kept success with a 95 % Wilson interval."""
    rows = []
    for (label, cfg), cell in zip(variants.items(), var_cells):
        t, f = lowrank_table([cell], threshold), fits_table([cell])
        k = int(t.success.sum())
        lo, hi = wilson_interval(k, len(t))
        loss = cells.loss_name(cfg["train"])
        rows.append(
            {
                "variant": label,
                "loss": loss,
                "loss weight at sigma < 0.01": loss_weight_share(
                    loss, 0.01, loss_kwargs=cfg["train"].get("loss_kwargs")
                ),
                "lr": cfg["train"]["lr"],
                "steps": cells.num_steps(cfg["train"]),
                "init": cfg["init"],
                "single fit": float((f.distance < threshold).mean()),
                "kept": k / len(t),
                "kept 95% low": float(lo),
                "kept 95% high": float(hi),
                "seconds": cell["seconds"],
            }
        )
    return pd.DataFrame(rows)


def escaped_fits(short: Mapping[str, Any], long: Mapping[str, Any], threshold: float) -> tuple[int, int]:
    """Of the fits of cell ``short`` that failed, how many succeed in cell ``long`` (the same fits trained
    longer); returns (escaped, failed)."""
    a = fits_table([short]).set_index(["trial", "restart"]).distance
    b = fits_table([long]).set_index(["trial", "restart"]).distance.reindex(a.index)
    return int(((a >= threshold) & (b < threshold)).sum()), int((a >= threshold).sum())


def init_lowrank(spec: Mapping[str, Any], x: torch.Tensor, init: str, seed: int):
    """A :class:`LowRankDenoiser` for ``spec``: Gaussian random bases ('gaussian') or bases spanned by
    K d distinct training points drawn at random ('data'), from ``seed``."""
    from ..molrg import LowRankDenoiser

    K, d = int(spec["num_classes"]), int(spec["intrinsic_dim"])
    net = LowRankDenoiser(K, d, int(spec["resolution"]), int(spec["channels"]), generator=int(seed))
    if init == "data":
        if len(x) < K * d:
            return net  # too few points to span K d directions: keep the Gaussian start
        g = torch.Generator().manual_seed(int(seed))
        pts = x.reshape(len(x), -1)[torch.randperm(len(x), generator=g)[: K * d]]
        with torch.no_grad():
            net.U.copy_(pts.reshape(K, d, -1).transpose(1, 2))
    elif init != "gaussian":
        raise ValueError(f"init must be 'gaussian' or 'data', got {init!r}")
    return net


def run_lowrank_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train the low-rank model (``restarts`` random starts per trial, kept by training loss) on each
    trial's data; store per fit its training loss and subspace distance, per trial the true subspaces'
    training loss and the K-subspaces solver's distance.

    All trials x restarts train together as one :class:`nbhelpers.molrg.LowRankStack` (one optimizer
    step for all; each fit sees only its own trial's data).
    """
    from ..molrg import subspace_distance

    device = cells.device()
    K, d, R, T = config["num_classes"], config["intrinsic_dim"], config["restarts"], config["trials"]
    t0 = time.perf_counter()
    # 1. Data and random starts: trial t's mixture and points; restart r starts from seed 1000 t + r.
    specs = [trial_spec(config, t) for t in range(T)]
    xs = [noisy_molrg(spec, config["per_class"], config["noise"]) for spec in specs]
    nets = [
        init_lowrank(spec, x, config["init"], 1000 * t + r)
        for t, (spec, x) in enumerate(zip(specs, xs))
        for r in range(R)
    ]
    # 2. Train the fits of whole trials at once, each on its trial's points, in stacks of bounded size.
    train = {**config["train"], "seed": int(config["seed"])}
    per_stack = max(1, STACK_ELEMENTS // (int(train["batch_size"]) * R * xs[0][0].numel()))
    trained = []
    for lo in range(0, T, per_stack):
        chunk = range(lo, min(T, lo + per_stack))
        data = [xs[t] for t in chunk for _ in range(R)]
        trained += cells.train_stacked(train, data, nets[lo * R : chunk.stop * R], device)[0]
    # 3. Per trial: keep the restart with the lowest training loss; score everything against the truth.
    cols: dict[str, list] = {k: [] for k in ("trial", "restart", "loss", "distance", "kept")}
    truth, solver = [], []
    loss, loss_kw = cells.loss_name(train), train.get("loss_kwargs")
    for t, (spec, x) in enumerate(zip(specs, xs)):
        mix = cells.make_molrg(spec)
        group = trained[t * R : (t + 1) * R]
        kept, losses = cells.lowest_loss(train, group, x, device)
        cols["trial"] += [t] * R
        cols["restart"] += list(range(R))
        cols["loss"] += losses
        cols["distance"] += [subspace_distance(net.orthonormal_bases(), mix.bases)[1] for net in group]
        cols["kept"] += [r == kept for r in range(R)]
        truth.append(cells.training_loss(mix.denoiser(), x, loss, device, loss_kwargs=loss_kw))
        g = torch.Generator().manual_seed(1000 * t)
        solver.append(
            subspace_distance(subspace_clustering(x, K, d, restarts=R, generator=g)[0], mix.bases)[1]
        )
    info = {
        "n": config["channels"] * config["resolution"] ** 2,
        "d": d,
        "per_class": config["per_class"],
        "ratio": config["ratio"],
        "seconds": time.perf_counter() - t0,
    }
    arrays = {k: np.asarray(v) for k, v in cols.items()}
    arrays.update(truth_loss=np.asarray(truth), solver_distance=np.asarray(solver))
    return info, arrays


def fits_table(cells_: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Every fit of (a): n, d, per_class, ratio, trial, restart, loss, distance, kept, truth_loss."""
    frames = []
    for c in cells_:
        a = c["arrays"]
        t = pd.DataFrame({k: a[k] for k in ("trial", "restart", "loss", "distance", "kept")})
        t["truth_loss"] = a["truth_loss"][t["trial"].to_numpy()]
        frames.append(t.assign(n=c["n"], d=c["d"], per_class=c["per_class"], ratio=c["ratio"]))
    return pd.concat(frames, ignore_index=True)


def lowrank_table(cells_: Sequence[Mapping[str, Any]], threshold: float) -> pd.DataFrame:
    """Per (n, d, N_k, trial): the kept fit's distance, loss and success; the best distance over the
    restarts (``oracle_distance``, reported, never used to choose); the true subspaces' training loss;
    the solver's distance and success."""
    fits = fits_table(cells_)
    kept = fits[fits.kept].drop(columns=["kept", "restart"])
    oracle = fits.groupby(["n", "d", "per_class", "trial"])["distance"].min().rename("oracle_distance")
    t = kept.merge(oracle.reset_index(), on=["n", "d", "per_class", "trial"])
    solver = pd.concat(
        [
            pd.DataFrame(
                {
                    "n": c["n"],
                    "d": c["d"],
                    "per_class": c["per_class"],
                    "trial": np.arange(len(c["arrays"]["solver_distance"])),
                    "solver_distance": c["arrays"]["solver_distance"],
                }
            )
            for c in cells_
        ]
    )
    t = t.merge(solver, on=["n", "d", "per_class", "trial"])
    t["success"] = t["distance"] < threshold
    t["solver_success"] = t["solver_distance"] < threshold
    return t.sort_values(["n", "d", "per_class", "trial"], ignore_index=True)


def wilson_interval(successes: int | np.ndarray, trials: int | np.ndarray, z: float = 1.96):
    """Wilson score interval (low, high) of a binomial proportion; z = 1.96 for 95 %."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def success_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per (n, d, ratio): trials, successes and rate of the trained model (kept by loss), its 95 %
    Wilson interval, and the solver's rate."""
    g = table.groupby(["n", "d", "per_class", "ratio"])
    out = g.agg(
        trials=("success", "size"),
        successes=("success", "sum"),
        solver=("solver_success", "mean"),
        single=("distance", "size"),
    ).reset_index()
    out["rate"] = out.successes / out.trials
    out["low"], out["high"] = wilson_interval(out.successes.to_numpy(), out.trials.to_numpy())
    return out.drop(columns="single")


def single_fit_rates(fits: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (n, d, ratio): the share of single fits (every restart) that recover the subspaces."""
    return (
        fits.assign(ok=fits.distance < threshold)
        .groupby(["n", "d", "ratio"])["ok"]
        .mean()
        .rename("single_fit_rate")
        .reset_index()
    )


def failure_causes(table: pd.DataFrame) -> pd.DataFrame:
    """Per ratio N_k/d: failed trials split by cause. ``loss prefers wrong`` (the kept fit's training loss
    is at or below the true subspaces': the objective itself does not single out the truth) and
    ``optimizer stuck`` (the truth has a lower loss that no restart reached)."""
    f = table[~table.success]
    wrong = (f.loss <= f.truth_loss).groupby(f.ratio).sum()
    out = pd.DataFrame({"trials": table.groupby("ratio").size(), "failed": f.groupby("ratio").size()})
    out["loss prefers wrong"] = wrong
    out = out.fillna(0).astype(int)
    out["optimizer stuck"] = out.failed - out["loss prefers wrong"]
    return out.reset_index()


def loss_weight_share(
    loss: str,
    below: float,
    draws: int = 1_000_000,
    seed: int = 0,
    loss_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """Share of a denoising loss's total weight E[lambda(sigma)] that falls on sigma < ``below``, by Monte
    Carlo over the loss's own sigma distribution (``loss_kwargs`` as in a train config; ``draws`` draws
    from ``seed``)."""
    from ..losses import make_loss

    fn = make_loss(loss, **dict(loss_kwargs or {}))
    sigma = fn.sample_sigma(int(draws), torch.Generator().manual_seed(int(seed)), "cpu").double()
    weight = fn.weight(sigma)
    return float((weight * (sigma < below)).sum() / weight.sum())


def wrong_directions(fits: pd.DataFrame, threshold: float, tol: float = 0.03) -> pd.Series:
    """How many directions a failed fit has wrong, when its distance is within ``tol`` of sqrt(j/d)
    (j of d directions of one subspace wrong, the others right), else NaN; indexed like ``fits``."""
    j = (fits.distance**2 * fits.d).round()
    near = (fits.distance - np.sqrt(j / fits.d)).abs() <= tol
    return j.where(near & (fits.distance >= threshold) & (j >= 1))


def transition_point(table: pd.DataFrame, x: str, y: str, level: float, interpolate: bool = True) -> float:
    """First x at which mean y reaches ``level`` and stays there; NaN if never.

    With ``interpolate`` the crossing is placed log-linearly between that x and the one before it.
    """
    m = table.groupby(x)[y].mean().sort_index()
    xs, ys = m.index.to_numpy(dtype=float), m.to_numpy(dtype=float)
    above = ys >= level
    for i in range(len(xs)):
        if above[i:].all():
            if i == 0 or not interpolate:
                return float(xs[i])
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            f = (level - y0) / (y1 - y0) if y1 != y0 else 1.0
            return float(np.exp(np.log(x0) + f * (np.log(x1) - np.log(x0))))
    return float("nan")


def _bootstrap(groups: Sequence[pd.DataFrame], stat, reps: int, seed: int) -> np.ndarray:
    """``stat`` of ``reps`` resamples, each resampling the rows of every group with replacement."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(int(reps)):
        out.append(stat([g.iloc[rng.integers(0, len(g), len(g))] for g in groups]))
    return np.asarray(out, dtype=float)


def lowrank_transitions(
    table: pd.DataFrame, level: float = 0.5, reps: int = 500, seed: int = 0
) -> pd.DataFrame:
    """Per (n, d): N_k*/d, the ratio at which the trained model's success rate reaches ``level``
    (interpolated), with a bootstrap 95 % interval over trials (NaN where it never gets there)."""
    rows = []
    for (n, d), t in table.groupby(["n", "d"]):
        groups = [g for _, g in t.groupby("ratio")]

        def stat(gs):
            return transition_point(pd.concat(gs), "ratio", "success", level)

        boot = _bootstrap(groups, stat, reps, seed)
        lo, hi = (
            np.nanpercentile(boot, [2.5, 97.5]) if np.isfinite(boot).mean() >= 0.975 else (np.nan, np.nan)
        )
        rows.append({"n": n, "d": d, "ratio_star": stat(groups), "low": lo, "high": hi})
    return pd.DataFrame(rows)


def lowrank_checks(table: pd.DataFrame, trans: pd.DataFrame) -> list[dict[str, Any]]:
    """Result rows of (a): sanity (no success below N_k = d, trained or solved: d - N_k directions are
    unconstrained) and P2's claim (success once N_k >= d; a transition N_k*/d that does not depend on
    n or d)."""
    from ..results import check

    out = []
    paper = PAPER["lowrank_threshold"]["text"]
    for n, t in table.groupby("n"):
        below = t[t.per_class < t.d]
        for col, who in (("success", "trained"), ("solver_success", "K-subspaces solver")):
            if len(below):
                out.append(
                    check(
                        f"low-rank, {who}: success rate with N_k < d",
                        f"n={n}",
                        below[col].mean(),
                        "<=",
                        0.0,
                        kind="sanity",
                        paper=0.0,
                        note=f"{len(below)} trials; fewer points than dimensions",
                    )
                )
        for label, sel in (("N_k = d", t.per_class == t.d), ("N_k >= 2d", t.per_class >= 2 * t.d)):
            s = t[sel]
            if len(s):
                p = float(s.success.mean())
                se = share_se(p, len(s))
                out.append(
                    check(
                        f"low-rank, trained: success rate at {label}",
                        f"n={n}, {len(s)} trials",
                        p,
                        ">=",
                        0.9,
                        se=se,
                        paper=paper,
                        note="claim: succeeds once N_k >= d",
                    )
                )
    tr = trans.dropna(subset=["ratio_star"])
    if tr["n"].nunique() >= 2:
        by_n = tr.groupby("n")["ratio_star"].apply(lambda v: float(np.exp(np.log(v).mean())))
        spread = float(by_n.max() / by_n.min())
        out.append(
            check(
                "low-rank, trained: N_k*/d at the largest n / at the smallest n (geometric means over d)",
                ", ".join(f"n={n}: {v:.2f}" for n, v in by_n.items()),
                spread,
                "<=",
                1.5,
                paper="1 (independent of n)",
                note="1.5: one step of the N_k/d grid",
            )
        )
    for n, t in tr.groupby("n"):
        if len(t) >= 2:
            slope = float(
                np.polyfit(np.log(t.d.to_numpy(float)), np.log((t.ratio_star * t.d).to_numpy(float)), 1)[0]
            )
            out.append(
                check(
                    "low-rank, trained: |exponent of N_k* in d - 1|",
                    f"n={n}, exponent {slope:.2f}",
                    abs(slope - 1),
                    "<=",
                    0.5,
                    paper="1 (linear in d)",
                    note="|exponent - 1| <= 0.5 tells linear from constant or quadratic",
                )
            )
    return out


# ----------------------------------------------------------------------------
# (b) A U-Net on MoLRG: memorization to generalization.


def unet_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per (d, N_k = ratio * d, training seed); the most expensive first."""
    configs = []
    for d, ratio, seed in itertools.product(
        params["unet_dims"], params["unet_ratios"], params["train_seeds"]
    ):
        configs.append(unet_config(params, int(d), float(ratio), int(seed), params["unet_train"]))
    configs.sort(key=lambda c: (-c["train"]["batch_size"], -c["per_class"], c["seed"]))
    return configs


def unet_spec(params: Mapping[str, Any], d: int) -> dict[str, Any]:
    """The MoLRG spec of the U-Net panel for dimension d, with a pool of K d max(64, largest ratio)
    points whose first K N_k are the training set of N_k (nested sets, as in the other chapters)."""
    K = int(params["molrg_classes"])
    pool = K * d * max(64, math.ceil(max(float(r) for r in params["unet_ratios"])))
    return cells.molrg_spec(
        K, d, params["molrg_resolution"], params["molrg_channels"], params["data_seed"], pool_size=pool
    )


def unet_config(params: Mapping[str, Any], d: int, ratio: float, seed: int, train: Mapping[str, Any]) -> dict:
    """The config of one U-Net cell: data spec, training-set size K N_k, validated train config and
    evaluation seeds."""
    spec = unet_spec(params, d)
    nk = max(1, int(round(ratio * d)))
    # The batch is not capped by the training-set size (a batch then holds each point several times with
    # different noise), so every cell sees the same number of noisy samples whatever its N_k.
    cfg = cells.train_config("ddpmpp", "edm", params["unet_network"], train, seed=seed)
    return {
        "kind": KIND_UNET,
        "version": VERSION,
        "data": spec,
        "per_class": nk,
        "size": nk * spec["num_classes"],
        "ratio": ratio,
        "seed": seed,
        "train": cfg,
        "eval_seeds": str(params["eval_seeds"]),
    }


def run_unet_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train a U-Net on the first K N_k points of the pool and sample it; store the copy statistic of
    its samples (relative distance to the nearest training point) and their off-subspace distance."""
    from .calibration import copy_scores

    device = cells.device()
    spec = config["data"]
    x = cells.training_set(spec, config["size"])
    net, info = cells.train_model(config["train"], x, device)
    t0 = time.perf_counter()
    samples = cells.sample(net, cells.EDM_SAMPLER, config["eval_seeds"], 256, device)
    info["sample_seconds"] = time.perf_counter() - t0
    arrays = {
        "rel": copy_scores(samples, x, "relative"),
        "off_subspace": cells.make_molrg(spec).off_subspace(samples).numpy(),
    }
    result = {
        "d": spec["intrinsic_dim"],
        "per_class": config["per_class"],
        "size": config["size"],
        "ratio": config["ratio"],
        "seed": config["seed"],
        **info,
    }
    return result, arrays


def unet_calibrations(params: Mapping[str, Any], dims: Sequence[int] | None = None) -> dict[int, Any]:
    """Per d, the copy criterion of :func:`calibration.calibrate_copy`: the threshold flags at most
    ``max_false_copy`` of ``fresh_samples`` held-out samples against every training set of the grid;
    planted copies (relative noise ``copy_noise``) must be flagged at least ``min_true_copy`` of the time."""
    from .calibration import calibrate_copy

    out = {}
    for d in dims if dims is not None else params["unet_dims"]:
        spec = unet_spec(params, int(d))
        sizes = sorted(
            {spec["num_classes"] * max(1, int(round(float(r) * int(d)))) for r in params["unet_ratios"]}
        )
        out[int(d)] = calibrate_copy(
            spec,
            sizes,
            count=int(params["fresh_samples"]),
            copy_noise=float(params["copy_noise"]),
            max_false=float(params["max_false_copy"]),
            min_true=float(params["min_true_copy"]),
        )
    return out


def unet_table(cells_: Sequence[Mapping[str, Any]], cals: Mapping[int, Any]) -> pd.DataFrame:
    """Per (d, N_k, seed): GL (share of samples that are not copies under the d's calibrated criterion),
    its binomial standard error, the held-out samples' GL at that size, and the samples' median
    off-subspace distance."""
    rows = []
    for c in cells_:
        cal = cals[int(c["d"])]
        a = c["arrays"]
        gl = 1.0 - float(cal.criterion.flags(a["rel"]).mean())
        size = int(c["size"])
        null = cal.table.set_index("n")["null_rate"]
        rows.append(
            {
                "d": c["d"],
                "per_class": c["per_class"],
                "ratio": c["ratio"],
                "seed": c["seed"],
                "gl": gl,
                "gl_se": share_se(gl, len(a["rel"])),
                "gl_fresh": 1.0 - float(null.get(size, math.nan)),
                "off_subspace": float(np.median(a["off_subspace"])),
                "samples": len(a["rel"]),
                "steps": c.get("steps"),
                "train_seconds": c.get("train_seconds"),
            }
        )
    return pd.DataFrame(rows).sort_values(["d", "per_class", "seed"], ignore_index=True)


def unet_transitions(table: pd.DataFrame, level: float = 0.5) -> pd.DataFrame:
    """Per d: N_k*, the first N_k at which the seed-mean GL reaches ``level`` (interpolated in log N_k),
    N_k*/d, and the per-seed N_k* range (NaN where a seed never crosses)."""
    rows = []
    for d, t in table.groupby("d"):
        nk = transition_point(t, "per_class", "gl", level)
        per_seed = [transition_point(g, "per_class", "gl", level) for _, g in t.groupby("seed")]
        lo, hi = (min(per_seed), max(per_seed)) if not np.isnan(per_seed).any() else (np.nan, np.nan)
        rows.append(
            {
                "d": int(d),
                "nk_star": nk,
                "nk_star_over_d": nk / d,
                "nk_star_min": lo,
                "nk_star_max": hi,
                "seeds": len(per_seed),
            }
        )
    return pd.DataFrame(rows)


def unet_slopes(table: pd.DataFrame, level: float = 0.5, reps: int = 1000, seed: int = 0) -> dict[str, float]:
    """The slope c of N_k* = c d (least squares through the origin) and the exponent of N_k* in d (log-log
    fit), each with a bootstrap 95 % interval that resamples the training seeds of every (d, N_k)."""

    def fit(t: pd.DataFrame) -> tuple[float, float]:
        tr = unet_transitions(t, level).dropna(subset=["nk_star"])
        if len(tr) < 2:
            return math.nan, math.nan
        d, nk = tr.d.to_numpy(float), tr.nk_star.to_numpy(float)
        return float((d * nk).sum() / (d * d).sum()), float(np.polyfit(np.log(d), np.log(nk), 1)[0])

    groups = [g for _, g in table.groupby(["d", "per_class"])]
    boot = _bootstrap(groups, lambda gs: fit(pd.concat(gs))[0], reps, seed)
    boot_e = _bootstrap(groups, lambda gs: fit(pd.concat(gs))[1], reps, seed)
    c, e = fit(table)

    def ci(b: np.ndarray) -> tuple[float, float]:
        b = b[np.isfinite(b)]
        return tuple(np.percentile(b, [2.5, 97.5])) if len(b) else (math.nan, math.nan)

    (clo, chi), (elo, ehi) = ci(boot), ci(boot_e)
    return {
        "slope": c,
        "slope_low": clo,
        "slope_high": chi,
        "exponent": e,
        "exponent_low": elo,
        "exponent_high": ehi,
        "boot_finite": float(np.isfinite(boot).mean()),
    }


def unet_checks(table: pd.DataFrame, slopes: Mapping[str, float]) -> list[dict[str, Any]]:
    """Result rows of (b), all phenomenon checks: memorization at the smallest N_k (GL <= 0.1),
    generalization at the largest (GL >= 0.9), N_k* linear in d (|exponent - 1| <= 0.5); the
    constant N_k*/d is reported beside the paper's."""
    from ..results import check, row

    out = []
    for d, t in table.groupby("d"):
        small, large = t[t.per_class == t.per_class.min()], t[t.per_class == t.per_class.max()]
        for sel, op, thr, what, paper in (
            (small, "<=", 0.1, "smallest", "~0 (memorization)"),
            (large, ">=", 0.9, "largest", "~1 (generalization)"),
        ):
            gl = float(sel.gl.mean())
            se = float(np.sqrt((sel.gl_se**2).sum()) / len(sel))
            out.append(
                check(
                    f"U-Net GL at the {what} N_k",
                    f"d={d}, N_k={int(sel.per_class.iloc[0])}, {len(sel)} seeds",
                    gl,
                    op,
                    thr,
                    se=se,
                    paper=paper,
                )
            )
    e, lo, hi = slopes["exponent"], slopes["exponent_low"], slopes["exponent_high"]
    se = (hi - lo) / (2 * 1.96) if math.isfinite(hi - lo) else None
    out.append(
        check(
            "U-Net: |exponent of N_k* in d - 1|",
            f"exponent {e:.2f} (95 % bootstrap {lo:.2f}-{hi:.2f})",
            abs(e - 1),
            "<=",
            0.5,
            se=se,
            paper="1 (linear in d)",
            note="|exponent - 1| <= 0.5 tells linear from constant or quadratic",
        )
    )
    c, clo, chi = slopes["slope"], slopes["slope_low"], slopes["slope_high"]
    out.append(
        row(
            "U-Net: N_k*/d (slope of N_k* = c d)",
            f"95 % bootstrap {clo:.2f}-{chi:.2f}",
            round(c, 2),
            PAPER["unet_transition_over_d"]["text"],
            note="reported: depends on model size and training length",
        )
    )
    return out


def length_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """U-Net cells of the training-length probe: ``length_probe['d']`` at its ``ratios`` (default: every
    ratio), trained for ``length_probe['total_steps']`` instead of ``unet_train``'s, first training seed."""
    p = params["length_probe"]
    if not p:
        return []
    train = {**dict(params["unet_train"]), "total_steps": int(p["total_steps"])}
    ratios = p.get("ratios", params["unet_ratios"])
    return [unet_config(params, int(p["d"]), float(r), int(params["train_seeds"][0]), train) for r in ratios]


# ----------------------------------------------------------------------------
# Figures.


def plot_lowrank(success: pd.DataFrame, profile: str, threshold: float):
    """(a) Success rate of the trained low-rank model against N_k/d, one panel per n, one colour per d
    (95 % Wilson intervals), with the K-subspaces solver dashed and N_k = d dotted."""
    import matplotlib.pyplot as plt

    from ..plotting import colors, log2_axis, profile_badge, style

    ns = sorted(success["n"].unique())
    with style():
        fig, axes = plt.subplots(1, len(ns), figsize=(4.4 * len(ns), 3.5), squeeze=False, sharey=True)
        for ax, n in zip(axes[0], ns):
            s = success[success.n == n]
            ds = sorted(s["d"].unique())
            for i, (d, c) in enumerate(zip(ds, colors(len(ds)))):
                t = s[s.d == d].sort_values("ratio")
                x = t.ratio * (1 + 0.03 * (i - (len(ds) - 1) / 2))
                ax.errorbar(
                    x,
                    t.rate,
                    yerr=[t.rate - t.low, t.high - t.rate],
                    marker="o",
                    ms=4,
                    capsize=2,
                    color=c,
                    label=f"trained, d = {d}",
                )
                ax.plot(
                    x,
                    t.solver,
                    ls="--",
                    lw=1,
                    color=c,
                    alpha=0.7,
                    label="K-subspaces solver" if i == 0 else None,
                )
            ax.axvline(1, color="0.4", ls=":", lw=1, label="N_k = d")
            log2_axis(ax, s["ratio"].unique(), label="samples per class / intrinsic dimension, N_k / d")
            ax.set_ylim(-0.04, 1.04)
            ax.set_title(f"(a) low-rank model, n = {n}")
            ax.legend(fontsize=7, loc="center right")
        axes[0, 0].set_ylabel(f"success rate (distance < {threshold:g})")
        fig.tight_layout()
        profile_badge(fig, profile, loc="lower right")
    return fig


def plot_landscape(fits: pd.DataFrame, profile: str, threshold: float):
    """Every fit of (a): training loss relative to the true subspaces' loss on the same draws against the
    subspace distance, one panel per n, colour = N_k/d, kept fits ringed."""
    import matplotlib.pyplot as plt

    from ..plotting import colors, profile_badge, style

    ns = sorted(fits["n"].unique())
    ratios = sorted(fits["ratio"].unique())
    with style():
        fig, axes = plt.subplots(1, len(ns), figsize=(4.4 * len(ns), 3.5), squeeze=False, sharey=True)
        for ax, n in zip(axes[0], ns):
            f = fits[fits.n == n]
            for r, c in zip(ratios, colors(len(ratios))):
                t = f[f.ratio == r]
                y = t.loss / t.truth_loss
                ax.scatter(t.distance.clip(lower=1e-3), y, s=8, alpha=0.6, color=c, label=f"N_k/d = {r:g}")
                k = t[t.kept]
                ax.scatter(
                    k.distance.clip(lower=1e-3),
                    k.loss / k.truth_loss,
                    s=28,
                    facecolors="none",
                    edgecolors=c,
                    lw=0.8,
                )
            ax.axhline(1, color="k", lw=0.8, ls="--")
            ax.axvline(threshold, color="0.4", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("subspace distance (floor 1e-3)")
            ax.set_title(f"every fit, n = {n} (rings: kept)")
        axes[0, 0].set_ylabel("training loss / loss of the true subspaces")
        axes[0, -1].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        profile_badge(fig, profile, loc="lower right")
    return fig


def plot_unet(
    table: pd.DataFrame,
    trans: pd.DataFrame,
    slopes: Mapping[str, float],
    profile: str,
    short: pd.DataFrame | None = None,
):
    """(b) U-Net GL against N_k per d (mean +- binomial se over seeds; dotted: held-out samples) and N_k*
    against d with the fit N_k* = c d (bootstrap band) beside the paper's 50-60 d; the shorter-trained
    probe as open markers."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    from ..plotting import colors, log2_axis, profile_badge, style

    ds = sorted(table["d"].unique())
    with style():
        fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6))
        ax = axes[0]
        for d, c in zip(ds, colors(len(ds))):
            g = table[table.d == d].groupby("per_class")
            m = g.gl.mean()
            se = g.gl_se.apply(lambda v: float(np.sqrt((v**2).sum()) / len(v)))
            ax.errorbar(
                m.index, m.values, yerr=se.values, marker="o", ms=4, capsize=2, color=c, label=f"d = {d}"
            )
            f = g.gl_fresh.mean()
            ax.plot(f.index, f.values, ls=":", color=c, lw=1)
        if short is not None and len(short):
            for d, t in short.groupby("d"):
                ax.plot(
                    t.per_class,
                    t.gl,
                    ls="--",
                    marker="o",
                    mfc="none",
                    color="0.3",
                    label=f"d = {d}, {int(short.steps.iloc[0])} steps",
                )
        ax.axhspan(-0.05, 0.1, color="0.85", zorder=0)
        log2_axis(ax, table["per_class"].unique(), label="samples per class N_k")
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("generalization score GL")
        ax.set_title("(b) U-Net on MoLRG (dotted: held-out samples)")
        ax.legend(fontsize=7)
        ax = axes[1]
        tr = trans.dropna(subset=["nk_star"])
        if len(tr):
            err = np.stack([tr.nk_star - tr.nk_star_min, tr.nk_star_max - tr.nk_star]).clip(min=0)
            ax.errorbar(
                tr.d,
                tr.nk_star,
                yerr=np.nan_to_num(err),
                marker="o",
                color="k",
                capsize=3,
                label=f"N_k* (GL = 0.5), range over {int(tr.seeds.max())} seeds",
            )
            dd = np.linspace(min(ds) * 0.8, max(ds) * 1.2, 20)
            c, lo, hi = slopes["slope"], slopes["slope_low"], slopes["slope_high"]
            fit = f"N_k* = {c:.2f} d (95 %: {lo:.2f}-{hi:.2f}, seeds)"
            ax.plot(dd, c * dd, color="k", ls="--", lw=1, label=fit)
            if np.isfinite([lo, hi]).all():
                ax.fill_between(dd, lo * dd, hi * dd, color="0.7", alpha=0.4, lw=0)
            p_lo, p_hi = PAPER["unet_transition_over_d"]["value"]
            band = f"paper: {p_lo:g}-{p_hi:g} d"
            ax.fill_between(dd, p_lo * dd, p_hi * dd, color="C3", alpha=0.25, lw=0, label=band)
        if short is not None and len(short) and "nk_star" in short:
            ax.plot(
                short.d.iloc[:1],
                short.nk_star.iloc[:1],
                "o",
                mfc="none",
                color="0.3",
                ms=7,
                label=f"{int(short.steps.iloc[0])} steps",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("intrinsic dimension d")
        ax.set_ylabel("transition N_k*")
        ax.set_title("U-Net transition vs d")
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        profile_badge(fig, profile, loc="lower right")
    return fig
