"""optax 0.2.8's functional L-BFGS: ``scale_by_lbfgs`` (``ScaleByLBFGSState``) and the
``lbfgs`` alias (L-BFGS direction, sign or learning rate, line search), on the device.

The direction is the two-loop recursion over all ``memory_size`` slots in optax's rolled
order (oldest first), with the curvature weights ``rho`` and the identity scale ``gamma``
computed on the device: ``scale_by_lbfgs`` never reads anything back to the host.
"""

from __future__ import annotations

__all__ = ["ScaleByLBFGSState", "lbfgs", "scale_by_lbfgs"]

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import GradientTransformation, ScalarOrSchedule, StagePlan, as_transform, signature_of
from .._device import allocator, queue_of
from .._packing import layout
from .._state_check import NamedTupleSpec, TupleSpec, check_state, register, spec_of
from .._validation import BOOL, at_least, require
from ..fusion._launch import note_launches
from ..fusion._programs import build
from ..fusion._vectors import Vectors, coef
from ..transforms._averaging import check_like
from ..transforms._combining import identity
from ..transforms._scaling import scale, scale_by_learning_rate
from ._shared import check_learning_rate
from ._two_loop import two_loop
from .linesearch import array_queue, flat_groups, vectors_for

_WHO = "scale_by_lbfgs"


class ScaleByLBFGSState(NamedTuple):
    """optax's state, as flat device arrays of the working dtype (the params' dtype; a tree
    mixing float32 and float64 works in float64), the tree's leaves back to back in tree
    order: ``params`` and ``updates`` of the last step (``(n,)``), the differences of
    successive params and updates (``(memory_size, n)``, a row per slot, written at slot
    ``(count - 1) % memory_size``) and their weights ``1 / (dw . du)`` (``(memory_size,)``,
    0 where the dot is 0). ``count``: the step number, a host int (optax: an int32)."""

    count: int
    params: Any
    updates: Any
    diff_params_memory: Any
    diff_updates_memory: Any
    weights_memory: Any


# ---------------------------------------------------------------------------- registers

# registers of the Vectors: rho (the weights, unrolled) [0, m), alpha [m, 2m), then these
_BETA, _GAMMA, _VDOT, _SQNORM, _GG, _EXTRA = range(6)

_SCALARS = """//CL// netcl_lbfgs_scalars: weight, identity scale
#pragma OPENCL FP_CONTRACT OFF
{fp64}typedef {real} real;
__kernel void netcl_lbfgs_scalars(__global real *reg, __global real *w_base, const long w_off,
    const long m, const long prev, const int first, const int scale_init)
{{
    __global real *weights = w_base + w_off;
    const real vdot = reg[2 * m + {vdot}], sqnorm = reg[2 * m + {sqnorm}];
    real weight, gamma;
    if (first) {{  /* optax: no pair yet; gamma = min(1, 1 / ||u||) (nan stays nan) */
        weight = (real)0;
        const real inv = (real)1 / sqrt(reg[2 * m + {gg}]);
        gamma = inv != inv ? inv : (inv < (real)1 ? inv : (real)1);
    }} else {{
        weight = vdot == (real)0 ? (real)0 : (real)1 / vdot;
        gamma = sqnorm > (real)0 ? vdot / sqnorm : (real)1;
    }}
    weights[prev] = weight;
    for (long j = 0; j < m; j++) reg[j] = weights[j];
    reg[2 * m + {gamma}] = scale_init ? gamma : (real)1;
}}
"""


def _scalars(vec: Vectors, weights: cla.Array, m: int, prev: int, first: bool, scale: bool):
    """On the device: the new pair's weight (written to ``weights[prev]``), every weight
    into the registers ``[0, m)`` and ``gamma`` into its register. One launch."""
    fp64 = "#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n" if vec.real == "double" else ""
    source = _SCALARS.format(fp64=fp64, real=vec.real, vdot=_VDOT, sqnorm=_SQNORM, gg=_GG,
                             gamma=_GAMMA)  # fmt: skip
    kernel = build(vec.queue.context, source, "netcl_lbfgs_scalars",
                   [None, None, np.int64, np.int64, np.int64, np.int32, np.int32])  # fmt: skip
    kernel(vec.queue, (1,), (1,), vec.reg.base_data, weights.base_data,  # pyright: ignore
           np.int64(weights.offset // weights.dtype.itemsize), np.int64(m), np.int64(prev),
           np.int32(first), np.int32(scale))  # fmt: skip
    note_launches("netcl_lbfgs_scalars")


# ---------------------------------------------------------------------------- flat trees


def _work_dtype(leaves: list[Any]) -> np.dtype:
    dtypes = {np.dtype(x.dtype) for x in leaves}
    bad = dtypes - {np.dtype(np.float32), np.dtype(np.float64)}
    if bad:
        raise TypeError(f"{_WHO}: float32 or float64 params, not {sorted(map(str, bad))}")
    return np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)


