"""Level-1 BLAS on flat device vectors, with the scalars they produce kept on the device.

L-BFGS's direction, history and line searches are sequences of dot products and ``y += c x``
over whole (packed) parameter vectors, where ``c`` is often the result of an earlier dot
product. :class:`Vectors` runs them with every scalar in a small device array (``reg``,
"registers"): a dot product's result is written to a register and read there by the next
launch, so nothing goes back to the host until :meth:`Vectors.read` asks for the registers
(one transfer of all of them).

Reductions are deterministic: fixed chunks of the vector (they depend only on its length),
each summed by one work-group in a fixed tree, then the chunks added in order by one
work-item. Sums accumulate in double where the device has it (float otherwise) and are
rounded once to the vectors' dtype, as a BLAS ``dot`` of that dtype returns. Expressions
are evaluated without contraction (no fma), so a step is reproducible bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator
from .._packing import element_offset
from ._launch import note_launches
from ._programs import build
from ._reductions import acc_ctype

_CHUNK = 4096  # elements per work-item, at least
_LANES = 8  # running sums per work-item of a reduction (a power of 2)
_MAX_CHUNKS = 1024  # chunks of a reduction at most (partials the finish adds)

# a reduction's term per element ``v`` (after the optional axpy) and ``w`` (the other vector)
_TERMS = {
    "dot": ("({acc})v * ({acc})w", "a + b", "0"),
    "asum": ("({acc})(v < 0 ? -v : v)", "a + b", "0"),
    "amax": ("({acc})(v < 0 ? -v : v)", "a > b ? a : b", "0"),  # (a nan: see _partial_source)
}


class Coef(NamedTuple):
    """A coefficient of a launch: ``(reg[plus] if plus >= 0 else host) - (reg[minus] if
    minus >= 0 else 0)``, computed in the vectors' dtype (so ``-reg[k]`` and ``reg[a] -
    reg[b]`` round as torch's 0-d tensor arithmetic does)."""

    host: float = 0.0
    plus: int = -1
    minus: int = -1


ONE = Coef(1.0)


def coef(host: float = 0.0, plus: int = -1, minus: int = -1) -> Coef:
    """A :class:`Coef`: a host number, ``reg[plus]``, ``-reg[minus]`` or
    ``reg[plus] - reg[minus]``."""
    return Coef(float(host), plus, minus)


def _coef_source(name: str) -> str:
    return (
        f"(({name}_p >= 0 ? reg[{name}_p] : {name}_h) - ({name}_m >= 0 ? reg[{name}_m] : (real)0))"
    )


def _preamble(real: str) -> str:
    fp64 = "#pragma OPENCL EXTENSION cl_khr_fp64 : enable\n" if real == "double" else ""
    return f"#pragma OPENCL FP_CONTRACT OFF\n{fp64}typedef {real} real;\n"


def _lincomb_source(real: str, two: bool) -> tuple[str, str]:
    """``out = a_c a + b_c b`` (or ``a_c a``), element-wise."""
    name = f"netcl_vec_lincomb{2 if two else 1}_{real}"
    b_args = (
        "__global const real *b_base, const long b_off, const real b_h, const long b_p, "
        "const long b_m,"
        if two
        else ""
    )
    b_term = " + b_c * b_base[b_off + i]" if two else ""
    value = f"a_c * a_base[a_off + i]{b_term}"
    b_c = f"\n    const real b_c = {_coef_source('b')};" if two else ""
    src = f"""{_preamble(real)}
__kernel void {name}(__global real *out_base, const long out_off,
    __global const real *a_base, const long a_off, const real a_h, const long a_p,
    const long a_m, {b_args} __global const real *reg, const long n, const long chunk)
{{
    const real a_c = {_coef_source("a")};{b_c}
    const long start = get_global_id(0) * chunk, stop = min(start + chunk, n);
    long i = start;
    for (; i + {_LANES} <= stop; i += {_LANES}) {{
        real t[{_LANES}];
        for (int j = 0; j < {_LANES}; j++) t[j] = {value.replace("+ i]", "+ i + j]")};
        for (int j = 0; j < {_LANES}; j++) out_base[out_off + i + j] = t[j];
    }}
    for (; i < stop; i++) out_base[out_off + i] = {value};
}}
"""
    return src, name


