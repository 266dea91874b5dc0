"""The regimes sweep (P1 Fig. 2) and its optimal-denoiser companion (P1 Fig. 4 left).

A grid cell trains one model of one width on the first N points of a fixed pool with one seed and
samples it at the evaluation seeds (same initial noise for every model); an optimal-denoiser cell
samples the empirical posterior mean of the same N points at the same seeds. Cells store their
samples and threshold-free per-sample statistics (distances to the two nearest training points), so
the copy criterion can be calibrated afterwards without re-running anything.

Aggregation turns stored cells into tidy pandas tables: generalization score per (N, width, seed),
pairwise reproducibility per (N, pair, seed) and reproducibility against the optimal denoiser.

Copy criteria (``Criterion``):
- ``relative`` (model-free, pixel space): x is a copy of y when ||x - y|| <= t ||y||. GL counts a
  sample as memorized when its nearest training point (L2) satisfies this; RP counts a seed as
  reproduced when the two samples from that seed do. ``calibrate`` picks t from data.
- ``cosine`` (SSCD descriptors, the authors' criterion): cos(f(x), f(y)) > t, t = 0.6.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..scores import noisy_copies
from . import cells
from .cells import fresh_samples, load_pool, make_molrg, training_set  # noqa: F401  (used by the notebooks)

KIND_TRAIN = "regimes-train"
KIND_OPTIMAL = "regimes-optimal"
VERSION = 1

# ----------------------------------------------------------------------------
# The authors' numbers (read from the figures of the code release; see reference/PAPERS.md).

PAPER_SIZES = [2**k for k in range(6, 16)]
_PAPER_GL = {  # GL per model at 2^6..2^15 (<= 2^10 read as ~0, 2^14 and 2^15 equal)
    "UNet-64": [0, 0, 0, 0, 0, 0.22, 0.87, 0.99, 1.0, 1.0],
    "UNet-128": [0, 0, 0, 0, 0, 0.01, 0.28, 0.82, 0.99, 0.99],
    "UNet-256": [0, 0, 0, 0, 0, 0.01, 0.05, 0.30, 0.985, 0.985],
}
_PAPER_RP = {
    "64 vs 128": [0.69, 0.66, 0.59, 0.52, 0.46, 0.42, 0.34, 0.18, 0.45, 0.67],
    "64 vs 256": [0.62, 0.62, 0.55, 0.47, 0.37, 0.30, 0.10, 0.02, 0.49, 0.61],
    "128 vs 256": [0.65, 0.63, 0.56, 0.48, 0.41, 0.33, 0.17, 0.17, 0.45, 0.84],
}
_PAPER_RP_OPTIMAL = {  # 2^6..2^13, then ~0 at 2^14 and 2^15
    "UNet-64": [0.47, 0.45, 0.37, 0.27, 0.20, 0.12, 0.03, 0.0, 0.0, 0.0],
    "UNet-128": [0.51, 0.46, 0.37, 0.30, 0.24, 0.17, 0.11, 0.04, 0.0, 0.0],
    "UNet-256": [0.51, 0.46, 0.40, 0.33, 0.27, 0.21, 0.15, 0.10, 0.0, 0.0],
}


def _paper_table(values: dict[str, list[float]], column: str, value: str) -> pd.DataFrame:
    rows = [{"n": n, column: k, value: v} for k, vs in values.items() for n, v in zip(PAPER_SIZES, vs)]
    return pd.DataFrame(rows)


def paper_gl() -> pd.DataFrame:
    """The authors' generalization score: columns ``n``, ``model``, ``gl`` (read from plot, +-0.02)."""
    return _paper_table(_PAPER_GL, "model", "gl")


def paper_pairwise_rp() -> pd.DataFrame:
    """The authors' pairwise RP: columns ``n``, ``pair``, ``rp``."""
    return _paper_table(_PAPER_RP, "pair", "rp")


def paper_rp_optimal() -> pd.DataFrame:
    """The authors' RP between each UNet and the optimal denoiser: columns ``n``, ``model``, ``rp``."""
    return _paper_table(_PAPER_RP_OPTIMAL, "model", "rp")


# ----------------------------------------------------------------------------
# Data: a fixed pool whose first N points are the training set of size N.


