"""The simulator calibrated by a profile predicts the real engine: the fidelity check of the GPU benchmark
(benchmarks/bench_sim_fidelity.py), run on this CPU with the tiny model.

The profile's own measurements are checked on this CPU's time (time.process_time, one torch thread). The fidelity
check is not: on this shared 2-core machine the real engine's throughput on the same trace moves by +-20% from one
run to the next (measured: 939 to 1,405 tok/s of CPU time, with other jobs running), so no bound that means
something would hold. Instead the real engine runs the real model on a machine whose costs are known: a work clock
that a step's runner call advances by a fixed function of its batch (tokens, attention reads, sequences) and its
scheduling by one of its sequences. The profiler measures that machine, the simulator prices the trace with the
profile, and the real engine runs the trace: every step of the pipeline runs as on a GPU, and what is left of the
error is the profile's fit and the simulator's accounting, which must be within the GPU benchmark's targets. The
benchmark checks the targets against real time on the card."""
import json
import time

import pytest
import torch

from pagedlab.cli import main
from pagedlab.engine.llm import build_engine
from pagedlab.executor.model_runner import ModelRunner
from pagedlab.scheduler import Scheduler
from pagedlab.sim import fidelity, profiler
from pagedlab.sim.profiled_cost import ProfiledCostModel
from pagedlab.sim.profiles import load_profile, shipped_profiles
from pagedlab.sim.simulator import SimConfig, Simulator
from pagedlab.sim.workloads import make_trace


@pytest.fixture(scope="module")
def cpu_engine_and_profile():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = build_engine("data/tiny-llama", device="cpu", dtype="float32", max_model_len=256, max_num_seqs=16,
                              max_num_batched_tokens=512, cpu_kv_cache_space=0.05, swap_space=0.01)
        engine.clock = engine.scheduler.clock = time.process_time
        profile = profiler.profile(engine, host_requests=40, host_max_output=32, host_rate=0, repeats=5, progress=False,
                                   clock=time.process_time)
        yield engine, profile
    finally:
        torch.set_num_threads(threads)


class WorkClock:
    """Seconds of a machine whose costs are known: they pass only when the engine works."""

    RUNNER_FIXED, PER_TOKEN, PER_READ, PER_SEQ = 2e-3, 2e-5, 1e-8, 1e-4
    HOST_FIXED, HOST_PER_SEQ = 3e-4, 2e-5

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, out) -> float:
        reads = sum((computed + tokens) * tokens for computed, tokens in
                    zip(out.num_computed_tokens, out.num_scheduled_tokens))
        return (self.RUNNER_FIXED + self.PER_TOKEN * out.num_batched_tokens + self.PER_READ * reads
                + self.PER_SEQ * len(out.seq_ids))

    def host(self, out) -> float:
        return self.HOST_FIXED + self.HOST_PER_SEQ * len(out.seq_ids)


@pytest.fixture(scope="module")
def work_clock_engine_and_profile():
    """The tiny model's real engine timed by a WorkClock, and its profile measured on that clock."""
    execute, schedule = ModelRunner.execute, Scheduler.schedule

    def timed_execute(runner, out, *grammar):
        results = execute(runner, out, *grammar)
        if isinstance(getattr(runner, "work_clock", None), WorkClock) and out.seq_ids:
            runner.work_clock.now += runner.work_clock.runner(out)
        return results

    def timed_schedule(scheduler):
        out = schedule(scheduler)
        if isinstance(scheduler.clock, WorkClock) and out.seq_ids:
            scheduler.clock.now += scheduler.clock.host(out)
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ModelRunner.execute, Scheduler.schedule = timed_execute, timed_schedule
    try:
        engine = build_engine("data/tiny-llama", device="cpu", dtype="float32", max_model_len=256, max_num_seqs=16,
                              max_num_batched_tokens=512, cpu_kv_cache_space=0.05, swap_space=0.01)
        clock = WorkClock()
        engine.clock = engine.scheduler.clock = engine.executor.work_clock = clock
        profile = profiler.profile(engine, host_requests=40, host_max_output=32, host_rate=0, repeats=1,
                                   progress=False, clock=clock)
        yield engine, profile
    finally:
        ModelRunner.execute, Scheduler.schedule = execute, schedule
        torch.set_num_threads(threads)