def _partial_source(real: str, acc: str, op: str, axpy: bool) -> tuple[str, str]:
    """Chunk ``g``'s partial of ``op`` over ``v`` (and ``w``), where ``v = y`` or, with
    ``axpy``, ``v = y + c x`` written back to ``y`` first."""
    term, combine, zero = (s.format(acc=acc) for s in _TERMS[op])
    name = f"netcl_vec_{op}{'_axpy' if axpy else ''}_{real}_{acc}"
    load_v = (
        "real v = y[i];\n        v = v + c * x[i];\n        y[i] = v;"
        if axpy
        else "const real v = y[i];"
    )
    load_w = "const real w = w_[i];" if op == "dot" else ""
    combine_all = "isnan(b) ? b : isnan(a) ? a : fmax(a, b)" if op == "amax" else combine
    fp64 = "#pragma OPENCL EXTENSION cl_khr_fp64 : enable" if acc != real else ""
    lanes = " ".join(["0,"] * _LANES)[:-1]
    # fmax drops a nan: the largest magnitude is nan if an element is (as torch's max)
    nan_seen = "\n            bad |= (v != v);" if op == "amax" else ""
    src = f"""{_preamble(real)}{fp64}
typedef {acc} acc;
__kernel void {name}(__global real *y_base, const long y_off,
    __global const real *x_base, const long x_off,
    __global const real *w_base, const long w_off,
    const real c_h, const long c_p, const long c_m, __global const real *reg,
    const long n, const long chunk, __global acc *partials)
{{
    __global real *y = y_base + y_off;
    __global const real *x = x_base + x_off;
    __global const real *w_ = w_base + w_off;
    const long g = get_global_id(0);
    const long start = g * chunk, stop = min(start + chunk, n);
    const real c = {_coef_source("c")};
    acc lane[{_LANES}] = {{{lanes}}};
    int bad = 0;
    long i = start;
    for (; i + {_LANES} <= stop; i += {_LANES}) {{
        for (int j = 0; j < {_LANES}; j++) {{
            {load_v.replace("[i]", "[i + j]")}
            {load_w.replace("[i]", "[i + j]")}
            const acc a = lane[j], b = {term};
            lane[j] = {combine};{nan_seen}
        }}
    }}
    for (int h = {_LANES // 2}; h > 0; h >>= 1)
        for (int j = 0; j < h; j++) {{
            const acc a = lane[j], b = lane[j + h];
            lane[j] = {combine};
        }}
    acc s = lane[0];
    for (; i < stop; i++) {{
        {load_v}
        {load_w}
        const acc a = s, b = {term};
        s = {combine};{nan_seen}
    }}
    partials[g] = {"bad ? (acc)NAN : s" if op == "amax" else "s"};
}}

__kernel void {name}_finish(__global const acc *partials, const long count,
    __global real *reg, const long out, const real t_h, const long t_p, const long t_m)
{{
    acc s = {zero};
    for (long k = 0; k < count; k++) {{
        const acc a = s, b = partials[k];
        s = {combine_all};
    }}
    reg[out] = (real)s * {_coef_source("t")};
}}
"""
    return src, name


