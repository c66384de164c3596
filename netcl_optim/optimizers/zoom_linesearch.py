"""optax 0.2.8's zoom line search (Nocedal & Wright, "Numerical Optimization", Algorithms 3.5
and 3.6, with Hager & Zhang's approximate sufficient decrease, CG_DESCENT 2006): the
functional ``scale_by_zoom_linesearch`` with ``ScaleByZoomLinesearchState`` and
``ZoomLinesearchInfo``. optax runs the search as a ``while_loop`` under jit; here it is a host
loop over scalars (the value and the slope of each trial), with the vectors on the device:
each trial point ``params + s * updates`` and each slope ``<grad, updates>`` is computed by
:class:`~netcl_optim.fusion._vectors.Vectors`, and the slope comes back in one host read with
the value (when the value is a device array)."""

from __future__ import annotations

__all__ = ["ScaleByZoomLinesearchState", "ZoomLinesearchInfo", "scale_by_zoom_linesearch"]

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import optree
import pyopencl.array as cla

from .._base import GradientTransformation, OpaquePlan
from .._packing import allocate_like
from .._state_check import NamedTupleSpec, check_state, register
from .._validation import (
    BOOL,
    NON_NEGATIVE,
    Rule,
    at_least,
    interval,
    number,
    one_of,
    optional,
    real,
    require,
)
from ..fusion import queue_of_leaves
from ..fusion._vectors import Vectors
from ..transforms._averaging import check_like
from .linesearch import (
    FlatGroup,
    check_value,
    combination,
    evaluate,
    flat_groups,
    fn_kwargs_of,
    gather,
    stage_value,
    value_of,
)

_WHO = "scale_by_zoom_linesearch"
_TRIAL_VALUE = "value returned by value_fn"

# optax's messages (optax/_src/linesearch.py), printed with verbose=True
FLAG_INTERVAL_NOT_FOUND = (
    "No interval satisfying curvature condition. "
    "Consider increasing maximal possible stepsize of the linesearch."
)
FLAG_INTERVAL_TOO_SMALL = "Length of searched interval has been reduced below threshold."
FLAG_CURVATURE_COND_NOT_SATISFIED = (
    "Returning stepsize with sufficient decrease but curvature condition not satisfied."
)
FLAG_NO_STEPSIZE_FOUND = "Linesearch failed, no stepsize satisfying sufficient decrease found."
FLAG_NOT_A_DESCENT_DIRECTION = (
    "The linesearch failed because the provided direction is not a descent direction. "
)

GUESS_STRATEGIES = ("one", "keep")
# optax accepts None (no cap) or any number; inf is no cap either
MAX_LEARNING_RATE = optional(number("a number > 0 (inf: no cap)", lambda f: f > 0))
INCREASE_FACTOR = number("a finite number > 1", lambda f: 1 < f < np.inf)
CURV_RTOL = number("a number > 0 (inf: no curvature condition)", lambda f: f > 0)
_LEARNING_RATE = Rule("a real number", real, lambda v: True)  # the state's (nan and inf too)


class ZoomLinesearchInfo(NamedTuple):
    """optax's ``ZoomLinesearchInfo``: the number of trials of the last search (a host int;
    optax: a device int) and the decrease and curvature errors of its last trial (numpy
    scalars of the params' precision): 0 where the criterion holds."""

    num_linesearch_steps: int
    decrease_error: Any
    curvature_error: Any


class ScaleByZoomLinesearchState(NamedTuple):
    """optax's ``ScaleByZoomLinesearchState``: the learning rate found by the last search and
    the value there (numpy scalars of the params' precision; before the first search 1 and
    inf), the gradient there (a tree like the params: device arrays, zeros at first; reused
    by ``value_and_grad_from_state``), and the search's :class:`ZoomLinesearchInfo`."""

    learning_rate: Any
    value: Any
    grad: Any
    info: ZoomLinesearchInfo


# ---------------------------------------------------------------------------- interpolation


