"""Time one optimizer step against the memory-bandwidth limit of the OpenCL device.

Run from anywhere (``netcl_optim`` must be importable)::

    python benchmarks/bench_step.py                 # full run: several minutes
    python benchmarks/bench_step.py --quick         # Adam and SGD-momentum at 1M and tree160
    python benchmarks/bench_step.py --optimizers adam,adamw --sizes 10M --json r.json --png r.png
    python benchmarks/bench_step.py --optimizers all --sizes tree160,10M --variants breadth
    python benchmarks/bench_step.py --optimizers adamw,adamw-bf16,adamw-8bit \
        --sizes 10M,50M,tree160 --variants "stateful,torch fused" --no-fixed-costs

The optimizers are the rows of ``tests/optimizer_table.py`` with a ``bench`` name (that name on
the command line), each at lr 1e-3 and its row's other hyperparameters.

For each (optimizer, size) group every variant is set up, warmed up (kernel builds, jit
compiles), then timed in interleaved round-robin blocks, each block ending with a sync. The table
gives the median and min ms per step over blocks, GB/s (the optimizer's minimum bytes per param
times n over the median time) and the percentage of the "limit": a plain OpenCL kernel that moves
exactly those bytes in place with trivial math, timed in the same blocks (for a step that takes
several passes over the params, as LAMB and LARS do, one such kernel per pass: ``PASSES``, bytes
summed; LAMB also gets a 36-B limit, ``EXTRA_LIMITS``). Calls per block are
chosen per variant from one probe step (a block takes ~50 ms; 20 ms with --quick). The max|dp|
column compares each variant's params after the (equal) warm-up steps with those of ``step``.

Variants: ``limit``; ``limit (out of place)`` (the same kernel writing to a second set of
buffers: the floor of a pure step, which cannot write in place); ``stateful``
(``netcl_optim.stateful``, in place); ``step`` (pure ``no.step`` on packed trees: one launch);
``step (donate)`` (``donate=True``: into the donated buffers); ``step (per leaf)`` and
``step (per leaf, donate)`` (trees only: separate arrays, one launch per leaf); ``update+apply``
(``tx.update`` then ``no.apply_updates``: two launches); torch ``fused=True`` (``foreach`` where
torch has no fused kernel) and torch's default (on CPU a Python loop over the tensors); optax under
``jax.jit`` with donated params and state. Only the device-side step is timed: gradients are set
once. ``--variants`` times a subset (``breadth``: what the README's table of every optimizer
compares).

Low-precision state (``STATE_STORAGE``): ``adamw-bf16`` and ``adamw-8bit`` are AdamW with its
two slots stored as bfloat16 (``state_dtype="bfloat16"``) or 8-bit codes
(``state_bits=8``: params of >= 4096 elements; smaller ones keep float32 state), built through
``no.low_precision_state`` (step) and the class's keywords (stateful). Named with ``adamw`` (or
each other) they are timed in the same interleaved blocks as it, each against a limit moving
its own bytes (20 and 16 B: slots of ushort and uchar in the plain kernel) and against the
group's one torch (float32 state). Their rows add the state held on the device per param
(``state B/p``: slot arrays, or codes plus absmax, over n) and torch's median over theirs.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

import netcl_optim as no
from netcl_optim._device import allocator
from netcl_optim.fusion._programs import build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import optimizer_table  # tests/: the one table of optimizer variants

LR = 1e-3
FLOAT32 = 4  # bytes
FULL_SIZES = ("1M", "10M", "50M", "tree160")


def optional(name: str) -> Any:
    """The module ``name``, or None when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class Pass:
    """One pass over the params of a step that takes several: the float32 buffers (named by
    role) it reads only, reads and writes in place, and writes only. A pass that only reads
    is a reduction (its per-leaf sums are a few bytes: not counted)."""

    reads: tuple[str, ...] = ()
    updates: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    @property
    def bytes_per_param(self) -> int:
        return FLOAT32 * (len(self.reads) + 2 * len(self.updates) + len(self.writes))

    @property
    def roles(self) -> str:
        parts = [("read", self.reads), ("read+write", self.updates), ("write", self.writes)]
        return "; ".join(f"{verb} {', '.join(names)}" for verb, names in parts if names)


def passes_bytes(passes: Sequence[Pass]) -> int:
    return sum(p.bytes_per_param for p in passes)


def passes_roles(passes: Sequence[Pass]) -> str:
    """``"3 passes: read g; ... | read u, p | ..."``."""
    return f"{len(passes)} passes: " + " | ".join(p.roles for p in passes)


# A step with a per-leaf reduction of its updates (the trust ratio's ||u|| and ||p||) writes
# the updates and reads them again in the next pass: the kernel that writes them sums them
# per chunk too (netcl_optim/fusion/_codegen.py, sums_body), so it reads p for ||p||.
# u: the updates; t: LARS's momentum trace.
_LAMB_ADAM = Pass(reads=("g",), updates=("m", "v"), writes=("u",))  # Adam alone
_LAMB_APPLY = Pass(reads=("u",), updates=("p",))  # trust ratio, lr, apply (tiled launches)
PASSES: dict[str, tuple[Pass, ...]] = {
    # Adam, ||u||^2 and ||p||^2 per chunk; then the trust ratio, lr and apply
    "lamb": (Pass(reads=("g", "p"), updates=("m", "v"), writes=("u",)), _LAMB_APPLY),
    # weight_decay 0: reduce g and p, then trust ratio, lr, trace and apply in one pass
    "lars": (Pass(reads=("g", "p")), Pass(reads=("g",), updates=("p", "t"))),
    # reduce g and p, then trust ratio, lr, shrink and apply in one pass
    "fromage": (Pass(reads=("g", "p")), Pass(reads=("g",), updates=("p",))),
    # reduce g (||g||^2 per leaf; nu updated by the finish launch), then m, lr and apply
    "novograd": (Pass(reads=("g",)), Pass(reads=("g",), updates=("p", "m"))),
    # torch's rule (the class): the row and column sums of g^2 (one pass), the factored
    # updates (written), then ||u|| and ||p|| per leaf, then the relative step and apply (the
    # factors, O(rows + columns), and the vectors' variance are left out)
    "adafactor": (
        Pass(reads=("g",)),
        Pass(reads=("g",), writes=("u",)),
        Pass(reads=("u", "p")),
        Pass(reads=("u",), updates=("p",)),
    ),
}
# Limits timed beside the main one, by variant label: LAMB's two passes without reading p in
# the first (a floor no step that needs ||p|| before its apply can reach).
EXTRA_LIMITS: dict[str, dict[str, tuple[Pass, ...]]] = {
    "lamb": {"limit (36 B, no p in pass 1)": (_LAMB_ADAM, _LAMB_APPLY)},
}


