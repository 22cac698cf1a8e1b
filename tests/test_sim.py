"""The simulator's headline figures, its CLI and the event recorder; decode runs applied at once equal stepping."""
import json
import math
import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    paged = data["paged"]
    assert paged["summary"]["finished"] == 50 and len(paged["steps"]) == paged["summary"]["steps"]


def test_kv_budget_smaller_than_max_model_len_is_refused():
    from pagedlab.config import ConfigError
    with pytest.raises(ConfigError, match="estimated maximum model length is 1024"):
        Simulator(SimConfig(kv_tokens=1024, max_model_len=2048))


def run_to_the_end_or(config: SimConfig, trace, max_steps: int | None):
    sim = Simulator(config, trace)
    recorder = Recorder(sim.engine.bus, ev.REQUEST_EVENTS)     # what the lab listens to: decode runs stay on
    result = sim.run(max_steps)
    kv, requests = sim.engine.kv, sim.engine.scheduler.requests.values()
    blocks = {r.request_id: [kv.blocks_held(s) for s in r.seqs] for r in requests}   # seq ids differ run to run
    tokens = {r.request_id: [s.token_ids for s in r.seqs] for r in requests}
    summary = {k: v for k, v in result.summary.items() if not k.startswith("sim_")}    # wall time differs
    events = [(e.kind, e.step, {k: getattr(v, "request_id", v) for k, v in e.data.items()}) for e in recorder.events]
    return summary, result.steps, result.requests, blocks, tokens, sim.clock.now, sim.engine.totals, events


@settings(max_examples=int(os.environ.get("PAGEDLAB_SIM_EXAMPLES", 100)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(workload=st.sampled_from(["sharegpt", "alpaca", "parallel_sampling", "shared_prefix"]),
       num_requests=st.integers(5, 60), rate=st.sampled_from([math.inf, 2.0, 20.0]),
       block_size=st.sampled_from([1, 4, 16]), kv_tokens=st.integers(2048, 12000),
       max_num_seqs=st.sampled_from([3, 16, 256]), max_num_batched_tokens=st.sampled_from([None, 2048]),
       allocator=st.sampled_from(["paged", "static"]), static_reservation=st.sampled_from(["max_model_len", "request"]),
       preemption_mode=st.sampled_from(["recompute", "swap"]), batching=st.sampled_from(["continuous", "static"]),
       prefix_caching=st.booleans(), max_steps=st.sampled_from([None, 7, 60, 333]), seed=st.integers(0, 3),
       timeline=st.booleans())
def test_decode_runs_applied_at_once_equal_stepping(workload, num_requests, rate, block_size, kv_tokens,
                                                     max_num_seqs, max_num_batched_tokens, allocator,
                                                     static_reservation, preemption_mode, batching, prefix_caching,
                                                     max_steps, seed, timeline):
    """Everything a run reports, the request events it publishes, and the state it stops in (block ids, token ids,
    clock) are the same whether the simulator applies regular decode runs at once or steps through them; also when
    it stops mid-run."""
    config = SimConfig(workload=workload, num_requests=num_requests, request_rate=rate, seed=seed,
                       block_size=block_size, kv_tokens=kv_tokens, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, allocator=allocator,
                       static_reservation=static_reservation, preemption_mode=preemption_mode, swap_space=0.05,
                       batching=batching, enable_prefix_caching=prefix_caching and allocator == "paged",
                       timeline=timeline)
    trace = load_trace(workload, num_requests, seed, rate)
    stepped = run_to_the_end_or(replace(config, fast_forward=False), trace, max_steps)
    assert run_to_the_end_or(config, trace, max_steps) == stepped


def test_decode_runs_cover_most_sharegpt_steps():
    """What makes the simulator fast: most steps of an overloaded ShareGPT-like run are applied in decode runs, also
    while the lab records request events; a listener for every event turns them off."""
    sim = Simulator(SimConfig(workload="sharegpt", num_requests=300))
    Recorder(sim.engine.bus, ev.REQUEST_EVENTS)
    stepped = 0
    step = sim.engine.step

    def counting_step():
        nonlocal stepped
        stepped += 1
        return step()
    sim.engine.step = counting_step
    result = sim.run()
    assert result.summary["finished"] == 300 and stepped < 0.25 * result.summary["steps"]
    assert sim.engine.bus.wants(ev.REQUEST_EVENTS) and not sim.engine.bus.wants({ev.STEP, ev.BLOCK_ALLOCATED})
    Recorder(sim.engine.bus)
    assert sim.engine.bus.wants({ev.STEP})


def test_a_long_simulation_keeps_no_per_request_ids_for_a_worker_it_does_not_have():
    sim = Simulator(SimConfig(workload="alpaca", num_requests=200))
    sim.run()
    scheduler = sim.engine.scheduler
    assert not scheduler.worker_holds_seqs and scheduler._finished_req_ids == [] and not scheduler._held
