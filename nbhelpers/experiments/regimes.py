"""The regimes sweep (P1 Fig. 2) and the optimal-denoiser comparison (P1 Fig. 4 left).

A *train cell* trains one model of one width on the first N points of a fixed pool with one training
seed and samples it from the evaluation seeds (the same initial noise for every model); an *optimal
cell* samples the empirical posterior mean D* of the same N points from the same seeds. Cells store
their samples and threshold-free statistics (relative distance to the nearest training point, SSCD
descriptors with the sscd backend, the nearest subspace for MoLRG), so both criteria can be
calibrated and applied afterwards without re-running anything.

A notebook holds up to two *panels*: the main one (Fashion-MNIST, or the paper's teacher-made
CIFAR-10) and a controlled MoLRG one (``molrg_panel``: overrides of the main parameters), where the
true denoiser is known. Each panel has its own pool, grid and calibrated criteria.

Pairs for RP share nothing but the training data and the initial noise: models of two widths, or of
one width, trained with *different* training seeds (``pairing='cross-seed'``).
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

from .. import scores
from . import calibration, cells
from .paper import p1_reference

KIND_TRAIN = "regimes-train"
KIND_OPTIMAL = "regimes-optimal"
VERSION = 2
BACKENDS = ("relative", "sscd")
REF = p1_reference()  # relative L2 distance in model space, or SSCD descriptor cosine

# ----------------------------------------------------------------------------
# Panels and data.


panels, panel_name = cells.panels, cells.panel_name


def data_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """The data spec of a panel (:func:`cells.data_spec`) with a pool of ``pool_size`` points."""
    pool = int(params["pool_size"])
    sizes = [int(n) for n in params["dataset_sizes"]]
    if sizes and max(sizes) > pool:
        raise ValueError(f"dataset_sizes go up to {max(sizes)} but pool_size is {pool}")
    return cells.data_spec(params, pool)


def prepare_teacher_dataset(params: Mapping[str, Any], batch_size: int = 256) -> Path:
    """Write the teacher's data set (seeds 0..teacher_images-1) to ``dataset_path`` unless it exists."""
    from ..checkpoints import load_network
    from ..data import synthetic_dataset

    dest = Path(params["dataset_path"])
    if dest.exists():
        return dest
    if not params.get("teacher"):
        raise FileNotFoundError(f"{dest}: data set missing and no teacher network given to generate it")
    device = cells.device()
    net = load_network(params["teacher"], device=device)
    return synthetic_dataset(net, int(params["teacher_images"]), dest, batch_size=batch_size, device=device)


# ----------------------------------------------------------------------------
# Grid configs.


def _features(params: Mapping[str, Any]) -> dict[str, Any]:
    backend = params["backend"]
    if backend == "relative":
        return {"backend": "relative"}
    if backend == "sscd":
        return {"backend": "sscd", "model": str(params["sscd"]), "resize": int(params["sscd_resize"])}
    raise ValueError(f"unknown similarity backend {backend!r}; expected one of {BACKENDS}")


def _history_spec(params: Mapping[str, Any], n: int, total: int) -> dict[str, Any] | None:
    """Snapshot steps and seeds at which a cell of size ``n`` is also sampled (GL vs training length)."""
    if n not in [int(s) for s in params.get("history_sizes", [])]:
        return None
    steps = sorted({int(s) for s in params["history_steps"]})
    if not steps or steps[0] < 1 or steps[-1] >= total:
        raise ValueError(f"history_steps {steps} must lie in [1, total steps = {total})")
    return {"steps": steps, "seeds": str(params["history_seeds"])}


def train_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per (N, width, training seed) of a panel, most expensive first (load balancing)."""
    spec, features, sampler = data_spec(params), _features(params), cells.sampler_spec(params)
    configs = []
    for n, width, seed in itertools.product(params["dataset_sizes"], params["widths"], params["train_seeds"]):
        n, width, seed = int(n), int(width), int(seed)
        batch = min(int(params["batch_size"]), n) if params["batch_at_most_n"] else int(params["batch_size"])
        network = {**params["network"], params["width_key"]: width}
        train = cells.train_config(
            params["arch"], params["precond"], network, params["train"], batch_size=batch, seed=seed
        )
        cfg = {
            "kind": KIND_TRAIN,
            "version": VERSION,
            "data": spec,
            "n": n,
            "width": width,
            "seed": seed,
            "train": train,
            "sampler": sampler,
            "eval_seeds": str(params["eval_seeds"]),
            "sample_batch": int(params["sample_batch"]),
            "features": features,
        }
        history = _history_spec(params, n, cells.num_steps(train))
        if history:
            cfg["history"] = history
        configs.append(cfg)
    configs.sort(key=lambda c: (-c["width"], -c["train"]["batch_size"], -c["n"], c["seed"]))
    return configs


def optimal_configs(params: Mapping[str, Any], orders: Sequence[int] = (1,)) -> list[dict[str, Any]]:
    """One optimal-denoiser config per (N, sampler order) of a panel; order 1 is the authors' Euler."""
    spec, features = data_spec(params), _features(params)
    return [
        {
            "kind": KIND_OPTIMAL,
            "version": VERSION,
            "data": spec,
            "n": int(n),
            "sampler": cells.sampler_spec(params, order),
            "eval_seeds": str(params["eval_seeds"]),
            "sample_batch": int(params["sample_batch"]),
            "chunk_size": int(params["optimal_chunk"]),
            "features": features,
        }
        for n in params["dataset_sizes"]
        for order in orders
    ]