def _cubicmin(a: Any, fa: Any, fpa: Any, b: Any, fb: Any, c: Any, fc: Any) -> Any:
    """A critical point of the cubic through ``(a, fa)``, ``(b, fb)``, ``(c, fc)`` with slope
    ``fpa`` at ``a`` (optax's ``_cubicmin``, from scipy; nan when there is none)."""
    C = fpa
    db = b - a
    dc = c - a
    db_dc = db * dc
    denom = db_dc * db_dc * (db - dc)
    rhs_b = fb - fa - C * db
    rhs_c = fc - fa - C * dc
    A = (dc * dc * rhs_b + -(db * db) * rhs_c) / denom
    B = (-(dc * dc * dc) * rhs_b + db * db * db * rhs_c) / denom
    radical = B * B - 3.0 * A * C
    return a + (-B + np.sqrt(radical)) / (3.0 * A)


def _quadmin(a: Any, fa: Any, fpa: Any, b: Any, fb: Any) -> Any:
    """The critical point of the quadratic through ``(a, fa)``, ``(b, fb)`` with slope
    ``fpa`` at ``a`` (optax's ``_quadmin``)."""
    db = b - a
    B = (fb - fa - fpa * db) / (db * db)
    return a - fpa / (2.0 * B)


# ---------------------------------------------------------------------------- on the device

_SLOPE_INIT, _VALUE_INIT, _SLOPE, _VALUE = range(4)  # the registers


class _Group(NamedTuple):
    """The leaves of one dtype: the params' and the updates' flat vectors (two
    :class:`FlatGroup` of the same leaves) and the registers."""

    params: FlatGroup
    updates: FlatGroup
    vectors: Vectors


def _groups(
    param_leaves: list[cla.Array], update_leaves: list[cla.Array], queue: Any
) -> list[_Group]:
    groups = []
    for g in flat_groups(param_leaves, queue):
        updates = gather([update_leaves[i] for i in g.index], g.layout, queue)
        groups.append(_Group(g, g._replace(flat=updates), Vectors(queue, g.dtype, 4)))
    return groups


class _Line:
    """The line ``params + s * updates`` on the device: trial points, values and slopes.

    Each :meth:`evaluate` is one launch per dtype for the point, ``value_fn``, two launches
    per dtype for the slope and one host read per dtype (the slope, the value when it is a
    device array, and at the first trial the start's slope and value too).
    """

    def __init__(
        self, params: Any, updates: Any, grad: Any, value: Any, value_fn: Callable[..., Any],
        fn_kwargs: dict[str, Any],
    ) -> None:  # fmt: skip
        param_leaves, self.treedef = optree.tree_flatten(params)
        update_leaves = optree.tree_leaves(updates)
        self.queue = queue_of_leaves(param_leaves)
        self.groups = _groups(param_leaves, update_leaves, self.queue)
        self.dtype = self.groups[0].vectors.dtype.type
        self.value_fn = value_fn
        self.fn_kwargs = fn_kwargs
        self._slopes(optree.tree_leaves(grad), _SLOPE_INIT)
        self._value_init = value
        self._value_init_staged = stage_value(value, self.groups[0].vectors, _VALUE_INIT)
        self._initial: tuple[Any, Any] | None = None

    def _slopes(self, grad_leaves: list[cla.Array], register: int) -> None:
        for g in self.groups:
            grad = gather([grad_leaves[i] for i in g.params.index], g.params.layout, self.queue)
            g.vectors.dot(grad, g.updates.flat, register)

    def _read(self, register: int) -> tuple[list[np.ndarray], Any]:
        """Every group's registers (one read each) and their sum at ``register``, in the
        first group's precision (groups of several dtypes: summed with numpy's promotion)."""
        regs = [g.vectors.read() for g in self.groups]
        total = regs[0][register]
        for r in regs[1:]:
            total = total + r[register]
        if self._initial is None:
            init_total = regs[0][_SLOPE_INIT]
            for r in regs[1:]:
                init_total = init_total + r[_SLOPE_INIT]
            value = value_of(self._value_init, self._value_init_staged, regs[0], _VALUE_INIT,
                             self.dtype, _WHO)  # fmt: skip
            self._initial = (value, self.dtype(init_total))
        return regs, self.dtype(total)

    def initial(self) -> tuple[Any, Any]:
        """The value and the slope at ``s = 0`` (read with the first trial)."""
        if self._initial is None:
            self._read(_SLOPE_INIT)
        assert self._initial is not None
        return self._initial

    def scaled(self, stepsize: Any) -> Any:
        """``stepsize * updates`` (fresh, packed per dtype): the returned updates."""
        leaves = combination([g.updates for g in self.groups], float(stepsize), None, 0.0)
        return optree.tree_unflatten(self.treedef, leaves)

    def evaluate(self, stepsize: Any) -> tuple[Any, Any, Any]:
        """``(value, grad, slope)`` at ``params + stepsize * updates`` (fresh, packed per
        dtype)."""
        leaves = combination([g.params for g in self.groups], 1.0,
                             [g.updates for g in self.groups], float(stepsize))  # fmt: skip
        point = optree.tree_unflatten(self.treedef, leaves)
        value, grad = evaluate(self.value_fn, point, self.fn_kwargs, True, _WHO)
        self._slopes(optree.tree_leaves(grad), _SLOPE)
        staged = stage_value(value, self.groups[0].vectors, _VALUE)
        regs, slope = self._read(_SLOPE)
        return value_of(value, staged, regs[0], _VALUE, self.dtype, _WHO, _TRIAL_VALUE), grad, slope


