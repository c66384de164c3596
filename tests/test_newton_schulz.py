"""Muon's orthogonalisation stage (``optimizers/_orthogonalize.py`` over
``fusion/_newton_schulz.py``): against the float64 references of ``reference_muon.py``, bit
for bit between our own paths, launches per group, the input never written, errors, ZeRO by
whole leaves."""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pyopencl.array as cla
import pytest
import reference_muon as rm

import netcl_optim as no
from netcl_optim._device import default_queue
from netcl_optim.distributed._flat_shards import WHOLE_LEAVES, shard_block, shard_bounds
from netcl_optim.fusion import _newton_schulz as _ns
from netcl_optim.fusion import count_launches
from netcl_optim.optimizers._muon_layout import MuonDimensionNumbers, matrix_view, shape_scale
from netcl_optim.optimizers._orthogonalize import _whole_leaves, orthogonalize_by_newton_schulz

COEFFS = (3.4445, -4.775, 2.0315)
DION = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


@pytest.fixture(scope="module")
def queue() -> Any:
    return default_queue()


def _want(x: np.ndarray, spec: Any, variant: str, *, eps: float, schedule: Any = None,
          adaptive: bool = False, **scale_kwargs: Any) -> np.ndarray:  # fmt: skip
    view = matrix_view(x.shape, spec)
    schedule = schedule or [COEFFS] * 5
    normalize = "clamp" if variant == "torch" else "add"
    o = rm.from_matrices(rm.newton_schulz(rm.to_matrices(x, view), schedule, eps, normalize), view)
    if adaptive:
        o = np.sum(x * o) * o
    return o * shape_scale(view, variant, **scale_kwargs)  # type: ignore[arg-type]


CASES = [
    ("torch", "out_in", [(5, 7), (9, 4), (5, 7)]),
    ("torch", "out_in", [(1, 13), (13, 1), (64, 64)]),
    ("reference", "out_in", [(4, 3, 2, 2), (6, 2, 3, 1)]),  # conv weights, flattened
    ("optax", "in_out", [(3, 6, 10), (2, 2, 5, 3)]),  # batches of [in, out]
    ("optax", MuonDimensionNumbers((0, 2), 1), [(4, 5, 6)]),
    ("optax", MuonDimensionNumbers(1, (0, 2)), [(4, 5, 6), (3, 7, 2)]),
    ("optax", None, [(30, 50), (70, 20)]),
]


