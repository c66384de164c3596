"""NoisySGD and add_noise: the counter-based generator (Philox-4x32-10 against Random123's
known answers, the device against the numpy reference), optax parity of the deterministic
part, the noise's statistics, reproducibility, the element index across launches and shards,
and the stateful class's own keywords. The table rows (optimizer_table.py) cover the rest."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from test_distributed import FakeComm

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim.stateful import Parameter

# Random123's kat_vectors for philox4x32_10: counter, key, output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def _host(shapes: dict, dtype, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


SHAPES = {"a": (7, 5), "b": (13,), "c": (2, 3, 4), "d": ()}


def _noise(queue, host: dict, t: int, seed: int) -> dict:
    """The device's standard normals of step ``t`` (add_noise with eta 1, gamma 0, on zeros)."""
    zeros = no.to_device({k: np.zeros_like(v) for k, v in host.items()}, queue)
    tx = no.add_noise(1.0, 0.0, seed)
    u, _ = tx.update(zeros, tx.init(zeros)._replace(count=t - 1))
    return no.to_host(u)


@pytest.mark.parametrize("counter, key, want", KAT)
def test_reference_philox_matches_random123_known_answers(counter, key, want):
    got = ref.philox4x32_10(counter, key)
    assert tuple(int(x) for x in got) == want


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_device_noise_is_the_reference_generator(cl_queue, dtype, rtol):
    """Same Philox words, same Box-Muller: float from 24-bit uniforms, double from 53-bit."""
    host = _host(SHAPES, dtype)
    for t, seed in [(1, 0), (3, 2**63 + 5), (2**20 + 1, 12345)]:
        got = _noise(cl_queue, host, t, seed)
        want = ref.noise_of(host, t, seed, np.dtype(dtype))
        for k in host:
            np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol)


def test_mixed_tree_numbers_each_dtype_on_its_own(cl_queue):
    host = {"a": np.zeros(6, np.float32), "h": np.zeros(5, np.float16), "b": np.zeros(4)}
    host["c"] = np.zeros(3, np.float32)
    got = _noise(cl_queue, host, 2, 9)
    want = ref.noise_of(host, 2, 9, {k: v.dtype for k, v in host.items()})
    for k, tol in [("a", 2e-6), ("c", 2e-6), ("b", 1e-13), ("h", 2e-3)]:
        np.testing.assert_allclose(got[k].astype(np.float64), want[k], rtol=tol, atol=tol)
    # "c" continues float32's numbering after "a" (6 elements), not after "h" or "b"
    alone = _noise(cl_queue, {"x": np.zeros(9, np.float32)}, 2, 9)["x"]
    assert alone[6:].tobytes() == got["c"].tobytes()


def test_eta_zero_matches_optax(cl_queue):
    """With eta = 0 the rule is optax's noisy_sgd exactly (30 steps, float32)."""
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    host = _host(SHAPES, np.float32, 1)
    grads = [_host(SHAPES, np.float32, 10 + i) for i in range(30)]
    otx = optax.noisy_sgd(0.05, eta=0.0, gamma=0.55, key=3)
    op = {k: jnp.asarray(v) for k, v in host.items()}
    os_ = otx.init(op)
    tx = no.noisy_sgd(0.05, eta=0.0, gamma=0.55, key=3)
    p = no.to_device(host, cl_queue)
    s = tx.init(p)
    for g in grads:
        u, os_ = otx.update({k: jnp.asarray(v) for k, v in g.items()}, os_, op)
        op = optax.apply_updates(op, u)
        p, s = no.step(tx, p, no.to_device(g, cl_queue), s)
    got = no.to_host(p)
    for k in host:
        np.testing.assert_allclose(got[k], np.asarray(op[k]), rtol=1e-6, atol=1e-7)
    assert s[0].count == int(os_[0].count) == 30


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("t", [1, 7])
def test_noise_statistics(cl_queue, dtype, t):
    """Over 2^20 elements, the noise's mean and variance are 0 and eta / t^gamma within
    6 standard errors; its tails are a normal's."""
    n, eta, gamma = 1 << 20, 0.04, 0.55
    zeros = no.to_device({"w": np.zeros(n, dtype)}, cl_queue)
    tx = no.add_noise(eta, gamma, key=77)
    state = tx.init(zeros)._replace(count=t - 1)
    u, new = tx.update(zeros, state)
    assert new.count == t
    x = no.to_host(u)["w"].astype(np.float64)
    var = eta / t**gamma
    assert abs(x.mean()) <= 6 * math.sqrt(var / n)
    assert abs(x.var() / var - 1) <= 6 * math.sqrt(2 / n)
    z = x / math.sqrt(var)
    assert abs(np.mean(np.abs(z) > 2) - 0.0455) <= 6 * math.sqrt(0.0455 / n)
    assert abs(np.mean(z**4) - 3) <= 6 * math.sqrt(96 / n)
    # neighbouring elements and steps are uncorrelated
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) <= 6 / math.sqrt(n)
    u2, _ = tx.update(zeros, state._replace(count=t))
    z2 = no.to_host(u2)["w"].astype(np.float64)
    assert abs(np.corrcoef(z, z2)[0, 1]) <= 6 / math.sqrt(n)


