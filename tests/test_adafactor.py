"""Adafactor beyond the table's rows (tests/optimizer_table.py: ``adafactor``, optax's rule;
``adafactor-torch``, the class): torch.optim.Adafactor over 30 steps on a tree of matrices,
3-D, vector and 0-d leaves, its state dict (keys and shapes) both ways, optax's rule on
leaves whose two largest axes are not the last two, zero leaves, constant launch counts and
the state checks of ``scale_by_factored_rms``."""

from __future__ import annotations

import numpy as np
import pytest
import reference_reductions as rr

import netcl_optim as no
from netcl_optim.fusion import count_launches

SHAPES = [(6, 4), (3, 130), (5,), (), (3, 5, 7), (130, 5), (1, 9), (2, 2, 3, 4)]
STEPS = 30


def _problem(shapes, seed=0, steps=STEPS):
    rng = np.random.default_rng(seed)
    params = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
    grads = [
        [np.asarray((0.5 + rng.random()) * rng.standard_normal(s), np.float32) for s in shapes]
        for _ in range(steps)
    ]
    return params, grads


def _ours(params, **kwargs):
    ps = [no.Parameter(no.to_device(p.copy())) for p in params]
    return ps, no.Adafactor(ps, **kwargs)


def _step(ps, opt, grads):
    for p, g in zip(ps, grads, strict=True):
        p.grad = no.to_device(g)
    opt.step()


KWARGS = [{}, {"lr": 0.05, "beta2_decay": -0.6, "eps": (1e-15, 1e-2), "d": 2.0,
               "weight_decay": 0.1, "maximize": True}]  # fmt: skip


@pytest.mark.parametrize("kwargs", KWARGS, ids=["defaults", "custom"])
def test_matches_torch_over_30_steps(kwargs):
    torch = pytest.importorskip("torch")
    params, grads = _problem(SHAPES)
    ps, opt = _ours(params, **kwargs)
    tps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    topt = torch.optim.Adafactor(tps, **kwargs)
    for step_grads in grads:
        _step(ps, opt, step_grads)
        for tp, g in zip(tps, step_grads, strict=True):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
    for p, tp in zip(ps, tps, strict=True):
        np.testing.assert_allclose(p.data.get(), tp.detach().numpy(), rtol=2e-5, atol=1e-6)
    ours, theirs = opt.state_dict()["state"], topt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for i, entry in theirs.items():
        assert set(ours[i]) == set(entry), i
        for k, v in entry.items():
            want = v.numpy() if k != "step" else float(v)
            got = ours[i][k]
            assert np.shape(got) == np.shape(want), (i, k)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)


def test_state_shapes_are_torchs():
    """A (3, 5, 7) param keeps row_var (3, 5, 1) and col_var (3, 1, 7); a vector and a 0-d
    param keep variance shaped like them."""
    params, grads = _problem([(3, 5, 7), (4,), ()], steps=1)
    ps, opt = _ours(params)
    _step(ps, opt, grads[0])
    state = opt.state_dict()["state"]
    assert {k: np.shape(v) for k, v in state[0].items()} == {
        "step": (), "row_var": (3, 5, 1), "col_var": (3, 1, 7)}  # fmt: skip
    assert {k: np.shape(v) for k, v in state[1].items()} == {"step": (), "variance": (4,)}
    assert {k: np.shape(v) for k, v in state[2].items()} == {"step": (), "variance": ()}


def test_torch_state_dict_loads_and_continues():
    torch = pytest.importorskip("torch")
    params, grads = _problem(SHAPES, seed=1, steps=8)
    tps = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    topt = torch.optim.Adafactor(tps, lr=0.02)
    for step_grads in grads[:4]:
        for tp, g in zip(tps, step_grads, strict=True):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
    ps, opt = _ours([tp.detach().numpy() for tp in tps], lr=0.02)
    sd = topt.state_dict()
    sd["state"] = {i: {k: v.numpy() for k, v in e.items()} for i, e in sd["state"].items()}
    opt.load_state_dict(sd)
    for step_grads in grads[4:]:
        _step(ps, opt, step_grads)
        for tp, g in zip(tps, step_grads, strict=True):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
    for p, tp in zip(ps, tps, strict=True):
        np.testing.assert_allclose(p.data.get(), tp.detach().numpy(), rtol=2e-5, atol=1e-6)


def test_state_dict_refuses_a_wrong_shape_and_a_misplaced_key():
    params, grads = _problem([(3, 4), (5,)], steps=1)
    ps, opt = _ours(params)
    _step(ps, opt, grads[0])
    good = opt.state_dict()
    bad = opt.state_dict()
    bad["state"][0]["row_var"] = np.zeros((4, 1), np.float32)
    with pytest.raises(ValueError, match="'row_var' has shape"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][1]["row_var"] = np.zeros((5, 1), np.float32)  # a vector keeps variance only
    with pytest.raises(ValueError, match="row_var"):
        opt.load_state_dict(bad)
    assert (
        opt.state_dict()["state"][0]["row_var"].tobytes() == good["state"][0]["row_var"].tobytes()
    )


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_optax_rule_on_axes_that_are_not_the_last_two(x64):
    """optax factors the two largest axes wherever they are: (129, 2, 130) averages rows over
    axis 2 and columns over axis 0; (130, 3, 129) the other way round; (200, 300, 3) has a
    third axis after both."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    shapes = {"c1": (129, 2, 130), "c2": (130, 3, 129), "c3": (200, 300, 3), "v": (7,)}
    rng = np.random.default_rng(2)
    dtype = np.float64 if x64 else np.float32
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
             for _ in range(4)]  # fmt: skip
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", x64)
    try:
        tx, otx = no.adafactor(0.1), optax.adafactor(0.1)
        dp, op = no.to_device(params), {k: jnp.asarray(v) for k, v in params.items()}
        state, ostate = tx.init(dp), otx.init(op)
        for g in grads:
            u, state = tx.update(no.to_device(g), state, dp)
            dp = no.apply_updates(dp, u)
            ou, ostate = otx.update({k: jnp.asarray(v) for k, v in g.items()}, ostate, op)
            op = optax.apply_updates(op, ou)
    finally:
        jax.config.update("jax_enable_x64", old)
    rtol = 1e-10 if x64 else 2e-5
    for k in shapes:
        np.testing.assert_allclose(dp[k].get(), np.asarray(op[k]), rtol=rtol, atol=rtol * 1e-2)
        fs = ostate[0]
        for field in ("v_row", "v_col", "v"):
            got, want = getattr(state[0], field)[k].get(), np.asarray(getattr(fs, field)[k])
            assert got.shape == want.shape, (k, field)
            np.testing.assert_allclose(got, want, rtol=rtol * 10)


def test_zero_leaves_give_no_nan():
    """All-zero params and all-zero grads: the class moves nothing (its floors keep the
    variance positive), optax's rule gives 0 updates where g = 0 (eps = 1e-30)."""
    shapes = [(4, 3), (6,), ()]
    zeros = [np.zeros(s, np.float32) for s in shapes]
    ps, opt = _ours(zeros)
    _step(ps, opt, zeros)
    for p in ps:
        assert np.all(p.data.get() == 0)
    tx = no.adafactor(0.1, min_dim_size_to_factor=2)
    params = no.to_device({str(i): z for i, z in enumerate(zeros)})
    u, _ = tx.update(params, tx.init(params), params)
    for leaf in no.to_host(u).values():
        assert np.all(np.isfinite(leaf)) and np.all(leaf == 0)


