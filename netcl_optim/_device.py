"""Device layer: the default context and queue, one memory pool per queue, host/device copies."""

from __future__ import annotations

import atexit
import os
import threading
import warnings
from typing import Any

import ml_dtypes
import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla
import pyopencl.tools as cl_tools

Array = cla.Array

_lock = threading.Lock()
_default_queue: cl.CommandQueue | None = None
_pools: dict[cl.CommandQueue, cl_tools.MemoryPool] = {}

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# params and grads (float16 and bfloat16: storage, math in float32)
FLOAT_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))
# what optimizer state may be stored as (math in float32): state_dtype= of every optimizer
STATE_STORAGE = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)


_INSTALL = (
    "pip install \"netcl_optim[cpu]\" for PoCL's CPU device, or install a GPU vendor's OpenCL "
    "driver"
)


# A kernel every OpenCL C compiler builds: a device whose compiler fails on it is unusable
_PROBE_SOURCE = "__kernel void netcl_probe(__global float *x) { x[get_global_id(0)] += 1.0f; }"

_NEWER_POCL = (
    "PoCL's compiler does not know this CPU: the PoCL inside pyopencl's wheels (3.0, LLVM 14) "
    "predates it (AMD Zen 5, for one). Install a newer PoCL (Debian and Ubuntu: apt install "
    "pocl-opencl-icd; conda: conda install -c conda-forge pocl), which the default device "
    "then picks, or choose another device with PYOPENCL_CTX"
)


def _build_failure(context: cl.Context) -> str | None:
    """``None`` when ``context``'s device builds a trivial kernel, else the compiler's error."""
    try:
        cl.Program(context, _PROBE_SOURCE).build()
    except cl.Error as e:
        return str(e).strip()
    return None


def _fix_for(reason: str) -> str:
    if "unknown target CPU" in reason:
        return _NEWER_POCL
    return f"choose another device with PYOPENCL_CTX, or {_INSTALL}"


def _platforms() -> list[cl.Platform]:
    """Every OpenCL platform; a RuntimeError that says how to get one if there is none."""
    try:
        platforms, reason, cause = cl.get_platforms(), "the ICD loader lists none", None
    except cl.Error as e:  # the ICD loader's clGetPlatformIDs fails with PLATFORM_NOT_FOUND_KHR
        platforms, reason, cause = [], str(e), e
    if platforms:
        return platforms
    vendors = os.environ.get("OCL_ICD_VENDORS")
    if vendors is not None:
        reason += f"; OCL_ICD_VENDORS={vendors!r} tells the loader where to look for drivers"
    raise RuntimeError(f"no OpenCL platform found ({reason}). To get one: {_INSTALL}") from cause


def _devices(platform: cl.Platform) -> list[cl.Device]:
    try:
        return platform.get_devices()
    except cl.Error:  # clGetDeviceIDs fails with DEVICE_NOT_FOUND on a platform without devices
        return []


def _kind(device: cl.Device) -> str:
    for flag, name in ((cl.device_type.GPU, "GPU"), (cl.device_type.CPU, "CPU")):
        if device.type & flag:
            return name
    return "accelerator"


def _inventory(platforms: list[cl.Platform]) -> str:
    """The platforms and devices found, with the indices ``PYOPENCL_CTX`` takes."""
    lines = []
    for i, platform in enumerate(platforms):
        devices = _devices(platform)
        lines.append(f"  [{i}] {platform.name.strip()}" + ("" if devices else " (no devices)"))
        lines += [f"    [{i}:{j}] {d.name.strip()} ({_kind(d)})" for j, d in enumerate(devices)]
    return "\n".join(lines)