def _factored_bytes(shape: tuple[int, ...]) -> int:
    """torch's Adafactor state of a float32 param: a row and a column factor per matrix of
    its last two axes (ndim >= 2), else a value per element."""
    if len(shape) < 2:
        return 4 * max(1, int(np.prod(shape)))
    batch = int(np.prod(shape[:-2]))
    return 4 * batch * (shape[-2] + shape[-1])


STATE_MEMORY = {"adafactor": _factored_bytes}  # rules whose state is not shaped like the params


def state_memory(spec: OptimizerSpec, size: str, queue: Any) -> dict[str, Any]:
    """The stateful optimizer's state bytes after a step (every buffer it keeps) and the
    rule's factored size (``STATE_MEMORY``)."""
    shapes = SIZES[size]
    params = [no.Parameter(no.to_device(np.ones(s, np.float32), queue)) for s in shapes]
    opt = spec.stateful(params)
    for p in params:
        p.grad = no.to_device(np.full(p.data.shape, 0.5, np.float32), queue)
    opt.step()
    held = sum(b.nbytes for rec in opt._groups for blocks in rec.blocks.values() for b in blocks)
    factored = sum(STATE_MEMORY[spec.row.bench](tuple(s)) for s in shapes)
    return {"optimizer": spec.name, "size": size, "state_bytes": held,
            "factored_bytes": factored, "ratio": held / factored}  # fmt: skip


@dataclass(frozen=True)
class Storage:
    """How a spec's slots are stored (``no.low_precision_state`` and the stateful classes'
    keywords): the keywords, the OpenCL type of the limit kernel's state buffers (the same
    bytes per element) and the bytes per slot element moved by a step."""

    kwargs: dict[str, Any]
    cl_type: str
    slot_bytes: int
    label: str


# Low-precision state, by the suffix of its name on the command line (``adamw-bf16``): 8 bits
# store each slot of a param of >= 4096 elements as one-byte codes and a float32 absmax per
# 256 elements (0.03 B per param and slot read and written: not counted); smaller params keep
# float32 state (the tree's vectors: 0.3% of its params)
STATE_STORAGE: dict[str, Storage] = {
    "bf16": Storage({"state_dtype": "bfloat16"}, "ushort", 2, "bfloat16"),
    "8bit": Storage({"state_bits": 8}, "uchar", 1, "8-bit"),
}
STORAGE_BASES = ("adamw",)  # rows with a -bf16 and an -8bit name


@dataclass(frozen=True)
class OptimizerSpec:
    """A benchmarked row of ``tests/optimizer_table.py`` as each library spells it, at ``LR``;
    ``storage``: its slots stored in fewer bits (a key of ``STATE_STORAGE``)."""

    row: optimizer_table.Optimizer
    storage: str | None = None

    @property
    def name(self) -> str:
        return self.row.id if self.storage is None else f"{self.row.id}-{self.storage}"

    @property
    def bench(self) -> str:
        """Its name on the command line."""
        return self.row.bench if self.storage is None else f"{self.row.bench}-{self.storage}"

    @property
    def storage_kwargs(self) -> dict[str, Any]:
        return {} if self.storage is None else STATE_STORAGE[self.storage].kwargs

    @property
    def state_label(self) -> str:
        return "float32" if self.storage is None else STATE_STORAGE[self.storage].label

    @property
    def slot_bytes(self) -> int:
        """Bytes per slot element in the step's one pass."""
        return FLOAT32 if self.storage is None else STATE_STORAGE[self.storage].slot_bytes

    @property
    def slots(self) -> int:
        """State buffers per param."""
        return self.row.slots

    @property
    def hyper(self) -> dict[str, Any]:
        return {**self.row.kwargs, "learning_rate": LR}

    def functional(self) -> Any:
        tx = self.row.make(no, self.hyper)
        return no.low_precision_state(tx, **self.storage_kwargs) if self.storage else tx

    def stateful(self, params: list) -> Any:
        kwargs = {**self.row.class_kwargs(), "lr": LR, **self.storage_kwargs}
        return self.row.make_stateful(no, params, kwargs)

    def torch_fused(self, torch: Any) -> bool:
        """Whether torch has a fused kernel (torch 2.13: SGD, Adam, AdamW and Adagrad)."""
        return "fused" in inspect.signature(getattr(torch.optim, self.row.torch)).parameters

    def torch_best(self, torch: Any) -> dict[str, bool]:
        """torch's fastest mode on CPU: ``fused=True`` where it has a fused kernel, else
        ``foreach=True`` (a multi-tensor op per step instead of a loop over tensors)."""
        return {"fused": True} if self.torch_fused(torch) else {"foreach": True}

    def torch(self, torch: Any, params: list, mode: dict[str, bool] | None = None) -> Any:
        """torch's optimizer in ``mode`` (keyword flags; ``{}``: torch's default, which on CPU
        is a Python loop over the tensors)."""
        mode = self.torch_best(torch) if mode is None else mode
        return self.row.make_torch(torch, params, self.hyper, **mode)

    def optax(self, optax: Any) -> Any:
        return self.row.make_optax(optax, self.hyper)

    @property
    def passes(self) -> tuple[Pass, ...] | None:
        """The passes over the params of a step that takes several (``PASSES``), else None."""
        return PASSES.get(self.row.bench)

    @property
    def extra_limits(self) -> dict[str, tuple[Pass, ...]]:
        """Other limits timed beside the main one, by variant label (``EXTRA_LIMITS``)."""
        return EXTRA_LIMITS.get(self.row.bench, {})

    @property
    def bytes_per_param(self) -> int:
        """Read g; read and write p and every slot (float32, or ``storage``'s bytes); a
        multi-pass step: the sum of its passes' bytes."""
        if self.passes is not None:
            return passes_bytes(self.passes)
        return FLOAT32 * 3 + 2 * self.slots * self.slot_bytes

    @property
    def roles(self) -> str:
        if self.passes is not None:
            return passes_roles(self.passes)
        slots = "".join(f", s{k}" for k in range(self.slots))
        stored = "" if self.storage is None else f" (slots {self.state_label})"
        return f"read g; read+write p{slots}{stored}"


OPTIMIZERS = {row.bench: OptimizerSpec(row) for row in optimizer_table.BENCH}
TORCH_BEST = ("torch fused", "torch foreach")  # labels of torch's fastest mode on CPU
ALL_OPTIMIZERS = tuple(OPTIMIZERS)  # --optimizers all: float32 state
OPTIMIZERS |= {
    spec.bench: spec
    for base in STORAGE_BASES
    for spec in (OptimizerSpec(OPTIMIZERS[base].row, key) for key in STATE_STORAGE)
}
# what the README's table of every optimizer compares (--variants breadth)
BREADTH_VARIANTS = (
    "stateful",
    "step (donate)",
    "torch fused",
    "torch foreach",
    "torch default",
    "optax jit",
)


