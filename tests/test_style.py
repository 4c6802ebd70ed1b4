"""The whole tree is formatted and linted by ruff, with the settings in pyproject.toml."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [("format", "--check", "."), ("check", ".")])
def test_ruff(args):
    command = [sys.executable, "-m", "ruff", *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
