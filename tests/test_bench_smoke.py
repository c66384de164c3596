"""Smoke test of benchmarks/bench_step.py at a tiny size: it runs, and its rows make sense.

No timing assertions: only that every number is positive and that our variants end on the same
params (they all take the same number of steps from the same start).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import optimizer_table
import pytest

pytest.importorskip("pyopencl")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_step", None)


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench.main(["--smoke", "--json", str(out / "r.json"), "--png", str(out / "r.png")])
    return result, out


def test_bytes_per_param(bench):
    """A float32 step reads p and g, writes p (12 B) and reads and writes each slot (8 B); a
    step with a per-leaf reduction moves the bytes of its passes (see ``PASSES``)."""
    got = {name: bench.OPTIMIZERS[name].bytes_per_param for name in bench.ALL_OPTIMIZERS}
    assert {
        "sgd": 12,
        "momentum": 20,
        "adam": 28,
        "adamw": 28,
        "rmsprop": 36,
    }.items() <= got.items()
    assert {k: got[k] for k in bench.PASSES} == {
        "lamb": 40,
        "lars": 28,
        "fromage": 20,
        "novograd": 24,
        "adafactor": 32,
    }
    one_pass = {row.bench: 12 + 8 * row.slots for row in optimizer_table.BENCH}
    assert {k: v for k, v in got.items() if k not in bench.PASSES} == {
        k: v for k, v in one_pass.items() if k not in bench.PASSES
    }


def test_low_precision_bytes_per_param(bench):
    """p and g float32 (12 B) and Adam's two slots read and written: 2 B each as bfloat16,
    1 B as 8-bit codes (the absmax per 256 elements not counted)."""
    got = {name: bench.OPTIMIZERS[name].bytes_per_param for name in ("adamw-bf16", "adamw-8bit")}
    assert got == {"adamw-bf16": 20, "adamw-8bit": 16}
    runs = bench.runs_of(["adamw-8bit", "adam", "adamw", "adamw-bf16"])
    assert [[s.name for s in run] for run in runs] == [
        ["adamw", "adamw-bf16", "adamw-8bit"],
        ["adam"],
    ]


def test_low_precision_group(bench):
    """adamw, adamw-bf16 and adamw-8bit timed in one group: each against its own limit, its
    state on the device per param (float32 8 B, bfloat16 4 B, 8-bit codes and absmax of the
    10K leaf <= 2.05 B), its stateful step on its own no.step's params, one torch."""
    argv = ["--smoke", "--optimizers", "adamw,adamw-bf16,adamw-8bit", "--sizes", "10K"]
    result = bench.main([*argv, "--variants", "stateful,torch fused", "--no-fixed-costs"])
    rows = {(r["optimizer"], r["variant"]): r for r in result["rows"]}
    torch = [k for k in rows if k[1].startswith("torch")]
    assert torch in ([], [("adamw", "torch fused")])
    assert set(rows) - set(torch) == {
        (name, variant)
        for name in ("adamw", "adamw-bf16", "adamw-8bit")
        for variant in ("limit", "step", "stateful")
    }
    for (name, variant), r in rows.items():
        assert r["bytes_per_param"] == bench.OPTIMIZERS[name].bytes_per_param
        assert r["median_ms"] > 0 and r["pct_of_limit"] > 0
        if variant == "stateful":
            assert r["max_abs_diff"] <= 1e-6, r
            assert (r["speedup_vs_torch"] or 0) > 0 or not torch
    held = {name: rows[name, "stateful"]["state_bytes_per_param"] for name, _ in rows}
    assert held["adamw"] == 8 and held["adamw-bf16"] == 4
    assert 2 < held["adamw-8bit"] <= 2.05


def test_gpt_tree_shape(bench):
    shapes = bench.gpt_shapes()
    sizes = [math.prod(s) for s in shapes]
    assert len(shapes) == 160
    assert 9_400_000 < sum(sizes) < 9_800_000
    assert all(57_000 <= n <= 491_520 for s, n in zip(shapes, sizes, strict=True) if len(s) == 2)
    assert all(240 <= n <= 960 for s, n in zip(shapes, sizes, strict=True) if len(s) == 1)


def test_rows_positive(smoke):
    result, _ = smoke
    rows = result["rows"]
    assert {r["size"] for r in rows} == {"10K", "tree5"}
    labels = {r["variant"] for r in rows}
    assert {"limit", "limit (out of place)", "step", "update+apply", "step (per leaf)"} <= labels
    for r in rows:
        for key in ("median_ms", "min_ms", "gbps", "pct_of_limit"):
            assert r[key] > 0, (r["variant"], key)
        assert r["min_ms"] <= r["median_ms"]
    for d in result["dispatch"]:
        assert d["us_no_finish"] > 0 and d["us_finish_each"] > 0


