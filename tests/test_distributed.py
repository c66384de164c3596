"""netcl_optim.distributed: in-process unit tests (a fake two-rank communicator whose peer
mirrors this rank, and ``MPI.COMM_SELF``), and real 2-rank runs of ``tests/mpi_scripts/``
under ``mpiexec -n 2 python -m mpi4py`` (each with a timeout, so that a hang fails instead
of blocking CI); the failure tests run some without ``-m mpi4py``, to check that the
library alone ends every rank."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from optimizer_table import OPTIMIZERS, STATEFUL, Optimizer, ids

import netcl_optim as no
import netcl_optim.distributed as dist
from netcl_optim._base import StagePlan
from netcl_optim._packing import contiguous_run
from netcl_optim.stateful import SGD, Adam, Parameter

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
INSTALL = r"pip install netcl_optim\[mpi\]"


@pytest.fixture(scope="module")
def MPI() -> Any:
    return pytest.importorskip("mpi4py.MPI")


def bits(tree: Any) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in no.to_host(tree).values()]


# ---------------------------------------------------------------------------- fake comm


class FakeComm:
    """Rank ``rank`` of ``size`` whose peers pass exactly what this rank passes (identical
    replicas): a sum is ``size`` times the input, a gather repeats this rank's digest. Peers'
    parts of an Allgatherv are left NaN (to check this rank's slice only). ``peer`` maps this
    rank's ``(call, signature, error)`` to the peer's (a mismatch). ``Abort`` is recorded
    and returns."""

    def __init__(self, size: int = 2, rank: int = 0, peer: Any = None) -> None:
        self.size, self.rank, self.peer = size, rank, peer
        self.calls: list[str] = []

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Allgather(self, send: np.ndarray, recv: np.ndarray) -> None:
        self.calls.append("Allgather")
        recv[...] = send
        if self.peer is not None:
            recv[1 - self.rank] = send ^ 1

    def allgather(self, obj: Any) -> list[Any]:
        self.calls.append("allgather")
        out = [obj] * self.size
        if self.peer is not None:
            out[1 - self.rank] = self.peer(obj)
        return out

    def Allreduce(self, send: Any, recv: np.ndarray) -> None:
        from mpi4py import MPI

        assert send is MPI.IN_PLACE
        self.calls.append("Allreduce")
        recv *= self.size

    def Allgatherv(self, send: Any, spec: list) -> None:
        self.calls.append("Allgatherv")
        buf, counts, displs, _ = spec
        host = buf.view(np.dtype(f"f{buf.dtype.itemsize}"))
        for r in range(self.size):
            if r != self.rank:
                host[displs[r] : displs[r] + counts[r]] = np.nan

    def Bcast(self, buf: np.ndarray, root: int = 0) -> None:
        self.calls.append("Bcast")

    def Abort(self, errorcode: int = 0) -> None:
        self.calls.append("Abort")


def tree_host(seed: int = 0, half: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32),
        "e": np.zeros(0, np.float32),
        "z": rng.standard_normal(7).astype(np.float32),
    }
    if half:
        t["h"] = rng.standard_normal(6).astype(np.float16)
    return t


# ---------------------------------------------------------------------------- mpi4py absent


@pytest.mark.parametrize(
    "call",
    [
        lambda: dist.allreduce_gradients(),
        lambda: dist.allreduce({}),
        lambda: dist.allreduce_grads_([]),
        lambda: dist.broadcast_parameters({}),
        lambda: dist.shard_optimizer(no.sgd(0.1)),
        lambda: dist.ZeroRedundancyOptimizer(SGD, [], lr=0.1),
    ],
    ids=["allreduce_gradients", "allreduce", "allreduce_grads_", "broadcast", "shard", "zero"],
)
def test_without_mpi4py_the_error_says_how_to_install(monkeypatch, call):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    with pytest.raises(ImportError, match=INSTALL):
        call()


def test_importing_the_package_never_needs_mpi4py():
    code = (
        "import sys; sys.modules['mpi4py'] = None\n"
        "import netcl_optim, netcl_optim.distributed, netcl_optim.examples.digits_dp\n"
        "assert 'mpi4py.MPI' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ---------------------------------------------------------------------------- unit tests


@pytest.mark.parametrize("size", [1, 2, 3, 7])
@pytest.mark.parametrize("total", [0, 1, 5, 100, 101])
def test_shard_bounds_cover_contiguously_and_balance(total, size):
    bounds = dist.shard_bounds(total, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    counts = [hi - lo for lo, hi in bounds]
    assert max(counts) - min(counts) <= 1


def test_allreduce_mean_sum_fresh_packed_and_pure(MPI):
    host = tree_host()
    grads = no.to_device(host)  # not packed: one copy per leaf
    comm = FakeComm()
    mean = dist.allreduce(grads, comm)
    total = dist.allreduce(grads, comm, average=False)
    assert comm.calls == ["Allgather", "Allreduce", "Allreduce"] * 2
    for k, v in host.items():
        assert np.array_equal(no.to_host(mean)[k], v)
        assert np.array_equal(no.to_host(total)[k], (v.astype(np.float32) * 2).astype(v.dtype))
        assert np.array_equal(grads[k].get(), v)  # inputs untouched
    f32 = [mean[k] for k in ("b", "e", "w", "z")]  # dict order: sorted keys
    assert contiguous_run(f32) is not None  # fresh packed buffer
    assert all(mean[k].base_data is not grads[k].base_data for k in host)


def test_allreduce_with_one_rank_returns_the_tree(MPI):
    grads = no.to_device(tree_host())
    assert dist.allreduce(grads, MPI.COMM_SELF) is grads


def test_allreduce_gradients_in_a_chain_is_the_plain_optimizer(MPI):
    params = no.pack(no.to_device(tree_host(1, half=False)))
    grads = no.pack(no.to_device(tree_host(2, half=False)))
    tx, ref = no.chain(dist.allreduce_gradients(FakeComm()), no.adam(1e-2)), no.adam(1e-2)
    p1, _ = no.step(tx, params, grads, tx.init(params))
    p2, _ = no.step(ref, params, grads, ref.init(params))
    assert bits(p1) == bits(p2)


def test_a_stage_that_does_not_run_on_slices_is_refused(MPI):
    """A transform with kernels of its own (a StagePlan) that does not declare ``shards``
    cannot know the whole leaves of its slice: refused before anything is allocated."""
    inner = no.identity()
    plan = StagePlan("my_stage", lambda u, s, p=None, *, inplace, **kw: (u, s))
    tx = no.GradientTransformation(inner.init, inner.update, plan)
    with pytest.raises(ValueError, match="my_stage needs values per leaf"):
        dist.shard_optimizer(no.chain(tx, no.sgd(0.1)), MPI.COMM_SELF)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-leaf"])
def test_allreduce_grads_in_place(MPI, packed):
    host = tree_host(3)
    params = [Parameter(no.to_device(np.zeros_like(v))) for v in host.values()]
    grads = no.to_device(list(host.values()))
    if packed:
        grads = no.pack(grads)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    params[1].grad = None
    comm = FakeComm()
    dist.allreduce_grads_(params, comm, average=False)
    assert comm.calls == ["Allgather", "Allreduce", "Allreduce"]  # float32, float16
    for p, g, v in zip(params, grads, host.values(), strict=True):
        if p.grad is not None:
            assert p.grad is g  # in place
            assert np.array_equal(g.get(), (v.astype(np.float32) * 2).astype(v.dtype))


def test_broadcast_parameters(MPI):
    host = tree_host(4)
    out = dist.broadcast_parameters(no.to_device(host), FakeComm(rank=0))
    assert bits(out) == [v.tobytes() for v in host.values()]
    ps = [Parameter(no.to_device(v)) for v in host.values()]
    assert dist.broadcast_parameters(ps, FakeComm(rank=1)) is ps
    with pytest.raises(ValueError, match="Invalid root: 2"):
        dist.broadcast_parameters(ps, FakeComm(), root=2)


def test_a_peer_with_another_shape_gets_a_clear_error(MPI):
    def peer(obj: Any) -> Any:
        what, (text, leaves), note = obj
        return what, (text, (((4, 4), "float32"), *leaves[1:])), note

    grads = no.to_device({"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"rank 1: root\['b'\] is float32\[4, 4\] against"):
        dist.allreduce(grads, FakeComm(peer=peer))


@pytest.mark.parametrize(
    "call, other",
    [
        (lambda t, c: dist.allreduce(t, c), "broadcast_parameters(root=0)"),
        (lambda t, c: dist.broadcast_parameters(t, c), "broadcast_parameters(root=1)"),
    ],
    ids=["another-collective", "another-root"],
)
def test_a_peer_in_another_call_gets_a_clear_error(MPI, call, other):
    """Ranks that call different collectives (or broadcast from different roots) would
    otherwise hang or mix up their data."""
    grads = no.to_device({"w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=rf"rank 1: called {re.escape(other)} while rank 0"):
        call(grads, FakeComm(peer=lambda obj: (other, *obj[1:])))


def test_a_failure_after_the_data_moved_aborts(MPI, monkeypatch, capsys):
    """Past the point of no return (the Allreduce is done), an error cannot be agreed on:
    the job is aborted with a message naming the rank, the call and the error."""
    import netcl_optim.distributed._allreduce as allreduce_module

    def broken(*args: Any) -> None:
        raise RuntimeError("simulated: device write failed")

    monkeypatch.setattr(allreduce_module, "upload", broken)
    ps = [Parameter(no.to_device(np.ones(3, np.float32)))]
    ps[0].grad = no.to_device(np.ones(3, np.float32))
    comm = FakeComm(rank=1)
    with pytest.raises(RuntimeError, match="simulated"):
        dist.allreduce_grads_(ps, comm)
    assert comm.calls == ["Allgather", "Allreduce", "Abort"]
    err = capsys.readouterr().err
    assert (
        "netcl_optim.distributed: rank 1 of 2 failed in allreduce_grads_ after the data "
        "started moving (RuntimeError: simulated: device write failed)"
    ) in err


def test_failures_before_the_agreement_change_nothing(MPI):
    """The inner optimizer is built, and the parameters packed, before the ranks agree:
    a failure leaves every parameter's ``.data`` as it was."""
    ps = [Parameter(no.to_device(np.ones(3, np.float32))) for _ in range(2)]
    before = [p.data for p in ps]
    with pytest.raises(ValueError, match=r"^Invalid lr: -1\.0 \(must be a finite number"):
        dist.ZeroRedundancyOptimizer(Adam, ps, comm=FakeComm(), lr=-1.0)
    assert all(p.data is d for p, d in zip(ps, before, strict=True))
    zero = dist.ZeroRedundancyOptimizer(Adam, ps, comm=FakeComm(), lr=1e-3)
    for p in ps:
        p.grad = no.to_device(np.ones(3, np.float32))
    zero.param_groups[0]["lr"] = -1.0
    comm = zero.comm
    with pytest.raises(ValueError, match=r"^Invalid lr: -1\.0 \(must be a finite number"):
        zero.step()
    assert comm.calls == ["Allgather", "Allgather"]  # constructor, step: no Allgatherv
    assert all((p.data.get() == 1).all() for p in ps)


def test_argument_errors(MPI):
    with pytest.raises(TypeError, match="Invalid average"):
        dist.allreduce_gradients(MPI.COMM_SELF, average=1)
    with pytest.raises(TypeError, match="mpi4py communicator"):
        dist.allreduce_gradients(comm=object())
    with pytest.raises(TypeError, match="not a pyopencl array"):
        dist.allreduce({"a": np.ones(2, np.float32)}, FakeComm())
    with pytest.raises(TypeError, match="must come from shard_optimizer"):
        dist.sharded_step(no.sgd(0.1), {}, {}, None)
    with pytest.raises(TypeError, match="GradientTransformation"):
        dist.shard_optimizer("adam", MPI.COMM_SELF)


# ---------------------------------------------------------------------------- sharding


# rules with a value per leaf (LAMB, LARS, Adafactor, ...): both ZeRO forms compute it over
# the whole leaves (fusion/_slices.py); the fake comm below leaves peers' slices NaN, so its
# tests take the element-wise rules only
# optax's muon is a partition (opaque): ZeRO refuses it (shard Muon's matrices instead)
PARTITIONED = {"muon"}
SHARDED = [row for row in OPTIMIZERS if row.id not in PARTITIONED]
ELEMENTWISE = [row for row in OPTIMIZERS if not row.segmented]
SHARDED_STATEFUL = list(STATEFUL)
# a rank alone (the fake comm) cannot step a rule whose step size sums over the whole tree:
# its sums need every rank's part (mpi_scripts/sharded.py runs them on 2 real ranks)
ALONE_STATEFUL = [row for row in STATEFUL if not row.reduction]

SHARDABLE = {
    **{row.id: row.make for row in SHARDED},
    "inject_hyperparams": lambda no: no.inject_hyperparams(no.adam)(
        learning_rate=lambda t: 1e-3 / (1 + t)
    ),
}


@pytest.mark.parametrize("name", list(SHARDABLE))
def test_element_wise_optimizers_are_shardable(name):
    dist.check_shardable(SHARDABLE[name](no))


def _keep(updates: Any, state: Any, params: Any = None) -> Any:
    return updates, state


@pytest.mark.parametrize(
    "tx, exc, match",
    [
        (no.chain(no.clip_by_global_norm(1.0), no.sgd(0.1)), ValueError, "clip_by_global_norm"),
        (no.adamw(1e-3, mask={"w": True}), TypeError, "opaque transform"),
        (
            no.chain(no.GradientTransformation(no.identity().init, _keep), no.sgd(0.1)),
            TypeError,
            "opaque transform",
        ),
    ],
    ids=["global-norm", "mask", "opaque"],
)
def test_transforms_that_see_the_whole_tree_are_rejected(MPI, tx, exc, match):
    with pytest.raises(exc, match=match):
        dist.shard_optimizer(tx, MPI.COMM_SELF)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "per-leaf"])
