"""Load EDM ``.pkl`` snapshots without running their code, and save/load this project's networks.

EDM snapshot. ``network-snapshot-*.pkl`` is a pickled dict ``{ema, loss_fn, augment_pipe,
dataset_kwargs}``. Each persistent object in it is a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` holds the class name, the
source code of the class's module and the object's ``__dict__`` (with ``_init_args``/``_init_kwargs``).
EDM ``exec``s that source. Here a restricted unpickler resolves only an allow-list of globals
(tensor and storage rebuilders, ``OrderedDict``, numpy scalars and arrays, a few builtins), turns every
persistent object into an inert :class:`PersistentRecord` (its source is kept as text, never run) and
every ``torch.nn`` container into a :class:`ModuleRecord`; anything else raises
:class:`UnsafeCheckpointError` before it can be called. The network is then rebuilt from its recorded
``_init_kwargs`` with this project's classes and its parameters and buffers are loaded strictly.

Own format. :func:`save_network` writes a zip with ``config.json`` (class, init kwargs, versions) and
``weights.pt`` (a ``torch.save`` state dict, read back with ``weights_only=True``).

:func:`load_network` tells the formats apart by content (zip magic vs pickle protocol byte), not by
file extension.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import copy
import copyreg
import importlib
import inspect
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .download import resolve

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "PersistentRecord",
    "ModuleRecord",
    "load_network",
    "load_snapshot",
    "read_edm_pickle",
    "save_network",
    "NETWORK_CLASSES",
    "FORMAT",
]

FORMAT = "nbhelpers-network"
FORMAT_VERSION = 1
NETWORK_CLASSES = (
    "VPPrecond",
    "VEPrecond",
    "EDMPrecond",
    "SongUNet",
    "DhariwalUNet",
    "MLP",
    "LowRankDenoiser",
)

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated, or not in a supported format (message names the file)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asks for a global outside the allow-list; nothing from it was called."""


class PersistentRecord:
    """Inert stand-in for an EDM persistent object: ``class_name``, ``version``, ``module_src``
    (source text, never executed) and ``state`` (the object's ``__dict__``)."""

    def __init__(self, class_name: str, version: Any, module_src: str | None, state: Any):
        self.class_name = class_name
        self.version = version
        self.module_src = module_src
        self.state = state

    @property
    def init_kwargs(self) -> dict | None:
        """The constructor keyword arguments EDM recorded, or None."""
        return self.state.get("_init_kwargs") if isinstance(self.state, dict) else None

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r})"


class ModuleRecord:
    """Inert stand-in for a pickled ``torch.nn`` module (e.g. ``ModuleDict``): its ``state`` only."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r})"


_module_record_classes: dict[str, type] = {}


def _module_record_class(name: str) -> type:
    if name not in _module_record_classes:
        _module_record_classes[name] = type(name, (ModuleRecord,), {"class_name": name})
    return _module_record_classes[name]


class _EasyDict(dict):
    """Plain-dict replacement for ``dnnlib.util.EasyDict``."""


def _reconstruct_persistent_obj(meta: Any) -> PersistentRecord:
    """Replacement for EDM's hook: record the object, never import or execute ``module_src``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise TypeError("persistent object without a class name")
    if meta.get("type", "class") != "class":
        raise TypeError(f"persistent object of unsupported type {meta.get('type')!r}")
    return PersistentRecord(
        meta["class_name"], meta.get("version"), meta.get("module_src"), meta.get("state")
    )


