"""Jobs for the multi-process run-store tests (tests/test_runs.py): each is started as its own process.

    python tests/store_jobs.py grid ROOT OUT LEASE CONFIGS_JSON [WORKERS]

runs ``RunStore(ROOT).run_grid`` over the configs with :func:`counted_cell` and writes the results
(or the error) to OUT as JSON. Every computation appends one line ``<key> <pid>`` to the config's
``log`` file (O_APPEND, one write, so lines of concurrent processes never mix). A config may ask
the cell to sleep, to use its work folder, to say it started (``"started"``: a file to write), or to
hang (``"hang_until"``: until that file exists).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbhelpers import runs  # noqa: E402


def counted_cell(config, staging):
    """Log the computation, optionally use the work folder like a resumable training, sleep, return."""
    log = Path(config["log"])
    key = runs.config_key(config)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{key} {os.getpid()}\n".encode())
    os.close(fd)
    inherited = []
    if config.get("work"):
        work = runs.work_dir(staging, config)
        inherited = sorted(p.name for p in work.glob("dump-*")) if work.is_dir() else []
        work.mkdir(parents=True, exist_ok=True)
        for step in range(config.get("steps", 1)):
            (work / f"dump-{step}-{os.getpid()}").write_text("state")
            if config.get("started"):
                Path(config["started"]).write_text(str(os.getpid()))
            time.sleep(config.get("sleep", 0.0))
            mine = sorted(work.glob(f"dump-*-{os.getpid()}"))
            assert len(mine) == step + 1, f"work folder {work} lost this job's dumps"
    else:
        if config.get("started"):
            Path(config["started"]).write_text(str(os.getpid()))
        time.sleep(config.get("sleep", 0.0))
    while config.get("hang_until") and not Path(config["hang_until"]).exists():
        time.sleep(0.05)
    return {"n": config["n"], "pid": os.getpid(), "inherited": inherited}, None


def make_store(root: str, lease: float) -> runs.RunStore:
    if "lease" in inspect.signature(runs.RunStore).parameters:
        return runs.RunStore(root, lease=lease)
    return runs.RunStore(root)  # the store as it was before claims (for checking regression tests)


def main(argv: list[str]) -> int:
    _, root, out, lease, configs, *rest = argv
    import store_jobs  # the cell function by its module name, so that worker processes find it

    store = make_store(root, float(lease))
    try:
        results = store.run_grid(
            json.loads(configs), store_jobs.counted_cell, workers=int(rest[0]) if rest else 1
        )
        payload = {"results": [{k: r[k] for k in ("n", "pid", "inherited")} for r in results]}
    except Exception as e:  # reported to the test, which asserts on it
        payload = {"error": f"{type(e).__name__}: {e}"}
    Path(out).write_text(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