def data_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON data description of a sweep from notebook parameters (keys ``dataset``, ``pool_size``, ...).

    ``dataset``: ``'molrg'`` (``molrg_classes``, ``molrg_dim``, ``resolution``, ``channels``,
    ``data_seed``), ``'fashion_mnist'`` (IDX folder ``dataset_path``, ``resolution``, ``channels``) or
    ``'images'`` (EDM zip/folder ``dataset_path``). The pool holds ``pool_size`` points.
    """
    kind = params["dataset"]
    pool = int(params["pool_size"])
    sizes = [int(n) for n in params["dataset_sizes"]]
    if sizes and max(sizes) > pool:
        raise ValueError(f"dataset_sizes go up to {max(sizes)} but pool_size is {pool}")
    if kind == "molrg":
        return {"source": "molrg", "num_classes": int(params["molrg_classes"]),
                "intrinsic_dim": int(params["molrg_dim"]), "resolution": int(params["resolution"]),
                "channels": int(params["channels"]), "seed": int(params["data_seed"]), "pool_size": pool}  # fmt: skip
    if kind == "fashion_mnist":
        return {"source": "fashion_mnist", "path": str(params["dataset_path"]),
                "resolution": int(params["resolution"]), "channels": int(params["channels"]), "pool_size": pool}  # fmt: skip
    if kind == "images":
        if not params.get("dataset_path"):
            raise ValueError("dataset='images' needs dataset_path (an EDM zip or folder)")
        return {"source": "images", "path": str(params["dataset_path"]), "pool_size": pool}
    raise ValueError(f"unknown dataset {kind!r}; expected 'molrg', 'fashion_mnist' or 'images'")


def to_model_space(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images -> float64 in [-1, 1]; floats -> float64 unchanged."""
    x = torch.as_tensor(x)
    return x.double() / 127.5 - 1 if x.dtype == torch.uint8 else x.double()


# ----------------------------------------------------------------------------
# Grid configs.

_TRAIN_KEYS = ("loss", "total_steps", "duration_kimg", "lr", "lr_rampup_kimg", "betas", "ema_beta",
               "ema_halflife_kimg", "ema_rampup_ratio", "dropout", "augment_p", "grad_clip", "precision")  # fmt: skip


def _sampler(params: Mapping[str, Any], order: int | None = None) -> dict[str, Any]:
    return {"num_steps": int(params["num_steps"]), "sigma_min": float(params["sigma_min"]),
            "sigma_max": float(params["sigma_max"]), "rho": float(params["rho"]),
            "order": int(order if order is not None else params["sampler_order"])}  # fmt: skip


def _features(params: Mapping[str, Any]) -> dict[str, Any]:
    backend = params["backend"]
    if backend == "pixel":
        return {"backend": "pixel"}
    if backend == "sscd":
        return {"backend": "sscd", "model": str(params["sscd"]), "resize": int(params["sscd_resize"])}
    raise ValueError(f"unknown similarity backend {backend!r}; expected 'pixel' or 'sscd'")


def train_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per (N, width, training seed), most expensive first (for load balancing).

    Uses the parameters ``dataset_sizes``, ``widths``, ``width_key``, ``train_seeds``, ``arch``,
    ``precond``, ``network``, ``train``, ``batch_size``, ``batch_at_most_n``, the sampler's
    ``num_steps``/``sigma_min``/``sigma_max``/``rho``/``sampler_order``, ``eval_seeds``,
    ``sample_batch`` and the similarity ``backend``.
    """
    spec = data_spec(params)
    unknown = sorted(set(params["train"]) - set(_TRAIN_KEYS))
    if unknown:
        raise ValueError(f"train: unsupported keys {unknown}; allowed: {list(_TRAIN_KEYS)}")
    configs = []
    for n, width, seed in itertools.product(params["dataset_sizes"], params["widths"], params["train_seeds"]):
        n, width, seed = int(n), int(width), int(seed)
        batch = int(params["batch_size"])
        if params["batch_at_most_n"]:
            batch = min(batch, n)
        train = {"arch": params["arch"], "precond": params["precond"],
                 "network": {**params["network"], params["width_key"]: width},
                 "batch_size": batch, "seed": seed, **params["train"]}  # fmt: skip
        configs.append({"kind": KIND_TRAIN, "version": VERSION, "data": spec, "n": n, "width": width,
                        "seed": seed, "train": train, "sampler": _sampler(params),
                        "eval_seeds": str(params["eval_seeds"]), "sample_batch": int(params["sample_batch"]),
                        "features": _features(params)})  # fmt: skip
    configs.sort(key=lambda c: (-c["width"], -c["train"]["batch_size"], -c["n"], c["seed"]))
    return configs


def optimal_configs(params: Mapping[str, Any], orders: Sequence[int] = (1,)) -> list[dict[str, Any]]:
    """One optimal-denoiser config per (N, sampler order); order 1 is the authors' Euler sampler."""
    spec = data_spec(params)
    return [{"kind": KIND_OPTIMAL, "version": VERSION, "data": spec, "n": int(n),
             "sampler": _sampler(params, order), "eval_seeds": str(params["eval_seeds"]),
             "sample_batch": int(params["sample_batch"]), "chunk_size": int(params["optimal_chunk"]),
             "features": _features(params)}
            for n in params["dataset_sizes"] for order in orders]  # fmt: skip


