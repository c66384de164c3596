"""Muon groundwork: the float64 references of tests/reference_muon.py against torch 2.13's
``torch.optim.Muon`` and optax contrib's ``muon``, and the host layout helpers of
``netcl_optim/optimizers/_muon_layout.py`` (matrix views, shape scales, input checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from jax_x64 import jax_x64
from reference_muon import (
    bf16_round,
    from_matrices,
    optax_adamw_step,
    optax_muon_step,
    reference_muon_step,
    to_matrices,
    torch_muon_step,
)

from netcl_optim.optimizers._muon_layout import (
    MatrixView,
    MuonDimensionNumbers,
    check_adjust_lr_fn,
    check_layout,
    check_muon_param,
    is_matrix_leaf,
    matrix_view,
    ns_schedule,
    shape_scale,
)

NS = (3.4445, -4.775, 2.0315)

# ---------------------------------------------------------------- layout helpers

VIEWS = [
    # shape, layout, conv, (batch_shape, rows, cols, fan_in, fan_out, permutation)
    ((6, 4), "out_in", None, ((), 6, 4, 4, 6, (0, 1))),
    ((6, 4), "in_out", None, ((), 6, 4, 6, 4, (0, 1))),
    ((8, 3, 3, 3), "out_in", None, ((), 8, 27, 27, 8, (0, 1, 2, 3))),  # torch conv
    ((3, 3, 4, 8), "in_out", None, ((), 36, 8, 36, 8, (0, 1, 2, 3))),  # flax conv
    ((5, 6, 4), "out_in", None, ((5,), 6, 4, 4, 6, (0, 1, 2))),  # batched
    ((8, 3, 3, 3), "out_in", False, ((8, 3), 3, 3, 3, 3, (0, 1, 2, 3))),
    ((8, 4, 2, 2, 2), "out_in", True, ((), 8, 32, 32, 8, (0, 1, 2, 3, 4))),  # conv3d
    ((2, 3, 5, 7), "out_in", None, ((), 2, 105, 105, 2, (0, 1, 2, 3))),
    ((6, 4), MuonDimensionNumbers(), None, ((), 6, 4, 6, 4, (0, 1))),
    ((5, 6, 4), MuonDimensionNumbers(1, 2), None, ((5,), 6, 4, 6, 4, (0, 1, 2))),
    ((6, 5, 4), MuonDimensionNumbers(0, -1), None, ((5,), 6, 4, 6, 4, (1, 0, 2))),
    ((3, 3, 4, 8), MuonDimensionNumbers((0, 1, 2), 3), None, ((), 36, 8, 36, 8, (0, 1, 2, 3))),
    ((4, 2, 3), MuonDimensionNumbers(2, (0,)), None, ((2,), 3, 4, 3, 4, (1, 2, 0))),
]


@pytest.mark.parametrize("shape, layout, conv, expected", VIEWS)
def test_matrix_view_table(shape, layout, conv, expected):
    view = matrix_view(shape, layout, conv)
    rows, cols = expected[1], expected[2]
    got = (view.batch_shape, view.rows, view.cols, view.fan_in, view.fan_out, view.permutation)
    assert got == expected
    assert view.batch * rows * cols == math.prod(shape)
    assert view.transposed == (rows > cols)


@pytest.mark.parametrize("shape, layout, conv, expected", VIEWS)
def test_to_matrices_round_trip(shape, layout, conv, expected):
    view = matrix_view(shape, layout, conv)
    x = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
    stack = to_matrices(x, view)
    assert stack.shape == (*view.batch_shape, view.rows, view.cols)
    np.testing.assert_array_equal(from_matrices(stack, view), x)


def _view(fan_out: int, fan_in: int) -> MatrixView:
    return matrix_view((fan_out, fan_in), "out_in")


SCALES = [
    # (fan_out, fan_in), variant, adjust_lr_fn, consistent_rms, scale
    ((64, 16), "torch", None, None, 2.0),
    ((64, 16), "torch", "original", None, 2.0),
    ((16, 64), "torch", "original", None, 1.0),
    ((16, 64), "torch", "match_rms_adamw", None, 0.2 * 8.0),
    ((64, 16), "torch", "spectral_unclamped", None, 2.0),
    ((16, 64), "torch", "spectral_unclamped", None, 0.5),
    ((64, 16), "optax", None, None, 2.0),
    ((16, 64), "optax", None, None, 1.0),
    ((16, 64), "optax", None, 0.2, 0.2 * 8.0),
    ((64, 16), "reference", None, None, 2.0),
    ((16, 64), "reference", None, None, 1.0),
]


@pytest.mark.parametrize("shape, variant, adjust, rms, expected", SCALES)
def test_shape_scales(shape, variant, adjust, rms, expected):
    assert shape_scale(_view(*shape), variant, adjust, rms) == pytest.approx(expected, rel=1e-15)


def test_in_out_layout_scales_by_fan_out_over_fan_in():
    # [in, out] = (16, 64): fan_out/fan_in = 4, for every variant
    view = matrix_view((16, 64), "in_out")
    assert shape_scale(view, "optax") == shape_scale(view, "torch") == 2.0
    assert shape_scale(view, "reference") == 2.0


def test_conv_scale_from_matrix_not_kernel_dims():
    """KellerJordan/Muon#63: the scale read the kernel dims (kh/kw = 1) of a 4-D update."""
    view = matrix_view((40, 2, 3, 3), "out_in")
    assert (view.rows, view.cols) == (40, 18)
    assert shape_scale(view, "reference") == pytest.approx(math.sqrt(40 / 18))
    rng = np.random.default_rng(3)
    p, g = rng.standard_normal((2, 40, 2, 3, 3))
    zero = np.zeros_like(p)
    fixed, _ = reference_muon_step(p, g, zero, view, lr=0.1)
    buggy, _ = reference_muon_step(p, g, zero, view, lr=0.1, issue_63_scale=True)
    np.testing.assert_allclose(p - fixed, (p - buggy) * math.sqrt(40 / 18), rtol=1e-10)


