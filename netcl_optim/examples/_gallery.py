"""The optimizer gallery (``notebooks/07_optimizer_gallery.ipynb``): every functional alias
of the library on three 2-D test functions and on the digits MLP.

* :data:`FUNCTIONS`: Rosenbrock, Rastrigin and a bounded saddle, with their gradients (numpy,
  float64, on the host), start points and plot windows;
* :data:`GALLERY`: one :class:`GalleryOptimizer` per functional alias, in families, with the
  learning rate used on each problem and its calling convention (the gradient alone, or the
  loss too: ``value=`` for Polyak's step, ``value_fn=`` for L-BFGS's line search,
  ``grad_fn=`` for SAM; Lookahead's and schedule-free's evaluation points);
* :func:`run_2d` and :func:`run_digits`: the runners. Every step is ``no.step(tx, params,
  grads, state, donate=True, **extra)``, float32 params on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyopencl.array as cla

import netcl_optim as no

from ._digits_setup import load_digits_split
from ._mlp import MLP, init_params

# ---------------------------------------------------------------------- the test functions


@dataclass(frozen=True)
class TestFunction:
    """A 2-D test function: ``value(x, y)`` and ``gradient(x, y) -> (gx, gy)`` broadcast
    over numpy arrays (float64); ``f_min`` its minimum, reached at ``minimizers``."""

    name: str
    formula: str
    value: Callable[[Any, Any], Any]
    gradient: Callable[[Any, Any], tuple[Any, Any]]
    start: tuple[float, float]
    f_min: float
    minimizers: tuple[tuple[float, float], ...]
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    log_levels: bool = False  # contour levels spaced in log(f - f_min + 1)

    __test__ = False  # (not a pytest class)


def _rosenbrock(x: Any, y: Any) -> Any:
    return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2


def _rosenbrock_grad(x: Any, y: Any) -> tuple[Any, Any]:
    return -2.0 * (1.0 - x) - 400.0 * x * (y - x * x), 200.0 * (y - x * x)


def _rastrigin(x: Any, y: Any) -> Any:
    two_pi = 2.0 * math.pi
    return 20.0 + x * x - 10.0 * np.cos(two_pi * x) + y * y - 10.0 * np.cos(two_pi * y)


def _rastrigin_grad(x: Any, y: Any) -> tuple[Any, Any]:
    two_pi = 2.0 * math.pi
    return 2.0 * x + 20.0 * math.pi * np.sin(two_pi * x), 2.0 * y + 20.0 * math.pi * np.sin(
        two_pi * y
    )


def _saddle(x: Any, y: Any) -> Any:
    return x * x - y * y + 0.25 * y**4


def _saddle_grad(x: Any, y: Any) -> tuple[Any, Any]:
    return 2.0 * x, -2.0 * y + y**3


ROSENBROCK = TestFunction(
    "rosenbrock",
    "(1 - x)^2 + 100 (y - x^2)^2",
    _rosenbrock,
    _rosenbrock_grad,
    start=(-1.2, 1.0),
    f_min=0.0,
    minimizers=((1.0, 1.0),),
    xlim=(-2.0, 2.0),
    ylim=(-1.0, 3.0),
    log_levels=True,
)
RASTRIGIN = TestFunction(
    "rastrigin",
    "20 + x^2 - 10 cos(2 pi x) + y^2 - 10 cos(2 pi y)",
    _rastrigin,
    _rastrigin_grad,
    start=(-2.3, 2.6),
    f_min=0.0,
    minimizers=((0.0, 0.0),),
    xlim=(-3.2, 3.2),
    ylim=(-3.2, 3.2),
)
SADDLE = TestFunction(
    "saddle",
    "x^2 - y^2 + y^4 / 4",
    _saddle,
    _saddle_grad,
    start=(-2.0, 0.01),
    f_min=-1.0,
    minimizers=((0.0, math.sqrt(2.0)), (0.0, -math.sqrt(2.0))),
    xlim=(-2.5, 2.5),
    ylim=(-2.5, 2.5),
)
FUNCTIONS: tuple[TestFunction, ...] = (ROSENBROCK, RASTRIGIN, SADDLE)
PROBLEMS = ("rosenbrock", "rastrigin", "saddle", "digits")
STEPS_2D = 200  # the runs' lengths (the learning rates below were chosen for them)
DIGITS_STEPS = 300  # batches of 32: 45 an epoch

# ---------------------------------------------------------------------- the optimizers

# how an optimizer is called (see _drive)
GRAD = "grad"  # update(grads, state, params)
VALUE = "value"  # ... value=loss at params (Polyak's step size)
LINE_SEARCH = "line_search"  # ... value=, grad=, value_fn=params -> (loss, grads)
SAM = "sam"  # opaque SAM: ... grad_fn=(params, i) -> grads at the i-th ascent point
LOOKAHEAD = "lookahead"  # params are LookaheadParams; grads at .fast; evaluate at .slow
SCHEDULE_FREE = "schedule_free"  # params hold y; evaluate at schedule_free_eval_params


@dataclass(frozen=True)
class GalleryOptimizer:
    """One functional alias in the gallery: ``make(lr, f_min)`` builds it (``f_min``: the
    problem's lower bound, read by Polyak's step only); ``lrs`` gives ``lr`` per problem
    (``None``: the alias has no learning rate there); ``call`` its calling convention."""

    name: str
    family: str
    make: Callable[[Any, float], no.GradientTransformation]
    lrs: dict[str, float | None]
    call: str = GRAD
    recipe: str = ""  # how it is built, when not just ``name(lr)``
    lr_meaning: str = "learning rate"

    def transform(self, problem: str, f_min: float = 0.0) -> no.GradientTransformation:
        """The transform for ``problem`` (one of :data:`PROBLEMS`)."""
        return self.make(self.lrs[problem], f_min)


def _lrs(rosenbrock: float | None, rastrigin: float | None, saddle: float | None,
         digits: float | None) -> dict[str, float | None]:  # fmt: skip
    return {"rosenbrock": rosenbrock, "rastrigin": rastrigin, "saddle": saddle, "digits": digits}


def _entry(name: str, family: str, lrs: dict[str, float | None], make=None, **kw: Any):
    """``name(lr)`` unless ``make`` is given."""
    alias = getattr(no, name)
    return GalleryOptimizer(name, family, make or (lambda lr, f_min: alias(lr)), lrs, **kw)


_SAM_RHO = 0.05
_LOOKAHEAD = {"sync_period": 5, "slow_step_size": 0.5}

GALLERY: tuple[GalleryOptimizer, ...] = (
    # SGD and friends: the step is the gradient times the learning rate
    _entry("sgd", "SGD", _lrs(0.003, 0.003, 0.3, 0.3)),
    _entry("momentum", "SGD", _lrs(0.001, 0.0003, 0.3, 0.03), recipe="momentum(lr, 0.9)"),
    _entry("noisy_sgd", "SGD", _lrs(0.003, 0.003, 0.3, 0.3),
           make=lambda lr, f_min: no.noisy_sgd(lr, key=0), recipe="noisy_sgd(lr, key=0)"),
    _entry("asgd", "SGD", _lrs(0.003, 0.003, 0.3, 0.3)),
    _entry("schedule_free_sgd", "SGD", _lrs(0.003, 0.003, 1.0, 1.0), call=SCHEDULE_FREE),
    _entry("optimistic_gradient_descent", "SGD", _lrs(0.0003, 0.001, 0.1, 0.3)),
    # Adam and its close variants: the step is about the learning rate
    _entry("adam", "Adam", _lrs(0.3, 0.1, 1.0, 0.01)),
    _entry("adamw", "Adam", _lrs(0.3, 0.1, 1.0, 0.01)),
    _entry("amsgrad", "Adam", _lrs(0.3, 0.1, 1.0, 0.01)),
    _entry("nadam", "Adam", _lrs(0.1, 0.1, 0.3, 0.01)),
    _entry("nadamw", "Adam", _lrs(0.1, 0.1, 0.3, 0.01)),
    _entry("radam", "Adam", _lrs(0.0003, 0.01, 1.0, 0.03)),
    _entry("adopt", "Adam", _lrs(1.0, 0.3, 0.3, 0.01)),
    _entry("adamax", "Adam variants", _lrs(0.3, 0.1, 1.0, 0.03)),
    _entry("adamaxw", "Adam variants", _lrs(0.3, 0.1, 1.0, 0.03)),
    _entry("adabelief", "Adam variants", _lrs(0.3, 0.1, 0.3, 0.01)),
    _entry("yogi", "Adam variants", _lrs(0.3, 0.1, 0.3, 0.01)),
    _entry("adan", "Adam variants", _lrs(0.3, 0.3, 1.0, 0.01)),
    _entry("optimistic_adam_v2", "Adam variants", _lrs(0.1, 0.3, 0.3, 0.01)),
    _entry("ademamix", "Adam variants", _lrs(0.3, 0.1, 1.0, 0.01)),
    _entry("simplified_ademamix", "Adam variants", _lrs(0.03, 0.0003, 0.001, 0.0001)),
    # per-coordinate accumulators
    _entry("adagrad", "Adagrad and RMS", _lrs(0.3, 1.0, 1.0, 0.03)),
    _entry("adadelta", "Adagrad and RMS", _lrs(1.0, 1.0, 1.0, 1.0)),
    _entry("rmsprop", "Adagrad and RMS", _lrs(0.03, 0.1, 0.1, 0.003)),
    _entry("rprop", "Adagrad and RMS", _lrs(0.01, 0.1, 0.3, 0.1), lr_meaning="first step"),
    _entry("sm3", "Adagrad and RMS", _lrs(1.0, 0.1, 1.0, 0.1)),
    _entry("adafactor", "Adagrad and RMS", _lrs(0.1, 1.0, 0.3, 0.03)),
    _entry("madgrad", "Adagrad and RMS", _lrs(0.1, 0.03, 1.0, 0.01)),
    # signs
    _entry("lion", "Sign", _lrs(0.03, 0.03, 0.3, 0.003)),
    _entry("sign_sgd", "Sign", _lrs(0.03, 0.03, 0.3, 0.003)),
    _entry("signum", "Sign", _lrs(0.03, 0.03, 0.1, 0.003)),
    # per-layer trust ratios (a 2-D problem is one layer)
    _entry("lamb", "Layer-wise", _lrs(0.1, 0.01, 0.1, 0.01)),
    _entry("lars", "Layer-wise", _lrs(1.0, 1.0, 1.0, 1.0)),
    _entry("fromage", "Layer-wise", _lrs(1.0, 1.0, 0.3, 0.03)),
    _entry("novograd", "Layer-wise", _lrs(0.03, 0.03, 0.3, 0.03)),
    # orthogonalised momentum for the matrices (the digits MLP's weights; on a 2-D problem,
    # one vector, muon's AdamW branch)
    _entry("muon", "Matrix", _lrs(0.3, 1.0, 1.0, 0.03)),
    # learning-rate-free: lr is a multiplier of the estimated step size
    _entry("prodigy", "Learning-rate-free", _lrs(1.0, 1.0, 1.0, 1.0), lr_meaning="multiplier"),
    _entry("dadapt_adamw", "Learning-rate-free", _lrs(1.0, 1.0, 1.0, 1.0),
           lr_meaning="multiplier"),
    _entry("dog", "Learning-rate-free", _lrs(1.0, 1.0, 1.0, 1.0), lr_meaning="multiplier"),
    _entry("dowg", "Learning-rate-free", _lrs(1.0, 1.0, 1.0, 1.0), lr_meaning="multiplier"),
    _entry("cocob", "Learning-rate-free", _lrs(1.0, 1.0, 1.0, 1.0), lr_meaning="multiplier"),
    # schedule-free, wrappers, and the rules that need the loss
    _entry("schedule_free_adamw", "Wrappers and loss-aware", _lrs(0.3, 0.3, 1.0, 0.03),
           call=SCHEDULE_FREE),
    _entry("lookahead", "Wrappers and loss-aware", _lrs(0.3, 0.1, 1.0, 0.03),
           make=lambda lr, f_min: no.lookahead(no.adam(lr), **_LOOKAHEAD), call=LOOKAHEAD,
           recipe="lookahead(adam(lr), sync_period=5, slow_step_size=0.5)"),
    _entry("sam", "Wrappers and loss-aware", _lrs(0.003, 0.001, 0.1, 0.3),
           make=lambda lr, f_min: no.sam(no.sgd(lr), no.chain(no.normalize(), no.sgd(_SAM_RHO)),
                                         opaque_mode=True),
           call=SAM, recipe=f"sam(sgd(lr), chain(normalize(), sgd({_SAM_RHO})), opaque_mode=True)"),
    _entry("polyak_sgd", "Wrappers and loss-aware", _lrs(0.01, 0.003, 1.0, 1.0),
           make=lambda lr, f_min: no.polyak_sgd(max_learning_rate=lr, f_min=f_min), call=VALUE,
           recipe="polyak_sgd(max_learning_rate=lr, f_min=the problem's minimum)",
           lr_meaning="max_learning_rate"),
    _entry("lbfgs", "Wrappers and loss-aware", _lrs(None, None, None, None),
           make=lambda lr, f_min: no.lbfgs(), call=LINE_SEARCH,
           recipe="lbfgs() (zoom line search)", lr_meaning="line search"),
)  # fmt: skip

FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(opt.family for opt in GALLERY))
BY_NAME: dict[str, GalleryOptimizer] = {opt.name: opt for opt in GALLERY}

# ---------------------------------------------------------------------- the runner


@dataclass
class Run:
    """What one optimizer did: ``values[i]`` the loss at the ``i``-th gradient point (step
    ``i``); ``points[i]`` (2-D runs) the evaluation point after ``i`` steps (``points[0]``:
    the start); ``diverged`` the step at which a value or a point became non-finite."""

    name: str
    values: list[float] = field(default_factory=list)
    points: list[tuple[float, float]] = field(default_factory=list)
    diverged: int | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0


# value_and_grad(params) -> (loss as a host float, grads: device arrays shaped like params)
ValueAndGrad = Callable[[Any], tuple[float, Any]]


def _initial(opt: GalleryOptimizer, params: Any) -> Any:
    if opt.call == LOOKAHEAD:  # (init_synced holds one array twice: no donated step)
        return no.LookaheadParams(fast=params, slow=no.pack(params))
    return params


def _grad_point(opt: GalleryOptimizer, params: Any) -> Any:
    return params.fast if opt.call == LOOKAHEAD else params


def eval_point(opt: GalleryOptimizer, params: Any, state: Any) -> Any:
    """Where the optimizer is meant to be evaluated: Lookahead's slow weights,
    schedule-free's ``x`` (a fresh tree), the params otherwise."""
    if opt.call == LOOKAHEAD:
        return params.slow
    if opt.call == SCHEDULE_FREE:
        return no.schedule_free_eval_params(state, params)
    return params


