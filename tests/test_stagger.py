"""Staggered packed buffers: large fresh buffers start at a rotating offset in their pool
allocation (``_packing.stagger_bytes``). Results must not depend on it: every path that
allocates packed buffers is run with staggering forced on for all sizes and compared, bit for
bit, with the same run unstaggered."""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pytest

import netcl_optim as no
from netcl_optim import _packing


def test_stagger_offsets_are_aligned_rotating_and_only_for_large_buffers():
    assert _packing.stagger_bytes(_packing.STAGGER_FROM_BYTES - 1) == 0
    shifts = [_packing.stagger_bytes(_packing.STAGGER_FROM_BYTES) for _ in range(64)]
    assert all(s % 64 == 0 and 0 <= s < 4096 for s in shifts)
    assert len(set(shifts)) == 64  # 64 consecutive buffers all start at different phases


def test_large_allocation_is_staggered_and_in_bounds(cl_queue):
    n = _packing.STAGGER_FROM_BYTES // 4 + 3
    blocks = [_packing.layout(((n,),), np.dtype(np.float32)).allocate(cl_queue) for _ in range(2)]
    assert blocks[0].offset != blocks[1].offset
    for block in blocks:
        (view,) = block.views
        assert view.offset == block.offset and view.size == n
        assert block.buffer.size >= block.offset + block.nbytes
        block.fill(cl_queue, 1.5)
        np.testing.assert_array_equal(view.get(), np.full(n, 1.5, np.float32))


def _write(view, host):
    """Copy ``host`` into the device view (which may start anywhere in its buffer)."""
    if host.size:
        cl.enqueue_copy(
            view.queue, view.base_data, np.ascontiguousarray(host), dst_offset=view.offset
        )


def _params(rng):
    shapes = [(33, 7), (5,), (0,), (4, 4, 3), ()]
    return {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}


def _run_all_paths(cl_queue, tmp_path):
    """Every allocating path once; returns the host results."""
    rng = np.random.default_rng(0)
    host_p, host_g = _params(rng), _params(rng)
    out = {}

    params = no.pack(no.to_device(host_p, cl_queue))
    grads = no.pack(no.to_device(host_g, cl_queue))
    tx = no.chain(no.clip_by_global_norm(1.0), no.adamw(1e-2, weight_decay=0.1))
    state = tx.init(params)
    p1, s1 = no.step(tx, params, grads, state)  # pure: fresh outputs
    p2, s2 = no.step(tx, p1, grads, s1, donate=True)
    updates, s3 = tx.update(grads, s2, p2)
    p3 = no.apply_updates(p2, updates)
    out["functional"] = no.to_host((p3, s3))

    unscaled, found = no.unscale_grads(grads, 4.0)
    out["unscale"] = no.to_host((unscaled, found))

    model = [no.Parameter(no.to_device(a, cl_queue)) for a in host_p.values()]
    opt = no.Adam(model, lr=1e-2)
    for _ in range(2):
        opt.zero_grad(set_to_none=False)  # packed grad buffer, zeroed by one fill
        for p, g in zip(model, host_g.values(), strict=True):
            _write(p.grad, g)
        opt.step()
    path = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}.npz"
    no.save(path, opt)
    restored = no.Adam([no.Parameter(no.to_device(a, cl_queue)) for a in host_p.values()])
    no.load(path, restored)
    out["stateful"] = [p.data.get() for p in model]
    out["restored"] = restored.state_dict()["state"]
    out["loaded_tree"] = no.to_host(no.load(_saved_tree(tmp_path, (p3, s3)), queue=cl_queue))
    return out


def _saved_tree(tmp_path, tree):
    path = tmp_path / f"tree{len(list(tmp_path.iterdir()))}.npz"
    no.save(path, tree)
    return path


def _assert_bitwise_equal(a, b):
    import optree

    la, ta = optree.tree_flatten(a)
    lb, tb = optree.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_results_do_not_depend_on_staggering(cl_queue, tmp_path, monkeypatch):
    plain = _run_all_paths(cl_queue, tmp_path)
    monkeypatch.setattr(_packing, "STAGGER_FROM_BYTES", 0)
    shifted = no.pack(no.to_device({"a": np.ones(3, np.float32)}, cl_queue))["a"]
    shifted2 = no.pack(no.to_device({"a": np.ones(3, np.float32)}, cl_queue))["a"]
    assert {shifted.offset, shifted2.offset} != {0}  # staggering is really on
    staggered = _run_all_paths(cl_queue, tmp_path)
    _assert_bitwise_equal(plain, staggered)


@pytest.mark.parametrize("stagger_from", [0, None])
def test_reduce_and_clip_over_staggered_packed_grads(cl_queue, monkeypatch, stagger_from):
    if stagger_from is not None:
        monkeypatch.setattr(_packing, "STAGGER_FROM_BYTES", stagger_from)
    rng = np.random.default_rng(1)
    host = _params(rng)
    model = [no.Parameter(no.to_device(a, cl_queue)) for a in host.values()]
    opt = no.SGD(model, lr=0.1)
    opt.zero_grad(set_to_none=False)
    for p, g in zip(model, host.values(), strict=True):
        _write(p.grad, g)
    norm = no.clip_grad_norm_device(model, max_norm=0.5)
    expected = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in host.values()))
    np.testing.assert_allclose(float(norm.get().ravel()[0]), expected, rtol=1e-6)
