"""Muon under ZeRO stage 1: shards hold whole matrices (a matrix is never split across
ranks), the sharded steps equal the unsharded ones bit for bit. One rank (``COMM_SELF``) and
the fake comm of ``test_distributed.py`` here; ``mpi_scripts/sharded.py`` runs two real
ranks."""

from __future__ import annotations

import numpy as np
import pytest
from test_distributed import FakeComm

import netcl_optim as no
from netcl_optim.distributed._flat_shards import WHOLE_LEAVES, shard_block, shard_bounds

SHAPES = [(8, 12), (12, 8), (2, 4, 6), (16, 16), (5, 7)]


@pytest.fixture(scope="module")
def dist():
    pytest.importorskip("mpi4py.MPI")
    import netcl_optim.distributed as dist

    return dist


def _host(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _pair(kwargs: dict) -> tuple[list, list, no.Muon]:
    host = _host(0)
    ref_ps = [no.Parameter(no.to_device(h)) for h in host]
    zero_ps = [no.Parameter(no.to_device(h)) for h in host]
    return ref_ps, zero_ps, no.Muon(ref_ps, **kwargs)


def test_the_stateful_class_shards_by_whole_leaves():
    assert shard_block(no.Muon.functional(0.02, 0.1, 0.95, True, (3.4, -4.7, 2.0), 1e-7, 5,
                                          None, "reference", "out_in")) == WHOLE_LEAVES  # fmt: skip


def test_zero_on_one_rank_equals_muon(dist):
    from mpi4py import MPI

    kwargs = {"lr": 0.02, "variant": "reference"}
    ref_ps, zero_ps, ref = _pair(kwargs)
    zero = dist.ZeroRedundancyOptimizer(no.Muon, zero_ps, comm=MPI.COMM_SELF, **kwargs)
    for step in range(3):
        for p, q, g in zip(ref_ps, zero_ps, _host(10 + step), strict=True):
            p.grad, q.grad = no.to_device(g), no.to_device(g)
        ref.step()
        zero.step()
        for p, q in zip(ref_ps, zero_ps, strict=True):
            assert p.data.get().tobytes() == q.data.get().tobytes(), step
    assert zero.state_nbytes() == dist.state_nbytes(ref)
    sd = zero.state_dict()
    zero.load_state_dict(sd)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_steps_the_whole_matrices_of_its_shard(dist, rank):
    """The fake comm leaves the peer's part NaN: this rank's part equals the unsharded
    step's, and it is made of whole leaves."""
    kwargs = {"lr": 0.02, "variant": "reference"}
    ref_ps, zero_ps, ref = _pair(kwargs)
    zero = dist.ZeroRedundancyOptimizer(no.Muon, zero_ps, comm=FakeComm(rank=rank), **kwargs)
    sizes = [int(np.prod(s)) for s in SHAPES]
    lo, hi = shard_bounds(sum(sizes), 2, sizes, WHOLE_LEAVES)[rank]
    starts = set(np.cumsum([0, *sizes]).tolist())
    assert lo in starts and hi in starts and lo < hi
    for p, q, g in zip(ref_ps, zero_ps, _host(20), strict=True):
        p.grad, q.grad = no.to_device(g), no.to_device(g)
    ref.step()
    zero.step()
    want = np.concatenate([p.data.get().ravel() for p in ref_ps])
    got = np.concatenate([p.data.get().ravel() for p in zero_ps])
    assert got[lo:hi].tobytes() == want[lo:hi].tobytes()
    assert np.isnan(np.delete(got, np.arange(lo, hi))).all()


def test_a_non_matrix_parameter_is_refused_before_sharding(dist):
    from mpi4py import MPI

    ps = [no.Parameter(no.to_device(np.ones((3, 4), np.float32))),
          no.Parameter(no.to_device(np.ones(5, np.float32)))]  # fmt: skip
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\].*\(5,\)"):
        dist.ZeroRedundancyOptimizer(no.Muon, ps, comm=MPI.COMM_SELF)
    assert all((p.data.get() == 1).all() for p in ps)
