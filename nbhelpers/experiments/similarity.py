"""Model similarity (P1 Figs. 6 and 12): do different diffusion models map the same noise to the same sample?

Several model settings (architecture x training framework x training seed) are trained on one data
set and sampled from the same evaluation seeds, i.e. the same standard-normal initial noise. Samples
made elsewhere (folders or zips of PNGs named by seed, e.g. ``000123.png``) join as outside sources.
Every source must cover the same seeds; scores pair samples by seed.

Two matrices are built over all sources:

- RP (reproducibility): the share of seeds whose two samples count as the same image. With SSCD
  descriptors (the authors' criterion) that is cos > 0.6; at MoLRG scale the model-free criterion is
  ``||x_row - x_col|| / ||x_col|| < t`` (``scores.rp_relative``), t calibrated so that two
  independent samples of the true distribution pass at most ``max_false_rate`` of the time.
- MAE score: the share of seeds whose two images differ by a mean absolute pixel difference (in
  [0, 1] units) below a threshold (``scores.mae_score``); 0.1 for images, calibrated like t for MoLRG.

Each source's descriptors are computed once and cached as ``FeatureSet`` files with their seeds.

Noise conventions (why one exported noise file serves every code base): ``export_noise`` writes
standard-normal eps per seed. EDM-style samplers (VP, VE and EDM preconditioning alike) start at
``x = sigma_max * eps`` (EDM multiplies the latents by t_0 = sigma_max = 80); a DDPM-style sampler in
alpha-bar form starts at ``x_T = eps`` (its x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps equals
EDM's x / sqrt(1 + sigma^2)); a VE/SMLD sampler in its own units starts at ``sigma_max * eps`` with
its own sigma_max (e.g. 50 or 100).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

KIND_MODEL = "similarity-model"
KIND_REFERENCE = "similarity-reference"
VERSION = 1
REFERENCE_NAME = "optimal (closed form)"
FRESH_NAME = "fresh samples of the data"

# ----------------------------------------------------------------------------
# The authors' matrices (upper triangles read from the figures; see reference/PAPERS.md).

PAPER_MODELS = ["DDPMv4", "DDPMv6", "Multistagev1", "EDMv1", "UViT", "CT", "Progressivev1"]
_PAPER_RP_UPPER = [
    [0.89, 0.86, 0.83, 0.81, 0.81, 0.88],
    [0.84, 0.83, 0.78, 0.80, 0.87],
    [0.78, 0.80, 0.76, 0.86],
    [0.74, 0.76, 0.85],
    [0.70, 0.82],
    [0.91],
]
_PAPER_MAE_UPPER = [
    [0.92, 0.85, 0.85, 0.84, 0.75, 0.88],
    [0.87, 0.87, 0.82, 0.77, 0.90],
    [0.81, 0.76, 0.77, 0.87],
    [0.76, 0.72, 0.86],
    [0.68, 0.84],
    [0.83],
]


def _symmetric(upper: list[list[float]], names: Sequence[str]) -> pd.DataFrame:
    m = np.eye(len(names))
    for i, row in enumerate(upper):
        for k, v in enumerate(row):
            m[i, i + 1 + k] = m[i + 1 + k, i] = v
    return pd.DataFrame(m, index=list(names), columns=list(names))


def paper_rp_matrix() -> pd.DataFrame:
    """The authors' RP matrix over ``PAPER_MODELS`` (7 x 7, symmetric, diagonal 1; read from plot, +-0.02)."""
    return _symmetric(_PAPER_RP_UPPER, PAPER_MODELS)


def paper_mae_matrix() -> pd.DataFrame:
    """The authors' MAE-score matrix over ``PAPER_MODELS`` (7 x 7, symmetric, diagonal 1)."""
    return _symmetric(_PAPER_MAE_UPPER, PAPER_MODELS)


