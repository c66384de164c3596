"""ZeRO stage 1: sharded optimizers equal unsharded ones bit for bit (functional and stateful),
with ~1/N of the optimizer state per rank. Slices cut through leaves; trees mix dtypes."""

from __future__ import annotations

from typing import Any

import numpy as np
from _util import COMM, RANK, bits_equal, check, log, run

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim.stateful import (
    LARS,
    SGD,
    SM3,
    Adafactor,
    AdamW,
    DAdaptAdamW,
    DoG,
    Fromage,
    Lamb,
    NovoGrad,
    Parameter,
    Prodigy,
)

SHAPES = {
    "a": ((37,), np.float32),
    "b": ((5, 7), np.float32),
    "c": ((0,), np.float32),
    "d": ((13,), np.float32),
    "e": ((9,), np.float64),
    "h": ((11,), np.float16),
}


def draw(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(t) for k, (s, t) in SHAPES.items()}


def equal(a: dict, b: dict, keys: Any = None) -> bool:
    a, b = no.to_host(a), no.to_host(b)
    return all(bits_equal(a[k], b[k]) for k in (keys or a))


def functional(
    name: str, tx: no.GradientTransformation, packed: bool, steps: int = 6, balanced: bool = True
) -> None:
    rng = np.random.default_rng(1)
    init = no.to_device(draw(rng))
    if packed:
        init = no.pack(init)
    grng = np.random.default_rng(10 + RANK)  # different grads on every rank
    ar = dist.allreduce_gradients(comm=COMM)
    stx = dist.shard_optimizer(tx, COMM)
    via_update = no.chain(ar, stx)  # gathers the updates
    p_ref = p_upd = p_apply = p_step = init
    s_ref, s_apply = tx.init(init), tx.init(init)
    s_upd, s_step = via_update.init(init), stx.init(init)
    for step in range(steps):
        g = no.to_device(draw(grng))
        if packed:
            g = no.pack(g)
        mean = dist.allreduce(g, COMM)
        p_ref, s_ref = no.step(tx, p_ref, mean, s_ref)
        u, s_apply = tx.update(mean, s_apply, p_apply)
        p_apply = no.apply_updates(p_apply, u)
        p_upd, s_upd = no.step(via_update, p_upd, g, s_upd)
        p_step, s_step = dist.sharded_step(stx, p_step, mean, s_step)
        where = f"{name} ({'packed' if packed else 'per leaf'}) step {step}"
        check(equal(p_step, p_ref), f"{where}: sharded_step != step")
        check(equal(p_upd, p_apply), f"{where}: update + apply != unsharded update + apply")
        check(equal(p_upd, p_ref, ["a", "b", "c", "d", "e"]), f"{where}: f32/f64 != step")
    full, mine = dist.state_nbytes(s_ref), dist.state_nbytes(s_step)
    every = COMM.allgather(mine)
    if balanced:  # (a per-leaf state is whole on every rank)
        check(sum(every) == full, f"{name}: shard states {every} do not add up to {full}")
        # (shards are cut at the leaves' 256-element blocks: here, leaves shorter than one)
        most = 8 * 2 * max(np.prod(s) for s, _ in SHAPES.values())
        check(max(every) - min(every) <= most, f"{name}: unbalanced shards {every}")
    if packed and name == "adamw":
        log(f"functional adamw state: {mine} bytes on this rank, {full} unsharded")


