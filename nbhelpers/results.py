"""Result rows that figure notebooks write for the book's summary table (one JSON per notebook).

A row holds a ``measured`` value (of whatever profile ran) beside the ``paper``'s. A checked row also
has a ``kind``: a *sanity* check is true by construction when the code is right (it tests the code);
a *phenomenon* check states the paper's claim, with its threshold taken from the claim, and reports
its ``margin`` in units of the measurement's standard error (positive: on the passing side).
"""

from __future__ import annotations

import datetime as _dt
import html
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
    if passed is not None and kind is None:
        raise ValueError(f"{quantity!r}: a checked row needs a kind ({' or '.join(KINDS)})")
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
    gap = (value - threshold if op in (">=", ">") else threshold - value) if math.isfinite(value) else None
    if se is not None and gap is not None:
        margin = gap / se if se > 0 else None  # no spread measured: no margin
    if se is not None and math.isfinite(se):
        note = f"se {se:.{digits}f}" + (f"; {note}" if note else "")
    elif gap is not None:  # no standard error: the margin in the value's own units
        note = f"margin {gap:+.{digits}g} (no se)" + (f"; {note}" if note else "")
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


_REQUIRED_KEYS = ("notebook", "profile", "rows")


def read_results(path: str | os.PathLike) -> tuple[dict | None, str | None]:
    """One results file: (content, None), or (None, the problem in words) for a bad file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        return None, f"cannot be read ({type(exc).__name__}: {exc})"
    if (
        not isinstance(data, dict)
        or any(k not in data for k in _REQUIRED_KEYS)
        or not isinstance(data["rows"], list)
    ):
        return None, "is not a results file (expected the keys " + ", ".join(_REQUIRED_KEYS) + ")"
    bad = [i for i, r in enumerate(data["rows"]) if not isinstance(r, dict) or "quantity" not in r]
    if bad:
        return None, f"has malformed rows (index {', '.join(map(str, bad))})"
    return data, None


def load_results(
    folder: str | os.PathLike, notebooks: list[str] | None = None, profile: str | None = None
) -> tuple[dict[str, dict], list[str]]:
    """The results files in ``folder`` by notebook (``notebooks`` first, in order, then any others),
    and a Markdown line per problem: a missing or unreadable file, or one of another ``profile``."""
    folder = Path(folder)
    found = {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    results, problems = {}, []
    for name in list(notebooks or []) + [n for n in found if n not in (notebooks or [])]:
        path = folder / f"{name}.json"
        if name not in found:
            problems.append(
                f"- **{name}**: no results file (`{path}`). Execute the notebook with "
                f"`python tools/build_book.py execute --notebooks {name}`, which also refreshes this page."
            )
            continue
        data, problem = read_results(path)
        if problem:
            problems.append(f"- **{name}**: `{path}` {problem}. Re-execute the notebook to rewrite it.")
            continue
        if profile is not None and data["profile"] != profile:
            problems.append(
                f"- **{name}**: `{path}` holds results of the `{data['profile']}` profile, not `{profile}`."
            )
        results[name] = data
    return results, problems


def summary_headline(results: dict[str, dict], problems: list[str]) -> str:
    """Markdown: how many numbers, and the sanity and phenomenon checks counted apart."""
    rows = [r for d in results.values() for r in d["rows"]]
    lines = [f"**{len(rows)} numbers from {len(results)} notebook(s).**"]
    for kind, ok, bad, what in (
        ("sanity", "pass", "FAIL", "Sanity checks"),
        ("phenomenon", "shown", "not shown", "Phenomenon checks"),
    ):
        checked = [r for r in rows if r.get("kind") == kind and r.get("passed") is not None]
        good = sum(bool(r["passed"]) for r in checked)
        failed = f", {len(checked) - good} {bad}" if good < len(checked) else ""
        lines.append(f"**{what}: {good} of {len(checked)} {ok}{failed}.**")
    other = [r for r in rows if r.get("kind") not in KINDS and r.get("passed") is not None]
    if other:
        good = sum(bool(r["passed"]) for r in other)
        lines.append(
            f"Unclassified checks: {good} of {len(other)} passed"
            + (f", {len(other) - good} failed." if good < len(other) else ".")
        )
    text = " ".join(lines)
    return text + ("\n\nNot in the table:\n\n" + "\n".join(problems) if problems else "")


def _fmt(value: Any) -> str:
    """A value as shown in the summary: numbers to three significant digits, a dash for none."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def summary_html(results: dict[str, dict], profile: str) -> str:
    """The summary table as HTML: five columns that fit a page; each notebook heads its rows, the
    setting sits under the quantity, and each check carries its verdict and margin."""

    def cell(v: Any) -> str:
        return html.escape(str(v))

    def check_cell(r: dict) -> str:
        verdict = _verdict(r)
        css = "nbh-pass" if verdict in ("pass", "shown") else "nbh-fail"
        badge = f'<span class="{css}">{cell(verdict)}</span>' if r.get("passed") is not None else ""
        margin = f" ({r['margin']:+} se)" if isinstance(r.get("margin"), (int, float)) else ""
        return " ".join(p for p in (cell(r.get("check") or ""), badge + margin) if p) or "\u2014"

    widths = ["30%", "13%", "16%", "18%", "23%"]
    head = ["Quantity (setting)", f"This run<br>({cell(profile)})", "Paper", "Check", "Note"]
    parts = [
        '<table class="nbh-summary"><colgroup>',
        *[f'<col style="width: {w}">' for w in widths],
        "</colgroup>",
        "<thead><tr>",
        *[f"<th>{h}</th>" for h in head],
        "</tr></thead><tbody>",
    ]
    for name, data in results.items():
        parts.append(f'<tr class="nbh-group"><th colspan="{len(head)}">{cell(name)}</th></tr>')
        for r in data["rows"]:
            setting = r.get("setting") or ""
            kind = f'<span class="nbh-setting">{cell(r["kind"])} check</span>' if r.get("kind") else ""
            parts.append(
                "<tr>"
                f"<td>{cell(r.get('quantity', ''))}"
                + (f'<span class="nbh-setting">{cell(setting)}</span>' if setting else "")
                + kind
                + f"</td><td>{cell(_fmt(r.get('measured')))}</td><td>{cell(_fmt(r.get('paper')))}</td>"
                f"<td>{check_cell(r)}</td><td>{cell(r.get('note') or '')}</td></tr>"
            )
    parts.append("</tbody></table>")
    return "".join(parts)


def _verdict(r: dict[str, Any]) -> str:
    if r.get("passed") is None:
        return "\u2014"
    if r.get("kind") == "phenomenon":
        return "shown" if r["passed"] else "not shown"
    return "pass" if r["passed"] else "FAIL"


def checks_table(rows: list[dict[str, Any]]):
    """The checked rows as a DataFrame: kind, quantity, setting, measured, paper, check, result, margin
    (in standard errors), note; sanity checks first."""
    import pandas as pd  # slow to import; only the tables need it

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
        note = str(r.get("note") or "")
        if r.get("margin") is not None:
            margin = f", margin {r['margin']} se"
        elif note.startswith("margin "):  # a check without se: its margin in the value's units
            margin = ", " + note.split(";")[0]
        else:
            margin = ""
        paper = "" if r.get("paper") is None else f"; paper: {r['paper']}"
        lines.append(
            f"- **{_verdict(r)}**: {r['quantity']} ({r['setting']}): {r['measured']} "
            f"(wanted {r['check']}{margin}){paper}"
        )
    return "\n".join(lines)
