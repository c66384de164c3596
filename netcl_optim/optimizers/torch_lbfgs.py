"""torch.optim's L-BFGS (torch 2.13's algorithm, defaults and state; torch 2.14's ``maximize``)
as the stateful ``LBFGS``, with every vector on the device.

The flat parameter vector is a view of the group's packed buffer; the flat gradient, the
direction ``d``, ``prev_flat_grad`` and the history (``old_dirs`` = y, ``old_stps`` = s) are
flat device vectors, stepped by :class:`~netcl_optim.fusion._vectors.Vectors` and the
two-loop recursion of :func:`~netcl_optim.optimizers._two_loop.two_loop`. The host holds
the scalars torch holds as Python numbers or 0-d tensors (``t``, ``ro``, ``H_diag``, the
line search's bracket) as numpy scalars of the params' dtype, and computes them with
torch's rounding (numpy's scalar promotion is torch's for 0-d tensors; ``a / tensor`` is
torch's ``tensor.reciprocal() * a``, see :func:`_div`). Only the scalars the algorithm
branches on are read back, in one batch per function evaluation and one per iteration.
"""

from __future__ import annotations

__all__ = ["LBFGS"]

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._base import GradientTransformation
from .._device import allocator
from .._packing import contiguous_run, layout
from .._validation import NON_NEGATIVE, at_least, invalid, one_of, optional, real, require
from ..fusion._vectors import ONE, Coef, Vectors, coef
from ..stateful._declaration import (
    KEYWORD_ONLY,
    MAXIMIZE,
    STORAGE_DEFAULTS,
    Hyperparameter,
    as_stored,
    torch_lr,
)
from ..stateful._groups import as_param_groups, group_params
from ..stateful._optimizer import Optimizer
from ..transforms._combining import identity
from ._two_loop import two_loop
from .polyak import host_loss

LINE_SEARCHES = ("strong_wolfe",)
MAX_ITER = at_least(1)
LINE_SEARCH_FN = optional(one_of(*LINE_SEARCHES))
_ONE_GROUP = "LBFGS doesn't support per-parameter options (parameter groups)"
_NO_ZERO = (
    "LBFGS cannot be sharded by ZeroRedundancyOptimizer: its step calls the closure several "
    "times and keeps a history of flat vectors over all the parameters. Run it unsharded on "
    "the all-reduced gradients (every rank steps the whole model)"
)
# torch's implementation flags: dropped on load
_IGNORED_ON_LOAD = ("foreach", "differentiable", "fused", "capturable", "param_names")
_VECTOR_KEYS = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")
_STATE_KEYS = ("func_evals", "n_iter", *_VECTOR_KEYS, "al")

# registers (device scalars) of the step's Vectors
_GMAX, _GSUM, _YS, _YY, _SMAX, _GTD, _DMAX, _LOSS, _BETA = range(9)
_ALPHA = 9  # the two-loop's alpha_i from here on (torch's al)


# ---------------------------------------------------------------------------- host scalars


def _div(a: Any, b: Any) -> Any:
    """``a / b`` as torch computes it where a 0-d tensor is a numpy scalar and a Python
    number is a Python number: ``number / tensor`` is ``tensor.reciprocal() * number``."""
    if isinstance(b, np.floating) and not isinstance(a, np.floating):
        return (b.dtype.type(1) / b) * a
    return a / b


def _sqrt(x: Any) -> Any:
    """A 0-d tensor's ``sqrt()``, correctly rounded (torch's CPU kernels, Sleef or MKL's,
    are within an ulp: 1-2% of float64 and ~18% of float32 square roots differ from
    numpy's in the last bit, so an interpolated trial step may too)."""
    return np.sqrt(x)


def _cubic_interpolate(
    x1: Any, f1: Any, g1: Any, x2: Any, f2: Any, g2: Any, bounds: tuple | None = None
) -> Any:
    """The minimiser of the cubic through ``(x1, f1, g1)`` and ``(x2, f2, g2)`` (values and
    slopes), clipped to ``bounds`` (default: between the points); their midpoint where the
    cubic has no real minimiser. torch's ``_cubic_interpolate``, its operations in order."""
    if bounds is None:
        lo, hi = (x1, x2) if x1 <= x2 else (x2, x1)
    else:
        lo, hi = bounds
    d1 = g1 + g2 - _div(3 * (f1 - f2), x1 - x2)
    d2_square = d1 * d1 - g1 * g2  # (torch's d1**2 is d1 * d1)
    if d2_square >= 0:
        d2 = _sqrt(d2_square)
        if x1 <= x2:
            at = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            at = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(at, lo), hi)
    return (lo + hi) / 2.0


@dataclass
class _Evaluation:
    """One call of the closure, at ``x_init + t d`` (``t = 0``: the point the iteration
    starts from): its loss (a Python float), flat gradient ``g`` and the scalars read back
    with it: ``gmax = max|g|``, ``gsum = sum|g|`` (first iteration), ``gtd = g.d`` (line
    search), and the pair ``s = d t``, ``y = g - prev_flat_grad`` the next iteration stores,
    with ``ys = y.s``, ``yy = y.y``, ``smax = max|s|`` (None: no pair)."""

    t: Any
    loss: float
    g: cla.Array
    gmax: Any
    gsum: Any = None
    gtd: Any = None
    y: cla.Array | None = None
    s: cla.Array | None = None
    ys: Any = None
    yy: Any = None
    smax: Any = None

    def buffers(self) -> list[cla.Array]:
        return [b for b in (self.g, self.y, self.s) if b is not None]


