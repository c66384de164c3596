"""LBFGS (torch.optim's L-BFGS on the device): against the float64 numpy reference of
``reference_lbfgs_torch`` and torch 2.13 on a Rosenbrock function, a least-squares problem
and a small MLP (both line-search settings), the history wrapping, the exits, maximize,
state dicts (ours through save/load, torch's), reads per step, and every error leaving the
parameters and the state as they were."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pyopencl.array as cla
import pytest
import reference_lbfgs_torch as ref
from hypothesis import given, settings
from hypothesis import strategies as st

import netcl_optim as no
from netcl_optim.fusion._vectors import Vectors
from netcl_optim.optimizers.torch_lbfgs import LBFGS
from netcl_optim.stateful import Parameter

LINE_SEARCHES = [None, "strong_wolfe"]
Fn = Callable[[list[np.ndarray]], tuple[float, list[np.ndarray]]]


# ---------------------------------------------------------------------------- problems


def rosenbrock(xs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    x = xs[0].astype(np.float64)
    a, b = x[:-1], x[1:]
    f = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
    g = np.zeros_like(x)
    g[:-1] += -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    g[1:] += 200.0 * (b - a * a)
    return f, [g]


_RNG = np.random.default_rng(7)
_A = _RNG.standard_normal((30, 10))
_B = _RNG.standard_normal(30)


def least_squares(xs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    r = _A @ xs[0].astype(np.float64) - _B
    return float(0.5 * r @ r), [_A.T @ r]


_X = _RNG.standard_normal((16, 4))
_Y = _RNG.standard_normal((16, 2))


def mlp(xs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """A 4-6-2 tanh MLP's mean squared error; params [w1 (4, 6), b1 (6,), w2 (6, 2), b2]."""
    w1, b1, w2, b2 = (x.astype(np.float64) for x in xs)
    h = np.tanh(_X @ w1 + b1)
    out = h @ w2 + b2
    err = out - _Y
    n = err.size
    f = float(np.sum(err * err) / n)
    d_out = 2.0 * err / n
    d_h = (d_out @ w2.T) * (1.0 - h * h)
    return f, [_X.T @ d_h, d_h.sum(0), h.T @ d_out, d_out.sum(0)]


PROBLEMS: dict[str, tuple[Fn, list[np.ndarray]]] = {
    "rosenbrock": (rosenbrock, [np.linspace(-1.2, 1.0, 10)]),
    "least_squares": (least_squares, [np.zeros(10)]),
    "mlp": (mlp, [0.5 * _RNG.standard_normal(s) for s in ((4, 6), (6,), (6, 2), (2,))]),
}


def flat(xs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in xs]).astype(np.float64)


