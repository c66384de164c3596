"""Muon's orthogonalisation as a transform: each leaf ``u`` becomes ``scale * NS(u)``, the
Newton–Schulz iteration run per matrix of the leaf's matrix view (``_muon_layout``), by the
batched kernels of ``fusion/_newton_schulz.py``. Stateless; a stage (its own kernels) that
the fused executor materialises around."""

from __future__ import annotations

from typing import Any

import numpy as np
import optree
import pyopencl.array as cla

from .._base import EmptyState, GradientTransformation, StagePlan
from .._device import check_float_dtype
from .._packing import DonatedArray, layout
from .._state_check import NamedTupleSpec, register
from .._validation import FINITE, NON_NEGATIVE, check
from ..fusion import slice_for, slices_active, whole_view
from ..fusion._checks import flatten, path_names, queue_of_leaves
from ..fusion._newton_schulz import orthogonalize
from ._muon_layout import (
    LAYOUTS,
    VARIANTS,
    MatrixView,
    MuonDimensionNumbers,
    check_adjust_lr_fn,
    check_layout,
    matrix_view,
    ns_schedule,
)
from ._muon_layout import (
    shape_scale as variant_scale,
)

PRECONDITIONINGS = ("frobenius", "aol", "schatten")
_DEFAULT_LAYOUT = {"torch": "out_in", "reference": "out_in", "optax": MuonDimensionNumbers()}


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, MuonDimensionNumbers) or (isinstance(x, str) and x in LAYOUTS)


def _leaf_specs(layout_arg: Any, updates: Any, leaves: list[Any], variant: str) -> list[Any]:
    """The layout of each leaf: one spec for all, or a tree (a prefix of the updates') of
    specs and ``None`` (the variant's default), or a callable of the updates giving one."""
    spec = layout_arg(updates) if callable(layout_arg) else layout_arg
    if _is_spec(spec):
        return [spec] * len(leaves)
    try:
        _, treedef = optree.tree_flatten(updates)
        per_leaf = treedef.flatten_up_to(spec)  # pyright: ignore[reportArgumentType]
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"orthogonalize_by_newton_schulz: the layout tree does not match the updates' "
            f"structure ({error})"
        ) from None
    out = []
    for sub, x in zip(per_leaf, leaves, strict=True):
        subs = optree.tree_leaves(sub, none_is_leaf=True, is_leaf=_is_spec)
        if len(subs) != 1 or not _is_spec(subs[0]):
            raise ValueError(
                f"orthogonalize_by_newton_schulz: the layout of a leaf of shape {x.shape} must "
                f"be 'out_in', 'in_out', a MuonDimensionNumbers or None, got {sub!r}"
            )
        out.append(subs[0])
    return out


def _view(shape: tuple, spec: Any, conv: bool | None, variant: str, name: str) -> MatrixView:
    if spec is None:
        spec = _DEFAULT_LAYOUT[variant]
        if variant == "optax" and len(shape) != 2:
            raise ValueError(
                f"orthogonalize_by_newton_schulz: leaf {name} has shape {shape}: optax's Muon "
                "takes 2-D leaves unless weight dimension numbers (or a layout) say how to see "
                "it as matrices"
            )
    if len(shape) < 2:
        raise ValueError(
            f"orthogonalize_by_newton_schulz: leaf {name} has shape {shape}; Muon needs "
            "matrices (ndim >= 2): route other leaves to another optimizer (see muon's "
            "partition, MuonWithAuxAdam)"
        )
    return matrix_view(shape, spec, None if isinstance(spec, MuonDimensionNumbers) else conv)


def _check_leaves(leaves: list[Any], updates: Any) -> None:
    ctx = None
    for i, x in enumerate(leaves):
        if not isinstance(x, cla.Array) or type(x) is DonatedArray:
            name = path_names(updates)[i]
            raise TypeError(
                f"orthogonalize_by_newton_schulz: leaf {name} is a {type(x).__name__}, not a "
                "pyopencl.array.Array"
            )
        ctx = ctx or x.context
        if x.context != ctx:
            raise ValueError(
                f"orthogonalize_by_newton_schulz: leaf {path_names(updates)[i]} belongs to "
                "another OpenCL context than the first leaf"
            )
        if not x.flags.c_contiguous:
            raise ValueError(
                f"orthogonalize_by_newton_schulz: leaf {path_names(updates)[i]} is not C-contiguous"
            )


