"""Run a test module's Triton cases in a fresh python under Triton's interpreter: the interpreter must be chosen
before triton is first imported, which in a pytest session has usually already happened."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_triton_cases_in_interpreter(test_file: str) -> None:
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file), "-k", "triton"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]
