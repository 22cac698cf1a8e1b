"""The lab's live engine steps in an engine-core process of its own and reports every step to the notebook's
process: it starts, streams steps, stops, restarts with new settings (history kept), refuses settings that cannot
work without losing the process, follows a chat message's blocks, and leaves neither a thread nor a process
behind when closed. The dashboard's refresh loop outlives stops and restarts. 07's simulator playground draws
PNGs on Image widgets (no ipywidgets.Output: see tests/test_notebooks.py)."""
import math
import os
import threading
import time

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

from pagedlab import lab  # noqa: E402
from pagedlab.config import ConfigError  # noqa: E402

SETTINGS = dict(max_model_len=128, cpu_kv_cache_space=1 / 1024, max_num_batched_tokens=256)


def _until(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def _lab_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("pagedlab")]


def test_live_engine_steps_in_its_own_process_and_keeps_history_across_restarts():
    live = lab.LiveEngine(lab.lab_model_dir(), backlog=8)
    live.start(run_seconds=1.0, block_size=16, **SETTINGS)
    core = live._core.process
    assert live.pid not in (None, os.getpid()) and core.is_alive()
    assert live.running and live.wait(30) and live.finished and live.error is None
    live.start(run_seconds=1.0, block_size=32, **SETTINGS)
    assert live.pid == core.pid                      # the same process, a new engine
    assert live.wait(30) and live.info["block_size"] == 32 and live.info["num_blocks"] == 8
    frame = live.frame()
    assert set(frame["run"]) == {0, 1} and len(live.marks) == 2
    assert frame["num_generated_tokens"].sum() > 0 and (frame["step"].diff().dropna() != 0).all()
    assert (frame["mem_capacity"] == 256).all()                 # 1 MiB of 4 KiB tokens
    assert (frame["wall"].diff().dropna() >= 0).all() and frame["wall"].iloc[0] >= live.marks[0][0]
    fig = lab.live_figure(frame, live.marks)
    throughput_lines = [line for line in fig.axes[0].get_lines() if line.get_linestyle() != "--"]
    assert len(throughput_lines) == 2                  # one per run; dashed lines mark the restarts
    live.close()
    assert not core.is_alive() and core.exitcode == 0 and "pagedlab-live-receiver" not in _lab_threads()


def test_stop_halts_the_steps_and_a_bad_setting_is_refused_without_losing_the_process():
    live = lab.LiveEngine(lab.lab_model_dir(), backlog=8)
    live.start(run_seconds=60.0, block_size=16, **SETTINGS)
    assert _until(lambda: len(live.rows) > 5)
    live.stop()
    assert not live.running and not live.finished and live.error is None
    steps = len(live.rows)
    time.sleep(0.5)
    assert len(live.rows) == steps                     # nothing steps after a stop
    pid = live.pid
    with pytest.raises(ConfigError, match="max_model_len"):
        live.start(run_seconds=1.0, block_size=16, max_model_len=128, cpu_kv_cache_space=0.1 / 1024)
    assert live.info is None and live.engine_memory() is None and len(live.marks) == 1
    live.start(run_seconds=1.0, block_size=16, **SETTINGS)
    assert live.pid == pid and live.wait(30) and len(live.rows) > steps and len(live.marks) == 2
    memory = live.engine_memory()
    assert memory["num_blocks"] == 16 and 0 <= memory["blocks_taken"] <= 16
    live.close()


def test_a_chat_message_joins_the_running_batch_and_its_blocks_fill():
    live = lab.LiveEngine(lab.lab_model_dir(), backlog=4)
    live.start(run_seconds=30.0, block_size=8, **SETTINGS)
    turn = live.send("In the beginning", max_tokens=20)
    assert turn.request_id == "chat-1"
    assert _until(lambda: turn.status == "finished" or not live.running)
    live.close()
    assert turn.status == "finished" and turn.error is None and turn.answer
    filled = sum(f for _, f in turn.blocks)
    assert len(turn.blocks) == math.ceil(filled / 8) and turn.block_size == 8
    assert turn.prompt_tokens < filled <= turn.prompt_tokens + 20


def test_dashboard_restarts_on_each_change_and_keeps_redrawing_after_a_stop():
    dashboard = lab.LiveDashboard(model=lab.lab_model_dir(), run_seconds=30.0, refresh_seconds=0.1,
                                  max_model_len=512)
    assert dashboard.memory.min == 2      # one 512-token request of the tiny model: 512 x 4 KiB
    assert dashboard.memory.value == 16 and dashboard.status.value.startswith("run 1")
    assert _until(lambda: len(dashboard.live.rows) > 3 and dashboard.plot.value)
    dashboard.stop()
    assert dashboard.status.value.startswith("stopped") and not dashboard.live.running
    stopped_plot = dashboard.plot.value
    dashboard.memory.value = 4            # a restart
    dashboard.block_size.value = 32       # and another
    assert len(dashboard.live.marks) == 3 and dashboard.live.info["block_size"] == 32
    rows = len(dashboard.live.rows)
    assert _until(lambda: len(dashboard.live.rows) > rows + 3 and dashboard.plot.value != stopped_plot)
    assert dashboard._loop.is_alive() and bytes(dashboard.plot.value).startswith(b"\x89PNG")
    assert _until(lambda: "KV cache on cpu: 32 blocks" in dashboard.gpu.value)     # 4 MiB of 128 KiB blocks
    dashboard.pin()                       # the newest run: run 3
    assert dashboard.pinned["run"] == 3 and dashboard.pinned["label"].startswith("block_size 32, KV cache 4 MiB")
    legend = [t.get_text() for t in dashboard.figure().legends[0].get_texts()]
    assert legend[-1].startswith("pinned run 3, drawn from the newest run's start: block_size 32")
    dashboard.close()
    assert _lab_threads() == [] and not dashboard._loop.is_alive()


def test_the_playground_draws_its_figures_as_pngs_on_image_widgets():
    import ipywidgets as widgets

    playground = lab.SimPlayground(num_requests=20)
    first = {view: bytes(image.value) for view, image in playground.images.items()}
    assert list(first) == ["memory", "throughput"] and all(png.startswith(b"\x89PNG") for png in first.values())
    playground.controls["gpu_memory_utilization"].value = 0.65        # the 13B model's weights leave no KV cache
    assert "ConfigError" in playground.summary.value and playground.plots.layout.display == "none"
    playground.controls["gpu_memory_utilization"].value = 0.8
    assert playground.plots.layout.display is None
    assert all(bytes(image.value) != first[view] for view, image in playground.images.items())

    def tree(widget):
        yield widget
        for child in getattr(widget, "children", ()):
            yield from tree(child)
    assert not any(isinstance(w, widgets.Output) for w in tree(playground.widget))