# ---------------------------------------------------------------------------- problems


def gpt_shapes(layers: int = 13, d: int = 240, vocab: int = 2048, context: int = 256) -> list:
    """A GPT-like tree: 160 leaves, 9,567,120 params, matrices of 57,600-491,520 elements and
    vectors of 240-960 (13 blocks of 12 leaves, token and position embeddings, final norm)."""
    attention = [(d,), (d,)] + [(d, d)] * 4  # layer norm weight and bias; q, k, v, out
    mlp = [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # norm; up, bias; down, bias
    block = attention + mlp
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]


SIZES: dict[str, list] = {
    "10K": [(10_000,)],
    "1M": [(1_000_000,)],
    "10M": [(10_000_000,)],
    "50M": [(50_000_000,)],
    "tree160": gpt_shapes(),
    "tree5": [(40, 30), (30,), (7, 11), (300,), (1,)],  # for --smoke: per-leaf paths
}


@dataclass
class Problem:
    """Host params and grads: float32 leaves that are views of two flat arrays."""

    size: str
    shapes: list
    flat_params: np.ndarray
    flat_grads: np.ndarray

    @property
    def n(self) -> int:
        return self.flat_params.size

    def leaves(self, flat: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for shape in self.shapes:
            count = int(np.prod(shape))
            out.append(flat[start : start + count].reshape(shape))
            start += count
        return out

    @property
    def params(self) -> list[np.ndarray]:
        return self.leaves(self.flat_params)

    @property
    def grads(self) -> list[np.ndarray]:
        return self.leaves(self.flat_grads)


def make_problem(size: str, seed: int = 0) -> Problem:
    shapes = SIZES[size]
    n = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    grads = rng.standard_normal(n, dtype=np.float32) * np.float32(0.01)
    return Problem(size, shapes, params, grads)


# ---------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One way to run a step: ``setup`` allocates, ``run`` enqueues one step, ``sync`` waits."""

    label: str

    def setup(self, problem: Problem) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def params_host(self) -> np.ndarray | None:
        """The current params, flat on the host (None where the maths is not the optimizer's)."""
        return None


def _limit_source(
    slots: int, out_of_place: bool = False, state_type: str = "float"
) -> tuple[str, str]:
    """A plain kernel that reads g and p and the slots, adds ``a * g`` and writes them back
    (in place), or to separate outputs (``out_of_place``, as a pure step does). Slots of an
    integer ``state_type`` (the bytes of bfloat16 or 8-bit state) are xor-ed with the bits
    of ``a * g`` instead."""
    name = f"netcl_bench_limit_{slots}" + ("_oop" if out_of_place else "")
    name += "" if state_type == "float" else f"_{state_type}"
    roles = ["p"] + [f"s{k}" for k in range(slots)]
    types = {r: "float" if r == "p" else state_type for r in roles}

    def new(r: str) -> str:
        if types[r] == "float":
            return f"{r}[i] + x"
        return f"({types[r]})({r}[i] ^ as_uint(x))"

    if out_of_place:
        ins = [f"__global const {types[r]} *restrict {r}" for r in roles]
        outs = [f"__global {types[r]} *restrict {r}_out" for r in roles]
        body = [f"    {r}_out[i] = {new(r)};" for r in roles]
    else:
        ins, outs = [f"__global {types[r]} *restrict {r}" for r in roles], []
        body = [f"    {r}[i] = {new(r)};" for r in roles]
    args = ",\n    ".join(["__global const float *restrict g", *ins, *outs, "const float a"])
    where = "to new buffers" if out_of_place else "in place"
    src = (
        f"//CL// {name}: read g, {', '.join(roles)}; write {', '.join(roles)} {where}\n"
        "#pragma OPENCL FP_CONTRACT OFF\n"
        f"__kernel void {name}(\n    {args})\n{{\n"
        "    const size_t i = get_global_id(0);\n"
        "    const float x = a * g[i];\n" + "\n".join(body) + "\n}\n"
    )
    return src, name


@dataclass
class LimitVariant(Variant):
    """Plain kernel, one work-item per element, no bounds check, one buffer per role.

    In place (the limit), or ``out_of_place``: outputs to a second set of buffers, the two
    sets swapping roles every step, as the pure step's pooled outputs do.
    """

    queue: cl.CommandQueue = None
    slots: int = 0
    out_of_place: bool = False
    state_type: str = "float"  # the slots' OpenCL type: ushort (bfloat16), uchar (8 bits)
    kernel: Any = field(default=None, init=False)

    def setup(self, problem: Problem) -> None:
        q = self.queue
        src, name = _limit_source(self.slots, self.out_of_place, self.state_type)
        n_buffers = (2 + self.slots) + (1 + self.slots) * self.out_of_place
        self.kernel = build(q.context, src, name, [None] * n_buffers + [np.float32])
        self.grads = cla.to_device(q, problem.flat_grads)
        self.state = [cla.to_device(q, problem.flat_params)]
        dtype = {"float": np.float32, "ushort": np.uint16, "uchar": np.uint8}[self.state_type]
        self.state += [cla.zeros(q, problem.n, dtype) for _ in range(self.slots)]
        self.outputs = [cla.empty_like(a) for a in self.state] if self.out_of_place else []
        self.n = problem.n

    def run(self) -> None:
        buffers = [self.grads, *self.state, *self.outputs]
        self.kernel(self.queue, (self.n,), None, *[b.data for b in buffers], np.float32(LR))
        if self.out_of_place:
            self.state, self.outputs = self.outputs, self.state

    def sync(self) -> None:
        self.queue.finish()


def _pass_source(step: Pass, out_of_place: bool = False) -> tuple[str, str, list[str]]:
    """A plain kernel for one pass: ``x = a * (sum of the reads)``, each updated buffer
    ``+= x`` (in place, or into a second buffer: ``out_of_place``), each written one ``= x``.
    A pass that only reads stores ``x`` to ``sink[0]`` where it is NaN (never): a store the
    compiler must keep. Returns the source, the kernel name and the buffer roles in argument
    order (``<role>_out``: the second buffer of an updated role)."""
    r, u, w = len(step.reads), len(step.updates), len(step.writes)
    name = f"netcl_bench_pass_r{r}_u{u}_w{w}" + ("_oop" if out_of_place else "")
    sink = [] if u or w else ["sink"]
    roles = [*step.reads, *step.updates, *step.writes, *sink]
    if out_of_place:
        roles += [f"{role}_out" for role in step.updates]
    const = set(step.reads) | (set(step.updates) if out_of_place else set())
    args = [f"__global {'const ' * (role in const)}float *restrict {role}" for role in roles]
    body = [f"    {role}{'_out' * out_of_place}[i] = {role}[i] + x;" for role in step.updates]
    body += [f"    {role}[i] = x;" for role in step.writes]
    body += ["    if (x != x) sink[0] = x;"] if sink else []
    total = " + ".join(f"{role}[i]" for role in step.reads)
    where = "to new buffers" if out_of_place else "in place"
    src = (
        f"//CL// {name}: {step.roles} {where}\n"
        "#pragma OPENCL FP_CONTRACT OFF\n"
        f"__kernel void {name}(\n    {', '.join([*args, 'const float a'])})\n{{\n"
        "    const size_t i = get_global_id(0);\n"
        f"    const float x = a * ({total});\n" + "\n".join(body) + "\n}\n"
    )
    return src, name, roles


@dataclass
class PassesLimitVariant(Variant):
    """The limit of a step that takes several passes: one plain kernel per pass, back to back,
    over one buffer per role, shared between the passes (the updates ``u`` that one pass
    writes are the next one's input, as in the step). ``out_of_place``: each pass writes its
    updated roles to a second buffer, and the two swap right after it."""

    queue: cl.CommandQueue = None
    passes: tuple[Pass, ...] = ()
    out_of_place: bool = False

    def setup(self, problem: Problem) -> None:
        q = self.queue
        self.kernels = []
        for step in self.passes:
            src, name, roles = _pass_source(step, self.out_of_place)
            kernel = build(q.context, src, name, [None] * len(roles) + [np.float32])
            self.kernels.append((kernel, step, roles))
        names = dict.fromkeys(r for p in self.passes for r in (*p.reads, *p.updates, *p.writes))
        initial = {"g": problem.flat_grads, "p": problem.flat_params}
        zeros = np.zeros(problem.n, np.float32)
        self.buffers = {role: cla.to_device(q, initial.get(role, zeros)) for role in names}
        self.spare = {
            role: cla.empty_like(self.buffers[role]) for p in self.passes for role in p.updates
        }
        self.sink = cla.zeros(q, 1, np.float32)
        self.n = problem.n

    def run(self) -> None:
        for kernel, step, roles in self.kernels:
            bufs = [self._buffer(role) for role in roles]
            kernel(self.queue, (self.n,), None, *bufs, np.float32(LR))
            if self.out_of_place:
                for role in step.updates:
                    self.buffers[role], self.spare[role] = self.spare[role], self.buffers[role]

    def _buffer(self, role: str) -> Any:
        if role == "sink":
            return self.sink.data
        if role.endswith("_out"):
            return self.spare[role.removesuffix("_out")].data
        return self.buffers[role].data

    def sync(self) -> None:
        self.queue.finish()


def _to_device(queue: cl.CommandQueue, arrays: list[np.ndarray], packed: bool) -> list:
    leaves = no.to_device(list(arrays), queue)
    return no.pack(leaves, queue) if packed else leaves


def _flat_host(arrays: Sequence[Any]) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


@dataclass
class OursVariant(Variant):
    """Shared parts of our variants: device params and grads, packed or one array per leaf."""

    queue: cl.CommandQueue = None
    spec: OptimizerSpec = None
    packed: bool = True
    params: Any = field(default=None, init=False)

    def setup(self, problem: Problem) -> None:
        self.params = _to_device(self.queue, problem.params, self.packed)
        self.grads = _to_device(self.queue, problem.grads, self.packed)

    def sync(self) -> None:
        self.queue.finish()

    def params_host(self) -> np.ndarray:
        return _flat_host([p.get() for p in self.params])


@dataclass
class StatefulVariant(OursVariant):
    """``netcl_optim.stateful``: Parameters over packed views, grads set once, ``opt.step()``."""

    module: Any = None

    def setup(self, problem: Problem) -> None:
        super().setup(problem)
        self.parameters = [self.module.Parameter(p) for p in self.params]
        for param, grad in zip(self.parameters, self.grads, strict=True):
            param.grad = grad
        self.optimizer = self.spec.stateful(self.parameters)

    def run(self) -> None:
        self.optimizer.step()

    def params_host(self) -> np.ndarray:
        return _flat_host([p.data.get() for p in self.parameters])

    def state_bytes(self) -> int:
        return held_state_bytes(self.optimizer)


@dataclass
class StepVariant(OursVariant):
    """Pure ``no.step``: update and apply in one kernel, outputs in fresh buffers."""

    def setup(self, problem: Problem) -> None:
        super().setup(problem)
        self.tx = self.spec.functional()
        self.state = self.tx.init(self.params)

    def run(self) -> None:
        self.params, self.state = no.step(self.tx, self.params, self.grads, self.state)


@dataclass
class DonatedStepVariant(StepVariant):
    """``no.step(..., donate=True)``: the functional step writing into the donated params and
    state (as optax under ``jax.jit`` with ``donate_argnums``)."""

    def run(self) -> None:
        self.params, self.state = no.step(self.tx, self.params, self.grads, self.state, donate=True)


@dataclass
class UpdateApplyVariant(StepVariant):
    """``tx.update`` then ``no.apply_updates``: two kernels, the updates go through memory."""

    def run(self) -> None:
        updates, self.state = self.tx.update(self.grads, self.state, self.params)
        self.params = no.apply_updates(self.params, updates)


@dataclass
class TorchVariant(Variant):
    """torch.optim with ``fused=True`` (or ``foreach=True``; ``mode={}``: torch's default, a
    loop over the tensors on CPU), one tensor per leaf."""

    torch: Any = None
    spec: OptimizerSpec = None
    mode: dict[str, bool] | None = None

    def setup(self, problem: Problem) -> None:
        torch = self.torch
        self.params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in problem.params]
        for p, g in zip(self.params, problem.grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        self.optimizer = self.spec.torch(torch, self.params, self.mode)

    def run(self) -> None:
        self.optimizer.step()

    def sync(self) -> None:
        pass  # torch's CPU ops are synchronous

    def params_host(self) -> np.ndarray:
        return _flat_host([p.detach().numpy() for p in self.params])

    def state_bytes(self) -> int:
        """Bytes of the tensors in ``optimizer.state`` (the step counts included)."""
        state = self.optimizer.state.values()
        return sum(t.nbytes for st in state for t in st.values() if self.torch.is_tensor(t))


@dataclass
class OptaxVariant(Variant):
    """optax under ``jax.jit``, params and state donated, ``block_until_ready`` to sync."""

    jax: Any = None
    optax: Any = None
    spec: OptimizerSpec = None

    def setup(self, problem: Problem) -> None:
        jax, optax = self.jax, self.optax
        self.params = [jax.numpy.array(a, copy=True) for a in problem.params]
        self.grads = [jax.numpy.array(a, copy=True) for a in problem.grads]
        tx = self.spec.optax(optax)
        # copies: some rules' state starts as the params (madgrad, cocob), and a buffer may
        # be donated once only
        self.state = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), tx.init(self.params))

        def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.step = jax.jit(step, donate_argnums=(0, 1))

    def run(self) -> None:
        self.params, self.state = self.step(self.params, self.state, self.grads)

    def sync(self) -> None:
        self.jax.block_until_ready(self.params)

    def params_host(self) -> np.ndarray:
        return _flat_host([np.asarray(p) for p in self.params])