def _load_storage_bytes(data: bytes):
    """Replacement for ``torch.storage._load_from_bytes`` (EDM tensors): weights-only, onto the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _numpy_core(name: str):
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(name)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "range"): range,
        ("builtins", "bytearray"): bytearray,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("_codecs", "encode"): codecs.encode,
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _numpy_core("_reconstruct")
        table[(module, "scalar")] = _numpy_core("scalar")
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            table[("torch", name)] = getattr(torch, name)
    return table


_ALLOWED = _allowed_globals()
_TORCH_NN = re.compile(r"^torch\.nn\.modules(\.\w+)+$")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals; see the module docstring."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        # Python 2 names in protocol 0-2 pickles ('__builtin__.set', 'copy_reg._reconstructor').
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if _TORCH_NN.match(module) and name.isidentifier():
            return _module_record_class(name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load global '{module}.{name}' from the pickle; only tensors, "
            "EDM persistent objects and plain data are allowed, so nothing in this file was run"
        )

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: pickle uses persistent ids ({pid!r}); not an EDM snapshot")


def read_edm_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with the restricted unpickler; persistent objects come back as records."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        # torch.load(weights_only=True) inside a storage refuses unsafe globals with this error too.
        if "Weights only load failed" in str(e):
            raise UnsafeCheckpointError(
                f"{path}: a tensor storage holds unsafe pickled data; refused ({e})"
            ) from e
        raise CheckpointError(f"{path}: corrupt or truncated pickle ({e})") from e
    except EOFError as e:
        raise CheckpointError(f"{path}: truncated pickle (unexpected end of file)") from e
    except Exception as e:  # malformed arguments to allowed rebuilders, bad storages, ...
        raise CheckpointError(f"{path}: cannot read pickle ({type(e).__name__}: {e})") from e


def _plain(value: Any) -> Any:
    """Recorded init kwargs as plain Python (numpy scalars -> numbers, EasyDict -> dict)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _network_classes() -> dict[str, type]:
    from . import molrg, networks

    return {
        name: getattr(module, name)
        for name in NETWORK_CLASSES
        for module in (networks, molrg)
        if hasattr(module, name)
    }


def _construct(class_name: str, init_args: Any, init_kwargs: Any, source: str) -> torch.nn.Module:
    classes = _network_classes()
    if class_name not in classes:
        raise CheckpointError(
            f"{source}: network class {class_name!r} is not supported; expected one of {sorted(classes)}"
        )
    cls = classes[class_name]
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(f"{source}: {class_name} has no recorded constructor arguments")
    kwargs = _plain(dict(init_kwargs))
    args = list(_plain(list(init_args or ())))
    if "generator" in inspect.signature(cls).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(0)  # throwaway init, overwritten below
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{source}: cannot build {class_name} from its recorded arguments {init_kwargs}: {e}"
        ) from e


def _collect_state(node: Any, prefix: str, out: dict[str, torch.Tensor], source: str) -> None:
    """Flatten a record tree's ``_parameters``/``_buffers``/``_modules`` into state_dict entries."""
    if not isinstance(node, PersistentRecord | ModuleRecord) or not isinstance(node.state, dict):
        raise CheckpointError(f"{source}: module '{prefix.rstrip('.') or '<root>'}' is not a recorded module")
    state = node.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    entries = [(k, v) for k, v in (state.get("_parameters") or {}).items()]
    entries += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in skip]
    for name, tensor in entries:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{source}: entry '{prefix}{name}' is a {type(tensor).__name__}, not a tensor"
            )
        out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect_state(child, f"{prefix}{name}.", out, source)


def _load_weights(net: torch.nn.Module, state_dict: dict, class_name: str, source: str) -> None:
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit {class_name}: {e}") from e


def _network_from_record(record: Any, source: str) -> torch.nn.Module:
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"{source}: 'ema' is a {type(record).__name__}, not an EDM network")
    state = record.state if isinstance(record.state, dict) else {}
    net = _construct(record.class_name, state.get("_init_args"), state.get("_init_kwargs"), source)
    weights: dict[str, torch.Tensor] = {}
    _collect_state(record, "", weights, source)
    _load_weights(net, weights, record.class_name, source)
    return net


def _finish(net: torch.nn.Module, device) -> torch.nn.Module:
    return net.eval().requires_grad_(False).to(device)


