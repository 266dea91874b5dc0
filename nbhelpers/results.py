"""Result rows that figure notebooks write for the book's summary table (one JSON per notebook)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text


def row(
    quantity: str,
    setting: str,
    companion: Any,
    paper: Any = None,
    check: str | None = None,
    passed: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One comparison: a computed ``companion`` value beside the ``paper``'s, with an optional check."""
    if isinstance(companion, float) and not math.isfinite(companion):
        companion = str(companion)
    return {
        "quantity": quantity,
        "setting": setting,
        "companion": companion,
        "paper": paper,
        "check": check,
        "passed": None if passed is None else bool(passed),
        "note": note,
    }


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