@pytest.mark.parametrize(
    "shape, variant, entry, expected",
    [
        ((4, 4), "optax", "default", True),
        ((4,), "optax", "default", False),
        ((3, 3, 4, 8), "optax", "default", False),
        ((3, 3, 4, 8), "optax", MuonDimensionNumbers((0, 1, 2), 3), True),
        ((4, 4), "optax", None, False),
        ((4, 4), "torch", "default", True),
        ((8, 3, 3, 3), "torch", "default", False),
        ((8, 3, 3, 3), "reference", "default", True),
        ((8,), "reference", "default", False),
    ],
)
def test_is_matrix_leaf(shape, variant, entry, expected):
    assert is_matrix_leaf(shape, variant, entry) is expected


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: check_layout("oi"), "layout must be 'out_in'"),
        (lambda: matrix_view((5,)), "ndim >= 2"),
        (lambda: matrix_view((4, 4), MuonDimensionNumbers(0, 0)), "disjoint"),
        (lambda: matrix_view((4, 4), MuonDimensionNumbers(0, 2)), "out of range"),
        (lambda: matrix_view((4, 4, 4), MuonDimensionNumbers((0, 0), 1)), "repeats"),
        (lambda: matrix_view((4, 4), MuonDimensionNumbers(), conv=True), "conv="),
        (lambda: is_matrix_leaf((4, 4), "keras"), "variant"),
        (lambda: shape_scale(_view(4, 4), "keras"), "variant"),
        (lambda: check_adjust_lr_fn("rms"), "Adjust learning rate function rms"),
        (lambda: shape_scale(_view(4, 4), "torch", "rms"), "not supported"),
        (lambda: ns_schedule((3.4, -4.7), 5), "exactly 3 values"),
        (lambda: ns_schedule((3.4, -4.7, 2.0, 1.0), 5), "exactly 3 values"),
        (lambda: ns_schedule(3.4, 5), "3 numbers"),
        (lambda: ns_schedule((3.4, float("nan"), 2.0), 5), "finite"),
        (lambda: ns_schedule([NS, NS, NS], 2, allow_table=True), "Not enough coeffs"),
        (lambda: ns_schedule([NS, (1.0, 2.0)], 5, allow_table=True), "row 1"),
        (lambda: ns_schedule([NS, NS], 5), "3 numbers"),  # torch: no tables
        (lambda: ns_schedule(NS, 100), r"\[0, 100\)"),
        (lambda: ns_schedule(NS, 2.0), "must be an int"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_check_muon_param_names_the_parameter():
    with pytest.raises(ValueError, match=r"'layers\.0\.bias' has size \(7,\)"):
        check_muon_param("layers.0.bias", (7,))
    with pytest.raises(ValueError, match=r"only supports 2D parameters.*'conv'"):
        check_muon_param("conv", (8, 3, 3, 3), strict_2d=True)
    check_muon_param("conv", (8, 3, 3, 3))
    check_muon_param("w", (8, 3), strict_2d=True)


def test_ns_schedule():
    assert ns_schedule(NS, 5) == (NS,) * 5
    assert ns_schedule(list(NS), 0) == ()
    table = [NS, (3.0, -3.0, 1.0)]
    # optax: a table of n <= ns_steps rows runs its n rows, whatever ns_steps is
    assert ns_schedule(table, 5, allow_table=True) == (NS, (3.0, -3.0, 1.0))


# ---------------------------------------------------------------- torch 2.13


def test_bf16_round_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-6, 6, 4000),
                        [0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 65504.0]])  # fmt: skip
    want = torch.tensor(x.astype(np.float32)).bfloat16().double().numpy()
    np.testing.assert_array_equal(bf16_round(x), want)