def stateful(
    cls: type, kwargs: dict, groups_kwargs: list[dict], steps: int = 8, balanced: bool = True
) -> None:
    rng = np.random.default_rng(2)
    init = draw(rng)
    keys = list(SHAPES)
    ref_ps = [Parameter(no.to_device(init[k])) for k in keys]
    zero_ps = [Parameter(no.to_device(init[k])) for k in keys]

    def groups(ps: list) -> list[dict]:
        return [{"params": ps[:3], **groups_kwargs[0]}, {"params": ps[3:], **groups_kwargs[1]}]

    ref = cls(groups(ref_ps), **kwargs)
    zero = dist.ZeroRedundancyOptimizer(cls, groups(zero_ps), comm=COMM, **kwargs)
    grng = np.random.default_rng(20 + RANK)
    for step in range(steps):
        hg = draw(grng)
        if step % 2:
            zero.zero_grad(set_to_none=False)  # packed grads: slices are views
            for p, k in zip(zero_ps, keys, strict=True):
                if p.grad.size:  # (pyopencl's set() rejects some empty arrays' strides)
                    p.grad.set(hg[k])
        else:
            for p, k in zip(zero_ps, keys, strict=True):
                p.grad = no.to_device(hg[k])
        if step == 5:  # group 1 without grads: skipped by both
            for p in zero_ps[3:]:
                p.grad = None
        if step == 3:  # an LR change through param_groups reaches the shards
            for opt in (ref, zero):
                opt.param_groups[0]["lr"] *= 0.5
        dist.allreduce_grads_(zero_ps, COMM)
        for p, q in zip(ref_ps, zero_ps, strict=True):
            p.grad = None if q.grad is None else q.grad.copy()
        ref.step()
        zero.step()
        for i, (p, q) in enumerate(zip(ref_ps, zero_ps, strict=True)):
            check(
                bits_equal(p.data.get(), q.data.get()),
                f"{cls.__name__} step {step}: param {keys[i]} differs from the unsharded step",
            )
        zero.zero_grad()
    full, mine = dist.state_nbytes(ref), zero.state_nbytes()
    every = COMM.allgather(mine)
    if balanced:  # (a per-leaf state is whole on every rank)
        check(sum(every) == full, f"{cls.__name__}: shard states {every} do not add up to {full}")
    log(f"stateful {cls.__name__} state: {mine} bytes on this rank, {full} unsharded")


SHAPES_8BIT = {  # no float64 (8-bit state takes float32 and float16 params)
    "a": ((2000,), np.float32),
    "b": ((300, 7), np.float32),
    "c": ((13,), np.float32),
    "h": ((1500,), np.float16),
}


def sharded_equals_step(name: str, tx: Any, tree: Any, steps: int) -> tuple[Any, Any]:
    """``steps`` of ``sharded_step`` and of the unsharded ``step`` on packed ``tree()``s,
    checked bit for bit after each; returns their final states."""
    stx = dist.shard_optimizer(tx, COMM)
    p_ref = p_step = no.pack(no.to_device(tree()))
    s_ref, s_step = tx.init(p_ref), stx.init(p_step)
    for step in range(steps):
        g = dist.allreduce(no.pack(no.to_device(tree())), COMM)
        p_ref, s_ref = no.step(tx, p_ref, g, s_ref)
        p_step, s_step = dist.sharded_step(stx, p_step, g, s_step)
        check(equal(p_step, p_ref), f"{name} step {step}: sharded_step != step")
    return s_ref, s_step


def zero_equals_optimizer(
    cls: Any, groups: Any, kwargs: dict, init: dict, grads: Any, steps: int
) -> tuple[Any, Any]:
    """``steps`` of ``ZeroRedundancyOptimizer(cls)`` and of ``cls`` over the params ``init``
    (``groups(params)`` their param groups), the same ``grads()`` on both, checked bit for
    bit after each; returns both optimizers."""
    keys = list(init)
    ref_ps = [Parameter(no.to_device(init[k])) for k in keys]
    zero_ps = [Parameter(no.to_device(init[k])) for k in keys]
    ref = cls(groups(ref_ps), **kwargs)
    zero = dist.ZeroRedundancyOptimizer(cls, groups(zero_ps), comm=COMM, **kwargs)
    for step in range(steps):
        g = grads()
        for p, q, k in zip(ref_ps, zero_ps, keys, strict=True):
            p.grad, q.grad = no.to_device(g[k]), no.to_device(g[k])
        ref.step()
        zero.step()
        for k, p, q in zip(keys, ref_ps, zero_ps, strict=True):
            check(bits_equal(p.data.get(), q.data.get()), f"{cls.__name__} step {step}: {k}")
    return ref, zero