def _strong_wolfe(
    evaluate: Callable[[Any, list[_Evaluation]], _Evaluation],
    t: Any,
    origin: _Evaluation,
    gtd: Any,
    d_norm: Any,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
) -> tuple[float, _Evaluation, Any, int]:
    """torch's ``_strong_wolfe`` line search along ``d`` from ``origin`` (the point
    ``t = 0``: its loss, slope ``gtd``; ``max|d| = d_norm``), from the trial step ``t``:
    bracketing, then zooming by cubic interpolation, until the strong Wolfe conditions hold
    or ``max_ls`` evaluations.
    ``evaluate(t, keep)`` calls the closure at ``x_init + t d`` (``keep``: the evaluations
    whose vectors are still needed). Returns ``(loss, evaluation, t, evaluations)``."""
    f = origin.loss
    new = evaluate(t, [origin])
    evals = 1
    f_new, gtd_new = new.loss, new.gtd
    t_prev, f_prev, prev, gtd_prev = 0, f, origin, gtd
    done = False
    ls_iter = 0
    while ls_iter < max_ls:
        if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
            bracket, b_f, b_ev, b_gtd = (
                [t_prev, t],
                [f_prev, f_new],
                [prev, new],
                [gtd_prev, gtd_new],
            )
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, b_f, b_ev, b_gtd = [t], [f_new], [new], [gtd_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, b_f, b_ev, b_gtd = (
                [t_prev, t],
                [f_prev, f_new],
                [prev, new],
                [gtd_prev, gtd_new],
            )
            break
        # extrapolate between 1.01 t and 10 t
        min_step = t + 0.01 * (t - t_prev)
        max_step = t * 10
        last = t
        t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                               bounds=(min_step, max_step))  # fmt: skip
        t_prev, f_prev, prev, gtd_prev = last, f_new, new, gtd_new
        new = evaluate(t, [origin, prev])
        f_new, gtd_new = new.loss, new.gtd
        evals += 1
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, b_f, b_ev, b_gtd = [0, t], [f, f_new], [origin, new], [gtd, gtd_new]

    # zoom: shrink the bracket until a point satisfies the conditions
    insufficient = False
    low, high = (0, 1) if b_f[0] <= b_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_interpolate(bracket[0], b_f[0], b_gtd[0], bracket[1], b_f[1], b_gtd[1])
        # a trial close to an end twice in a row (or at an end) moves 10% of the bracket in
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:
            if insufficient or t >= max(bracket) or t <= min(bracket):
                if abs(t - max(bracket)) < abs(t - min(bracket)):
                    t = max(bracket) - eps
                else:
                    t = min(bracket) + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        new = evaluate(t, [origin, *b_ev])
        f_new, gtd_new = new.loss, new.gtd
        evals += 1
        ls_iter += 1
        if f_new > (f + c1 * t * gtd) or f_new >= b_f[low]:
            # no sufficient decrease, or above the low end: the new point is the high end
            bracket[high], b_f[high], b_ev[high], b_gtd[high] = t, f_new, new, gtd_new
            low, high = (0, 1) if b_f[0] <= b_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], b_f[high] = bracket[low], b_f[low]
                b_ev[high], b_gtd[high] = b_ev[low], b_gtd[low]
            bracket[low], b_f[low], b_ev[low], b_gtd[low] = t, f_new, new, gtd_new
    return b_f[low], b_ev[low], bracket[low], evals


# ---------------------------------------------------------------------------- device state


@dataclass
class _State:
    """torch's ``state[params[0]]``: counters, host scalars and device vectors."""

    func_evals: int = 0
    n_iter: int = 0
    d: cla.Array | None = None
    t: Any = None
    old_dirs: list[cla.Array] = field(default_factory=list)
    old_stps: list[cla.Array] = field(default_factory=list)
    ro: list[Any] = field(default_factory=list)
    H_diag: Any = None
    prev_flat_grad: cla.Array | None = None
    prev_loss: float | None = None
    # torch's al: a list of history_size entries, None where never set
    al: cla.Array | None = None  # the values (device)
    al_set: list[bool] = field(default_factory=list)
    al_from_registers: int = 0  # this step's last two-loop wrote al[:k] in the registers

    def copy(self) -> _State:
        return _State(self.func_evals, self.n_iter, self.d, self.t, list(self.old_dirs),
                      list(self.old_stps), list(self.ro), self.H_diag, self.prev_flat_grad,
                      self.prev_loss, self.al, list(self.al_set))  # fmt: skip

    def buffers(self) -> list[cla.Array]:
        vectors = [self.d, self.prev_flat_grad, *self.old_dirs, *self.old_stps]
        return [v for v in vectors if v is not None]

    @property
    def started(self) -> bool:
        return self.func_evals > 0 or self.n_iter > 0


class _Pool:
    """Flat device vectors of one size, reused: ``take`` one, and ``collect`` every vector
    not among the live ones (the committed state's, the step's)."""

    def __init__(self, queue: cl.CommandQueue, dtype: np.dtype, n: int) -> None:
        self.queue, self.dtype, self.n = queue, dtype, n
        self.owned: list[cla.Array] = []
        self.free: list[cla.Array] = []

    def new(self) -> cla.Array:
        """A vector that is no one's yet (owned by the pool from now on)."""
        v = cla.empty(self.queue, (self.n,), self.dtype, allocator=allocator(self.queue))
        self.owned.append(v)
        return v

    def take(self) -> cla.Array:
        return self.free.pop() if self.free else self.new()

    def collect(self, live: Sequence[cla.Array]) -> None:
        ids = {id(v) for v in live}
        self.free = [v for v in self.owned if id(v) not in ids]


