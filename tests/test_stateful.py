"""The stateful layer: Parameter, SGD, Momentum, Adam, AdamW, RMSProp (torch's contract).

Every stateful row of tests/optimizer_table.py against its float64 torch-style rule (with None
grads and per-parameter step counts), bit for bit against the functional alias it wraps (also at
drawn hyperparameters), against torch.optim when it is installed; and every validation error.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pytest
import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_table import BY_ID, HYPER, STATEFUL, Optimizer, functional_names, ids

import netcl_optim as no
from netcl_optim import stateful as S
from netcl_optim._packing import contiguous_run
from netcl_optim.fusion import count_launches

SHAPES = [(3, 4), (5,), (2, 3, 2), (1,), ()]  # a 0-d leaf too


def dev(x, queue):
    return no.to_device(np.asarray(x), queue)


def make_params(queue, values):
    return [S.Parameter(dev(v, queue)) for v in values]


def host(params):
    return [p.data.get() for p in params]


def set_grads(params, grads, queue):
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else dev(g, queue)


def random_grads(rng, shapes, steps):
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(steps)]


def group_hyper(row: Optimizer, group: dict) -> dict:
    """A param group's hyperparameters, in the functional names the row's rule takes. The
    references descend: ``maximize`` must be off (test_porting.py checks it)."""
    assert not group.get("maximize")
    hyper = functional_names({k: v for k, v in group.items() if k != "params"})
    return {k: v for k, v in hyper.items() if k in row.full()}


def run_reference(rule, hyper, p0, grads_seq):
    """Per-parameter float64 reference: a None grad skips the parameter (no state change).
    The references descend: ``maximize`` must be off (test_porting.py checks it)."""
    assert not hyper.get("maximize")
    hyper = {k: v for k, v in hyper.items() if k != "maximize"}
    ps = [np.asarray(p, np.float64) for p in p0]
    states = [{} for _ in p0]
    for grads in grads_seq:
        for i, g in enumerate(grads):
            if g is not None:
                ps[i], states[i] = rule(ps[i], g, states[i], **hyper)
    return ps, states


def assert_bitwise(got, want):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)), (a, b)


# ---------------------------------------------------------------------------- numerics


# (a rule whose step size sums over the tree couples the parameters: test_lr_free.py checks
# its steps with None grads)
PER_PARAMETER = [row for row in STATEFUL if not row.element_indexed and not row.reduction]


@pytest.mark.parametrize("row", PER_PARAMETER, ids=ids(PER_PARAMETER))
@settings(max_examples=6)
@given(data=st.data())
def test_matches_reference_with_none_grads(cl_queue, row: Optimizer, data):
    """k steps with random grads, some None: each parameter follows the float64 rule with its
    own step count (torch), in float32 to ~1e-5."""
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    steps = data.draw(st.integers(1, 6), label="steps")
    masks = data.draw(
        st.lists(st.lists(st.booleans(), min_size=len(SHAPES), max_size=len(SHAPES)),
                 min_size=steps, max_size=steps),
        label="grad present",
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = random_grads(rng, SHAPES, steps)
    grads = [
        [g if m else None for g, m in zip(gs, ms, strict=True)]
        for gs, ms in zip(grads, masks, strict=True)
    ]
    params = make_params(cl_queue, p0)
    opt = row.make_stateful(no, params)
    for gs in grads:
        set_grads(params, gs, cl_queue)
        opt.step()
    want, states = run_reference(row.reference_rule(), row.full(), p0, grads)
    for got, w in zip(host(params), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
    sd = opt.state_dict()
    for i, s in enumerate(states):
        if "step" in s:  # Adam / RMSProp: the per-parameter count
            assert sd["state"][i]["step"] == float(s["step"])
        for key, value in s.items():  # torch's buffers, where the rule keeps them
            if isinstance(value, np.ndarray):
                np.testing.assert_allclose(sd["state"][i][key], value, rtol=1e-4, atol=1e-5)
        if not s:
            assert i not in sd["state"]


@pytest.mark.parametrize("row", STATEFUL, ids=ids(STATEFUL))
@pytest.mark.parametrize("packed_grads", [True, False], ids=["packed", "per_leaf"])
def test_bitwise_equal_to_functional(cl_queue, row: Optimizer, packed_grads: bool):
    """A stateful run equals ``no.step`` with the functional alias bit for bit, also after
    ``opt.lr`` changes (the same state, an alias rebuilt with the new lr)."""
    rng = np.random.default_rng(1)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = random_grads(rng, SHAPES, 6)
    params = make_params(cl_queue, p0)
    opt = row.make_stateful(no, params)
    hyper = row.full()
    fparams = no.pack([dev(p, cl_queue) for p in p0])
    tx = row.make(no)
    fstate = tx.init(fparams)
    if packed_grads:
        opt.zero_grad(set_to_none=False)
    for k, gs in enumerate(grads):
        if k == 3:
            opt.lr = hyper["learning_rate"] / 3
            tx = row.make(no, {**hyper, "learning_rate": hyper["learning_rate"] / 3})
        if packed_grads:
            for p, g in zip(params, gs, strict=True):
                p.grad.set(g)
        else:
            set_grads(params, gs, cl_queue)
        with count_launches() as c:
            opt.step()
        if row.segmented:  # a constant number packed; a few per leaf otherwise
            assert c.launches <= (row.segmented if packed_grads else 4 * len(SHAPES) + 1)
        else:
            assert c.launches == (1 if packed_grads else len(SHAPES))
        fparams, fstate = no.step(tx, fparams, [dev(g, cl_queue) for g in gs], fstate)
        assert_bitwise(host(params), [p.get() for p in fparams])


HYPER_STATEFUL = [row for row in HYPER if row.stateful is not None]


@pytest.mark.parametrize("row", HYPER_STATEFUL, ids=ids(HYPER_STATEFUL))
@settings(max_examples=5)
@given(data=st.data())
def test_drawn_hyperparameters_bitwise_equal_to_functional(cl_queue, row: Optimizer, data):
    """One draw in both spellings: the class given torch's names steps bit for bit as the
    functional alias given the functional ones."""
    hp = data.draw(row.hyper(st), label="hyperparameters")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params = make_params(cl_queue, p0)
    opt = row.make_stateful(no, params, row.torch_kwargs(hp))
    tx = row.make(no, hp)
    fparams = no.pack([dev(p, cl_queue) for p in p0])
    fstate = tx.init(fparams)
    for gs in random_grads(rng, SHAPES, 3):
        set_grads(params, gs, cl_queue)
        opt.step()
        fparams, fstate = no.step(tx, fparams, [dev(g, cl_queue) for g in gs], fstate)
    assert_bitwise(host(params), [p.get() for p in fparams])


def test_new_lr_reuses_the_kernel(cl_queue):
    params = make_params(cl_queue, [np.ones(4, np.float32)])
    opt = S.Adam(params, lr=1e-2)
    names = []
    for lr in (1e-2, 5e-3, 1e-4):
        opt.lr = lr
        params[0].grad = dev(np.ones(4, np.float32), cl_queue)
        with count_launches() as c:
            opt.step()
        names.append(tuple(c.kernels))
    assert names[0] == names[1] == names[2]


def test_lr_zero_advances_state_only(cl_queue):
    """A scheduler may drive lr to 0 (warmup start): params stay, moments and steps advance."""
    p0 = np.arange(4, dtype=np.float32)
    params = make_params(cl_queue, [p0])
    opt = S.Adam(params, lr=1e-2)
    opt.lr = 0.0
    params[0].grad = dev(np.ones(4, np.float32), cl_queue)
    opt.step()
    assert_bitwise(host(params), [p0])
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 1.0
    np.testing.assert_allclose(sd["state"][0]["exp_avg"], 0.1, rtol=1e-6)


def test_param_groups_lr_property_and_groups(cl_queue):
    rng = np.random.default_rng(2)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params = make_params(cl_queue, p0)
    opt = S.Adam(
        [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "weight_decay": 0.1}],
        lr=3e-2,
    )
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-2]
    assert opt.param_groups[1]["weight_decay"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0
    assert opt.lr == 1e-2
    grads = random_grads(rng, SHAPES, 4)
    for gs in grads[:2]:
        set_grads(params, gs, cl_queue)
        opt.step()
    opt.lr = 2e-2  # sets every group
    assert [g["lr"] for g in opt.param_groups] == [2e-2, 2e-2] and opt.lr == 2e-2
    for gs in grads[2:]:
        set_grads(params, gs, cl_queue)
        opt.step()
    for i, p in enumerate(params):
        lr0 = 1e-2 if i < 2 else 3e-2
        wd = 0.0 if i < 2 else 0.1
        x, s = np.float64(p0[i]), {}
        for k, gs in enumerate(grads):
            x, s = ref.adam(x, gs[i], s, learning_rate=lr0 if k < 2 else 2e-2, weight_decay=wd)
        np.testing.assert_allclose(p.data.get(), x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0


def test_none_grads_and_per_parameter_steps(cl_queue):
    """Torch: a None grad skips the parameter; its count does not advance; the state is lazy."""
    params = make_params(cl_queue, [np.ones(3, np.float32), np.ones(2, np.float32)])
    opt = S.Adam(params, lr=0.1)
    assert opt.state_dict()["state"] == {} and len(opt.state) == 0
    params[0].grad = dev(np.ones(3, np.float32), cl_queue)
    opt.step()
    opt.step()
    assert_bitwise([params[1].data.get()], [np.ones(2, np.float32)])
    sd = opt.state_dict()
    assert list(sd["state"]) == [0] and sd["state"][0]["step"] == 2.0
    params[1].grad = dev(np.ones(2, np.float32), cl_queue)
    with count_launches() as c:  # two cohorts: steps 2 and 0
        opt.step()
    assert c.launches == 2
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 3.0 and sd["state"][1]["step"] == 1.0
    state = opt.state
    assert set(state) == set(params)
    assert state[params[1]]["step"] == 1.0
    assert isinstance(state[params[1]]["exp_avg"], no._device.Array)
    np.testing.assert_array_equal(
        state[params[0]]["exp_avg_sq"].get(), sd["state"][0]["exp_avg_sq"]
    )


def test_closure_is_called_first_and_returned(cl_queue):
    params = make_params(cl_queue, [np.zeros(2, np.float32)])
    opt = S.SGD(params, lr=0.5)

    def closure():
        params[0].grad = dev(np.ones(2, np.float32), cl_queue)
        return 42.0

    assert opt.step(closure) == 42.0
    np.testing.assert_array_equal(params[0].data.get(), [-0.5, -0.5])
    assert opt.step() is None


@pytest.mark.parametrize(
    "row_id, before, after",
    [
        ("sgd", {"lr": 0.1, "momentum": 0.0, "dampening": 0.3}, {"momentum": 0.9}),
        ("sgd", {"lr": 0.1, "momentum": 0.9}, {"momentum": 0.0}),
        ("sgd", {"lr": 0.1}, {"weight_decay": 0.1}),
        ("momentum", {"lr": 0.1, "momentum": 0.0}, {"momentum": 0.9, "nesterov": True}),
        ("adam", {"lr": 0.05}, {"weight_decay": 0.1}),
        ("adamw", {"lr": 0.05, "weight_decay": 0.0}, {"weight_decay": 0.1}),
        ("rmsprop", {"lr": 0.01}, {"momentum": 0.9}),
        ("rmsprop", {"lr": 0.01}, {"centered": True}),
        ("rmsprop", {"lr": 0.01, "momentum": 0.5, "centered": True}, {"momentum": 0.0}),
    ],
)
def test_hyperparameter_crossing_zero(cl_queue, row_id, before, after):
    """Editing a group so that the chain gains or loses a transform keeps the existing buffers;
    a new buffer starts as torch's would (SGD: b = g; RMSProp: zeros)."""
    rng = np.random.default_rng(3)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES[:2]]
    grads = random_grads(rng, SHAPES[:2], 6)
    params = make_params(cl_queue, p0)
    row = BY_ID[row_id]
    opt = row.make_stateful(no, params, before)
    rule, kw = row.reference_rule(), group_hyper(row, opt.param_groups[0])
    ps, states = [np.float64(p) for p in p0], [{}, {}]
    for k, gs in enumerate(grads):
        if k == 3:
            opt.param_groups[0].update(after)
            kw = group_hyper(row, opt.param_groups[0])
            if rule is ref.rmsprop:  # torch creates these at the first step only: zeros
                for p, s in zip(ps, states, strict=True):
                    s.setdefault("momentum_buffer", np.zeros_like(p))
                    s.setdefault("grad_avg", np.zeros_like(p))
        set_grads(params, gs, cl_queue)
        opt.step()
        for i in range(2):
            ps[i], states[i] = rule(ps[i], gs[i], states[i], **kw)
        for got, want in zip(host(params), ps, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_in_a_group(cl_queue):
    if not no._device.has_fp64(cl_queue.device):
        pytest.skip("no fp64 on this device")
    p0 = [np.linspace(-1, 1, 6).astype(np.float32), np.linspace(0, 1, 3)]
    params = make_params(cl_queue, p0)
    opt = S.AdamW(params, lr=0.1)
    opt.zero_grad(set_to_none=False)
    for p in params:
        p.grad.set(np.full(p.data.shape, 0.5, p.data.dtype))
    with count_launches() as c:
        opt.step()
    assert c.launches == 2  # one per dtype
    hyper = group_hyper(BY_ID["adamw"], opt.defaults)
    ps, _ = run_reference(ref.adamw, hyper, p0, [[np.full(6, 0.5), np.full(3, 0.5)]])
    np.testing.assert_allclose(params[0].data.get(), ps[0], rtol=1e-6)
    np.testing.assert_allclose(params[1].data.get(), ps[1], rtol=1e-12)
    assert params[1].data.dtype == np.float64


def test_driven_by_a_scheduler(cl_queue):
    """A scheduler writes group["lr"] (0 at the warmup start); each step uses the lr set."""
    sched_mod = pytest.importorskip("netcl_optim.stateful")
    p0 = np.linspace(-1, 1, 5).astype(np.float32)
    params = make_params(cl_queue, [p0])
    opt = S.AdamW(params, lr=0.1)
    sched = sched_mod.WarmupCosine(opt, warmup_steps=2, total_steps=6)
    lrs, x, state = [], np.float64(p0), {}
    for k in range(8):
        g = np.full(5, 0.5 + k, np.float32)
        params[0].grad = dev(g, cl_queue)
        lrs.append(opt.lr)
        opt.step()
        sched.step()
        x, state = ref.adamw(x, g, state, learning_rate=lrs[-1], weight_decay=0.01)
    assert lrs[0] == 0.0 and lrs[-1] == 0.0 and max(lrs) == 0.1
    np.testing.assert_allclose(params[0].data.get(), x, rtol=1e-5, atol=1e-6)


def test_changed_group_params_and_empty_groups(cl_queue):
    a, b = make_params(cl_queue, [np.ones(2, np.float32), np.ones(3, np.float32)])
    opt = S.SGD([{"params": [a]}, {"params": []}], lr=0.5)
    opt.zero_grad(set_to_none=False)
    a.grad.fill(1.0)
    opt.step()
    np.testing.assert_array_equal(a.data.get(), [0.5, 0.5])
    assert opt.state_dict()["param_groups"][1]["params"] == []
    opt.param_groups[0]["params"].append(b)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.step()


# ---------------------------------------------------------------------------- packing, grads


def test_construction_packs_and_keeps_values(cl_queue):
    values = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]
    params = make_params(cl_queue, values)
    originals = [p.data for p in params]
    S.SGD(params, lr=0.1)
    assert all(p.data is not o for p, o in zip(params, originals, strict=True))  # re-homed
    assert contiguous_run([p.data for p in params]) is not None
    assert_bitwise(host(params), values)
    # already packed: kept as they are
    packed = no.pack([dev(v, cl_queue) for v in values])
    params2 = [S.Parameter(a) for a in packed]
    S.SGD(params2, lr=0.1)
    assert all(p.data is a for p, a in zip(params2, packed, strict=True))


