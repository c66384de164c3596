"""Data-parallel training over MPI: gradient all-reduce, parameter broadcast, and ZeRO
stage 1 (optimizer state sharded across ranks).

Import it explicitly (``import netcl_optim.distributed as dist``); mpi4py is imported only
when a function here is called (``pip install netcl_optim[mpi]``).
"""

from __future__ import annotations

from ._allreduce import allreduce as allreduce
from ._allreduce import allreduce_gradients as allreduce_gradients
from ._allreduce import allreduce_grads_ as allreduce_grads_
from ._allreduce import broadcast_parameters as broadcast_parameters
from ._zero import ShardState as ShardState
from ._zero import ZeroRedundancyOptimizer as ZeroRedundancyOptimizer
from ._zero import check_shardable as check_shardable
from ._zero import shard_bounds as shard_bounds
from ._zero import shard_optimizer as shard_optimizer
from ._zero import sharded_step as sharded_step
from ._zero import state_nbytes as state_nbytes

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