@dataclass(frozen=True)
class _Settings:
    """A step's hyperparameters, checked."""

    lr: float
    max_iter: int
    max_eval: int
    tolerance_grad: float
    tolerance_change: float
    history_size: int
    line_search_fn: str | None
    maximize: bool


class LBFGS(Optimizer):
    """L-BFGS, torch.optim's ``LBFGS`` (torch 2.13's algorithm, defaults and state), every
    vector on the device::

        d = -H g   (two-loop recursion over the last history_size pairs s = t d, y = g - g_prev
                    whose y.s > 1e-10; H_0 = (y.s / y.y) I of the newest pair)
        t = min(1, 1/|g|_1) lr at the very first iteration, lr after
        x <- x + t d   (line_search_fn=None), or t from a strong Wolfe line search
                       (line_search_fn="strong_wolfe": c1=1e-4, c2=0.9, at most
                       max_eval - evaluations so far closure calls, cubic interpolation;
                       as in torch, its bracket tolerance is 1e-9, not tolerance_change)

    up to ``max_iter`` iterations per :meth:`step`, stopping as torch does (in its order):
    ``max|g| <= tolerance_grad`` at the first evaluation; ``g.d > -tolerance_change``; then
    ``max_iter`` iterations, ``max_eval`` evaluations, ``max|g| <= tolerance_grad``,
    ``max|t d| <= tolerance_change``, ``|loss - prev_loss| < tolerance_change``.

    Args:
      params: the parameters, one param group only (torch's ValueError otherwise, also in
        :meth:`add_param_group`), all float32 or all float64 (no mix).
      lr: 1.0; max_iter: 20 (>= 1); max_eval: None (``max_iter * 5 // 4``); tolerance_grad:
        1e-7; tolerance_change: 1e-9 (both >= 0: torch takes anything); history_size: 100
        (>= 1); line_search_fn: None or ``"strong_wolfe"`` (anything else: ValueError at
        construction, torch's RuntimeError comes at the step).
      maximize: (keyword-only; torch 2.14's, pytorch/pytorch#187309) maximise: the
        closure's loss and gradients are negated where they enter the algorithm (the
        first evaluation, the fixed step's re-evaluation, the line search's), so the line
        search, the tolerances and the state work on ``-loss`` (``prev_loss`` included);
        :meth:`step` returns the closure's own value.

    ``step(closure)``: the closure sets every parameter's ``.grad`` (a device array; a
    ``None`` grad counts as zeros, as torch) and returns the loss (a number, a numpy scalar,
    a torch 0-d tensor, a 0-d or one-element pyopencl array). Returns the first loss.

    Unlike torch, a failing step changes nothing: a closure that raises, returns a loss
    that is nan or inf, or sets a gradient with a nan or inf (FloatingPointError; torch
    does not check), or sets no gradient at all (ValueError), leaves the parameters as
    they were (a device snapshot taken at the step's start is copied back) and the state
    too (it is committed when the step ends). ``ZeroRedundancyOptimizer`` refuses the class.

    State (torch's keys, ``state[params[0]]``, state dicts at index 0): ``func_evals``,
    ``n_iter``, ``d``, ``t``, ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``,
    ``prev_flat_grad``, ``prev_loss``, ``al``. Host scalars round as torch's (see the
    module's docstring) but for the line search's square root, correctly rounded here and
    within an ulp in torch's CPU kernels (:func:`_sqrt`).

    Device and host: every vector stays on the device; reads (``Vectors.reads``) per
    step: one per iteration (``g.d`` of the new direction, and ``max|d|`` with the line
    search) and one per closure call (``max|g|``, with ``y.s``, ``y.y``, ``max|s|`` of the
    pair it makes, ``g.d`` in the line search, ``sum|g|`` at the very first iteration and
    the loss when it is a device array of the params' dtype; another dtype: one more
    read). So ``n_iter + func_evals`` reads for a step's iterations and evaluations, 40 for
    a full step with the defaults and no line search. Memory: the history, ``d``,
    ``prev_flat_grad``, two snapshots of the params, the pairs of the running step (the
    committed ones are kept until the step ends: up to ``min(max_iter, history_size)``
    more pairs) and a few vectors of the line search, all reused from step to step.
    """

    hyperparameters = (
        torch_lr(1.0),
        Hyperparameter("max_iter", 20, MAX_ITER),
        Hyperparameter("max_eval", None, optional(at_least(1))),
        Hyperparameter("tolerance_grad", 1e-7, NON_NEGATIVE),
        Hyperparameter("tolerance_change", 1e-9, NON_NEGATIVE),
        Hyperparameter("history_size", 100, at_least(1)),
        Hyperparameter("line_search_fn", None, LINE_SEARCH_FN),
        KEYWORD_ONLY,
        MAXIMIZE,
    )
    torch_step = False

    @staticmethod
    def functional(
        lr: Any,
        max_iter: int,
        max_eval: Any,
        tolerance_grad: float,
        tolerance_change: float,
        history_size: int,
        line_search_fn: Any,
        maximize: bool,
    ) -> GradientTransformation:
        """Unused (the step is :meth:`LBFGS.step`'s loop, not a chain)."""
        return identity()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        declaration = type(self)._declaration
        params, defaults = declaration.bind((self, *args), kwargs)
        for k in STORAGE_DEFAULTS:
            if k in defaults:
                raise ValueError(f"{k}={defaults[k]!r} is not supported: LBFGS keeps its "
                                 "history in the parameters' dtype")  # fmt: skip
        if defaults["max_eval"] is None:
            max_iter = require("max_iter", defaults["max_iter"], MAX_ITER.value_errors())
            defaults["max_eval"] = max_iter * 5 // 4
        declaration.validate(defaults)
        groups = as_param_groups(params)
        if len(groups) != 1:
            raise ValueError(_ONE_GROUP)
        self._state = _State()
        self._vectors: Vectors | None = None
        Optimizer.__init__(self, groups, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """The one param group (a second one: torch's ValueError, nothing changed). Its
        parameters must share one dtype, float32 or float64."""
        if getattr(self, "param_groups", None):
            raise ValueError(_ONE_GROUP)
        if isinstance(param_group, Mapping) and "params" in param_group:
            params = group_params(param_group["params"], 0)
            param_group = {**param_group, "params": params}
            dtypes = sorted({str(p.data.dtype) for p in params})
            if len(dtypes) > 1:
                raise TypeError(f"LBFGS steps one flat vector: its parameters must share one "
                                f"dtype, got {', '.join(dtypes)}")  # fmt: skip
            if dtypes and dtypes[0] not in ("float32", "float64"):
                raise TypeError(f"LBFGS needs float32 or float64 parameters, got {dtypes[0]}")
        super().add_param_group(param_group)
        rec = self._groups[0]
        self._queue = rec.queue
        self._dtype = np.dtype(rec.dtypes[0]) if rec.dtypes else np.dtype(np.float32)
        self._real = self._dtype.type
        self._lay = layout(tuple(rec.shapes), self._dtype)
        self._numel = self._lay.total
        self._flat = self._flat_view(rec.data)
        self._pool = _Pool(self._queue, self._dtype, self._numel)
        alloc = allocator(self._queue)
        # the params at the step's start (copied back on error), where a line search starts
        self._x0 = cla.empty(self._queue, (self._numel,), self._dtype, allocator=alloc)
        self._x_init = cla.empty(self._queue, (self._numel,), self._dtype, allocator=alloc)

    def _flat_view(self, arrays: list[cla.Array]) -> cla.Array | None:
        """A flat 1-D view of ``arrays`` if they lie back to back in one buffer."""
        run = contiguous_run(arrays, self._lay) if arrays else None
        if run is None:
            return None
        base, off = run
        return layout(((self._numel,),), self._dtype).views_of(
            self._queue, base, off * self._dtype.itemsize
        )[0]

    # ------------------------------------------------------------------ refusals

    def _check_step(self) -> None:
        """Only :meth:`step` runs L-BFGS: a step from elsewhere (ZeRO's) is refused."""
        raise TypeError(_NO_ZERO)

    def _chain(self, gi: int) -> Any:
        """LBFGS has no functional chain (ZeroRedundancyOptimizer asks for one when it
        builds: refused there, before anything changes)."""
        raise TypeError(_NO_ZERO)

    # ------------------------------------------------------------------ step

    def _settings(self) -> _Settings:
        group = self.param_groups[0]
        rec = self._groups[0]
        params = group.get("params")
        if (
            not isinstance(params, list)
            or len(params) != len(rec.params)
            or any(a is not b for a, b in zip(params, rec.params, strict=True))
        ):
            raise ValueError("param_groups[0]['params'] was changed: LBFGS steps the "
                             "parameters it was built with")  # fmt: skip
        v = self._declaration.validate(group, "param_groups[0]", in_group=True)
        max_eval = v["max_eval"] if v["max_eval"] is not None else v["max_iter"] * 5 // 4
        return _Settings(float(v["lr"]), v["max_iter"], max_eval, v["tolerance_grad"],
                         v["tolerance_change"], v["history_size"], v["line_search_fn"],
                         v["maximize"])  # fmt: skip

    def _params_flat(self) -> cla.Array:
        """The flat params (the packed buffer; a ``.data`` rebound since the packing must
        still lie back to back with the others, else ValueError)."""
        rec = self._groups[0]
        data = [p.data for p in rec.params]
        if all(a is b for a, b in zip(data, rec.data, strict=True)) and self._flat is not None:
            return self._flat
        for j, (d, shape) in enumerate(zip(data, rec.shapes, strict=True)):
            if not isinstance(d, cla.Array) or d.shape != shape or d.dtype != self._dtype:
                raise ValueError(f"param_groups[0]['params'][{j}].data was rebound to another "
                                 "array: write new values in place (data.set(...))")  # fmt: skip
        flat = self._flat_view(data)
        if flat is None:
            raise ValueError("the parameters' .data were rebound and no longer lie back to "
                             "back in one buffer: LBFGS steps them as one flat vector; write "
                             "new values in place (data.set(...))")  # fmt: skip
        return flat

    def _ensure_vectors(self, alphas: int) -> Vectors:
        need = _ALPHA + alphas + 1
        v = self._vectors
        if v is None or v.reg.size < need:
            v = self._vectors = Vectors(self._queue, self._dtype, need)
        return v

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Up to ``max_iter`` L-BFGS iterations; returns the closure's first loss. See the
        class docstring for what it reads back and what an error leaves."""
        if closure is None or not callable(closure):
            raise TypeError("LBFGS.step needs a closure: step(closure), where closure() sets "
                            "every parameter's .grad and returns the loss")  # fmt: skip
        settings = self._settings()
        flat = self._params_flat()
        committed = self._state
        work = committed.copy()
        cap = max(settings.history_size, len(work.old_dirs), len(work.al_set))
        vectors = self._ensure_vectors(cap)
        vectors.copy(self._x0, flat)
        try:
            orig_loss = self._iterate(closure, settings, flat, vectors, work)
        except BaseException:
            vectors.copy(flat, self._x0)
            self._pool.collect(committed.buffers())
            raise
        self._commit(work)
        return orig_loss

    def _commit(self, work: _State) -> None:
        """Make ``work`` the state: the last two-loop's ``al`` copied from the registers
        (on the device), the vectors no longer in the state given back to the pool."""
        vectors = self._vectors
        assert vectors is not None
        k = work.al_from_registers
        if k:
            n = len(work.al_set)
            if work.al is None or work.al.size < n:
                grown = cla.zeros(self._queue, (n,), self._dtype, allocator=allocator(self._queue))
                if work.al is not None and work.al.size:
                    _copy_bytes(self._queue, grown, 0, work.al, 0, work.al.nbytes)
                work.al = grown
            item = self._dtype.itemsize
            _copy_bytes(self._queue, work.al, 0, vectors.reg, _ALPHA * item, k * item)
        work.al_from_registers = 0
        self._state = work
        self._pool.collect(work.buffers())

    def _iterate(
        self, closure: Callable[[], Any], hp: _Settings, flat: cla.Array, vectors: Vectors,
        w: _State,
    ) -> Any:  # fmt: skip
        """torch's ``step`` on the working state ``w``; returns the first loss."""
        real = self._real
        keep_state = self._state.buffers()

        def evaluate(
            t: Any, d: cla.Array | None, prev: cla.Array | None, first: bool,
            line_search: bool, keep: list[_Evaluation],
        ) -> tuple[Any, _Evaluation]:  # fmt: skip
            live = keep_state + w.buffers() + [b for e in keep for b in e.buffers()]
            self._pool.collect(live)
            assert self._vectors is not None
            return self._evaluate(closure, hp, self._vectors, t, d, prev, first, line_search)

        orig_loss, ev = evaluate(w.t, w.d, w.prev_flat_grad, w.n_iter == 0, False, [])
        w.func_evals += 1
        current_evals = 1
        if ev.gmax <= hp.tolerance_grad:
            return orig_loss
        loss = ev.loss
        n_iter = 0
        while n_iter < hp.max_iter:
            n_iter += 1
            w.n_iter += 1
            # ------------------------------------------------ direction
            new_d = self._pool.take()
            vectors.scale(new_d, ev.g, Coef(-1.0))
            if w.n_iter == 1:
                w.old_dirs, w.old_stps, w.ro, w.H_diag = [], [], [], 1
            else:
                if ev.y is not None and ev.ys > 1e-10:
                    if len(w.old_dirs) == hp.history_size:
                        w.old_dirs.pop(0)
                        w.old_stps.pop(0)
                        w.ro.pop(0)
                    assert ev.s is not None
                    w.old_dirs.append(ev.y)
                    w.old_stps.append(ev.s)
                    w.ro.append(_div(1.0, ev.ys))
                    w.H_diag = ev.ys / ev.yy
                k = len(w.old_dirs)
                if not w.al_set:
                    w.al_set = [False] * hp.history_size
                if k > len(w.al_set):
                    w.al_set += [False] * (k - len(w.al_set))
                vectors = self._ensure_vectors(max(k, len(w.al_set)))
                pairs = list(zip(w.old_stps, w.old_dirs, strict=True))
                rho = [coef(float(r)) for r in w.ro]
                two_loop(vectors, new_d, pairs, rho, coef(float(w.H_diag)), _ALPHA, _BETA)
                w.al_set[:k] = [True] * k
                w.al_from_registers = k
            d = w.d = new_d
            w.prev_flat_grad = ev.g
            w.prev_loss = prev_loss = loss
            # ------------------------------------------------ step length
            if w.n_iter == 1:
                t = min(1.0, _div(1.0, ev.gsum)) * hp.lr
            else:
                t = hp.lr
            vectors.dot(ev.g, d, _GTD)
            if hp.line_search_fn is not None:
                vectors.amax(d, _DMAX)
            regs = vectors.read()
            gtd, d_norm = regs[_GTD], regs[_DMAX]
            w.t = t
            if gtd > -hp.tolerance_change:
                break
            ls_func_evals = 0
            opt_cond = False
            if hp.line_search_fn is not None:
                vectors.copy(self._x_init, flat)
                origin = _Evaluation(0, loss, ev.g, ev.gmax, gtd=gtd, ys=real(0), yy=real(0),
                                     smax=real(0))  # fmt: skip

                def at(t_: Any, keep: list[_Evaluation], d: cla.Array = d,
                       origin: _Evaluation = origin) -> _Evaluation:  # fmt: skip
                    assert self._vectors is not None
                    self._vectors.lincomb(flat, self._x_init, ONE, d, coef(float(t_)))
                    return evaluate(t_, d, origin.g, False, True, keep)[1]

                # (torch passes neither c1, c2 nor tolerance_change: the defaults hold)
                loss, ev, t, ls_func_evals = _strong_wolfe(
                    at, t, origin, gtd, d_norm, max_ls=hp.max_eval - current_evals
                )
                vectors.lincomb(flat, self._x_init, ONE, d, coef(float(t)))
                w.t = t
                opt_cond = ev.gmax <= hp.tolerance_grad
            else:
                vectors.axpy(flat, d, coef(float(t)))
                if n_iter != hp.max_iter:
                    _, ev = evaluate(t, d, ev.g, False, False, [])
                    loss = ev.loss
                    opt_cond = ev.gmax <= hp.tolerance_grad
                    ls_func_evals = 1
            current_evals += ls_func_evals
            w.func_evals += ls_func_evals
            # ------------------------------------------------ stop?
            if n_iter == hp.max_iter or current_evals >= hp.max_eval or opt_cond:
                break
            if ev.smax <= hp.tolerance_change:  # max|d t|
                break
            if abs(loss - prev_loss) < hp.tolerance_change:
                break
        return orig_loss

    def _evaluate(
        self, closure: Callable[[], Any], hp: _Settings, vectors: Vectors, t: Any,
        d: cla.Array | None, prev: cla.Array | None, first: bool, line_search: bool,
    ) -> tuple[Any, _Evaluation]:  # fmt: skip
        """Call the closure (at the params as they are), gather its flat gradient and, in one
        read, the scalars the algorithm branches on (see :class:`_Evaluation`). Returns the
        closure's value and the evaluation; FloatingPointError on a nan or inf."""
        value = closure()
        if value is None:
            raise TypeError("LBFGS.step: the closure returned None: it must return the loss")
        g = self._pool.take()
        self._gather(g, vectors, hp.maximize)
        vectors.amax(g, _GMAX)
        if first:
            vectors.asum(g, _GSUM)
        y = s = None
        if d is not None and prev is not None:
            s, y = self._pool.take(), self._pool.take()
            vectors.scale(s, d, coef(float(t)))
            vectors.amax(s, _SMAX)
            vectors.sub(y, g, prev)
            vectors.dot(y, s, _YS)
            vectors.dot(y, y, _YY)
        if line_search:
            assert d is not None
            vectors.dot(g, d, _GTD)
        on_device = (
            isinstance(value, cla.Array) and value.size == 1 and value.dtype == self._dtype
            and value.context == self._queue.context
        )  # fmt: skip
        if on_device:
            item = self._dtype.itemsize
            _copy_bytes(self._queue, vectors.reg, _LOSS * item, value, 0, item)
        else:
            if isinstance(value, cla.Array):
                Vectors.reads += 1  # (read back by host_loss)
            host = host_loss(value, "LBFGS.step")
        regs = vectors.read()
        loss = float(regs[_LOSS]) if on_device else float(host)
        if hp.maximize:
            loss = -loss
        if not math.isfinite(loss):
            raise FloatingPointError(f"LBFGS.step: the closure returned a non-finite loss "
                                     f"({loss}); the parameters and the state are as before "
                                     "the step (torch.optim.LBFGS does not check)")  # fmt: skip
        gmax = regs[_GMAX]
        if not np.isfinite(gmax):
            raise FloatingPointError(f"LBFGS.step: the closure set a gradient with a non-finite "
                                     f"element (max |g| = {gmax}); the parameters and the state "
                                     "are as before the step (torch.optim.LBFGS does not "
                                     "check)")  # fmt: skip
        ev = _Evaluation(t, loss, g, gmax, gsum=regs[_GSUM] if first else None,
                         gtd=regs[_GTD] if line_search else None, y=y, s=s)  # fmt: skip
        if y is not None:
            ev.ys, ev.yy, ev.smax = regs[_YS], regs[_YY], regs[_SMAX]
        return value, ev

    def _gather(self, out: cla.Array, vectors: Vectors, negate: bool) -> None:
        """The params' grads into the flat ``out`` (``None``: zeros; negated for
        ``maximize``): one copy when they are packed, else one per parameter."""
        rec = self._groups[0]
        grads = [p.grad for p in rec.params]
        if all(g is None for g in grads):
            raise ValueError("LBFGS.step: the closure set no gradient (every parameter's "
                             ".grad is None); the parameters and the state are as before the "
                             "step")  # fmt: skip
        for j, (g, shape) in enumerate(zip(grads, rec.shapes, strict=True)):
            if g is not None:
                _check_grad(j, g, shape, self._dtype, self._queue.context)
        n, item = self._numel, self._dtype.itemsize
        if n == 0:
            return
        run = contiguous_run(grads, self._lay) if None not in grads else None
        if run is not None:
            base, off = run
            if negate:
                src = layout(((n,),), self._dtype).views_of(self._queue, base, off * item)[0]
                vectors.scale(out, src, Coef(-1.0))
                return
            cl.enqueue_copy(self._queue, out.base_data, base, byte_count=n * item,  # pyright: ignore
                            src_offset=off * item, dst_offset=out.offset)  # fmt: skip
            return
        for g, o, size in zip(grads, self._lay.offsets, self._lay.sizes, strict=True):
            if not size:
                continue
            if g is None:
                zero = np.zeros(1, self._dtype)
                cl.enqueue_fill_buffer(self._queue, out.base_data, zero,  # pyright: ignore
                                       out.offset + o * item, size * item)  # fmt: skip
            else:
                _copy_bytes(self._queue, out, o * item, g, 0, size * item)
        if negate:
            vectors.scale(out, out, Coef(-1.0))

    # ------------------------------------------------------------------ state

    def _entry(self, host: bool) -> dict[str, Any]:
        """torch's ``state[params[0]]`` (numpy copies when ``host``, else the device
        vectors); ``{}`` before the first step."""
        s = self._state
        if not s.started:
            return {}
        entry: dict[str, Any] = {"func_evals": s.func_evals, "n_iter": s.n_iter}

        def vec(v: cla.Array) -> Any:
            return v.get() if host else v

        if s.d is not None:
            assert s.prev_flat_grad is not None
            entry.update(
                d=vec(s.d), t=s.t, old_dirs=[vec(v) for v in s.old_dirs],
                old_stps=[vec(v) for v in s.old_stps], ro=list(s.ro), H_diag=s.H_diag,
                prev_flat_grad=vec(s.prev_flat_grad), prev_loss=s.prev_loss,
            )  # fmt: skip
        if s.al_set:
            values = s.al.get() if s.al is not None else np.zeros(0, self._dtype)
            entry["al"] = [values[i] if on else None for i, on in enumerate(s.al_set)]
        return entry

    @property
    def state(self) -> defaultdict[Any, dict[str, Any]]:  # type: ignore[override]
        """torch's view: ``{params[0]: {key: value}}`` (device vectors, live; ``al`` read
        back), empty before the first step."""
        out: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        entry = self._entry(host=False)
        if entry:
            out[self._groups[0].params[0]] = entry
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch's layout: ``{"state": {0: {"func_evals", "n_iter", "d", "t", "old_dirs",
        "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss", "al"}}, "param_groups":
        [{hyperparameters..., "params": [0, ...]}], "optimizer": "LBFGS"}``: vectors as numpy
        arrays, torch's 0-d tensors as numpy scalars of the params' dtype, its Python
        numbers as Python numbers. One read-back per vector."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self._groups[0].params)))
        entry = self._entry(host=True)
        return {"state": {0: entry} if entry else {}, "param_groups": [group],
                "optimizer": type(self).__name__}  # fmt: skip

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`, ours or torch's (tensors as numpy arrays; torch 2.13's
        groups have no ``maximize``: the constructor's is kept). Everything is checked
        first (the class, one group of the right size, its hyperparameters, the state's
        keys, shapes and lengths): ValueError with nothing changed."""
        group, state = self._checked_load(state_dict)
        self.param_groups[0].clear()
        self.param_groups[0].update(group)
        self._state = state
        self._pool.collect(state.buffers())

    def _checked_load(self, sd: Mapping[str, Any]) -> tuple[dict[str, Any], _State]:
        name = type(self).__name__
        if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
            raise ValueError("a state dict has the keys 'state' and 'param_groups'")
        origin = sd.get("optimizer")
        if origin is not None and origin != name:
            raise ValueError(f"loaded state dict is {origin}'s, not {name}'s: load it into "
                             f"the class that saved it ({origin})")  # fmt: skip
        groups = sd["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != 1:
            raise ValueError(f"loaded state dict must have one param group ({_ONE_GROUP})")
        saved = groups[0]
        rec = self._groups[0]
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError("loaded param_groups[0] is not a param group dict (with a list "
                             "'params')")  # fmt: skip
        if len(saved["params"]) != len(rec.params):
            raise ValueError(f"loaded param_groups[0] has {len(saved['params'])} parameters, "
                             f"the optimizer's has {len(rec.params)}")  # fmt: skip
        names = self._declaration.names
        foreign = (set(saved) & _hyperparameters_of_others(type(self))) - set(names)
        if foreign:
            raise ValueError(f"loaded param_groups[0] has hyperparameters {sorted(foreign)} "
                             f"that {name} does not have: it is another optimizer's")  # fmt: skip
        group = {k: v for k, v in saved.items() if k not in ("params", *_IGNORED_ON_LOAD)}
        group.update({k: as_stored(saved[k]) if k in saved else self.defaults[k] for k in names})
        if group["max_eval"] is None:
            group["max_eval"] = self.defaults["max_eval"]
        self._declaration.validate(group, "loaded param_groups[0]", in_group=True)
        group["params"] = list(rec.params)
        state = sd["state"]
        if not isinstance(state, Mapping):
            raise ValueError("loaded 'state' is not a dict of parameter index -> state")
        if not state:
            return group, _State()
        first = saved["params"][0] if saved["params"] else 0
        if len(state) != 1 or _index(next(iter(state))) != _index(first):
            raise ValueError(f"loaded state must hold one entry, at the first parameter's "
                             f"index {first!r} (LBFGS's state is global), got keys "
                             f"{sorted(map(str, state))}")  # fmt: skip
        return group, self._import_entry(next(iter(state.values())))

    def _import_entry(self, entry: Any) -> _State:
        """The loaded entry, checked, as a new state (vectors uploaded to new buffers)."""
        where = "loaded state"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} is a {type(entry).__name__}, not a dict")
        unknown = set(entry) - set(_STATE_KEYS)
        if unknown:
            raise ValueError(f"{where} has keys {sorted(unknown)} that LBFGS does not use")
        counts = [_count(entry.get(k, 0), k, where) for k in ("func_evals", "n_iter")]
        present = [k for k in _VECTOR_KEYS if entry.get(k) is not None]
        if present and len(present) != len(_VECTOR_KEYS):
            missing = [k for k in _VECTOR_KEYS if k not in present]
            raise ValueError(f"{where} has {present} but lacks {missing}")
        if counts[1] > 0 and not present:
            raise ValueError(f"{where} has n_iter={counts[1]} but no direction: after an "
                             f"iteration torch's state holds {list(_VECTOR_KEYS)}")  # fmt: skip
        n = self._numel
        host: dict[str, Any] = {}
        if present:
            host["d"] = self._vector(entry["d"], "d", where)
            host["prev_flat_grad"] = self._vector(entry["prev_flat_grad"], "prev_flat_grad",
                                                  where)  # fmt: skip
            lists = {}
            for k in ("old_dirs", "old_stps", "ro"):
                v = entry[k]
                if not isinstance(v, (list, tuple)):
                    raise ValueError(f"{where}: {k!r} is a {type(v).__name__}, not a list")
                lists[k] = list(v)
            if not len(lists["old_dirs"]) == len(lists["old_stps"]) == len(lists["ro"]):
                raise ValueError(f"{where}: 'old_dirs', 'old_stps' and 'ro' have lengths "
                                 f"{len(lists['old_dirs'])}, {len(lists['old_stps'])}, "
                                 f"{len(lists['ro'])} (must be equal)")  # fmt: skip
            host["old_dirs"] = [self._vector(v, f"old_dirs[{i}]", where)
                                for i, v in enumerate(lists["old_dirs"])]  # fmt: skip
            host["old_stps"] = [self._vector(v, f"old_stps[{i}]", where)
                                for i, v in enumerate(lists["old_stps"])]  # fmt: skip
            host["ro"] = [self._scalar(v, f"ro[{i}]", where, tensor=True)
                          for i, v in enumerate(lists["ro"])]  # fmt: skip
            host["t"] = self._scalar(entry["t"], "t", where)
            host["H_diag"] = self._scalar(entry["H_diag"], "H_diag", where)
            host["prev_loss"] = float(self._scalar(entry["prev_loss"], "prev_loss", where))
        al = entry.get("al")
        al_values: list[Any] = []
        if al is not None:
            if not isinstance(al, (list, tuple)):
                raise ValueError(f"{where}: 'al' is a {type(al).__name__}, not a list")
            al_values = [None if v is None else self._scalar(v, f"al[{i}]", where, tensor=True)
                         for i, v in enumerate(al)]  # fmt: skip
        # (checked: now the new buffers)
        state = _State(func_evals=counts[0], n_iter=counts[1])
        if present:

            def upload(a: np.ndarray) -> cla.Array:
                v = self._pool.new()
                if n:
                    v.set(np.ascontiguousarray(a, self._dtype))
                return v

            state.d = upload(host["d"])
            state.prev_flat_grad = upload(host["prev_flat_grad"])
            state.old_dirs = [upload(a) for a in host["old_dirs"]]
            state.old_stps = [upload(a) for a in host["old_stps"]]
            state.ro, state.t, state.H_diag = host["ro"], host["t"], host["H_diag"]
            state.prev_loss = host["prev_loss"]
        if al is not None:
            state.al_set = [v is not None for v in al_values]
            values = np.array([0 if v is None else v for v in al_values], self._dtype)
            if values.size:
                state.al = cla.to_device(self._queue, values, allocator=allocator(self._queue))
        return state

    def _vector(self, v: Any, key: str, where: str) -> np.ndarray:
        a = _host(v)
        if a.shape != (self._numel,) or a.dtype.kind != "f":
            raise ValueError(f"{where}: {key!r} is {a.dtype} {a.shape}, expected a float "
                             f"vector of shape ({self._numel},) (the parameters' element "
                             "count)")  # fmt: skip
        return a

    def _scalar(self, v: Any, key: str, where: str, tensor: bool = False) -> Any:
        """A loaded scalar: a Python number stays one (torch's Python numbers), an array or
        numpy scalar (torch's 0-d tensors) becomes a scalar of the params' dtype."""
        if isinstance(v, (int, float)) and not isinstance(v, (bool, np.generic)) and not tensor:
            return v
        a = _host(v)
        if a.size != 1 or a.dtype.kind not in "fiu" or real(a.reshape(())[()]) is None:
            raise invalid(key, v, "a real number or a one-element array", where)
        return self._real(a.reshape(())[()])


def _hyperparameters_of_others(cls: type) -> set[str]:
    """The hyperparameter names of every declared optimizer class but ``cls``."""
    names: set[str] = set()
    todo = list(Optimizer.__subclasses__())
    while todo:
        c = todo.pop()
        todo.extend(c.__subclasses__())
        declaration = getattr(c, "_declaration", None)
        if c is not cls and declaration is not None:
            names |= set(declaration.names)
    return names


def _host(v: Any) -> np.ndarray:
    if isinstance(v, cla.Array):
        return v.get()
    if callable(getattr(v, "detach", None)):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _count(v: Any, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise invalid(key, v, "an int >= 0", where)
    return int(v)


def _index(pid: Any) -> int:
    if isinstance(pid, (int, np.integer)) and not isinstance(pid, bool):
        return int(pid)
    if isinstance(pid, str) and pid.isdigit():
        return int(pid)
    raise ValueError(f"invalid parameter index {pid!r} in the state dict")


def _check_grad(j: int, g: Any, shape: tuple, dtype: np.dtype, context: Any) -> None:
    where = f"LBFGS.step: param_groups[0]['params'][{j}].grad"
    if not isinstance(g, cla.Array):
        raise TypeError(f"{where} is a {type(g).__name__}, not a pyopencl.array.Array")
    if g.shape != shape:
        raise ValueError(f"{where} has shape {g.shape}, the parameter {shape}")
    if g.dtype != dtype:
        raise TypeError(f"{where} has dtype {g.dtype}, the parameter {dtype}")
    if g.context != context:
        raise ValueError(f"{where} belongs to another OpenCL context")
    if not g.flags.c_contiguous:
        raise ValueError(f"{where} is not C-contiguous")


def _copy_bytes(
    queue: cl.CommandQueue, dst: cla.Array, dst_at: int, src: cla.Array, src_at: int, n: int
) -> None:
    """``n`` bytes of ``src`` from byte ``src_at`` to ``dst`` from ``dst_at`` (a device
    copy; offsets from the arrays' own)."""
    if n:
        cl.enqueue_copy(queue, dst.base_data, src.base_data, byte_count=n,  # pyright: ignore
                        src_offset=src.offset + src_at, dst_offset=dst.offset + dst_at)  # fmt: skip


LBFGS.__init__.__signature__ = LBFGS._declaration.signature  # type: ignore[attr-defined]