def eight_bit() -> None:
    """8-bit state (params of >= 256 elements; the others float32): shards cut at the
    leaves' blocks, so every rank's blocks are the unsharded ones."""
    rng = np.random.default_rng(5)

    def tree(scale: float = 1.0) -> dict[str, Any]:
        return {k: (scale * rng.standard_normal(s)).astype(t) for k, (s, t) in SHAPES_8BIT.items()}

    tx = no.low_precision_state(no.adamw(1e-2, weight_decay=0.1), state_bits=8, min_8bit_size=256)
    s_ref, s_step = sharded_equals_step("8-bit adamw", tx, tree, 5)
    full, every = dist.state_nbytes(s_ref), COMM.allgather(dist.state_nbytes(s_step))
    check(sum(every) == full, f"8-bit adamw: shard states {every} do not add up to {full}")
    kwargs = {"lr": 1e-2, "state_bits": 8, "min_8bit_size": 256}
    ref, zero = zero_equals_optimizer(
        AdamW, lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}], kwargs, tree(),
        lambda: tree(0.1), 5,
    )  # fmt: skip
    log(f"8-bit AdamW state: {zero.state_nbytes()} bytes on this rank, "
        f"{dist.state_nbytes(ref)} unsharded")  # fmt: skip


def schedule_free() -> None:
    """The stateful schedule-free AdamW: train() and eval() swap every rank's slice, then
    the gather; steps as unsharded (float32 leaves of the 8-bit tree's shapes)."""
    rng = np.random.default_rng(6)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in SHAPES_8BIT.items()}
    keys = list(init)
    ref_ps = [Parameter(no.to_device(init[k])) for k in keys]
    zero_ps = [Parameter(no.to_device(init[k])) for k in keys]
    kwargs = {"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.01}
    ref = no.AdamWScheduleFree([{"params": ref_ps[:2]}, {"params": ref_ps[2:]}], **kwargs)
    groups = [{"params": zero_ps[:2]}, {"params": zero_ps[2:]}]
    zero = dist.ZeroRedundancyOptimizer(no.AdamWScheduleFree, groups, comm=COMM, **kwargs)
    for opt in (ref, zero):
        opt.train()
    for _ in range(4):
        g = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init.items()}
        for p, q, k in zip(ref_ps, zero_ps, keys, strict=True):
            p.grad, q.grad = no.to_device(g[k]), no.to_device(g[k])
        ref.step()
        zero.step()
    for opt in (ref, zero):
        opt.eval()
    for k, p, q in zip(keys, ref_ps, zero_ps, strict=True):
        check(bits_equal(p.data.get(), q.data.get()), f"schedule-free AdamW (eval): {k}")


SHAPES_TREE_SUMS = {  # a leaf of several chunks (8192 elements): a rank's cut inside it
    "a": ((20000,), np.float32),
    "b": ((300, 7), np.float32),
    "c": ((13,), np.float32),
    "e": ((9,), np.float64),
}


