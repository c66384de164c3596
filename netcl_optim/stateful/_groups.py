"""Param groups of the stateful optimizers: the parameters' checks, their packing, the record
of each group (packed state buffers, per-parameter counts) and the checks of a step's grads.

All raise before anything changes, naming ``param_groups[i]['params'][j]``.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyopencl.array as cla

from .._base import PARAMS
from .._device import check_float_dtype, queue_of, state_dtype
from .._packing import (
    DONATED,
    Block,
    DonatedArray,
    DonatedArrayError,
    c_strides,
    contiguous_run,
    first_shared,
    layout,
    pack,
    same_memory,
)
from ..fusion import (
    EightBit,
    copy_params,
    host_value,
    init_quantized,
    set_value,
    slice_pieces,
    sliced,
    state_size,
    stored_8bit,
)

_NONE_TYPE = type(None)


def _concrete(shape: Any) -> tuple[int, ...]:
    """A state shape, a ``(1,)`` placeholder for ``None``."""
    return (1,) if shape is None else tuple(shape)


def is_param(p: Any) -> bool:
    """An object with ``.data`` and ``.grad`` (a :class:`Parameter`, a torch-like tensor)."""
    return hasattr(p, "data") and hasattr(p, "grad") and not isinstance(p, (cla.Array, Mapping))


class Group:
    """Internal record of one param group: packed views, per-param counts, named buffers."""

    def __init__(self, params: list[Any], queue: Any) -> None:
        n = len(params)
        self.params = params
        self.queue = queue
        self.data = [p.data for p in params]  # the packed views: identity is the fast check
        self.shapes = [d.shape for d in self.data]
        self.dtypes = [d.dtype for d in self.data]
        self.strides = [
            c_strides(s, d.itemsize) for s, d in zip(self.shapes, self.dtypes, strict=True)
        ]
        self.context = self.data[0].context if n else None
        self.steps = [0] * n
        self.counts: dict[str, list[int]] = {}
        self.bufs: dict[str, list[cla.Array]] = {}
        self.starts: dict[str, Any] = {}  # each buffer's start value (0 when absent)
        self.blocks: dict[str, list[Block]] = {}
        # 8-bit keys and keys that start at the params (PARAMS): their start (see reset)
        self.refills: dict[str, Any] = {}
        self.grad_views: list[cla.Array] | None = None
        self.grad_blocks: list[Block] = []
        # per dtype, the element index of the group's first element (Fragment.element_index):
        # set by ZeroRedundancyOptimizer, whose groups are slices of the whole model's
        self.element_origins: dict[np.dtype, int] = {}
        # ZeroRedundancyOptimizer, for rules with a value per leaf: per dtype, the shapes of
        # the whole leaves the group's one parameter is a slice of, and a maker of the step's
        # fusion Slice (see fusion/_slices.py)
        self.whole_shapes: dict[np.dtype, tuple[tuple[int, ...], ...]] = {}
        self.slices: dict[np.dtype, Callable[[], Any]] = {}

    def _allocate(
        self,
        dtype_of: Callable[[np.dtype], np.dtype],
        start: float = 0.0,
        shape_of: Callable[[tuple[int, ...]], Any] | None = None,
    ) -> tuple[list, list[Block]]:
        """Views packed per dtype, filled with ``start``, and the packed block of each dtype;
        shaped like the params, or ``shape_of(param shape)`` (``None``: a ``(1,)``
        placeholder)."""
        views: list[Any] = [None] * len(self.params)
        blocks = []
        by_dtype: dict[np.dtype, list[int]] = {}
        for i, d in enumerate(self.dtypes):
            by_dtype.setdefault(d, []).append(i)
        for dtype, idx in by_dtype.items():
            shapes = tuple(_concrete(self.state_shape(i, shape_of)) for i in idx)
            lay = layout(shapes, dtype_of(dtype))
            block = lay.allocate(self.queue)
            block.fill(self.queue, start)
            blocks.append(block)
            for i, v in zip(idx, block.views, strict=True):
                views[i] = v
        return views, blocks

    def state_shape(self, i: int, shape_of: Callable[[tuple], Any] | None) -> Any:
        """Parameter ``i``'s buffer shape for a key of ``shape_of`` (``None``: shaped like
        the parameter; see ``key_shapes``); for a ZeRO slice of whole leaves, the whole
        leaves' state end to end (placeholders included)."""
        if shape_of is None:
            return self.shapes[i]
        whole = self.whole_shapes.get(self.dtypes[i])
        if whole is None:
            return shape_of(self.shapes[i])
        return (sum(math.prod(_concrete(shape_of(s))) for s in whole),)

    def ensure(
        self,
        key: str,
        start: Any = 0.0,
        shape_of: Callable[[tuple], Any] | None = None,
        dtype: Any = None,
    ) -> None:
        """Create the state buffer ``key`` (packed per dtype), filled with its slot's
        ``start`` value (``PARAMS``: a copy of the params' values), if it is missing: shaped
        like the params, or ``shape_of(param shape)`` (one value per parameter: ``()``;
        ``None``: a placeholder); stored as
        ``dtype`` (None: the state dtype; an ``EightBit``: 8-bit state, see
        ``fusion/_quantized.py``). A buffer stored another way (the group's storage
        changed) is converted, its values kept (rounded, or quantized)."""
        old = self.bufs.get(key)
        if old is not None and self._stored_as(old, dtype):
            return
        fill = 0.0 if start is PARAMS else start
        if isinstance(dtype, EightBit):
            with self.sliced():  # (a ZeRO slice: 8-bit state of its pieces)
                new = init_quantized(self.data, self.queue, fill, dtype.signed, dtype.min_size)
            self.bufs[key], self.blocks[key] = new, []
            self.refills[key] = start
        else:

            def dtype_of(d: np.dtype) -> np.dtype:
                return state_dtype(d) if dtype is None or d == np.float64 else np.dtype(dtype)

            self.bufs[key], self.blocks[key] = self._allocate(dtype_of, fill, shape_of)
            self.refills.pop(key, None)
            if start is PARAMS:
                self.refills[key] = start
        if old is not None:
            for value, buf in zip(old, self.bufs[key], strict=True):
                set_value(buf, host_value(value))
            return
        self.counts[key] = [0] * len(self.params)
        if start is PARAMS:
            copy_params(self.bufs[key], self.data, self.queue)
        if start:
            self.starts[key] = start

    def _stored_as(self, bufs: list[Any], dtype: Any) -> bool:
        """Whether ``bufs`` (a key's buffers) are stored as ``dtype`` says (see ``ensure``)."""
        if isinstance(dtype, EightBit):
            return all(
                stored_8bit(b, d.size, dtype.signed, dtype.min_size, self.pieces(i))
                for i, (b, d) in enumerate(zip(bufs, self.data, strict=True))
            )
        return all(
            isinstance(b, cla.Array)
            and b.dtype == (state_dtype(d) if dtype is None or d == np.float64 else dtype)
            for b, d in zip(bufs, self.dtypes, strict=True)
        )

    def sliced(self) -> contextlib.AbstractContextManager[None]:
        """Inside it, a ZeRO group's parameters are their slices (``fusion.sliced``)."""
        if not self.slices:
            return contextlib.nullcontext()
        return sliced({d: make() for d, make in self.slices.items()})

    def pieces(self, i: int) -> list[tuple[int, int, int]] | None:
        """For a ZeRO slice (ZeroRedundancyOptimizer), parameter ``i``'s pieces of whole
        parameters (``fusion.slice_pieces``); else ``None``."""
        make = self.slices.get(self.dtypes[i])
        if make is None:
            return None
        s = make()
        return slice_pieces(s.shapes, s.lo, s.hi)

    def ensure_grads(self) -> None:
        if self.grad_views is None:
            self.grad_views, self.grad_blocks = self._allocate(lambda d: d)

    def reset(self) -> None:
        """Forget all state (counts 0, buffers at their start values, as freshly created)."""
        self.steps = [0] * len(self.params)
        for key, blocks in self.blocks.items():
            self.counts[key] = [0] * len(self.params)
            start = self.starts.get(key, 0.0)
            for block in blocks:
                block.fill(self.queue, 0.0 if start is PARAMS else start)
            refill = self.refills.get(key)
            if refill is PARAMS:  # (the params' values now)
                copy_params(self.bufs[key], [p.data for p in self.params], self.queue)
            elif refill is not None:
                for buf in self.bufs[key]:
                    set_value(buf, np.full(state_size(buf), refill, np.float32))

    def has_state(self, i: int) -> bool:
        return self.steps[i] > 0 or any(c[i] for c in self.counts.values())

    def cohorts(self, members: list[int], keys: list[str]) -> list[list[int]]:
        """``members`` grouped by their counts (normally one cohort: the whole group)."""
        columns = [self.steps] + [self.counts[k] for k in keys]
        if len(members) == len(self.params) and all(min(c) == max(c) for c in columns):
            return [members]
        by: dict[tuple[int, ...], list[int]] = {}
        for i in members:
            by.setdefault(tuple(c[i] for c in columns), []).append(i)
        return list(by.values())

    def _members_fast(self) -> list[int] | None:
        """The common case of :meth:`members` as list comparisons: every param has a grad,
        ``.data`` is still the packed view, and every grad is a C-contiguous device array
        shaped, typed and placed like its param. ``None``: check one by one."""
        params = self.params
        grads = [p.grad for p in params]
        if _NONE_TYPE in set(map(type, grads)):
            return None
        if not all(map(operator.is_, [p.data for p in params], self.data)):
            return None
        try:
            if [g.shape for g in grads] != self.shapes or [g.dtype for g in grads] != self.dtypes:
                return None
            if [g.strides for g in grads] != self.strides:
                return None
            contexts = [g.context for g in grads]
        except (AttributeError, DonatedArrayError):
            return None
        if contexts.count(self.context) != len(contexts):
            return None
        return list(range(len(params)))

    def members(self, group: Mapping[str, Any], gi: int) -> tuple[list[int], bool]:
        """Indices of the group's params with a grad, all checked (raises before any launch),
        and whether a ``.data`` was rebound since the packing (then check for shared memory
        with :func:`check_unshared`)."""
        params = group["params"]
        if len(params) != len(self.params) or any(
            a is not b for a, b in zip(params, self.params, strict=True)
        ):
            raise ValueError(
                f"param_groups[{gi}]['params'] was changed: use add_param_group to add parameters"
            )
        fast = self._members_fast()
        if fast is not None:
            return fast, False
        members = []
        views = self.grad_views
        rebound = False
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            members.append(i)
            d = p.data
            if d is self.data[i] and views is not None and g is views[i]:
                continue  # packed data and packed grad: checked when they were made
            rebound = rebound or d is not self.data[i]
            bad = self._bad_param(i, d, g, f"parameter {i} of param group {gi}")
            if bad is not None:
                raise bad
        return members, rebound

    def _bad_param(self, i: int, d: Any, g: Any, where: str) -> BaseException | None:
        """The error for parameter ``i`` with data ``d`` and grad ``g``, if any."""
        if type(d) is DonatedArray or type(g) is DonatedArray:
            which = "data" if type(d) is DonatedArray else "grad"
            return DonatedArrayError(f"{where}: .{which} {DONATED}")
        if not isinstance(d, cla.Array):
            return TypeError(f"{where}: .data is a {type(d).__name__}, not a device array")
        if d.shape != self.shapes[i]:
            return ValueError(
                f"{where}: .data has shape {d.shape}, but the optimizer has {self.shapes[i]}"
            )
        if d.dtype != self.dtypes[i]:
            return TypeError(
                f"{where}: .data has dtype {d.dtype}, but the optimizer has {self.dtypes[i]}"
            )
        if d.context != self.context:
            return ValueError(f"{where}: .data belongs to another OpenCL context")
        if not d.flags.c_contiguous:
            return ValueError(f"{where}: .data is not C-contiguous")
        if not isinstance(g, cla.Array):
            return TypeError(f"{where}: .grad is a {type(g).__name__}, not a pyopencl.array.Array")
        if g.context != d.context:
            return ValueError(f"{where}: .grad belongs to another OpenCL context than .data")
        if g.shape != d.shape:
            return ValueError(f"{where}: .grad has shape {g.shape}, but .data has {d.shape}")
        if g.dtype != d.dtype:
            return TypeError(f"{where}: .grad has dtype {g.dtype}, but .data has {d.dtype}")
        if not g.flags.c_contiguous:
            return ValueError(f"{where}: .grad is not C-contiguous")
        return None


