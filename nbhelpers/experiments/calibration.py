"""Calibration of the two similarity criteria on held-out data, shared by the P1 and P2 chapters.

- *copy* (GL: is a sample a copy of a training point?): the statistic of a sample and its nearest
  training point; the null is **held-out data** (fresh samples of the distribution, never trained
  on), scored against each training set of the sweep; the control is **planted copies** (training
  points plus a little noise), which must be flagged.
- *same* (RP: did two samplers make the same image from one seed?): the statistic of a pair; the
  null is **unrelated pairs** (two independent held-out samples); the control is **near-identical
  pairs** (a held-out sample and a slightly noisy version of it), which must count as the same.

The threshold comes from the null alone (the loosest one flagging at most ``max_false`` of it, at
every training-set size for *copy*), so it depends on no choice of noise; the control then checks
that the criterion has power. Statistics: 'relative' (||x - y|| / ||y|| in model space, flagged
when small) or 'cosine' (descriptor cosine such as SSCD's, flagged when large).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import scores
from . import cells

# images (uint8, N x C x H x W) -> unit-norm descriptors (N, F); None for the relative statistic
FeatureFn = Callable[[Any], torch.Tensor] | None


@dataclass
class Calibration:
    """A calibrated criterion with its evidence: per-setting rates (``table``) and the raw scores
    (``scores``: long table with columns n, kind, score), for plots."""

    criterion: scores.Criterion
    table: pd.DataFrame
    scores: pd.DataFrame
    max_false: float
    min_true: float

    @property
    def threshold(self) -> float:
        return self.criterion.threshold

    @classmethod
    def given(cls, criterion: scores.Criterion) -> Calibration:
        """A criterion whose threshold was given, not calibrated (no evidence tables)."""
        return cls(criterion, pd.DataFrame(), pd.DataFrame(columns=["n", "kind", "score"]), 0.0, 0.0)

    def sanity_rows(self, setting: str) -> list[dict[str, Any]]:
        """Result rows: the null's flag rate (<= max_false by construction) and the control's (power)."""
        from ..results import check

        if self.table.empty:
            return []
        q = self.criterion.question
        null, control = _KINDS[q]
        worst_null = float(self.table["null_rate"].max())
        worst_control = float(self.table["control_rate"].min())
        where = f"{setting}, {self.criterion}"
        return [
            check(
                f"{q} criterion: {null} flagged",
                where,
                worst_null,
                "<=",
                self.max_false,
                kind="sanity",
                note="the threshold is set from these (worst setting)",
            ),
            check(
                f"{q} criterion: {control} flagged",
                where,
                worst_control,
                ">=",
                self.min_true,
                kind="sanity",
                note="the criterion's power (worst setting)",
            ),
        ]


_KINDS = {"copy": ("held-out samples", "planted copies"), "same": ("unrelated pairs", "near-identical pairs")}


def _model_space(x: Any) -> torch.Tensor:
    from ..data import model_space

    return model_space(x, dtype=torch.float64)


def _like_data(x: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """Model-space points in the form the data (and stored samples) take: uint8 images or float."""
    shape = (len(x), *cells_shape(spec))
    x = x.reshape(shape)
    return torch.from_numpy(cells.store_samples(x, spec))


def cells_shape(spec: Mapping[str, Any]) -> tuple[int, int, int]:
    c, r = cells.data_shape(spec)
    return c, r, r


def copy_scores(x: Any, train: Any, statistic: str) -> np.ndarray:
    """The copy statistic of each sample against a training set, (S,) float64: the relative distance
    to the nearest training point ('relative', on images or model-space points), or the largest
    cosine to any training point ('cosine', on descriptors)."""
    if statistic == "relative":
        rel, _ = scores.nn_relative_distance(x, train)
        return rel.numpy()
    best, _ = scores.max_similarity(x, train, dtype=torch.float64)
    return best.numpy()


def same_scores(a: Any, b: Any, statistic: str) -> np.ndarray:
    """The same-image statistic of aligned pairs (a_j, b_j), (S,) float64: ||a - b|| / ||b||
    ('relative'), the mean absolute pixel difference ('mae') or the descriptor cosine ('cosine')."""
    if statistic == "relative":
        return scores.relative_distance(a, b).numpy()
    if statistic == "mae":
        return scores.mean_abs_difference(a, b).numpy()
    return torch.nn.functional.cosine_similarity(
        torch.as_tensor(a).double(), torch.as_tensor(b).double()
    ).numpy()


def _embed(statistic: str, features: FeatureFn) -> Callable[[Any], Any]:
    if statistic != "cosine":
        return lambda x: x
    if features is None:
        raise ValueError("the cosine statistic needs a features function (e.g. an SSCD model)")
    return features


def calibrate_copy(
    spec: Mapping[str, Any],             # data spec with a pool (cells.load_pool)
    sizes: Sequence[int],                # the training-set sizes of the sweep
    count: int = 2000,                   # held-out samples (and planted copies) per size
    copy_noise: float = 0.03,            # relative noise of a planted copy
    max_false: float = 0.01,             # held-out samples flagged at most this often, at every size
    min_true: float = 0.99,              # planted copies flagged at least this often (checked, not tuned)
    statistic: str = "relative",
    features: FeatureFn = None,
    seed: int = 0,
    decimals: int = 3,                   # the threshold is rounded to this many decimals (strict side)
) -> Calibration:  # fmt: skip
    """The copy criterion of a sweep: threshold from held-out samples against every training set."""
    embed = _embed(statistic, features)
    fresh = embed(cells.fresh_samples(spec, count))
    pool = embed(cells.training_set(spec, max(int(n) for n in sizes)))  # nested sets: slice its rows
    g = torch.Generator().manual_seed(seed)
    per_size = []
    for n in sizes:
        train = cells.training_set(spec, int(n))
        planted = embed(_like_data(scores.noisy_copies(train, count, copy_noise, g), spec))
        keys = pool[: int(n)]
        per_size.append((int(n), copy_scores(fresh, keys, statistic), copy_scores(planted, keys, statistic)))
    flag = "above" if statistic == "cosine" else "below"
    # the threshold must keep every size's false rate in bound: calibrate on the strictest size
    thresholds = [scores.calibrate_null(f, max_false, flag, decimals) for _, f, _ in per_size]
    t = min(thresholds) if flag == "below" else max(thresholds)
    crit = scores.Criterion("copy", statistic, t)
    return _calibration(crit, per_size, max_false, min_true, "n")


def calibrate_same(
    spec: Mapping[str, Any],
    count: int = 2000,                   # unrelated pairs (and near-identical pairs)
    near_noise: float = 0.03,            # relative noise between the two images of a near-identical pair
    max_false: float = 0.01,             # unrelated pairs counted as the same at most this often
    min_true: float = 0.99,              # near-identical pairs counted at least this often (checked)
    statistic: str = "relative",
    features: FeatureFn = None,
    seed: int = 0,
    decimals: int = 3,
) -> Calibration:  # fmt: skip
    """The same-image criterion: threshold from pairs of independent held-out samples."""
    embed = _embed(statistic, features)
    fresh = cells.fresh_samples(spec, 2 * count)
    a, b = fresh[:count], fresh[count : 2 * count]
    g = torch.Generator().manual_seed(seed + 1)
    near = _like_data(_noisy(a, near_noise, g), spec)
    ea = embed(a)
    null, control = same_scores(ea, embed(b), statistic), same_scores(embed(near), ea, statistic)
    flag = "above" if statistic == "cosine" else "below"
    crit = scores.Criterion("same", statistic, scores.calibrate_null(null, max_false, flag, decimals))
    return _calibration(crit, [(0, null, control)], max_false, min_true, None)


def _noisy(x: Any, noise: float, g: torch.Generator) -> torch.Tensor:
    """Each point plus Gaussian noise of relative norm ``noise`` (model space, float64, flattened)."""
    y = _model_space(x).reshape(len(x), -1)
    e = torch.randn(y.shape, generator=g, dtype=torch.float64)
    return y + noise * y.norm(dim=1, keepdim=True) * e / y.shape[1] ** 0.5


def _calibration(
    crit: scores.Criterion, per_setting: list, max_false: float, min_true: float, key: str | None
) -> Calibration:
    null_kind, control_kind = _KINDS[crit.question]
    rows, long = [], []
    for n, null, control in per_setting:
        q_null = float(np.quantile(null, max_false if crit.flag == "below" else 1 - max_false))
        q_ctrl = float(np.quantile(control, min_true if crit.flag == "below" else 1 - min_true))
        row = {
            "null_rate": float(crit.flags(null).mean()),
            "control_rate": float(crit.flags(control).mean()),
            "null_quantile": q_null,
            "control_quantile": q_ctrl,
            "threshold": crit.threshold,
        }
        rows.append({key: n, **row} if key else row)
        long += [
            pd.DataFrame({"n": n, "kind": null_kind, "score": null}),
            pd.DataFrame({"n": n, "kind": control_kind, "score": control}),
        ]
    return Calibration(crit, pd.DataFrame(rows), pd.concat(long, ignore_index=True), max_false, min_true)


def plot_calibration(
    cals: Mapping[str, Calibration],
    profile: str,
    extra: Mapping[str, np.ndarray] | None = None,
    sizes: Sequence[int] | None = None,
):
    """Histograms of each calibration's null and control scores with its threshold, one panel per
    (calibration, size); ``extra`` adds named score sets (e.g. a model's samples) to the first panel."""
    import matplotlib.pyplot as plt

    from .. import plotting

    panels = []
    for name, cal in cals.items():
        if cal.scores.empty:
            continue
        ns = sorted(cal.scores["n"].unique())
        ns = [n for n in ns if sizes is None or n in sizes or n == 0]
        panels += [(name, cal, n) for n in ns]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 2.9), squeeze=False)
    for i, (ax, (name, cal, n)) in enumerate(zip(axes[0], panels)):
        sub = cal.scores[cal.scores["n"] == n]
        hi = float(sub["score"].quantile(0.995))
        lo = float(min(sub["score"].min(), 0)) if cal.criterion.flag == "below" else float(sub["score"].min())
        bins = np.linspace(lo, max(hi, cal.threshold * 1.5), 60)
        for (kind, g), color in zip(sub.groupby("kind", sort=False), plotting.colors(3)):
            ax.hist(g["score"], bins=bins, alpha=0.55, color=color, label=kind, density=True)
        for j, (label, values) in enumerate((extra or {}).items() if i == 0 else []):
            ax.hist(
                values,
                bins=bins,
                histtype="step",
                lw=1.4,
                color=plotting.colors(4 + j)[3 + j],
                density=True,
                label=label,
            )
        ax.axvline(cal.threshold, color="k", ls="--", lw=1, label=f"threshold {cal.threshold:g}")
        ax.set_title(name + (f", N = {n}" if n else ""), fontsize=9)
        ax.set_xlabel("||x - y|| / ||y||" if cal.criterion.statistic == "relative" else "cosine")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    plotting.profile_badge(fig, profile)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig
