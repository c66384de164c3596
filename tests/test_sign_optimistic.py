"""optax parity of the building blocks of the sign and optimistic families: ``ema`` (with and
without ``debias``), ``scale_by_sign`` and ``scale_by_optimistic_gradient``. The float64
references against optax in float64, and the device (float32) against optax in float32."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import netcl_optim as no

# (id, netcl / optax factory name, kwargs, reference)
BLOCKS = [
    ("ema", "ema", {"decay": 0.9}, ref.ema),
    ("ema-no_debias", "ema", {"decay": 0.5, "debias": False}, ref.ema),
    ("ema-zero_decay", "ema", {"decay": 0.0}, ref.ema),
    ("scale_by_sign", "scale_by_sign", {}, ref.scale_by_sign),
    ("scale_by_optimistic_gradient", "scale_by_optimistic_gradient", {},
     ref.scale_by_optimistic_gradient),
    ("scale_by_optimistic_gradient-custom", "scale_by_optimistic_gradient",
     {"alpha": 0.5, "beta": 2.0}, ref.scale_by_optimistic_gradient),
]  # fmt: skip
IDS = [b[0] for b in BLOCKS]


def _problem(steps: int = 20, seed: int = 3):
    rng = np.random.default_rng(seed)
    p0 = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    grads = [ref.tree_map(lambda x: rng.standard_normal(x.shape), p0) for _ in range(steps)]
    return p0, grads


def _optax_updates(otx, p0, grads, dtype):
    import jax.numpy as jnp

    p = {k: jnp.asarray(v, dtype) for k, v in p0.items()}
    state, out = otx.init(p), []
    for g in grads:
        u, state = otx.update({k: jnp.asarray(v, dtype) for k, v in g.items()}, state, p)
        out.append({k: np.asarray(v) for k, v in u.items()})
    return out, state


@pytest.fixture(scope="module")
def optax_x64():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield optax
    jax.config.update("jax_enable_x64", old)


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_reference_matches_optax_float64(optax_x64, block):
    _, name, kwargs, reference = block
    p0, grads = _problem()
    want, _ = _optax_updates(getattr(optax_x64, name)(**kwargs), p0, grads, np.float64)
    rtx = reference(**kwargs)
    state = rtx.init(p0)
    for k, g in enumerate(grads):
        got, state = rtx.update(g, state, p0)
        for key in p0:
            np.testing.assert_allclose(
                got[key], want[k][key], rtol=1e-12, atol=1e-15, err_msg=f"{key} at {k}"
            )


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_device_matches_optax_float32(cl_queue, block):
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    _, name, kwargs, _ = block
    p0, grads = _problem()
    p0 = {k: v.astype(np.float32) for k, v in p0.items()}
    grads = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads]
    want, ostate = _optax_updates(getattr(optax, name)(**kwargs), p0, grads, np.float32)
    tx = getattr(no, name)(**kwargs)
    params = no.to_device(p0, cl_queue)
    state = tx.init(params)
    for k, g in enumerate(grads):
        u, state = tx.update(no.to_device(g, cl_queue), state, params)
        got = no.to_host(u)
        for key in p0:
            assert got[key].dtype == np.float32
            np.testing.assert_allclose(
                got[key], want[k][key], rtol=2e-6, atol=1e-7, err_msg=f"{key} at {k}"
            )
    if name == "ema":  # optax's EmaState, field for field
        assert type(state).__name__ == "EmaState" and state._fields == ("count", "ema")
        assert state.count == int(ostate.count) == len(grads)
        for key in p0:
            np.testing.assert_allclose(
                no.to_host(state.ema)[key], np.asarray(ostate.ema[key]), rtol=2e-6, atol=1e-7
            )


def test_optimistic_first_step_is_alpha_g(cl_queue):
    """optax#1082: the previous gradient is the current one at the first step."""
    g = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    tx = no.scale_by_optimistic_gradient(alpha=0.25, beta=3.0)
    state = tx.init(no.to_device({"w": np.zeros(3, np.float32)}, cl_queue))
    assert state.is_initial_step
    u, state = tx.update(no.to_device(g, cl_queue), state)
    np.testing.assert_array_equal(no.to_host(u)["w"], 0.25 * g["w"])
    assert not state.is_initial_step


def test_sign_keeps_nan_and_signed_zero(cl_queue):
    g = {"w": np.array([np.nan, -0.0, 0.0, -3.0, 2.5e-38], np.float32)}
    u, _ = no.scale_by_sign().update(no.to_device(g, cl_queue), no.EmptyState())
    got = no.to_host(u)["w"]
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [-0.0, 0.0, -1.0, 1.0])
    assert np.signbit(got[1]) and not np.signbit(got[2])


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        ("ema", {"decay": 1.0}, "decay"),
        ("ema", {"decay": 0.9, "accumulator_dtype": np.float16}, "accumulator_dtype"),
        ("signum", {"learning_rate": 1e-3, "beta": -0.1}, "beta"),
        ("sign_sgd", {"learning_rate": -1.0}, "learning_rate"),
        ("optimistic_gradient_descent", {"learning_rate": 0.1, "alpha": float("nan")}, "alpha"),
        ("optimistic_adam_v2", {"learning_rate": 0.1, "b2": 1.0}, "b2"),
        ("optimistic_adam_v2", {"learning_rate": 0.1, "mu_dtype": np.int8}, "mu_dtype"),
    ],
)
def test_invalid_hyperparameters(factory, kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: "):
        getattr(no, factory)(**kwargs)


@pytest.mark.parametrize(
    ("factory", "kwargs"),
    [
        ("sign_sgd", {"learning_rate": 0.1}),
        ("signum", {"learning_rate": 0.1, "beta": 0.5}),
        ("optimistic_gradient_descent", {"learning_rate": 0.1, "alpha": 0.5, "beta": 2.0}),
        ("optimistic_adam_v2", {"learning_rate": 0.1}),
    ],
)
def test_maximize_negates_every_update(cl_queue, factory, kwargs):
    """Each rule is odd in the gradient, so ascent's updates are descent's, negated."""
    p0, grads = _problem(steps=3)
    params = no.to_device({k: v.astype(np.float32) for k, v in p0.items()}, cl_queue)
    down, up = getattr(no, factory)(**kwargs), getattr(no, factory)(**kwargs, maximize=True)
    s_down, s_up = down.init(params), up.init(params)
    for g in grads:
        g = no.to_device({k: v.astype(np.float32) for k, v in g.items()}, cl_queue)
        u_down, s_down = down.update(g, s_down, params)
        u_up, s_up = up.update(g, s_up, params)
        for key in p0:
            np.testing.assert_array_equal(no.to_host(u_up)[key], -no.to_host(u_down)[key])
