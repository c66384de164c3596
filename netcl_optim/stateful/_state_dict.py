"""State dicts of the stateful optimizers, in torch's layout: export, and import with every
check done before anything changes.

What an optimizer keeps follows from its class's declaration: its hyperparameters (the group
keys), ``torch_state`` (the per-parameter keys), ``torch_step`` (whether torch keeps
``"step"``) and ``torch_marks`` (flags naming the class in torch's dicts, such as Adam's and
AdamW's ``decoupled_weight_decay``).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyopencl.array as cla

from .._device import BFLOAT16
from .._validation import invalid
from ..fusion import BLOCK_8BIT, QuantizedSlice, dynamic_map, is_quantized, set_value, state_size
from ._declaration import STOCHASTIC_ROUNDING, as_stored
from ._groups import Group
from ._torch_state import STEP, key_shapes, keys_of

if TYPE_CHECKING:
    from ._optimizer import Optimizer

BNB_NESTED = "__bnb_optimizer_quant_state__"  # bitsandbytes' state dicts nest 8-bit state here

# torch's implementation flags: they change nothing here, dropped on load
_IGNORED_ON_LOAD = ("foreach", "differentiable", "fused", "capturable", "param_names")
# torch's options refused when True, unless the class declares them as hyperparameters
_FALSE_ONLY = ("amsgrad", "maximize")


def param_state(opt: Optimizer, rec: Group, i: int, host: bool) -> dict[str, Any]:
    """Parameter ``i``'s entry: ``"step"`` (if the class keeps it) and each buffer it has
    (numpy copies when ``host``, else live device views); ``{}`` before its first step."""
    if not rec.has_state(i):
        return {}
    entry: dict[str, Any] = {}
    group = next(g for g, r in zip(opt.param_groups, opt._groups, strict=True) if r is rec)
    if _keeps_step(type(opt), group):
        entry[STEP] = float(rec.steps[i])
    if opt.torch_scalars:
        for k, fn in opt.torch_scalars.items():
            entry[k] = np.float32(fn(group, rec.steps[i]))
    shapes = opt._state_shapes(rec)
    for k in opt._state_keys:
        counts = rec.counts.get(k)
        absent = rec.state_shape(i, shapes.get(k)) is None  # a placeholder
        if counts is not None and counts[i] > 0 and not absent:
            v = rec.bufs[k][i]
            if type(v) is QuantizedSlice:  # a ZeRO slice's pieces (see _slice_arrays)
                if host:
                    absmax_key, qmap_key = opt.quantized_keys(k)
                    entry[k], entry[absmax_key], signed, entry[unquantized_key(k)] = _slice_arrays(
                        v
                    )
                    entry[qmap_key] = dynamic_map(signed).copy()
                else:
                    entry[k] = v
            elif is_quantized(v):  # codes under the key, with its absmax and map beside
                absmax_key, qmap_key = opt.quantized_keys(k)
                entry[k] = v.codes.get() if host else v.codes
                entry[absmax_key] = v.absmax.get() if host else v.absmax
                entry[qmap_key] = dynamic_map(v.signed).copy()
            else:
                entry[k] = v.get() if host else v
    if opt.bnb_layout:  # bitsandbytes nests all but the step (hidden from FSDP)
        nested = {k: v for k, v in entry.items() if k != STEP}
        entry = {STEP: int(rec.steps[i]), BNB_NESTED: nested} if nested else entry
    return entry


def unquantized_key(key: str) -> str:
    """The key of a ZeRO slice's float32 state (of its pieces of parameters below
    ``min_8bit_size``) beside 8-bit ``key``."""
    return key + "_float32"


def _slice_arrays(v: QuantizedSlice) -> tuple[np.ndarray, np.ndarray, bool, np.ndarray]:
    """A ZeRO slice's 8-bit state on the host: ``(codes, absmax, signed, unquantized)``:
    codes shaped like the slice (its pieces' in place, 0 where a piece keeps float32), the
    quantized pieces' absmax end to end, their map, the other pieces' float32 end to end."""
    codes = np.zeros(state_size(v), np.uint8)
    absmax, plain, signed, k = [], [], False, 0
    for piece in v.pieces:
        n = state_size(piece)
        if is_quantized(piece):
            codes[k : k + n] = piece.codes.get().reshape(-1)
            absmax.append(piece.absmax.get())
            signed = bool(piece.signed)
        else:
            plain.append(piece.get().reshape(-1))
        k += n
    f32 = np.zeros(0, np.float32)
    return codes, np.concatenate([f32, *absmax]), signed, np.concatenate([f32, *plain])


def export(opt: Optimizer) -> dict[str, Any]:
    """See :meth:`Optimizer.state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    groups = []
    start = 0
    for group, rec in zip(opt.param_groups, opt._groups, strict=True):
        packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        packed.update(opt.torch_marks)
        packed = opt.exported_group(packed)
        n = len(rec.params)
        packed["params"] = list(range(start, start + n))
        for i in range(n):
            entry = param_state(opt, rec, i, host=True)
            if entry:
                state[start + i] = entry
        groups.append(packed)
        start += n
    return {"state": state, "param_groups": groups, "optimizer": type(opt).__name__}


def load(opt: Optimizer, state_dict: Mapping[str, Any], classes: list[type[Optimizer]]) -> None:
    """See :meth:`Optimizer.load_state_dict`; ``classes``: every declared optimizer class,
    to name the one a foreign state dict belongs to."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("a state dict has the keys 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)):
        raise ValueError(
            f"loaded 'param_groups' is a {type(saved_groups).__name__}, not a list of "
            "param group dicts"
        )
    saved_groups = list(saved_groups)
    for gi, saved in enumerate(saved_groups):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(
                f"loaded param_groups[{gi}] is not a param group dict (with a list 'params')"
            )
    if not isinstance(state_dict["state"], Mapping):
        raise ValueError(
            f"loaded 'state' is a {type(state_dict['state']).__name__}, not a dict of "
            "parameter index -> state"
        )
    saved_groups = [opt.imported_group(g) for g in saved_groups]
    _check_origin(opt, state_dict, saved_groups, classes)
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, the optimizer "
            f"has {len(opt.param_groups)}"
        )
    where: dict[int, tuple[int, int]] = {}
    for gi, (saved, rec) in enumerate(zip(saved_groups, opt._groups, strict=True)):
        ids = saved["params"]
        if len(ids) != len(rec.params):
            raise ValueError(
                f"loaded state dict contains a parameter group that doesn't match the size "
                f"of optimizer's group: param_groups[{gi}] has {len(ids)} parameters, the "
                f"optimizer's has {len(rec.params)}"
            )
        for i, pid in enumerate(ids):
            where[_index(pid)] = (gi, i)
    new_groups = [_import_group(opt, saved, gi) for gi, saved in enumerate(saved_groups)]

    group_keys = [_group_keys(type(opt), group) for group in new_groups]
    shapes = [_shapes(type(opt), group) for group in new_groups]
    min_sizes = [opt._declaration.storage(group).min_8bit_size for group in new_groups]
    staged = []
    for pid, entry in state_dict["state"].items():
        idx = _index(pid)
        if idx not in where:
            raise ValueError(f"loaded state refers to parameter {pid!r}, which is in no group")
        gi, i = where[idx]
        keys = group_keys[gi]
        imported = _import_entry(
            opt, entry, opt._groups[gi], i, idx, keys, shapes[gi], min_sizes[gi]
        )
        staged.append((gi, i, *imported))

    for group, rec, new in zip(opt.param_groups, opt._groups, new_groups, strict=True):
        group.clear()
        group.update(new)
        group["params"] = list(rec.params)
        rec.reset()
    chains = {gi: opt._chain(gi) for gi in {gi for gi, *_ in staged}}
    for gi, i, step, arrays in staged:
        rec, chain = opt._groups[gi], chains[gi]
        rec.steps[i] = step
        for k, a in arrays.items():
            rec.ensure(k, chain.starts.get(k, 0.0), shapes[gi].get(k), chain.dtype_of(k))
            _set_loaded(rec.bufs[k][i], a)
            rec.counts[k][i] = max(step, 1)


def _check_origin(
    opt: Optimizer,
    state_dict: Mapping[str, Any],
    groups: list[Mapping[str, Any]],
    classes: list[type[Optimizer]],
) -> None:
    """Refuse the state dict of another optimizer class, naming both.

    Ours name their class. torch's (and ours saved before the name was) are told apart by
    their hyperparameter names and the classes' ``torch_marks`` (Adam/AdamW's
    ``decoupled_weight_decay``); torch has no Momentum: its SGD dicts load into Momentum when
    undampened (the same maths; Momentum's validation refuses a dampening).
    """
    name = type(opt).__name__
    origin = state_dict.get("optimizer")
    if origin is not None and not isinstance(origin, str):
        raise ValueError(
            f"loaded state dict has an invalid 'optimizer' entry: {origin!r} (must be the "
            "name of the optimizer class that saved it)"
        )
    if origin is not None and origin != name:
        raise ValueError(
            f"loaded state dict is {origin}'s, not {name}'s: load it into the class that "
            f"saved it ({origin})"
        )
    known = {k for c in classes for k in c._declaration.names}
    mark_keys = {k for c in classes for k in c.torch_marks}
    own = set(opt._declaration.names)
    for gi, saved in enumerate(groups):
        # a mark (Adam's decoupled_weight_decay) is a hyperparameter of others (NAdam, RAdam)
        keys = set(saved) & known - (mark_keys - own) - set(opt.ignored_on_load)
        marks = {k: bool(saved[k]) for k in sorted(mark_keys) if saved.get(k) is not None}
        if _marked(type(opt), marks) and (origin is not None or keys <= own):
            continue
        candidates = [c for c in classes if _marked(c, marks)]
        like = {c.__name__ for c in candidates if set(c._declaration.names) == keys} or {
            c.__name__ for c in candidates if keys <= set(c._declaration.names)
        }  # the classes with exactly these hyperparameters, else with at least these
        what = f"hyperparameters {sorted(keys)}" + "".join(f", {k}={v}" for k, v in marks.items())
        whose = " or ".join(f"{n}'s" for n in sorted(like)) or "another optimizer's"
        raise ValueError(f"loaded param_groups[{gi}] is {whose}, not {name}'s ({what})")


def _marked(cls: type[Optimizer], marks: Mapping[str, bool]) -> bool:
    """Whether ``cls``'s ``torch_marks`` agree with a saved group's ``marks`` (a mark that is
    one of ``cls``'s hyperparameters, as NAdam's ``decoupled_weight_decay``, agrees always)."""
    names = cls._declaration.names
    return all(cls.torch_marks.get(k) == v for k, v in marks.items() if k not in names)


def _import_group(opt: Optimizer, saved: Mapping[str, Any], gi: int) -> dict[str, Any]:
    where = f"loaded param_groups[{gi}]"
    declaration = opt._declaration
    group = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
    for k in (*_IGNORED_ON_LOAD, *opt.ignored_on_load):
        if k not in declaration.names:
            group.pop(k, None)
    for k in _FALSE_ONLY:
        if k not in declaration.names and group.pop(k, False):
            raise invalid(k, True, f"False: {type(opt).__name__} does not implement it", where)
    for k in opt.torch_marks:  # the class: checked by _check_origin
        group.pop(k, None)
    for k, v in opt.defaults.items():
        group.setdefault(k, v)
    for k in declaration.names:
        group[k] = as_stored(group[k])
    declaration.validate(group, where, in_group=True)
    return group


def _group_keys(cls: type[Optimizer], group: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys a saved entry of a parameter in ``group`` (validated) holds once it has state:
    ``"step"`` (if the class keeps one) and the buffers of the group's chain (Adam's
    ``max_exp_avg_sq`` only where ``amsgrad``)."""
    values = cls._declaration.validate(group, in_group=True)
    template = cls.functional(**values).init([])
    keys = keys_of(template, cls._torch_states, cls.__name__)
    return ((STEP,) if _keeps_step(cls, group) else ()) + tuple(keys)


def _keeps_step(cls: type[Optimizer], group: Mapping[str, Any]) -> bool:
    """Whether a parameter's entry holds ``"step"``: torch's does, or stochastic rounding
    counts the parameter's steps (its generator's counter)."""
    return cls.torch_step or bool(group.get(STOCHASTIC_ROUNDING, False))


def _shapes(cls: type[Optimizer], group: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``group``'s chain not shaped like their parameter (see ``key_shapes``)."""
    values = cls._declaration.validate(group, in_group=True)
    return key_shapes(cls.functional(**values), cls._torch_states)


def _import_entry(
    opt: Optimizer,
    entry: Any,
    rec: Group,
    i: int,
    pid: int,
    keys: tuple[str, ...],
    shapes: Mapping[str, Any] | None = None,
    min_size: int = 4096,
) -> tuple[int, dict[str, np.ndarray]]:
    where = f"loaded state of parameter {pid}"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} is a {type(entry).__name__}, not a dict")
    if isinstance(entry.get(BNB_NESTED), Mapping):  # bitsandbytes' layout
        entry = {**{k: v for k, v in entry.items() if k != BNB_NESTED}, **entry[BNB_NESTED]}
    shapes = shapes or {}
    # the keys this parameter has (Adafactor: row_var and col_var, or variance)
    keys = tuple(k for k in keys if k == STEP or rec.state_shape(i, shapes.get(k)) is not None)
    companions = {c: k for k in keys if k != STEP for c in opt.quantized_keys(k)}
    pieces = rec.pieces(i)  # (a ZeRO slice: its 8-bit state keeps float32 beside)
    if pieces is not None:
        companions.update({unquantized_key(k): k for k in keys if k != STEP})
    unknown = set(entry) - {STEP, *keys, *opt.torch_scalars, *companions}
    if unknown:
        raise ValueError(
            f"{where} has keys {sorted(unknown)} that {type(opt).__name__} does not use "
            "with its group's hyperparameters"
        )
    arrays: dict[str, Any] = {}
    for k in keys:
        if k == STEP:
            continue
        v = entry.get(k)
        if v is None:  # absent (torch may also hold None before a first step)
            continue
        a = _host(v)
        shape = tuple(rec.state_shape(i, shapes.get(k)))
        if a.shape != shape:
            raise ValueError(f"{where}: {k!r} has shape {a.shape}, expected {shape}")
        absmax_key, qmap_key = opt.quantized_keys(k)
        if a.dtype == np.uint8 and pieces is not None:  # a ZeRO slice's 8-bit state
            codes, absmax, qmap = _quantized_entry(entry, k, a, absmax_key, qmap_key, where,
                                                   _blocks(pieces, min_size))  # fmt: skip
            plain = _unquantized(entry, unquantized_key(k), pieces, min_size, where)
            arrays[k] = (codes, absmax, qmap, plain, [(m, n >= min_size) for n, m, _ in pieces])
            continue
        if a.dtype == np.uint8:  # 8-bit state: codes, with its absmax and map
            arrays[k] = _quantized_entry(entry, k, a, absmax_key, qmap_key, where)
            continue
        if a.dtype.kind not in "fiu" and a.dtype != BFLOAT16:
            raise ValueError(f"{where}: {k!r} has dtype {a.dtype}, not a float array")
        arrays[k] = a  # (cast to its buffer's dtype when loaded)
    if any(v is not None for v in entry.values()):
        missing = [k for k in keys if entry.get(k) is None]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
    step = 1 if arrays else 0
    if entry.get(STEP) is not None:
        s = np.asarray(entry[STEP])
        f = float(s) if s.size == 1 and s.dtype.kind in "fiu" else -1.0
        if not (f >= 0 and f == int(f)):
            raise ValueError(f"{where}: invalid step {entry[STEP]!r}")
        step = int(f)
    return step, arrays


def _host(v: Any) -> np.ndarray:
    """A loaded value as a numpy array (a device array read back; a torch CPU tensor)."""
    if isinstance(v, cla.Array):
        return v.get()
    if type(v).__module__.startswith("torch"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _quantized_entry(
    entry: Mapping[str, Any],
    k: str,
    codes: np.ndarray,
    absmax_key: str,
    qmap_key: str,
    where: str,
    blocks: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, absmax, map)`` of the 8-bit state under ``k``, checked (ValueError);
    ``blocks``: the absmax count (one per 256 codes by default)."""
    if entry.get(absmax_key) is None or entry.get(qmap_key) is None:
        raise ValueError(
            f"{where}: {k!r} holds 8-bit codes without {absmax_key!r} and {qmap_key!r}"
        )
    absmax, qmap = _host(entry[absmax_key]), _host(entry[qmap_key])
    blocks = -(-codes.size // BLOCK_8BIT) if blocks is None else blocks
    if absmax.shape != (blocks,) or absmax.dtype.kind != "f":
        raise ValueError(
            f"{where}: {absmax_key!r} has {absmax.dtype} {absmax.shape}, expected float32 "
            f"({blocks},) (one per 256-element block)"
        )
    if qmap.shape != (256,) or qmap.dtype.kind != "f":
        raise ValueError(f"{where}: {qmap_key!r} has {qmap.dtype} {qmap.shape}, expected (256,)")
    return codes, absmax.astype(np.float32), qmap.astype(np.float32)


def _blocks(pieces: list[tuple[int, int, int]], min_size: int) -> int:
    """The absmax count of a ZeRO slice's 8-bit state (its ``fusion.slice_pieces``)."""
    return sum(-(-m // BLOCK_8BIT) for n, m, _ in pieces if n >= min_size)


def _unquantized(
    entry: Mapping[str, Any], key: str, pieces: list[tuple[int, int, int]], min_size: int,
    where: str,
) -> np.ndarray:  # fmt: skip
    """A ZeRO slice's float32 state beside its codes (under ``key``), checked."""
    want = (sum(m for n, m, _ in pieces if n < min_size),)
    a = _host(entry[key]) if entry.get(key) is not None else None
    if a is None or a.shape != want or a.dtype.kind != "f":
        got = "absent" if a is None else f"{a.dtype} {a.shape}"
        raise ValueError(f"{where}: {key!r} is {got}, expected float32 {want} (the slice's "
                         f"parameters below min_8bit_size={min_size})")  # fmt: skip
    return a.astype(np.float32)


def _set_loaded(buf: Any, loaded: Any) -> None:
    """Write a loaded value into a state buffer: an array (cast, or quantized into 8-bit
    state), or 8-bit state ``(codes, absmax, map)`` (copied where the buffer is 8-bit state
    with that map; else dequantized with its map and stored as the buffer is)."""
    if not isinstance(loaded, tuple):
        if loaded.size:
            set_value(buf, loaded)
        return
    if len(loaded) == 5:  # a ZeRO slice's: its pieces' codes and float32 state
        _set_slice(buf, *loaded)
        return
    codes, absmax, qmap = loaded
    if is_quantized(buf) and np.array_equal(qmap, dynamic_map(buf.signed)):
        buf.codes.set(np.ascontiguousarray(codes, np.uint8).reshape(buf.codes.shape))
        buf.absmax.set(np.ascontiguousarray(absmax, np.float32))
        return
    flat = np.asarray(codes).reshape(-1)
    values = qmap[flat] * np.repeat(absmax, 256)[: flat.size]
    set_value(buf, values.astype(np.float32).reshape(np.shape(codes)))


def _set_slice(
    buf: Any,
    codes: np.ndarray,
    absmax: np.ndarray,
    qmap: np.ndarray,
    plain: np.ndarray,
    pieces: list[tuple[int, bool]],
) -> None:
    """Write a ZeRO slice's loaded 8-bit state (see ``_slice_arrays``; ``pieces``: each
    piece's size and whether it is quantized) into ``buf``: piece by piece where ``buf`` is
    such 8-bit state with that map, else as values."""
    parts, k = [], 0  # per piece: (codes, absmax) or its float32 values
    a = u = 0
    for m, quantized in pieces:
        if quantized:
            b = -(-m // BLOCK_8BIT)
            parts.append((codes[k : k + m], absmax[a : a + b]))
            a += b
        else:
            parts.append(plain[u : u + m])
            u += m
        k += m
    same = type(buf) is QuantizedSlice and [is_quantized(p) for p in buf.pieces] == [
        q for _, q in pieces
    ]
    if same and all(np.array_equal(qmap, dynamic_map(p.signed))
                    for p in buf.pieces if is_quantized(p)):  # fmt: skip
        for piece, part in zip(buf.pieces, parts, strict=True):
            _set_loaded(piece, (*part, qmap) if isinstance(part, tuple) else part)
        return
    values = [np.zeros(0, np.float32)]
    for part in parts:
        if isinstance(part, tuple):
            c, x = part
            part = (qmap[c] * np.repeat(x, BLOCK_8BIT)[: c.size]).astype(np.float32)
        values.append(part)
    set_value(buf, np.concatenate(values))


def _index(pid: Any) -> int:
    if isinstance(pid, bool):
        raise ValueError(f"invalid parameter index {pid!r} in the state dict")
    if isinstance(pid, (numbers.Integral, np.integer)):
        return int(pid)
    if isinstance(pid, str) and pid.isdigit():
        return int(pid)
    raise ValueError(f"invalid parameter index {pid!r} in the state dict")