def orthogonalize_by_newton_schulz(
    ns_coefficients: Any = (3.4445, -4.775, 2.0315),
    ns_steps: int = 5,
    eps: float = 1e-8,
    *,
    variant: str = "optax",
    layout: Any = None,
    conv: bool | None = None,
    adjust_lr_fn: str | None = None,
    consistent_rms: float | None = None,
    shape_scale: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    ns_dtype: str | None = None,
) -> GradientTransformation:
    """Each leaf ``u`` (seen as a batch of matrices by ``layout``) becomes::

        X = M / (||M||_F + eps)       ("optax", "reference"; torch: M / max(||M||_F, eps))
        X <- a X + (b A + c A^2) X,  A = X X^T   per (a, b, c) of the schedule
        O = X  (computed on M^T where M has more rows than columns)
        u <- s * O    (adaptive: s * <u, O> O, the dot over the leaf)

    ``s`` is the variant's shape scale of the matrix view (``shape_scale=False``: 1): torch's
    ``adjust_lr_fn`` ratio, optax's ``scale_by_shape`` (``consistent_rms``), Keller Jordan's
    ``max(1, fan_out/fan_in)**0.5``. ``ns_coefficients``: a triple repeated ``ns_steps``
    times, or (``"optax"``) a table of at most ``ns_steps`` triples, one per iteration.
    ``layout``: ``"out_in"``, ``"in_out"``, a ``MuonDimensionNumbers``, a tree of those
    (``None`` entries: the default) or a callable of the updates returning one; ``None``:
    ``"out_in"`` for torch and the reference, 2-D leaves only for optax.
    ``preconditioning``: optax's ``"frobenius"`` (the normalisation above), ``"aol"`` or
    ``"schatten"`` (no normalisation; the first iteration rescales ``X`` and ``A`` by
    ``rsqrt`` of ``A``'s absolute row sums or of its Frobenius norm, clipped at 1e-8, as
    optax); optax's ``"spectral"`` (an SVD) is not available.
    ``ns_dtype``: ``None`` (the iteration in float32, float64 for float64 leaves) or
    ``"bfloat16"`` (torch's and the reference's precision: the input, ``X`` and every
    product's operands and results rounded to bfloat16, the sums in float32; the plain
    iteration always; float64 leaves raise). Where the device has AVX-512 BF16 (PoCL on a
    recent x86 CPU) its products run natively, about twice the float32 rate, with the same
    bits as elsewhere.

    Device: per group of same-shaped matrices (any number of leaves and batch entries),
    ``3 + 6 * iterations`` launches (``+2`` adaptive; 5 per iteration in bfloat16; matrices at
    least twice as wide as tall iterate on their Gram matrices, ``2 + 8 * iterations``,
    1 fewer per restart, see ``fusion/_newton_schulz.py``), no host read; the input is never
    written. Float16 and bfloat16 leaves iterate in float32 (unless ``ns_dtype="bfloat16"``).
    Under ZeRO, shards hold whole leaves (a matrix is never split across ranks).
    """
    if variant not in VARIANTS:
        raise ValueError(f"Muon variant must be one of {VARIANTS}, got {variant!r}")
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(
            f"preconditioning {preconditioning!r} is not supported (supported: "
            f"{PRECONDITIONINGS}; optax's 'spectral' divides by the largest singular value, "
            "an SVD this library does not compute)"
        )
    check_adjust_lr_fn(adjust_lr_fn)
    check_ns_dtype(ns_dtype)
    bf16 = ns_dtype == "bfloat16"
    check(NON_NEGATIVE, eps=eps)
    if consistent_rms is not None:
        check(FINITE, consistent_rms=consistent_rms)
    if isinstance(layout, (str, MuonDimensionNumbers)):
        check_layout(layout)
    schedule = ns_schedule(ns_coefficients, ns_steps, allow_table=variant == "optax")
    normalize = "clamp" if variant == "torch" else "add"
    if preconditioning != "frobenius":
        normalize = preconditioning  # (no normalisation: the first iteration rescales)
    eps = float(eps)

    def scale_of(view: MatrixView) -> float:
        if not shape_scale:
            return 1.0
        return variant_scale(view, variant, adjust_lr_fn, consistent_rms)  # type: ignore[arg-type]

    def run(
        updates: Any, state: Any, params: Any = None, *, inplace: bool = False, **extra_args: Any
    ) -> tuple[Any, Any]:
        leaves, treedef = flatten(updates)
        if not leaves:
            return updates, state
        if slices_active():
            return _run_sliced(leaves, treedef), state
        _check_leaves(leaves, updates)
        queue = queue_of_leaves(leaves)
        specs = _leaf_specs(layout, updates, leaves, variant)
        views = []
        for i, (x, spec) in enumerate(zip(leaves, specs, strict=True)):
            check_float_dtype(x.dtype, queue, "orthogonalize_by_newton_schulz")
            views.append(_view(x.shape, spec, conv, variant, path_names(updates)[i]))
        scales = [scale_of(v) for v in views]
        out = orthogonalize(queue, leaves, views, schedule, eps, normalize, scales, adaptive, bf16)
        return optree.tree_unflatten(treedef, out), state

    def _run_sliced(leaves: list[Any], treedef: Any) -> Any:
        if not (layout is None or _is_spec(layout)):
            raise ValueError(
                "orthogonalize_by_newton_schulz: under ZeRO the layout must be one spec for "
                "every leaf ('out_in', 'in_out' or a MuonDimensionNumbers), not a tree"
            )
        queue = queue_of_leaves(leaves)
        out = []
        for x in leaves:
            s = slice_for([x], [0])
            if s is None:
                raise ValueError("orthogonalize_by_newton_schulz: a ZeRO step without its slice")
            shapes = _whole_leaves(s.shapes, s.lo, s.hi)
            if not shapes:
                out.append(x.copy())
                continue
            parts = layout_views(queue, x, shapes)
            views = [_view(sh, layout, conv, variant, f"#{k}") for k, sh in enumerate(shapes)]
            scales = [scale_of(v) for v in views]
            result = orthogonalize(
                queue, parts, views, schedule, eps, normalize, scales, adaptive, bf16
            )
            out.append(whole_view(result[0], 0, s.hi - s.lo))
        return optree.tree_unflatten(treedef, out)

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        return run(updates, state, params, inplace=False, **extra_args)

    plan = StagePlan(
        "orthogonalize_by_newton_schulz",
        run,
        config=(schedule, eps, variant, ns_dtype),
        shards=True,
        whole_leaves=True,
    )
    tx = GradientTransformation(lambda params: EmptyState(), update, plan)
    return register(tx, lambda: NamedTupleSpec(EmptyState))


