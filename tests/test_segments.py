"""Segment reductions (a value per leaf or per row, fusion/_segments.py): constant launch
counts, the same bits packed or separate, zero norms, per-leaf state and its errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import netcl_optim as no
from netcl_optim.fusion import count_launches
from netcl_optim.fusion._launch import TILE
from netcl_optim.fusion._segments import CHUNK, segmentation

# leaves below, at and above a work-group and a reduce chunk, a 0-d one and an empty one
SHAPES = [(TILE - 1,), (TILE,), (3, TILE + 5), (CHUNK + 3,), (), (0,), (2, CHUNK // 3)]


def _tree(rng: np.random.Generator, dtype=np.float32, shapes=SHAPES) -> list[np.ndarray]:
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _run(tx, params, grads, packed: bool, queue):
    ps = no.to_device(params, queue)
    if packed:
        ps = no.pack(ps)
    state = tx.init(ps)
    for g in grads:
        gd = no.to_device(g, queue)
        ps, state = no.step(tx, ps, no.pack(gd) if packed else gd, state)
    return [p.get() for p in ps], state


@pytest.mark.parametrize("make", [lambda: no.lamb(1e-2, weight_decay=0.1),
                                  lambda: no.novograd(1e-2),
                                  lambda: no.chain(no.centralize(), no.sgd(0.1))],
                         ids=["lamb", "novograd", "centralize"])  # fmt: skip
def test_packed_and_separate_give_the_same_bits(cl_queue, make):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(4)]
    a, _ = _run(make(), params, grads, True, cl_queue)
    b, _ = _run(make(), params, grads, False, cl_queue)
    assert [x.tobytes() for x in a] == [x.tobytes() for x in b]


def test_sums_are_the_float64_sums(cl_queue):
    """Norms of leaves longer than a chunk, in float64, to rounding."""
    rng = np.random.default_rng(1)
    params = _tree(rng, np.float64)
    grads = _tree(rng, np.float64)
    tx = no.scale_by_trust_ratio(trust_coefficient=1.0)
    u, _ = tx.update(no.pack(no.to_device(grads, cl_queue)), tx.init([]),
                     no.pack(no.to_device(params, cl_queue)))  # fmt: skip
    for got, g, p in zip(u, grads, params, strict=True):
        pn, gn = np.linalg.norm(p), np.linalg.norm(g)
        ratio = 1.0 if pn == 0 or gn == 0 else pn / gn
        np.testing.assert_allclose(got.get(), g * ratio, rtol=1e-13, atol=0)


def test_launches_do_not_grow_with_the_number_of_leaves(cl_queue):
    """A packed LAMB step: the Adam kernel, one reduce, one finish and the full and partial
    work-groups, for 3 leaves or 160."""
    counts = []
    for n_leaves in (3, 160):
        rng = np.random.default_rng(n_leaves)
        shapes = [(int(k),) for k in rng.integers(1, 5000, n_leaves)]
        ps = no.pack(no.to_device(_tree(rng, shapes=shapes), cl_queue))
        tx = no.lamb(1e-3)
        state = tx.init(ps)
        g = no.pack(no.to_device(_tree(rng, shapes=shapes), cl_queue))
        ps, state = no.step(tx, ps, g, state)
        with count_launches() as c:
            no.step(tx, ps, g, state)
        counts.append(c.launches)
    assert counts[0] == counts[1] <= 6, counts


def test_zero_leaves_keep_the_rules_value(cl_queue):
    """A zero param leaf or a zero update leaf: trust ratio 1 (LAMB, LARS, Fromage step as
    their rule says, no NaN); NovoGrad's zero-gradient leaf does not move."""
    shapes = [(4, 3), (5,)]
    params = [np.zeros(shapes[0], np.float32), np.ones(shapes[1], np.float32)]
    grads = [np.ones(shapes[0], np.float32), np.zeros(shapes[1], np.float32)]
    for tx in (no.lamb(0.1), no.lars(0.1), no.fromage(0.1), no.novograd(0.1)):
        got, _ = _run(tx, params, [grads, grads], True, cl_queue)
        assert all(np.isfinite(x).all() for x in got)
        np.testing.assert_array_equal(got[1], params[1] * (got[1][0] / params[1][0]))
    tx = no.scale_by_trust_ratio()
    u, _ = tx.update(no.to_device(grads, cl_queue), tx.init([]), no.to_device(params, cl_queue))
    assert [x.get().tobytes() for x in u] == [g.tobytes() for g in grads]  # ratio 1


