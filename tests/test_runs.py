"""The run store shared by several jobs: claims with leases, takeover of a killed job's cell, private
work folders, waiting for cells other jobs hold, cleaning of dead leftovers, modes, compact progress.

The concurrency tests start real processes (tests/store_jobs.py) on one store and count computations
in a log file that every computation appends one line to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import store_jobs  # noqa: E402

from nbhelpers import runs  # noqa: E402

JOBS = Path(__file__).resolve().parent / "store_jobs.py"


def _cells(log: Path, ns, **extra) -> list[dict]:
    return [{"kind": "counted", "n": n, "log": str(log), **extra} for n in ns]


def _start(root: Path, name: str, configs: list[dict], lease: float = 1.0) -> tuple[subprocess.Popen, Path]:
    out = root.parent / f"{name}.json"
    cmd = [sys.executable, str(JOBS), "grid", str(root), str(out), str(lease), json.dumps(configs)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 60) -> dict:
    stdout, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout
    payload = json.loads(out.read_text())
    assert "error" not in payload, f"{payload['error']}\n{stdout}"
    return payload | {"stdout": stdout}


def _computations(log: Path) -> Counter:
    return Counter(line.split()[0] for line in log.read_text().splitlines()) if log.exists() else Counter()


def _wait_for(path: Path, timeout: float = 30) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".work-")))


# ----------------------------------------------------------------------------------------------
# Several jobs on one store


def test_three_jobs_on_one_grid_compute_each_cell_exactly_once(tmp_path):
    # Before claims, 2 jobs on 60 cells computed 40 of them twice; here 3 jobs start on 12 cells at once.
    root, log = tmp_path / "runs", tmp_path / "computations.log"
    grid = _cells(log, range(12), sleep=0.08)
    orders = [grid, grid, grid[::-1]]  # two jobs in step, one from the other end
    jobs = [_start(root, f"job{i}", order) for i, order in enumerate(orders)]
    done = [_finish(*job) for job in jobs]
    counts = _computations(log)
    assert sorted(counts) == sorted(runs.config_key(c) for c in grid)
    assert set(counts.values()) == {1}, f"cells computed more than once: {counts}"
    for order, d in zip(orders, done):  # every job returns every cell, in its own order
        assert [r["n"] for r in d["results"]] == [c["n"] for c in order]
    assert not _leftovers(root)


def test_a_second_job_waits_instead_of_sharing_the_first_jobs_work_folder(tmp_path):
    # Before: both jobs used .work-<key>, and the first commit deleted it under the second (a crash).
    # The cell computes for 1.2 s on a 0.5 s lease: the holder must renew it to keep the cell.
    root, log = tmp_path / "runs", tmp_path / "computations.log"
    started = tmp_path / "started"
    cell = _cells(log, [0], work=True, steps=8, sleep=0.15, started=str(started))
    first = _start(root, "first", cell, lease=0.5)
    _wait_for(started)
    second = _start(root, "second", cell, lease=0.5)
    a, b = _finish(*first), _finish(*second)
    assert sum(_computations(log).values()) == 1
    assert a["results"] == b["results"]  # the second loaded what the first stored
    assert "1 computed by other jobs" in b["stdout"].splitlines()[-1]
    assert not _leftovers(root)


def test_a_job_waits_for_cells_a_live_job_holds_and_returns_all_in_order(tmp_path, capsys):
    root, log = tmp_path / "runs", tmp_path / "computations.log"
    started = tmp_path / "started"
    slow = _cells(log, [0], sleep=1.0, started=str(started))
    grid = slow + _cells(log, [1, 2, 3])
    other = _start(root, "other", slow, lease=0.3)  # renews its 0.3 s lease while computing 1 s
    _wait_for(started)
    store = runs.RunStore(root, lease=0.3)
    with pytest.raises(runs.CellsHeldError, match=f"pid {other[0].pid}") as err:
        store.run_grid(grid[:1], store_jobs.counted_cell, timeout=0.1, progress=False)
    assert list(err.value.held) == [runs.config_key(slow[0])]
    results = store.run_grid(grid, store_jobs.counted_cell, timeout=30)
    assert [r["n"] for r in results] == [0, 1, 2, 3]
    assert results[0]["pid"] == other[0].pid  # computed by the other job, loaded here
    _finish(*other)
    assert set(_computations(log).values()) == {1}
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("4 cells: 0 loaded, 3 computed, 1 computed by other jobs"), lines
    assert any(ln.startswith("waiting for 1 cell(s) held by other jobs") for ln in lines)


def test_a_killed_jobs_cell_is_taken_over_at_once_here_and_inherits_its_dumps(tmp_path):
    root, log = tmp_path / "runs", tmp_path / "computations.log"
    started = tmp_path / "started"
    (cell,) = _cells(log, [0], work=True, started=str(started), hang_until=str(tmp_path / "go"))
    proc, _ = _start(root, "killed", [cell], lease=60)
    _wait_for(started)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "go").touch()
    assert _leftovers(root)  # its staging and work folders, and a claim whose lease runs a minute
    t0 = time.time()
    result = runs.RunStore(root, lease=60).run(cell, store_jobs.counted_cell, timeout=10)
    assert time.time() - t0 < 10  # the dead pid is seen at once on the same machine
    assert result["inherited"] == [f"dump-0-{proc.pid}"]  # the killed job's dumps, in this job's work folder
    assert not _leftovers(root)


def test_a_dead_remote_jobs_claim_is_taken_over_when_its_lease_ends(tmp_path, monkeypatch):
    from nbhelpers import claims

    root, log = tmp_path / "runs", tmp_path / "computations.log"
    started = tmp_path / "started"
    (cell,) = _cells(log, [0], work=True, started=str(started), hang_until=str(tmp_path / "go"))
    proc, _ = _start(root, "killed", [cell], lease=1.0)
    _wait_for(started)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "go").touch()
    monkeypatch.setattr(claims, "machine_id", lambda: "another-node")  # the pid cannot be checked from here
    store = runs.RunStore(root, lease=1.0)
    expires = store.claims.current(runs.config_key(cell)).expires
    with pytest.raises(runs.CellsHeldError, match=f"pid {proc.pid}"):
        store.run(cell, store_jobs.counted_cell, timeout=0.1)
    result = store.run(cell, store_jobs.counted_cell, timeout=30)
    assert time.time() >= expires
    assert result["inherited"] == [f"dump-0-{proc.pid}"]
    assert sum(_computations(log).values()) == 2  # the killed attempt and the takeover
    assert not _leftovers(root)


# ----------------------------------------------------------------------------------------------
# Claims


def test_claims_one_live_holder_release_expiry_and_takeover(tmp_path):
    from nbhelpers import claims

    a, b = claims.Claims(tmp_path, lease=0.3), claims.Claims(tmp_path, lease=0.3)
    first = a.acquire("cell")
    assert first is not None and b.acquire("cell") is None
    assert a.current("cell").token == first.token and a.current("cell").live()
    time.sleep(0.45)  # the heartbeat keeps the lease alive past its length
    assert b.acquire("cell") is None
    first.release()
    second = b.acquire("cell")
    assert second is not None and second.generation == first.generation + 1
    second._stop.set()  # a holder that stops renewing (suspended): its lease runs out
    time.sleep(0.35)
    third = a.acquire("cell")
    assert third is not None and third.generation == second.generation + 1
    assert not second.renew() and second.lost  # the suspended holder learns it lost the claim
    third.release("done")
    assert a.current("cell").state == "done" and not a.current("cell").live()
    assert [h.generation for h in a.holders("cell")] == [0, 1, 2]


RACE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from nbhelpers import claims
c = claims.Claims(sys.argv[2], lease=5)
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
claim = c.acquire("cell")
print("won" if claim else "lost", flush=True)
time.sleep(0.5)
"""