# ---------------------------------------------------------------------------- the search


@dataclass
class _Search:
    """optax's ``ZoomLinesearchState`` without the vectors (host scalars of the params'
    precision; the gradients are the trees value_fn returned)."""

    count: int
    stepsize_guess: Any
    stepsize: Any
    value: Any = None
    grad: Any = None
    slope: Any = None
    value_init: Any = None
    slope_init: Any = None
    decrease_error: Any = np.inf
    curvature_error: Any = np.inf
    error: Any = np.inf
    interval_found: bool = False
    done: bool = False
    failed: bool = False
    low: Any = None
    value_low: Any = None
    slope_low: Any = None
    high: Any = None
    value_high: Any = None
    slope_high: Any = None
    cubic_ref: Any = None
    value_cubic_ref: Any = None
    safe_stepsize: Any = None
    safe_value: Any = None
    safe_grad: Any = None

    def start(self, value: Any, slope: Any, grad: Any, zero: Any) -> None:
        """optax's ``init_fn``: every point at ``s = 0``."""
        self.value = self.value_init = self.value_low = self.value_high = value
        self.value_cubic_ref = self.safe_value = value
        self.slope = self.slope_init = self.slope_low = self.slope_high = slope
        self.low = self.high = self.cubic_ref = self.safe_stepsize = zero
        self.grad = self.safe_grad = grad


