"""A core install (`pip install pagedlab`, no extras): the command line still parses and `pagedlab sim` runs, and
`pagedlab serve` says which extra to install instead of a traceback. The serve extra's modules are made
unimportable in a fresh interpreter."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WITHOUT_SERVE_EXTRA = textwrap.dedent("""\
    import sys
    from pagedlab.entrypoints.openai.cli_args import SERVE_EXTRA_MODULES
    for name in SERVE_EXTRA_MODULES:
        sys.modules[name] = None        # import of a None entry raises ModuleNotFoundError, as when not installed
    from pagedlab.cli import main
    sys.exit(main(sys.argv[1:]))
    """)


def run_without_serve_extra(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_SERVE_EXTRA, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_sim_runs_without_the_serve_extra():
    run = run_without_serve_extra("sim", "--workload", "alpaca", "--num-requests", "20", "--allocator", "paged")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "requests finished" in run.stdout


def test_serve_without_the_extra_names_it():
    run = run_without_serve_extra("serve", "--port", "0")
    assert run.returncode == 1
    assert "pip install 'pagedlab[serve]'" in run.stderr and "is not installed" in run.stderr
    assert "Traceback" not in run.stderr
