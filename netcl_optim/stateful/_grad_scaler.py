"""AMPGradScaler: torch.amp.GradScaler's loss scaling for the stateful optimizers."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import pyopencl.array as cla

from .._device import BFLOAT16
from ..amp._loss_scale import (
    check_scaler_args,
    check_scaler_value,
    inverse_scale,
    new_flag,
    next_scale,
    scale_outputs,
    unscale_grads_,
)


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


class _OptimizerState:
    """Per optimizer, per iteration: its stage, its device found-inf flag, and the flag's
    value once read (so that ``step`` and ``update`` read it at most once)."""

    __slots__ = ("found", "found_host", "stage")

    def __init__(self) -> None:
        self.stage = _Stage.READY
        self.found: cla.Array | None = None
        self.found_host: bool | None = None

    def read(self) -> bool:
        if self.found_host is None:
            assert self.found is not None
            self.found_host = bool(self.found.get()[0] != 0)  # the host read
        return self.found_host


_STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _grads_of(optimizer: Any) -> list[cla.Array]:
    seen: set[int] = set()
    grads = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = getattr(p, "grad", None)
            if g is not None and id(g) not in seen:
                seen.add(id(g))
                grads.append(g)
    return grads


class AMPGradScaler:
    """Dynamic loss scaling for mixed-precision training, with torch.amp.GradScaler's
    semantics and defaults.

    Per iteration: ``scaler.scale(loss)`` before the backward pass; optionally
    ``scaler.unscale_(opt)`` (to clip the true gradients); ``scaler.step(opt)``, which
    unscales if needed and skips ``opt.step()`` when a gradient is inf or NaN;
    ``scaler.update()``, which halves the scale (``backoff_factor``) after a skipped step and
    doubles it (``growth_factor``) after ``growth_interval`` finite steps in a row.

    Unlike torch, float16 gradients may be unscaled: half is a storage type here, the
    product is computed in float32 and rounded back to half (unscaled values below ``2**-14``
    become subnormal, below ``2**-25`` zero; keep float32 grads if that matters). bfloat16
    gradients, as in torch, are unscaled in float32 and rounded once to nearest even.

    Args:
      init_scale: initial scale (2**16), a normal float32 value (``2**-126`` to ``3.4e38``).
      growth_factor: scale multiplier after ``growth_interval`` finite steps (2.0, > 1,
        finite).
      backoff_factor: scale multiplier after a non-finite step (0.5, in (0, 1)).
      growth_interval: finite steps in a row before growing (2000, an int >= 1).
      enabled: when False every method is a no-op (``step`` just calls ``opt.step()``).

    Every value is checked the same way wherever it comes in (constructor when enabled,
    setters, ``load_state_dict``, ``update(new_scale)``): ValueError ``Invalid <name>: ...``
    and the scaler unchanged.

    Device:
      ``unscale_`` is one fused unscale-and-check launch per dtype over a packed set of
      grads (else per grad) plus a 4-byte fill, no sync. The scale and growth tracker live
      on the host (a float32 value and an int), so ``scale`` and ``update`` read nothing:
      the only host read is the found-inf flag, once per optimizer per iteration, in
      ``step`` (torch reads it there too, with ``.item()``), or in ``update`` when ``step``
      was not called.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ) -> None:
        self._enabled = bool(enabled)
        if self._enabled:
            init_scale, growth_factor, backoff_factor, growth_interval = check_scaler_args(
                init_scale, growth_factor, backoff_factor, growth_interval
            )
        with np.errstate(over="ignore"):  # disabled: kept unchecked, as torch does
            self._scale = float(np.float32(init_scale))
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0
        self._per_optimizer: dict[int, _OptimizerState] = {}

    def _state(self, optimizer: Any) -> _OptimizerState:
        state = self._per_optimizer.get(id(optimizer))
        if state is None:
            state = self._per_optimizer[id(optimizer)] = _OptimizerState()
        return state

    def scale(self, outputs: Any) -> Any:
        """``outputs * scale``: a number, a numpy array, a device array or a pytree of them
        (dtypes kept). Disabled: ``outputs`` unchanged.

        Device: one launch per device array (a fresh array); no host sync."""
        if not self._enabled:
            return outputs
        return scale_outputs(outputs, self._scale)

    def unscale_(self, optimizer: Any) -> None:
        """Divide the grads of ``optimizer`` by the scale in place (multiplying by torch's
        ``float32(1 / float64(scale))``, all elements) and record on the device whether any
        was inf or NaN. At most once per optimizer between two ``update`` calls, before
        ``step``; else RuntimeError.

        Device: one fused launch per dtype for packed grads (else per grad); no host sync.
        """
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state.stage is _Stage.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if state.stage is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        grads = _grads_of(optimizer)
        if grads:
            found = new_flag(grads[0].queue)  # pyright: ignore[reportArgumentType]
            unscale_grads_(grads, inverse_scale(self._scale), found)
            state.found, state.found_host = found, None
        state.stage = _Stage.UNSCALED

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        """``unscale_(optimizer)`` unless done, then ``optimizer.step(*args, **kwargs)``
        unless a gradient was inf or NaN; returns what ``step`` returned, or None when
        skipped. Closures (``closure=``) are not supported (RuntimeError), as in torch.

        Device: reads the 4-byte found-inf flag (the iteration's one host sync)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        state = self._state(optimizer)
        if state.stage is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state.stage is _Stage.READY:
            self.unscale_(optimizer)
        if state.found is None:
            raise RuntimeError("No inf checks were recorded for this optimizer.")
        result = None if state.read() else optimizer.step(*args, **kwargs)
        state.stage = _Stage.STEPPED
        return result

    def update(self, new_scale: float | None = None) -> None:
        """End the iteration: set the scale to ``new_scale`` if given, else back off after
        a non-finite step of any optimizer (``scale *= backoff_factor``, tracker reset) or
        count a finite one (after ``growth_interval`` in a row, ``scale *= growth_factor``
        unless that overflows float32, tracker reset). Forgets the optimizers' stages.

        Device: no host read after ``step``; reads the flag of an optimizer that was
        unscaled but not stepped; a device-array ``new_scale`` is read (4 bytes)."""
        if not self._enabled:
            return
        if new_scale is not None:
            value = new_scale.get() if isinstance(new_scale, cla.Array) else np.asarray(new_scale)
            if value.size != 1 or (value.dtype.kind not in "fiu" and value.dtype != BFLOAT16):
                raise ValueError(
                    f"new_scale should be a float or a 1-element array, got {new_scale!r}"
                )
            self._scale = float(check_scaler_value("new_scale", value.reshape(-1)[0]))
        else:
            recorded = [s for s in self._per_optimizer.values() if s.found is not None]
            if not recorded:
                raise RuntimeError("No inf checks were recorded prior to update.")
            found = any([s.read() for s in recorded])
            self._scale, self._growth_tracker = next_scale(
                self._scale,
                self._growth_tracker,
                found,
                self._growth_factor,
                self._backoff_factor,
                self._growth_interval,
            )
        self._per_optimizer = {}

    def get_scale(self) -> float:
        """The current scale (1.0 when disabled). A host number: no sync."""
        return self._scale if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        """Checked as in the constructor (a finite number > 1.0): ValueError, unchanged."""
        self._growth_factor = float(check_scaler_value("growth_factor", new_factor))

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        """Checked as in the constructor (in (0, 1)): ValueError, unchanged."""
        self._backoff_factor = float(check_scaler_value("backoff_factor", new_factor))

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        """Checked as in the constructor (an int >= 1): ValueError, unchanged."""
        self._growth_interval = int(check_scaler_value("growth_interval", new_interval))

    def _get_growth_tracker(self) -> int:
        return self._growth_tracker if self._enabled else 0

    def is_enabled(self) -> bool:
        return self._enabled

    def state_dict(self) -> dict[str, Any]:
        """torch's keys: ``scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``_growth_tracker``; ``{}`` when disabled."""
        if not self._enabled:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (no-op when disabled), each checked as in the
        constructor (``_growth_tracker``: an int >= 0). On any error (ValueError naming the
        value or the missing keys) the scaler is left unchanged."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved "
                "from a disabled instance of GradScaler."
            )
        missing = [k for k in _STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(
                f"Invalid state dict: missing {', '.join(map(repr, missing))} "
                f"(must have the keys {', '.join(map(repr, _STATE_KEYS))})"
            )
        scale, growth, backoff, interval, tracker = [
            check_scaler_value(k, state_dict[k]) for k in _STATE_KEYS
        ]
        self._scale, self._growth_factor = float(scale), float(growth)
        self._backoff_factor = float(backoff)
        self._growth_interval, self._growth_tracker = int(interval), int(tracker)

    def __repr__(self) -> str:
        return (
            f"AMPGradScaler(scale={self.get_scale()}, growth_tracker={self._growth_tracker}, "
            f"enabled={self._enabled})"
        )
