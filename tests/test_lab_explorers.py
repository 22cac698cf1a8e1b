"""The explorers of notebooks 1-4: the memory maps, block tables, sharing and request-state views they draw,
checked against what the engine did."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("ipywidgets")

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