NS_DTYPES = (None, "bfloat16")


def check_ns_dtype(ns_dtype: Any) -> None:
    """``ValueError`` unless ``ns_dtype`` is one of :data:`NS_DTYPES`."""
    if not (ns_dtype is None or (isinstance(ns_dtype, str) and ns_dtype in NS_DTYPES)):
        raise ValueError(
            f"ns_dtype must be None (float32, or float64 for float64 leaves) or 'bfloat16', "
            f"got {ns_dtype!r}"
        )


def _whole_leaves(shapes: tuple, lo: int, hi: int) -> tuple:
    """The shapes of the leaves making up ``[lo, hi)`` of their packed layout; a slice
    that cuts a leaf raises (Muon's ZeRO shards hold whole matrices)."""
    start, out = 0, []
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        end = start + size
        if start < hi and end > lo:
            if start < lo or end > hi:
                raise ValueError(
                    f"Muon needs whole leaves in each ZeRO shard, but the shard [{lo}, {hi}) "
                    f"cuts a leaf of shape {shape} at [{start}, {end}) (shard it by whole "
                    "leaves: shard_block)"
                )
            out.append(tuple(shape))
        start = end
    return tuple(out)


def layout_views(queue: Any, flat: cla.Array, shapes: tuple) -> list[cla.Array]:
    """Views of the 1-D ``flat`` as the leaves of ``shapes`` back to back."""
    return layout(shapes, flat.dtype).views_of(queue, flat.base_data, flat.offset)  # pyright: ignore[reportArgumentType]
