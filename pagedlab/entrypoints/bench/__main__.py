import sys

from pagedlab.entrypoints.bench.cli import main

sys.exit(main(prog="python -m pagedlab.entrypoints.bench"))
