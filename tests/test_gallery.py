"""The optimizer gallery's module (netcl_optim/examples/_gallery.py, notebook 07): the test
functions and their gradients, the list of optimizers against the library's aliases, the
calling conventions of the runner, and the learning-rate rule."""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil

import numpy as np
import pytest
from optimizer_table import OPTIMIZERS

import netcl_optim.optimizers as optimizers_package
from netcl_optim.examples import _gallery as g

# public functions of the optimizer modules that are building blocks, not optimizers
_BLOCKS = {"normalize", "ema", "add_noise", "value_and_grad_from_state"}


def _functional_aliases() -> set[str]:
    """Every functional alias the optimizer modules export: lower-case functions of their
    ``__all__`` but the ``scale_by_*`` blocks and the helpers above."""
    names = set()
    for info in pkgutil.iter_modules(optimizers_package.__path__):
        module = importlib.import_module(f"netcl_optim.optimizers.{info.name}")
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isfunction(obj) and name.islower() and not name.startswith("scale_by_"):
                names.add(name)
    return names - _BLOCKS


def test_every_functional_alias_is_in_the_gallery():
    listed = [opt.name for opt in g.GALLERY]
    assert len(listed) == len(set(listed))
    assert set(listed) == _functional_aliases()
    table = {row.factory for row in OPTIMIZERS if isinstance(row.factory, str)}
    assert table <= set(listed)
    for opt in g.GALLERY:  # every problem has its entry (None only for the line search)
        assert set(opt.lrs) == set(g.PROBLEMS), opt.name
        assert (None in opt.lrs.values()) == (opt.call == g.LINE_SEARCH), opt.name


@pytest.mark.parametrize("fn", g.FUNCTIONS, ids=lambda f: f.name)
def test_gradients_match_central_differences(fn):
    rng = np.random.default_rng(0)
    x = rng.uniform(*fn.xlim, 50)
    y = rng.uniform(*fn.ylim, 50)
    h = 1e-6
    gx, gy = fn.gradient(x, y)
    dx = (fn.value(x + h, y) - fn.value(x - h, y)) / (2 * h)
    dy = (fn.value(x, y + h) - fn.value(x, y - h)) / (2 * h)
    scale = 1.0 + np.abs(gx) + np.abs(gy)
    np.testing.assert_array_less(np.abs(gx - dx) / scale, 1e-6)
    np.testing.assert_array_less(np.abs(gy - dy) / scale, 1e-6)


@pytest.mark.parametrize("fn", g.FUNCTIONS, ids=lambda f: f.name)
def test_minimizers_are_stationary_at_the_minimum(fn):
    for m in fn.minimizers:
        assert fn.value(*m) == pytest.approx(fn.f_min, abs=1e-12)
        assert np.allclose(fn.gradient(*m), 0.0, atol=1e-12)
    rng = np.random.default_rng(1)  # and nothing in the window is lower
    x, y = rng.uniform(*fn.xlim, 10_000), rng.uniform(*fn.ylim, 10_000)
    assert fn.value(x, y).min() >= fn.f_min - 1e-12


def test_the_saddle_is_a_saddle():
    gx, gy = g.SADDLE.gradient(0.0, 0.0)
    assert gx == gy == 0.0 and g.SADDLE.value(0.0, 0.0) == 0.0
    assert g.SADDLE.value(0.1, 0.0) > 0.0 > g.SADDLE.value(0.0, 0.1)


def test_every_listed_optimizer_runs():
    """Three steps of each on the saddle: finite points that moved (the notebook runs the
    full gallery)."""
    for opt in g.GALLERY:
        run = g.run_2d(opt, g.SADDLE, steps=3)
        assert run.diverged is None, opt.name
        assert len(run.points) == 4 and len(run.values) == 3, opt.name
        assert all(math.isfinite(c) for p in run.points for c in p), opt.name
        assert run.points[-1] != run.points[0], opt.name


def test_polyak_gets_the_loss():
    """The first step of polyak_sgd is Polyak's: min((f - f_min) / |g|^2, max_lr) g."""
    opt = g.BY_NAME["polyak_sgd"]
    fn = g.SADDLE
    run = g.run_2d(opt, fn, steps=1)
    p0 = np.array(fn.start, np.float32).astype(np.float64)
    grad = np.array(fn.gradient(*p0), np.float32).astype(np.float64)
    step = min((fn.value(*p0) - fn.f_min) / (grad @ grad), opt.lrs[fn.name])
    np.testing.assert_allclose(run.points[1], p0 - step * grad, rtol=1e-6)
    assert run.values[0] == pytest.approx(fn.value(*p0))


def test_lbfgs_line_search_solves_rosenbrock():
    run = g.run_2d(g.BY_NAME["lbfgs"], g.ROSENBROCK, steps=60)
    assert g.ROSENBROCK.value(*run.points[-1]) < 1e-8


def test_lookahead_draws_the_slow_weights():
    """Lookahead's points are its slow weights: they stay at the start until the first sync
    (every 5 steps), then move."""
    run = g.run_2d(g.BY_NAME["lookahead"], g.ROSENBROCK, steps=5)
    start = tuple(float(c) for c in np.float32(g.ROSENBROCK.start))
    assert run.points[1:5] == [start] * 4
    assert run.points[5] != start


def test_digits_batches_cover_each_epoch_once():
    pytest.importorskip("sklearn")
    data = g.load_digits_gallery(epochs=2)
    rows = []
    for step in range(2 * data.steps_per_epoch):
        offset, n = data.batch_at(step)
        assert 0 < n <= data.batch
        rows.extend(range(offset, offset + n))
    assert rows == list(range(2 * data.rows))
    with pytest.raises(ValueError, match="Invalid steps"):
        g.run_digits(g.BY_NAME["sgd"], data, steps=2 * data.steps_per_epoch + 1)


def test_digits_runs_are_reproducible():
    pytest.importorskip("sklearn")
    data = g.load_digits_gallery(epochs=1)
    first = g.run_digits(g.BY_NAME["adam"], data, steps=5)
    again = g.run_digits(g.BY_NAME["adam"], data, steps=5)
    assert first.values == again.values and first.test_accuracy == again.test_accuracy
    assert first.values[-1] < first.values[0]


def test_choose_lr_takes_the_gentlest_of_the_best():
    assert g.choose_lr({0.1: 1.0, 0.3: 0.5, 1.0: 0.503, 3.0: math.inf}) == 0.3
    assert g.choose_lr({0.1: 0.502, 0.3: 0.5}) == 0.1
    assert g.choose_lr({0.1: 2.0, 0.3: 0.5}) == 0.3
    with pytest.raises(ValueError, match="every run diverged"):
        g.choose_lr({0.1: math.inf})


def test_score_is_the_mean_loss_and_inf_once_diverged():
    assert g.score(g.Run("x", values=[3.0, 1.0, 2.0])) == 2.0
    assert g.score(g.Run("x", values=[3.0, math.nan], diverged=1)) == math.inf
    assert g.score(g.Run("x")) == math.inf


def test_tune_runs_every_grid_value():
    opt = g.BY_NAME["sgd"]
    lr, scores = g.tune(opt, "saddle", lambda o: g.run_2d(o, g.SADDLE, steps=20),
                        grid=(0.01, 0.1, 1.0, 3.0))  # fmt: skip
    assert list(scores) == [0.01, 0.1, 1.0, 3.0]
    assert scores[3.0] == math.inf  # |1 - 2 lr| > 1: sgd diverges along x
    assert lr == g.choose_lr(scores) and math.isfinite(scores[lr])