@dataclass
class Libraries:
    """The optional libraries found: None where not installed."""

    stateful: Any = None
    torch: Any = None
    jax: Any = None
    optax: Any = None

    @classmethod
    def load(cls) -> Libraries:
        jax = optional("jax")
        return cls(
            stateful=optional("netcl_optim.stateful"),
            torch=optional("torch"),
            jax=jax,
            optax=optional("optax") if jax is not None else None,
        )

    def notes(self) -> list[str]:
        out = []
        if self.stateful is None:
            out.append("stateful: netcl_optim.stateful not importable, column skipped")
        if self.torch is None:
            out.append("torch: not installed, column skipped")
        if self.optax is None:
            out.append("optax: jax or optax not installed, column skipped")
        return out


def limit_variants(spec: OptimizerSpec, queue: cl.CommandQueue) -> list[Variant]:
    """The limit and its out-of-place form (one kernel, or one per pass of a multi-pass
    step), and the spec's extra limits; low-precision state: the in-place limit over slots
    of its bytes."""
    if spec.storage is not None:
        cl_type = STATE_STORAGE[spec.storage].cl_type
        return [LimitVariant("limit", queue=queue, slots=spec.slots, state_type=cl_type)]
    if spec.passes is None:
        return [
            LimitVariant("limit", queue=queue, slots=spec.slots),
            LimitVariant("limit (out of place)", queue=queue, slots=spec.slots, out_of_place=True),
        ]
    out: list[Variant] = [
        PassesLimitVariant("limit", queue=queue, passes=spec.passes),
        PassesLimitVariant(
            "limit (out of place)", queue=queue, passes=spec.passes, out_of_place=True
        ),
    ]
    for label, passes in spec.extra_limits.items():
        out.append(PassesLimitVariant(label, queue=queue, passes=passes))
    return out


