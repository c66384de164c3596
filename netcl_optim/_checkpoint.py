"""save and load: one ``.npz`` file per checkpoint, written atomically, no pickle.

A checkpoint holds either a stateful optimizer's ``state_dict()`` or any pytree (a functional
optimizer state, params, or both in a dict). Arrays are stored as ``.npz`` entries; the tree
around them (dicts with any scalar keys, lists, tuples, NamedTuples, ``None``, numbers,
strings) as JSON in the entry ``__tree__``. Loading uses ``allow_pickle=False``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ._device import default_queue
from ._packing import layout

_FORMAT = "netcl_optim.checkpoint/1"
_TREE = "__tree__"


class _Encoder:
    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def _store(self, a: np.ndarray, tag: str) -> dict[str, str]:
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
                "fields": list(x._fields),
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
    if list(obj._fields) != fields:
        raise ValueError(f"load: {name} now has fields {obj._fields}, the checkpoint {fields}")
    return obj


class _Decoder:
    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def decode(self, x: Any) -> Any:
        if not isinstance(x, dict):
            return x
        if "device" in x:
            return _Pending(self.arrays[x["device"]])
        if "ndarray" in x:
            return np.array(self.arrays[x["ndarray"]])
        if "npscalar" in x:
            return self.arrays[x["npscalar"]][()]
        if "namedtuple" in x:
            cls = _namedtuple_class(x["namedtuple"], x["fields"])
            return cls(*[self.decode(v) for v in x["values"]])
        if "tuple" in x:
            return tuple(self.decode(v) for v in x["tuple"])
        if "list" in x:
            return [self.decode(v) for v in x["list"]]
        if "dict" in x:
            return {k: self.decode(v) for k, v in x["dict"]}
        raise ValueError(f"load: unknown node {sorted(x)} in the checkpoint")


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

    Device: one read-back per device array (a host sync).
    """
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        kind, tree = "state_dict", obj.state_dict()
    else:
        kind, tree = "pytree", obj
    enc = _Encoder()
    meta = {"format": _FORMAT, "kind": kind, "tree": enc.encode(tree)}
    text = json.dumps(meta, allow_nan=True)
    arrays = dict(enc.arrays)
    arrays[_TREE] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable too (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(
    path: str | os.PathLike[str], obj: Any = None, *, queue: cl.CommandQueue | None = None
) -> Any:
    """Read a checkpoint written by :func:`save`.

    With ``obj`` (a stateful optimizer), load the saved state dict into it with
    ``obj.load_state_dict`` and return ``obj``. Without, return what was saved: a pytree
    whose device arrays are back on the device (on ``queue``, default the library's queue;
    all arrays of one dtype packed in one buffer), or a state dict (numpy arrays).

    Raises:
      ValueError: not a checkpoint of this format, or a pytree given to an optimizer.
    """
    with np.load(os.fspath(path), allow_pickle=False) as data:
        if _TREE not in data.files:
            raise ValueError(f"load: {os.fspath(path)!r} is not a netcl_optim checkpoint")
        meta = json.loads(bytes(data[_TREE]).decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"load: {os.fspath(path)!r} has an unknown checkpoint format")
        arrays = {name: data[name] for name in data.files if name != _TREE}
    tree = _Decoder(arrays).decode(meta["tree"])
    if obj is not None:
        if meta["kind"] != "state_dict":
            raise ValueError(
                "load: the checkpoint holds a functional pytree, not an optimizer's state dict: "
                "call load(path) without an optimizer"
            )
        obj.load_state_dict(_place(tree, queue or default_queue()))
        return obj
    return _place(tree, queue or default_queue())
