"""save and load: one ``.npz`` file per checkpoint, written atomically, no pickle.

A checkpoint holds either a stateful optimizer's ``state_dict()`` or any pytree (a functional
optimizer state, params, or both in a dict). Arrays are stored as ``.npz`` entries; the tree
around them (dicts with any scalar keys, lists, tuples, NamedTuples, ``None``, numbers,
strings) as JSON in the entry ``__tree__``. Loading uses ``allow_pickle=False``.

A file that cannot be read as one raises :class:`CheckpointError`. Saving writes a temporary
file ``.<name>.<16 hex digits>.tmp`` next to the target, locked (``flock``) while the save runs,
and renames it over the target; such files left by a killed save are removed by the next save
of the same target (see :mod:`netcl_optim._atomic_file`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ._atomic_file import write_atomically
from ._device import BFLOAT16, default_queue
from ._packing import layout

_FORMAT = "netcl_optim.checkpoint/1"
_TREE = "__tree__"
_KINDS = ("state_dict", "pytree")


class CheckpointError(ValueError):
    """The file is not a valid or complete netcl_optim checkpoint: empty, truncated,
    corrupt, or another kind of file. ``path`` names it; the error that revealed it, if
    any, is the ``__cause__``. Nothing was loaded."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return (
            f"load: {self.path!r} is not a netcl_optim checkpoint, or not a complete one: "
            f"{self.reason}"
        )


class _Invalid(Exception):
    """Raised while decoding: the file's tree is malformed (becomes a CheckpointError)."""


class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _store(self, a: np.ndarray, tag: str) -> dict[str, str]:
        if a.dtype == BFLOAT16 and tag != "npscalar":  # as its 16-bit words (npz has no bf16)
            a, tag = a.view(np.uint16), tag + "_bf16"
        if a.dtype.kind not in "biufc":
            raise TypeError(f"save: cannot store an array of dtype {a.dtype} without pickle")
        name = f"a{len(self.arrays)}"
        self.arrays[name] = a  # (np.ascontiguousarray would make a 0-d array 1-d)
        return {tag: name}

    def encode(self, x: Any) -> Any:
        if isinstance(x, np.generic):  # before float: np.float64 is a float
            return self._store(np.asarray(x), "npscalar")
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, cla.Array):
            return self._store(x.get(), "device")
        if isinstance(x, np.ndarray):
            return self._store(x, "ndarray")
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            cls = type(x)
            return {
                "namedtuple": f"{cls.__module__}:{cls.__qualname__}",
                "fields": list(cast(Any, x)._fields),
                "values": [self.encode(v) for v in x],
            }
        if isinstance(x, tuple):
            return {"tuple": [self.encode(v) for v in x]}
        if isinstance(x, list):
            return {"list": [self.encode(v) for v in x]}
        if isinstance(x, Mapping):
            items = []
            for k, v in x.items():
                if not (k is None or isinstance(k, (bool, int, float, str))):
                    raise TypeError(f"save: dict key {k!r} is a {type(k).__name__}")
                items.append([k, self.encode(v)])
            return {"dict": items}
        raise TypeError(
            f"save: cannot store a {type(x).__name__} (arrays, numbers, strings, None, dicts, "
            "lists, tuples and NamedTuples only)"
        )


def _namedtuple_class(name: str, fields: list[str]) -> type:
    module_name, _, qualname = name.partition(":")
    module = sys.modules.get(module_name)
    if module is None and module_name.split(".")[0] == "netcl_optim":
        module = importlib.import_module(module_name)
    if module is None:
        raise ValueError(
            f"load: the checkpoint holds a {qualname} from module {module_name!r}, which is "
            "not imported: import it first"
        )
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        raise ValueError(f"load: {name} is not a NamedTuple class")
    if list(cast(Any, obj)._fields) != fields:
        raise ValueError(
            f"load: {name} now has fields {cast(Any, obj)._fields}, the checkpoint {fields}"
        )
    return obj


class _Decoder:
    """The tree of ``__tree__`` back to Python objects; raises ``_Invalid`` on any node that
    :class:`_Encoder` does not write (so a damaged file is never half-read)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def _array(self, name: Any) -> np.ndarray:
        if not isinstance(name, str) or name not in self.arrays:
            raise _Invalid(f"the array entry {name!r} is missing")
        return self.arrays[name]

    @staticmethod
    def _list(x: Any, what: str) -> list:
        if not isinstance(x, list):
            raise _Invalid(f"a {what} node holds {x!r:.80}, not a list")
        return x

    def decode(self, x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if not isinstance(x, dict) or len(x) != (3 if "namedtuple" in x else 1):
            raise _Invalid(f"unknown node {x!r:.80}")
        tag, value = next(iter(x.items()))
        if tag == "device":
            return _Pending(self._array(value))
        if tag == "ndarray":
            return np.array(self._array(value))
        if tag in ("device_bf16", "ndarray_bf16"):
            a = self._array(value)
            if a.dtype != np.uint16:
                raise _Invalid(f"the bfloat16 entry {value!r} has dtype {a.dtype}, not uint16")
            a = np.array(a).view(BFLOAT16)
            return _Pending(a) if tag == "device_bf16" else a
        if tag == "npscalar":
            a = self._array(value)
            if a.ndim != 0:
                raise _Invalid(f"the scalar entry {value!r} has shape {a.shape}")
            return a[()]
        if tag == "namedtuple":
            fields = self._list(x.get("fields"), "namedtuple")
            values = self._list(x.get("values"), "namedtuple")
            if not isinstance(value, str) or len(fields) != len(values):
                raise _Invalid(f"malformed NamedTuple node {x!r:.80}")
            cls = _namedtuple_class(value, fields)
            return cls(*[self.decode(v) for v in values])
        if tag == "tuple":
            return tuple(self.decode(v) for v in self._list(value, tag))
        if tag == "list":
            return [self.decode(v) for v in self._list(value, tag)]
        if tag == "dict":
            out = {}
            for item in self._list(value, tag):
                if not (isinstance(item, list) and len(item) == 2) or isinstance(
                    item[0], (list, dict)
                ):
                    raise _Invalid(f"a dict item is {item!r:.80}, not a [key, value] pair")
                out[item[0]] = self.decode(item[1])
            return out
        raise _Invalid(f"unknown node {sorted(x)}")


class _Pending:
    """A device array still on the host: placed (packed) after decoding."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host


def _place(tree: Any, queue: cl.CommandQueue) -> Any:
    """Replace every ``_Pending`` with a device array: all of one dtype packed in one buffer,
    in tree order, so a slot tree's leaves stay back to back (one launch per step)."""
    pending: list[_Pending] = []

    def collect(x: Any) -> None:
        if isinstance(x, _Pending):
            pending.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)

    collect(tree)
    placed: dict[int, cla.Array] = {}
    by_dtype: dict[np.dtype, list[_Pending]] = {}
    for p in pending:
        by_dtype.setdefault(p.host.dtype, []).append(p)
    for dtype, ps in by_dtype.items():
        lay = layout(tuple(p.host.shape for p in ps), dtype)
        block = lay.allocate(queue)
        if lay.total:
            block.upload(queue, np.concatenate([p.host.ravel() for p in ps]))
        for p, v in zip(ps, block.views, strict=True):
            placed[id(p)] = v

    def rebuild(x: Any) -> Any:
        if isinstance(x, _Pending):
            return placed[id(x)]
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*[rebuild(v) for v in x])
        if isinstance(x, tuple):
            return tuple(rebuild(v) for v in x)
        if isinstance(x, list):
            return [rebuild(v) for v in x]
        if isinstance(x, dict):
            return {k: rebuild(v) for k, v in x.items()}
        return x

    return rebuild(tree)