@pytest.mark.parametrize("row", SHARDED, ids=ids(SHARDED))
def test_sharded_equals_unsharded_on_one_rank(MPI, row: Optimizer, packed):
    params = no.to_device(tree_host(5))
    if packed:
        params = no.pack(params)
    tx = row.make(no)
    stx = dist.shard_optimizer(tx, MPI.COMM_SELF)
    p_ref = p_step = p_upd = params
    s_ref, s_step, s_upd = tx.init(params), stx.init(params), stx.init(params)
    for seed in range(3):
        g = no.to_device(tree_host(10 + seed))
        p_ref, s_ref = no.step(tx, p_ref, g, s_ref)
        p_step, s_step = dist.sharded_step(stx, p_step, g, s_step)
        p_upd, s_upd = no.step(stx, p_upd, g, s_upd)
    assert bits(p_step) == bits(p_ref)
    upd, ref = no.to_host(p_upd), no.to_host(p_ref)
    for k in ["b", "e", "w", "z"]:  # float32 (float16 updates are rounded before the apply)
        assert upd[k].tobytes() == ref[k].tobytes()
    assert dist.state_nbytes(s_step) == dist.state_nbytes(s_ref)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("row", ELEMENTWISE, ids=ids(ELEMENTWISE))
def test_each_rank_updates_its_own_slice(MPI, row: Optimizer, rank):
    """With the fake comm, the peer's part of the gathered tree stays NaN: this rank's part
    equals the unsharded optimizer's, and the state covers only its slice."""
    host = tree_host(6, half=False)
    params = no.pack(no.to_device(host))
    grads = no.pack(no.to_device(tree_host(7, half=False)))
    tx = row.make(no)
    stx = dist.shard_optimizer(tx, FakeComm(rank=rank))
    ref, _ = no.step(tx, params, grads, tx.init(params))
    state = stx.init(params)
    out, state = dist.sharded_step(stx, params, grads, state)
    out, ref = no.to_host(out), no.to_host(ref)
    flat = np.concatenate([out[k].ravel() for k in sorted(out)])  # the packing order
    want = np.concatenate([ref[k].ravel() for k in sorted(ref)])
    lo, hi = dist.shard_bounds(flat.size, 2, [out[k].size for k in sorted(out)])[rank]
    assert flat[lo:hi].tobytes() == want[lo:hi].tobytes()
    assert np.isnan(np.delete(flat, np.arange(lo, hi))).all()
    assert dist.state_nbytes(state) == row.slots * 4 * (hi - lo)  # the slots of the slice


