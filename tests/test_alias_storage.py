"""Every functional optimizer alias takes ``state_dtype`` and ``state_bits`` (keyword-only,
after its own parameters) and stores its state as asked (see ``low_precision_state``); the
rules with kernels of their own (Adafactor, SM3) refuse a non-default value. Where optax has
``mu_dtype``, exactly the first moment is stored as ``mu_dtype``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import netcl_optim as no
import netcl_optim.optimizers as optimizers

BF16 = np.dtype(ml_dtypes.bfloat16)
# rules with kernels of their own: float32 state only
STAGES = {"adafactor", "sm3", "muon"}
# no slots at all (per-leaf values or nothing): nothing to store in bfloat16
STATELESS = {"fromage", "noisy_sgd", "sgd", "sign_sgd"}
# values per leaf: 8-bit state refused at the first step
PER_LEAF_8BIT = {"lamb", "lars", "novograd"}
# sums over the whole tree (TreeSums): 8-bit state refused as well
TREE_SUMS_8BIT = {"prodigy", "dadapt_adamw", "dog", "dowg"}
# L-BFGS's memory holds differences of params and of gradients in the params' dtype, as
# optax's (which has no storage option): no state_dtype or state_bits
NO_STORAGE = {"lbfgs"}
# the slots optax's mu_dtype casts (ademamix: both first-order EMAs)
MU_SLOTS = {"scale_by_ademamix": {"m1", "m2"}, "ademamix": {"m1", "m2"}}
# optax's scale_by_muon takes matrices only (muon routes the other leaves to AdamW)
MATRICES_ONLY = {"scale_by_muon"}


def _exported() -> dict[str, Any]:
    """Every lower-case callable in the optimizer modules' ``__all__``."""
    found = {}
    for info in pkgutil.iter_modules(optimizers.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{optimizers.__name__}.{info.name}")
        for name in module.__all__:
            obj = getattr(module, name)
            if name[0].islower() and callable(obj):
                found[name] = obj
    return found


EXPORTED = _exported()
ALIASES = {
    name: fn
    for name, fn in EXPORTED.items()
    if not name.startswith("scale_by")
    and "learning_rate" in inspect.signature(fn).parameters
    and name not in NO_STORAGE
}
WITH_MU_DTYPE = {
    name: fn for name, fn in EXPORTED.items() if "mu_dtype" in inspect.signature(fn).parameters
}


def _build(name: str, **kwargs: Any) -> Any:
    fn = EXPORTED[name]
    if "learning_rate" in inspect.signature(fn).parameters:
        kwargs = {"learning_rate": 0.01, **kwargs}
    return fn(**kwargs)


def _host_params(n: int = 0, name: str = "") -> dict[str, np.ndarray]:
    if name in MATRICES_ONLY:
        return {"w": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)}
    if n:
        return {"w": np.linspace(-1.0, 1.0, n, dtype=np.float32)}
    return {
        "w": np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4),
        "b": np.linspace(0.5, 1.5, 5, dtype=np.float32),
    }


def _run(tx: Any, cl_queue: Any, host_params: dict, steps: int = 1) -> tuple[Any, Any]:
    """The state after ``init`` and after ``steps`` steps (host copies)."""
    params = no.to_device(host_params, cl_queue)
    state = tx.init(params)
    first = no.to_host(state)
    for k in range(steps):
        grads = {key: np.full_like(v, 0.1 * (k + 1)) for key, v in host_params.items()}
        params, state = no.step(tx, params, no.to_device(grads, cl_queue), state)
    return first, no.to_host(state)


