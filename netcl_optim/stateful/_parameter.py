"""Parameter: a device array with a gradient slot, the unit the stateful optimizers update."""

from __future__ import annotations

from typing import Any

import pyopencl.array as cla

from .._packing import DONATED, DonatedArray, DonatedArrayError


class Parameter:
    """A trainable device array: ``data`` (a ``pyopencl.array.Array``) and ``grad``.

    ``grad`` is ``None`` until an autograd (or the user) sets it to a device array shaped and
    typed like ``data``. Optimizers accept any object exposing ``.data`` and ``.grad`` this
    way (duck typing); ``Parameter`` is the minimal one.

    An optimizer **re-homes** ``data`` at construction: the values are copied into one packed
    buffer per param group and dtype and ``data`` is rebound to its view there (values
    unchanged), so that a step is one kernel launch. Keep the ``Parameter``, not the array.
    Two parameters must not share memory (tied weights: pass the one parameter once, with
    the sum of its gradients): the optimizer refuses them.

    Example::

        w = Parameter(netcl_optim.to_device(np.zeros((3, 4), np.float32)))
        w.grad = netcl_optim.to_device(np.ones((3, 4), np.float32))
    """

    def __init__(self, data: cla.Array, grad: cla.Array | None = None) -> None:
        if not isinstance(data, cla.Array):
            raise TypeError(
                f"Parameter data must be a pyopencl.array.Array, got {type(data).__name__} "
                "(use netcl_optim.to_device)"
            )
        if type(data) is DonatedArray:
            raise DonatedArrayError(f"Parameter data {DONATED}")
        self.data = data
        self.grad = grad

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Set ``grad`` to ``None``, or (``set_to_none=False``) fill it with zeros on the
        device (no host round trip; a ``None`` grad stays ``None``)."""
        if set_to_none:
            self.grad = None
        elif self.grad is not None:
            self.grad.fill(0)

    def __repr__(self) -> str:
        grad = "None" if self.grad is None else "set"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, grad={grad})"