@pytest.mark.parametrize("row", SHARDED_STATEFUL, ids=ids(SHARDED_STATEFUL))
def test_zero_redundancy_optimizer_equals_the_optimizer_on_one_rank(MPI, row: Optimizer):
    host = tree_host(8)
    keys = list(host)
    ref_ps = [Parameter(no.to_device(host[k])) for k in keys]
    zero_ps = [Parameter(no.to_device(host[k])) for k in keys]

    def groups(ps: list) -> list:
        return [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:]}]

    ref = row.make_stateful(no, groups(ref_ps))
    cls = getattr(no, row.stateful)
    zero = dist.ZeroRedundancyOptimizer(
        cls, groups(zero_ps), comm=MPI.COMM_SELF, **row.class_kwargs()
    )
    lr = row.torch_kwargs()["lr"]
    assert zero.param_groups[0]["lr"] == 1e-2 and zero.param_groups[1]["lr"] == lr
    for step in range(4):
        g = tree_host(20 + step)
        if step % 2:
            zero.zero_grad(set_to_none=False)  # packed grads: sliced without a copy
            for p, k in zip(zero_ps, keys, strict=True):
                if p.grad.size:
                    p.grad.set(g[k])
        else:
            for p, k in zip(zero_ps, keys, strict=True):
                p.grad = no.to_device(g[k])
        for p, k in zip(ref_ps, keys, strict=True):
            p.grad = no.to_device(g[k])
        if step == 2:
            zero.lr = ref.lr = 1e-3
        ref.step()
        zero.step()
        for p, q in zip(ref_ps, zero_ps, strict=True):
            assert p.data.get().tobytes() == q.data.get().tobytes()
        zero.zero_grad()
    if row.segmented:  # a slice's state of whole leaves keeps Adafactor's (1,) placeholders
        assert 0 <= zero.state_nbytes() - dist.state_nbytes(ref) <= 3 * 8 * len(keys)
    else:
        assert zero.state_nbytes() == dist.state_nbytes(ref)
    assert (dist.state_nbytes(ref) > 0) == (row.slots > 0)
    sd = zero.state_dict()
    assert sd["zero"] == {"rank": 0, "world_size": 1}
    zero.load_state_dict(sd)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("row", ALONE_STATEFUL, ids=ids(ALONE_STATEFUL))
