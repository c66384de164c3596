"""A two-layer perceptron (``x @ w1 + b1 -> ReLU -> @ w2 + b2``) whose forward and backward
passes are small OpenCL kernels, for the digits example and the notebooks.

Kernels, one work-item per output element (no bounds checks), each built once per context:

* ``linear``   ``out = act(x @ w + b)``, ``act`` the identity or ReLU
* ``xent``     per row: softmax cross-entropy loss, whether argmax is the label, and the
  loss gradient ``seed * (softmax(z) - onehot(y)) / rows``
* ``matmul_tn`` ``out = a.T @ d`` (weight gradients)
* ``matmul_nt`` ``out = (d @ w.T) * (h > 0)`` (the hidden gradient through the ReLU)
* ``colsum``   ``out = d.sum(0)`` (bias gradients, a column reduction)

Activations and their gradients are stored as float32, or as float16 for the mixed-precision
path (``half_activations=True``: half is a storage type on PoCL, arithmetic stays float32).
Parameters and parameter gradients are always float32. Arrays are passed as base buffer plus
element offset, so packed views (an optimizer's ``.data``, ``netcl_optim.pack``) work as is.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from .._device import allocator, default_queue
from .._packing import pack
from ..fusion._programs import build
from ..stateful import Parameter

NAMES = ("w1", "b1", "w2", "b2")  # the parameters, in the optimizer's (packing) order

_B, _L, _I = None, np.int64, np.int32  # buffer, offset (long), int
_F = np.float32


def _preamble(storage: str) -> str:
    if storage == "half":
        load, store = "vload_half((i), (p))", "vstore_half_rte((v), (i), (p))"
    else:
        load, store = "(p)[i]", "((p)[i] = (v))"
    return (
        f"#pragma OPENCL FP_CONTRACT OFF\ntypedef {storage} act_t;\n"
        f"#define LOAD(p, i) {load}\n#define STORE(p, i, v) {store}\n"
    )


# name -> (source, scalar argument dtypes). act_t: activation storage (float or half).
_KERNELS: dict[str, tuple[str, list]] = {
    "linear": (
        """
/* out[i, j] = act(b[j] + sum_k x[i, k] * w[k, j]); x: (rows, K), w: (K, N); global (rows, N) */
__kernel void netcl_mlp_linear(__global const act_t *x, const long x_off,
                               __global const float *w, const long w_off,
                               __global const float *b, const long b_off,
                               __global act_t *out, const long out_off,
                               const int K, const int N, const int relu)
{
    const int i = get_global_id(0), j = get_global_id(1);
    float acc = 0.0f;
    for (int k = 0; k < K; k++)
        acc += LOAD(x, x_off + (long)i * K + k) * w[w_off + (long)k * N + j];
    acc += b[b_off + j];
    if (relu) acc = fmax(acc, 0.0f);
    STORE(out, out_off + (long)i * N + j, acc);
}
""",
        [_B, _L, _B, _L, _B, _L, _B, _L, _I, _I, _I],
    ),
    "xent": (
        """
/* Row i of z (rows, C): loss = logsumexp(z) - z[y], correct = (argmax z == y),
   dz = seed_over_n * (softmax(z) - onehot(y)). Global (rows). */
__kernel void netcl_mlp_xent(__global const act_t *z, const long z_off,
                             __global const int *y, const long y_off,
                             __global act_t *dz, const long dz_off,
                             __global float *loss, const long loss_off,
                             __global int *correct, const long correct_off,
                             const int C, const float seed_over_n)
{
    const int i = get_global_id(0);
    const long row = z_off + (long)i * C, drow = dz_off + (long)i * C;
    const int t = y[y_off + i];
    float m = LOAD(z, row);
    int arg = 0;
    for (int c = 1; c < C; c++) {
        const float v = LOAD(z, row + c);
        if (v > m) { m = v; arg = c; }
    }
    float s = 0.0f;
    for (int c = 0; c < C; c++) s += exp(LOAD(z, row + c) - m);
    loss[loss_off + i] = m + log(s) - LOAD(z, row + t);
    correct[correct_off + i] = arg == t;
    for (int c = 0; c < C; c++) {
        const float p = exp(LOAD(z, row + c) - m) / s;
        STORE(dz, drow + c, seed_over_n * (p - (c == t ? 1.0f : 0.0f)));
    }
}
""",
        [_B, _L, _B, _L, _B, _L, _B, _L, _B, _L, _I, _F],
    ),
    "matmul_tn": (
        """