# Units: the orthogonalised update O (entries up to ~1). torch rounds the NS input, the norm
# and every addmm to bf16 (8-bit significand, ulp 2^-8 relative); the quintic's slope at 0 is
# a = 3.44, so over 5 iterations a rounding can grow ~3.44^5 ~ 500x for small singular
# values. Measured: max |O_torch - O_f64| 0.007-0.032. EXACT_TOL = 0.06 (~15 bf16 ulps at 1).
EXACT_TOL = 0.06
# With bf16 rounding emulated, most elements agree to float32 rounding of p (~1e-6 / lr);
# an occasional rounding tie decided differently (torch's matmul sums in another order) flips
# one bf16 ulp and spreads through the next products, so the max stays within EXACT_TOL.
EMULATED_TOL = 1e-4
TORCH_CASES = [
    # leaf shape, nesterov, adjust_lr_fn, weight_decay
    ((16, 16), True, None, 0.1),
    ((24, 10), True, "original", 0.1),
    ((10, 24), False, None, 0.0),
    ((12, 40), True, "match_rms_adamw", 0.1),
    ((8, 4, 3, 3), True, None, 0.1),  # conv: torch gets it flattened to (out, -1)
]


@pytest.mark.parametrize("shape, nesterov, adjust, wd", TORCH_CASES)
def test_torch_muon_parity(shape, nesterov, adjust, wd):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(sum(shape))
    lr = 0.05
    view = matrix_view(shape, "out_in")
    p0 = rng.standard_normal(shape).astype(np.float32)
    tp = torch.nn.Parameter(torch.tensor(p0.reshape(shape[0], -1)))
    opt = torch.optim.Muon([tp], lr=lr, weight_decay=wd, nesterov=nesterov, adjust_lr_fn=adjust)
    unit = lr * shape_scale(view, "torch", adjust)
    emulated_within = []
    for _ in range(3):
        p = tp.detach().numpy().reshape(shape).astype(np.float64)
        buf = 0 * p
        if opt.state:  # a float64 copy: torch updates its buffer in place
            buf = opt.state[tp]["momentum_buffer"].numpy().reshape(shape).astype(np.float64)
        g = rng.standard_normal(shape).astype(np.float32)
        tp.grad = torch.tensor(g.reshape(tp.shape))
        opt.step()
        got = tp.detach().numpy().reshape(shape).astype(np.float64)
        kw = dict(lr=lr, weight_decay=wd, nesterov=nesterov, adjust_lr_fn=adjust)
        exact, want_buf = torch_muon_step(p, g.astype(np.float64), buf, view, **kw)
        emulated, _ = torch_muon_step(p, g.astype(np.float64), buf, view, bf16=True, **kw)
        np.testing.assert_allclose(
            opt.state[tp]["momentum_buffer"].numpy().reshape(shape), want_buf, rtol=0, atol=1e-6
        )
        exact_err = np.abs(got - exact) / unit
        emulated_err = np.abs(got - emulated) / unit
        assert exact_err.max() < EXACT_TOL
        assert emulated_err.max() < EXACT_TOL
        emulated_within.append(np.mean(emulated_err < EMULATED_TOL))
        # the bf16 emulation explains torch's bits: it is far closer than the exact reference
        assert np.median(emulated_err) < 1e-2 * max(np.median(exact_err), 1e-4)
    assert np.mean(emulated_within) > 0.9