def _drive(
    opt: GalleryOptimizer,
    tx: no.GradientTransformation,
    params: Any,
    objective: Callable[[int], ValueAndGrad],
    steps: int,
    observe: Callable[[int, Any, Any], bool],
    run: Run,
) -> tuple[Any, Any]:
    """``steps`` steps of ``tx`` from ``params``; ``objective(i)`` is step ``i``'s
    value-and-grad function; ``observe(i, params, state)`` after each step returns False to
    stop (divergence). Returns the final ``(params, state)``."""
    params = _initial(opt, params)
    state = tx.init(params)
    for i in range(steps):
        value_and_grad = objective(i)
        value, grads = value_and_grad(_grad_point(opt, params))
        run.values.append(value)
        if not math.isfinite(value):
            run.diverged = i
            break
        extra: dict[str, Any] = {}
        if opt.call == VALUE:
            extra = {"value": value}
        elif opt.call == LINE_SEARCH:
            extra = {"value": value, "grad": grads, "value_fn": value_and_grad}
        elif opt.call == SAM:
            extra = {"grad_fn": lambda p, _i, f=value_and_grad: f(p)[1]}
        params, state = no.step(tx, params, grads, state, donate=True, **extra)
        if not observe(i, params, state):
            run.diverged = i
            break
    return params, state