def off_diagonal(matrix: pd.DataFrame, names: Sequence[str] | None = None) -> np.ndarray:
    """The off-diagonal entries of a square matrix (restricted to ``names`` if given), flattened."""
    m = matrix if names is None else matrix.loc[list(names), list(names)]
    a = m.to_numpy(dtype=float)
    return a[~np.eye(len(a), dtype=bool)]


# ----------------------------------------------------------------------------
# Data.


def data_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """JSON data description from notebook parameters.

    ``dataset='molrg'``: ``molrg_classes`` K, ``molrg_dim`` d, ``resolution``, ``channels``,
    ``data_seed``, ``num_train`` points. ``dataset='images'``: the first ``num_train`` images of the
    EDM folder/zip ``dataset_path``.
    """
    kind, n = params["dataset"], int(params["num_train"])
    if n < 1:
        raise ValueError(f"num_train must be positive, got {n}")
    if kind == "molrg":
        return {"source": "molrg", "num_classes": int(params["molrg_classes"]), "intrinsic_dim": int(params["molrg_dim"]),
                "resolution": int(params["resolution"]), "channels": int(params["channels"]),
                "seed": int(params["data_seed"]), "num_train": n}  # fmt: skip
    if kind == "images":
        if not params.get("dataset_path"):
            raise ValueError("dataset='images' needs dataset_path (an EDM zip or folder of training images)")
        return {"source": "images", "path": str(params["dataset_path"]), "num_train": n}
    raise ValueError(f"unknown dataset {kind!r}; expected 'molrg' or 'images'")


def molrg_model(spec: Mapping[str, Any]):
    """The ``MoLRG`` of a molrg data spec (its bases depend only on the spec's seed)."""
    from ..molrg import MoLRG

    if spec["source"] != "molrg":
        raise ValueError(f"data source {spec['source']!r} has no closed-form model (only 'molrg' has)")
    return MoLRG.create(spec["num_classes"], spec["intrinsic_dim"], spec["resolution"], spec["channels"],
                        generator=spec["seed"])  # fmt: skip


