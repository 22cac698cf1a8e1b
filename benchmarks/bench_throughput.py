"""Offline throughput of pagedlab vs transformers `generate` and `generate_batch`, with the roofline bound and
pagedlab's latency, on one GPU in one process: the same code as `pagedlab bench` (pagedlab/entrypoints/bench.py).

    PYTHONPATH=. python benchmarks/bench_throughput.py --shape llama-3.2-1b --out out/bench
    PYTHONPATH=. python benchmarks/bench_throughput.py --shape llama-3-8b --out out/bench
    PYTHONPATH=. python benchmarks/bench_throughput.py --shape tiny --device cpu --dtype float32 \\
        --num-requests 16 --input-len 16 64 --output-len 16 --hf-batch-sizes 4,8 --out out/smoke   # CPU smoke test
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pagedlab.entrypoints.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
