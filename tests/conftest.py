"""Shared fixtures and hypothesis profiles.

Profiles: ``ci`` (default, ~25 examples) and ``dev`` (more examples); choose with the
``HYPOTHESIS_PROFILE`` environment variable. Both set ``deadline=None``: the first example of a
test builds OpenCL kernels (0.4-0.6 s each on PoCL).
"""

from __future__ import annotations

import os
import sys

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