def _leaves(tree: Any, field: str | None = None) -> list[tuple[str | None, Any]]:
    """(the nearest NamedTuple field name above it, leaf) for every leaf of a host state."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return [pair for f, v in zip(tree._fields, tree, strict=True) for pair in _leaves(v, f)]
    if isinstance(tree, (tuple, list)):
        return [pair for v in tree for pair in _leaves(v, field)]
    if isinstance(tree, dict):
        return [pair for v in tree.values() for pair in _leaves(v, field)]
    return [(field, tree)]


def _slot_arrays(state: Any) -> list[tuple[str | None, np.ndarray]]:
    """The state's arrays of a parameter's shape: its slots."""
    shapes = {(3, 4), (5,)}
    return [(f, x) for f, x in _leaves(state) if isinstance(x, np.ndarray) and x.shape in shapes]


def test_every_alias_found():
    expected = {"adam", "adamw", "sgd", "rmsprop", "adagrad", "lion", "adabelief", "adadelta",
                "adamax", "adamaxw", "adan", "ademamix", "adopt", "nadam", "nadamw", "radam",
                "noisy_sgd", "yogi", "lamb", "lars", "novograd", "madgrad", "cocob", "fromage",
                "rprop", "asgd", "amsgrad", "adafactor", "sm3", "sign_sgd", "signum",
                "optimistic_gradient_descent", "optimistic_adam_v2"}  # fmt: skip
    assert expected <= set(ALIASES)
    assert {"amsgrad", "lion", "ademamix", "adopt", "optimistic_adam_v2"} <= set(WITH_MU_DTYPE)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_signature_has_storage_keywords(name):
    params = list(inspect.signature(ALIASES[name]).parameters.values())
    assert [p.name for p in params[-2:]] == ["state_dtype", "state_bits"]
    dtype, bits = params[-2:]
    assert dtype.kind is inspect.Parameter.KEYWORD_ONLY and dtype.default is None
    assert bits.kind is inspect.Parameter.KEYWORD_ONLY and bits.default == 32


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_bfloat16_state(name, cl_queue):
    after_init, after_step = _run(_build(name, state_dtype="bfloat16"), cl_queue, _host_params())
    for when, state in (("init", after_init), ("step", after_step)):
        slots = _slot_arrays(state)
        if name in STATELESS:
            assert not slots, f"{name}: slots {slots}"
            continue
        assert slots, f"{name}: no slot arrays after {when}"
        assert all(x.dtype == BF16 for _, x in slots), (when, [(f, x.dtype) for f, x in slots])
        # the float32 state is the default
    default = _run(_build(name), cl_queue, _host_params())[1]
    assert all(x.dtype == np.float32 for _, x in _slot_arrays(default))


@pytest.mark.parametrize("name", sorted(set(STAGES) & set(ALIASES)))
def test_stages_refuse_8bit_state(name):
    with pytest.raises(ValueError, match="keeps its state in float32"):
        _build(name, state_bits=8)


@pytest.mark.parametrize("name", sorted(ALIASES.keys() - STAGES - STATELESS))
def test_8bit_state(name, cl_queue):
    tx = _build(name, state_bits=8)
    if name in PER_LEAF_8BIT | TREE_SUMS_8BIT:
        with pytest.raises(ValueError, match="8-bit state serves element-wise rules"):
            _run(tx, cl_queue, _host_params(4096))
        return
    after_init, after_step = _run(tx, cl_queue, _host_params(4096))
    for state in (after_init, after_step):
        kinds = [type(x).__name__ for _, x in _leaves(state)]
        assert "uint8" in {str(getattr(x, "dtype", "")) for _, x in _leaves(state)}, kinds


@pytest.mark.parametrize("name", sorted(WITH_MU_DTYPE))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mu_dtype_stores_exactly_mu(name, dtype, cl_queue):
    want = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16)
    expected = MU_SLOTS.get(name, {"mu"})
    for state in _run(_build(name, mu_dtype=dtype), cl_queue, _host_params(name=name), steps=2):
        slots = _slot_arrays(state)
        assert {f for f, _ in slots} >= expected
        for field, x in slots:
            assert x.dtype == (want if field in expected else np.float32), (name, field, x.dtype)


@pytest.mark.parametrize("name", sorted(WITH_MU_DTYPE))
def test_mu_dtype_float32_is_the_default(name, cl_queue):
    a = _run(_build(name, mu_dtype="float32"), cl_queue, _host_params(name=name), steps=2)[1]
    b = _run(_build(name), cl_queue, _host_params(name=name), steps=2)[1]
    for (fa, xa), (fb, xb) in zip(_slot_arrays(a), _slot_arrays(b), strict=True):
        assert fa == fb and xa.dtype == xb.dtype == np.float32
        np.testing.assert_array_equal(xa, xb)


@pytest.mark.parametrize("name", sorted(WITH_MU_DTYPE))
@pytest.mark.parametrize("bad", ["int8", np.float64, "bf16"])
def test_mu_dtype_invalid(name, bad):
    with pytest.raises(ValueError, match="Invalid mu_dtype: "):
        _build(name, mu_dtype=bad)


def test_mu_dtype_with_state_dtype(cl_queue):
    state = _run(no.amsgrad(0.01, mu_dtype="float16", state_dtype="bfloat16"), cl_queue,
                 _host_params())[0]  # fmt: skip
    for field, x in _slot_arrays(state):
        assert x.dtype == (np.float16 if field == "mu" else BF16), (field, x.dtype)