def test_zero_grad(cl_queue):
    params = make_params(cl_queue, [np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    opt = S.SGD(params, lr=0.1)
    params[0].grad = dev(np.ones(3, np.float32), cl_queue)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    params[0].grad = dev(np.ones(3, np.float32), cl_queue)
    opt.zero_grad(set_to_none=False)
    grads = [p.grad for p in params]
    assert contiguous_run(grads) is not None
    assert all(np.array_equal(g.get(), np.zeros(g.shape)) for g in grads)
    for g in grads:
        g.fill(3.0)
    opt.zero_grad(set_to_none=False)  # the same buffers, zeroed on the device
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))
    assert all(not g.get().any() for g in grads)
    # Parameter.zero_grad
    p = S.Parameter(dev(np.ones(2, np.float32), cl_queue))
    p.zero_grad(set_to_none=False)
    assert p.grad is None
    p.grad = dev(np.ones(2, np.float32), cl_queue)
    p.zero_grad(set_to_none=False)
    assert not p.grad.get().any()
    p.zero_grad()
    assert p.grad is None


def test_duck_typed_params_and_generators(cl_queue):
    class Tensor:
        def __init__(self, data):
            self.data, self.grad = data, None

    ts = [Tensor(dev(np.ones(3, np.float32), cl_queue)) for _ in range(2)]
    opt = S.Momentum(t for t in ts)
    for t in ts:
        t.grad = dev(np.ones(3, np.float32), cl_queue)
    opt.step()
    np.testing.assert_allclose(ts[0].data.get(), 1 - 1e-2 * (1 + 1e-4), rtol=1e-6)


