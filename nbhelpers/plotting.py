"""The figures' shared look: style set-up, regime shading, heatmaps, profile badges, error-bar lines.

Every figure of the book is labelled with the profile that produced it (``profile_badge``), so a
``ci`` figure can never pass for a ``companion`` or ``paper`` one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = "colorblind"
REGIME_COLORS = {"memorization": "#d95f02", "transition": "#bbbbbb", "generalization": "#1b9e77"}
_SHORT = {"memorization": "memor.", "transition": "trans.", "generalization": "general."}
PROFILE_COLORS = {"ci": "#b2182b", "companion": "#2166ac", "paper": "#1a9850"}

_RC = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titleweight": "bold",
    "legend.frameon": False,
    "image.cmap": "viridis",
}


def set_style(context: str = "notebook", font_scale: float = 0.9) -> None:
    """Apply the book's seaborn theme and rc settings globally (for the rest of the session)."""
    sns.set_theme(context=context, style="whitegrid", palette=PALETTE, font_scale=font_scale, rc=_RC)


@contextlib.contextmanager
def style(context: str = "notebook", font_scale: float = 0.9) -> Iterator[None]:
    """Context manager applying the book's look only inside the ``with`` block."""
    with mpl.rc_context():
        set_style(context, font_scale)
        yield


def colors(n: int) -> list:
    """``n`` distinct colours of the book's palette."""
    return sns.color_palette(PALETTE, n)


def profile_badge(target: Any, profile: str, loc: str = "upper right") -> Any:
    """Label a figure (or the figure of an axes) with its profile, e.g. ``profile: companion``."""
    fig = target if isinstance(target, mpl.figure.Figure) else target.figure
    x, ha = (0.995, "right") if "right" in loc else (0.005, "left")
    y, va = (0.995, "top") if "upper" in loc else (0.005, "bottom")
    color = PROFILE_COLORS.get(profile, "#444444")
    return fig.text(
        x,
        y,
        f"profile: {profile}",
        ha=ha,
        va=va,
        fontsize=8,
        color="white",
        bbox={"boxstyle": "round,pad=0.25", "fc": color, "ec": "none", "alpha": 0.9},
    )


def shade_regimes(
    ax: plt.Axes,
    memorization_end: float | None,
    generalization_start: float | None,
    xlim: tuple[float, float] | None = None,
    labels: bool = True,
    alpha: float = 0.12,
) -> None:
    """Shade the memorization (x <= memorization_end), transition and generalization (x >= start) bands.

    Bounds are in data units of the x axis (log axes work). ``None`` omits that band.
    """
    lo, hi = xlim if xlim is not None else ax.get_xlim()
    spans = []
    if memorization_end is not None:
        spans.append(("memorization", lo, memorization_end))
    if generalization_start is not None:
        spans.append(("generalization", generalization_start, hi))
    if (
        memorization_end is not None
        and generalization_start is not None
        and generalization_start > memorization_end
    ):
        spans.append(("transition", memorization_end, generalization_start))
    for name, a, b in spans:
        if b <= a:
            continue
        ax.axvspan(a, b, color=REGIME_COLORS[name], alpha=alpha, lw=0, zorder=0)
        if labels:
            xm = np.sqrt(a * b) if ax.get_xscale() == "log" and a > 0 else (a + b) / 2
            (x0, _), (x1, _) = ax.transData.transform([(a, 0), (b, 0)])
            width = (x1 - x0) / max(ax.bbox.width, 1e-9)
            text = name if width >= 0.22 else _SHORT[name]
            ax.text(
                xm,
                0.985,
                text,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=7,
                color=REGIME_COLORS[name],
                alpha=0.9 if name != "transition" else 0.7,
                fontweight="bold",
                clip_on=True,
            )
    ax.set_xlim(lo, hi)


def regime_bounds(
    table: pd.DataFrame, x: str, y: str, low: float = 0.1, high: float = 0.9, by: str | None = None
) -> tuple[float | None, float | None]:
    """Regime edges from generalization-score curves: last x where every curve's mean <= ``low``
    (memorization) and first x from which every curve's mean stays >= ``high`` (generalization)."""
    keys = [x] + ([by] if by else [])
    mean = table.groupby(keys)[y].mean().unstack(by) if by else table.groupby(x)[y].mean().to_frame()
    mean = mean.sort_index()
    xs = mean.index.to_numpy(dtype=float)
    mem = xs[(mean <= low).all(axis=1).to_numpy()]
    gen_ok = (mean >= high).all(axis=1).to_numpy()
    mem_end = float(mem.max()) if len(mem) else None
    gen_start = None
    for i in range(len(xs)):
        if gen_ok[i:].all():
            gen_start = float(xs[i])
            break
    return mem_end, gen_start


def log2_axis(ax: plt.Axes, values: Sequence[float], label: str = "training-set size N") -> None:
    """Log-2 x axis with a tick at every value, labelled by the number itself (``2^k`` when large)."""
    ax.set_xscale("log", base=2)
    values = sorted(set(float(v) for v in values))
    ax.set_xticks(values)
    ax.set_xticklabels([_size_label(v) for v in values])
    ax.xaxis.set_minor_locator(mpl.ticker.NullLocator())
    lo, hi = values[0], values[-1]
    pad = (hi / lo) ** 0.04 if hi > lo else 1.5
    ax.set_xlim(lo / pad, hi * pad)
    ax.set_xlabel(label)


