"""optax 0.2.8's backtracking line search (Armijo's sufficient decrease), functional:
``scale_by_backtracking_linesearch`` with its state and info NamedTuples (optax's names),
``value_and_grad_from_state``, and what both line searches (this one and
``zoom_linesearch.py``) and ``lbfgs.py`` share: the flat views of trees their device work runs
on (:func:`flat_groups`, :func:`gather`), :func:`fn_kwargs_of` (optax's split of the extra
arguments), :func:`evaluate` (a user's ``value_fn`` at trial params, its value left unread)
and the reading of values (:func:`stage_value`, :func:`value_of`, :func:`host_value`): a
0-d/one-element device value of the registers' dtype is copied into a register and comes back
with the search's next :meth:`Vectors.read`, any other is read (or converted) on its own.

We have no autodiff: ``value_fn(params, **fn_kwargs)`` returns the objective's value, or a
pair ``(value, grad)`` with ``grad`` a tree like ``params`` of device arrays. A search that
needs the gradient at its trial points (zoom; backtracking with ``store_grad=True``) raises a
``TypeError`` naming ``value_fn`` when it returns a value alone.
"""

from __future__ import annotations

__all__ = [
    "BacktrackingLinesearchInfo",
    "ScaleByBacktrackingLinesearchState",
    "scale_by_backtracking_linesearch",
    "value_and_grad_from_state",
]

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import GradientTransformation, OpaquePlan
from .._packing import Layout, contiguous_run, layout
from .._state_check import NamedTupleSpec, check_state, register
from .._validation import BOOL, NON_NEGATIVE, at_least, invalid, number, require
from ..fusion._vectors import Vectors, coef
from ..transforms._averaging import check_like
from .polyak import host_loss

# ---------------------------------------------------------------------------- flat trees


def array_queue(x: cla.Array) -> cl.CommandQueue:
    """``x``'s queue (pyopencl types it optional; our arrays always have one)."""
    return cast(cl.CommandQueue, x.queue)


class FlatGroup(NamedTuple):
    """The leaves of one dtype of a tree, as one flat 1-D device vector (``flat``: a view
    when they lie back to back in one buffer, as in a packed tree; else a gathered copy)."""

    dtype: np.dtype
    index: tuple[int, ...]  # the leaves' positions in the tree
    layout: Layout
    flat: cla.Array


def flat_view(queue: cl.CommandQueue, base: Any, start: int, n: int, dtype: Any) -> cla.Array:
    """The 1-D array of ``n`` elements of ``dtype`` at element ``start`` of ``base``."""
    dtype = np.dtype(dtype)
    (view,) = layout(((n,),), dtype).views_of(queue, base, start * dtype.itemsize)
    return view


