"""Checks of tests/reference.py itself: hand-computed steps, and torch / optax parity in float64
(every row of tests/optimizer_table.py, at its kwargs and at drawn hyperparameters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st
from optimizer_table import HYPER, OPTAX, OPTIMIZERS, TORCH, Optimizer, ids

RNG = np.random.default_rng(20240611)


def _grads(n_steps: int, shape=(7,), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(n_steps)]


def _p0(shape=(7,), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# ---------------------------------------------------------------------------------------------
# hand-computed single steps
# ---------------------------------------------------------------------------------------------


def test_adam_first_step_moves_by_lr_times_sign():
    p = np.array([0.5, -1.0, 2.0, 3.0])
    g = np.array([3.0, -0.25, 1e-3, -40.0])
    lr = 1e-2
    p1, state = ref.adam(p, g, {}, learning_rate=lr, b1=0.9, b2=0.999, eps=1e-8)
    # mhat = g, vhat = g^2 on step 1 => p1 = p - lr * g / (|g| + eps)
    np.testing.assert_allclose(p1, p - lr * g / (np.abs(g) + 1e-8), rtol=1e-14)
    np.testing.assert_allclose(p - p1, lr * np.sign(g), rtol=1e-5)
    assert state["step"] == 1
    np.testing.assert_allclose(state["exp_avg"], 0.1 * g, rtol=1e-14)
    np.testing.assert_allclose(state["exp_avg_sq"], 0.001 * g * g, rtol=1e-12)


def test_adam_second_step_hand_computed():
    p, g1, g2 = np.array([1.0]), np.array([2.0]), np.array([-1.0])
    lr, b1, b2, eps = 0.1, 0.5, 0.75, 1e-3
    p1, s = ref.adam(p, g1, {}, learning_rate=lr, b1=b1, b2=b2, eps=eps)
    p2, s = ref.adam(p1, g2, s, learning_rate=lr, b1=b1, b2=b2, eps=eps)
    m = 0.5 * (0.5 * 2.0) + 0.5 * -1.0  # = 0.0
    v = 0.75 * (0.25 * 4.0) + 0.25 * 1.0  # = 1.0
    mhat, vhat = m / (1 - 0.25), v / (1 - 0.5625)
    assert p2[0] == pytest.approx(p1[0] - lr * mhat / (math.sqrt(vhat) + eps), rel=1e-14)
    assert s["exp_avg"][0] == pytest.approx(m, abs=1e-15)
    assert s["exp_avg_sq"][0] == pytest.approx(v, rel=1e-15)


def test_adam_coupled_weight_decay_enters_the_gradient():
    p, g = np.array([2.0]), np.array([0.0])
    p1, s = ref.adam(p, g, {}, learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5)
    # effective g = 0 + 0.5 * 2 = 1 => first step moves by lr * sign(1)
    assert p1[0] == pytest.approx(2.0 - 0.1 * 1.0 / (1.0 + 1e-8), rel=1e-14)
    assert s["exp_avg"][0] == pytest.approx(0.1, rel=1e-14)


def test_adamw_decays_before_the_moments():
    p, g = np.array([2.0]), np.array([0.0])
    p1, s = ref.adamw(p, g, {}, learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5)
    # zero gradient: the moments stay 0, only the decoupled decay acts
    assert p1[0] == pytest.approx(2.0 * (1 - 0.1 * 0.5), rel=1e-15)
    assert s["exp_avg"][0] == 0.0 and s["exp_avg_sq"][0] == 0.0
    g = np.array([3.0])
    p1, _ = ref.adamw(p, g, {}, learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5)
    assert p1[0] == pytest.approx(2.0 * 0.95 - 0.1 * 3.0 / (3.0 + 1e-8), rel=1e-14)


def test_sgd_plain_and_weight_decay():
    p, g = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    p1, s = ref.sgd(p, g, {}, learning_rate=0.1)
    np.testing.assert_array_equal(p1, p - 0.1 * g)
    assert "momentum_buffer" not in s
    p1, _ = ref.sgd(p, g, {}, learning_rate=0.1, weight_decay=0.1)
    np.testing.assert_allclose(p1, p - 0.1 * (g + 0.1 * p), rtol=1e-15)


def test_sgd_dampening_first_step_is_undamped():
    p, g1, g2 = np.array([1.0]), np.array([2.0]), np.array([4.0])
    hp = dict(learning_rate=0.1, momentum=0.9, dampening=0.5)
    p1, s = ref.sgd(p, g1, {}, **hp)
    assert s["momentum_buffer"][0] == 2.0  # buf = g, NOT (1 - dampening) * g
    assert p1[0] == pytest.approx(1.0 - 0.1 * 2.0, rel=1e-15)
    p2, s = ref.sgd(p1, g2, s, **hp)
    assert s["momentum_buffer"][0] == pytest.approx(0.9 * 2.0 + 0.5 * 4.0, rel=1e-15)
    assert p2[0] == pytest.approx(p1[0] - 0.1 * 3.8, rel=1e-15)


def test_sgd_nesterov_hand_computed():
    p, g1, g2 = np.array([0.0]), np.array([1.0]), np.array([2.0])
    hp = dict(learning_rate=0.5, momentum=0.5, nesterov=True)
    p1, s = ref.sgd(p, g1, {}, **hp)
    assert p1[0] == pytest.approx(-0.5 * (1.0 + 0.5 * 1.0), rel=1e-15)
    p2, s = ref.sgd(p1, g2, s, **hp)
    buf = 0.5 * 1.0 + 2.0
    assert p2[0] == pytest.approx(p1[0] - 0.5 * (2.0 + 0.5 * buf), rel=1e-15)


def test_sgd_momentum_zero_ignores_dampening():
    p, gs = _p0(), _grads(5)
    a = ref.run_trajectory(ref.sgd, p, gs, learning_rate=0.1, momentum=0.0, dampening=0.7)
    b = ref.run_trajectory(ref.sgd, p, gs, learning_rate=0.1)
    np.testing.assert_array_equal(a[-1], b[-1])


def test_rmsprop_first_steps_hand_computed():
    p, g = np.array([1.0]), np.array([2.0])
    lr, alpha, eps = 0.01, 0.9, 1e-8
    p1, s = ref.rmsprop(p, g, {}, learning_rate=lr, alpha=alpha, eps=eps)
    v = 0.1 * 4.0
    assert s["square_avg"][0] == pytest.approx(v, rel=1e-15)
    assert p1[0] == pytest.approx(1.0 - lr * 2.0 / (math.sqrt(v) + eps), rel=1e-15)
    # centered: v - gavg^2 = (1-a) g^2 - (1-a)^2 g^2 = a (1-a) g^2
    p1, s = ref.rmsprop(p, g, {}, learning_rate=lr, alpha=alpha, eps=eps, centered=True)
    assert s["grad_avg"][0] == pytest.approx(0.2, rel=1e-15)
    assert p1[0] == pytest.approx(1.0 - lr * 2.0 / (math.sqrt(0.9 * 0.1 * 4.0) + eps), rel=1e-14)
    # momentum: buffer starts at 0 => buf_1 = g / denom, lr applied after
    p1, s = ref.rmsprop(p, g, {}, learning_rate=lr, alpha=alpha, eps=eps, momentum=0.5)
    d = 2.0 / (math.sqrt(v) + eps)
    assert s["momentum_buffer"][0] == pytest.approx(d, rel=1e-15)
    p2, s = ref.rmsprop(p1, g, s, learning_rate=lr, alpha=alpha, eps=eps, momentum=0.5)
    v2 = 0.9 * v + 0.1 * 4.0
    assert s["momentum_buffer"][0] == pytest.approx(0.5 * d + 2.0 / (math.sqrt(v2) + eps), 1e-14)
    assert p2[0] == pytest.approx(p1[0] - lr * s["momentum_buffer"][0], rel=1e-15)


def test_run_trajectory_returns_each_step():
    gs = _grads(3)
    out = ref.run_trajectory(ref.sgd, np.zeros(7), gs, learning_rate=1.0)
    assert len(out) == 3
    np.testing.assert_allclose(out[-1], -(gs[0] + gs[1] + gs[2]), rtol=1e-15)
    out[0][0] = 123.0  # copies, not views of one buffer
    assert out[1][0] != 123.0


# ---------------------------------------------------------------------------------------------
# the optax-semantics transforms
# ---------------------------------------------------------------------------------------------


def test_scale_and_learning_rate_signs():
    u = np.array([1.0, -2.0])
    out, _ = ref.scale(3.0).update(u, ())
    np.testing.assert_array_equal(out, [3.0, -6.0])
    out, _ = ref.scale_by_learning_rate(0.5).update(u, ())
    np.testing.assert_array_equal(out, [-0.5, 1.0])
    out, _ = ref.scale_by_learning_rate(0.5, flip_sign=False).update(u, ())
    np.testing.assert_array_equal(out, [0.5, -1.0])


def test_schedule_first_update_uses_count_zero():
    tx = ref.scale_by_learning_rate(lambda c: 0.1 * (c + 1))
    state = tx.init(np.zeros(2))
    u = np.ones(2)
    outs = []
    for _ in range(3):
        out, state = tx.update(u, state)
        outs.append(out[0])
    assert outs == pytest.approx([-0.1, -0.2, -0.3], rel=1e-15)
    assert state == {"count": 3}


def test_trace_first_trace_is_g_and_dampening_after():
    tx = ref.trace(0.9, dampening=0.5)
    s = tx.init(np.zeros(1))
    u1, s = tx.update(np.array([2.0]), s)
    assert u1[0] == 2.0
    u2, s = tx.update(np.array([4.0]), s)
    assert u2[0] == pytest.approx(0.9 * 2.0 + 0.5 * 4.0, rel=1e-15)
    tx = ref.trace(0.5, nesterov=True)
    s = tx.init(np.zeros(1))
    u1, s = tx.update(np.array([1.0]), s)
    assert u1[0] == pytest.approx(1.5, rel=1e-15)


def test_clip_and_global_norm():
    out, _ = ref.clip(1.0).update(np.array([-3.0, 0.5, 2.0]), ())
    np.testing.assert_array_equal(out, [-1.0, 0.5, 1.0])
    tree = {"a": np.array([3.0]), "b": [np.array([4.0]), None]}
    assert ref.global_norm(tree) == 5.0
    assert ref.global_norm({}) == 0.0
    clipped = ref.clip_tree_by_global_norm(tree, 1.0)
    assert clipped["b"][1] is None
    coef = 1.0 / (5.0 + 1e-6)
    assert clipped["a"][0] == pytest.approx(3.0 * coef, rel=1e-15)
    assert ref.global_norm(clipped) <= 1.0
    # below the threshold: coefficient exactly 1 (the torch min(1, .) clamps)
    small = ref.clip_tree_by_global_norm(tree, 10.0)
    np.testing.assert_array_equal(small["a"], [3.0])
    # zero norm is no error
    z = ref.clip_tree_by_global_norm({"a": np.zeros(3)}, 0.0)
    np.testing.assert_array_equal(z["a"], np.zeros(3))


def test_add_decayed_weights_needs_params():
    tx = ref.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(np.ones(2), (), None)
    out, _ = tx.update(np.ones(2), (), np.array([10.0, -10.0]))
    np.testing.assert_allclose(out, [2.0, 0.0], atol=1e-15)


def test_transforms_map_over_trees_with_none():
    params = {"w": np.ones((2, 3)), "b": None, "l": [np.zeros(0), (np.array(2.0),)]}
    grads = ref.tree_map(lambda x: np.full(np.shape(x), 0.5), params)
    tx = ref.chain(ref.add_decayed_weights(0.1), ref.scale_by_adam(), ref.scale(-0.1))
    u, state = tx.update(grads, tx.init(params), params)
    assert u["b"] is None
    assert u["l"][0].shape == (0,)
    assert u["l"][1][0].shape == ()
    assert state[1]["count"] == 1
    np.testing.assert_allclose(u["w"], -0.1 * np.ones((2, 3)), rtol=1e-7)


def test_apply_updates_keeps_param_dtype():
    p = {"a": np.ones(3, np.float32), "b": None}
    out = ref.apply_updates(p, {"a": np.full(3, 0.5), "b": None})
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(out["a"], 1.5)


def test_run_transform_storage_rounding():
    p0 = np.array([1.0], np.float16)
    g = [np.array([1.0], np.float16)]
    ps, us, _ = ref.run_transform(ref.scale(-1e-4), p0, g, storage_dtype=np.float16)
    assert us[0][0] == float(np.float16(-1e-4))
    assert ps[0][0] == float(np.float16(1.0 + float(np.float16(-1e-4))))


# ---------------------------------------------------------------------------------------------
# the optimizers' chains against their torch-style rules
# ---------------------------------------------------------------------------------------------

# The rows with a torch-style rule of their own (a number for a learning rate).
RULES = [row for row in OPTIMIZERS if row.rule is not None]
HYPER_RULES = [row for row in HYPER if row.rule is not None]
HYPER_TORCH = [row for row in HYPER if row.torch is not None]


def _assert_transform_equals_rule(row: Optimizer, hp: dict, steps: int, rtol: float) -> None:
    p0, gs = _p0((11,)), _grads(steps, (11,))
    want = ref.run_trajectory(row.reference_rule(), p0, gs, **row.full(hp))
    got, _, _ = ref.run_transform(row.make_reference(hp), p0, gs)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol / 100, err_msg=f"step {k}")


@pytest.mark.parametrize("row", RULES, ids=ids(RULES))
def test_functional_chain_equals_torch_rule(row: Optimizer):
    """The optax-form chains reproduce the torch for-loops (constant lr) in float64."""
    _assert_transform_equals_rule(row, row.kwargs, steps=25, rtol=1e-11)


@pytest.mark.parametrize("row", HYPER_RULES, ids=ids(HYPER_RULES))
@given(data=st.data())
def test_functional_chain_equals_torch_rule_property(row: Optimizer, data):
    hp = data.draw(row.hyper(st), label="hyperparameters")
    _assert_transform_equals_rule(row, hp, steps=6, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# torch parity (float64, rtol 1e-10)
# ---------------------------------------------------------------------------------------------


def _assert_rule_matches_torch(row: Optimizer, hp: dict, steps: int) -> None:
    """Params every step, then every state buffer torch keeps (a rule of the row's own keeps
    them all under torch's names) and the step count."""
    torch = pytest.importorskip("torch")
    shape = (4, 5)
    p0, gs = _p0(shape, seed=3), _grads(steps, shape, seed=4)
    tp = torch.tensor(p0, dtype=torch.float64, requires_grad=True)
    opt = row.make_torch(torch, [tp], hp, foreach=False)
    rule, full = row.reference_rule(), row.full(hp)
    p, state = p0, {}
    for k, g in enumerate(gs):
        tp.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        p, state = rule(p, g, state, **full)
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-14, err_msg=f"{k}")
    want_state = opt.state[tp]
    buffers = set(want_state) - {"step"}
    if row.rule is not None:
        assert buffers <= set(state), f"torch keeps {buffers}, the rule {set(state)}"
    for key in buffers & set(state):
        np.testing.assert_allclose(
            state[key], want_state[key].numpy(), rtol=1e-10, atol=1e-14, err_msg=key
        )
    if "step" in want_state and "step" in state:
        assert state["step"] == int(want_state["step"])