def validate_configs(configs: Sequence[Mapping[str, Any]], build_networks: bool = False) -> pd.DataFrame:
    """Dry run: check every train config (TrainConfig, network kwargs, seeds) without training.

    With ``build_networks`` also instantiate each distinct network once (on the CPU) to count its
    parameters. Returns one row per config: n, width, seed, batch_size, steps, kimg, params.
    """
    from ..networks import build_network, network_kwargs
    from ..sampling import parse_seeds
    from ..training import TrainConfig

    counted: dict[str, int] = {}
    rows = []
    for c in configs:
        if c["kind"] != KIND_TRAIN:
            continue
        cfg = TrainConfig.from_dict(c["train"])
        net_cfg = network_kwargs(cfg.arch, cfg.precond, 1, 1, 0, **cfg.network)  # checks arch/precond
        seeds = parse_seeds(c["eval_seeds"])
        steps = _steps(c)
        key = json.dumps(net_cfg, sort_keys=True)
        if build_networks and key not in counted:
            res, ch = _data_shape(c["data"])
            net_cfg = network_kwargs(cfg.arch, cfg.precond, res, ch, 0, **cfg.network)
            net = build_network(net_cfg)
            counted[key] = sum(p.numel() for p in net.parameters())
            del net
        rows.append({"n": c["n"], "width": c["width"], "seed": c["seed"], "batch_size": cfg.batch_size,
                     "steps": steps, "kimg": steps * cfg.batch_size / 1000, "eval_seeds": len(seeds),
                     "params": counted.get(key)})  # fmt: skip
    return pd.DataFrame(rows)


def _data_shape(spec: Mapping[str, Any]) -> tuple[int, int]:
    if spec["source"] in ("molrg", "fashion_mnist"):
        return spec["resolution"], spec["channels"]
    return 32, 3


# ----------------------------------------------------------------------------
# Cell functions (module level, run in worker processes).


def _flat(x: torch.Tensor) -> torch.Tensor:
    return to_model_space(x).reshape(len(x), -1)


