"""Notebooks 05-07's views: the budget explorer, the block-size explorer, the playground's run history and
steady rate, and the live dashboard's figure, checked against values computed independently."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

from pagedlab import lab  # noqa: E402
from pagedlab.config import ConfigError  # noqa: E402
from pagedlab.engine.llm_engine import check_kv_capacity, format_bytes  # noqa: E402
from pagedlab.lab.block_size import memory_sweep, prefix_reuse, sweep_frame  # noqa: E402
from pagedlab.lab.budget import card_kv_budget, cost_model_note, sim_config_for  # noqa: E402
from pagedlab.lab.dashboard import live_figure, steady_rate  # noqa: E402
from pagedlab.lab.runs import steady_window_end  # noqa: E402
from pagedlab.lab.sizing import budget_parts  # noqa: E402
from pagedlab.sim.simulator import SimConfig  # noqa: E402


def test_byte_units_keep_the_number_readable_in_the_max_model_len_error():
    assert (format_bytes(2 * 2**20), format_bytes(512 * 1024), format_bytes(1.5 * 2**30)) == ("2 MiB", "512 KiB",
                                                                                              "1.5 GiB")
    with pytest.raises(ConfigError, match=r"\(2 MiB of KV cache needed, 1 MiB available\)"):
        check_kv_capacity(16, 16, 512, 65536)


def test_budget_explorer_splits_the_card_and_shows_the_engine_error_below_the_edge():
    explorer = lab.BudgetExplorer(model="llama-2-13b", card_gib=40, max_model_len=2048)
    bars = explorer.figure.axes[0].patches
    assert sum(bar.get_width() for bar in bars) == pytest.approx(40)
    report = card_kv_budget("llama-2-13b", 40, 0.9)
    assert sum(budget_parts(report).values()) == pytest.approx(40 * 2**30)
    tokens = report["num_gpu_blocks"] * 16
    assert f"room for {tokens // 2048:,} requests" in explorer.status.value
    lowest = lab.min_utilization("llama-2-13b", 40, 2048)      # (24.2 + 1.5 GiB + 2048 x 800 KiB) / 40 GiB
    assert lowest == pytest.approx((13e9 * 2 + 1.5 * 2**30 + 2048 * 800 * 1024) / (40 * 2**30))
    explorer.controls["gpu_memory_utilization"].value = 0.65           # below 0.682: one request does not fit
    assert "ConfigError" in explorer.status.value and "GiB of KV cache needed" in explorer.status.value
    explorer.controls["gpu_memory_utilization"].value = 0.7
    assert "ConfigError" not in explorer.status.value


def test_fp8_doubles_the_capacity_curve_and_the_current_point_lies_on_it():
    explorer = lab.BudgetExplorer(model="llama-2-13b", card_gib=40, max_model_len=2048)
    auto = explorer.figure.axes[1].get_lines()[0].get_ydata()
    explorer.redraw(kv_cache_dtype="fp8")
    lines = explorer.figure.axes[1].get_lines()
    curve, now = lines[0], next(line for line in lines if line.get_label().startswith("now"))
    fp8 = card_kv_budget("llama-2-13b", 40, 0.9, kv_cache_dtype="fp8")
    assert now.get_ydata()[0] == fp8["num_gpu_blocks"] * 16
    assert np.interp(0.9, curve.get_xdata(), curve.get_ydata()) == now.get_ydata()[0]
    assert curve.get_ydata()[-1] == pytest.approx(2 * auto[-1], abs=16)
    lowest = (13e9 * 2 + 1.5 * 2**30 + 2048 * 400 * 1024) / (40 * 2**30)    # 400 KiB a token in fp8: 0.662
    assert f"below {lowest:.3f}" in explorer.figure.axes[1].get_legend().get_texts()[2].get_text()


def test_a_shipped_profile_times_the_playground_on_its_card_and_others_are_estimated():
    assert "profile h200-llama-3-8b" in cost_model_note(141, "llama-3-8b")
    assert cost_model_note(40, "llama-2-13b").startswith("Times are estimated")
    assert sim_config_for(card_kv_budget("llama-3-8b", 141, 0.9)).profile == "h200-llama-3-8b"
    assert sim_config_for(card_kv_budget("llama-2-13b", 40, 0.9)).profile is None


def test_steady_rate_stops_where_the_batch_thins_after_the_last_admission():
    run = lab.simulate(sim_config_for(card_kv_budget("llama-2-13b", 40, 0.9), num_requests=100))
    end, tl = steady_window_end(run), run.timeline
    assert end >= run.requests["first_scheduled"].max()
    admitted = tl[tl["time"] <= run.requests["first_scheduled"].max()]["num_running_seqs"].median()
    assert tl.loc[tl["time"] == end, "num_running_seqs"].iloc[0] < admitted / 2
    expected = tl.loc[tl["time"] <= end, "num_generated_tokens"].sum() / end
    assert lab.steady_throughput(run) == pytest.approx(expected)
    assert expected > run.summary["throughput_output_tokens_per_s"]         # the drain tail drags the overall down


def test_playground_keeps_every_run_rounds_its_settings_and_draws_the_pinned_one():
    playground = lab.SimPlayground(num_requests=40)
    playground.pin()
    playground.controls["gpu_memory_utilization"].value = 0.8500000000000001
    assert playground.settings()["gpu_memory_utilization"] == 0.85
    assert list(playground.history_frame()["util"]) == [0.9, 0.85] and playground.runs == 2
    labels = [line.get_label() for line in playground.figures["throughput"].axes[0].get_lines()]
    assert any(label.startswith("run 1 (pinned): ") for label in labels)
    assert "1 (pinned)" in playground.history_html()
    assert playground.controls["request_rate"].disabled
    playground.controls["arrivals"].value = "Poisson"
    assert not playground.controls["request_rate"].disabled and playground.last_run.config.request_rate == 8.0
    playground.controls["workload"].value = "shared_prefix"
    playground.controls["enable_prefix_caching"].value = True
    assert playground.last_run.summary["prefix_cache_hit_rate"] > 0.5
    assert playground.history[-1]["prefix cache"] == "on"


def test_prefix_reuse_counts_only_full_blocks_of_the_shared_prompt():
    reuse = prefix_reuse([16, 64, 256], system_prompt_len=250, num_requests=24).set_index("block_size")["reused_%"]
    np.testing.assert_allclose(reuse, [100 * 240 / 250, 100 * 192 / 250, 0.0])


def test_block_size_explorer_marks_the_chosen_size_on_each_curve():
    runs = memory_sweep(SimConfig(num_requests=30, kv_gib=0.25), block_sizes=(16, 256))
    sweep = sweep_frame(runs)
    assert list(sweep["waste_%"]) == pytest.approx([100 * (1 - r.summary["memory_utilization"]) for r in
                                                    runs.values()])
    kernel = pd.DataFrame({"block_size": [16, 256], "time_us": [192.7, 192.6]})
    reuse = pd.DataFrame({"block_size": [16, 256], "reused_%": [96.0, 0.0]})
    explorer = lab.BlockSizeExplorer(runs, kernel, "NVIDIA H100 80GB HBM3 (recorded)", reuse)
    explorer.redraw(block_size=256)
    waste_ax, kernel_ax, reuse_ax = explorer.figure.axes[:3]
    assert waste_ax.get_lines()[1].get_ydata()[0] == pytest.approx(sweep["waste_%"].iloc[1])
    assert kernel_ax.get_title() == "speed: decode kernel on NVIDIA H100 80GB HBM3 (recorded)"
    assert "block 256" in explorer.status.value and "0% of a 250-token" in explorer.status.value


def _live_rows(run: int, start: float, rate: float, steps: int = 40) -> list[dict]:
    return [{"wall": start + i * 0.1, "run": run, "num_generated_tokens": rate * 0.1, "num_running_seqs": 8,
             "num_waiting": 4, "num_swapped": 0, "kv_usage": 0.5, "mem_tokens": 40, "mem_capacity": 100}
            for i in range(steps)]


def test_live_figure_gives_each_run_its_setting_and_steady_rate_and_overlays_the_pinned_run():
    frame = pd.DataFrame(_live_rows(0, 0.0, 300) + _live_rows(1, 5.0, 150))
    marks = [(0.0, "block_size 16, KV cache 8 MiB"), (5.0, "block_size 64, KV cache 8 MiB")]
    t = frame[frame["run"] == 0]["wall"].to_numpy()
    assert steady_rate(t, np.full(len(t), 30.0)) == pytest.approx(300, rel=0.01)
    pinned = {"run": 1, "label": marks[0][1], "start": 0.0, "steady": 300.0, "rows": frame[frame["run"] == 0]}
    gpu = pd.DataFrame({"wall": [1.0, 2.0], "name": "NVIDIA H200", "memory_used": [60 * 2**30, 61 * 2**30],
                        "memory_total": 141 * 2**30, "gpu_utilization": [90, 95]})
    fig = live_figure(frame, marks, pinned=pinned, gpu=gpu)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend[0] == "run 1: block_size 16, KV cache 8 MiB: 300 tok/s steady"
    assert legend[1] == "run 2: block_size 64, KV cache 8 MiB: 150 tok/s steady"
    assert legend[2].startswith("pinned run 1, drawn from the newest run's start")
    pinned_line = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"][0]
    assert pinned_line.get_xdata()[0] == pytest.approx(5.0)        # shifted to the newest run's start
    assert fig.axes[3].get_title() == "GPU (NVML): NVIDIA H200"
    memory = [line for line in fig.axes[3].get_lines() if line.get_label() == "memory used"][0]
    np.testing.assert_allclose(memory.get_ydata(), [60, 61])


def test_sliding_rate_waits_half_a_window_then_gives_the_rate():
    from pagedlab.lab.dashboard import sliding_rate
    seconds = np.arange(0, 4.01, 0.1)
    counts = np.full(len(seconds), 30.0)
    counts[1] = 3000.0                       # the batch's prefills finishing together right after a (re)start
    rate = sliding_rate(seconds, counts, window=2.0)
    assert np.isnan(rate[seconds < 1.0 - 1e-9]).all()
    np.testing.assert_allclose(rate[seconds > 2.15], 300.0)
