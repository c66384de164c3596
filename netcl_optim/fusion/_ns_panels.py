"""The bfloat16 Newton–Schulz iteration with ``X`` kept in packed bfloat16 panels.

Each iteration reads ``X`` twice, as the left operand of ``A = X X^T`` and as the right one of
``X <- B X + a X``, in two panel layouts (:func:`._gemm.pack_source`'s pairs): *rows* (a line
per row of ``X``, pairs along its columns) and *cols* (a line per column, pairs along its
rows). :func:`._newton_schulz.orthogonalize`'s plain bfloat16 loop packs ``X`` into both
from a float32 copy every iteration; here the product ``B X + a X`` writes its result
straight into both layouts (:func:`panel_step_source`), reading ``a X`` from the *cols*
panels it multiplies, so ``X`` is packed once, before the first iteration, and never exists
in float32 until the last product writes it for the finish. Per iteration: ``A = X X^T``
from the *rows* panels (one launch), ``B = c A A + b A`` (two), ``B`` packed and the step
(two). The arithmetic and roundings are the plain loop's: the same bits.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator
from ._gemm import (
    BF16_ROUND,
    bf16_round_vector,
    bf16_steps,
    bf16_tile,
    gram,
    kernel_header,
    native_bf16,
    pack_operand,
    run_kernel,
    vector_width,
    work_group,
)
from ._launch import note_launches
from ._programs import build


def panel_tile(device: cl.Device) -> tuple[int, int] | None:
    """The tile of the panel iteration on ``device`` (``TN`` a multiple of ``TM``, ``TM``
    even: the *rows* panels serve as both operands of ``X X^T``, and a work-item's rows come
    in pairs), or None where the bfloat16 tile is not such a tile."""
    tm, tn = bf16_tile(device)
    return (tm, tn) if tn % tm == 0 and tm % 2 == 0 else None


@functools.cache
def panel_step_source(
    tm: int, tn: int, w: int, native: bool, last: bool, transpose_out: bool = False
) -> tuple[str, str]:
    """``Y = alpha B X + beta X`` over the packed ``B`` (``a``, ``TM``-line panels) and the
    *cols* panels of ``X`` (``b``: ``K = m`` rows, ``N = n`` columns), each item a ``TM x TN``
    block, the loop of :func:`._gemm.gemm_source`'s bfloat16 kernel; ``X`` for ``beta`` from
    the same *cols* panel. ``Y`` rounded to bfloat16 is stored in both layouts (*cols*: a
    vector per pair of rows; *rows*: a pair of columns per store), or (``last``) as float32
    ``[M, N]`` for the finish (``transpose_out``: ``[N, M]``, the leaf's orientation where
    the iteration ran on its transpose, so that the finish reads it in order)."""
    nv = tn // w
    last_kind = ("_last_t" if transpose_out else "_last") if last else ""
    name = f"netcl_ns_panel_step_{tm}x{tn}w{w}{'n' if native else ''}{last_kind}"
    body = "".join(
        f"        const uint{w} b{v} = *(__global const uint{w} *)(bp + {v * w});\n"
        for v in range(nv)
    )
    for r in range(tm):
        body += f"        const uint{w} a{r} = (uint{w})(ap[{r}]);\n"
        body += bf16_steps(r, nv, w, native)
    acc = ", ".join(f"acc{r}_{v} = (realw)(0)" for r in range(tm) for v in range(nv))
    if transpose_out:
        out_at = "(z * N + j0 + {col} + e) * M + i0 + {rr}"
    else:
        out_at = "(z * M + i0 + {rr}) * N + j0 + {col} + e"
    store = ""
    for r in range(0, tm, 2):
        store += f"    if (i0 / 2 + {r // 2} < KP) {{  /* rows i0 + {r}, i0 + {r + 1} */\n"
        store += f"        __global const uint *dq = bp0 + (i0 / 2 + {r // 2}) * {tn};\n"
        for v in range(nv):
            store += (
                f"        {{ const uint{w} dv = *(__global const uint{w} *)(dq + {v * w});\n"
                f"          realw y0 = alpha * acc{r}_{v}, y1 = alpha * acc{r + 1}_{v};\n"
                f"          if (beta != 0) {{ y0 = y0 + beta * as_float{w}(dv << 16);\n"
                f"                           y1 = y1 + beta * as_float{w}(dv & 0xFFFF0000u); }}\n"
                f"          y0 = bf16_round_w(y0); y1 = bf16_round_w(y1);\n"
            )
            if last:
                for rr, yy in ((r, "y0"), (r + 1, "y1")):
                    store += (
                        f"          if (i0 + {rr} < M) {{ const real *ys = (const real *)&{yy};\n"
                        f"            for (int e = 0; e < {w}; e++)\n"
                        f"              if (j0 + {v * w} + e < N)"
                        f" x_out[{out_at.format(rr=rr, col=v * w)}] = ys[e]; }}\n"
                    )
            else:
                store += (
                    f"          *(__global uint{w} *)(cols_new + (bp0 - b_panels)"
                    f" + (i0 / 2 + {r // 2}) * {tn} + {v * w}) ="
                    f" (as_uint{w}(y0) >> 16) | (as_uint{w}(y1) & 0xFFFF0000u);\n"
                )
                for rr, yy in ((r, "y0"), (r + 1, "y1")):
                    line = f"(z * LBR + (i0 + {rr}) / {tn}) * KPN"
                    store += f"          {{ __global uint *row = rows_new + {line} * {tn};\n"
                    for e in range(0, w, 2):
                        p = f"(j0 + {v * w + e}) / 2"
                        store += (
                            f"            if ({p} < KPN) row[{p} * {tn} + (i0 + {rr}) % {tn}] ="
                            f" (as_uint({yy}.s{e:x}) >> 16)"
                            f" | (as_uint({yy}.s{e + 1:x}) & 0xFFFF0000u);\n"
                        )
                    store += "          }\n"
            store += "        }\n"
        store += "    }\n"
    src = f"""//CL// {name}: Y = alpha B X + beta X, X in bfloat16 panels, Y into both layouts
{kernel_header("float")}typedef float{w} realw;
{BF16_ROUND}{bf16_round_vector(w)}__kernel void {name}(__global const uint *restrict a_panels,
                     __global const uint *restrict b_panels,
                     __global uint *restrict rows_new, __global uint *restrict cols_new,
                     __global float *restrict x_out,
                     const long M, const long N, const long K, const real alpha, const real beta)
{{
    const long jb = get_global_id(0), ib = get_global_id(1), z = get_global_id(2);
    const long j0 = jb * {tn}, i0 = ib * {tm};
    const long mb = (M + {tm - 1}) / {tm}, nb = (N + {tn - 1}) / {tn};
    if (ib >= mb || jb >= nb) return;  /* (the launch pads to whole work-groups) */
    const long KP = (K + 1) / 2, KPN = (N + 1) / 2, LBR = (M + {tn - 1}) / {tn};
    __global const uint *ap = a_panels + (z * mb + ib) * KP * {tm};
    __global const uint *bp = b_panels + (z * nb + jb) * KP * {tn};
    __global const uint *bp0 = bp;
    realw {acc};
    for (long k = 0; k < KP; k++, ap += {tm}, bp += {tn}) {{
{body}    }}
{store}}}
"""
    return src, name


def _step(queue, b_packed, cols_old, rows_new, cols_new, x_out, count, m, n, a, tile, last,
          transpose_out):  # fmt: skip
    """One launch of :func:`panel_step_source` over the group: ``X <- B X + a X``."""
    tm, tn = tile
    w = vector_width(queue.device, np.dtype(np.float32), tn)
    native = w == 16 and native_bf16(queue.device)
    src, name = panel_step_source(tm, tn, w, native, last, last and transpose_out)
    kernel: Any = build(queue.context, src, name, [None] * 5 + [np.int64] * 3 + [np.float32] * 2)
    blocks = (-(-n // tn), -(-m // tm))
    group = work_group(blocks, count)
    size = (*(-(-b // g) * g for b, g in zip(blocks, group, strict=True)), count)
    kernel(queue, size, (*group, 1), b_packed.data, cols_old.data, rows_new.data, cols_new.data,
           x_out.data, m, n, m, np.float32(1.0), np.float32(a))  # fmt: skip
    note_launches(name)


def panel_iterations(queue, x, gram_a, poly_b, schedule, count, m, n, tile,
                     transpose_out: bool = False) -> None:  # fmt: skip
    """``X`` (float32 ``[count, m, n]``, bfloat16 values) through the bfloat16 iteration,
    the result written back into ``x`` (``transpose_out``: as ``[count, n, m]``): the plain
    loop's products and bits (see the module doc), ``X`` packed once. ``schedule`` must not
    be empty."""
    tm, tn = tile
    pool = allocator(queue)
    # rows: lines = rows of X (pairs along its columns); cols: lines = columns (pairs along rows)
    rows = [pack_operand(queue, x, count, m * n, m, tn, n, 1, n, True)]
    rows.append(cla.empty(queue, rows[0].shape, np.uint32, allocator=pool))
    if -(-m // tm) * tm < -(-m // tn) * tn:  # lines the step never writes: their zero padding
        rows[1].fill(0)
    cols = [pack_operand(queue, x, count, m * n, n, tn, 1, n, m, True)]
    cols.append(cla.empty(queue, cols[0].shape, np.uint32, allocator=pool))
    for k, (a, b, c) in enumerate(schedule):
        old, new = k % 2, 1 - k % 2
        run_kernel(queue, rows[old].data, rows[old].data, gram_a, gram_a, 1.0, 0.0, count, m,
                    m, n, tile, sym=True, bf16=True, a_in_b=tm != tn)  # fmt: skip
        # A and B are exactly symmetric: packed by columns (contiguous), the same panels
        gram(queue, gram_a, poly_b, alpha=c, beta=b, c=gram_a, trans=True, bfloat16=True,
             tile=tile)  # fmt: skip
        b_packed = pack_operand(queue, poly_b, count, m * m, m, tm, 1, m, m, True)
        last = k == len(schedule) - 1
        _step(queue, b_packed, cols[old], rows[new], cols[new], x, count, m, n, a, tile, last,
              transpose_out)  # fmt: skip
