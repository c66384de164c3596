"""Porting from torch.optim: torch's names work as they do there (issue 13, point 7).

``maximize`` on every class and functional alias (bit for bit torch's ``-grad``), torch's
implementation keywords (``foreach``, ``fused``, ``capturable``: accepted, validated, no
effect), ``differentiable=True`` refused, ``RMSprop`` as ``RMSProp``, constructor signatures in
torch's order (positional arguments too), ``maximize`` in state dicts both ways.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import pytest

import netcl_optim as no
from netcl_optim import stateful as S
from netcl_optim._validation import BOOL
from netcl_optim.stateful._declaration import KEYWORD_ONLY, MAXIMIZE, Hyperparameter, torch_lr
from netcl_optim.stateful._torch_state import STEP, torch_state
from netcl_optim.transforms._adaptive import ScaleByAdamState

SHAPES = [(3, 4), (5,), ()]

# (id, our class, torch.optim class, torch-named kwargs): the maximize variants
VARIANTS = [
    ("sgd", "SGD", "SGD", {"lr": 0.1}),
    ("sgd-momentum-dampening-wd", "SGD", "SGD",
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01}),
    ("sgd-nesterov", "SGD", "SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("momentum", "Momentum", "SGD", {"lr": 0.02, "momentum": 0.8, "weight_decay": 1e-2}),
    ("adam-wd", "Adam", "Adam", {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw", "AdamW", "AdamW", {"lr": 1e-2, "betas": (0.8, 0.99)}),
    ("rmsprop-centered-momentum-wd", "RMSprop", "RMSprop",
     {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
]  # fmt: skip
VARIANT_IDS = [v[0] for v in VARIANTS]

# the functional aliases with torch-named kwargs mapped to theirs
FUNCTIONAL = {
    "SGD": lambda h, **kw: no.sgd(h["lr"], h.get("momentum", 0.0), h.get("dampening", 0.0),
                                  h.get("weight_decay", 0.0), h.get("nesterov", False), **kw),
    "Momentum": lambda h, **kw: no.momentum(h["lr"], h["momentum"], h["weight_decay"], **kw),
    "Adam": lambda h, **kw: no.adam(h["lr"], weight_decay=h["weight_decay"], **kw),
    "AdamW": lambda h, **kw: no.adamw(h["lr"], *h["betas"], **kw),
    "RMSprop": lambda h, **kw: no.rmsprop(h["lr"], momentum=h["momentum"],
                                          centered=h["centered"],
                                          weight_decay=h["weight_decay"], **kw),
}  # fmt: skip


def dev(x: Any, queue: Any) -> Any:
    return no.to_device(np.asarray(x, np.float32), queue)


def params_of(queue: Any, values: list[np.ndarray]) -> list[Any]:
    return [S.Parameter(dev(v, queue)) for v in values]


def problem(seed: int, steps: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    return p0, grads


def run_stateful(opt: Any, params: list[Any], grads: list[list[np.ndarray]], queue: Any) -> list:
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = dev(g, queue)
        opt.step()
    return [p.data.get() for p in params]


def run_torch(torch: Any, name: str, p0: list, grads: list, **kwargs: Any) -> list[np.ndarray]:
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    topt = getattr(torch.optim, name)(tparams, **kwargs)
    for gs in grads:
        for tp, g in zip(tparams, gs, strict=True):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
    return [tp.detach().numpy() for tp in tparams]


def assert_bitwise(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.reshape(-1).view(np.uint32), b.reshape(-1).view(np.uint32))


# ---------------------------------------------------------------------------- maximize


@pytest.mark.parametrize(("vid", "cls", "tname", "hyper"), VARIANTS, ids=VARIANT_IDS)
def test_maximize_is_descent_on_the_negated_gradient_bit_for_bit(cl_queue, vid, cls, tname,
                                                                 hyper):  # fmt: skip
    """maximize=True with grads g is maximize=False with grads -g, bit for bit (torch's rule:
    ``-grad`` first), stateful and functional, with the same launches."""
    p0, grads = problem(1, 5)
    negated = [[-g for g in gs] for gs in grads]
    params = params_of(cl_queue, p0)
    with no.count_launches() as up:
        ascended = run_stateful(getattr(S, cls)(params, **hyper, maximize=True), params, grads,
                                cl_queue)  # fmt: skip
    params = params_of(cl_queue, p0)
    with no.count_launches() as down:
        descended = run_stateful(getattr(S, cls)(params, **hyper), params, negated, cl_queue)
    assert_bitwise(ascended, descended)
    assert up.launches == down.launches  # the negation is fused

    tx = FUNCTIONAL[cls](_full(cls, hyper), maximize=True)
    fparams = no.pack([dev(p, cl_queue) for p in p0])
    state = tx.init(fparams)
    for gs in grads:
        fparams, state = no.step(tx, fparams, [dev(g, cl_queue) for g in gs], state)
    assert_bitwise([p.get() for p in fparams], ascended)


def _full(cls: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """Every hyperparameter of ``cls``: its defaults under ``hyper``."""
    sig = inspect.signature(getattr(S, cls))
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}
    return {**defaults, **hyper}


@pytest.mark.parametrize(("vid", "cls", "tname", "hyper"), VARIANTS, ids=VARIANT_IDS)
def test_maximize_matches_torch(cl_queue, vid, cls, tname, hyper):
    """20 steps against torch.optim with maximize=True (float32, rtol 1e-5)."""
    torch = pytest.importorskip("torch")
    p0, grads = problem(2, 20)
    params = params_of(cl_queue, p0)
    got = run_stateful(getattr(S, cls)(params, **hyper, maximize=True), params, grads, cl_queue)
    full = {k: v for k, v in _full(cls, hyper).items() if k in _torch_names(torch, tname)}
    want = run_torch(torch, tname, p0, grads, **{**full, "maximize": True})
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _torch_names(torch: Any, tname: str) -> set[str]:
    return set(inspect.signature(getattr(torch.optim, tname)).parameters)


def test_maximize_is_a_group_hyperparameter(cl_queue):
    """Per group, editable in param_groups (the chain is rebuilt), validated as a bool."""
    p0, grads = problem(3, 2)
    params = params_of(cl_queue, p0)
    opt = S.Adam([{"params": params[:1]}, {"params": params[1:], "maximize": True}], lr=0.1)
    assert [g["maximize"] for g in opt.param_groups] == [False, True]
    assert opt.defaults["maximize"] is False
    run_stateful(opt, params, grads[:1], cl_queue)
    opt.param_groups[0]["maximize"] = True
    opt.param_groups[1]["maximize"] = "yes"
    with pytest.raises(ValueError, match=r"^Invalid maximize: 'yes' \(must be a bool\) in "
                                         r"param_groups\[1\]$"):  # fmt: skip
        opt.step()
    with pytest.raises(ValueError, match=r"^Invalid maximize: 1 \(must be a bool\)$"):
        S.SGD(params_of(cl_queue, p0), maximize=1)
    with pytest.raises(ValueError, match="maximize"):
        no.sgd(0.1, maximize="yes")


def test_maximize_state_dicts_both_ways(cl_queue):
    """torch's state dict with maximize=True loads (it was refused before) and goes on as
    torch does; ours carries maximize into torch."""
    torch = pytest.importorskip("torch")
    p0, grads = problem(4, 8)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    topt = torch.optim.Adam(tparams, lr=1e-2, maximize=True)

    def torch_steps(gs_seq: list) -> None:
        for gs in gs_seq:
            for tp, g in zip(tparams, gs, strict=True):
                tp.grad = torch.from_numpy(g.copy())
            topt.step()

    torch_steps(grads[:4])
    sd = topt.state_dict()
    sd = {
        "state": {k: {n: (v.numpy() if torch.is_tensor(v) else v) for n, v in s.items()}
                  for k, s in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }  # fmt: skip
    params = params_of(cl_queue, [tp.detach().numpy().copy() for tp in tparams])
    opt = S.Adam(params, lr=0.5)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is True
    assert "foreach" not in opt.param_groups[0] and "fused" not in opt.param_groups[0]
    got = run_stateful(opt, params, grads[4:], cl_queue)
    torch_steps(grads[4:])
    for a, tp in zip(got, tparams, strict=True):
        np.testing.assert_allclose(a, tp.detach().numpy(), rtol=1e-5, atol=1e-6)

    ours = opt.state_dict()
    assert ours["param_groups"][0]["maximize"] is True
    topt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(s)) for s in SHAPES], lr=1.0)
    topt2.load_state_dict({
        "state": {k: {n: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v)
                      for n, v in s.items()} for k, s in ours["state"].items()},
        "param_groups": ours["param_groups"],
    })  # fmt: skip
    assert topt2.param_groups[0]["maximize"] is True


def test_state_dicts_saved_before_maximize_load(cl_queue):
    """A group without ``maximize`` (saved before it existed) gets the default."""
    p0, grads = problem(5, 1)
    params = params_of(cl_queue, p0)
    opt = S.RMSprop(params, lr=0.1)
    run_stateful(opt, params, grads, cl_queue)
    sd = opt.state_dict()
    del sd["param_groups"][0]["maximize"]
    opt.param_groups[0]["maximize"] = True
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False


# ---------------------------------------------------------------------------- torch's keywords

# torch.optim 2.13's implementation keywords, per class
KEYWORDS = {
    "SGD": ("foreach", "differentiable", "fused"),
    "Momentum": ("foreach", "differentiable", "fused"),
    "Adam": ("foreach", "capturable", "differentiable", "fused"),
    "AdamW": ("foreach", "capturable", "differentiable", "fused"),
    "RMSprop": ("capturable", "foreach", "differentiable"),
}


@pytest.mark.parametrize("cls", list(KEYWORDS))
def test_torch_keywords_are_accepted_and_change_nothing(cl_queue, cls):
    p0, grads = problem(6, 3)
    params = params_of(cl_queue, p0)
    plain = run_stateful(getattr(S, cls)(params), params, grads, cl_queue)
    for value in (None, True, False):
        kwargs = {k: value for k in KEYWORDS[cls] if k != "differentiable"}
        params = params_of(cl_queue, p0)
        opt = getattr(S, cls)(params, **kwargs, differentiable=False)
        assert not set(KEYWORDS[cls]) & set(opt.defaults)  # not hyperparameters
        assert_bitwise(run_stateful(opt, params, grads, cl_queue), plain)
    params = params_of(cl_queue, p0)
    opt = getattr(S, cls)([{"params": params, **dict.fromkeys(KEYWORDS[cls], False)}])
    assert not set(KEYWORDS[cls]) & set(opt.param_groups[0])
    assert_bitwise(run_stateful(opt, params, grads, cl_queue), plain)


@pytest.mark.parametrize("cls", list(KEYWORDS))
def test_torch_keywords_are_validated(cl_queue, cls):
    params = params_of(cl_queue, [np.ones(2, np.float32)])
    make = getattr(S, cls)
    for k in KEYWORDS[cls]:
        if k == "differentiable":
            continue
        with pytest.raises(ValueError, match=rf"^Invalid {k}: 'yes' \(must be None or a bool\)$"):
            make(params, **{k: "yes"})
        with pytest.raises(ValueError, match=rf"^Invalid {k}: 1 \(must be None or a bool\) in "
                                             r"param_groups\[0\]$"):  # fmt: skip
            make([{"params": params, k: 1}])
    missing = {"foreach", "fused", "capturable"} - set(KEYWORDS[cls])
    for k in missing:  # as in torch: a keyword the class does not have
        unexpected = rf"^{make.__name__}\(\): got an unexpected keyword .*'{k}'"
        with pytest.raises(TypeError, match=unexpected):
            make(params, **{k: None})


@pytest.mark.parametrize("cls", list(KEYWORDS))
def test_differentiable_true_is_refused(cl_queue, cls):
    params = params_of(cl_queue, [np.ones(2, np.float32)])
    message = "differentiable=True is not supported: netcl_optim does not record an autograd graph"
    with pytest.raises(ValueError, match=f"^{message}$"):
        getattr(S, cls)(params, differentiable=True)
    with pytest.raises(ValueError, match=rf"^{message} in param_groups\[0\]$"):
        getattr(S, cls)([{"params": params, "differentiable": True}])
    with pytest.raises(ValueError, match=r"^Invalid differentiable: None \(must be a bool\)$"):
        getattr(S, cls)(params, differentiable=None)


def test_torch_implementation_flags_still_load(cl_queue):
    torch = pytest.importorskip("torch")
    tparams = [torch.nn.Parameter(torch.ones(2))]
    topt = torch.optim.Adam(tparams, lr=0.1, foreach=False, capturable=True, fused=False)
    params = params_of(cl_queue, [np.ones(2, np.float32)])
    opt = S.Adam(params)
    opt.load_state_dict(topt.state_dict())
    assert opt.lr == 0.1
    assert set(opt.param_groups[0]) == {"params", "lr", "betas", "eps", "weight_decay",
                                        "amsgrad", "maximize"}  # fmt: skip


# ---------------------------------------------------------------------------- names, signatures


def test_rmsprop_is_rmsprop():
    assert no.RMSprop is no.RMSProp is S.RMSprop is S.RMSProp
    assert "RMSprop" in no.__all__  # (netcl_optim.stateful finds the classes lazily)


SIGNATURES = {
    "SGD": "(params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0, "
           "weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, "
           "foreach: bool | None = None, differentiable: bool = False, "
           "fused: bool | None = None) -> None",
    "Momentum": "(params, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0001, "
                "nesterov: bool = False, *, maximize: bool = False, foreach: bool | None = None, "
                "differentiable: bool = False, fused: bool | None = None) -> None",
    "Adam": "(params, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), "
            "eps: float = 1e-08, weight_decay: float = 0.0, amsgrad: bool = False, *, "
            "foreach: bool | None = None, "
            "maximize: bool = False, capturable: bool | None = False, "
            "differentiable: bool = False, fused: bool | None = None) -> None",
    "AdamW": "(params, lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), "
             "eps: float = 1e-08, weight_decay: float = 0.01, amsgrad: bool = False, *, "
             "maximize: bool = False, "
             "foreach: bool | None = None, capturable: bool | None = False, "
             "differentiable: bool = False, fused: bool | None = None) -> None",
    "RMSprop": "(params, lr: float = 0.001, alpha: float = 0.99, eps: float = 1e-08, "
               "weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, "
               "capturable: bool | None = False, foreach: bool | None = None, "
               "maximize: bool = False, differentiable: bool = False) -> None",
    "ASGD": "(params, lr: float = 0.01, lambd: float = 0.0001, alpha: float = 0.75, "
            "t0: float = 1000000.0, weight_decay: float = 0.0, foreach: bool | None = None, "
            "maximize: bool = False, differentiable: bool = False, "
            "capturable: bool | None = False) -> None",
}  # fmt: skip
# every class's storage arguments (netcl_optim's: see low_precision_state), keyword-only last
_STORAGE = (
    "state_dtype: Any = None, state_bits: int = 32, min_8bit_size: int = 4096, "
    "stochastic_rounding: bool = False"
)
SIGNATURES = {
    cls: sig.replace(") -> None", (", " if "*" in sig else ", *, ") + _STORAGE + ") -> None")
    for cls, sig in SIGNATURES.items()
}
# where our defaults differ from torch's (kept from before torch's names were adopted)
DEFAULTS_UNLIKE_TORCH = {("SGD", "lr"), ("RMSprop", "lr")}


@pytest.mark.parametrize("cls", list(SIGNATURES))
def test_signature(cls):
    assert str(inspect.signature(getattr(S, cls))) == SIGNATURES[cls]


def _torch_named_classes() -> list[str]:
    """Every exported optimizer class that torch.optim has by the same name (none without
    torch: the parametrization is then empty and pytest skips it)."""
    try:
        import torch
    except ImportError:
        return []
    names = [n for n in no.__all__ if isinstance(getattr(no, n), type)]
    return [n for n in names if issubclass(getattr(no, n), no.Optimizer)
            and getattr(no, n) is not no.Optimizer and hasattr(torch.optim, n)]  # fmt: skip


# keywords torch.optim gains after 2.13 (2.14's LBFGS maximize), and our keyword-only
# extensions (Muon's Keller Jordan variant, the weight layout of its shape scale and the
# precision of its iteration)
NEWER_THAN_TORCH = {
    ("LBFGS", "maximize"), ("Muon", "variant"), ("Muon", "layout"), ("Muon", "ns_dtype"),
}  # fmt: skip


@pytest.mark.parametrize("cls", _torch_named_classes())
def test_signature_follows_torch(cls):
    """Our parameters in torch's order and kinds, with torch's defaults (but the lr of SGD
    and RMSprop); torch's ``amsgrad`` and ``decoupled_weight_decay`` are not implemented."""
    torch = pytest.importorskip("torch")
    ours = inspect.signature(getattr(S, cls)).parameters
    theirs = inspect.signature(getattr(torch.optim, cls)).parameters
    ours = {n: p for n, p in ours.items() if (cls, n) not in NEWER_THAN_TORCH}
    assert set(theirs) - set(ours) <= {"amsgrad", "decoupled_weight_decay"}
    storage = ["state_dtype", "state_bits", "min_8bit_size", "stochastic_rounding"]  # ours, last
    assert list(ours)[-4:] == storage
    assert [n for n in ours if n not in storage] == [n for n in theirs if n in ours]
    ours = {n: p for n, p in ours.items() if n not in storage}
    for name, p in ours.items():
        assert p.kind == theirs[name].kind, name
        if name != "params" and (cls, name) not in DEFAULTS_UNLIKE_TORCH:
            assert p.default == theirs[name].default, name