def nearest_two(x: torch.Tensor, train: torch.Tensor, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Distances from each x to its two nearest training points (L2, model space, float64).

    Returns ``nn_dist`` (S, 2) (second column inf when there is one training point), ``nn_index`` (S,)
    and ``nn_norm`` (S,), the norm of the nearest training point.
    """
    xf, yf = _flat(x), _flat(train)
    best = torch.full((len(xf), 2), math.inf, dtype=torch.float64)
    idx = torch.zeros(len(xf), dtype=torch.int64)
    for start in range(0, len(yf), chunk):
        d = torch.cdist(xf, yf[start : start + chunk])
        k = min(2, d.shape[1])
        vals, ids = d.topk(k, dim=1, largest=False)
        merged = torch.cat([best, vals], 1)
        merged_ids = torch.cat([idx[:, None].expand(-1, 2), ids + start], 1)
        order = merged.argsort(1)[:, :2]
        new_idx = merged_ids.gather(1, order[:, :1])[:, 0]
        best = merged.gather(1, order)
        idx = torch.where(order[:, 0] < 2, idx, new_idx)
    return {"nn_dist": best.numpy(), "nn_index": idx.numpy(), "nn_norm": yf[idx].norm(dim=1).numpy()}


def _sample(net: Any, config: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    from ..sampling import generate

    return generate(net, config["eval_seeds"], batch_size=config["sample_batch"], device=device,
                    output="float", **config["sampler"])  # fmt: skip


def _store_samples(x: torch.Tensor, spec: Mapping[str, Any]) -> np.ndarray:
    """float64 samples -> what a cell stores: float32 (MoLRG) or EDM-quantised uint8 images."""
    if spec["source"] == "molrg":
        return x.float().numpy()
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()


def _cell_statistics(
    samples: np.ndarray, config: Mapping[str, Any], device: torch.device
) -> dict[str, np.ndarray]:
    train = training_set(config["data"], config["n"])
    stats = nearest_two(torch.from_numpy(samples), train)
    if config["features"]["backend"] == "sscd":
        feats = sscd_features(samples, config["features"], device)
        train_feats = sscd_features(train.numpy(), config["features"], device)
        sims = feats.double() @ train_feats.double().T
        best, arg = sims.max(1)
        stats.update(features=feats.half().numpy(), max_cos=best.numpy(), max_cos_index=arg.numpy())
    if config["data"]["source"] == "molrg":
        stats["off_subspace"] = off_subspace_distance(samples, config["data"])
    return stats


@functools.lru_cache(maxsize=2)
def _sscd_model(model: str, device: str, resize: int):
    from ..features import SSCD

    return SSCD(model, device=device, resize=resize, batch_size=256, download=True)


def sscd_features(images: np.ndarray, feature_spec: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """Unit-norm SSCD descriptors (N, F) of uint8 images (N, C, H, W), resized to ``feature_spec['resize']``."""
    model = _sscd_model(feature_spec["model"], str(device), int(feature_spec["resize"]))
    return model(torch.as_tensor(images)).cpu()


def off_subspace_distance(samples: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Relative distance of each MoLRG sample to the nearest of the true subspaces (``MoLRG.off_subspace``)."""
    return make_molrg(spec).off_subspace(samples).numpy()


def run_train_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one model on the first N points, sample it at the evaluation seeds, store samples and statistics."""
    from ..checkpoints import save_network
    from ..training import TrainConfig, train

    device = cells.device()
    data = training_set(config["data"], config["n"])
    cfg = TrainConfig.from_dict({**config["train"], "log_every": max(1, _steps(config) // 20)})
    workdir = Path(staging) / "train"
    t0 = time.perf_counter()
    result = train(cfg, data, outdir=workdir, device=device, progress=False)
    train_s = time.perf_counter() - t0
    save_network(result.ema, Path(staging) / "network.pkl")
    shutil.rmtree(workdir / "snapshots", ignore_errors=True)
    for snap in workdir.glob("network-snapshot-*"):
        snap.unlink()
    t0 = time.perf_counter()
    x = _sample(result.ema, config, device)
    sample_s = time.perf_counter() - t0
    samples = _store_samples(x, config["data"])
    stats = _cell_statistics(samples, config, device)
    losses = [h["loss"] for h in result.history]
    out = {"n": config["n"], "width": config["width"], "seed": config["seed"], "steps": result.steps,
           "kimg": result.kimg, "final_loss": losses[-1] if losses else None, "train_seconds": train_s,
           "sample_seconds": sample_s, "params": sum(p.numel() for p in result.ema.parameters())}  # fmt: skip
    return out, {"samples": samples, **stats}


def _steps(config: Mapping[str, Any]) -> int:
    t = config["train"]
    if t.get("total_steps"):
        return int(t["total_steps"])
    return max(1, math.ceil(t["duration_kimg"] * 1000 / t["batch_size"]))


def run_optimal_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample the empirical optimal denoiser of the first N points at the evaluation seeds."""
    from ..optimal import OptimalDenoiser

    device = cells.device()
    data = training_set(config["data"], config["n"])
    net = OptimalDenoiser(data, chunk_size=config["chunk_size"], device=device)
    net.img_resolution, net.img_channels = int(data.shape[-1]), int(data.shape[1])
    t0 = time.perf_counter()
    x = _sample(net, config, device)
    sample_s = time.perf_counter() - t0
    samples = _store_samples(x, config["data"])
    stats = _cell_statistics(samples, config, device)
    out = {"n": config["n"], "order": config["sampler"]["order"], "sample_seconds": sample_s}
    return out, {"samples": samples, **stats}


# ----------------------------------------------------------------------------
# Copy criterion and its calibration.


@dataclasses.dataclass(frozen=True)
class Criterion:
    """When is a sample a copy of another: ``relative`` (||x - y|| <= t ||y||, pixels) or ``cosine`` (SSCD)."""

    kind: str
    threshold: float

    def __post_init__(self) -> None:
        if self.kind not in ("relative", "cosine"):
            raise ValueError(f"Criterion kind must be 'relative' or 'cosine', got {self.kind!r}")

    def memorized(self, cell: Mapping[str, Any]) -> np.ndarray:
        """Per-sample flags of a stored cell: is the sample a copy of a training point?"""
        a = cell["arrays"]
        if self.kind == "cosine":
            return a["max_cos"] > self.threshold
        return a["nn_dist"][:, 0] <= self.threshold * a["nn_norm"]

    def same(self, a: Mapping[str, Any], b: Mapping[str, Any]) -> np.ndarray:
        """Per-seed flags: are the two cells' samples from the same seed copies of each other (b the reference)?"""
        if self.kind == "cosine":
            fa, fb = a["arrays"]["features"].astype(np.float64), b["arrays"]["features"].astype(np.float64)
            return (fa * fb).sum(1) > self.threshold
        xa = _flat(torch.from_numpy(a["arrays"]["samples"])).numpy()
        xb = _flat(torch.from_numpy(b["arrays"]["samples"])).numpy()
        return relative_distance(xa, xb) <= self.threshold


def relative_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise ||x - y|| / ||y|| of flattened arrays (S, D)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-12)


