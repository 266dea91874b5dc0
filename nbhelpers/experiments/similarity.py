"""Model similarity (P1 Figs. 6 and 12): do different diffusion models map the same noise to the same image?

Several model settings (architecture x training framework x training seed) are trained on one data
set and sampled from the same evaluation seeds, i.e. the same standard-normal initial noise. Samples
made elsewhere (folders or zips of PNGs named by seed, e.g. ``000123.png``) join as outside sources.
Every source must cover the same seeds; scores pair samples by seed.

Two matrices are built over all sources, each entry with a bootstrap standard error over seeds:

- RP (reproducibility): the share of seeds whose two samples count as the same image, with the
  *same-image* criterion (:mod:`calibration`): SSCD cosine > 0.6 as the authors, or the model-free
  ``||x_row - x_col|| / ||x_col|| <= t`` with t calibrated so that unrelated pairs of held-out
  images pass at most ``max_false_rate`` of the time.
- MAE score: the same with the mean absolute pixel difference (in [0, 1] units), calibrated alike.

Like the regimes chapter, a notebook holds a main panel (Fashion-MNIST; CIFAR-10 in the paper
profile) and a MoLRG panel (``molrg_panel``), where the closed-form optimal denoiser of the true
distribution serves as a reference row.

Noise conventions (why one exported noise file serves every code base): ``export_noise`` writes
standard-normal eps per seed. EDM-style samplers (VP, VE and EDM preconditioning alike) start at
``x = sigma_max * eps`` (EDM multiplies the latents by t_0 = sigma_max = 80); a DDPM-style sampler in
alpha-bar form starts at ``x_T = eps`` (its x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps equals
EDM's x / sqrt(1 + sigma^2)); a VE/SMLD sampler in its own units starts at ``sigma_max * eps`` with
its own sigma_max (e.g. 50 or 100).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import scores
from . import calibration, cells
from .paper import P1_SIMILARITY_MODELS as PAPER_MODELS  # noqa: F401  (re-exported for the notebook)
from .paper import p1_similarity_mae as paper_mae_matrix
from .paper import p1_similarity_rp as paper_rp_matrix
from .paper import value_range

KIND_MODEL = "similarity-model"
KIND_REFERENCE = "similarity-reference"
VERSION = 2
REFERENCE_NAME = "optimal (closed form)"
BACKENDS = ("relative", "sscd", "pixel")  # relative L2 in model space; SSCD cosine; pixel cosine
DIAGNOSTIC_SIGMAS = (0.05, 0.2, 1.0, 5.0, 20.0, 80.0)  # noise levels of the held-out denoising error


def off_diagonal(matrix: pd.DataFrame, names: Sequence[str] | None = None) -> np.ndarray:
    """The off-diagonal entries of a square matrix (restricted to ``names`` if given), flattened."""
    m = matrix if names is None else matrix.loc[list(names), list(names)]
    a = m.to_numpy(dtype=float)
    return a[~np.eye(len(a), dtype=bool)]


# ----------------------------------------------------------------------------
# Panels and data.


panels, panel_name = cells.panels, cells.panel_name


def data_spec(params: Mapping[str, Any]) -> dict[str, Any]:
    """The data spec of a panel (:func:`cells.data_spec`): its first ``num_train`` points train."""
    n = int(params["num_train"])
    if n < 1:
        raise ValueError(f"num_train must be positive, got {n}")
    return cells.data_spec(params, n)


def training_data(spec: Mapping[str, Any]) -> torch.Tensor:
    """The training set: float32 model space (MoLRG) or uint8 images (N, C, R, R)."""
    return cells.training_set(spec, spec["pool_size"])


# ----------------------------------------------------------------------------
# Grid configs.


def model_configs(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One run config per model setting of a panel, keyed by the setting's display name.

    ``models``: list of ``{name, arch, precond, seed}`` plus optional ``network`` and ``train``
    overrides; ``arch_network[arch]`` holds per-architecture network overrides; ``train`` the shared
    training settings (validated with ``TrainConfig``).
    """
    spec, sampler = data_spec(params), cells.sampler_spec(params)
    out: dict[str, dict[str, Any]] = {}
    for m in params["models"]:
        missing = {"name", "arch", "precond", "seed"} - set(m)
        if missing:
            raise ValueError(f"model setting {m!r} lacks {sorted(missing)}")
        name = str(m["name"])
        if name in out or name == REFERENCE_NAME:
            raise ValueError(f"model name {name!r} is used twice")
        network = {**params["arch_network"].get(m["arch"], {}), **m.get("network", {})}
        train_section = {**params["train"], **m.get("train", {})}
        try:
            train = cells.train_config(m["arch"], m["precond"], network, train_section, seed=int(m["seed"]))
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None
        out[name] = {
            "kind": KIND_MODEL,
            "version": VERSION,
            "data": spec,
            "train": train,
            "sampler": sampler,
            "eval_seeds": str(params["eval_seeds"]),
            "sample_batch": int(params["sample_batch"]),
            "diagnostic_count": int(params.get("diagnostic_count", 256)),
        }
    return out


