"""The simulator's headline figures, its CLI and the event recorder."""
import json

import pytest

from pagedlab import events as ev
from pagedlab.cli import main
from pagedlab.events import Recorder
from pagedlab.sim.simulator import SimConfig, Simulator, compare
from pagedlab.sim.workloads import load_trace, make_trace


@pytest.fixture(scope="module")
def sharegpt_runs():
    return compare(SimConfig(workload="sharegpt", num_requests=400), paged={}, static={"allocator": "static"})


def test_paged_fills_its_blocks_and_static_wastes_its_reservations(sharegpt_runs):
    paged, static = sharegpt_runs["paged"].summary, sharegpt_runs["static"].summary
    assert paged["finished"] == static["finished"] == 400
    assert paged["memory_utilization"] >= 0.96
    assert static["memory_utilization"] <= 0.40
    assert static["mean_reserved_fraction"] > 0.5 > paged["mean_reserved_fraction"]
    assert paged["mean_running_seqs"] >= 3 * static["mean_running_seqs"]
    assert paged["throughput_output_tokens_per_s"] > 2 * static["throughput_output_tokens_per_s"]


def test_timeline_accounts_for_every_slot(sharegpt_runs):
    frame = sharegpt_runs["static"].timeline()
    parts = frame[["mem_tokens", "mem_internal", "mem_reserved", "mem_external", "mem_free"]].sum(axis=1)
    assert (parts == frame["mem_capacity"]).all()
    assert frame["num_running_seqs"].max() <= 16            # 32768 slots / 2048-token reservations


def test_request_sized_static_reservations_fragment_externally():
    result = Simulator(SimConfig(workload="sharegpt", num_requests=300, allocator="static",
                                 static_reservation="request")).run()
    assert result.summary["mean_external_fraction"] > 0.0


def test_prefix_caching_and_forks_save_memory():
    shared = compare(SimConfig(workload="shared_prefix", num_requests=300), off={},
                     on={"enable_prefix_caching": True})
    assert shared["on"].summary["prefix_cache_hit_rate"] > 0.5
    assert shared["on"].summary["throughput_output_tokens_per_s"] > shared["off"].summary[
        "throughput_output_tokens_per_s"]
    forks = Simulator(SimConfig(workload="parallel_sampling", num_requests=60, preemption_mode="swap")).run()
    assert forks.summary["mean_shared_saved_fraction"] > 0.05 and forks.summary["copied_blocks"] > 0


def test_traces_are_seeded_and_match_the_committed_files():
    assert make_trace("sharegpt", 50, seed=3) == make_trace("sharegpt", 50, seed=3)
    assert make_trace("sharegpt", 50, seed=3) != make_trace("sharegpt", 50, seed=4)
    assert load_trace("data/traces/alpaca.jsonl", 100) == make_trace("alpaca", 1000)[:100]


def test_recorder_sees_block_and_request_events():
    sim = Simulator(SimConfig(workload="parallel_sampling", num_requests=20, kv_tokens=4096,
                              preemption_mode="swap", swap_space=1.0))
    recorder = Recorder(sim.engine.bus)
    result = sim.run()
    kinds = set(recorder.dataframe()["kind"])
    assert {ev.BLOCK_ALLOCATED, ev.BLOCK_FREED, ev.BLOCK_SHARED, ev.BLOCK_COW, ev.REQUEST_ADMITTED,
            ev.REQUEST_FINISHED, ev.STEP} <= kinds
    steps = recorder.steps()
    assert steps["num_generated_tokens"].sum() == result.request_frame()["output_tokens"].sum() > 0


def test_cli_prints_summary_and_writes_json(tmp_path, capsys):
    out = tmp_path / "sim.json"
    assert main(["sim", "--workload", "alpaca", "--num-requests", "50", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memory utilization" in printed and "paged / static throughput" in printed
    data = json.loads(out.read_text())
    assert set(data) == {"paged", "static"}
    assert data["paged"]["summary"]["finished"] == 50 and len(data["paged"]["steps"]) == data["paged"]["summary"]["steps"]


def test_kv_budget_smaller_than_max_model_len_is_refused():
    from pagedlab.config import ConfigError
    with pytest.raises(ConfigError, match="estimated maximum model length is 1024"):
        Simulator(SimConfig(kv_tokens=1024, max_model_len=2048))
