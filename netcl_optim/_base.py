"""Core types: GradientTransformation, the Plan protocol, fragments and states."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, cast

PyTree = Any
Params = PyTree
Updates = PyTree
OptState = PyTree
Schedule = Callable[[int], float]
ScalarOrSchedule = float | Schedule


class TransformInitFn(Protocol):
    def __call__(self, params: Params) -> OptState: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: OptState, params: Params | None = None, **extra_args: Any
    ) -> tuple[Updates, OptState]: ...


# the new state, from the new slot trees of each of the step's parts (in order)
Rebuild = Callable[[list[tuple[Any, ...]]], OptState]


class Plan(Protocol):
    """What a transform tells the fused executor (``GradientTransformation.plan``).

    ``children``: its sub-transforms (a chain's, in order; a wrapper's inner transform).
    ``signature``: hashable; equal signatures mean the same fragments (names and slots, in
    order) and so the same state structure. ``fusible``: all its work is fragments, so the
    executor fuses its :meth:`parts` with its neighbours' (else it runs the transform's own
    ``update``). ``elementwise``: fusible with no whole-tree reduction, so each element of the
    result depends only on the same element of the inputs and state (what ZeRO's sharding
    needs). Implementations: :class:`Fragment` (a leaf), the chains', ``inject_hyperparams``'
    and ``MultiSteps``' plans, and :class:`OpaquePlan` for the wrappers that run their own
    ``update``. Only the executor (``netcl_optim.fusion``) walks plans.
    """

    @property
    def children(self) -> tuple[GradientTransformation, ...]: ...

    @property
    def signature(self) -> Hashable: ...

    @property
    def fusible(self) -> bool: ...

    @property
    def elementwise(self) -> bool: ...

    def parts(self, state: OptState, extra_args: dict[str, Any]) -> tuple[list[Part], Rebuild]:
        """One step's work (only when ``fusible``): the :class:`Part` of each fragment, and
        how to build the new state from the parts' new slot trees."""
        ...

    def split(self, state: OptState) -> tuple[Sequence[OptState], Callable] | None:
        """A chain's: its children's states and how to join their new states into its own
        (the executor fuses runs of fusible children around the others). ``None`` for every
        other plan: its :meth:`parts` include its children's."""
        ...


def is_fusible(tx: GradientTransformation) -> bool:
    """Whether the executor can fuse ``tx`` (see :class:`Plan`)."""
    return tx.plan is not None and tx.plan.fusible


def is_elementwise(tx: GradientTransformation) -> bool:
    """Whether ``tx`` is fusible without a whole-tree reduction (see :class:`Plan`)."""
    return tx.plan is not None and tx.plan.elementwise


def signature_of(tx: GradientTransformation) -> Hashable:
    """``tx``'s plan signature; one signature for all opaque transforms."""
    return ("opaque",) if tx.plan is None else tx.plan.signature


@dataclass(frozen=True, eq=False)
class OpaquePlan:
    """The plan of a wrapper that runs its own ``update`` (``masked``, ``partition``,
    ``apply_if_finite``, ZeRO's ``shard_optimizer``, ...): not fusible; its ``children``
    and ``signature`` still describe it."""

    kind: str
    children: tuple[GradientTransformation, ...]
    # class attributes, not fields; unannotated (not ClassVar) so that they satisfy the Plan
    # protocol's read-only properties
    fusible = False
    elementwise = False

    @property
    def signature(self) -> Hashable:
        return (self.kind, *(signature_of(c) for c in self.children))

    def parts(self, state: OptState, extra_args: dict[str, Any]) -> tuple[list[Part], Rebuild]:
        raise TypeError(f"{self.kind} runs its own update: it has no fused parts")

    def split(self, state: OptState) -> None:
        return None


ShapeOf = Callable[[tuple[int, ...]], "tuple[int, ...] | None"]


@dataclass(frozen=True, eq=False)
class StagePlan:
    """The plan of a transform that runs kernels of its own (not fragments) and can run in
    place: ``run(updates, state, params, *, inplace, **extra_args) -> (updates, state)``.
    In place (the stateful layer's steps), it writes the state's arrays where they are, and
    the new state holds the same arrays; the updates it returns are always its own buffers.
    Not fusible: the executor materialises its input and its output.

    ``config``: what, beside ``kind``, makes two stages' states differ (their signature).
    ``state_shapes``: per state field that is not shaped like the params, the shape of its
    array for a param of a given shape (``None``: a ``(1,)`` placeholder, which torch's
    state dicts leave out), for the stateful layer's buffers. ``shards``: ``run`` handles a
    ZeRO slice (see ``fusion/_slices.py``): the functional ZeRO accepts it. ``whole_leaves``:
    ZeRO must cut its shards at leaf boundaries only (Muon: a matrix is never split).
    """

    kind: str
    run: Callable[..., tuple[Any, Any]]
    config: Hashable = ()
    state_shapes: tuple[tuple[str, ShapeOf], ...] = ()
    shards: bool = False
    whole_leaves: bool = False
    # class attributes, not fields (unannotated: see OpaquePlan)
    children = ()
    fusible = False
    elementwise = False

    @property
    def signature(self) -> Hashable:
        return (self.kind, self.config)

    def parts(self, state: OptState, extra_args: dict[str, Any]) -> tuple[list[Part], Rebuild]:
        raise TypeError(f"{self.kind} runs its own kernels: it has no fused parts")

    def split(self, state: OptState) -> None:
        return None


class GradientTransformation(NamedTuple):
    """A pair of pure functions, as in optax.

    ``init(params) -> state``; ``update(updates, state, params=None, **extra_args) ->
    (updates, state)``. ``plan`` tells the fused executor what the transform is made of (a
    :class:`Plan`: a :class:`Fragment`, a chain's or a wrapper's plan); ``None`` marks an
    opaque transform, which still composes in :func:`chain`.
    """

    init: TransformInitFn
    update: TransformUpdateFn
    plan: Plan | None = None


def as_transform(tx: Any, what: str = "tx") -> GradientTransformation:
    """``tx`` as a :class:`GradientTransformation`: itself; what its
    ``gradient_transformation()`` returns (``MultiSteps``, fusible when its inner optimizer
    is); or, for any other object with ``init`` and ``update``, an opaque transform of them.
    ``what`` names ``tx`` in the TypeError raised for anything else."""
    if isinstance(tx, GradientTransformation):
        return tx
    convert = getattr(tx, "gradient_transformation", None)
    if callable(convert):
        converted = convert()
        if isinstance(converted, GradientTransformation):
            return converted
    if callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None)):
        return GradientTransformation(tx.init, tx.update)
    raise TypeError(
        f"{what} is a {type(tx).__name__}, not a transform (a GradientTransformation, or an "
        "object with init and update)"
    )


class EmptyState(NamedTuple):
    """State of a stateless transform."""


@dataclass(frozen=True)
class Reduction:
    """A whole-tree reduction over the incoming updates, run before a fragment.

    ``op`` accumulates per element (``"sumsq"``, ``"maxabs"``, ``"sumpow"``, ``"nonfinite"``);
    ``finish`` turns the total into values in a small device buffer (``"clip"``: total norm
    and clip coefficient; ``"flag"``: 1.0 if any element was non-finite). The fragment's
    source reads them by the names in ``outputs``.
    """

    op: str
    finish: str
    outputs: tuple[str, ...]
    scalars: tuple[str, ...] = ()


@dataclass(frozen=True)
class SegmentReduction:
    """Sums over each segment of the incoming updates, run before a fragment that reads a
    value per segment (a norm per leaf, a mean per row): see ``fusion/_segments.py``.

    ``segments``: ``"leaf"`` (one per leaf; a 0-d leaf is a segment of one element),
    ``"rows"`` (one per index along the first axis of each leaf of ndim >= 2; a leaf of
    ndim <= 1 is one segment whose sums are 0 and whose ``n`` is 0), or ``"units:<spec>"``
    (adaptive_grad_clip's units: rows or columns, see ``fusion/_segments.unit_axes``).
    ``terms``: OpenCL C expressions of ``u`` (and ``p`` when ``needs_params``), each summed
    over the segment in the reduction type (double where the device has fp64). ``finish``:
    one expression per name of ``outputs``, over the sums ``s0, s1, ...`` and ``n`` (the
    segment's element count), evaluated once per segment; the fragment's source reads the
    outputs of its
    element's segment by those names (as ``real``).

    ``state``: fields of the fragment's state that hold one value per segment, in segment
    order (with ``segments="leaf"``: a tree of 0-d arrays like the params, NovoGrad's
    ``nu``; Adafactor's stage keeps its row and column factors so), and
    ``update``: each one's new value, over the old values (by name), the sums, ``n`` and the
    fragment's scalars. The finish runs once per segment, so it writes them; the outputs
    read the new values (by name, as stored).
    """

    terms: tuple[str, ...]
    outputs: tuple[str, ...]
    finish: tuple[str, ...]
    segments: str = "leaf"
    needs_params: bool = False
    state: tuple[str, ...] = ()
    update: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.segments not in ("leaf", "rows") and not self.segments.startswith("units:"):
            raise ValueError(f"SegmentReduction: unknown segments {self.segments!r}")
        if len(self.update) != len(self.state):
            raise ValueError("SegmentReduction: one update expression per state field")
        if len(self.finish) != len(self.outputs):
            raise ValueError("SegmentReduction: one finish expression per output")


@dataclass(frozen=True)
class TreeSums:
    """Scalars of a fragment's state fed by sums over the whole tree, kept on the device (the
    learning-rate-free rules' step size ``d``): see ``fusion/_tree_sums.py``.

    ``state``: the fields holding them, each a tree of 0-d arrays like the params (one value
    per leaf, the state dtype, all equal: every leaf of a step holds the tree's value).
    ``statements``: ``(name, expression)`` pairs run in order by the finishing launch (one
    work-item), over the sums ``s0, s1, ...`` (the tree's sums of ``terms``), the fragment's
    scalars and the state fields by name; a name that is a state field assigns its new value,
    any other declares a ``real`` local (an output when listed in ``outputs``).

    ``after=True`` (the sums of this step are used at the next one: D-Adaptation): ``terms``
    names ``real`` variables the fragment's source assigns; the fused kernel itself sums them
    (one pass over the tree), its source reads the state fields as they were at the start
    of the step, and the finish runs after it. ``outputs`` must be empty.

    ``after=False`` (the sums are used in the same step: DoG, Prodigy): ``terms`` are
    expressions of ``u``, ``p``, the slots (before the step), the state fields and the
    scalars, summed by a pass over the tree before the fused kernel; the finish runs
    between them and the source reads ``outputs`` (by name, as ``real``).
    """

    state: tuple[str, ...]
    terms: tuple[str, ...]
    statements: tuple[tuple[str, str], ...]
    outputs: tuple[str, ...] = ()
    after: bool = True
    start: tuple[float, ...] = ()  # each state field's value at init (empty: zeros)

    def __post_init__(self) -> None:
        if self.start and len(self.start) != len(self.state):
            raise ValueError("TreeSums: one start value per state field")
        names = [name for name, _ in self.statements]
        if self.after and self.outputs:
            raise ValueError("TreeSums: after=True reads the state, not outputs")
        missing = [o for o in self.outputs if o not in names]
        if missing:
            raise ValueError(f"TreeSums: outputs {missing} are assigned by no statement")
        if not self.terms or not self.state:
            raise ValueError("TreeSums: needs terms and state fields")


class _Params:
    """The start value "a copy of the params" (:data:`PARAMS`)."""

    def __repr__(self) -> str:
        return "PARAMS"

    def __reduce__(self) -> str:
        return "PARAMS"


PARAMS = _Params()


@dataclass(frozen=True, eq=False)
class Fragment:
    """OpenCL C for one element-wise transform, to be fused with its neighbours.

    The source updates ``u`` (the update, compute type ``real``) and may read ``p`` (the
    parameter) when ``needs_params``, read and write the slots (state arrays shaped like the
    params, named fields of the state) and read the scalars, whose per-step values come from
    ``host_step(state, **extra_args) -> (values, state with its host fields advanced)``.

    ``slot_init`` declares each slot's start value (empty: all zeros): ``init`` and the
    stateful optimizers' fresh buffers hold it, so the source just reads the slot. A start
    of :data:`PARAMS` makes the slot a copy of the params (schedule-free's ``z``, a
    lookahead's slow weights, an average). It only changes allocation, not the kernel (it
    is not in ``key``).

    ``nonnegative``: the slots that never hold a negative value (Adam's ``nu``): stored in 8
    bits, they use the unsigned map (allocation only, not in ``key``).

    ``element_index`` (opt-in, in ``key``): the source may read ``idx`` (``ulong``), the
    element's position in its dtype group's packed layout (leaves back to back in tree
    order; the same whether the tree is packed, stepped leaf by leaf or sharded), and call
    the counter-based generator's helpers (``philox4x32_10``, ``philox_normal``; see
    ``fusion/_random.py``), for noise that depends on the element and not on the launch.

    ``rounds_state`` (in ``key``; with ``element_index`` and the scalars ``key0_lo``,
    ``key0_hi``, ``key1_lo``, ``key1_hi``, ``t_lo``, ``t_hi``: 16-bit halves of the
    generator's key and counter): every bfloat16 slot of the step is stored with stochastic
    rounding, its random bits from Philox of (element index, t) under that key
    (:func:`~netcl_optim.stochastic_rounding`).
    """

    name: str
    source: str
    slots: tuple[str, ...] = ()
    scalars: tuple[str, ...] = ()
    host_step: Callable[..., tuple[tuple[float, ...], Any]] | None = None
    needs_params: bool = False
    reduction: Reduction | None = None
    slot_init: tuple[float | _Params, ...] = ()
    element_index: bool = False
    segment_reduction: SegmentReduction | None = None
    nonnegative: tuple[str, ...] = ()
    rounds_state: bool = False
    tree_sums: TreeSums | None = None
    key: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.slot_init and len(self.slot_init) != len(self.slots):
            raise ValueError(
                f"Fragment {self.name!r}: slot_init has {len(self.slot_init)} values for "
                f"{len(self.slots)} slots"
            )
        starts = tuple(v if v is PARAMS else float(cast(float, v)) for v in self.slot_init)
        object.__setattr__(self, "slot_init", starts)
        if self.reduction is not None and self.segment_reduction is not None:
            raise ValueError(f"Fragment {self.name!r}: a whole-tree and a segment reduction")
        red = self.segment_reduction
        if red is not None and red.state and red.segments != "leaf":
            raise ValueError(f"Fragment {self.name!r}: per-segment state needs segments='leaf'")
        if red is not None and red.needs_params:
            object.__setattr__(self, "needs_params", True)
        if self.tree_sums is not None and not self.tree_sums.after:  # (its pre-pass reads p)
            object.__setattr__(self, "needs_params", True)
        key = (self.name, self.source, self.slots, self.scalars, self.needs_params, self.reduction)
        # an opt-in capability extends the key only when asked: other kernels keep their names
        if self.element_index:
            key = (*key, "element_index")
        if self.segment_reduction is not None:
            key = (*key, self.segment_reduction)
        if self.rounds_state:
            key = (*key, "rounds_state")
        if self.tree_sums is not None:
            if self.reduction is not None or self.segment_reduction is not None:
                raise ValueError(f"Fragment {self.name!r}: tree sums and another reduction")
            key = (*key, self.tree_sums)
        object.__setattr__(self, "key", key)

    # as a leaf Plan; class attributes, not fields (unannotated: see OpaquePlan)
    children = ()
    fusible = True

    @property
    def signature(self) -> Hashable:
        return (self.name, self.slots)

    @property
    def slot_starts(self) -> tuple[float | _Params, ...]:
        """Each slot's start value (``slot_init``, or zeros)."""
        return self.slot_init or (0.0,) * len(self.slots)

    @property
    def elementwise(self) -> bool:
        return self.reduction is None and self.segment_reduction is None and self.tree_sums is None

    @property
    def reduces(self) -> bool:
        """Whether a reduction (whole-tree or per segment) runs before this fragment: it
        then starts a fused segment, over materialised updates."""
        if self.tree_sums is not None and not self.tree_sums.after:
            return True
        return self.reduction is not None or self.segment_reduction is not None

    def split(self, state: OptState) -> None:
        return None

    @property
    def segment_state(self) -> tuple[str, ...]:
        """The state fields with one value per segment (see :class:`SegmentReduction`) or
        per leaf, all equal (:class:`TreeSums`)."""
        if self.tree_sums is not None:
            return self.tree_sums.state
        return self.segment_reduction.state if self.segment_reduction is not None else ()

    def parts(self, state: OptState, extra_args: dict[str, Any]) -> tuple[list[Part], Rebuild]:
        """One :class:`Part`: the scalars' values from ``host_step`` and the state's slots
        (then its per-segment fields)."""
        if self.host_step is None:
            values, advanced = (), state
        else:
            values, advanced = self.host_step(state, **extra_args)
        slots = tuple(getattr(state, s) for s in self.slots)
        per_segment = tuple(getattr(state, s) for s in self.segment_state)
        part = Part(self, tuple(values), slots, per_segment)
        fields = self.slots + self.segment_state

        def rebuild(new_slots: list[tuple[Any, ...]]) -> OptState:
            if not fields:
                return advanced
            return advanced._replace(**dict(zip(fields, new_slots[0], strict=True)))

        return [part], rebuild


class Part(NamedTuple):
    """One fragment's work in one step: its scalars' values, its input slot trees and its
    per-segment state trees (see :class:`SegmentReduction`)."""

    fragment: Fragment
    scalars: tuple[float, ...]
    slots: tuple[Any, ...]
    segment_state: tuple[Any, ...] = ()