def run_2d(opt: GalleryOptimizer, function: TestFunction, steps: int = STEPS_2D) -> Run:
    """``steps`` steps of ``opt`` on ``function`` from its start point, float32 params on
    the device, the gradient computed on the host in float64 (one read and one write per
    evaluation)."""
    queue = no.default_queue()
    run = Run(opt.name, points=[function.start])
    tx = opt.transform(function.name, function.f_min)

    def value_and_grad(params: cla.Array) -> tuple[float, cla.Array]:
        x, y = params.get().astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run: inf, then stop
            gx, gy = function.gradient(x, y)
            grads = np.array([gx, gy], np.float32)
            return float(function.value(x, y)), no.to_device(grads, queue)

    def observe(i: int, params: Any, state: Any) -> bool:
        x, y = eval_point(opt, params, state).get().astype(np.float64)
        run.points.append((float(x), float(y)))
        return math.isfinite(x) and math.isfinite(y)

    start = no.to_device(np.array(function.start, np.float32), queue)
    t0 = time.perf_counter()
    _drive(opt, tx, start, lambda i: value_and_grad, steps, observe, run)
    run.seconds = time.perf_counter() - t0
    return run


@dataclass
class Digits:
    """The digits data on the device for :func:`run_digits`: ``epochs`` shuffled copies of
    the training set back to back (the same batches for every optimizer), the test set,
    the model (its kernels) and a buffer for per-row losses."""

    model: MLP
    x_epochs: cla.Array
    y_epochs: cla.Array
    x_test: cla.Array
    y_test: np.ndarray
    losses: cla.Array
    rows: int
    batch: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows // self.batch)

    def batch_at(self, step: int) -> tuple[int, int]:
        """``(offset, rows)`` of step ``step``'s batch in ``x_epochs``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.batch
        return epoch * self.rows + start, min(self.batch, self.rows - start)


def load_digits_gallery(epochs: int, batch: int = 32, seed: int = 0) -> Digits:
    """The digits split of the examples, ``epochs`` shuffles (``seed``) uploaded once, and
    the MLP (``seed``: its kernels; :func:`run_digits` starts each run from these weights)."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(x_tr)) for _ in range(epochs)]
    queue = no.default_queue()
    return Digits(
        model=MLP(seed=seed, queue=queue),
        x_epochs=no.to_device(np.concatenate([x_tr[p] for p in perms]), queue),
        y_epochs=no.to_device(np.concatenate([y_tr[p] for p in perms]), queue),
        x_test=no.to_device(x_te, queue),
        y_test=y_te,
        losses=no.to_device(np.zeros(epochs * len(x_tr), np.float32), queue),
        rows=len(x_tr),
        batch=batch,
    )


