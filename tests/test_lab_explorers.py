"""The explorers of notebooks 1-4: the memory maps, block tables, sharing and request-state views they draw,
checked against what the engine did."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")
from matplotlib.collections import PatchCollection  # noqa: E402

from pagedlab import lab  # noqa: E402
from pagedlab.lab import memory_maps as mm  # noqa: E402
from pagedlab.lab.fragmentation_explorer import step_at  # noqa: E402
from pagedlab.sim.simulator import SimConfig  # noqa: E402
from pagedlab.sim.workloads import TraceRequest  # noqa: E402

# 40 blocks of 16 slots; a 192-token reservation is 12 blocks, so 3 fit and the last 4 blocks never can.
ARENA = SimConfig(kv_tokens=640, block_size=16, max_model_len=192, allocator="static")
FIVE_REQUESTS = [TraceRequest(prompt_len=50, output_len=100) for _ in range(5)]


def test_static_leftover_that_no_reservation_fits_is_external_in_map_and_accounting():
    picture = mm.map_at(ARENA, FIVE_REQUESTS, step=5)
    assert sorted(set(picture.owner[:36])) == [0, 1, 2]                  # three regions of 12 blocks
    np.testing.assert_array_equal(np.flatnonzero(picture.category == mm.EXTERNAL), [36, 37, 38, 39])
    assert picture.usage["external"] == 4 * 16 and picture.usage["free"] == 0
    assert picture.usage["external"] / picture.usage["capacity"] == pytest.approx(0.1)
    # Each region: 55 tokens computed after the prompt and 5 decode steps = 3 full blocks, 1 partly filled.
    categories = picture.category[picture.owner == 0]
    assert list(categories[:4]) == [mm.FULL] * 3 + [mm.PARTIAL] and set(categories[4:]) == {mm.RESERVED}
    paged = mm.map_at(SimConfig(kv_tokens=640, block_size=16, max_model_len=192), FIVE_REQUESTS, step=5)
    assert paged.usage["external"] == 0 and not (paged.category == mm.EXTERNAL).any()


def test_map_categories_add_up_to_the_engines_slot_accounting():
    for allocator, reservation in (("paged", "max_model_len"), ("static", "request"), ("static", "max_model_len")):
        config = SimConfig(workload="sharegpt", num_requests=30, kv_gib=0.25, allocator=allocator,
                           static_reservation=reservation)
        run = lab.simulate(config)
        trace = lab.runs.load_trace(config.workload, config.num_requests, config.seed, config.request_rate)
        for step in (1, run.summary["steps"] // 3, run.summary["steps"] // 2):
            picture = mm.map_at(config, trace, step)
            bs, usage = picture.block_size, picture.usage
            taken = picture.owner >= 0
            assert picture.filled[taken].sum() == usage["tokens"]
            assert (picture.category == mm.EXTERNAL).sum() * bs == usage["external"]
            assert (picture.category == mm.FREE).sum() * bs == usage["free"]
            assert (picture.category == mm.RESERVED).sum() * bs == usage["reserved"]


def test_request_colours_are_distinct_and_keep_clear_of_external_purple():
    colors = mm.request_colors(200)
    distances = np.sqrt(((colors[:, None] - colors[None]) ** 2).sum(-1)) + 9 * np.eye(200)
    assert distances[:60, :60].min() > 0.02 and distances.min() > 0
    assert np.sqrt(((colors - mm.EXTERNAL_COLOR) ** 2).sum(-1)).min() > 0.15
    assert mm.request_color("7") == tuple(colors[7])


def test_a_request_has_the_same_colour_in_the_static_and_the_paged_map():
    pictures = {allocator: mm.map_at(SimConfig(kv_tokens=640, block_size=16, max_model_len=192,
                                               allocator=allocator), FIVE_REQUESTS, step=3)
                for allocator in ("static", "paged")}
    for picture in pictures.values():
        image = mm.map_image(picture, columns=8).reshape(-1, 3)
        for request in (0, 1, 2):
            full = np.flatnonzero((picture.owner == request) & (picture.category == mm.FULL))
            assert len(full) and np.allclose(image[full], mm.request_colors(3)[request])


def test_following_a_request_greys_out_everyone_else():
    picture = mm.map_at(ARENA, FIVE_REQUESTS, step=5)
    image = mm.map_image(picture, columns=8, highlight=1).reshape(-1, 3)
    assert np.allclose(image[picture.owner == 0], mm.DIMMED_COLOR)
    assert not np.allclose(image[picture.owner == 1], mm.DIMMED_COLOR)
    assert np.allclose(image[picture.category == mm.EXTERNAL], mm.EXTERNAL_COLOR)


@pytest.fixture(scope="module")
def fragmentation():
    return lab.FragmentationExplorer(num_requests=30, kv_gib=0.25, max_model_len=1536, time=1.0)


def test_fragmentation_explorer_moves_the_instant_on_one_time_axis(fragmentation):
    runs, _ = fragmentation.runs(fragmentation.settings(**fragmentation.values()))
    end = max(run.summary["simulated_seconds"] for run in runs.values())
    assert fragmentation.controls["time"].max == pytest.approx(round(end, 1) + 0.1)
    before = fragmentation.image.value
    figure = fragmentation.redraw(time=end / 2)
    assert fragmentation.image.value != before
    static_stack, paged_stack = figure.axes[2:4]
    assert static_stack.get_xlim() == paged_stack.get_xlim() == (0, end)
    cursor = [line.get_xdata()[0] for line in static_stack.get_lines()]
    assert cursor == [pytest.approx(end / 2, abs=0.06)]
    pictures = fragmentation.pictures(runs, _, fragmentation.controls["time"].value)
    assert pictures["static"].step == step_at(runs["static"], fragmentation.controls["time"].value)
    # 0.25 GiB = 2,048 slots: one 1536-token reservation, the other 512 slots are external all run long.
    assert "external 25%" in figure.axes[0].get_title()


def test_fragmentation_explorer_follows_a_request_and_refuses_a_cache_too_small(fragmentation):
    figure = fragmentation.redraw(request=3, time=0.5)
    assert "request 3 running" in [t.get_text() for t in figure.axes[3].get_legend().get_texts()]
    assert "request 3" in fragmentation.status.value
    assert fragmentation.redraw(max_model_len=4096) is None
    assert "max seq len (4096)" in fragmentation.status.value
    assert fragmentation.redraw(max_model_len=1024) is not None
    with pytest.raises(ValueError, match="unknown controls"):
        fragmentation.redraw(blocksize=3)


# --- block tables (notebooks 2 and 3) ---------------------------------------------------------------------------
def _rectangles(collection) -> dict:
    """(row, column) -> (width, colour) of each rectangle a PatchCollection draws (cells are 0.9 wide)."""
    out = {}
    for path, color in zip(collection.get_paths(), collection.get_facecolors()):
        (x0, y0), (x1, _) = path.vertices.min(0), path.vertices.max(0)
        out[(round(y0 + 0.4), round(x0 + 0.45))] = (x1 - x0, tuple(color[:3]))
    return out


def test_block_tables_show_each_blocks_fill_in_the_requests_colour():
    trace = [TraceRequest(prompt_len=40, output_len=4), TraceRequest(prompt_len=20, output_len=4)]
    snapshot = lab.snapshot_at(SimConfig(kv_tokens=640, block_size=16, max_model_len=192), step=1, trace=trace)
    figure = lab.block_tables_figure(snapshot)
    tables, blocks = figure.axes[:2]
    background, solid = (_rectangles(c) for c in tables.collections if isinstance(c, PatchCollection))
    # Request 0: 40 tokens = 2 full blocks and one half full (8 of 16 slots); request 1: 20 = 1 full + 4 of 16.
    assert sorted(background) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    widths = {cell: width for cell, (width, _) in solid.items()}
    assert widths == {(0, 0): pytest.approx(0.9), (0, 1): pytest.approx(0.9), (0, 2): pytest.approx(0.45),
                      (1, 0): pytest.approx(0.9), (1, 1): pytest.approx(0.9 * 4 / 16)}
    for (row, _), (_, color) in solid.items():
        assert color == pytest.approx(mm.request_color(str(row)))
    # The physical view: the same five blocks, the same colours, the same fill; every other block free.
    background, solid = (_rectangles(c) for c in blocks.collections if isinstance(c, PatchCollection))
    assert len(background) == snapshot.num_blocks and len(solid) == 5
    for (row, col), (width, color) in solid.items():
        block = snapshot.blocks[row * 16 + col]
        assert width == pytest.approx(0.9 * block.filled / 16)
        assert color == pytest.approx(mm.request_color(block.owners[0].split("/")[0]))
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels[:2] == ["request 0", "request 1"] and "free block" in labels


def test_max_model_len_follows_the_cache_so_tiny_caches_run():
    engine, _, name = lab.block_table_engine(block_size=1, num_blocks=24)
    assert engine.config.scheduler.max_model_len == 24 and engine.kv.num_blocks == 24
    player = lab.BlockTablePlayer(engine)
    player.run(["In the beginning"], lab_params(max_tokens=6))
    assert player.controls["step"].max == len(player.snapshots) - 1 >= 6
    first = player.snapshots[1].seqs[0]
    assert len(first.block_table) == first.num_computed_tokens       # a block per token
    before = player.image.value
    player.redraw(step=3)
    assert player.image.value != before and "request 0" in player.status.value


def lab_params(max_tokens):
    from pagedlab import SamplingParams
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_sharing_explorer_counts_prefix_hits_and_copy_on_write():
    from pagedlab.lab.sharing_explorer import run_sharing

    snapshot, hits, copies = run_sharing(system_prompt=24, n=4, step=2, block_size=4)
    assert [e.data["tokens"] for e in hits] == [24, 24]
    assert [(e.step, e.data["block"]) for e in copies] == [(2, 7)] * 3     # 30 tokens: block 7 holds 2, shared
    system_blocks = [b for b in snapshot.blocks[:6]]
    assert all(b.ref_count == 3 * 4 for b in system_blocks)               # 3 requests x 4 samples
    assert snapshot.usage["shared_saved"] > 0
    explorer = lab.SharingExplorer(system_prompt=24, n=4, step=2)
    assert "copied to" in explorer.status.value and "1 such requests fit" in explorer.status.value
    explorer.redraw(system_prompt=22, n=1)                                # 22 tokens: 5 full blocks cached
    assert "found 20 prompt tokens" in explorer.status.value


# --- request states (notebook 4) --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overloaded_runs():
    base = SimConfig(workload="sharegpt", num_requests=40, request_rate=20.0, kv_gib=0.25)
    return lab.compare_runs(base, recompute={"preemption_mode": "recompute"}, swap={"preemption_mode": "swap"})


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_preempted_request_is_not_running_until_it_is_back(overloaded_runs, mode):
    from pagedlab.lab.request_states import request_states

    run = overloaded_runs[mode]
    states = request_states(run)
    events = run.events
    preempted = events[events["kind"] == "request_preempted"]
    assert len(preempted) and set(preempted["mode"]) == {mode}
    away = "swapped" if mode == "swap" else "preempted"
    assert (states["state"] == away).sum() == len(preempted)
    starts = (run.timeline["time"] - run.timeline["duration"]).set_axis(run.timeline["step"])
    for e in preempted.itertuples():
        spans = states[(states["request_id"] == e.request) & (states["state"] == away)]
        assert starts[e.step] in set(spans["start"])
        after = states[(states["request_id"] == e.request) & (states["start"] >= starts[e.step])]
        assert after.iloc[0]["state"] == away and after.iloc[1]["state"] == "running"
    for rid, spans in states.groupby("request_id"):
        row = run.requests.set_index("request_id").loc[rid]
        assert spans["start"].iloc[0] == row["arrival"] and spans["end"].iloc[-1] == row["finished"]
        assert (spans["start"].to_numpy()[1:] == spans["end"].to_numpy()[:-1]).all()     # one state at a time
        assert spans["state"].iloc[0] == "waiting" and spans["state"].iloc[-1] == "running"


def test_batching_timelines_share_one_time_axis(overloaded_runs):
    figure = lab.batching_timeline(overloaded_runs, max_requests=1000)
    end = max(run.timeline["time"].max() for run in overloaded_runs.values())
    assert len(figure.axes) == 4 and all(ax.get_xlim() == (0, end) for ax in figure.axes)
    swapped_bars = figure.axes[2].collections[3].get_paths()
    assert len(swapped_bars) == (overloaded_runs["swap"].events["kind"] == "request_preempted").sum()
    assert "swapped" in [t.get_text() for t in figure.axes[1].get_legend().get_texts()]
    running = figure.axes[3].get_lines()[0].get_ydata()
    np.testing.assert_array_equal(running, overloaded_runs["swap"].timeline["num_running"])


def test_batching_explorer_brings_on_preemption_as_the_budget_shrinks():
    explorer = lab.BatchingExplorer(num_requests=30, kv_gib=4.0, request_rate=20.0)
    assert explorer.last_run.summary["preemptions"] == 0
    explorer.redraw(kv_gib=0.25)
    assert explorer.last_run.summary["preemptions"] > 0
    assert f"{explorer.last_run.summary['preemptions']} preemptions" in explorer.status.value
