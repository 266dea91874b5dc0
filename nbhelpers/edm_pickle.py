"""Write EDM snapshot pickles as NVlabs' ``torch_utils.persistence`` does (test fixtures, smoke assets).

An EDM ``network-snapshot-*.pkl`` is a pickled dict ``{ema, loss_fn, augment_pipe, dataset_kwargs}``.
Every object of a persistent class (the networks and their layers) is pickled as a call of the global
``torch_utils.persistence._reconstruct_persistent_obj`` with one ``meta`` dict (``type``, ``version``,
``module_src``, ``class_name``, ``state``); ``state`` is the object's ``__dict__`` (``_parameters``,
``_buffers``, ``_modules``, plain attributes, ``_init_args``, ``_init_kwargs``). ``torch.nn``
containers (``ModuleDict``, ``ModuleList``) are pickled as ordinary objects and tensors as torch pickles
them. :func:`dumps` writes that global by name, so neither EDM nor ``torch_utils`` is needed here.
The reader is ``nbhelpers.checkpoints.load_network``, which never runs ``module_src``.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path

__all__ = ["PERSISTENCE_HOOK", "Persistent", "dumps", "edm_tree", "snapshot", "write_snapshot"]

PERSISTENCE_HOOK = ("torch_utils.persistence", "_reconstruct_persistent_obj")
PERSISTENCE_VERSION = 6  # torch_utils.persistence's format version in EDM's release


class _GlobalName:
    """A global referred to by module and name only (it need not be importable here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle wants a callable; this one only stands for a name
        raise TypeError(f"{self.module}.{self.name} is a name in a pickle, not a function here")


_HOOK = _GlobalName(*PERSISTENCE_HOOK)


class Persistent:
    """An EDM persistent object: pickles as ``_reconstruct_persistent_obj(meta)`` (through :func:`dumps`)."""

    def __init__(self, class_name: str, state: dict, module_src: str = ""):
        self.meta = dict(
            type="class",
            version=PERSISTENCE_VERSION,
            module_src=module_src,
            class_name=class_name,
            state=state,
        )

    def __reduce__(self):
        return (_HOOK, (self.meta,))


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets a type write its own opcodes
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_name(self, obj: _GlobalName) -> None:
        if self.proto >= 4:
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_GlobalName] = _save_global_name


def dumps(obj: Any, protocol: int = 4) -> bytes:
    """Pickle ``obj``; :class:`Persistent` objects become calls of EDM's persistence hook."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def _is_plain(v: Any) -> bool:
    if isinstance(v, bool | int | float | str | type(None) | np.generic):
        return True
    if isinstance(v, list | tuple):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(_is_plain(x) for x in v.values())
    return False


def edm_tree(
    module: torch.nn.Module,
    module_src: str = "",                 # the text EDM stores as the class's module source
    init_kwargs: dict | None = None,      # constructor kwargs recorded on this object (default: its own)
    child_init_kwargs: dict | None = None,  # recorded on every persistent child (default: its own or {})
    extra_state: dict | None = None,      # extra attributes on every persistent record
) -> Any:  # fmt: skip
    """EDM's pickled structure of ``module``: a :class:`Persistent` record for the project's own classes
    (state = the module ``__dict__`` with its children converted too), a plain clone for ``torch.nn``."""
    state: dict[str, Any] = {}
    for k, v in module.__dict__.items():
        if k in ("_parameters", "_buffers"):
            state[k] = collections.OrderedDict(v)
        elif k == "_modules":
            state[k] = collections.OrderedDict(
                (
                    name,
                    None
                    if child is None
                    else edm_tree(child, module_src, None, child_init_kwargs, extra_state),
                )
                for name, child in v.items()
            )
        elif k == "_non_persistent_buffers_set" or (k.startswith("_") and isinstance(v, dict) and not v):
            state[k] = v
        elif not k.startswith("_") and _is_plain(v):
            state[k] = v
    if type(module).__module__.startswith("torch.nn"):
        clone = type(module).__new__(type(module))
        clone.__dict__.update(state)
        return clone
    own = getattr(module, "_init_kwargs", None)
    if init_kwargs is None:
        init_kwargs = own if own is not None else (child_init_kwargs if child_init_kwargs is not None else {})
    state["_init_args"] = tuple(getattr(module, "_init_args", ()))
    state["_init_kwargs"] = dict(init_kwargs)
    state.update(extra_state or {})
    return Persistent(type(module).__name__, state, module_src)


_LOSS_STATE = {
    "VPPrecond": ("VPLoss", dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5)),
    "VEPrecond": ("VELoss", dict(sigma_min=0.02, sigma_max=100)),
    "EDMPrecond": ("EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)),
}


def snapshot(
    net: torch.nn.Module,
    module_src: str = "",
    dataset_kwargs: dict | None = None,
    augment_pipe: Any = None,
    **tree_kwargs: Any,
) -> dict[str, Any]:
    """The snapshot dict EDM's training loop pickles: ``ema`` (the network), the matching ``loss_fn``
    record, ``augment_pipe`` and ``dataset_kwargs``."""
    loss_name, loss_state = _LOSS_STATE.get(type(net).__name__, ("EDMLoss", {}))
    return dict(
        ema=edm_tree(net, module_src, **tree_kwargs),
        loss_fn=Persistent(
            loss_name, dict(loss_state, _init_args=(), _init_kwargs=dict(loss_state)), module_src
        ),
        augment_pipe=augment_pipe,
        dataset_kwargs=dict(
            dataset_kwargs
            or {
                "class_name": "training.dataset.ImageFolderDataset",
                "path": "dataset.zip",
                "use_labels": False,
            }
        ),
    )


def write_snapshot(
    path: str | os.PathLike,
    net: torch.nn.Module,
    module_src: str = "",
    protocol: int = 4,
    tree_kwargs: dict | None = None,
    **entries: Any,
) -> Path:
    """Write ``net`` atomically as an EDM ``network-snapshot-*.pkl``; ``entries`` add or replace
    top-level keys (``augment_pipe``, ``dataset_kwargs``, anything else)."""
    data = snapshot(net, module_src, **(tree_kwargs or {}))
    data.update(entries)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(dumps(data, protocol=protocol))
    return path