def _default_context() -> cl.Context:
    platforms = _platforms()
    spec = os.environ.get("PYOPENCL_CTX")
    if spec:
        try:
            context = cl.create_some_context(interactive=False)
        except (cl.Error, RuntimeError) as e:
            first = next(
                (f"{i}:0" for i, p in enumerate(platforms) if _devices(p)), "<platform>:<device>"
            )
            raise RuntimeError(
                f"Invalid PYOPENCL_CTX: {spec!r} (must select available OpenCL devices as "
                f"'<platform>[:<device>]', each an index or part of a name; pyopencl: {e}). "
                f"Found:\n{_inventory(platforms)}\nSet e.g. PYOPENCL_CTX={first}, unset it to "
                f"use the first device, or, for a device not listed, {_INSTALL}"
            ) from e
        reason = _build_failure(context)
        if reason is not None:
            raise RuntimeError(
                f"PYOPENCL_CTX={spec!r} selects {_name(context.devices[0])}, whose OpenCL C "
                f"compiler fails on a trivial kernel:\n{reason}\n{_fix_for(reason)}. "
                f"Found:\n{_inventory(platforms)}"
            )
        return context
    devices = [d for p in platforms for d in _devices(p)]
    if not devices:
        raise RuntimeError(
            f"no OpenCL device found; platforms:\n{_inventory(platforms)}\nTo get one: {_INSTALL}"
        )
    failures = []
    for device in devices:
        context = cl.Context([device])
        reason = _build_failure(context)
        if reason is None:
            if failures:
                skipped = (f"{_name(d)} cannot build kernels ({_fix_for(r)})" for d, r in failures)
                message = f"netcl_optim uses {_name(device)}: " + "; ".join(skipped)
                warnings.warn(message, RuntimeWarning, stacklevel=3)
            return context
        failures.append((device, reason))
    raise RuntimeError(
        "no OpenCL device can build kernels: "
        + "\n".join(f"{_name(d)}: {r}" for d, r in failures)
        + f"\n{_fix_for(failures[0][1])}. Found:\n{_inventory(platforms)}"
    )


def _name(device: cl.Device) -> str:
    return f"{device.name.strip()} ({device.platform.name.strip()} {device.version.strip()})"


def default_queue() -> cl.CommandQueue:
    """The library's default in-order queue, created on first use.

    ``PYOPENCL_CTX`` chooses the device as in pyopencl; without it the first device, in
    platform order, whose compiler builds a trivial kernel is used, with no prompt (a
    ``RuntimeWarning`` names any device skipped, e.g. PoCL 3.0 on a CPU its LLVM 14 does not
    know).

    Raises:
      RuntimeError: no OpenCL platform or device, no device that can build a kernel, or a
        ``PYOPENCL_CTX`` that selects none or one that cannot; the message lists the
        platforms and devices found and how to fix it. Nothing is
        cached, so a later call tries again.
    """
    global _default_queue
    with _lock:
        if _default_queue is None:
            _default_queue = cl.CommandQueue(_default_context())
        return _default_queue


def set_default_queue(queue: cl.CommandQueue | None) -> None:
    """Use ``queue`` (in-order) wherever the library needs a queue and none is given.

    ``None`` resets: the next :func:`default_queue` creates a new queue as on first use
    (e.g. after changing ``PYOPENCL_CTX``). Arrays keep the queue they were created on.

    Raises:
      TypeError: ``queue`` is neither a ``pyopencl.CommandQueue`` nor ``None``.
      ValueError: an out-of-order queue.
    """
    global _default_queue
    if queue is not None:
        if not isinstance(queue, cl.CommandQueue):
            raise TypeError(
                f"Invalid queue: {queue!r} (must be a pyopencl.CommandQueue, or None to reset "
                "to the default)"
            )
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


def known_queues(context: cl.Context | None = None) -> list[cl.CommandQueue]:
    """The queues the library has worked on in this process (the default queue, every
    queue given a memory pool, their side queues), or those of ``context``."""
    with _lock:  # (a snapshot: another thread may add a pool meanwhile)
        queues = [_default_queue, *_pools, *_side_queues.values()]
    unique = {id(q): q for q in queues if q is not None}
    return [q for q in unique.values() if context is None or q.context == context]