def check_unshared(groups: list[list[Any]]) -> None:
    """Raise ``ValueError`` naming two parameters whose ``.data`` share memory (tied weights,
    overlapping views): each parameter gets its own in-place update, so shared memory would
    be written twice, with two states. ``groups``: the ``.data`` of each group's parameters
    (anything but a live device array is skipped)."""
    found = [
        [
            (i, d)
            for i, d in enumerate(arrays)
            if isinstance(d, cla.Array) and type(d) is not DonatedArray
        ]
        for arrays in groups
    ]
    pair = first_shared([([d for _, d in f], True) for f in found])
    if pair is None:
        return
    (ga, ja), (gb, jb) = pair
    (ia, a), (ib, b) = found[ga][ja], found[gb][jb]
    names = f"param_groups[{ga}]['params'][{ia}] and param_groups[{gb}]['params'][{ib}]"
    if same_memory(a, b):
        raise ValueError(
            f"{names} are one array (tied weights): the optimizer would step it twice, with "
            "two states. Pass the shared parameter once and accumulate both gradients into "
            "its .grad (as torch's autograd does for a shared weight)"
        )
    raise ValueError(
        f"{names} overlap in memory (views of one buffer): each parameter needs memory of "
        "its own, as the optimizer updates each in place"
    )


def as_param_groups(params: Any) -> list[Mapping[str, Any]]:
    """The constructor's ``params`` as a list of param group dicts."""
    what = "params argument given to the optimizer should be an iterable of parameters or dicts"
    if isinstance(params, cla.Array) or is_param(params):
        raise TypeError(f"{what}, but got a single {type(params).__name__}: pass a list")
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"{what}, but got a set, whose order changes between runs: use a list")
    if isinstance(params, Mapping):
        raise TypeError(f"{what}, but got a dict: pass a list of param group dicts")
    try:
        items = list(params)
    except TypeError:
        raise TypeError(f"{what}, but got {type(params).__name__}") from None
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(items[0], Mapping):
        return [{"params": items}]
    for j, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise TypeError(f"{what}: item {j} is a {type(item).__name__} among param groups")
    return items


