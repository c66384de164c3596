"""Kernel launches: the work size split, the CPU side queue, and launch counting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyopencl as cl
import pyopencl.array as cla

from .._device import side_queue

SPLIT = 256  # big launches are split so the main part's size has a good local size
SIDE_QUEUE_FROM = 16  # independent launches in one step that go to the side queue (CPU)

Launch = tuple[cl.Kernel, int, list[Any]]  # kernel, work-items, arguments
TILE = 256  # work-items per work-group of a tiled kernel (see _segments)


class Tiled(int):
    """A launch's work size in whole work-groups of ``TILE`` work-items: the kernel is tiled
    (each group reads its place from a table) and runs with that local size."""


class Single(int):
    """A launch's work size in work-groups of one work-item: each runs its own loop over a
    chunk of elements, vectorised within the work-item (a larger group would have PoCL
    vectorise across work-items, with a gather per load)."""


class LaunchCounter:
    """Counts kernel launches while active (see :func:`count_launches`)."""

    def __init__(self) -> None:
        self.launches = 0
        self.kernels: list[str] = []


_counters: list[LaunchCounter] = []


def note_launches(name: str, launches: int = 1) -> None:
    """Record ``launches`` launches of the kernel ``name`` in every active counter."""
    for c in _counters:
        c.launches += launches
        c.kernels.extend([name] * launches)


class count_launches:
    """``with count_launches() as c: ...`` counts this library's kernel launches in the block."""

    def __enter__(self) -> LaunchCounter:
        self.counter = LaunchCounter()
        _counters.append(self.counter)
        return self.counter

    def __exit__(self, *exc: object) -> None:
        _counters.remove(self.counter)


def launch(kernel: cl.Kernel, queue: cl.CommandQueue, n: int, args: list[Any]) -> None:
    """Enqueue ``n`` work-items with no bounds check in the kernel. A large size that is not a
    multiple of 32 runs as a multiple of 256 plus a tail at a global offset: the runtime picks
    the local size from the divisors of the global size, and a prime 1M ran 90x slower (PoCL)."""
    if type(n) is Tiled:
        kernel(queue, (n,), (TILE,), *args)
        launched = 1
    elif type(n) is Single:
        kernel(queue, (n,), (1,), *args)
        launched = 1
    elif n >= 4 * SPLIT and n % 32:
        main = n - n % SPLIT
        kernel(queue, (main,), None, *args)
        kernel(queue, (n - main,), None, *args, global_offset=(main,))
        launched = 2
    else:
        kernel(queue, (n,), None, *args)
        launched = 1
    if _counters:
        note_launches(kernel.function_name, launched)


def launch_all(queue: cl.CommandQueue, launches: list[Launch], independent: bool) -> None:
    """Enqueue ``launches`` after ``queue``'s earlier work and before its later work.

    Many ``independent`` launches (no two touch the same memory) go to the device's side
    queue: PoCL runs ready commands of an out-of-order queue back to back, where its in-order
    queue spends ~8 us between them. They must be ready when enqueued (waiting on an event
    costs as much again), so the host first waits for ``queue``; ``queue`` then waits for them
    with a barrier, and the step stays asynchronous from there.
    """
    side = side_queue(queue) if independent and len(launches) >= SIDE_QUEUE_FROM else None
    if side is None:
        for kernel, n, args in launches:
            launch(kernel, queue, n, args)
        return
    queue.finish()
    for kernel, n, args in launches:
        launch(kernel, side, n, args)
    cl.enqueue_barrier(queue, wait_for=[cl.enqueue_marker(side)])
    side.flush()


def leaves_disjoint(columns: Sequence[Sequence[cla.Array]]) -> bool:
    """Whether the leaves at different indices of ``columns`` (one list of leaves per kernel
    argument) touch disjoint memory, so that their launches may run in any order. A tree
    holding one array twice (tied weights) is the case that matters."""
    spans = sorted(
        (id(x.base_data), x.offset, x.offset + x.nbytes, j)
        for column in columns
        for j, x in enumerate(column)
        if x.nbytes
    )
    base = None
    open_ends: dict[int, int] = {}  # leaf index -> end of its spans still open
    for b, start, end, j in spans:
        if b != base:
            base, open_ends = b, {}
        open_ends = {k: e for k, e in open_ends.items() if e > start}
        if any(k != j for k in open_ends):
            return False
        open_ends[j] = max(open_ends.get(j, 0), end)
    return True
