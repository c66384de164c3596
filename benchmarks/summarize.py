"""The README's Performance table from a ``bench_step.py --json`` file.

    python benchmarks/summarize.py benchmarks/results/bench_step.json
    python benchmarks/summarize.py --breadth benchmarks/results/bench_all.json

Cells are the median step time as % of the limit kernel's (same run, same blocks). The two
ratios compare like with like: the stateful ``step()`` with torch's optimizer object, and the
donated functional ``no.step`` with optax under ``jax.jit`` with donated buffers.

``--breadth``: the table of every optimizer (a ``--variants breadth`` run), with torch's fastest
mode on CPU (fused, else foreach) and its default (a loop over the tensors) side by side.

A step that takes several passes over the params (LAMB, LARS: the JSON's ``limits``) is
measured against one limit kernel per pass: its B/param is the sum, followed by the number of
passes; a line under the table gives each extra limit (LAMB in 2 passes) and the cells as %
of it.
"""

from __future__ import annotations

import argparse
import json


def _pct(cells: dict, variant: str) -> str:
    row = cells.get(variant)
    if row is None:
        return "-"
    return f"{row['pct_of_limit']:.0f}%"


def _ratio(cells: dict, slow: str, fast: str) -> str:
    a, b = cells.get(slow), cells.get(fast)
    if a is None or b is None:
        return "-"
    return f"{a['median_ms'] / b['median_ms']:.2f}x"


def table(result: dict) -> str:
    groups = _groups(result)
    head = [
        "optimizer",
        "size",
        "stateful `step()`",
        "`no.step` donate",
        "`no.step` pure (out-of-place floor)",
        "per leaf, donate",
        "update+apply / `no.step`",
        "torch",
        "optax jit+donate",
        "stateful vs torch",
        "donate vs optax",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (optimizer, size), cells in groups.items():
        torch_label = "torch fused" if "torch fused" in cells else "torch foreach"
        torch = _pct(cells, torch_label)
        if torch_label == "torch foreach" and torch != "-":
            torch += " (foreach)"
        pure = f"{_pct(cells, 'step')} ({_pct(cells, 'limit (out of place)')})"
        lines.append(
            "| "
            + " | ".join(
                [
                    optimizer,
                    size,
                    _pct(cells, "stateful"),
                    _pct(cells, "step (donate)"),
                    pure,
                    _pct(cells, "step (per leaf, donate)"),
                    _ratio(cells, "update+apply", "step"),
                    torch,
                    _pct(cells, "optax jit"),
                    _ratio(cells, torch_label, "stateful"),
                    _ratio(cells, "optax jit", "step (donate)"),
                ]
            )
            + " |"
        )
    extra = _extra_limits(result, ("stateful", "step (donate)", "step", "optax jit"))
    return "\n".join(lines + (["", *extra] if extra else []))


def _groups(result: dict) -> dict[tuple[str, str], dict[str, dict]]:
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["optimizer"], row["size"]), {})[row["variant"]] = row
    return groups


def breadth_table(result: dict) -> str:
    head = [
        "optimizer",
        "B/param",
        "size",
        "stateful `step()`",
        "`no.step` donate",
        "torch fastest",
        "torch default",
        "optax jit+donate",
        "stateful vs torch fastest",
        "stateful vs torch default",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (optimizer, size), cells in _groups(result).items():
        fastest = next((v for v in ("torch fused", "torch foreach") if v in cells), None)
        torch = "-" if fastest is None else f"{_pct(cells, fastest)} ({fastest.split()[1]})"
        cols = [
            optimizer,
            _bytes(result, optimizer, cells),
            size,
            _pct(cells, "stateful"),
            _pct(cells, "step (donate)"),
            torch,
            _pct(cells, "torch default"),
            _pct(cells, "optax jit"),
            "-" if fastest is None else _ratio(cells, fastest, "stateful"),
            _ratio(cells, "torch default", "stateful"),
        ]
        lines.append("| " + " | ".join(cols) + " |")
    extra = _extra_limits(result, ("stateful", "step (donate)", "optax jit"))
    return "\n".join(lines + (["", *extra] if extra else []))


def _bytes(result: dict, optimizer: str, cells: dict) -> str:
    """The limit's bytes per param, and its passes where it takes several."""
    moved = str(cells["limit"]["bytes_per_param"])
    limit = result.get("limits", {}).get(optimizer, {}).get("limit")
    return moved if limit is None else f"{moved} ({len(limit['passes'])} passes)"


def _extra_limits(result: dict, variants: tuple[str, ...]) -> list[str]:
    """Per group with an extra limit (LAMB in 2 passes): ``variants`` as % of it."""
    lines = []
    for (optimizer, size), cells in _groups(result).items():
        for label, info in result.get("limits", {}).get(optimizer, {}).items():
            if label == "limit" or label not in cells:
                continue
            pct = [
                f"{v} {100 * cells[label]['median_ms'] / cells[v]['median_ms']:.0f}%"
                for v in variants
                if v in cells
            ]
            passes = len(info["passes"])
            lines.append(
                f"{optimizer}, {size}: against a {passes}-pass limit of "
                f"{info['bytes_per_param']} B/param: {', '.join(pct)}"
            )
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json_path")
    parser.add_argument("--breadth", action="store_true", help="the table of every optimizer")
    args = parser.parse_args(argv)
    with open(args.json_path) as f:
        result = json.load(f)
    text = breadth_table(result) if args.breadth else table(result)
    print(text)
    return text


if __name__ == "__main__":
    main()
