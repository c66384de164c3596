"""Shared fixtures and hypothesis profiles.

Profiles: ``ci`` (default, ~25 examples) and ``dev`` (more examples); choose with the
``HYPOTHESIS_PROFILE`` environment variable. Both set ``deadline=None``: the first example of a
test builds OpenCL kernels (0.4-0.6 s each on PoCL).
"""

from __future__ import annotations

import faulthandler
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# tests/ on sys.path: `import reference`, `import cases` work under any import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("PYTEST_XDIST_WORKER") is not None:  # several workers: one PoCL thread each
    os.environ.setdefault("POCL_MAX_PTHREAD_COUNT", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples every run: CI is reproducible; "dev" explores
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def cl_queue():
    """One command queue (and context) for the whole session, shared by hypothesis examples.

    Honours ``PYOPENCL_TEST`` through pyopencl's test helper; otherwise the package's default
    queue, so that kernels are built once per session.
    """
    if os.environ.get("PYOPENCL_TEST"):
        import pyopencl as cl
        from pyopencl.tools import get_test_platforms_and_devices

        _, devices = get_test_platforms_and_devices()[0]
        ctx = cl.Context([devices[0]])
        return cl.CommandQueue(ctx)
    no = pytest.importorskip("netcl_optim")
    return no.default_queue()


def pytest_configure(config):
    # hypothesis' failure report imports mypy_extensions, which warns on import; with
    # filterwarnings = error that warning would replace the real failure by an INTERNALERROR.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )
    if os.environ.get("PYTEST_XDIST_WORKER") is None and CRASH_DIR not in os.environ:
        # the controller: its workers (started after this) inherit the directory
        os.environ[CRASH_DIR] = tempfile.mkdtemp(prefix="netcl-optim-crashes-")
        config._netcl_crash_dir = os.environ[CRASH_DIR]


# A worker that dies in native code (a segfault or an abort in a driver, say) is reported by
# pytest-xdist only as "worker 'gwN' crashed while running <test>", and what faulthandler
# printed scrolls away in the middle of the log. Each worker writes its fatal-error traceback
# (every thread's) to a file of its own, and the controller prints those at the end.
CRASH_DIR = "NETCL_OPTIM_TEST_CRASH_DIR"
_HARNESS = re.compile(r"site-packages/(pluggy|_pytest|execnet|xdist)/")  # frames not shown
_crash_files = []  # open for the worker's whole life: faulthandler writes into it on a crash


def pytest_sessionstart(session):
    worker, directory = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get(CRASH_DIR)
    if worker is not None and directory and os.path.isdir(directory):
        path = os.path.join(directory, f"{worker}-pid{os.getpid()}.txt")
        _crash_files.append(open(path, "w"))
        faulthandler.enable(file=_crash_files[-1], all_threads=True)


def pytest_terminal_summary(terminalreporter, config):
    directory = getattr(config, "_netcl_crash_dir", None)
    if directory is None:
        return
    crashed = [
        r.nodeid
        for r in terminalreporter.stats.get("failed", [])
        if "crashed while running" in str(getattr(r, "longrepr", ""))
    ]
    reports = sorted(
        (name, text)
        for name in os.listdir(directory)
        if (text := Path(directory, name).read_text(errors="replace").strip())
    )
    if not crashed and not reports:
        return
    terminalreporter.write_sep("=", "test workers that crashed")
    for nodeid in crashed:
        terminalreporter.write_line(f"crashed while running: {nodeid}")
    for name, text in reports:
        terminalreporter.write_line(f"--- {name}: what faulthandler wrote ---")
        for line in [x for x in text.splitlines() if not _HARNESS.search(x)][:80]:
            terminalreporter.write_line(line)
    if crashed and not reports:
        terminalreporter.write_line(
            "no faulthandler output: the worker was killed by a signal it cannot catch "
            "(SIGKILL: the kernel's OOM killer?)"
        )
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        log = ""
    oom = [
        line
        for line in log.splitlines()
        if re.search(r"out of memory|oom-kill|oom_reaper|killed process", line, re.I)
    ]
    for line in oom[-10:]:
        terminalreporter.write_line(f"dmesg: {line}")


def pytest_unconfigure(config):
    if _crash_files:
        faulthandler.disable()
        for f in _crash_files:
            f.close()
        _crash_files.clear()
    directory = getattr(config, "_netcl_crash_dir", None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)
        os.environ.pop(CRASH_DIR, None)
