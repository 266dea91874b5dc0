#!/usr/bin/env python
"""Check or record the code hash of every experiment module's VERSION.

    python tools/experiment_versions.py            # check: exit 1 and say what changed
    python tools/experiment_versions.py --update   # record the current hashes (after a VERSION bump,
                                                   # or for a change that cannot change any result)

A run-store cell's key includes its experiment's ``VERSION`` (each config carries it), so cells made
by older code are never reused once VERSION goes up. This file makes sure it goes up:
``tests/data/experiment_versions.json`` records, per module of ``nbhelpers/experiments/`` with a
VERSION, the hash of its code for each VERSION (``nbhelpers.provenance.code_hash``: the module and the
experiments modules it imports, without docstrings, comments or layout), and the test suite fails when
the code no longer matches the hash recorded for the current VERSION.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "tests" / "data" / "experiment_versions.json"
ABOUT = (
    "Code hash of each experiment module per VERSION (see tools/experiment_versions.py). A changed hash "
    "needs a VERSION bump (new run-store keys), or --update when no result can change."
)


def _provenance():
    try:
        from nbhelpers import provenance
    except ImportError:
        sys.path.insert(0, str(ROOT))
        from nbhelpers import provenance
    return provenance


def problems(recorded: dict, current: dict[str, tuple[int, str]], folder: Path) -> list[str]:
    """What is wrong between the recorded hashes and ``current`` (``{module: (VERSION, hash)}``)."""
    provenance = _provenance()
    out = []
    rel = lambda m: f"{folder.name}/{m}.py"
    for module, (version, digest) in sorted(current.items()):
        versions = recorded.get(module, {})
        known = [int(v) for v in versions]
        if known and version < max(known):
            out.append(
                f"{rel(module)}: VERSION {version} is below the "
                f"recorded VERSION {max(known)}; versions only go up"
            )
        elif str(version) not in versions:
            out.append(
                f"{rel(module)}: VERSION {version} has no recorded code hash: "
                "run `python tools/experiment_versions.py --update`"
            )
        elif versions[str(version)] != digest:
            deps = sorted(provenance.code_modules(module, folder) - {module})
            also = f" (or of what it imports: {', '.join(d + '.py' for d in deps)})" if deps else ""
            out.append(
                f"code of {rel(module)}{also} changed since VERSION {version} was recorded: bump VERSION, "
                "or run `python tools/experiment_versions.py --update` if results cannot change"
            )
    return out


def updated(recorded: dict, current: dict[str, tuple[int, str]]) -> dict:
    """``recorded`` with the current hash of each module's current VERSION (older versions kept)."""
    out = {m: dict(v) for m, v in recorded.items()}
    for module, (version, digest) in current.items():
        out.setdefault(module, {})[str(version)] = digest
    return {m: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for m, v in sorted(out.items())}


def load(path: Path = RECORD) -> dict:
    """The recorded hashes, ``{module: {version: hash}}`` (empty when the file does not exist)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("modules", {})


def save(modules: dict, path: Path = RECORD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"about": ABOUT, "modules": modules}, indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="record the current hashes")
    args = parser.parse_args(argv)
    provenance = _provenance()
    folder = provenance.EXPERIMENTS_DIR
    current = provenance.experiment_hashes(folder)
    recorded = load()
    if args.update:
        for p in problems(recorded, current, folder):
            if "versions only go up" in p:
                print(f"error: {p}", file=sys.stderr)
                return 2
        save(updated(recorded, current))
        print(f"recorded {len(current)} experiment modules in {RECORD.relative_to(ROOT)}")
        return 0
    found = problems(recorded, current, folder)
    for p in found:
        print(p, file=sys.stderr)
    if not found:
        print(f"{len(current)} experiment modules match their recorded code hashes")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