@pytest.mark.parametrize("api", ["class", "alias"])
def test_a_packed_tree_takes_a_constant_number_of_launches(api):
    """The same count for 160 and 400 leaves (a launch over many segments is split in two
    past a size, see ``fusion/_launch.launch``: both trees are past it)."""
    counts = []
    for n in (160, 400):
        shapes = [(24, 16) if i % 3 else (16,) for i in range(n)] + [(3, 40, 50), ()]
        params, grads = _problem(shapes, steps=2)
        if api == "class":
            ps, opt = _ours(params)
            opt.zero_grad(set_to_none=False)
            for p, g in zip(ps, grads[0], strict=True):
                p.grad.set(g)
            opt.step()
            with count_launches() as c:
                opt.step()
        else:
            tx = no.adafactor(1e-2, min_dim_size_to_factor=3)
            dp = no.pack(no.to_device(params))
            g = no.pack(no.to_device(grads[0]))
            state = tx.init(dp)
            _, state = tx.update(g, state, dp)
            with count_launches() as c:
                tx.update(g, state, dp)
        counts.append(c.launches)
    assert counts[0] == counts[1] <= (15 if api == "class" else 23), counts


def test_factored_state_errors_name_the_leaf():
    tx = no.scale_by_factored_rms(min_dim_size_to_factor=2)
    params = no.to_device({"w": np.ones((3, 4), np.float32), "b": np.ones(4, np.float32)})
    state = tx.init(params)
    bad = state._replace(v_row={**state.v_row, "w": no.to_device(np.ones(4, np.float32))})
    with pytest.raises(ValueError, match=r"state.v_row: leaf .*'w'.* has shape \(4,\)"):
        tx.update(params, bad)
    bad = state._replace(v={**state.v, "b": np.ones(4, np.float32)})
    with pytest.raises(TypeError, match=r"state.v: leaf .*'b'.* not a device array"):
        tx.update(params, bad)
    with pytest.raises(TypeError, match="not a FactoredState"):
        tx.update(params, (state,))


def test_in_place_and_pure_steps_give_the_same_bits():
    """The stage's in-place run (the class's) and its pure update, on packed and on
    separate state arrays."""
    tx = no.scale_by_factored_rms(min_dim_size_to_factor=2, decay_rate=0.7)
    params, grads = _problem([(5, 7), (9,), (2, 3, 4)], steps=3)
    run = tx.plan.run
    pure_state = tx.init(no.pack(no.to_device(params)))
    loose = [tx.init(no.to_device(params)) for _ in range(2)]
    for g in grads:
        dg = no.to_device(g)
        u_pure, pure_state = tx.update(dg, pure_state)
        for k, st in enumerate(loose):
            u, loose[k] = run(dg, st, None, inplace=bool(k))
            for a, b in zip(no.to_host(u), no.to_host(u_pure), strict=True):
                assert a.tobytes() == b.tobytes()
    for st in loose:
        for f in ("v_row", "v_col", "v"):
            for a, b in zip(getattr(st, f), getattr(pure_state, f), strict=True):
                assert a.get().tobytes() == b.get().tobytes()


def test_reference_rule_agrees_with_the_class_in_float64():
    """The float64 torch rule (reference_reductions.adafactor) and the class's float32 steps
    stay within float32 rounding over 30 steps."""
    params, grads = _problem(SHAPES, seed=3)
    ps, opt = _ours(params, lr=0.02, weight_decay=0.01)
    ref = [p.astype(np.float64) for p in params]
    states: list[dict] = [{} for _ in params]
    for step_grads in grads:
        _step(ps, opt, step_grads)
        for i, g in enumerate(step_grads):
            ref[i], states[i] = rr.adafactor(
                ref[i], g, states[i], learning_rate=0.02, weight_decay=0.01,
                eps=(float(np.finfo(np.float32).eps), 1e-3),
            )  # fmt: skip
    for p, r in zip(ps, ref, strict=True):
        np.testing.assert_allclose(p.data.get(), r, rtol=2e-5, atol=1e-6)