def test_profile_records_where_it_was_measured_and_how_well_it_fits(cpu_engine_and_profile):
    _, profile = cpu_engine_and_profile
    assert profile["card"]["name"].startswith("CPU") and profile["versions"]["torch"] == torch.__version__
    assert profile["engine"]["max_num_seqs"] == 16 and profile["engine"]["cuda_graph_batch_sizes"] == []
    assert profile["model"]["num_layers"] == 4 and profile["model"]["kv_bytes_per_token"] == 2 * 4 * 2 * 64 * 4
    decode = profile["decode"]
    assert decode["batch_sizes"] == [1, 2, 4, 8, 16] and decode["contexts"] == [32, 64, 128, 256]
    assert all(t > 0 for row in decode["seconds"] for t in row)
    assert {p["num_tokens"] for p in profile["eager"]["points"]} >= {16, 256}      # prefill chunks 16 .. budget
    assert any(p["decode_seqs"] and p["prefill"] for p in profile["eager"]["points"])   # mixed steps
    assert len(profile["host"]["points"]) > 30 and profile["block_moves"]["swap_out"]
    assert profile["fit_report"]["eager"]["mean_abs_pct"] < 15
    method = profile["methodology"]    # each cell: a discarded first run, 5 timed, the median and its spread kept
    assert method["repeats"] == 5 and method["warmup_runs_discarded"] == 1
    assert method["triton_compiles_during_profile"] == 0
    for row, spread in zip(decode["seconds"], decode["spread"]):
        assert all(low <= t <= high for t, (low, high) in zip(row, spread))
    for p in profile["eager"]["points"]:
        assert p["seconds_spread"][0] <= p["seconds"] <= p["seconds_spread"][1]
        assert p["seconds_repeated_spread"][0] <= p["seconds_repeated"] <= p["seconds_repeated_spread"][1]
    assert all(m["spread"][0] <= m["seconds"] <= m["spread"][1] for m in profile["block_moves"]["copy"])
    assert abs(profile["fit_report"]["host"]["total_bias_pct"]) < 1


def test_simulator_with_the_profile_matches_the_engine_on_a_trace(work_clock_engine_and_profile):
    engine, profile = work_clock_engine_and_profile
    trace = make_trace("alpaca", 60, seed=0)
    real_engine = fidelity.engine_like(engine)
    real = fidelity.run_real(real_engine, trace)
    config = fidelity.sim_config(real_engine, profile, "alpaca", len(trace), float("inf"))
    sim = fidelity.run_sim(config, trace)
    assert sim["cost_source"] == "profile" and real["requests"] == sim["requests"] == 60
    assert sim["steps"] == real["steps"]        # the same schedule: every difference below is the cost model's
    err = fidelity.errors(real, sim)
    assert all(fidelity.within_targets(err).values()), err       # the GPU benchmark's targets: 5%, 5% and 10%
    # Measured here: every figure within 0.2% (the fit of a known cost is close to exact); 2% leaves room for the
    # profile's grid to move without hiding a mistake in the pricing or the accounting.
    assert max(abs(err[key]) for key in ("output_tokens_per_s", "mean_ttft_s", "p99_ttft_s", "mean_itl_s")) <= 0.02, err
    assert err["preemptions"] == 0


def test_profile_round_trips_through_the_cli(cpu_engine_and_profile, tmp_path, capsys):
    _, profile = cpu_engine_and_profile
    path = tmp_path / "cpu-tiny.json"
    profiler.save(profile, str(path))
    assert load_profile(path)["name"] == profile["name"]
    assert main(["sim", "--profile", str(path), "--workload", "alpaca", "--num-requests", "30",
                 "--allocator", "paged", "--kv-tokens", "4096", "--max-model-len", "256"]) == 0
    printed = capsys.readouterr().out
    assert "cost model: measured: CPU" in printed
    with pytest.raises(ValueError, match="differs from the profile's shape"):
        SimConfig(profile=str(path), model="llama-3-8b").cost_model()


def test_without_a_profile_the_simulator_says_its_times_are_estimated():
    result = Simulator(SimConfig(workload="alpaca", num_requests=20)).run()
    assert result.cost_source == "roofline" and "estimated" in result.summary["cost_model"]


@pytest.mark.parametrize("name", sorted(shipped_profiles()))
def test_shipped_profiles_load_and_price_a_run_without_a_gpu(name):
    profile = load_profile(name)
    assert name == f"{profile['card']['name'].replace('NVIDIA', '').split()[0].lower()}-{profile['model']['name']}"
    cost = ProfiledCostModel(profile)
    assert cost.fit_report["decode"]["mean_abs_pct"] < 5 and cost.fit_report["eager"]["mean_abs_pct"] < 10
    result = Simulator(SimConfig(workload="sharegpt", num_requests=100, profile=name,
                                 model=profile["model"]["name"])).run()
    assert result.cost_source == "profile" and result.summary["throughput_output_tokens_per_s"] > 0
    json.dumps(result.to_json())


@pytest.mark.parametrize("workload", ["sharegpt", "alpaca"])
def test_decode_runs_applied_at_once_price_steps_as_stepping_does_with_a_profile(workload):
    """fast_forward prices a decode run's steps with the profile (uneven contexts included) exactly as stepping."""
    name = sorted(shipped_profiles())[0]
    results = [Simulator(SimConfig(workload=workload, num_requests=120, profile=name, kv_tokens=40000, kv_gib=None,
                                   fast_forward=ff)).run() for ff in (True, False)]
    same = [{k: v for k, v in r.summary.items() if not k.startswith("sim_")} for r in results]
    assert same[0] == same[1] and results[0].steps == results[1].steps
