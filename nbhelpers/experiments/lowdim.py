"""Low-dimensional structure (paper P2): Jacobian rank of denoisers and the MoLRG sample complexity.

Serves ``jacobian_rank.ipynb`` (P2 Fig. 3) and ``molrg_phase_transition.ipynb``. Grid cells are
module-level functions for :meth:`nbhelpers.runs.RunStore.run_grid`:

- ``run_rank_cell``: build or train one denoiser (closed-form MoLRG, low-rank model, U-Net on MoLRG,
  U-Net on downscaled Fashion-MNIST, or a released EDM checkpoint) and tabulate the effective rank of
  its Jacobian along sampling trajectories (the authors' procedure) or on a sigma grid.
- ``run_subspace_cell``: fit the low-rank model to N_k samples per class by subspace clustering and
  measure subspace recovery, over trials.
- ``run_unet_cell``: train a U-Net on MoLRG samples, sample it and store nearest-neighbour ratios.

Training the low-rank model. P2 shows that minimising its denoising loss is equivalent to subspace
clustering: as sigma -> 0 the loss reduces to maximising sum_i max_k ||U_k^T x_i||^2 over
orthonormal U_k (the K-subspaces objective). Plain stochastic gradient descent on the loss stalls in
local minima that mix the subspaces (a pilot recovered 0 of 3 mixtures at N_k = 2d), so
:func:`subspace_clustering` solves the objective with the alternating K-subspaces algorithm and random
restarts; the low-rank denoiser can then be trained further with the ordinary loop.

Success criterion (phase transition): a fit recovers the mixture when the largest distance between a
true subspace and its matched learned one is below ``threshold`` (default 0.1), with the distance of
:func:`nbhelpers.molrg.subspace_distance` (``||P - Q||_F / sqrt(2d)``: 0 for equal subspaces, 1 for
orthogonal ones, ``1/sqrt(d)`` when one of d directions is wrong).

Memorization criterion (U-Net): a generated x is a copy when ||x - NN1|| < ratio * ||x - NN2||
(nearest and second-nearest training points, ratio 1/3); GL is the fraction of non-copies. Fresh
samples of the true distribution score below 1 when d is small (about 1 - 3^-d), so every cell also
stores that baseline.
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

from ..scores import nn_ratio  # ||x - NN1|| / ||x - NN2||, the copy criterion's statistic

KIND_RANK = "lowdim-rank"
KIND_SUBSPACE = "lowdim-subspace"
KIND_UNET = "lowdim-unet"
VERSION = 1

EDM_PRETRAINED = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"

# ----------------------------------------------------------------------------
# The authors' numbers (reference/PAPERS.md; read from the plots, about +-0.02).

PAPER_SNR: tuple[float, ...] = (500.0, 125.0, 50.0, 10.0, 1.67, 0.91, 0.3, 0.12, 0.08, 0.04, 0.02, 0.01)
_PAPER_REAL = {500.0: (0.95, 0.95), 50.0: (0.5, 0.5), 10.0: (0.2, 0.27), 1.67: (0.08, 0.1), 0.3: (0.02, 0.02),
               0.04: (0.004, 0.006)}  # fmt: skip
_PAPER_MOLRG_UNET = {500.0: 0.98, 125.0: 0.96, 50.0: 0.94, 10.0: 0.22, 1.67: 0.125, 0.91: 0.19, 0.3: 0.48,
                     0.12: 0.667, 0.08: 0.667, 0.04: 0.667, 0.02: 0.667, 0.01: 0.667}  # fmt: skip
PAPER_MOLRG_N, PAPER_MOLRG_K, PAPER_MOLRG_D = 48, 2, 6  # d/n = 0.125 and Kd/n = 0.25 as plotted


def paper_rank_table() -> pd.DataFrame:
    """The authors' rank ratios: columns ``panel`` ('real', 'molrg'), ``model``, ``snr``, ``low``, ``high``.

    Real data: a range over CIFAR-10/CelebA/FFHQ/AFHQ. MoLRG (n = 48, K = 2): the U-Net and the
    low-rank model (d/n = 0.125 for SNR >= 1.67, Kd/n = 0.25 for SNR <= 0.3).
    """
    rows = [{"panel": "real", "model": "paper (real data)", "snr": s, "low": lo, "high": hi}
            for s, (lo, hi) in _PAPER_REAL.items()]  # fmt: skip
    rows += [{"panel": "molrg", "model": "paper U-Net", "snr": s, "low": v, "high": v}
             for s, v in _PAPER_MOLRG_UNET.items()]  # fmt: skip
    for s in PAPER_SNR:
        if s >= 1.67 or s <= 0.3:
            v = 0.125 if s >= 1.67 else 0.25
            rows.append({"panel": "molrg", "model": "paper low-rank", "snr": s, "low": v, "high": v})
    return pd.DataFrame(rows)


def nearest_paper_snr(snr: float | np.ndarray, max_factor: float = 1.6) -> np.ndarray:
    """The paper's grid value nearest (in log) to each SNR, NaN when farther than ``max_factor``."""
    s = np.atleast_1d(np.asarray(snr, dtype=float))
    grid = np.asarray(PAPER_SNR)
    dist = np.abs(np.log(s[:, None]) - np.log(grid[None, :]))
    idx = dist.argmin(1)
    out = grid[idx].astype(float)
    out[dist[np.arange(len(s)), idx] > math.log(max_factor)] = np.nan
    return out


# ----------------------------------------------------------------------------
# Data and small helpers.


def _device() -> torch.device:
    from ..devices import default_device

    return torch.device(default_device())


def molrg_spec(
    num_classes: int, intrinsic_dim: int, resolution: int, channels: int, seed: int
) -> dict[str, int]:
    """JSON description of a MoLRG: K, d, image shape (C, R, R) and the seed of its bases."""
    return {"num_classes": int(num_classes), "intrinsic_dim": int(intrinsic_dim),
            "resolution": int(resolution), "channels": int(channels), "seed": int(seed)}  # fmt: skip


def make_molrg(spec: Mapping[str, int]):
    """The :class:`nbhelpers.molrg.MoLRG` of a spec (bases from ``spec['seed']``)."""
    from ..molrg import MoLRG

    return MoLRG.create(spec["num_classes"], spec["intrinsic_dim"], spec["resolution"], spec["channels"],
                        generator=int(spec["seed"]))  # fmt: skip