def _empty(queue: cl.CommandQueue, shape: tuple[int, ...], dtype: np.dtype) -> cla.Array:
    return cla.empty(queue, shape, dtype, allocator=allocator(queue))


def _flat(leaves: list[cla.Array], dtype: np.dtype) -> cla.Array:
    """The leaves back to back as one vector of ``dtype``: a view of a packed tree of that
    dtype; else gathered (and converted, for a tree mixing dtypes)."""
    groups = flat_groups(leaves)
    if len(groups) == 1 and groups[0].dtype == dtype:
        return groups[0].flat
    queue = array_queue(leaves[0])
    out = _empty(queue, (sum(x.size for x in leaves),), dtype)
    start = 0
    for x in leaves:
        if x.size:
            src = x if x.dtype == dtype else x.astype(dtype)
            cl.enqueue_copy(queue, out.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore
                            src_offset=src.offset,
                            dst_offset=out.offset + start * dtype.itemsize)  # fmt: skip
        start += x.size
    return out


def _unflat(v: cla.Array, leaves: list[cla.Array]) -> list[cla.Array]:
    """``v`` cut into arrays shaped like ``leaves``: views of it (a packed tree), or, for a
    tree mixing dtypes, each leaf's part converted to its dtype."""
    views = layout(tuple(x.shape for x in leaves), v.dtype).views(v)
    pairs = zip(leaves, views, strict=True)
    return [y if x.dtype == v.dtype else y.astype(x.dtype) for x, y in pairs]


# ---------------------------------------------------------------------------- scale_by_lbfgs


def _check_state(state: ScaleByLBFGSState, n: int, dtype: np.dtype, m: int) -> None:
    want = {"params": (n,), "updates": (n,), "diff_params_memory": (m, n),
            "diff_updates_memory": (m, n), "weights_memory": (m,)}  # fmt: skip
    for name, shape in want.items():
        x = getattr(state, name)
        if not isinstance(x, cla.Array) or x.shape != shape or x.dtype != dtype:
            got = f"{x.dtype}{list(x.shape)}" if isinstance(x, cla.Array) else type(x).__name__
            raise ValueError(
                f"{_WHO}: state.{name} is {got}, the params need {dtype}{list(shape)} "
                f"(memory_size {m}, {n} elements): pass the state this transform's init made"
            )
    if not isinstance(state.count, (int, np.integer)) or state.count < 0:
        raise ValueError(f"{_WHO}: state.count must be an int >= 0, not {state.count!r}")


def _copy(dst: cla.Array, src: cla.Array) -> None:
    if src.size:
        cl.enqueue_copy(src.queue, dst.base_data, src.base_data, byte_count=src.nbytes,  # pyright: ignore
                        src_offset=src.offset, dst_offset=dst.offset)  # fmt: skip


def _copy_of(x: cla.Array) -> cla.Array:
    y = _empty(array_queue(x), x.shape, x.dtype)
    _copy(y, x)
    return y


def _nothing() -> None:
    return None


def _init(params: Any, m: int) -> ScaleByLBFGSState:
    leaves = optree.tree_leaves(params)
    check_like(params, params, "params", "params", _WHO)
    dtype = _work_dtype(leaves)
    queue = queue_of(params)
    n = sum(x.size for x in leaves)

    def zeros(shape: tuple[int, ...]) -> cla.Array:
        return cla.zeros(queue, shape, dtype, allocator=allocator(queue))

    return ScaleByLBFGSState(0, zeros((n,)), zeros((n,)), zeros((m, n)), zeros((m, n)),
                             zeros((m,)))  # fmt: skip