def test_same_seed_same_bits_other_seed_other_bits(cl_queue):
    host = _host(SHAPES, np.float32)
    a, b, c = (_noise(cl_queue, host, 1, s) for s in (5, 5, 6))
    d = _noise(cl_queue, host, 2, 5)
    for k in ["a", "b", "c"]:
        assert a[k].tobytes() == b[k].tobytes()
        assert not np.any(a[k] == c[k]) and not np.any(a[k] == d[k])


def test_packed_per_leaf_and_sharded_draw_the_same_bits(cl_queue):
    """The element index is the position in the dtype's packed layout: one launch over a
    packed tree, one per leaf, and each rank's slice (its origin passed down) agree."""
    host = _host(SHAPES, np.float32, 3)
    grads = _host(SHAPES, np.float32, 4)
    tx = no.noisy_sgd(0.1, eta=0.5, key=11)
    leafwise = no.to_device(host, cl_queue)
    packed = no.pack(no.to_device(host, cl_queue))
    g = no.to_device(grads, cl_queue)
    want, _ = no.step(tx, leafwise, g, tx.init(leafwise))
    got, _ = no.step(tx, packed, no.pack(g), tx.init(packed))
    want, got = no.to_host(want), no.to_host(got)
    assert all(want[k].tobytes() == got[k].tobytes() for k in host)
    flat = np.concatenate([want[k].ravel() for k in host])
    pytest.importorskip("mpi4py.MPI")
    for rank in range(2):
        stx = dist.shard_optimizer(tx, FakeComm(2, rank))
        out, _ = dist.sharded_step(stx, packed, no.pack(g), stx.init(packed))
        out = no.to_host(out)
        lo, hi = dist.shard_bounds(flat.size, 2, [host[k].size for k in host])[rank]
        assert lo > 0 or rank == 0
        mine = np.concatenate([out[k].ravel() for k in host])[lo:hi]
        assert mine.tobytes() == flat[lo:hi].tobytes()


def _params(queue, host: dict) -> list[Parameter]:
    return [Parameter(no.to_device(v, queue)) for v in host.values()]


def test_noisy_sgd_class_weight_decay_and_maximize(cl_queue):
    """NoisySGD(weight_decay, maximize) is chain(-1, g + wd p, add_noise, lr), bit for bit,
    and follows the float64 reference."""
    host = _host(SHAPES, np.float32, 5)
    grads = [_host(SHAPES, np.float32, 20 + i) for i in range(4)]
    kw = {"lr": 0.03, "eta": 0.2, "gamma": 0.7, "seed": 2**50 + 1}
    params = _params(cl_queue, host)
    opt = no.NoisySGD(params, **kw, weight_decay=0.1, maximize=True)
    tx = no.chain(
        no.scale(-1.0),
        no.add_decayed_weights(0.1),
        no.add_noise(0.2, 0.7, seed=2**50 + 1),
        no.scale_by_learning_rate(0.03),
    )
    p = no.to_device(host, cl_queue)
    s = tx.init(p)
    for g in grads:
        for par, v in zip(params, g.values(), strict=True):
            par.grad = no.to_device(v, cl_queue)
        opt.step()
        p, s = no.step(tx, p, no.to_device(g, cl_queue), s)
    got = [par.data.get() for par in params]
    want = no.to_host(p)
    assert all(a.tobytes() == want[k].tobytes() for a, k in zip(got, host, strict=True))
    rtx = ref.noisy_sgd_wd_tx(0.03, 0.2, 0.7, 2**50 + 1, weight_decay=0.1, maximize=True)
    ps, _, _ = ref.run_transform(rtx, host, grads, storage_dtype=np.float32)
    for a, k in zip(got, host, strict=True):
        np.testing.assert_allclose(a, ps[-1][k], rtol=1e-5, atol=1e-6)
    assert opt.state_dict()["state"][0]["step"] == 4.0


def test_noisy_sgd_alias_maximize_follows_the_reference(cl_queue):
    host = _host(SHAPES, np.float64, 6)
    grads = [_host(SHAPES, np.float64, 30 + i) for i in range(3)]
    tx = no.noisy_sgd(0.1, 0.3, 0.5, key=4, maximize=True)
    p = no.to_device(host, cl_queue)
    s = tx.init(p)
    for g in grads:
        p, s = no.step(tx, p, no.to_device(g, cl_queue), s)
    rtx = ref.noisy_sgd_tx(0.1, 0.3, 0.5, 4, maximize=True)
    ps, _, _ = ref.run_transform(rtx, host, grads, storage_dtype=np.float64)
    got = no.to_host(p)
    for k in host:
        np.testing.assert_allclose(got[k], ps[-1][k], rtol=1e-12, atol=1e-14)