def make_variants(
    spec: OptimizerSpec, problem: Problem, queue: cl.CommandQueue, libs: Libraries
) -> list[Variant]:
    variants: list[Variant] = limit_variants(spec, queue)
    if libs.stateful is not None:
        variants.append(StatefulVariant("stateful", queue=queue, spec=spec, module=libs.stateful))
    variants.append(StepVariant("step", queue=queue, spec=spec))
    if spec.storage is not None:  # low-precision state: against torch's fastest (float32)
        if libs.torch is not None and spec.row.torch is not None:
            label = "torch fused" if spec.torch_fused(libs.torch) else "torch foreach"
            variants.append(TorchVariant(label, torch=libs.torch, spec=spec))
        return variants
    variants.append(DonatedStepVariant("step (donate)", queue=queue, spec=spec))
    if len(problem.shapes) > 1:
        variants.append(StepVariant("step (per leaf)", queue=queue, spec=spec, packed=False))
        variants.append(
            DonatedStepVariant("step (per leaf, donate)", queue=queue, spec=spec, packed=False)
        )
    variants.append(UpdateApplyVariant("update+apply", queue=queue, spec=spec))
    if libs.torch is not None and spec.row.torch is not None:
        label = "torch fused" if spec.torch_fused(libs.torch) else "torch foreach"
        variants.append(TorchVariant(label, torch=libs.torch, spec=spec))
        variants.append(TorchVariant("torch default", torch=libs.torch, spec=spec, mode={}))
    if libs.optax is not None and spec.row.optax is not None:
        variants.append(OptaxVariant("optax jit", jax=libs.jax, optax=libs.optax, spec=spec))
    return variants


# ---------------------------------------------------------------------------- timing


@dataclass
class Row:
    optimizer: str
    size: str
    n: int
    variant: str
    bytes_per_param: int
    median_ms: float
    min_ms: float
    gbps: float
    pct_of_limit: float | None
    max_abs_diff: float | None  # params after warm-up against the "step" variant's
    # the stateful optimizer's state buffers (codes, absmax, float32 state) / n
    state_bytes_per_param: float | None = None
    speedup_vs_torch: float | None = None  # torch's fastest mode's median / this median


def held_state_bytes(optimizer: Any) -> int:
    """Bytes of a stateful optimizer's state buffers on the device: every slot's array, or
    its 8-bit codes and absmax (host scalars such as the step count left out)."""
    total = 0
    for rec in optimizer._groups:
        for bufs in rec.bufs.values():
            for b in bufs:
                quantized = isinstance(b, no.QuantizedState)
                total += b.codes.nbytes + b.absmax.nbytes if quantized else b.nbytes
    return total


def warm_up(variants: list[Variant], steps: int) -> None:
    """``steps`` untimed steps each: kernel builds, jit compiles, first-touch of buffers."""
    for v in variants:
        for _ in range(steps):
            v.run()
        v.sync()


def final_diffs(variants: list[Variant]) -> list[float | None]:
    """Max |params - params of "step"| per variant; call when all took the same steps."""
    by_label = {v.label: v for v in variants}
    reference = by_label["step"].params_host()
    out: list[float | None] = []
    for v in variants:
        host = v.params_host()
        out.append(None if host is None else float(np.max(np.abs(host - reference))))
    return out


def calls_per_block(v: Variant, target_s: float) -> int:
    """Calls per timed block so that a block takes ~``target_s`` (1 to 50), from one probe."""
    v.sync()
    t0 = time.perf_counter()
    v.run()
    v.sync()
    return max(1, min(50, round(target_s / (time.perf_counter() - t0))))


def time_round_robin(
    variants: list[Variant], rounds: int, target_s: float, calls: int | None = None
) -> list[list[float]]:
    """Seconds per step of each variant (in the order given), one sample per block; blocks
    interleaved, each starting and ending with a sync."""
    per_variant = [calls or calls_per_block(v, target_s) for v in variants]
    samples: list[list[float]] = [[] for _ in variants]
    order = list(range(len(variants)))
    for r in range(rounds):
        shift = r % len(variants)
        for k in order[shift:] + order[:shift]:
            v, n = variants[k], per_variant[k]
            v.sync()
            time.sleep(0.005)  # let other libraries' spinning worker threads go idle
            t0 = time.perf_counter()
            for _ in range(n):
                v.run()
            v.sync()
            samples[k].append((time.perf_counter() - t0) / n)
    return samples


