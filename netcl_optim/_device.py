"""Device layer: the default context and queue, one memory pool per queue, host/device copies."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla
import pyopencl.tools as cl_tools

Array = cla.Array

_lock = threading.Lock()
_default_queue: cl.CommandQueue | None = None
_pools: dict[cl.CommandQueue, cl_tools.MemoryPool] = {}

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def default_queue() -> cl.CommandQueue:
    """The library's default in-order queue, created on first use.

    ``PYOPENCL_CTX`` chooses the device as in pyopencl; without it the first device of the
    first platform is used, with no prompt.
    """
    global _default_queue
    with _lock:
        if _default_queue is None:
            if os.environ.get("PYOPENCL_CTX"):
                ctx = cl.create_some_context(interactive=False)
            else:
                platforms = cl.get_platforms()
                if not platforms:
                    raise RuntimeError(
                        "no OpenCL platform found: install netcl_optim[cpu] (pyopencl[pocl]) "
                        "for a CPU device, or a GPU vendor's OpenCL driver"
                    )
                devices = [d for p in platforms for d in p.get_devices()]
                if not devices:
                    raise RuntimeError("OpenCL platforms found, but no devices")
                ctx = cl.Context([devices[0]])
            _default_queue = cl.CommandQueue(ctx)
        return _default_queue


def set_default_queue(queue: cl.CommandQueue) -> None:
    """Use ``queue`` (in-order) wherever the library needs a queue and none is given."""
    global _default_queue
    if queue.properties & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE:
        raise ValueError("netcl_optim needs an in-order command queue")
    with _lock:
        _default_queue = queue


def allocator(queue: cl.CommandQueue) -> cl_tools.MemoryPool:
    """The memory pool of ``queue`` (one per queue: a shared pool gave wrong results)."""
    pool = _pools.get(queue)
    if pool is None:
        with _lock:
            pool = _pools.get(queue)
            if pool is None:
                pool = cl_tools.MemoryPool(cl_tools.ImmediateAllocator(queue))
                _pools[queue] = pool
    return pool


_side_queues: dict[cl.CommandQueue, cl.CommandQueue | None] = {}
_OUT_OF_ORDER = cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE


def side_queue(queue: cl.CommandQueue) -> cl.CommandQueue | None:
    """An out-of-order queue beside ``queue``, for many independent launches (per-leaf
    kernels), or ``None`` where they are better left in order.

    Only CPU devices get one: PoCL's in-order queue spends ~8 us between commands, which an
    out-of-order queue of ready commands avoids (``benchmarks/per_leaf_launches.py``). It
    allocates nothing: buffers still come from ``queue``'s pool.
    """
    if queue in _side_queues:
        return _side_queues[queue]
    with _lock:
        if queue not in _side_queues:
            device = queue.device
            side = None
            if device.type & cl.device_type.CPU and device.queue_properties & _OUT_OF_ORDER:
                side = cl.CommandQueue(queue.context, device, properties=_OUT_OF_ORDER)
            _side_queues[queue] = side
    return _side_queues[queue]


_fp64: dict[cl.Device, bool] = {}


def has_fp64(device: cl.Device) -> bool:
    """Whether ``device`` does float64 arithmetic (cl_khr_fp64), cached per device."""
    ok = _fp64.get(device)
    if ok is None:
        ok = _fp64[device] = "cl_khr_fp64" in device.extensions or device.double_fp_config != 0
    return ok


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic type of a storage dtype: half is storage only, math is float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def state_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of optimizer state for parameters of ``dtype`` (float32 for half parameters)."""
    return compute_dtype(dtype)


def check_float_dtype(dtype: np.dtype, queue: cl.CommandQueue, where: str) -> None:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype {dtype} is not supported (float16, float32, float64)")
    if dtype == np.float64 and not has_fp64(queue.device):
        raise TypeError(f"{where}: float64 needs a device with cl_khr_fp64 ({queue.device.name})")


def _is_array_leaf(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic, cla.Array, float, int)) and not isinstance(
        x, bool
    )


def to_device(tree: Any, queue: cl.CommandQueue | None = None) -> Any:
    """Copy every leaf of ``tree`` (numpy arrays or numbers) to the device.

    Leaves keep their dtype (Python floats become float32, numpy scalars keep theirs);
    device arrays already on ``queue``'s context pass through. ``None`` leaves stay ``None``.
    """
    queue = queue or default_queue()
    pool = allocator(queue)

    def one(x: Any) -> Any:
        if isinstance(x, cla.Array):
            if x.context != queue.context:
                raise ValueError("to_device: array belongs to another OpenCL context")
            return x
        a = np.asarray(x)
        if type(x) is float:  # a Python float (not np.float64, a subclass) becomes float32
            a = a.astype(np.float32)
        if a.dtype.kind == "f":
            check_float_dtype(a.dtype, queue, "to_device")
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        return cla.to_device(queue, a, allocator=pool)

    return optree.tree_map(one, tree)


def to_host(tree: Any) -> Any:
    """Copy every device array leaf of ``tree`` to a numpy array (a host sync)."""
    return optree.tree_map(lambda x: x.get() if isinstance(x, cla.Array) else x, tree)


def queue_of(*trees: Any) -> cl.CommandQueue:
    """The queue of the first device array found in ``trees``, else the default queue."""
    for tree in trees:
        for leaf in optree.tree_leaves(tree):
            if isinstance(leaf, cla.Array) and leaf.queue is not None:
                return leaf.queue
    return default_queue()
