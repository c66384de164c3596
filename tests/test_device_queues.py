"""The library waits for its queues before it builds a program and at exit: PoCL compiles a
kernel on a worker thread when it first runs it, and Debian's PoCL 3.1 crashed when the
host built another program, or the process exited, meanwhile (``_device.finish_known_queues``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyopencl as cl

from netcl_optim import _device
from netcl_optim.fusion import _programs


def test_known_queues_are_the_default_pooled_and_side_queues(cl_queue):
    other = cl.CommandQueue(cl_queue.context)
    _device.allocator(other)
    queues = _device.known_queues(cl_queue.context)
    assert any(q is cl_queue for q in queues) and any(q is other for q in queues)
    side = _device.side_queue(cl_queue)
    if side is not None:
        assert any(q is side for q in _device.known_queues())
    _device.finish_known_queues(cl_queue.context)  # (idle queues: returns at once)


def test_a_new_program_waits_for_the_queues_of_its_context(cl_queue, monkeypatch):
    waited = []
    monkeypatch.setattr(_programs, "finish_known_queues", waited.append)
    source = "__kernel void netcl_test_wait(__global float *x) { x[get_global_id(0)] = 2; }"
    _programs.build(cl_queue.context, source, "netcl_test_wait", [None])
    _programs.build(cl_queue.context, source, "netcl_test_wait", [None])  # (cached: no wait)
    assert waited == [cl_queue.context]


def test_exit_waits_for_enqueued_work():
    """A script that ends right after enqueuing a step exits cleanly, its work done (the
    atexit hook; the crash it prevents needed a cold kernel cache and came 1 run in 3)."""
    script = textwrap.dedent(
        """
        import atexit, numpy as np, netcl_optim as no
        from netcl_optim import _device
        p = no.to_device({"w": np.ones(1 << 16, np.float32)})
        tx = no.adam(1e-3)
        s = tx.init(p)
        p, s = no.step(tx, p, p, s)
        assert _device.known_queues()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