def test_positional_arguments(cl_queue):
    params = params_of(cl_queue, [np.ones(2, np.float32)])
    sgd = S.SGD(params, 0.1, 0.9, 0.0, 1e-4, True)
    assert {k: v for k, v in sgd.param_groups[0].items() if k != "params"} == {
        "lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-4, "nesterov": True,
        "maximize": False,
    }  # fmt: skip
    params = params_of(cl_queue, [np.ones(2, np.float32)])
    assert S.Adam(params, 1e-2, (0.8, 0.9), 1e-6).param_groups[0]["betas"] == (0.8, 0.9)
    params = params_of(cl_queue, [np.ones(2, np.float32)])
    rms = S.RMSprop(params, 0.01, 0.9, 1e-6, 0.0, 0.5, True, False, None, True)  # torch's order
    assert rms.param_groups[0]["maximize"] is True and rms.param_groups[0]["centered"] is True
    with pytest.raises(TypeError, match=r"^SGD\(\): too many positional arguments"):
        S.SGD(params, 0.1, 0.9, 0.0, 0.0, False, False)  # maximize is keyword-only
    with pytest.raises(TypeError, match=r"^Momentum\(\): got an unexpected keyword .*dampening"):
        S.Momentum(params, dampening=0.1)
    with pytest.raises(TypeError, match=r"^Adam\(\): missing a required argument: 'params'"):
        S.Adam(lr=0.1)


