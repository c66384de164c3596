"""Dynamic loss scaling: scale the loss, unscale the gradients with a fused finiteness check,
adjust the scale (torch.amp.GradScaler's rule), functionally and for the stateful scaler."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import numpy as np
import optree
import pyopencl as cl
import pyopencl.array as cla

from .._base import EmptyState, GradientTransformation, OpaquePlan, OptState
from .._device import BFLOAT16, allocator, check_float_dtype, queue_of
from .._packing import contiguous_run, element_offset, layout
from .._state_check import NamedTupleSpec, Spec, check_state, register, spec_of
from .._validation import OPEN_UNIT, Rule, at_least, greater_than, real, require
from ..fusion import scale_into, unscale
from ..transforms._wrappers import noop_updates

# ---------------------------------------------------------------------------- unscaling


def _check_grads(leaves: Sequence[Any], where: str) -> cl.CommandQueue:
    queue = queue_of(leaves)
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array):
            raise TypeError(f"{where}: leaf {i} is a {type(x).__name__}, not a device array")
        check_float_dtype(x.dtype, queue, where)
        if not x.flags.c_contiguous:
            raise ValueError(f"{where}: leaf {i} is not C-contiguous")
    return queue


def new_flag(queue: cl.CommandQueue) -> cla.Array:
    """A one-element float32 device array holding 0 (a fill command, no kernel, no sync)."""
    flag = cla.empty(queue, (1,), np.float32, allocator=allocator(queue))
    cl.enqueue_fill_buffer(queue, flag.base_data, np.float32(0), flag.offset, 4)  # pyright: ignore[reportArgumentType]
    return flag


def _by_dtype(leaves: Sequence[cla.Array]) -> dict[np.dtype, list[int]]:
    groups: dict[np.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(x.dtype, []).append(i)
    return groups


def unscale_grads_(grads: Sequence[cla.Array], inv_scale: float, found: cla.Array) -> None:
    """In place: ``g *= inv_scale`` for every array of ``grads`` (all elements, even when
    some are not finite, as torch), and ``found[0] = 1`` if any *input* element is not
    finite; ``found`` (from :func:`new_flag`) is left untouched otherwise.

    float16 and bfloat16 grads are allowed: the product is computed in float32 and rounded
    once to nearest even (half: unscaled values below 2**-14 become subnormal, below 2**-25
    zero; bfloat16 has float32's range).

    Device:
      One launch per dtype for grads that lie back to back in one buffer (a packed set),
      else one per non-empty array. No allocation, no host sync.
    """
    grads = list(grads)
    if not grads:
        return
    queue = _check_grads(grads, "unscale_grads_")
    for dtype, idx in _by_dtype(grads).items():
        xs = [grads[i] for i in idx]
        run = contiguous_run(xs)
        if run is not None:
            n = sum(x.size for x in xs)
            unscale(queue, dtype, run[0], run[1], None, 0, n, found, inv_scale)
        else:
            for x in xs:
                off = element_offset(x)
                unscale(queue, dtype, x.base_data, off, None, 0, x.size, found, inv_scale)


def unscale_grads(grads: Any, scale: float) -> tuple[Any, cla.Array]:
    """Pure: ``(grads / scale, found_inf)`` with ``found_inf`` a one-element float32 device
    array, 1.0 if any element of ``grads`` is not finite. ``grads`` is any pytree of device
    arrays; the result has its structure, packed in one fresh buffer per dtype.

    The multiplier is torch's ``float32(1 / float64(scale))``.

    Device:
      One launch per dtype (packed input) or per leaf, one fill; no host sync.
    """
    leaves, treedef = optree.tree_flatten(grads)
    queue = _check_grads(leaves, "unscale_grads")
    found = new_flag(queue)
    inv = inverse_scale(scale)
    out: list[Any] = [None] * len(leaves)
    for dtype, idx in _by_dtype(leaves).items():
        xs = [leaves[i] for i in idx]
        lay = layout(tuple(x.shape for x in xs), dtype)
        block = lay.allocate(queue)
        for i, v in zip(idx, block.views, strict=True):
            out[i] = v
        run = contiguous_run(xs)
        if run is not None:
            start = block.offset // dtype.itemsize
            unscale(queue, dtype, run[0], run[1], block.buffer, start, lay.total, found, inv)
        else:
            for x, v in zip(xs, block.views, strict=True):
                unscale(
                    queue,
                    dtype,
                    x.base_data,
                    element_offset(x),
                    v.base_data,
                    element_offset(v),
                    x.size,
                    found,
                    inv,
                )
    return optree.tree_unflatten(treedef, out), found


def inverse_scale(scale: float) -> float:
    """torch's unscaling multiplier: ``float32(1 / float64(scale))``."""
    with np.errstate(all="ignore"):
        return float(np.float32(1.0 / np.float64(scale)))


def _scale_leaf(x: Any, scale: float) -> Any:
    if isinstance(x, cla.Array):
        check_float_dtype(x.dtype, x.queue, "scale_loss")  # pyright: ignore[reportArgumentType]
        queue = cast(cl.CommandQueue, x.queue)  # (pyopencl types an array's queue optional)
        y = cla.empty(queue, x.shape, x.dtype, allocator=allocator(queue))
        if x.size:
            if not x.flags.c_contiguous:
                raise ValueError("scale_loss: the loss array is not C-contiguous")
            scale_into(x, y, scale)
        return y
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.ndarray, np.generic)):
        raise ValueError(
            "outputs must be a number, a numpy array, a pyopencl array or a pytree of them, "
            f"got {type(x).__name__}"
        )
    if isinstance(x, (int, float)):
        return x * scale
    a = np.asarray(x)
    if a.dtype.kind != "f" and a.dtype != BFLOAT16:
        raise ValueError(f"outputs must be floating point, got dtype {a.dtype}")
    compute = np.float64 if a.dtype == np.float64 else np.float32
    with np.errstate(over="ignore"):
        y = (a.astype(compute) * compute(scale)).astype(a.dtype)
    return y if isinstance(x, np.ndarray) else y[()]