def run_group(
    spec: OptimizerSpec,
    size: str,
    queue: cl.CommandQueue,
    libs: Libraries,
    rounds: int,
    warmup: int = 3,
    target_s: float = 0.05,
    calls: int | None = None,
    only: Sequence[str] | None = None,
    members: Sequence[OptimizerSpec] = (),
) -> list[Row]:
    """Set up, warm up, check and time every variant of one (optimizer, size), or those named
    in ``only`` (with "limit" and "step", which the others are measured against); free them.
    ``members``: more specs (the same row with low-precision state) timed in the same
    interleaved blocks, each against its own limit and step, and against ``spec``'s torch
    (theirs left out)."""
    problem = make_problem(size)
    owned: list[tuple[OptimizerSpec, Variant]] = []
    for s in (spec, *members):
        for v in make_variants(s, problem, queue, libs):
            if only is not None and v.label not in (*only, "limit", "step", *s.extra_limits):
                continue
            if v.label.startswith("torch") and any(u.label == v.label for _, u in owned):
                continue  # one torch per group: the first spec's
            try:
                v.setup(problem)
                owned.append((s, v))
            except Exception as exc:  # e.g. a torch build without a fused kernel
                print(f"  {s.name}/{size}: {v.label} skipped: {type(exc).__name__}: {exc}")
    variants = [v for _, v in owned]
    warm_up(variants, warmup)
    diffs: dict[int, float | None] = {}
    for s in (spec, *members):
        mine = [v for t, v in owned if t is s]
        diffs |= dict(zip(map(id, mine), final_diffs(mine), strict=True))
    held = {
        id(v): v.state_bytes() / problem.n
        for v in variants
        if isinstance(v, (StatefulVariant, TorchVariant))
    }
    samples = time_round_robin(variants, rounds, target_s, calls)
    medians = [statistics.median(times) for times in samples]
    limits = {s.name: m for (s, v), m in zip(owned, medians, strict=True) if v.label == "limit"}
    best = [m for v, m in zip(variants, medians, strict=True) if v.label in TORCH_BEST]
    torch_best = min(best) if best else None
    rows = []
    for (s, v), times, median in zip(owned, samples, medians, strict=True):
        if v.label.startswith("torch"):
            s = OPTIMIZERS[s.row.bench]  # torch's state is float32: the row's bytes and limit
        extra = s.extra_limits.get(v.label)
        moved = s.bytes_per_param if extra is None else passes_bytes(extra)
        ours = not v.label.startswith(("limit", "torch"))
        limit = limits.get(s.name)
        rows.append(
            Row(
                optimizer=s.name,
                size=size,
                n=problem.n,
                variant=v.label,
                bytes_per_param=moved,
                median_ms=median * 1e3,
                min_ms=min(times) * 1e3,
                gbps=moved * problem.n / median / 1e9,
                pct_of_limit=None if limit is None else 100 * limit / median,
                max_abs_diff=diffs[id(v)],
                state_bytes_per_param=held.get(id(v)),
                speedup_vs_torch=torch_best / median if torch_best and ours else None,
            )
        )
    del variants, owned, problem
    gc.collect()
    allocator(queue).free_held()
    return rows


# ---------------------------------------------------------------------------- fixed costs


def _tiny_tree(queue: cl.CommandQueue) -> tuple[list, list]:
    host = [np.full((30, 30), 0.5, np.float32), np.full(100, 0.5, np.float32)]
    return _to_device(queue, host, True), _to_device(queue, host, True)


def _dispatch_steps(queue: cl.CommandQueue, libs: Libraries) -> dict[str, Callable[[], None]]:
    """Zero-argument callables that each run one Adam step on a 1000-element tree."""
    out: dict[str, Callable[[], None]] = {}
    src, name = _limit_source(2)
    kernel = build(queue.context, src, name, [None] * 4 + [np.float32])
    bufs = [cla.zeros(queue, 1000, np.float32).data for _ in range(4)]
    out["plain kernel launch (limit, Adam bytes)"] = lambda: kernel(
        queue, (1000,), None, *bufs, np.float32(LR)
    )
    if libs.stateful is not None:
        params, grads = _tiny_tree(queue)
        parameters = [libs.stateful.Parameter(p) for p in params]
        for p, g in zip(parameters, grads, strict=True):
            p.grad = g
        out["stateful Adam.step()"] = libs.stateful.Adam(parameters, lr=LR).step
    params, grads = _tiny_tree(queue)
    tx = no.adam(LR)
    box = [params, tx.init(params)]

    def pure_step() -> None:
        box[0], box[1] = no.step(tx, box[0], grads, box[1])

    out["no.step(adam)"] = pure_step
    own_params, _ = _tiny_tree(queue)
    donated = [own_params, tx.init(own_params)]

    def donated_step() -> None:
        donated[0], donated[1] = no.step(tx, donated[0], grads, donated[1], donate=True)

    out["no.step(adam, donate=True)"] = donated_step
    return out


def _python_only_us(fn: Callable[[], None], queue: cl.CommandQueue, calls: int) -> float | None:
    """µs per call of ``fn`` with our kernel launches replaced by a no-op: the Python part of
    the dispatch. None for a callable that does not launch through the runner."""
    from netcl_optim.fusion import _launch

    launched = []
    real = _launch.launch
    _launch.launch = lambda *args, **kwargs: launched.append(1)
    try:
        fn()
        if not launched:
            return None
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6
    finally:
        _launch.launch = real
        queue.finish()


def dispatch_costs(queue: cl.CommandQueue, libs: Libraries, calls: int) -> list[dict]:
    """µs per call of ``calls`` steps, with one ``finish()`` at the end vs after every call,
    and of the Python part alone (launches stubbed)."""
    rows = []
    for label, fn in _dispatch_steps(queue, libs).items():
        for _ in range(5):
            fn()
        queue.finish()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        queue.finish()
        t1 = time.perf_counter()
        for _ in range(calls):
            fn()
            queue.finish()
        t2 = time.perf_counter()
        rows.append(
            {
                "what": label,
                "calls": calls,
                "us_no_finish": (t1 - t0) / calls * 1e6,
                "us_finish_each": (t2 - t1) / calls * 1e6,
                "us_python_only": _python_only_us(fn, queue, calls),
            }
        )
    return rows


_FIRST_STEP_SCRIPT = """
import json, sys, time
import numpy as np
t0 = time.perf_counter()
import netcl_optim as no
t1 = time.perf_counter()
queue = no.default_queue()
host = [np.full((30, 30), 0.5, np.float32), np.full(100, 0.5, np.float32)]
params = no.pack(no.to_device(host, queue))
grads = no.pack(no.to_device(host, queue))
if sys.argv[1] == "stateful":
    from netcl_optim.stateful import Adam, Parameter
    ps = [Parameter(p) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    step = Adam(ps, lr=1e-3).step
else:
    tx = no.adam(1e-3)
    box = [params, tx.init(params)]
    def step():
        box[0], box[1] = no.step(tx, box[0], grads, box[1])
queue.finish()
t2 = time.perf_counter()
step()
queue.finish()
t3 = time.perf_counter()
step()
queue.finish()
t4 = time.perf_counter()
ms = lambda a, b: round((b - a) * 1e3, 2)
print(json.dumps({"import_ms": ms(t0, t1), "init_ms": ms(t1, t2), "first_step_ms": ms(t2, t3),
                  "second_step_ms": ms(t3, t4)}))
"""