def calibrate(
    spec: Mapping[str, Any],
    sizes: Sequence[int],
    fresh: int = 2000,  # true-distribution samples per size
    copy_noise: float = 0.1,  # relative noise of the noisy copies
    max_false: float = 0.01,  # at most this fraction of fresh samples may be flagged
    min_true: float = 0.99,  # at least this fraction of noisy copies must be flagged
    decimals: int = 2,  # the threshold is rounded down to this many decimals
    seed: int = 0,
) -> tuple[float, pd.DataFrame, pd.DataFrame]:
    """Pick the ``relative`` threshold t from data: the largest t (rounded down) at which fresh samples
    of the true distribution are flagged as copies of a training set at most ``max_false`` of the time,
    at every size. Returns t and a table per size: ``false_copy`` (fresh flagged), ``true_copy`` (noisy
    copies flagged), ``unrelated_pairs`` (two independent fresh samples flagged as the same image); and
    the distances themselves (long table: n, kind, rel)."""
    x_fresh = fresh_samples(spec, fresh)
    g = torch.Generator().manual_seed(seed)
    per_size = []
    for n in sizes:
        train = training_set(spec, int(n))
        st = nearest_two(x_fresh, train)
        rel_fresh = st["nn_dist"][:, 0] / st["nn_norm"]
        copies = noisy_copies(train, fresh, copy_noise, g)
        sc = nearest_two(copies, train)
        rel_copy = sc["nn_dist"][:, 0] / sc["nn_norm"]
        per_size.append((int(n), rel_fresh, rel_copy))
    # largest t with mean(rel_fresh <= t) <= max_false for every size
    limits = [np.sort(r)[int(math.floor(max_false * len(r)))] for _, r, _ in per_size]
    scale = 10**decimals
    t = math.floor(min(limits) * scale) / scale
    if t >= min(limits):  # rounding landed exactly on a sample: step below it
        t = (math.ceil(min(limits) * scale) - 1) / scale
    xf = _flat(x_fresh).numpy()
    half = len(xf) // 2
    unrelated = float(np.mean(relative_distance(xf[:half], xf[half : 2 * half]) <= t))
    rows = [{"n": n, "threshold": t, "false_copy": float(np.mean(rf <= t)), "true_copy": float(np.mean(rc <= t)),
             "unrelated_pairs": unrelated, "fresh_rel_q01": float(np.quantile(rf, max_false)),
             "copy_rel_q99": float(np.quantile(rc, min_true))} for n, rf, rc in per_size]  # fmt: skip
    distances = pd.concat([pd.DataFrame({"n": n, "kind": kind, "rel": r})
                           for n, rf, rc in per_size for kind, r in (("fresh samples", rf), ("noisy copies", rc))],
                          ignore_index=True)  # fmt: skip
    return t, pd.DataFrame(rows), distances


# ----------------------------------------------------------------------------
# Aggregation: tidy tables.


def gl_table(cells: Sequence[Mapping[str, Any]], criterion: Criterion) -> pd.DataFrame:
    """Generalization score per trained cell: columns n, width, seed, gl, off_subspace (MoLRG median)."""
    rows = []
    for c in cells:
        flags = criterion.memorized(c)
        row = {"n": c["n"], "width": c["width"], "seed": c["seed"], "gl": 1.0 - float(flags.mean())}
        if "off_subspace" in c["arrays"]:
            row["off_subspace"] = float(np.median(c["arrays"]["off_subspace"]))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["width", "n", "seed"]).reset_index(drop=True)


def pair_label(a: int, b: int) -> str:
    """``'8 vs 64'`` for widths 8 and 64."""
    return f"{a} vs {b}"


