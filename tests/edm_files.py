"""Helpers for tests that craft EDM-style snapshot pickles, hostile ones included (not a test module)."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import torch

from nbhelpers import networks

# A tiny EDM DDPM++ preset, as EDM's train.py records it for the preconditioner.
TINY_SONG = dict(
    model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], dropout=0.13, use_fp16=False,
)  # fmt: skip
TINY_VP = dict(img_resolution=8, img_channels=3, label_dim=0, **TINY_SONG)


@contextlib.contextmanager
def fake_persistence():
    """A stand-in ``torch_utils.persistence`` module so pickles reference EDM's hook by name."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the loader under test
        raise AssertionError("the fake EDM hook was called")

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """Pickles like an EDM persistent object: a call of the persistence hook with one ``meta`` dict."""

    def __init__(self, class_name, state, module_src=""):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def edm_tree(module, init_kwargs=None):
    """EDM's pickled structure of ``module``: persistent records for the network's own classes,
    pickled torch.nn containers otherwise, the module ``__dict__`` as state."""
    state = {}
    for k, v in module.__dict__.items():
        if k in ("_parameters", "_buffers"):
            state[k] = collections.OrderedDict(v)
        elif k == "_modules":
            state[k] = collections.OrderedDict(
                (name, None if child is None else edm_tree(child)) for name, child in v.items()
            )
        elif k == "_non_persistent_buffers_set" or (k.startswith("_") and isinstance(v, dict) and not v):
            state[k] = v
        elif not k.startswith("_") and isinstance(v, bool | int | float | str | type(None)):
            state[k] = v
    if type(module).__module__.startswith("torch.nn"):
        clone = type(module).__new__(type(module))
        clone.__dict__.update(state)
        return clone
    state["_init_args"] = ()
    state["_init_kwargs"] = init_kwargs if init_kwargs is not None else {}
    return Persistent(type(module).__name__, state)


def tiny_net(seed: int = 1, **overrides) -> torch.nn.Module:
    kwargs = dict(TINY_VP, **overrides)
    return networks.VPPrecond(**kwargs, generator=torch.Generator().manual_seed(seed)).eval()


def snapshot_bytes(net=None, init_kwargs=None, protocol: int = 2, **extra) -> bytes:
    """An EDM snapshot pickle of ``net`` (default :func:`tiny_net`) with ``extra`` top-level entries."""
    net = tiny_net() if net is None else net
    with fake_persistence():
        data = dict(ema=edm_tree(net, init_kwargs if init_kwargs is not None else dict(TINY_VP)),
                    augment_pipe=None, dataset_kwargs=dict(path="data.zip"))  # fmt: skip
        data.update(extra)
        return pickle.dumps(data, protocol=protocol)


def splice(data: bytes, marker: str, payload: bytes) -> bytes:
    """Replace the opcode that pushes the string ``marker`` (protocol 2 BINUNICODE) with ``payload``."""
    op = b"X" + struct.pack("<I", len(marker)) + marker.encode()
    assert data.count(op) == 1, marker
    return data.replace(op, payload)


# Raw pickle opcodes (protocol 2 unless noted).
def GLOBAL(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def STR(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def BYTES(b: bytes) -> bytes:  # protocol 3
    return b"B" + struct.pack("<I", len(b)) + b


def INT(i: int) -> bytes:
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    raw = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def pickle_program(body: bytes, protocol: int = 3) -> bytes:
    return b"\x80" + bytes([protocol]) + body + b"."


def numpy_object_array_ops(pointer: bytes = b"A" * 8, module: str = "numpy.core.multiarray") -> bytes:
    """Opcodes of an ndarray whose dtype is 'O' with its flags cleared: raw bytes become PyObject pointers."""
    dtype = (
        GLOBAL("numpy", "dtype") + b"(" + STR("O8") + b"\x89\x88t" + b"R"
        + b"(" + INT(3) + STR("|") + b"NNN" + INT(-1) + INT(-1) + INT(0) + b"t" + b"b"
    )  # fmt: skip
    return (
        GLOBAL(module, "_reconstruct") + GLOBAL("numpy", "ndarray") + INT(0) + b"\x85" + BYTES(b"b")
        + b"\x87R" + b"(" + INT(1) + INT(len(pointer) // 8) + b"\x85" + dtype + b"\x89" + BYTES(pointer)
        + b"t" + b"b"
    )  # fmt: skip


def nested_list_ops(depth: int) -> bytes:
    """Opcodes of a list nested ``depth`` levels deep, without recursion in the writer."""
    return b"]" * depth + b"a" * (depth - 1)


def own_format_zip(config: dict | bytes, weights: bytes, compression=zipfile.ZIP_STORED) -> bytes:
    """An nbhelpers network zip from a config (dict or raw bytes) and raw weights.pt bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        zf.writestr("config.json", config if isinstance(config, bytes) else json.dumps(config))
        zf.writestr("weights.pt", weights)
    return buf.getvalue()


def torch_zip(data_pkl: bytes, storages: dict[str, bytes], prefix: str = "archive") -> bytes:
    """A torch.save-style zip written by hand: ``<prefix>/data.pkl`` and ``<prefix>/data/<key>``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", "3\n")
    return buf.getvalue()


def tensor_pickle(offset: int, size: tuple, stride: tuple, numel: int) -> bytes:
    """data.pkl of ``{'w': tensor}`` whose storage '0' holds ``numel`` floats, viewed at ``offset``."""
    storage = object()

    class Tensor:
        def __reduce__(self):
            args = (storage, offset, size, stride, False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    return buf.getvalue()


def float_bytes(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()