def test_zero_redundancy_optimizer_each_rank_updates_its_own_slice(MPI, row: Optimizer, rank):
    """Two groups, two ranks (the fake comm): after each step this rank's slice of the flat
    parameters equals the unsharded optimizer's bit for bit (element-indexed noise too: a
    slice numbers its elements from its start within its group), the peer's stays NaN."""
    host = tree_host(9, half=False)
    keys = list(host)
    ref_ps = [Parameter(no.to_device(host[k])) for k in keys]
    zero_ps = [Parameter(no.to_device(host[k])) for k in keys]

    def groups(ps: list) -> list:
        return [{"params": ps[:2]}, {"params": ps[2:]}]

    ref = row.make_stateful(no, groups(ref_ps))
    cls = getattr(no, row.stateful)
    comm = FakeComm(rank=rank)
    zero = dist.ZeroRedundancyOptimizer(cls, groups(zero_ps), comm=comm, **row.class_kwargs())
    total = sum(v.size for v in host.values())
    lo, hi = dist.shard_bounds(total, 2, [host[k].size for k in keys])[rank]
    for step in range(3):
        g = tree_host(30 + step, half=False)
        for p, q, k in zip(ref_ps, zero_ps, keys, strict=True):
            p.grad, q.grad = no.to_device(g[k]), no.to_device(g[k])
        ref.step()
        zero.step()
        want = np.concatenate([p.data.get().ravel() for p in ref_ps])
        got = np.concatenate([p.data.get().ravel() for p in zero_ps])
        assert got[lo:hi].tobytes() == want[lo:hi].tobytes(), step
        assert np.isnan(np.delete(got, np.arange(lo, hi))).all()
        for p in zero_ps:  # the peer's slice back to the reference's, as a real gather would
            p.data.set(ref_ps[zero_ps.index(p)].data.get())