def molrg_draw(spec: Mapping[str, Any], count: int, seed: int) -> torch.Tensor:
    """``count`` MoLRG points (float32 model space, classes shuffled) drawn from ``seed``."""
    model = molrg_model(spec)
    g = torch.Generator().manual_seed(int(seed))
    x, _ = model.sample(-(-count // model.num_classes), generator=g)
    return x[torch.randperm(len(x), generator=g)[:count]].contiguous()


def training_data(spec: Mapping[str, Any]) -> torch.Tensor:
    """The training set: float32 model space (MoLRG) or uint8 images (N, C, R, R)."""
    n = spec["num_train"]
    if spec["source"] == "molrg":
        return molrg_draw(spec, n, seed=spec["seed"] * 1000 + 1)
    from ..data import load_images

    images, _ = load_images(spec["path"], max_images=n)
    if len(images) < n:
        raise ValueError(f"{spec['path']}: holds {len(images)} images, fewer than num_train={n}")
    return torch.from_numpy(images)


def unrelated_pairs(spec: Mapping[str, Any], count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of ``count`` independent samples of the data distribution, for threshold calibration.

    MoLRG: fresh draws of the true distribution; images: two disjoint halves of the training images.
    """
    if spec["source"] == "molrg":
        x = molrg_draw(spec, 2 * count, seed=spec["seed"] * 1000 + 2 + seed)
        return x[:count], x[count:]
    x = training_data(spec)
    if len(x) < 2:
        raise ValueError("need at least two training images for unrelated pairs")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    half = min(count, len(x) // 2)
    return x[perm[:half]], x[perm[half : 2 * half]]


def calibrate_threshold(distances: Any, max_false_rate: float = 0.01, decimals: int = 2) -> float:
    """The largest threshold t (rounded down to ``decimals``) with mean(distances < t) <= max_false_rate.

    ``distances`` are scores of unrelated pairs (relative L2 distances or MAEs) that must not be
    flagged as the same image.
    """
    d = np.sort(np.asarray(distances, dtype=np.float64).reshape(-1))
    if len(d) == 0 or not np.isfinite(d).all():
        raise ValueError("distances must be a non-empty set of finite numbers")
    if not 0 <= max_false_rate < 1:
        raise ValueError(f"max_false_rate must be in [0, 1), got {max_false_rate}")
    limit = d[int(np.floor(max_false_rate * len(d)))]  # t <= limit flags at most the allowed count
    scale = 10**decimals
    return float(np.floor(limit * scale) / scale)


# ----------------------------------------------------------------------------
# Grid configs.

_TRAIN_KEYS = ("total_steps", "duration_kimg", "lr", "lr_rampup_kimg", "betas", "ema_beta", "ema_halflife_kimg",
               "ema_rampup_ratio", "dropout", "augment_p", "grad_clip", "precision", "batch_size")  # fmt: skip


def sampler_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """The shared sampler: EDM schedule (num_steps, sigma_min, sigma_max, rho), Heun (order 2) or Euler (1)."""
    return {"num_steps": int(params["num_steps"]), "sigma_min": float(params["sigma_min"]),
            "sigma_max": float(params["sigma_max"]), "rho": float(params["rho"]),
            "order": int(params["sampler_order"])}  # fmt: skip


def model_configs(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One run config per model setting, keyed by the setting's display name.

    ``models``: list of ``{name, arch, precond, seed}`` plus optional ``network`` and ``train``
    overrides; ``arch_network[arch]`` holds per-architecture network overrides; ``train`` the shared
    training settings (``_TRAIN_KEYS``).
    """
    spec = data_spec(params)
    shared = dict(params["train"])
    unknown = sorted(set(shared) - set(_TRAIN_KEYS))
    if unknown:
        raise ValueError(f"train: unsupported keys {unknown}; allowed: {list(_TRAIN_KEYS)}")
    out: dict[str, dict[str, Any]] = {}
    for m in params["models"]:
        missing = {"name", "arch", "precond", "seed"} - set(m)
        if missing:
            raise ValueError(f"model setting {m!r} lacks {sorted(missing)}")
        name = str(m["name"])
        if name in out or name == REFERENCE_NAME:
            raise ValueError(f"model name {name!r} is used twice")
        own_train = dict(m.get("train", {}))
        bad = sorted(set(own_train) - set(_TRAIN_KEYS))
        if bad:
            raise ValueError(f"model {name!r}: unsupported train keys {bad}")
        network = {**params["arch_network"].get(m["arch"], {}), **m.get("network", {})}
        train = {"arch": m["arch"], "precond": m["precond"], "network": network, "seed": int(m["seed"]),
                 **shared, **own_train}  # fmt: skip
        out[name] = {"kind": KIND_MODEL, "version": VERSION, "data": spec, "train": train,
                     "sampler": sampler_spec(params), "eval_seeds": str(params["eval_seeds"]),
                     "sample_batch": int(params["sample_batch"])}  # fmt: skip
    return out


def reference_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Run config of the closed-form posterior-mean denoiser of the true distribution (MoLRG only)."""
    return {"kind": KIND_REFERENCE, "version": VERSION, "data": data_spec(params), "sampler": sampler_spec(params),
            "eval_seeds": str(params["eval_seeds"]), "sample_batch": int(params["sample_batch"])}  # fmt: skip


def validate_configs(configs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Dry run: build each model setting's TrainConfig and network; one row per model with its
    parameter count, steps, kimg and sigma range (the schedule is clamped to it)."""
    from ..networks import make_network
    from ..training import TrainConfig

    rows = []
    for name, c in configs.items():
        cfg = TrainConfig.from_dict(c["train"])
        res, ch = _data_shape(c["data"])
        net = make_network(cfg.arch, cfg.precond, res, ch, **cfg.network)
        steps = cfg.num_steps()
        rows.append({"model": name, "arch": cfg.arch, "precond": cfg.precond, "seed": cfg.seed,
                     "params": sum(p.numel() for p in net.parameters()), "steps": steps,
                     "kimg": steps * cfg.batch_size / 1000, **sigma_range(net, c["sampler"])})  # fmt: skip
    return pd.DataFrame(rows)


def sigma_range(net: Any, sampler: Mapping[str, Any]) -> dict[str, float]:
    """First and last nonzero noise level of the shared schedule after clamping to ``net``'s range."""
    from ..sampling import edm_sigmas

    s = edm_sigmas(sampler["num_steps"], sampler["sigma_min"], sampler["sigma_max"], sampler["rho"], net=net)
    return {"sigma_first": float(s[0]), "sigma_last": float(s[-2])}


def _data_shape(spec: Mapping[str, Any]) -> tuple[int, int]:
    if spec["source"] == "molrg":
        return spec["resolution"], spec["channels"]
    from ..data import iter_image_batches

    first = next(iter_image_batches(spec["path"], 1, max_images=1))
    return int(first.shape[-1]), int(first.shape[1])


# ----------------------------------------------------------------------------
# Cell functions (module level, run in worker processes by RunStore.run_grid).


def _device() -> torch.device:
    from ..devices import default_device

    return default_device()


def _store_samples(x: torch.Tensor, spec: Mapping[str, Any]) -> np.ndarray:
    """float64 samples -> stored form: float32 model space (MoLRG) or EDM-quantised uint8 images."""
    if spec["source"] == "molrg":
        return x.float().numpy()
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()


def _sample(net: Any, config: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    from ..sampling import generate

    return generate(net, config["eval_seeds"], batch_size=config["sample_batch"], device=device, output="float",
                    **config["sampler"])  # fmt: skip


def run_model_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one model setting on the shared data, sample it at the evaluation seeds; store samples and seeds."""
    from ..checkpoints import save_network
    from ..sampling import parse_seeds
    from ..training import TrainConfig, train

    device = _device()
    data = training_data(config["data"])
    cfg = TrainConfig.from_dict(config["train"])
    cfg.log_every = max(1, cfg.num_steps() // 20)
    workdir = Path(staging) / "train"
    t0 = time.perf_counter()
    result = train(cfg, data, outdir=workdir, device=device, progress=False)
    train_s = time.perf_counter() - t0
    save_network(result.ema, Path(staging) / "network.pkl")
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    x = _sample(result.ema, config, device)
    sample_s = time.perf_counter() - t0
    losses = [h["loss"] for h in result.history]
    out = {"arch": cfg.arch, "precond": cfg.precond, "seed": cfg.seed, "steps": result.steps, "kimg": result.kimg,
           "final_loss": losses[-1] if losses else None, "train_seconds": train_s, "sample_seconds": sample_s,
           "params": sum(p.numel() for p in result.ema.parameters()), **sigma_range(result.ema, config["sampler"])}  # fmt: skip
    seeds = np.asarray(parse_seeds(config["eval_seeds"]), dtype=np.int64)
    return out, {"samples": _store_samples(x, config["data"]), "seeds": seeds}


def run_reference_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample the closed-form MoLRG posterior mean (the optimal denoiser of the true distribution)."""
    from ..sampling import parse_seeds

    device = _device()
    net = molrg_model(config["data"]).denoiser().to(device)
    t0 = time.perf_counter()
    x = _sample(net, config, device)
    seeds = np.asarray(parse_seeds(config["eval_seeds"]), dtype=np.int64)
    out = {"sample_seconds": time.perf_counter() - t0, **sigma_range(net, config["sampler"])}
    return out, {"samples": _store_samples(x, config["data"]), "seeds": seeds}


def run_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Dispatch on ``config['kind']`` (one function for ``RunStore.run_grid``)."""
    if config["kind"] == KIND_MODEL:
        return run_model_cell(config, staging)
    if config["kind"] == KIND_REFERENCE:
        return run_reference_cell(config, staging)
    raise ValueError(f"unknown cell kind {config['kind']!r}")


# ----------------------------------------------------------------------------
# Sample sources: in-house cells and outside folders/zips.


@dataclass
class SampleSource:
    """One sampler's outputs: ``samples`` (N, C, H, W) uint8 or float32 model space, ``seeds`` (N,) int64.

    ``origin`` says where they come from (a run folder or an outside path); ``key`` identifies the
    content for the feature cache.
    """

    name: str
    samples: np.ndarray
    seeds: np.ndarray
    origin: str
    key: str

    def __post_init__(self) -> None:
        self.seeds = np.asarray(self.seeds, dtype=np.int64)
        if self.samples.ndim != 4 or len(self.samples) != len(self.seeds):
            raise ValueError(
                f"{self.origin}: {len(self.seeds)} seeds for samples of shape {self.samples.shape}"
            )


def cell_source(name: str, cell: Mapping[str, Any]) -> SampleSource:
    """A source from a stored run cell (``RunStore.load`` result)."""
    a = cell["arrays"]
    return SampleSource(name, a["samples"], a["seeds"], origin=cell["dir"], key=Path(cell["dir"]).name)


def load_sample_folder(name: str, path: str | os.PathLike) -> SampleSource:
    """Load a folder or zip of PNGs named by seed (``000123.png``, ``img000123.png``, ``seed123.png``,
    in any subfolders) as uint8 images with their seeds; names that do not give distinct seeds are an error."""
    from ..data import image_names, load_images
    from ..features import seeds_from_names

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such folder or zip of samples (outside model {name!r})")
    names = image_names(path)
    seeds = seeds_from_names(names)
    if seeds is None:
        raise ValueError(
            f"{path}: file names must carry distinct seeds (e.g. 000123.png); got e.g. {names[:3]}"
        )
    images, _ = load_images(path)
    st = path.stat()
    identity = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{len(names)}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return SampleSource(name, images, seeds, origin=str(path), key=f"outside-{key}")


def _few(values: Sequence[int] | np.ndarray, k: int = 5) -> str:
    v = list(np.asarray(values).tolist())
    return ", ".join(str(s) for s in v[:k]) + (f", ... ({len(v)} in all)" if len(v) > k else "")


def check_same_seeds(sources: Sequence[SampleSource], expected: Sequence[int] | None = None) -> np.ndarray:
    """The common seed set (sorted int64) after checking that every source covers exactly the same seeds.

    ``expected`` (e.g. the evaluation seeds) is the set to match; otherwise the first source's.
    A mismatch is a ValueError naming each offending source with seeds it lacks and extra ones.
    """
    if not sources:
        raise ValueError("no sample sources given")
    ref = np.unique(np.asarray(expected if expected is not None else sources[0].seeds, dtype=np.int64))
    ref_name = (
        "the evaluation seeds" if expected is not None else f"{sources[0].name!r} ({sources[0].origin})"
    )
    problems = []
    for s in sources:
        uniq = np.unique(s.seeds)
        if len(uniq) != len(s.seeds):
            problems.append(f"{s.name!r} ({s.origin}) repeats seeds")
            continue
        missing, extra = np.setdiff1d(ref, uniq), np.setdiff1d(uniq, ref)
        if len(missing) or len(extra):
            parts = [
                f"lacks {_few(missing)}" if len(missing) else "",
                f"has extra {_few(extra)}" if len(extra) else "",
            ]
            problems.append(f"{s.name!r} ({s.origin}) " + " and ".join(p for p in parts if p))
    if problems:
        raise ValueError(f"sample sources do not cover the same seeds as {ref_name}: " + "; ".join(problems))
    shapes = {tuple(s.samples.shape[1:]) for s in sources}
    if len(shapes) > 1:
        raise ValueError(f"sample sources have different image shapes: {sorted(shapes)}")
    return ref


# ----------------------------------------------------------------------------
# Descriptors, cached per source.


def _slug(name: str) -> str:
    """File-name-safe lower-case form of a name."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "model"


def source_features(
    source: SampleSource,
    backend: str,                      # 'relative' (model-space pixels), 'sscd' or 'pixel' (cosine)
    cache_dir: str | os.PathLike,      # where FeatureSet files are kept
    sscd_model: Any = None,            # sscd: an SSCD instance (or callable) or a file/URL/name
    device: str | torch.device | None = None,
) -> Any:  # fmt: skip
    """The source's descriptors as a ``FeatureSet`` with seeds; computed once, then read from the cache.

    'relative': the samples themselves, flattened, in model space [-1, 1] (compared by relative L2
    distance); 'sscd': SSCD descriptors (compared by cosine); 'pixel': unit pixel vectors (cosine).
    """
    from ..features import FeatureSet, extract_features

    if backend not in ("relative", "sscd", "pixel"):
        raise ValueError(f"unknown similarity backend {backend!r}; expected 'relative', 'sscd' or 'pixel'")
    path = Path(cache_dir) / f"{_slug(source.name)}-{backend}-{_slug(source.key)}.npz"
    if path.exists():
        fs = FeatureSet.load(path)
        if fs.seeds is not None and np.array_equal(fs.seeds.numpy(), source.seeds):
            return fs
    x = source.samples
    if backend == "relative":
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.double() / 127.5 - 1 if t.dtype == torch.uint8 else t.double()
        fs = FeatureSet(
            t.reshape(len(t), -1), source.seeds, meta={"backend": backend, "origin": source.origin}
        )
    else:
        if x.dtype != np.uint8:
            x = (torch.from_numpy(x).double() * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()
        fs = extract_features(x, backend=backend, model=sscd_model if backend == "sscd" else None,
                              seeds=source.seeds, device=device)  # fmt: skip
        fs.meta["origin"] = source.origin
    fs.save(path)
    return fs


# ----------------------------------------------------------------------------
# Score matrices.


def score_matrix(items: Mapping[str, Any], score: Callable[[Any, Any], float]) -> pd.DataFrame:
    """Square DataFrame of ``score(items[row], items[col])`` over every ordered pair (diagonal included)."""
    names = list(items)
    m = np.array([[score(items[a], items[b]) for b in names] for a in names], dtype=float)
    return pd.DataFrame(m, index=names, columns=names)


def rp_matrix(features: Mapping[str, Any], backend: str, threshold: float) -> pd.DataFrame:
    """RP between every two sources' FeatureSets: cosine > threshold ('sscd', 'pixel') or relative
    L2 distance ||row - col|| / ||col|| < threshold ('relative')."""
    from ..scores import reproducibility_score, rp_relative

    if backend == "relative":
        return score_matrix(features, lambda a, b: rp_relative(a, b, threshold))
    return score_matrix(features, lambda a, b: reproducibility_score(a, b, threshold))


def mae_matrix(sources: Mapping[str, SampleSource], threshold: float) -> pd.DataFrame:
    """MAE score between every two sources: share of seeds with mean |x_row - x_col| (in [0, 1] units) < threshold."""
    from ..scores import mae_score

    seeded = {k: (s.samples, s.seeds) for k, s in sources.items()}
    return score_matrix(seeded, lambda a, b: mae_score(a, b, threshold))


def pair_distances(a: SampleSource, b: SampleSource) -> pd.DataFrame:
    """Per-seed relative L2 distance ||a - b|| / ||b|| and MAE ([0, 1] units) between two sources."""
    from ..scores import mean_abs_difference, pair_by_seed, relative_distance

    seeds, xa, xb = pair_by_seed((a.samples, a.seeds), (b.samples, b.seeds))
    return pd.DataFrame({"seed": seeds, "relative": relative_distance(xa, xb).numpy(),
                         "mae": mean_abs_difference(xa, xb).numpy()})  # fmt: skip


def sample_quality(
    sources: Mapping[str, SampleSource], spec: Mapping[str, Any], fresh: int = 500
) -> pd.DataFrame:
    """Per source (plus, for MoLRG, ``fresh`` new draws of the data as a baseline row): median sample norm, median relative distance to the nearest training point
    (memorization shows as ~0), and for MoLRG the median relative distance to the nearest true
    subspace, min_k ||x - U_k U_k^T x|| / ||x|| (0 for a sample on the data's support)."""
    from ..scores import nearest_neighbors

    train = training_data(spec)
    bases = molrg_model(spec).bases if spec["source"] == "molrg" else None
    sources = dict(sources)
    if bases is not None and fresh > 0:  # the baseline: new draws of the true distribution
        x = molrg_draw(spec, fresh, seed=spec["seed"] * 1000 + 3).numpy()
        sources[FRESH_NAME] = SampleSource(FRESH_NAME, x, np.arange(fresh), "true distribution", "fresh")
    rows = []
    for name, src in sources.items():
        t = torch.from_numpy(np.ascontiguousarray(src.samples))
        x = (t.double() / 127.5 - 1 if t.dtype == torch.uint8 else t.double()).reshape(len(t), -1)
        norm = x.norm(dim=1).clamp(min=1e-12)
        d, idx = nearest_neighbors(x, train, k=1)
        y = train.reshape(len(train), -1)
        y = (y.double() / 127.5 - 1 if y.dtype == torch.uint8 else y.double())[idx[:, 0]]
        row = {"source": name, "median norm": float(norm.median()),
               "nearest training point (rel.)": float((d[:, 0] / y.norm(dim=1).clamp(min=1e-12)).median())}  # fmt: skip
        if bases is not None:
            proj = torch.einsum("knd,sn->ksd", bases.double(), x)
            resid = (x.square().sum(1)[None] - proj.square().sum(2)).clamp(min=0).sqrt()
            row["off-subspace (rel.)"] = float((resid.min(0).values / norm).median())
        rows.append(row)
    return pd.DataFrame(rows).set_index("source")


def summary_table(rp: pd.DataFrame, mae: pd.DataFrame, trained: Sequence[str]) -> pd.DataFrame:
    """Off-diagonal RP and MAE score among the ``trained`` sources (min, mean, max) beside the paper's."""
    rows = []
    for label, ours, paper in [("RP", rp, paper_rp_matrix()), ("MAE score", mae, paper_mae_matrix())]:
        o, p = off_diagonal(ours, trained), off_diagonal(paper)
        rows.append({"matrix": label, "min": o.min() if len(o) else np.nan, "mean": o.mean() if len(o) else np.nan,
                     "max": o.max() if len(o) else np.nan, "paper min": p.min(), "paper mean": p.mean(),
                     "paper max": p.max()})  # fmt: skip
    return pd.DataFrame(rows).set_index("matrix")


def reference_column(matrix: pd.DataFrame, reference: str = REFERENCE_NAME) -> pd.Series:
    """Each source's score against the reference (the row of the matrix with the reference as b)."""
    return matrix[reference].drop(reference)


def cells_table(cells: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per in-house model: arch, precond, seed, params, steps, final loss, seconds, sigma range."""
    keys = ["arch", "precond", "seed", "params", "steps", "kimg", "final_loss", "train_seconds", "sample_seconds",
            "sigma_first", "sigma_last"]  # fmt: skip
    rows = [{"model": n, **{k: c.get(k) for k in keys}} for n, c in cells.items()]
    return pd.DataFrame(rows, columns=["model", *keys]).set_index("model")


def config_fingerprint(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """Short hash of a set of configs (for labelling cached artefacts)."""
    return hashlib.sha256(json.dumps(configs, sort_keys=True).encode()).hexdigest()[:12]
