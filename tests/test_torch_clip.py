"""torch.nn.utils' clipping helpers (clip_grad_norm_, get_total_norm, clip_grads_with_norm_,
clip_grad_value_) and optax's global_norm, against torch, optax and float64 NumPy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla
import pytest
import reference_extra as rx

import netcl_optim as no
from netcl_optim.fusion import count_launches

NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]
SHAPES = [(3, 5), (7,), (), (4, 2, 3), (0,)]
DTYPES = [np.float32, np.float64]
# float32 against torch: both round, torch in float32 (its norm), netcl in float64
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


class P:
    """A duck-typed parameter: only ``.grad`` matters to the clipping helpers."""

    def __init__(self, grad: cla.Array | None) -> None:
        self.grad = grad


@pytest.fixture(scope="module")
def q(cl_queue):
    return cl_queue


def _host_grads(seed: int, dtype=np.float32, scale: float = 3.0) -> list[np.ndarray | None]:
    """Matrix, vector, 0-d, 3-D, empty and a None grad."""
    rng = np.random.default_rng(seed)
    grads: list[np.ndarray | None] = [
        np.array(rng.standard_normal(s) * scale, dtype) for s in SHAPES
    ]
    grads.insert(2, None)
    return grads


def _present(grads):
    return [g for g in grads if g is not None]


def _params(q, grads, packed: bool) -> list[P]:
    dev = no.to_device(_present(grads), q)
    if packed and dev:
        dev = no.pack(dev, q)
    it = iter(dev)
    return [P(None if g is None else next(it)) for g in grads]


def _got(params):
    return [None if p.grad is None else p.grad.get() for p in params]


def _torch_params(torch, grads, norm_type=2.0):
    """torch parameters with these grads; torch has no inf norm of an empty tensor, so an
    empty grad is left out (None) there (it adds nothing to any norm)."""
    out = []
    for g in grads:
        if g is None:
            t = torch.nn.Parameter(torch.zeros(()))
        else:
            t = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype))
        if g is not None and not (norm_type == math.inf and g.size == 0):
            t.grad = torch.from_numpy(g.copy())
        out.append(t)
    return out


def _assert_grads(params, tparams, dtype):
    for p, t in zip(params, tparams, strict=True):
        if p.grad is None:
            assert t.grad is None
            continue
        got = p.grad.get()
        assert got.dtype == dtype
        want = t.grad.numpy() if t.grad is not None else np.zeros(0, dtype)
        np.testing.assert_allclose(got, want, rtol=2 * RTOL[dtype], atol=1e-30)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.itemsize])


def _assert_unchanged(params, grads):
    for got, h in zip(_got(params), grads, strict=True):
        if h is None:
            assert got is None
        else:
            np.testing.assert_array_equal(_bits(got), _bits(h))


# ---------------------------------------------------------------------------- clip_grad_norm_


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
def test_clip_grad_norm_matches_torch(q, norm_type, dtype, packed):
    torch = pytest.importorskip("torch")
    grads = _host_grads(1, dtype)
    total_ref = rx.total_norm(_present(grads), norm_type)
    max_norm = 0.37 * total_ref
    tparams = _torch_params(torch, grads, norm_type)
    want = float(torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type))
    params = _params(q, grads, packed)
    total = no.clip_grad_norm_(params, max_norm, norm_type, foreach=packed)
    assert isinstance(total, cla.Array) and total.shape == ()
    np.testing.assert_allclose(float(total.get()), want, rtol=RTOL[dtype])
    np.testing.assert_allclose(float(total.get()), total_ref, rtol=1e-6)
    _assert_grads(params, tparams, dtype)
    assert rx.total_norm(_present(_got(params)), norm_type) <= max_norm * (1 + 1e-6)


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_clip_grad_norm_equals_the_device_variant_and_the_two_steps(q, norm_type):
    grads = _host_grads(2)
    a, b, c = (_params(q, grads, packed=True) for _ in range(3))
    t_a = no.clip_grad_norm_(a, 1.0, norm_type)
    t_b = no.clip_grad_norm_device(b, 1.0, norm_type)
    t_c = no.get_total_norm([p.grad for p in c if p.grad is not None], norm_type)
    no.clip_grads_with_norm_(c, 1.0, t_c)
    assert t_a.get() == t_b.get()[0] == t_c.get()
    for x, y, z in zip(_got(a), _got(b), _got(c), strict=True):
        if x is not None:
            np.testing.assert_array_equal(_bits(x), _bits(y))
            np.testing.assert_array_equal(_bits(x), _bits(z))


def test_clip_grad_norm_without_grads_and_single_parameter(q):
    for params in ([], [P(None)], P(None)):
        total = no.clip_grad_norm_(params, 1.0)
        assert total.shape == () and float(total.get()) == 0.0
    (p,) = _params(q, [np.array([3.0, 4.0], np.float32)], packed=False)
    assert float(no.clip_grad_norm_(p, 1.0).get()) == pytest.approx(5.0, rel=1e-7)
    np.testing.assert_allclose(p.grad.get(), [0.6, 0.8], rtol=1e-6)


def test_clip_grad_norm_empty_generator_warns_as_torch(q):
    torch = pytest.importorskip("torch")
    with pytest.warns(UserWarning, match="empty generator") as ours:
        total = no.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning) as theirs:
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    assert str(ours[0].message) == str(theirs[0].message)
    assert float(total.get()) == 0.0
    params = _params(q, _host_grads(3), packed=True)
    total = no.clip_grad_norm_((p for p in params), 1.0)  # a generator with items: no warning
    assert rx.total_norm(_present(_got(params)), 2.0) <= 1.0 + 1e-6


def test_clip_grad_norm_does_not_read_back(q, monkeypatch):
    grads = [np.ones((16, 16), np.float32), np.ones(256, np.float32), np.ones(512, np.float32)]
    params = _params(q, grads, packed=True)

    def no_read(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_read)
    monkeypatch.setattr(cl, "enqueue_copy", no_read)
    with count_launches() as c:
        total = no.clip_grad_norm_(params, 1.0)
    monkeypatch.undo()
    assert c.launches == 3, c.kernels  # partials, finish, one scaling launch
    np.testing.assert_allclose(float(total.get()), 32.0, rtol=1e-7)


# ---------------------------------------------------------------------------- error_if_nonfinite


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.5])
def test_error_if_nonfinite_raises_as_torch_and_leaves_grads(q, norm_type, bad):
    torch = pytest.importorskip("torch")
    grads = _host_grads(4)
    grads[1][3] = bad
    tparams = _torch_params(torch, grads, norm_type)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(tparams, 1.0, norm_type, error_if_nonfinite=True)
    params = _params(q, grads, packed=True)
    with pytest.raises(RuntimeError) as ours:
        no.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    _assert_unchanged(params, grads)
    with pytest.raises(RuntimeError, match="is non-finite"):
        no.get_total_norm(_present([p.grad for p in params]), norm_type, True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_without_the_flag_matches_torch(q, bad):
    torch = pytest.importorskip("torch")
    grads = _host_grads(5)
    grads[0][1, 2] = bad
    tparams = _torch_params(torch, grads)
    want = float(torch.nn.utils.clip_grad_norm_(tparams, 1.0))
    params = _params(q, grads, packed=True)
    total = float(no.clip_grad_norm_(params, 1.0).get())
    assert (math.isnan(total) and math.isnan(want)) or total == want == math.inf
    for p, t in zip(params, tparams, strict=True):
        if p.grad is not None and p.grad.size:
            np.testing.assert_array_equal(p.grad.get(), t.grad.numpy())  # NaN == NaN here


# ---------------------------------------------------------------------------- get_total_norm


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
def test_get_total_norm_matches_torch(q, norm_type, dtype, packed):
    torch = pytest.importorskip("torch")
    host = _present(_host_grads(6, dtype))
    tensors = [torch.from_numpy(h) for h in host if h.size or norm_type != math.inf]
    want = float(torch.nn.utils.get_total_norm(tensors, norm_type))
    dev = no.to_device(host, q)
    if packed:
        dev = no.pack(dev, q)
    grads_before = [d.get() for d in dev]
    total = no.get_total_norm(dev, norm_type, foreach=False)
    assert isinstance(total, cla.Array) and total.shape == ()
    np.testing.assert_allclose(float(total.get()), want, rtol=RTOL[dtype])
    np.testing.assert_allclose(float(total.get()), rx.total_norm(host, norm_type), rtol=1e-6)
    for d, h in zip(dev, grads_before, strict=True):  # read only
        np.testing.assert_array_equal(d.get(), h)


def test_get_total_norm_single_array_empty_and_mixed_dtypes(q):
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    got = no.get_total_norm(no.to_device(x, q), 1.0)
    assert float(got.get()) == float(torch.nn.utils.get_total_norm(torch.from_numpy(x), 1.0))
    assert float(no.get_total_norm([]).get()) == 0.0
    assert no.get_total_norm([]).shape == ()
    mixed = [np.arange(5, dtype=np.float32), np.arange(3, dtype=np.float64), x.astype(np.float16)]
    got = no.get_total_norm(no.to_device(mixed, q), 3.0)
    np.testing.assert_allclose(float(got.get()), rx.total_norm(mixed, 3.0), rtol=1e-12)


def test_get_total_norm_launches_and_no_read(q, monkeypatch):
    dev = no.pack(no.to_device([np.ones(64, np.float32), np.ones((8, 8), np.float32)], q), q)

    def no_read(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_read)
    with count_launches() as c:
        no.get_total_norm(dev, 3.0)
    monkeypatch.undo()
    assert c.launches == 2, c.kernels


# ---------------------------------------------------------------------------- clip_grads_with_norm_


def _norm_forms(q, total: float):
    """``total`` as a 0-d float64, (1,) float32 and (1,) float64 device array, and a float."""
    f64 = no.to_device(np.array([total]), q)
    return {
        "0-d": f64.reshape(()),
        "(1,) float32": no.to_device(np.array([total], np.float32), q),
        "(1,) float64": f64,
        "float": total,
    }


@pytest.mark.parametrize("form", ["0-d", "(1,) float32", "(1,) float64", "float"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
def test_clip_grads_with_norm_matches_torch(q, packed, dtype, form):
    torch = pytest.importorskip("torch")
    grads = _host_grads(7, dtype)
    for total in (50.0, 0.1):  # coefficient < 1 and clamped to 1
        if form == "(1,) float32":
            total = float(np.float32(total))
        tparams = _torch_params(torch, grads)
        torch.nn.utils.clip_grads_with_norm_(tparams, 2.0, torch.tensor(total, dtype=torch.float64))
        params = _params(q, grads, packed)
        no.clip_grads_with_norm_(params, 2.0, _norm_forms(q, total)[form], foreach=True)
        _assert_grads(params, tparams, dtype)


@pytest.mark.parametrize("total", [math.nan, math.inf, 0.0])
def test_clip_grads_with_norm_special_norms_match_torch(q, total):
    torch = pytest.importorskip("torch")
    grads = _host_grads(8)
    for form, value in _norm_forms(q, total).items():
        tparams = _torch_params(torch, grads)
        torch.nn.utils.clip_grads_with_norm_(tparams, 2.0, torch.tensor(total, dtype=torch.float64))
        params = _params(q, grads, packed=True)
        no.clip_grads_with_norm_(params, 2.0, value)
        for p, t in zip(params, tparams, strict=True):
            if p.grad is not None:
                np.testing.assert_array_equal(p.grad.get(), t.grad.numpy(), err_msg=form)


def test_clip_grads_with_norm_launches_and_no_read(q, monkeypatch):
    params = _params(q, [np.ones(64, np.float32), np.ones((8, 8), np.float32)], packed=True)
    total = no.get_total_norm([p.grad for p in params])

    def no_read(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_read)
    monkeypatch.setattr(cl, "enqueue_copy", no_read)
    with count_launches() as c:
        assert no.clip_grads_with_norm_(params, 1.0, total) is None
    monkeypatch.undo()
    assert c.launches == 2, c.kernels  # the coefficient, one scaling launch
    np.testing.assert_allclose(params[0].grad.get(), np.full(64, 1 / (8 * np.sqrt(2) + 1e-6)))


# ---------------------------------------------------------------------------- clip_grad_value_


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("dtype", [np.float16, *DTYPES], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("clip_value", [0.5, 0.0, math.inf, 2])
def test_clip_grad_value_matches_torch_bitwise(q, clip_value, dtype, packed):
    torch = pytest.importorskip("torch")
    grads = _host_grads(9, dtype)
    grads[0][0, :4] = [np.nan, np.inf, -np.inf, -0.0]
    tparams = _torch_params(torch, grads)
    torch.nn.utils.clip_grad_value_(tparams, clip_value)
    params = _params(q, grads, packed)
    assert no.clip_grad_value_(params, clip_value, foreach=None) is None
    for p, t, h in zip(params, tparams, grads, strict=True):
        if h is None:
            assert p.grad is None
            continue
        got = p.grad.get()
        np.testing.assert_array_equal(_bits(got), _bits(t.grad.numpy()))
        with np.errstate(invalid="ignore"):
            want = np.where(np.isnan(h), h, np.clip(h.astype(np.float64), -clip_value, clip_value))
        np.testing.assert_array_equal(got, want.astype(dtype))


def test_clip_grad_value_one_launch_per_packed_run(q, monkeypatch):
    grads = [np.full(40, 3.0, np.float32), np.full(24, -3.0, np.float32), np.ones(8, np.float64)]
    params = _params(q, grads, packed=True)

    def no_read(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_read)
    monkeypatch.setattr(cl, "enqueue_copy", no_read)
    with count_launches() as c:
        no.clip_grad_value_(params, 1.5)
    monkeypatch.undo()
    assert c.launches == 2, c.kernels  # one per dtype
    assert [g.tolist() for g in _got(params)] == [[1.5] * 40, [-1.5] * 24, [1.0] * 8]
    params = _params(q, grads, packed=False)
    with count_launches() as c:
        no.clip_grad_value_(params, 1.5)
    assert c.launches == 3, c.kernels


# ---------------------------------------------------------------------------- argument errors


def _calls(params, grads_dev):
    return {
        "clip_grad_norm_": lambda **kw: no.clip_grad_norm_(params, **{"max_norm": 1.0, **kw}),
        "get_total_norm": lambda **kw: no.get_total_norm(grads_dev, **kw),
        "clip_grads_with_norm_": lambda **kw: no.clip_grads_with_norm_(
            params, **{"max_norm": 1.0, "total_norm": 5.0, **kw}
        ),
        "clip_grad_value_": lambda **kw: no.clip_grad_value_(params, **{"clip_value": 1.0, **kw}),
    }


BAD = [
    ("clip_grad_norm_", {"max_norm": -1.0}, ValueError, r"Invalid max_norm: -1\.0 \(must be"),
    ("clip_grad_norm_", {"max_norm": math.nan}, ValueError, "Invalid max_norm: nan"),
    ("clip_grad_norm_", {"norm_type": 0.0}, ValueError, r"Invalid norm_type: 0\.0 \(must be"),
    ("clip_grad_norm_", {"norm_type": -2}, ValueError, "Invalid norm_type: -2 "),
    ("clip_grad_norm_", {"norm_type": "2"}, TypeError, "Invalid norm_type: '2'"),
    ("clip_grad_norm_", {"foreach": "yes"}, ValueError, "Invalid foreach: 'yes' .must be a bool"),
    ("get_total_norm", {"norm_type": -math.inf}, ValueError, "Invalid norm_type: -inf"),
    ("get_total_norm", {"norm_type": math.nan}, ValueError, "Invalid norm_type: nan"),
    ("clip_grads_with_norm_", {"max_norm": -0.5}, ValueError, "Invalid max_norm: -0.5"),
    ("clip_grads_with_norm_", {"total_norm": "5"}, TypeError, "Invalid total_norm: '5'"),
    ("clip_grads_with_norm_", {"total_norm": None}, TypeError, "Invalid total_norm: None"),
    ("clip_grads_with_norm_", {"foreach": 1}, ValueError, "Invalid foreach: 1"),
    ("clip_grad_value_", {"clip_value": -1.0}, ValueError, r"Invalid clip_value: -1\.0 \(must be"),
    ("clip_grad_value_", {"clip_value": math.nan}, ValueError, "Invalid clip_value: nan"),
    ("clip_grad_value_", {"clip_value": "1"}, TypeError, "Invalid clip_value: '1'"),
]


@pytest.mark.parametrize(("fn", "kw", "error", "match"), BAD, ids=lambda v: str(v)[:20])
def test_invalid_arguments_raise_and_leave_grads(q, fn, kw, error, match):
    grads = _host_grads(10)
    params = _params(q, grads, packed=True)
    with pytest.raises(error, match=match):
        _calls(params, _present([p.grad for p in params]))[fn](**kw)
    _assert_unchanged(params, grads)


def test_invalid_arrays(q):
    params = _params(q, _host_grads(11), packed=False)
    with pytest.raises(ValueError, match="Invalid total_norm: an array of shape"):
        no.clip_grads_with_norm_(params, 1.0, params[0].grad)
    with pytest.raises(TypeError, match=r"tensors\[1\] is a NoneType"):
        no.get_total_norm([params[0].grad, None])
    with pytest.raises(TypeError, match="pyopencl"):
        no.get_total_norm([np.ones(3, np.float32)])
    with pytest.raises(TypeError, match=r"\.grad"):
        no.clip_grad_value_([object()], 1.0)
    with pytest.raises(TypeError, match="pyopencl"):
        no.clip_grad_norm_([P(np.ones(3, np.float32))], 1.0)


# ---------------------------------------------------------------------------- global_norm


def _tree(host):
    return {"w": host[0], "b": host[1], "s": host[2], "t": [host[3], host[4]], "none": None}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "leaves"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_global_norm_matches_float64_reference(q, dtype, packed):
    host = _present(_host_grads(12, dtype))
    tree = no.to_device(_tree(host), q)
    if packed:
        tree = no.pack(tree, q)
    got = no.global_norm(tree)
    assert isinstance(got, cla.Array) and got.shape == ()
    want = math.sqrt(sum(float(np.sum(h.astype(np.float64) ** 2)) for h in host))
    np.testing.assert_allclose(float(got.get()), want, rtol=1e-6 if dtype == np.float32 else 1e-14)


def test_global_norm_matches_optax(q):
    optax = pytest.importorskip("optax")
    jnp = pytest.importorskip("jax.numpy")
    host = _present(_host_grads(13))
    tree = optree.tree_map(jnp.asarray, _tree(host))
    with warnings.catch_warnings():  # optax 0.2.8: deprecated "in favor of optax.tree.norm"
        warnings.simplefilter("ignore", DeprecationWarning)
        want = float(optax.global_norm(tree))
    np.testing.assert_allclose(want, float(optax.tree.norm(tree)), rtol=1e-6)
    got = float(no.global_norm(no.to_device(_tree(host), q)).get())
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(no.global_norm({}).get()) == float(optax.tree.norm({})) == 0.0


def test_global_norm_large_values_and_clip_by_global_norm(q):
    big = [np.full(3, 1e30, np.float32), np.full(2, -2e30, np.float32)]
    got = float(no.global_norm(no.to_device(big, q)).get())
    np.testing.assert_allclose(got, rx.total_norm(big, 2.0), rtol=1e-6)
    grads = no.to_device(_present(_host_grads(14)), q)
    norm = no.global_norm(grads)
    tx = no.clip_by_global_norm(1.0)
    updates, _ = tx.update(grads, tx.init(grads))
    scaled = math.sqrt(sum(float(np.sum(u.get().astype(np.float64) ** 2)) for u in updates))
    coef = min(1.0, 1.0 / (float(norm.get()) + 1e-6))
    np.testing.assert_allclose(scaled, float(norm.get()) * coef, rtol=1e-6)


def test_global_norm_launches_no_read_and_errors(q, monkeypatch):
    tree = no.pack(no.to_device(_tree(_present(_host_grads(15))), q), q)

    def no_read(*a, **k):
        raise AssertionError("host read")

    monkeypatch.setattr(cla.Array, "get", no_read)
    with count_launches() as c:
        no.global_norm(tree)
    monkeypatch.undo()
    assert c.launches == 2, c.kernels
    with pytest.raises(TypeError, match="leaf 1 is a ndarray"):
        no.global_norm([tree["w"], np.ones(3)])
