"""The README's test command is the one ``.ci/run`` runs, and it installs every oracle the
parity tests import (so that a fresh machine skips none)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Run the tests") :]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    assert "pytest" in command and command.startswith("pip install -e ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci


def test_the_command_installs_the_oracles():
    extras = re.search(r'"\.\[(.+?)\]"', _readme_test_command()).group(1).split(",")
    assert {"parity", "mpi", "docs", "test", "notebooks"} <= set(extras)
    pyproject = (ROOT / "pyproject.toml").read_text()
    parity = re.search(r"^parity = \[(.+)\]$", pyproject, re.M).group(1)
    for oracle in ("torch==2.13.0", "jax", "optax", "bitsandbytes", "schedulefree"):
        assert f'"{oracle}' in parity, oracle