def test_zero_redundancy_optimizer_errors(MPI):
    ps = [Parameter(no.to_device(np.ones(3, np.float32))) for _ in range(2)]
    zero = dist.ZeroRedundancyOptimizer(Adam, ps, comm=MPI.COMM_SELF, lr=1e-3)
    ps[0].grad = no.to_device(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"steps whole param groups.*parameters \[1\]"):
        zero.step()
    ps[1].grad = no.to_device(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"parameter 1: \.grad is float32\[4\]"):
        zero.step()
    assert all((p.data.get() == 1).all() for p in ps)  # nothing changed
    ps[1].data = no.to_device(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="rebound"):
        zero.step()
    with pytest.raises(ValueError, match="empty parameter list"):
        dist.ZeroRedundancyOptimizer(Adam, [], comm=MPI.COMM_SELF)
    with pytest.raises(ValueError, match="from"):
        zero.load_state_dict({"state": {}, "param_groups": [], "zero": {"rank": 1}})


# ---------------------------------------------------------------------------- 2 ranks


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # mpich's wheel installs it there
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


def _launch(args: list[str], n: int = 2, timeout: float = 120) -> tuple[int, str]:
    """``mpiexec -n n python *args``: the exit status and the output. A run that takes
    longer than ``timeout`` fails the test; its whole process group (mpiexec and the ranks)
    is killed, so that no rank is left spinning in a collective."""
    pytest.importorskip("mpi4py")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec")
    env = dict(os.environ, POCL_MAX_PTHREAD_COUNT="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [mpiexec, "-n", str(n), sys.executable, *args]
    with subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # mpiexec forwards it to the ranks
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} hung for {timeout} s:\n{out}")
    return proc.returncode, out


