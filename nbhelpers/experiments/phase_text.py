"""The generated prose of ``molrg_phase_transition.ipynb`` (re-exported by ``phase_transition``, the
module the notebook calls): the "what it shows" paragraphs of panels (a) and (b), and the comparison
with the paper.

Each function turns the chapter's tables into markdown whose every number and every qualitative word
("rarely", "most") follows from the measured values, so a re-run with other results reads true.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd


def _succeeds(p: float) -> str:
    """'succeeds' qualified by how often, from the success rate p in [0, 1]."""
    if not np.isfinite(p):
        return "was not measured"
    if p == 0:
        return "never succeeds"
    if p < 0.25:
        return "rarely succeeds"
    if p < 0.5:
        return "succeeds in fewer than half of the trials"
    if p < 0.9:
        return "succeeds in most trials, but not reliably"
    return "succeeds reliably"


def _rate(t: pd.DataFrame, sel: pd.Series, col: str = "success") -> float:
    return float(t[sel][col].mean()) if bool(sel.any()) else float("nan")


def lowrank_text(
    table: pd.DataFrame, trans: pd.DataFrame, threshold: float, restarts: int, steps: int
) -> str:
    """Panel (a)'s success rates: below, at and above N_k = d, per n, the transition N_k*/d, and what
    selection by training loss lost (``table``: :func:`phase_transition.lowrank_table`)."""
    below, at_d, above = table.per_class < table.d, table.per_class == table.d, table.per_class >= 2 * table.d
    ns = sorted(int(n) for n in table.n.unique())
    b_tr, b_so = _rate(table, below), _rate(table, below, "solver_success")
    if b_tr == 0 and b_so == 0:
        first = f"Below N_k = d no fit succeeds, trained or solved (success rate {b_tr:.2f})"
    else:
        first = (
            f"Below N_k = d fits succeed in a share {b_tr:.2f} of trials (trained) and {b_so:.2f} (solver)"
        )
    a_tr, a_so = _rate(table, at_d), _rate(table, at_d, "solver_success")
    per_n = ", ".join(f"{_rate(table, above & (table.n == n)):.2f} at n = {n}" for n in ns)
    out = [
        f"**What it shows.** {first}: the N_k points of a class leave d - N_k directions of its subspace "
        "unconstrained.",
        f"At N_k = d the trained model {_succeeds(a_tr)} (rate {a_tr:.2f} over all d and n) and the solver "
        f"in a share {a_so:.2f} of the trials"
        + (
            ": with noise off the subspaces, N_k = d points do not pin their subspace down."
            if a_so < 0.9
            else "."
        ),
        f"From N_k = 2d on, training recovers the subspaces in a share {_rate(table, above):.2f} of the "
        f"trials ({per_n}), with {restarts} random starts of {steps} steps each.",
    ]
    tr = trans.dropna(subset=["ratio_star"])
    if len(tr):
        by_n = tr.groupby("n").ratio_star.apply(lambda v: float(np.exp(np.log(v).mean())))
        lo, hi = float(tr.ratio_star.min()), float(tr.ratio_star.max())
        where = "above N_k = d" if lo > 1 else "at or below N_k = d for some d"
        out.append(
            f"The success rate reaches 0.5 at N_k*/d = {lo:.2f}-{hi:.2f} over the d's and both n (table "
            f"above, with bootstrap intervals), {where}; its geometric mean over d is "
            + " and ".join(f"{v:.2f} at n = {int(n)}" for n, v in by_n.items())
            + f" (a factor {float(by_n.max() / by_n.min()):.2f} apart)."
        )
    any_ok = table.oracle_distance < threshold  # some restart succeeded (reported; never used to choose)
    out.append(
        f"Selection by training loss: of the {int(any_ok.sum())} trials in which at least one restart "
        f"recovered the subspaces, the restart with the lowest loss did in "
        f"{int((table.success & any_ok).sum())}."
    )
    return " ".join(out)


def causes_text(
    causes: pd.DataFrame, single: pd.DataFrame, directions: pd.Series, table: pd.DataFrame, restarts: int
) -> str:
    """Why fits fail, from :func:`phase_transition.failure_causes` (``causes``), the single-fit rates, the
    wrong-direction counts of every fit stuck above the truth's loss (``directions``:
    :func:`phase_transition.wrong_directions`, NaN where no count fits) and ``table``."""
    low, at, high = causes[causes.ratio < 1], causes[causes.ratio == 1], causes[causes.ratio >= 1.5]
    out = ["**What it shows.**"]
    if len(low) and int(low.failed.sum()):
        w, f = int(low["loss prefers wrong"].sum()), int(low.failed.sum())
        why = (
            ": d-dimensional bases through fewer than d points of a class can fit those points better than "
            "the true subspaces"
            if 2 * w > f
            else ""
        )
        out.append(
            f"Below N_k = d, {w} of the {f} failed trials kept a fit with a training loss at or below the "
            f"truth's{why}."
        )
    if len(at) and int(at.failed.sum()):
        w, f = int(at["loss prefers wrong"].sum()), int(at.failed.sum())
        why = (
            "K subspaces of dimension d can hold almost any split of the K d points, so the small-sigma part "
            "of the loss is near its minimum for many wrong splits and the loss does not single out the truth"
            if 2 * w > f
            else "most failures there are the optimizer's, not the loss's"
        )
        out.append(
            f"At N_k = d, {w} of the {f} failed trials kept a fit whose loss is at or below the truth's: "
            f"{why}."
        )
    if len(high) and int(high.failed.sum()):
        s, w, f = (
            int(high["optimizer stuck"].sum()),
            int(high["loss prefers wrong"].sum()),
            int(high.failed.sum()),
        )
        kind = "the optimizer's" if 2 * s > f else "mostly the loss's"
        out.append(
            f"With N_k >= 1.5 d the failures are {kind}: in {s} of the {f} failed trials the truth has the "
            f"lower loss and no restart reached it ({w} preferred a wrong solution)."
        )
    if len(directions):
        one, two = float((directions == 1).mean()), float((directions == 2).mean())
        out.append(
            f"Of the {len(directions)} single fits stuck above the truth's loss with N_k >= d, a share "
            f"{one:.2f} sit at distance sqrt(1/d) (one direction of a subspace wrong, the rest right) and "
            f"{two:.2f} at sqrt(2/d) (two): local minima of subspace clustering."
        )
    s_rate = float(single[single.ratio >= 2].single_fit_rate.mean())
    k_rate = _rate(table, table.ratio >= 2)
    verdict = "so restarts matter" if k_rate > s_rate else "restarts add nothing here"
    out.append(
        f"A single random start succeeds in a share {s_rate:.2f} of the fits at N_k >= 2d, the kept fit of "
        f"{restarts} restarts in {k_rate:.2f}: {verdict}."
    )
    return " ".join(out)


def variants_text(var: pd.DataFrame, probe: Mapping[str, Any], escaped: tuple[int, int] | None) -> str:
    """The training variants at the probe point (``var``: :func:`phase_transition.variant_table`, first
    row the chapter's setting); ``escaped``: (fits that escaped with more steps, fits that had failed)."""
    base = var.iloc[0]
    out = [
        f"**What it shows.** At d = {probe['d']}, N_k = {probe['nk']}, n = {probe['n']}, the chapter's "
        f"setting recovers the subspaces in a share {base['single fit']:.2f} of single fits and "
        f"{base['kept']:.2f} of trials. One change at a time:",
        "",
    ]
    for _, r in var.iloc[1:].iterrows():
        delta = r["single fit"] - base["single fit"]
        out.append(
            f"- **{r.variant}**: single fits {r['single fit']:.2f} ({delta:+.2f}), kept {r.kept:.2f} "
            f"(95 % {r['kept 95% low']:.2f}-{r['kept 95% high']:.2f})."
        )
    out.append("")
    losses = var[
        (var.loss != base.loss) & (var.lr == base.lr) & (var.steps == base.steps) & (var.init == base.init)
    ]
    col = "loss weight at sigma < 0.01"
    if len(losses):
        shares = " and ".join(f"{r[col]:.2f} ({r.variant})" for _, r in losses.iterrows())
        worse = bool((losses["single fit"] < base["single fit"]).all())
        heavier = bool((losses[col] > base[col]).all())
        if worse and heavier:
            text = (
                "recover less: their weights grow like 1/sigma^2 where the posterior weights are hard "
                "assignments, so a few tiny-sigma draws with enormous weights dominate each step"
            )
        else:
            text = "do not all recover less, so the small-sigma weight does not explain the differences"
        out.append(
            f"The losses that sample sigma differently put a share {shares} of their weight on sigma < 0.01, "
            f"against {base[col]:.2f} for the chapter's {base.loss} loss, and {text}."
        )
    longer = var[
        (var.steps > base.steps) & (var.loss == base.loss) & (var.lr == base.lr) & (var.init == base.init)
    ]
    if len(longer) and escaped is not None:
        r = longer.iloc[0]
        out.append(
            f"{r.steps / base.steps:g} times the steps give single fits {r['single fit']:.2f}: these fits "
            "repeat the chapter's step for step (same seeds, same batches) and then train on, and "
            f"{escaped[0]} of the {escaped[1]} fits that had failed after the chapter's steps escape their "
            "minima."
        )
    data = var[var.init != base.init]
    if len(data):
        r = data.iloc[0]
        better = r["single fit"] > base["single fit"]
        out.append(
            f"Starting from the span of random training points gives {r['single fit']:.2f}: "
            + (
                "better than a Gaussian start."
                if better
                else "no better than a Gaussian start (a random set of K d points mixes the classes)."
            )
        )
    return _join(out)


def _join(parts: list[str]) -> str:
    """Sentences joined by spaces; an empty string starts or ends a bullet list (its own lines)."""
    text, in_list = "", False
    for p in parts:
        if p == "":
            text = text.rstrip("\n") + "\n\n"
            in_list = not in_list
        elif in_list:
            text += p + "\n"
        else:
            text += (" " if text and not text.endswith("\n") else "") + p
    return text.strip()


def against_paper(
    table: pd.DataFrame,
    causes: pd.DataFrame,
    paper: tuple[float, float],
    slope: float,
    probe: tuple[float, float, int, int] | None,
) -> str:
    """The chapter's comparison with P2: the low-rank threshold and why training needs more (from the
    failure causes), and the U-Net constant ``slope`` beside the paper's range; ``probe``: (N_k* of the
    training-length probe, N_k* of the chapter's U-Net at the same d, their steps), or None."""
    at, above = table.per_class == table.d, table.per_class >= 2 * table.d
    out = [
        f"P2 states the low-rank model's threshold as N_k >= d. Here the trained model succeeds at N_k = d "
        f"in a share {_rate(table, at):.2f} of the trials and from N_k = 2d on in {_rate(table, above):.2f}."
    ]
    reasons = []
    c_at, c_hi = causes[causes.ratio == 1], causes[causes.ratio >= 1.5]
    if len(c_at) and 2 * int(c_at["loss prefers wrong"].sum()) > int(c_at.failed.sum()):
        reasons.append("at N_k = d the loss itself does not single out the truth")
    if len(c_hi) and 2 * int(c_hi["optimizer stuck"].sum()) > int(c_hi.failed.sum()):
        reasons.append("above it random starts get stuck in local minima of subspace clustering")
    if reasons:
        out.append("Where it needs more, the measured reasons are: " + "; ".join(reasons) + ".")
    lo, hi = paper
    out.append(
        f"For U-Nets the paper's transition is at about {lo:.0f}-{hi:.0f} d; this one's is at {slope:.1f} d."
    )
    if probe is not None and np.isfinite(probe[0]) and np.isfinite(probe[1]):
        verdict = _length_verdict(*probe)
        then = (
            "the constant depends on how long a model is trained, and the growth with d is what a CPU-sized "
            "model can test"
            if probe[0] > probe[1] and probe[2] > probe[3]
            else "training length does not explain the gap here"
        )
        out.append(f"{verdict} (N_k* {probe[0]:.1f} against {probe[1]:.1f} at one d): {then}.")
    return " ".join(out)


def unet_text(
    unet: pd.DataFrame,
    trans: pd.DataFrame,
    slopes: Mapping[str, float],
    recipe: Mapping[str, Any],
    probe: Mapping[str, Any] | None,
    low: float = 0.1,
    high: float = 0.9,
) -> str:
    """Panel (b)'s "what it shows" and "the constant" paragraphs, from the U-Net table, its transitions
    and slopes (:func:`phase_transition.unet_slopes`); ``recipe``: steps, batch, kimg, paper_lo,
    paper_hi, paper_steps, paper_batch, paper_factor; ``probe``: d, steps, star, main_star, off,
    main_off (the training-length probe) or None."""
    small, large = unet[unet.ratio == unet.ratio.min()], unet[unet.ratio == unet.ratio.max()]
    gs, gl = small.groupby("d").gl.mean(), large.groupby("d").gl.mean()
    off = large.groupby("d").off_subspace.median()
    copies = (
        "copies its training points" if gs.max() <= low else f"does not copy at every d (GL above {low:g})"
    )
    novel = (
        "makes samples that copy no training point"
        if gl.min() >= high
        else f"still copies (GL below {high:g})"
    )
    s, lo, hi = slopes["slope"], slopes["slope_low"], slopes["slope_high"]
    e, elo, ehi = slopes["exponent"], slopes["exponent_low"], slopes["exponent_high"]
    if ehi < 1 - 1e-6:
        shape = "slower than linear"
    elif elo > 1 + 1e-6:
        shape = "faster than linear"
    else:
        shape = "consistent with linear"
    grows = "grows with d" if elo > 0 else "does not clearly grow with d"
    t = trans.sort_values("d")
    first = (
        f"**What it shows.** With the fewest samples (N_k = {unet.ratio.min():g} d) the U-Net {copies}: "
        f"GL is {gs.min():.3f}-{gs.max():.3f} over the d's (mean over seeds). With the most (N_k = "
        f"{unet.ratio.max():g} d) it {novel} (GL at least {gl.min():.2f}). GL counts non-copies, not correct "
        f"samples: those samples lie off the subspaces by a median relative distance of {off.min():.2f}-"
        f"{off.max():.2f} (0 for the mixture's own points). The transition N_k* {grows}: the fit N_k* = c d "
        f"gives c = {s:.2f} (95 % bootstrap interval {lo:.2f}-{hi:.2f}, resampling the training seeds). The "
        f"growth is {shape}: the log-log exponent of N_k* in d is {e:.2f} ({elo:.2f}-{ehi:.2f}), and N_k*/d "
        f"goes from {t.nk_star_over_d.iloc[0]:.1f} at d = {int(t.d.iloc[0])} to "
        f"{t.nk_star_over_d.iloc[-1]:.1f} at d = {int(t.d.iloc[-1])}."
    )
    r = recipe
    second = (
        f"**The constant.** P2 reports N_k ~ {r['paper_lo']:.0f}-{r['paper_hi']:.0f} d for its U-Nets; "
        f"this one sits at {s:.1f} d. Where the transition sits depends on how hard the model can "
        "memorize: it is a race between fitting the training points and generalizing. The companion "
        f"trains a small U-Net for {r['steps']} steps of {r['batch']} samples ({r['kimg']:.0f} kimg); "
        f"the paper trains the authors' DDPM++ for {r['paper_steps']} steps of {r['paper_batch']} (the "
        f"`paper` profile), {r['paper_factor']:.0f} times as many noisy samples, on a far larger network."
    )
    if probe is not None and np.isfinite(probe["star"]) and np.isfinite(probe["main_star"]):
        closer = "closer to" if probe["off"] < probe["main_off"] else "no closer to"
        verdict = _length_verdict(probe["star"], probe["main_star"], probe["steps"], r["steps"])
        second += (
            f" The training-length probe measures the direction of the effect at d = {probe['d']}: trained "
            f"for {probe['steps']} steps instead of {r['steps']}, the same U-Net reaches GL = 0.5 at N_k* = "
            f"{probe['star']:.1f} instead of {probe['main_star']:.1f}, and its samples lie {closer} the "
            f"subspaces (median off-subspace distance {probe['off']:.2f} against {probe['main_off']:.2f} on "
            f"the same N_k). {verdict}; "
            "the growth with d is the part of the claim that a CPU-sized model can test."
        )
    return first + "\n\n" + second


def _length_verdict(star: float, main_star: float, steps: int, main_steps: int) -> str:
    """How training for ``steps`` instead of ``main_steps`` moved the transition N_k*."""
    how = "longer" if steps > main_steps else "shorter"
    if star == main_star:
        return f"Training {how} does not move the transition"
    where = "up" if star > main_star else "down"
    toward = ", towards the paper's constant" if where == "up" else ""
    return f"Training {how} moves the transition {where}{toward}"