@pytest.mark.parametrize(
    "variant, spec, shapes", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_float64_matches_the_reference(queue, variant, spec, shapes):
    rng = np.random.default_rng(len(shapes))
    xs = [rng.standard_normal(s) for s in shapes]
    eps = 1e-7 if variant != "optax" else 1e-8
    tx = orthogonalize_by_newton_schulz(variant=variant, layout=spec, eps=eps)
    out, _ = tx.update([cla.to_device(queue, x) for x in xs], tx.init(None))
    for x, o in zip(xs, out, strict=True):
        want = _want(x, spec or "in_out", variant, eps=eps)
        np.testing.assert_allclose(o.get(), want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variant, spec, shapes", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_float32_within_float32_rounding_of_the_reference(queue, variant, spec, shapes):
    """Five iterations of a polynomial with coefficients ~5 amplify rounding: a few 1e-6
    of entries that are O(1)."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    tx = orthogonalize_by_newton_schulz(variant=variant, layout=spec, eps=1e-7)
    out, _ = tx.update([cla.to_device(queue, x) for x in xs], None)
    for x, o in zip(xs, out, strict=True):
        want = _want(x.astype(np.float64), spec, variant, eps=1e-7)
        np.testing.assert_allclose(o.get(), want, rtol=0, atol=5e-6)


@pytest.mark.parametrize("normalize", ["clamp", "add", "aol", "schatten"])
def test_the_gram_iteration_matches_the_plain_one(queue, normalize, monkeypatch):
    """Matrices at least twice as wide as tall iterate on ``R = X X^T`` (``Q X`` at the end,
    every ``m x m`` product symmetric, ``X`` and ``R`` recomputed every 3 iterations): the
    plain iteration's result to float64 rounding, and in float32 as accurate as the plain
    float32 iteration, on well- and ill-conditioned (singular values from 1 to 1e-6)
    matrices, in both orientations, with a fixed and a per-step schedule."""
    rng = np.random.default_rng(11)
    u, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    v, _ = np.linalg.qr(rng.standard_normal((40, 12)))
    xs = [rng.standard_normal((3, 12, 40)), (u * np.logspace(0, -6, 12)) @ v.T,
          rng.standard_normal((2, 36, 9))]  # fmt: skip
    views = [matrix_view(x.shape, "in_out") for x in xs]
    assert _ns.uses_gram_iteration(12, 40, 5) and _ns.uses_gram_iteration(9, 36, 5)
    assert not _ns.uses_gram_iteration(12, 23, 5) and not _ns.uses_gram_iteration(9, 36, 1)

    def run(dtype, schedule, aspect):
        monkeypatch.setattr(_ns, "GRAM_ASPECT", aspect)
        leaves = [cla.to_device(queue, x.astype(dtype)) for x in xs]
        out = _ns.orthogonalize(queue, leaves, views, schedule, 1e-7, normalize, [1.0] * 3)
        return [o.get().astype(np.float64) for o in out]

    for schedule in ([COEFFS] * 5, DION):
        exact = run(np.float64, schedule, math.inf)
        for got, want in zip(run(np.float64, schedule, _ns.GRAM_ASPECT), exact, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        plain32 = run(np.float32, schedule, math.inf)
        gram32 = run(np.float32, schedule, _ns.GRAM_ASPECT)
        for g, p, want in zip(gram32, plain32, exact, strict=True):
            # (without the restart, 1.3e-4 to 3.1e-4 on the ill-conditioned one: 25-50x)
            assert np.abs(g - want).max() <= 2 * np.abs(p - want).max() + 1e-6


def test_shape_scales_tables_adaptive_and_no_iterations(queue):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(s) for s in [(6, 9), (2, 6, 9), (12, 5)]]
    dev = [cla.to_device(queue, x) for x in xs]
    cases = [
        (dict(variant="torch", adjust_lr_fn="match_rms_adamw", layout="out_in"),
         dict(adjust_lr_fn="match_rms_adamw"), {}),
        (dict(variant="optax", consistent_rms=0.2, adaptive=True, layout="in_out"),
         dict(consistent_rms=0.2), dict(adaptive=True)),
        (dict(variant="optax", ns_coefficients=DION, layout="in_out"), {}, dict(schedule=DION)),
        (dict(variant="optax", ns_coefficients=DION[:2], ns_steps=4, layout="in_out"), {},
         dict(schedule=DION[:2])),
    ]  # fmt: skip
    for kwargs, scale_kwargs, want_kwargs in cases:
        tx = orthogonalize_by_newton_schulz(eps=1e-8, **kwargs)  # type: ignore[arg-type]
        out, _ = tx.update(dev, None)
        for x, o in zip(xs, out, strict=True):
            want = _want(x, kwargs["layout"], kwargs["variant"], eps=1e-8, **want_kwargs,
                         **scale_kwargs)  # fmt: skip
            np.testing.assert_allclose(o.get(), want, rtol=1e-12, atol=1e-12, err_msg=str(kwargs))
    out, _ = orthogonalize_by_newton_schulz(ns_steps=0, layout="in_out", shape_scale=False).update(
        dev[:1], None
    )
    x = xs[0]
    np.testing.assert_allclose(out[0].get(), x / (np.linalg.norm(x) + 1e-8), rtol=1e-15)


def test_packed_separate_and_batch_position_give_the_same_bits(queue):
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(6, 9), (3, 6, 9), (12, 5)]]
    tx = orthogonalize_by_newton_schulz(variant="torch")
    separate, _ = tx.update([cla.to_device(queue, x) for x in xs], None)
    packed, _ = tx.update(no.pack([cla.to_device(queue, x) for x in xs]), None)
    for a, b in zip(separate, packed, strict=True):
        assert a.get().tobytes() == b.get().tobytes()
    alone, _ = tx.update([cla.to_device(queue, xs[1][2])], None)  # the same matrix, alone
    assert alone[0].get().tobytes() == separate[1].get()[2].tobytes()


@pytest.mark.parametrize(
    "shape, steps, launches",
    [((8, 12), 3, 3 + 6 * 3), ((8, 24), 3, 2 + 8 * 3), ((8, 24), 5, 2 + 8 * 5 - 1)],
)
def test_launches_per_group_do_not_grow_with_the_number_of_matrices(queue, shape, steps, launches):
    """``8 x 12``: the plain iteration, 3 + 6 per step; ``8 x 24`` (at least twice as wide as
    tall): the Gram iteration, 2 + 8 per step, 1 fewer per restart (5 steps: one)."""
    rng = np.random.default_rng(5)
    tx = orthogonalize_by_newton_schulz(variant="torch", ns_steps=steps)
    counts = []
    for n in (1, 12):
        leaves = [cla.to_device(queue, rng.standard_normal(shape).astype(np.float32))
                  for _ in range(n)]  # fmt: skip
        leaves.append(cla.to_device(queue, rng.standard_normal((4, *shape)).astype(np.float32)))
        with count_launches() as c:
            tx.update(leaves, None)
        counts.append(c.launches)
    assert counts == [launches] * 2


def test_the_input_is_never_written(queue):
    """pytorch#190597: torch 2.13 normalises a bf16 momentum buffer in place."""
    rng = np.random.default_rng(6)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        x = cla.to_device(queue, rng.standard_normal((2, 16, 8)).astype(dtype))
        before = x.get().tobytes()
        orthogonalize_by_newton_schulz(variant="torch").update([x], None)
        assert x.get().tobytes() == before


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_half_leaves_iterate_in_float32_and_round_once(queue, dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((12, 20)).astype(dtype)
    out, _ = orthogonalize_by_newton_schulz(variant="torch", eps=1e-7).update(
        [cla.to_device(queue, x)], None
    )
    assert out[0].dtype == np.dtype(dtype)
    want = _want(x.astype(np.float64), "out_in", "torch", eps=1e-7)
    ulp = np.abs(want.astype(dtype).astype(np.float64) - want).max() * 2 + 1e-5
    np.testing.assert_allclose(out[0].get().astype(np.float64), want, rtol=0, atol=ulp * 1.01)


def test_non_finite_input_gives_non_finite_output(queue):
    x = np.ones((4, 6), np.float32)
    x[1, 2] = np.nan
    out, _ = orthogonalize_by_newton_schulz(variant="torch").update([cla.to_device(queue, x)], None)
    assert np.isnan(out[0].get()).all()


def test_errors_name_the_problem(queue):
    vec = {"w": cla.zeros(queue, (3, 4), np.float32), "bias": cla.zeros(queue, (4,), np.float32)}
    with pytest.raises(ValueError, match=r"bias.*ndim >= 2"):
        orthogonalize_by_newton_schulz(variant="torch").update(vec, None)
    with pytest.raises(ValueError, match="2-D leaves unless weight dimension numbers"):
        orthogonalize_by_newton_schulz().update([cla.zeros(queue, (2, 3, 4), np.float32)], None)
    with pytest.raises(ValueError, match="variant"):
        orthogonalize_by_newton_schulz(variant="keras")
    with pytest.raises(ValueError, match="preconditioning"):
        orthogonalize_by_newton_schulz(preconditioning="svd")
    with pytest.raises(ValueError, match="exactly 3 values"):
        orthogonalize_by_newton_schulz(ns_coefficients=(1.0, 2.0))
    with pytest.raises(ValueError, match="Not enough coeffs"):
        orthogonalize_by_newton_schulz(ns_coefficients=DION, ns_steps=3)
    with pytest.raises(ValueError, match="Adjust learning rate function"):
        orthogonalize_by_newton_schulz(variant="torch", adjust_lr_fn="nope")
    with pytest.raises(ValueError, match="layout"):
        orthogonalize_by_newton_schulz(layout="rows")
    with pytest.raises(TypeError, match=r"not a pyopencl\.array\.Array"):
        orthogonalize_by_newton_schulz().update([np.zeros((2, 2))], None)


def test_a_tree_of_layouts_and_a_callable(queue):
    rng = np.random.default_rng(9)
    host = {"attn": rng.standard_normal((6, 10)), "heads": rng.standard_normal((4, 3, 5))}
    tree = {k: cla.to_device(queue, v) for k, v in host.items()}
    specs = {"attn": None, "heads": MuonDimensionNumbers(1, 2)}
    for layout in (specs, lambda updates: specs):
        out, _ = orthogonalize_by_newton_schulz(layout=layout).update(tree, None)
        np.testing.assert_allclose(out["attn"].get(), _want(host["attn"], "in_out", "optax",
                                   eps=1e-8), atol=1e-13)  # fmt: skip
        np.testing.assert_allclose(out["heads"].get(), _want(host["heads"], specs["heads"],
                                   "optax", eps=1e-8), atol=1e-13)  # fmt: skip


# ---------------------------------------------------------------------------- ZeRO


def test_zero_shards_hold_whole_leaves():
    tx = no.chain(orthogonalize_by_newton_schulz(variant="torch"), no.scale(-0.1))
    assert shard_block(tx) == WHOLE_LEAVES
    assert shard_block(no.sgd(0.1)) != WHOLE_LEAVES
    sizes = [12, 400, 7, 300]
    bounds = shard_bounds(sum(sizes), 2, sizes, WHOLE_LEAVES)
    starts = {0, 12, 412, 419, 719}
    assert all(lo in starts and hi in starts for lo, hi in bounds)
    assert _whole_leaves(((3, 4), (20, 20)), 12, 412) == ((20, 20),)
    with pytest.raises(ValueError, match="whole leaves"):
        _whole_leaves(((3, 4), (20, 20)), 0, 100)


def test_sharded_equals_unsharded_on_one_rank(queue):
    MPI = pytest.importorskip("mpi4py.MPI")
    from netcl_optim import distributed as dist

    rng = np.random.default_rng(10)
    host = {k: rng.standard_normal(s).astype(np.float32)
            for k, s in {"a": (8, 12), "b": (12, 8), "c": (2, 5, 6)}.items()}  # fmt: skip
    params = no.pack(no.to_device(host))
    tx = no.chain(orthogonalize_by_newton_schulz(variant="torch"), no.scale(-0.1))
    stx = dist.shard_optimizer(tx, MPI.COMM_SELF)
    p_ref, p_shard = params, params
    s_ref, s_shard = tx.init(params), stx.init(params)
    for seed in range(2):
        g = no.to_device({k: np.random.default_rng(seed).standard_normal(v.shape)
                          .astype(np.float32) for k, v in host.items()})  # fmt: skip
        p_ref, s_ref = no.step(tx, p_ref, g, s_ref)
        p_shard, s_shard = dist.sharded_step(stx, p_shard, g, s_shard)
    ref, got = no.to_host(p_ref), no.to_host(p_shard)
    for k in host:
        assert got[k].tobytes() == ref[k].tobytes()


@pytest.mark.parametrize("preconditioning", ["frobenius", "aol", "schatten"])
def test_optax_preconditionings_match_optax(queue, preconditioning):
    pytest.importorskip("optax")
    import jax.numpy as jnp
    from jax_x64 import jax_x64
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    rng = np.random.default_rng(11)
    xs = [rng.standard_normal(s) for s in [(6, 9), (14, 5), (8, 8)]]
    tx = orthogonalize_by_newton_schulz(
        preconditioning=preconditioning, shape_scale=False, ns_coefficients=DION
    )
    out, _ = tx.update([cla.to_device(queue, x) for x in xs], None)
    with jax_x64():
        for x, o in zip(xs, out, strict=True):
            want = orthogonalize_via_newton_schulz(
                jnp.asarray(x), jnp.asarray(DION), 5, preconditioning, 1e-8
            )
            np.testing.assert_allclose(o.get(), np.asarray(want), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="spectral"):
        orthogonalize_by_newton_schulz(preconditioning="spectral")


# -- ns_dtype="bfloat16": torch's precision ---------------------------------------------------


@pytest.mark.parametrize(
    "variant, spec, shapes", [CASES[0], CASES[2], CASES[3]], ids=["torch", "reference", "optax"]
)
@pytest.mark.parametrize("native", [True, False], ids=["native", "portable"])
@pytest.mark.parametrize("panels", [True, False], ids=["panels", "packed"])
def test_bfloat16_iteration_matches_its_reference_bit_for_bit(
    queue, variant, spec, shapes, native, panels, monkeypatch
):
    """Every rounding of the bfloat16 iteration (input, norm, X, each product's operands and
    result, float32 sums by pairs) reproduced in numpy: the same bits, natively (where the
    device has AVX-512 BF16) or not, with ``X`` kept in panels (``_ns_panels``, where the
    device's tile allows) or packed from float32 every product, and for wide matrices too
    (no Gram iteration)."""
    if not native:
        monkeypatch.setenv("NETCL_OPTIM_NATIVE_BF16", "0")
    if not panels:
        monkeypatch.setattr(_ns, "panel_tile", lambda device: None)
    rng = np.random.default_rng(21)
    # (6, 40): wide; (96, 48): tall, and multiples of the panels (their vector packs)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [*shapes, (6, 40), (96, 48)]]
    eps = 1e-7
    tx = orthogonalize_by_newton_schulz(
        variant=variant, layout=spec, eps=eps, shape_scale=False, ns_dtype="bfloat16"
    )
    out, _ = tx.update([cla.to_device(queue, x) for x in xs], None)
    normalize = "clamp" if variant == "torch" else "add"
    for x, o in zip(xs, out, strict=True):
        view = matrix_view(x.shape, spec)
        stack = rm.to_matrices(x, view).astype(np.float32)
        want = rm.from_matrices(rm.newton_schulz_bf16(stack, [COEFFS] * 5, eps, normalize), view)
        assert o.dtype == np.float32
        np.testing.assert_array_equal(o.get(), want.astype(np.float32))


def test_bfloat16_iteration_is_torchs_to_bfloat16_rounding(queue):
    """Against torch's algorithm in float64 with bfloat16 storage (``rm.newton_schulz``
    rounding each stored value): the differences are those of float32 sums, a few bfloat16
    steps at most, where the float32 iteration differs by torch's whole rounding."""
    rng = np.random.default_rng(22)
    x = rng.standard_normal((48, 80)).astype(np.float32)
    torch_like = rm.newton_schulz(x.astype(np.float64), [COEFFS] * 5, 1e-7, "clamp", rm.bf16_round)
    errors = {}
    for ns_dtype in (None, "bfloat16"):
        tx = orthogonalize_by_newton_schulz(
            variant="torch", eps=1e-7, shape_scale=False, ns_dtype=ns_dtype
        )
        out, _ = tx.update([cla.to_device(queue, x)], None)
        errors[ns_dtype] = np.abs(out[0].get() - torch_like).max()
    assert errors["bfloat16"] < 0.02 and errors["bfloat16"] < errors[None] / 2, errors


@pytest.mark.parametrize("panels", [True, False], ids=["panels", "packed"])
def test_bfloat16_launches(queue, panels, monkeypatch):
    """Wide matrices included (the plain iteration): ``X`` in panels, 5 + 5 per step (``X``
    packed once in each layout); else 3 + 7 (``X`` and ``B`` packed for every product)."""
    if not panels:
        monkeypatch.setattr(_ns, "panel_tile", lambda device: None)
    launches = 5 + 5 * 3 if _ns.panel_tile(queue.device) else 3 + 7 * 3
    rng = np.random.default_rng(23)
    for shape in ((8, 12), (8, 24)):
        tx = orthogonalize_by_newton_schulz(variant="torch", ns_steps=3, ns_dtype="bfloat16")
        leaves = [cla.to_device(queue, rng.standard_normal(shape).astype(np.float32))
                  for _ in range(3)]  # fmt: skip
        with count_launches() as c:
            tx.update(leaves, None)
        assert c.launches == launches


def test_bfloat16_errors(queue):
    with pytest.raises(ValueError, match="ns_dtype must be None"):
        orthogonalize_by_newton_schulz(ns_dtype="float16")
    with pytest.raises(ValueError, match="ns_dtype must be None"):
        orthogonalize_by_newton_schulz(ns_dtype=np.float32)
    tx = orthogonalize_by_newton_schulz(variant="torch", ns_dtype="bfloat16")
    with pytest.raises(ValueError, match="not float64"):
        tx.update([cla.zeros(queue, (4, 6), np.float64)], None)


def test_bfloat16_adaptive_reads_the_result_as_the_leaf_lies(queue):
    """optax's ``adaptive`` (``<M, O> O``) after the bfloat16 iteration, on a tall leaf (the
    iteration runs on its transpose; the panel loop writes ``O`` back untransposed) and a
    wide one: the dot over the leaf, then the scale, against the emulated ``O``."""
    rng = np.random.default_rng(24)
    xs = [rng.standard_normal(s).astype(np.float32) for s in ((96, 48), (16, 40))]
    tx = orthogonalize_by_newton_schulz(
        variant="optax", layout="in_out", adaptive=True, shape_scale=False, ns_dtype="bfloat16"
    )
    out, _ = tx.update([cla.to_device(queue, x) for x in xs], None)
    for x, o in zip(xs, out, strict=True):
        view = matrix_view(x.shape, "in_out")
        stack = rm.to_matrices(x, view).astype(np.float32)
        ortho = rm.from_matrices(rm.newton_schulz_bf16(stack, [COEFFS] * 5, 1e-8, "add"), view)
        want = np.sum(x.astype(np.float64) * ortho) * ortho
        np.testing.assert_allclose(o.get(), want, rtol=2e-6, atol=1e-6)