def run_digits(
    opt: GalleryOptimizer, data: Digits, steps: int = DIGITS_STEPS, seed: int = 0
) -> Run:
    """``steps`` minibatch steps of ``opt`` on the digits MLP from the same initial weights
    (``seed``); ``values`` are the batch losses at the gradient points (one read per
    evaluation), ``test_accuracy`` is measured at the evaluation point at the end."""
    if steps > data.x_epochs.shape[0] // data.rows * data.steps_per_epoch:
        raise ValueError(f"Invalid steps: {steps} (must fit in the uploaded epochs)")
    model, queue = data.model, data.model.queue
    run = Run(opt.name)
    tx = opt.transform("digits")
    fresh = opt.call in (LINE_SEARCH, SAM)  # a line search keeps the grads it is given
    shared_grads = model.zero_grads_tree()

    def objective(step: int) -> ValueAndGrad:
        offset, rows = data.batch_at(step)

        def value_and_grad(params: Any) -> tuple[float, Any]:
            grads = model.zero_grads_tree() if fresh else shared_grads
            model.forward(data.x_epochs, offset, rows, params=params)
            model.backward(data.y_epochs, grads=grads, losses=data.losses)
            return float(data.losses[offset : offset + rows].get().mean()), grads

        return value_and_grad

    params = no.pack(no.to_device(init_params(model.sizes, seed), queue))
    t0 = time.perf_counter()
    params, state = _drive(opt, tx, params, objective, steps, lambda *a: True, run)
    if run.diverged is None:
        predicted = model.predict(data.x_test, params=eval_point(opt, params, state))
        run.test_accuracy = float(np.mean(predicted == data.y_test))
    run.seconds = time.perf_counter() - t0
    return run


