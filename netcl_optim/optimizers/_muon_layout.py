"""Muon's host-side shape logic: which leaves are matrices, each leaf's matrix view
``(batch shape, M, N)`` and the shape scale of each Muon variant. No kernels here.

Layouts:

* ``"out_in"`` (torch, Keller Jordan): a 2-D weight is ``[out, in]``, so ``M = fan_out``,
  ``N = fan_in``; a conv weight ``[out, in, *kernel]`` is flattened to ``(out, -1)``; any
  other N-D leaf is a batch ``[..., M, N]`` of ``[out, in]`` matrices.
* ``"in_out"`` (optax, flax): a 2-D weight is ``[in, out]``, so ``M = fan_in``,
  ``N = fan_out``; a conv kernel ``[*kernel, in, out]`` is flattened to ``(-1, out)``; any
  other N-D leaf is a batch ``[..., M, N]`` of ``[in, out]`` matrices.
* ``MuonDimensionNumbers(reduction_axis, output_axis)``: optax contrib's spec: the
  reduction axes (their product is ``fan_in``) become the rows, the output axes (``fan_out``)
  the columns, every other axis is a batch axis (in increasing order, as optax's vmap).

Shape scales (A = fan_out, B = fan_in, from the matrix view, never from the raw leaf):

* torch ``adjust_lr_fn``: ``None``/``"original"`` ``sqrt(max(1, A/B))``;
  ``"match_rms_adamw"`` ``0.2*sqrt(max(A, B))``; ``"spectral_unclamped"`` (torch 2.14;
  2.13's constructor rejects it) ``sqrt(A/B)``. torch multiplies the learning rate, and its
  weight decay uses the unadjusted one.
* optax contrib: ``sqrt(max(1, fan_out/fan_in))``, or ``sqrt(max(fan_in, fan_out)) *
  consistent_rms`` when ``consistent_rms`` is given. optax multiplies the update (before
  ``add_decayed_weights``, so weight decay is not scaled either).
* reference (Keller Jordan): ``max(1, M/N)**0.5`` with ``[out, in]`` matrices, i.e. the
  same as torch's ``"original"``. KellerJordan/Muon#63: ``muon_update`` flattened a 4-D conv
  update to ``(out, in*kh*kw)`` for the iteration but took the scale from the *unflattened*
  gradient, ``grad.size(-2) / grad.size(-1)`` = ``kh/kw`` (1 for square kernels), instead of
  ``out / (in*kh*kw)``. Here the scale always comes from the matrix view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

LAYOUTS = ("out_in", "in_out")
VARIANTS = ("torch", "optax", "reference")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
MAX_NS_STEPS = 100  # torch: ns_steps >= 100 raises

Layout = Literal["out_in", "in_out"]
Variant = Literal["torch", "optax", "reference"]


class MuonDimensionNumbers(NamedTuple):
    """optax contrib's spec of a leaf's matrix axes (same fields and defaults): for
    ``x W = y`` the reduction axes (``fan_in``) become the rows and the output axes
    (``fan_out``) the columns; all other axes are batch axes, each matrix orthogonalised on
    its own. An int is one axis; negative axes count from the end."""

    reduction_axis: Sequence[int] | int = 0
    output_axis: Sequence[int] | int = 1


LayoutSpec = Layout | MuonDimensionNumbers


@dataclass(frozen=True)
class MatrixView:
    """A leaf seen as a batch of ``M x N`` matrices: transpose the leaf by ``permutation``,
    then reshape it to ``batch_shape + (rows, cols)``. ``fan_in``/``fan_out`` say which of
    ``rows``/``cols`` is which (for the shape scales)."""

    shape: tuple[int, ...]
    permutation: tuple[int, ...]
    batch_shape: tuple[int, ...]
    rows: int
    cols: int
    fan_in: int
    fan_out: int

    @property
    def batch(self) -> int:
        """The number of matrices."""
        return math.prod(self.batch_shape)

    @property
    def transposed(self) -> bool:
        """Whether the iteration runs on ``X^T`` (rows > cols, as all three variants do)."""
        return self.rows > self.cols

    @property
    def is_identity(self) -> bool:
        """Whether the view is a plain reshape of the leaf's buffer (no transpose)."""
        return self.permutation == tuple(range(len(self.shape)))


def check_layout(layout: object) -> LayoutSpec:
    """``"out_in"``, ``"in_out"`` or a ``MuonDimensionNumbers``; else ``ValueError``."""
    if isinstance(layout, MuonDimensionNumbers) or layout in LAYOUTS:
        return layout  # type: ignore[return-value]
    raise ValueError(
        f"Muon layout must be 'out_in' (torch), 'in_out' (optax) or a "
        f"MuonDimensionNumbers, got {layout!r}"
    )