def test_torch_2_13_rejects_spectral_unclamped():
    torch = pytest.importorskip("torch")
    if not torch.__version__.startswith("2.13"):
        pytest.skip("torch 2.14 accepts spectral_unclamped")
    with pytest.raises(ValueError, match="spectral_unclamped is not supported"):
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="spectral_unclamped")


def test_torch_rejects_non_2d_as_we_do():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="2D parameters"):
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="2D parameters"):
        check_muon_param("bias", (3,), strict_2d=True)


def test_torch_2_13_bf16_momentum_aliasing():
    """pytorch#190597: with a bf16 grad ``grad.bfloat16()`` is the buffer itself and the
    in-place ``div_`` normalises the momentum buffer (nesterov=False). Our reference (and the
    device Muon) never writes the buffer while orthogonalising."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    g = rng.standard_normal((8, 6)).astype(np.float32)
    tp = torch.nn.Parameter(torch.zeros(8, 6, dtype=torch.bfloat16))
    opt = torch.optim.Muon([tp], nesterov=False)
    tp.grad = torch.tensor(g).bfloat16()
    opt.step()
    torch_buf = opt.state[tp]["momentum_buffer"].double().numpy()
    view = matrix_view((8, 6))
    zero = np.zeros((8, 6))
    _, buf = torch_muon_step(zero, bf16_round(g), zero, view, nesterov=False)
    assert np.linalg.norm(buf) == pytest.approx(0.05 * np.linalg.norm(bf16_round(g)))
    if torch.__version__.startswith("2.13"):  # the bug, as measured on 2.13
        assert np.linalg.norm(torch_buf) == pytest.approx(1.0, abs=0.02)
    else:
        np.testing.assert_allclose(torch_buf, buf, rtol=1e-2)


# ---------------------------------------------------------------- Keller Jordan reference


def test_reference_variant_against_torch_reference():
    """Same algorithm as torch's up to ``||X|| + 1e-7`` vs ``max(||X||, 1e-7)``; a conv leaf
    equals torch's step on the (out, -1) flattened weight."""
    rng = np.random.default_rng(11)
    for shape in [(12, 7), (7, 12), (6, 2, 3, 3)]:
        p, g, buf = rng.standard_normal((3, *shape))
        flat = (shape[0], math.prod(shape[1:]))
        want_p, want_buf = torch_muon_step(
            p.reshape(flat), g.reshape(flat), buf.reshape(flat), matrix_view(flat),
            lr=0.02, weight_decay=0.01,
        )  # fmt: skip
        got_p, got_buf = reference_muon_step(p, g, buf, matrix_view(shape), weight_decay=0.01)
        np.testing.assert_allclose(got_buf.reshape(flat), want_buf, rtol=0, atol=1e-15)
        np.testing.assert_allclose(got_p.reshape(flat), want_p, rtol=0, atol=1e-8)
        assert np.abs(got_p - p).max() > 1e-3