def _first_step_once(api: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP_SCRIPT, api],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_step_costs(libs: Libraries, stateful: bool = True) -> list[dict]:
    """Import, init and first Adam step of a new chain in fresh processes: PoCL's kernel cache
    warm (second of two runs) and cold (``POCL_CACHE_DIR`` a fresh temporary directory), for
    the functional API and (``stateful``, when importable) the stateful one."""
    apis = ["functional"] + (["stateful"] if stateful and libs.stateful is not None else [])
    rows = []
    for api in apis:
        env = dict(os.environ)
        _first_step_once(api, env)
        rows.append({"api": api, "cache": "warm", **_first_step_once(api, env)})
        with tempfile.TemporaryDirectory(prefix="pocl-cold-") as cold:
            rows.append(
                {
                    "api": api,
                    "cache": "cold",
                    **_first_step_once(api, {**env, "POCL_CACHE_DIR": cold}),
                }
            )
    return rows


# ---------------------------------------------------------------------------- reporting


def machine_info(queue: cl.CommandQueue) -> dict:
    device = queue.device
    versions = {}
    for name in ("numpy", "torch", "jax", "optax"):
        module = sys.modules.get(name)
        versions[name] = getattr(module, "__version__", None) if module else None
    return {
        "device": device.name,
        "platform": device.platform.version,
        "driver": device.driver_version,
        "pyopencl": cl.VERSION_TEXT,
        "netcl_optim": no.__version__,
        "python": platform.python_version(),
        "nproc": len(os.sched_getaffinity(0)),
        **versions,
    }