def test_per_leaf_state_is_one_value_per_leaf(cl_queue):
    rng = np.random.default_rng(2)
    params = _tree(rng)
    ps = no.to_device(params, cl_queue)
    state = no.scale_by_novograd().init(ps)
    assert [x.shape for x in state.nu] == [()] * len(SHAPES)
    assert [x.dtype for x in state.nu] == [np.dtype(np.float32)] * len(SHAPES)
    g = _tree(rng)
    _u, new = no.scale_by_novograd().update(no.to_device(g, cl_queue), state, ps)
    for nu, x in zip(new.nu, g, strict=True):  # the first step: ||g||^2
        np.testing.assert_allclose(nu.get(), np.sum(x.astype(np.float64) ** 2), rtol=1e-6)
    assert all(float(x.get()) == 0.0 for x in state.nu)  # pure: the old state is untouched


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda nu: [np.zeros(2, np.float32), *nu[1:]], "shape"),
        (lambda nu: [nu[0].astype(np.float64), *nu[1:]], "dtype"),
        (lambda nu: nu[:-1], "tree structure"),
    ],
    ids=["shape", "dtype", "structure"],
)
def test_bad_per_leaf_state_is_refused_and_nothing_changes(cl_queue, bad, match):
    rng = np.random.default_rng(3)
    params = _tree(rng, shapes=[(3, 2), (4,)])
    ps = no.to_device(params, cl_queue)
    tx = no.scale_by_novograd()
    state = tx.init(ps)
    host_nu = [x.get() for x in state.nu]
    broken = state._replace(nu=no.to_device(bad(host_nu), cl_queue))
    before = [x.get().tobytes() for x in state.mu]
    with pytest.raises((ValueError, TypeError), match=match):
        tx.update(no.to_device(_tree(rng, shapes=[(3, 2), (4,)]), cl_queue), broken, ps)
    assert [x.get().tobytes() for x in state.mu] == before


def test_rows_segments():
    """Rows of a leaf of ndim >= 2 are segments; a vector is one segment, not reduced."""
    seg = segmentation(((3, 4), (5,), ()), "rows")
    assert seg.count == 3 + 1 + 1
    assert seg.segs[:, 2].tolist() == [4, 4, 4, 0, 0]  # n: reduced rows, then none


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_adaptive_grad_clip_units_packed_or_separate(cl_queue, layout):
    """Columns (strided units) and rows, leaves over a work-group, rank 4: the same bits
    packed or separate, and the float64 reference's numbers."""
    import reference_reductions as rr

    rng = np.random.default_rng(4)
    shapes = [(TILE + 3, 5), (3, 3, 2, 7), (7,), (1, 9), (2, 3, 300)]
    params = _tree(rng, np.float64, shapes)
    grads = [3 * g for g in _tree(rng, np.float64, shapes)]
    tx = no.adaptive_grad_clip(0.05, layout=layout)
    outs = []
    for packed in (True, False):
        ps, gs = no.to_device(params, cl_queue), no.to_device(grads, cl_queue)
        if packed:
            ps, gs = no.pack(ps), no.pack(gs)
        u, _ = tx.update(gs, tx.init(ps), ps)
        outs.append([x.get() for x in u])
    assert [x.tobytes() for x in outs[0]] == [x.tobytes() for x in outs[1]]
    ref = rr.adaptive_grad_clip(0.05, layout=layout)
    want, _ = ref.update(grads, ref.init(params), params)
    for got, w in zip(outs[0], want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=0)
    assert any((got != g).any() for got, g in zip(outs[0], grads, strict=True))  # some clip


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"layout": "io"}, ValueError, "Invalid layout"),
        ({"axis": "0"}, TypeError, "Invalid axis"),
        ({"clipping": -1.0}, ValueError, "Invalid clipping"),
    ],
)
def test_adaptive_grad_clip_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        no.adaptive_grad_clip(**{"clipping": 0.1, **kwargs})