def _step(
    updates: Any, state: ScaleByLBFGSState, params: Any, m: int, scale_init: bool,
    inplace: bool,
) -> tuple[Any, ScaleByLBFGSState, Callable[[], None]]:  # fmt: skip
    """One step of :func:`scale_by_lbfgs`: ``(direction, new state, commit)``. Pure: the new
    state's arrays are fresh and ``commit`` does nothing. In place: the new pair, weights,
    params and updates go to temporaries and ``commit()`` copies them into the state's
    arrays (the new state holds those), so that an error before it changes nothing."""
    if params is None:
        raise TypeError(f"{_WHO} needs params: update(updates, state, params)")
    if not isinstance(state, ScaleByLBFGSState):
        raise ValueError(f"{_WHO}: state is a {type(state).__name__}, not ScaleByLBFGSState")
    u_leaves, p_leaves = check_like(updates, params, "updates", "params", _WHO)
    dtype = _work_dtype(u_leaves)
    n = sum(x.size for x in u_leaves)
    _check_state(state, n, dtype, m)
    if n == 0:
        return updates, state._replace(count=state.count + 1), _nothing
    w, u = _flat(p_leaves, dtype), _flat(u_leaves, dtype)
    queue = array_queue(u)
    vec = vectors_for(queue, dtype, 2 * m + _EXTRA)
    k = int(state.count)
    prev, start = (k - 1) % m, k % m
    old = (state.diff_params_memory, state.diff_updates_memory)
    if inplace:  # the new pair in temporaries, the old memories read where they are
        dws, dus = list(old[0]), list(old[1])
        dws[prev], dus[prev] = _empty(queue, (n,), dtype), _empty(queue, (n,), dtype)
    else:
        memories = (_copy_of(old[0]), _copy_of(old[1]))
        dws, dus = list(memories[0]), list(memories[1])  # pyright: ignore[reportArgumentType]
    weights = _copy_of(state.weights_memory)
    dw, du = dws[prev], dus[prev]
    if k > 0:
        vec.sub(dw, w, state.params)
        vec.sub(du, u, state.updates)
        vec.dot(du, dw, 2 * m + _VDOT)
        if scale_init:
            vec.dot(du, du, 2 * m + _SQNORM)
    else:
        dw.fill(0)
        du.fill(0)
        if scale_init:
            vec.dot(u, u, 2 * m + _GG)
    _scalars(vec, weights, m, prev, k == 0, scale_init)
    v = _empty(queue, (n,), dtype)
    vec.copy(v, u)
    order = [(start + j) % m for j in range(m)]
    two_loop(vec, v, [(dws[i], dus[i]) for i in order], [coef(plus=i) for i in order],
             coef(plus=2 * m + _GAMMA), m, 2 * m + _BETA)  # fmt: skip
    out = optree.tree_unflatten(optree.tree_structure(updates), _unflat(v, u_leaves))
    if not inplace:
        new = ScaleByLBFGSState(k + 1, _copy_of(w), _copy_of(u), memories[0], memories[1], weights)
        return out, new, _nothing

    def commit() -> None:
        _copy(old[0][prev], dw)
        _copy(old[1][prev], du)
        _copy(state.weights_memory, weights)
        _copy(state.params, w)
        _copy(state.updates, u)

    return out, state._replace(count=k + 1), commit


def scale_by_lbfgs(
    memory_size: int = 10, scale_init_precond: bool = True
) -> GradientTransformation:
    """optax's ``scale_by_lbfgs`` (same signature, defaults, rule and order of operations):
    the L-BFGS direction ``P_k u_k``::

        k > 0:  dw = w_k - w_{k-1};  du = u_k - u_{k-1};  slot (k-1) % m <- (dw, du, rho)
                rho = 1 / (du . dw), 0 where the dot is 0
                gamma = (du . dw) / (du . du) if du . du > 0 else 1
        k = 0:  that slot <- zeros;  gamma = min(1, 1 / ||u_0||)
        P_k u_k = two-loop recursion over all m slots, oldest first (slot k % m), H_0 =
                  gamma I (gamma = 1 without scale_init_precond)

    ``update(updates, state, params)``; chain it with a sign or learning rate and a line
    search (:func:`lbfgs`).

    Device: all on the device, no host read: 2 subtractions and 2 dots (the first step: 1
    dot), one launch for the weight and ``gamma``, then the two-loop recursion's ``4m + 3``
    launches over ``m`` slots (unused slots have weight 0). A packed tree of one dtype is
    read in place; other trees are gathered into one vector first. A pure update copies
    the state (``2 m n + 2 n + m`` elements); in place (``step(..., donate=True)``, the
    stateful layer's ``step_``) it writes one slot, the weights, params and updates.
    """
    m = require("memory_size", memory_size, at_least(1), _WHO)
    scale_init = require("scale_init_precond", scale_init_precond, BOOL, _WHO)

    def run(
        updates: Any, state: ScaleByLBFGSState, params: Any = None, *, inplace: bool,
        **extra_args: Any,
    ) -> tuple[Any, ScaleByLBFGSState]:  # fmt: skip
        out, new_state, commit = _step(updates, state, params, m, scale_init, inplace)
        commit()
        return out, new_state

    def update(
        updates: Any, state: ScaleByLBFGSState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ScaleByLBFGSState]:
        return run(updates, state, params, inplace=False, **extra_args)

    plan = StagePlan(_WHO, run, config=(m, scale_init))
    tx = GradientTransformation(lambda params: _init(params, m), update, plan)
    return register(tx, lambda: NamedTupleSpec(ScaleByLBFGSState))


