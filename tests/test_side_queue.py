"""Per-leaf launches on the CPU device's out-of-order side queue (``fusion._launch.launch_all``).

Results must be bit for bit those of the in-order launches; the step must still come after
the queue's earlier work and before its later work; leaves that share memory stay in order.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import optree
import pyopencl as cl
import pytest

import netcl_optim as no
from netcl_optim._device import has_fp64, side_queue
from netcl_optim.fusion import _launch
from netcl_optim.transforms._update import step_

SHAPES = [(17, 5), (3,), (), (0,), (1031,), (4, 4, 4), (64,), (9, 2)]


def _tree(rng, dtypes=(np.float32,)):
    return {
        f"w{i}": rng.standard_normal(s).astype(dtypes[i % len(dtypes)])
        for i, s in enumerate(SHAPES)
    }


@pytest.fixture
def launch_queues(monkeypatch):
    """The queues this library launched its kernels on, in order."""
    seen: list[cl.CommandQueue] = []
    real = _launch.launch

    def spy(kernel, queue, n, args):
        seen.append(queue)
        real(kernel, queue, n, args)

    monkeypatch.setattr(_launch, "launch", spy)
    return seen


def test_side_queue_is_an_out_of_order_queue_on_cpu_devices_only(cl_queue):
    side = side_queue(cl_queue)
    assert side_queue(cl_queue) is side
    if cl_queue.device.type & cl.device_type.CPU:
        assert side is not None and side.context == cl_queue.context
        assert side.properties & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    else:
        assert side is None


def test_leaves_disjoint(cl_queue):
    packed = no.pack(no.to_device([np.ones((3, 4), np.float32), np.ones(5, np.float32)]))
    a = no.to_device(np.ones(7, np.float32))
    assert _launch.leaves_disjoint([packed])
    assert _launch.leaves_disjoint([[a, packed[0]], [a, packed[1]]])  # same leaf, two roles
    assert not _launch.leaves_disjoint([[a, a]])  # one array twice: tied weights
    assert not _launch.leaves_disjoint([[a, packed[0]], [packed[0], a]])
    assert _launch.leaves_disjoint([[a[:3], a[3:]]])
    assert not _launch.leaves_disjoint([[a[:4], a[3:]]])


def _optimizers():
    return {
        "sgd": no.sgd(0.1),
        "nesterov": no.sgd(0.1, momentum=0.9, nesterov=True),
        "adam": no.adam(1e-2),
        "adamw": no.adamw(1e-2, weight_decay=0.1),
        "rmsprop": no.rmsprop(1e-2, centered=True, momentum=0.9),
        "clip+adam": no.chain(no.clip_by_global_norm(0.5), no.adam(1e-2)),
    }


def _run(tx, host_p, host_g, donate, side_from, monkeypatch, steps=3):
    monkeypatch.setattr(_launch, "SIDE_QUEUE_FROM", side_from)
    queue = no.default_queue()
    params = no.to_device(host_p)
    grads = no.to_device(host_g)
    state = tx.init(params)
    for k in range(steps):
        # new grads written by the queue just before the step: the step must see them
        for leaf, host in zip(grads.values(), host_g.values(), strict=True):
            if host.size:
                cl.enqueue_copy(queue, leaf.base_data, host * (k + 1), is_blocking=False)
        params, state = no.step(tx, params, grads, state, donate=donate)
    return no.to_host(params), no.to_host(state)


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donate"])
@pytest.mark.parametrize("name", list(_optimizers()))
def test_side_queue_gives_the_in_order_results_bit_for_bit(
    name, donate, monkeypatch, launch_queues, cl_queue
):
    if side_queue(cl_queue) is None:
        pytest.skip("no side queue on this device (not a CPU device)")
    rng = np.random.default_rng(3)
    dtypes = (np.float32, np.float64, np.float16) if has_fp64(cl_queue.device) else (np.float32,)
    host_p, host_g = _tree(rng, dtypes), _tree(rng, dtypes)
    tx = _optimizers()[name]
    expected = _run(tx, host_p, host_g, donate, 10**9, monkeypatch)
    assert side_queue(cl_queue) not in launch_queues
    got = _run(tx, host_p, host_g, donate, 1, monkeypatch)
    assert side_queue(cl_queue) in launch_queues
    for e, g in zip(*(optree.tree_leaves(x) for x in (expected, got)), strict=True):
        np.testing.assert_array_equal(e, g)


def _sgd_tree(n_leaves=20):
    params = no.to_device([np.ones(50 + k, np.float32) for k in range(n_leaves)])
    grads = no.to_device([np.ones(50 + k, np.float32) for k in range(n_leaves)])
    tx = no.sgd(0.5)
    return tx, params, grads, tx.init(params)


def test_the_step_waits_for_earlier_work_on_the_queue(monkeypatch, cl_queue):
    if side_queue(cl_queue) is None:
        pytest.skip("no side queue on this device (not a CPU device)")
    monkeypatch.setattr(_launch, "SIDE_QUEUE_FROM", 1)
    tx, params, grads, state = _sgd_tree()
    gate = cl.UserEvent(cl_queue.context)
    opener = threading.Timer(0.2, gate.set_status, [cl.command_execution_status.COMPLETE])
    cl.enqueue_barrier(cl_queue, wait_for=[gate])
    for g in grads:  # new grads, written only once the gate opens
        cl.enqueue_fill_buffer(cl_queue, g.base_data, np.float32(3.0), g.offset, g.nbytes)
    opener.start()
    try:
        params, state = no.step(tx, params, grads, state, donate=True)
    finally:
        opener.join()
    for p in no.to_host(params):
        np.testing.assert_array_equal(p, np.full(p.shape, -0.5, np.float32))  # 1 - 0.5 * 3


def test_later_work_on_the_queue_waits_for_the_step(monkeypatch, cl_queue):
    side = side_queue(cl_queue)
    if side is None:
        pytest.skip("no side queue on this device (not a CPU device)")
    monkeypatch.setattr(_launch, "SIDE_QUEUE_FROM", 1)
    tx, params, grads, state = _sgd_tree()
    gate = cl.UserEvent(cl_queue.context)
    cl.enqueue_barrier(side, wait_for=[gate])  # holds the step's kernels back
    try:
        params, state = no.step(tx, params, grads, state, donate=True)
        later = cl.enqueue_marker(cl_queue)
        cl_queue.flush()
        time.sleep(0.1)
        assert later.command_execution_status != cl.command_execution_status.COMPLETE
    finally:
        gate.set_status(cl.command_execution_status.COMPLETE)
    later.wait()
    for p in no.to_host(params):
        np.testing.assert_array_equal(p, np.full(p.shape, 0.5, np.float32))


def test_tied_leaves_are_updated_in_order(monkeypatch, launch_queues, cl_queue):
    """One array twice in a tree updated in place (the in-place path under the stateful
    layer; a donated step refuses it): its two updates must not race."""
    monkeypatch.setattr(_launch, "SIDE_QUEUE_FROM", 1)
    shared = no.to_device(np.linspace(-1, 1, 4099).astype(np.float32))
    others = [no.to_device(np.full(s, 0.5, np.float32)) for s in [(5,), (64, 3)]]
    params = [shared, *others, shared]
    grads = no.to_device([np.full(x.shape, 0.25, np.float32) for x in params])
    tx = no.sgd(0.1, momentum=0.9)
    state = tx.init(params)
    for _ in range(3):
        state = step_(tx, params, grads, state)
    assert side_queue(cl_queue) not in launch_queues
    # in order, the shared array gets both leaves' updates each step (its momentum slots
    # are separate): 3 steps of 2 updates with momentum traces 0.25, 0.475, 0.6775
    expected = np.linspace(-1, 1, 4099).astype(np.float32)
    for trace in (0.25, 0.475, 0.6775):
        for _ in range(2):
            expected = expected - np.float32(0.1) * np.float32(trace)
    np.testing.assert_allclose(params[0].get(), expected, rtol=1e-6)