@dataclass(frozen=True)
class _Zoom:
    """The hyperparameters and optax's steps (``_search_interval``, ``_zoom_into_interval``,
    ``_try_safe_step``), in optax's order of operations and of branches."""

    max_linesearch_steps: int
    max_stepsize: float | None
    tol: float
    increase_factor: float
    slope_rtol: float
    curv_rtol: float
    approx_dec_rtol: float | None
    interval_threshold: float
    verbose: bool

    def decrease_error(self, stepsize, value_step, slope_step, value_init, slope_init) -> Any:
        """Armijo's error, or Hager & Zhang's approximate one near the minimum (the smaller);
        0 where it holds, inf for nan."""
        error = value_step - value_init - self.slope_rtol * stepsize * slope_init
        if self.approx_dec_rtol is not None:
            approx = slope_step - (2 * self.slope_rtol - 1.0) * slope_init
            delta_values = value_step - value_init - self.approx_dec_rtol * np.abs(value_init)
            approx = np.maximum(approx, delta_values)
            error = np.minimum(approx, error)
        error = np.maximum(error, 0.0)
        return error.dtype.type(np.inf) if np.isnan(error) else error

    def curvature_error(self, slope_step: Any, slope_init: Any) -> Any:
        """``|slope| - curv_rtol |slope_init|``, 0 where it holds, inf for nan."""
        error = np.abs(slope_step) - self.curv_rtol * np.abs(slope_init)
        error = np.maximum(error, 0.0)
        return error.dtype.type(np.inf) if np.isnan(error) else error

    def _errors(self, st: _Search, stepsize: Any, value: Any, slope: Any) -> tuple[Any, Any, Any]:
        decrease = self.decrease_error(stepsize, value, slope, st.value_init, st.slope_init)
        curvature = self.curvature_error(slope, st.slope_init)
        return decrease, curvature, np.maximum(decrease, curvature)

    def search_interval(self, st: _Search, line: _Line, grad: Any) -> None:
        """Algorithm 3.5: grow the stepsize until an interval holding a good one is found."""
        count = st.count
        new_stepsize = st.stepsize_guess if count == 0 else self.increase_factor * st.stepsize
        reached = False
        if self.max_stepsize is not None:
            reached = bool(new_stepsize >= self.max_stepsize)
            new_stepsize = np.minimum(new_stepsize, self.max_stepsize)
        value, new_grad, slope = line.evaluate(new_stepsize)
        if count == 0:
            value_init, slope_init = line.initial()
            st.start(value_init, slope_init, grad, line.dtype(0.0))
        decrease, curvature, error = self._errors(st, new_stepsize, value, slope)
        if decrease <= self.tol:
            st.safe_stepsize, st.safe_value, st.safe_grad = new_stepsize, value, new_grad
        set_high = bool((decrease > 0.0) or ((value >= st.value) and count > 0))
        set_low = bool(slope >= 0.0) and not set_high
        prev = (st.stepsize, st.value, st.slope)
        new = (new_stepsize, value, slope)
        low, high = (new, prev) if set_low else (prev, new)
        found = set_high or set_low or bool(error <= self.tol)
        done = bool(error <= self.tol) or (reached and not found)
        if self.verbose and reached and not found:
            self._print_interval_not_found(st, new_stepsize, decrease, curvature)
        st.failed = count + 1 >= self.max_linesearch_steps and not done
        st.count = count + 1
        st.stepsize, st.value, st.grad, st.slope = new_stepsize, value, new_grad, slope
        st.decrease_error, st.curvature_error, st.error = decrease, curvature, error
        st.interval_found, st.done = found, done
        st.low, st.value_low, st.slope_low = low
        st.high, st.value_high, st.slope_high = high
        st.cubic_ref, st.value_cubic_ref = st.low, st.value_low

    def _middle(self, st: _Search) -> Any:
        """The next trial: the cubic's minimum, else the quadratic's, else the midpoint."""
        low, high = st.low, st.high
        delta = np.abs(high - low)
        left, right = np.minimum(high, low), np.maximum(high, low)
        cubic_chk, quad_chk = 0.2 * delta, 0.1 * delta
        cubic = _cubicmin(low, st.value_low, st.slope_low, high, st.value_high, st.cubic_ref,
                          st.value_cubic_ref)  # fmt: skip
        if (cubic > left + cubic_chk) and (cubic < right - cubic_chk):
            return cubic
        quad = _quadmin(low, st.value_low, st.slope_low, high, st.value_high)
        if (quad > left + quad_chk) and (quad < right - quad_chk):
            return quad
        return (low + high) / 2.0

    def zoom_into_interval(self, st: _Search, line: _Line) -> None:
        """Algorithm 3.6: shrink ``[low, high]`` by interpolation until a point holds both
        criteria, the interval is below ``interval_threshold`` (with a safe point), or the
        steps run out."""
        too_small = bool(np.abs(st.high - st.low) <= self.interval_threshold)
        middle = self._middle(st)
        value, grad, slope = line.evaluate(middle)
        decrease, curvature, error = self._errors(st, middle, value, slope)
        if decrease <= self.tol and value < st.safe_value:
            st.safe_stepsize, st.safe_value, st.safe_grad = middle, value, grad
        done = bool(error <= self.tol)
        set_high_to_middle = bool((decrease > 0.0) or (value >= st.value_low))
        set_high_to_low = bool(slope * (st.high - st.low) >= 0.0) and not set_high_to_middle
        old_low = (st.low, st.value_low, st.slope_low)
        old_high = (st.high, st.value_high, st.slope_high)
        new_high = (middle, value, slope) if set_high_to_middle else old_high
        new_high = old_low if set_high_to_low else new_high
        new_low = old_low if set_high_to_middle else (middle, value, slope)
        ref = old_high if set_high_to_middle or set_high_to_low else old_low
        presumably_failed = st.count + 1 >= self.max_linesearch_steps or (
            too_small and st.safe_stepsize > 0.0
        )
        st.failed = bool(presumably_failed) and not done
        st.count += 1
        st.stepsize, st.value, st.grad, st.slope = middle, value, grad, slope
        st.decrease_error, st.curvature_error, st.error = decrease, curvature, error
        st.done = done
        st.low, st.value_low, st.slope_low = new_low
        st.high, st.value_high, st.slope_high = new_high
        st.cubic_ref, st.value_cubic_ref = ref[0], ref[1]

    def try_safe_step(self, st: _Search) -> None:
        """After a failure: the safe point (sufficient decrease) if there is one, or if the
        last trial's value was not finite (then the start, ``s = 0``); else the last trial."""
        if self.verbose:
            self._print_failure(st)
        if st.safe_stepsize > 0.0 or np.isinf(st.decrease_error):
            st.stepsize, st.value, st.grad = st.safe_stepsize, st.safe_value, st.safe_grad

    def run(self, line: _Line, grad: Any, prev_stepsize: Any, strategy: str) -> _Search:
        """optax's ``while_loop``: steps until done or failed."""
        guess = line.dtype(1.0) if strategy == "one" else line.dtype(prev_stepsize)
        st = _Search(count=0, stepsize_guess=guess, stepsize=line.dtype(0.0))
        with np.errstate(all="ignore"):
            while not (st.done or st.failed):
                if st.interval_found:
                    self.zoom_into_interval(st, line)
                else:
                    self.search_interval(st, line, grad)
                if st.failed:
                    self.try_safe_step(st)
        return st

    # ------------------------------------------------------------------ verbose

    @staticmethod
    def _print_interval_not_found(st: _Search, stepsize: Any, decrease: Any, curvature: Any):
        print(
            f"INFO: optax.scale_by_zoom_linesearch:\nValue at current params: {st.value_init}\n"
            f"Slope along update direction: {st.slope_init}\nStepsize reached: {stepsize}\n"
            f"Decrease Error: {decrease}\nCurvature Error: {curvature}"
            f"{FLAG_INTERVAL_NOT_FOUND}\n{FLAG_CURVATURE_COND_NOT_SATISFIED}"
        )

    def _print_failure(self, st: _Search) -> None:
        print(
            f"INFO: optax.scale_by_zoom_linesearch:\nValue at current params: {st.value_init}\n"
            f"Slope along update direction: {st.slope_init}\nStepsize reached: {st.stepsize}\n"
            f"Decrease Error: {st.decrease_error}\nCurvature Error: {st.curvature_error}"
        )
        length = np.abs(st.low - st.high)
        if length <= self.interval_threshold:
            print(f"{FLAG_INTERVAL_TOO_SMALL} Interval length: {length}.")
        if st.safe_stepsize > 0.0:
            print(
                f"{FLAG_CURVATURE_COND_NOT_SATISFIED} Stepsize ensuring sufficient decrease: "
                f"{st.safe_stepsize}."
            )
            return
        print(FLAG_NO_STEPSIZE_FOUND)
        descent = st.slope_init < 0.0
        if not descent:
            print(
                f"{FLAG_NOT_A_DESCENT_DIRECTION}The slope (={st.slope_init}) at stepsize=0 "
                "should be negative"
            )
        else:
            print("Consider augmenting the maximal number of linesearch iterations.")
            eps = np.finfo(np.float32).eps
            if st.stepsize < eps:
                print(
                    f"Computed stepsize (={st.stepsize}) is below machine precision (={eps}), "
                    "consider passing to higher precision like float64."
                )
            if np.abs(st.slope_init) > 1e16:
                print(
                    f"Very large absolute slope at stepsize=0. (|slope|={np.abs(st.slope_init)})."
                    " The objective is badly conditioned. Consider reparameterizing objective "
                    "(e.g., normalizing parameters) or finding a better guess for the initial "
                    "parameters for the solver."
                )
        if np.isinf(st.decrease_error):
            print(
                "Cannot even make a step without getting Inf or Nan. The linesearch won't make "
                "a step and the optimizer is stuck."
            )
        else:
            print(
                "Making an unsafe step, not decreasing enough the objective. Convergence of the "
                "solver is compromised as it does not reduce values."
            )