# ---------------------------------------------------------------------------- declarations


def test_a_user_declared_optimizer(cl_queue):
    """A class declared the library's way (here plain SGD under another name) gets the
    constructor, validation, state dicts; a state type it does not declare is named."""

    class Descent(S.Optimizer):
        hyperparameters = (torch_lr(0.1), KEYWORD_ONLY, MAXIMIZE)
        torch_step = False

        @staticmethod
        def functional(lr: Any, maximize: bool) -> Any:
            return no.sgd(lr, maximize=maximize)

    signature = f"(params, lr: float = 0.1, *, maximize: bool = False, {_STORAGE}) -> None"
    assert str(inspect.signature(Descent)) == signature
    p0, grads = problem(7, 2)
    params = params_of(cl_queue, p0)
    got = run_stateful(Descent(params, 0.05), params, grads, cl_queue)
    params = params_of(cl_queue, p0)
    assert_bitwise(got, run_stateful(S.SGD(params, 0.05), params, grads, cl_queue))
    with pytest.raises(ValueError, match=r"^Invalid lr: 0 \(must be a finite number > 0\)$"):
        Descent(params, lr=0)

    class Undeclared(Descent):
        @staticmethod
        def functional(lr: Any, maximize: bool) -> Any:
            return no.sgd(lr, momentum=0.9)  # keeps a TraceState

    params = params_of(cl_queue, p0)
    opt = Undeclared(params)
    for p, g in zip(params, grads[0], strict=True):
        p.grad = dev(g, cl_queue)
    with pytest.raises(TypeError, match="Undeclared's chain keeps a TraceState"):
        opt.step()

    with pytest.raises(TypeError, match=r"Mismatched.functional takes \['learning_rate'\]"):

        class Mismatched(S.Optimizer):
            hyperparameters = (torch_lr(0.1), Hyperparameter("nesterov", False, BOOL))

            @staticmethod
            def functional(learning_rate: Any) -> Any:
                return no.sgd(learning_rate)


def test_torch_state_declarations_are_checked():
    adam = torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="exp_avg")
    assert adam.keys == ("exp_avg", "exp_avg_sq") and adam.count == "exp_avg"
    assert torch_state(ScaleByAdamState, mu="m", nu="v", count=STEP).count == STEP
    with pytest.raises(TypeError, match="needs count="):
        torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq")
    with pytest.raises(TypeError, match=r"fields \['nu'\] are not slots"):
        torch_state(ScaleByAdamState, mu="exp_avg", count="exp_avg")
    with pytest.raises(TypeError, match=r"has no fields \['m'\]"):
        torch_state(ScaleByAdamState, m="exp_avg", nu="v", mu="u", count="u")
    with pytest.raises(TypeError, match="none of ScaleByAdamState's keys"):
        torch_state(ScaleByAdamState, mu="exp_avg", nu="exp_avg_sq", count="steps")