def scale_outputs(outputs: Any, scale: float) -> Any:
    """``outputs * scale`` for a number, a numpy array, a device array or a pytree of them;
    dtypes are kept (half and bfloat16 are computed in float32, rounded once to nearest
    even). Device arrays get a fresh array (one launch each, no host sync)."""
    return optree.tree_map(lambda x: _scale_leaf(x, scale), outputs)


# ---------------------------------------------------------------------------- the scale rule


_F32_MIN = float(np.finfo(np.float32).tiny)  # 2**-126
_F32_MAX = float(np.finfo(np.float32).max)


def _scale(value: Any) -> float | None:
    x = real(value)
    with np.errstate(over="ignore"):
        ok = x is not None and _F32_MIN <= x and float(np.float32(x)) <= _F32_MAX
    return float(np.float32(x)) if ok else None


_SCALE = Rule(
    f"a number in [{_F32_MIN:.8g}, {_F32_MAX:.8g}], the normal float32 range: the scale is "
    "kept as a float32",
    _scale,
)
# torch's convention for the scaler: ValueError for every invalid value
_RULES: dict[str, Rule] = {
    name: rule.value_errors()
    for name, rule in (
        ("init_scale", _SCALE),
        ("scale", _SCALE),
        ("new_scale", _SCALE),
        ("growth_factor", greater_than(1.0)),
        ("backoff_factor", OPEN_UNIT),
        ("growth_interval", at_least(1)),
        ("_growth_tracker", at_least(0)),
    )
}


def check_scaler_value(name: str, value: Any) -> float | int:
    """``value`` of the scaler setting ``name`` (``init_scale``, ``scale`` or ``new_scale``,
    ``growth_factor``, ``backoff_factor``, ``growth_interval``, ``_growth_tracker``),
    normalised (a scale becomes its float32 value), or ValueError ``Invalid <name>: <value>
    (must be ...)``. The one check behind the constructors, setters, ``load_state_dict``
    and ``update(new_scale)``.

    A scale must be a normal float32 value: beyond ``3.4e38`` it would be inf (every step
    skipped for good); below ``2**-126`` it is subnormal, and below ``2**-128`` the
    unscaling multiplier ``1 / scale`` is inf."""
    return require(name, value, _RULES[name])


def check_scaler_args(
    init_scale: float, growth_factor: float, backoff_factor: float, growth_interval: int
) -> tuple[float, float, float, int]:
    """The normalised arguments, each checked by :func:`check_scaler_value` (torch asserts
    only ``growth_factor > 1`` and ``backoff_factor < 1``)."""
    return (
        float(check_scaler_value("init_scale", init_scale)),
        float(check_scaler_value("growth_factor", growth_factor)),
        float(check_scaler_value("backoff_factor", backoff_factor)),
        int(check_scaler_value("growth_interval", growth_interval)),
    )


