"""Transforms that scale each block (a leaf, or a row of one) by a value computed from the
whole block in the same step: optax's ``scale_by_trust_ratio``, ``scale_by_param_block_norm``,
``scale_by_param_block_rms``, ``clip_by_block_rms``, ``centralize``, and the whole-tree
``normalize_by_update_norm``.

The per-block sums run as a segment reduction before the fused kernel (see
``fusion/_segments.py``: a packed tree takes 4 launches per dtype, whatever its number of
leaves), in the reduction type (float64 where the device has fp64; optax sums in the leaves'
dtype). No host sync.
"""

from __future__ import annotations

from typing import Any

from .._base import EmptyState, Fragment, GradientTransformation, Reduction, SegmentReduction
from .._validation import NON_NEGATIVE, POSITIVE, check
from ._combining import elementwise

_U_P_NORMS = SegmentReduction(
    terms=("u * u", "p * p"),
    outputs=("u_norm", "p_norm"),
    finish=("sqrt(s0)", "sqrt(s1)"),
    needs_params=True,
)
_P_NORM = SegmentReduction(
    terms=("p * p",), outputs=("p_norm",), finish=("sqrt(s0)",), needs_params=True
)
_P_RMS = SegmentReduction(
    terms=("p * p",), outputs=("p_rms",), finish=("sqrt(s0 / n)",), needs_params=True
)
_U_RMS = SegmentReduction(terms=("u * u",), outputs=("u_rms",), finish=("sqrt(s0 / n)",))
_ROW_MEAN = SegmentReduction(
    terms=("u",), outputs=("row_mean",), finish=("n > 0 ? s0 / n : 0",), segments="rows"
)
_GLOBAL_NORM = Reduction("sumsq", "norm", outputs=("update_norm",))
_LAYOUTS = ("in_out", "out_in")


def _constant(name: str, values: tuple[float, ...]) -> Any:
    def host_step(state: EmptyState, **_: Any):
        return values, state

    host_step.__name__ = f"{name}_host_step"
    return host_step


def scale_by_trust_ratio(
    min_norm: float = 0.0, trust_coefficient: float = 1.0, eps: float = 0.0
) -> GradientTransformation:
    """optax's layer-wise trust ratio (LARS, LAMB): per leaf,
    ``u <- u * trust_coefficient * ||p|| / (||u|| + eps)``, each norm raised to ``min_norm``
    when at or below it, and ratio 1 where either norm is 0 (a zero leaf is left as it is).
    Needs ``params``.
    """
    check(NON_NEGATIVE, min_norm=min_norm, trust_coefficient=trust_coefficient, eps=eps)
    source = """\
const real pn = p_norm <= min_norm ? min_norm : p_norm;
const real un = u_norm <= min_norm ? min_norm : u_norm;
const real ratio = trust_coefficient * pn / (un + eps);
u = u * ((pn == 0 || un == 0) ? (real)1 : ratio);"""
    values = (float(min_norm), float(trust_coefficient), float(eps))
    fragment = Fragment(
        "scale_by_trust_ratio",
        source,
        scalars=("min_norm", "trust_coefficient", "eps"),
        host_step=_constant("trust_ratio", values),
        segment_reduction=_U_P_NORMS,
    )
    return elementwise(fragment)


def scale_by_param_block_norm(min_scale: float = 1e-3) -> GradientTransformation:
    """optax's: per leaf, ``u <- u * max(||p||, min_scale)`` (``min_scale`` where the norm
    is at or below it). Needs ``params``."""
    check(NON_NEGATIVE, min_scale=min_scale)
    fragment = Fragment(
        "scale_by_param_block_norm",
        "u = u * (p_norm <= min_scale ? min_scale : p_norm);",
        scalars=("min_scale",),
        host_step=_constant("block_norm", (float(min_scale),)),
        segment_reduction=_P_NORM,
    )
    return elementwise(fragment)


def scale_by_param_block_rms(min_scale: float = 1e-3) -> GradientTransformation:
    """optax's: per leaf, ``u <- u * max(rms(p), min_scale)``, ``rms(p) = sqrt(mean(p**2))``
    (``min_scale`` where it is at or below). Needs ``params``."""
    check(NON_NEGATIVE, min_scale=min_scale)
    fragment = Fragment(
        "scale_by_param_block_rms",
        "u = u * (p_rms <= min_scale ? min_scale : p_rms);",
        scalars=("min_scale",),
        host_step=_constant("block_rms", (float(min_scale),)),
        segment_reduction=_P_RMS,
    )
    return elementwise(fragment)


def clip_by_block_rms(threshold: float) -> GradientTransformation:
    """optax's: per leaf, ``u <- u / max(1, rms(u) / threshold)``."""
    check(POSITIVE, threshold=threshold)
    source = """\
const real ratio = u_rms / threshold;
u = u / (ratio > 1 ? ratio : (real)1);"""
    fragment = Fragment(
        "clip_by_block_rms",
        source,
        scalars=("threshold",),
        host_step=_constant("block_rms_clip", (float(threshold),)),
        segment_reduction=_U_RMS,
    )
    return elementwise(fragment)


def centralize() -> GradientTransformation:
    """optax's gradient centralisation: a leaf of ndim >= 2 less its mean over every axis
    but the first (one mean per row of the first axis); other leaves unchanged."""
    return elementwise(Fragment("centralize", "u = u - row_mean;", segment_reduction=_ROW_MEAN))


def adaptive_grad_clip(
    clipping: float,
    eps: float = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    *,
    layout: str = "in_out",
) -> GradientTransformation:
    """optax's adaptive gradient clipping (Brock et al., 2021, NFNets), per unit::

        max_norm = clipping * max(||p_unit||, eps)
        u <- u                                   where ||u_unit|| < max_norm
        u <- u * max_norm / max(||u_unit||, 1e-6)  elsewhere

    The units of a leaf, by ``layout`` (``axis``, consecutive axes, overrides it):

    - ``"in_out"`` (optax's, JAX weights ``[in, out]``, HWIO): a leaf whose squeezed rank is
      <= 1 is one unit; rank 2 and 3 sum over axis 0 (a unit per column, or per ``(heads,
      out)`` pair), rank 4 over axes (0, 1, 2) (a unit per output channel), rank 5 over
      (0, 1, 2, 3); other ranks raise (pass ``axis``);
    - ``"out_in"`` (torch weights ``[out, in]``, OIHW): rank <= 1 is one unit; otherwise a
      unit per index of axis 0 (a row: an output unit), the sum over the other axes.

    optax's ``adaptive_grad_clip`` has no ``layout`` (it is ``"in_out"``). Needs ``params``.
    The norms come from one reduction over the tree (columns as well as rows; see
    ``fusion/_segments.py``: columns are summed by streaming their rows).
    """
    check(NON_NEGATIVE, clipping=clipping, eps=eps)
    if layout not in _LAYOUTS:
        raise ValueError(f"Invalid layout: {layout!r} (must be 'in_out' or 'out_in')")
    if axis is None:
        kind = f"units:{layout}"
    else:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
            raise TypeError(f"Invalid axis: {axis!r} (must be an int or a tuple of ints)")
        kind = "units:axes=" + ",".join(map(str, axes))
    norms = SegmentReduction(
        terms=("u * u", "p * p"),
        outputs=("u_norm", "p_norm"),
        finish=("sqrt(s0)", "sqrt(s1)"),
        segments=kind,
        needs_params=True,
    )
    source = """\
const real max_norm = clipping * (p_norm < eps ? eps : p_norm);
const real clipped = u * (max_norm / (u_norm < (real)1e-6 ? (real)1e-6 : u_norm));
u = u_norm < max_norm ? u : clipped;"""
    fragment = Fragment(
        "adaptive_grad_clip",
        source,
        scalars=("clipping", "eps"),
        host_step=_constant("agc", (float(clipping), float(eps))),
        segment_reduction=norms,
    )
    return elementwise(fragment)


def normalize_by_update_norm(
    scale_factor: float = 1.0, eps: float = 1e-6
) -> GradientTransformation:
    """optax's: ``u <- u / ((||u|| + eps) / scale_factor)``, ``||u||`` the norm of the whole
    tree of updates."""
    check(NON_NEGATIVE, eps=eps)
    check(POSITIVE, scale_factor=scale_factor)
    fragment = Fragment(
        "normalize_by_update_norm",
        "u = u / ((update_norm + eps) / scale_factor);",
        scalars=("scale_factor", "eps"),
        host_step=_constant("normalize", (float(scale_factor), float(eps))),
        reduction=_GLOBAL_NORM,
    )
    return elementwise(fragment)


__all__ = [
    "adaptive_grad_clip",
    "centralize",
    "clip_by_block_rms",
    "normalize_by_update_norm",
    "scale_by_param_block_norm",
    "scale_by_param_block_rms",
    "scale_by_trust_ratio",
]
