"""Kernel fusion: fragments -> generated kernels -> launches over (packed) trees.

Modules, one job each: ``_codegen`` (fragments -> kernel source), ``_programs`` (build and
cache programs), ``_checks`` (leaves and trees usable before anything runs), ``_launch``
(launches, the side queue, counting), ``_reductions`` (whole-tree norms and flags),
``_segments`` (sums per leaf, row or unit: tables and kernels), ``_per_segment`` (running
them for a part, with its per-leaf state), ``_slices`` (per-leaf values of a step on a
slice: ZeRO), ``_factored`` (Adafactor's factored second moment), ``_sm3`` (SM3's
maxima), ``_random`` (the counter-based generator), ``_cache`` (the in-place step's
launches, by array identity), ``_fused`` (one segment of fused parts: bind and launch),
``_execute`` (the executor: the only code that walks plans) and ``_kernels`` (amp's and
clipping's own kernels).
The rest of the package uses the names below.
"""

from ._checks import flatten_like as flatten_like
from ._checks import group_by_dtype as group_by_dtype
from ._checks import path_names as path_names
from ._checks import queue_of_leaves as queue_of_leaves
from ._checks import slot_storages as slot_storages
from ._execute import execute as execute
from ._execute import walk as walk
from ._factored import FactoredRule as FactoredRule
from ._factored import check_updates as check_updates
from ._factored import factored_step as factored_step
from ._factored import init_packed as init_packed
from ._factored import plan_of as plan_of
from ._factored import state_shapes as state_shapes
from ._fused import element_origin as element_origin
from ._fused import init_slots as init_slots
from ._fused import run_parts as run_parts
from ._kernels import clip_scale as clip_scale
from ._kernels import scale_into as scale_into
from ._kernels import unscale as unscale
from ._launch import count_launches as count_launches
from ._per_segment import init_leaf_values as init_leaf_values
from ._per_segment import leaf_values as leaf_values
from ._programs import clear_kernel_caches as clear_kernel_caches
from ._qmaps import dynamic_map as dynamic_map
from ._quantized import BLOCK_8BIT as BLOCK_8BIT
from ._quantized import QuantizedSlice as QuantizedSlice
from ._quantized import QuantizedState as QuantizedState
from ._quantized import copy_params as copy_params
from ._quantized import dequantize as dequantize
from ._quantized import host_value as host_value
from ._quantized import init_quantized as init_quantized
from ._quantized import is_eight_bit as is_eight_bit
from ._quantized import is_quantized as is_quantized
from ._quantized import quantize as quantize
from ._quantized import set_value as set_value
from ._quantized import slice_pieces as slice_pieces
from ._quantized import state_size as state_size
from ._quantized import stored_8bit as stored_8bit
from ._reductions import acc_ctype as acc_ctype
from ._reductions import reduce_leaves as reduce_leaves
from ._slices import Slice as Slice
from ._slices import slice_for as slice_for
from ._slices import sliced as sliced
from ._slices import slices_active as slices_active
from ._slices import whole_updates as whole_updates
from ._slices import whole_view as whole_view
from ._storage import EightBit as EightBit
from ._storage import current_rule as current_rule
from ._storage import slot_dtype_of as slot_dtype_of
from ._storage import slot_rule as slot_rule
from ._storage import slot_storage as slot_storage
from ._storage import storage_dtype as storage_dtype
from ._tree_sums import TREE_SUMS_BLOCK as TREE_SUMS_BLOCK
from ._tree_sums import combine_partials as combine_partials