# ---------------------------------------------------------------------- choosing the lrs

LR_GRID: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
TUNED = frozenset(  # the optimizers whose lr the sweep chooses (the others: their own rule)
    opt.name for opt in GALLERY if opt.lr_meaning not in ("multiplier", "line search")
)


def score(run: Run) -> float:
    """The mean loss over a run's steps (the area under its loss curve: fast and steady
    runs score low); inf if it diverged."""
    if run.diverged is not None or not run.values:
        return math.inf
    return float(np.mean(run.values))


def choose_lr(scores: dict[float, float], rtol: float = 0.01) -> float:
    """The smallest learning rate whose score is within ``rtol`` (relative, at least 1e-3
    absolute) of the best one: the gentlest of the equally good."""
    best = min(scores.values())
    if not math.isfinite(best):
        raise ValueError("Invalid scores: every run diverged (must have a finite one)")
    slack = max(rtol * abs(best), 1e-3)
    return min(lr for lr, s in scores.items() if s <= best + slack)


def tune(opt: GalleryOptimizer, problem: str, run: Callable[[GalleryOptimizer], Run],
         grid: tuple[float, ...] = LR_GRID) -> tuple[float, dict[float, float]]:  # fmt: skip
    """How the learning rates of :data:`GALLERY` were chosen (offline, not by the notebook):
    ``run(opt with lr)`` for every lr of ``grid`` on ``problem``, then :func:`choose_lr`
    of their :func:`score`. Returns the chosen lr and the scores."""
    import dataclasses

    scores = {}
    for lr in grid:
        trial = dataclasses.replace(opt, lrs={**opt.lrs, problem: lr})
        scores[lr] = score(run(trial))
    return choose_lr(scores), scores