def test_adaptive_grad_clip_axes_must_fit_every_leaf(cl_queue):
    """Units over axes that are not consecutive, or a leaf without the axis: refused before
    anything runs, inputs unchanged."""
    ps = no.to_device([np.ones((2, 3, 4), np.float32), np.ones((), np.float32)], cl_queue)
    gs = no.to_device([np.ones((2, 3, 4), np.float32), np.ones((), np.float32)], cl_queue)
    for axis, match in (((0, 2), "consecutive"), (0, r"shape \(\)")):
        tx = no.adaptive_grad_clip(0.1, axis=axis)
        with pytest.raises(ValueError, match=match):
            tx.update(gs, tx.init(ps), ps)
        assert all((x.get() == 1).all() for x in [*ps, *gs])


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_norms_of_tiny_and_huge_float32_leaves(cl_queue, scale):
    """Squares that underflow or overflow float32 (|x| < 1e-19 or > 1e19): the chunk is
    summed again in double, so the norm is right (a float32 sum would give 0 or inf and
    the trust ratio would wrongly be 1)."""
    x = (np.random.default_rng(5).standard_normal(CHUNK + 7) * scale).astype(np.float32)
    got = no.leaf_norms(no.to_device([x], cl_queue))[0].get()
    if got.dtype == np.float64:  # a device with fp64
        np.testing.assert_allclose(got, np.linalg.norm(x.astype(np.float64)), rtol=1e-12)


def test_one_element_rows(cl_queue):
    """Rows of one element, back to back ((n, 1) leaves): groups span many segments (work-item
    k in segment k); centralize gives optax's zeros, AGC out_in the reference's values."""
    import reference_reductions as rr

    rng = np.random.default_rng(6)
    shapes = [(3 * TILE + 5, 1), (7, 4), (1, 1)]
    grads = _tree(rng, np.float64, shapes)
    params = _tree(rng, np.float64, shapes)
    u, _ = no.centralize().update(no.pack(no.to_device(grads, cl_queue)), no.EmptyState())
    ref = rr.centralize()
    for got, want in zip(u, ref.update(grads, ref.init(params))[0], strict=True):
        np.testing.assert_allclose(got.get(), want, rtol=0, atol=1e-15)
    tx = no.adaptive_grad_clip(0.05, layout="out_in")
    got, _ = tx.update(no.to_device(grads, cl_queue), tx.init([]), no.to_device(params, cl_queue))
    ref = rr.adaptive_grad_clip(0.05, layout="out_in")
    for g, w in zip(got, ref.update(grads, ref.init(params), params)[0], strict=True):
        np.testing.assert_allclose(g.get(), w, rtol=1e-12, atol=0)


def test_a_group_inside_one_segment_reads_its_values_once():
    """The fused kernel reads a segment value with a group-uniform index unless some group
    spans several segments (columns): a per-lane index there made PoCL gather and cut LAMB,
    LARS and NovoGrad to a third of the memory bandwidth."""
    from netcl_optim._base import Fragment
    from netcl_optim.fusion._codegen import KernelSpec, fused_source

    frag = no.scale_by_trust_ratio().plan
    assert isinstance(frag, Fragment)
    for tiling, stepped in (("full", False), ("partial", False), ("full_stepped", True),
                            ("partial_stepped", True)):  # fmt: skip
        spec = KernelSpec((frag.key,), np.dtype(np.float32), "pure", False, True, "double", tiling)
        src, _, _ = fused_source([frag], spec)
        assert ("tile[tile_row + 3]" in src) == stepped, tiling
    assert not segmentation(((3, 4), (5,)), "leaf").stepped
    assert segmentation(((40, 3),), "units:in_out").stepped  # columns


