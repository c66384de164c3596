"""apply_updates, step (pure update+apply in one kernel) and step_ (in place, stateful layer)."""

from __future__ import annotations

from typing import Any

from .._base import GradientTransformation, OptState
from ..fusion import execute, run_parts


def apply_updates(params: Any, updates: Any) -> Any:
    """``p + u`` for every leaf, cast to the param's dtype, into a fresh packed buffer."""
    new_params, _ = run_parts([], updates, params, apply=True, inplace=False)
    return new_params


def step(
    tx: GradientTransformation,
    params: Any,
    grads: Any,
    state: OptState,
    *,
    donate: bool = False,
    **extra_args: Any,
) -> tuple[Any, OptState]:
    """``update`` + ``apply_updates`` as one kernel: every byte moves once. Pure: returns
    ``(new_params, new_state)`` in fresh buffers and leaves its inputs untouched.

    ``donate=True`` (like ``jax.jit``'s ``donate_argnums``) lets the step write the new
    params and state into the buffers of ``params`` and ``state``: the step then moves no
    more bytes than the stateful ``step()`` (a pure step also pays for writing to fresh
    memory, ~1.4-1.7x the traffic on a CPU). The donated inputs are used up: every array of
    ``params`` and ``state`` the step wrote into raises ``DonatedArrayError`` (a
    ``RuntimeError``) on any later use (``get()``, another step, ...); the returned trees hold
    new array objects over the same memory (~0.3-0.5 us of host time per array written).
    Donating memory twice is an error, raised before anything is written: an array of
    ``params`` or ``state`` that shares memory with any other array of the step (a tree
    holding one array twice, overlapping views, grads that alias params) raises
    ``ValueError`` (JAX refuses to donate one buffer twice, too); a pure step accepts them.

    Bit for bit the same as ``update`` then ``apply_updates`` for float32 and float64. For
    float16 storage the update stays in float32 and ``p + u`` is rounded once, where
    ``update`` rounds the update to float16 first: the results may differ by that rounding.
    """
    return execute(
        tx,
        grads,
        state,
        params,
        apply=True,
        inplace=donate,
        donate=donate,
        extra_args=extra_args,
    )


def step_(
    tx: GradientTransformation, params: Any, grads: Any, state: OptState, **extra_args: Any
) -> OptState:
    """In place: update ``params`` and the state's slots where they are; returns the new
    state (whose slot arrays are the same objects). For the stateful layer."""
    _, new_state = execute(
        tx, grads, state, params, apply=True, inplace=True, extra_args=extra_args
    )
    return new_state