def _normalized_axes(axes: Sequence[int] | int, ndim: int, what: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for axis in axes:
        if not isinstance(axis, int) or not -ndim <= axis < ndim:
            raise ValueError(
                f"MuonDimensionNumbers {what} {axis!r} is out of range for ndim={ndim}"
            )
    normalized = tuple(axis % ndim for axis in axes)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"MuonDimensionNumbers {what} repeats an axis: {axes}")
    return normalized


def _view_from_axes(
    shape: tuple[int, ...], reduction: tuple[int, ...], output: tuple[int, ...]
) -> MatrixView:
    if set(reduction) & set(output):
        raise ValueError(
            f"MuonDimensionNumbers reduction axes {reduction} and output axes {output} "
            f"must be disjoint (shape {shape})"
        )
    batch_axes = tuple(sorted(set(range(len(shape))) - set(reduction) - set(output)))
    fan_in = math.prod(shape[a] for a in reduction)
    fan_out = math.prod(shape[a] for a in output)
    return MatrixView(
        shape=shape,
        permutation=batch_axes + reduction + output,
        batch_shape=tuple(shape[a] for a in batch_axes),
        rows=fan_in,
        cols=fan_out,
        fan_in=fan_in,
        fan_out=fan_out,
    )


def _plain_view(shape: tuple[int, ...], batch_shape: tuple[int, ...], rows: int, cols: int,
                layout: Layout) -> MatrixView:  # fmt: skip
    fan_out, fan_in = (rows, cols) if layout == "out_in" else (cols, rows)
    return MatrixView(shape, tuple(range(len(shape))), batch_shape, rows, cols, fan_in, fan_out)


def matrix_view(
    shape: Sequence[int], layout: LayoutSpec = "out_in", conv: bool | None = None
) -> MatrixView:
    """The leaf of ``shape`` as ``(batch_shape, M, N)``. With a layout string, ``conv``
    says whether an N-D leaf is a conv weight flattened to one matrix (``(out, -1)`` for
    ``"out_in"``, ``(-1, out)`` for ``"in_out"``) or a batch over its leading axes; ``None``
    treats 4-D leaves as conv weights (Keller Jordan's rule) and 3-D or 5-D+ as batches.
    ``conv`` must be ``None`` with ``MuonDimensionNumbers`` (its axes say it all). Leaves of
    ndim < 2 raise ``ValueError``."""
    shape = tuple(int(d) for d in shape)
    layout = check_layout(layout)
    if len(shape) < 2:
        raise ValueError(f"Muon needs a leaf of ndim >= 2, got shape {shape}")
    if isinstance(layout, MuonDimensionNumbers):
        if conv is not None:
            raise ValueError("conv= cannot be combined with MuonDimensionNumbers")
        reduction = _normalized_axes(layout.reduction_axis, len(shape), "reduction_axis")
        output = _normalized_axes(layout.output_axis, len(shape), "output_axis")
        return _view_from_axes(shape, reduction, output)
    flatten = len(shape) == 4 if conv is None else (conv and len(shape) > 2)
    if flatten and layout == "out_in":
        return _plain_view(shape, (), shape[0], math.prod(shape[1:]), layout)
    if flatten:
        return _plain_view(shape, (), math.prod(shape[:-1]), shape[-1], layout)
    return _plain_view(shape, shape[:-2], shape[-2], shape[-1], layout)


def is_matrix_leaf(
    shape: Sequence[int], variant: Variant = "optax", dimension_numbers: object = "default"
) -> bool:
    """Whether a leaf goes to Muon (else AdamW). optax contrib: ``ndim == 2`` by default;
    with an explicit tree of dimension numbers, a leaf is Muon's iff its entry is not
    ``None`` (pass that entry). torch: ``ndim == 2`` (others raise in its constructor).
    reference: ``ndim >= 2`` (its ``MuonWithAuxAdam`` recipe: hidden ``p.ndim >= 2``)."""
    ndim = len(tuple(shape))
    if variant == "optax":
        return ndim == 2 if dimension_numbers == "default" else dimension_numbers is not None
    if variant == "torch":
        return ndim == 2
    if variant == "reference":
        return ndim >= 2
    raise ValueError(f"Muon variant must be one of {VARIANTS}, got {variant!r}")


def check_adjust_lr_fn(adjust_lr_fn: object) -> None:
    """torch's ``adjust_lr_fn``: ``None``, ``"original"``, ``"match_rms_adamw"`` or 2.14's
    ``"spectral_unclamped"``; else ``ValueError`` (torch's message)."""
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")


def torch_lr_ratio(view: MatrixView, adjust_lr_fn: str | None = None) -> float:
    """torch's ``_adjust_lr`` ratio (the learning rate is multiplied by it), with
    ``A = fan_out``, ``B = fan_in``."""
    check_adjust_lr_fn(adjust_lr_fn)
    a, b = view.fan_out, view.fan_in
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, a / b))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    return math.sqrt(a / b)


def optax_shape_scale(view: MatrixView, consistent_rms: float | None = None) -> float:
    """optax contrib's ``scale_by_shape`` factor: ``sqrt(max(1, fan_out/fan_in))``, or
    ``sqrt(max(fan_in, fan_out)) * consistent_rms``."""
    if consistent_rms is None:
        return math.sqrt(max(1, view.fan_out / view.fan_in))
    return math.sqrt(max(view.fan_in, view.fan_out)) * consistent_rms


def reference_shape_scale(view: MatrixView) -> float:
    """Keller Jordan's ``max(1, M/N)**0.5`` for ``[out, in]`` matrices, from the matrix view
    (fan_out/fan_in, whatever the layout), so conv weights get ``out/(in*kh*kw)``, not
    KellerJordan/Muon#63's ``kh/kw``."""
    return max(1, view.fan_out / view.fan_in) ** 0.5


def shape_scale(
    view: MatrixView,
    variant: Variant,
    adjust_lr_fn: str | None = None,
    consistent_rms: float | None = None,
) -> float:
    """The factor each variant applies to the orthogonalised update (see the module doc)."""
    if variant == "torch":
        return torch_lr_ratio(view, adjust_lr_fn)
    if variant == "optax":
        return optax_shape_scale(view, consistent_rms)
    if variant == "reference":
        return reference_shape_scale(view)
    raise ValueError(f"Muon variant must be one of {VARIANTS}, got {variant!r}")


def check_muon_param(name: str, shape: Sequence[int], strict_2d: bool = False) -> None:
    """``ValueError`` naming the parameter when it cannot be a Muon matrix: ndim < 2, or
    ndim != 2 with ``strict_2d`` (torch 2.13's constructor check)."""
    shape = tuple(shape)
    if len(shape) < 2 or (strict_2d and len(shape) != 2):
        need = "2D" if strict_2d else "ndim >= 2 (matrices, batched matrices or conv weights)"
        raise ValueError(
            f"Muon only supports {need} parameters whereas parameter {name!r} has size "
            f"{shape}; optimize it with AdamW (see MuonWithAuxAdam)"
        )


def check_ns_steps(ns_steps: object) -> int:
    """An int in ``[0, 100)`` (torch rejects ``>= 100``)."""
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int):
        raise ValueError(f"ns_steps must be an int, got {ns_steps!r}")
    if not 0 <= ns_steps < MAX_NS_STEPS:
        raise ValueError(f"ns_steps must be in [0, {MAX_NS_STEPS}), got {ns_steps}")
    return ns_steps


def _triple(coefficients: object, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(c) for c in coefficients)  # type: ignore[union-attr]
    except TypeError as error:
        raise ValueError(f"{what} must be 3 numbers (a, b, c), got {coefficients!r}") from error
    if len(values) != 3:
        raise ValueError(
            f"{what} must have exactly 3 values (a, b, c), got {len(values)}: {coefficients!r}"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be finite, got {coefficients!r}")
    return values  # type: ignore[return-value]


def _is_sized(value: object) -> bool:
    """A sequence or array (not a string)."""
    return hasattr(value, "__len__") and not isinstance(value, str)


def ns_schedule(
    ns_coefficients: object, ns_steps: int, allow_table: bool = False
) -> tuple[tuple[float, float, float], ...]:
    """The ``(a, b, c)`` of each Newton–Schulz iteration. One triple repeats ``ns_steps``
    times (torch, optax, reference). With ``allow_table`` (optax), a sequence of ``n``
    triples is a per-iteration table: optax requires ``n <= ns_steps`` and then runs all
    ``n`` rows, ignoring ``ns_steps`` (so a table shorter than ``ns_steps`` runs fewer
    iterations). Wrong lengths raise ``ValueError``."""
    ns_steps = check_ns_steps(ns_steps)
    rows = list(cast(Sequence[Any], ns_coefficients)) if _is_sized(ns_coefficients) else None
    if allow_table and rows and all(_is_sized(r) for r in rows):
        if len(rows) > ns_steps:
            raise ValueError(f"Not enough coeffs to perform {ns_steps} steps: {len(rows)} rows")
        return tuple(_triple(r, f"ns_coefficients row {i}") for i, r in enumerate(rows))
    return (_triple(ns_coefficients, "ns_coefficients"),) * ns_steps
