"""Load EDM ``.pkl`` snapshots without running their code, and save/load this project's networks.

EDM snapshot. ``network-snapshot-*.pkl`` is a pickled dict ``{ema, loss_fn, augment_pipe,
dataset_kwargs}``. Each persistent object in it is a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` holds the class name, the
source code of the class's module and the object's ``__dict__`` (with ``_init_args``/``_init_kwargs``).
EDM ``exec``s that source. Here the pickle is read by :mod:`nbhelpers.safeload`, an opcode-level
interpreter that resolves only an allow-list of globals to inert tokens (tensor and storage
rebuilders, ``OrderedDict``, plain numeric numpy scalars and arrays, a few builtins), turns every
persistent object into an inert :class:`PersistentRecord` (its source is kept as text, never run)
and every ``torch.nn`` container into a :class:`ModuleRecord`; state-setting happens only on those
records. Anything else raises :class:`UnsafeCheckpointError` before it can be called; memory,
nesting and tensor bounds are checked (see that module). The network is then built on the meta
device from its recorded ``_init_kwargs`` with this project's classes, its parameter shapes are
compared with the recorded tensors, and only then is it built for real and loaded strictly.

Own format. :func:`save_network` writes a zip with ``config.json`` (class, init kwargs, versions) and
``weights.pt`` (a ``torch.save`` state dict, read back with :func:`safeload.read_torch_bytes`).

:func:`load_network` tells the formats apart by content (zip magic vs pickle protocol byte), not by
file extension.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import inspect
import io
import json
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, molrg, networks, safeload
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
    """A pickle asks for a global or an operation outside the allow-list; nothing from it was called."""


class PersistentRecord(safeload.Buildable):
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

    def children(self) -> list:
        return [self.state]

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name!r})"


class ModuleRecord(safeload.Buildable):
    """Inert stand-in for a pickled ``torch.nn`` module (e.g. ``ModuleDict``): its ``state`` only."""

    class_name = "Module"
    state: Any = None

    def build(self, state: Any) -> ModuleRecord:
        if self.state is not None:
            raise safeload.UnsafePickleError(f"{self.class_name}: state set twice")
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        self.state = state
        return self

    def children(self) -> list:
        return [self.state]

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r})"


_module_record_classes: dict[str, type] = {}


def _module_record_class(name: str) -> type:
    if name not in _module_record_classes:
        _module_record_classes[name] = type(name, (ModuleRecord,), {"class_name": name})
    return _module_record_classes[name]


class _EasyDict(dict):
    """Plain-dict replacement for ``dnnlib.util.EasyDict``."""


def _reconstruct_persistent_obj(m: Any, meta: Any) -> PersistentRecord:
    """Replacement for EDM's hook: record the object, never import or execute ``module_src``."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise TypeError("persistent object without a class name")
    if meta.get("type", "class") != "class":
        raise TypeError(f"persistent object of unsupported type {meta.get('type')!r}")
    return PersistentRecord(
        meta["class_name"], meta.get("version"), meta.get("module_src"), meta.get("state")
    )


def _allowed_globals() -> dict[tuple[str, str], safeload.Global]:
    G = safeload.Global
    table = {**safeload.torch_globals(), **safeload.numpy_globals()}
    table[("torch_utils.persistence", "_reconstruct_persistent_obj")] = G(
        "torch_utils.persistence", "_reconstruct_persistent_obj", call=_reconstruct_persistent_obj
    )
    table[("torch.storage", "_load_from_bytes")] = G(
        "torch.storage", "_load_from_bytes", call=safeload.read_legacy_storage
    )
    table[("dnnlib.util", "EasyDict")] = G("dnnlib.util", "EasyDict", new=lambda m: _EasyDict())
    return table


_ALLOWED = _allowed_globals()
_TORCH_NN = re.compile(r"^torch\.nn\.modules(\.\w+)+$")


def _resolve(module: str, name: str) -> safeload.Global | None:
    """The allow-listed token for ``module.name`` (Python 2 names mapped), or None."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if _TORCH_NN.match(module) and name.isidentifier():
        return safeload.Global(module, name, new=lambda m: _module_record_class(name)())
    return None


def _as_checkpoint_error(e: safeload.PickleError) -> CheckpointError:
    cls = UnsafeCheckpointError if isinstance(e, safeload.UnsafePickleError) else CheckpointError
    return cls(str(e))


def read_edm_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with the restricted reader (:mod:`nbhelpers.safeload`); persistent objects
    come back as :class:`PersistentRecord`, ``torch.nn`` containers as :class:`ModuleRecord`."""
    path = Path(path)
    try:
        data = path.read_bytes()
        return safeload.load_pickle(data, str(path), _resolve, dict_types=(_EasyDict,))
    except safeload.PickleError as e:
        raise _as_checkpoint_error(e) from None