def pairwise_rp_table(cells: Sequence[Mapping[str, Any]], criterion: Criterion) -> pd.DataFrame:
    """RP between every two widths trained with the same seed on the same N: columns n, pair, seed, rp."""
    by_key = {(c["n"], c["width"], c["seed"]): c for c in cells}
    widths = sorted({c["width"] for c in cells})
    rows = []
    for n, seed in sorted({(c["n"], c["seed"]) for c in cells}):
        for a, b in itertools.combinations(widths, 2):
            if (n, a, seed) in by_key and (n, b, seed) in by_key:
                flags = criterion.same(by_key[(n, a, seed)], by_key[(n, b, seed)])
                rows.append({"n": n, "pair": pair_label(a, b), "width_a": a, "width_b": b, "seed": seed,
                             "rp": float(flags.mean())})  # fmt: skip
    return pd.DataFrame(rows)


def rp_optimal_table(cells: Sequence[Mapping[str, Any]], optimal: Sequence[Mapping[str, Any]],
                     criterion: Criterion) -> pd.DataFrame:  # fmt: skip
    """RP of each trained cell against the optimal denoiser's samples (same N, same seeds), per sampler order.

    Columns n, width, seed, order, rp.
    """
    opt = {(o["n"], o["order"]): o for o in optimal}
    rows = []
    for c in cells:
        for (n, order), o in opt.items():
            if n == c["n"]:
                flags = criterion.same(c, o)
                rows.append(
                    {
                        "n": n,
                        "width": c["width"],
                        "seed": c["seed"],
                        "order": order,
                        "rp": float(flags.mean()),
                    }
                )
    return pd.DataFrame(rows).sort_values(["order", "width", "n", "seed"]).reset_index(drop=True)


def optimal_gl_table(optimal: Sequence[Mapping[str, Any]], criterion: Criterion) -> pd.DataFrame:
    """GL of the optimal denoiser's own samples: columns n, order, gl (expected ~0: it returns training points)."""
    rows = [
        {"n": o["n"], "order": o["order"], "gl": 1.0 - float(criterion.memorized(o).mean())} for o in optimal
    ]
    return pd.DataFrame(rows).sort_values(["order", "n"]).reset_index(drop=True)


def wide(table: pd.DataFrame, index: str, columns: str, value: str) -> pd.DataFrame:
    """Pivot a tidy table, keeping the columns in order of first appearance."""
    order = list(dict.fromkeys(table[columns]))
    return table.pivot(index=index, columns=columns, values=value)[order]


def mean_sd(table: pd.DataFrame, index: str, columns: str, value: str) -> pd.DataFrame:
    """Wide table of ``mean +- sd`` strings (sd over repeats; omitted with a single repeat)."""
    g = table.groupby([index, columns])[value]
    mean, sd, count = g.mean().unstack(columns), g.std().unstack(columns), g.count().unstack(columns)
    out = mean.copy().astype(object)
    for r in mean.index:
        for c in mean.columns:
            m = mean.loc[r, c]
            out.loc[r, c] = f"{m:.2f}" if count.loc[r, c] < 2 else f"{m:.2f} ± {sd.loc[r, c]:.2f}"
    return out


def n_half(table: pd.DataFrame, value: str = "gl", by: Sequence[str] = ("width", "seed"), level: float = 0.5
           ) -> pd.DataFrame:  # fmt: skip
    """Training-set size where ``value`` first crosses ``level``, interpolated in log2 N, per group.

    Columns: the ``by`` keys and ``n_half`` (NaN when the curve never crosses).
    """
    rows = []
    for key, g in table.groupby(list(by)):
        g = g.sort_values("n")
        ns, vs = np.log2(g["n"].to_numpy(float)), g[value].to_numpy(float)
        crossing = math.nan
        for i in range(1, len(vs)):
            if vs[i - 1] < level <= vs[i]:
                frac = (level - vs[i - 1]) / (vs[i] - vs[i - 1])
                crossing = 2 ** (ns[i - 1] + frac * (ns[i] - ns[i - 1]))
                break
        if vs[0] >= level:
            crossing = 2 ** ns[0]
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "n_half": crossing})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------
# Checks (the acceptance criteria), returned as result rows.


def _row(
    quantity: str, setting: str, value: Any, paper: Any, check: str, passed: bool, note: str = ""
) -> dict:
    from ..results import row

    return row(quantity, setting, value, paper, check=check, passed=bool(passed), note=note)