/* out[k, j] = sum_i a[i, k] * d[i, j]; a: (rows, K), d: (rows, N), out: (K, N); global (K, N) */
__kernel void netcl_mlp_matmul_tn(__global const act_t *a, const long a_off,
                                  __global const act_t *d, const long d_off,
                                  __global float *out, const long out_off,
                                  const int rows, const int K, const int N)
{
    const int k = get_global_id(0), j = get_global_id(1);
    float acc = 0.0f;
    for (int i = 0; i < rows; i++)
        acc += LOAD(a, a_off + (long)i * K + k) * LOAD(d, d_off + (long)i * N + j);
    out[out_off + (long)k * N + j] = acc;
}
""",
        [_B, _L, _B, _L, _B, _L, _I, _I, _I],
    ),
    "matmul_nt": (
        """
/* out[i, k] = h[i, k] > 0 ? sum_j d[i, j] * w[k, j] : 0 (the gradient through ReLU(h));
   d: (rows, N), w: (K, N), h and out: (rows, K); global (rows, K) */
__kernel void netcl_mlp_matmul_nt(__global const act_t *d, const long d_off,
                                  __global const float *w, const long w_off,
                                  __global const act_t *h, const long h_off,
                                  __global act_t *out, const long out_off,
                                  const int K, const int N)
{
    const int i = get_global_id(0), k = get_global_id(1);
    float acc = 0.0f;
    for (int j = 0; j < N; j++)
        acc += LOAD(d, d_off + (long)i * N + j) * w[w_off + (long)k * N + j];
    const long ik = (long)i * K + k;
    STORE(out, out_off + ik, LOAD(h, h_off + ik) > 0.0f ? acc : 0.0f);
}
""",
        [_B, _L, _B, _L, _B, _L, _B, _L, _I, _I],
    ),
    "colsum": (
        """