def molrg_training_set(spec: Mapping[str, int], per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` samples of each class (float32 (K*per_class, C, R, R)), drawn from ``seed``."""
    x, _ = make_molrg(spec).sample(int(per_class), generator=torch.Generator().manual_seed(int(seed)))
    return x


def off_subspace(x: torch.Tensor, bases: torch.Tensor) -> np.ndarray:
    """Relative distance of each point (S, ...) to the nearest subspace of ``bases`` (K, n, d)."""
    xf = torch.as_tensor(x).reshape(len(x), -1).double()
    b = bases.double()
    energy = torch.einsum("knd,sn->skd", b, xf).square().sum(-1).amax(1)
    norm2 = xf.square().sum(1)
    return ((norm2 - energy).clamp_min(0) / norm2.clamp_min(1e-300)).sqrt().numpy()


# ----------------------------------------------------------------------------
# The low-rank model's training problem: subspace clustering (K-subspaces with restarts).


def _fit_bases(x: torch.Tensor, labels: torch.Tensor, K: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Top-d left singular vectors of each cluster (N, n); random orthonormal fill where rank < d."""
    n = x.shape[1]
    bases = torch.empty(K, n, d, dtype=x.dtype)
    for k in range(K):
        pts = x[labels == k]
        fill = torch.randn(n, d, generator=g, dtype=x.dtype)
        if len(pts):
            u, s, _ = torch.linalg.svd(pts.T, full_matrices=False)
            r = int((s > s[0] * 1e-9).sum()) if s[0] > 0 else 0
            r = min(r, d)
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
    n_pts = len(x)
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (unit @ unit.T).abs()
    bases = []
    residual = torch.ones(n_pts, dtype=x.dtype)
    for _ in range(K):
        seed = int(torch.multinomial(residual.clamp_min(0) + 1e-12, 1, generator=g))
        members = cos[seed].topk(min(d, n_pts)).indices
        u, s, _ = torch.linalg.svd(x[members].T, full_matrices=False)
        basis = u[:, : int((s > s[0] * 1e-9).sum())]
        bases.append(basis)
        energy = torch.stack([(unit @ b).square().sum(1) for b in bases], 1)
        residual = 1 - energy.amax(1)
    energy = torch.stack([(unit @ b).square().sum(1) for b in bases], 1)
    return energy.argmax(1)


def subspace_clustering(
    x: torch.Tensor,                   # Data (N, ...) flattened to (N, n).
    num_classes: int,                  # K.
    intrinsic_dim: int,                # d.
    restarts: int = 10,                # Restarts; the lowest residual wins.
    max_iter: int = 50,                # Alternations per restart (stops early when labels settle).
    generator: torch.Generator | None = None,
    init: str = "seeded",              # 'seeded' (see _seeded_labels) or 'random' (random assignment).
) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
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
        if init == "seeded":
            labels = _seeded_labels(xf, K, d, g)
        else:
            labels = torch.randint(0, K, (len(xf),), generator=g)
        for _ in range(int(max_iter)):
            bases = _fit_bases(xf, labels, K, d, g)
            energy = torch.einsum("knd,bn->bkd", bases, xf).square().sum(-1)
            new = energy.argmax(1)
            if torch.equal(new, labels):
                break
            labels = new
        bases = _fit_bases(xf, labels, K, d, g)
        energy = torch.einsum("knd,bn->bkd", bases, xf).square().sum(-1)
        residual = total - float(energy.amax(1).sum())
        if best is None or residual < best[2] - 1e-12 * max(total, 1.0):
            best = (bases, energy.argmax(1), residual)
    return best


def fit_lowrank(
    x: torch.Tensor,
    num_classes: int,
    intrinsic_dim: int,
    restarts: int = 10,
    generator: torch.Generator | None = None,
):
    """A :class:`nbhelpers.molrg.LowRankDenoiser` whose bases solve the clustering problem on ``x`` (N, C, R, R)."""
    from ..molrg import LowRankDenoiser

    bases, _, _ = subspace_clustering(x, num_classes, intrinsic_dim, restarts=restarts, generator=generator)
    net = LowRankDenoiser(num_classes, intrinsic_dim, x.shape[-1], x.shape[1])
    with torch.no_grad():
        net.U.copy_(bases.to(net.U.dtype))
    return net


# ----------------------------------------------------------------------------
# Jacobian-rank cells.

_TRAIN_KEYS = ("total_steps", "batch_size", "lr", "lr_rampup_kimg", "ema_beta", "ema_halflife_kimg",
               "ema_rampup_ratio", "dropout", "seed", "betas")  # fmt: skip


def _train_section(train: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(train) - set(_TRAIN_KEYS))
    if unknown:
        raise ValueError(f"train: unsupported keys {unknown}; allowed: {list(_TRAIN_KEYS)}")
    return dict(train)


def rank_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per model of the Jacobian-rank figure, from the notebook parameters.

    Real-image panel: ``checkpoints`` (EDM .pkl paths/URLs, the paper profile) and, when
    ``image_train`` is non-empty, a U-Net trained on Fashion-MNIST at ``image_resolution``. MoLRG panel:
    ``molrg_models`` among 'closed_form', 'lowrank', 'unet'; the MoLRG U-Net's profile is also taken at
    the training steps ``molrg_rank_steps`` (EMA snapshots of the same run). Points: ``points`` = 'trajectory' (the
    Jacobian at the start of each step of the 18-step Heun sampler from ``rank_seeds``) or 'grid'
    (held-out clean points plus noise at sigma = 1/``snr_grid``).
    """
    spec = molrg_spec(params["molrg_classes"], params["molrg_dim"], params["molrg_resolution"],
                      params["molrg_channels"], params["data_seed"])  # fmt: skip
    points = {"mode": str(params["points"]), "seeds": [int(s) for s in params["rank_seeds"]],
              "snr_grid": [float(s) for s in params["snr_grid"]], "rule": str(params["rank_rule"]),
              "ratio": float(params["rank_ratio"])}  # fmt: skip
    if points["mode"] not in ("trajectory", "grid"):
        raise ValueError(f"points must be 'trajectory' or 'grid', got {points['mode']!r}")
    base = {"kind": KIND_RANK, "version": VERSION, "points": points}
    configs = []
    for path in params["checkpoints"]:
        name = Path(str(path)).name.removesuffix(".pkl")
        configs.append(
            {**base, "panel": "real", "model": "checkpoint", "label": name, "checkpoint": str(path)}
        )
    if params["image_train"]:
        data = {"source": "fashion_mnist", "path": str(params["fashion_mnist"]),
                "resolution": int(params["image_resolution"]), "max_images": int(params["image_count"])}  # fmt: skip
        configs.append({**base, "panel": "real", "model": "unet", "data": data,
                        "label": f"U-Net, Fashion-MNIST {data['resolution']}x{data['resolution']}",
                        "network": dict(params["image_network"]), "train": _train_section(params["image_train"])})  # fmt: skip
    labels = {"closed_form": "closed-form", "lowrank": "low-rank model", "unet": "U-Net"}
    for model in params["molrg_models"]:
        if model not in labels:
            raise ValueError(f"unknown MoLRG model {model!r}; expected one of {sorted(labels)}")
        cfg = {**base, "panel": "molrg", "model": model, "label": labels[model], "data": {"source": "molrg", **spec},
               "per_class": int(params["molrg_per_class"])}  # fmt: skip
        if model == "unet":
            cfg["network"] = dict(params["molrg_network"])
            cfg["train"] = _train_section(params["molrg_train"])
            steps = sorted({int(s) for s in params.get("molrg_rank_steps", [])})
            if steps:
                cfg["rank_steps"] = steps
                cfg["gl_samples"] = int(params.get("molrg_gl_samples", 0))
        if model == "lowrank":
            cfg["train"] = _train_section(params["lowrank_train"])
            cfg["restarts"] = int(params["restarts"])
        configs.append(cfg)
    return configs


DUMP_STEPS = 5000  # training-state dump interval of resumable U-Net trainings (~7 min on one CPU core)


def _train_unet(
    data: torch.Tensor,
    network: Mapping[str, Any],
    train: Mapping[str, Any],
    device: torch.device,
    outdir: Path | None = None,
    snapshot_steps: int | None = None,
):
    """Train an EDM-preconditioned DDPM++ U-Net; with ``outdir`` the run dumps its state every
    ``DUMP_STEPS`` steps there and resumes from the newest dump (a killed notebook loses little)."""
    from ..training import TrainConfig
    from ..training import train as run_training

    cfg = TrainConfig(arch="ddpmpp", precond="edm", network=dict(network), **train,
                      log_every=max(1, int(train["total_steps"]) // 10), snapshot_steps=snapshot_steps,
                      state_dump_steps=DUMP_STEPS if outdir is not None else None)  # fmt: skip
    t0 = time.perf_counter()
    result = run_training(cfg, data, outdir=outdir, device=device, progress=False,
                          resume="auto" if outdir is not None else None)  # fmt: skip
    seconds = time.perf_counter() - t0
    if outdir is not None:  # steps done before a resume count too: time of each logged window
        seconds, prev = 0.0, 0
        for h in result.history:
            seconds += (h["step"] - prev) * cfg.batch_size / max(h["images_per_sec"], 1e-9)
            prev = h["step"]
    losses = [h["loss"] for h in result.history]
    return result.ema, {"train_seconds": seconds, "final_loss": losses[-1] if losses else None,
                        "params": sum(p.numel() for p in result.ema.parameters())}  # fmt: skip


def _image_data(data: Mapping[str, Any], train: bool, count: int) -> torch.Tensor:
    from ..data import load_fashion_mnist

    images, _ = load_fashion_mnist(data["path"], train=train, max_images=count, resolution=data["resolution"])
    return torch.from_numpy(images)


def _rank_training_set(config: Mapping[str, Any]) -> torch.Tensor:
    spec = config["data"]
    return molrg_training_set(spec, config["per_class"], seed=spec["seed"] * 1000 + 1)


def build_rank_model(
    config: Mapping[str, Any], device: torch.device, work: Path | None = None
) -> tuple[Any, dict[str, Any], Any]:
    """The denoiser of a rank config, training facts, and held-out clean points (or None).

    A MoLRG U-Net with ``rank_steps`` trains resumably in ``work`` and leaves EMA snapshots there.
    """
    model, info = config["model"], {}
    held_out = None
    npts = len(config["points"]["seeds"])
    if model == "checkpoint":
        from ..checkpoints import load_network

        return load_network(config["checkpoint"], device=device), info, None
    if config["data"]["source"] == "fashion_mnist":
        data = _image_data(config["data"], True, config["data"]["max_images"])
        net, info = _train_unet(data, config["network"], config["train"], device)
        held_out = _image_data(config["data"], False, npts).double() / 127.5 - 1
        return net, info, held_out
    spec = config["data"]
    mix = make_molrg(spec)
    held_out = molrg_training_set(spec, -(-npts // spec["num_classes"]), seed=spec["seed"] * 1000 + 2)[:npts]
    if model == "closed_form":
        return mix.denoiser().to(device), info, held_out
    x = _rank_training_set(config)
    if model == "unet":
        steps, total = config.get("rank_steps", []), int(config["train"]["total_steps"])
        if steps and (steps[-1] > total or steps[0] < 1):
            raise ValueError(f"molrg_rank_steps {steps} must lie in [1, total_steps = {total}]")
        net, info = _train_unet(x, config["network"], config["train"], device, outdir=work if steps else None,
                                snapshot_steps=math.gcd(*steps, total) if steps else None)  # fmt: skip
        return net, info, held_out
    from ..molrg import subspace_distance
    from ..training import TrainConfig
    from ..training import train as run_training

    g = torch.Generator().manual_seed(int(config["train"].get("seed", 0)))
    t0 = time.perf_counter()
    net = fit_lowrank(x, spec["num_classes"], spec["intrinsic_dim"], restarts=config["restarts"], generator=g)
    info["clustering_distance"] = subspace_distance(net.orthonormal_bases(), mix.bases)[1]
    steps = int(config["train"].get("total_steps", 0))
    if steps > 0:
        cfg = TrainConfig(precond="edm", **config["train"], log_every=max(1, steps // 10))
        result = run_training(cfg, x, device=device, progress=False, net=net)
        net = result.ema
    info["train_seconds"] = time.perf_counter() - t0
    info["subspace_distance"] = subspace_distance(net.orthonormal_bases(), mix.bases)[1]
    return net, info, held_out


def run_rank_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Build/train the model of ``config`` and store its rank profile (one row per point and sigma)."""
    from ..checkpoints import load_network
    from ..jacobian import rank_profile
    from ..runs import work_dir
    from ..sampling import generate
    from ..training import snapshot_path

    device = _device()
    work = work_dir(staging, config) if config.get("rank_steps") else None
    net, info, held_out = build_rank_model(config, device, work)
    pts = config["points"]
    t0 = time.perf_counter()
    kwargs = dict(rule=pts["rule"], ratio=pts["ratio"], device=device)

    def profile(model: Any) -> pd.DataFrame:
        if pts["mode"] == "trajectory":
            return rank_profile(model, seeds=pts["seeds"], trajectory=True, **kwargs)
        if held_out is None:
            raise ValueError(f"{config['model']}: points='grid' needs clean data; use points='trajectory'")
        return rank_profile(model, clean=held_out.to(device), sigmas=[1 / s for s in pts["snr_grid"]],
                            seeds=pts["seeds"], **kwargs)  # fmt: skip

    df = profile(net)
    cols = ("point", "sigma", "snr", "rank", "rank_ratio")
    arrays = {c: df[c].to_numpy(dtype=float) for c in cols}
    if work is not None:  # the same profile at earlier training steps, from the run's EMA snapshots
        total, batch = int(config["train"]["total_steps"]), int(config["train"]["batch_size"])
        x = _rank_training_set(config)
        frames, copies = [], []
        for s in sorted({*config["rank_steps"], total}):  # the final model always ends the history
            model = net if s == total else load_network(snapshot_path(work, s * batch), device=device)
            frames.append((df if s == total else profile(model)).assign(train_steps=s))
            if config.get("gl_samples", 0) > 0:  # is the model still generalizing? NN ratios of its samples
                samples = generate(
                    model, range(config["gl_samples"]), batch_size=256, device=device, output="float"
                )
                copies.append(pd.DataFrame({"train_steps": s, "nn_ratio": nn_ratio(samples, x).numpy()}))
        hist = pd.concat(frames, ignore_index=True)
        arrays.update({f"history_{c}": hist[c].to_numpy(dtype=float) for c in ("train_steps", *cols)})
        if copies:
            c = pd.concat(copies, ignore_index=True)
            arrays.update(
                {
                    "copies_train_steps": c["train_steps"].to_numpy(float),
                    "copies_nn_ratio": c["nn_ratio"].to_numpy(),
                }
            )
    info["jacobian_seconds"] = time.perf_counter() - t0
    info["n"] = int(df["n"].iloc[0])
    return {"panel": config["panel"], "model": config["model"], "label": config["label"], **info}, arrays


def rank_table(cells: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Tidy rank table from stored rank cells: panel, model, label, point, sigma, snr, rank, rank_ratio, n."""
    frames = []
    for c in cells:
        a = c["arrays"]
        frames.append(pd.DataFrame({"panel": c["panel"], "model": c["model"], "label": c["label"], "n": c["n"],
                                    **{k: a[k] for k in ("point", "sigma", "snr", "rank", "rank_ratio")}}))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def rank_history(cells: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rank profiles at several training steps (cells with ``rank_steps``): label, train_steps, point,
    sigma, snr, rank, rank_ratio, n; empty when no cell has them."""
    frames = []
    for c in cells:
        a = c.get("arrays", {})
        if "history_train_steps" not in a:
            continue
        cols = ("train_steps", "point", "sigma", "snr", "rank", "rank_ratio")
        frames.append(pd.DataFrame({"panel": c["panel"], "label": c["label"], "n": c["n"],
                                    **{k: a[f"history_{k}"] for k in cols}}))  # fmt: skip
    if not frames:
        return pd.DataFrame(
            columns=["panel", "label", "n", "train_steps", "point", "sigma", "snr", "rank", "rank_ratio"]
        )
    out = pd.concat(frames, ignore_index=True)
    out["train_steps"] = out["train_steps"].astype(int)
    return out


def rank_generalization(cells: Sequence[Mapping[str, Any]], ratio: float = 1 / 3) -> pd.DataFrame:
    """GL (share of samples that are not copies: NN ratio >= ``ratio``) of the U-Net at each training
    step of its rank history: columns label, train_steps, gl, samples; empty without such cells."""
    rows = []
    for c in cells:
        a = c.get("arrays", {})
        if "copies_train_steps" not in a:
            continue
        t = pd.DataFrame({"train_steps": a["copies_train_steps"].astype(int), "r": a["copies_nn_ratio"]})
        for s, g in t.groupby("train_steps"):
            rows.append({"label": c["label"], "train_steps": int(s), "gl": float((g.r >= ratio).mean()),
                         "samples": len(g)})  # fmt: skip
    return pd.DataFrame(rows, columns=["label", "train_steps", "gl", "samples"])


def rank_floor(table: pd.DataFrame, lo: float = 0.5, hi: float = 4.0) -> pd.DataFrame:
    """Lowest mean rank ratio over SNR in [lo, hi] per label (and per train_steps when present):
    columns label, [train_steps,] floor, snr_at_floor, floor_sd (spread over points at that SNR)."""
    keys = ["label", "train_steps"] if "train_steps" in table.columns else ["label"]
    cols = [*keys, "floor", "snr_at_floor", "floor_sd"]
    if table.empty:
        return pd.DataFrame(columns=cols)
    band = table[(table.snr >= lo) & (table.snr <= hi)]
    if band.empty:
        raise ValueError(f"no rank ratios with SNR in [{lo}, {hi}]")
    g = band.groupby([*keys, "snr"])["rank_ratio"].agg(["mean", "std"]).reset_index()
    best = g.loc[g.groupby(keys)["mean"].idxmin()]
    best = best.rename(columns={"mean": "floor", "snr": "snr_at_floor", "std": "floor_sd"})
    return best[cols].sort_values(keys).reset_index(drop=True)


def rank_floor_checks(
    history: pd.DataFrame, n: int, d: int, gl: pd.DataFrame | None = None, generalizing: float = 0.9
) -> list[dict[str, Any]]:
    """Result rows on the U-Net's rank floor against training length: it must fall from the first to
    the last snapshot, and (with ``gl`` from :func:`rank_generalization`) the final model must still
    generalize like the paper's (GL >= ``generalizing``); none without a history."""
    from ..results import row

    floor = rank_floor(history)
    out = []
    for label, t in gl.groupby("label") if gl is not None else []:
        last = t.sort_values("train_steps").iloc[-1]
        out.append(row(f"GL of the {label}'s samples after {int(last.train_steps)} steps", f"MoLRG n={n}, d={d}",
                       round(float(last.gl), 3), "~1 (generalizing)", f">= {generalizing:g}",
                       bool(last.gl >= generalizing), note=f"{int(last.samples)} samples; copy: NN1 < NN2 / 3"))  # fmt: skip
    for label, t in floor.groupby("label"):
        t = t.sort_values("train_steps")
        if len(t) < 2:
            continue
        first, last = t.iloc[0], t.iloc[-1]
        out.append(row(f"rank floor (min over SNR 0.5-4), {label} on MoLRG, after {int(last.train_steps)} vs "
                       f"{int(first.train_steps)} steps", f"MoLRG n={n}, d={d}",
                       f"{last.floor * n / d:.2f} vs {first.floor * n / d:.2f} d/n", "d/n", "falls with training",
                       bool(last.floor < first.floor)))  # fmt: skip
    return out


def plot_rank_floor(history: pd.DataFrame, profile: str, n: int, d: int, gl: pd.DataFrame | None = None):
    """Floor of the rank ratio (min over SNR 0.5-4, mean +- sd over points) against training steps,
    with d/n, the paper's U-Net (0.125 at SNR 1.67) and, on a second axis, the GL of the model's
    samples (``gl`` from :func:`rank_generalization`)."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    from ..plotting import colors, profile_badge, style

    floor = rank_floor(history)
    with style():
        fig, ax = plt.subplots(figsize=(5.8, 3.7))
        for color, (label, t) in zip(colors(max(1, floor["label"].nunique())), floor.groupby("label")):
            t = t.sort_values("train_steps")
            ax.errorbar(t["train_steps"], t["floor"], yerr=t["floor_sd"].fillna(0), marker="o", ms=4,
                        capsize=2, color=color, label=f"{label} rank floor (mean +- sd over points)")  # fmt: skip
        ax.axhline(d / n, color="0.3", lw=0.8, ls=":", label=f"d/n = {d / n:.3f}")
        ax.axhline(0.125, color="0.5", lw=1, ls="--", label="paper U-Net (SNR 1.67)")
        steps = sorted(floor["train_steps"].unique())
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(mpl.ticker.FixedLocator(steps))
        ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
        ax.set_xlabel("training steps")
        ax.set_ylabel("min rank ratio over SNR 0.5-4")
        ax.set_ylim(0, None)
        handles, labels = ax.get_legend_handles_labels()
        if gl is not None and len(gl):
            ax2 = ax.twinx()
            for label, t in gl.groupby("label"):
                t = t.sort_values("train_steps")
                ax2.plot(t["train_steps"], t["gl"], color="0.35", ls="-.", marker="s", ms=3,
                         label=f"GL of {label} samples (right axis)")  # fmt: skip
            ax2.set_ylim(0, 1.05)
            ax2.set_ylabel("GL (share of non-copies)")
            ax2.grid(False)
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.55, 0.9))
        fig.tight_layout()
        profile_badge(fig, profile)
    return fig


def rank_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd, min and max rank ratio per (panel, label, snr), with the nearest paper SNR."""
    g = table.groupby(["panel", "label", "snr"], sort=False)["rank_ratio"]
    out = g.agg(["mean", "std", "min", "max", "count"]).reset_index()
    out["paper_snr"] = nearest_paper_snr(out["snr"].to_numpy())
    return out.sort_values(["panel", "label", "snr"], ascending=[True, True, False], ignore_index=True)


def rank_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Companion rank ratio next to the paper's at each paper SNR (nearest measured SNR within x1.6)."""
    summ = rank_summary(table).dropna(subset=["paper_snr"])
    summ = summ.assign(gap=(np.log(summ["snr"]) - np.log(summ["paper_snr"])).abs())
    summ = summ.loc[summ.groupby(["label", "paper_snr"])["gap"].idxmin()]
    paper = paper_rank_table()
    rows = []
    for _, r in summ.iterrows():
        if r["panel"] == "real":
            ref = paper[(paper.panel == "real") & (paper.snr == r["paper_snr"])]
        else:
            name = "paper U-Net" if r["label"] == "U-Net" else "paper low-rank"
            ref = paper[(paper.model == name) & (paper.snr == r["paper_snr"])]
        p = None
        if len(ref):
            lo, hi = float(ref["low"].iloc[0]), float(ref["high"].iloc[0])
            p = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
        rows.append({"panel": r["panel"], "model": r["label"], "paper_snr": r["paper_snr"], "snr": r["snr"],
                     "companion": r["mean"], "companion_sd": r["std"], "paper": p})  # fmt: skip
    return pd.DataFrame(rows).sort_values(["panel", "model", "paper_snr"], ascending=[True, True, False],
                                          ignore_index=True)  # fmt: skip


def _band(summ: pd.DataFrame, label: str, lo: float, hi: float) -> pd.DataFrame:
    s = summ[(summ.label == label) & (summ.snr >= lo) & (summ.snr <= hi)]
    if s.empty:
        raise ValueError(f"no {label!r} rank ratios with SNR in [{lo}, {hi}]")
    return s


def rank_checks(
    table: pd.DataFrame, n: int, K: int, d: int, tol: float = 0.02, unet_floor: float = 1.5
) -> list[dict[str, Any]]:
    """Result rows (nbhelpers.results.row) with the P2 Fig. 3 claims checked on the companion data.

    - closed-form and low-rank: rank ratio = d/n for SNR >= 1.5 and = Kd/n for SNR <= 0.35 (+-``tol``);
    - U-Net (MoLRG): >= 0.9 at the highest SNR, near d/n (<= ``unet_floor`` d/n; the paper's U-Net:
      1.0 d/n at SNR 1.67, 1.5 d/n at 0.91) at its minimum over SNR in [0.5, 4], and a rank at the
      lowest SNR above 1.5 times that minimum (the rise at low SNR);
    - real images: >= 0.8 at the highest SNR and a minimum <= 0.2 over SNR <= 1.
    """
    from ..results import row

    summ = rank_summary(table)
    labels = set(summ["label"])
    out = []
    for label, paper_name in [("closed-form", "closed form"), ("low-rank model", "low-rank model")]:
        if label not in labels:
            continue
        hi = _band(summ, label, 1.5, math.inf)["mean"]
        lo = _band(summ, label, 0, 0.35)["mean"]
        out.append(row(f"rank ratio, {paper_name}, SNR >= 1.67", f"MoLRG n={n}, K={K}, d={d}", round(float(hi.mean()), 4),
                       0.125, f"all within {tol} of d/n = {d / n:.3f}", bool((hi - d / n).abs().max() <= tol)))  # fmt: skip
        out.append(row(f"rank ratio, {paper_name}, SNR <= 0.3", f"MoLRG n={n}, K={K}, d={d}", round(float(lo.mean()), 4),
                       0.25, f"all within {tol} of Kd/n = {K * d / n:.3f}", bool((lo - K * d / n).abs().max() <= tol)))  # fmt: skip
    if "U-Net" in labels:
        u = summ[summ.label == "U-Net"]
        top = float(u.loc[u.snr.idxmax(), "mean"])
        band = _band(summ, "U-Net", 0.5, 4.0)
        mid = float(band["mean"].min())
        bottom = float(u.loc[u.snr.idxmin(), "mean"])
        setting = f"MoLRG n={n}, K={K}, d={d}"
        out.append(
            row("rank ratio, U-Net on MoLRG, SNR 500", setting, round(top, 4), 0.98, ">= 0.9", top >= 0.9)
        )
        out.append(row("rank ratio, U-Net on MoLRG, min over SNR 0.5-4", setting, round(mid, 4), 0.125,
                       f"<= {unet_floor:g} d/n = {unet_floor * d / n:.3f}", mid <= unet_floor * d / n,
                       note=f"= {mid * n / d:.2f} d/n; the paper's U-Net: 1.0 d/n at SNR 1.67"))  # fmt: skip
        out.append(row("rank ratio, U-Net on MoLRG, lowest SNR / moderate-SNR minimum", setting,
                       round(bottom / mid, 3), round(0.667 / 0.125, 3), "> 1.5 (rises again at low SNR)",
                       bottom > 1.5 * mid))  # fmt: skip
    for label in summ[summ.panel == "real"]["label"].unique():
        r = summ[summ.label == label]
        top = float(r.loc[r.snr.idxmax(), "mean"])
        low = float(_band(summ, label, 0, 1.0)["mean"].min())
        out.append(
            row(f"rank ratio, {label}, highest SNR", "real images", round(top, 4), 0.95, ">= 0.8", top >= 0.8)
        )
        out.append(row(f"rank ratio, {label}, min over SNR <= 1", "real images", round(low, 4), "0.004-0.006",
                       "<= 0.2", low <= 0.2))  # fmt: skip
    return out


def plot_rank(table: pd.DataFrame, profile: str, n: int, K: int, d: int):
    """P2 Fig. 3 look-alike: rank ratio vs SNR (log-log), mean +- sd over points, paper values dashed."""
    import matplotlib as mpl
    import matplotlib.pyplot as plt

    from ..plotting import colors, profile_badge, style

    summ = rank_summary(table)
    paper = paper_rank_table()
    panels = [p for p in ("real", "molrg") if (summ.panel == p).any()]
    with style():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.9), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            s = summ[summ.panel == panel]
            labels = list(dict.fromkeys(s["label"]))
            cols = colors(len(labels) + 2)
            for i, label in enumerate(labels):
                t = s[s.label == label].sort_values("snr")
                wide = label == "closed-form"  # drawn wide and pale: the low-rank model lies on top of it
                ax.errorbar(t["snr"], t["mean"], yerr=t["std"].fillna(0), marker="o", ms=7 if wide else 4,
                            capsize=2, lw=4 if wide else 1.3, alpha=0.45 if wide else 1, color=cols[i],
                            label=label, zorder=2 if wide else 3)  # fmt: skip
            ref = paper[paper.panel == panel]
            for j, (name, t) in enumerate(ref.groupby("model", sort=False)):
                t = t.sort_values("snr")
                if panel == "real":
                    ax.fill_between(t["snr"], t["low"] * 0.9, t["high"] * 1.1, color="0.6", alpha=0.3, lw=0,
                                    label=name + " +-10%")  # fmt: skip
                else:
                    ax.plot(t["snr"], t["low"], ls="--", lw=1, marker="x", ms=4, color=cols[len(labels) + j],
                            label=name)  # fmt: skip
            if panel == "molrg":
                ax.axhline(d / n, color="0.3", lw=0.8, ls=":")
                ax.axhline(K * d / n, color="0.3", lw=0.8, ls=":")
                ax.text(0.012, d / n * 1.05, "d/n", fontsize=8, color="0.3")
                ax.text(0.012, K * d / n * 1.05, "Kd/n", fontsize=8, color="0.3")
                ax.set_title(f"MoLRG: n={n}, K={K}, d={d}")
            else:
                ax.set_title("real images")
            ax.set_xscale("log")
            ax.set_yscale("log")
            if panel == "molrg":
                ax.set_ylim(min(0.1, d / n * 0.8), 1.1)
            ax.yaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(mpl.ticker.NullFormatter())
            ax.invert_xaxis()
            ax.set_xlabel("SNR = 1/sigma")
            ax.set_ylabel("rank ratio (rank / n)")
            ax.legend(fontsize=7, loc="center left" if panel == "molrg" else "lower left")
        fig.tight_layout()
        profile_badge(fig, profile)
    return fig


# ----------------------------------------------------------------------------
# Phase transition (a): subspace recovery by the low-rank model.


def subspace_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per (resolution, d): all ``per_class_grid`` values and ``trials`` inside the cell."""
    configs = []
    for res, d in itertools.product(params["lowrank_resolutions"], params["lowrank_dims"]):
        configs.append({"kind": KIND_SUBSPACE, "version": VERSION, "num_classes": int(params["molrg_classes"]),
                        "intrinsic_dim": int(d), "resolution": int(res), "channels": int(params["molrg_channels"]),
                        "per_class": [int(v) for v in params["lowrank_per_class"]], "trials": int(params["trials"]),
                        "restarts": int(params["restarts"]), "seed": int(params["data_seed"])})  # fmt: skip
    return configs


def run_subspace_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Fit the low-rank model by subspace clustering for each N_k and trial; store the subspace distances."""
    from ..molrg import subspace_distance

    K, d = config["num_classes"], config["intrinsic_dim"]
    rows_nk, rows_trial, dists = [], [], []
    t0 = time.perf_counter()
    for trial in range(config["trials"]):
        spec = molrg_spec(K, d, config["resolution"], config["channels"], config["seed"] * 7919 + trial)
        mix = make_molrg(spec)
        for nk in config["per_class"]:
            x = molrg_training_set(spec, nk, seed=spec["seed"] * 1000 + 1)
            g = torch.Generator().manual_seed(trial)
            bases, _, _ = subspace_clustering(x, K, d, restarts=config["restarts"], generator=g)
            rows_nk.append(nk)
            rows_trial.append(trial)
            dists.append(subspace_distance(bases, mix.bases)[1])
    n = config["channels"] * config["resolution"] ** 2
    return ({"n": n, "intrinsic_dim": d, "seconds": time.perf_counter() - t0},
            {"per_class": np.asarray(rows_nk), "trial": np.asarray(rows_trial), "distance": np.asarray(dists)})  # fmt: skip


def subspace_table(cells: Sequence[Mapping[str, Any]], threshold: float = 0.1) -> pd.DataFrame:
    """Per (n, d, N_k, trial): the largest subspace distance and ``success`` (distance < threshold)."""
    frames = [pd.DataFrame({"n": c["n"], "d": c["intrinsic_dim"], "per_class": c["arrays"]["per_class"],
                            "trial": c["arrays"]["trial"], "distance": c["arrays"]["distance"]}) for c in cells]  # fmt: skip
    t = pd.concat(frames, ignore_index=True)
    t["success"] = t["distance"] < threshold
    return t


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


def subspace_checks(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Result rows: per n, success rate for N_k <= d - 1 and N_k >= d + 1, and the N_k/d at 50 % success."""
    from ..results import row

    out = []
    for n, t in table.groupby("n"):
        below = float(t[t.per_class < t.d].success.mean())
        above = float(t[t.per_class > t.d].success.mean())
        mids = [
            transition_point(s, "per_class", "success", 0.5, interpolate=False) / d for d, s in t.groupby("d")
        ]
        mid = float(np.nanmean(mids)) if mids else float("nan")
        out.append(
            row(
                "low-rank model: success rate, N_k < d",
                f"n={n}",
                round(below, 3),
                0.0,
                "<= 0.05",
                below <= 0.05,
            )
        )
        out.append(
            row(
                "low-rank model: success rate, N_k > d",
                f"n={n}",
                round(above, 3),
                1.0,
                ">= 0.9",
                above >= 0.9,
            )
        )
        out.append(row("low-rank model: smallest N_k/d with success >= 50%", f"n={n}", round(mid, 3), "~1 (N_k >= d)", "0.7-1.5",
                       bool(0.7 <= mid <= 1.5)))  # fmt: skip
    return out


# ----------------------------------------------------------------------------
# Phase transition (b): a U-Net trained on MoLRG, memorization vs generalization.


def unet_configs(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One config per (d, N_k = ratio * d, training seed); the most expensive first."""
    configs = []
    for d, ratio, seed in itertools.product(
        params["unet_dims"], params["unet_ratios"], params["train_seeds"]
    ):
        spec = molrg_spec(params["molrg_classes"], d, params["molrg_resolution"], params["molrg_channels"],
                          params["data_seed"])  # fmt: skip
        nk = max(1, int(round(float(ratio) * int(d))))
        train = {**_train_section(params["unet_train"]), "seed": int(seed)}
        train["batch_size"] = min(int(train["batch_size"]), nk * spec["num_classes"])
        configs.append({"kind": KIND_UNET, "version": VERSION, "data": spec, "per_class": nk, "seed": int(seed),
                        "network": dict(params["unet_network"]), "train": train,
                        "eval_seeds": str(params["eval_seeds"]), "fresh": int(params["fresh_samples"])})  # fmt: skip
    configs.sort(key=lambda c: (-c["train"]["batch_size"], -c["per_class"], c["seed"]))
    return configs


def run_unet_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train a U-Net on K*N_k MoLRG samples, sample it, store NN ratios (generated and fresh) and off-subspace distances."""
    from ..sampling import generate

    device = _device()
    spec = config["data"]
    x = molrg_training_set(spec, config["per_class"], seed=spec["seed"] * 1000 + 1)
    net, info = _train_unet(x, config["network"], config["train"], device)
    t0 = time.perf_counter()
    samples = generate(net, config["eval_seeds"], batch_size=256, device=device, output="float")
    info["sample_seconds"] = time.perf_counter() - t0
    fresh = molrg_training_set(spec, -(-config["fresh"] // spec["num_classes"]), seed=spec["seed"] * 1000 + 2)
    mix = make_molrg(spec)
    arrays = {"ratio": nn_ratio(samples, x).numpy(), "fresh_ratio": nn_ratio(fresh, x).numpy(),
              "off_subspace": off_subspace(samples, mix.bases)}  # fmt: skip
    return {
        "d": spec["intrinsic_dim"],
        "per_class": config["per_class"],
        "seed": config["seed"],
        **info,
    }, arrays


def unet_table(cells: Sequence[Mapping[str, Any]], ratio: float = 1 / 3) -> pd.DataFrame:
    """Per (d, N_k, seed): GL (fraction of samples with NN ratio >= ``ratio``), the fresh-sample GL and
    the median off-subspace distance of the samples."""
    rows = []
    for c in cells:
        a = c["arrays"]
        rows.append({"d": c["d"], "per_class": c["per_class"], "ratio": c["per_class"] / c["d"], "seed": c["seed"],
                     "gl": float((a["ratio"] >= ratio).mean()), "gl_fresh": float((a["fresh_ratio"] >= ratio).mean()),
                     "off_subspace": float(np.median(a["off_subspace"]))})  # fmt: skip
    return pd.DataFrame(rows).sort_values(["d", "per_class", "seed"], ignore_index=True)


def unet_transitions(table: pd.DataFrame, level: float = 0.5) -> pd.DataFrame:
    """N_k* per d: first N_k where GL reaches ``level`` times the fresh-sample GL (interpolated) on the
    seed-mean curve, N_k*/d, and the range of the per-seed N_k* (``nk_star_min``/``nk_star_max``, NaN
    where a seed never crosses) over ``seeds`` training seeds."""
    rows = []
    for d, t in table.groupby("d"):
        t = t.assign(gl_rel=t.gl / t.gl_fresh.clip(lower=1e-9))
        nk = transition_point(t, "per_class", "gl_rel", level)
        per_seed = [transition_point(g, "per_class", "gl_rel", level) for _, g in t.groupby("seed")]
        lo, hi = (min(per_seed), max(per_seed)) if not np.isnan(per_seed).any() else (np.nan, np.nan)
        rows.append({"d": int(d), "nk_star": nk, "nk_star_over_d": nk / d, "nk_star_min": lo, "nk_star_max": hi,
                     "seeds": len(per_seed)})  # fmt: skip
    return pd.DataFrame(rows)


def unet_checks(table: pd.DataFrame, trans: pd.DataFrame, memorized: float = 0.3) -> list[dict[str, Any]]:
    """Result rows: a memorization-to-generalization transition inside the grid for every d (GL at the
    smallest N_k <= ``memorized``, GL / fresh-sample GL at the largest >= 0.8), N_k* growing with d, and
    the log-log slope of N_k* against d (1 = linear; reported, not asserted)."""
    from ..results import row

    out = []
    for d, t in table.groupby("d"):
        small, large = t[t.per_class == t.per_class.min()], t[t.per_class == t.per_class.max()]
        first = float(small.gl.mean())
        last = float((large.gl / large.gl_fresh).mean())
        out.append(row("U-Net GL at the smallest N_k", f"d={d}, N_k={t.per_class.min()}", round(first, 3), "~0",
                       f"<= {memorized:g}", first <= memorized))  # fmt: skip
        out.append(row("U-Net GL / fresh-sample GL at the largest N_k", f"d={d}, N_k={t.per_class.max()}",
                       round(last, 3), "~1", ">= 0.8", last >= 0.8))  # fmt: skip
    tr = trans.dropna(subset=["nk_star"]).sort_values("d")
    ok = len(tr) >= 2 and bool(np.all(np.diff(tr.nk_star.to_numpy()) > 0))

    def ratio(r: Any) -> str:
        spread = getattr(r, "seeds", 1) > 1 and not np.isnan(r.nk_star_min)
        return f"d={int(r.d)}: {r.nk_star_over_d:.1f}" + (
            f" ({r.nk_star_min / r.d:.1f}-{r.nk_star_max / r.d:.1f})" if spread else ""
        )

    ratios = ", ".join(ratio(r) for r in tr.itertuples())
    out.append(row("U-Net transition N_k*/d", "GL = half the fresh-sample GL", ratios or "n/a", "N_k ~ 50-60 d (U-Net)",
                   "N_k* increases with d", ok, note="the constant depends on model size and training length"))  # fmt: skip
    if len(tr) >= 2:
        slope = float(np.polyfit(np.log(tr.d.to_numpy(float)), np.log(tr.nk_star.to_numpy(float)), 1)[0])
        out.append(row("U-Net: slope of log N_k* vs log d", "GL = half the fresh-sample GL", round(slope, 2), 1.0,
                       None, None, note="1 = linear in d; reported, not asserted"))  # fmt: skip
    return out


def plot_phase_transition(sub: pd.DataFrame | None, unet: pd.DataFrame | None, trans: pd.DataFrame | None,
                          profile: str, threshold: float):  # fmt: skip
    """(a) success-rate heatmaps per n with the line N_k = d, and the distances against the threshold;
    (b) U-Net GL vs N_k per d (fresh-sample GL dotted) and N_k* vs d."""
    import matplotlib.pyplot as plt

    from ..plotting import colors, log2_axis, profile_badge, style

    ns = sorted(sub["n"].unique()) if sub is not None else []
    ncols = len(ns) + 1 if sub is not None else 0
    ncols = max(ncols, 2 if unet is not None else 0)
    nrows = (sub is not None) + (unet is not None)
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
        r = 0
        if sub is not None:
            for j, n in enumerate(ns):
                ax = axes[r, j]
                t = sub[sub.n == n].pivot_table(
                    index="d", columns="per_class", values="success", aggfunc="mean"
                )
                t = t.sort_index(ascending=False)
                im = ax.imshow(t.to_numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_xticks(range(t.shape[1]), [str(v) for v in t.columns])
                ax.set_yticks(range(t.shape[0]), [str(v) for v in t.index])
                cols = list(t.columns)
                edge = [np.interp(dd, cols, range(len(cols))) - 0.5 for dd in t.index]  # left edge of N_k = d
                xs = np.repeat(edge, 2)
                ys = np.ravel([[i - 0.5, i + 0.5] for i in range(len(t.index))])
                ax.plot(xs, ys, color="w", ls="--", lw=1.5, label="N_k = d")
                ax.grid(False)
                ax.set_xlabel("samples per class N_k")
                ax.set_ylabel("intrinsic dimension d")
                ax.set_title(f"(a) low-rank model, n = {n}")
                ax.legend(fontsize=7, loc="lower right")
            fig.colorbar(im, ax=axes[r, len(ns) - 1], label="success rate")
            ax = axes[r, len(ns)]
            cl = colors(len(ns))
            for j, n in enumerate(ns):
                t = sub[sub.n == n]
                jitter = 1 + 0.04 * (j - (len(ns) - 1) / 2)
                ax.scatter(t.per_class / t.d * jitter, t.distance.clip(lower=1e-12), s=6, alpha=0.5, color=cl[j],
                           label=f"n = {n}")  # fmt: skip
            ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
            ax.axvline(1, color="0.5", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N_k / d")
            ax.set_ylabel("max subspace distance (floor 1e-12)")
            ax.set_title("success criterion, every fit")
            ax.legend(fontsize=7)
            for j in range(len(ns) + 1, ncols):
                axes[r, j].axis("off")
            r += 1
        if unet is not None:
            ax = axes[r, 0]
            ds = sorted(unet["d"].unique())
            cl = colors(len(ds))
            for i, d in enumerate(ds):
                t = unet[unet.d == d].groupby("per_class")
                m, s, f = t.gl.mean(), t.gl.std().fillna(0), t.gl_fresh.mean()
                ax.errorbar(
                    m.index,
                    m.values,
                    yerr=s.values,
                    marker="o",
                    ms=4,
                    capsize=2,
                    color=cl[i],
                    label=f"d = {d}",
                )
                ax.plot(f.index, f.values, ls=":", color=cl[i], lw=1)
            log2_axis(ax, unet["per_class"].unique(), label="samples per class N_k")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel("generalization score GL")
            ax.set_title("(b) U-Net on MoLRG (dotted: fresh samples)")
            ax.legend(fontsize=7)
            ax = axes[r, 1]
            tr = trans.dropna(subset=["nk_star"]) if trans is not None else None
            if tr is not None and len(tr):
                err = np.stack([tr.nk_star - tr.nk_star_min, tr.nk_star_max - tr.nk_star]).clip(min=0)
                seeds = int(tr.seeds.max()) if "seeds" in tr else 1
                ax.errorbar(tr.d, tr.nk_star, yerr=np.nan_to_num(err) if seeds > 1 else None, marker="o", color="k",
                            capsize=3, label="N_k* (GL = half of fresh)" + (f", range over {seeds} seeds" if seeds > 1 else ""))  # fmt: skip
                c = float(np.exp(np.mean(np.log(tr.nk_star / tr.d))))
                dd = np.linspace(0, max(ds) * 1.1, 10)
                ax.plot(dd, c * dd, ls="--", color="0.5", label=f"N_k = {c:.1f} d")
                ax.legend(fontsize=7)
            ax.set_xlabel("intrinsic dimension d")
            ax.set_ylabel("transition N_k*")
            ax.set_title("U-Net transition vs d")
            for j in range(2, ncols):
                axes[r, j].axis("off")
        fig.tight_layout()
        # the badge goes into the empty lower-right panel when there is one, clear of the titles
        profile_badge(fig, profile, loc="lower right" if unet is not None and ncols > 2 else "upper right")
    return fig