def tree_sums() -> None:
    """Rules whose step size sums over the whole tree: each rank sums its chunks, one
    Allreduce adds them; every rank's step size and params equal the unsharded ones."""
    rng = np.random.default_rng(6)

    def tree(scale: float = 1.0) -> dict[str, Any]:
        return {k: (scale * rng.standard_normal(s)).astype(t)
                for k, (s, t) in SHAPES_TREE_SUMS.items()}  # fmt: skip

    cases = {
        "prodigy": (no.prodigy(1.0, weight_decay=0.01), "estim_lr"),
        "dadapt_adamw": (no.dadapt_adamw(1.0), "estim_lr"),
        "dog": (no.dog(0.5, weight_decay=1e-3), "max_dist"),
        "dowg": (no.dowg(0.5), "estim_sq_dist"),
    }
    for name, (tx, field) in cases.items():
        stx = dist.shard_optimizer(tx, COMM)
        p_ref = p_step = no.pack(no.to_device(tree()))
        s_ref, s_step = tx.init(p_ref), stx.init(p_step)
        for step in range(5):
            g = dist.allreduce(no.pack(no.to_device(tree(0.1))), COMM)
            p_ref, s_ref = no.step(tx, p_ref, g, s_ref)
            p_step, s_step = dist.sharded_step(stx, p_step, g, s_step)
            check(equal(p_step, p_ref), f"{name} step {step}: sharded_step != step")

        mine, want = _scalar(s_step, field), _scalar(s_ref, field)
        check(mine == want, f"{name}: {field} {mine} != unsharded {want}")
        check(len(set(COMM.allgather(mine))) == 1, f"{name}: ranks hold different {field}")
    log("tree sums (Prodigy, D-Adaptation, DoG, DoWG) sharded == unsharded, the same d")


def _scalar(state: Any, name: str) -> float:
    """The tree's value of the scalar field ``name`` (every leaf holds it)."""
    import optree

    return float(optree.tree_leaves(_field(state, name))[0].get().ravel()[0])


def _field(state: Any, name: str) -> Any:
    """The first NamedTuple field ``name`` inside ``state`` (a chain's, a shard's)."""
    if hasattr(state, "_fields") and name in state._fields:
        return getattr(state, name)
    children = state.values() if isinstance(state, dict) else state
    if isinstance(state, (tuple, list, dict)):
        for child in children:
            found = _field(child, name)
            if found is not None:
                return found
    return None


SHAPES_MUON = {  # matrices (Muon's), float32 and float64; shards hold whole leaves
    "a": ((12, 20), np.float32),
    "b": ((2, 6, 9), np.float32),
    "c": ((30, 8), np.float32),
    "d": ((16, 16), np.float32),
    "e": ((7, 5), np.float64),
}


def muon() -> None:
    """Muon orthogonalises whole matrices: ZeRO cuts its shards at leaf starts only, each
    rank steps the matrices of its shard, the gather gives every rank the unsharded bits."""
    rng = np.random.default_rng(7)

    def tree(scale: float = 1.0) -> dict[str, Any]:
        return {k: (scale * rng.standard_normal(s)).astype(t) for k, (s, t) in SHAPES_MUON.items()}

    tx = no.Muon.functional(0.02, 0.1, 0.95, True, (3.4445, -4.775, 2.0315), 1e-7, 5, None,
                            "reference", "out_in")  # fmt: skip
    sharded_equals_step("muon", tx, tree, 4)

    def groups(ps: list) -> list[dict]:
        return [{"params": ps[:2], "variant": "reference"}, {"params": ps[2:]}]

    ref, zero = zero_equals_optimizer(no.Muon, groups, {"lr": 0.02}, tree(), lambda: tree(0.1), 4)
    every = COMM.allgather(zero.state_nbytes())
    check(sum(every) == dist.state_nbytes(ref), f"Muon: shard states {every} do not add up")
    log(f"Muon state: {zero.state_nbytes()} bytes on this rank, {dist.state_nbytes(ref)} unsharded")