def next_scale(
    scale: float,
    growth_tracker: int,
    found_inf: bool,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> tuple[float, int]:
    """torch's ``_amp_update_scale_``: back off (and reset the tracker) after a non-finite
    step; after ``growth_interval`` finite steps in a row grow the scale (kept when the
    grown float32 value would overflow) and reset the tracker. The scale is a float32
    value, as torch keeps it."""
    with np.errstate(over="ignore"):
        if found_inf:
            return float(np.float32(scale * backoff_factor)), 0
        successful = growth_tracker + 1
        if successful == growth_interval:
            grown = float(np.float32(scale * growth_factor))
            return (grown if math.isfinite(grown) else scale), 0
        return scale, successful


# ---------------------------------------------------------------------------- functional


class DynamicLossScaleState(NamedTuple):
    """Loss scale (a float32 value on the host), finite steps since its last change, whether
    the last update's gradients were all finite, and the wrapped transform's state."""

    scale: float
    growth_tracker: int
    last_finite: bool
    inner_state: Any


def dynamic_loss_scale(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    *,
    inner: GradientTransformation | None = None,
) -> GradientTransformation:
    """Dynamic loss scaling for mixed precision, the functional counterpart of
    :class:`AMPGradScaler` (torch.amp.GradScaler's rule).

    Scale the loss with :func:`scale_loss` ``(loss, state)`` before differentiating; the
    transform's ``update`` then

    1. unscales the incoming gradients by ``float32(1 / scale)`` and checks them for inf/NaN
       (one fused kernel);
    2. if all are finite, runs ``inner`` on the unscaled gradients (or returns them when
       ``inner`` is None); else returns zero updates and keeps ``inner``'s state untouched
       (as :func:`apply_if_finite`);
    3. adjusts the scale: ``scale * backoff_factor`` after a non-finite step, ``scale *
       growth_factor`` after ``growth_interval`` finite steps in a row.

    Pass the whole optimizer as ``inner`` (``dynamic_loss_scale(inner=adam(1e-3))``): used
    bare at the head of a chain, a skipped step still advances the transforms after it
    (they see zeros). Zero updates are ``-0.0``, so applying them leaves every parameter
    bit-identical. Defaults as torch; the arguments are checked as
    :class:`AMPGradScaler`'s (``init_scale`` a normal float32 value: ValueError otherwise).

    Device:
      One unscale-and-check launch per dtype (packed gradients) or per leaf into fresh
      buffers, then **one host read** of the 4-byte found-inf flag per update (torch reads
      it too, in ``GradScaler.step``): the decision to run ``inner`` is made on the host.
      The scale and counters are host numbers: no other sync.
    """
    start, growth_factor, backoff_factor, growth_interval = check_scaler_args(
        init_scale, growth_factor, backoff_factor, growth_interval
    )

    def init(params: Any) -> DynamicLossScaleState:
        inner_state = EmptyState() if inner is None else inner.init(params)
        return DynamicLossScaleState(start, 0, True, inner_state)

    def update(
        updates: Any, state: DynamicLossScaleState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, OptState]:
        check_state(tx, state)
        if not optree.tree_leaves(updates):
            finite = True
            new, inner_state = updates, state.inner_state
            if inner is not None:
                new, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        else:
            unscaled, found = unscale_grads(updates, state.scale)
            finite = not bool(found.get()[0])  # the one host read
            if not finite:
                new, inner_state = noop_updates(updates), state.inner_state
            elif inner is None:
                new, inner_state = unscaled, state.inner_state
            else:
                new, inner_state = inner.update(unscaled, state.inner_state, params, **extra_args)
        scale, tracker = next_scale(
            state.scale,
            state.growth_tracker,
            not finite,
            growth_factor,
            backoff_factor,
            growth_interval,
        )
        return new, DynamicLossScaleState(scale, tracker, finite, inner_state)

    def spec() -> Spec:
        inner_spec = NamedTupleSpec(EmptyState) if inner is None else spec_of(inner)
        return NamedTupleSpec(DynamicLossScaleState, {"inner_state": inner_spec})

    plan = OpaquePlan("dynamic_loss_scale", () if inner is None else (inner,))
    tx = register(GradientTransformation(init, update, plan), spec)
    return tx


def _is_state(x: Any) -> bool:
    return isinstance(x, DynamicLossScaleState)


def loss_scale_of(state: Any) -> float:
    """The current loss scale: ``state`` is a :class:`DynamicLossScaleState`, any optimizer
    state containing one (a chain's tuple, ...), or a number. No device access."""
    if isinstance(state, (int, float)) and not isinstance(state, bool):
        return float(state)
    found = [
        x
        for x in optree.tree_leaves(state, is_leaf=_is_state, none_is_leaf=False)  # pyright: ignore[reportArgumentType]
        if _is_state(x)
    ]
    if not found:
        raise ValueError("loss_scale_of: no DynamicLossScaleState in the given state")
    if len(found) > 1:
        raise ValueError(
            "loss_scale_of: the state holds several DynamicLossScaleStates; pass the one to use"
        )
    return found[0].scale


def scale_loss(loss: Any, state: Any) -> Any:
    """``loss * scale``: ``loss`` a number, a numpy array, a device array or a pytree of
    them; ``state`` as for :func:`loss_scale_of`. Dtypes are kept.

    Device: one launch per device array (into a fresh array); no host sync.
    """
    return scale_outputs(loss, loss_scale_of(state))