@pytest.mark.parametrize("row", TORCH, ids=ids(TORCH))
def test_torch_style_reference_matches_torch(row: Optimizer):
    _assert_rule_matches_torch(row, row.kwargs, steps=30)


@pytest.mark.parametrize("row", HYPER_TORCH, ids=ids(HYPER_TORCH))
@given(data=st.data())
def test_torch_style_reference_matches_torch_property(row: Optimizer, data):
    _assert_rule_matches_torch(row, data.draw(row.hyper(st), label="hyperparameters"), steps=8)


# ---------------------------------------------------------------------------------------------
# optax parity (float64) where optax's semantics coincide
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def optax_x64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield optax
    jax.config.update("jax_enable_x64", old)


def _run_optax(optax_tx, params, grads_seq):
    import jax.numpy as jnp

    p = ref.tree_map(jnp.asarray, params)
    state = optax_tx.init(p)
    out_u, out_p = [], []
    for g in grads_seq:
        u, state = optax_tx.update(ref.tree_map(jnp.asarray, g), state, p)
        p = ref.tree_map(lambda a, b: a + b, p, u)
        out_u.append(ref.tree_map(np.asarray, u))
        out_p.append(ref.tree_map(np.asarray, p))
    return out_p, out_u


def _optax_pairs(optax):
    """(id, optax transform, reference transform) of building blocks where the two definitions
    coincide (the optimizers: their rows' optax oracles)."""
    sched = lambda c: 0.1 / (1.0 + c)  # noqa: E731
    return [
        ("scale", optax.scale(-0.3), ref.scale(-0.3)),
        ("scale_by_learning_rate", optax.scale_by_learning_rate(0.05),
         ref.scale_by_learning_rate(0.05)),
        ("scale_by_learning_rate-schedule", optax.scale_by_learning_rate(sched),
         ref.scale_by_learning_rate(sched)),
        ("scale_by_schedule", optax.scale_by_schedule(sched), ref.scale_by_schedule(sched)),
        ("trace", optax.trace(0.9), ref.trace(0.9)),
        ("trace-nesterov", optax.trace(0.8, nesterov=True), ref.trace(0.8, nesterov=True)),
        ("scale_by_adam", optax.scale_by_adam(0.9, 0.999, 1e-8),
         ref.scale_by_adam(0.9, 0.999, 1e-8)),
        ("scale_by_adam-eps_root", optax.scale_by_adam(0.8, 0.9, 1e-4, eps_root=1e-6),
         ref.scale_by_adam(0.8, 0.9, 1e-4, eps_root=1e-6)),
        ("scale_by_rms", optax.scale_by_rms(0.95, 1e-6, eps_in_sqrt=False),
         ref.scale_by_rms(0.95, 1e-6)),
        ("scale_by_rms-centered", optax.scale_by_stddev(0.9, 1e-8, eps_in_sqrt=False),
         ref.scale_by_rms(0.9, 1e-8, centered=True)),
        ("add_decayed_weights", optax.add_decayed_weights(0.1), ref.add_decayed_weights(0.1)),
        ("clip", optax.clip(0.5), ref.clip(0.5)),
    ]  # fmt: skip