def main() -> None:
    sched = lambda t: 1e-2 / (1 + t)  # noqa: E731
    cases = {
        "adamw": no.adamw(1e-2, weight_decay=0.1),
        "sgd_nesterov": no.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        "rmsprop": no.rmsprop(1e-2, centered=True, momentum=0.5),
        "inject_adam": no.inject_hyperparams(no.adam)(learning_rate=sched, b1=0.8),
        # low-precision state: element-wise, so a shard's state is its elements' state
        "adamw_bf16": no.low_precision_state(no.adamw(1e-2, weight_decay=0.1), "bfloat16"),
    }
    for name, tx in cases.items():
        functional(name, tx, packed=True)
    functional("adamw", cases["adamw"], packed=False)
    # a value per leaf: summed over the whole leaves (an intermediate gathered first), the
    # per-leaf state the same on every rank; slices cut through leaves
    per_leaf = {
        "lamb": no.lamb(1e-2, weight_decay=0.1),
        "lars": no.lars(0.5, weight_decay=1e-3),
        "novograd": no.novograd(1e-2, weight_decay=1e-3),
        "fromage": no.fromage(1e-2),
        "agc_sgd": no.chain(no.adaptive_grad_clip(0.05), no.sgd(0.1, momentum=0.9)),
        # row and column factors, whole on every rank
        "adafactor": no.adafactor(1e-2, min_dim_size_to_factor=2, momentum=0.9),
        "adafactor_torch": no.Adafactor.functional(1e-2, -0.8, (None, 1e-3), 1.0, 0.1, False),
        "sm3": no.sm3(0.1, momentum=0.5),
    }
    for name, tx in per_leaf.items():
        functional(name, tx, packed=True, balanced=False)
    functional("lamb", per_leaf["lamb"], packed=False, balanced=False)
    # clipping on the full (all-reduced) grads, before the sharded optimizer
    clip = no.chain(no.clip_by_global_norm(0.5), no.adam(1e-2))
    sharded = no.chain(no.clip_by_global_norm(0.5), dist.shard_optimizer(no.adam(1e-2), COMM))
    p1 = p2 = no.pack(no.to_device(draw(np.random.default_rng(3))))
    s1, s2 = clip.init(p1), sharded.init(p2)
    for step in range(4):
        g = dist.allreduce(no.to_device(draw(np.random.default_rng(30 + RANK + step))), COMM)
        p1, s1 = no.step(clip, p1, g, s1)
        p2, s2 = no.step(sharded, p2, g, s2)
        check(equal(p1, p2, ["a", "b", "c", "d", "e"]), f"clip then shard, step {step}")
    stateful(AdamW, {"lr": 3e-3, "weight_decay": 0.05}, [{"lr": 1e-2}, {"weight_decay": 0.0}])
    stateful(SGD, {"lr": 0.05, "momentum": 0.9}, [{}, {"nesterov": True}])
    stateful(AdamW, {"lr": 3e-3, "state_dtype": "bfloat16"}, [{}, {"weight_decay": 0.0}])
    eight_bit()
    schedule_free()
    # a value per leaf: the groups' whole leaves, their per-leaf state whole on every rank
    stateful(Lamb, {"lr": 1e-2, "weight_decay": 0.1}, [{}, {"lr": 5e-3}], balanced=False)
    stateful(LARS, {"lr": 0.5}, [{}, {"weight_decay": 1e-3}], balanced=False)
    stateful(NovoGrad, {"lr": 1e-2}, [{}, {"weight_decay": 1e-3}], balanced=False)
    stateful(Fromage, {"lr": 1e-2}, [{}, {}], balanced=False)
    stateful(Adafactor, {"lr": 1e-2}, [{}, {"weight_decay": 0.1}], balanced=False)
    stateful(SM3, {"lr": 0.1}, [{}, {"momentum": 0.5}], balanced=False)
    tree_sums()
    # sums over each group's leaves: each rank its chunks, added by an Allreduce
    stateful(Prodigy, {"lr": 1.0}, [{}, {"weight_decay": 0.01}], balanced=False)
    stateful(DAdaptAdamW, {"lr": 1.0}, [{}, {"lr": 0.5}], balanced=False)
    stateful(DoG, {"lr": 1.0}, [{}, {"weight_decay": 1e-3}], balanced=False)
    muon()
    log("sharded == unsharded, bit for bit")


run(main)