def unflat(v: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    out, k = [], 0
    for x in like:
        out.append(v[k : k + x.size].reshape(x.shape))
        k += x.size
    return out


# ---------------------------------------------------------------------------- runners


def params_of(queue: Any, xs: list[np.ndarray], dtype: Any) -> list[Parameter]:
    return [Parameter(cla.to_device(queue, np.asarray(x, dtype))) for x in xs]


def closure_of(queue: Any, fn: Fn, params: list[Parameter], dtype: Any, *, sign: float = 1.0,
               packed: bool = False, loss_as: str = "float") -> Callable[[], Any]:  # fmt: skip
    """The closure: loss and grads on the host from the params' values (``sign``: -1 to
    maximise ``-fn``); grads written in place into the current ``.grad`` when ``packed``."""

    def closure() -> Any:
        f, gs = fn([p.data.get() for p in params])
        for p, g in zip(params, gs, strict=True):
            g = np.asarray(sign * g, dtype)
            if packed:
                p.grad.set(g)
            else:
                p.grad = cla.to_device(queue, g)
        f = sign * f
        if loss_as == "device":
            return cla.to_device(queue, np.array([f], dtype))
        if loss_as == "numpy":
            return np.float64(f)
        return f

    return closure


def run_ours(queue, name, dtype, steps, **kwargs) -> tuple[list[np.ndarray], LBFGS]:
    fn, x0 = PROBLEMS[name]
    params = params_of(queue, x0, dtype)
    opt = LBFGS(params, **kwargs)
    closure = closure_of(queue, fn, params, dtype)
    trace = []
    for _ in range(steps):
        opt.step(closure)
        trace.append(flat([p.data.get() for p in params]))
    return trace, opt


def run_reference(name, steps, **kwargs) -> tuple[list[np.ndarray], ref.LBFGSReference]:
    fn, x0 = PROBLEMS[name]
    x = flat(x0)
    opt = ref.LBFGSReference(x, **kwargs)

    def fg(v: np.ndarray) -> tuple[float, np.ndarray]:
        f, gs = fn(unflat(v, x0))
        return f, flat(gs)

    trace = []
    for _ in range(steps):
        opt.step(fg)
        trace.append(x.copy())
    return trace, opt


def torch_params(torch: Any, xs: list[np.ndarray], dtype: Any) -> list[Any]:
    return [torch.nn.Parameter(torch.from_numpy(np.array(x, dtype))) for x in xs]


def torch_closure(torch: Any, fn: Fn, params: list[Any], dtype: Any) -> Callable[[], float]:
    def closure() -> float:
        f, gs = fn([p.detach().numpy() for p in params])
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(np.asarray(g, dtype))
        return f

    return closure


def run_torch(name, dtype, steps, **kwargs) -> tuple[list[np.ndarray], Any]:
    torch = pytest.importorskip("torch")
    fn, x0 = PROBLEMS[name]
    params = torch_params(torch, x0, dtype)
    opt = torch.optim.LBFGS(params, **kwargs)
    closure = torch_closure(torch, fn, params, dtype)
    trace = []
    for _ in range(steps):
        opt.step(closure)
        trace.append(flat([p.detach().numpy() for p in params]))
    return trace, opt


def max_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def host_state(sd: dict) -> Any:
    """A state dict with every array as numpy (torch's tensors converted)."""

    def conv(v: Any) -> Any:
        if hasattr(v, "detach"):
            return v.detach().numpy().copy()
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(sd)


def assert_same_state(a: Any, b: Any) -> None:
    """Equal state dicts: arrays bit for bit, scalars of the same type and value."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (a, b)
    else:
        assert a == b or (a != a and b != b), (a, b)


# the hyperparameters of each problem's parity runs (20 steps): every iteration of these
# runs stays in the regime where a rounding difference is not amplified into another path
# (with lr=1 and more iterations per step, Rosenbrock's and the MLP's fixed steps are
# chaotic: a 1-ulp difference becomes 1e-2 within 20 steps, torch against itself in
# another summation order too)
KWARGS = {
    "rosenbrock": dict(max_iter=4, history_size=5, lr=0.5),
    "least_squares": {},
    "mlp": dict(max_iter=3, max_eval=8, history_size=5, lr=0.5),
}
STEPS = 20
# float64, ours against the reference and torch: every operation rounds alike but for the
# order of the dot products' sums (ours: fixed chunks; numpy and torch: BLAS), torch's
# fused multiply-add in ``p.add_(d, alpha=t)`` and the two-loop's ``add_``, and torch's
# square root (within an ulp): 1-ulp differences, which 80 iterations of the Rosenbrock
# valley grow to 1.1e-9 (measured; the reference and torch differ by as much), 60 of the
# MLP to 1.2e-10; least squares stays at 2e-16.
F64_ATOL = 1e-8


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_float64_matches_reference(cl_queue, name, line_search_fn):
    kwargs = dict(KWARGS[name], line_search_fn=line_search_fn)
    ours, opt = run_ours(cl_queue, name, np.float64, STEPS, **kwargs)
    want, reference = run_reference(name, STEPS, **kwargs)
    assert max_error(ours, want) <= F64_ATOL
    state = opt.state_dict()["state"][0]
    for k in ("func_evals", "n_iter"):
        assert state[k] == reference.state[k], k
    assert len(state["old_dirs"]) == len(reference.state["old_dirs"])
    for a, b in zip(state["ro"], reference.state["ro"], strict=True):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_matches_torch(cl_queue, name, line_search_fn):
    """torch 2.13's LBFGS, same closure values: float64 within F64_ATOL at every step, with
    the same evaluation and iteration counts; float32 as close to torch's float64 path as
    torch's own float32 path is (within 4x, + 1e-6): their float32 roundings differ (the
    sums' order, fma), and L-BFGS amplifies either the same way."""
    kwargs = dict(KWARGS[name], line_search_fn=line_search_fn)
    t64, topt = run_torch(name, np.float64, STEPS, **kwargs)
    ours, opt = run_ours(cl_queue, name, np.float64, STEPS, **kwargs)
    assert max_error(ours, t64) <= F64_ATOL
    theirs = topt.state_dict()["state"][0]
    state = opt.state_dict()["state"][0]
    assert (state["func_evals"], state["n_iter"]) == (theirs["func_evals"], theirs["n_iter"])
    t32, _ = run_torch(name, np.float32, STEPS, **kwargs)
    ours32, _ = run_ours(cl_queue, name, np.float32, STEPS, **kwargs)
    assert max_error(ours32, t64) <= 4 * max_error(t32, t64) + 1e-6
    # the first step, before any amplification: a few float32 ulps
    np.testing.assert_allclose(ours32[0], t32[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- history, exits


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_history_wraps(cl_queue, line_search_fn):
    """history_size 3 < the iterations: the oldest pair is dropped (its vectors reused)."""
    kwargs = dict(max_iter=6, history_size=3, lr=0.5, line_search_fn=line_search_fn)
    ours, opt = run_ours(cl_queue, "rosenbrock", np.float64, 6, **kwargs)
    want, reference = run_reference("rosenbrock", 6, **kwargs)
    assert max_error(ours, want) <= F64_ATOL
    state = opt.state_dict()["state"][0]
    assert state["n_iter"] == reference.state["n_iter"] > 3
    assert len(state["old_dirs"]) == len(state["old_stps"]) == len(state["ro"]) == 3
    for a, b in zip(state["old_stps"], reference.state["old_stps"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=F64_ATOL)
    assert len(state["al"]) == 3 and all(a is not None for a in state["al"])
    live = opt.state[opt.param_groups[0]["params"][0]]  # (torch's view: device vectors)
    assert set(live) == set(state) and isinstance(live["d"], cla.Array)
    np.testing.assert_array_equal(live["old_dirs"][0].get(), state["old_dirs"][0])
    owned = len(opt._pool.owned)
    opt.step(closure_of(cl_queue, rosenbrock, opt.param_groups[0]["params"], np.float64))
    assert len(opt._pool.owned) == owned  # (no new vector once the history is full)


EXITS = {
    "max_eval": dict(max_iter=10, max_eval=4),
    "max_eval_line_search": dict(max_iter=10, max_eval=5, line_search_fn="strong_wolfe"),
    "tolerance_grad": dict(tolerance_grad=1e4),
    "tolerance_change": dict(tolerance_change=1e-1, lr=0.1),
    "tolerance_change_line_search": dict(
        tolerance_change=1e-1, max_iter=5, lr=0.5, line_search_fn="strong_wolfe"
    ),
    "one_iteration": dict(max_iter=1),
}


@pytest.mark.parametrize("case", list(EXITS))
def test_exits(cl_queue, case):
    """Each stopping rule ends a step where torch's does: the same counts and iterates."""
    kwargs = EXITS[case]
    ours, opt = run_ours(cl_queue, "rosenbrock", np.float64, 3, **kwargs)
    want, reference = run_reference("rosenbrock", 3, **kwargs)
    assert max_error(ours, want) <= F64_ATOL
    state = opt.state_dict()["state"][0]
    assert (state["func_evals"], state["n_iter"]) == (
        reference.state["func_evals"], reference.state["n_iter"])  # fmt: skip
    if case == "tolerance_grad":  # optimal at the first evaluation: nothing moves
        assert state == {"func_evals": 3, "n_iter": 0}
        np.testing.assert_array_equal(ours[-1], flat(PROBLEMS["rosenbrock"][1]))
    if case.startswith("max_eval"):
        assert state["func_evals"] <= 3 * kwargs["max_eval"]
    if case.startswith("tolerance_change"):  # some steps stopped before max_iter
        assert state["n_iter"] < 3 * kwargs.get("max_iter", 20)
    _, topt = run_torch("rosenbrock", np.float64, 3, **kwargs)
    theirs = topt.state_dict()["state"][0]
    assert (state["func_evals"], state["n_iter"]) == (theirs["func_evals"], theirs["n_iter"])


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_maximize(cl_queue, line_search_fn):
    """maximize=True on -f is minimising f, bit for bit (the loss and grads are negated
    where they enter), and step returns the closure's own value; as the reference."""
    fn, x0 = PROBLEMS["mlp"]
    kwargs = dict(KWARGS["mlp"], line_search_fn=line_search_fn)
    a, b = params_of(cl_queue, x0, np.float32), params_of(cl_queue, x0, np.float32)
    opt_a, opt_b = LBFGS(a, **kwargs), LBFGS(b, maximize=True, **kwargs)
    up = closure_of(cl_queue, fn, b, np.float32, sign=-1.0)
    for _ in range(4):
        first = opt_a.step(closure_of(cl_queue, fn, a, np.float32))
        assert opt_b.step(up) == -first
    for p, q in zip(a, b, strict=True):
        np.testing.assert_array_equal(p.data.get(), q.data.get())
    assert opt_b.state_dict()["state"][0]["prev_loss"] > 0  # (-(-f): the minimised value)
    x = flat(x0)
    reference = ref.LBFGSReference(x, maximize=True, **kwargs)
    ours = params_of(cl_queue, x0, np.float64)
    opt = LBFGS(ours, maximize=True, **kwargs)
    for _ in range(4):
        opt.step(closure_of(cl_queue, fn, ours, np.float64, sign=-1.0))
        reference.step(lambda v: (-fn(unflat(v, x0))[0], -flat(fn(unflat(v, x0))[1])))
    np.testing.assert_allclose(flat([p.data.get() for p in ours]), x, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_resume_bit_for_bit(cl_queue, tmp_path, line_search_fn):
    """3 steps, state_dict (and save/load into a fresh optimizer), 3 more = 6 straight."""
    fn, x0 = PROBLEMS["mlp"]
    kwargs = dict(max_iter=4, history_size=3, line_search_fn=line_search_fn)
    straight = params_of(cl_queue, x0, np.float32)
    opt = LBFGS(straight, **kwargs)
    for _ in range(6):
        opt.step(closure_of(cl_queue, fn, straight, np.float32))
    first = params_of(cl_queue, x0, np.float32)
    opt1 = LBFGS(first, **kwargs)
    for _ in range(3):
        opt1.step(closure_of(cl_queue, fn, first, np.float32))
    saved = opt1.state_dict()
    no.save(tmp_path / "lbfgs.npz", opt1)
    no.save(tmp_path / "tree.npz", saved)  # (the dict itself: a pytree)
    for how in ("state_dict", "checkpoint", "pytree"):
        second = params_of(cl_queue, [p.data.get() for p in first], np.float32)
        opt2 = LBFGS(second, line_search_fn=line_search_fn)  # (the hyperparameters load)
        if how == "state_dict":
            opt2.load_state_dict(copy.deepcopy(saved))
        elif how == "checkpoint":
            no.load(tmp_path / "lbfgs.npz", opt2)
        else:
            opt2.load_state_dict(no.load(tmp_path / "tree.npz"))
        assert_same_state(opt2.state_dict(), saved)
        assert opt2.param_groups[0]["history_size"] == 3
        for _ in range(3):
            opt2.step(closure_of(cl_queue, fn, second, np.float32))
        for p, q in zip(straight, second, strict=True):
            np.testing.assert_array_equal(p.data.get(), q.data.get())
        assert_same_state(opt2.state_dict(), opt.state_dict())


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_loads_torch_state_dict(cl_queue, line_search_fn):
    """torch's state dict (tensors as numpy) continues in ours as in torch; ours loads back
    into torch."""
    torch = pytest.importorskip("torch")
    fn, x0 = PROBLEMS["mlp"]
    kwargs = dict(KWARGS["mlp"], line_search_fn=line_search_fn)
    tp = torch_params(torch, x0, np.float64)
    topt = torch.optim.LBFGS(tp, **kwargs)
    for _ in range(3):
        topt.step(torch_closure(torch, fn, tp, np.float64))
    loaded = host_state(topt.state_dict())
    ours = params_of(cl_queue, [p.detach().numpy() for p in tp], np.float64)
    opt = LBFGS(ours)
    opt.load_state_dict(loaded)
    assert opt.param_groups[0]["max_iter"] == 3 and opt.param_groups[0]["maximize"] is False
    for _ in range(3):
        topt.step(torch_closure(torch, fn, tp, np.float64))
        opt.step(closure_of(cl_queue, fn, ours, np.float64))
    got = flat([p.data.get() for p in ours])
    np.testing.assert_allclose(got, flat([p.detach().numpy() for p in tp]), atol=F64_ATOL)
    mine = opt.state_dict()
    theirs = topt.state_dict()["state"][0]
    assert (mine["state"][0]["func_evals"], mine["state"][0]["n_iter"]) == (
        theirs["func_evals"], theirs["n_iter"])  # fmt: skip
    # and back: torch takes our layout (tensors from our arrays)
    back = torch.optim.LBFGS(torch_params(torch, x0, np.float64), **kwargs)
    group = {k: v for k, v in mine["param_groups"][0].items() if k != "maximize"}

    def tensors(v: Any) -> Any:
        if isinstance(v, (np.ndarray, np.generic)):
            return torch.tensor(v)
        return [tensors(x) for x in v] if isinstance(v, list) else v

    back.load_state_dict({"state": {0: {k: tensors(v) for k, v in mine["state"][0].items()}},
                          "param_groups": [group]})  # fmt: skip
    assert back.state_dict()["state"][0]["n_iter"] == theirs["n_iter"]


def test_load_refuses_with_nothing_changed(cl_queue):
    fn, x0 = PROBLEMS["mlp"]
    params = params_of(cl_queue, x0, np.float64)
    opt = LBFGS(params, history_size=4)
    for _ in range(2):
        opt.step(closure_of(cl_queue, fn, params, np.float64))
    good = opt.state_dict()
    entry = good["state"][0]
    bad_cases = {
        "class": {**good, "optimizer": "Adam"},
        "groups": {**good, "param_groups": good["param_groups"] * 2},
        "size": {**good, "param_groups": [{**good["param_groups"][0], "params": [0]}]},
        "foreign key": {
            **good,
            "param_groups": [{**good["param_groups"][0], "betas": (0.9, 0.99)}],
        },
        "bad value": {**good, "param_groups": [{**good["param_groups"][0], "history_size": 0}]},
        "index": {**good, "state": {3: entry}},
        "unknown": {**good, "state": {0: {**entry, "exp_avg": entry["d"]}}},
        "shape": {**good, "state": {0: {**entry, "d": entry["d"][:-1]}}},
        "lengths": {**good, "state": {0: {**entry, "ro": entry["ro"][:-1]}}},
        "missing": {**good, "state": {0: {k: v for k, v in entry.items() if k != "H_diag"}}},
        "count": {**good, "state": {0: {**entry, "n_iter": -1}}},
        "no direction": {**good, "state": {0: {"func_evals": 3, "n_iter": 2}}},
        "scalar": {**good, "state": {0: {**entry, "t": "one"}}},
    }
    for case, sd in bad_cases.items():
        with pytest.raises(ValueError):
            opt.load_state_dict(copy.deepcopy(sd))
        assert_same_state(opt.state_dict(), good), case


# ---------------------------------------------------------------------------- device


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
def test_reads_per_step(cl_queue, line_search_fn):
    """One read per closure call and one per iteration (the new direction's g.d): a step
    reads n_iter + func_evals times; the loss as a device array of the params' dtype rides
    along, of another dtype it costs one more read per call."""
    fn, x0 = PROBLEMS["rosenbrock"]
    losses = (("float", np.float32, 0), ("numpy", np.float32, 0), ("device", np.float32, 0),
              ("device", np.float64, 1))  # fmt: skip
    for loss_as, dtype, extra in losses:
        params = params_of(cl_queue, x0, np.float32)
        opt = LBFGS(params, max_iter=5, history_size=3, line_search_fn=line_search_fn)
        closure = closure_of(cl_queue, fn, params, dtype, loss_as=loss_as)
        if dtype != np.float32:  # (a float64 loss, float32 grads)
            inner = closure

            def closure(inner=inner, params=params) -> Any:
                loss = inner()
                for p in params:
                    p.grad = p.grad.astype(np.float32)
                return loss

        evals = iters = 0
        for _ in range(4):
            before = Vectors.reads
            opt.step(closure)
            state = opt.state_dict()["state"][0]
            new_evals, new_iters = state["func_evals"] - evals, state["n_iter"] - iters
            evals, iters = state["func_evals"], state["n_iter"]
            assert Vectors.reads - before == new_iters + new_evals * (1 + extra)


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("name", ["least_squares", "mlp"])
def test_launches_per_step(cl_queue, name, line_search_fn):
    """A step's launches do not depend on the number of leaves (1 or 4 here): max_iter=3
    (max_eval 3: two iterations), history_size 5. Per closure call: max|g| (2 launches:
    partials, finish), s = t d (1), max|s| (2), y = g - prev (1), y.s and y.y (2 each), and
    g.d in the line search (2); the first call: max|g|, sum|g| (4). Per iteration: -g (1),
    the two-loop over k pairs (4k + 3; none at the very first), g.d (2), x += t d (1); with
    the line search max|d| (2) and x = x_init + t d per call (1) and at its end (1)."""
    fn, x0 = PROBLEMS[name]
    params = params_of(cl_queue, x0, np.float32)
    opt = LBFGS(params, max_iter=3, history_size=5, line_search_fn=line_search_fn)
    with no.count_launches() as counter:
        opt.step(closure_of(cl_queue, fn, params, np.float32))
    state = opt.state_dict()["state"][0]
    assert (state["func_evals"], state["n_iter"], len(state["old_dirs"])) == (3, 2, 1)
    if line_search_fn is None:
        want = 4 + (1 + 2 + 1 + 10) + (1 + 7 + 2 + 1 + 10)
    else:
        want = 4 + (1 + 2 + 2 + 1 + 12 + 1) + (1 + 7 + 2 + 2 + 1 + 12 + 1)
    assert counter.launches == want


def test_packed_and_missing_grads(cl_queue):
    """Grads written in place into the packed buffer (zero_grad(set_to_none=False): one
    copy, or one negating launch with maximize) and fresh arrays give the same bits; a None
    grad counts as zeros."""
    fn, x0 = PROBLEMS["mlp"]
    for maximize in (False, True):
        sign = -1.0 if maximize else 1.0
        fresh, packed = params_of(cl_queue, x0, np.float32), params_of(cl_queue, x0, np.float32)
        opt_f = LBFGS(fresh, max_iter=4, maximize=maximize)
        opt_p = LBFGS(packed, max_iter=4, maximize=maximize)
        opt_p.zero_grad(set_to_none=False)
        for _ in range(3):
            opt_f.step(closure_of(cl_queue, fn, fresh, np.float32, sign=sign))
            opt_p.step(closure_of(cl_queue, fn, packed, np.float32, sign=sign, packed=True))
        for p, q in zip(fresh, packed, strict=True):
            np.testing.assert_array_equal(p.data.get(), q.data.get())

    def without_b2(xs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
        f, gs = fn(xs)
        return f, [*gs[:3], np.zeros_like(gs[3])]

    zeros, missing = params_of(cl_queue, x0, np.float32), params_of(cl_queue, x0, np.float32)
    opt_z, opt_m = LBFGS(zeros, max_iter=4), LBFGS(missing, max_iter=4)
    for _ in range(3):
        opt_z.step(closure_of(cl_queue, without_b2, zeros, np.float32))
        closure = closure_of(cl_queue, without_b2, missing, np.float32)

        def drop(closure=closure) -> Any:
            loss = closure()
            missing[3].grad = None
            return loss

        opt_m.step(drop)
    for p, q in zip(zeros, missing, strict=True):
        np.testing.assert_array_equal(p.data.get(), q.data.get())


# ---------------------------------------------------------------------------- errors


def failing(closure: Callable[[], Any], params: list[Parameter], at: int, how: str):
    """``closure``, but its call number ``at`` (from 1) fails ``how``."""
    calls = [0]

    def wrapped() -> Any:
        calls[0] += 1
        loss = closure()
        if calls[0] != at:
            return loss
        if how == "raise":
            raise KeyError("boom")
        if how == "nan_loss":
            return float("nan")
        if how == "inf_grad":
            g = params[0].grad.get()
            g.flat[1] = np.inf
            params[0].grad = cla.to_device(params[0].grad.queue, g)
        if how == "no_grad":
            for p in params:
                p.grad = None
        return loss

    return wrapped


ERRORS = {"raise": KeyError, "nan_loss": FloatingPointError, "inf_grad": FloatingPointError,
          "no_grad": ValueError}  # fmt: skip


@pytest.mark.parametrize("line_search_fn", LINE_SEARCHES)
@pytest.mark.parametrize("how", list(ERRORS))
def test_failing_closure_changes_nothing(cl_queue, how, line_search_fn):
    """A closure failing at its 4th call of a step (the history full and shifted by then)
    leaves the params and the state as they were; the next steps are those of a twin that
    never failed, bit for bit."""
    fn, x0 = PROBLEMS["mlp"]
    kwargs = dict(max_iter=6, history_size=2, line_search_fn=line_search_fn)
    params, twin = params_of(cl_queue, x0, np.float32), params_of(cl_queue, x0, np.float32)
    opt, opt_twin = LBFGS(params, **kwargs), LBFGS(twin, **kwargs)
    good, good_twin = (closure_of(cl_queue, fn, params, np.float32),
                       closure_of(cl_queue, fn, twin, np.float32))  # fmt: skip
    for _ in range(2):
        opt.step(good)
        opt_twin.step(good_twin)
    before, values = opt.state_dict(), [p.data.get() for p in params]
    with pytest.raises(ERRORS[how]):
        opt.step(failing(good, params, 4, how))
    for p, v in zip(params, values, strict=True):
        np.testing.assert_array_equal(p.data.get(), v)
    assert_same_state(opt.state_dict(), before)
    for _ in range(2):
        opt.step(good)
        opt_twin.step(good_twin)
    for p, q in zip(params, twin, strict=True):
        np.testing.assert_array_equal(p.data.get(), q.data.get())
    assert_same_state(opt.state_dict(), opt_twin.state_dict())


def test_bad_arguments(cl_queue):
    x0 = PROBLEMS["mlp"][1]
    with pytest.raises(ValueError, match=r"line_search_fn: 'wolfe' \(must be None or one of "
                                         r"'strong_wolfe'\)"):  # fmt: skip
        LBFGS(params_of(cl_queue, x0, np.float32), line_search_fn="wolfe")
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        LBFGS([{"params": params_of(cl_queue, x0[:2], np.float32)},
               {"params": params_of(cl_queue, x0[2:], np.float32)}])  # fmt: skip
    params = params_of(cl_queue, x0, np.float32)
    values = [p.data for p in params]
    with pytest.raises(TypeError, match="share one dtype"):
        LBFGS([*params_of(cl_queue, x0[:1], np.float64), *params])
    assert [p.data for p in params] == values  # (not packed)
    for bad in (dict(max_iter=0), dict(history_size=0), dict(tolerance_grad=-1.0),
                dict(max_eval=0), dict(state_bits=8)):  # fmt: skip
        with pytest.raises(ValueError):
            LBFGS(params, **bad)
    opt = LBFGS(params)
    assert opt.param_groups[0]["max_eval"] == 25 and opt.defaults["max_eval"] == 25
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        opt.add_param_group({"params": params_of(cl_queue, x0[:1], np.float32)})
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(TypeError, match="returned None"):
        opt.step(lambda: None)
    assert opt.state_dict()["state"] == {}
    assert "history_size: 100" in repr(opt)


def test_zero_refuses_lbfgs(cl_queue):
    mpi = pytest.importorskip("mpi4py.MPI")
    from netcl_optim import distributed as dist

    params = params_of(cl_queue, PROBLEMS["mlp"][1], np.float32)
    data = [p.data for p in params]
    with pytest.raises(TypeError, match="LBFGS cannot be sharded by ZeroRedundancyOptimizer"):
        dist.ZeroRedundancyOptimizer(LBFGS, params, comm=mpi.COMM_SELF)
    assert all(p.data is d for p, d in zip(params, data, strict=True))


def test_lr_scheduler_sets_the_step(cl_queue):
    """An LR scheduler drives group["lr"]: the step with lr 0.25 is the reference's."""
    fn, x0 = PROBLEMS["least_squares"]
    params = params_of(cl_queue, x0, np.float64)
    opt = LBFGS(params, max_iter=2)
    scheduler = no.StepLR(opt, step_size=1, gamma=0.25)
    x = flat(x0)
    reference = ref.LBFGSReference(x, max_iter=2)
    for lr in (1.0, 0.25, 0.0625):
        assert opt.lr == pytest.approx(lr)
        reference.lr = lr
        opt.step(closure_of(cl_queue, fn, params, np.float64))
        reference.step(lambda v: (fn([v])[0], fn([v])[1][0]))
        scheduler.step()
    np.testing.assert_allclose(params[0].data.get(), x, atol=1e-14)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 40), history=st.integers(1, 6),
       line_search=st.booleans())  # fmt: skip
def test_random_quadratics(cl_queue, seed, n, history, line_search):
    """f = x'Ax/2 - b'x (A = M'M + I): ours (float64) follows the reference."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    a, b = m.T @ m / n + np.eye(n), rng.standard_normal(n)

    def quadratic(xs: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
        x = xs[0].astype(np.float64)
        return float(x @ a @ x / 2 - b @ x), [a @ x - b]

    kwargs = dict(max_iter=5, history_size=history, lr=0.5,
                  line_search_fn="strong_wolfe" if line_search else None)  # fmt: skip
    x0 = rng.standard_normal(n)
    params = params_of(cl_queue, [x0], np.float64)
    opt = LBFGS(params, **kwargs)
    x = x0.copy()
    reference = ref.LBFGSReference(x, **kwargs)
    for _ in range(4):
        opt.step(closure_of(cl_queue, quadratic, params, np.float64))
        reference.step(lambda v: (quadratic([v])[0], quadratic([v])[1][0]))
        np.testing.assert_allclose(params[0].data.get(), x, rtol=1e-9, atol=1e-9)
    state = opt.state_dict()["state"][0]
    assert (state["func_evals"], state["n_iter"]) == (
        reference.state["func_evals"], reference.state["n_iter"])  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_line_search_is_torchs(monkeypatch, dtype):
    """The host line search (numpy scalars for torch's 0-d tensors) against torch's own
    ``_strong_wolfe`` on 1-D quartics, from trial steps that are Python floats or tensors:
    the same loss, step (value and kind) and evaluation count, bit for bit: torch's scalar
    rounding is reproduced, the float32 one included. (With torch's square root: ours is
    correctly rounded, torch's CPU one within an ulp, see ``torch_lbfgs._sqrt``.)"""
    torch = pytest.importorskip("torch")
    from torch.optim.lbfgs import _strong_wolfe as torch_strong_wolfe

    from netcl_optim.optimizers import torch_lbfgs
    from netcl_optim.optimizers.torch_lbfgs import _Evaluation, _strong_wolfe

    def torch_sqrt(x: Any) -> Any:
        return type(x)(torch.tensor(x).sqrt().item())

    monkeypatch.setattr(torch_lbfgs, "_sqrt", torch_sqrt)

    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    real = np.dtype(dtype).type
    rng = np.random.default_rng(3)
    kinds = set()
    for case in range(60):
        c = rng.standard_normal(5)
        c[4] = abs(c[4]) + 0.1  # (bounded below)

        def fg(x: float, c=c) -> tuple[float, float]:
            f = sum(c[k] * x**k for k in range(5))
            return float(f), float(sum(k * c[k] * x ** (k - 1) for k in range(1, 5)))

        x0 = real(rng.standard_normal())
        f0, g0 = fg(float(x0))
        d = real(-np.sign(g0) * rng.uniform(0.1, 3.0))
        t0 = [1.0, 10.0, 0.01][case % 3]
        t0_ours: Any = real(t0) if case % 2 else t0
        t0_torch: Any = torch.tensor(t0, dtype=tdtype) if case % 2 else t0

        def obj(x: Any, t: Any, d: Any) -> tuple[float, Any]:
            f, g = fg(float(x + t * d))
            return f, torch.tensor([g], dtype=tdtype)

        xt, dt = torch.tensor([x0], dtype=tdtype), torch.tensor([d], dtype=tdtype)
        g0t = torch.tensor([g0], dtype=tdtype)
        f_t, g_t, t_t, n_t = torch_strong_wolfe(obj, xt, t0_torch, dt, f0, g0t, g0t.dot(dt))

        def evaluate(t: Any, keep: Any, x0: Any = x0, d: Any = d, fg: Any = fg) -> _Evaluation:
            f, g = fg(float(x0 + t * d))
            return _Evaluation(t, f, real(g), None, gtd=real(g) * d)

        origin = _Evaluation(0, f0, real(g0), None, gtd=real(g0) * d)
        f_o, ev, t_o, n_o = _strong_wolfe(evaluate, t0_ours, origin, origin.gtd, abs(d))
        assert (f_o, n_o) == (f_t, n_t), case
        assert float(t_o) == float(t_t) and ev.g == float(g_t[0]), case
        assert isinstance(t_o, np.floating) == isinstance(t_t, torch.Tensor), case
        kinds.add((n_t > 2, isinstance(t_t, torch.Tensor)))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}