def _run_mpi(args: list[str], n: int = 2, timeout: float = 120) -> str:
    """Run ``args`` under ``python -m mpi4py`` (an uncaught exception on any rank aborts the
    job) and require success; returns the output."""
    status, out = _launch(["-m", "mpi4py", *args], n, timeout)
    assert status == 0, f"exit status {status}:\n{out}"
    return out


@pytest.mark.parametrize("script", ["replicas", "data_parallel", "sharded", "mismatch"])
def test_two_ranks(script):
    """replicas: bit-identical over 20 steps; data_parallel: half batches on 2 ranks equal
    the full batch on one; sharded: ZeRO-1 bitwise equal to unsharded (functional and
    stateful); mismatch: every kind of mismatch fails on every rank, and no rank hangs."""
    out = _run_mpi([str(SCRIPTS / f"{script}.py")])
    assert "OK: 0 failure(s) over 2 ranks" in out, out


def test_a_failure_on_one_rank_inside_a_collective_raises_on_every_rank():
    """An invalid lr in a ZeRO step, device memory exhausted in an all-reduce, a failed read
    on the broadcast's root, each on one rank only: every rank raises (the others name the
    failing rank), nothing changes, and the ranks stay in step (no hang)."""
    out = _run_mpi([str(SCRIPTS / "failures.py"), "caught"], timeout=60)
    assert "OK: 0 failure(s) over 2 ranks" in out, out


def test_an_uncaught_failure_on_one_rank_ends_every_rank():
    """Plain ``python`` (no ``-m mpi4py``): the library alone must make every rank exit."""
    status, out = _launch([str(SCRIPTS / "failures.py"), "uncaught"], timeout=60)
    assert status != 0, out
    bad_lr = "ValueError: Invalid lr: -1.0 (must be a finite number >= 0) in param_groups[0]"
    assert f"\n{bad_lr}" in out, out  # rank 1's own error
    assert (
        "ValueError: ZeroRedundancyOptimizer.step: another rank failed, so every rank raises: "
        f"rank 1: failed: {bad_lr}"
    ) in out, out  # rank 0's


def test_a_failure_after_the_data_moved_aborts_the_job():
    """Rank 1 fails writing back the all-reduced grads (rank 0 is already in the next
    Allreduce) and the script catches it: the library aborts the whole job, saying why."""
    status, out = _launch([str(SCRIPTS / "failures.py"), "abort"], timeout=60)
    assert status != 0, out
    assert "the job was not aborted" not in out and "continuing" not in out, out
    assert (
        "netcl_optim.distributed: rank 1 of 2 failed in allreduce_grads_ after the data "
        "started moving (RuntimeError: simulated: device write failed)"
    ) in out, out


@pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="the digits example needs sklearn"
)
@pytest.mark.parametrize("extra", [[], ["--functional", "--zero"]], ids=["stateful", "zero"])
def test_digits_data_parallel_example(extra):
    args = ["-m", "netcl_optim.examples.digits_dp", "--epochs", "3", "--no-progress", *extra]
    out = _run_mpi(args)
    assert "replicas bit-identical: True" in out, out
    accuracy = float(out.split("test accuracy: ")[1].split("%")[0])
    assert accuracy > 90, out