def finish_known_queues(context: cl.Context | None = None) -> None:
    """Wait for the work enqueued on :func:`known_queues` (of ``context``) to end.

    PoCL's CPU device compiles a kernel for its work-group size on a worker thread when it
    first runs it, with the process's LLVM; a program built on the host thread meanwhile
    (``_programs.build``), or the process exiting under it (LLVM's static destructors run
    while the thread compiles), crashed Debian's PoCL 3.1 now and then with a cold kernel
    cache (a segfault in ``llvm::TargetPassConfig::addPass``, seen in CI and reproduced at
    exit in 1 of 3 runs of a docs page). So the library waits here before it builds a
    program, and at exit."""
    for queue in known_queues(context):
        try:
            queue.finish()
        except cl.Error:  # (a queue whose context is gone: nothing to wait for)
            pass


atexit.register(finish_known_queues)

_fp64: dict[cl.Device, bool] = {}


def has_fp64(device: cl.Device) -> bool:
    """Whether ``device`` does float64 arithmetic (cl_khr_fp64), cached per device."""
    ok = _fp64.get(device)
    if ok is None:
        ok = _fp64[device] = "cl_khr_fp64" in device.extensions or device.double_fp_config != 0
    return ok


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """Arithmetic type of a storage dtype: float16 and bfloat16 are storage only, math is
    float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def state_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype of optimizer state for parameters of ``dtype`` (float32 for half parameters)."""
    return compute_dtype(dtype)


def check_float_dtype(dtype: np.dtype, queue: cl.CommandQueue, where: str) -> None:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where}: dtype {dtype} is not supported (float16, bfloat16, float32, float64)"
        )
    if dtype == np.float64 and not has_fp64(queue.device):
        raise TypeError(f"{where}: float64 needs a device with cl_khr_fp64 ({queue.device.name})")


def _leaf_name(path: tuple[Any, ...]) -> str:
    return "root" + "".join(f"[{k!r}]" for k in path)


def _host_leaf(x: Any, path: tuple[Any, ...], queue: cl.CommandQueue) -> np.ndarray:
    """Leaf ``x`` (at ``path``) as the C-contiguous numpy array ``to_device`` copies."""
    a = np.asarray(x)
    if type(x) is float:  # a Python float (not np.float64, a subclass) becomes float32
        a = a.astype(np.float32)
    if a.dtype.kind == "c":
        raise TypeError(
            f"to_device: leaf {_leaf_name(path)} has complex dtype {a.dtype}: netcl_optim works "
            "on real numbers; pass the real and imaginary parts as two float arrays"
        )
    if a.dtype.kind not in "biuf" and a.dtype != BFLOAT16:
        raise TypeError(
            f"to_device: leaf {_leaf_name(path)} has dtype {a.dtype} (from "
            f"{type(x).__name__}): leaves must be numpy arrays or numbers of a bool, integer "
            "or float dtype (bfloat16: ml_dtypes.bfloat16)"
        )
    if a.dtype.kind == "f" or a.dtype == BFLOAT16:
        check_float_dtype(a.dtype, queue, f"to_device: leaf {_leaf_name(path)}")
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
    return a


def to_device(tree: Any, queue: cl.CommandQueue | None = None) -> Any:
    """Copy every leaf of ``tree`` (numpy arrays or numbers) to the device.

    Leaves keep their dtype (Python floats become float32, numpy scalars keep theirs), which
    must be bool, integer or float (float16/32/64; float64 needs cl_khr_fp64). Device arrays
    already on ``queue``'s context pass through. ``None`` leaves stay ``None``.

    Raises:
      TypeError: a leaf of another dtype (complex, str, bytes, object, datetime, structured).
      ValueError: a device array of another OpenCL context.

    Errors name the leaf (``root['w']``); every leaf is checked before anything is copied.
    """
    queue = queue or default_queue()
    paths, leaves, treedef = optree.tree_flatten_with_path(tree)
    host = []
    for path, x in zip(paths, leaves, strict=True):
        if not isinstance(x, cla.Array):
            x = _host_leaf(x, path, queue)
        elif x.context != queue.context:
            raise ValueError(
                f"to_device: leaf {_leaf_name(path)} belongs to another OpenCL context"
            )
        host.append(x)
    pool = allocator(queue)
    return treedef.unflatten(
        [x if isinstance(x, cla.Array) else cla.to_device(queue, x, allocator=pool) for x in host]
    )


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