# ---------------------------------------------------------------------------- lbfgs


class _ZoomDefault:
    """``lbfgs``'s default line search (made at each call, as optax's default argument)."""

    def __repr__(self) -> str:
        return "scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy='one')"


ZOOM_DEFAULT: Any = _ZoomDefault()


def lbfgs(
    learning_rate: ScalarOrSchedule | None = None,
    memory_size: int = 10,
    scale_init_precond: bool = True,
    linesearch: GradientTransformation | None = ZOOM_DEFAULT,
) -> GradientTransformation:
    """optax's ``lbfgs`` alias (same signature, defaults and state: the tuple of its three
    parts' states)::

        chain(scale_by_lbfgs(memory_size, scale_init_precond),
              scale(-1) if learning_rate is None else scale_by_learning_rate(learning_rate),
              linesearch)     # None: no line search

    The default line search is ``scale_by_zoom_linesearch(max_linesearch_steps=20,
    initial_guess_strategy="one")``. ``update(grad, state, params, value=, grad=,
    value_fn=, **fn_kwargs)``: a line search needs the value and grad at ``params`` and
    ``value_fn(params, **fn_kwargs)``, which returns ``(value, grad)`` for zoom (we have
    no autodiff; see ``linesearch.py``). Pair it with :func:`value_and_grad_from_state` to
    reuse the line search's last evaluation.

    Device: :func:`scale_by_lbfgs`'s launches (no host read), one launch for the sign or
    learning rate, and the line search's work (backtracking: one read for the slope, one
    launch and the value's read per trial). It runs its three parts itself (not as a
    ``chain``), so that in place (``step(..., donate=True)``, ``step_``) the L-BFGS memory
    is written only once the line search has succeeded: an error there (a ``value_fn``
    that returns no grad, say) changes nothing.
    """
    if learning_rate is None:
        base_scaling = scale(-1.0)
    else:
        check_learning_rate(learning_rate)
        base_scaling = scale_by_learning_rate(learning_rate)
    if linesearch is ZOOM_DEFAULT:
        from .zoom_linesearch import scale_by_zoom_linesearch  # another module's; made later

        linesearch = scale_by_zoom_linesearch(max_linesearch_steps=20, initial_guess_strategy="one")
    search = identity() if linesearch is None else as_transform(linesearch, "lbfgs: linesearch")
    direction = scale_by_lbfgs(memory_size, scale_init_precond)
    m, scale_init = int(memory_size), bool(scale_init_precond)
    parts = (direction, base_scaling, search)

    def init(params: Any) -> tuple[Any, Any, Any]:
        return tuple(part.init(params) for part in parts)

    def run(
        updates: Any, state: Any, params: Any = None, *, inplace: bool, **extra_args: Any
    ) -> tuple[Any, tuple[Any, Any, Any]]:
        check_state(tx, state)
        u, lbfgs_state, commit = _step(updates, state[0], params, m, scale_init, inplace)
        u, scaling_state = base_scaling.update(u, state[1], params, **extra_args)
        u, search_state = search.update(u, state[2], params, **extra_args)
        commit()
        return u, (lbfgs_state, scaling_state, search_state)

    def update(
        updates: Any, state: Any, params: Any = None, **extra_args: Any
    ) -> tuple[Any, tuple[Any, Any, Any]]:
        return run(updates, state, params, inplace=False, **extra_args)

    config = (m, scale_init, signature_of(base_scaling), signature_of(search))
    tx = GradientTransformation(init, update, StagePlan("lbfgs", run, config=config))
    return register(tx, lambda: TupleSpec([spec_of(part) for part in parts]))