def test_our_variants_agree(smoke):
    """Pure, per-leaf and update+apply are bitwise equal; the stateful layer matches closely;
    torch and optax agree to float32 rounding."""
    for r in smoke[0]["rows"]:
        diff = r["max_abs_diff"]
        if r["variant"] in ("step", "step (per leaf)", "update+apply"):
            assert diff == 0.0, r
        elif r["variant"].startswith("limit"):
            assert diff is None
        else:
            assert diff < 1e-6, r


def test_outputs_written(smoke):
    result, out = smoke
    assert json.loads((out / "r.json").read_text())["rows"] == result["rows"]
    assert (out / "r.png").stat().st_size > 1000


def test_buffer_spacing_script_runs():
    path = BENCH.parent / "buffer_spacing.py"
    spec = importlib.util.spec_from_file_location("buffer_spacing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = module.main(["--n", "4096", "--rounds", "2"])
    assert set(times) == {"plain", "pool bins", "pool bins, staggered"}
    assert all(len(ts) == 2 and min(ts) > 0 for ts in times.values())


def test_per_leaf_launches_script_runs():
    path = BENCH.parent / "per_leaf_launches.py"
    spec = importlib.util.spec_from_file_location("per_leaf_launches", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = module.main(["--leaves", "6", "--rounds", "2", "--roles", "1"])
    assert len(times) == 6 and "one launch" in times
    assert all(len(ts) == 2 and min(ts) > 0 for ts in times.values())


def test_summary_table_from_the_json(smoke):
    _, out = smoke
    path = BENCH.parent / "summarize.py"
    spec = importlib.util.spec_from_file_location("summarize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main([str(out / "r.json")])
    lines = text.splitlines()
    rows = json.loads((out / "r.json").read_text())["rows"]
    groups = {(r["optimizer"], r["size"]) for r in rows}
    assert len(lines) == 2 + len(groups)
    assert all(line.startswith("| ") and line.count("|") == 12 for line in lines[2:])


def test_all_optimizers_and_breadth_variants(bench):
    args = bench.parse_args(["--optimizers", "all", "--variants", "breadth"])
    assert args.optimizers == [row.bench for row in optimizer_table.BENCH]
    assert args.variants == list(bench.BREADTH_VARIANTS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--optimizers", "adam,nonesuch"])


def test_breadth_run_and_table(bench, tmp_path):
    """A ``--variants breadth`` group times only those variants (and limit and step), and
    summarize.py --breadth makes one line of it."""
    argv = ["--smoke", "--optimizers", "adam", "--sizes", "10K", "--variants", "breadth"]
    result = bench.main([*argv, "--no-fixed-costs", "--json", str(tmp_path / "b.json")])
    labels = {r["variant"] for r in result["rows"]}
    assert {"limit", "step", "stateful", "step (donate)"} <= labels
    assert labels <= {"limit", "step", *bench.BREADTH_VARIANTS}
    path = BENCH.parent / "summarize.py"
    spec = importlib.util.spec_from_file_location("summarize", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = module.main(["--breadth", str(tmp_path / "b.json")]).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| adam | 28 | 10K | ")


def test_lr_free_benchmark_runs(capsys):
    path = BENCH.parent / "bench_lr_free.py"
    spec = importlib.util.spec_from_file_location("bench_lr_free", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    module.main(["--sizes", "tree5", "--rounds", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    timed = {}  # label -> median ms (the label's words, then the numbers; "vs torch" may be
    for r in rows:  # absent: prodigyopt is not a test dependency)
        if r and r[0] == "tree5":
            first = next(i for i, w in enumerate(r) if i > 0 and _is_number(w))
            timed[" ".join(r[1:first])] = float(r[first])
    assert {"limit prodigy", "prodigy stateful", "limit dadapt", "dadapt stateful"} <= set(timed)
    assert all(ms > 0 for ms in timed.values())


def test_lbfgs_benchmark_runs():
    path = BENCH.parent / "bench_lbfgs.py"
    spec = importlib.util.spec_from_file_location("bench_lbfgs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = module.main(["--size", "100K", "--rounds", "1", "--warmup", "3"])
    rows = {r.split("|")[1].strip(): float(r.split("|")[2]) for r in out.splitlines()
            if r.startswith("| ours") or r.startswith("| torch")}  # fmt: skip
    assert rows["ours step"] > 0 and rows["ours closure"] > 0
    assert "host round trips per step (ours, the loss read with them): 2" in out


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True
