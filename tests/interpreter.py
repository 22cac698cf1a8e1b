"""Run a test module's Triton cases in a fresh python under Triton's interpreter: the interpreter must be chosen
before triton is first imported, which in a pytest session has usually already happened."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_triton_cases_in_interpreter(test_file: str) -> None:
    """Run test_file's cases whose id says triton; skipped inside that run itself, and where triton is missing."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton cases run in this process")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file), "-k", "triton"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]
