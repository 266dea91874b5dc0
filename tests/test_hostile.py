"""Hostile checkpoints and data files: nothing runs, nothing changes in the process, nothing crashes,
memory stays bounded, and every refusal is a clear error naming the file (issue 13, part 1)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from edm_files import (
    BYTES,
    GLOBAL,
    INT,
    STR,
    TINY_VP,
    float_bytes,
    nested_list_ops,
    numpy_object_array_ops,
    own_format_zip,
    pickle_program,
    snapshot_bytes,
    splice,
    tensor_pickle,
    tiny_net,
    torch_zip,
)

from nbhelpers import networks
from nbhelpers.checkpoints import CheckpointError, UnsafeCheckpointError, load_network, save_network

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter on this checkout (a crash there cannot take the tests down)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


# ---------------------------------------------------------------- BUILD cannot poison the process


def poisoning_snapshot() -> bytes:
    """A snapshot that loads with correct weights and, on the way, BUILDs ``__defaults__`` of torch's
    tensor rebuilder so that every later tensor comes back negated (metadata {'neg': True})."""
    poison = (
        GLOBAL("torch._utils", "_rebuild_tensor_v2")
        + b"N}" + STR("__defaults__") + b"}" + STR("neg") + b"\x88s\x85s\x86b"
    )  # fmt: skip
    return splice(snapshot_bytes(augment_pipe="@POISON@"), "@POISON@", poison)


def test_build_cannot_poison_later_tensor_loads(tmp_path):
    path = tmp_path / "poison.pkl"
    path.write_bytes(poisoning_snapshot())
    normal = tmp_path / "normal.pt"
    torch.save(torch.arange(1.0, 4.0), normal)
    out = run_python(f"""
        import torch, torch._utils
        from nbhelpers.checkpoints import load_network, CheckpointError
        try:
            load_network({str(path)!r})
            print("loaded")
        except CheckpointError as e:
            print("refused:", e)
        print("defaults:", torch._utils._rebuild_tensor_v2.__defaults__)
        print("tensor:", torch.load({str(normal)!r}, weights_only=True).tolist())
    """)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "poison.pkl" in out.stdout and "BUILD" in out.stdout
    assert "defaults: (None,)" in out.stdout
    assert "tensor: [1.0, 2.0, 3.0]" in out.stdout


def test_build_on_allow_listed_globals_is_refused(tmp_path):
    for module, name in [
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("numpy", "dtype"),
    ]:
        body = GLOBAL(module, name) + b"N}" + STR("__doc__") + STR("x") + b"s\x86b"
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(pickle_program(body, protocol=2))
        with pytest.raises(UnsafeCheckpointError, match=f"{name}.pkl.*BUILD"):
            load_network(path)


# ---------------------------------------------------------------- numpy cannot forge object pointers


def test_numpy_object_dtype_is_refused_without_crashing(tmp_path):
    """An 'O' dtype with its flags cleared made numpy read file bytes as a PyObject pointer: reading
    the recorded init kwargs (``tolist``) then crashed the interpreter (0x4141414141414141)."""
    data = snapshot_bytes(init_kwargs=dict(TINY_VP, resample_filter="@ARRAY@"))
    paths = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        paths.append(tmp_path / f"forged-{module.split('.')[1]}.pkl")
        paths[-1].write_bytes(splice(data, "@ARRAY@", numpy_object_array_ops(module=module)))
    out = run_python(f"""
        from nbhelpers.checkpoints import load_network, CheckpointError
        for path in {[str(p) for p in paths]!r}:
            try:
                load_network(path)
            except CheckpointError as e:
                print("refused:", e)
    """)
    assert out.returncode == 0, f"crashed with status {out.returncode}: {out.stderr[-2000:]}"
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(
        ln.startswith("refused:") and "not a plain numeric type" in ln for ln in lines
    )
    assert "forged-core.pkl" in lines[0] and "forged-_core.pkl" in lines[1]


def test_structured_numpy_dtype_is_refused(tmp_path):
    state = (
        b"(" + INT(3) + STR("|") + b"N(" + STR("a") + b"t}" + STR("a") + b"(" + STR("x") + INT(0) + b"tsNN"
    )
    state += INT(8) + INT(1) + INT(0x3F) + b"t"
    body = b"}" + STR("ema") + GLOBAL("numpy", "dtype") + b"(" + STR("V8") + b"\x89\x88tR" + state + b"bs"
    path = tmp_path / "structured.pkl"
    path.write_bytes(pickle_program(body))
    with pytest.raises(UnsafeCheckpointError, match="structured.pkl.*dtype"):
        load_network(path)


def test_cifar_tarball_with_forged_array_is_refused_without_crashing(tmp_path):
    # Valid image data; the labels are the forged object array (converting them dereferences the pointer).
    data = (
        GLOBAL("numpy.core.multiarray", "_reconstruct") + GLOBAL("numpy", "ndarray") + INT(0) + b"\x85"
        + BYTES(b"b") + b"\x87R(" + INT(1) + INT(1) + INT(3072) + b"\x86" + GLOBAL("numpy", "dtype")
        + b"(" + STR("u1") + b"\x89\x88tR(" + INT(3) + STR("|") + b"NNN" + INT(-1) + INT(-1) + INT(0)
        + b"tb\x89" + BYTES(bytes(3072)) + b"tb"
    )  # fmt: skip
    batch = pickle_program(b"}" + STR("data") + data + b"s" + STR("labels") + numpy_object_array_ops() + b"s")
    tar_path = tmp_path / "cifar.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(batch)
        tar.addfile(info, io.BytesIO(batch))
    out = run_python(f"""
        from nbhelpers.data import load_cifar10
        try:
            load_cifar10({str(tar_path)!r}, max_images=1)
        except ValueError as e:
            print("refused:", e)
    """)
    assert out.returncode == 0, f"crashed with status {out.returncode}: {out.stderr[-2000:]}"
    assert (
        "refused:" in out.stdout and "data_batch_1" in out.stdout and "not a plain numeric type" in out.stdout
    )


# ---------------------------------------------------------------- memory bombs


@pytest.mark.parametrize(
    "body",
    [
        GLOBAL("builtins", "bytearray") + INT(3_000_000_000) + b"\x85R",  # 34 bytes, 3 GB
        GLOBAL("builtins", "set") + GLOBAL("builtins", "range") + INT(3_000_000) + b"\x85R\x85R",
    ],
    ids=["bytearray", "set-range"],
)
def test_memory_bombs_are_refused_with_bounded_memory(tmp_path, body):
    path = tmp_path / "bomb.pkl"
    path.write_bytes(pickle_program(body))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="bomb.pkl") as err:
            load_network(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "MemoryError" not in str(err.value)
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_allocation_budget_bounds_small_objects(tmp_path):
    """One byte per empty list: a 2 MB pickle asking for ~140 MB of list objects is refused."""
    body = b"(" + b"]" * 2_500_000 + b"l"
    path = tmp_path / "lists.pkl"
    path.write_bytes(pickle_program(body))
    with pytest.raises(CheckpointError, match="lists.pkl.*MiB"):
        load_network(path)


class _Registrations:
    """Records every parameter/buffer registration (device, numel) while active."""

    def __enter__(self):
        self.seen = []
        mm = torch.nn.modules.module
        hook = lambda module, name, t: self.seen.append((t.device.type, t.numel())) if t is not None else None
        self.handles = [mm.register_module_parameter_registration_hook(hook),
                        mm.register_module_buffer_registration_hook(hook)]  # fmt: skip
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def largest_real(self) -> int:
        return max((n for dev, n in self.seen if dev != "meta"), default=0)


def test_huge_recorded_width_fails_before_allocating(tmp_path):
    """model_channels=512 recorded next to 16-channel weights: refused on the meta device."""
    path = tmp_path / "wide.pkl"
    path.write_bytes(snapshot_bytes(init_kwargs=dict(TINY_VP, model_channels=512)))
    t0 = time.perf_counter()
    with _Registrations() as reg, pytest.raises(CheckpointError, match="wide.pkl.*(larger|do not fit)"):
        load_network(path)
    assert reg.largest_real() < 100_000, "a real network of the recorded width was allocated"
    assert time.perf_counter() - t0 < 10


def test_huge_width_in_own_format_fails_before_allocating(tmp_path):
    good = save_network(tiny_net(), tmp_path / "good.nbh")
    with zipfile.ZipFile(good) as zf:
        config, weights = json.loads(zf.read("config.json")), zf.read("weights.pt")
    config["init_kwargs"]["model_channels"] = 512
    path = tmp_path / "wide.nbh"
    path.write_bytes(own_format_zip(config, weights))
    with _Registrations() as reg, pytest.raises(CheckpointError, match="wide.nbh.*(larger|do not fit)"):
        load_network(path)
    assert reg.largest_real() < 100_000


def test_many_blocks_abort_the_meta_build(tmp_path):
    path = tmp_path / "deep.pkl"
    path.write_bytes(snapshot_bytes(init_kwargs=dict(TINY_VP, num_blocks=1000)))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="deep.pkl.*larger"):
        load_network(path)
    assert time.perf_counter() - t0 < 10


def test_zip_bomb_weights_are_refused_before_decompressing(tmp_path):
    good = save_network(tiny_net(), tmp_path / "good.nbh")
    with zipfile.ZipFile(good) as zf:
        config = zf.read("config.json")
    path = tmp_path / "bomb.nbh"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", config)
        info = zipfile.ZipInfo("weights.pt")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(300):
                f.write(chunk)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="bomb.nbh.*decompress") as err:
            load_network(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "weights.pt" in str(err.value) and peak < 50 * 2**20


@pytest.mark.parametrize(
    "offset,size,stride,numel",
    [(1000, (4,), (1,), 4), (0, (4, 4), (4, 1), 4), (0, (2,), (2**40,), 4), (3, (2,), (1,), 4)],
    ids=["offset", "size", "stride", "end"],
)
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, numel):
    weights = torch_zip(tensor_pickle(offset, size, stride, numel), {"0": float_bytes(range(numel))})
    config = {"format": "nbhelpers-network", "format_version": 1, "class_name": "MLP", "init_kwargs": {}}
    path = tmp_path / "outside.nbh"
    path.write_bytes(own_format_zip(config, weights))
    with pytest.raises(CheckpointError, match="outside.nbh.*storage holds 4"):
        load_network(path)


def test_storage_smaller_than_declared_is_refused(tmp_path):
    """A storage that declares 10^9 floats but holds 4: refused before allocating (torch.load
    allocated the declared size first; not visible to tracemalloc, so this is coverage only)."""
    weights = torch_zip(tensor_pickle(0, (4,), (1,), 1_000_000_000), {"0": float_bytes(range(4))})
    config = {"format": "nbhelpers-network", "format_version": 1, "class_name": "MLP", "init_kwargs": {}}
    path = tmp_path / "short.nbh"
    path.write_bytes(own_format_zip(config, weights))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="short.nbh"):
            load_network(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


# ---------------------------------------------------------------- deep nesting


def test_deeply_nested_init_kwargs_are_a_clear_error(tmp_path):
    data = snapshot_bytes(init_kwargs=dict(TINY_VP, extra="@DEEP@"))
    path = tmp_path / "nested.pkl"
    path.write_bytes(splice(data, "@DEEP@", nested_list_ops(100_000)))
    with pytest.raises(CheckpointError, match="nested.pkl.*nested"):
        load_network(path)


def test_deeply_nested_modules_are_a_clear_error(tmp_path):
    level = (
        GLOBAL("torch.nn.modules.container", "ModuleDict") + b")\x81}" + STR("_modules") + b"}" + STR("sub")
    )
    chain = level * 5000 + b"N" + b"ssb" * 5000
    data = snapshot_bytes(init_kwargs=dict(TINY_VP), loss_fn="@CHAIN@")
    path = tmp_path / "modules.pkl"
    path.write_bytes(splice(data, "@CHAIN@", chain))
    with pytest.raises(CheckpointError, match="modules.pkl.*nested"):
        load_network(path)


def test_reference_cycles_are_a_clear_error(tmp_path):
    # a list that contains itself: ] q0 h0 a  (EMPTY_LIST, BINPUT 0, BINGET 0, APPEND)
    path = tmp_path / "cycle.pkl"
    path.write_bytes(pickle_program(b"}" + STR("ema") + b"]q\x00h\x00as"))
    with pytest.raises(CheckpointError, match="cycle.pkl.*cycle"):
        load_network(path)


def test_deeply_nested_config_json_is_a_clear_error(tmp_path):
    good = save_network(tiny_net(), tmp_path / "good.nbh")
    with zipfile.ZipFile(good) as zf:
        config, weights = json.loads(zf.read("config.json")), zf.read("weights.pt")
    text = json.dumps(dict(config, init_kwargs="@DEEP@")).replace('"@DEEP@"', "[" * 100_000 + "]" * 100_000)
    path = tmp_path / "deep.nbh"
    path.write_bytes(own_format_zip(text.encode(), weights))
    with pytest.raises(CheckpointError, match="deep.nbh.*nested"):
        load_network(path)


# ---------------------------------------------------------------- what still loads


def test_valid_files_still_load_exactly(tmp_path):
    net = tiny_net(seed=3)
    for protocol in (2, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(snapshot_bytes(net, protocol=protocol))
        back = load_network(path)
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()))
    own = load_network(save_network(net, tmp_path / "ok.nbh"))
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), net.state_dict().values()))


def test_nan_weights_are_refused(tmp_path):
    net = tiny_net()
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match="nan.nbh.*NaN"):
        load_network(save_network(net, tmp_path / "nan.nbh"))
    (tmp_path / "nan.pkl").write_bytes(snapshot_bytes(net))
    with pytest.raises(CheckpointError, match="nan.pkl.*NaN"):
        load_network(tmp_path / "nan.pkl")


@pytest.mark.parametrize("version", [None, "1", 1.0, True, 0])
def test_bad_format_version_is_a_clear_error(tmp_path, version):
    good = save_network(networks.make_network("mlp", "edm", 2, 2, hidden_dim=8, num_layers=1, emb_dim=4),
                        tmp_path / "good.nbh")  # fmt: skip
    with zipfile.ZipFile(good) as zf:
        config, weights = json.loads(zf.read("config.json")), zf.read("weights.pt")
    path = tmp_path / "version.nbh"
    path.write_bytes(own_format_zip(dict(config, format_version=version), weights))
    with pytest.raises(CheckpointError, match="version.nbh.*format_version"):
        load_network(path)
