"""snapshot, monitor, measure_with_ema (optax's) and the per-leaf measures leaf_norms and
update_param_ratio: device values, no host read, the updates untouched."""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla
import pytest

import netcl_optim as no

SHAPES = {"w": (6, 4), "b": (7,), "s": (), "e": (0,), "big": (3, 5000)}


def _tree(seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_leaf_norms(cl_queue, dtype, packed):
    host = _tree(0, dtype)
    dev = no.to_device(host, cl_queue)
    if packed:
        dev = no.pack(dev)
    got = no.leaf_norms(dev)
    rtol = 1e-12 if dtype == np.float64 else 1e-6  # float32 squares, added in blocks
    for k, x in host.items():
        assert got[k].shape == ()
        np.testing.assert_allclose(got[k].get(), np.linalg.norm(x.astype(np.float64)), rtol=rtol)


def test_snapshot_keeps_the_measure_and_passes_the_updates(cl_queue):
    params, grads = no.to_device(_tree(1), cl_queue), no.to_device(_tree(2), cl_queue)
    tx = no.snapshot("norms", no.leaf_norms)
    state = tx.init(params)
    np.testing.assert_allclose(state.measurements["norms"]["w"].get(),
                               np.linalg.norm(params["w"].get()), rtol=1e-6)  # fmt: skip
    u, state = tx.update(grads, state, params)
    assert u is grads
    np.testing.assert_allclose(state.measurements["norms"]["big"].get(),
                               np.linalg.norm(grads["big"].get()), rtol=1e-6)  # fmt: skip


def test_monitor_matches_optax_and_reads_nothing_back(cl_queue, monkeypatch):
    optax = pytest.importorskip("optax")
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    host_p = _tree(3)
    grads = [_tree(4 + k) for k in range(3)]
    tx = no.chain(
        no.monitor({
            "norms": no.leaf_norms,
            "global": no.global_norm,
            "ratio": no.update_param_ratio(),
            "ema": no.measure_with_ema(no.leaf_norms, 0.9),
        }),
        no.sgd(0.1),
    )  # fmt: skip
    otx = optax.chain(
        optax.monitor({"ema": optax.measure_with_ema(
            lambda u: jax.tree.map(lambda x: jnp.linalg.norm(x.astype(jnp.float32)), u), 0.9)}),
        optax.sgd(0.1),
    )  # fmt: skip
    params = no.pack(no.to_device(host_p, cl_queue))
    state = tx.init(params)
    op = {k: jnp.asarray(v) for k, v in host_p.items()}
    ost = otx.init(op)
    for g in grads:
        gd = no.pack(no.to_device(g, cl_queue))
        before = no.to_host(params)
        with monkeypatch.context() as m:  # the step reads nothing back
            m.setattr(cla.Array, "get", lambda *a, **k: pytest.fail("host read"))
            params, state = no.step(tx, params, gd, state)
        u, ost = otx.update({k: jnp.asarray(v) for k, v in g.items()}, ost, op)
        op = optax.apply_updates(op, u)
        got = state[0].measurements
        for k in SHAPES:
            np.testing.assert_allclose(got["norms"][k].get(), np.linalg.norm(g[k]), rtol=1e-6)
            pn = np.linalg.norm(before[k].astype(np.float64))
            want = np.linalg.norm(g[k].astype(np.float64)) / pn if pn > 0 else 0.0
            np.testing.assert_allclose(got["ratio"][k].get(), want, rtol=1e-6)
        total = sum(np.sum(x.astype(np.float64) ** 2) for x in g.values())
        np.testing.assert_allclose(got["global"].get(), np.sqrt(total), rtol=1e-6)
    want_ema = ost[0].measurements["ema"]
    for k in SHAPES:
        np.testing.assert_allclose(got["ema"][k].get(), np.asarray(want_ema[k]), rtol=1e-6)
    for k in SHAPES:  # the monitor passed the updates through: sgd's step
        np.testing.assert_allclose(params[k].get(), np.asarray(op[k]), rtol=1e-6, atol=1e-7)


def test_bad_measures_are_refused():
    with pytest.raises(TypeError, match="measures"):
        no.monitor([no.leaf_norms])
    with pytest.raises(TypeError, match="not a callable"):
        no.monitor({"x": 3})
    with pytest.raises(TypeError, match="measure_name"):
        no.snapshot(3, no.leaf_norms)
    with pytest.raises(ValueError, match="needs params"):
        no.update_param_ratio().update({}, None)


def test_a_foreign_state_is_refused(cl_queue):
    params = no.to_device(_tree(7), cl_queue)
    with pytest.raises(ValueError, match="SnapshotState"):
        no.snapshot("n", no.leaf_norms).update(params, no.EmptyState())
    mon = no.monitor({"n": no.leaf_norms, "r": no.update_param_ratio()})
    with pytest.raises(ValueError, match="MonitorState"):
        mon.update(params, no.EmptyState(), params)
    other = no.monitor({"n": no.leaf_norms}).init(params)
    with pytest.raises(ValueError, match="2 measures"):
        mon.update(params, other, params)
