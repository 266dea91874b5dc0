"""Snapshots never collide, a resume continues only the same run, leftovers of killed writes are
cleaned, and atomic writes are fsynced (issue 13, part 3)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbhelpers import atomic
from nbhelpers.checkpoints import load_network
from nbhelpers.cli import main
from nbhelpers.training import TrainConfig, snapshot_path, train

TINY = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)


def config(**kw) -> TrainConfig:
    d = dict(arch="ddpmpp", precond="edm", network=dict(TINY), batch_size=16, total_steps=4, lr=2e-3,
             lr_rampup_kimg=0, ema_beta=0.9, log_every=2)  # fmt: skip
    d.update(kw)
    return TrainConfig(**d)


def data(seed: int = 0, n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def run(cfg, x, **kw):
    return train(cfg, x, device="cpu", progress=False, **kw)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---------------------------------------------------------------- snapshots


def test_snapshots_of_distinct_steps_have_distinct_names(tmp_path):
    """Named by nimg // 1000, the snapshots of steps 10 and 20 at batch 16 were one file (the
    jacobian_rank ci case loaded the step-20 EMA as 'step 10')."""
    assert snapshot_path(tmp_path, 10 * 16) != snapshot_path(tmp_path, 20 * 16)
    assert len({snapshot_path(tmp_path, n) for n in range(0, 5000, 16)}) == len(range(0, 5000, 16))
    x = data()
    run(config(total_steps=4, snapshot_steps=2), x, outdir=tmp_path / "run")
    snaps = sorted((tmp_path / "run").glob("network-snapshot-*.nbh"))
    assert [p.name for p in snaps] == [snapshot_path(".", 32).name, snapshot_path(".", 64).name]
    short = run(config(total_steps=2), x)
    assert same(load_network(snapshot_path(tmp_path / "run", 2 * 16)), short.ema)


# ---------------------------------------------------------------- resume guard


def test_resume_refuses_other_data_and_changed_options(tmp_path):
    x, other = data(0), data(1)
    out = tmp_path / "run"
    run(config(total_steps=2, state_dump_steps=2), x, outdir=out)
    options = (out / "training_options.json").read_text()
    with pytest.raises(ValueError, match=r"training-state-000000002\.pt.*data"):
        run(config(total_steps=4, state_dump_steps=2), other, outdir=out, resume="latest")
    with pytest.raises(ValueError, match=r"lr: 0\.002 -> 0\.001.*allow_changed"):
        run(config(total_steps=4, state_dump_steps=2, lr=1e-3), x, outdir=out, resume="latest")
    with pytest.raises(ValueError, match="network"):
        run(config(total_steps=4, network=dict(TINY, model_channels=16)), x, outdir=out, resume="latest")
    assert (out / "training_options.json").read_text() == options  # a refused resume wrote nothing
    # Longer training, other log/snapshot intervals: the same run, allowed.
    longer = run(config(total_steps=4, state_dump_steps=2, log_every=1), x, outdir=out, resume="latest")
    assert same(longer.ema, run(config(total_steps=4), x).ema)
    # A deliberate change, named: allowed.
    changed = run(config(total_steps=6, lr=1e-3), x, outdir=out, resume="latest", allow_changed=["lr"])
    assert changed.steps == 6
    with pytest.raises(ValueError, match="unknown option"):
        run(config(total_steps=6), x, outdir=out, resume="latest", allow_changed=["learning_rate"])


def _images(folder, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def test_cli_resume_latest_picks_the_run_of_the_same_data(tmp_path, capsys):
    for name, n in (("d8", 8), ("d4", 4)):
        _images(tmp_path / name, n, seed=n)
    common = ["--outdir", tmp_path / "training", "--arch", "ddpmpp", "--precond", "edm", "--cbase", "8",
              "--cres", "1", "--num_blocks", "1", "--attn", "", "--dropout", "0", "--augment", "0",
              "--lr-rampup", "0", "--batch", "4", "--tick", "0.004", "--snap", "1", "--dump", "1",
              "--device", "cpu"]  # fmt: skip
    args = lambda data, duration, *more: [
        "train",
        "--data",
        tmp_path / data,
        "--duration",
        duration,
        *common,
        *more,
    ]  # noqa: E731
    assert main([str(a) for a in args("d8", "0.000008")]) == 0
    assert main([str(a) for a in args("d4", "0.000008")]) == 0
    runs = sorted((tmp_path / "training").iterdir())
    d4_options = (runs[1] / "training_options.json").read_text()
    assert main([str(a) for a in args("d8", "0.000016", "--resume", "latest")]) == 0
    assert (runs[1] / "training_options.json").read_text() == d4_options  # the d4 run was not touched
    stats = [json.loads(s) for s in (runs[0] / "stats.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in stats) == 4 and "d8" in runs[0].name
    capsys.readouterr()
    # A changed learning rate needs --allow-changed; --resume PATH continues in PATH's folder.
    code = main([str(a) for a in args("d8", "0.000024", "--resume", "latest", "--lr", "0.01")])
    err = capsys.readouterr().err
    assert code == 2 and "lr" in err and "--allow-changed" in err and len(err.strip().splitlines()) == 1
    dump = sorted(runs[0].glob("training-state-*.pt"))[-1]
    assert (
        main(
            [
                str(a)
                for a in args("d8", "0.000024", "--resume", dump, "--lr", "0.01", "--allow-changed", "lr")
            ]
        )
        == 0
    )
    assert sorted((tmp_path / "training").iterdir()) == runs  # no new run folder
    code = main([str(a) for a in args("d4", "0.000024", "--resume", dump)])
    assert code == 2 and "data" in capsys.readouterr().err


# ---------------------------------------------------------------- leftovers and fsync


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_tmp_files_of_killed_writers_are_removed(tmp_path):
    host = atomic._HOST
    out = tmp_path / "run"
    out.mkdir()
    dead = out / f".tmp-network-snapshot-0000000032.nbh-@{host}@{_dead_pid()}@abcd1234.nbh"
    mine = out / f".tmp-stats.jsonl-@{host}@{os.getpid()}@abcd1234.jsonl"
    elsewhere = out / ".tmp-x.pt-@otherhost@1@abcd1234.pt"
    ancient = out / ".tmp-y.pt-@otherhost@2@abcd1234.pt"
    folder = out / ".tmp-somekey-abcd1234"  # a run store's staging folder: never touched here
    folder.mkdir()
    for p in (dead, mine, elsewhere, ancient):
        p.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    os.utime(ancient, (old - 2 * 86400, old - 2 * 86400))
    run(config(total_steps=2), data(), outdir=out)
    left = {p.name for p in out.iterdir()}
    assert dead.name not in left and ancient.name not in left
    assert {mine.name, elsewhere.name, folder.name} <= left


def _killed_writer(script: str, leftovers: Path) -> Path:
    """Run ``script`` (which dies with os._exit) in a child and return its one leftover matching the
    glob ``leftovers``, aged ten minutes (past the grace period for a dead writer's files)."""
    env = dict(os.environ, PYTHONPATH=str(os.path.dirname(os.path.dirname(__file__))))
    subprocess.run(["python", "-c", script], env=env, check=False)
    (leftover,) = leftovers.parent.glob(leftovers.name)
    past = time.time() - 600
    os.utime(leftover, (past, past))
    return leftover


def test_a_killed_snapshot_write_leaves_a_file_the_next_run_removes(tmp_path):
    """A writer killed between creating its temporary file and the rename leaves ``.tmp-*``."""
    out = tmp_path / "run"
    script = (
        "import os, sys\n"
        "from nbhelpers.atomic import atomic_path\n"
        f"with atomic_path({str(out / 'network-snapshot-0000000032.nbh')!r}) as tmp:\n"
        "    tmp.write_bytes(b'half')\n"
        "    os._exit(9)\n"
    )
    _killed_writer(script, out / ".tmp-*")
    run(config(total_steps=2), data(), outdir=out)
    assert not list(out.glob(".tmp-*"))


def test_a_killed_dataset_write_leaves_a_staging_folder_the_next_write_removes(tmp_path):
    """write_dataset builds a folder data set in a marked staging folder; a kill leaves it behind,
    and the next write beside it removes it (a live writer's folder stays)."""
    import numpy as np

    from nbhelpers.data import write_dataset

    dest = tmp_path / "images"
    script = (
        "import os\n"
        "from nbhelpers.atomic import staging_dir\n"
        f"d = staging_dir({str(dest)!r})\n"
        "(d / '00000000.png').write_bytes(b'half')\n"
        "os._exit(9)\n"
    )
    leftover = _killed_writer(script, tmp_path / ".tmp-images-*")
    live = atomic.staging_dir(tmp_path / "other")  # this process's: not stale
    write_dataset(np.zeros((2, 1, 4, 4), np.uint8), dest)
    assert not leftover.exists() and live.exists()
    assert len(list(dest.rglob("*.png"))) == 2 and (dest / "dataset.json").is_file()


def test_atomic_path_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", record)
    atomic.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert len(synced) == 2
    assert os.path.basename(synced[0]).startswith(".tmp-a.txt") and synced[1] == str(tmp_path / "sub")