def test_add_param_group(cl_queue):
    a, b = make_params(cl_queue, [np.ones(2, np.float32), np.ones(3, np.float32)])
    opt = S.RMSProp([a], lr=1e-2, momentum=0.5)
    opt.add_param_group({"params": b, "lr": 1e-3})
    assert opt.param_groups[1]["momentum"] == 0.5 and opt.param_groups[1]["lr"] == 1e-3
    assert opt.param_groups[1]["params"] == [b]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    with pytest.raises(ValueError, match="alpha"):
        opt.add_param_group({"params": make_params(cl_queue, [np.ones(1)]), "alpha": 1.5})
    assert len(opt.param_groups) == 2


# ---------------------------------------------------------------------------- errors

CONSTRUCTOR_ERRORS = [
    ("SGD", {"lr": -0.1}, "lr"),
    ("SGD", {"lr": 0.0}, "lr"),
    ("SGD", {"lr": float("nan")}, "lr"),
    ("SGD", {"momentum": -0.5}, "momentum"),
    ("SGD", {"momentum": 0.9, "dampening": -0.1}, "dampening"),
    ("SGD", {"weight_decay": -1.0}, "weight_decay"),
    (
        "SGD",
        {"nesterov": True},
        r"^Invalid nesterov: True \(must be False unless momentum > 0 and dampening == 0\)",
    ),
    ("SGD", {"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "nesterov"),
    ("Momentum", {"lr": -1.0}, "lr"),
    ("Momentum", {"momentum": -0.9}, "momentum"),
    ("Momentum", {"momentum": 0.0, "nesterov": True}, "nesterov"),
    ("Momentum", {"weight_decay": -1e-4}, "weight_decay"),
    ("Adam", {"lr": -1e-3}, "lr"),
    (
        "Adam",
        {"betas": (1.0, 0.999)},
        r"^Invalid betas: \(1\.0, 0\.999\) \(must be a pair \(beta1, beta2\), each in \[0, 1\)\)",
    ),
    ("Adam", {"betas": (-0.1, 0.999)}, r"Invalid betas: \(-0\.1, 0\.999\)"),
    ("Adam", {"betas": (0.9, 1.0)}, r"Invalid betas: \(0\.9, 1\.0\)"),
    ("Adam", {"betas": (0.9,)}, "betas"),
    ("Adam", {"eps": 0.0}, "eps"),
    ("Adam", {"eps": -1e-8}, "eps"),
    ("Adam", {"weight_decay": -0.1}, "weight_decay"),
    ("AdamW", {"lr": 0.0}, "lr"),
    ("AdamW", {"betas": (0.9, 1.5)}, r"Invalid betas: \(0\.9, 1\.5\)"),
    ("AdamW", {"eps": float("inf")}, "eps"),
    ("AdamW", {"weight_decay": -0.01}, "weight_decay"),
    ("RMSProp", {"lr": -1e-3}, "lr"),
    ("RMSProp", {"alpha": 1.0}, "alpha"),
    ("RMSProp", {"alpha": -0.1}, "alpha"),
    ("RMSProp", {"eps": 0.0}, "eps"),
    ("RMSProp", {"momentum": -0.1}, "momentum"),
    ("RMSProp", {"weight_decay": -0.1}, "weight_decay"),
    ("RMSProp", {"centered": "yes"}, "centered"),
]


@pytest.mark.parametrize("cls, kwargs, match", CONSTRUCTOR_ERRORS)
def test_constructor_errors(cl_queue, cls, kwargs, match):
    params = make_params(cl_queue, [np.ones(2, np.float32)])
    with pytest.raises(ValueError, match=match):
        getattr(S, cls)(params, **kwargs)
    with pytest.raises(ValueError, match=match):  # also in a param group
        getattr(S, cls)([{"params": params, **kwargs}])


def test_params_argument_errors(cl_queue):
    a, b = make_params(cl_queue, [np.ones(2, np.float32), np.ones(2, np.float32)])
    with pytest.raises(TypeError, match="iterable"):
        S.SGD(a.data)
    with pytest.raises(TypeError, match="iterable"):
        S.SGD(a)
    with pytest.raises(TypeError, match="set"):
        S.SGD({a, b})
    with pytest.raises(TypeError, match="set"):
        S.SGD([{"params": {a, b}}])
    with pytest.raises(ValueError, match="empty parameter list"):
        S.SGD([])
    with pytest.raises(ValueError, match="twice"):
        S.SGD([a, b, a])
    with pytest.raises(ValueError, match="more than one parameter group"):
        S.SGD([{"params": [a]}, {"params": [b, a]}])
    with pytest.raises(TypeError, match="Parameter"):
        S.SGD([a.data])
    with pytest.raises(TypeError, match="Parameter"):
        S.SGD([np.ones(2)])
    with pytest.raises(TypeError, match="dict"):
        S.SGD({"params": [a]})
    with pytest.raises(TypeError, match="Array"):
        S.Parameter(np.ones(2))


def _bad_grad_cases(queue):
    other = cl.CommandQueue(cl.Context([queue.device]))
    return {
        "shape": (lambda: dev(np.ones(4, np.float32), queue), ValueError, "shape"),
        "dtype": (lambda: dev(np.ones(3, np.float16), queue), TypeError, "dtype"),
        "numpy": (lambda: np.ones(3, np.float32), TypeError, "not a pyopencl"),
        "context": (lambda: dev(np.ones(3, np.float32), other), ValueError, "context"),
    }


@pytest.mark.parametrize("bad", ["shape", "dtype", "numpy", "context"])
def test_bad_grad_modifies_nothing(cl_queue, bad):
    """Everything is checked before any launch: the good group is not stepped either."""
    make_grad, exc, match = _bad_grad_cases(cl_queue)[bad]
    p0 = [np.ones(2, np.float32), np.full(3, 2.0, np.float32)]
    params = make_params(cl_queue, p0)
    opt = S.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    params[0].grad = dev(np.ones(2, np.float32), cl_queue)
    params[1].grad = dev(np.ones(3, np.float32), cl_queue)
    opt.step()
    before = host(params)
    sd = opt.state_dict()
    params[1].grad = make_grad()
    with pytest.raises(exc, match=match):
        opt.step()
    assert_bitwise(host(params), before)
    after = opt.state_dict()
    for i in (0, 1):
        assert after["state"][i]["step"] == sd["state"][i]["step"] == 1.0
        assert_bitwise([after["state"][i]["exp_avg"]], [sd["state"][i]["exp_avg"]])


def test_bad_hyperparameter_at_step_modifies_nothing(cl_queue):
    params = make_params(cl_queue, [np.ones(2, np.float32), np.ones(3, np.float32)])
    opt = S.Adam([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1)
    for p in params:
        p.grad = dev(np.ones(p.data.shape, np.float32), cl_queue)
    opt.param_groups[1]["betas"] = (0.9, 1.0)
    with pytest.raises(ValueError, match="param_groups\\[1\\]"):
        opt.step()
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert_bitwise(host(params), [np.ones(2, np.float32), np.ones(3, np.float32)])
    assert opt.state_dict()["state"] == {}


# ---------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("row", STATEFUL, ids=ids(STATEFUL))
def test_state_dict_resume_is_bitwise(cl_queue, row: Optimizer):
    """k steps, state_dict, a fresh optimizer on copies of the params, load, go on: the same
    bits as the uninterrupted run. The state dict is a deep copy (numpy arrays)."""
    rng = np.random.default_rng(4)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = random_grads(rng, SHAPES, 7)
    grads[1][2] = None  # per-parameter counts differ
    params = make_params(cl_queue, p0)
    opt = row.make_stateful(no, [{"params": params[:3]}, {"params": params[3:], "lr": 0.05}])
    for gs in grads[:3]:
        set_grads(params, gs, cl_queue)
        opt.step()
    sd = opt.state_dict()
    resumed = make_params(cl_queue, host(params))
    opt2 = row.make_stateful(no, [{"params": resumed[:3]}, {"params": resumed[3:]}])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lr"] == 0.05
    for gs in grads[3:]:
        set_grads(params, gs, cl_queue)
        set_grads(resumed, gs, cl_queue)
        opt.step()
        opt2.step()
        for leaf in sd["state"].values():  # loading copied: editing sd changes nothing
            for v in leaf.values():
                if isinstance(v, np.ndarray):
                    v[...] = 7.0
    assert_bitwise(host(resumed), host(params))


def test_load_state_dict_errors_change_nothing(cl_queue):
    params = make_params(cl_queue, [np.ones(2, np.float32), np.ones(3, np.float32)])
    opt = S.Adam(params, lr=0.1)
    for p in params:
        p.grad = dev(np.ones(p.data.shape, np.float32), cl_queue)
    opt.step()
    good = opt.state_dict()
    bad_cases = [
        ({"state": {}}, "param_groups"),
        ({**good, "param_groups": good["param_groups"] * 2}, "parameter groups"),
        ({**good, "param_groups": [{**good["param_groups"][0], "params": [0]}]}, "size"),
        ({**good, "state": {0: {**good["state"][0], "exp_avg": np.ones(5)}}}, "shape"),
        ({**good, "state": {0: {**good["state"][0], "max_exp_avg_sq": np.ones(2)}}},
         "max_exp_avg_sq"),
        ({**good, "state": {0: {"exp_avg": np.ones(2)}}}, "lacks"),
        ({**good, "state": {0: {**good["state"][0], "step": -1.0}}}, "step"),
        ({**good, "state": {9: good["state"][0]}}, "no group"),
        # amsgrad=True needs the max buffer; without amsgrad it is a key Adam does not use
        ({**good, "param_groups": [{**good["param_groups"][0], "amsgrad": True}]},
         r"lacks \['max_exp_avg_sq'\]"),
        ({**good, "param_groups": [{**good["param_groups"][0], "maximize": "yes"}]},
         r"Invalid maximize: 'yes' \(must be a bool\) in loaded param_groups\[0\]"),
        ({**good, "param_groups": [{**good["param_groups"][0], "decoupled_weight_decay": True}]},
         "AdamW"),
        ({**good, "param_groups": [{**good["param_groups"][0], "eps": -1.0}]}, "eps"),
    ]  # fmt: skip
    lr_before = opt.lr
    for sd, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
    assert opt.lr == lr_before and opt.param_groups[0]["amsgrad"] is False
    after = opt.state_dict()
    for i in (0, 1):
        assert_bitwise([after["state"][i]["exp_avg"]], [good["state"][i]["exp_avg"]])
        assert after["state"][i]["step"] == 1.0


def test_load_resets_parameters_absent_from_the_state(cl_queue):
    params = make_params(cl_queue, [np.ones(2, np.float32), np.ones(3, np.float32)])
    opt = S.Adam(params, lr=0.1)
    fresh = opt.state_dict()
    for p in params:
        p.grad = dev(np.ones(p.data.shape, np.float32), cl_queue)
    opt.step()
    opt.load_state_dict(fresh)
    assert opt.state_dict()["state"] == {}
    before = host(params)
    opt.step()  # a first step again: from zero moments
    hyper = group_hyper(BY_ID["adam"], opt.param_groups[0])
    ref_p, _ = run_reference(ref.adam, hyper, before, [[np.ones(2), np.ones(3)]])
    for got, want in zip(host(params), ref_p, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------- torch


TORCH_ROWS = [row for row in STATEFUL if row.torch is not None]


@pytest.mark.parametrize("row", TORCH_ROWS, ids=ids(TORCH_ROWS))
def test_torch_trajectory(cl_queue, row: Optimizer):
    """30 steps against torch.optim in float32 (rtol 1e-5), with a None grad now and then."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = random_grads(rng, SHAPES, 30)
    for k in range(0, 30, 7):
        grads[k][k % len(SHAPES)] = None
    params = make_params(cl_queue, p0)
    opt = row.make_stateful(no, params)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    topt = row.make_torch(torch, tparams)
    for gs in grads:
        set_grads(params, gs, cl_queue)
        for tp, g in zip(tparams, gs, strict=True):
            tp.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for got, tp in zip(host(params), tparams, strict=True):
        np.testing.assert_allclose(got, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def _to_numpy(torch, sd):
    return {
        "state": {
            k: {n: (v.numpy() if torch.is_tensor(v) else v) for n, v in s.items()}
            for k, s in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
    }


def _to_torch(torch, sd):
    return {
        "state": {
            k: {n: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for n, v in s.items()}
            for k, s in sd["state"].items()
        },
        "param_groups": sd["param_groups"],
    }


@pytest.mark.parametrize("row", TORCH_ROWS, ids=ids(TORCH_ROWS))
def test_torch_state_dict_round_trip(cl_queue, row: Optimizer):
    """torch's state dict (tensors as numpy) loads into ours and ours into torch
    (torch.from_numpy); both then go on as the other would."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES[:2]]
    grads = random_grads(rng, SHAPES[:2], 8)

    def torch_run(gs_seq, topt, tparams):
        for gs in gs_seq:
            for tp, g in zip(tparams, gs, strict=True):
                tp.grad = torch.from_numpy(g.copy())
            topt.step()

    def ours_run(gs_seq, opt, params):
        for gs in gs_seq:
            set_grads(params, gs, cl_queue)
            opt.step()

    # torch -> ours
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    topt = row.make_torch(torch, tparams)
    torch_run(grads[:4], topt, tparams)
    params = make_params(cl_queue, [tp.detach().numpy().copy() for tp in tparams])
    opt = row.make_stateful(no, params)
    opt.load_state_dict(_to_numpy(torch, topt.state_dict()))
    torch_run(grads[4:], topt, tparams)
    ours_run(grads[4:], opt, params)
    for got, tp in zip(host(params), tparams, strict=True):
        np.testing.assert_allclose(got, tp.detach().numpy(), rtol=1e-5, atol=1e-6)

    # ours -> torch
    params = make_params(cl_queue, p0)
    opt = row.make_stateful(no, params)
    ours_run(grads[:4], opt, params)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in host(params)]
    topt = getattr(torch.optim, row.torch)(tparams, lr=1.0)
    topt.load_state_dict(_to_torch(torch, opt.state_dict()))
    assert topt.param_groups[0]["lr"] == row.torch_kwargs()["lr"]
    torch_run(grads[4:], topt, tparams)
    ours_run(grads[4:], opt, params)
    for got, tp in zip(host(params), tparams, strict=True):
        np.testing.assert_allclose(got, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_table_covers_every_class(cl_queue):
    """Guard: every optimizer class of the package has a row, and each row's class holds the
    row's hyperparameters (its own defaults filling in what the row leaves out)."""
    classes = {c for c in vars(no).values() if isinstance(c, type) and issubclass(c, no.Optimizer)}
    # (bitsandbytes' 8-bit classes: their rules are rows with state_bits=8, tests/test_8bit.py,
    # and their own numbers are bitsandbytes', tests/test_bnb8bit.py)
    bnb = {c for c in classes if c.bnb_layout}
    assert {c.__name__ for c in bnb} == {"Adam8bit", "AdamW8bit", "Lion8bit", "RMSprop8bit",
                                         "Adagrad8bit", "SGD8bit"}  # fmt: skip
    # (the schedule-free classes: schedulefree's rule in torch's order, not an alias's, and a
    # step needs train() first: tests/test_schedule_free.py)
    schedule_free = {no.AdamWScheduleFree, no.SGDScheduleFree, no.RAdamScheduleFree}
    # (PolyakSGD: a step needs the loss, step(closure) or step(value=...): test_polyak.py;
    # LBFGS: a step is a loop of closure calls, test_lbfgs_torch.py; Muon: matrices only,
    # where the table's trees hold vectors, test_muon.py)
    assert classes - bnb - schedule_free - {no.Optimizer, no.PolyakSGD, no.LBFGS, no.Muon} == {
        getattr(no, row.stateful) for row in STATEFUL
    }
    for row in STATEFUL:
        group = row.make_stateful(no, make_params(cl_queue, [np.ones(2, np.float32)]))
        want = row.torch_kwargs()
        assert {k: group.param_groups[0][k] for k in want} == want, row.id


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("maximize", [False, True])
def test_adopt_weight_decay_is_its_chain(cl_queue, decoupled, maximize):
    """ADOPT's weight decay (the class's own: optax.contrib's adopt has none, so no table row
    pins it) is add_decayed_weights before scale_by_adopt (coupled, the default) or after it
    (decoupled), bit for bit."""
    rng = np.random.default_rng(3)
    values = [rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (5,))]
    params = make_params(cl_queue, values)
    opt = S.ADOPT(params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled,
                  maximize=maximize)  # fmt: skip
    core = [no.scale_by_adopt(0.9, 0.9999, 1e-6)]
    decay = [no.add_decayed_weights(0.1)]
    sign = [no.scale(-1.0)] if maximize else []
    parts = [*sign, *core, *decay] if decoupled else [*sign, *decay, *core]
    tx = no.chain(*parts, no.scale_by_learning_rate(1e-2))
    ref_params = [dev(v, cl_queue) for v in values]
    state = tx.init(ref_params)
    for _ in range(5):
        grads = [rng.standard_normal(v.shape).astype(np.float32) for v in values]
        for p, g in zip(params, grads, strict=True):
            p.grad = dev(g, cl_queue)
        opt.step()
        ref_params, state = no.step(tx, ref_params, [dev(g, cl_queue) for g in grads], state)
        assert [a.tobytes() for a in host(params)] == [r.get().tobytes() for r in ref_params]
