"""Muon (Jordan et al., 2024, "Muon: an optimizer for hidden layers"): the momentum of each
matrix, orthogonalised by a few Newton–Schulz iterations. Three variants (see
``_muon_layout.py`` and the reference notes):

* optax contrib 0.2.8's functional ``scale_by_muon`` and ``muon`` (bias-corrected Nesterov
  momentum, ``MuonDimensionNumbers``, non-matrix leaves routed to AdamW by ``partition``);
* torch 2.13's stateful ``Muon`` (``variant="torch"``: ``momentum_buffer`` as torch keeps it,
  ``adjust_lr_fn``) and Keller Jordan's ``SingleDeviceMuon`` (``variant="reference"``: any
  ``ndim >= 2``, conv weights flattened to ``(out, -1)``, ``||X|| + eps``);
* ``MuonWithAuxAdam``: Muon for the matrices and AdamW for the rest, as one stateful object.

The iteration itself is the stage of ``_orthogonalize.py`` (its own GEMM kernels, batched per
group of same-shaped matrices, float32 accumulation for float32 leaves; it never writes its
input, so the momentum buffer is never normalised in place: pytorch#190597 cannot happen).
"""

from __future__ import annotations

__all__ = [
    "Muon",
    "MuonDimensionNumbers",
    "MuonMomentumState",
    "MuonState",
    "MuonWithAuxAdam",
    "muon",
    "scale_by_muon",
]

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import optree
import pyopencl.array as cla

from .._base import Fragment, GradientTransformation, ScalarOrSchedule
from .._validation import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Rule,
    check,
    int_in,
    one_of,
    optional,
    require,
)
from ..fusion import reduce_leaves, storage_dtype
from ..stateful._declaration import KEYWORD_ONLY, Hyperparameter, Requirement, torch_lr
from ..stateful._groups import as_param_groups, group_params
from ..stateful._optimizer import Optimizer, shards_building
from ..stateful._torch_state import torch_state
from ..transforms._combining import chain, elementwise
from ..transforms._scaling import scale_by_learning_rate
from ..transforms._storage import low_precision_state
from ..transforms._weight_decay import add_decayed_weights
from ..transforms._wrappers import partition
from ._muon_layout import (
    ADJUST_LR_FNS,
    MAX_NS_STEPS,
    MuonDimensionNumbers,
    check_layout,
    check_muon_param,
    ns_schedule,
)
from ._orthogonalize import orthogonalize_by_newton_schulz
from ._shared import DECAY_COUNT, check_learning_rate
from .adam import AdamW
from .optimistic import _scale_by_optax_adam

DEFAULT_NS_COEFFS = (3.4445, -4.775, 2.0315)
# optax contrib's presets ("dion": Ahn et al., 2025, one triple per iteration)
NS_COEFFS_PRESETS: dict[str, Any] = {
    "standard": DEFAULT_NS_COEFFS,
    "dion": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
}
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
MUON_VARIANTS = ("torch", "reference")  # the stateful class's

# ---------------------------------------------------------------------------- momentum


class MuonState(NamedTuple):
    """optax contrib's ``MuonState``: the step count, the momentum ``mu`` (like the params)
    and the Newton–Schulz coefficients (a host tuple: one triple, or one per iteration)."""

    count: int
    mu: Any
    ns_coeffs: Any


class MuonMomentumState(NamedTuple):
    """torch's (and Keller Jordan's) Muon momentum: ``mu``, torch's ``momentum_buffer``."""

    mu: Any


# torch.optim.Muon keeps "momentum_buffer" and no "step"
MUON_MOMENTUM = torch_state(MuonMomentumState, mu="momentum_buffer")

# optax: mu <- (1 - b) g + b mu; m_hat = b mu / (1 - b^(t+1)) + (1 - b) g / (1 - b^t)
# (nesterov) or mu / (1 - b^t); the bias corrections divide, as optax's bias_correction
_OPTAX_MOMENTUM = "mu = one_minus_beta * u + beta * mu;\n"
_OPTAX_NESTEROV = "u = beta * (mu / bc_next) + one_minus_beta * (u / bc);\n"
_OPTAX_PLAIN = "u = mu / bc;\n"
# torch: buf.lerp_(g, 1 - mu); update = g.lerp(buf, mu) (nesterov) or buf (torch's lerp)
_TORCH_MOMENTUM = "mu = LERP(mu, u, one_minus_momentum);\n"
_TORCH_NESTEROV = "u = LERP(u, mu, momentum);\n"
_TORCH_PLAIN = "u = mu;\n"


def _optax_momentum(beta: float, nesterov: bool, ns_coeffs: Any) -> GradientTransformation:
    """optax's bias-corrected momentum of ``scale_by_muon``, state :class:`MuonState`."""

    def host_step(state: MuonState, **_: Any) -> tuple[tuple[float, ...], MuonState]:
        t = state.count + 1
        values = (1.0 - beta, beta, 1.0 - beta**t, 1.0 - beta ** (t + 1))
        return values, state._replace(count=t)

    fragment = Fragment(
        "muon_momentum_optax_nesterov" if nesterov else "muon_momentum_optax",
        _OPTAX_MOMENTUM + (_OPTAX_NESTEROV if nesterov else _OPTAX_PLAIN),
        slots=("mu",),
        scalars=("one_minus_beta", "beta", "bc", "bc_next"),
        host_step=host_step,
    )
    return elementwise(fragment, init=lambda mu: MuonState(count=0, mu=mu, ns_coeffs=ns_coeffs))


def _torch_momentum(momentum: float, nesterov: bool) -> GradientTransformation:
    """torch's Muon momentum (``lerp``), state :class:`MuonMomentumState`."""
    values = (float(momentum), 1.0 - float(momentum))
    fragment = Fragment(
        "muon_momentum_torch_nesterov" if nesterov else "muon_momentum_torch",
        _TORCH_MOMENTUM + (_TORCH_NESTEROV if nesterov else _TORCH_PLAIN),
        slots=("mu",),
        scalars=("momentum", "one_minus_momentum"),
        host_step=lambda state, **_: (values, state),
    )
    return elementwise(fragment, init=lambda mu: MuonMomentumState(mu=mu))


# ---------------------------------------------------------------------------- functional


def _coefficients(ns_coeffs: Any) -> Any:
    """A preset's coefficients (``"standard"``, ``"dion"``), else ``ns_coeffs`` as tuples."""
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in NS_COEFFS_PRESETS:
            raise ValueError(
                f"Unknown ns_coeff preset string: {ns_coeffs!r} (presets: "
                f"{', '.join(map(repr, NS_COEFFS_PRESETS))})"
            )
        return NS_COEFFS_PRESETS[ns_coeffs]
    rows = np.asarray(ns_coeffs, dtype=np.float64)
    return tuple(map(tuple, rows.tolist())) if rows.ndim == 2 else tuple(rows.tolist())


def _check_optax_args(ns_coeffs: Any, ns_steps: int, beta: float, eps: float,
                      nesterov: bool, adaptive: bool, preconditioning: str) -> Any:  # fmt: skip
    coefficients = _coefficients(ns_coeffs)
    ns_schedule(coefficients, ns_steps, allow_table=True)  # (ValueError: lengths, ns_steps)
    check(UNIT, beta=beta)
    check(NON_NEGATIVE, eps=eps)
    require("nesterov", nesterov, BOOL)
    require("adaptive", adaptive, BOOL)
    require("preconditioning", preconditioning, one_of(*PRECONDITIONINGS))
    return coefficients


def _scale_by_muon(
    ns_coeffs: Any, ns_steps: int, beta: float, eps: float, mu_dtype: Any, nesterov: bool,
    adaptive: bool, preconditioning: str, layout: Any, shape_scale: bool,
    consistent_rms: float | None, ns_dtype: str | None = None,
) -> GradientTransformation:  # fmt: skip
    coefficients = _check_optax_args(
        ns_coeffs, ns_steps, beta, eps, nesterov, adaptive, preconditioning
    )
    storage_dtype(mu_dtype, "mu_dtype")  # (ValueError naming mu_dtype)
    momentum = low_precision_state(
        _optax_momentum(float(beta), bool(nesterov), coefficients), mu_dtype, slots=("mu",)
    )
    stage = orthogonalize_by_newton_schulz(
        coefficients,
        ns_steps,
        float(eps),
        variant="optax",
        layout=layout,
        consistent_rms=consistent_rms,
        shape_scale=shape_scale,
        adaptive=bool(adaptive),
        preconditioning=preconditioning,
        ns_dtype=ns_dtype,
    )
    return chain(momentum, stage)


def scale_by_muon(
    ns_coeffs: Any = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    weight_dimension_numbers: Any = None,
    ns_dtype: str | None = None,
) -> GradientTransformation:
    """Muon's scaling (optax contrib 0.2.8's ``scale_by_muon``: signature, defaults, rule)::

        mu <- (1 - beta) g + beta mu;  t <- t + 1
        m_hat = beta mu / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)   (nesterov)
                mu / (1 - beta^t)                                           (otherwise)
        u <- NS(m_hat) per matrix: X / (||X||_F + eps), then per (a, b, c):
             X <- a X + (b A + c A^2) X,  A = X X^T   (on X^T when rows > cols)
        u <- <m_hat, u> u                                                  (adaptive)

    No shape scale here (optax's ``muon`` multiplies by it after). ``ns_coeffs``: one
    ``(a, b, c)`` repeated ``ns_steps`` times, or a table of ``n <= ns_steps`` triples (run
    all ``n``, as optax). ``weight_dimension_numbers``: ``None`` (every leaf a 2-D
    ``[in, out]`` matrix), a ``MuonDimensionNumbers``, a tree (prefix) of them, or a
    callable of the updates returning one; every leaf must be a Muon matrix. ``mu_dtype``:
    the momentum stored as float32, bfloat16 or float16. ``preconditioning``:
    ``"frobenius"``, ``"aol"`` or ``"schatten"`` (optax's ``"spectral"``, an SVD, raises).
    ``ns_dtype`` (ours): ``None`` (float32; optax iterates in the updates' dtype) or
    ``"bfloat16"`` (see ``orthogonalize_by_newton_schulz``).

    State: ``(MuonState(count, mu, ns_coeffs), EmptyState())`` (optax: the ``MuonState``
    alone). Device: one fused launch for the momentum per dtype of a packed tree, then the
    Newton–Schulz stage (a constant number of launches per group of same-shaped matrices);
    no host read.
    """
    return _scale_by_muon(
        ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov, adaptive, preconditioning,
        weight_dimension_numbers, False, None, ns_dtype,
    )  # fmt: skip


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, (MuonDimensionNumbers, str, bool))


def _per_leaf(prefix: Any, tree: Any) -> list[Any]:
    """``prefix`` (a prefix tree of specs, ``None`` or bools) broadcast to each leaf of
    ``tree`` (a ``None`` there, the tree's own or a leaf ``partition`` gave another
    transform, has no leaf and gets no entry)."""
    if _is_spec(prefix):
        return [prefix] * len(optree.tree_leaves(tree))
    return optree.broadcast_prefix(prefix, tree, is_leaf=_is_spec)


def _on_present(values: Callable[[Any], list[Any]]) -> Callable[[Any], Any]:
    """A callable of a tree: ``values(tree)`` (one per leaf) in the tree's structure."""

    def resolve(tree: Any) -> Any:
        return optree.tree_unflatten(optree.tree_structure(tree), values(tree))

    return resolve


def _muon_specs(dimension_numbers: Any, layout: Any) -> Callable[[Any], list[Any]]:
    """Per leaf of a tree, its Muon spec or ``None`` (AdamW's): optax's rule (``ndim == 2``
    with ``MuonDimensionNumbers()``), or an explicit (prefix) tree / callable of dimension
    numbers (``None`` entries: AdamW), or with ``layout`` every ``ndim >= 2`` leaf."""

    def specs(tree: Any) -> list[Any]:
        if dimension_numbers is not None:
            dims = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
            return _per_leaf(dims, tree)
        leaves = optree.tree_leaves(tree)
        if layout is not None:
            return [layout if x.ndim >= 2 else None for x in leaves]
        return [MuonDimensionNumbers() if x.ndim == 2 else None for x in leaves]

    return specs


def _labels(specs: Callable[[Any], list[Any]]) -> Callable[[Any], Any]:
    def labels(params: Any) -> Any:
        names = ["muon" if s is not None else "adam" for s in specs(params)]
        return optree.tree_unflatten(optree.tree_structure(params), names)

    return labels


def muon(
    learning_rate: ScalarOrSchedule,
    ns_coeffs: Any = DEFAULT_NS_COEFFS,
    ns_steps: int = 5,
    beta: float = 0.95,
    eps: float = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    adaptive: bool = False,
    preconditioning: str = "frobenius",
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_eps_root: float = 0.0,
    adam_weight_decay: float = 0.0,
    adam_learning_rate: ScalarOrSchedule | None = None,
    muon_weight_dimension_numbers: Any = None,
    consistent_rms: float | None = None,
    layout: Any = None,
    ns_dtype: str | None = None,
    state_dtype: Any = None,
    state_bits: int = 32,
) -> GradientTransformation:
    """Muon with AdamW for the other leaves (optax contrib 0.2.8's ``muon``: signature,
    defaults and rule), ``partition({"muon": ..., "adam": ...})``::

        Muon leaves:  u <- scale_by_muon(...)(g)  (see :func:`scale_by_muon`)
                      u <- s u,  s = sqrt(max(1, fan_out / fan_in))
                                 (sqrt(max(fan_in, fan_out)) consistent_rms if given)
                      p <- p - learning_rate (u + weight_decay p)
        other leaves: optax's adamw(adam_learning_rate or learning_rate, adam_b1, adam_b2,
                      eps, adam_eps_root, adam_weight_decay, mu_dtype, nesterov=nesterov)

    ``ns_coeffs``: a triple, a table of triples, or a preset (``"standard"``, ``"dion"``).
    Muon leaves: ``ndim == 2`` (``[in, out]``, optax's layout); with
    ``muon_weight_dimension_numbers`` (a prefix tree of ``MuonDimensionNumbers`` / ``None``,
    or a callable of the params returning one) those whose entry is not ``None``, other
    axes batched. ``layout`` (ours, instead of dimension numbers): ``"out_in"`` (torch's
    ``[out, in]``) or ``"in_out"``, and every leaf of ``ndim >= 2`` goes to Muon (4-D
    leaves as conv weights flattened to one matrix, 3-D or 5-D+ as batches of matrices;
    see ``_muon_layout.matrix_view``); the shape scale follows it.
    ``weight_decay_mask``: as optax's (a prefix tree of bools or a callable), over the params.
    ``state_dtype``, ``state_bits``: how the state is stored (see :func:`low_precision_state`;
    8 bits is refused: the Newton–Schulz stage is not element-wise). ``ns_dtype``: as
    :func:`scale_by_muon`'s.

    State: ``PartitionState({"muon": MaskedState(...), "adam": MaskedState(...)})``.
    """
    if muon_weight_dimension_numbers is not None and layout is not None:
        raise ValueError("muon: give muon_weight_dimension_numbers or layout, not both")
    if layout is not None:
        layout = check_layout(layout)
    check_learning_rate(learning_rate)
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    check_learning_rate(adam_learning_rate)
    check(NON_NEGATIVE, weight_decay=weight_decay, adam_weight_decay=adam_weight_decay)
    if consistent_rms is not None:
        check(POSITIVE, consistent_rms=consistent_rms)
    specs = _muon_specs(muon_weight_dimension_numbers, layout)
    mask = weight_decay_mask
    if mask is not None:
        wanted = mask

        def decay_flags(tree: Any) -> list[Any]:
            return _per_leaf(wanted(tree) if callable(wanted) else wanted, tree)

        mask = _on_present(decay_flags)
    core = _scale_by_muon(
        ns_coeffs, ns_steps, beta, eps, mu_dtype, nesterov, adaptive, preconditioning,
        _on_present(specs), True, consistent_rms, ns_dtype,
    )  # fmt: skip
    decay = [add_decayed_weights(weight_decay, mask)] if weight_decay else []
    muon_tx = chain(core, *decay, scale_by_learning_rate(learning_rate))
    adam = _scale_by_optax_adam(adam_b1, adam_b2, eps, adam_eps_root, mu_dtype, nesterov)
    adam_decay = [add_decayed_weights(adam_weight_decay)] if adam_weight_decay else []
    adam_tx = chain(adam, *adam_decay, scale_by_learning_rate(adam_learning_rate))
    tx = partition({"muon": muon_tx, "adam": adam_tx}, _labels(specs))
    return low_precision_state(tx, state_dtype, state_bits=state_bits)


# ---------------------------------------------------------------------------- stateful


def _ns_coefficients(value: Any) -> tuple[float, float, float] | None:
    try:
        return tuple(float(c) for c in value) if len(value) == 3 else None  # type: ignore[return-value]
    except (TypeError, ValueError):
        return None


NS_COEFFICIENTS = Rule(
    "a tuple of exactly 3 values (a, b, c)",
    lambda v: None if isinstance(v, str) else _ns_coefficients(v),
    lambda v: True,
)


def _muon_chain(
    lr: Any, weight_decay: float, momentum: float, nesterov: bool, ns_coefficients: Any,
    eps: float, ns_steps: int, adjust_lr_fn: str | None, variant: str, layout: str,
    ns_dtype: str | None = None,
) -> GradientTransformation:  # fmt: skip
    stage = orthogonalize_by_newton_schulz(
        tuple(ns_coefficients),
        int(ns_steps),
        float(eps),
        variant=variant,
        layout=layout,
        adjust_lr_fn=adjust_lr_fn if variant == "torch" else None,
        shape_scale=True,
        ns_dtype=ns_dtype,
    )
    decay = [add_decayed_weights(weight_decay)] if weight_decay else []
    return chain(_torch_momentum(momentum, nesterov), stage, *decay, scale_by_learning_rate(lr))


def _param_name(gi: int, j: int) -> str:
    return f"param_groups[{gi}]['params'][{j}]"


class Muon(Optimizer):
    """Muon (torch 2.13's ``torch.optim.Muon``, or Keller Jordan's ``SingleDeviceMuon`` with
    ``variant="reference"``)::

        buf <- lerp(buf, g, 1 - momentum)
        U    = lerp(g, buf, momentum)             (nesterov; else U = buf, never modified)
        O    = NS(U) per matrix: X / max(||X||_F, eps) (torch) or X / (||X||_F + eps)
               (reference), then ns_steps times X <- a X + (b A + c A^2) X, A = X X^T
               (on X^T when rows > cols)
        p   <- p - lr (ratio O + weight_decay p)   (torch: p (1 - lr wd) - lr ratio O)

    ``ratio``: torch's ``adjust_lr_fn`` (``None``/``"original"`` ``sqrt(max(1, A/B))``,
    ``"match_rms_adamw"`` ``0.2 sqrt(max(A, B))``, ``"spectral_unclamped"`` (2.14)
    ``sqrt(A/B)``; ``A = fan_out``, ``B = fan_in`` of the ``layout``: ``"out_in"``, torch's
    ``[out, in]``, or ``"in_out"``); the reference's ``sqrt(max(1, A/B))`` of the matrix
    view (a conv weight's ``out / (in kh kw)``, not KellerJordan/Muon#63's ``kh / kw``).

    By default, unlike torch, the iteration runs in float32 (float64 for float64 params),
    so results differ from torch's by its bfloat16 rounding (~1e-2 relative on the update);
    ``ns_dtype="bfloat16"`` iterates in bfloat16 as torch and the reference do (float32
    sums; natively, about twice as fast, where the device has AVX-512 BF16).

    Args:
      params: parameters or param groups: 2-D for ``variant="torch"`` (torch's check: a
        ``ValueError`` naming the parameter), ``ndim >= 2`` for ``"reference"`` (4-D as conv
        weights ``(out, -1)``, 3-D or 5-D+ as batches of matrices).
      lr: > 0 (default 1e-3).  weight_decay: >= 0 (default 0.1).
      momentum: >= 0 (default 0.95).  nesterov: default True.
      ns_coefficients: ``(a, b, c)`` (default (3.4445, -4.775, 2.0315)).
      eps: > 0 (default 1e-7).  ns_steps: an int in [0, 100) (default 5).
      adjust_lr_fn: as above (torch only; default None).
      variant: ``"torch"`` (default) or ``"reference"``.  layout: ``"out_in"`` (default).
      ns_dtype: ``None`` (default: float32) or ``"bfloat16"``.

    State per parameter: ``momentum_buffer`` (torch's key; no ``step``): state dicts load
    into ``torch.optim.Muon`` and back.

    A non-finite gradient or momentum raises ``FloatingPointError`` naming the parameter,
    with params and state unchanged. Device: one fused non-finite reduction over the
    grads and momentum buffers of all groups and **one host read** (its flag) per step, before
    anything is written; then per group the momentum (one launch per dtype), the stage and
    the update.
    """

    hyperparameters = (
        torch_lr(1e-3),
        Hyperparameter("weight_decay", 0.1, NON_NEGATIVE),
        Hyperparameter("momentum", 0.95, NON_NEGATIVE),
        Hyperparameter("nesterov", True, BOOL),
        Hyperparameter("ns_coefficients", DEFAULT_NS_COEFFS, NS_COEFFICIENTS),
        Hyperparameter("eps", 1e-7, POSITIVE),
        Hyperparameter("ns_steps", 5, int_in(0, MAX_NS_STEPS)),
        Hyperparameter("adjust_lr_fn", None, optional(one_of(*ADJUST_LR_FNS[1:]))),
        KEYWORD_ONLY,
        Hyperparameter("variant", "torch", one_of(*MUON_VARIANTS)),
        Hyperparameter("layout", "out_in", one_of("out_in", "in_out")),
        Hyperparameter("ns_dtype", None, optional(one_of("bfloat16"))),
    )
    requirements = (
        Requirement(
            "adjust_lr_fn",
            "None or 'original' with variant='reference'",
            lambda adjust_lr_fn, variant, **_: (
                variant == "torch" or adjust_lr_fn in (None, "original")
            ),
        ),
    )
    torch_state = (MUON_MOMENTUM, DECAY_COUNT)
    torch_step = False

    @staticmethod
    def functional(
        lr: Any,
        weight_decay: float,
        momentum: float,
        nesterov: bool,
        ns_coefficients: tuple[float, float, float],
        eps: float,
        ns_steps: int,
        adjust_lr_fn: str | None,
        variant: str,
        layout: str,
        ns_dtype: str | None = None,
    ) -> GradientTransformation:
        return _muon_chain(
            lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps,
            adjust_lr_fn, variant, layout, ns_dtype,
        )  # fmt: skip

    @classmethod
    def check_params(cls, param_groups: Sequence[Mapping[str, Any]], **defaults: Any) -> None:
        """``ValueError`` naming the first parameter that is not a matrix of its group's
        variant (2-D for ``"torch"``, ``ndim >= 2`` for ``"reference"``)."""
        for gi, group in enumerate(param_groups):
            variant = group.get("variant", defaults.get("variant", "torch"))
            for j, p in enumerate(group["params"]):
                check_muon_param(_param_name(gi, j), p.data.shape, strict_2d=variant == "torch")

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """As :meth:`Optimizer.add_param_group`, after checking that every parameter is a
        matrix of the group's variant (``ValueError`` naming it, nothing changed). Inside
        ``ZeroRedundancyOptimizer`` the parameters are 1-D slices of matrices it checked."""
        if isinstance(param_group, Mapping) and "params" in param_group:
            gi = len(self.param_groups)
            params = group_params(param_group["params"], gi)
            param_group = {**param_group, "params": params}
            if not shards_building():
                groups = [{"params": []}] * gi + [param_group]  # (names count from gi)
                self.check_params(groups, **self.defaults)
        super().add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon step of every parameter with a grad (see the class); returns
        ``closure()`` (called first) or ``None``. A non-finite grad or momentum raises
        ``FloatingPointError`` before anything is written."""
        self._check_step()
        loss = closure() if closure is not None else None
        self._check_finite()
        super().step()
        return loss

    def _finite_candidates(self) -> list[tuple[str, Any]]:
        """Each grad of a parameter that steps now and its momentum buffer (where it has
        one), named."""
        found = []
        for gi, (group, rec) in enumerate(zip(self.param_groups, self._groups, strict=True)):
            members, _ = rec.members(group, gi)  # (raises for a bad grad: nothing changed)
            bufs = rec.bufs.get("momentum_buffer")
            counts = rec.counts.get("momentum_buffer")
            for i in members:
                found.append((f"gradient of {_param_name(gi, i)}", rec.params[i].grad))
                buf = None if bufs is None or not counts or not counts[i] else bufs[i]
                if isinstance(buf, cla.Array) and buf.dtype.kind == "f":
                    found.append((f"momentum_buffer of {_param_name(gi, i)}", buf))
        return found

    def _check_finite(self) -> None:
        found = self._finite_candidates()
        arrays = [a for _, a in found if a.size]
        if not arrays:
            return
        flag = reduce_leaves(arrays[0].queue, arrays, "nonfinite", "flag")
        if float(flag.get()[0]) == 0.0:
            return
        name = next((n for n, a in found if not np.isfinite(a.get()).all()), "a parameter")
        raise FloatingPointError(
            f"Muon: non-finite values in the {name}; nothing was changed (skip the step, "
            "or lower the learning rate / use a loss scaler)"
        )


# ---------------------------------------------------------------------------- MuonWithAuxAdam

_MUON_GROUP_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "ns_coefficients", "eps",
                    "ns_steps", "adjust_lr_fn", "variant", "layout")  # fmt: skip
_ADAM_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def _is_muon_param(p: Any, variant: str) -> bool:
    ndim = len(p.data.shape)
    return ndim == 2 if variant == "torch" else ndim >= 2


class MuonWithAuxAdam:
    """Muon for the matrices and AdamW for the rest, as one optimizer (Keller Jordan's
    ``MuonWithAuxAdam`` recipe; optax's ``muon`` routes leaves the same way)::

        Muon params:  Muon(lr, weight_decay, momentum, variant=variant, ...)   (see Muon)
        other params: AdamW(adam_lr, adam_betas, adam_eps, adam_weight_decay)
                      p <- p - adam_lr (m_hat / (sqrt(v_hat) + adam_eps) + adam_wd p)

    ``params``: parameters (``ndim >= 2`` go to Muon with ``variant="reference"``, ``ndim
    == 2`` with ``"torch"``; the rest to AdamW), or Keller Jordan's param groups, each with
    ``use_muon=True`` (keys of :class:`Muon`) or ``use_muon=False`` (keys of ``AdamW``:
    ``lr``, ``betas``, ``eps``, ``weight_decay``); missing keys take this constructor's
    values. Defaults are Keller Jordan's (lr 0.02, momentum 0.95, no weight decay; AdamW
    lr 3e-4, betas (0.9, 0.95), eps 1e-10).

    ``param_groups`` lists both optimizers' groups in the given order (LR schedulers drive
    it), each with its ``use_muon`` flag; ``state_dict`` is one torch-layout dict over
    both (as Keller Jordan's single optimizer's), and ``load_state_dict`` restores both
    or, on error, neither. ``step``
    steps Muon first (its non-finite check runs before anything changes), then AdamW.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        *,
        adam_lr: float = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-10,
        adam_weight_decay: float = 0.0,
        variant: str = "reference",
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        layout: str = "out_in",
        ns_dtype: str | None = None,
    ) -> None:
        require("variant", variant, one_of(*MUON_VARIANTS))
        muon_defaults = {
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
            "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn, "variant": variant, "layout": layout,
            "ns_dtype": ns_dtype,
        }  # fmt: skip
        adam_defaults = {"lr": adam_lr, "betas": adam_betas, "eps": adam_eps,
                         "weight_decay": adam_weight_decay}  # fmt: skip
        muon_groups, adam_groups, order = self._route(params, variant)
        self.muon = Muon(muon_groups, **muon_defaults) if muon_groups else None
        self.adam = AdamW(adam_groups, **adam_defaults) if adam_groups else None
        self._order = order  # (use_muon, index in that optimizer's param_groups)
        for use_muon, k in order:
            self._optimizer(use_muon).param_groups[k]["use_muon"] = use_muon
        self.defaults = {**muon_defaults, **{f"adam_{k}": v for k, v in adam_defaults.items()}}

    @staticmethod
    def _route(params: Any, variant: str) -> tuple[list, list, list[tuple[bool, int]]]:
        """The Muon groups, the AdamW groups and where each given group went."""
        groups = as_param_groups(params)
        muon_groups: list[dict[str, Any]] = []
        adam_groups: list[dict[str, Any]] = []
        order: list[tuple[bool, int]] = []
        for gi, group in enumerate(groups):
            if "use_muon" not in group:
                if len(groups) > 1 or set(group) != {"params"}:
                    raise ValueError(
                        f"MuonWithAuxAdam: param_groups[{gi}] has no 'use_muon' (True for "
                        "Muon's groups, False for AdamW's)"
                    )
                params = group_params(group["params"], gi)
                mine = [p for p in params if _is_muon_param(p, variant)]
                rest = [p for p in params if not _is_muon_param(p, variant)]
                for use_muon, ps in ((True, mine), (False, rest)):
                    if ps:
                        (muon_groups if use_muon else adam_groups).append({"params": ps})
                        order.append((use_muon, len(muon_groups if use_muon else adam_groups) - 1))
                continue
            use_muon = require(f"param_groups[{gi}]['use_muon']", group["use_muon"], BOOL)
            allowed = _MUON_GROUP_KEYS if use_muon else _ADAM_GROUP_KEYS
            unknown = sorted(set(group) - {"params", "use_muon", *allowed})
            if unknown:
                raise ValueError(
                    f"MuonWithAuxAdam: param_groups[{gi}] (use_muon={use_muon}) has keys "
                    f"{unknown} that {'Muon' if use_muon else 'AdamW'} does not take"
                )
            target = muon_groups if use_muon else adam_groups
            target.append({k: v for k, v in group.items() if k != "use_muon"})
            order.append((use_muon, len(target) - 1))
        return muon_groups, adam_groups, order

    def _optimizer(self, use_muon: bool) -> Optimizer:
        opt = self.muon if use_muon else self.adam
        assert opt is not None
        return opt

    def _parts(self) -> list[Optimizer]:
        return [o for o in (self.muon, self.adam) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Both optimizers' groups (the dicts themselves), in the order given."""
        return [self._optimizer(m).param_groups[k] for m, k in self._order]

    @property
    def state(self) -> dict[Any, dict[str, Any]]:
        """Parameter -> its state (both optimizers')."""
        out: dict[Any, dict[str, Any]] = {}
        for opt in self._parts():
            out.update(opt.state)
        return out

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for opt in self._parts():
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._parts():
            opt.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """One torch-layout state dict, as Keller Jordan's single optimizer has: the groups
        in the given order (each with ``use_muon``), parameters numbered across them."""
        parts = {m: self._optimizer(m).state_dict() for m in {m for m, _ in self._order}}
        state: dict[int, Any] = {}
        groups = []
        start = 0
        for use_muon, k in self._order:
            group = dict(parts[use_muon]["param_groups"][k])
            local = group["params"]
            group["params"] = list(range(start, start + len(local)))
            group["use_muon"] = use_muon
            for i, j in zip(local, group["params"], strict=True):
                if i in parts[use_muon]["state"]:
                    state[j] = parts[use_muon]["state"][i]
            groups.append(group)
            start += len(local)
        return {"state": state, "param_groups": groups, "optimizer": type(self).__name__}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` (ours, or Keller Jordan's with numpy arrays): both
        optimizers' parts, or neither (``ValueError``, nothing changed)."""
        parts = self._split(state_dict)
        before = {m: self._optimizer(m).state_dict() for m in parts}
        done = []
        try:
            for use_muon, part in parts.items():
                self._optimizer(use_muon).load_state_dict(part)
                done.append(use_muon)
        except Exception:
            for use_muon in done:
                self._optimizer(use_muon).load_state_dict(before[use_muon])
            raise
        finally:
            for use_muon, k in self._order:
                self._optimizer(use_muon).param_groups[k]["use_muon"] = use_muon

    def _split(self, state_dict: Mapping[str, Any]) -> dict[bool, dict[str, Any]]:
        """A combined state dict as each optimizer's own (checked: groups, flags)."""
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("MuonWithAuxAdam: a state dict has 'state' and 'param_groups'")
        saved = list(state_dict["param_groups"])
        if len(saved) != len(self._order):
            raise ValueError(
                f"MuonWithAuxAdam: the state dict has {len(saved)} param groups, this "
                f"optimizer {len(self._order)}"
            )
        ids = [int(j) for g in saved for j in g["params"]]
        unknown = sorted({int(j) for j in state_dict["state"]} - set(ids), key=str)
        if unknown:
            raise ValueError(
                f"MuonWithAuxAdam: loaded state refers to parameters {unknown}, which are in "
                "no group"
            )
        parts: dict[bool, dict[str, Any]] = {}
        for gi, (group, (use_muon, k)) in enumerate(zip(saved, self._order, strict=True)):
            if group.get("use_muon", use_muon) != use_muon:
                raise ValueError(
                    f"MuonWithAuxAdam: loaded param_groups[{gi}] has use_muon="
                    f"{group.get('use_muon')}, this optimizer's {use_muon}"
                )
            opt = self._optimizer(use_muon)
            part = parts.setdefault(
                use_muon,
                {"state": {}, "param_groups": [None] * len(opt.param_groups),
                 "optimizer": type(opt).__name__},
            )  # fmt: skip
            offset = sum(len(g["params"]) for g in opt.param_groups[:k])
            local = list(range(offset, offset + len(group["params"])))
            part["param_groups"][k] = {
                **{key: v for key, v in group.items() if key != "use_muon"},
                "params": local,
            }
            for i, j in zip(local, group["params"], strict=True):
                entry = state_dict["state"].get(j, state_dict["state"].get(str(j)))
                if entry is not None:
                    part["state"][i] = entry
        return parts

    def __repr__(self) -> str:
        return "MuonWithAuxAdam(\n" + "\n".join(repr(o) for o in self._parts()) + "\n)"