# ---------------------------------------------------------------------------- the transform


def _check_params(params: Any, where: str) -> list[cla.Array]:
    leaves = optree.tree_leaves(params)
    if not leaves:
        raise ValueError(f"{_WHO}: {where} has no leaves (nothing to search along)")
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(
                f"{_WHO}: leaf {i} of {where} is a {type(x).__name__}, not a pyopencl.array.Array"
            )
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(
                f"{_WHO}: leaf {i} of {where} is {x.dtype}: the line search runs on float32 "
                "and float64 params"
            )
    return leaves


def _checked_hyperparameters(
    max_linesearch_steps, max_learning_rate, tol, increase_factor, slope_rtol, curv_rtol,
    approx_dec_rtol, stepsize_precision, initial_guess_strategy, verbose,
) -> tuple[_Zoom, str]:  # fmt: skip
    zoom = _Zoom(
        max_linesearch_steps=require("max_linesearch_steps", max_linesearch_steps, at_least(1)),
        max_stepsize=require("max_learning_rate", max_learning_rate, MAX_LEARNING_RATE),
        tol=require("tol", tol, NON_NEGATIVE),
        increase_factor=require("increase_factor", increase_factor, INCREASE_FACTOR),
        slope_rtol=require("slope_rtol", slope_rtol, interval(0, 1, "[)")),
        curv_rtol=require("curv_rtol", curv_rtol, CURV_RTOL),
        approx_dec_rtol=require("approx_dec_rtol", approx_dec_rtol, optional(NON_NEGATIVE)),
        interval_threshold=require("stepsize_precision", stepsize_precision, NON_NEGATIVE),
        verbose=require("verbose", verbose, BOOL),
    )
    strategy = require("initial_guess_strategy", initial_guess_strategy,
                       one_of(*GUESS_STRATEGIES).value_errors())  # fmt: skip
    return zoom, strategy


