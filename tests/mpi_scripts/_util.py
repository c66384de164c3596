"""Helpers for the scripts run under
``mpiexec -n 2 python -m mpi4py tests/mpi_scripts/<script>.py``.

A script records failures with :func:`check` (or :func:`expect`) and ends with
:func:`finish`, which exits nonzero on every rank if any rank failed. An unexpected exception
aborts all ranks at once (``MPI.COMM_WORLD.Abort``, also what ``-m mpi4py`` does), so that
no rank is left waiting in a collective.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any

os.environ.setdefault("POCL_MAX_PTHREAD_COUNT", "1")

import numpy as np
from mpi4py import MPI

import netcl_optim as no
import netcl_optim.distributed as dist

COMM = MPI.COMM_WORLD
RANK = COMM.Get_rank()
SIZE = COMM.Get_size()
failures: list[str] = []


def log(msg: str) -> None:
    print(f"[rank {RANK}/{SIZE}] {msg}", flush=True)


def check(cond: bool, msg: str) -> None:
    if not cond:
        failures.append(msg)
        log(f"FAIL: {msg}")


def bits(a: Any) -> bytes:
    a = np.asarray(a)
    return str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()


def bits_equal(a: Any, b: Any) -> bool:
    return bits(a) == bits(b)


def same_on_all_ranks(a: Any) -> bool:
    digest = hashlib.sha256(bits(a)).hexdigest()
    return len(set(COMM.allgather(digest))) == 1


def expect(name: str, fn: Callable[[], object], pattern: str, exc: type = ValueError) -> None:
    """``fn()`` must raise ``exc`` with a message matching ``pattern`` on this rank; then a
    correct collective must still work (the ranks are in step)."""
    try:
        fn()
    except exc as err:
        ok = re.search(pattern, str(err)) is not None
        check(ok, f"{name}: message {str(err)!r} does not match {pattern!r}")
        if RANK == 0 and ok:
            log(f"{name}: {type(err).__name__}: {err}")
    except Exception as err:
        check(False, f"{name}: raised {type(err).__name__}: {err}, expected {exc.__name__}")
    else:
        check(False, f"{name}: no error")
    total = dist.allreduce(no.to_device({"x": np.full(3, RANK + 1.0, np.float32)}), COMM, False)
    check(np.array_equal(total["x"].get(), np.full(3, 3.0, np.float32)), f"{name}: out of step")


def finish() -> None:
    total = COMM.allreduce(len(failures))
    if RANK == 0:
        print(f"{'FAILED' if total else 'OK'}: {total} failure(s) over {SIZE} ranks", flush=True)
    sys.exit(1 if total else 0)


def run(main: Callable[[], None]) -> None:
    try:
        main()
    except BaseException:
        traceback.print_exc()
        log("unexpected exception: aborting all ranks")
        sys.stdout.flush()
        sys.stderr.flush()
        COMM.Abort(1)
    finish()
