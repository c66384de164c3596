"""SM3 (netcl_optim/optimizers/sm3.py, fusion/_sm3.py) against the float64 reference
(tests/reference_reductions.py) and optax 0.2.8; packed and separate leaves, in place and pure
give the same bits; constant launch counts; state errors name the leaf."""

from __future__ import annotations

import numpy as np
import pytest
import reference_reductions as rr

import netcl_optim as no
from netcl_optim._device import state_dtype
from netcl_optim.fusion import count_launches
from netcl_optim.fusion._sm3 import CHUNK, ROWS
from netcl_optim.optimizers.sm3 import ScaleBySM3State, scale_by_sm3, sm3

SHAPES = {
    "w": (6, 4),
    "wide": (3, 130),
    "v": (5,),
    "s": (),
    "t3": (2, 3, 4),
    "t4": (2, 3, 4, 5),
}
# rows longer than a chunk, more rows than a block of the column launch
BIG = {**SHAPES, "long": (2, CHUNK + 7), "tall": (ROWS + 9, 3), "vec": (CHUNK * 2 + 1,)}
STEPS = 12
TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-10, 1e-13), np.float16: (2e-3, 1e-3)}


def _has_fp64(queue) -> bool:
    return "cl_khr_fp64" in queue.device.extensions or queue.device.double_fp_config != 0