def _with_sums(monkeypatch, allowed: bool) -> None:
    """Let (or not) a fused kernel sum the next part's reduction itself (``can_sum``)."""
    from netcl_optim.fusion import _execute

    real = _execute.can_sum
    monkeypatch.setattr(_execute, "can_sum", real if allowed else lambda *a: False)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize(
    "make",
    [lambda: no.lamb(1e-2, weight_decay=0.1),
     lambda: no.chain(no.adam(1e-2), no.scale_by_param_block_rms()),
     lambda: no.chain(no.sgd(0.1, momentum=0.9), no.clip_by_block_rms(0.01))],
    ids=["lamb", "adam-block-rms", "momentum-block-clip"],
)  # fmt: skip
def test_a_kernel_that_sums_for_the_next_part_gives_the_reduce_launchs_bits(
    cl_queue, monkeypatch, make, packed, dtype
):
    """The Adam kernel of LAMB sums ||u||^2 and ||p||^2 per chunk itself (one pass fewer):
    its partials, and so every step, are the separate reduce launch's bit for bit."""
    if dtype == np.float64 and not cl_queue.device.double_fp_config:
        pytest.skip("no fp64")
    rng = np.random.default_rng(3)
    params = _tree(rng, dtype)
    grads = [_tree(rng, dtype) for _ in range(3)]
    runs = []
    for allowed in (True, False):
        _with_sums(monkeypatch, allowed)
        runs.append(_run(make(), params, grads, packed, cl_queue)[0])
    for a, b in zip(*runs, strict=True):
        assert a.tobytes() == b.tobytes()


def test_a_kernel_that_sums_for_the_next_part_saves_the_reduce_launch(cl_queue, monkeypatch):
    rng = np.random.default_rng(4)
    params = no.pack(no.to_device(_tree(rng), cl_queue))
    grads = no.pack(no.to_device(_tree(rng), cl_queue))
    tx = no.lamb(1e-2)
    state = tx.init(params)
    names = []
    for allowed in (True, False):
        _with_sums(monkeypatch, allowed)
        no.step(tx, params, grads, state)
        with count_launches() as c:
            no.step(tx, params, grads, state)
        names.append(c.kernels)
    assert not any("segsum" in k for k in names[0])  # the Adam kernel summed
    assert any("segsum" in k for k in names[1])
    assert len(names[0]) < len(names[1])


@pytest.mark.parametrize(
    "make",
    [lambda: no.lars(0.5), lambda: no.novograd(1e-2, weight_decay=1e-3),
     lambda: no.chain(no.adaptive_grad_clip(0.05), no.sgd(0.1)),
     lambda: no.chain(no.scale_by_factored_rms(min_dim_size_to_factor=2), no.sgd(0.1))],
    ids=["lars", "novograd", "agc", "factored-rms"],
)  # fmt: skip
def test_slices_cut_through_leaves_give_the_whole_trees_bits(cl_queue, make):
    """ZeRO's slices (fusion/_slices.py) in one process: each of three slices, cut inside
    leaves and inside work-groups, steps with the whole leaves' values and hands on its part
    of the updates; together they are the whole tree's updates, bit for bit. (Rules whose
    sums run over the incoming updates: an intermediate needs every rank's part, which the
    2-rank runs of tests/mpi_scripts/sharded.py gather.)"""
    from netcl_optim.fusion import Slice, sliced

    rng = np.random.default_rng(5)
    shapes = [(TILE + 7,), (3, 130), (), (40, 2 * TILE + 3)]
    params = no.pack(no.to_device(_tree(rng, shapes=shapes), cl_queue))
    grads = no.pack(no.to_device(_tree(rng, shapes=shapes), cl_queue))
    tx = make()
    want, _ = tx.update(grads, tx.init(params), params)
    total = sum(int(np.prod(s)) for s in shapes)
    bounds = [0, TILE // 3, total // 2 + 5, total]
    dtype = np.dtype(np.float32)
    parts = []
    for lo, hi in itertools.pairwise(bounds):
        g_part = _slice_view(grads, lo, hi, cl_queue)
        p_part = _slice_view(params, lo, hi, cl_queue)
        s = Slice(tuple(shapes), lo, hi, g_part, list(grads), list(params), None)
        with sliced({dtype: s}):
            state = tx.init({"float32": p_part})
            u, _ = tx.update({"float32": g_part}, state, {"float32": p_part})
        parts.append(u["float32"].get())
    got = np.concatenate(parts)
    assert got.tobytes() == np.concatenate([w.get().ravel() for w in want]).tobytes()


def _slice_view(tree, lo, hi, queue):
    """Elements ``[lo, hi)`` of a packed tree's buffer as a 1-D array."""
    from netcl_optim._packing import layout

    first = tree[0]
    item = first.dtype.itemsize
    return layout(((hi - lo,),), first.dtype).views_of(queue, first.base_data,
                                                       first.offset + lo * item)[0]  # fmt: skip
