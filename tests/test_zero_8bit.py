"""ZeRO stage 1 with 8-bit state: shards are cut at the leaves' 256-element blocks, so each
rank quantizes whole blocks and its slice steps bit for bit as the unsharded optimizer's
(functional and stateful), its state saves and resumes exactly, and bad state dicts are
refused with nothing changed. Two ranks are simulated with ``FakeComm`` (the peer's part
of a gather stays NaN); ``mpi_scripts/sharded.py`` runs the same on two real ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import optree
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_distributed import FakeComm

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim.fusion import QuantizedSlice
from netcl_optim.stateful import AdamW, Lion8bit, Parameter

pytest.importorskip("mpi4py.MPI")

# big leaves (8-bit state with min_8bit_size=1000), small ones (float32 state), an empty one
SHAPES = {"a": (40, 100), "b": (300,), "c": (5000,), "d": (7,), "e": (0,), "f": (1100,)}
MIN = 1000


def draw(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def sizes() -> list[int]:
    return [int(np.prod(s)) for s in SHAPES.values()]


def flat(tree: Any) -> np.ndarray:
    host = no.to_host(tree)
    return np.concatenate([host[k].ravel() for k in SHAPES])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=8),
    st.integers(1, 5),
)
def test_shard_bounds_cut_at_the_blocks_of_the_leaves(leaves, size):
    total = sum(leaves)
    bounds = dist.shard_bounds(total, size, leaves)
    starts = np.concatenate([[0], np.cumsum(leaves)[:-1]])
    cuts = {total} | {int(s) + 256 * k for s, n in zip(starts, leaves, strict=True)
                      for k in range(-(-n // 256))}  # fmt: skip
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    even = dist.shard_bounds(total, size)
    for (lo, hi), (elo, _) in zip(bounds, even, strict=True):
        assert lo <= hi and lo in cuts
        assert not any(abs(c - elo) < abs(lo - elo) for c in cuts)  # the nearest cut
    with pytest.raises(ValueError, match="sum to"):
        dist.shard_bounds(total + 1, size, leaves)


TRANSFORMS = {
    "adamw": lambda: no.adamw(1e-2, weight_decay=0.1, state_bits=8),
    "lion": lambda: no.lion(1e-3, state_bits=8),
    "sgd_momentum": lambda: no.sgd(0.05, momentum=0.9, state_bits=8),
    "rmsprop": lambda: no.rmsprop(1e-2, state_bits=8),
}


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_sharded_8bit_step_equals_the_unsharded_step_on_its_slice(name, rank, tmp_path):
    tx = no.low_precision_state(TRANSFORMS[name](), state_bits=8, min_8bit_size=MIN)
    params = no.pack(no.to_device(draw(0)))
    ref_p, ref_s = params, tx.init(params)
    stx = dist.shard_optimizer(tx, FakeComm(rank=rank))
    p, s = params, stx.init(params)
    u_p, u_s = params, no.chain(stx).init(params)  # the update path: gathers the updates
    lo, hi = dist.shard_bounds(sum(sizes()), 2, sizes())[rank]
    assert 0 < hi - lo < sum(sizes())
    for step in range(6):
        g = no.pack(no.to_device(draw(10 + step)))
        ref_p, ref_s = no.step(tx, ref_p, g, ref_s)
        p, s = dist.sharded_step(stx, p, g, s)
        u_p, u_s = no.step(no.chain(stx), u_p, g, u_s)
        want, got, upd = flat(ref_p), flat(p), flat(u_p)
        assert got[lo:hi].tobytes() == want[lo:hi].tobytes(), step
        assert upd[lo:hi].tobytes() == want[lo:hi].tobytes(), step
        assert np.isnan(np.delete(got, np.arange(lo, hi))).all()
    kinds = optree.tree_leaves(s, is_leaf=lambda x: isinstance(x, QuantizedSlice))
    assert any(isinstance(y, QuantizedSlice) for y in kinds)
    assert 0 < dist.state_nbytes(s) < dist.state_nbytes(ref_s)
    # a checkpoint of the slice's state resumes bit for bit
    no.save(tmp_path / "shard.npz", s)
    s2, p2 = no.load(tmp_path / "shard.npz"), p
    for step in range(2):
        g = no.pack(no.to_device(draw(20 + step)))
        p, s = dist.sharded_step(stx, p, g, s)
        p2, s2 = dist.sharded_step(stx, p2, g, s2)
        assert flat(p)[lo:hi].tobytes() == flat(p2)[lo:hi].tobytes()


def zero_pair(rank: int, cls: type = AdamW, **kwargs: Any) -> tuple[Any, list, Any, list]:
    kwargs = {"lr": 1e-2, "state_bits": 8, "min_8bit_size": MIN, **kwargs}
    if cls is Lion8bit:
        kwargs.pop("state_bits")

    def groups(ps: list) -> list:
        return [{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}]

    host = draw(1)
    ref_ps = [Parameter(no.to_device(host[k])) for k in SHAPES]
    zero_ps = [Parameter(no.to_device(host[k])) for k in SHAPES]
    ref = cls(groups(ref_ps), **kwargs)
    zero = dist.ZeroRedundancyOptimizer(cls, groups(zero_ps), comm=FakeComm(rank=rank), **kwargs)
    return ref, ref_ps, zero, zero_ps


def kinds_of(zero: Any) -> set[str]:
    """The types of the leaves of the live state (``zero.state``)."""
    leaves = optree.tree_leaves(list(zero.state.values()),
                                is_leaf=lambda x: isinstance(x, QuantizedSlice))  # fmt: skip
    return {type(v).__name__ for v in leaves}


def step_both(ref: Any, ref_ps: list, zero: Any, zero_ps: list, seed: int, rank: int) -> None:
    g = draw(seed, 0.1)
    for p, q, k in zip(ref_ps, zero_ps, SHAPES, strict=True):
        p.grad, q.grad = no.to_device(g[k]), no.to_device(g[k])
    ref.step()
    zero.step()
    lo, hi = dist.shard_bounds(sum(sizes()), 2, sizes())[rank]
    want = np.concatenate([p.data.get().ravel() for p in ref_ps])
    got = np.concatenate([p.data.get().ravel() for p in zero_ps])
    assert got[lo:hi].tobytes() == want[lo:hi].tobytes(), seed
    for p, q in zip(ref_ps, zero_ps, strict=True):  # the peer's part, as a real gather would
        q.data.set(p.data.get())


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("cls", [AdamW, Lion8bit], ids=["AdamW", "Lion8bit"])
def test_zero_redundancy_optimizer_8bit_steps_and_resumes_bit_for_bit(cls, rank):
    ref, ref_ps, zero, zero_ps = zero_pair(rank, cls)
    for seed in range(3):
        step_both(ref, ref_ps, zero, zero_ps, 20 + seed, rank)
    assert 0 < zero.state_nbytes() < dist.state_nbytes(ref)
    assert "QuantizedSlice" in kinds_of(zero)
    sd = zero.state_dict()
    # a fresh ZeRO optimizer resumes from it: the same bits as the one that went on
    ref2, ref2_ps, zero2, zero2_ps = zero_pair(rank, cls)
    for p, q, r, z in zip(ref_ps, zero_ps, ref2_ps, zero2_ps, strict=True):
        r.data.set(p.data.get())
        z.data.set(q.data.get())
    ref2.load_state_dict(ref.state_dict())
    zero2.load_state_dict(sd)
    for seed in range(3):
        step_both(ref, ref_ps, zero, zero_ps, 30 + seed, rank)
        step_both(ref2, ref2_ps, zero2, zero2_ps, 30 + seed, rank)
        for q, z in zip(zero_ps, zero2_ps, strict=True):
            assert q.data.get().tobytes() == z.data.get().tobytes()
    for a, b in zip(optree.tree_leaves(zero.state_dict()["state"]),
                    optree.tree_leaves(zero2.state_dict()["state"]), strict=True):  # fmt: skip
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_zero_8bit_state_dict_errors_change_nothing():
    ref, ref_ps, zero, zero_ps = zero_pair(0)
    step_both(ref, ref_ps, zero, zero_ps, 40, 0)
    sd = zero.state_dict()
    before = zero.state_dict()
    entry = sd["state"][0]
    assert {"exp_avg", "exp_avg_absmax", "exp_avg_qmap", "exp_avg_float32"} <= set(entry)
    cases = {
        "exp_avg_float32": lambda e: e.pop("exp_avg_float32"),
        "exp_avg_absmax": lambda e: e.update(exp_avg_absmax=e["exp_avg_absmax"][:-1]),
    }
    cases["shape"] = lambda e: e.update(exp_avg_float32=np.zeros(3, np.float32))
    for what, spoil in cases.items():
        bad = {"state": {k: dict(v) for k, v in sd["state"].items()},
               "param_groups": sd["param_groups"], "zero": sd["zero"]}  # fmt: skip
        spoil(bad["state"][0])
        with pytest.raises(ValueError, match="exp_avg"):
            zero.load_state_dict(bad)
        after = zero.state_dict()
        for a, b in zip(optree.tree_leaves(before["state"]), optree.tree_leaves(after["state"]),
                        strict=True):  # fmt: skip
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), what


def test_zero_group_storage_change_keeps_the_values():
    """A ZeRO group switched from 8-bit to float32 state (and back) converts its slice's
    state in place of the step: dequantized values, then quantized again."""
    ref, ref_ps, zero, zero_ps = zero_pair(0)
    step_both(ref, ref_ps, zero, zero_ps, 50, 0)
    for bits in (32, 8):
        for g in (*ref.param_groups, *zero.param_groups):
            g["state_bits"] = bits
        step_both(ref, ref_ps, zero, zero_ps, 51 + bits, 0)  # (the same converted values)
        assert ("QuantizedSlice" in kinds_of(zero)) == (bits == 8)