_OPTAX_IDS = [
    "scale", "scale_by_learning_rate", "scale_by_learning_rate-schedule", "scale_by_schedule",
    "trace", "trace-nesterov", "scale_by_adam", "scale_by_adam-eps_root", "scale_by_rms",
    "scale_by_rms-centered", "add_decayed_weights", "clip",
]  # fmt: skip


@pytest.mark.parametrize("case_id", _OPTAX_IDS)
def test_reference_transform_matches_optax(optax_x64, case_id):
    pairs = {c[0]: c[1:] for c in _optax_pairs(optax_x64)}
    assert set(pairs) == set(_OPTAX_IDS)
    _assert_matches_optax(*pairs[case_id])


@pytest.mark.parametrize("row", OPTAX, ids=ids(OPTAX))
def test_reference_optimizer_matches_optax(optax_x64, row: Optimizer):
    _assert_matches_optax(row.make_optax(optax_x64), row.make_reference())


def _assert_matches_optax(otx, rtx) -> None:
    params = {"w": _p0((3, 4), seed=5), "b": [_p0((2,), seed=6), None]}
    grads = [
        ref.tree_map(lambda x, k=k: np.random.default_rng(k).standard_normal(x.shape), params)
        for k in range(15)
    ]
    want_p, want_u = _run_optax(otx, params, grads)
    got_p, got_u, _ = ref.run_transform(rtx, params, grads)
    for k in range(len(grads)):
        for a, b in zip(ref.tree_leaves(got_u[k]), ref.tree_leaves(want_u[k]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"update {k}")
        for a, b in zip(ref.tree_leaves(got_p[k]), ref.tree_leaves(want_p[k]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"params {k}")


@pytest.mark.parametrize("scale_", [0.01, 0.5, 100.0])
def test_clip_by_global_norm_close_to_optax(optax_x64, scale_):
    """optax has no +1e-6 in the coefficient: agree to ~1e-6/norm, exactly when not clipping."""
    import jax.numpy as jnp

    tree = {"a": _p0((5,), seed=7) * scale_, "b": [_p0((3, 2), seed=8) * scale_]}
    max_norm = 1.0
    want, _ = optax_x64.clip_by_global_norm(max_norm).update(ref.tree_map(jnp.asarray, tree), ())
    got = ref.clip_tree_by_global_norm(tree, max_norm)
    norm = ref.global_norm(tree)
    rtol = 1e-14 if norm + 1e-6 < max_norm else 2e-6 / norm
    for a, b in zip(ref.tree_leaves(got), ref.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, np.asarray(b), rtol=rtol)