class Vectors:
    """Level-1 BLAS over flat (1-D, C-contiguous) device vectors of one float dtype on one
    queue, with ``registers`` device scalars (``reg``, that dtype, zeros at first).

    Every method enqueues launches and returns at once; only :meth:`read` waits (and
    counts itself in ``Vectors.reads``, the host round trips of this process).
    """

    reads: int = 0

    def __init__(self, queue: cl.CommandQueue, dtype: np.dtype, registers: int) -> None:
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"Vectors: float32 or float64 vectors, not {dtype}")
        self.queue = queue
        self.dtype = dtype
        self.real = "double" if dtype == np.float64 else "float"
        self.acc = acc_ctype(queue) if self.real == "float" else "double"
        self.acc_dtype = np.dtype(np.float64 if self.acc == "double" else np.float32)
        self.reg = cla.zeros(queue, (registers,), dtype, allocator=allocator(queue))
        self._partials: cla.Array | None = None

    # ------------------------------------------------------------------ helpers

    def _check(self, *vectors: cla.Array) -> int:
        n = vectors[0].size
        for v in vectors:
            if v.dtype != self.dtype or v.size != n or v.ndim != 1 or not v.flags.c_contiguous:
                raise ValueError(
                    f"Vectors: every vector must be 1-D, contiguous, {self.dtype} and of one "
                    f"size; got {v.dtype} {v.shape}"
                )
        return n

    def _kernel(self, source: tuple[str, str], name: str, dtypes: list) -> cl.Kernel:
        return build(self.queue.context, source[0], name, dtypes)

    def _scalars(self, c: Coef) -> list:
        return [self.dtype.type(c.host), np.int64(c.plus), np.int64(c.minus)]

    # ------------------------------------------------------------------ element-wise

    def lincomb(
        self, out: cla.Array, a: cla.Array, a_coef: Coef, b: cla.Array | None = None,
        b_coef: Coef = ONE,
    ) -> None:  # fmt: skip
        """``out = a_coef a + b_coef b`` (``b`` None: ``out = a_coef a``); ``out`` may be
        ``a`` or ``b``. One launch."""
        vectors = [out, a] if b is None else [out, a, b]
        n = self._check(*vectors)
        if n == 0:
            return
        two = b is not None
        source = _lincomb_source(self.real, two)
        coef_dtypes = [self.dtype.type, np.int64, np.int64]
        vector = [None, np.int64]
        dtypes = [*vector, *vector, *coef_dtypes, *((vector + coef_dtypes) if two else []), None,
                  np.int64, np.int64]  # fmt: skip
        kernel = self._kernel(source, source[1], dtypes)
        args: list = [out.base_data, np.int64(element_offset(out)), a.base_data,
                      np.int64(element_offset(a)), *self._scalars(a_coef)]  # fmt: skip
        if two:
            assert b is not None
            args += [b.base_data, np.int64(element_offset(b)), *self._scalars(b_coef)]
        args += [self.reg.base_data, np.int64(n), np.int64(_CHUNK)]
        kernel(self.queue, (-(-n // _CHUNK),), None, *args)
        note_launches(source[1])

    def axpy(self, y: cla.Array, x: cla.Array, c: Coef) -> None:
        """``y += c x``. One launch."""
        self.lincomb(y, y, ONE, x, c)

    def scale(self, out: cla.Array, x: cla.Array, c: Coef) -> None:
        """``out = c x``. One launch."""
        self.lincomb(out, x, c)

    def sub(self, out: cla.Array, a: cla.Array, b: cla.Array) -> None:
        """``out = a - b``. One launch."""
        self.lincomb(out, a, ONE, b, Coef(-1.0))

    def copy(self, out: cla.Array, a: cla.Array) -> None:
        """``out = a`` (a device copy)."""
        n = self._check(out, a)
        if n:
            nbytes = n * self.dtype.itemsize
            cl.enqueue_copy(self.queue, out.base_data, a.base_data, byte_count=nbytes,  # pyright: ignore[reportCallIssue, reportArgumentType]
                            src_offset=a.offset, dst_offset=out.offset)  # fmt: skip

    # ------------------------------------------------------------------ reductions

    def _reduce(
        self, op: str, y: cla.Array, w: cla.Array, out: int, *, x: cla.Array | None = None,
        c: Coef = ONE, times: Coef = ONE,
    ) -> None:  # fmt: skip
        axpy = x is not None
        n = self._check(y, w, *([x] if x is not None else []))
        source = _partial_source(self.real, self.acc, op, axpy)
        name = source[1]
        real = self.dtype.type
        partial = self._kernel(source, name, [None, np.int64, None, np.int64, None, np.int64,
                                              real, np.int64, np.int64, None, np.int64, np.int64,
                                              None])  # fmt: skip
        finish_dtypes = [None, np.int64, None, np.int64, real, np.int64, np.int64]
        finish = self._kernel(source, name + "_finish", finish_dtypes)
        chunk = max(_CHUNK, -(-n // _MAX_CHUNKS))
        count = -(-n // chunk)
        if self._partials is None or self._partials.size < max(count, 1):
            self._partials = cla.empty(self.queue, (_MAX_CHUNKS + 1,), self.acc_dtype,
                                       allocator=allocator(self.queue))  # fmt: skip
        partials = self._partials
        xv = x if x is not None else y
        if count:
            partial(self.queue, (count,), None, y.base_data,  # pyright: ignore[reportArgumentType]
                    np.int64(element_offset(y)), xv.base_data, np.int64(element_offset(xv)),  # pyright: ignore[reportArgumentType]
                    w.base_data, np.int64(element_offset(w)), *self._scalars(c),  # pyright: ignore[reportArgumentType]
                    self.reg.base_data, np.int64(n), np.int64(chunk),  # pyright: ignore[reportArgumentType]
                    partials.base_data)  # fmt: skip  # pyright: ignore[reportArgumentType]
        finish(self.queue, (1,), (1,), partials.base_data, np.int64(count), self.reg.base_data,  # pyright: ignore[reportArgumentType]
               np.int64(out), *self._scalars(times))  # fmt: skip
        note_launches(name, 2 if count else 1)

    def dot(
        self, a: cla.Array, b: cla.Array, out: int, *, times: Coef = ONE,
        axpy: tuple[cla.Array, Coef] | None = None,
    ) -> None:  # fmt: skip
        """``reg[out] = (a . b) * times`` (the dot product rounded to the vectors' dtype,
        then multiplied). With ``axpy=(x, c)``, ``a += c x`` first, in the same pass (``a``
        is written). Two launches."""
        x, c = axpy if axpy is not None else (None, ONE)
        self._reduce("dot", a, b, out, x=x, c=c, times=times)

    def asum(self, a: cla.Array, out: int) -> None:
        """``reg[out] = sum |a|``. Two launches."""
        self._reduce("asum", a, a, out)

    def amax(self, a: cla.Array, out: int) -> None:
        """``reg[out] = max |a|`` (0 for an empty vector; nan if ``a`` has a nan). Two
        launches."""
        self._reduce("amax", a, a, out)

    # ------------------------------------------------------------------ host

    def set(self, k: int, value: float) -> None:
        """``reg[k] = value`` (a blocking write of one scalar)."""
        self.reg[k : k + 1].set(np.array([value], self.dtype))

    def read(self) -> np.ndarray:
        """Every register, on the host: one device-to-host transfer (waits for the queue)."""
        Vectors.reads += 1
        return self.reg.get(self.queue)