def plan(configs: Sequence[Mapping[str, Any]], shape: tuple[int, int] | None = None) -> pd.DataFrame:
    """Dry run: build each distinct network once (meta device) and tabulate the grid: n, width, seed,
    batch_size, steps, kimg, params. ``shape`` (channels, resolution) saves reading image files."""
    from ..networks import make_network

    counted: dict[tuple, int] = {}
    rows = []
    for c in configs:
        if c["kind"] != KIND_TRAIN:
            continue
        t = c["train"]
        key = (t["arch"], t["precond"], repr(sorted(t["network"].items())))
        if key not in counted:
            ch, res = shape or cells.data_shape(c["data"])
            with torch.device("meta"):
                net = make_network(t["arch"], t["precond"], res, ch, **t["network"])
            counted[key] = sum(p.numel() for p in net.parameters())
        steps = cells.num_steps(t)
        rows.append(
            {
                "n": c["n"],
                "width": c["width"],
                "seed": c["seed"],
                "batch_size": t["batch_size"],
                "steps": steps,
                "kimg": steps * t["batch_size"] / 1000,
                "params": counted[key],
            }
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# Cell functions (module level: they run in worker processes).


def _statistics(
    samples: np.ndarray, config: Mapping[str, Any], device: torch.device
) -> dict[str, np.ndarray]:
    """Threshold-free per-sample statistics of a cell's samples against its training set: the
    relative NN distance (always), SSCD descriptors and max cosine (sscd backend), MoLRG subspaces."""
    train = cells.training_set(config["data"], config["n"])
    x = torch.from_numpy(samples)
    rel, idx = scores.nn_relative_distance(x, train, device=device)
    stats = {"nn_rel": rel.numpy(), "nn_index": idx.numpy()}
    if config["features"]["backend"] == "sscd":
        feats = sscd_features(samples, config["features"], device)
        best, arg = scores.max_similarity(feats, _train_features(config, device), dtype=torch.float64)
        stats.update(features=feats.half().numpy(), max_cos=best.numpy(), max_cos_index=arg.numpy())
    if config["data"]["source"] == "molrg":
        mix = cells.make_molrg(config["data"])
        stats.update(off_subspace=mix.off_subspace(x).numpy(), nearest_class=mix.nearest_class(x).numpy())
    return stats


def _train_features(config: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    return sscd_features(cells.training_set(config["data"], config["n"]).numpy(), config["features"], device)


def _copy_statistic(samples: np.ndarray, config: Mapping[str, Any], device: torch.device) -> np.ndarray:
    """The backend's copy statistic of samples: relative NN distance, or SSCD max cosine."""
    if config["features"]["backend"] == "sscd":
        feats = sscd_features(samples, config["features"], device)
        return scores.max_similarity(feats, _train_features(config, device), dtype=torch.float64)[0].numpy()
    train = cells.training_set(config["data"], config["n"])
    return scores.nn_relative_distance(torch.from_numpy(samples), train, device=device)[0].numpy()


_SSCD_MODELS: dict[tuple, Any] = {}


def sscd_model(feature_spec: Mapping[str, Any], device: torch.device):
    """The (cached) SSCD descriptor of a feature spec on ``device``."""
    from ..features import SSCD

    key = (feature_spec["model"], str(device), int(feature_spec["resize"]))
    if key not in _SSCD_MODELS:
        _SSCD_MODELS[key] = SSCD(
            feature_spec["model"], device=device, resize=key[2], batch_size=256, download=True
        )
    return _SSCD_MODELS[key]


def sscd_features(images: np.ndarray, feature_spec: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """Unit-norm SSCD descriptors (N, F) of uint8 images (N, C, H, W)."""
    return sscd_model(feature_spec, device)(torch.as_tensor(images)).cpu()


def _history(config: Mapping[str, Any], workdir: Path, device: torch.device) -> dict[str, np.ndarray]:
    """The copy statistic of the samples of each history snapshot: (H,) steps, (H, S) statistics."""
    from ..checkpoints import load_network
    from ..training import snapshot_path

    hist, stats = config["history"], []
    for step in hist["steps"]:
        net = load_network(snapshot_path(workdir, step * config["train"]["batch_size"]), device=device)
        x = cells.sample(net, config["sampler"], hist["seeds"], config["sample_batch"], device)
        stats.append(_copy_statistic(cells.store_samples(x, config["data"]), config, device))
    return {"history_steps": np.asarray(hist["steps"]), "history_copy": np.stack(stats)}


def run_train_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train on the first N points, sample at the evaluation seeds; store samples and statistics."""
    from ..checkpoints import save_network

    device = cells.device()
    data = cells.training_set(config["data"], config["n"])
    workdir = Path(staging) / "train"
    history = config.get("history")
    extra = {"snapshot_steps": math.gcd(*history["steps"])} if history else {}
    net, info = cells.train_model(config["train"], data, device, workdir=workdir, **extra)
    save_network(net, Path(staging) / "network.nbh")
    arrays = _history(config, workdir, device) if history else {}
    for f in workdir.glob("*"):  # snapshots and dumps are not kept: the final network is
        if f.is_file():
            f.unlink()
    t0 = time.perf_counter()
    x = cells.sample(net, config["sampler"], config["eval_seeds"], config["sample_batch"], device)
    info["sample_seconds"] = time.perf_counter() - t0
    samples = cells.store_samples(x, config["data"])
    out = {"n": config["n"], "width": config["width"], "seed": config["seed"], **info}
    return out, {"samples": samples, **_statistics(samples, config, device), **arrays}


def run_optimal_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample the empirical optimal denoiser of the first N points at the evaluation seeds."""
    from ..optimal import OptimalDenoiser

    device = cells.device()
    data = cells.training_set(config["data"], config["n"])
    net = OptimalDenoiser(data, chunk_size=config["chunk_size"], device=device)
    net.img_resolution, net.img_channels = int(data.shape[-1]), int(data.shape[1])
    t0 = time.perf_counter()
    x = cells.sample(net, config["sampler"], config["eval_seeds"], config["sample_batch"], device)
    samples = cells.store_samples(x, config["data"])
    out = {"n": config["n"], "order": config["sampler"]["order"], "sample_seconds": time.perf_counter() - t0}
    return out, {"samples": samples, **_statistics(samples, config, device)}


def run_panels(
    store: Any, configs: Mapping[str, Sequence[dict]], fn: Any, workers: int = 1
) -> dict[str, list]:
    """Run (or load) every panel's cells in one pool of ``workers`` processes: panel -> stored cells."""
    grid = [c for cs in configs.values() for c in cs]
    done = iter(store.run_grid(grid, fn, workers=workers, threads_per_worker=1))
    return {name: [next(done) for _ in cs] for name, cs in configs.items()}


def panel_tables(
    panels_: Mapping[str, Mapping[str, Any]], cells_: Mapping[str, list], cals: Mapping[str, tuple]
) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Per panel: the GL table and the cross-seed RP table (with subspace agreement on MoLRG)."""
    out = {}
    for name, p in panels_.items():
        copy, same = cals[name]
        k = int(p["molrg_classes"]) if p["dataset"] == "molrg" else None
        out[name] = (
            gl_table(cells_[name], copy.criterion),
            rp_table(cells_[name], same.criterion, num_classes=k),
        )
    return out


# ----------------------------------------------------------------------------
# Criteria of a panel, calibrated on its held-out data.


def calibrate(
    params: Mapping[str, Any], device: torch.device | None = None
) -> tuple[calibration.Calibration, calibration.Calibration]:
    """The panel's copy and same-image criteria, each calibrated on held-out data (see
    :mod:`calibration`); a positive ``copy_threshold``/``same_threshold`` replaces the calibrated value."""
    spec, feats = data_spec(params), _features(params)
    statistic = "relative" if feats["backend"] == "relative" else "cosine"
    embed = None
    if statistic == "cosine":
        dev = device or cells.device()

        def embed(x):
            return sscd_features(np.asarray(torch.as_tensor(x)), feats, dev)

    count = int(params["calibration_samples"])
    copy = calibration.calibrate_copy(
        spec,
        params["dataset_sizes"],
        count,
        float(params["copy_noise"]),
        float(params["max_false_copy"]),
        float(params["min_true_copy"]),
        statistic,
        embed,
    )
    same = calibration.calibrate_same(
        spec,
        count,
        float(params["copy_noise"]),
        float(params["max_false_same"]),
        float(params["min_true_same"]),
        statistic,
        embed,
    )
    for cal, key in ((copy, "copy_threshold"), (same, "same_threshold")):
        if params.get(key):
            cal.criterion = scores.Criterion(cal.criterion.question, statistic, float(params[key]))
    return copy, same


def copy_scores(cell: Mapping[str, Any], crit: scores.Criterion) -> np.ndarray:
    """A stored cell's copy statistic per sample (relative NN distance or SSCD max cosine)."""
    return cell["arrays"]["nn_rel" if crit.statistic == "relative" else "max_cos"]


def same_scores(
    a: Mapping[str, Any], b: Mapping[str, Any], crit: scores.Criterion, shift: int = 0
) -> np.ndarray:
    """Per-seed same-image statistic between two stored cells (b the reference); ``shift`` pairs seed
    j of a with seed j + shift of b (a seed-shuffled pairing: the chance level)."""
    key = "samples" if crit.statistic == "relative" else "features"
    xa, xb = a["arrays"][key], np.roll(b["arrays"][key], -shift, axis=0)
    return calibration.same_scores(xa, xb, crit.statistic)


# ----------------------------------------------------------------------------
# Tables.


_se = scores.rate_se


def gl_table(cells_: Sequence[Mapping[str, Any]], copy: scores.Criterion) -> pd.DataFrame:
    """GL per trained cell: n, width, seed, gl, samples (and the MoLRG median off-subspace distance)."""
    rows = []
    for c in cells_:
        flags = copy.flags(copy_scores(c, copy))
        row = {
            "n": c["n"],
            "width": c["width"],
            "seed": c["seed"],
            "gl": 1.0 - float(flags.mean()),
            "samples": len(flags),
        }
        if "off_subspace" in c["arrays"]:
            row["off_subspace"] = float(np.median(c["arrays"]["off_subspace"]))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["width", "n", "seed"]).reset_index(drop=True)


def pair_label(a: int, b: int) -> str:
    """``'16 vs 32'`` for widths 16 and 32."""
    return f"{a} vs {b}"


def model_pairs(cells_: Sequence[Mapping[str, Any]], pairing: str = "cross-seed") -> list[tuple[dict, dict]]:
    """Pairs of trained cells of one N: 'cross-seed' (different training seeds, any widths; they share
    only data and noise) or 'same-seed' (two widths, one seed: also the same batches and training noise)."""
    if pairing not in ("cross-seed", "same-seed"):
        raise ValueError(f"pairing must be 'cross-seed' or 'same-seed', got {pairing!r}")
    by_n: dict[int, list] = {}
    for c in cells_:
        by_n.setdefault(c["n"], []).append(c)
    out = []
    for group in by_n.values():
        for a, b in itertools.combinations(sorted(group, key=lambda c: (c["width"], c["seed"])), 2):
            same_seed = a["seed"] == b["seed"]
            if (pairing == "cross-seed" and not same_seed) or (pairing == "same-seed" and same_seed):
                out.append((a, b))
    return out


def rp_table(
    cells_: Sequence[Mapping[str, Any]],
    same: scores.Criterion,
    pairing: str = "cross-seed",
    num_classes: int | None = None,
) -> pd.DataFrame:
    """RP per model pair: n, pair, width_a, width_b, seed_a, seed_b, rp, chance (seed-shuffled pairing),
    seeds; MoLRG (``num_classes``): also subspace agreement, its chance 1/K, and RP within agreeing seeds."""
    rows = []
    for a, b in model_pairs(cells_, pairing):
        flags = same.flags(same_scores(a, b, same))
        row = {
            "n": a["n"],
            "pair": pair_label(a["width"], b["width"]),
            "width_a": a["width"],
            "width_b": b["width"],
            "seed_a": a["seed"],
            "seed_b": b["seed"],
            "rp": float(flags.mean()),
            "chance": float(same.flags(same_scores(a, b, same, shift=1)).mean()),
            "seeds": len(flags),
        }
        if num_classes:
            agree = a["arrays"]["nearest_class"] == b["arrays"]["nearest_class"]
            row.update(
                subspace_agreement=float(agree.mean()),
                subspace_chance=1 / num_classes,
                rp_within=float(flags[agree].mean()) if agree.any() else math.nan,
            )
        rows.append(row)
    return pd.DataFrame(rows)


def rp_optimal_table(
    cells_: Sequence[Mapping[str, Any]], optimal: Sequence[Mapping[str, Any]], same: scores.Criterion
) -> pd.DataFrame:
    """RP of each trained cell against D*'s samples (same N, same seeds), per sampler order:
    n, width, seed, order, rp, chance, seeds."""
    opt = {(o["n"], o["order"]): o for o in optimal}
    rows = []
    for c in cells_:
        for (n, order), o in opt.items():
            if n == c["n"]:
                flags = same.flags(same_scores(c, o, same))
                rows.append(
                    {
                        "n": n,
                        "width": c["width"],
                        "seed": c["seed"],
                        "order": order,
                        "rp": float(flags.mean()),
                        "chance": float(same.flags(same_scores(c, o, same, shift=1)).mean()),
                        "seeds": len(flags),
                    }
                )
    return pd.DataFrame(rows).sort_values(["order", "width", "n", "seed"]).reset_index(drop=True)


def optimal_gl_table(optimal: Sequence[Mapping[str, Any]], copy: scores.Criterion) -> pd.DataFrame:
    """GL of D*'s own samples: n, order, gl, samples (a sanity row: D* returns training points)."""
    rows = []
    for o in optimal:
        flags = copy.flags(copy_scores(o, copy))
        rows.append(
            {"n": o["n"], "order": o["order"], "gl": 1.0 - float(flags.mean()), "samples": len(flags)}
        )
    return pd.DataFrame(rows).sort_values(["order", "n"]).reset_index(drop=True)


def history_table(cells_: Sequence[Mapping[str, Any]], copy: scores.Criterion) -> pd.DataFrame:
    """GL against training steps for cells with a history: n, width, seed, steps, gl, samples
    (the final model's GL, at the evaluation seeds, ends each curve)."""
    rows = []
    for c in cells_:
        a = c["arrays"]
        if "history_steps" not in a:
            continue
        for step, stat in zip(a["history_steps"], a["history_copy"]):
            rows.append(
                {
                    "n": c["n"],
                    "width": c["width"],
                    "seed": c["seed"],
                    "steps": int(step),
                    "gl": 1 - float(copy.flags(stat).mean()),
                    "samples": len(stat),
                }
            )
        final = copy.flags(copy_scores(c, copy))
        rows.append(
            {
                "n": c["n"],
                "width": c["width"],
                "seed": c["seed"],
                "steps": int(c["steps"]),
                "gl": 1 - float(final.mean()),
                "samples": len(final),
            }
        )
    return pd.DataFrame(rows, columns=["n", "width", "seed", "steps", "gl", "samples"])


def rp_curves(
    cells_: Sequence[Mapping[str, Any]],
    same: scores.Criterion,
    thresholds: Sequence[float],
    pairing: str = "cross-seed",
) -> pd.DataFrame:
    """RP as a function of the threshold, per N and pair (mean over pairings): n, pair, threshold, rp."""
    rows = []
    for a, b in model_pairs(cells_, pairing):
        d = same_scores(a, b, same)
        rates = scores.flag_rates(d, thresholds, same.flag)
        rows += [
            {"n": a["n"], "pair": pair_label(a["width"], b["width"]), "threshold": float(t), "rp": float(r)}
            for t, r in zip(thresholds, rates)
        ]
    return pd.DataFrame(rows).groupby(["n", "pair", "threshold"], as_index=False)["rp"].mean()


def summarize(table: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Mean and standard error (:func:`_se`) of ``value`` per group ``by``, with the repeat count."""
    rows = []
    for key, g in table.groupby(list(by)):
        count = int(g["samples"].iloc[0]) if "samples" in g else int(g["seeds"].iloc[0])
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                value: float(g[value].mean()),
                "se": _se(g[value].to_numpy(), count),
                "repeats": len(g),
            }
        )
    return pd.DataFrame(rows)


def mean_se(table: pd.DataFrame, index: str, columns: str, value: str) -> pd.DataFrame:
    """Wide table of ``mean ± se`` strings (se from :func:`summarize`)."""
    s = summarize(table, [index, columns], value)
    s["text"] = [f"{m:.2f} ± {e:.2f}" for m, e in zip(s[value], s["se"])]
    order = list(dict.fromkeys(table[columns]))
    return s.pivot(index=index, columns=columns, values="text")[order]


def n_half(gl: pd.DataFrame, level: float = 0.5) -> pd.DataFrame:
    """Training-set size where GL first reaches ``level`` (interpolated in log2 N) per width and seed:
    columns width, seed, n_half (the smallest N if already there; NaN if never)."""
    rows = []
    for (w, s), g in gl.groupby(["width", "seed"]):
        g = g.sort_values("n")
        ns, vs = np.log2(g["n"].to_numpy(float)), g["gl"].to_numpy(float)
        crossing = 2 ** ns[0] if vs[0] >= level else math.nan
        for i in range(1, len(vs)):
            if math.isnan(crossing) and vs[i - 1] < level <= vs[i]:
                crossing = 2 ** (ns[i - 1] + (level - vs[i - 1]) / (vs[i] - vs[i - 1]) * (ns[i] - ns[i - 1]))
        rows.append({"width": int(w), "seed": int(s), "n_half": crossing})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# Checks: phenomenon checks state P1's claims (thresholds from the paper), sanity checks hold by
# construction when the code is right.


def _at(table: pd.DataFrame, value: str, **where: Any) -> tuple[float, float]:
    """Mean and se of ``value`` over the rows matching ``where``."""
    sub = table
    for k, v in where.items():
        sub = sub[sub[k] == v]
    count = int(sub["samples"].iloc[0]) if "samples" in sub else int(sub["seeds"].iloc[0])
    return float(sub[value].mean()), _se(sub[value].to_numpy(), count)


def regime_checks(
    gl: pd.DataFrame, rp: pd.DataFrame, setting: str, low: float = 0.1, high: float = 0.9, rp_min: float = 0.6
) -> list[dict[str, Any]]:
    """P1 Fig. 2's claims on one panel. GL <= ``low`` at the smallest N and >= ``high`` at the largest
    (every width; paper ~0 up to 2^10, ~1 from 2^14); RP >= ``rp_min`` at both ends (every pair kind;
    the paper's lowest values there are 0.62 and 0.61) and lower in between (the dip); the GL = 0.5
    crossing moving to larger N with width (larger models need more data)."""
    from ..results import check

    rows = []
    n_lo, n_hi = int(gl["n"].min()), int(gl["n"].max())
    for w in sorted(gl["width"].unique()):
        m, se = _at(gl, "gl", width=w, n=n_lo)
        rows.append(
            check(
                "GL, smallest N (memorization)",
                f"{setting}, width {w}, N={n_lo}",
                m,
                "<=",
                low,
                se,
                paper=REF["gl_small"],
            )
        )
        m, se = _at(gl, "gl", width=w, n=n_hi)
        rows.append(
            check(
                "GL, largest N (generalization)",
                f"{setting}, width {w}, N={n_hi}",
                m,
                ">=",
                high,
                se,
                paper=REF["gl_large"],
            )
        )
    for pair in rp["pair"].unique():
        sub = rp[rp["pair"] == pair]
        ns = sorted(sub["n"].unique())
        ends = [_at(sub, "rp", n=ns[0]), _at(sub, "rp", n=ns[-1])]
        for (value, se), n, end, ref in zip(
            ends, (ns[0], ns[-1]), ("smallest", "largest"), ("rp_small", "rp_large")
        ):
            rows.append(
                check(
                    f"pairwise RP, {end} N",
                    f"{setting}, {pair}, N={n}",
                    value,
                    ">=",
                    rp_min,
                    se,
                    paper=REF[ref],
                )
            )
        inner = [(n, *_at(sub, "rp", n=n)) for n in ns[1:-1]]
        if inner:
            n_dip, dip, se_dip = min(inner, key=lambda t: t[1])
            top, se_top = min(ends)
            rows.append(
                check(
                    "pairwise RP dip: lower end minus transition minimum",
                    f"{setting}, {pair}, dip at N={n_dip}",
                    top - dip,
                    ">",
                    0.0,
                    math.hypot(se_top, se_dip),
                    paper=REF["rp_dip"],
                    note=f"RP {dip:.2f} at N={n_dip}",
                )
            )
    rows += _model_size_checks(gl, setting)
    return rows


def _model_size_checks(gl: pd.DataFrame, setting: str) -> list[dict[str, Any]]:
    """Larger models need more data: log2 of the ratio of GL = 0.5 crossings of consecutive widths > 0."""
    from ..results import check

    half = n_half(gl)
    widths = sorted(half["width"].unique())
    rows = []
    for a, b in zip(widths, widths[1:]):
        la = np.log2(half[half.width == a].sort_values("seed")["n_half"].to_numpy())
        lb = np.log2(half[half.width == b].sort_values("seed")["n_half"].to_numpy())
        diff = lb - la if len(la) == len(lb) else np.array([lb.mean() - la.mean()])
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else None
        rows.append(
            check(
                "larger models need more data: log2 N(GL=0.5), wider minus narrower",
                f"{setting}, width {b} vs {a}",
                float(np.nanmean(diff)),
                ">",
                0.0,
                se,
                paper=REF["n_half_step"] + " (UNet-64/128/256)",
                note="se over training seeds" if se is not None else "one training seed: no se",
            )
        )
    return rows


def optimal_checks(
    rp_opt: pd.DataFrame,
    opt_gl: pd.DataFrame,
    setting: str,
    order: int = 1,
    first_min: float = 0.4,
    last_max: float = 0.05,
    gl_max: float = 0.05,
) -> list[dict[str, Any]]:
    """P1 Fig. 4 (left) on one panel. Phenomenon: RP against D* >= ``first_min`` at the smallest N
    (paper 0.47-0.51), <= ``last_max`` at the largest (paper ~0), falling in between. Sanity: D*'s
    own samples are copies (GL <= ``gl_max`` at every N)."""
    from ..results import check

    rows = []
    sub = rp_opt[rp_opt["order"] == order]
    for w in sorted(sub["width"].unique()):
        ns = sorted(sub["n"].unique())
        (first, se_f), (last, se_l) = _at(sub, "rp", width=w, n=ns[0]), _at(sub, "rp", width=w, n=ns[-1])
        rows.append(
            check(
                "RP vs D*, smallest N",
                f"{setting}, width {w}, N={ns[0]}",
                first,
                ">=",
                first_min,
                se_f,
                paper=REF["rp_opt_small"],
            )
        )
        rows.append(
            check(
                "RP vs D*, largest N",
                f"{setting}, width {w}, N={ns[-1]}",
                last,
                "<=",
                last_max,
                se_l,
                paper=REF["rp_opt_large"],
            )
        )
        rows.append(
            check(
                "RP vs D* falls: smallest-N minus largest-N RP",
                f"{setting}, width {w}",
                first - last,
                ">",
                0.0,
                math.hypot(se_f, se_l),
                paper=REF["rp_opt_fall"],
            )
        )
    for o in sorted(opt_gl["order"].unique()):
        g = opt_gl[opt_gl["order"] == o]
        worst = g.loc[g["gl"].idxmax()]
        rows.append(
            check(
                "GL of D*'s own samples (max over N)",
                f"{setting}, {_ORDER_NAMES.get(o, o)}",
                float(worst.gl),
                "<=",
                gl_max,
                _se(np.array([worst.gl]), int(worst.samples)),
                kind="sanity",
                paper="~0",
                note=f"worst at N={int(worst.n)}",
            )
        )
    return rows


_ORDER_NAMES = {1: "Euler", 2: "Heun"}


# ----------------------------------------------------------------------------
# Figures.


def _label_widths(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(model=table["width"].map(lambda w: f"width {w}"))


def _regime_axes(
    ax_gl, ax_rp, gl: pd.DataFrame, rp: pd.DataFrame, title: str, low: float, high: float
) -> None:
    from .. import plotting

    g = summarize(_label_widths(gl), ["model", "n"], "gl")
    plotting.mean_se_lines(ax_gl, g, "n", "gl", "model")
    r = summarize(rp, ["pair", "n"], "rp")
    palette = dict(zip(r["pair"].unique(), plotting.colors(r["pair"].nunique())))
    plotting.mean_se_lines(ax_rp, r, "n", "rp", "pair", palette=palette)
    chance = rp.groupby(["pair", "n"], as_index=False)["chance"].mean()
    for pair, t in chance.groupby("pair"):
        ax_rp.plot(t["n"], t["chance"], ls=":", lw=1, color=palette[pair])
    ax_rp.plot([], [], ls=":", color="0.4", label="chance (seed-shuffled pairs)")
    mem_end, gen_start = plotting.regime_bounds(gl, "n", "gl", low=low, high=high, by="width")
    for ax, what in ((ax_gl, "generalization score GL"), (ax_rp, "reproducibility score RP")):
        ax.set_ylabel(what)
        ax.set_title(f"{title}: {what.split(' score')[0]}", fontsize=9)
        ax.set_xlabel("training-set size N")
        plotting.shade_regimes(ax, mem_end, gen_start)
        ax.legend(fontsize=7, loc="center right")


def plot_regimes(
    tables: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], profile: str, low: float = 0.1, high: float = 0.9
):
    """P1 Fig. 2 at this profile's scale, one row per panel: GL vs N per width (mean +- se over
    training seeds) and cross-seed pairwise RP vs N per pair of widths, with the chance level."""
    import matplotlib.pyplot as plt

    from .. import plotting

    fig, axes = plt.subplots(len(tables), 2, figsize=(10.5, 3.6 * len(tables)), squeeze=False)
    for (name, (gl, rp)), row in zip(tables.items(), axes):
        _regime_axes(row[0], row[1], gl, rp, name, low, high)
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def plot_paper_regimes():
    """The authors' curves (read from their figures) on the same axes as :func:`plot_regimes`."""
    import matplotlib.pyplot as plt

    from .. import plotting
    from .paper import p1_gl, p1_pairwise_rp

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.3))
    gl, rp = p1_gl(), p1_pairwise_rp()
    plotting.errorbar_lines(gl, "n", "gl", hue="model", ax=axes[0], errorbar=None)
    plotting.errorbar_lines(rp, "n", "rp", hue="pair", ax=axes[1], errorbar=None)
    axes[0].set_ylabel("generalization score GL")
    axes[1].set_ylabel("reproducibility score RP")
    mem_end, gen_start = plotting.regime_bounds(gl, "n", "gl", by="model")
    for ax in axes:
        ax.set_xlabel("training-set size N (CIFAR-10)")
        plotting.shade_regimes(ax, mem_end, gen_start)
        ax.legend(fontsize=7, loc="center right")
    plotting.profile_badge(fig, "paper (authors' numbers)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_history(hist: pd.DataFrame, profile: str, low: float = 0.1):
    """GL against training steps (mean +- se over training seeds), one line per (N, width): how long
    training must run before the smallest training sets are memorized."""
    import matplotlib.pyplot as plt

    from .. import plotting

    fig, ax = plt.subplots(figsize=(5.6, 3.5))
    t = hist.assign(model=[f"N={n}, width {w}" for n, w in zip(hist["n"], hist["width"])])
    plotting.mean_se_lines(ax, summarize(t, ["model", "steps"], "gl"), "steps", "gl", "model", log2=False)
    ax.axhline(low, color="k", ls="--", lw=0.8, label=f"GL = {low:g}")
    ax.set_xlabel("training steps")
    ax.set_ylabel("generalization score GL")
    ax.legend(fontsize=7)
    plotting.profile_badge(fig, profile)
    fig.tight_layout()
    return fig


def plot_rp_curves(curves: pd.DataFrame, null_rate: pd.DataFrame, threshold: float, profile: str, title: str):
    """RP against the same-image threshold, one panel per pair of widths and one line per N; dashed:
    the share of unrelated pairs counted as the same (``null_rate``: threshold, rate)."""
    import matplotlib.pyplot as plt

    from .. import plotting

    pairs = list(dict.fromkeys(curves["pair"]))
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs), 3.2), squeeze=False, sharey=True)
    ns = sorted(curves["n"].unique())
    cmap = plt.get_cmap("viridis")
    for ax, pair in zip(axes[0], pairs):
        for i, n in enumerate(ns):
            t = curves[(curves["pair"] == pair) & (curves["n"] == n)]
            ax.plot(t["threshold"], t["rp"], color=cmap(i / max(1, len(ns) - 1)), lw=1.3, label=f"N={n}")
        ax.plot(null_rate["threshold"], null_rate["rate"], color="k", ls="--", lw=1, label="unrelated pairs")
        ax.axvline(threshold, color="0.3", ls=":", lw=1)
        ax.set_title(f"{title}: {pair}", fontsize=9)
        ax.set_xlabel("same-image threshold t")
    axes[0][0].set_ylabel("RP(t)")
    axes[0][-1].legend(fontsize=7)
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot_subspace_agreement(rp: pd.DataFrame, profile: str, title: str):
    """MoLRG: how often two models' samples from one seed land on the same subspace (chance 1/K) and,
    among those seeds, how often they are the same point."""
    import matplotlib.pyplot as plt

    from .. import plotting

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.3))
    sub = rp.assign(samples=rp["seeds"])
    agree = summarize(sub, ["pair", "n"], "subspace_agreement")
    plotting.mean_se_lines(axes[0], agree, "n", "subspace_agreement", "pair")
    axes[0].axhline(float(rp["subspace_chance"].iloc[0]), color="k", ls=":", lw=1, label="chance 1/K")
    within = summarize(sub.dropna(subset=["rp_within"]), ["pair", "n"], "rp_within")
    plotting.mean_se_lines(axes[1], within, "n", "rp_within", "pair")
    axes[0].set_ylabel("same subspace")
    axes[1].set_ylabel("RP among seeds on the same subspace")
    for ax in axes:
        ax.set_xlabel("training-set size N")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot_samples(
    cells_: Sequence[Mapping[str, Any]],
    sizes: Sequence[int],
    count: int,
    profile: str,
    optimal: Sequence[Mapping[str, Any]] = (),
):
    """The first ``count`` evaluation seeds of every model (and D*, if given) at each size: one image
    row per sampler, one column per seed, so the same noise reads down a column."""
    import matplotlib.pyplot as plt

    from .. import plotting
    from ..data import to_uint8

    fig, axes = plt.subplots(1, len(sizes), figsize=(0.42 * count * len(sizes) + 1.5, 3.0), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        rows = sorted([c for c in cells_ if c["n"] == n], key=lambda c: (c["width"], c["seed"]))
        rows += [o for o in optimal if o["n"] == n and o["order"] == 1]
        imgs = [c["arrays"]["samples"][:count] for c in rows]
        imgs = [x if x.dtype == np.uint8 else to_uint8(np.asarray(x)) for x in imgs]
        plotting.image_grid(np.concatenate(imgs), nrow=len(rows), ax=ax, title=f"N = {n}")
        h = imgs[0].shape[2]  # image height in pixels; image_grid puts 1 pixel between rows
        for r, c in enumerate(rows):
            label = f"w{c['width']} s{c['seed']}" if "width" in c else "D*"
            ax.text(-1.5, 1 + r * (h + 1) + h / 2, label, ha="right", va="center", fontsize=7)
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0.03, 0, 1, 0.9))
    return fig