def regime_checks(gl: pd.DataFrame, rp: pd.DataFrame, low: float = 0.1, high: float = 0.9, rp_min: float = 0.6
                  ) -> list[dict[str, Any]]:  # fmt: skip
    """GL <= low at the smallest size and >= high at the largest (every width); pairwise RP >= rp_min at
    both ends and lower in between (every pair). Means over training seeds."""
    rows = []
    n_lo, n_hi = gl["n"].min(), gl["n"].max()
    m = gl.groupby(["width", "n"])["gl"].mean()
    for w in sorted(gl["width"].unique()):
        rows.append(_row("GL", f"width {w}, N={n_lo}", round(m[(w, n_lo)], 3), "~0 (N <= 2^10)", f"<= {low}",
                         m[(w, n_lo)] <= low))  # fmt: skip
        rows.append(_row("GL", f"width {w}, N={n_hi}", round(m[(w, n_hi)], 3), "~1 (N >= 2^14)", f">= {high}",
                         m[(w, n_hi)] >= high))  # fmt: skip
    r = rp.groupby(["pair", "n"])["rp"].mean()
    for pair in rp["pair"].unique():
        s = r[pair].sort_index()
        ends = (s.iloc[0], s.iloc[-1])
        inner = s.iloc[1:-1]
        dip = float(inner.min()) if len(inner) else math.nan
        rows.append(_row("pairwise RP", f"{pair}, N={s.index[0]}", round(ends[0], 3), "0.62-0.69 (2^6)",
                         f">= {rp_min}", ends[0] >= rp_min))  # fmt: skip
        rows.append(_row("pairwise RP", f"{pair}, N={s.index[-1]}", round(ends[1], 3), "0.61-0.84 (2^15)",
                         f">= {rp_min}", ends[1] >= rp_min))  # fmt: skip
        rows.append(_row("pairwise RP", f"{pair}, minimum in between (N={inner.idxmin() if len(inner) else '-'})",
                         round(dip, 3), "0.02-0.18 (2^13)", "below both ends",
                         len(inner) > 0 and dip < min(ends)))  # fmt: skip
    return rows


def optimal_checks(rp_opt: pd.DataFrame, opt_gl: pd.DataFrame, order: int = 1, first_min: float = 0.4,
                   last_max: float = 0.05, tol: float = 0.05, gl_max: float = 0.05) -> list[dict[str, Any]]:  # fmt: skip
    """RP vs the optimal denoiser decreasing with N (no rise above ``tol`` between neighbouring sizes),
    >= first_min at the smallest size and <= last_max at the largest (every width); GL of the optimal
    denoiser's own samples <= gl_max at every size."""
    rows = []
    sub = rp_opt[rp_opt["order"] == order]
    m = sub.groupby(["width", "n"])["rp"].mean()
    for w in sorted(sub["width"].unique()):
        s = m[w].sort_index()
        rise = float(np.max(np.diff(s.to_numpy()))) if len(s) > 1 else 0.0
        rows.append(_row("RP vs optimal", f"width {w}, N={s.index[0]}", round(s.iloc[0], 3), "0.47-0.51 (2^6)",
                         f">= {first_min}", s.iloc[0] >= first_min))  # fmt: skip
        rows.append(_row("RP vs optimal", f"width {w}, N={s.index[-1]}", round(s.iloc[-1], 3), "~0 (2^14)",
                         f"<= {last_max}", s.iloc[-1] <= last_max))  # fmt: skip
        rows.append(_row("RP vs optimal", f"width {w}, largest rise between neighbouring sizes", round(rise, 3),
                         "decreasing", f"<= {tol}", rise <= tol))  # fmt: skip
    for o in sorted(opt_gl["order"].unique()):
        worst = float(opt_gl[opt_gl["order"] == o]["gl"].max())
        rows.append(_row("GL of optimal denoiser", f"order {o}, max over N", round(worst, 3), "~0",
                         f"<= {gl_max}", worst <= gl_max))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------
# Teacher data set (paper profile) and figures.


def prepare_teacher_dataset(params: Mapping[str, Any], batch_size: int = 256) -> Path:
    """Write the teacher-generated data set (seeds 0..teacher_images-1) to ``dataset_path`` unless it exists."""
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


