"""Result rows that figure notebooks write for the book's summary table (one JSON per notebook).

A row holds a ``measured`` value (of whatever profile ran) beside the ``paper``'s. A checked row also
has a ``kind``: a *sanity* check is true by construction when the code is right (it tests the code);
a *phenomenon* check states the paper's claim, with its threshold taken from the claim, and reports
its ``margin`` in units of the measurement's standard error (positive: on the passing side).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

KINDS = ("sanity", "phenomenon")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def _finite_or_text(x: Any) -> Any:
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def row(
    quantity: str,
    setting: str,
    measured: Any,
    paper: Any = None,
    check: str | None = None,
    passed: bool | None = None,
    note: str = "",
    kind: str | None = None,
    margin: float | None = None,
) -> dict[str, Any]:
    """One comparison: a ``measured`` value beside the ``paper``'s, with an optional check of ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    return {
        "quantity": quantity,
        "setting": setting,
        "measured": _finite_or_text(measured),
        "paper": paper,
        "check": check,
        "passed": None if passed is None else bool(passed),
        "kind": kind,
        "margin": None if margin is None else _finite_or_text(round(float(margin), 2)),
        "note": note,
    }


def check(
    quantity: str,                # what is measured, e.g. "GL at the smallest N"
    setting: str,                 # where, e.g. "width 32, N = 16"
    value: float,                 # the measured value
    op: str,                      # '>=', '<=', '>' or '<': how the value must compare with the threshold
    threshold: float,             # from the paper's claim (phenomenon) or from construction (sanity)
    se: float | None = None,      # standard error of ``value``; gives the margin in standard errors
    kind: str = "phenomenon",
    paper: Any = None,
    note: str = "",
    digits: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """A checked row: passed = ``value op threshold``; margin = signed distance to the threshold / se."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    value = float(value)
    passed = bool(_OPS[op](value, threshold)) if math.isfinite(value) else False
    margin = None
    if se is not None and math.isfinite(value):
        gap = value - threshold if op in (">=", ">") else threshold - value
        margin = gap / se if se > 0 else None  # no spread measured: no margin
    if se is not None and math.isfinite(se):
        note = f"se {se:.{digits}f}" + (f"; {note}" if note else "")
    return row(
        quantity,
        setting,
        round(value, digits),
        paper,
        check=f"{op} {threshold:g}",
        passed=passed,
        note=note,
        kind=kind,
        margin=margin,
    )


def write_results(
    path: str | os.PathLike | None, notebook: str, profile: str, rows: list[dict]
) -> Path | None:
    """Write ``rows`` to ``path`` (atomically); a falsy ``path`` writes nothing and returns None."""
    if not path:
        return None
    doc = {
        "notebook": notebook,
        "profile": profile,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    return atomic_write_text(path, json.dumps(doc, indent=1, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} to a results file")


def load_results(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """All results files in ``folder``, sorted by notebook name; a bad file is a clear error."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid results file ({e})") from None
        if not isinstance(doc, dict) or "rows" not in doc or "notebook" not in doc:
            raise ValueError(f"{path}: results file lacks 'notebook' or 'rows'")
        out.append(doc)
    return out


def _verdict(r: dict[str, Any]) -> str:
    if r.get("passed") is None:
        return "\u2014"
    if r.get("kind") == "phenomenon":
        return "shown" if r["passed"] else "not shown"
    return "pass" if r["passed"] else "FAIL"


def checks_table(rows: list[dict[str, Any]]):
    """The checked rows as a DataFrame: kind, quantity, setting, measured, paper, check, result, margin
    (in standard errors), note; sanity checks first."""
    import pandas as pd

    checked = [r for r in rows if r.get("passed") is not None]
    table = pd.DataFrame(
        [
            {
                "kind": r.get("kind"),
                "quantity": r["quantity"],
                "setting": r["setting"],
                "measured": r["measured"],
                "paper": r.get("paper"),
                "check": r.get("check"),
                "result": _verdict(r),
                "margin (se)": r.get("margin"),
                "note": r.get("note", ""),
            }
            for r in checked
        ]
    )
    if table.empty:
        return table
    order = {k: i for i, k in enumerate(KINDS)}
    return table.sort_values("kind", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def findings(rows: list[dict[str, Any]]) -> str:
    """Markdown: how many sanity checks passed and which phenomena were shown or not, with numbers."""
    sanity = [r for r in rows if r.get("kind") == "sanity" and r.get("passed") is not None]
    pheno = [r for r in rows if r.get("kind") == "phenomenon" and r.get("passed") is not None]
    lines = [
        f"**Sanity checks: {sum(r['passed'] for r in sanity)} of {len(sanity)} pass.** "
        f"**Phenomena: {sum(r['passed'] for r in pheno)} of {len(pheno)} shown at this profile's scale.**",
        "",
    ]
    for r in sanity:
        if not r["passed"]:
            lines.append(
                f"- sanity check FAILED: {r['quantity']} ({r['setting']}): {r['measured']} ({r['check']})"
            )
    for r in pheno:
        margin = "" if r.get("margin") is None else f", margin {r['margin']} se"
        paper = "" if r.get("paper") is None else f"; paper: {r['paper']}"
        lines.append(
            f"- **{_verdict(r)}**: {r['quantity']} ({r['setting']}): {r['measured']} "
            f"(wanted {r['check']}{margin}){paper}"
        )
    return "\n".join(lines)