def plot_rp_optimal(
    rp_opt: Mapping[str, pd.DataFrame], gl: Mapping[str, pd.DataFrame], profile: str, order: int = 1
):
    """P1 Fig. 4 (left): RP of each width against D* (mean +- se over training seeds, chance dotted),
    one panel per data panel, and the authors' curves."""
    import matplotlib.pyplot as plt

    from .. import plotting
    from .paper import p1_gl, p1_rp_optimal

    fig, axes = plt.subplots(1, len(rp_opt) + 1, figsize=(4.6 * (len(rp_opt) + 1), 3.5), squeeze=False)
    for ax, (name, table) in zip(axes[0], rp_opt.items()):
        sub = _label_widths(table[table["order"] == order])
        s = summarize(sub, ["model", "n"], "rp")
        palette = dict(zip(s["model"].unique(), plotting.colors(s["model"].nunique())))
        plotting.mean_se_lines(ax, s, "n", "rp", "model", palette=palette)
        for model, t in sub.groupby("model"):
            c = t.groupby("n", as_index=False)["chance"].mean()
            ax.plot(c["n"], c["chance"], ls=":", lw=1, color=palette[model])
        plotting.shade_regimes(ax, *plotting.regime_bounds(gl[name], "n", "gl", by="width"))
        ax.set_title(f"{name}: models vs D*", fontsize=9)
    paper = p1_rp_optimal()
    plotting.errorbar_lines(paper, "n", "rp", hue="model", ax=axes[0][-1], errorbar=None)
    plotting.shade_regimes(axes[0][-1], *plotting.regime_bounds(p1_gl(), "n", "gl", by="model"))
    axes[0][-1].set_title("the authors' numbers (CIFAR-10)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("training-set size N")
        ax.set_ylabel("RP vs optimal denoiser D*")
        ax.legend(fontsize=7, loc="upper right")
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


# ----------------------------------------------------------------------------
# Numbers the chapter's prose quotes (glued, never typed).


def key_numbers(
    tables: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
    keys: Mapping[str, str],
    hist: pd.DataFrame | None = None,
    low: float = 0.1,
) -> dict[str, Any]:
    """Values for the prose, named by position so that they exist for any grid: per panel key
    (``keys``: panel name -> 'main'/'molrg'), ``{k}_nmin``/``{k}_nmax``, the narrowest and widest
    width (``{k}_w_narrow``/``_wide``), their GL at both ends (``{k}_gl_narrow_nmin``, ...), the
    cross-width RP at both ends and its minimum in between (``{k}_rp_cross_nmin``, ``_nmax``,
    ``_dip``, ``_dip_n``) with its chance level, and the GL = 0.5 crossings (``{k}_nhalf_narrow``,
    ``_wide``); with ``hist``, the first training step at which every width's GL at the smallest N is
    below ``low`` (``main_hist_steps_memorized``, NaN if never) and the final GL per width."""
    out: dict[str, Any] = {}
    for name, (gl, rp) in tables.items():
        k = keys[name]
        ns, widths = sorted(gl["n"].unique()), sorted(gl["width"].unique())
        ends = {"nmin": ns[0], "nmax": ns[-1]}
        named = {"narrow": widths[0], "wide": widths[-1]}
        out.update({f"{k}_{e}": int(n) for e, n in ends.items()})
        out.update({f"{k}_w_{w}": int(v) for w, v in named.items()})
        for w, width in named.items():
            for e, n in ends.items():
                out[f"{k}_gl_{w}_{e}"] = float(gl[(gl.width == width) & (gl.n == n)]["gl"].mean())
        cross = rp[rp["pair"] == pair_label(widths[0], widths[-1])]
        by_n = cross.groupby("n")[["rp", "chance"]].mean()
        for e, n in ends.items():
            out[f"{k}_rp_cross_{e}"] = float(by_n.loc[n, "rp"])
            out[f"{k}_chance_cross_{e}"] = float(by_n.loc[n, "chance"])
        inner = by_n.loc[ns[1:-1], "rp"]
        if len(inner):
            out[f"{k}_rp_cross_dip"], out[f"{k}_rp_cross_dip_n"] = float(inner.min()), int(inner.idxmin())
        half = n_half(gl).groupby("width")["n_half"].mean()
        out.update({f"{k}_nhalf_{w}": float(half[v]) for w, v in named.items()})
        if "subspace_agreement" in rp:
            out[f"{k}_subspace_cross_nmax"] = float(cross[cross.n == ns[-1]]["subspace_agreement"].mean())
            out[f"{k}_subspace_chance"] = float(rp["subspace_chance"].iloc[0])
    if hist is not None and len(hist):
        small = hist[hist["n"] == hist["n"].min()].groupby(["steps", "width"])["gl"].mean().unstack()
        below = small.index[(small < low).all(axis=1)]
        out["main_hist_steps_memorized"] = int(below[0]) if len(below) else math.nan
        out.update({f"main_hist_gl_final_w{int(w)}": float(small[w].iloc[-1]) for w in small.columns})
    return out


def _fmt_n(n: float) -> str:
    """A training-set size for prose: ``'2^5.3'`` (NaN: 'not reached')."""
    return "not reached" if not math.isfinite(n) else f"2^{math.log2(n):.1f}"


def narrative(num: Mapping[str, Any], key: str, title: str, low: float = 0.1, high: float = 0.9) -> str:
    """'What the figure shows' for one panel, in markdown, from :func:`key_numbers` (``key``: 'main' or
    'molrg'): each sentence states what was measured and whether it has the paper's shape."""

    def g(name: str) -> Any:
        return num[f"{key}_{name}"]

    nmin, nmax, wn, ww = g("nmin"), g("nmax"), g("w_narrow"), g("w_wide")
    small, large = (g("gl_narrow_nmin"), g("gl_wide_nmin")), (g("gl_narrow_nmax"), g("gl_wide_nmax"))
    memo = "every width memorizes" if max(small) <= low else f"not every width memorizes (GL above {low:g})"
    gen = "every width generalizes" if min(large) >= high else f"not every width generalizes (GL < {high:g})"
    out = [
        f"**{title}.** At N = {nmin} GL is {small[0]:.2f} (width {wn}) and {small[1]:.2f} (width {ww}): "
        f"{memo}. At N = {nmax} it is {large[0]:.2f} and {large[1]:.2f}: {gen}."
    ]
    hn, hw = g("nhalf_narrow"), g("nhalf_wide")
    if math.isfinite(hn) and math.isfinite(hw):
        later = (
            "gets there later, as in the paper"
            if hw > hn
            else "does not get there later (the paper's wider models need more data)"
        )
        out.append(
            f"GL reaches 0.5 at N = {_fmt_n(hn)} for width {wn} and {_fmt_n(hw)} for width {ww}: "
            f"the wider model {later}."
        )
    ends = (g("rp_cross_nmin"), g("rp_cross_nmax"))
    chance = max(g("chance_cross_nmin"), g("chance_cross_nmax"))
    text = (
        "Models of different width and training seed, started from the same noise, make the same image "
        f"for {ends[0]:.2f} of the seeds at N = {nmin} and {ends[1]:.2f} at N = {nmax} "
        f"(chance: at most {chance:.2f})"
    )
    if f"{key}_rp_cross_dip" in num:
        dip = g("rp_cross_dip")
        shape = "the paper's U-shape" if dip < min(ends) else "no dip between the regimes (the paper has one)"
        text += f"; in between the RP falls to {dip:.2f} at N = {g('rp_cross_dip_n')}: {shape}"
    out.append(text + ".")
    if f"{key}_subspace_cross_nmax" in num:
        out.append(
            f"At N = {nmax} the two samples lie on the same subspace for "
            f"{g('subspace_cross_nmax'):.2f} of the seeds (chance {g('subspace_chance'):.2f})."
        )
    steps = num.get("main_hist_steps_memorized") if key == "main" else None
    if steps is not None and math.isfinite(steps):
        out.append(f"The smallest set is memorized by every width (GL below {low:g}) from step {steps} on.")
    elif steps is not None:
        out.append(f"At no sampled step is the smallest set memorized by every width (GL below {low:g}).")
    return " ".join(out)


def optimal_narrative(rp_opt: pd.DataFrame, gl: pd.DataFrame, title: str, order: int = 1) -> str:
    """'What the figure shows' of the optimal-denoiser chapter for one panel, in markdown: RP against
    D* at the smallest and largest N per width (sampler ``order``) beside the models' own GL there."""
    t = rp_opt[rp_opt.order == order].groupby(["width", "n"])["rp"].mean()
    g = gl.groupby(["width", "n"])["gl"].mean()
    parts = []
    for w in sorted(t.index.get_level_values(0).unique()):
        r = t.loc[w]
        nmin, nmax = int(r.index.min()), int(r.index.max())
        parts.append(
            f"width {w}: {r.loc[nmin]:.2f} at N = {nmin} (GL {g.loc[(w, nmin)]:.2f}) and {r.loc[nmax]:.2f} "
            f"at N = {nmax} (GL {g.loc[(w, nmax)]:.2f})"
        )
    falls = all(t.loc[w].iloc[0] > t.loc[w].iloc[-1] for w in t.index.get_level_values(0).unique())
    ends = max(t.xs(int(t.index.get_level_values(1).max()), level="n"))
    verdict = "falls with N for every width" if falls else "does not fall with N for every width"
    tail = (
        "and reaches about 0 at the largest N, as in the paper"
        if ends <= 0.05
        else f"but stays at up to {ends:.2f} at the largest N (the paper: about 0)"
    )
    return (
        f"**{title}.** RP against D* ({'Euler' if order == 1 else 'Heun'}): "
        + "; ".join(parts)
        + (f". It {verdict}, {tail}.")
    )