def test_partial_steps_number_the_stepping_parameters(cl_queue):
    """With some grads None, the stateful step runs the alias over the parameters that step
    (one cohort per step count): their elements are numbered within that sub-tree."""
    host = _host(SHAPES, np.float32, 7)
    keys = list(host)
    params = _params(cl_queue, host)
    opt = no.NoisySGD(params, lr=0.1, eta=0.5, seed=8)
    g1, g2 = _host(SHAPES, np.float32, 40), _host(SHAPES, np.float32, 41)
    for par, k in zip(params, keys, strict=True):
        par.grad = no.to_device(g1[k], cl_queue)
    opt.step()
    for par, k in zip(params, keys, strict=True):
        par.grad = None if k == "b" else no.to_device(g2[k], cl_queue)
    opt.step()
    tx = no.noisy_sgd(0.1, eta=0.5, key=8)
    p = no.to_device(host, cl_queue)
    p, s = no.step(tx, p, no.to_device(g1, cl_queue), tx.init(p))
    rest = [k for k in keys if k != "b"]
    sub = {k: p[k] for k in rest}
    sub, _ = no.step(tx, sub, no.to_device({k: g2[k] for k in rest}, cl_queue), s)
    want = {**no.to_host(p), **no.to_host(sub)}
    for par, k in zip(params, keys, strict=True):
        assert par.data.get().tobytes() == want[k].tobytes(), k
    steps = [opt.state_dict()["state"][i]["step"] for i in range(len(keys))]
    assert steps == [1.0 if k == "b" else 2.0 for k in keys]


def test_resumed_run_continues_bit_for_bit(cl_queue, tmp_path):
    host = _host(SHAPES, np.float32, 9)
    grads = [_host(SHAPES, np.float32, 50 + i) for i in range(6)]
    tx = no.noisy_sgd(0.05, key=2**64 - 1)
    p = no.pack(no.to_device(host, cl_queue))
    s = tx.init(p)
    for g in grads[:3]:
        p, s = no.step(tx, p, no.to_device(g, cl_queue), s)
    no.save(tmp_path / "ckpt", {"params": p, "state": s})
    straight_p, straight_s = p, s
    for g in grads[3:]:
        straight_p, straight_s = no.step(tx, straight_p, no.to_device(g, cl_queue), straight_s)
    loaded = no.load(tmp_path / "ckpt")
    rp, rs = loaded["params"], loaded["state"]
    for g in grads[3:]:
        rp, rs = no.step(no.noisy_sgd(0.05, key=2**64 - 1), rp, no.to_device(g, cl_queue), rs)
    a, b = no.to_host(rp), no.to_host(straight_p)
    assert all(a[k].tobytes() == b[k].tobytes() for k in host)


def test_only_element_indexed_kernels_carry_the_generator():
    """A fragment that does not ask for the element index keeps its key and source."""
    from netcl_optim.fusion._codegen import KernelSpec, fused_source

    def source(tx):
        frag = tx.plan
        spec = KernelSpec((frag.key,), np.dtype(np.float32), "pure", True, False, "double")
        return fused_source([frag], spec)[0]

    plain = no.scale_by_learning_rate(0.1).plan
    assert "element_index" not in plain.key
    src = source(no.scale_by_learning_rate(0.1))
    assert "philox" not in src and "idx" not in src and "index" not in src
    noisy = source(no.add_noise(0.01, 0.55, 0))
    assert "const ulong idx = (ulong)(index_off + i);" in noisy
    assert "uint4 philox4x32_10(" in noisy


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: no.add_noise(0.1, 0.5, 1, seed=2), "Only one of seed or key"),
        (lambda: no.add_noise(0.1, 0.5, -1), r"Invalid key: -1 \(must be an int in \[0, "),
        (lambda: no.noisy_sgd(0.1, seed=2**64), r"Invalid seed: "),
        (lambda: no.noisy_sgd(0.1, key=1.5), r"Invalid key: 1.5"),
        (lambda: no.add_noise(-0.1, 0.5), r"Invalid eta: -0.1 \(must be a finite number >= 0"),
        (lambda: no.add_noise(0.1, float("nan")), r"Invalid gamma: nan"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_noisy_sgd_class_validates_seed(cl_queue):
    params = _params(cl_queue, {"a": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="Invalid seed"):
        no.NoisySGD(params, seed=-3)
    with pytest.raises(ValueError, match="Invalid eta"):
        no.NoisySGD(params, eta=-1.0)
