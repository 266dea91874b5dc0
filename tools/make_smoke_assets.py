"""Make the smoke profile's assets (EDM snapshots, a TorchScript SSCD stand-in, image sets) if absent.

    python tools/make_smoke_assets.py            # into $NBHELPERS_SMOKE_ASSETS or <repo>/.cache/smoke
    python tools/make_smoke_assets.py --force    # rebuild even when the manifest matches

``profiles.resolve`` makes them too when a notebook runs with ``profile = "smoke"``; this script does
it ahead of time (``make test``), so that parallel test workers find them ready.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbhelpers import smoke  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dir", type=Path, help="asset folder (default: $NBHELPERS_SMOKE_ASSETS or <repo>/.cache/smoke)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even when the assets are intact")
    a = p.parse_args(argv)
    folder = smoke.ensure_assets(a.dir, force=a.force)
    for name in smoke.FILES.values():
        print(folder / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