def reference_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """Run config of the closed-form posterior-mean denoiser of the true distribution (MoLRG only)."""
    return {
        "kind": KIND_REFERENCE,
        "version": VERSION,
        "data": data_spec(params),
        "sampler": cells.sampler_spec(params),
        "eval_seeds": str(params["eval_seeds"]),
        "sample_batch": int(params["sample_batch"]),
        "diagnostic_count": int(params.get("diagnostic_count", 256)),
    }


def grid(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every cell of a panel, name -> config: the model settings and, for MoLRG with ``reference``,
    the closed-form denoiser."""
    out = model_configs(params)
    if params.get("reference") and params["dataset"] == "molrg":
        out[REFERENCE_NAME] = reference_config(params)
    return out


def validate_configs(configs: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Dry run: each model setting's network built on the meta device; one row per model with its
    parameter count, steps, kimg and sigma range (the schedule is clamped to it)."""
    from ..networks import make_network

    rows = []
    for name, c in configs.items():
        if c["kind"] != KIND_MODEL:
            continue
        t = c["train"]
        ch, res = cells.data_shape(c["data"])
        with torch.device("meta"):
            net = make_network(t["arch"], t["precond"], res, ch, **t["network"])
        steps = cells.num_steps(t)
        rows.append(
            {
                "model": name,
                "arch": t["arch"],
                "precond": t["precond"],
                "seed": t["seed"],
                "params": sum(p.numel() for p in net.parameters()),
                "steps": steps,
                "kimg": steps * t["batch_size"] / 1000,
                **sigma_range(net, c["sampler"]),
            }
        )
    return pd.DataFrame(rows)


def sigma_range(net: Any, sampler: Mapping[str, Any]) -> dict[str, float]:
    """First and last nonzero noise level of the shared schedule after clamping to ``net``'s range."""
    from ..sampling import edm_sigmas

    s = edm_sigmas(sampler["num_steps"], sampler["sigma_min"], sampler["sigma_max"], sampler["rho"], net=net)
    return {"sigma_first": float(s[0]), "sigma_last": float(s[-2])}


# ----------------------------------------------------------------------------
# Cell functions (module level, run in worker processes by RunStore.run_grid).


@torch.no_grad()
def denoising_error(
    net: Any, clean: torch.Tensor, sigmas: Sequence[float], device: torch.device, seed: int = 0
) -> np.ndarray:
    """Relative denoising error on held-out points, ||D(x + sigma e; sigma) - x|| / ||x|| (median over
    points), per sigma (clamped to the net's range): where a model's denoiser fails, by noise level."""
    from ..data import model_space

    x = model_space(clean, device)
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in sigmas:
        s = float(min(max(s, float(getattr(net, "sigma_min", 0))), float(getattr(net, "sigma_max", np.inf))))
        e = torch.randn(x.shape, generator=g).to(device)
        d = net(x + s * e, torch.full((len(x),), s, device=device))
        err = (d.double() - x.double()).flatten(1).norm(dim=1) / x.double().flatten(1).norm(dim=1).clamp_min(
            1e-12
        )
        out.append(float(err.median()))
    return np.asarray(out)


def _sample_cell(net: Any, config: Mapping[str, Any], device: torch.device, info: dict) -> tuple[dict, dict]:
    """Sample ``net`` at the evaluation seeds and measure its held-out denoising error."""
    from ..sampling import parse_seeds

    t0 = time.perf_counter()
    x = cells.sample(net, config["sampler"], config["eval_seeds"], config["sample_batch"], device)
    info.update(sample_seconds=time.perf_counter() - t0, **sigma_range(net, config["sampler"]))
    held_out = cells.fresh_samples(config["data"], config["diagnostic_count"])
    arrays = {
        "samples": cells.store_samples(x, config["data"]),
        "seeds": np.asarray(parse_seeds(config["eval_seeds"]), dtype=np.int64),
        "diagnostic_sigma": np.asarray(DIAGNOSTIC_SIGMAS),
        "diagnostic_error": denoising_error(net, held_out, DIAGNOSTIC_SIGMAS, device),
    }
    return info, arrays


def run_cell(config: dict[str, Any], staging: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one model setting (or build the closed-form reference), sample it at the evaluation seeds."""
    from ..checkpoints import save_network

    device = cells.device()
    if config["kind"] == KIND_REFERENCE:
        net = cells.make_molrg(config["data"]).denoiser().to(device)
        return _sample_cell(net, config, device, {})
    if config["kind"] != KIND_MODEL:
        raise ValueError(f"unknown cell kind {config['kind']!r}")
    net, info = cells.train_model(config["train"], training_data(config["data"]), device)
    save_network(net, Path(staging) / "network.nbh")
    t = config["train"]
    return _sample_cell(
        net, config, device, {"arch": t["arch"], "precond": t["precond"], "seed": t["seed"], **info}
    )


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
    in any subfolders) as uint8 images with their seeds; names without distinct seeds are an error."""
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


def panel_sources(
    cells_: Mapping[str, Mapping[str, Any]],
    outside: Mapping[str, str] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, SampleSource]:
    """A panel's sources: its stored cells and any ``outside`` folders/zips (name -> path), checked
    to cover exactly ``seeds``."""
    src = {n: cell_source(n, c) for n, c in cells_.items()}
    src.update({n: load_sample_folder(n, path) for n, path in (outside or {}).items()})
    check_same_seeds(list(src.values()), expected=seeds)
    return src


def regime_quality(
    params: Mapping[str, Any], sources: Mapping[str, SampleSource]
) -> tuple[calibration.Calibration | None, pd.DataFrame | None]:
    """Are the sources in the generalization regime? The copy criterion of the panel's training set
    (calibrated on held-out data as in the regimes chapter) and each source's :func:`copy_quality`;
    (None, None) with a descriptor backend (the claim then rests on the paper's setting)."""
    if params["backend"] != "relative":
        return None, None
    spec = data_spec(params)
    count, noise, false = (
        int(params["calibration_pairs"]),
        float(params["near_noise"]),
        float(params["max_false_rate"]),
    )
    cal = calibration.calibrate_copy(spec, [spec["pool_size"]], count, noise, false)
    return cal, copy_quality(sources, spec, cal.criterion)


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
    """The source's descriptors as a ``FeatureSet`` with seeds, sorted by seed; computed once, then
    read from the cache. 'relative': the samples themselves, flattened, in model space [-1, 1];
    'sscd': SSCD descriptors; 'pixel': unit pixel vectors (both compared by cosine)."""
    from ..data import model_space, to_uint8
    from ..features import FeatureSet, extract_features

    if backend not in BACKENDS:
        raise ValueError(f"unknown similarity backend {backend!r}; expected one of {BACKENDS}")
    path = Path(cache_dir) / f"{_slug(source.name)}-{backend}-{_slug(source.key)}.npz"
    order = np.argsort(source.seeds, kind="stable")
    seeds, x = source.seeds[order], source.samples[order]
    if path.exists():
        fs = FeatureSet.load(path)
        if fs.seeds is not None and np.array_equal(fs.seeds.numpy(), seeds):
            return fs
    if backend == "relative":
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = model_space(t, dtype=torch.float64)
        fs = FeatureSet(t.reshape(len(t), -1), seeds, meta={"backend": backend, "origin": source.origin})
    else:
        if x.dtype != np.uint8:
            x = to_uint8(np.asarray(x))
        fs = extract_features(
            x, backend=backend, model=sscd_model if backend == "sscd" else None, seeds=seeds, device=device
        )
        fs.meta["origin"] = source.origin
    fs.save(path)
    return fs


# ----------------------------------------------------------------------------
# Criteria and score matrices.


def calibrate(
    params: Mapping[str, Any], features: Any = None
) -> tuple[calibration.Calibration, calibration.Calibration]:
    """The panel's RP criterion (same image) and MAE criterion, each calibrated on unrelated pairs of
    held-out data; ``rp_threshold``/``mae_threshold`` (not None) replace the calibrated values, and
    when both are given nothing is calibrated (the training set may then hold every image, as
    CIFAR-10's 50,000 do in the paper profile)."""
    statistic = {"relative": "relative", "sscd": "cosine", "pixel": "cosine"}[params["backend"]]
    rp_t, mae_t = params.get("rp_threshold"), params.get("mae_threshold")
    if rp_t is not None and mae_t is not None:
        rp = scores.Criterion("same", statistic, float(rp_t))
        return calibration.Calibration.given(rp), calibration.Calibration.given(
            scores.Criterion("same", "mae", float(mae_t))
        )
    spec, count = data_spec(params), int(params["calibration_pairs"])
    noise, false = float(params["near_noise"]), float(params["max_false_rate"])
    rp = calibration.calibrate_same(spec, count, noise, false, 0.99, statistic, features)
    mae = calibration.calibrate_same(spec, count, noise, false, 0.99, "mae")
    for cal, value in ((rp, rp_t), (mae, mae_t)):
        if value is not None:
            cal.criterion = scores.Criterion("same", cal.criterion.statistic, float(value))
    return rp, mae


def _paired_flags(a: Any, b: Any, crit: scores.Criterion) -> np.ndarray:
    """Per-seed flags of two seed-sorted feature/sample arrays under a same-image criterion."""
    return crit.flags(calibration.same_scores(a, b, crit.statistic))


def score_matrix(
    items: Mapping[str, Any], crit: scores.Criterion, boot: int = 200, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Share of seeds flagged by ``crit`` for every ordered pair of sources (row a, column b as the
    reference), and its bootstrap standard error over seeds (``boot`` resamples, the same for every
    entry). ``items``: name -> rows aligned by seed (FeatureSet features, or uint8/float samples)."""
    names = list(items)
    data = {
        k: v.features if hasattr(v, "features") else torch.as_tensor(np.asarray(v)) for k, v in items.items()
    }
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise ValueError(f"sources have different numbers of seeds: {sorted(lengths)}")
    flags = np.stack([[_paired_flags(data[a], data[b], crit) for b in names] for a in names]).astype(float)
    s = flags.shape[-1]
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, s, s), minlength=s) for _ in range(boot)], 1)  # (S, B)
    reps = flags @ counts / s  # (A, A, B)
    mean = pd.DataFrame(flags.mean(-1), index=names, columns=names)
    se = pd.DataFrame(reps.std(-1, ddof=1), index=names, columns=names)
    return mean, se


def sorted_samples(source: SampleSource) -> np.ndarray:
    """The source's samples in seed order (what the MAE matrix compares)."""
    return source.samples[np.argsort(source.seeds, kind="stable")]


def copy_quality(
    sources: Mapping[str, SampleSource], spec: Mapping[str, Any], copy: scores.Criterion
) -> pd.DataFrame:
    """Per source: GL (share of samples that are not copies of a training point, with the calibrated
    copy criterion), median relative distance to the nearest training point, median sample norm and,
    for MoLRG, the median relative distance to the nearest true subspace (0: on the data's support)."""
    from ..data import model_space

    train = training_data(spec)
    mix = cells.make_molrg(spec) if spec["source"] == "molrg" else None
    rows = []
    for name, src in sources.items():
        t = torch.from_numpy(np.ascontiguousarray(src.samples))
        rel = calibration.copy_scores(t, train, copy.statistic) if copy.statistic == "relative" else None
        x = model_space(t, dtype=torch.float64).reshape(len(t), -1)
        row = {"source": name, "median norm": float(x.norm(dim=1).median())}
        if rel is not None:
            row.update(
                {
                    "GL": 1 - float(copy.flags(rel).mean()),
                    "nearest training point (rel.)": float(np.median(rel)),
                }
            )
        if mix is not None:
            row["off-subspace (rel.)"] = float(mix.off_subspace(t).median())
        rows.append(row)
    return pd.DataFrame(rows).set_index("source")


def summary_table(rp: pd.DataFrame, mae: pd.DataFrame, trained: Sequence[str]) -> pd.DataFrame:
    """Off-diagonal RP and MAE score among the ``trained`` sources (min, mean, max) beside the paper's."""
    rows = []
    for label, ours, paper in [("RP", rp, paper_rp_matrix()), ("MAE score", mae, paper_mae_matrix())]:
        o, p = off_diagonal(ours, trained), off_diagonal(paper)
        rows.append(
            {
                "matrix": label,
                "min": o.min() if len(o) else np.nan,
                "mean": o.mean() if len(o) else np.nan,
                "max": o.max() if len(o) else np.nan,
                "paper min": p.min(),
                "paper mean": p.mean(),
                "paper max": p.max(),
            }
        )
    return pd.DataFrame(rows).set_index("matrix")


def narrative(rp: pd.DataFrame, trained: Sequence[str], title: str, rp_min: float) -> str:
    """'What it shows' for one panel, in markdown: the range of RP among the ``trained`` models, the
    lowest pair, and whether every pair reaches ``rp_min``, beside the authors' range."""
    names = list(trained)
    pairs = [(0.5 * (rp.loc[a, b] + rp.loc[b, a]), a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    if not pairs:
        return f"**{title}.** Fewer than two trained models: no pair to compare."
    low, a, b = min(pairs)
    values = [v for v, _, _ in pairs]
    paper = off_diagonal(paper_rp_matrix())
    verdict = (
        f"every pair reaches {rp_min:.2f}, the authors' lowest entry: shown"
        if low >= rp_min
        else f"not every pair reaches {rp_min:.2f}, the authors' lowest entry: not shown at this scale"
    )
    return (
        f"**{title}.** Over the {len(pairs)} pairs of the {len(names)} trained models, started from the same "
        f"noise, RP runs from {low:.2f} ({a} | {b}) to {max(values):.2f} (mean {np.mean(values):.2f}); the "
        f"authors' {len(paper) // 2} pairs: {paper.min():.2f}-{paper.max():.2f}. So {verdict}."
    )


def reference_column(matrix: pd.DataFrame, reference: str = REFERENCE_NAME) -> pd.Series:
    """Each source's score against the reference (the column of the matrix with the reference as b)."""
    return matrix[reference].drop(reference)


def cells_table(cells_: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per in-house model: arch, precond, seed, params, steps, final loss, seconds, sigma range."""
    keys = [
        "arch",
        "precond",
        "seed",
        "params",
        "steps",
        "kimg",
        "final_loss",
        "train_seconds",
        "sample_seconds",
        "sigma_first",
        "sigma_last",
    ]
    rows = [{"model": n, **{k: c.get(k) for k in keys}} for n, c in cells_.items()]
    return pd.DataFrame(rows, columns=["model", *keys]).set_index("model")


def diagnostics_table(cells_: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Held-out relative denoising error per model (rows) and noise level sigma (columns)."""
    rows = {
        n: dict(zip(c["arrays"]["diagnostic_sigma"], c["arrays"]["diagnostic_error"]))
        for n, c in cells_.items()
    }
    table = pd.DataFrame(rows).T
    table.columns = [f"sigma {s:g}" for s in table.columns]
    return table


def outliers_text(diag: pd.DataFrame, rp: pd.DataFrame, trained: Sequence[str], factor: float = 2.0) -> str:
    """Markdown: the models whose held-out denoising error at the highest noise level is more than
    ``factor`` times the median of the others', with their mean RP to the other trained models."""
    top = diag.columns[-1]
    names = [n for n in trained if n in diag.index]
    lines = []
    for n in names:
        others = [o for o in names if o != n]
        ref = float(diag.loc[others, top].median())
        if float(diag.loc[n, top]) > factor * ref:
            mean_rp = float(np.mean([0.5 * (rp.loc[n, o] + rp.loc[o, n]) for o in others]))
            lines.append(
                f"**{n}**: denoising error {diag.loc[n, top]:.2f} at {top}, the others' median {ref:.2f}; "
                f"its mean RP to the other models is {mean_rp:.2f}."
            )
    if not lines:
        return f"No model's error at {top} exceeds {factor:g} x the others' median."
    return "Models that fail at high noise:\n\n" + "\n".join(f"- {line}" for line in lines)


# ----------------------------------------------------------------------------
# Checks.


def similarity_checks(
    rp: pd.DataFrame,
    rp_se: pd.DataFrame,
    trained: Sequence[str],
    setting: str,
    quality: pd.DataFrame,
    seeds: int,
    rp_min: float = 0.7,
    gl_min: float = 0.9,
) -> list[dict[str, Any]]:
    """P1 Figs. 6/12 on one panel. Phenomenon: every off-diagonal RP among trained models >= ``rp_min``
    (the lowest entry of the authors' matrix), each with its margin; and every trained model
    generalizes (GL >= ``gl_min`` with the copy criterion), the regime the claim is made in: an
    empirical precondition, so a phenomenon check too, not a sanity one. The standard error is the
    bootstrap one, floored by the binomial error over ``seeds``."""
    from ..results import check

    rows = []
    names = list(trained)
    paper_range = value_range(off_diagonal(paper_rp_matrix()).tolist())
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            v = 0.5 * (rp.loc[a, b] + rp.loc[b, a])
            se = max(0.5 * (rp_se.loc[a, b] + rp_se.loc[b, a]), scores.rate_se([v], seeds))
            rows.append(
                check(
                    "RP between two models",
                    f"{setting}: {a} | {b}",
                    v,
                    ">=",
                    rp_min,
                    se,
                    paper=paper_range,
                )
            )
    if "GL" in quality:
        for name in names:
            gl = float(quality.loc[name, "GL"])
            rows.append(
                check(
                    "the model generalizes (GL)",
                    f"{setting}: {name}",
                    gl,
                    ">=",
                    gl_min,
                    se=scores.rate_se([gl], seeds),
                    paper="~1 (generalization regime)",
                    note="precondition of the claim",
                )
            )
    return rows


# ----------------------------------------------------------------------------
# Figures.


def plot_matrices(
    panels_: Mapping[str, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]],
    labels: Mapping[str, tuple[str, str]],
    profile: str,
):
    """RP and MAE-score heatmaps (entry ± bootstrap se) per panel, and the authors' matrices."""
    import matplotlib.pyplot as plt

    from .. import plotting

    rows = len(panels_) + 1
    size = max(len(m[0]) for m in panels_.values())
    fig, axes = plt.subplots(
        rows, 2, figsize=(2 * (1.6 + 0.95 * size), rows * (1.2 + 0.9 * size)), squeeze=False
    )
    for row, (name, (rp, rp_se, mae, mae_se)) in zip(axes, panels_.items()):
        rl, ml = labels[name]
        plotting.annotated_heatmap(rp, ax=row[0], errors=rp_se, title=f"{name}: RP ({rl})", cbar_label="RP")
        plotting.annotated_heatmap(
            mae, ax=row[1], errors=mae_se, title=f"{name}: MAE score ({ml})", cbar_label="MAE score"
        )
    plotting.annotated_heatmap(
        paper_rp_matrix(),
        ax=axes[-1][0],
        triangle="upper",
        title="RP, the authors (CIFAR-10, SSCD)",
        cbar_label="RP",
    )
    plotting.annotated_heatmap(
        paper_mae_matrix(),
        ax=axes[-1][1],
        triangle="upper",
        title="MAE score, the authors (CIFAR-10)",
        cbar_label="MAE score",
    )
    for ax in axes.flat:
        ax.grid(False)
        ax.title.set_fontsize(9)
    fig.tight_layout()
    plotting.profile_badge(fig, profile)
    return fig


def plot_pair_distances(
    sources: Mapping[str, SampleSource], anchor: str, cal: calibration.Calibration, profile: str, title: str
):
    """Per-seed same-image statistic of every source against ``anchor``, over the unrelated pairs'
    distribution (grey) and the calibrated threshold (dashed)."""
    import matplotlib.pyplot as plt

    from .. import plotting

    null = cal.scores[cal.scores["kind"] == "unrelated pairs"]["score"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    bins = np.logspace(-2.3, 0.7, 60)
    ax.hist(np.clip(null, bins[0], None), bins=bins, density=True, color="0.75", label="unrelated pairs")
    others = [n for n in sources if n != anchor]
    for name, color in zip(others, plotting.colors(len(others))):
        d = calibration.same_scores(
            sorted_samples(sources[name]), sorted_samples(sources[anchor]), "relative"
        )
        ax.hist(
            np.clip(d, bins[0], None),
            bins=bins,
            density=True,
            histtype="step",
            lw=1.4,
            color=color,
            label=name,
        )
    ax.axvline(cal.threshold, ls="--", color="k", lw=1, label=f"threshold {cal.threshold:g}")
    ax.set(
        xscale="log", xlabel=f"||x - x_ref|| / ||x_ref||, reference: {anchor}", ylabel="density", title=title
    )
    ax.legend(fontsize=7, ncol=2)
    plotting.profile_badge(fig, profile)
    fig.tight_layout()
    return fig