_MAX_KWARG_ARRAY = 1 << 16  # elements of a numpy array among recorded constructor arguments


def _plain(value: Any, source: str, where: str = "init_kwargs") -> Any:
    """Recorded init kwargs as plain Python (numpy scalars -> numbers, EasyDict -> dict); anything
    but numbers, strings, None, lists, tuples and str-keyed dicts is a CheckpointError."""
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"{source}: {where} has a key that is not a string")
        return {k: _plain(v, source, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.size > _MAX_KWARG_ARRAY:
            raise CheckpointError(f"{source}: {where} is an array of {value.size} elements; too large")
        return value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"{source}: {where} is a {type(value).__name__}; only plain values are allowed")


def _network_classes() -> dict[str, type]:
    return {
        name: getattr(module, name)
        for name in NETWORK_CLASSES
        for module in (networks, molrg)
        if hasattr(module, name)
    }


def _network_class(class_name: str, source: str) -> type:
    classes = _network_classes()
    if class_name not in classes:
        raise CheckpointError(
            f"{source}: network class {class_name!r} is not supported; expected one of {sorted(classes)}"
        )
    return classes[class_name]


def _arguments(class_name: str, init_args: Any, init_kwargs: Any, source: str) -> tuple[list, dict]:
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(f"{source}: {class_name} has no recorded constructor arguments")
    if init_args is not None and not isinstance(init_args, list | tuple):
        raise CheckpointError(f"{source}: {class_name}'s recorded positional arguments are not a list")
    kwargs = _plain(dict(init_kwargs), source)
    if "generator" in kwargs:
        raise CheckpointError(f"{source}: recorded arguments of {class_name} may not set 'generator'")
    return list(_plain(list(init_args or ()), source, "init_args")), kwargs


class _TooBig(Exception):
    """A constructor registered more tensors or elements than the file records."""


@contextlib.contextmanager
def _registration_limit(max_tensors: int, max_numel: int) -> Iterator[None]:
    """Abort any module constructor in this thread that registers more than ``max_tensors``
    parameters/buffers or ``max_numel`` elements (process-wide hooks, removed on exit)."""
    thread, count = threading.get_ident(), [0, 0]

    def hook(module, name, tensor):
        if tensor is not None and threading.get_ident() == thread:
            count[0] += 1
            count[1] += tensor.numel()
            if count[0] > max_tensors or count[1] > max_numel:
                raise _TooBig(f"{count[0]} tensors, {count[1]} elements")

    mm = torch.nn.modules.module
    handles = [
        mm.register_module_parameter_registration_hook(hook),
        mm.register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _positive_int(kwargs: dict, name: str, source: str) -> int:
    v = kwargs.get(name)
    if type(v) is not int or v < 1:
        raise CheckpointError(f"{source}: recorded {name}={v!r} is not a positive integer")
    return v


_SHAPES_CACHE: dict[str, tuple] = {}  # meta-device builds are slow (~0.3 s for a tiny U-Net): keep the shapes


def _expected_shapes(
    cls: type, args: list, kwargs: dict, weights: dict[str, torch.Tensor], source: str
) -> dict:
    """Parameter and buffer shapes the recorded arguments give, found without allocating: the network
    is built on the meta device, its registrations bounded by what the file holds."""
    if cls.__name__ == "LowRankDenoiser":  # draws its init on a CPU generator: shapes from the arguments
        if args:
            raise CheckpointError(f"{source}: LowRankDenoiser takes keyword arguments only")
        k, d, r = (
            _positive_int(kwargs, n, source) for n in ("num_classes", "intrinsic_dim", "img_resolution")
        )
        c = _positive_int({"img_channels": 3, **kwargs}, "img_channels", source)
        return {"U": (k, c * r * r, d)}
    key = json.dumps([cls.__name__, args, kwargs], sort_keys=True)
    if key in _SHAPES_CACHE:
        return dict(_SHAPES_CACHE[key])
    total = sum(t.numel() for t in weights.values())
    try:
        with _registration_limit(len(weights) + 64, total + (1 << 20)), torch.device("meta"):
            net = cls(*args, **kwargs)
    except _TooBig as e:
        raise CheckpointError(
            f"{source}: the recorded arguments describe a larger {cls.__name__} than the "
            f"{len(weights)} tensors ({total} values) the file stores ({e}); refused before allocating"
        ) from None
    except Exception as e:  # bad recorded arguments: wrong names, types, values
        raise CheckpointError(
            f"{source}: cannot build {cls.__name__} from its recorded arguments ({type(e).__name__}: {e})"
        ) from None
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if len(_SHAPES_CACHE) >= 64:
        _SHAPES_CACHE.pop(next(iter(_SHAPES_CACHE)))
    _SHAPES_CACHE[key] = tuple(shapes.items())
    return shapes


def _check_shapes(expected: dict, weights: dict[str, torch.Tensor], class_name: str, source: str) -> None:
    missing = [k for k in expected if k not in weights]
    extra = [k for k in weights if k not in expected]
    wrong = [
        f"{k} {tuple(weights[k].shape)} vs {expected[k]}"
        for k in expected
        if k in weights and tuple(weights[k].shape) != tuple(expected[k])
    ]
    if missing or extra or wrong:
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {extra[:3]}" if extra else "",
            f"wrong shapes: {wrong[:3]}" if wrong else "",
        ]
        raise CheckpointError(
            f"{source}: weights do not fit {class_name}: " + "; ".join(p for p in parts if p)
        )
    for k, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: weight '{k}' contains NaN or infinite values")


def _construct(
    class_name: str, init_args: Any, init_kwargs: Any, weights: dict, source: str
) -> torch.nn.Module:
    """Build ``class_name`` from its recorded arguments once the stored ``weights`` fit its shapes."""
    cls = _network_class(class_name, source)
    args, kwargs = _arguments(class_name, init_args, init_kwargs, source)
    _check_shapes(_expected_shapes(cls, args, kwargs, weights, source), weights, class_name, source)
    if "generator" in inspect.signature(cls).parameters:
        kwargs["generator"] = torch.Generator().manual_seed(0)  # throwaway init, overwritten below
    try:
        return cls(*args, **kwargs)
    except Exception as e:
        raise CheckpointError(
            f"{source}: cannot build {class_name} from its recorded arguments ({type(e).__name__}: {e})"
        ) from None


def _collect_state(node: Any, prefix: str, out: dict[str, torch.Tensor], source: str) -> None:
    """Flatten a record tree's ``_parameters``/``_buffers``/``_modules`` into state_dict entries."""
    if not isinstance(node, PersistentRecord | ModuleRecord) or not isinstance(node.state, dict):
        raise CheckpointError(f"{source}: module '{prefix.rstrip('.') or '<root>'}' is not a recorded module")
    state = node.state
    for key in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(key) or {}, dict):
            raise CheckpointError(f"{source}: '{prefix}{key}' is not a dict")
    skip = state.get("_non_persistent_buffers_set") or ()
    if not isinstance(skip, set | frozenset | list | tuple):
        raise CheckpointError(f"{source}: '{prefix}_non_persistent_buffers_set' is not a set")
    entries = [(k, v) for k, v in (state.get("_parameters") or {}).items()]
    entries += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in set(skip)]
    for name, tensor in entries:
        if tensor is None:
            continue
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
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
    weights: dict[str, torch.Tensor] = {}
    _collect_state(record, "", weights, source)
    net = _construct(record.class_name, state.get("_init_args"), state.get("_init_kwargs"), weights, source)
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
            f"save_network: {name} is not a network of nbhelpers "
            "(networks, molrg.LowRankDenoiser) with recorded _init_kwargs"
        )

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