def group_params(params: Any, gi: int) -> list[Any]:
    """A group's ``"params"`` as a list of checked parameters (not packed yet)."""
    if isinstance(params, (cla.Array,)) or is_param(params):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise TypeError(
            "optimizer parameters need to be organized in ordered collections, but the "
            "ordering of parameters in sets changes between runs: use a list"
        )
    else:
        try:
            params = list(params)
        except TypeError:
            raise TypeError(
                f"param_groups[{gi}]['params'] must be an iterable of parameters, got "
                f"{type(params).__name__}"
            ) from None
    seen: set[int] = set()
    for j, p in enumerate(params):
        where = f"param_groups[{gi}]['params'][{j}]"
        if isinstance(p, cla.Array):
            raise TypeError(
                f"{where} is a bare pyopencl Array: wrap it in netcl_optim.Parameter (an object "
                "with .data and .grad)"
            )
        if not is_param(p):
            raise TypeError(
                f"optimizer can only optimize objects with .data and .grad (e.g. Parameter), "
                f"but {where} is a {type(p).__name__}"
            )
        if not isinstance(p.data, cla.Array):
            raise TypeError(
                f"{where}.data is a {type(p.data).__name__}, not a pyopencl.array.Array"
            )
        if type(p.data) is DonatedArray:
            raise DonatedArrayError(f"{where}.data {DONATED}")
        if id(p) in seen:
            raise ValueError(f"{where} appears twice in the group")
        seen.add(id(p))
    return params