def save(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` to the ``.npz`` file ``path`` (used as given), atomically.

    ``obj`` is a stateful optimizer (anything with ``state_dict()``; its state dict is saved,
    as torch saves it: the parameters themselves are not part of it) or a pytree of device
    arrays, numpy arrays, numbers, strings and ``None`` in dicts, lists, tuples and
    NamedTuples (a functional optimizer state, params, ...). The file is written to a
    temporary file in the same directory, flushed and fsynced, then renamed over ``path``:
    a crash leaves the old checkpoint or the new one, never a torn file.

    A new file gets the mode the umask gives (0o644 under umask 0o022), an overwritten one
    keeps its mode. Temporary files of ``path`` left by a killed save are removed; those of
    saves still running (in any process) are not.

    Device: one read-back per device array (a host sync).
    """
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        kind, tree = "state_dict", obj.state_dict()
    else:
        kind, tree = "pytree", obj
    enc = _Encoder()
    meta = {"format": _FORMAT, "kind": kind, "tree": enc.encode(tree)}
    text = json.dumps(meta, allow_nan=True)
    arrays: dict[str, Any] = dict(enc.arrays)  # (Any: np.savez types **kwds as bool)
    arrays[_TREE] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    write_atomically(os.fspath(path), lambda f: np.savez(f, **arrays))


# what numpy, zipfile and json raise on a damaged file (OSError: a bad offset in the archive)
_DAMAGED = (
    ValueError,
    KeyError,
    IndexError,
    EOFError,
    OSError,
    NotImplementedError,
    RecursionError,
    zipfile.BadZipFile,
    zlib.error,
)


def _read(path: str) -> tuple[str, Any]:
    """The kind and the decoded tree of the checkpoint ``path``.

    Raises:
      OSError: the file cannot be opened.
      CheckpointError: it is not a complete checkpoint of this format.
    """
    with open(path, "rb") as f:
        try:
            head = f.read(6)
            f.seek(0)
            if not head:
                raise _Invalid("the file is empty")
            if head == b"\x93NUMPY":
                raise _Invalid("it holds a single .npy array, not an .npz archive")
            if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # (numpy would try pickle)
                raise _Invalid("it is not an .npz (zip) archive")
            with np.load(f, allow_pickle=False) as data:
                if _TREE not in data.files:
                    raise _Invalid(f"it has no {_TREE!r} entry")
                arrays = {name: data[name] for name in data.files}
            text = arrays.pop(_TREE)
            if not (isinstance(text, np.ndarray) and text.dtype == np.uint8 and text.ndim == 1):
                raise _Invalid(f"the {_TREE!r} entry is not a byte string")
            meta = json.loads(text.tobytes().decode("utf-8"))
            if not isinstance(meta, dict):
                raise _Invalid(f"its {_TREE!r} entry is a JSON {type(meta).__name__}")
            if meta.get("format") != _FORMAT:
                raise _Invalid(f"format {meta.get('format')!r}; this version reads {_FORMAT!r}")
            if meta.get("kind") not in _KINDS or "tree" not in meta:
                raise _Invalid(f"its {_TREE!r} entry lacks a valid 'kind' or 'tree'")
            for name, a in arrays.items():
                if not isinstance(a, np.ndarray) or a.dtype.kind not in "biufc":
                    raise _Invalid(f"the entry {name!r} is not a numeric array")
        except _Invalid as err:
            raise CheckpointError(path, str(err)) from None
        except _DAMAGED as err:
            raise CheckpointError(path, f"{type(err).__name__}: {err}") from err
    try:  # (a NamedTuple class that cannot be imported is a ValueError, not a damaged file)
        tree = _Decoder(arrays).decode(meta["tree"])
        if meta["kind"] == "state_dict" and not (
            isinstance(tree, dict) and {"state", "param_groups"} <= tree.keys()
        ):
            raise _Invalid("its state dict lacks 'state' or 'param_groups'")
    except _Invalid as err:
        raise CheckpointError(path, str(err)) from None
    except RecursionError as err:
        raise CheckpointError(path, "its tree is nested too deeply") from err
    return meta["kind"], tree


def load(
    path: str | os.PathLike[str], obj: Any = None, *, queue: cl.CommandQueue | None = None
) -> Any:
    """Read a checkpoint written by :func:`save`.

    With ``obj`` (a stateful optimizer), load the saved state dict into it with
    ``obj.load_state_dict`` and return ``obj``. Without, return what was saved: a pytree
    whose device arrays are back on the device (on ``queue``, default the library's queue;
    all arrays of one dtype packed in one buffer), or a state dict (numpy arrays).

    The whole file is read and checked before anything is loaded: on any error ``obj`` is
    unchanged.

    Raises:
      CheckpointError: (a ValueError) the file is not a valid or complete checkpoint of
        this format: empty, truncated, corrupt, or another kind of file.
      ValueError: a pytree given to an optimizer, a state dict that does not fit ``obj``,
        or a NamedTuple class that cannot be found.
      OSError: the file cannot be opened (e.g. ``FileNotFoundError``).
    """
    path = os.fspath(path)
    kind, tree = _read(path)
    if obj is not None:
        if kind != "state_dict":
            raise ValueError(
                "load: the checkpoint holds a functional pytree, not an optimizer's state dict: "
                "call load(path) without an optimizer"
            )
        obj.load_state_dict(_place(tree, queue or default_queue()))
        return obj
    return _place(tree, queue or default_queue())