_MAX_CONFIG_BYTES = 1 << 20


def _read_member(path: Path, name: str, max_bytes: int | None = None) -> bytes:
    """Member ``name`` of an own-format zip (or file of a folder), its size bounded before reading."""
    if path.is_dir():
        member = path / name
        if not member.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if max_bytes is not None and member.stat().st_size > max_bytes:
            raise CheckpointError(f"{member}: larger than {max_bytes} bytes; not an nbhelpers {name}")
        return member.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            if name not in zf.namelist():
                raise CheckpointError(
                    f"{path}: zip without {name}; not an nbhelpers "
                    "network (torch.save files are not accepted)"
                )
            return safeload.read_zip_member(zf, name, str(path), max_bytes)
    except safeload.PickleError as e:
        raise _as_checkpoint_error(e) from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated zip ({e})") from e


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(_read_member(path, "config.json", _MAX_CONFIG_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: config.json is not valid JSON ({e})") from e
    except RecursionError:
        raise CheckpointError(f"{path}: config.json is nested too deeply") from None
    try:
        safeload.check_structure(config, f"{path}: config.json")
    except safeload.PickleError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: config.json does not describe an nbhelpers network")
    version = config.get("format_version", 1)
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: config.json has format_version {version!r}, not a positive integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version} is newer than this nbhelpers")
    if not isinstance(config.get("class_name"), str):
        raise CheckpointError(f"{path}: config.json has no class_name")
    return config


def _load_own(path: Path) -> torch.nn.Module:
    config = _read_config(path)
    class_name = config["class_name"]
    where = f"{path}:weights.pt"
    try:
        state_dict = safeload.read_torch_bytes(_read_member(path, "weights.pt"), where)
    except safeload.PickleError as e:
        raise _as_checkpoint_error(e) from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(f"{path}: weights.pt does not hold a state dict of tensors")
    net = _construct(class_name, config.get("init_args"), config.get("init_kwargs"), state_dict, str(path))
    _load_weights(net, state_dict, class_name, str(path))
    return net
