"""The authors' reported numbers, each with the figure it was read from and how.

Source: the figures of the authors' code release (huijieZH/Diffusion-Model-Generalizability,
``figures/*.png``) and the papers' figures. Values were read by eye from the plots, to about +-0.02;
they are for the released setting (students trained on images that a CIFAR-10 EDM teacher
generated), not always the paper's exact figure. Notebooks and the summary compare against these
tables only; nothing else in the repository types a paper value.

- P1: Zhang et al., "The Emergence of Reproducibility and Consistency in Diffusion Models", ICML 2024.
- P2: Wang, Zhang et al., "Diffusion Models Learn Low-Dimensional Distributions via Subspace
  Clustering", arXiv 2409.02426.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------
# P1 Fig. 2 (regimes): CIFAR-10 students DDPM++ UNet-64/128/256, training-set sizes 2^6..2^15.
# GL read from the left panel; "~0" below 2^11 is entered as 0, the 2^14 and 2^15 points are equal.

P1_SIZES = [2**k for k in range(6, 16)]
P1_GL = {
    "UNet-64": [0, 0, 0, 0, 0, 0.22, 0.87, 0.99, 1.0, 1.0],
    "UNet-128": [0, 0, 0, 0, 0, 0.01, 0.28, 0.82, 0.99, 0.99],
    "UNet-256": [0, 0, 0, 0, 0, 0.01, 0.05, 0.30, 0.985, 0.985],
}
# Pairwise RP (SSCD cosine > 0.6) read from the right panel.
P1_PAIRWISE_RP = {
    "64 vs 128": [0.69, 0.66, 0.59, 0.52, 0.46, 0.42, 0.34, 0.18, 0.45, 0.67],
    "64 vs 256": [0.62, 0.62, 0.55, 0.47, 0.37, 0.30, 0.10, 0.02, 0.49, 0.61],
    "128 vs 256": [0.65, 0.63, 0.56, 0.48, 0.41, 0.33, 0.17, 0.17, 0.45, 0.84],
}
# Training-set size where GL crosses 0.5, interpolated in log2 N on the curves above.
P1_N_HALF = {"UNet-64": 2**11.8, "UNet-128": 2**12.4, "UNet-256": 2**13.6}

# ----------------------------------------------------------------------------
# P1 Fig. 4 (left): RP of each UNet against the empirical optimal denoiser (Euler sampler),
# read from the plot; "~0" at 2^14 and 2^15 entered as 0.

P1_RP_OPTIMAL = {
    "UNet-64": [0.47, 0.45, 0.37, 0.27, 0.20, 0.12, 0.03, 0.0, 0.0, 0.0],
    "UNet-128": [0.51, 0.46, 0.37, 0.30, 0.24, 0.17, 0.11, 0.04, 0.0, 0.0],
    "UNet-256": [0.51, 0.46, 0.40, 0.33, 0.27, 0.21, 0.15, 0.10, 0.0, 0.0],
}

# ----------------------------------------------------------------------------
# P1 Figs. 6 and 12 (model similarity): seven CIFAR-10 models sampled from the same noise. Upper
# triangles of the RP (SSCD) and MAE-score matrices, row by row, read from the heatmaps' labels.

P1_SIMILARITY_MODELS = ["DDPMv4", "DDPMv6", "Multistagev1", "EDMv1", "UViT", "CT", "Progressivev1"]
P1_SIMILARITY_RP_UPPER = [
    [0.89, 0.86, 0.83, 0.81, 0.81, 0.88],
    [0.84, 0.83, 0.78, 0.80, 0.87],
    [0.78, 0.80, 0.76, 0.86],
    [0.74, 0.76, 0.85],
    [0.70, 0.82],
    [0.91],
]
P1_SIMILARITY_MAE_UPPER = [
    [0.92, 0.85, 0.85, 0.84, 0.75, 0.88],
    [0.87, 0.87, 0.82, 0.77, 0.90],
    [0.81, 0.76, 0.77, 0.87],
    [0.76, 0.72, 0.86],
    [0.68, 0.84],
    [0.83],
]


def _long(values: dict[str, list[float]], column: str, value: str) -> pd.DataFrame:
    rows = [{"n": n, column: k, value: v} for k, vs in values.items() for n, v in zip(P1_SIZES, vs)]
    return pd.DataFrame(rows)


def p1_gl() -> pd.DataFrame:
    """P1 Fig. 2, GL: columns ``n``, ``model``, ``gl``."""
    return _long(P1_GL, "model", "gl")


def p1_pairwise_rp() -> pd.DataFrame:
    """P1 Fig. 2, pairwise RP: columns ``n``, ``pair``, ``rp``."""
    return _long(P1_PAIRWISE_RP, "pair", "rp")


def p1_rp_optimal() -> pd.DataFrame:
    """P1 Fig. 4 (left), RP vs the optimal denoiser: columns ``n``, ``model``, ``rp``."""
    return _long(P1_RP_OPTIMAL, "model", "rp")


def _symmetric(upper: list[list[float]], names: list[str]) -> pd.DataFrame:
    m = np.eye(len(names))
    for i, row in enumerate(upper):
        for k, v in enumerate(row):
            m[i, i + 1 + k] = m[i + 1 + k, i] = v
    return pd.DataFrame(m, index=list(names), columns=list(names))


def p1_similarity_rp() -> pd.DataFrame:
    """P1 Figs. 6/12, RP matrix over ``P1_SIMILARITY_MODELS`` (7 x 7, symmetric, diagonal 1)."""
    return _symmetric(P1_SIMILARITY_RP_UPPER, P1_SIMILARITY_MODELS)


def p1_similarity_mae() -> pd.DataFrame:
    """P1 Figs. 6/12, MAE-score matrix over ``P1_SIMILARITY_MODELS`` (7 x 7, symmetric, diagonal 1)."""
    return _symmetric(P1_SIMILARITY_MAE_UPPER, P1_SIMILARITY_MODELS)


def value_range(values: list[float], digits: int = 2) -> str:
    """``'lo-hi'`` (or one value) of a list of paper values, for result rows."""
    lo, hi = round(min(values), digits), round(max(values), digits)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def p1_reference() -> dict[str, str]:
    """The paper's values that P1 checks compare with, as display strings (computed from the tables)."""
    gl, rp, opt = P1_GL.values(), P1_PAIRWISE_RP.values(), P1_RP_OPTIMAL.values()
    dips = [min(v[0], v[-1]) - min(v[1:-1]) for v in rp]
    return {
        "gl_small": f"{value_range([v[0] for v in gl])} (2^6)",
        "gl_large": f"{value_range([v[-1] for v in gl])} (2^15)",
        "rp_small": f"{value_range([v[0] for v in rp])} (2^6)",
        "rp_large": f"{value_range([v[-1] for v in rp])} (2^15)",
        "rp_dip": f"{value_range(dips)} (lower end minus the minimum in between)",
        "n_half_step": value_range(np.diff(np.log2(list(P1_N_HALF.values()))).tolist(), 1),
        "rp_opt_small": f"{value_range([v[0] for v in opt])} (2^6)",
        "rp_opt_large": f"{value_range([v[-1] for v in opt])} (2^15)",
        "rp_opt_fall": value_range([v[0] - v[-1] for v in opt]),
    }


