"""Similarity scores of P1: reproducibility (RP), generalization (GL), MAE, and model-free criteria.

Scores that compare two samplers pair their samples BY SEED (the shared initial noise), never by
position: inputs are ``FeatureSet``s or ``(data, seeds)`` pairs, and ``pair_by_seed`` aligns them.
Per-pair functions (``paired_cosine``, ``relative_distance``, ``mean_abs_difference``) work on rows
that are already aligned. Nearest-neighbour searches are chunked over both queries and keys, so
memory stays bounded (a few blocks of ``chunk_size`` x ``chunk_size``) at any size.

Names say what they return: ``memorized_fraction`` is the fraction flagged as copies,
``generalization_score`` is 1 minus it (the authors' ``mscore`` prints the latter but returns the
former).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import flat_rows, model_space
from .features import FeatureSet

__all__ = [
    "MAE_THRESHOLD",
    "Criterion",
    "calibrate_null",
    "flag_rates",
    "flagged",
    "generalization_score",
    "mae_score",
    "max_similarity",
    "mean_abs_difference",
    "memorized_fraction",
    "nearest_neighbors",
    "nn_ratio",
    "nn_relative_distance",
    "noisy_copies",
    "pair_by_seed",
    "paired_cosine",
    "rate_se",
    "pairwise_agreement",
    "relative_distance",
    "reproducibility_score",
    "rp_relative",
]

# Mean absolute pixel difference, in [0, 1] units, below which two images count as the same. The
# authors' threshold is not in their release. 0.1 (about 25 grey levels on average) sits well above
# what rendering noise or small colour/texture differences give (an image plus N(0, 0.05) noise
# has MAE ~0.03) and below unrelated images: random pairs of Fashion-MNIST training images have a
# median MAE of 0.28 and only ~1% fall under 0.1; natural colour images such as CIFAR-10 differ more.
MAE_THRESHOLD = 0.1

Seeded = FeatureSet | tuple[Any, Any]


# ----------------------------------------------------------------------------
# Inputs.


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, FeatureSet):
        return x.features
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x)


def _flat(x: Any, what: str) -> torch.Tensor:
    """Rows (N, D) of data, features or a FeatureSet, in their dtype (``data.flat_rows``)."""
    return flat_rows(_tensor(x), what)


def _unit_interval(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] units, float64: uint8 / 255; floats are taken as model space [-1, 1]."""
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {x.dtype}")
    return (x.to(torch.float64) + 1) / 2


def _seeded(x: Seeded, what: str) -> tuple[torch.Tensor, np.ndarray]:
    if isinstance(x, FeatureSet):
        data, seeds = x.features, x.seeds
        if seeds is None:
            raise ValueError(f"{what} is a FeatureSet without seeds: scores pair samples by seed")
    elif isinstance(x, (tuple, list)) and len(x) == 2:
        data, seeds = x
    else:
        raise ValueError(
            f"{what} must be a FeatureSet or a (data, seeds) pair, so "
            f"that samples are paired by seed, got {type(x).__name__}"
        )
    data = _tensor(data)
    seeds = np.asarray(seeds.cpu() if isinstance(seeds, torch.Tensor) else seeds)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer) or len(seeds) != len(data):
        raise ValueError(f"{what}: seeds must be {len(data)} integers, got {seeds.dtype} {seeds.shape}")
    uniq, counts = np.unique(seeds, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what}: repeated seeds {uniq[counts > 1][:5].tolist()}")
    return data, seeds.astype(np.int64)


def _check_finite(x: Any, what: str) -> None:
    """Input validation: floating data must be finite (a NaN would silently change a score)."""
    t = _tensor(x)
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        rows = int((~torch.isfinite(t.reshape(len(t), -1))).any(1).sum()) if t.ndim else 1
        raise ValueError(f"{what} contains NaN or infinite values ({rows} rows)")


def _check_threshold(threshold: float) -> None:
    if not isinstance(threshold, int | float | np.floating | np.integer) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")


def _few(values: np.ndarray, k: int = 5) -> str:
    head = ", ".join(str(v) for v in values[:k].tolist())
    return head + (f", ... ({len(values)} in all)" if len(values) > k else "")


def pair_by_seed(
    a: Seeded, b: Seeded, on_mismatch: str = "error"
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Align two seeded sets: (common seeds sorted (M,), a's rows (M, ...), b's rows (M, ...)).

    ``on_mismatch='error'`` raises a ValueError naming seeds present on one side only;
    ``'intersect'`` keeps the common seeds.
    """
    if on_mismatch not in ("error", "intersect"):
        raise ValueError(f"on_mismatch must be 'error' or 'intersect', got {on_mismatch!r}")
    xa, sa = _seeded(a, "a")
    xb, sb = _seeded(b, "b")
    common, ia, ib = np.intersect1d(sa, sb, assume_unique=True, return_indices=True)
    if on_mismatch == "error" and (len(common) != len(sa) or len(common) != len(sb)):
        only_a, only_b = np.setdiff1d(sa, sb), np.setdiff1d(sb, sa)
        parts = [
            f"seeds only in a: {_few(only_a)}" if len(only_a) else "",
            f"seeds only in b: {_few(only_b)}" if len(only_b) else "",
        ]
        raise ValueError(
            "the two sets have different seeds (" + "; ".join(p for p in parts if p) + "); "
            "pass on_mismatch='intersect' to score the common ones"
        )
    if len(common) == 0:
        raise ValueError("the two sets have no seed in common")
    return common, xa[torch.from_numpy(ia)], xb[torch.from_numpy(ib)]


# ----------------------------------------------------------------------------
# Per-pair criteria on aligned rows.


def _aligned_rows(xa: Any, xb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two finite aligned sets of rows of one shape, (M, D) each, float64 in model space."""
    _check_finite(xa, "xa")
    _check_finite(xb, "xb")
    a = model_space(_flat(xa, "xa"), "cpu", torch.float64)
    b = model_space(_flat(xb, "xb"), "cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"xa and xb must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def paired_cosine(xa: Any, xb: Any) -> torch.Tensor:
    """Cosine similarity of row j of xa and row j of xb, (M,) float64 (0 for a zero row)."""
    a, b = _aligned_rows(xa, xb)
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1)


def relative_distance(xa: Any, xb: Any) -> torch.Tensor:
    """||xa_j - xb_j|| / ||xb_j|| per aligned row, (M,) float64; uint8 is compared in model space."""
    a, b = _aligned_rows(xa, xb)
    num, den = (a - b).norm(dim=1), b.norm(dim=1)
    return torch.where(num == 0, 0.0, num / den)


def mean_abs_difference(xa: Any, xb: Any) -> torch.Tensor:
    """Mean absolute pixel difference per aligned pair of images in [0, 1] units, (M,) float64.

    uint8 images are divided by 255; float images are taken as model space [-1, 1].
    """
    _check_finite(xa, "xa")
    _check_finite(xb, "xb")
    a, b = _unit_interval(_tensor(xa)), _unit_interval(_tensor(xb))
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"xa and xb must be batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return (a - b).abs().reshape(a.shape[0], -1).mean(1)


# ----------------------------------------------------------------------------
# Scores between two samplers (paired by seed).


def pairwise_agreement(
    a: Seeded, b: Seeded, criterion: Callable[[torch.Tensor, torch.Tensor], Any], on_mismatch: str = "error"
) -> float:
    """Fraction of common seeds whose pair satisfies ``criterion(xa, xb) -> (M,) bool`` on aligned rows."""
    _, xa, xb = pair_by_seed(a, b, on_mismatch)
    flags = torch.as_tensor(criterion(xa, xb))
    if flags.shape != (len(xa),):
        raise ValueError(
            f"criterion must return one flag per pair, shape ({len(xa)},), got {tuple(flags.shape)}"
        )
    return float(flags.to(torch.float64).mean())


def reproducibility_score(a: Seeded, b: Seeded, threshold: float = 0.6, on_mismatch: str = "error") -> float:
    """RP = fraction of seeds j with cos(f(xa_j), f(xb_j)) > threshold (P1; SSCD features, 0.6)."""
    _check_threshold(threshold)
    return pairwise_agreement(a, b, lambda xa, xb: paired_cosine(xa, xb) > threshold, on_mismatch)


def rp_relative(a: Seeded, b: Seeded, threshold: float = 0.1, on_mismatch: str = "error") -> float:
    """Model-free RP: fraction of seeds with ||xa - xb|| / ||xb|| < threshold (samples in model space).

    0.1 gave a clean drop with training-set size in the CPU pilot on MoLRG; 1/3 is looser.
    """
    _check_threshold(threshold)
    return pairwise_agreement(a, b, lambda xa, xb: relative_distance(xa, xb) < threshold, on_mismatch)


def mae_score(
    a_images: Seeded, b_images: Seeded, threshold: float = MAE_THRESHOLD, on_mismatch: str = "error"
) -> float:
    """MAE score: fraction of seeds whose images differ by a mean absolute difference (in [0, 1]
    units) below ``threshold`` (default ``MAE_THRESHOLD`` = 0.1; the authors' value is not published)."""
    _check_threshold(threshold)
    return pairwise_agreement(
        a_images, b_images, lambda xa, xb: mean_abs_difference(xa, xb) < threshold, on_mismatch
    )


# ----------------------------------------------------------------------------
# Nearest neighbours against a training set.


def _chunks(chunk_size: int | tuple[int, int]) -> tuple[int, int]:
    cq, ck = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
    if cq < 1 or ck < 1:
        raise ValueError(f"chunk sizes must be positive, got {chunk_size}")
    return int(cq), int(ck)


def max_similarity(
    query: Any,
    keys: Any,
    chunk_size: int | tuple[int, int] = 4096,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the largest cosine similarity to any key row and that key's index.

    query (Nq, F), keys (Nk, F) (tensors, arrays or FeatureSets; rows need not be unit-norm).
    Returns (values (Nq,) ``dtype``, indices (Nq,) int64) on the CPU; ties keep the first index.
    Both sides are processed in chunks of ``chunk_size`` (or (query_chunk, key_chunk)) rows, so
    the working memory is about query_chunk x key_chunk similarities plus the two chunks.
    The products run on ``device`` (default: where the query is), in ``dtype``.
    """
    _check_finite(query, "query")
    _check_finite(keys, "keys")
    q_all, k_all = _flat(query, "query"), _flat(keys, "keys")
    if q_all.shape[1] != k_all.shape[1]:
        raise ValueError(f"query has {q_all.shape[1]} features per row, keys have {k_all.shape[1]}")
    if len(k_all) == 0:
        raise ValueError("keys is empty")
    cq, ck = _chunks(chunk_size)
    device = torch.device(device) if device is not None else q_all.device
    values, indices = [], []
    for qs in range(0, len(q_all), cq):
        q = F.normalize(model_space(q_all[qs : qs + cq], device, dtype), dim=1)
        best = torch.full((len(q),), -math.inf, dtype=dtype, device=device)
        arg = torch.zeros(len(q), dtype=torch.int64, device=device)
        for ks in range(0, len(k_all), ck):
            k = F.normalize(model_space(k_all[ks : ks + ck], device, dtype), dim=1)
            v, i = (q @ k.T).max(1)
            better = v > best
            best = torch.where(better, v, best)
            arg = torch.where(better, i + ks, arg)
        values.append(best.cpu())
        indices.append(arg.cpu())
    if not values:
        return torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.int64)
    return torch.cat(values), torch.cat(indices)


def memorized_fraction(
    generated: Any,
    train: Any,
    threshold: float = 0.6,
    chunk_size: int | tuple[int, int] = 4096,
    device: str | torch.device | None = None,
) -> float:
    """Fraction of generated samples whose max cosine similarity to the training set exceeds ``threshold``."""
    _check_threshold(threshold)
    values, _ = max_similarity(generated, train, chunk_size, device)
    if len(values) == 0:
        raise ValueError("generated is empty")
    return float((values > threshold).double().mean())


def generalization_score(
    generated: Any,
    train: Any,
    threshold: float = 0.6,
    chunk_size: int | tuple[int, int] = 4096,
    device: str | torch.device | None = None,
) -> float:
    """GL = 1 - memorized fraction: the share of samples that copy no training image (P1; SSCD, 0.6)."""
    return 1.0 - memorized_fraction(generated, train, threshold, chunk_size, device)


def nearest_neighbors(
    query: Any,
    keys: Any,
    k: int = 2,
    chunk_size: int | tuple[int, int] = 2048,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest keys of each query row in L2: (distances (Nq, k) float64 ascending, indices (Nq, k)).

    Candidates come from chunked float64 matrix products (||q||^2 - 2 q.k + ||k||^2); the returned
    distances are then recomputed from the differences, so an exact copy has distance 0.
    uint8 rows are compared in model space; any (N, ...) shape is flattened. The products run on
    ``device`` (default: where the query is).
    """
    _check_finite(query, "query")
    _check_finite(keys, "keys")
    q_all, k_all = _flat(query, "query"), _flat(keys, "keys")
    if q_all.shape[1] != k_all.shape[1]:
        raise ValueError(f"query rows have {q_all.shape[1]} values, keys rows {k_all.shape[1]}")
    if not 1 <= k <= len(k_all):
        raise ValueError(f"k must be between 1 and the number of keys ({len(k_all)}), got {k}")
    cq, ck = _chunks(chunk_size)
    device = torch.device(device) if device is not None else q_all.device
    k_sq = torch.cat([model_space(c, device, torch.float64).square().sum(1) for c in k_all.split(ck)])
    dists, indices = [], []
    for qs in range(0, len(q_all), cq):
        q = model_space(q_all[qs : qs + cq], device, torch.float64)
        best_d = torch.empty(len(q), 0, dtype=torch.float64, device=device)
        best_i = torch.empty(len(q), 0, dtype=torch.int64, device=device)
        for ks in range(0, len(k_all), ck):
            kc = model_space(k_all[ks : ks + ck], device, torch.float64)
            d2 = k_sq[ks : ks + ck] - 2 * (q @ kc.T)  # ||q||^2 is constant per row: left out
            v, i = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False)
            best_d, order = torch.topk(
                torch.cat([best_d, v], 1), min(k, best_d.shape[1] + v.shape[1]), dim=1, largest=False
            )
            best_i = torch.gather(torch.cat([best_i, i + ks], 1), 1, order)
        cand = model_space(k_all[best_i.to(k_all.device)], device, torch.float64)  # (cq, k, D)
        d = (q[:, None, :] - cand).norm(dim=2)
        d, order = d.sort(1)
        dists.append(d.cpu())
        indices.append(torch.gather(best_i, 1, order).cpu())
    if not dists:
        return torch.zeros(0, k, dtype=torch.float64), torch.zeros(0, k, dtype=torch.int64)
    return torch.cat(dists), torch.cat(indices)


def nn_ratio(
    generated: Any,
    train: Any,
    chunk_size: int | tuple[int, int] = 2048,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """||x - NN1(x)|| / ||x - NN2(x)|| per generated sample, (N,) float64 (0 for an exact copy).

    NN1, NN2: nearest and second-nearest training points in L2 (model space). Small means the
    sample sits on one training point rather than between several.
    """
    d, _ = nearest_neighbors(generated, train, k=2, chunk_size=chunk_size, device=device)
    return torch.where(d[:, 0] == 0, 0.0, d[:, 0] / d[:, 1])


def nn_relative_distance(
    query: Any,
    train: Any,
    chunk_size: int | tuple[int, int] = 2048,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """||x - NN(x)|| / ||NN(x)|| per query row and the index of NN(x), the nearest training row in L2
    (model space): ((S,) float64, (S,) int64). Small means x is a (near) copy of NN(x)."""
    d, idx = nearest_neighbors(query, train, k=1, chunk_size=chunk_size, device=device)
    nn = model_space(_flat(train, "train")[idx[:, 0]], "cpu", torch.float64)
    norm = nn.norm(dim=1)
    return torch.where(d[:, 0] == 0, 0.0, d[:, 0] / norm.clamp_min(1e-300)), idx[:, 0]


def noisy_copies(train: Any, count: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` training rows drawn with replacement plus Gaussian noise of relative norm ``noise``:
    y + noise ||y|| e / sqrt(D), e standard normal; float64 model space (count, D). Planted copies
    that a copy criterion must flag."""
    y = model_space(_flat(train, "train"), "cpu", torch.float64)
    idx = torch.randint(0, len(y), (int(count),), generator=generator)
    e = torch.randn((int(count), y.shape[1]), generator=generator, dtype=torch.float64)
    y = y[idx]
    return y + noise * y.norm(dim=1, keepdim=True) * e / math.sqrt(y.shape[1])


def share_se(p: float, count: int) -> float:
    """Binomial standard error of a share ``p`` of ``count`` trials, kept off zero at 0 and 1 (as if
    the share were 1/2 of a quarter as many trials: sqrt(max(p (1 - p), 1/4) / count) at worst)."""
    if count < 1:
        raise ValueError("share_se needs at least one trial")
    return math.sqrt(max(p * (1 - p), 0.25 / count) / count)


def rate_se(rates: Sequence[float] | np.ndarray, count: int) -> float:
    """Standard error of the mean of per-repeat rates (each a share of ``count`` trials): the binomial
    error of the pooled rate, kept off 0 and 1, plus the spread between repeats (conservative)."""
    p = np.asarray(rates, dtype=np.float64).reshape(-1)
    k = len(p)
    if k == 0 or count < 1:
        raise ValueError("rate_se needs at least one rate over at least one trial")
    pooled = (p.mean() * k * count + 0.5) / (k * count + 1)
    var = pooled * (1 - pooled) / (k * count)
    if k > 1:
        var += p.var(ddof=1) / k
    return float(math.sqrt(var))


# ----------------------------------------------------------------------------
# Criteria and their calibration.
#
# Two questions, two criteria, never one threshold for both: *copy* (is this sample a copy of a
# training point? the statistic is that of the sample and its nearest training point) and *same*
# (did two samplers make the same image from one seed? the statistic is that of the pair). Each is
# calibrated on its own null: held-out data that must not be flagged.

FLAGS = ("below", "above")
# 'relative': ||x - y|| / ||y|| (model space); 'cosine': descriptor cosine; 'mae': mean absolute
# pixel difference in [0, 1] units. Distances are flagged when small, cosines when large.
STATISTICS = (
    "relative",
    "cosine",
    "mae",
)  # 'below': a score <= t is flagged (distances); 'above': a score > t (cosines)


def _scores(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64).reshape(-1)
    if len(a) == 0 or not np.isfinite(a).all():
        raise ValueError(f"{what} must be a non-empty set of finite scores")
    return a


def _check_flag(flag: str) -> None:
    if flag not in FLAGS:
        raise ValueError(f"flag must be one of {FLAGS}, got {flag!r}")


def flagged(scores: Any, threshold: float, flag: str = "below") -> np.ndarray:
    """Boolean flags of ``scores``: score <= threshold ('below') or score > threshold ('above')."""
    _check_flag(flag)
    a = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    return a <= threshold if flag == "below" else a > threshold


def flag_rates(scores: Any, thresholds: Sequence[float] | np.ndarray, flag: str = "below") -> np.ndarray:
    """Fraction of ``scores`` flagged at each threshold, (T,): a rate-vs-threshold curve."""
    a = _scores(scores, "scores")
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1, 1)
    return flagged(a[None, :], t, flag).mean(1)


def calibrate_null(
    null: Any, max_false_rate: float = 0.01, flag: str = "below", decimals: int | None = 2
) -> float:
    """The loosest threshold that flags at most ``max_false_rate`` of the ``null`` scores (data that
    must not be flagged), rounded to ``decimals`` towards the strict side (None: no rounding)."""
    _check_flag(flag)
    if not 0 <= max_false_rate < 1:
        raise ValueError(f"max_false_rate must be in [0, 1), got {max_false_rate}")
    a = np.sort(_scores(null, "null scores"))
    allowed = math.floor(max_false_rate * len(a) + 1e-9)  # null scores that may be flagged
    if flag == "below":  # t < a[allowed]: at most `allowed` scores are <= t
        limit = a[allowed]
        t = float(np.nextafter(limit, -math.inf))
        if decimals is not None:
            scale = 10**decimals
            t = math.floor(limit * scale) / scale
            if t >= limit:
                t = (math.ceil(limit * scale) - 1) / scale
    else:  # t >= a[-allowed - 1]: at most `allowed` scores are > t
        limit = a[len(a) - allowed - 1]
        t = float(limit)
        if decimals is not None:
            scale = 10**decimals
            t = math.ceil(limit * scale) / scale
    return float(t)


@dataclass(frozen=True)
class Criterion:
    """A thresholded statistic answering one question: ``question`` 'copy' or 'same'; ``statistic``
    one of ``STATISTICS`` (distances flagged when <= threshold, cosines when > threshold)."""

    question: str
    statistic: str
    threshold: float

    def __post_init__(self) -> None:
        if self.question not in ("copy", "same"):
            raise ValueError(f"question must be 'copy' or 'same', got {self.question!r}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")

    @property
    def flag(self) -> str:
        """'below' for distances, 'above' for cosines."""
        return "above" if self.statistic == "cosine" else "below"

    def flags(self, scores: Any) -> np.ndarray:
        """Which scores meet the criterion (are copies / are the same image)."""
        return flagged(scores, self.threshold, self.flag)

    def __str__(self) -> str:
        op = "<=" if self.flag == "below" else ">"
        what = {"relative": "||x - y|| / ||y||", "cosine": "cos(f(x), f(y))", "mae": "mean |x - y|"}[
            self.statistic
        ]
        return f"{self.question}: {what} {op} {self.threshold:g}"