def plot_calibration(
    distances: pd.DataFrame, threshold: float, profile: str, sizes: Sequence[int] | None = None
):
    """Histograms of the relative distance to the nearest training point: fresh samples vs noisy copies."""
    import matplotlib.pyplot as plt

    from .. import plotting

    sizes = sizes or sorted(distances["n"].unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(3.2 * len(sizes), 2.8), sharey=True, squeeze=False)
    for ax, n in zip(axes[0], sizes):
        sub = distances[distances["n"] == n]
        bins = np.linspace(0, max(1.2, float(sub["rel"].quantile(0.99))), 50)
        for (kind, g), color in zip(sub.groupby("kind", sort=False), plotting.colors(2)):
            ax.hist(g["rel"], bins=bins, alpha=0.6, color=color, label=kind, density=True)
        ax.axvline(threshold, color="k", ls="--", lw=1)
        ax.set_title(f"N = {n}")
        ax.set_xlabel("||x - NN(x)|| / ||NN(x)||")
    axes[0][0].set_ylabel("density")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"copy criterion: relative distance <= {threshold:g}", y=1.02)
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_regimes(gl: pd.DataFrame, rp: pd.DataFrame, profile: str, low: float = 0.1, high: float = 0.9):
    """P1 Fig. 2 at this profile's scale: GL vs N per width (left), pairwise RP vs N per pair (right)."""
    import matplotlib.pyplot as plt

    from .. import plotting

    mem_end, gen_start = plotting.regime_bounds(gl, "n", "gl", low=low, high=high, by="width")
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    gl = gl.assign(model=gl["width"].map(lambda w: f"width {w}"))
    plotting.errorbar_lines(gl, "n", "gl", hue="model", ax=axes[0])
    axes[0].set_ylabel("generalization score")
    axes[0].set_title("generalization")
    plotting.errorbar_lines(rp, "n", "rp", hue="pair", ax=axes[1])
    axes[1].set_ylabel("reproducibility score")
    axes[1].set_title("pairwise reproducibility")
    for ax in axes:
        ax.set_xlabel("training-set size N")
        plotting.shade_regimes(ax, mem_end, gen_start)
        ax.legend(fontsize=8, loc="center right")
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_paper_regimes():
    """The authors' curves (read from their figures) on the same axes as :func:`plot_regimes`."""
    import matplotlib.pyplot as plt

    from .. import plotting

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.4))
    gl, rp = paper_gl(), paper_pairwise_rp()
    plotting.errorbar_lines(gl, "n", "gl", hue="model", ax=axes[0], errorbar=None)
    plotting.errorbar_lines(rp, "n", "rp", hue="pair", ax=axes[1], errorbar=None)
    axes[0].set_ylabel("generalization score")
    axes[1].set_ylabel("reproducibility score")
    mem_end, gen_start = plotting.regime_bounds(gl, "n", "gl", by="model")
    for ax in axes:
        ax.set_xlabel("training-set size N (CIFAR-10)")
        plotting.shade_regimes(ax, mem_end, gen_start)
        ax.legend(fontsize=8, loc="center right")
    plotting.profile_badge(fig, "paper (authors' numbers)")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def plot_rp_optimal(
    rp_opt: pd.DataFrame, gl: pd.DataFrame, opt_gl: pd.DataFrame, profile: str, order: int = 1
):
    """P1 Fig. 4 (left) at this profile's scale: RP of each model vs the optimal denoiser (left), the
    authors' curves (middle) and the GL of the optimal denoiser's own samples (right)."""
    import matplotlib.pyplot as plt

    from .. import plotting

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1.15, 1.15, 0.9]})
    mem_end, gen_start = plotting.regime_bounds(gl, "n", "gl", by="width")
    sub = rp_opt[rp_opt["order"] == order]
    sub = sub.assign(model=sub["width"].map(lambda w: f"width {w}"))
    plotting.errorbar_lines(sub, "n", "rp", hue="model", ax=axes[0])
    axes[0].set_title("trained models vs optimal denoiser")
    plotting.shade_regimes(axes[0], mem_end, gen_start)
    paper = paper_rp_optimal()
    plotting.errorbar_lines(paper, "n", "rp", hue="model", ax=axes[1], errorbar=None)
    axes[1].set_title("the authors' numbers (CIFAR-10)")
    pm, pg = plotting.regime_bounds(paper_gl(), "n", "gl", by="model")
    plotting.shade_regimes(axes[1], pm, pg)
    og = opt_gl.assign(sampler=opt_gl["order"].map({1: "Euler", 2: "Heun"}))
    plotting.errorbar_lines(og, "n", "gl", hue="sampler", ax=axes[2], errorbar=None)
    axes[2].set_title("optimal denoiser: its own samples")
    axes[2].set_ylabel("generalization score")
    for ax in axes[:2]:
        ax.set_ylabel("reproducibility score")
    for ax, loc in zip(axes, ("lower left", "lower left", "center right")):
        ax.set_xlabel("training-set size N")
        ax.legend(fontsize=8, loc=loc)
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig
