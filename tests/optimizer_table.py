"""The optimizer table: one row per optimizer variant, read by every test of an optimizer
(reference, properties, torch and optax parity, stateful, checkpoints, ZeRO) and by
``benchmarks/bench_step.py``. A new optimizer is one row here plus its float64 reference.

A row names the functional factory of ``netcl_optim`` with its optax-style kwargs (defaults left
out), its float64 reference transform (``reference.py``), the stateful class, the torch.optim
class and the optax oracle, the hyperparameter strategies and a few flags. Library and oracle
names are strings or callables of the module, so this module imports without ``netcl_optim``,
torch, optax or hypothesis.

Hyperparameters are spelled the functional way (``learning_rate``, ``b1``, ``b2``). A row's full
hyperparameters are its kwargs over the reference's defaults; ``torch_names`` spells them the
torch way (``lr``, ``betas``) for the stateful class and torch.optim.

A new optimizer's row gives ``id``, ``factory``, ``kwargs``, ``reference`` (an optax-style
transform of reference.py; a torch-style ``rule`` is optional) and ``slots``, and where they
exist ``stateful``, ``torch``, ``optax`` and ``hyper``. Where the class's defaults differ from the
factory's, ``kwargs`` must name that hyperparameter (test_stateful checks each class holds
``torch_kwargs()``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import reference as ref
import reference_muon as rm
import reference_reductions as rr
import reference_tree_sums as rts

Hyper = dict[str, Any]

# ---------------------------------------------------------------------------- names

_TORCH_NAME = {"learning_rate": "lr"}
_TORCH_PAIRS = {
    "betas": ("b1", "b2", "b3"),  # b3 where the rule has a third beta (Adan, AdEMAMix)
    "etas": ("eta_minus", "eta_plus"),  # Rprop
    "step_sizes": ("min_step_size", "max_step_size"),
}  # torch's tuple -> the functional names of its items


def _torch_key(name: str) -> str:
    pair = [key for key, items in _TORCH_PAIRS.items() if name in items]
    return pair[0] if pair else _TORCH_NAME.get(name, name)


def torch_names(hyper: Hyper) -> Hyper:
    """Functional names -> torch's: ``learning_rate`` -> ``lr``, ``b1``, ``b2`` (and ``b3``
    where the rule has it) -> ``betas`` (b1 and b2 must be given); every other name as it is."""
    out = {}
    for name, value in hyper.items():
        key = _torch_key(name)
        if key in _TORCH_PAIRS and name != key:  # (a rule taking betas= keeps it)
            value = tuple(hyper[n] for n in _TORCH_PAIRS[key] if n != "b3" or n in hyper)
        out[key] = value
    return out


def functional_names(hyper: Hyper) -> Hyper:
    """Torch names -> the functional ones (the inverse of ``torch_names``)."""
    plain = {v: k for k, v in _TORCH_NAME.items()}
    out: Hyper = {}
    for key, value in hyper.items():
        if key in _TORCH_PAIRS:
            out.update(zip(_TORCH_PAIRS[key][: len(value)], value, strict=True))
        else:
            out[plain.get(key, key)] = value
    return out


def _defaults(fn: Callable[..., Any]) -> Hyper:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


# ---------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Case:
    """A factory of ``netcl_optim`` called with ``kwargs``, and its float64 reference transform
    built from the same kwargs (``TRANSFORMS`` in cases.py, and every optimizer row)."""

    id: str
    factory: str | Callable[[Any], Callable[..., Any]]  # attribute of netcl_optim, or no -> it
    kwargs: Hyper
    reference: Callable[..., ref.Transform]  # called with the same kwargs
    needs_params: bool = False
    reduction: bool = False  # couples the leaves (global norm)
    # Tolerance factor against the reference: coupled weight decay feeding an adaptive scaling
    # (float32 rounding of g + wd * p divided by an eps-sized denominator, see test_functional).
    conditioning: float = 1.0
    # The drawn params and grads are multiplied by this in the reference tests: a rule that
    # scales the updates by a block norm of the params (up to 1e3 * sqrt(n) there) overflows
    # float16.
    param_scale: float = 1.0
    # The updates are a difference of params (schedule-free's y' - y): their rounding error
    # scales with the params, not with the updates (optax's too).
    updates_scale_with_params: bool = False

    def make(self, no: Any, kwargs: Hyper | None = None) -> Any:
        """The transform, from ``kwargs`` (the row's by default)."""
        make = getattr(no, self.factory) if isinstance(self.factory, str) else self.factory(no)
        return make(**(self.kwargs if kwargs is None else kwargs))

    def make_reference(self, kwargs: Hyper | None = None) -> ref.Transform:
        return self.reference(**(self.kwargs if kwargs is None else kwargs))


@dataclass(frozen=True, kw_only=True)
class Optimizer(Case):
    """One optimizer variant. Oracles and the stateful class see the same maths as the
    functional factory: ``full()`` hyperparameters, in torch names where torch's are needed."""

    slots: int  # state arrays per parameter (the benchmark's bytes, ZeRO's state size)
    # torch-style float64 rule ``rule(p, g, state, **full) -> (p, state)`` with torch's state
    # keys; None: the reference transform, one array at a time.
    rule: Callable[..., tuple[Any, dict]] | None = None
    stateful: str | None = None  # class: attribute of netcl_optim
    stateful_kwargs: Hyper | None = None  # torch names, as given; None: the row's kwargs
    torch: str | None = None  # torch.optim class, given torch_kwargs()
    optax: Callable[[Any, Hyper], Any] | None = None  # (optax, full()) -> optax transform
    # hypothesis.strategies -> a strategy of every hyperparameter of the factory (the two APIs'
    # defaults may differ): the stateful kwargs are torch_names of the same draw.
    hyper: Callable[[Any], Any] | None = None
    # the same maths as an explicit chain of (factory, kwargs) building blocks
    parts: tuple[tuple[str, Hyper], ...] | None = None
    bench: str | None = None  # its name on benchmarks/bench_step.py's command line
    # its noise depends on each element's index in the packed layout of the tree (add_noise),
    # so a per-parameter float64 rule cannot follow it (test_noise.py checks the stateful
    # class's partial steps against the functional alias instead)
    element_indexed: bool = False
    # a value per leaf in the same step (segment reductions, fusion/_segments.py): a packed
    # step takes at most this many launches (reduce, finish, full and partial work-groups
    # and the kernel before them), whatever the number of leaves; ZeRO refuses it for now
    segmented: int = 0

    def full(self, kwargs: Hyper | None = None) -> Hyper:
        """Every hyperparameter: ``kwargs`` (the row's by default) over the reference's defaults."""
        return {**_defaults(self.reference), **(self.kwargs if kwargs is None else kwargs)}

    def torch_kwargs(self, kwargs: Hyper | None = None) -> Hyper:
        """``full(kwargs)`` in torch names: for torch.optim, and what the stateful class holds."""
        return torch_names(self.full(kwargs))

    def class_kwargs(self) -> Hyper:
        """The kwargs given to the stateful class (torch names; its defaults fill the rest)."""
        if self.stateful_kwargs is not None:
            return self.stateful_kwargs
        given = {_torch_key(name) for name in self.kwargs}
        return {k: v for k, v in self.torch_kwargs().items() if k in given}

    def make_stateful(self, no: Any, params: Any, kwargs: Hyper | None = None) -> Any:
        """The stateful optimizer over ``params``, from torch-named ``kwargs`` (the row's)."""
        assert self.stateful is not None, self.id
        kwargs = self.class_kwargs() if kwargs is None else kwargs
        return getattr(no, self.stateful)(params, **kwargs)

    def make_torch(
        self, torch: Any, params: list, kwargs: Hyper | None = None, **extra: Any
    ) -> Any:
        """The torch.optim oracle over ``params``, from functional ``kwargs`` (the row's)."""
        assert self.torch is not None, self.id
        return getattr(torch.optim, self.torch)(params, **self.torch_kwargs(kwargs), **extra)

    def make_optax(self, optax: Any, kwargs: Hyper | None = None) -> Any:
        assert self.optax is not None, self.id
        return self.optax(optax, self.full(kwargs))

    def reference_rule(self) -> Callable[..., tuple[Any, dict]]:
        """The torch-style rule, called with ``full()`` hyperparameters."""
        return self.rule if self.rule is not None else ref.transform_rule(self.reference)

    def make_parts(self, no: Any) -> list[Any]:
        assert self.parts is not None, self.id
        return [getattr(no, name)(**kw) for name, kw in self.parts]


# ---------------------------------------------------------------------------- optax oracles


def _coupled_decay(optax: Any, weight_decay: float, tx: Any) -> Any:
    """torch's coupled weight decay (g + wd * p) in front of an optax optimizer."""
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


def optax_sgd(optax: Any, h: Hyper) -> Any:
    """sgd and momentum without dampening (optax has none)."""
    momentum = h["momentum"] or None
    tx = optax.sgd(h["learning_rate"], momentum=momentum, nesterov=h["nesterov"])
    return _coupled_decay(optax, h["weight_decay"], tx)


def optax_adam(optax: Any, h: Hyper) -> Any:
    tx = optax.adam(h["learning_rate"], h["b1"], h["b2"], h["eps"])
    return _coupled_decay(optax, h["weight_decay"], tx)


def optax_adamw(optax: Any, h: Hyper) -> Any:
    wd = h["weight_decay"]  # by name: optax's fifth argument is eps_root
    return optax.adamw(h["learning_rate"], h["b1"], h["b2"], h["eps"], weight_decay=wd)


def optax_rmsprop(optax: Any, h: Hyper) -> Any:
    """torch's eps (outside the sqrt) and momentum (a trace after the scaling)."""
    tx = optax.rmsprop(h["learning_rate"], decay=h["alpha"], eps=h["eps"], eps_in_sqrt=False,
                       centered=h["centered"], momentum=h["momentum"] or None)  # fmt: skip
    return _coupled_decay(optax, h["weight_decay"], tx)


# ---------------------------------------------------------------------------- strategies
# Each takes hypothesis.strategies and draws every hyperparameter of its factory.


def _learning_rate(st: Any, scale: float = 1.0) -> Any:
    return st.floats(1e-4, 0.5).map(lambda lr: lr * scale)


def _weight_decay(st: Any) -> Any:
    return st.sampled_from([0.0]) | st.floats(0.0, 0.2)


def _eps(st: Any) -> Any:
    return st.floats(-10, -2).map(lambda e: 10.0**e)


def sgd_hyper(st: Any) -> Any:
    """Nesterov only where torch allows it (a momentum, no dampening)."""

    @st.composite
    def draw_hyper(draw: Any) -> Hyper:
        momentum = draw(st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99))
        dampening = draw(st.sampled_from([0.0]) | st.floats(0.0, 0.9))
        nesterov = draw(st.booleans()) and momentum > 0 and dampening == 0
        return {"learning_rate": draw(_learning_rate(st)), "momentum": momentum,
                "dampening": dampening, "weight_decay": draw(_weight_decay(st)),
                "nesterov": nesterov}  # fmt: skip

    return draw_hyper()


def momentum_hyper(st: Any) -> Any:
    return st.fixed_dictionaries({
        "learning_rate": _learning_rate(st),
        "momentum": st.sampled_from([0.9]) | st.floats(0.1, 0.99),
        "weight_decay": _weight_decay(st),
        "nesterov": st.booleans(),
    })  # fmt: skip


def adam_hyper(st: Any) -> Any:
    """b1 in (0, 0.05) is left out: float32 cannot hold 1 - b1 well enough (torch's lerp
    weight), which costs up to eps32 / b1 relative error in the first moment."""
    return st.fixed_dictionaries({
        "learning_rate": _learning_rate(st, 0.1),
        "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
        "b2": st.floats(0.0, 0.9999),
        "eps": _eps(st),
        "weight_decay": _weight_decay(st),
    })  # fmt: skip


def rmsprop_hyper(st: Any) -> Any:
    """Centered: alpha >= 0.5 (v - gavg^2 cancels badly in float32 for small alpha)."""

    @st.composite
    def draw_hyper(draw: Any) -> Hyper:
        centered = draw(st.booleans())
        return {"learning_rate": draw(_learning_rate(st, 0.1)),
                "alpha": draw(st.floats(0.5 if centered else 0.0, 0.999)),
                "eps": draw(_eps(st)), "weight_decay": draw(_weight_decay(st)),
                "momentum": draw(st.sampled_from([0.0]) | st.floats(0.0, 0.95)),
                "centered": centered}  # fmt: skip

    return draw_hyper()


# ---------------------------------------------------------------------------- the table


def _lr(lr: Any) -> tuple[str, Hyper]:
    return ("scale_by_learning_rate", {"learning_rate": lr})


def _optax_prodigy(optax: Any, h: Hyper) -> Any:
    """optax.contrib.prodigy (it has no ``one_pass``: netcl_optim's option)."""
    return optax.contrib.prodigy(**{k: v for k, v in h.items() if k != "one_pass"})


def cosine(count: int) -> float:
    """A learning-rate schedule: 1e-2 cosine-decayed over 10 steps."""
    return 1e-2 * 0.5 * (1.0 + math.cos(math.pi * min(count, 10) / 10))


# What the variants of one family share.
# fmt: off
_SGD = dict(reference=ref.sgd_tx, rule=ref.sgd, stateful="SGD", torch="SGD")
_MOMENTUM = dict(reference=ref.momentum_tx, rule=ref.sgd, stateful="Momentum", torch="SGD",
                 optax=optax_sgd, slots=1, needs_params=True)
_ADAM = dict(reference=ref.adam_tx, rule=ref.adam, stateful="Adam", torch="Adam",
             optax=optax_adam, slots=2)
_ADAMW = dict(reference=ref.adamw_tx, rule=ref.adamw, stateful="AdamW", torch="AdamW",
              optax=optax_adamw, slots=2, needs_params=True)
_RMSPROP = dict(reference=ref.rmsprop_tx, rule=ref.rmsprop, stateful="RMSProp",
                torch="RMSprop", optax=optax_rmsprop)
# fmt: on

OPTIMIZERS: list[Optimizer] = [
    Optimizer(id="sgd", factory="sgd", kwargs={"learning_rate": 0.1}, **_SGD, slots=0,
              optax=optax_sgd, hyper=sgd_hyper, parts=(_lr(0.1),), bench="sgd"),
    Optimizer(id="sgd-momentum", factory="sgd", kwargs={"learning_rate": 0.05, "momentum": 0.9},
              **_SGD, slots=1, optax=optax_sgd, parts=(("trace", {"decay": 0.9}), _lr(0.05)),
              bench="momentum"),
    Optimizer(id="sgd-dampening-wd_coupled", factory="sgd",
              kwargs={"learning_rate": 0.05, "momentum": 0.9, "dampening": 0.5,
                      "weight_decay": 0.01},
              **_SGD, slots=1, needs_params=True,
              parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                     ("trace", {"decay": 0.9, "dampening": 0.5}), _lr(0.05))),
    Optimizer(id="sgd-nesterov-wd_coupled", factory="sgd",
              kwargs={"learning_rate": 0.05, "momentum": 0.9, "nesterov": True,
                      "weight_decay": 1e-3},
              **_SGD, slots=1, needs_params=True, optax=optax_sgd,
              parts=(("add_decayed_weights", {"weight_decay": 1e-3}),
                     ("trace", {"decay": 0.9, "nesterov": True}), _lr(0.05))),
    Optimizer(id="sgd-no_momentum-dampening_ignored", factory="sgd",
              kwargs={"learning_rate": 0.1, "momentum": 0.0, "dampening": 0.5}, **_SGD, slots=0,
              optax=optax_sgd, parts=(_lr(0.1),)),
    # The class's defaults (lr 1e-2, weight decay 1e-4) differ from the alias's: given here.
    Optimizer(id="momentum", factory="momentum",
              kwargs={"learning_rate": 1e-2, "weight_decay": 1e-4}, **_MOMENTUM,
              stateful_kwargs={}, hyper=momentum_hyper,
              parts=(("add_decayed_weights", {"weight_decay": 1e-4}),
                     ("trace", {"decay": 0.9}), _lr(1e-2))),
    Optimizer(id="momentum-nesterov-wd_coupled", factory="momentum",
              kwargs={"learning_rate": 0.02, "momentum": 0.8, "weight_decay": 1e-2,
                      "nesterov": True},
              **_MOMENTUM,
              parts=(("add_decayed_weights", {"weight_decay": 1e-2}),
                     ("trace", {"decay": 0.8, "nesterov": True}), _lr(0.02))),
    Optimizer(id="adam", factory="adam", kwargs={}, **_ADAM, hyper=adam_hyper,
              parts=(("scale_by_adam", {}), _lr(1e-3)), bench="adam"),
    Optimizer(id="adam-wd_coupled", factory="adam",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                      "weight_decay": 0.1},
              **_ADAM, needs_params=True, conditioning=10.0,
              parts=(("add_decayed_weights", {"weight_decay": 0.1}),
                     ("scale_by_adam", {"b1": 0.8, "b2": 0.99, "eps": 1e-6}), _lr(1e-2))),
    # A schedule: the stateful classes, torch and the torch-style rules take a number.
    Optimizer(id="adam-schedule", factory="adam", kwargs={"learning_rate": cosine},
              reference=ref.adam_tx, optax=optax_adam, slots=2,
              parts=(("scale_by_adam", {}), _lr(cosine))),
    Optimizer(id="adamw", factory="adamw", kwargs={}, **_ADAMW, hyper=adam_hyper,
              parts=(("scale_by_adam", {}), ("add_decayed_weights", {"weight_decay": 0.01}),
                     _lr(1e-3)),
              bench="adamw"),
    Optimizer(id="adamw-custom", factory="adamw",
              kwargs={"learning_rate": 3e-2, "b1": 0.5, "b2": 0.9, "eps": 1e-4,
                      "weight_decay": 0.1},
              **_ADAMW,
              parts=(("scale_by_adam", {"b1": 0.5, "b2": 0.9, "eps": 1e-4}),
                     ("add_decayed_weights", {"weight_decay": 0.1}), _lr(3e-2))),
    Optimizer(id="rmsprop", factory="rmsprop", kwargs={}, **_RMSPROP, slots=1,
              hyper=rmsprop_hyper, parts=(("scale_by_rms", {}), _lr(1e-3))),
    Optimizer(id="rmsprop-centered-momentum", factory="rmsprop",
              kwargs={"learning_rate": 1e-2, "momentum": 0.9, "centered": True}, **_RMSPROP,
              slots=3,
              parts=(("scale_by_rms", {"centered": True}), ("trace", {"decay": 0.9}),
                     _lr(1e-2)),
              bench="rmsprop"),
    Optimizer(id="rmsprop-centered-momentum-wd_coupled", factory="rmsprop",
              kwargs={"learning_rate": 1e-2, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01,
                      "momentum": 0.9, "centered": True},
              **_RMSPROP, slots=3, needs_params=True, conditioning=10.0,
              parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                     ("scale_by_rms", {"alpha": 0.9, "eps": 1e-6, "centered": True}),
                     ("trace", {"decay": 0.9}), _lr(1e-2))),
    # torch.optim has no Lion; the class's weight decay default (0) differs from lion's (1e-3)
    Optimizer(id="lion", factory="lion", kwargs={"learning_rate": 1e-3, "weight_decay": 0.1},
              reference=ref.lion_tx, stateful="Lion", slots=1, needs_params=True,
              optax=lambda optax, h: optax.lion(h["learning_rate"], h["b1"], h["b2"],
                                                weight_decay=h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.01), "b1": st.floats(0.0, 0.99),
                  "b2": st.floats(0.0, 0.999), "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_lion", {}), ("add_decayed_weights", {"weight_decay": 0.1}),
                     _lr(1e-3)), bench="lion"),
    # rows: adagrad, adadelta
    # torch's Adagrad (eps outside the root, accumulator from 0; lr_decay a host schedule)
    Optimizer(id="adagrad", factory="adagrad", kwargs={}, reference=ref.adagrad_tx,
              rule=ref.adagrad, stateful="Adagrad", torch="Adagrad", slots=1,
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "lr_decay": st.sampled_from([0.0]) | st.floats(0.0, 0.1),
                  "weight_decay": _weight_decay(st),
                  "initial_accumulator_value": st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0),
                  "eps": _eps(st)}),
              parts=(("scale_by_rss", {"initial_accumulator_value": 0.0, "eps": 1e-10,
                                       "eps_in_sqrt": False}), _lr(1e-2)),
              bench="adagrad"),
    Optimizer(id="adagrad-lr_decay-wd_coupled", factory="adagrad",
              kwargs={"learning_rate": 0.05, "lr_decay": 0.01, "weight_decay": 0.01,
                      "initial_accumulator_value": 0.1, "eps": 1e-8},
              reference=ref.adagrad_tx, rule=ref.adagrad, stateful="Adagrad", torch="Adagrad",
              slots=1, needs_params=True, conditioning=10.0),
    # optax's adagrad by keywords: accumulator from 0.1, rsqrt(s + 1e-7), 0 where s = 0
    Optimizer(id="adagrad-optax", factory="adagrad",
              kwargs={"learning_rate": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-7,
                      "eps_in_sqrt": True},
              reference=ref.adagrad_optax_tx, slots=1,
              optax=lambda optax, h: optax.adagrad(h["learning_rate"],
                                                   h["initial_accumulator_value"], h["eps"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "initial_accumulator_value": st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0),
                  "eps": st.sampled_from([0.0]) | _eps(st), "eps_in_sqrt": st.just(True)}),
              parts=(("scale_by_rss", {}), _lr(0.1))),
    # torch's Adadelta = optax's adadelta (coupled decay) with the same learning rate
    Optimizer(id="adadelta", factory="adadelta", kwargs={}, reference=ref.adadelta_tx,
              rule=ref.adadelta, stateful="Adadelta", torch="Adadelta", slots=2,
              optax=lambda optax, h: optax.adadelta(h["learning_rate"], h["rho"], h["eps"],
                                                    h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": st.floats(1e-2, 2.0), "rho": st.floats(0.0, 0.99),
                  "eps": st.floats(-8, -2).map(lambda e: 10.0**e),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_adadelta", {}), _lr(1.0)), bench="adadelta"),
    Optimizer(id="adadelta-wd_coupled", factory="adadelta",
              kwargs={"learning_rate": 0.5, "rho": 0.95, "eps": 1e-5, "weight_decay": 0.01},
              reference=ref.adadelta_tx, rule=ref.adadelta, stateful="Adadelta",
              torch="Adadelta", slots=2, needs_params=True, conditioning=10.0,
              optax=lambda optax, h: optax.adadelta(h["learning_rate"], h["rho"], h["eps"],
                                                    h["weight_decay"]),
              parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                     ("scale_by_adadelta", {"rho": 0.95, "eps": 1e-5}), _lr(0.5))),
    # rows: adamax, adamaxw
    # torch's Adamax; optax's adamax is the same rule (eps inside the max), no weight decay
    Optimizer(id="adamax", factory="adamax", kwargs={}, reference=ref.adamax_tx,
              rule=ref.adamax, stateful="Adamax", torch="Adamax", slots=2,
              optax=lambda optax, h: _coupled_decay(optax, h["weight_decay"], optax.adamax(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"])),
              hyper=adam_hyper, parts=(("scale_by_adamax", {}), _lr(2e-3)), bench="adamax"),
    Optimizer(id="adamax-wd_coupled", factory="adamax",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                      "weight_decay": 0.1},
              reference=ref.adamax_tx, rule=ref.adamax, stateful="Adamax", torch="Adamax",
              slots=2, needs_params=True,
              optax=lambda optax, h: _coupled_decay(optax, h["weight_decay"], optax.adamax(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"])),
              parts=(("add_decayed_weights", {"weight_decay": 0.1}),
                     ("scale_by_adamax", {"b1": 0.8, "b2": 0.99, "eps": 1e-6}), _lr(1e-2))),
    # torch.optim has no AdamaxW; adamaxw has no default learning rate (optax's signature)
    Optimizer(id="adamaxw", factory="adamaxw", kwargs={"learning_rate": 2e-3},
              reference=ref.adamaxw_tx, stateful="AdamaxW", slots=2, needs_params=True,
              optax=lambda optax, h: optax.adamaxw(h["learning_rate"], h["b1"], h["b2"],
                                                   h["eps"], weight_decay=h["weight_decay"]),
              hyper=adam_hyper,
              parts=(("scale_by_adamax", {}), ("add_decayed_weights", {"weight_decay": 1e-4}),
                     _lr(2e-3))),
    Optimizer(id="adamaxw-custom", factory="adamaxw",
              kwargs={"learning_rate": 3e-2, "b1": 0.5, "b2": 0.9, "eps": 1e-4,
                      "weight_decay": 0.1},
              reference=ref.adamaxw_tx, stateful="AdamaxW", slots=2, needs_params=True,
              optax=lambda optax, h: optax.adamaxw(h["learning_rate"], h["b1"], h["b2"],
                                                   h["eps"], weight_decay=h["weight_decay"]),
              parts=(("scale_by_adamax", {"b1": 0.5, "b2": 0.9, "eps": 1e-4}),
                     ("add_decayed_weights", {"weight_decay": 0.1}), _lr(3e-2))),
    # rows: nadam, nadamw
    # torch's NAdam (momentum-decay schedule); optax's nadam is adam(nesterov=True), another rule
    Optimizer(id="nadam", factory="nadam", kwargs={}, reference=ref.nadam_tx, stateful="NAdam",
              torch="NAdam", slots=2, hyper=adam_hyper,
              parts=(("scale_by_nadam", {}), _lr(2e-3)), bench="nadam"),
    Optimizer(id="nadam-wd_coupled", factory="nadam",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                      "weight_decay": 0.1, "momentum_decay": 1e-2},
              reference=ref.nadam_tx, stateful="NAdam", torch="NAdam", slots=2,
              needs_params=True,
              parts=(("add_decayed_weights", {"weight_decay": 0.1}),
                     ("scale_by_nadam", {"b1": 0.8, "b2": 0.99, "eps": 1e-6,
                                         "momentum_decay": 1e-2}), _lr(1e-2))),
    Optimizer(id="nadam-wd_decoupled", factory="nadam",
              kwargs={"learning_rate": 1e-2, "weight_decay": 0.1,
                      "decoupled_weight_decay": True},
              reference=ref.nadam_tx, stateful="NAdam", torch="NAdam", slots=2,
              needs_params=True,
              parts=(("scale_by_nadam", {}), ("add_decayed_weights", {"weight_decay": 0.1}),
                     _lr(1e-2))),
    # nadamw = NAdam(decoupled_weight_decay=True) with optax's name and default decay (1e-4)
    Optimizer(id="nadamw", factory="nadamw", kwargs={}, reference=ref.nadamw_tx, slots=2,
              needs_params=True,
              parts=(("scale_by_nadam", {}), ("add_decayed_weights", {"weight_decay": 1e-4}),
                     _lr(2e-3))),
    # rows: radam
    # torch's RAdam (rho_t > 5, eps on the raw root); rectified from step 6 with b2 = 0.999
    Optimizer(id="radam", factory="radam", kwargs={}, reference=ref.radam_tx, rule=ref.radam,
              stateful="RAdam", torch="RAdam", slots=2,
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "weight_decay": _weight_decay(st), "decoupled_weight_decay": st.booleans()}),
              parts=(("scale_by_radam", {}), _lr(1e-3)), bench="radam"),
    Optimizer(id="radam-wd_coupled", factory="radam",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                      "weight_decay": 0.1},
              reference=ref.radam_tx, rule=ref.radam, stateful="RAdam", torch="RAdam",
              slots=2, needs_params=True, conditioning=10.0,
              parts=(("add_decayed_weights", {"weight_decay": 0.1}),
                     ("scale_by_radam", {"b1": 0.8, "b2": 0.99, "eps": 1e-6}), _lr(1e-2))),
    Optimizer(id="radam-wd_decoupled", factory="radam",
              kwargs={"learning_rate": 1e-2, "b2": 0.99, "weight_decay": 0.1,
                      "decoupled_weight_decay": True},
              reference=ref.radam_tx, rule=ref.radam, stateful="RAdam", torch="RAdam",
              slots=2, needs_params=True,
              parts=(("scale_by_radam", {"b2": 0.99}),
                     ("add_decayed_weights", {"weight_decay": 0.1}), _lr(1e-2))),
    # optax's radam by keywords: rho_t >= threshold, eps on the corrected root, nesterov
    Optimizer(id="radam-optax", factory="radam",
              kwargs={"learning_rate": 1e-3, "threshold": 5.0},
              reference=ref.radam_optax_tx, slots=2,
              optax=lambda optax, h: optax.radam(h["learning_rate"], h["b1"], h["b2"], h["eps"],
                                                 h["eps_root"], h["threshold"],
                                                 nesterov=h["nesterov"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0]) | st.floats(0.0, 1e-6),
                  "threshold": st.sampled_from([5.0]) | st.floats(4.5, 20.0),
                  "nesterov": st.booleans()}),
              parts=(("scale_by_radam", {"threshold": 5.0}), _lr(1e-3))),
    Optimizer(id="radam-optax-nesterov-eps_root", factory="radam",
              kwargs={"learning_rate": 1e-2, "b2": 0.99, "eps_root": 1e-8, "threshold": 6.0,
                      "nesterov": True},
              reference=ref.radam_optax_tx, slots=2,
              optax=lambda optax, h: optax.radam(h["learning_rate"], h["b1"], h["b2"], h["eps"],
                                                 h["eps_root"], h["threshold"],
                                                 nesterov=h["nesterov"]),
              parts=(("scale_by_radam", {"b2": 0.99, "eps_root": 1e-8, "threshold": 6.0,
                                         "nesterov": True}), _lr(1e-2))),
    # rows: rprop
    # torch's Rprop (step clamped every step); lr is the initial step size, not a factor
    Optimizer(id="rprop", factory="rprop", kwargs={"learning_rate": 1e-2},
              reference=ref.rprop_tx, rule=ref.rprop, stateful="Rprop", torch="Rprop", slots=2,
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "eta_minus": st.sampled_from([0.5]) | st.floats(0.05, 0.95),
                  "eta_plus": st.sampled_from([1.2]) | st.floats(1.05, 3.0),
                  "min_step_size": st.sampled_from([0.0, 1e-6]) | st.floats(0.0, 1e-3),
                  "max_step_size": st.sampled_from([50.0]) | st.floats(1e-2, 1.0)}),
              parts=(("scale_by_rprop", {"learning_rate": 1e-2}), ("scale", {"step_size": -1.0})),
              bench="rprop"),
    Optimizer(id="rprop-custom", factory="rprop",
              kwargs={"learning_rate": 0.05, "eta_minus": 0.3, "eta_plus": 1.5,
                      "min_step_size": 1e-3, "max_step_size": 0.2},
              reference=ref.rprop_tx, rule=ref.rprop, stateful="Rprop", torch="Rprop", slots=2,
              parts=(("scale_by_rprop", {"learning_rate": 0.05, "eta_minus": 0.3,
                                         "eta_plus": 1.5, "min_step_size": 1e-3,
                                         "max_step_size": 0.2}), ("scale", {"step_size": -1.0}))),
    # optax's rprop by keyword: step kept where g * prev = 0, each update applied a step late
    Optimizer(id="rprop-optax", factory="rprop",
              kwargs={"learning_rate": 0.05, "optax_rule": True},
              reference=ref.rprop_optax_tx, slots=2,
              optax=lambda optax, h: optax.rprop(h["learning_rate"], h["eta_minus"],
                                                 h["eta_plus"], h["min_step_size"],
                                                 h["max_step_size"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "eta_minus": st.sampled_from([0.5]) | st.floats(0.05, 0.95),
                  "eta_plus": st.sampled_from([1.2]) | st.floats(1.05, 3.0),
                  "min_step_size": st.sampled_from([0.0, 1e-6]) | st.floats(0.0, 1e-3),
                  "max_step_size": st.sampled_from([50.0]) | st.floats(1e-2, 1.0),
                  "optax_rule": st.just(True)}),
              parts=(("scale_by_rprop", {"learning_rate": 0.05, "optax_rule": True}),
                     ("scale", {"step_size": -1.0}))),
    # rows: adabelief, yogi
    # torch.optim has neither: optax's rules; the classes' lr defaults (1e-3, 1e-2) are the rows'
    Optimizer(id="adabelief", factory="adabelief", kwargs={"learning_rate": 1e-3},
              reference=ref.adabelief_tx, stateful="AdaBelief", slots=2,
              optax=lambda optax, h: optax.adabelief(h["learning_rate"], h["b1"], h["b2"],
                                                     h["eps"], h["eps_root"],
                                                     nesterov=h["nesterov"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": st.floats(-16, -4).map(lambda e: 10.0**e),
                  "eps_root": st.sampled_from([0.0, 1e-16]) | _eps(st),
                  "nesterov": st.booleans()}),
              parts=(("scale_by_belief", {}), _lr(1e-3)), bench="adabelief"),
    Optimizer(id="adabelief-nesterov-custom", factory="adabelief",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-8,
                      "eps_root": 0.0, "nesterov": True},
              reference=ref.adabelief_tx, stateful="AdaBelief", slots=2,
              optax=lambda optax, h: optax.adabelief(h["learning_rate"], h["b1"], h["b2"],
                                                     h["eps"], h["eps_root"],
                                                     nesterov=h["nesterov"]),
              parts=(("scale_by_belief", {"b1": 0.8, "b2": 0.99, "eps": 1e-8, "eps_root": 0.0,
                                          "nesterov": True}), _lr(1e-2))),
    Optimizer(id="yogi", factory="yogi", kwargs={"learning_rate": 1e-2},
              reference=ref.yogi_tx, stateful="Yogi", slots=2,
              optax=lambda optax, h: optax.yogi(h["learning_rate"], h["b1"], h["b2"], h["eps"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st)}),
              parts=(("scale_by_yogi", {}), _lr(1e-2)), bench="yogi"),
    Optimizer(id="yogi-custom", factory="yogi",
              kwargs={"learning_rate": 3e-2, "b1": 0.5, "b2": 0.99, "eps": 1e-4},
              reference=ref.yogi_tx, stateful="Yogi", slots=2,
              optax=lambda optax, h: optax.yogi(h["learning_rate"], h["b1"], h["b2"], h["eps"]),
              parts=(("scale_by_yogi", {"b1": 0.5, "b2": 0.99, "eps": 1e-4}), _lr(3e-2))),
    # rows: amsgrad, asgd
    # torch's AMSGrad (Adam/AdamW(amsgrad=True): max over the raw v, then / sqrt(bc2))
    Optimizer(id="adam-amsgrad", factory="adam", kwargs={"amsgrad": True},
              reference=ref.adam_amsgrad_tx, rule=ref.adam_amsgrad, stateful="Adam",
              torch="Adam", slots=3,
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "weight_decay": _weight_decay(st), "amsgrad": st.just(True)}),
              parts=(("adam", {"learning_rate": 1e-3, "amsgrad": True}),), bench="amsgrad"),
    Optimizer(id="adamw-amsgrad", factory="adamw",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                      "weight_decay": 0.1, "amsgrad": True},
              reference=ref.adamw_amsgrad_tx, rule=ref.adamw_amsgrad, stateful="AdamW",
              torch="AdamW", slots=3, needs_params=True,
              parts=(("adamw", {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6,
                                "weight_decay": 0.1, "amsgrad": True}),)),
    # optax's AMSGrad (max over the bias-corrected v; raw v and no correction when off)
    Optimizer(id="amsgrad", factory="amsgrad", kwargs={"learning_rate": 1e-3},
              reference=ref.amsgrad_tx, slots=3,
              optax=lambda optax, h: optax.amsgrad(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"], h["eps_root"],
                  bias_correction_mu=h["bias_correction_mu"],
                  bias_correction_nu=h["bias_correction_nu"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0]) | st.floats(0.0, 1e-6),
                  "bias_correction_mu": st.booleans(), "bias_correction_nu": st.booleans()}),
              parts=(("scale_by_amsgrad", {}), _lr(1e-3))),
    Optimizer(id="amsgrad-no_bias_correction", factory="amsgrad",
              kwargs={"learning_rate": 1e-2, "b2": 0.99, "eps_root": 1e-8,
                      "bias_correction_mu": False, "bias_correction_nu": False},
              reference=ref.amsgrad_tx, slots=3,
              optax=lambda optax, h: optax.amsgrad(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"], h["eps_root"],
                  bias_correction_mu=h["bias_correction_mu"],
                  bias_correction_nu=h["bias_correction_nu"]),
              parts=(("scale_by_amsgrad", {"b2": 0.99, "eps_root": 1e-8,
                                           "bias_correction_mu": False,
                                           "bias_correction_nu": False}), _lr(1e-2))),
    # torch's ASGD (eta, mu float32 from the step; lr inside the update); optax has none
    Optimizer(id="asgd", factory="asgd", kwargs={}, reference=ref.asgd_tx, rule=ref.asgd,
              stateful="ASGD", torch="ASGD", slots=1, needs_params=True,
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "lambd": st.sampled_from([1e-4]) | st.floats(0.0, 0.5),
                  "alpha": st.sampled_from([0.75]) | st.floats(0.0, 1.0),
                  "t0": st.sampled_from([1e6, 0.0]) | st.floats(0.0, 20.0),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_asgd", {}),), bench="asgd"),
    Optimizer(id="asgd-wd_coupled", factory="asgd",
              kwargs={"learning_rate": 5e-2, "lambd": 1e-2, "alpha": 0.5, "t0": 10.0,
                      "weight_decay": 0.05},
              reference=ref.asgd_tx, rule=ref.asgd, stateful="ASGD", torch="ASGD", slots=1,
              needs_params=True,
              parts=(("add_decayed_weights", {"weight_decay": 0.05}),
                     ("scale_by_asgd", {"learning_rate": 5e-2, "lambd": 1e-2, "alpha": 0.5,
                                        "t0": 10.0}))),
    # rows: noisy_sgd
    # torch.optim has none; optax's noise comes from jax.random, so its parity (eta = 0) and
    # the noise's statistics are in test_noise.py; the reference draws the same Philox bits
    Optimizer(id="noisy_sgd", factory="noisy_sgd", kwargs={"learning_rate": 0.05},
              reference=ref.noisy_sgd_tx, stateful="NoisySGD", slots=0,
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "eta": st.sampled_from([0.0, 0.01]) | st.floats(0.0, 1.0),
                  "gamma": st.sampled_from([0.55]) | st.floats(0.0, 2.0),
                  "seed": st.sampled_from([0, 2**64 - 1]) | st.integers(0, 2**64 - 1)}),
              parts=(("add_noise", {"eta": 0.01, "gamma": 0.55}), _lr(0.05)),
              bench="noisy_sgd", element_indexed=True),
    Optimizer(id="noisy_sgd-custom", factory="noisy_sgd",
              kwargs={"learning_rate": 0.02, "eta": 0.3, "gamma": 1.0, "seed": 2**40 + 17},
              reference=ref.noisy_sgd_tx, stateful="NoisySGD", slots=0,
              parts=(("add_noise", {"eta": 0.3, "gamma": 1.0, "seed": 2**40 + 17}),
                     _lr(0.02)), element_indexed=True),
    # rows: sign_sgd, signum, optimistic
    # torch.optim has none of these: optax's rules (sign_sgd, signum, optimistic_adam_v2 and
    # optimistic_gradient_descent, pinned to optax 0.2.8); the classes' lr default is 1e-3
    Optimizer(id="sign_sgd", factory="sign_sgd", kwargs={"learning_rate": 1e-3},
              reference=ref.sign_sgd_tx, stateful="SignSGD", slots=0,
              optax=lambda optax, h: optax.sign_sgd(h["learning_rate"]),
              hyper=lambda st: st.fixed_dictionaries({"learning_rate": _learning_rate(st, 0.01)}),
              parts=(("scale_by_sign", {}), _lr(1e-3)), bench="sign_sgd"),
    Optimizer(id="signum", factory="signum", kwargs={"learning_rate": 1e-3},
              reference=ref.signum_tx, stateful="Signum", slots=1,
              optax=lambda optax, h: optax.signum(h["learning_rate"], h["beta"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.01),
                  "beta": st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.999)}),
              parts=(("ema", {"decay": 0.9, "debias": False}), ("scale_by_sign", {}), _lr(1e-3)),
              bench="signum"),
    Optimizer(id="signum-custom", factory="signum", kwargs={"learning_rate": 3e-3, "beta": 0.5},
              reference=ref.signum_tx, stateful="Signum", slots=1,
              optax=lambda optax, h: optax.signum(h["learning_rate"], h["beta"]),
              parts=(("ema", {"decay": 0.5, "debias": False}), ("scale_by_sign", {}), _lr(3e-3))),
    Optimizer(id="optimistic_gradient_descent", factory="optimistic_gradient_descent",
              kwargs={"learning_rate": 1e-2}, reference=ref.optimistic_gradient_descent_tx,
              slots=1,
              optax=lambda optax, h: optax.optimistic_gradient_descent(
                  h["learning_rate"], h["alpha"], h["beta"]),
              # (as optimistic_adam's below: alpha >= beta / 40 keeps the cancellation of
              # (alpha + beta) g - beta g_prev within float32's tolerance)
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "alpha": st.floats(0.05, 2.0), "beta": st.floats(0.0, 2.0)}),
              parts=(("scale_by_optimistic_gradient", {}), _lr(1e-2)), bench="optimistic_gd"),
    Optimizer(id="optimistic_gradient_descent-custom", factory="optimistic_gradient_descent",
              kwargs={"learning_rate": 3e-2, "alpha": 0.5, "beta": 2.0},
              reference=ref.optimistic_gradient_descent_tx, slots=1,
              optax=lambda optax, h: optax.optimistic_gradient_descent(
                  h["learning_rate"], h["alpha"], h["beta"]),
              parts=(("scale_by_optimistic_gradient", {"alpha": 0.5, "beta": 2.0}), _lr(3e-2))),
    Optimizer(id="optimistic_adam", factory="optimistic_adam_v2", kwargs={"learning_rate": 1e-3},
              reference=ref.optimistic_adam_v2_tx, stateful="OptimisticAdam", slots=3,
              optax=lambda optax, h: optax.optimistic_adam_v2(
                  h["learning_rate"], alpha=h["alpha"], beta=h["beta"], b1=h["b1"], b2=h["b2"],
                  eps=h["eps"], eps_root=h["eps_root"], nesterov=h["nesterov"]),
              # (alpha + beta) u - beta u_prev cancels where alpha << beta and u ~ u_prev
              # (u_prev = u at the first step): float32 keeps an error ~eps (alpha + 2 beta) |u|
              # against a result ~alpha |u|, which the tolerance covers for alpha >= beta / 40
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.01),
                  "alpha": st.floats(0.05, 2.0), "beta": st.floats(0.0, 2.0),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0, 1e-16]) | _eps(st),
                  "nesterov": st.booleans()}),
              bench="optimistic_adam"),
    Optimizer(id="optimistic_adam-custom", factory="optimistic_adam_v2",
              kwargs={"learning_rate": 1e-2, "alpha": 0.7, "beta": 0.3, "b1": 0.8, "b2": 0.99,
                      "eps": 1e-6, "eps_root": 1e-8, "nesterov": False},
              reference=ref.optimistic_adam_v2_tx, stateful="OptimisticAdam", slots=3,
              optax=lambda optax, h: optax.optimistic_adam_v2(
                  h["learning_rate"], alpha=h["alpha"], beta=h["beta"], b1=h["b1"], b2=h["b2"],
                  eps=h["eps"], eps_root=h["eps_root"], nesterov=h["nesterov"])),
    # rows: adan, adopt
    # torch.optim has neither: optax's adan (decoupled decay; its eps_root is 1e-8, the
    # building block's 0) and optax.contrib's adopt; the classes' lr default (1e-3) is the rows'
    Optimizer(id="adan", factory="adan", kwargs={"learning_rate": 1e-3}, reference=ref.adan_tx,
              stateful="Adan", slots=4, needs_params=True,
              optax=lambda optax, h: optax.adan(h["learning_rate"], h["b1"], h["b2"], h["b3"],
                                                h["eps"], h["eps_root"], h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.98]) | st.floats(0.05, 0.99),
                  "b2": st.sampled_from([0.0, 0.92]) | st.floats(0.05, 0.99),
                  "b3": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0, 1e-8]) | st.floats(0.0, 1e-6),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_adan", {"eps_root": 1e-8}), _lr(1e-3)), bench="adan"),
    Optimizer(id="adan-wd-custom", factory="adan",
              kwargs={"learning_rate": 1e-2, "b1": 0.9, "b2": 0.8, "b3": 0.999, "eps": 1e-6,
                      "eps_root": 0.0, "weight_decay": 0.05},
              reference=ref.adan_tx, stateful="Adan", slots=4, needs_params=True,
              optax=lambda optax, h: optax.adan(h["learning_rate"], h["b1"], h["b2"], h["b3"],
                                                h["eps"], h["eps_root"], h["weight_decay"]),
              parts=(("scale_by_adan", {"b1": 0.9, "b2": 0.8, "b3": 0.999, "eps": 1e-6}),
                     ("add_decayed_weights", {"weight_decay": 0.05}), _lr(1e-2))),
    Optimizer(id="adopt", factory="adopt", kwargs={"learning_rate": 1e-3},
              reference=ref.adopt_tx, stateful="ADOPT", slots=2,
              optax=lambda optax, h: optax.contrib.adopt(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"], nesterov=h["nesterov"],
                  use_clipping=h["use_clipping"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st), "nesterov": st.booleans(),
                  "use_clipping": st.booleans()}),
              parts=(("scale_by_adopt", {}), _lr(1e-3)), bench="adopt"),
    Optimizer(id="adopt-nesterov-custom", factory="adopt",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-4,
                      "nesterov": True},
              reference=ref.adopt_tx, stateful="ADOPT", slots=2,
              optax=lambda optax, h: optax.contrib.adopt(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"], nesterov=h["nesterov"],
                  use_clipping=h["use_clipping"]),
              parts=(("scale_by_adopt", {"b1": 0.8, "b2": 0.99, "eps": 1e-4, "nesterov": True}),
                     _lr(1e-2))),
    # unclipped, g / eps can be huge after a zero gradient: a larger eps keeps float16 finite
    Optimizer(id="adopt-no_clipping", factory="adopt",
              kwargs={"learning_rate": 1e-3, "eps": 1e-3, "use_clipping": False},
              reference=ref.adopt_tx, stateful="ADOPT", slots=2,
              optax=lambda optax, h: optax.contrib.adopt(
                  h["learning_rate"], h["b1"], h["b2"], h["eps"], nesterov=h["nesterov"],
                  use_clipping=h["use_clipping"]),
              parts=(("scale_by_adopt", {"eps": 1e-3, "use_clipping": False}), _lr(1e-3))),
    # rows: lamb, lars, fromage
    # a value per leaf (the trust ratio ||p|| / ||u||) in the same step; torch.optim has none
    Optimizer(id="lamb", factory="lamb", kwargs={"learning_rate": 1e-3}, segmented=5,
              reference=rr.lamb_tx, stateful="Lamb", slots=2,
              optax=lambda optax, h: optax.lamb(h["learning_rate"], h["b1"], h["b2"], h["eps"],
                                                h["eps_root"], h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0]) | st.floats(0.0, 1e-6),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_adam", {"eps": 1e-6}), ("scale_by_trust_ratio", {}), _lr(1e-3)),
              bench="lamb"),
    Optimizer(id="lamb-wd-custom", factory="lamb",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-8, "eps_root": 1e-8,
                      "weight_decay": 0.1},
              segmented=5, reference=rr.lamb_tx, stateful="Lamb", slots=2, needs_params=True,
              optax=lambda optax, h: optax.lamb(h["learning_rate"], h["b1"], h["b2"], h["eps"],
                                                h["eps_root"], h["weight_decay"]),
              parts=(("scale_by_adam", {"b1": 0.8, "b2": 0.99, "eps": 1e-8, "eps_root": 1e-8}),
                     ("add_decayed_weights", {"weight_decay": 0.1}),
                     ("scale_by_trust_ratio", {}), _lr(1e-2))),
    Optimizer(id="lamb-schedule", factory="lamb", kwargs={"learning_rate": cosine},
              segmented=5, reference=rr.lamb_tx, slots=2,
              optax=lambda optax, h: optax.lamb(h["learning_rate"], h["b1"], h["b2"], h["eps"],
                                                h["eps_root"], h["weight_decay"])),
    Optimizer(id="lars", factory="lars", kwargs={"learning_rate": 1.0}, segmented=4,
              reference=rr.lars_tx, stateful="LARS", slots=1, needs_params=True,
              optax=lambda optax, h: optax.lars(
                  h["learning_rate"], h["weight_decay"], trust_coefficient=h["trust_coefficient"],
                  eps=h["eps"], momentum=h["momentum"], nesterov=h["nesterov"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": st.floats(0.1, 10.0),
                  "weight_decay": _weight_decay(st),
                  "trust_coefficient": st.sampled_from([1e-3]) | st.floats(1e-4, 1.0),
                  "eps": st.sampled_from([0.0]) | _eps(st),
                  "momentum": st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99),
                  "nesterov": st.booleans()}),
              parts=(("scale_by_trust_ratio", {"trust_coefficient": 1e-3}), _lr(1.0),
                     ("trace", {"decay": 0.9})),
              bench="lars"),
    Optimizer(id="lars-wd-nesterov-custom", factory="lars",
              kwargs={"learning_rate": 0.5, "weight_decay": 1e-2, "trust_coefficient": 0.02,
                      "eps": 1e-4, "momentum": 0.8, "nesterov": True},
              segmented=5, reference=rr.lars_tx, stateful="LARS", slots=1, needs_params=True,
              optax=lambda optax, h: optax.lars(
                  h["learning_rate"], h["weight_decay"], trust_coefficient=h["trust_coefficient"],
                  eps=h["eps"], momentum=h["momentum"], nesterov=h["nesterov"]),
              parts=(("add_decayed_weights", {"weight_decay": 1e-2}),
                     ("scale_by_trust_ratio", {"trust_coefficient": 0.02, "eps": 1e-4}),
                     _lr(0.5), ("trace", {"decay": 0.8, "nesterov": True}))),
    Optimizer(id="fromage", factory="fromage", kwargs={"learning_rate": 1e-2},
              segmented=4, reference=rr.fromage_tx, stateful="Fromage", slots=0, needs_params=True,
              optax=lambda optax, h: optax.fromage(h["learning_rate"], h["min_norm"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st),
                  "min_norm": st.sampled_from([1e-6]) | st.floats(0.0, 1e-2)}),
              bench="fromage"),
    Optimizer(id="fromage-schedule", factory="fromage", kwargs={"learning_rate": cosine},
              segmented=4, reference=rr.fromage_tx, slots=0, needs_params=True,
              optax=lambda optax, h: optax.fromage(h["learning_rate"], h["min_norm"])),
    # a second moment per leaf (state not shaped like the params: 0-d per parameter)
    Optimizer(id="novograd", factory="novograd", kwargs={"learning_rate": 1e-3}, segmented=4,
              reference=rr.novograd_tx, stateful="NovoGrad", slots=1,
              optax=lambda optax, h: optax.novograd(h["learning_rate"], h["b1"], h["b2"],
                                                    h["eps"], h["eps_root"], h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.sampled_from([0.25]) | st.floats(0.0, 0.999), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0]) | st.floats(0.0, 1e-6),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_novograd", {"eps": 1e-6}), _lr(1e-3)), bench="novograd"),
    Optimizer(id="novograd-wd-custom", factory="novograd",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.5, "eps": 1e-8, "eps_root": 1e-8,
                      "weight_decay": 0.1},
              segmented=4, reference=rr.novograd_tx, stateful="NovoGrad", slots=1,
              needs_params=True,
              optax=lambda optax, h: optax.novograd(h["learning_rate"], h["b1"], h["b2"],
                                                    h["eps"], h["eps_root"], h["weight_decay"]),
              parts=(("scale_by_novograd", {"b1": 0.8, "b2": 0.5, "eps": 1e-8, "eps_root": 1e-8,
                                            "weight_decay": 0.1}), _lr(1e-2))),
    # Muon for 2-D leaves (Newton-Schulz per matrix), optax's adamw for the rest
    Optimizer(id="muon", factory="muon", kwargs={"learning_rate": 0.02, "weight_decay": 0.1},
              segmented=64, reference=rm.muon_tx, slots=1, needs_params=True,
              optax=lambda optax, h: optax.contrib.muon(**h)),
    # a max per axis of each leaf (state of O(sum of dims)); torch.optim has none
    Optimizer(id="sm3", factory="sm3", kwargs={"learning_rate": 0.1}, segmented=4,
              reference=rr.sm3_tx, stateful="SM3", slots=1,
              optax=lambda optax, h: optax.sm3(h["learning_rate"], h["momentum"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "momentum": st.sampled_from([0.0, 0.9]) | st.floats(0.0, 1.0)})),
    Optimizer(id="sm3-momentum", factory="sm3", kwargs={"learning_rate": 0.05, "momentum": 0.5},
              segmented=4, reference=rr.sm3_tx, stateful="SM3", slots=1,
              optax=lambda optax, h: optax.sm3(h["learning_rate"], h["momentum"])),
    # the class follows torch's rule: the chain its docstring gives, from public blocks
    Optimizer(id="adafactor-torch", factory=lambda no: _adafactor_torch_chain(no),
              kwargs={"learning_rate": 1e-2}, segmented=16, reference=rr.adafactor_torch_tx,
              rule=rr.adafactor, stateful="Adafactor", torch="Adafactor", slots=1,
              needs_params=True, bench="adafactor",
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "beta2_decay": st.floats(-1.0, -0.5),
                  "eps": st.tuples(st.sampled_from([None, 1e-15]), st.sampled_from([1e-3, 0.0])),
                  "d": st.sampled_from([1.0]) | st.floats(1.0, 4.0),
                  "weight_decay": _weight_decay(st)})),
    Optimizer(id="adafactor-torch-custom", factory=lambda no: _adafactor_torch_chain(no),
              kwargs={"learning_rate": 0.05, "beta2_decay": -0.6, "eps": (1e-15, 1e-2),
                      "d": 2.0, "weight_decay": 0.1},
              segmented=16, reference=rr.adafactor_torch_tx, rule=rr.adafactor,
              stateful="Adafactor", torch="Adafactor", slots=1, needs_params=True),
    # rows: adafactor (optax's rule)
    # row and column means of g^2 (state shaped like neither the params nor one per leaf)
    Optimizer(id="adafactor", factory="adafactor", kwargs={"learning_rate": 1e-2},
              segmented=18, reference=rr.adafactor_optax_tx, slots=1, needs_params=True,
              optax=lambda optax, h: optax.adafactor(**h),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "min_dim_size_to_factor": st.sampled_from([1, 3, 128]),
                  "decay_rate": st.floats(0.5, 0.95),
                  "clipping_threshold": st.sampled_from([None, 1.0]) | st.floats(0.1, 10.0),
                  "momentum": st.sampled_from([None, 0.9]), "dtype_momentum": st.just(None),
                  "weight_decay_rate": st.sampled_from([None]) | _weight_decay(st)})),
    Optimizer(id="adafactor-factored-momentum", factory="adafactor",
              kwargs={"learning_rate": 1e-2, "min_dim_size_to_factor": 2, "momentum": 0.9,
                      "dtype_momentum": None, "weight_decay_rate": 1e-3,
                      "multiply_by_parameter_scale": False},
              segmented=18, reference=rr.adafactor_optax_tx, slots=2, needs_params=True,
              optax=lambda optax, h: optax.adafactor(**h)),
    # rows: ademamix, madgrad, cocob
    # torch.optim has none of these: optax.contrib's rules (the classes' lr defaults in kwargs)
    Optimizer(id="ademamix", factory="ademamix", kwargs={"learning_rate": 1e-3},
              reference=ref.ademamix_tx, stateful="AdEMAMix", slots=3,
              optax=lambda optax, h: optax.contrib.ademamix(
                  h["learning_rate"], h["b1"], h["b2"], h["b3"], h["alpha"], h["eps"],
                  weight_decay=h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "b1": st.sampled_from([0.0, 0.9]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999), "b3": st.floats(0.0, 0.9999),
                  "alpha": st.sampled_from([0.0, 5.0]) | st.floats(0.0, 10.0), "eps": _eps(st),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_ademamix", {"alpha": 5.0}), _lr(1e-3)), bench="ademamix"),
    Optimizer(id="ademamix-wd_decoupled-custom", factory="ademamix",
              kwargs={"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "b3": 0.999, "alpha": 2.0,
                      "eps": 1e-6, "weight_decay": 0.1},
              reference=ref.ademamix_tx, stateful="AdEMAMix", slots=3, needs_params=True,
              optax=lambda optax, h: optax.contrib.ademamix(
                  h["learning_rate"], h["b1"], h["b2"], h["b3"], h["alpha"], h["eps"],
                  weight_decay=h["weight_decay"]),
              parts=(("scale_by_ademamix", {"b1": 0.8, "b2": 0.99, "b3": 0.999, "alpha": 2.0,
                                            "eps": 1e-6}),
                     ("add_decayed_weights", {"weight_decay": 0.1}), _lr(1e-2))),
    # the paper's warmups as schedules of the count (b3 and alpha; the classes take numbers)
    Optimizer(id="ademamix-schedules", factory="ademamix",
              kwargs={"learning_rate": cosine,
                      "b3": lambda c: 0.99 + 0.0099 * min(float(c), 10.0) / 10.0,
                      "alpha": lambda c: 5.0 * min(float(c), 10.0) / 10.0},
              reference=ref.ademamix_tx, slots=3,
              optax=lambda optax, h: optax.contrib.ademamix(
                  h["learning_rate"], h["b1"], h["b2"], h["b3"], h["alpha"], h["eps"],
                  weight_decay=h["weight_decay"]),
              parts=(("scale_by_ademamix",
                      {"b3": lambda c: 0.99 + 0.0099 * min(float(c), 10.0) / 10.0,
                       "alpha": lambda c: 5.0 * min(float(c), 10.0) / 10.0}), _lr(cosine))),
    Optimizer(id="simplified_ademamix", factory="simplified_ademamix",
              kwargs={"learning_rate": 1e-3}, reference=ref.simplified_ademamix_tx, slots=2,
              optax=lambda optax, h: optax.contrib.simplified_ademamix(
                  h["learning_rate"], h["b1"], h["b2"], h["alpha"], h["eps"], h["eps_root"],
                  h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.01),
                  "b1": st.sampled_from([0.0, 0.99]) | st.floats(0.05, 0.99),
                  "b2": st.floats(0.0, 0.9999),
                  "alpha": st.sampled_from([0.0]) | st.floats(0.0, 10.0), "eps": _eps(st),
                  "eps_root": st.sampled_from([0.0]) | st.floats(0.0, 1e-6),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_simplified_ademamix", {}), _lr(1e-3)), bench="simplified_ademamix"),
    Optimizer(id="simplified_ademamix-alpha_schedule-wd_decoupled", factory="simplified_ademamix",
              kwargs={"learning_rate": 1e-3, "b1": 0.9, "b2": 0.99,
                      "alpha": lambda c: 2.0 * min(float(c), 10.0) / 10.0, "eps_root": 1e-8,
                      "weight_decay": 0.1},
              reference=ref.simplified_ademamix_tx, slots=2, needs_params=True,
              optax=lambda optax, h: optax.contrib.simplified_ademamix(
                  h["learning_rate"], h["b1"], h["b2"], h["alpha"], h["eps"], h["eps_root"],
                  h["weight_decay"])),
    # the learning rate is inside the rule; x0 (the first params) is taken at the first step
    Optimizer(id="madgrad", factory="madgrad", kwargs={"learning_rate": 1e-2},
              reference=ref.madgrad_tx, stateful="MADGRAD", slots=3,
              optax=lambda optax, h: optax.contrib.madgrad(h["learning_rate"], h["momentum"],
                                                           h["weight_decay"], h["eps"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": _learning_rate(st, 0.1),
                  "momentum": st.sampled_from([0.0, 0.9]) | st.floats(0.0, 0.99),
                  "weight_decay": _weight_decay(st),
                  "eps": st.floats(-8, -2).map(lambda e: 10.0**e)}),
              parts=(("scale_by_madgrad", {"learning_rate": 1e-2}),), bench="madgrad"),
    Optimizer(id="madgrad-wd_coupled-custom", factory="madgrad",
              kwargs={"learning_rate": 3e-2, "momentum": 0.5, "weight_decay": 0.01,
                      "eps": 1e-5},
              reference=ref.madgrad_tx, stateful="MADGRAD", slots=3, needs_params=True,
              optax=lambda optax, h: optax.contrib.madgrad(h["learning_rate"], h["momentum"],
                                                           h["weight_decay"], h["eps"]),
              parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                     ("scale_by_madgrad", {"learning_rate": 3e-2, "momentum": 0.5,
                                           "eps": 1e-5}))),
    Optimizer(id="madgrad-schedule", factory="madgrad", kwargs={"learning_rate": cosine},
              reference=ref.madgrad_tx, slots=3,
              optax=lambda optax, h: optax.contrib.madgrad(h["learning_rate"], h["momentum"],
                                                           h["weight_decay"], h["eps"]),
              parts=(("scale_by_madgrad", {"learning_rate": cosine}),)),
    # lr scales the gradient (1.0: the paper's rule); p0 is taken at the first step
    Optimizer(id="cocob", factory="cocob", kwargs={}, reference=ref.cocob_tx, stateful="COCOB",
              slots=5,
              optax=lambda optax, h: optax.contrib.cocob(h["learning_rate"], h["alpha"],
                                                         h["eps"], h["weight_decay"]),
              hyper=lambda st: st.fixed_dictionaries({
                  "learning_rate": st.sampled_from([1.0]) | st.floats(0.1, 2.0),
                  "alpha": st.sampled_from([100.0]) | st.floats(1.0, 200.0),
                  "eps": st.floats(-10, -4).map(lambda e: 10.0**e),
                  "weight_decay": _weight_decay(st)}),
              parts=(("scale_by_learning_rate", {"learning_rate": 1.0, "flip_sign": False}),
                     ("scale_by_cocob", {})), bench="cocob"),
    Optimizer(id="cocob-wd_coupled-custom", factory="cocob",
              kwargs={"learning_rate": 0.5, "alpha": 10.0, "eps": 1e-6, "weight_decay": 0.01},
              reference=ref.cocob_tx, stateful="COCOB", slots=5, needs_params=True,
              optax=lambda optax, h: optax.contrib.cocob(h["learning_rate"], h["alpha"],
                                                         h["eps"], h["weight_decay"]),
              parts=(("add_decayed_weights", {"weight_decay": 0.01}),
                     ("scale_by_learning_rate", {"learning_rate": 0.5, "flip_sign": False}),
                     ("scale_by_cocob", {"alpha": 10.0, "eps": 1e-6}))),
    # schedule-free (optax.contrib's; the params are y). The stateful AdamWScheduleFree,
    # SGDScheduleFree and RAdamScheduleFree are schedulefree's rule in torch's order (and need
    # train() before a step): no stateful here; they are tested in test_schedule_free.py.
    Optimizer(id="schedule_free_adamw", factory="schedule_free_adamw",
              kwargs={"learning_rate": 1e-2}, reference=ref.schedule_free_adamw_tx, slots=2,
              needs_params=True, updates_scale_with_params=True,
              optax=lambda optax, h: optax.contrib.schedule_free_adamw(**h)),
    Optimizer(id="schedule_free_adamw-warmup-wd", factory="schedule_free_adamw",
              kwargs={"learning_rate": 1e-2, "warmup_steps": 5, "b1": 0.95, "b2": 0.99,
                      "weight_decay": 0.01, "weight_lr_power": 1.0},
              reference=ref.schedule_free_adamw_tx, slots=2, needs_params=True,
              updates_scale_with_params=True,
              optax=lambda optax, h: optax.contrib.schedule_free_adamw(**h)),
    Optimizer(id="schedule_free_sgd", factory="schedule_free_sgd",
              kwargs={"learning_rate": 0.1}, reference=ref.schedule_free_sgd_tx, slots=1,
              needs_params=True, updates_scale_with_params=True,
              optax=lambda optax, h: optax.contrib.schedule_free_sgd(**h)),
    Optimizer(id="schedule_free_sgd-warmup-wd", factory="schedule_free_sgd",
              kwargs={"learning_rate": 0.1, "warmup_steps": 5, "weight_decay": 0.01},
              reference=ref.schedule_free_sgd_tx, slots=1, needs_params=True,
              updates_scale_with_params=True,
              optax=lambda optax, h: optax.contrib.schedule_free_sgd(**h)),
    # learning-rate-free (optax.contrib's): a step size from sums over the whole tree, kept on
    # the device (TreeSums: a pre-pass, a finish and the fused kernel; D-Adaptation sums in its
    # update kernel); each a float64 reference in reference_tree_sums.py (their other
    # hyperparameters: tests/test_lr_free.py)
    Optimizer(id="prodigy", factory="prodigy", kwargs={"learning_rate": 1.0},
              reference=rts.prodigy_tx, stateful="Prodigy", slots=4, needs_params=True,
              reduction=True, segmented=3, optax=_optax_prodigy,
              bench="prodigy"),
    Optimizer(id="prodigy-one-pass", factory="prodigy",
              kwargs={"learning_rate": 1.0, "weight_decay": 0.01, "one_pass": True},
              reference=rts.prodigy_tx, stateful="Prodigy", slots=4, needs_params=True,
              reduction=True, segmented=2, bench="prodigy-one-pass"),
    Optimizer(id="dadapt_adamw", factory="dadapt_adamw", kwargs={"learning_rate": 1.0},
              reference=rts.dadapt_adamw_tx, stateful="DAdaptAdamW", slots=3, needs_params=True,
              reduction=True, segmented=2, optax=lambda optax, h: optax.contrib.dadapt_adamw(**h)),
    Optimizer(id="dog", factory="dog", kwargs={"learning_rate": 1.0}, reference=rts.dog_tx,
              stateful="DoG", slots=1, needs_params=True, reduction=True, segmented=3,
              optax=lambda optax, h: optax.contrib.dog(**h)),
    Optimizer(id="dowg", factory="dowg",
              kwargs={"learning_rate": 0.5, "init_estim_sq_dist": 1e-2, "weight_decay": 1e-3},
              reference=rts.dowg_tx,
              stateful="DoWG", slots=1, needs_params=True, reduction=True, segmented=3,
              optax=lambda optax, h: optax.contrib.dowg(**h)),
]  # fmt: skip

BY_ID: dict[str, Optimizer] = {row.id: row for row in OPTIMIZERS}
assert len(BY_ID) == len(OPTIMIZERS)


def _adafactor_torch_chain(no: Any) -> Callable[..., Any]:
    """torch's Adafactor as the chain of public blocks that the class's docstring gives."""

    def make(learning_rate=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
             maximize=False):  # fmt: skip
        factored = no.scale_by_factored_rms(
            decay_rate=-beta2_decay, epsilon=0.0, factor_last_two=True,
            eps1="finfo" if eps[0] is None else eps[0], lerp=True,
        )  # fmt: skip
        step = no.scale_by_adafactor_step(learning_rate, eps[1], d, weight_decay)
        return no.chain(*([no.scale(-1.0)] if maximize else []), factored, step)

    return make


def ids(rows: list[Optimizer]) -> list[str]:
    """pytest ids for a list of rows."""
    return [row.id for row in rows]


STATEFUL = [row for row in OPTIMIZERS if row.stateful is not None]
TORCH = [row for row in OPTIMIZERS if row.torch is not None]
OPTAX = [row for row in OPTIMIZERS if row.optax is not None]
HYPER = [row for row in OPTIMIZERS if row.hyper is not None]
BENCH = [row for row in OPTIMIZERS if row.bench is not None]