def _problem(shapes, seed, steps=STEPS):
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [
        {k: (0.5 + rng.random()) * rng.standard_normal(s) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    return params, grads


def _cast(tree, dtype):
    return {k: np.asarray(v, dtype) for k, v in tree.items()}


def _get(tree):
    return {k: v.get() for k, v in tree.items()}


def _bits(state: ScaleBySM3State) -> list[bytes]:
    mu = [a.get().tobytes() for k in sorted(state.mu) for a in state.mu[k]]
    return mu + [state.nu[k].get().tobytes() for k in sorted(state.nu)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("b1, b2", [(0.9, 1.0), (0.5, 0.95)])
@pytest.mark.parametrize("shapes", [SHAPES, BIG], ids=["mixed", "big"])
def test_matches_the_float64_reference(cl_queue, dtype, b1, b2, shapes):
    if dtype == np.float64 and not _has_fp64(cl_queue):
        pytest.skip("no fp64 on this device")
    params, grads = _problem(shapes, seed=1)
    tx, ref = scale_by_sm3(b1, b2), rr.scale_by_sm3(b1, b2)
    p = no.pack(no.to_device(_cast(params, dtype), cl_queue))
    state, ref_state = tx.init(p), ref.init(params)
    rtol, atol = TOL[dtype]
    for g in grads:
        g = _cast(g, dtype)  # the reference sees the same (rounded) gradients
        u, state = tx.update(no.pack(no.to_device(g, cl_queue)), state, p)
        want, ref_state = ref.update(_cast(g, np.float64), ref_state)
        for k in shapes:
            assert u[k].dtype == dtype and state.nu[k].dtype == state_dtype(dtype)
            np.testing.assert_allclose(u[k].get(), want[k], rtol=rtol, atol=atol, err_msg=k)
            np.testing.assert_allclose(
                state.nu[k].get(), ref_state["nu"][k], rtol=rtol, atol=atol, err_msg=k
            )
            assert len(state.mu[k]) == len(ref_state["mu"][k])
            for a, b in zip(state.mu[k], ref_state["mu"][k], strict=True):
                assert a.shape == b.shape and a.dtype == state_dtype(dtype)
                np.testing.assert_allclose(a.get(), b, rtol=rtol, atol=atol, err_msg=k)


def test_empty_leaves(cl_queue):
    """A leaf with no elements: no update, its accumulators stay 0 (the max of nothing);
    the other leaves step as without it."""
    shapes = {"w": (6, 4), "z": (0, 3), "e": (0,), "y": (2, 0, 3)}
    params, grads = _problem(shapes, seed=9, steps=2)
    tx = scale_by_sm3()
    p = no.pack(no.to_device(_cast(params, np.float32), cl_queue))
    state = tx.init(p)
    ref, ref_state = rr.scale_by_sm3(), rr.scale_by_sm3().init({"w": params["w"]})
    for g in grads:
        u, state = tx.update(no.pack(no.to_device(_cast(g, np.float32), cl_queue)), state, p)
        want, ref_state = ref.update({"w": np.float64(np.float32(g["w"]))}, ref_state)
        np.testing.assert_allclose(u["w"].get(), want["w"], rtol=1e-5, atol=1e-6)
    assert [u[k].shape for k in shapes] == list(shapes.values())
    assert [a.shape for a in state.mu["y"]] == [(2,), (0,), (3,)]
    assert not any(a.get().any() for k in ("z", "e", "y") for a in state.mu[k])


def test_state_layout(cl_queue):
    p = no.pack(no.to_device(_cast(_problem(SHAPES, 2)[0], np.float32), cl_queue))
    state = scale_by_sm3().init(p)
    assert [a.shape for a in state.mu["t3"]] == [(2,), (3,), (4,)]
    assert [a.shape for a in state.mu["v"]] == [(5,)] and state.mu["s"][0].shape == ()
    mu = [a for k in SHAPES for a in state.mu[k]]
    assert len({id(a.base_data) for a in mu}) == 1  # one buffer for the dtype group
    assert all(a.dtype == np.float32 and not a.get().any() for a in mu)
    assert len({id(state.nu[k].base_data) for k in SHAPES}) == 1


def _separate(tree):
    """The same values, each leaf in its own buffer."""
    return {k: v.copy() for k, v in tree.items()}


def _separate_state(state: ScaleBySM3State) -> ScaleBySM3State:
    return ScaleBySM3State(
        {k: [a.copy() for a in m] for k, m in state.mu.items()}, _separate(state.nu)
    )


def test_packed_and_separate_give_the_same_bits(cl_queue):
    params, grads = _problem(BIG, seed=3, steps=5)
    tx = scale_by_sm3(0.9, 0.95)
    p = no.pack(no.to_device(_cast(params, np.float32), cl_queue))
    packed = tx.init(p)
    separate = _separate_state(packed)
    for g in grads:
        gd = no.pack(no.to_device(_cast(g, np.float32), cl_queue))
        u1, packed = tx.update(gd, packed, p)
        u2, separate = tx.update(_separate(gd), separate, p)
        assert [u1[k].get().tobytes() for k in BIG] == [u2[k].get().tobytes() for k in BIG]
    assert _bits(packed) == _bits(separate)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_in_place_and_pure_give_the_same_bits(cl_queue, packed):
    params, grads = _problem(BIG, seed=4, steps=4)
    tx = scale_by_sm3(0.8, 0.9)
    p = no.pack(no.to_device(_cast(params, np.float32), cl_queue))
    pure = tx.init(p)
    inplace = _separate_state(pure)
    if packed:
        inplace = tx.init(p)
    arrays = [id(a) for k in BIG for a in (*inplace.mu[k], inplace.nu[k])]
    run = tx.plan.run
    for g in grads:
        gd = no.pack(no.to_device(_cast(g, np.float32), cl_queue))
        before = _bits(pure)
        u1, pure_new = tx.update(gd, pure, p)
        assert _bits(pure) == before  # the pure step modifies none of its inputs
        pure = pure_new
        u2, new = run(gd, inplace, p, inplace=True)
        assert [id(a) for k in BIG for a in (*new.mu[k], new.nu[k])] == arrays
        inplace = new
        assert [u1[k].get().tobytes() for k in BIG] == [u2[k].get().tobytes() for k in BIG]
        assert _bits(pure) == _bits(inplace)


def test_donated_step_matches_the_pure_one(cl_queue):
    params, grads = _problem(SHAPES, seed=5, steps=4)
    tx = sm3(0.05)
    results = []
    for donate in (False, True):
        p = no.pack(no.to_device(_cast(params, np.float32), cl_queue))
        state = tx.init(p)
        for g in grads:
            p, state = no.step(
                tx, p, no.pack(no.to_device(_cast(g, np.float32), cl_queue)), state, donate=donate
            )
        results.append([p[k].get().tobytes() for k in SHAPES])
    assert results[0] == results[1]


def test_mixed_dtypes(cl_queue):
    params, grads = _problem(SHAPES, seed=6, steps=3)
    dtypes = {k: (np.float16 if i % 2 else np.float32) for i, k in enumerate(SHAPES)}
    tx, ref = scale_by_sm3(), rr.scale_by_sm3()
    host = {k: np.asarray(v, dtypes[k]) for k, v in params.items()}
    p = no.pack(no.to_device(host, cl_queue))
    state, ref_state = tx.init(p), ref.init(params)
    for g in grads:
        g = {k: np.asarray(v, dtypes[k]) for k, v in g.items()}
        u, state = tx.update(no.pack(no.to_device(g, cl_queue)), state, p)
        want, ref_state = ref.update(_cast(g, np.float64), ref_state)
        for k in SHAPES:
            assert u[k].dtype == dtypes[k]
            rtol, atol = TOL[dtypes[k]]
            np.testing.assert_allclose(u[k].get(), want[k], rtol=rtol, atol=atol, err_msg=k)


def test_sm3_matches_optax(cl_queue):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    shapes = {k: s for k, s in BIG.items() if s != () and 0 not in s}  # optax raises on 0-d
    params, grads = _problem(shapes, seed=7, steps=10)
    fp64 = _has_fp64(cl_queue)
    dtype = np.float64 if fp64 else np.float32
    rtol, atol = TOL[dtype]
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", fp64)
    try:
        for momentum in (0.9, 0.0):
            oracle = optax.sm3(0.05, momentum=momentum)
            jp = {k: jnp.asarray(v, dtype) for k, v in params.items()}
            ostate = oracle.init(jp)
            tx = sm3(0.05, momentum=momentum)
            p = no.pack(no.to_device(_cast(params, dtype), cl_queue))
            state = tx.init(p)
            for g in grads:
                upd, ostate = oracle.update({k: jnp.asarray(v, dtype) for k, v in g.items()},
                                            ostate, jp)  # fmt: skip
                jp = optax.apply_updates(jp, upd)
                p, state = no.step(tx, p, no.pack(no.to_device(_cast(g, dtype), cl_queue)), state)
            for k in shapes:
                np.testing.assert_allclose(p[k].get(), np.asarray(jp[k]), rtol=rtol, atol=atol)
    finally:
        jax.config.update("jax_enable_x64", old)


def test_launches_do_not_grow_with_the_number_of_leaves(cl_queue):
    counts = []
    for n_leaves in (40, 160):
        rng = np.random.default_rng(n_leaves)
        pool = [(int(rng.integers(1, 300)),), (), tuple(int(n) for n in rng.integers(1, 40, 2)),
                tuple(int(n) for n in rng.integers(1, 9, 3))]  # fmt: skip
        shapes = {f"l{i}": pool[i % 4] for i in range(n_leaves)}
        params, grads = _problem(shapes, seed=n_leaves, steps=2)
        for tx in (scale_by_sm3(), sm3(0.1)):
            p = no.pack(no.to_device(_cast(params, np.float32), cl_queue))
            state = tx.init(p)
            gd = no.pack(no.to_device(_cast(grads[0], np.float32), cl_queue))
            _, state = tx.update(gd, state, p)
            with count_launches() as c:
                tx.update(gd, state, p)
            counts.append(c.launches)
    assert counts[0] == counts[2] and counts[1] == counts[3], counts
    assert counts[0] == 3, counts  # rows, cols, finish


def _state_for(queue):
    p = no.pack(no.to_device(_cast(_problem(SHAPES, 8)[0], np.float32), queue))
    return p, scale_by_sm3().init(p)


def test_bad_state_raises_naming_the_leaf(cl_queue):
    tx = scale_by_sm3()
    p, state = _state_for(cl_queue)
    g = p
    bad_shape = {**state.mu, "t3": [state.mu["t3"][0], state.mu["t3"][0], state.mu["t3"][2]]}
    with pytest.raises(ValueError, match=r"root\['t3'\].*state.mu\[1\] has shape"):
        tx.update(g, state._replace(mu=bad_shape), p)
    too_few = {**state.mu, "w": state.mu["w"][:1]}
    with pytest.raises(ValueError, match=r"root\['w'\].*list of 2 arrays"):
        tx.update(g, state._replace(mu=too_few), p)
    f16 = {**state.nu, "v": no.to_device(np.zeros(5, np.float16), cl_queue)}
    with pytest.raises(TypeError, match=r"root\['v'\].*state.nu has dtype float16"):
        tx.update(g, state._replace(nu=f16), p)
    host = {**state.mu, "s": [np.zeros(())]}
    with pytest.raises(TypeError, match=r"root\['s'\].*state.mu\[0\] is a ndarray"):
        tx.update(g, state._replace(mu=host), p)
    with pytest.raises(ValueError, match=r"state\.nu has a different tree structure"):
        tx.update(g, state._replace(nu={"w": state.nu["w"]}), p)
    with pytest.raises(ValueError, match="ScaleBySM3State"):
        tx.update(g, (state.mu, state.nu), p)
    with pytest.raises(ValueError, match="ScaleBySM3State"):  # the chain's state check
        no.step(sm3(0.1), p, g, (no.EmptyState(), no.EmptyState()))
    with pytest.raises(TypeError, match=r"root\['v'\] of updates"):
        tx.update({**g, "v": np.zeros(5, np.float32)}, state, p)


def test_other_context_raises(cl_queue):
    import pyopencl as cl

    tx = scale_by_sm3()
    p, state = _state_for(cl_queue)
    other = cl.CommandQueue(cl.Context([cl_queue.device]))
    moved = {**state.nu, "w": no.to_device(state.nu["w"].get(), other)}
    with pytest.raises(ValueError, match=r"root\['w'\].*another OpenCL context"):
        tx.update(p, state._replace(nu=moved), p)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError):
        scale_by_sm3(b1=1.5)
    with pytest.raises(ValueError):
        scale_by_sm3(b2=-0.1)
    with pytest.raises(ValueError):
        scale_by_sm3(eps=-1.0)