def gather(leaves: list[cla.Array], lay: Layout, queue: cl.CommandQueue | None = None) -> cla.Array:
    """``leaves`` (of one dtype, shaped as ``lay`` says) as one flat vector on ``queue``
    (default: the first leaf's): a view of their buffer when they lie back to back, else a
    fresh copy (one device copy per leaf)."""
    queue = array_queue(leaves[0]) if queue is None else queue
    run = contiguous_run(leaves, lay)
    if run is not None:
        return flat_view(queue, run[0], run[1], lay.total, lay.dtype)
    if not all(x.flags.c_contiguous for x in leaves):
        raise ValueError("a leaf is not C-contiguous: L-BFGS and line searches need it")
    block = lay.allocate(queue)
    out = flat_view(queue, block.buffer, block.offset // lay.dtype.itemsize, lay.total, lay.dtype)
    for src, view in zip(leaves, block.views, strict=True):
        if src.size:
            cl.enqueue_copy(queue, view.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore
                            src_offset=src.offset, dst_offset=view.offset)  # fmt: skip
    return out


def flat_groups(leaves: list[cla.Array], queue: cl.CommandQueue | None = None) -> list[FlatGroup]:
    """One :class:`FlatGroup` per dtype of ``leaves``, in order of first appearance (flat
    vectors on ``queue``; default: each group's first leaf's)."""
    index: dict[np.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        index.setdefault(np.dtype(x.dtype), []).append(i)
    groups = []
    for dtype, idx in index.items():
        lay = layout(tuple(leaves[i].shape for i in idx), dtype)
        flat = gather([leaves[i] for i in idx], lay, queue)
        groups.append(FlatGroup(dtype, tuple(idx), lay, flat))
    return groups


def fresh_like(group: FlatGroup) -> tuple[cla.Array, list[cla.Array]]:
    """A fresh packed buffer for ``group``'s leaves: its flat vector and per-leaf views."""
    queue = array_queue(group.flat)
    block = group.layout.allocate(queue)
    item = group.dtype.itemsize
    flat = flat_view(queue, block.buffer, block.offset // item, group.layout.total,
                     group.dtype)  # fmt: skip
    return flat, block.views


_VECTORS: dict[tuple[Any, np.dtype, int], Vectors] = {}


def vectors_for(queue: cl.CommandQueue, dtype: Any, registers: int) -> Vectors:
    """A :class:`Vectors` of ``queue`` and ``dtype`` with at least ``registers`` registers,
    shared by the transforms of this module and of ``lbfgs.py`` (the queue runs their
    launches in order; no register outlives one update)."""
    key = (queue, np.dtype(dtype), registers)
    vec = _VECTORS.get(key)
    if vec is None:
        vec = _VECTORS[key] = Vectors(queue, np.dtype(dtype), registers)
    return vec


# ---------------------------------------------------------------------------- value_fn


def fn_kwargs_of(value_fn: Callable, extra_args: Mapping[str, Any], who: str) -> dict[str, Any]:
    """optax's ``_extract_fns_kwargs`` for one function: the ``extra_args`` that name a
    parameter of ``value_fn``; ``TypeError`` for any other (optax's message)."""
    try:
        names = set(inspect.signature(value_fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: pass nothing
        names = set()
    remaining = sorted(k for k in extra_args if k not in names)
    if remaining:
        raise TypeError(
            f"Unexpected keyword arguments passed to `{who}.update`. These arguments were not "
            f"consumed by `value_fn`: {remaining}. Ensure that all extra keyword arguments are "
            "accepted by `value_fn`."
        )
    return {k: v for k, v in extra_args.items() if k in names}


_MUST = "a real number or a one-element array"


def host_value(value: Any, dtype: Any, who: str, what: str = "value") -> np.floating:
    """``value`` (a number, a numpy scalar, a 0-d or one-element array; a device array is
    read back: one host transfer) as a ``dtype`` scalar; TypeError/ValueError naming
    ``what`` when it is not a real number."""
    if value is None:
        raise TypeError(f"{who}: {what} is None (must be {_MUST})")
    return np.dtype(dtype).type(host_loss(value, f"{who} ({what})"))


def check_value(value: Any, who: str, what: str = "value") -> None:
    """Raise as :func:`host_value` would, without reading a device array back (its size
    and dtype kind are checked; a host value is converted)."""
    if isinstance(value, cla.Array):
        if value.dtype.kind not in "fiu":
            raise invalid("value", value, _MUST, f"{who} ({what})", TypeError)
        if value.size != 1:
            raise invalid("value", value, _MUST, f"{who} ({what})")
        return
    host_value(value, np.float64, who, what)


def stage_value(value: Any, vectors: Vectors | None, register: int) -> bool:
    """Copy a one-element device ``value`` of ``vectors``' dtype and queue into
    ``register`` (one device copy; it comes back with the next :meth:`Vectors.read`). False,
    copying nothing, for any other value (read it with :func:`host_value`)."""
    if not (
        vectors is not None
        and isinstance(value, cla.Array)
        and value.size == 1
        and value.dtype == vectors.dtype
        and value.queue is vectors.queue
    ):
        return False
    item = vectors.dtype.itemsize
    reg = vectors.reg
    cl.enqueue_copy(vectors.queue, reg.base_data, value.base_data, byte_count=item,  # pyright: ignore
                    src_offset=value.offset, dst_offset=reg.offset + register * item)  # fmt: skip
    return True


def value_of(
    value: Any, staged: bool, regs: np.ndarray | None, register: int, dtype: Any, who: str,
    what: str = "value",
) -> np.floating:  # fmt: skip
    """The value :func:`stage_value` staged, from the registers ``regs`` read since; else
    ``value`` read (or converted) on its own, as a ``dtype`` scalar."""
    if staged:
        assert regs is not None
        return np.dtype(dtype).type(regs[register])
    return host_value(value, dtype, who, what)


_TRIAL_VALUE = "value returned by value_fn"


def evaluate(
    value_fn: Callable, params: Any, fn_kwargs: Mapping[str, Any], need_grad: bool,
    who: str = "line search",
) -> tuple[Any, Any]:  # fmt: skip
    """``value_fn(params, **fn_kwargs)`` as ``(value, grad or None)``, the value checked
    (:func:`check_value`) but unread: a device array stays one (stage it with
    :func:`stage_value`, or read it with :func:`value_of`). ``value_fn`` returns the value,
    or the pair ``(value, grad)`` (``grad`` a tree like ``params``). With ``need_grad``, a
    value alone is a ``TypeError`` naming ``value_fn``."""
    out = value_fn(params, **fn_kwargs)
    grad = None
    if isinstance(out, (tuple, list)) and len(out) == 2:
        out, grad = out
    if grad is None and need_grad:
        raise TypeError(
            f"{who}: value_fn returned only a value ({type(out).__name__}), but this line "
            "search needs the gradient at its trial points: value_fn must return (value, grad), "
            "grad a tree like params of device arrays"
        )
    if grad is not None:
        check_like(grad, params, "the gradient from value_fn", "params", who)
    check_value(out, who, _TRIAL_VALUE)
    return out, grad


def require_value_fn(value_fn: Any, who: str) -> Callable:
    if value_fn is None:
        raise TypeError(f"{who} needs value_fn: update(..., value=, grad=, value_fn=f)")
    if not callable(value_fn):
        raise invalid("value_fn", value_fn, "callable", who, TypeError)
    return value_fn


# ---------------------------------------------------------------------------- combinations


def combination(
    a: list[FlatGroup], a_coef: float, b: list[FlatGroup] | None, b_coef: float
) -> list[cla.Array]:
    """The leaves of ``a_coef a + b_coef b`` (``b`` None: ``a_coef a``), coefficients
    rounded to each group's dtype, in fresh packed buffers (one launch per dtype)."""
    out: list[Any] = [None] * sum(len(g.index) for g in a)
    for k, ga in enumerate(a):
        flat, views = fresh_like(ga)
        vec = vectors_for(array_queue(ga.flat), ga.dtype, 1)
        if b is None:
            vec.scale(flat, ga.flat, coef(a_coef))
        else:
            vec.lincomb(flat, ga.flat, coef(a_coef), b[k].flat, coef(b_coef))
        for i, v in zip(ga.index, views, strict=True):
            out[i] = v
    return out


# ---------------------------------------------------------------------------- backtracking


class BacktrackingLinesearchInfo(NamedTuple):
    """optax's info: the number of trial points of the last search, and its final decrease
    error (0: sufficient decrease found; > 0 failed; inf: no finite value found)."""

    num_linesearch_steps: int
    decrease_error: np.floating


class ScaleByBacktrackingLinesearchState(NamedTuple):
    """optax's state: the last learning rate, the value at the accepted point (inf before
    the first step), its gradient (``store_grad``; else ``None``) and the info. Host
    scalars of the params' dtype (the search reads them on the host anyway)."""

    learning_rate: np.floating
    value: np.floating
    grad: Any
    info: BacktrackingLinesearchInfo


LINESEARCH_STATES = ("ScaleByBacktrackingLinesearchState", "ScaleByZoomLinesearchState")
_BACKTRACKING = "scale_by_backtracking_linesearch"
_FACTOR = number("a finite number > 0", lambda f: 0 < f < np.inf)
_MAX_LR = number("a number > 0 (inf: no cap)", lambda f: f > 0)


def _value_dtype(leaves: list[Any]) -> np.dtype:
    return np.dtype(leaves[0].dtype) if leaves else np.dtype(np.float32)


def _decrease_error(
    dt: type, lr: Any, slope: Any, value: Any, new_value: Any, slope_rtol: float, rtol: float
) -> Any:
    """optax's ``new - (1 + rtol) value - lr slope_rtol slope`` in ``dt``: nan -> inf,
    clipped at 0."""
    error = dt(dt(new_value) - dt(1.0 + rtol) * dt(value) - lr * dt(slope_rtol) * slope)
    return dt(np.inf) if np.isnan(error) else dt(max(error, dt(0)))


_SLOPE, _VALUE_INIT, _VALUE = range(3)  # the backtracking search's registers


class _Start:
    """The slope ``<u, g>`` at the start (one dot per dtype group, into fresh registers: they
    live across ``value_fn``'s calls) and the start's value (staged when it is a device
    value), read back together with the first trial's value (:meth:`read_with`)."""

    def __init__(self, value: Any, u_groups: list[FlatGroup], g_groups: list[FlatGroup]):
        self.vectors = [Vectors(array_queue(gu.flat), gu.dtype, 3) for gu in u_groups]
        for vec, gu, gg in zip(self.vectors, u_groups, g_groups, strict=True):
            vec.dot(gu.flat, gg.flat, _SLOPE)
        self.first = self.vectors[0] if self.vectors else None
        self.value = value
        self.staged = stage_value(value, self.first, _VALUE_INIT)

    def read_with(self, trial_value: Any, dt: type) -> tuple[Any, Any, Any]:
        """``(value, slope, trial value)`` in ``dt``: one host read per dtype group (the
        slope; the values where staged), the groups' slopes added on the host in ``dt``."""
        staged = stage_value(trial_value, self.first, _VALUE)
        regs = [vec.read() for vec in self.vectors]
        slope = dt(0)
        for r in regs:
            slope = dt(slope + dt(r[_SLOPE]))
        first = regs[0] if regs else None
        value = value_of(self.value, self.staged, first, _VALUE_INIT, dt, _BACKTRACKING)
        new = value_of(trial_value, staged, first, _VALUE, dt, _BACKTRACKING, _TRIAL_VALUE)
        return value, slope, new


def scale_by_backtracking_linesearch(
    max_backtracking_steps: int,
    slope_rtol: float = 1e-4,
    decrease_factor: float = 0.8,
    increase_factor: float = 1.5,
    max_learning_rate: float = 1.0,
    atol: float = 0.0,
    rtol: float = 0.0,
    store_grad: bool = False,
) -> GradientTransformation:
    """optax's backtracking line search (same signature, defaults and semantics): scales the
    updates ``u`` by a learning rate ``lr`` meeting Armijo's criterion::

        f(w + lr u) <= (1 + rtol) f(w) + lr slope_rtol <u, grad f(w)> + atol

    Start: ``lr = min(increase_factor lr_prev, max_learning_rate)`` (``lr_prev`` = 1 at
    first); each trial past the first multiplies it by ``decrease_factor``; at most
    ``max_backtracking_steps + 1`` trials. A search whose last trial had no finite value
    returns ``lr = 0``. ``update(updates, state, params, *, value, grad, value_fn,
    **fn_kwargs)``: ``value`` and ``grad`` at ``params``, ``value_fn(params, **fn_kwargs)``
    the objective (it returns ``(value, grad)`` when ``store_grad``, which keeps the grad
    at the accepted point for :func:`value_and_grad_from_state`).

    Device: the slope ``<u, grad>`` is one dot per dtype group; each trial builds
    ``params + lr u`` on the device (one launch per dtype). The first trial's one host read
    per dtype group brings the slope, with ``value`` and the trial's value when they are
    device values of the params' first dtype (copied into registers); every later trial
    reads its value on its own when it is a device array (host values cost no read). The
    decrease test runs on the host, in the params' dtype (optax's dtype too). Differs from
    optax: no ``verbose``; complex params are not supported.
    """
    steps = require("max_backtracking_steps", max_backtracking_steps, at_least(0), _BACKTRACKING)
    slope_rtol = float(require("slope_rtol", slope_rtol, NON_NEGATIVE, _BACKTRACKING))
    decrease = float(require("decrease_factor", decrease_factor, _FACTOR, _BACKTRACKING))
    increase = float(require("increase_factor", increase_factor, _FACTOR, _BACKTRACKING))
    max_lr = float(require("max_learning_rate", max_learning_rate, _MAX_LR, _BACKTRACKING))
    atol = float(require("atol", atol, NON_NEGATIVE, _BACKTRACKING))
    rtol = float(require("rtol", rtol, NON_NEGATIVE, _BACKTRACKING))
    store_grad = require("store_grad", store_grad, BOOL, _BACKTRACKING)

    def init(params: Any) -> ScaleByBacktrackingLinesearchState:
        leaves = optree.tree_leaves(params)
        dt = _value_dtype(leaves).type
        grad = None
        if store_grad:
            grad = optree.tree_unflatten(
                optree.tree_structure(params), combination(flat_groups(leaves), 0.0, None, 0.0)
            )
        return ScaleByBacktrackingLinesearchState(
            learning_rate=dt(1.0),
            value=dt(np.inf),
            grad=grad,
            info=BacktrackingLinesearchInfo(0, dt(np.inf)),
        )

    def check_args(extra_args: Mapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
        """``value_fn`` and its kwargs; TypeError for a missing value, grad or value_fn."""
        rest = dict(extra_args)
        value, grad = rest.pop("value", None), rest.pop("grad", None)
        fn = rest.pop("value_fn", None)
        fn = require_value_fn(fn, _BACKTRACKING)
        fn_kwargs = fn_kwargs_of(fn, rest, _BACKTRACKING)
        for name, x in (("value", value), ("grad", grad)):
            if x is None:
                raise TypeError(
                    f"{_BACKTRACKING} needs {name}: update(..., value=, grad=, value_fn=)"
                )
        return fn, fn_kwargs

    def update(
        updates: Any,
        state: ScaleByBacktrackingLinesearchState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable | None = None,
        **extra_args: Any,
    ) -> tuple[Any, ScaleByBacktrackingLinesearchState]:
        check_state(tx, state)
        fn, fn_kwargs = check_args({"value": value, "grad": grad, "value_fn": value_fn,
                                    **extra_args})  # fmt: skip
        if params is None:
            raise TypeError(f"{_BACKTRACKING} needs params: update(updates, state, params, ...)")
        u, p = check_like(updates, params, "updates", "params", _BACKTRACKING)
        g, _ = check_like(grad, params, "grad", "params", _BACKTRACKING)
        dt = _value_dtype(p).type
        check_value(value, _BACKTRACKING)
        treedef = optree.tree_structure(params)
        p_groups, u_groups = flat_groups(p), flat_groups(u)
        start = _Start(value, u_groups, flat_groups(g))
        lr = dt(min(dt(increase) * dt(state.learning_rate), dt(max_lr)))
        new_grad, error, trials = None, dt(np.inf), 0
        value0: Any = None
        slope: Any = None
        new_value: Any = None
        while not (error <= atol) and trials <= steps:
            if trials > 0:
                lr = dt(dt(decrease) * lr)
            trial = optree.tree_unflatten(treedef, combination(p_groups, 1.0, u_groups, float(lr)))
            trial_value, trial_grad = evaluate(fn, trial, fn_kwargs, store_grad, _BACKTRACKING)
            if trials == 0:
                value0, slope, new_value = start.read_with(trial_value, dt)
            else:
                new_value = host_value(trial_value, dt, _BACKTRACKING, _TRIAL_VALUE)
            error = _decrease_error(dt, lr, slope, value0, new_value, slope_rtol, rtol)
            if store_grad and (error <= atol or trials == steps):
                new_grad = trial_grad
            trials += 1
        new_lr = dt(0.0) if np.isinf(error) else lr
        out = optree.tree_unflatten(treedef, combination(u_groups, float(new_lr), None, 0.0))
        info = BacktrackingLinesearchInfo(trials, error)
        return out, ScaleByBacktrackingLinesearchState(new_lr, new_value, new_grad, info)

    tx = GradientTransformation(init, update, OpaquePlan(_BACKTRACKING, ()))
    return register(tx, lambda: NamedTupleSpec(ScaleByBacktrackingLinesearchState))


# ---------------------------------------------------------------------------- from state


def _search_states(state: Any) -> list[Any]:
    """The line search states in ``state`` (chains' tuples and dicts, wrappers' fields)."""
    if type(state).__name__ in LINESEARCH_STATES and hasattr(state, "grad"):
        return [state]
    if isinstance(state, Mapping):
        children = list(state.values())
    elif isinstance(state, (tuple, list)):
        children = list(state)
    else:
        return []
    return [found for child in children for found in _search_states(child)]


def value_and_grad_from_state(
    value_and_grad_fn: Callable[..., tuple[Any, Any]],
) -> Callable[..., tuple[Any, Any]]:
    """optax's helper for line searches, without autodiff: returns ``fn(params, *args,
    state, **kwargs) -> (value, grad)`` that returns the value and grad the line search
    state (backtracking with ``store_grad=True``, or zoom) keeps from its last accepted
    point, or calls ``value_and_grad_fn(params, *args, **kwargs)`` when the stored value
    is inf or nan (before the first step). ``ValueError`` when ``state`` holds no such
    state, several, or one whose grad is ``None``::

        value_and_grad = value_and_grad_from_state(f)     # f(params) -> (value, grad)
        for _ in range(n):
            value, grad = value_and_grad(params, state=state)
            updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                        value_fn=f)
            params = apply_updates(params, updates)
    """
    if not callable(value_and_grad_fn):
        raise invalid("value_and_grad_fn", value_and_grad_fn, "callable", "", TypeError)

    def fn(params: Any, *fn_args: Any, state: Any, **fn_kwargs: Any) -> tuple[Any, Any]:
        found = _search_states(state)
        if len(found) != 1 or found[0].grad is None:
            raise ValueError(
                "Value or gradient not found in the state (found "
                f"{len(found)} line search states{'' if len(found) != 1 else ' with no grad'}"
                "): use a line search that stores them (store_grad=True for backtracking)"
            )
        stored = found[0]
        value = host_value(stored.value, np.float64, "value_and_grad_from_state", "a stored value")
        if np.isfinite(value):
            return stored.value, stored.grad
        return value_and_grad_fn(params, *fn_args, **fn_kwargs)

    return fn