def _sniff(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").is_file():
            return "own"
        raise CheckpointError(f"{path}: a folder without config.json is not an nbhelpers network")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if head in _ZIP_MAGIC:
        return "own"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    raise CheckpointError(
        f"{path}: neither an EDM snapshot pickle nor an nbhelpers network zip (starts with {head!r})"
    )


def load_snapshot(
    path_or_url: str | os.PathLike, device: str | torch.device = "cpu", download: bool = True
) -> dict:
    """Read an EDM snapshot dict; ``'ema'`` is rebuilt as a network (eval, no grad, on ``device``),
    other persistent entries (``loss_fn``, ``augment_pipe``) stay inert :class:`PersistentRecord`s."""
    path = resolve(path_or_url, download=download)
    if _sniff(path) != "pickle":
        raise CheckpointError(f"{path}: not an EDM snapshot pickle")
    data = read_edm_pickle(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict with 'ema', got a {type(data).__name__}")
    if "ema" not in data:
        raise CheckpointError(f"{path}: no 'ema' entry in the snapshot (keys: {sorted(map(str, data))})")
    data = dict(data)
    data["ema"] = _finish(_network_from_record(data["ema"], str(path)), device)
    return data


def load_network(
    path_or_url: str | os.PathLike, device: str | torch.device = "cpu", download: bool = True
) -> torch.nn.Module:
    """The network in an EDM snapshot (its ``ema``) or an nbhelpers network file (zip or folder).

    URLs go through the download cache. Returned in eval mode with ``requires_grad`` off, on ``device``.
    """
    path = resolve(path_or_url, download=download)
    if _sniff(path) == "pickle":
        return load_snapshot(path, device=device)["ema"]
    return _finish(_load_own(path), device)


# ---------------------------------------------------------------- own format


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"init argument of type {type(x).__name__} is not JSON-serialisable")


def save_network(net: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``net`` (a network of this project with ``_init_kwargs``) atomically as a zip holding
    ``config.json`` and ``weights.pt``; :func:`load_network` reads it back exactly."""
    name = type(net).__name__
    init_kwargs = getattr(net, "_init_kwargs", None)
    if name not in NETWORK_CLASSES or not isinstance(init_kwargs, dict):
        raise ValueError(
            f"save_network: {name} is not a network of nbhelpers (networks, molrg.LowRankDenoiser) with recorded _init_kwargs"
        )
    from . import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class_name": name,
        "init_args": list(getattr(net, "_init_args", None) or ()),
        "init_kwargs": init_kwargs,
        "nbhelpers_version": __version__,
        "torch_version": torch.__version__,
    }
    text = json.dumps(config, indent=2, sort_keys=True, default=_json_default)
    weights = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in net.state_dict().items()}, weights)
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("config.json", text)
        zf.writestr("weights.pt", weights.getvalue())
    return path


def _read_member(path: Path, name: str) -> bytes:
    if path.is_dir():
        member = path / name
        if not member.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        return member.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            if name not in zf.namelist():
                raise CheckpointError(
                    f"{path}: zip without {name}; not an nbhelpers network (torch.save files are not accepted)"
                )
            return zf.read(name)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip ({e})") from e


def _load_own(path: Path) -> torch.nn.Module:
    try:
        config = json.loads(_read_member(path, "config.json").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: config.json is not valid JSON ({e})") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: config.json does not describe an nbhelpers network")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {config['format_version']} is newer than this nbhelpers"
        )
    class_name = str(config.get("class_name"))
    net = _construct(class_name, config.get("init_args"), copy.deepcopy(config.get("init_kwargs")), str(path))
    try:
        state_dict = torch.load(
            io.BytesIO(_read_member(path, "weights.pt")), weights_only=True, map_location="cpu"
        )
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: weights.pt is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: weights.pt does not hold a state dict")
    _load_weights(net, state_dict, class_name, str(path))
    return net
