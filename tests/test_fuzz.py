"""Fuzzing the checkpoint boundary: mutated and truncated EDM pickles and .nbh files, seeded.

Every case goes through the real command line (``nbhelpers generate --network CASE``) inside one
child process, so that a segfault is seen as the child's exit status. A case must either load
(exit 0) or be refused with exit 2 and a one-line message naming the file; never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from edm_files import TINY_VP, snapshot_bytes, tiny_net

from nbhelpers.checkpoints import save_network

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(TINY_VP, img_resolution=4, channel_mult=[1], attn_resolutions=[4], model_channels=8)

CHILD = textwrap.dedent(
    r"""
    import contextlib, io, json, random, sys, traceback, zipfile
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    from nbhelpers.cli import main

    root, count, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    bases = {ext: (root / f"base.{ext}").read_bytes() for ext in ("pkl", "nbh")}
    OPCODES = (
        b"().0123FGIJKLMNPQRSTUVXabcdeghijlopqrstu}]"
        b"\x80\x81\x82\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"
    )

    def mutate(data):
        b = bytearray(data)
        kind = rng.choice(["truncate", "flip", "special", "insert", "delete", "duplicate", "opcode"])
        pos = rng.randrange(len(b))
        if kind == "truncate":
            return kind, bytes(b[:pos])
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "special":
            value = rng.choice([b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80"])
            b[pos : pos + len(value)] = value
        elif kind == "insert":
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == "delete":
            del b[pos : pos + rng.randint(1, 16)]
        elif kind == "duplicate":
            n = rng.randint(1, 32)
            b[pos:pos] = b[pos : pos + n]
        else:
            b[pos] = rng.choice(OPCODES)
        return kind, bytes(b)

    def rezip(data, member, new):
        src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
        with zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                dst.writestr(info.filename, new if info.filename == member else src.read(info))
        return out.getvalue()

    def case(i):
        ext = "pkl" if i % 2 == 0 else "nbh"
        data = bases[ext]
        if ext == "pkl" or i % 6 == 1:
            kind, data = mutate(data)
            return ext, kind, data
        z = zipfile.ZipFile(io.BytesIO(data))
        if i % 6 == 3:  # a valid zip around a mutated config.json
            kind, new = mutate(z.read("config.json"))
            return ext, "config-" + kind, rezip(data, "config.json", new)
        weights = z.read("weights.pt")  # a valid zip around a valid torch zip around a mutated data.pkl
        inner = zipfile.ZipFile(io.BytesIO(weights))
        pkl = next(n for n in inner.namelist() if n.endswith("/data.pkl"))
        kind, new = mutate(inner.read(pkl))
        return ext, "weights-" + kind, rezip(data, "weights.pt", rezip(weights, pkl, new))

    for i in range(count):
        ext, kind, data = case(i)
        path = root / f"case{i:04d}.{ext}"
        path.write_bytes(data)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                args = ["--network", str(path), "--outdir", str(root / "out"), "--seeds", "0", "--steps", "1"]
                code = main(["generate", *args, "--batch", "1", "--device", "cpu", "--overwrite"])
            result = {0: "ok", 2: "refused"}.get(code, f"exit {code}")
        except SystemExit as e:
            result = f"exit {e.code}"
        except BaseException:
            result, err = "traceback", io.StringIO(traceback.format_exc())
        print(json.dumps({"i": i, "kind": kind, "result": result, "stderr": err.getvalue()}), flush=True)
        path.unlink()
    """
)


def test_fuzzed_checkpoints_load_or_exit_2_with_one_line(tmp_path):
    net = tiny_net(**SMALL)
    (tmp_path / "base.pkl").write_bytes(snapshot_bytes(net, init_kwargs=SMALL))
    save_network(net, tmp_path / "base.nbh")
    count = 240
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(count), "13"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    lines = [json.loads(s) for s in proc.stdout.splitlines() if s.startswith("{")]
    done = len(lines)
    assert proc.returncode == 0, (
        f"the child died with status {proc.returncode} after {done} cases "
        f"(case {done} crashed the interpreter): {proc.stderr[-3000:]}"
    )
    assert done == count
    bad = [c for c in lines if c["result"] not in ("ok", "refused")]
    assert not bad, bad[:3]
    for c in lines:
        if c["result"] == "refused":
            msg = c["stderr"]
            assert msg.count("\n") == 1 and "Traceback" not in msg, c
            assert f"case{c['i']:04d}" in msg, c
    results = [c["result"] for c in lines]
    assert results.count("ok") >= 10 and results.count("refused") >= 100, results