def test_reference_batched_is_per_matrix():
    rng = np.random.default_rng(12)
    p, g, buf = rng.standard_normal((3, 4, 6, 9))
    got_p, _ = reference_muon_step(p, g, buf, matrix_view(p.shape))
    for i in range(4):
        one, _ = reference_muon_step(p[i], g[i], buf[i], matrix_view(p[i].shape))
        np.testing.assert_allclose(got_p[i], one, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- optax contrib

OPTAX_SHAPES = {"bias": (7,), "conv": (3, 3, 4, 8), "sq": (12, 12), "stack": (3, 6, 10),
                "tall": (20, 8), "wide": (8, 20)}  # fmt: skip


OPTAX_CASES = [
    # dtype, atol, kwargs
    (np.float64, 1e-12, {}),
    (np.float64, 1e-12, {"adaptive": True, "weight_decay": 0.1}),
    (np.float64, 1e-12, {"nesterov": False, "consistent_rms": 0.2}),
    (np.float64, 1e-12, {"ns_coeffs": "dion"}),
    # float32: ~1e-7 per step at lr 0.03 on O(1) params (measured <= 2.6e-7); adaptive
    # multiplies by <m_hat, O>, a float32 sum over the leaf (measured <= 4.4e-6)
    (np.float32, 2e-6, {"weight_decay": 0.1}),
    (np.float32, 2e-5, {"adaptive": True}),
]


@pytest.mark.parametrize("dtype, atol, kwargs", OPTAX_CASES)
def test_optax_muon_parity(dtype, atol, kwargs):
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    contrib = pytest.importorskip("optax.contrib")
    import jax.numpy as jnp

    spec = {"sq": (0, 1), "tall": (0, 1), "wide": (0, 1), "stack": (1, 2), "conv": ((0, 1, 2), 3)}
    theirs = {k: contrib.MuonDimensionNumbers(*v) for k, v in spec.items()} | {"bias": None}
    ours = {k: MuonDimensionNumbers(*v) for k, v in spec.items()}
    lr, beta = 0.03, 0.95
    table = kwargs.get("ns_coeffs") == "dion"
    schedule = ns_schedule(contrib._muon._DION_NS_COEFFS if table else NS, 5, allow_table=True)
    rng = np.random.default_rng(21)
    with jax_x64(dtype == np.float64):
        opt = contrib.muon(lr, muon_weight_dimension_numbers=theirs, **kwargs)
        params = {k: rng.standard_normal(s).astype(dtype) for k, s in OPTAX_SHAPES.items()}
        jparams = {k: jnp.asarray(v) for k, v in params.items()}
        state = opt.init(jparams)
        ref = {k: v.astype(np.float64) for k, v in params.items()}
        mu = {k: np.zeros(s) for k, s in OPTAX_SHAPES.items()}
        nu = np.zeros(OPTAX_SHAPES["bias"])
        for count in range(3):
            grads = {k: rng.standard_normal(s).astype(dtype) for k, s in OPTAX_SHAPES.items()}
            jgrads = {k: jnp.asarray(v) for k, v in grads.items()}
            updates, state = opt.update(jgrads, state, jparams)
            jparams = optax.apply_updates(jparams, updates)
            g64 = {k: v.astype(np.float64) for k, v in grads.items()}
            ref["bias"], mu["bias"], nu = optax_adamw_step(
                ref["bias"], g64["bias"], mu["bias"], nu, count, lr,
                nesterov=kwargs.get("nesterov", True),
            )  # fmt: skip
            for k, dims in ours.items():
                ref[k], mu[k] = optax_muon_step(
                    ref[k], g64[k], mu[k], count, matrix_view(OPTAX_SHAPES[k], dims), lr,
                    schedule=schedule, beta=beta,
                    weight_decay=kwargs.get("weight_decay", 0.0),
                    nesterov=kwargs.get("nesterov", True),
                    adaptive=kwargs.get("adaptive", False),
                    consistent_rms=kwargs.get("consistent_rms"),
                )  # fmt: skip
            for k in OPTAX_SHAPES:
                got = np.asarray(jparams[k], np.float64)
                assert got.dtype == np.float64 and jparams[k].dtype == dtype
                np.testing.assert_allclose(got, ref[k], rtol=0, atol=atol, err_msg=k)
        moved = max(np.abs(ref[k] - params[k]).max() for k in OPTAX_SHAPES)
        assert moved > 1e-2
