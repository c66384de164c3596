"""masked: apply a transform to a subset of the leaves; the others pass through unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree

from .._base import GradientTransformation, OpaquePlan, OptState, as_transform
from .._state_check import check_state, register, wrapper


class MaskedState(NamedTuple):
    """The inner transform's state, over the masked-in leaves only."""

    inner_state: Any


def _mask_leaves(mask: Any, tree: Any, treedef: optree.PyTreeSpec) -> list[bool]:
    m = mask(tree) if callable(mask) else mask
    try:
        leaves = treedef.flatten_up_to(m)  # pyright: ignore[reportArgumentType]
    except (ValueError, TypeError) as err:
        raise ValueError(f"masked: the mask's structure does not match the params: {err}") from None
    return [bool(x) for x in leaves]


def _select(tree: Any, keep: list[bool]) -> Any:
    leaves, treedef = optree.tree_flatten(tree)
    return optree.tree_unflatten(
        treedef, [x if k else None for x, k in zip(leaves, keep, strict=True)]
    )


def masked(
    inner: GradientTransformation, mask: Any | Callable[[Any], Any]
) -> GradientTransformation:
    """Apply ``inner`` where ``mask`` (a pytree of bools like the params, or a callable of
    the params returning one) is True; other updates pass through unchanged (not zeroed)."""
    inner = as_transform(inner, "masked: inner")

    def init(params: Any) -> OptState:
        _, treedef = optree.tree_flatten(params)
        keep = _mask_leaves(mask, params, treedef)
        return MaskedState(inner.init(_select(params, keep)))

    def update(updates: Any, state: MaskedState, params: Any = None, **extra_args: Any):
        check_state(tx, state)
        leaves, treedef = optree.tree_flatten(updates)
        keep = _mask_leaves(mask, params if params is not None else updates, treedef)
        if not any(keep):  # nothing for inner (a bare leaf's selection would be None)
            return updates, state
        sub_params = None if params is None else _select(params, keep)
        new_sub, new_inner = inner.update(
            _select(updates, keep), state.inner_state, sub_params, **extra_args
        )
        new_leaves = treedef.flatten_up_to(new_sub)
        out = [n if k else u for u, n, k in zip(leaves, new_leaves, keep, strict=True)]
        return optree.tree_unflatten(treedef, out), MaskedState(new_inner)

    tx = GradientTransformation(init, update, OpaquePlan("masked", (inner,)))
    return register(tx, wrapper(MaskedState, "inner_state", inner))
