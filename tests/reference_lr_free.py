"""The learning-rate-free rules' float64 references as runs: the start params (a dict of
arrays), the gradients of every step (a list of such dicts) and the rule's hyperparameters
(the functional alias' names) give the final params and the rule's scalars under optax's
names (``estim_lr``, ``max_dist`` ...), all float64. The maths is the optimizer table's
references (``reference_tree_sums.py``); the sums over the tree run over the leaves in sorted
key order (the tree's order).

``bc_dtype`` (Prodigy, D-Adaptation): the precision of Adam's bias correction
``sqrt(1 - b2^t) / (1 - b1^t)``, by default the params' (optax computes it from an int32
count: float32 by default, float64 under ``jax_enable_x64``; netcl_optim in the state's
precision, the same).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import reference_tree_sums as rts


def _f64(tree: dict) -> dict:
    return {k: np.array(v, np.float64) for k, v in tree.items()}


def _run(tx: Any, p0: dict, grads: list) -> tuple[dict, Any]:
    x = _f64(p0)
    state = tx.init(x)
    for g in grads:
        u, state = tx.update(_f64(g), state, x)
        x = {k: x[k] + u[k] for k in x}
    return x, state


def _core(state: Any, key: str) -> dict:
    """The rule's own state dict inside a chain's state (DoG, DoWG)."""
    if isinstance(state, dict) and key in state:
        return state
    return next(_core(s, key) for s in state if isinstance(s, (dict, tuple)) and _has(s, key))


def _has(state: Any, key: str) -> bool:
    if isinstance(state, dict):
        return key in state
    return any(_has(s, key) for s in state if isinstance(s, (dict, tuple)))


def prodigy(p0: dict, grads: list, bc_dtype: Any = None, **hyper: Any) -> tuple[dict, dict]:
    bc_dtype = bc_dtype or np.result_type(*p0.values())
    x, state = _run(rts.prodigy_with(bc_dtype, **hyper), p0, grads)
    return x, {"estim_lr": state["d"], "numerator_weighted": state["r"]}


def dadapt_adamw(p0: dict, grads: list, bc_dtype: Any = None, **hyper: Any) -> tuple[dict, dict]:
    bc_dtype = bc_dtype or np.result_type(*p0.values())
    x, state = _run(rts.dadapt_adamw_with(bc_dtype, **hyper), p0, grads)
    return x, {"estim_lr": state["d"], "numerator_weighted": state["r"]}


def dog(p0: dict, grads: list, **hyper: Any) -> tuple[dict, dict]:
    x, state = _run(rts.dog_tx(**hyper), p0, grads)
    core = _core(state, "G")
    return x, {"max_dist": core["r"], "sum_sq_norm_grads": core["G"]}


def dowg(p0: dict, grads: list, **hyper: Any) -> tuple[dict, dict]:
    x, state = _run(rts.dowg_tx(**hyper), p0, grads)
    core = _core(state, "r2")
    return x, {"weighted_sq_norm_grads": core["v"], "estim_sq_dist": core["r2"]}


RULES = {"prodigy": prodigy, "dadapt": dadapt_adamw, "dog": dog, "dowg": dowg}
