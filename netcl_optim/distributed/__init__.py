"""Data-parallel training over MPI: gradient all-reduce, parameter broadcast, and ZeRO
stage 1 (optimizer state sharded across ranks).

Import it explicitly (``import netcl_optim.distributed as dist``); mpi4py is imported only
when a function here is called (``pip install netcl_optim[mpi]``).

Every function here is a collective: every rank must call it, in the same order. When one
rank fails, the others must not be left waiting for it:

* Inside a call here, before the data moves (bad input, trees or calls that differ across
  ranks, a failed copy or allocation): every rank raises, and nothing is changed. The
  failing ranks raise their own error, the others a ValueError naming the failing ranks and
  quoting their errors. This costs nothing extra: the errors travel with the 16-byte tree
  check every call makes anyway.
* Inside a call here, after the data started moving (the point of no return, e.g. a device
  failure while copying the result back): the ranks can no longer agree, so the failing
  rank prints its traceback and which call failed, and aborts the whole job
  (``comm.Abort``).
* Outside the library (the caller's own code, including a ZeRO ``step`` closure): the
  library cannot know, and the other ranks wait in their next collective forever. Run
  scripts under ``mpiexec -n N python -m mpi4py script.py`` (or ``-m mpi4py -m module``):
  an uncaught exception on any rank then aborts the job.
"""

from __future__ import annotations

from ._allreduce import allreduce as allreduce
from ._allreduce import allreduce_gradients as allreduce_gradients
from ._allreduce import allreduce_grads_ as allreduce_grads_
from ._allreduce import broadcast_parameters as broadcast_parameters
from ._flat_shards import shard_bounds as shard_bounds
from ._shard import ShardState as ShardState
from ._shard import check_shardable as check_shardable
from ._shard import shard_optimizer as shard_optimizer
from ._shard import sharded_step as sharded_step
from ._zero_optimizer import ZeroRedundancyOptimizer as ZeroRedundancyOptimizer
from ._zero_optimizer import state_nbytes as state_nbytes

__all__ = [
    "ShardState",
    "ZeroRedundancyOptimizer",
    "allreduce",
    "allreduce_gradients",
    "allreduce_grads_",
    "broadcast_parameters",
    "check_shardable",
    "shard_bounds",
    "shard_optimizer",
    "sharded_step",
    "state_nbytes",
]
