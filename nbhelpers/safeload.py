"""Read pickle-based files from untrusted sources: no code runs, nothing outside the file changes.

:func:`load_pickle` is an opcode-level pickle interpreter (protocols 0-5), not a subclass of
``pickle.Unpickler``. It never hands a real function or class to the pickle: a global is resolved
through an allow-list to an inert :class:`Global` token, and only the token's own handler (code of
this package that checks its arguments) runs on REDUCE/NEWOBJ. State-setting (BUILD) is allowed
only on :class:`Buildable` objects the loader itself created (records, pending numpy arrays and
dtypes); appends and item assignment only on the lists, dicts and sets it created. So a file can
neither poison a function's ``__defaults__`` nor reach ``setattr``/``__setstate__`` of anything.

Bounds. Memory is budgeted (default 64 MiB plus four times the input size; every object, string,
container slot and array is charged), containers nest at most ``max_depth`` levels (checked while
loading and again, with cycle detection, on the result), numpy arrays and scalars are rebuilt only
from plain numeric dtypes with the byte count checked before any element is read, and tensors only
from storages read from the file, with offsets and sizes checked against the bytes present. Zip
members are read with their decompressed size bounded. Anything else is a :class:`PickleError`
(a ``ValueError`` whose message names the file), never a crash.

Readers on top: :func:`torch_globals`/:func:`numpy_globals` (allow-lists), :func:`read_torch_file`
(``torch.save`` zip files: state dicts, training states) and :func:`read_zip_member`.
"""

from __future__ import annotations

import codecs
import collections
import io
import math
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_DEPTH",
    "PickleError",
    "UnsafePickleError",
    "PickleLimitError",
    "Buildable",
    "Global",
    "load_pickle",
    "check_structure",
    "numpy_globals",
    "torch_globals",
    "plain_globals",
    "read_zip_member",
    "read_torch_file",
    "read_torch_bytes",
]

MAX_DEPTH = 100  # nesting levels of containers (EDM snapshots need about 20)
_BASE_BUDGET = 64 << 20  # bytes any pickle may use, on top of 4 x its own size
_MAX_INT_BYTES = 64  # LONG1/LONG4 payloads (ints up to 2**511)
_MAX_DIMS = 32
_MAX_ZIP_RATIO = 100  # decompressed / compressed size of a deflated member


class PickleError(ValueError):
    """The data is not a pickle this reader accepts (corrupt, truncated, or of an unsupported kind)."""


class UnsafePickleError(PickleError):
    """The pickle asks for a global or an operation outside the allow-list; nothing from it was called."""


class PickleLimitError(PickleError):
    """The pickle would exceed a memory or nesting bound."""


class Buildable:
    """Base of objects the loader creates that accept BUILD: ``build(state)`` returns the final object."""

    def build(self, state: Any) -> Any:
        raise UnsafePickleError(f"BUILD is not supported on {type(self).__name__}")

    def children(self) -> Iterable[Any]:
        """Objects held by this one (for the nesting and cycle check)."""
        return ()


_NESTED = (list, tuple, dict, set, frozenset, Buildable)


class Global:
    """Inert token for an allow-listed global ``module.name``.

    ``call``: handler for REDUCE (``call(*args)``); ``new``: handler for NEWOBJ/``copyreg._reconstructor``;
    ``value``: what the token stands for when used as a plain value (e.g. a ``torch.dtype``).
    """

    __slots__ = ("module", "name", "call", "new", "value")

    def __init__(self, module: str, name: str, call=None, new=None, value=None):
        self.module, self.name, self.call, self.new, self.value = module, name, call, new, value

    def __repr__(self) -> str:
        return f"<global {self.module}.{self.name}>"


class _Budget:
    def __init__(self, limit: int):
        self.left = int(limit)
        self.limit = int(limit)

    def spend(self, n: int, where: str) -> None:
        self.left -= int(n)
        if self.left < 0:
            raise PickleLimitError(
                f"{where}: the pickle would need more than {self.limit / 2**20:.0f} MiB of memory; refused"
            )


def _default_budget(size: int) -> _Budget:
    return _Budget(_BASE_BUDGET + 4 * size)


_STOP = object()
_CONTAINERS = (list, tuple, dict, set, frozenset)


# ----------------------------------------------------------------------------
# The interpreter.