def _size_label(v: float) -> str:
    k = np.log2(v)
    if v >= 2048 and abs(k - round(k)) < 1e-9:
        return f"$2^{{{int(round(k))}}}$"
    return f"{v:g}"


def errorbar_lines(
    data: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    ax: plt.Axes | None = None,
    errorbar: str = "sd",
    log2: bool = True,
    markers: bool = True,
    ylim: tuple | None = (-0.03, 1.03),
    palette: Any = None,
    hue_order: Sequence | None = None,
    **kwargs: Any,
) -> plt.Axes:
    """Mean of ``y`` vs ``x`` per ``hue`` with error bars over repeats (``'sd'``, ``'se'``, ``('ci', 95)``),
    on a log-2 x axis by default."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.6))
    if hue is not None and hue_order is None:
        hue_order = list(dict.fromkeys(data[hue]))
    if palette is None and hue is not None:
        palette = colors(len(hue_order))
    sns.lineplot(
        data=data,
        x=x,
        y=y,
        hue=hue,
        hue_order=hue_order,
        ax=ax,
        errorbar=errorbar,
        err_style="bars",
        marker="o" if markers else None,
        markersize=5,
        palette=palette,
        err_kws={"capsize": 3, "elinewidth": 1},
        **kwargs,
    )
    if log2:
        log2_axis(ax, data[x].unique(), label=x)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return ax


def annotated_heatmap(
    matrix: np.ndarray | pd.DataFrame,
    labels: Sequence[str] | None = None,
    ax: plt.Axes | None = None,
    fmt: str = ".2f",
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
    triangle: str | None = None,
    title: str | None = None,
    cbar_label: str | None = None,
    errors: np.ndarray | pd.DataFrame | None = None,
) -> plt.Axes:
    """Square score matrix with the value written in every cell (``value±error`` with ``errors``);
    ``triangle='upper'``/``'lower'`` hides the other half."""
    m = matrix.to_numpy() if isinstance(matrix, pd.DataFrame) else np.asarray(matrix, dtype=float)
    if m.ndim != 2:
        raise ValueError(f"annotated_heatmap: expected a 2-d matrix, got shape {m.shape}")
    if labels is None and isinstance(matrix, pd.DataFrame):
        labels = [str(c) for c in matrix.columns]
    if labels is not None and len(labels) != m.shape[1]:
        raise ValueError(f"annotated_heatmap: {len(labels)} labels for a matrix with {m.shape[1]} columns")
    mask = None
    if triangle == "upper":
        mask = np.tril(np.ones_like(m, dtype=bool), k=-1)
    elif triangle == "lower":
        mask = np.triu(np.ones_like(m, dtype=bool), k=1)
    elif triangle is not None:
        raise ValueError(f"annotated_heatmap: triangle must be 'upper', 'lower' or None, not {triangle!r}")
    if ax is None:
        size = 1.0 + 0.75 * m.shape[1]
        _, ax = plt.subplots(figsize=(size + 1.2, size))
    annot: Any = True
    if errors is not None:
        e = errors.to_numpy() if isinstance(errors, pd.DataFrame) else np.asarray(errors, dtype=float)
        annot = np.array([[f"{v:{fmt}}\n±{d:{fmt}}" for v, d in zip(rv, rd)] for rv, rd in zip(m, e)])
    sns.heatmap(
        m,
        mask=mask,
        annot=annot,
        fmt=fmt if errors is None else "",
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        square=True,
        ax=ax,
        xticklabels=labels if labels is not None else "auto",
        yticklabels=labels if labels is not None else "auto",
        annot_kws={"fontsize": 8},
        linewidths=0.5,
        linecolor="white",
        cbar_kws={"label": cbar_label} if cbar_label else None,
    )
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    if title:
        ax.set_title(title)
    return ax


def image_grid(
    images: np.ndarray, nrow: int, ax: plt.Axes | None = None, pad: int = 1, title: str | None = None
) -> plt.Axes:
    """Show uint8 images (N, C, H, W) as one tiled picture with ``nrow`` rows."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"image_grid: expected (N, C, H, W) images, got shape {images.shape}")
    n, c, h, w = images.shape
    ncol = int(np.ceil(n / nrow))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
        ] = images[i].transpose(1, 2, 0)
    if ax is None:
        _, ax = plt.subplots(figsize=(ncol * 0.5 + 0.5, nrow * 0.5 + 0.5))
    ax.imshow(
        canvas[..., 0] if c == 1 else canvas,
        cmap="gray" if c == 1 else None,
        vmin=0,
        vmax=255,
        interpolation="nearest",
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def mean_se_lines(
    ax: plt.Axes,
    table: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    se: str = "se",
    log2: bool = True,
    ylim: tuple | None = (-0.03, 1.03),
    linestyle: str = "-",
    palette: Any = None,
    label_suffix: str = "",
) -> plt.Axes:
    """One line of ``y`` (mean) against ``x`` per ``hue`` value with +-``se`` error bars."""
    groups = list(dict.fromkeys(table[hue]))
    palette = palette or dict(zip(groups, colors(len(groups))))
    for g in groups:
        t = table[table[hue] == g].sort_values(x)
        ax.errorbar(
            t[x],
            t[y],
            yerr=t[se] if se in t else None,
            marker="o",
            ms=4,
            capsize=2.5,
            lw=1.3,
            ls=linestyle,
            color=palette[g],
            label=f"{g}{label_suffix}",
        )
    if log2:
        log2_axis(ax, table[x].unique(), label=x)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return ax
