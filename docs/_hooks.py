"""mkdocs hooks: the API reference (``docs/reference/``) generated at build time.

Every public name of ``netcl_optim`` (its ``__all__``) and of ``netcl_optim.distributed`` gets
a ``::: identifier`` entry (mkdocstrings renders its docstring) on the page of the module that
defines it. Each optimizer family (a module of ``netcl_optim/optimizers/``) gets a page with
its state (computed: ``tx.init(params)`` and the stateful class's torch keys) and runnable
examples, both generated from ``tests/optimizer_table.py``. ``on_config`` fills the nav's
"API reference" entry with these pages; ``on_files`` adds them to the build.

``tests/test_docs_reference.py`` imports this file: every public name is on a page, every
example runs and prints the state keys given here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _table() -> Any:
    """tests/optimizer_table.py (mkdocs restores sys.path after loading a hook: add the
    paths when needed)."""
    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    return importlib.import_module("optimizer_table")


NAV_TITLE = "API reference"

# the pages besides the optimizer families: file -> (title, introduction)
PAGES = {
    "transforms.md": (
        "Transforms and combinators",
        "The functional core, optax's names and semantics: `GradientTransformation` and the "
        "building blocks new rules are made of, the transforms, the combinators and wrappers, "
        "and the functional dynamic loss scaling.",
    ),
    "schedules.md": (
        "Schedules",
        "Schedule functions (optax's names): each maps a step count to a value and can be given "
        "wherever a hyperparameter accepts a schedule.",
    ),
    "stateful.md": (
        "Stateful layer",
        "torch's contract: `Parameter`, the `Optimizer` base class (declarations, param groups, "
        "state dicts), LR schedulers, gradient clipping, `AMPGradScaler` and SWA / EMA "
        "averaging. The optimizer classes are on the [optimizer pages](optimizers/index.md).",
    ),
    "checkpoints.md": (
        "Checkpoints",
        "`save` and `load`: atomic checkpoints of optimizers, functional states and params; a "
        "resumed run continues bit for bit.",
    ),
    "distributed.md": (
        "Distributed",
        "Data parallel training over MPI (`import netcl_optim.distributed as dist`; mpi4py is "
        "imported only when a function is called): gradient all-reduce, parameter broadcast and "
        "ZeRO stage 1.",
    ),
    "device.md": (
        "Devices and arrays",
        "Queues and contexts, host <-> device copies, packed buffers, and the executor's "
        "launch counter and caches.",
    ),
}

# defining module (its last part for transforms) -> page, and the section it goes in
_TRANSFORM_SECTIONS = {
    "_base": "Core types: transforms, fragments, reductions",
    "_combining": "Combinators",
    "_update": "Applying updates",
    "_scaling": "Scaling",
    "_adaptive": "Adaptive scalings",
    "_momentum": "Momentum",
    "_weight_decay": "Weight decay",
    "_clipping": "Clipping",
    "_blocks": "Sums over a block (per leaf, row or unit)",
    "_factored": "Factored second moment",
    "_masking": "Masking",
    "_wrappers": "Wrappers",
    "_hyperparams": "Injected hyperparameters",
    "_plateau": "Reduce on plateau",
    "_schedule_free": "Schedule-free",
    "_averaging": "Averages",
    "_ema": "EMA",
    "_monitor": "Monitoring",
    "_rounding": "Stochastic rounding",
    "_storage": "Low-precision state",
    "_quantized": "8-bit state",
    "_loss_scale": "Dynamic loss scaling (AMP)",
}
_STATEFUL_SECTIONS = {
    "_parameter": "Parameter",
    "_optimizer": "Optimizer",
    "_lr_scheduler": "LR schedulers",
    "_schedulers": "LR schedulers",
    "_lambda_lr": "LR schedulers",
    "_plateau": "LR schedulers",
    "_clip": "Gradient clipping",
    "_grad_scaler": "AMPGradScaler",
    "_swa": "SWA and EMA averaging",
}
# private modules of netcl_optim.optimizers whose public names a family re-exports
_PRIVATE_FAMILIES = {"_muon_layout": "muon"}
_DEVICE_SECTIONS = {
    "netcl_optim._device": "Queues and copies",
    "netcl_optim._packing": "Packed buffers",
    "netcl_optim.fusion._launch": "The executor",
    "netcl_optim.fusion._programs": "The executor",
}


@dataclass
class Entry:
    """A public name on a page: its identifier (for mkdocstrings) and its section."""

    name: str
    identifier: str
    section: str


@dataclass
class Page:
    path: str  # under reference/
    title: str
    intro: str = ""
    entries: list[Entry] = field(default_factory=list)


# ---------------------------------------------------------------------------- grouping


def _module_of(name: str, value: Any) -> str:
    if inspect.ismodule(value):
        return value.__name__
    if name == "Schedule":  # a typing alias: its __module__ is collections.abc
        return "netcl_optim.schedules._schedules"
    module = getattr(value, "__module__", None)
    if not isinstance(module, str) or not module.startswith("netcl_optim"):
        module = getattr(type(value), "__module__", "")
    return module


def place(name: str, module: str) -> tuple[str, str]:
    """The page (under reference/) and section of a public name defined in ``module``;
    raises ValueError for a module no page takes (add it above)."""
    parts = module.split(".")
    last = parts[-1]
    if module in ("netcl_optim.schedules",) or module.startswith("netcl_optim.schedules."):
        return "schedules.md", "Modules" if module == "netcl_optim.schedules" else "Schedules"
    if module == "netcl_optim.stateful":
        return "stateful.md", "Modules"
    if module.startswith("netcl_optim.stateful."):
        return "stateful.md", _STATEFUL_SECTIONS.get(last, "Other")
    if module.startswith("netcl_optim.optimizers."):
        return f"optimizers/{_PRIVATE_FAMILIES.get(parts[2], parts[2])}.md", ""
    if module.startswith("netcl_optim.distributed"):
        return "distributed.md", "Data parallel and ZeRO-1"
    if module == "netcl_optim._checkpoint":
        return "checkpoints.md", "Save and load"
    if module in _DEVICE_SECTIONS:
        return "device.md", _DEVICE_SECTIONS[module]
    if module.startswith(("netcl_optim.transforms.", "netcl_optim.amp.")) or module in (
        "netcl_optim._base",
        "netcl_optim.fusion._quantized",
    ):
        return "transforms.md", _TRANSFORM_SECTIONS.get(last, last.strip("_").title())
    raise ValueError(f"docs/_hooks.py: no reference page for {name!r} (defined in {module})")


def public_names() -> list[tuple[str, str]]:
    """(name, identifier) of every public name: ``netcl_optim.__all__`` and
    ``netcl_optim.distributed.__all__``."""
    import netcl_optim
    import netcl_optim.distributed as dist

    names = [(n, f"netcl_optim.{n}") for n in netcl_optim.__all__]
    names += [(n, f"netcl_optim.distributed.{n}") for n in dist.__all__]
    return names


def family_modules() -> list[str]:
    """The optimizer families: the public modules of ``netcl_optim.optimizers``."""
    import netcl_optim.optimizers as optimizers

    found = pkgutil.iter_modules(optimizers.__path__)
    return sorted(m.name for m in found if not m.name.startswith("_"))


def _value(identifier: str) -> Any:
    module, _, name = identifier.rpartition(".")
    return getattr(importlib.import_module(module), name)


@cache
def pages() -> dict[str, Page]:
    """Every reference page (path under reference/ -> Page), the entries in order."""
    out = {path: Page(path, title, intro) for path, (title, intro) in PAGES.items()}
    for family in family_modules():
        out[f"optimizers/{family}.md"] = Page(f"optimizers/{family}.md", family_title(family))
    for name, identifier in public_names():
        value = _value(identifier)
        path, section = place(name, _module_of(name, value))
        out[path].entries.append(Entry(name, identifier, section))
    return out


def family_title(family: str) -> str:
    """The family's page title: its module docstring's names before the first ``:`` or
    ``(``, e.g. "Adam and AdamW"."""
    module = importlib.import_module(f"netcl_optim.optimizers.{family}")
    first = (module.__doc__ or family).strip().split("\n")[0]
    for stop in (":", " ("):
        first = first.split(stop)[0]
    return first.strip().rstrip(".,") or family


# ---------------------------------------------------------------------------- state


def _sample_params() -> Any:
    import numpy as np

    import netcl_optim as no

    return no.to_device({"b": np.zeros(3, np.float32), "w": np.zeros((2, 3), np.float32)})


def state_structure(state: Any) -> str:
    """A functional state's structure: state types with their field names, nested states
    spelled out (``(ScaleByAdamState(count, mu, nu), EmptyState())``)."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        fields = []
        for name in state._fields:
            inner = getattr(state, name)
            nested = _has_states(inner)
            fields.append(f"{name}={state_structure(inner)}" if nested else name)
        return f"{type(state).__name__}({', '.join(fields)})"
    if isinstance(state, tuple):
        return (
            "("
            + ", ".join(state_structure(s) for s in state)
            + ("," if len(state) == 1 else "")
            + ")"
        )
    if isinstance(state, dict) and _has_states(state):
        return "{" + ", ".join(f"{k!r}: {state_structure(v)}" for k, v in state.items()) + "}"
    return "..."


def _has_states(node: Any) -> bool:
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return True
    if isinstance(node, tuple):
        return any(_has_states(n) for n in node)
    if isinstance(node, dict):
        return any(_has_states(n) for n in node.values())
    return False


def functional_state(tx: Any) -> str:
    return state_structure(tx.init(_sample_params()))


STEP_KWARGS: dict[str, dict[str, Any]] = {"PolyakSGD": {"value": 1.0}}  # (the loss)
SHAPE = (64, 64)  # the parameter's shape: 4096 elements, so 8-bit state is 8-bit


def stateful_keys(cls: type, kwargs: dict[str, Any]) -> list[str]:
    """The keys of ``cls([p], **kwargs).state[p]`` after one step (``train()`` first where
    the class has it)."""
    import numpy as np

    import netcl_optim as no

    p = no.Parameter(no.to_device(np.full(SHAPE, 0.5, np.float32)))
    opt = cls([p], **kwargs)
    if hasattr(opt, "train"):
        opt.train()
    p.grad = no.to_device(np.full(SHAPE, 0.1, np.float32))
    opt.step(**STEP_KWARGS.get(cls.__name__, {}))
    return sorted(opt.state[p])


# ---------------------------------------------------------------------------- the table


def table_rows(family: str) -> list[Any]:
    """The rows of tests/optimizer_table.py whose factory or class the family defines."""
    optimizer_table = _table()
    names = set(importlib.import_module(f"netcl_optim.optimizers.{family}").__all__)
    return [
        row
        for row in optimizer_table.OPTIMIZERS
        if (isinstance(row.factory, str) and row.factory in names) or row.stateful in names
    ]


def _plain(kwargs: dict[str, Any] | None) -> bool:
    """Arguments that can be written as Python literals (no schedules)."""
    return kwargs is not None and all(not callable(v) for v in kwargs.values())


def _call(name: str, kwargs: dict[str, Any], first: str = "") -> str:
    args = [first] if first else []
    args += [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"no.{name}({', '.join(args)})"


@dataclass
class StateRow:
    variant: str  # the table row's id, or the class's name
    functional: str  # the call, or ""
    functional_state: str
    stateful: str  # the call, or ""
    keys: list[str] | None  # None: no stateful class
    example: bool = True  # a generated example shows it (not the aliases that need a loss)


@cache
def state_rows(family: str) -> list[StateRow]:
    """The family's state: one row per table row (and per stateful class no row names)."""
    import netcl_optim as no

    out = []
    seen_classes = set()
    for row in table_rows(family):
        fn_call = fn_state = cls_call = ""
        keys = None
        if isinstance(row.factory, str) and _plain(row.kwargs):
            fn_call = _call(row.factory, row.kwargs)
            fn_state = functional_state(row.make(no))
        if row.stateful is not None and _plain(row.class_kwargs()):
            cls_call = _call(row.stateful, row.class_kwargs(), "params")
            keys = stateful_keys(getattr(no, row.stateful), row.class_kwargs())
            seen_classes.add(row.stateful)
        if fn_call or cls_call:
            out.append(StateRow(row.id, fn_call, fn_state, cls_call, keys))
    module = importlib.import_module(f"netcl_optim.optimizers.{family}")
    for name in module.__all__:
        value = getattr(module, name)
        extra = EXTRA_CLASS_KWARGS.get(name, {})
        if name in seen_classes or not _is_chain_optimizer(value, extra):
            continue
        out.append(
            StateRow(name, "", "", _call(name, extra, "params"), stateful_keys(value, extra))
        )
    for call in EXTRA_STATES.get(family, ()):
        tx = eval(call, {"no": no})
        out.append(StateRow(call.split("(")[0][3:], call, functional_state(tx), "", None, False))
    for name in module.__all__:
        value = getattr(module, name)
        if name in {r.functional.split("(")[0][3:] for r in out} or not _is_bare_alias(name, value):
            continue
        out.append(StateRow(name, f"no.{name}()", functional_state(value()), "", None, False))
    return out


# the families whose aliases need arguments the table does not give: their state from these
EXTRA_STATES: dict[str, tuple[str, ...]] = {
    "linesearch": ("no.scale_by_backtracking_linesearch(max_backtracking_steps=15)",),
    "zoom_linesearch": ("no.scale_by_zoom_linesearch(max_linesearch_steps=15)",),
    "lookahead": ("no.lookahead(no.sgd(0.1), sync_period=2, slow_step_size=0.5)",),
    "sam": ("no.sam(no.sgd(0.1), no.chain(no.normalize(), no.sgd(0.05)))",),
}

# stateful classes no table row names: the arguments their state is shown with
EXTRA_CLASS_KWARGS: dict[str, dict[str, Any]] = {"SGD8bit": {"momentum": 0.9}}


def _is_chain_optimizer(value: Any, kwargs: dict[str, Any]) -> bool:
    """A stateful class whose state is its chain's (not L-BFGS, not a wrapper)."""
    from netcl_optim import Optimizer

    if not (isinstance(value, type) and issubclass(value, Optimizer)):
        return False
    try:
        stateful_keys(value, kwargs)
    except TypeError:  # (L-BFGS: no chain; it documents its state in its docstring)
        return False
    return True


def _is_bare_alias(name: str, value: Any) -> bool:
    """A functional alias callable with no arguments (lbfgs, polyak_sgd)."""
    if not inspect.isfunction(value) or name.startswith("scale_by_") or name[0].isupper():
        return False
    params = inspect.signature(value).parameters.values()
    if any(p.default is p.empty and p.kind is not p.VAR_KEYWORD for p in params):
        return False
    return _returns_optimizer(value)


# ---------------------------------------------------------------------------- examples

_HEADER = "import numpy as np\nimport netcl_optim as no\n"


def _functional_example(call: str, shape: str = "(2, 3)") -> str:
    return f"""
# functional (optax's style): a pure transform over a tree of device arrays
params = no.to_device({{"w": np.full({shape}, 0.5, np.float32), "b": np.zeros(3, np.float32)}})
grads = no.to_device({{"w": np.full({shape}, 0.1, np.float32), "b": np.full(3, -0.2, np.float32)}})
tx = {call}
state = tx.init(params)
for _ in range(3):
    params, state = no.step(tx, params, grads, state)  # update and apply: one fused launch
print(no.to_host(params)["w"][0])
"""


def _stateful_example(call: str) -> str:
    name = call.split("(")[0][3:]
    call = call.replace("(params", "([w]", 1)
    train = (
        "opt.train()  # schedule-free: params hold y while training\n" if _has_train(name) else ""
    )
    step_args = ", ".join(f"{k}={v!r}" for k, v in STEP_KWARGS.get(name, {}).items())
    return f"""
# stateful (torch's style): parameters with .grad, step(), state[p]
w = no.Parameter(no.to_device(np.full({SHAPE}, 0.5, np.float32)))
opt = {call}
{train}for _ in range(3):
    w.grad = no.to_device(np.full({SHAPE}, 0.1, np.float32))
    opt.step({step_args})
print(sorted(opt.state[w]))  # the state keys
"""


def _has_train(name: str) -> bool:
    import netcl_optim as no

    return hasattr(getattr(no, name), "train")


@cache
def examples(family: str) -> list[tuple[str, str, list[str] | None]]:
    """The family's runnable examples: (title, code, the keys it prints or None). One per
    functional alias (its first table row without a schedule), with the row's stateful class
    the first time that class appears; hand-written ones for the families the table leaves
    out (``EXTRA_EXAMPLES``)."""
    out = []
    shown_factories: set[str] = set()
    shown_classes: set[str] = set()
    for row in state_rows(family):
        factory = row.functional.split("(")[0][3:]
        cls = row.stateful.split("(")[0][3:]
        code, titles, keys = _HEADER, [], None
        if not row.example:
            continue
        if row.functional and factory not in shown_factories:
            code += _functional_example(row.functional)
            titles.append(f"`{factory}`")
            shown_factories.add(factory)
        if row.stateful and cls not in shown_classes and (titles or not row.functional):
            code += _stateful_example(row.stateful)
            titles.append(f"`{cls}`")
            shown_classes.add(cls)
            keys = row.keys
        if titles:
            out.append((" and ".join(titles), code, keys))
    for title, code in EXTRA_EXAMPLES.get(family, ()):
        out.append((title, code, None))
    return out


# families whose use differs from "grads in, step out" (a loss, a closure, a wrapped
# optimizer) or that the table leaves out: their examples, run by the tests all the same
EXTRA_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "bnb8bit": [],  # (from the generated stateful rows below)
    "polyak": [
        (
            "`polyak_sgd` and `PolyakSGD` (the step needs the loss)",
            _HEADER
            + """
def loss_and_grads(w):  # f(w) = 0.5 ||w||^2
    return float(0.5 * (w * w).sum()), w

params = no.to_device({"w": np.array([1.0, -2.0, 0.5], np.float32)})
tx = no.polyak_sgd(max_learning_rate=1.0)
state = tx.init(params)
for _ in range(3):
    value, g = loss_and_grads(no.to_host(params)["w"])
    params, state = no.step(tx, params, no.to_device({"w": g}), state, value=value)
print(no.to_host(params)["w"])

w = no.Parameter(no.to_device(np.array([1.0, -2.0, 0.5], np.float32)))
opt = no.PolyakSGD([w], lr=1.0)
for _ in range(3):
    value, g = loss_and_grads(w.data.get())
    w.grad = no.to_device(g)
    opt.step(value=value)
print(sorted(opt.state[w]))
""",
        )
    ],
    "lookahead": [
        (
            "`lookahead` and `Lookahead`",
            _HEADER
            + """
fast = no.to_device({"w": np.full(4, 0.5, np.float32)})
tx = no.lookahead(no.sgd(0.1), sync_period=2, slow_step_size=0.5)
params = no.LookaheadParams(fast, no.to_device({"w": np.full(4, 0.5, np.float32)}))
state = tx.init(params)
for _ in range(4):
    grads = no.to_device({"w": np.full(4, 0.1, np.float32)})  # taken at params.fast
    updates, state = tx.update(grads, state, params)
    params = no.apply_updates(params, updates)
print(no.to_host(params.slow)["w"])

w = no.Parameter(no.to_device(np.full(4, 0.5, np.float32)))
opt = no.Lookahead(no.AdamW([w], lr=1e-2), k=2, alpha=0.5)
for _ in range(4):
    w.grad = no.to_device(np.full(4, 0.1, np.float32))
    opt.step()
print(sorted(opt.state[w]))
""",
        )
    ],
    "sam": [
        (
            "`sam` and `SAM`",
            _HEADER
            + """
def grads_at(w):  # f(w) = 0.5 ||w||^2
    return no.to_device({"w": w})

tx = no.sam(no.sgd(0.1), no.chain(no.normalize(), no.sgd(0.05)))  # the paper's SAM
params = no.to_device({"w": np.array([1.0, -2.0], np.float32)})
state = tx.init(params)
for _ in range(4):  # ascent, outer step, ascent, outer step
    grads = grads_at(no.to_host(params)["w"])
    updates, state = tx.update(grads, state, params)
    params = no.apply_updates(params, updates)
print(no.to_host(params)["w"])

w = no.Parameter(no.to_device(np.array([1.0, -2.0], np.float32)))
opt = no.SAM([w], no.SGD, rho=0.05, lr=0.1)

def closure():  # sets the gradients at the current (perturbed) params, returns the loss
    v = w.data.get()
    w.grad = no.to_device(v)
    return float(0.5 * (v * v).sum())

for _ in range(2):
    w.grad = no.to_device(w.data.get())
    opt.step(closure)
print(w.data.get())
""",
        )
    ],
    "lbfgs": [
        (
            "`lbfgs` (optax's, with the zoom line search)",
            _HEADER
            + """
def fn(params, **kwargs):  # f(w) = sum((w - 1)^2): (value, grads)
    w = no.to_host(params)["w"]
    return float(((w - 1.0) ** 2).sum()), no.to_device({"w": 2.0 * (w - 1.0)})

params = no.to_device({"w": np.zeros(4, np.float64)})
tx = no.lbfgs()
value_and_grad = no.value_and_grad_from_state(fn)
state = tx.init(params)
for _ in range(5):
    value, grads = value_and_grad(params, state=state)
    updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=fn)
    params = no.apply_updates(params, updates)
print(no.to_host(params)["w"])
""",
        )
    ],
    "torch_lbfgs": [
        (
            "`LBFGS` (torch's, with a closure)",
            _HEADER
            + """
w = no.Parameter(no.to_device(np.zeros(4, np.float64)))

def closure():  # f(w) = sum((w - 1)^2): sets w.grad, returns the loss
    v = w.data.get()
    w.grad = no.to_device(2.0 * (v - 1.0))
    return float(((v - 1.0) ** 2).sum())

opt = no.LBFGS([w], history_size=10, line_search_fn="strong_wolfe")
opt.step(closure)
print(w.data.get())
print(sorted(opt.state[w]))
""",
        )
    ],
    "linesearch": [
        (
            "`scale_by_backtracking_linesearch` after SGD",
            _HEADER
            + """
def fn(params, **kwargs):  # f(w) = sum(w^2)
    w = no.to_host(params)["w"]
    return float((w * w).sum())

params = no.to_device({"w": np.array([1.0, -2.0], np.float64)})
tx = no.chain(no.sgd(1.0), no.scale_by_backtracking_linesearch(max_backtracking_steps=15))
state = tx.init(params)
for _ in range(3):
    w = no.to_host(params)["w"]
    grads = no.to_device({"w": 2.0 * w})
    updates, state = tx.update(grads, state, params, value=fn(params), grad=grads, value_fn=fn)
    params = no.apply_updates(params, updates)
print(no.to_host(params)["w"])
""",
        )
    ],
    "zoom_linesearch": [
        (
            "`scale_by_zoom_linesearch` after SGD",
            _HEADER
            + """
def fn(params, **kwargs):  # f(w) = sum(w^2): (value, grads), as the zoom search needs
    w = no.to_host(params)["w"]
    return float((w * w).sum()), no.to_device({"w": 2.0 * w})

params = no.to_device({"w": np.array([1.0, -2.0], np.float64)})
tx = no.chain(no.sgd(1.0), no.scale_by_zoom_linesearch(max_linesearch_steps=15))
state = tx.init(params)
for _ in range(3):
    value, grads = fn(params)
    updates, state = tx.update(grads, state, params, value=value, grad=grads, value_fn=fn)
    params = no.apply_updates(params, updates)
print(no.to_host(params)["w"])
""",
        )
    ],
}


def all_examples() -> list[tuple[str, str, str, list[str] | None]]:
    """(family, title, code, printed keys or None) of every example on the reference."""
    return [(f, *example) for f in family_modules() for example in examples(f)]


# ---------------------------------------------------------------------------- markdown


def _directive(identifier: str) -> str:
    return f"::: {identifier}\n"


def _render_entries(entries: Iterable[Entry], sectioned: bool) -> str:
    text = ""
    section = None
    for entry in entries:
        if sectioned and entry.section != section:
            section = entry.section
            text += f"\n## {section}\n\n"
        text += _directive(entry.identifier)
        if inspect.ismodule(_value(entry.identifier)):  # its members have entries of their own
            text += "    options:\n      members: false\n"
        text += "\n"
    return text


def _sorted_sections(page: Page) -> list[Entry]:
    """Entries grouped by section, sections in first-appearance order of the section map."""
    order = [
        *_TRANSFORM_SECTIONS.values(),
        *_STATEFUL_SECTIONS.values(),
        *_DEVICE_SECTIONS.values(),
    ]
    order = ["Modules", *dict.fromkeys(order)]

    def key(entry: Entry) -> tuple[int, str]:
        rank = order.index(entry.section) if entry.section in order else len(order)
        return rank, entry.name.lower()

    return sorted(page.entries, key=key)


def _family_kinds(page: Page) -> list[tuple[str, list[Entry]]]:
    """A family's names: functional aliases, stateful classes, building blocks and states."""
    from netcl_optim import Optimizer

    aliases, classes, blocks = [], [], []
    for entry in page.entries:
        value = _value(entry.identifier)
        if isinstance(value, type) and (issubclass(value, Optimizer) or hasattr(value, "step")):
            classes.append(entry)
        elif (
            inspect.isfunction(value)
            and not entry.name.startswith("scale_by_")
            and (_returns_optimizer(value))
        ):
            aliases.append(entry)
        else:
            blocks.append(entry)
    kinds = [("Functional", aliases), ("Stateful", classes), ("Building blocks and states", blocks)]
    return [(title, entries) for title, entries in kinds if entries]


def _returns_optimizer(fn: Callable[..., Any]) -> bool:
    factories = {r.factory for r in _table().OPTIMIZERS}
    name = fn.__name__
    return name in factories or name in {"lbfgs", "polyak_sgd", "sam", "lookahead"}


def _table_cell(text: str) -> str:
    return text.replace("|", "\\|") if text else "-"


def family_page(family: str) -> str:
    page = pages()[f"optimizers/{family}.md"]
    kinds = _family_kinds(page)
    text = f"# {page.title}\n\n"
    text += f"Module `netcl_optim.optimizers.{family}` "
    text += "(every name below is exported by `netcl_optim`).\n\n"
    text += "| | |\n|---|---|\n"
    for title, entries in kinds:
        links = ", ".join(f"[`{e.name}`][{e.identifier}]" for e in entries)
        text += f"| {title} | {links} |\n"
    text += "\nEach docstring gives the update rule, the defaults and how it differs from torch's "
    text += "or optax's rule of the same name.\n"
    rows = state_rows(family)
    if rows:
        text += "\n## State\n\n"
        text += "Computed from the code: the functional state is `tx.init(params)`'s structure, "
        text += "the stateful keys are `opt.state[p]`'s after a step (torch's names). The "
        text += "variants are the rows of `tests/optimizer_table.py`.\n\n"
        text += (
            "| variant | functional | state (`tx.init(params)`) | stateful | `state[p]` keys |\n"
        )
        text += "|---|---|---|---|---|\n"
        for row in rows:
            keys = "-" if row.keys is None else ", ".join(f"`{k}`" for k in row.keys) or "(none)"
            text += (
                f"| `{row.variant}` | {_code(row.functional)} | {_code(row.functional_state)} "
                f"| {_code(row.stateful)} | {keys} |\n"
            )
    elif family == "torch_lbfgs":
        text += "\n## State\n\ntorch's L-BFGS state, one entry for the single param group: see "
        text += "the class's docstring below.\n"
    example_list = examples(family)
    if example_list:
        text += "\n## Examples\n\n"
        for title, code, _ in example_list:
            text += f"### {title}\n\n```python\n{code.strip()}\n```\n\n"
    text += "\n## API\n\n"
    for title, entries in kinds:
        text += f"\n### {title}\n\n"
        for entry in entries:
            text += _directive(entry.identifier) + _FAMILY_OPTIONS
    return text


# an optimizer class's declaration (hyperparameters, torch_state, ...) is the machinery the
# Optimizer page documents: its signature and docstring say what a user needs
_FAMILY_OPTIONS = """    options:
      heading_level: 4
      filters: ["!^_", "!^(hyperparameters|torch_state|torch_step|torch_marks|functional)$"]

"""


def _code(text: str) -> str:
    return f"`{text}`".replace("|", "\\|") if text else "-"


def optimizers_index() -> str:
    text = "# Optimizers\n\n"
    text += "One page per family (a module of `netcl_optim/optimizers/`): its functional "
    text += "aliases (optax's names and signatures), its stateful classes (torch's names and "
    text += "signatures where torch has the optimizer), its building blocks, its state and "
    text += "runnable examples.\n\n"
    text += "| family | functional | stateful |\n|---|---|---|\n"
    for family in family_modules():
        page = pages()[f"optimizers/{family}.md"]
        kinds = dict(_family_kinds(page))
        cells = [
            ", ".join(f"`{e.name}`" for e in kinds.get(kind, [])) or "-"
            for kind in ("Functional", "Stateful")
        ]
        text += f"| [{page.title}]({family}.md) | {cells[0]} | {cells[1]} |\n"
    return text


def reference_index() -> str:
    text = "# API reference\n\n"
    text += "Generated from the docstrings: every public name of `netcl_optim` (its `__all__`) "
    text += "and of `netcl_optim.distributed`.\n\n"
    text += "| page | what is there |\n|---|---|\n"
    text += "| [Optimizers](optimizers/index.md) | one page per optimizer family: functional "
    text += "alias, stateful class, building blocks, state keys and examples |\n"
    for path, (title, intro) in PAGES.items():
        text += f"| [{title}]({path}) | {intro.split(':')[0].split('.')[0]} |\n"
    return text


def plain_page(path: str) -> str:
    page = pages()[path]
    entries = _sorted_sections(page)
    return f"# {page.title}\n\n{page.intro}\n" + _render_entries(entries, sectioned=True)


def reference_pages() -> dict[str, str]:
    """Every generated page: path under docs/ -> markdown."""
    out = {
        "reference/index.md": reference_index(),
        "reference/optimizers/index.md": optimizers_index(),
    }
    for path in PAGES:
        out[f"reference/{path}"] = plain_page(path)
    for family in family_modules():
        out[f"reference/optimizers/{family}.md"] = family_page(family)
    return out


def reference_nav() -> list[Any]:
    """The nav of the API reference section."""
    families = [
        {pages()[f"optimizers/{f}.md"].title: f"reference/optimizers/{f}.md"}
        for f in family_modules()
    ]
    nav: list[Any] = [{"Overview": "reference/index.md"}]
    nav.append({"Transforms and combinators": "reference/transforms.md"})
    nav.append({"Optimizers": [{"All optimizers": "reference/optimizers/index.md"}, *families]})
    for path in ("schedules.md", "stateful.md", "checkpoints.md", "distributed.md", "device.md"):
        nav.append({PAGES[path][0]: f"reference/{path}"})
    return nav


# ---------------------------------------------------------------------------- mkdocs hooks


def on_config(config: Any) -> Any:
    """Replace the nav's "API reference" entry by the generated pages."""
    nav = config.get("nav") or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and NAV_TITLE in item:
            nav[i] = {NAV_TITLE: reference_nav()}
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, text in reference_pages().items():
        files.append(File.generated(config, path, content=text))
    return files