/* out[j] = sum_i d[i, j]; d: (rows, N); global (N) */
__kernel void netcl_mlp_colsum(__global const act_t *d, const long d_off,
                               __global float *out, const long out_off,
                               const int rows, const int N)
{
    const int j = get_global_id(0);
    float acc = 0.0f;
    for (int i = 0; i < rows; i++) acc += LOAD(d, d_off + (long)i * N + j);
    out[out_off + j] = acc;
}
""",
        [_B, _L, _B, _L, _I, _I],
    ),
}


def kernel_source(name: str, storage: str = "float") -> str:
    """The OpenCL source of the kernel ``name`` (see the module docstring), for reading."""
    body, _ = _KERNELS[name]
    return f"//CL// netcl_mlp_{name} ({storage} activations)\n{_preamble(storage)}{body}"


def _kernel(context: cl.Context, name: str, storage: str) -> cl.Kernel:
    return build(context, kernel_source(name, storage), f"netcl_mlp_{name}", _KERNELS[name][1])


def _at(a: cla.Array) -> tuple[Any, int]:
    """``(base buffer, element offset)`` of a device array, as the kernels take them."""
    return a.base_data, a.offset // a.dtype.itemsize


def init_params(
    sizes: tuple[int, int, int] = (64, 128, 10), seed: int = 0
) -> dict[str, np.ndarray]:
    """He-initialised float32 weights and zero biases, on the host."""
    n_in, n_hidden, n_out = sizes
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((n_in, n_hidden)) * np.sqrt(2 / n_in)).astype(np.float32),
        "b1": np.zeros(n_hidden, np.float32),
        "w2": (rng.standard_normal((n_hidden, n_out)) * np.sqrt(2 / n_hidden)).astype(np.float32),
        "b2": np.zeros(n_out, np.float32),
    }


class MLP:
    """``logits = relu(x @ w1 + b1) @ w2 + b2`` with its backward pass, on an OpenCL queue.

    The parameters are :class:`~netcl_optim.stateful.Parameter` objects (``parameters()``,
    for the stateful optimizers), but every method also takes an explicit ``params`` dict
    ``{"w1", "b1", "w2", "b2"}`` of device arrays (the functional API's pytree).

    Usage, one training step::

        logits = model.forward(x)              # remembers the activations
        model.backward(y)                      # writes each parameter's .grad
        opt.step()

    Args:
      sizes: ``(inputs, hidden units, classes)``.
      seed: seed of the weight initialisation.
      queue: the OpenCL queue (default: the library's default queue).
      half_activations: store activations and their gradients as float16 (the AMP path).

    Device:
      Forward: 2 launches; backward: 6 launches (softmax cross-entropy, 2 weight gradients,
      2 bias gradients, the hidden gradient). No host sync; scratch buffers are allocated
      only when a batch is larger than every batch before.
    """

    def __init__(
        self,
        sizes: tuple[int, int, int] = (64, 128, 10),
        seed: int = 0,
        queue: cl.CommandQueue | None = None,
        half_activations: bool = False,
    ) -> None:
        self.queue = queue or default_queue()
        self.sizes: tuple[int, int, int] = (int(sizes[0]), int(sizes[1]), int(sizes[2]))
        self.act_dtype = np.dtype(np.float16 if half_activations else np.float32)
        storage = "half" if half_activations else "float"
        ctx = self.queue.context
        self._k = {name: _kernel(ctx, name, storage) for name in _KERNELS}
        host = init_params(self.sizes, seed)
        self._params = {
            k: Parameter(cla.to_device(self.queue, host[k], allocator=allocator(self.queue)))
            for k in NAMES
        }
        self._own_grads: list[cla.Array] | None = None
        self._scratch: dict[str, cla.Array] = {}
        self._rows = 0
        self._x: tuple[cla.Array, int, int] | None = None  # input of the last forward
        self._params_used: dict[str, cla.Array] | None = None

    # ------------------------------------------------------------------ parameters

    def parameters(self) -> list[Parameter]:
        """The parameters ``[w1, b1, w2, b2]`` (hand them to an optimizer)."""
        return [self._params[k] for k in NAMES]

    def params(self) -> dict[str, cla.Array]:
        """The parameters' current device arrays by name (``.data``; live views)."""
        return {k: p.data for k, p in self._params.items()}

    def zero_grads_tree(self) -> dict[str, cla.Array]:
        """Zeroed float32 gradient arrays shaped like the parameters, packed in one buffer."""
        queue = self.queue
        return pack(
            {
                k: cla.zeros(queue, p.shape, np.float32, allocator=allocator(queue))
                for k, p in self._params.items()
            }
        )

    # ------------------------------------------------------------------ passes

    def _run(self, name: str, size: tuple[int, ...], *args: Any) -> None:
        """Launch kernel ``name`` over ``size`` work-items; a device array argument becomes
        (base buffer, element offset), an ``(array, k)`` pair (base, offset + k)."""
        flat: list[Any] = []
        for a in args:
            if isinstance(a, tuple):
                base, off = _at(a[0])
                flat += [base, off + a[1]]
            elif isinstance(a, cla.Array):
                flat += _at(a)
            else:
                flat.append(a)
        self._k[name](self.queue, size, None, *flat)

    def _ensure(self, rows: int) -> None:
        if rows <= self._rows:
            return
        _, n_hidden, n_out = self.sizes
        shapes = {"h": n_hidden, "z": n_out, "dz": n_out, "dh": n_hidden}
        pool = allocator(self.queue)
        self._scratch = {
            k: cla.empty(self.queue, (rows, n), self.act_dtype, allocator=pool)
            for k, n in shapes.items()
        }
        self._scratch["loss"] = cla.empty(self.queue, (rows,), np.float32, allocator=pool)
        self._scratch["correct"] = cla.empty(self.queue, (rows,), np.int32, allocator=pool)
        self._rows = rows

    def forward(
        self,
        x: cla.Array,
        offset: int = 0,
        rows: int | None = None,
        params: dict[str, cla.Array] | None = None,
    ) -> cla.Array:
        """Logits of rows ``offset : offset + rows`` of ``x`` (a device array of shape
        ``(n, inputs)`` with the activation dtype); returns a view of a scratch buffer
        (overwritten by the next call)."""
        n_in, n_hidden, n_out = self.sizes
        if x.ndim != 2 or x.shape[1] != n_in:
            raise ValueError(f"x must have shape (n, {n_in}), got {x.shape}")
        if x.dtype != self.act_dtype:
            raise TypeError(f"x has dtype {x.dtype}, the model's activations {self.act_dtype}")
        rows = x.shape[0] - offset if rows is None else rows
        if not (rows > 0 and 0 <= offset and offset + rows <= x.shape[0]):
            raise ValueError(f"rows {offset}:{offset + rows} are outside x ({x.shape[0]} rows)")
        params = self.params() if params is None else params
        self._ensure(rows)
        s, w, xs = self._scratch, params, (x, offset * n_in)  # xs: the batch's rows
        self._run("linear", (rows, n_hidden), xs, w["w1"], w["b1"], s["h"], n_in, n_hidden, 1)
        self._run("linear", (rows, n_out), s["h"], w["w2"], w["b2"], s["z"], n_hidden, n_out, 0)
        self._x, self._params_used = (x, offset, rows), params
        return s["z"][:rows]

    def backward(
        self,
        y: cla.Array,
        grads: dict[str, cla.Array] | None = None,
        loss_scale: float = 1.0,
        losses: cla.Array | None = None,
        correct: cla.Array | None = None,
    ) -> dict[str, cla.Array]:
        """Gradients of ``loss_scale * mean cross-entropy`` of the last :meth:`forward`.

        ``y``: int32 labels on the device, indexed like ``x`` (the same ``offset``).
        ``grads``: float32 arrays by name to write to; by default each parameter's
        ``.grad`` (a packed buffer of the model's if it is ``None``). Gradients are written,
        not accumulated. ``losses`` (float32) and ``correct`` (int32), if given, receive
        each row's loss and whether it was classified right, at the same ``offset``.
        Returns the gradients by name.
        """
        if self._x is None or self._params_used is None:
            raise RuntimeError("backward() needs a forward() first")
        x, offset, rows = self._x
        params = self._params_used
        n_in, n_hidden, n_out = self.sizes
        if grads is None:
            grads = self._param_grads()
        s, w, g, xs = self._scratch, params, grads, (x, offset * n_in)
        loss_at = (losses, offset) if losses is not None else s["loss"]
        correct_at = (correct, offset) if correct is not None else s["correct"]
        seed = np.float32(loss_scale / rows)  # d(loss_scale * mean loss) / d(row loss)
        self._run("xent", (rows,), s["z"], (y, offset), s["dz"], loss_at, correct_at, n_out, seed)
        self._run("matmul_tn", (n_hidden, n_out), s["h"], s["dz"], g["w2"], rows, n_hidden, n_out)
        self._run("colsum", (n_out,), s["dz"], g["b2"], rows, n_out)
        self._run("matmul_nt", (rows, n_hidden), s["dz"], w["w2"], s["h"], s["dh"], n_hidden, n_out)
        self._run("matmul_tn", (n_in, n_hidden), xs, s["dh"], g["w1"], rows, n_in, n_hidden)
        self._run("colsum", (n_hidden,), s["dh"], g["b1"], rows, n_hidden)
        return grads

    def _param_grads(self) -> dict[str, cla.Array]:
        """Each parameter's ``.grad``; ``None`` ones get the model's packed buffer views."""
        params = self.parameters()
        if any(p.grad is None for p in params):
            if self._own_grads is None:
                pool = allocator(self.queue)
                self._own_grads = pack(
                    [cla.empty(self.queue, p.shape, np.float32, allocator=pool) for p in params]
                )
            assert self._own_grads is not None  # (pack returns a tree: Any)
            for p, g in zip(params, self._own_grads, strict=True):
                if p.grad is None:
                    p.grad = g
        for name, p in zip(NAMES, params, strict=True):
            g = cast(cla.Array, p.grad)  # (each set above)
            if g.shape != p.shape or g.dtype != np.float32 or not g.flags.c_contiguous:
                raise ValueError(f"{name}.grad must be a C-contiguous float32 {p.shape} array")
        return {k: cast(cla.Array, p.grad) for k, p in zip(NAMES, params, strict=True)}

    def predict(self, x: cla.Array, params: dict[str, cla.Array] | None = None) -> np.ndarray:
        """Predicted classes of every row of ``x`` (one host read)."""
        return self.forward(x, params=params).get().astype(np.float32).argmax(axis=1)
