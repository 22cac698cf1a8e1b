"""The lab's views draw what the runs say, and its widgets re-run on a change."""
import subprocess
import sys
import types

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

from pagedlab import lab  # noqa: E402
from pagedlab.engine.llm import kv_budget_line  # noqa: E402
from pagedlab.lab import views  # noqa: E402
from pagedlab.sim.simulator import SimConfig  # noqa: E402

SMALL = SimConfig(workload="sharegpt", num_requests=40, kv_gib=0.25)


@pytest.fixture(scope="module")
def runs():
    return lab.compare_runs(SMALL, static={"allocator": "static"}, paged={"allocator": "paged"})


@pytest.fixture(scope="module")
def overloaded():
    return lab.simulate(SimConfig(workload="sharegpt", num_requests=40, kv_gib=0.25, request_rate=20.0,
                                  preemption_mode="swap"))


def test_importing_pagedlab_loads_neither_matplotlib_nor_ipywidgets():
    code = ("import sys, pagedlab, pagedlab.engine.llm, pagedlab.sim.simulator; "
            "assert not {'matplotlib', 'ipywidgets'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fragmentation_stack_stacks_the_five_categories_to_the_whole_cache(runs):
    fig = lab.fragmentation_stack({name: run.timeline for name, run in runs.items()})
    assert len(fig.axes) == 2
    for ax, (name, run) in zip(fig.axes, runs.items()):
        assert len(ax.collections) == 5
        top = ax.collections[-1].get_paths()[0].vertices[:, 1]
        assert top.max() == pytest.approx(1.0)
        assert f"{run.summary['memory_utilization']:.1%}" in ax.get_title()


def test_waste_bars_split_each_run_by_category(runs):
    ax = lab.waste_bars(runs).axes[0]
    widths = np.array([bar.get_width() for bar in ax.patches]).reshape(5, len(runs))
    expected = [[run.summary[f"mean_{kind}_fraction"] for run in list(runs.values())[::-1]]
                for kind in views.CATEGORIES]
    np.testing.assert_allclose(widths, expected)


def test_throughput_curve_accounts_for_every_generated_token(runs):
    run = runs["paged"]
    centres, rates = views.tokens_per_second(run.timeline)
    width = centres[1] - centres[0]
    assert rates.sum() * width == pytest.approx(run.timeline["num_generated_tokens"].sum())
    fig = lab.throughput_latency(runs)
    assert len([line for line in fig.axes[0].get_lines() if line.get_linestyle() == "-"]) == 2   # + dotted admissions


def test_sharing_savings_shows_prefix_cache_savings():
    cached = lab.simulate(SimConfig(workload="shared_prefix", num_requests=30, kv_gib=0.25,
                                    enable_prefix_caching=True))
    ax = lab.sharing_savings({"cached": cached}).axes[0]
    needed, stored = (line.get_ydata() for line in ax.get_lines())
    assert (needed >= stored).all() and (needed > stored).any()


def test_card_budget_follows_the_engine_arithmetic_and_fp8_doubles_the_blocks():
    report = lab.card_kv_budget("llama-3-8b", card_gib=80, gpu_memory_utilization=0.9, block_size=16)
    expected_kv = 80 * 2**30 * 0.9 - 8.03e9 * 2 - 1.5 * 2**30
    assert report["kv_cache"] == pytest.approx(expected_kv, abs=1)
    assert report["bytes_per_block"] == 16 * 128 * 1024
    assert report["num_gpu_blocks"] == int(expected_kv) // report["bytes_per_block"]
    assert f"{report['num_gpu_blocks']} blocks" in kv_budget_line(report)
    fp8 = lab.card_kv_budget("llama-3-8b", 80, 0.9, 16, kv_cache_dtype="fp8")
    assert fp8["num_gpu_blocks"] in (2 * report["num_gpu_blocks"], 2 * report["num_gpu_blocks"] + 1)
    assert lab.sim_config_for(report).num_blocks() == report["num_gpu_blocks"]
    assert lab.card_kv_budget("llama-2-13b", 40, 0.5)["num_gpu_blocks"] == 0


def test_memory_budget_bars_add_up_to_the_card():
    reports = {name: lab.card_kv_budget(name, 80, 0.9) for name in ("llama-3-8b", "opt-125m")}
    ax = lab.memory_budget_bars(reports).axes[0]
    totals = np.array([bar.get_width() for bar in ax.patches]).reshape(5, 2).sum(axis=0)
    np.testing.assert_allclose(totals, 80)


def test_block_size_tradeoff_plots_waste_and_kernel_time():
    sweep = lab.compare_runs(SMALL, **{str(bs): {"block_size": bs} for bs in (4, 64)})
    frame = views.pd.DataFrame([{"block_size": int(n), **r.summary} for n, r in sweep.items()])
    kernel, source = lab.kernel_block_size_sweep([4, 64])
    waste_ax, kernel_ax = lab.block_size_tradeoff(frame, kernel, source).axes
    waste = waste_ax.get_lines()[0].get_ydata()
    assert waste[1] > waste[0]
    np.testing.assert_allclose(kernel_ax.get_lines()[0].get_ydata(), kernel["time_us"])


def test_kernel_sweep_reads_the_h100_results_without_a_gpu():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU times the kernel instead")
    kernel, source = lab.kernel_block_size_sweep([1, 16, 256])
    assert list(kernel["block_size"]) == [1, 16, 256] and source == "NVIDIA H100 80GB HBM3 (recorded)"


def _memory_curve(playground):
    return playground.figures["memory"].axes[0].collections[0].get_paths()[0].vertices.copy()


def test_playground_reruns_and_redraws_when_a_control_changes():
    playground = lab.SimPlayground(num_requests=40, model="llama-2-13b", card_gib=40)
    before, runs = _memory_curve(playground), playground.runs
    capacity = playground.last_run.summary["kv_capacity_tokens"]
    playground.controls["gpu_memory_utilization"].value = 0.75
    assert playground.runs == runs + 1
    assert "x 0.75 -" in playground.budget.value
    assert playground.last_run.summary["kv_capacity_tokens"] < capacity
    after = _memory_curve(playground)
    assert before.shape != after.shape or not np.allclose(before, after)


def test_playground_shows_the_engine_error_when_the_cache_is_too_small():
    playground = lab.SimPlayground(num_requests=20, model="llama-2-13b", card_gib=40,
                                   gpu_memory_utilization=0.8)
    assert playground.figures and playground.last_run is not None
    playground.controls["gpu_memory_utilization"].value = 0.65
    assert "ConfigError" in playground.summary.value and "max_model_len" in playground.summary.value
    assert playground.figures == {} and playground.last_run is None


def test_gpu_panel_without_a_gpu_says_so_and_shows_the_engine_figures(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def no_library():
        raise pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    status = lab.gpu_status()
    assert status["available"] is False
    memory = {"device": "cpu", "num_blocks": 64, "block_size": 16, "bytes_per_block": 65536, "blocks_taken": 16}
    panel = lab.gpu_panel_html(status, memory)
    assert "No NVIDIA GPU" in panel and "64 blocks" in panel and "25%" in panel


def test_gpu_panel_reports_nvml_figures(monkeypatch):
    pynvml = pytest.importorskip("pynvml")
    fake = dict(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                nvmlDeviceGetName=lambda h: "Fake H100",
                nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=40 * 2**30, total=80 * 2**30),
                nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=42),
                nvmlDeviceGetComputeRunningProcesses=lambda h: [types.SimpleNamespace(pid=7, usedGpuMemory=2**30)])
    for name, fn in fake.items():
        monkeypatch.setattr(pynvml, name, fn)
    panel = lab.gpu_panel_html(lab.gpu_status())
    assert "Fake H100" in panel and "40.0 / 80.0 GiB" in panel and "42%" in panel and "pid 7" in panel