def check_placement(arrays: list[cla.Array], gi: int, context: Any) -> Any:
    """The queue of a new group's ``arrays``, which must all be in ``context`` (the other
    groups'; ``None`` for the first), of a float dtype and C-contiguous."""
    queue = queue_of(arrays)
    context = context if context is not None else queue.context
    for j, d in enumerate(arrays):
        where = f"param_groups[{gi}]['params'][{j}]"
        if d.context != context or queue.context != context:
            raise ValueError(
                f"{where} belongs to another OpenCL context than the optimizer's other parameters"
            )
        check_float_dtype(d.dtype, queue, where)
        if not d.flags.c_contiguous:
            raise ValueError(f"{where}.data is not C-contiguous")
    return queue


def pack_params(params: list[Any], queue: Any) -> None:
    """Rebind the params' ``.data`` to views of one buffer per dtype (values unchanged; arrays
    already back to back are kept). A ``.data`` that cannot be rebound raises TypeError with
    every parameter as it was."""
    arrays = [p.data for p in params]
    by_dtype: dict[np.dtype, list[int]] = {}
    for j, d in enumerate(arrays):
        by_dtype.setdefault(d.dtype, []).append(j)
    for idx in by_dtype.values():
        xs = [arrays[j] for j in idx]
        if contiguous_run(xs) is not None:
            continue
        for j, view in zip(idx, pack(xs, queue), strict=True):
            arrays[j] = view
    originals = [p.data for p in params]
    for p, d in zip(params, arrays, strict=True):
        if p.data is not d:
            try:
                p.data = d
            except AttributeError:
                for q, original in zip(params, originals, strict=True):
                    if q is p:
                        break
                    q.data = original  # as they were: nothing changed on error
                raise TypeError(
                    f"cannot rebind .data of a {type(p).__name__}: the optimizer packs "
                    "its parameters' data"
                ) from None