# ----------------------------------------------------------------------------
# P2 Fig. 3 (jacobian_rank; reference/PAPERS.md, "Jacobian rank"): rank ratio (rank / n) at the SNRs
# of the figure's axis (jacobian.AUTHORS_SNR_GRID), read by eye from the log-scale plot (about +-0.02;
# the ranges span the data sets).

P2_RANK_REAL = {  # P2 Fig. 3, real data (CIFAR-10, CelebA, FFHQ, AFHQ): SNR -> (low, high) over the data sets
    500.0: (0.95, 0.95),
    50.0: (0.5, 0.5),
    10.0: (0.2, 0.27),
    1.67: (0.08, 0.1),
    0.3: (0.02, 0.02),
    0.04: (0.004, 0.006),
}
P2_RANK_REAL_N = 3 * 32 * 32  # n of CIFAR-10: turns the paper's ratios into directions (64x64 sets: 4x)
P2_RANK_MOLRG_UNET = {  # P2 Fig. 3, MoLRG (n = 48, K = 2): the U-Net, SNR -> rank ratio
    500.0: 0.98,
    125.0: 0.96,
    50.0: 0.94,
    10.0: 0.22,
    1.67: 0.125,
    0.91: 0.19,
    0.3: 0.48,
    0.12: 0.667,
    0.08: 0.667,
    0.04: 0.667,
    0.02: 0.667,
    0.01: 0.667,
}
P2_RANK_MOLRG_LOWRANK = {"high_snr": 0.125, "low_snr": 0.25}  # d/n for SNR >= 1.67, Kd/n for SNR <= 0.3
P2_RANK_MOLRG_N, P2_RANK_MOLRG_K, P2_RANK_MOLRG_D = 48, 2, 6  # d/n = 0.125 and Kd/n = 0.25 as plotted


# ----------------------------------------------------------------------------
# P2 sample complexity (molrg_phase_transition; reference/PAPERS.md, "MoLRG (P2)"), one row each: the
# value, and where and how it was read.

P2_PHASE = {
    "lowrank_threshold": {
        "value": 1.0,
        "text": "N_k >= d",
        "source": "P2, sample-complexity theorem for the low-rank model (training = subspace clustering): "
        "learning succeeds once N_k >= d, whatever n; the paper's phase-transition figure shows the boundary "
        "near N_k = d (as summarised in reference/PAPERS.md)",
    },
    "unet_transition_over_d": {
        "value": (50.0, 60.0),
        "text": "N_k ~ 50-60 d",
        "source": "P2, U-Net on MoLRG (DDPM++, EDM preconditioning): memorization to generalization at "
        "roughly N_k ~ 50-60 d_k (reference/PAPERS.md; read from the paper's text and "
        "phase-transition figure)",
    },
    "unet_gl": {
        "value": (0.0, 1.0),
        "text": "GL ~ 0 (memorization) below the transition, ~ 1 (generalization) above",
        "source": "P2 phase-transition figure for the U-Net (generalization score), read by eye",
    },
}
