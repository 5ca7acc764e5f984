"""pyproject.toml: every CLI has a console script that answers a bad flag with one line and exit 2,
and the torch floor excludes releases with known weights_only bypasses; README shows the CPU wheel."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def test_every_cli_has_a_console_script():
    assert set(SCRIPTS) == {"mmrec-train", "mmrec-prepare-data", "mmrec-evaluate", "mmrec-generate", "mmrec-export",
                            "mmrec-serve"}
    for target in SCRIPTS.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_scripts_give_one_line_and_exit_2_on_a_bad_flag(name, tmp_path):
    module, func = SCRIPTS[name].split(":")
    code = f"import sys; sys.argv = [{name!r}, '--no_such_flag']; from {module} import {func}; {func}()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr  # the flag, or a missing required one


def test_torch_floor_is_2_11_and_the_installed_torch_meets_it():
    torch_req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    assert not torch_req.specifier.contains("2.10.0") and not torch_req.specifier.contains("2.5.1")
    assert torch_req.specifier.contains("2.11.0") and torch_req.specifier.contains(torch.__version__.split("+")[0])


def test_readme_shows_the_cpu_wheel_and_the_plain_install():
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "`pip install -e .`" in readme  # a GPU user's plain command


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in readme