def test_racing_jobs_take_an_expired_claim_over_exactly_once(tmp_path):
    from nbhelpers import claims

    stale = claims.Claims(tmp_path, lease=0.2).acquire("cell")
    stale._stop.set()  # its holder stops renewing: the lease runs out before the race starts
    at = time.time() + 1.0
    root = str(Path(__file__).resolve().parent.parent)
    argv = [sys.executable, "-c", RACE, root, str(tmp_path), str(at)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    said = sorted(p.communicate(timeout=30)[0].strip() for p in procs)
    assert said == ["lost", "lost", "lost", "won"]
    assert claims.Claims(tmp_path).generations("cell") == [0, 1]


def test_clean_removes_only_provably_dead_leftovers(tmp_path):
    store = runs.RunStore(tmp_path / "runs", lease=30)
    root = store.root
    key = lambda n: runs.config_key({"kind": "c", "n": n})
    live = store.claims.acquire(key(1))
    dead = store.claims.acquire(key(2))
    dead.release()  # a job that ended without storing its cell
    finished = {"kind": "c", "n": 3}
    with store.staging(finished) as tmp:
        store.commit(tmp, finished, {"ok": True})
    folders = {
        "live staging": f".tmp-{key(1)}-{live.token}",
        "live work": f".work-{key(1)}-{live.token}",
        "released staging": f".tmp-{key(2)}-{dead.token}",
        "dumps of an unfinished cell": f".work-{key(2)}-{dead.token}",
        "dumps of a finished cell": f".work-{key(3)}-0123456789abcdef",
        "young staging without claim": f".tmp-{key(4)}-abcdefgh",
        "old staging without claim": f".tmp-{key(5)}-abcdefgh",
    }
    for name in folders.values():
        (root / name).mkdir()
        (root / name / "f").write_text("x")
    (root / ".tmp-noise.npz-young.npz").write_text("x")
    (root / ".tmp-noise.npz-old.npz").write_text("x")
    two_days = time.time() - 2 * 86400
    for name in (folders["old staging without claim"], ".tmp-noise.npz-old.npz"):
        os.utime(root / name, (two_days, two_days))
    removed = {p.name for p in store.clean()}
    gone = {folders[k] for k in ("released staging", "dumps of a finished cell", "old staging without claim")}
    assert removed >= gone | {".tmp-noise.npz-old.npz"}
    kept = set(folders.values()) - gone | {".tmp-noise.npz-young.npz"}
    assert kept <= {p.name for p in root.iterdir()} and not kept & removed
    assert not (store.claims.folder / key(3)).exists()  # the claim folder of the finished cell
    live.release()


# ----------------------------------------------------------------------------------------------
# Modes and progress


def _square(config, staging):
    (staging / "sub").mkdir()
    (staging / "sub" / "note.txt").write_text("made")
    return {"sum": config["n"] ** 2}, {"x": [config["n"]]}


def test_cell_folders_and_files_are_group_readable(tmp_path):
    old = os.umask(0o077)
    try:
        store = runs.RunStore(tmp_path / "runs")
        store.run({"kind": "sq", "n": 3}, _square)
    finally:
        os.umask(old)
    cell = store.path({"kind": "sq", "n": 3})
    for path in [store.root, cell, cell / "sub"]:
        assert path.stat().st_mode & 0o750 == 0o750, f"{path}: {oct(path.stat().st_mode)}"
        assert path.stat().st_mode & 0o007 == 0  # the umask still rules for others
    for path in [cell / "result.json", cell / "config.json", cell / "arrays.npz", cell / "sub" / "note.txt"]:
        assert path.stat().st_mode & 0o640 == 0o640, f"{path}: {oct(path.stat().st_mode)}"


def test_progress_is_one_summary_line_and_per_cell_lines_only_when_verbose(tmp_path, capsys):
    store = runs.RunStore(tmp_path / "runs")
    grid = [{"kind": "sq", "n": n} for n in range(12)]
    store.run_grid(grid[:4], _square)
    capsys.readouterr()
    store.run_grid(grid, _square)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert "12 cells, 4 finished; running 8 with 1 worker(s)" in lines[0]
    assert lines[1].startswith("12 cells: 4 loaded, 8 computed; ")
    store.run_grid(grid, _square)
    assert capsys.readouterr().out.splitlines()[0].startswith("12 cells: 12 loaded, 0 computed; ")
    store.run_grid([{"kind": "sq", "n": n} for n in range(12, 15)], _square, verbose=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and sum(" computed (" in ln for ln in lines) == 3


def test_a_failing_cell_releases_its_claim_and_leaves_nothing(tmp_path):
    store = runs.RunStore(tmp_path / "runs", lease=30)
    cfg = {"kind": "sq", "n": 2}

    with pytest.raises(ZeroDivisionError):
        store.run(cfg, _divide_by_zero)
    assert not _leftovers(store.root)
    assert store.claims.current(runs.config_key(cfg)).state == "released"
    assert store.run(cfg, _square)["sum"] == 4  # the next attempt is not blocked by a stale claim


def _divide_by_zero(config, staging):
    (staging / "partial").write_text("half")
    return 1 / 0
