"""Device layer errors: no OpenCL platform, a bad ``PYOPENCL_CTX``, ``set_default_queue``
arguments, and leaves that ``to_device`` cannot copy.

Every test that creates a default queue restores the session's one afterwards (other tests
share it through ``conftest.cl_queue``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyopencl as cl
import pytest

import netcl_optim as no
from netcl_optim import _device

FIX = 'pip install "netcl_optim[cpu]"'


@pytest.fixture
def fresh_default(monkeypatch):
    """No default queue yet (the session's is put back at teardown), ``PYOPENCL_CTX`` unset."""
    monkeypatch.setattr(_device, "_default_queue", None)
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    monkeypatch.delenv("PYOPENCL_TEST", raising=False)
    return monkeypatch


# ------------------------------------------------------------------------- no OpenCL platform

_NO_ICD_SCRIPT = textwrap.dedent(
    """
    import pyopencl as cl
    try:
        found = cl.get_platforms()
    except cl.Error:
        found = []
    if found:
        print("PLATFORMS STILL VISIBLE")
    else:
        import netcl_optim as no
        try:
            no.default_queue()
        except RuntimeError as e:
            print(type(e).__name__ + ": " + str(e))
    """
)


@pytest.mark.parametrize("ctx", ["", "0"])
def test_no_icd_in_a_subprocess_gives_the_friendly_message(tmp_path, ctx):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYOPENCL_")}
    env["OCL_ICD_VENDORS"] = str(tmp_path / "no-such-vendors")  # hides pyopencl's own pocl too
    if ctx:
        env["PYOPENCL_CTX"] = ctx
    out = subprocess.run(
        [sys.executable, "-c", _NO_ICD_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    if "PLATFORMS STILL VISIBLE" in out.stdout:
        pytest.skip("this ICD loader still lists platforms with OCL_ICD_VENDORS set")
    msg = out.stdout
    assert msg.startswith("RuntimeError: no OpenCL platform found"), msg
    assert "PLATFORM_NOT_FOUND_KHR" in msg and FIX in msg and "OCL_ICD_VENDORS" in msg


def _raise_no_platform():
    raise cl.LogicError("clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR")


@pytest.mark.parametrize("get_platforms", [_raise_no_platform, list])
@pytest.mark.parametrize("ctx", [None, "0:0"])
def test_no_platform_says_what_to_install(fresh_default, get_platforms, ctx):
    fresh_default.delenv("OCL_ICD_VENDORS", raising=False)
    if ctx:
        fresh_default.setenv("PYOPENCL_CTX", ctx)
    fresh_default.setattr(cl, "get_platforms", get_platforms)
    with pytest.raises(RuntimeError, match=r"^no OpenCL platform found") as info:
        no.default_queue()
    assert FIX in str(info.value) and "GPU vendor" in str(info.value)
    assert _device._default_queue is None


class _PlatformWithoutDevices:
    name = "Empty Platform"

    def get_devices(self):
        raise cl.RuntimeError("clGetDeviceIDs failed: DEVICE_NOT_FOUND")


def test_platforms_without_devices_are_listed(fresh_default):
    fresh_default.setattr(cl, "get_platforms", lambda: [_PlatformWithoutDevices()])
    with pytest.raises(RuntimeError, match="no OpenCL device found") as info:
        no.default_queue()
    msg = str(info.value)
    assert "[0] Empty Platform (no devices)" in msg and FIX in msg


# ------------------------------------------------------------------------------ PYOPENCL_CTX


def _device_count(platform: int = 0) -> int:
    return len(cl.get_platforms()[platform].get_devices())


@pytest.mark.parametrize("value", ["5", "nvidia", "0:7", "0:0:0", "0:no-such-device"])
def test_bad_pyopencl_ctx_names_the_variable_and_lists_the_devices(fresh_default, value):
    fresh_default.setenv("PYOPENCL_CTX", value)
    with pytest.raises(RuntimeError) as info:
        no.default_queue()
    msg = str(info.value)
    assert msg.startswith(f"Invalid PYOPENCL_CTX: {value!r} (")
    platform = cl.get_platforms()[0]
    assert f"[0] {platform.name.strip()}" in msg
    assert f"[0:0] {platform.get_devices()[0].name.strip()}" in msg
    assert "PYOPENCL_CTX=0:0" in msg and FIX in msg
    assert isinstance(info.value.__cause__, cl.Error)  # pyopencl's own reason stays attached
    assert _device._default_queue is None  # nothing changed: a good value works afterwards
    fresh_default.setenv("PYOPENCL_CTX", "0")
    assert isinstance(no.default_queue(), cl.CommandQueue)


def test_pyopencl_ctx_still_selects_by_index_and_name(fresh_default):
    fresh_default.setenv("PYOPENCL_CTX", f"0:{_device_count() - 1}")
    q = no.default_queue()
    assert q.device == cl.get_platforms()[0].get_devices()[-1]


# ------------------------------------------------------------ a device that cannot compile

_NO_CPU = "Build on <pyopencl.Device 'pthread-AMD EPYC'>:\nerror: unknown target CPU 'generic'"


def _failing(times: int):
    """A ``_build_failure`` whose first ``times`` calls fail as PoCL 3.0 on an AMD Zen 5."""
    calls = []

    def build_failure(context):
        calls.append(context)
        return _NO_CPU if len(calls) <= times else None

    return build_failure


def test_the_default_device_builds_a_kernel(cl_queue):
    assert _device._build_failure(cl_queue.context) is None


def test_a_device_that_cannot_build_is_skipped_with_a_warning(fresh_default):
    platform = cl.get_platforms()[0]
    fresh_default.setattr(cl, "get_platforms", lambda: [platform, platform])
    fresh_default.setattr(_device, "_build_failure", _failing(1))
    with pytest.warns(RuntimeWarning, match="cannot build kernels") as record:
        q = no.default_queue()
    assert isinstance(q, cl.CommandQueue)
    assert "apt install pocl-opencl-icd" in str(record[0].message)


def test_no_device_that_can_build_says_how_to_get_one(fresh_default):
    fresh_default.setattr(_device, "_build_failure", _failing(10**6))
    with pytest.raises(RuntimeError, match=r"^no OpenCL device can build kernels") as info:
        no.default_queue()
    msg = str(info.value)
    assert "unknown target CPU 'generic'" in msg and "pocl-opencl-icd" in msg and "[0:0]" in msg
    assert _device._default_queue is None


def test_pyopencl_ctx_on_a_device_that_cannot_build_raises(fresh_default):
    fresh_default.setenv("PYOPENCL_CTX", "0")
    fresh_default.setattr(_device, "_build_failure", _failing(1))
    with pytest.raises(RuntimeError, match=r"^PYOPENCL_CTX='0' selects .* compiler fails") as info:
        no.default_queue()
    assert "pocl-opencl-icd" in str(info.value) and _device._default_queue is None


# ------------------------------------------------------------------------- set_default_queue


def test_set_default_queue_none_resets_to_the_default(fresh_default, cl_queue):
    mine = cl.CommandQueue(cl_queue.context)
    no.set_default_queue(mine)
    assert no.default_queue() is mine
    no.set_default_queue(None)
    assert _device._default_queue is None
    fresh = no.default_queue()
    assert fresh is not mine and isinstance(fresh, cl.CommandQueue)


@pytest.mark.parametrize("bad", ["queue", 0, object()])
def test_set_default_queue_rejects_what_is_not_a_queue(fresh_default, cl_queue, bad):
    no.set_default_queue(cl_queue)
    with pytest.raises(TypeError, match=r"Invalid queue: .* \(must be a pyopencl.CommandQueue"):
        no.set_default_queue(bad)
    assert no.default_queue() is cl_queue


# --------------------------------------------------------------------------------- to_device


@pytest.mark.parametrize(
    ("tree", "path", "dtype"),
    [
        ("abc", "root", "<U3"),
        (b"ab", "root", "|S2"),
        (1j, "root", "complex128"),
        (np.array([1 + 2j], np.complex64), "root", "complex64"),
        (
            {"w": np.zeros(3, np.float32), "z": [1.0, np.ones(2, np.complex128)]},
            "root['z'][1]",
            "complex128",
        ),
        ({"name": "layer1"}, "root['name']", "<U6"),
        ([object()], "root[0]", "object"),
        (np.datetime64("2020-01-01"), "root", "datetime64[D]"),
        (np.zeros(2, "f4,f4"), "root", "[('f0', '<f4'), ('f1', '<f4')]"),
    ],
)
def test_to_device_refuses_leaves_that_are_not_real_numbers(cl_queue, tree, path, dtype):
    with pytest.raises(TypeError, match=r"^to_device: leaf ") as info:
        no.to_device(tree, cl_queue)
    msg = str(info.value)
    assert f"leaf {path} " in msg and f"dtype {dtype}" in msg
    if "complex" in dtype:
        assert "real and imaginary parts" in msg


def test_to_device_checks_every_leaf_before_copying_any(cl_queue, monkeypatch):
    copies = []
    real = _device.cla.to_device
    monkeypatch.setattr(_device.cla, "to_device", lambda *a, **k: copies.append(1) or real(*a, **k))
    with pytest.raises(TypeError, match=r"root\['b'\]"):
        no.to_device({"a": np.zeros(4, np.float32), "b": "abc"}, cl_queue)
    assert copies == []


@pytest.mark.parametrize(
    ("leaf", "dtype"),
    [
        (np.array([True, False]), np.bool_),
        (True, np.bool_),
        (np.arange(3, dtype=np.int32), np.int32),
        (np.arange(3, dtype=np.uint8), np.uint8),
        (7, np.int64),
        (1.5, np.float32),
        (np.float16(1.5), np.float16),
        (np.ones((2, 3), np.float32)[:, 1], np.float32),
    ],
)
def test_to_device_keeps_real_numeric_leaves(cl_queue, leaf, dtype):
    got = no.to_device({"x": leaf, "none": None}, cl_queue)
    assert got["none"] is None and got["x"].dtype == dtype
    np.testing.assert_array_equal(got["x"].get(), np.asarray(leaf).astype(dtype))


def test_to_device_names_the_leaf_from_another_context(cl_queue):
    other = cl.CommandQueue(cl.Context([cl_queue.device]))
    foreign = no.to_device(np.zeros(2, np.float32), other)
    with pytest.raises(ValueError, match=r"leaf root\['p'\]\[1\] belongs to another OpenCL"):
        no.to_device({"p": [np.zeros(2, np.float32), foreign]}, cl_queue)
