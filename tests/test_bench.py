"""`pagedlab bench` on the CPU with the tiny shape: the report carries the first and the second run of a workload and
the decode step's phase split, taken from the engine's STEP events; the bench's workloads are the vLLM comparison's
(ShareGPT-1000, 32 long contexts at max_model_len 20480). Figures mean nothing here: the GPU run measures them."""
import argparse
import json

import pytest

from pagedlab.entrypoints.bench import main
from pagedlab.entrypoints.bench.step_split import PHASES
from pagedlab.entrypoints.bench.workload import make_workload, resolve


def test_bench_reports_first_and_second_run_and_the_step_split(tmp_path):
    assert main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--systems", "pagedlab,hf-generate",
                 "--hf-batch-sizes", "4", "--num-requests", "4", "--input-len", "8", "24", "--output-len", "6",
                 "--latency-requests", "0", "--max-num-seqs", "4", "--swap-space", "0.01",
                 "--cpu-kv-cache-space", "0.02", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "throughput_tiny.json").read_text())
    ours = report["systems"]["pagedlab"]
    assert report["workload"] == {**report["workload"], "name": "random", "num_requests": 4, "output_tokens": 24}
    for run in ("first_run", "second_run"):
        assert ours[run]["generated_tokens"] == 24 and ours[run]["num_errors"] == 0
        assert ours[run]["steps"] >= 6 and ours[run]["output_tokens_per_s"] > 0
    assert ours["first_over_second"] == pytest.approx(
        ours["first_run"]["output_tokens_per_s"] / ours["second_run"]["output_tokens_per_s"])
    assert ours["output_tokens_per_s"] == pytest.approx(ours["first_run"]["output_tokens_per_s"])
    assert ours["triton_compiles"] == {"first_run": 0, "second_run": 0, "late": []}    # nothing compiled while timed
    assert any(k.startswith("first run >=") for k in report["targets"])
    assert ours["config"]["max_model_len"] == 2048 and ours["config"]["swap_space"] == 0.01   # the flags applied
    split = report["profile"]["decode_steps"]
    assert split["steps"] >= 4 and split["mean_batch"] == 4       # all four decode together after the prefill
    assert all(split[p] > 0 for p in PHASES)
    assert split["step"] == pytest.approx(sum(split[p] for p in PHASES), abs=1e-3)
    assert report["profile"]["steps_with_prefill"]["steps"] >= 1
    # the second run's workload again with async scheduling the other way (off by default on the CPU)
    assert ours["async_scheduling"] is False
    ab = ours["scheduling_ab"]
    assert set(ab) == {"async_on", "async_off"} and ab["async_off"]["wall_s"] == ours["second_run"]["wall_s"]
    assert ab["async_on"]["generated_tokens"] == 24 and ab["async_on"]["num_errors"] == 0
    assert ab["async_on"]["decode_period_ms"] > 0 and report["profile"]["decode_period_ms"] == {
        mode: run["decode_period_ms"] for mode, run in ab.items()}
    assert "pagedlab_over_transformers_generate" in report["ratios"]
    assert (tmp_path / "throughput_tiny.png").exists()


def test_bench_workloads():
    sharegpt = resolve("sharegpt", None, None, None)
    assert (sharegpt["num_requests"], sharegpt["max_model_len"]) == (1000, 2048)
    work = make_workload(argparse.Namespace(**sharegpt, seed=0), vocab_size=2048, max_model_len=2048)
    assert len(work) == 1000 and len({len(p) for p, _ in work}) > 100     # the trace's lengths
    assert all(len(p) + o <= 2048 for p, o in work)
    long = resolve("long", None, None, None)
    assert (long["num_requests"], long["input_len"], long["output_len"], long["max_model_len"]) == \
        (32, [8192, 16384], 256, 20480)
    work = make_workload(argparse.Namespace(**long, seed=0), vocab_size=2048, max_model_len=20480)
    assert len(work) == 32 and all(8192 <= len(p) <= 16384 and o == 256 for p, o in work)
    other = make_workload(argparse.Namespace(**long, seed=0), vocab_size=2048, max_model_len=20480, seed=1)
    assert [len(p) for p, _ in other] == [len(p) for p, _ in work] and other[0][0] != work[0][0]
    with pytest.raises(SystemExit, match="lengths come from"):
        resolve("sharegpt", None, [8, 16], None)