def format_table(rows: list[Row]) -> str:
    head = (
        f"{'optimizer':<26} {'size':>8} {'variant':<20} {'B/p':>4} {'median ms':>10} "
        f"{'min ms':>9} {'GB/s':>7} {'% limit':>8} {'max|dp|':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = "" if r.pct_of_limit is None else f"{r.pct_of_limit:.0f}%"
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
        lines.append(
            f"{r.optimizer:<26} {r.size:>8} {r.variant:<20} {r.bytes_per_param:>4} "
            f"{r.median_ms:>10.3f} {r.min_ms:>9.3f} {r.gbps:>7.1f} {pct:>8} {diff:>9}"
        )
    return "\n".join(lines)


def format_storage(rows: list[Row]) -> str:
    """The stateful step of each state storage of a row with low-precision names (and
    torch's fastest mode) by size: bytes moved, median, % of the limit of those bytes, state
    bytes per param held on the device, torch's median over this one."""
    head = (
        f"{'optimizer':<12} {'size':>8} {'state':<9} {'variant':<13} {'B/p':>4} "
        f"{'median ms':>10} {'% limit':>8} {'state B/p':>10} {'vs torch':>9}"
    )
    lines = [head, "-" * len(head)]
    bases = {OPTIMIZERS[b].name for b in STORAGE_BASES}
    for r in rows:
        spec = next(s for s in OPTIMIZERS.values() if s.name == r.optimizer)
        if spec.row.id not in bases or r.variant not in ("stateful", *TORCH_BEST):
            continue
        if spec.storage is None and not any(
            q.size == r.size and OPTIMIZERS.get(q.optimizer, spec).storage for q in rows
        ):
            continue  # no low-precision state in this group
        torch = r.variant in TORCH_BEST
        pct = "" if r.pct_of_limit is None else f"{r.pct_of_limit:.0f}%"
        held = "" if r.state_bytes_per_param is None else f"{r.state_bytes_per_param:.3f}"
        speedup = "1.00x" if torch else "" if r.speedup_vs_torch is None else (
            f"{r.speedup_vs_torch:.2f}x")  # fmt: skip
        lines.append(
            f"{r.optimizer:<12} {r.size:>8} {spec.state_label:<9} {r.variant:<13} "
            f"{r.bytes_per_param:>4} {r.median_ms:>10.3f} {pct:>8} {held:>10} {speedup:>9}"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def format_extra_limits(rows: list[Row], spec: OptimizerSpec) -> str:
    """One line per extra limit of ``spec`` (LAMB: 2 passes): each variant's median as % of
    that limit's, from the same blocks."""
    lines = []
    for size in dict.fromkeys(r.size for r in rows):
        group = [r for r in rows if r.size == size]
        by_label = {r.variant: r for r in group}
        for label in spec.extra_limits:
            extra = by_label.get(label)
            if extra is None:
                continue
            cells = [
                f"{r.variant} {100 * extra.median_ms / r.median_ms:.0f}%"
                for r in group
                if not r.variant.startswith("limit")
            ]
            head = f"  {spec.name}/{size} as % of {label} ({extra.bytes_per_param} B):"
            lines.append(f"{head} {', '.join(cells)}")
    return "\n".join(lines)


def limits_info(specs: Sequence[OptimizerSpec]) -> dict[str, dict]:
    """Bytes and passes of each multi-pass spec's limit and extra limits (for the JSON)."""

    def describe(passes: tuple[Pass, ...]) -> dict:
        return {"bytes_per_param": passes_bytes(passes), "passes": [p.roles for p in passes]}

    return {
        spec.name: {
            "limit": describe(spec.passes),
            **{label: describe(passes) for label, passes in spec.extra_limits.items()},
        }
        for spec in specs
        if spec.passes is not None
    }


def format_fixed(dispatch: list[dict], first: list[dict]) -> str:
    lines = [
        "Python dispatch, 1000-element tree (us per call):",
        f"  {'what':<42} {'no finish':>10} {'finish each':>12} {'Python only':>12}",
    ]
    for d in dispatch:
        py = d.get("us_python_only")
        py_text = "-" if py is None else f"{py:.1f}"
        lines.append(
            f"  {d['what']:<42} {d['us_no_finish']:>10.1f} {d['us_finish_each']:>12.1f} "
            f"{py_text:>12}"
        )
    if first:
        lines.append("First Adam step of a new chain in a new process (ms):")
        lines.append(
            f"  {'api':<11} {'cache':<6} {'import':>8} {'init':>8} {'1st step':>9} {'2nd step':>9}"
        )
        for f in first:
            lines.append(
                f"  {f['api']:<11} {f['cache']:<6} {f['import_ms']:>8.1f} {f['init_ms']:>8.1f} "
                f"{f['first_step_ms']:>9.1f} {f['second_step_ms']:>9.1f}"
            )
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """Bars of % of limit (median) per variant, grouped by size; one panel per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(dict.fromkeys(r.optimizer for r in rows))
    order = [
        "limit",
        "limit (out of place)",
        "stateful",
        "step",
        "step (donate)",
        "step (per leaf)",
        "step (per leaf, donate)",
        "update+apply",
    ]
    labels = sorted(
        dict.fromkeys(r.variant for r in rows),
        key=lambda v: order.index(v) if v in order else len(order),
    )
    colors = {label: f"C{k}" for k, label in enumerate(labels)}
    pct = {(r.optimizer, r.size, r.variant): r.pct_of_limit or 0.0 for r in rows}
    top = max(110.0, *pct.values()) * 1.05
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(
        len(optimizers), 1, figsize=(10, 2.4 * len(optimizers) + 1), squeeze=False
    )
    for ax, opt in zip(axes[:, 0], optimizers, strict=True):
        sizes = list(dict.fromkeys(r.size for r in rows if r.optimizer == opt))
        for j, label in enumerate(labels):
            at = [
                (i, pct[(opt, size, label)])
                for i, size in enumerate(sizes)
                if (opt, size, label) in pct
            ]
            xs = [i + (j - (len(labels) - 1) / 2) * width for i, _ in at]
            ax.bar(xs, [y for _, y in at], width, color=colors[label], label=label)
        ax.axhline(100, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylim(0, top)
        ax.set_ylabel("% of limit")
        ax.set_title(opt, fontsize=9, loc="left")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncols=min(5, len(labels)), fontsize=8)
    fig.suptitle("One step, median, as % of a plain kernel moving the same bytes in place")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def runs_of(names: Sequence[str]) -> list[list[OptimizerSpec]]:
    """The specs named, as timed: each in its own groups, except the float32 and
    low-precision names of one row (``adamw``, ``adamw-bf16``, ``adamw-8bit``), timed in the
    same interleaved blocks (float32 first: its torch is the group's)."""
    out: list[list[OptimizerSpec]] = []
    families: dict[str, list[OptimizerSpec]] = {}
    for name in dict.fromkeys(names):
        spec = OPTIMIZERS[name]
        if spec.row.bench not in STORAGE_BASES:
            out.append([spec])
            continue
        if spec.row.bench not in families:
            families[spec.row.bench] = []
            out.append(families[spec.row.bench])
        families[spec.row.bench].append(spec)
    order = [None, *STATE_STORAGE]
    for family in families.values():
        family.sort(key=lambda s: order.index(s.storage))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="Adam and SGD-momentum at 1M and tree160, fewer rounds, < 1 min",
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--optimizers",
        help=f"comma-separated, from {','.join(OPTIMIZERS)}; or all (default: every row, "
        "float32 state); a row's names with -bf16 and -8bit (low-precision state) are timed "
        "in the same blocks",
    )
    parser.add_argument("--sizes", help=f"comma-separated, from {','.join(SIZES)}")
    parser.add_argument("--rounds", type=int, help="timed blocks per variant (7; quick 3)")
    parser.add_argument(
        "--no-fixed-costs",
        action="store_true",
        help="skip the dispatch and new-process measurements",
    )
    parser.add_argument(
        "--variants",
        help="comma-separated variant labels to time (limit and step always run); "
        f"'breadth' for {','.join(BREADTH_VARIANTS)}",
    )
    parser.add_argument("--json", help="write all results to this path")
    parser.add_argument("--png", help="write a bar chart of %% of limit to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        defaults = ("adam", "tree5,10K", 1)
    elif args.quick:
        defaults = ("momentum,adam", "1M,tree160", 3)
    else:
        defaults = (",".join(ALL_OPTIMIZERS), ",".join(FULL_SIZES), 7)
    args.optimizers = (args.optimizers or defaults[0]).split(",")
    if args.optimizers == ["all"]:
        args.optimizers = list(ALL_OPTIMIZERS)
    args.sizes = (args.sizes or defaults[1]).split(",")
    if args.variants == "breadth":
        args.variants = ",".join(BREADTH_VARIANTS)
    args.variants = args.variants.split(",") if args.variants else None
    args.rounds = args.rounds or defaults[2]
    for name in args.optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")
    for size in args.sizes:
        if size not in SIZES:
            parser.error(f"unknown size {size!r}: choose from {', '.join(SIZES)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    queue = no.default_queue()
    libs = Libraries.load()
    info = machine_info(queue)
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    for note in libs.notes():
        print("note:", note)
    print("bytes per param (float32 params and grads):")
    for name in args.optimizers:
        spec = OPTIMIZERS[name]
        print(f"  {spec.name:<26} {spec.bytes_per_param:>3} B  ({spec.roles})")
        for label, passes in spec.extra_limits.items():
            print(f"    {label:<24} {passes_bytes(passes):>3} B  ({passes_roles(passes)})")
    timing: dict[str, Any] = {"target_s": 0.02 if args.quick else 0.05}
    if args.smoke:
        timing = {"warmup": 1, "calls": 2}
    rows: list[Row] = []
    for spec, *members in runs_of(args.optimizers):
        for size in args.sizes:
            group = run_group(
                spec, size, queue, libs, args.rounds, only=args.variants, members=members,
                **timing,
            )  # fmt: skip
            table = format_table(group)
            print(table.split("\n", 2)[2] if rows else table, flush=True)
            if spec.extra_limits:
                print(format_extra_limits(group, spec), flush=True)
            rows += group
    dispatch, first = [], []
    if not args.no_fixed_costs:
        calls = 20 if args.smoke else 500 if args.quick else 2000
        dispatch = dispatch_costs(queue, libs, calls)
        first = [] if args.smoke else first_step_costs(libs, stateful=not args.quick)
        print(format_fixed(dispatch, first))
    print()
    print(format_table(rows))
    for name in args.optimizers:
        spec = OPTIMIZERS[name]
        if spec.extra_limits:
            print(format_extra_limits([r for r in rows if r.optimizer == spec.name], spec))
    storage = format_storage(rows)
    if storage:
        print("\nState storage (stateful step; torch: float32 state):")
        print(storage)
    memory = [state_memory(OPTIMIZERS[name], size, queue) for name in args.optimizers
              for size in args.sizes if OPTIMIZERS[name].row.bench in STATE_MEMORY]  # fmt: skip
    for line in memory:
        print(f"state memory: {line['optimizer']} {line['size']}: {line['state_bytes']:,} B "
              f"against {line['factored_bytes']:,} B factored ({line['ratio']:.4f}x)")  # fmt: skip
    limits = limits_info([OPTIMIZERS[name] for name in args.optimizers])
    result = {
        "machine": info,
        "notes": libs.notes(),
        "rounds": args.rounds,
        "rows": [asdict(r) for r in rows],
        "dispatch": dispatch,
        "first_step": first,
        **({"limits": limits} if limits else {}),
        **({"state_memory": memory} if memory else {}),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.png:
        plot(rows, args.png)
    return result


if __name__ == "__main__":
    main()