def scale_by_zoom_linesearch(
    max_linesearch_steps: int,
    max_learning_rate: float | None = None,
    tol: float = 0.0,
    increase_factor: float = 2.0,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    approx_dec_rtol: float | None = 1e-6,
    stepsize_precision: float = 1e-5,
    initial_guess_strategy: str = "keep",
    verbose: bool = False,
) -> GradientTransformation:
    """Scale the updates by a learning rate ``s`` meeting the strong Wolfe conditions along
    them (optax's ``scale_by_zoom_linesearch``, same signature, defaults and decisions)::

        decrease:   f(w + s u) <= f(w) + slope_rtol s <g, u> + tol
                    (or, once f(w + s u) <= f(w) + approx_dec_rtol |f(w)|, Hager & Zhang's
                    <g(w + s u), u> <= (2 slope_rtol - 1) <g, u> + tol)
        curvature:  |<g(w + s u), u>| <= curv_rtol |<g, u>| + tol

    Start at 1 (``initial_guess_strategy="one"``) or at the last learning rate (``"keep"``,
    the default), multiply by ``increase_factor`` until an interval holding such an ``s`` is
    found (capped at ``max_learning_rate``), then zoom in with cubic, quadratic or bisection
    steps, at most ``max_linesearch_steps`` trials. On failure: the best ``s`` with
    sufficient decrease, else the last trial (0 if its value was not finite). Returns ``s u``.

    ``update(updates, state, params, *, value, grad, value_fn, **extra_args)``: ``value`` and
    ``grad`` are ``f`` and its gradient at ``params``, ``value_fn(params, **fn_kwargs) ->
    (value, grad)`` (the extra arguments value_fn names, as optax; any other is a TypeError).
    We have no autodiff: value_fn returns the gradient too (a tree like the params, device
    arrays), and one returning only a value is a TypeError. A value is a number, a numpy
    scalar or a 0-d/one-element device array. The state keeps the value and gradient at the
    point reached, for ``value_and_grad_from_state``.

    Differences from optax: the search runs on the host (the value and slope of each trial
    are read back); the trial points are ``p + (s u)`` rounded twice (XLA on CPU fuses it
    into one fma) and the slopes are dot products summed in float64 where the device has it,
    so float32 results agree to rounding; bad hyperparameters raise here
    (``max_linesearch_steps`` an int >= 1, ``max_learning_rate`` None or > 0,
    ``increase_factor`` > 1, ``slope_rtol`` in [0, 1), ``curv_rtol`` > 0, ``tol``,
    ``approx_dec_rtol`` and ``stepsize_precision`` >= 0, ``initial_guess_strategy`` "one" or
    "keep"); optax checks none, the strategy at the first update.

    Device: per trial, one launch per dtype for the point, two for the slope (a deterministic
    dot), and one host read per dtype (the slope, with the value when value_fn returns it on
    the device; the first read also brings the slope and value at ``params``): one read per
    trial for a single-dtype tree. A tree that is not packed is gathered first (one copy per
    leaf, and per leaf of each gradient). The returned updates are one launch per dtype.
    """
    zoom, strategy = _checked_hyperparameters(
        max_linesearch_steps, max_learning_rate, tol, increase_factor, slope_rtol, curv_rtol,
        approx_dec_rtol, stepsize_precision, initial_guess_strategy, verbose,
    )  # fmt: skip

    def init(params: Any) -> ScaleByZoomLinesearchState:
        leaves = _check_params(params, "params")
        dtype = leaves[0].dtype.type
        queue = queue_of_leaves(leaves)
        zeros = optree.tree_unflatten(
            optree.tree_structure(params), allocate_like(leaves, queue, fill=0.0)
        )
        info = ZoomLinesearchInfo(0, dtype(np.inf), dtype(np.inf))
        return ScaleByZoomLinesearchState(dtype(1.0), dtype(np.inf), zeros, info)

    def update(
        updates: Any,
        state: ScaleByZoomLinesearchState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable[..., Any] | None = None,
        **extra_args: Any,
    ) -> tuple[Any, ScaleByZoomLinesearchState]:
        check_state(tx, state)
        missing = [n for n, v in (("params", params), ("value", value), ("grad", grad),
                                  ("value_fn", value_fn)) if v is None]  # fmt: skip
        if missing:
            raise TypeError(
                f"{_WHO} needs {', '.join(missing)}: update(updates, state, params, value=f, "
                "grad=g, value_fn=value_fn), value_fn(params, **kwargs) -> (value, grad)"
            )
        if not callable(value_fn):
            raise TypeError(f"{_WHO}: value_fn is a {type(value_fn).__name__}, not a callable")
        fn_kwargs = fn_kwargs_of(value_fn, extra_args, _WHO)
        leaves = _check_params(params, "params")
        check_like(updates, params, "updates", "params", _WHO)
        check_like(grad, params, "grad", "params", _WHO)
        check_value(value, _WHO)
        prev = require("state.learning_rate", state.learning_rate, _LEARNING_RATE, _WHO)
        line = _Line(params, updates, grad, value, value_fn, fn_kwargs)
        found = zoom.run(line, grad, leaves[0].dtype.type(prev), strategy)
        dtype = line.dtype
        info = ZoomLinesearchInfo(found.count, dtype(found.decrease_error),
                                  dtype(found.curvature_error))  # fmt: skip
        new_state = ScaleByZoomLinesearchState(dtype(found.stepsize), dtype(found.value),
                                               found.grad, info)  # fmt: skip
        return line.scaled(found.stepsize), new_state

    tx = GradientTransformation(init, update, OpaquePlan(_WHO, ()))
    return register(
        tx,
        lambda: NamedTupleSpec(
            ScaleByZoomLinesearchState, {"info": NamedTupleSpec(ZoomLinesearchInfo)}
        ),
    )