class _Machine:
    """One pickle program: stack, mark stack and memo, run over ``data`` from a position to STOP."""

    def __init__(
        self,
        data,
        where: str,
        resolve: Callable[[str, str], Global | None],
        persistent_load,
        encoding: str,
        budget: _Budget,
        max_depth: int,
        dict_types: tuple[type, ...],
    ):
        self.data = data if isinstance(data, bytes) else bytes(data)
        self.where = where
        self.resolve = resolve
        self.persistent_load = persistent_load
        self.encoding = encoding
        self.budget = budget
        self.max_depth = max_depth
        self.dict_types = (dict, collections.OrderedDict, *dict_types)
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, Any] = {}
        self.depths: dict[int, int] = {}
        self.pins: list = []  # keeps every container alive so that ids in ``depths`` stay unique
        self.pending_keys: dict[int, list[int]] = {}
        self.own_dicts: set[int] = set()  # OrderedDicts made here: BUILD may set their attributes
        self.pos = 0

    # -- errors and bookkeeping

    def fail(self, msg: str, cls: type[PickleError] = PickleError) -> PickleError:
        return cls(f"{self.where}: {msg} (pickle byte {self.pos})")

    def spend(self, n: int) -> None:
        budget = self.budget
        budget.left -= n
        if budget.left < 0:
            budget.spend(0, self.where)

    def located(self, e: PickleError) -> PickleError:
        """``e`` with this file's name in front (handlers raise without it)."""
        return e if str(e).startswith(self.where) else self.fail(str(e), type(e))

    def depth_of(self, obj: Any) -> int:
        return self.depths.get(id(obj), 0) if isinstance(obj, _NESTED) else 0

    def nest(self, obj: Any, items: Iterable[Any]) -> None:
        """Record that container ``obj`` holds ``items``: its depth is at least one more than theirs."""
        if not isinstance(obj, _NESTED):
            return
        depth = 1 + max((self.depth_of(x) for x in items), default=0)
        if depth > self.max_depth:
            raise self.fail(f"data nested more than {self.max_depth} levels deep", PickleLimitError)
        if depth > self.depths.get(id(obj), 0):
            if id(obj) not in self.depths:
                self.pins.append(obj)
            self.depths[id(obj)] = depth

    def push(self, obj: Any, cost: int = 56) -> None:
        budget = self.budget
        budget.left -= cost
        if budget.left < 0:
            budget.spend(0, self.where)
        self.stack.append(obj)

    # -- reading

    def read(self, n: int) -> bytes:
        if n < 0:
            raise self.fail("negative length")
        end = self.pos + n
        if end > len(self.data):
            raise self.fail("truncated pickle (unexpected end of data)")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def readline(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise self.fail("truncated pickle (unterminated line)")
        line = self.data[self.pos : end]
        self.pos = end + 1
        return line

    def uint(self, n: int) -> int:
        if n == 1 and self.pos < len(self.data):
            self.pos += 1
            return self.data[self.pos - 1]
        return int.from_bytes(self.read(n), "little", signed=False)

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow (malformed pickle)")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow (malformed pickle)")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise self.fail("MARK expected (malformed pickle)")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def text(self, raw: bytes | memoryview) -> str | bytes:
        """A Python 2 ``str`` (STRING opcodes): bytes with ``encoding='bytes'``, else decoded."""
        raw = bytes(raw)
        if self.encoding == "bytes":
            return raw
        try:
            return raw.decode(self.encoding)
        except (UnicodeDecodeError, LookupError) as e:
            raise self.fail(f"cannot decode a string ({e})") from None

    def unicode(self, raw: bytes | memoryview) -> str:
        try:
            return str(raw, "utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise self.fail(f"invalid UTF-8 string ({e})") from None

    # -- running

    def run(self, start: int = 0) -> tuple[Any, int]:
        self.pos = start
        ops = _OPS
        data = self.data
        n = len(data)
        while True:
            if self.pos >= n:
                raise self.fail("truncated pickle (no STOP opcode)")
            code = data[self.pos]
            self.pos += 1
            op = ops.get(code)
            if op is None:
                self.pos -= 1
                raise self.fail(f"opcode {bytes([code])!r} is not supported", UnsafePickleError)
            if op(self) is _STOP:
                return self.result, self.pos

    # -- helpers for opcodes

    def memo_put(self, key: int) -> None:
        if key < 0:
            raise self.fail("negative memo key")
        obj = self.top()
        self.spend(64)
        self.memo[key] = obj
        if isinstance(obj, Buildable):
            self.pending_keys.setdefault(id(obj), []).append(key)
            self.pins.append(obj)

    def memo_get(self, key: int) -> None:
        try:
            obj = self.memo[key]
        except KeyError:
            raise self.fail(f"memo key {key} missing (malformed pickle)") from None
        self.push(obj, 8)

    def resolve_global(self, module: str, name: str) -> None:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("STACK_GLOBAL needs two strings")
        token = self.resolve(module, name)
        if token is None:
            raise self.fail(
                f"global {module}.{name} is not allowed (only tensors, arrays and plain data are); "
                "refused, nothing in this file was run",
                UnsafePickleError,
            )
        self.push(token.value if token.value is not None else token)

    def call(self, func: Any, args: Any) -> None:
        if not isinstance(func, Global) or func.call is None:
            raise self.fail(
                f"REDUCE on {_what(func)}: only allow-listed functions can be called", UnsafePickleError
            )
        if not isinstance(args, tuple):
            raise self.fail(f"REDUCE arguments of {func!r} must be a tuple")
        self.push(self.guarded(func, func.call, args, {}))

    def new(self, cls: Any, args: Any, kwargs: Any) -> None:
        if not isinstance(cls, Global) or cls.new is None:
            raise self.fail(
                f"NEWOBJ on {_what(cls)}: only allow-listed classes can be created", UnsafePickleError
            )
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise self.fail(f"NEWOBJ arguments of {cls!r} are malformed")
        self.push(self.guarded(cls, cls.new, args, kwargs))

    def guarded(self, token: Global, fn: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            obj = fn(self, *args, **kwargs)
        except PickleError as e:
            raise self.located(e) from None
        except Exception as e:  # bad arguments to a handler: wrong types, counts, values
            raise self.fail(f"cannot rebuild {token.module}.{token.name} ({type(e).__name__}: {e})") from None
        self.nest(obj, (*args, *kwargs.values()))
        return obj

    def build(self) -> None:
        state = self.pop()
        target = self.top()
        if type(target) is collections.OrderedDict and id(target) in self.own_dicts:
            self.dict_attributes(target, state)
            return
        if not isinstance(target, Buildable):
            raise self.fail(
                f"BUILD (state-setting) on {_what(target)} is not allowed; only on objects this loader made",
                UnsafePickleError,
            )
        try:
            result = target.build(state)
        except PickleError as e:
            raise self.located(e) from None
        except Exception as e:
            raise self.fail(
                f"cannot set the state of {type(target).__name__} ({type(e).__name__}: {e})"
            ) from None
        self.nest(result, (state,))
        if result is not target:
            self.stack[-1] = result
            for key in self.pending_keys.pop(id(target), ()):
                if self.memo.get(key) is target:
                    self.memo[key] = result

    def own_dict(self, d: collections.OrderedDict) -> collections.OrderedDict:
        self.pins.append(d)
        self.own_dicts.add(id(d))
        return d

    def dict_attributes(self, target: collections.OrderedDict, state: Any) -> None:
        """BUILD on an OrderedDict this loader made (e.g. a state dict's ``_metadata``): plain names only."""
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and k.isidentifier() and not k.startswith("__") for k in state
        ):
            raise self.fail(
                "BUILD on an OrderedDict needs a dict of plain attribute names", UnsafePickleError
            )
        self.spend(96 * len(state))
        target.__dict__.update(state)
        self.nest(target, state.values())

    def append_items(self, target: Any, items: list) -> None:
        if type(target) is not list:
            raise self.fail(f"APPEND to {_what(target)} is not allowed", UnsafePickleError)
        self.spend(8 * len(items))
        target.extend(items)
        self.nest(target, items)

    def set_items(self, target: Any, items: list) -> None:
        if type(target) not in self.dict_types:
            raise self.fail(f"SETITEM on {_what(target)} is not allowed", UnsafePickleError)
        if len(items) % 2:
            raise self.fail("SETITEMS with an odd number of items")
        self.spend(96 * (len(items) // 2))
        try:
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        except TypeError as e:
            raise self.fail(f"bad dict key ({e})") from None
        self.nest(target, items)

    def add_items(self, target: Any, items: list) -> None:
        if type(target) is not set:
            raise self.fail(f"ADDITEMS to {_what(target)} is not allowed", UnsafePickleError)
        self.spend(48 * len(items))
        try:
            target.update(items)
        except TypeError as e:
            raise self.fail(f"bad set item ({e})") from None
        self.nest(target, items)

    def make_tuple(self, items: list | tuple) -> None:
        t = tuple(items)
        if t:
            self.nest(t, t)
        self.push(t, 56 + 8 * len(t))

    def persid(self, pid: Any) -> None:
        if self.persistent_load is None:
            raise self.fail("persistent ids are not allowed in this file", UnsafePickleError)
        try:
            obj = self.persistent_load(pid)
        except PickleError as e:
            raise self.located(e) from None
        except Exception as e:
            raise self.fail(f"bad persistent id ({type(e).__name__}: {e})") from None
        self.push(obj)


def _what(obj: Any) -> str:
    if isinstance(obj, Global):
        return repr(obj)
    return f"a {type(obj).__name__}"


def _op_table() -> dict[int, Callable[[_Machine], Any]]:
    """Opcode byte -> handler, for every opcode the reader supports (registered by group below)."""
    ops: dict[bytes, Callable[[_Machine], Any]] = {}

    def op(code: bytes):
        def register(fn):
            ops[code] = fn
            return fn

        return register

    for group in (_stack_ops, _number_ops, _text_ops, _container_ops, _memo_ops, _object_ops):
        group(ops, op)

    # Not supported (refused as unknown): INST, OBJ (old-style class instances), EXT1/2/4 (extension
    # registry), NEXT_BUFFER/READONLY_BUFFER (out-of-band buffers).
    return {code[0]: fn for code, fn in ops.items()}


def _stack_ops(ops: dict[bytes, Callable[[_Machine], Any]], op: Callable) -> None:
    """Framing, STOP, marks and the stack."""
    p = pickle

    @op(p.PROTO)
    def _proto(m):
        v = m.uint(1)
        if v > 5:
            raise m.fail(f"unsupported pickle protocol {v}")

    @op(p.FRAME)
    def _frame(m):
        m.read(8)  # frames only group opcodes; the data is read sequentially anyway

    @op(p.STOP)
    def _stop(m):
        m.result = m.pop()
        return _STOP

    @op(p.MARK)
    def _mark(m):
        m.spend(8)
        m.metastack.append(m.stack)
        m.stack = []

    @op(p.POP)
    def _pop(m):
        if m.stack:
            m.stack.pop()
        else:
            m.pop_mark()

    @op(p.POP_MARK)
    def _pop_mark(m):
        m.pop_mark()

    @op(p.DUP)
    def _dup(m):
        m.push(m.top(), 8)


def _number_ops(ops: dict[bytes, Callable[[_Machine], Any]], op: Callable) -> None:
    """Constants and numbers, binary and text."""
    p = pickle

    ops[p.NONE] = lambda m: m.push(None, 8)
    ops[p.NEWTRUE] = lambda m: m.push(True, 8)
    ops[p.NEWFALSE] = lambda m: m.push(False, 8)
    ops[p.BININT] = lambda m: m.push(int.from_bytes(m.read(4), "little", signed=True), 32)
    ops[p.BININT1] = lambda m: m.push(m.uint(1), 32)
    ops[p.BININT2] = lambda m: m.push(m.uint(2), 32)
    ops[p.BINFLOAT] = lambda m: m.push(struct.unpack(">d", m.read(8))[0], 32)

    def long_bytes(m, n):
        if n > _MAX_INT_BYTES:
            raise m.fail(f"integer of {n} bytes is too large", PickleLimitError)
        m.push(int.from_bytes(m.read(n), "little", signed=True), 32 + n)

    ops[p.LONG1] = lambda m: long_bytes(m, m.uint(1))
    ops[p.LONG4] = lambda m: long_bytes(m, int.from_bytes(m.read(4), "little", signed=True))

    def text_number(m, kind):
        line = m.readline()
        if len(line) > 4 * _MAX_INT_BYTES:
            raise m.fail("number too long", PickleLimitError)
        try:
            if kind == "int":
                value = {b"00": False, b"01": True}.get(line)
                value = int(line) if value is None else value
            elif kind == "long":
                value = int(line[:-1] if line.endswith(b"L") else line)
            else:
                value = float(line)
        except ValueError:
            raise m.fail(f"bad {kind} literal {line[:40]!r}") from None
        m.push(value, 32)

    ops[p.INT] = lambda m: text_number(m, "int")
    ops[p.LONG] = lambda m: text_number(m, "long")
    ops[p.FLOAT] = lambda m: text_number(m, "float")


def _text_ops(ops: dict[bytes, Callable[[_Machine], Any]], op: Callable) -> None:
    """Strings and bytes."""
    p = pickle

    def signed4(m):
        return int.from_bytes(m.read(4), "little", signed=True)

    ops[p.BINBYTES] = lambda m: (lambda n: m.push(bytes(m.read(n)), 40 + n))(m.uint(4))
    ops[p.SHORT_BINBYTES] = lambda m: (lambda n: m.push(bytes(m.read(n)), 40 + n))(m.uint(1))
    ops[p.BINBYTES8] = lambda m: (lambda n: m.push(bytes(m.read(n)), 40 + n))(m.uint(8))
    ops[p.BYTEARRAY8] = lambda m: (lambda n: m.push(bytearray(m.read(n)), 64 + n))(m.uint(8))
    ops[p.BINUNICODE] = lambda m: (lambda n: m.push(m.unicode(m.read(n)), 56 + 4 * n))(m.uint(4))
    ops[p.SHORT_BINUNICODE] = lambda m: (lambda n: m.push(m.unicode(m.read(n)), 56 + 4 * n))(m.uint(1))
    ops[p.BINUNICODE8] = lambda m: (lambda n: m.push(m.unicode(m.read(n)), 56 + 4 * n))(m.uint(8))
    ops[p.BINSTRING] = lambda m: (lambda n: m.push(m.text(m.read(n)), 56 + 4 * n))(signed4(m))
    ops[p.SHORT_BINSTRING] = lambda m: (lambda n: m.push(m.text(m.read(n)), 56 + 4 * n))(m.uint(1))

    @op(p.STRING)
    def _string(m):
        line = m.readline()
        if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b'"', b"'"):
            raise m.fail("the STRING opcode argument must be quoted")
        try:
            raw = codecs.escape_decode(line[1:-1])[0]
        except ValueError as e:
            raise m.fail(f"bad STRING literal ({e})") from None
        m.push(m.text(raw), 56 + 4 * len(raw))

    @op(p.UNICODE)
    def _unicode(m):
        line = m.readline()
        try:
            m.push(str(line, "raw-unicode-escape"), 56 + 4 * len(line))
        except UnicodeDecodeError as e:
            raise m.fail(f"bad UNICODE literal ({e})") from None


def _container_ops(ops: dict[bytes, Callable[[_Machine], Any]], op: Callable) -> None:
    """Lists, dicts, sets, tuples and their items."""
    p = pickle

    ops[p.EMPTY_LIST] = lambda m: m.push([], 56)
    ops[p.EMPTY_DICT] = lambda m: m.push({}, 64)
    ops[p.EMPTY_SET] = lambda m: m.push(set(), 216)
    ops[p.EMPTY_TUPLE] = lambda m: m.push((), 8)
    ops[p.TUPLE] = lambda m: m.make_tuple(m.pop_mark())
    ops[p.TUPLE1] = lambda m: m.make_tuple([m.pop()])
    ops[p.TUPLE2] = lambda m: m.make_tuple(list(reversed([m.pop(), m.pop()])))
    ops[p.TUPLE3] = lambda m: m.make_tuple(list(reversed([m.pop(), m.pop(), m.pop()])))

    @op(p.LIST)
    def _list(m):
        items = m.pop_mark()
        m.push([], 56)
        m.append_items(m.stack[-1], items)

    @op(p.DICT)
    def _dict(m):
        items = m.pop_mark()
        m.push({}, 64)
        m.set_items(m.stack[-1], items)

    @op(p.FROZENSET)
    def _frozenset(m):
        items = m.pop_mark()
        m.spend(48 * len(items))
        try:
            fs = frozenset(items)
        except TypeError as e:
            raise m.fail(f"bad frozenset item ({e})") from None
        m.nest(fs, fs)
        m.push(fs, 216)

    @op(p.APPEND)
    def _append(m):
        item = m.pop()
        m.append_items(m.top(), [item])

    @op(p.APPENDS)
    def _appends(m):
        items = m.pop_mark()
        m.append_items(m.top(), items)

    @op(p.SETITEM)
    def _setitem(m):
        value, key = m.pop(), m.pop()
        m.set_items(m.top(), [key, value])

    @op(p.SETITEMS)
    def _setitems(m):
        items = m.pop_mark()
        m.set_items(m.top(), items)

    @op(p.ADDITEMS)
    def _additems(m):
        items = m.pop_mark()
        m.add_items(m.top(), items)


def _memo_ops(ops: dict[bytes, Callable[[_Machine], Any]], op: Callable) -> None:
    """The memo."""
    p = pickle

    ops[p.PUT] = lambda m: m.memo_put(_line_int(m))
    ops[p.BINPUT] = lambda m: m.memo_put(m.uint(1))
    ops[p.LONG_BINPUT] = lambda m: m.memo_put(m.uint(4))
    ops[p.MEMOIZE] = lambda m: m.memo_put(len(m.memo))
    ops[p.GET] = lambda m: m.memo_get(_line_int(m))
    ops[p.BINGET] = lambda m: m.memo_get(m.uint(1))
    ops[p.LONG_BINGET] = lambda m: m.memo_get(m.uint(4))


def _object_ops(ops: dict[bytes, Callable[[_Machine], Any]], op: Callable) -> None:
    """Globals (through the allow-list), calls, BUILD and persistent ids."""
    p = pickle

    @op(p.GLOBAL)
    def _global(m):
        module, name = m.readline(), m.readline()
        try:
            m.resolve_global(module.decode("utf-8"), name.decode("utf-8"))
        except UnicodeDecodeError:
            raise m.fail("GLOBAL names must be UTF-8") from None

    @op(p.STACK_GLOBAL)
    def _stack_global(m):
        name, module = m.pop(), m.pop()
        m.resolve_global(module, name)

    @op(p.REDUCE)
    def _reduce(m):
        args = m.pop()
        m.call(m.pop(), args)

    @op(p.NEWOBJ)
    def _newobj(m):
        args = m.pop()
        m.new(m.pop(), args, {})

    @op(p.NEWOBJ_EX)
    def _newobj_ex(m):
        kwargs, args = m.pop(), m.pop()
        m.new(m.pop(), args, kwargs)

    ops[p.BUILD] = lambda m: m.build()
    ops[p.BINPERSID] = lambda m: m.persid(m.pop())
    ops[p.PERSID] = lambda m: m.persid(m.text(m.readline()) if m.encoding != "bytes" else m.readline())


def _line_int(m: _Machine) -> int:
    line = m.readline()
    if not line.isdigit() or len(line) > 18:
        raise m.fail(f"bad memo key {line[:20]!r}")
    return int(line)


_OPS = _op_table()


def load_pickle(
    data: bytes | bytearray | memoryview,
    where: str,
    resolve: Callable[[str, str], Global | None] | Mapping[tuple[str, str], Global],
    *,
    start: int = 0,
    persistent_load: Callable[[Any], Any] | None = None,
    encoding: str = "ASCII",
    budget: _Budget | None = None,
    max_depth: int = MAX_DEPTH,
    dict_types: tuple[type, ...] = (),
    return_end: bool = False,
) -> Any:
    """Run the pickle in ``data`` (from byte ``start``) with only the globals ``resolve`` allows.

    ``resolve``: a mapping or function ``(module, name) -> Global | None``. ``encoding``: how
    Python 2 strings are read ('bytes' keeps them as bytes). ``dict_types``: extra dict subclasses
    (made by handlers) that SETITEMS may fill. With ``return_end`` returns ``(obj, end_position)``.
    The result passes :func:`check_structure`.
    """
    if isinstance(resolve, Mapping):
        table = resolve
        resolve = lambda module, name: table.get((module, name))  # noqa: E731
    budget = budget if budget is not None else _default_budget(len(data))
    m = _Machine(data, where, resolve, persistent_load, encoding, budget, max_depth, dict_types)
    obj, end = m.run(start)
    del m
    check_structure(obj, where, max_depth)
    return (obj, end) if return_end else obj


# ----------------------------------------------------------------------------
# Structure check: nesting depth and cycles, without recursion.


def _children(x: Any) -> Iterable[Any]:
    if isinstance(x, dict):
        return [*x.keys(), *x.values(), *getattr(x, "__dict__", {}).values()]
    if isinstance(x, (list, tuple, set, frozenset)):
        return x
    if isinstance(x, Buildable):
        return x.children()
    return ()


def _is_node(x: Any) -> bool:
    return (isinstance(x, _CONTAINERS) and len(x) > 0) or isinstance(x, Buildable)


def check_structure(obj: Any, where: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`PickleLimitError` if ``obj`` nests containers deeper than ``max_depth`` or
    contains itself; otherwise recursive code (repr, deepcopy, json) is safe on it."""
    if not _is_node(obj):
        return
    height: dict[int, int] = {}
    on_path: set[int] = set()
    frames: list[list] = [[obj, iter(_children(obj)), 0]]
    on_path.add(id(obj))
    while frames:
        frame = frames[-1]
        for child in frame[1]:
            if not _is_node(child):
                continue
            cid = id(child)
            if cid in height:
                frame[2] = max(frame[2], height[cid])
                if len(frames) + height[cid] > max_depth:
                    raise PickleLimitError(f"{where}: data nested more than {max_depth} levels deep")
                continue
            if cid in on_path:
                raise PickleLimitError(f"{where}: the data contains itself (a reference cycle); refused")
            if len(frames) >= max_depth:
                raise PickleLimitError(f"{where}: data nested more than {max_depth} levels deep")
            on_path.add(cid)
            frames.append([child, iter(_children(child)), 0])
            break
        else:
            frames.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2] + 1
            if frames:
                frames[-1][2] = max(frames[-1][2], frame[2] + 1)


# ----------------------------------------------------------------------------
# Plain-data globals.


_OBJECT = Global("builtins", "object")
_DICT = Global("builtins", "dict")


def _ints(value: Any, what: str, nonneg: bool = True) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > _MAX_DIMS:
        raise PickleError(f"{what} must be a tuple of at most {_MAX_DIMS} integers")
    out = []
    for v in value:
        if type(v) is not int or (nonneg and v < 0):
            raise PickleError(f"{what} must hold {'non-negative ' if nonneg else ''}integers, got {v!r}")
        out.append(v)
    return tuple(out)


def _items(m: _Machine, iterable: Any = ()) -> list | tuple:
    if not isinstance(iterable, (list, tuple, set, frozenset)):
        raise PickleError(f"expected a list or tuple, got {type(iterable).__name__}")
    m.spend(48 * len(iterable))
    return iterable


def _bytearray(m: _Machine, data: Any = b"", encoding: str | None = None) -> bytearray:
    if isinstance(data, str) and encoding in ("latin1", "latin-1", "latin_1"):
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise PickleError(f"bytearray() of a {type(data).__name__} is not allowed")
    m.spend(64 + len(data))
    return bytearray(data)


def _encode(m: _Machine, text: Any, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "latin_1"):
        raise PickleError("_codecs.encode is allowed only for str with the latin1 encoding")
    m.spend(40 + len(text))
    return text.encode("latin1")


def _complex(m: _Machine, real: Any = 0.0, imag: Any = 0.0) -> complex:
    if type(real) not in (int, float) or type(imag) not in (int, float):
        raise PickleError("complex() takes two numbers")
    return complex(real, imag)


def _reconstructor(m: _Machine, cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` of protocols 0-1: a new allow-listed object (dict state for dicts)."""
    if not isinstance(cls, Global) or cls.new is None:
        raise PickleError(f"copyreg._reconstructor of {_what(cls)} is not allowed")
    obj = cls.new(m)
    if base is _OBJECT and state is None:
        return obj
    if base is _DICT and isinstance(obj, dict) and isinstance(state, dict):
        m.set_items(obj, [x for kv in state.items() for x in kv])
        return obj
    raise PickleError(f"copyreg._reconstructor of {cls!r} with base {_what(base)} is not allowed")


def plain_globals() -> dict[tuple[str, str], Global]:
    """Builtins that pickles of plain data use: set, frozenset, bytearray, complex, latin1 bytes."""
    table = {
        ("builtins", "set"): Global("builtins", "set", call=lambda m, x=(): set(_items(m, x))),
        ("builtins", "frozenset"): Global(
            "builtins", "frozenset", call=lambda m, x=(): frozenset(_items(m, x))
        ),
        ("builtins", "bytearray"): Global("builtins", "bytearray", call=_bytearray),
        ("builtins", "complex"): Global("builtins", "complex", call=_complex),
        ("builtins", "object"): _OBJECT,
        ("builtins", "dict"): _DICT,
        ("_codecs", "encode"): Global("_codecs", "encode", call=_encode),
        ("copyreg", "_reconstructor"): Global("copyreg", "_reconstructor", call=_reconstructor),
        ("collections", "OrderedDict"): Global(
            "collections",
            "OrderedDict",
            call=_ordered_dict,
            new=lambda m: m.own_dict(collections.OrderedDict()),
        ),
        ("builtins", "bytes"): Global("builtins", "bytes", call=_bytes),
    }
    for (module, name), token in list(table.items()):  # Python 2 spellings of protocol 0-2 pickles
        py2 = {"builtins": "__builtin__", "copyreg": "copy_reg"}.get(module)
        if py2:
            table[(py2, name)] = token
    return table


def _bytes(m: _Machine, data: Any = b"", encoding: str | None = None) -> bytes:
    return bytes(_bytearray(m, data, encoding))


def _ordered_dict(m: _Machine, items: Any = ()) -> collections.OrderedDict:
    d: collections.OrderedDict = m.own_dict(collections.OrderedDict())
    if items:
        pairs = _items(m, items)
        if not all(isinstance(kv, (tuple, list)) and len(kv) == 2 for kv in pairs):
            raise PickleError("OrderedDict() needs (key, value) pairs")
        m.set_items(d, [x for kv in pairs for x in kv])
    return d


# ----------------------------------------------------------------------------
# numpy: plain numeric dtypes, arrays and scalars, rebuilt from checked bytes.

_NUMERIC_SPEC = re.compile(r"^[<>=|]?(?:b1|\?|[iu][1248]|f[248]|c(?:8|16))$")


def _numeric_dtype(dt: Any) -> np.dtype:
    if isinstance(dt, _PendingDtype):
        dt = dt.dtype
    if not isinstance(dt, np.dtype):
        raise PickleError(f"expected a numpy dtype, got {type(dt).__name__}")
    if dt.kind not in "biufc" or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise UnsafePickleError(f"numpy dtype {dt} is not a plain numeric type; refused")
    return dt


class _PendingDtype(Buildable):
    """``numpy.dtype(spec, align, copy)`` before its BUILD (byte order); never numpy's own setstate."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not _NUMERIC_SPEC.match(spec):
            raise UnsafePickleError(f"numpy dtype {spec!r} is not a plain numeric type; refused")
        self.dtype = np.dtype(spec)

    def build(self, state: Any) -> np.dtype:
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise PickleError("unsupported numpy dtype state")
        endian, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None or (len(state) == 9 and state[8]):
            raise UnsafePickleError("structured or sub-array numpy dtypes are refused")
        if endian not in ("<", ">", "|", "="):
            raise PickleError(f"bad numpy byte order {endian!r}")
        return _numeric_dtype(self.dtype.newbyteorder(endian) if endian in "<>" else self.dtype)


def _raw_bytes(data: Any) -> bytes | bytearray:
    if isinstance(data, str):  # Python 2 pickles read with encoding='latin1'
        return data.encode("latin1")
    if isinstance(data, (bytes, bytearray)):
        return data
    raise UnsafePickleError(
        f"numpy data must be raw bytes, got a {type(data).__name__} (object arrays are refused)"
    )


def _array(m: _Machine | None, raw: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    dtype = _numeric_dtype(dtype)
    shape = _ints(shape, "numpy array shape")
    raw = _raw_bytes(raw)
    count = math.prod(shape)
    if count * dtype.itemsize != len(raw):
        raise PickleError(
            f"numpy array {shape} of {dtype} needs {count * dtype.itemsize} bytes, the file has {len(raw)}"
        )
    if m is not None:
        m.spend(count * dtype.itemsize + 112)
    if count == 0:
        return np.zeros(shape, dtype=dtype)
    flat = np.frombuffer(raw, dtype=dtype, count=count)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


class _PendingArray(Buildable):
    """``numpy.core.multiarray._reconstruct(ndarray, ...)`` before its BUILD (shape, dtype, bytes)."""

    def build(self, state: Any) -> np.ndarray:
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not isinstance(state, tuple) or len(state) != 4:
            raise PickleError("unsupported numpy array state")
        shape, dtype, fortran, raw = state
        if type(fortran) is not bool and fortran not in (0, 1):
            raise PickleError("bad numpy array order flag")
        return _array(self.m, raw, dtype, shape, bool(fortran))


_NDARRAY = Global("numpy", "ndarray")


def _reconstruct(m: _Machine, subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"numpy _reconstruct of {_what(subtype)}: only numpy.ndarray is allowed")
    pending = _PendingArray()
    pending.m = m
    return pending


def _scalar(m: _Machine, dtype: Any, data: Any = None) -> np.generic:
    dtype = _numeric_dtype(dtype)
    raw = _raw_bytes(data)
    if len(raw) != dtype.itemsize:
        raise PickleError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, count=1)[0].copy()


def _frombuffer(m: _Machine, buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if order not in ("C", "F"):
        raise PickleError(f"bad numpy order {order!r}")
    return _array(m, buf, dtype, shape, order == "F")


def numpy_globals() -> dict[tuple[str, str], Global]:
    """numpy arrays, scalars and dtypes (plain numeric types only), under numpy 1 and 2 names."""
    table = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): Global("numpy", "dtype", call=lambda m, *a: _PendingDtype(*a)),
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = Global(
            f"{core}.multiarray", "_reconstruct", call=_reconstruct
        )
        table[(f"{core}.multiarray", "scalar")] = Global(f"{core}.multiarray", "scalar", call=_scalar)
        table[(f"{core}.numeric", "_frombuffer")] = Global(f"{core}.numeric", "_frombuffer", call=_frombuffer)
    return table


# ----------------------------------------------------------------------------
# torch: storages read from the file's own bytes, tensors checked against them.

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {
    name: getattr(torch, name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)
}


class _StorageType:
    """Value of a global like ``torch.FloatStorage`` (it only names a dtype in persistent ids)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """A tensor storage read from the file: a flat tensor of ``dtype`` owning its bytes."""

    def __init__(self, raw: bytes | bytearray | memoryview, dtype: torch.dtype):
        size = torch.empty((), dtype=dtype).element_size()
        if len(raw) % size:
            raise PickleError(f"storage of {len(raw)} bytes is not a whole number of {dtype} elements")
        flat = (
            torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            if len(raw)
            else torch.empty(0, dtype=torch.uint8)
        )
        self.data = (flat != 0) if dtype == torch.bool else flat.view(dtype)
        self.dtype = dtype

    @property
    def numel(self) -> int:
        return self.data.numel()


def _tensor(storage: Any, offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor storage must come from the file, got {_what(storage)}")
    if type(offset) is not int or offset < 0:
        raise PickleError(f"bad storage offset {offset!r}")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if len(size) != len(stride):
        raise PickleError(f"tensor size {size} and stride {stride} differ in length")
    numel = math.prod(size)
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
    if end > storage.numel:
        raise PickleError(
            f"tensor of size {size} at offset {offset} (stride {stride}) reaches element {end}, but its "
            f"storage holds {storage.numel}"
        )
    t = torch.empty(0, dtype=storage.dtype)
    return t.set_(storage.data.untyped_storage(), offset, size, stride)


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and not (isinstance(hooks, dict) and not hooks):
        raise UnsafePickleError("tensors with backward hooks are refused")


def _rebuild_tensor_v2(m, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    _no_hooks(hooks)
    if metadata is not None and not (isinstance(metadata, dict) and not metadata):
        raise UnsafePickleError(f"tensor metadata {sorted(map(str, metadata))} is refused")
    t = _tensor(storage, offset, size, stride)
    if type(requires_grad) is not bool:
        raise PickleError("requires_grad must be a bool")
    return t.requires_grad_(requires_grad) if requires_grad else t


def _rebuild_parameter(m, data, requires_grad, hooks, state=None):
    _no_hooks(hooks)
    if state:
        raise UnsafePickleError("parameters with extra state are refused")
    if type(data) is not torch.Tensor or type(requires_grad) is not bool:
        raise PickleError("parameter data must be a tensor and requires_grad a bool")
    return torch.nn.Parameter(data, requires_grad=requires_grad)


def _torch_device(m, *args):
    if not args or len(args) > 2 or not isinstance(args[0], str) or len(args[0]) > 32:
        raise PickleError("bad torch.device arguments")
    return torch.device(*args)


def _torch_size(m, dims=()):
    return torch.Size(_ints(dims, "torch.Size"))


def torch_globals() -> dict[tuple[str, str], Global]:
    """Tensors, parameters, ``torch.Size``/``device``/dtypes and storage types, plus plain data."""
    table = plain_globals()
    for name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        table[("torch._utils", name)] = Global("torch._utils", name, call=_rebuild_tensor_v2)
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        table[("torch._utils", name)] = Global("torch._utils", name, call=_rebuild_parameter)
    table[("torch", "Size")] = Global("torch", "Size", call=_torch_size)
    table[("torch", "device")] = Global("torch", "device", call=_torch_device)
    for name, dtype in _TORCH_DTYPES.items():
        table[("torch", name)] = Global("torch", name, value=dtype)
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = Global("torch", name, value=_StorageType(dtype))
    return table


_STORAGE_GLOBALS: dict | None = None


def _storage_globals() -> dict[tuple[str, str], Global]:
    global _STORAGE_GLOBALS
    if _STORAGE_GLOBALS is None:
        _STORAGE_GLOBALS = {k: v for k, v in torch_globals().items() if isinstance(v.value, _StorageType)}
    return _STORAGE_GLOBALS


def _storage_pid(pid: Any, where: str) -> tuple[torch.dtype, str, int]:
    """(dtype, key, numel) of a ``('storage', type, key, location, numel[, view])`` persistent id."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
        raise PickleError(f"{where}: unsupported persistent id (not a tensor storage)")
    stype, key, _location, numel = pid[1:5]
    if len(pid) == 6 and pid[5] is not None:
        raise PickleError(f"{where}: storage views are not supported")
    if not isinstance(stype, _StorageType):
        raise UnsafePickleError(f"{where}: unknown storage type {_what(stype)}")
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", key) or ".." in key:
        raise PickleError(f"{where}: bad storage key {key!r}")
    if type(numel) is not int or numel < 0:
        raise PickleError(f"{where}: bad storage size {numel!r}")
    return stype.dtype, key, numel


# Legacy format inside EDM pickles: torch.storage._load_from_bytes(torch.save(storage, legacy)).
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def read_legacy_storage(m: _Machine, data: Any) -> _Storage:
    """``torch.storage._load_from_bytes``: parse the legacy ``torch.save`` of one storage by hand."""
    if not isinstance(data, (bytes, bytearray)):
        raise PickleError("_load_from_bytes needs bytes")
    where = f"{m.where} (tensor storage)"
    storage_globals = _storage_globals()
    refs: dict[str, tuple[torch.dtype, int]] = {}

    def persistent(pid: Any) -> tuple:
        dtype, key, numel = _storage_pid(pid, where)
        if key in refs and refs[key] != (dtype, numel):
            raise PickleError(f"{where}: storage {key} declared twice with different types")
        refs[key] = (dtype, numel)
        return ("ref", key)

    resolve = lambda module, name: storage_globals.get((module, name))  # noqa: E731
    sub_machine = _Machine(data, where, resolve, persistent, "ASCII", m.budget, 8, ())

    def sub(pos: int, pid=None) -> tuple[Any, int]:
        sub_machine.stack, sub_machine.memo = [], {}
        sub_machine.persistent_load = pid
        return sub_machine.run(pos)

    magic, pos = sub(0)
    proto, pos = sub(pos)
    if magic != _LEGACY_MAGIC or proto != _LEGACY_PROTOCOL:
        raise PickleError(f"{where}: not a torch storage (bad magic number or protocol)")
    sys_info, pos = sub(pos)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise PickleError(f"{where}: only little-endian storages are supported")
    ref, pos = sub(pos, persistent)
    keys, pos = sub(pos)
    if not (isinstance(ref, tuple) and len(ref) == 2 and ref[0] == "ref") or not isinstance(keys, list):
        raise PickleError(f"{where}: does not hold exactly one storage")
    storages: dict[str, _Storage] = {}
    for key in keys:
        if key not in refs or key in storages:
            raise PickleError(f"{where}: unexpected storage key {key!r}")
        dtype, numel = refs[key]
        size = torch.empty((), dtype=dtype).element_size()
        if pos + 8 > len(data):
            raise PickleError(f"{where}: truncated storage data")
        stored = int.from_bytes(data[pos : pos + 8], "little", signed=True)
        pos += 8
        nbytes = numel * size
        if stored != numel or pos + nbytes > len(data):
            raise PickleError(
                f"{where}: storage declares {numel} elements, the data holds {stored} "
                f"({len(data) - pos} bytes left)"
            )
        m.spend(nbytes + 256)
        storages[key] = _Storage(memoryview(data)[pos : pos + nbytes], dtype)
        pos += nbytes
    if ref[1] not in storages:
        raise PickleError(f"{where}: storage {ref[1]!r} has no data")
    return storages[ref[1]]


# ----------------------------------------------------------------------------
# Zip members and torch.save zip files.


def read_zip_member(zf: zipfile.ZipFile, name: str, where: str, max_bytes: int | None = None) -> bytes:
    """Bytes of member ``name``, its decompressed size bounded (``max_bytes``, and 100x its compressed
    size when compressed) before anything is decompressed; a corrupt member is a :class:`PickleError`."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise PickleError(f"{where}: no member {name!r}") from None
    limit = (
        info.compress_size
        if info.compress_type == zipfile.ZIP_STORED
        else _MAX_ZIP_RATIO * info.compress_size + (1 << 20)
    )
    if max_bytes is not None:
        limit = min(limit, max_bytes)
    if info.file_size > limit:
        raise PickleLimitError(
            f"{where}: member {name!r} would decompress to {info.file_size} bytes from "
            f"{info.compress_size} (more than the {limit} allowed); refused"
        )
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except Exception as e:  # zlib.error, BadZipFile (CRC), EOFError, NotImplementedError, encrypted ...
        raise PickleError(
            f"{where}: member {name!r} is corrupt or unreadable ({type(e).__name__}: {e})"
        ) from None
    if len(data) != info.file_size:
        raise PickleError(f"{where}: member {name!r} has {len(data)} bytes, its header says {info.file_size}")
    return data


def _open_zip(source: Any, where: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise PickleError(f"{where}: not a readable zip archive ({type(e).__name__}: {e})") from None


def read_torch_bytes(data: bytes | bytearray, where: str) -> Any:
    """:func:`read_torch_file` on the bytes of a ``torch.save`` zip (e.g. a member of another zip)."""
    return _read_torch_zip(_open_zip(data, where), where, len(data))


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file (zip format) of tensors and plain data, onto the CPU, safely.

    Only :func:`torch_globals` resolve; storages come from the archive's own records, whose sizes
    are checked. Returns the saved object; raises :class:`PickleError` naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] != b"PK":
            raise PickleError(f"{path}: not a torch.save zip file (legacy or foreign format)")
        zf = _open_zip(f, str(path))
        with zf:
            return _read_torch_zip(zf, str(path), path.stat().st_size)


def _read_torch_zip(zf: zipfile.ZipFile, where: str, size: int) -> Any:
    names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise PickleError(f"{where}: not a torch.save archive (no single '<name>/data.pkl')")
    prefix = names[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in zf.namelist():
        order = read_zip_member(zf, f"{prefix}byteorder", where, 16)
        if order != b"little":
            raise PickleError(f"{where}: byte order {order!r} is not supported")
    budget = _default_budget(size)
    storages: dict[str, _Storage] = {}

    def persistent(pid: Any) -> _Storage:
        dtype, key, numel = _storage_pid(pid, where)
        if key not in storages:
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            raw = read_zip_member(zf, f"{prefix}data/{key}", where, nbytes)
            if len(raw) != nbytes:
                raise PickleError(f"{where}: storage {key} has {len(raw)} bytes, {nbytes} declared")
            budget.spend(2 * nbytes, where)
            storages[key] = _Storage(raw, dtype)
        elif storages[key].dtype != dtype or storages[key].numel != numel:
            raise PickleError(f"{where}: storage {key} declared twice with different types")
        return storages[key]

    data = read_zip_member(zf, names[0], where, 1 << 30)
    return load_pickle(data, where, torch_globals(), persistent_load=persistent, budget=budget)
