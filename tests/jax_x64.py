"""jax's float64 switch for the optax parity tests, as a context manager that restores it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def jax_x64(enabled: bool = True) -> Iterator[None]:
    """jax with ``jax_enable_x64`` set to ``enabled`` inside the block (float64 arrays by
    default when on; float32 when off, whatever the global setting), then as it was.
    ``jax.enable_x64`` where jax has it (0.10), else ``jax.experimental.enable_x64``, else
    the global flag, restored. Skips the test when jax is not installed."""
    jax = pytest.importorskip("jax")
    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        enable = getattr(jax.experimental, "enable_x64", None)
    if enable is not None:
        with enable(enabled):
            yield
        return
    old = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)
