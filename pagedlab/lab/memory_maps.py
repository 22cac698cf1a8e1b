"""Physical memory maps: what every block of the KV cache holds at one instant, one cell per block, coloured by
the request that owns it, for the paged pool and the static arena alike.

A `BlockMap` is the picture of one instant: owner, fill and accounting category of every block. `map_at` re-runs a
simulation up to a step (fast-forwarded, so well under a second) and takes it there.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, replace

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch

from pagedlab.sim.simulator import SimConfig, Simulator
from pagedlab.sim.workloads import TraceRequest

# Block categories, as in core/accounting.py: a block is full of tokens, partly filled (internal fragmentation),
# allocated but empty (reserved), free in a hole too small for the next reservation (external), or free.
FULL, PARTIAL, RESERVED, EXTERNAL, FREE = range(5)
EXTERNAL_COLOR, FREE_COLOR, DIMMED_COLOR = to_rgb("#6a1b9a"), to_rgb("#eeeeee"), to_rgb("#d0d0d0")
PURPLE_HUES = (0.70, 0.88)
FILL_SHADE = {FULL: 1.0, PARTIAL: 0.55, RESERVED: 0.22}     # how much of the request's colour a cell gets


def request_colors(count: int) -> np.ndarray:
    """`count` distinct colours, one per request: hues a golden angle apart (purple left to external
    fragmentation), cycling through three lightness and saturation levels, so neighbouring requests differ in hue
    and requests far apart still differ in shade."""
    colors = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0 * (1 - PURPLE_HUES[1] + PURPLE_HUES[0])
        hue += (PURPLE_HUES[1] - PURPLE_HUES[0]) * (hue > PURPLE_HUES[0])     # skip external fragmentation's hue
        level = i % 3
        colors.append(colorsys.hsv_to_rgb(hue, (0.85, 0.6, 0.95)[level], (0.85, 0.65, 0.55)[level]))
    return np.array(colors).reshape(-1, 3)


def request_color(request_id: str) -> tuple[float, float, float]:
    """The colour of one request: the same in every figure of the lab (the engine's ids count up from 0)."""
    index = request_index(request_id)
    return tuple(request_colors(index + 1)[index])


def request_index(request_id: str) -> int:
    return int(request_id) if request_id.isdigit() else sum(map(ord, request_id)) % 997


@dataclass
class BlockMap:
    """One instant of the cache: per block, the owning request (-1: none), filled slots and category."""
    time: float
    step: int
    block_size: int
    owner: np.ndarray        # int32, request index or -1
    filled: np.ndarray       # int32, slots holding a token
    category: np.ndarray     # uint8, FULL | PARTIAL | RESERVED | EXTERNAL | FREE
    usage: dict              # the engine's own slot accounting at this instant (MemoryUsage.as_dict())

    @property
    def num_blocks(self) -> int:
        return len(self.owner)

    def blocks_of(self, request: int) -> np.ndarray:
        return np.flatnonzero(self.owner == request)


def block_map(engine, time: float = 0.0) -> BlockMap:
    """The engine's cache right now. Static: each region in its request's colour, holes too small for the next
    reservation marked external (as the accounting counts them). Paged: each block in its owner's colour."""
    kv, bs = engine.kv, engine.kv.block_size
    owner = np.full(kv.num_blocks, -1, dtype=np.int32)
    filled = np.zeros(kv.num_blocks, dtype=np.int32)
    category = np.full(kv.num_blocks, FREE, dtype=np.uint8)
    sched = engine.scheduler
    requests = list(sched.running) + list(sched.swapped) + list(sched.waiting)
    for request in requests:
        index = request_index(request.request_id)
        for seq in request.seqs:
            held = kv.blocks_held(seq)      # its block table, then any region kept for its forks (static)
            if not held:
                continue
            blocks = np.asarray(held)
            fill = np.clip(seq.num_computed_tokens - bs * np.arange(len(blocks)), 0, bs)
            fresh = owner[blocks] < 0
            owner[blocks[fresh]] = index
            filled[blocks] = np.maximum(filled[blocks], fill)
    taken = owner >= 0
    category[taken] = np.where(filled[taken] == bs, FULL, np.where(filled[taken] > 0, PARTIAL, RESERVED))
    waiting = sched.waiting
    for start, length in kv.unusable_holes(
            waiting[0].max_total_tokens(sched.config.max_model_len) if waiting else None):
        category[start:start + length] = EXTERNAL
    return BlockMap(time, sched.step_id, bs, owner, filled, category, engine.memory_usage().as_dict())


def map_at(config: SimConfig, trace: list[TraceRequest], step: int) -> BlockMap:
    """The cache of `config` running `trace`, after `step` steps."""
    sim = Simulator(replace(config, timeline=False), trace)
    if step > 0:
        sim.run(max_steps=step)
    return block_map(sim.engine, sim.clock())


def map_image(picture: BlockMap, columns: int, highlight: int | None = None) -> np.ndarray:
    """RGB image, one pixel per block (row-major): the owner's colour shaded by how full the block is, external
    fragmentation purple, free blocks grey. With `highlight`, every other request's blocks are greyed out."""
    rows = math.ceil(picture.num_blocks / columns)
    image = np.ones((rows * columns, 3))
    palette = request_colors(max(int(picture.owner.max()) + 1, 1))
    taken = picture.owner >= 0
    shade = np.array([FILL_SHADE.get(c, 0.0) for c in range(5)])[picture.category][:, None]
    base = np.where(taken[:, None], palette[np.maximum(picture.owner, 0)], 1.0)
    image[:picture.num_blocks] = shade * base + (1 - shade) * 1.0
    if highlight is not None:
        others = taken & (picture.owner != highlight)
        image[:picture.num_blocks][others] = DIMMED_COLOR
    image[:picture.num_blocks][picture.category == EXTERNAL] = EXTERNAL_COLOR
    image[:picture.num_blocks][picture.category == FREE] = FREE_COLOR
    return image.reshape(rows, columns, 3)


def draw_map(ax, picture: BlockMap, columns: int, highlight: int | None = None) -> None:
    """One panel: the map, no ticks, the blocks' arrangement under it."""
    ax.imshow(map_image(picture, columns, highlight), aspect="equal", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{picture.num_blocks:,} blocks of {picture.block_size} slots, {columns} per row "
                  f"(row 0 = blocks 0..{columns - 1})", fontsize="small")


def map_legend(example_color=(0.12, 0.47, 0.71)) -> list[Patch]:
    """The legend every map shares: one request's shades stand for all requests' (each has its own colour)."""
    shade = lambda c: tuple(FILL_SHADE[c] * np.asarray(example_color) + (1 - FILL_SHADE[c]))
    return [Patch(color=shade(FULL), label="a request's block, full of tokens (colour = request)"),
            Patch(color=shade(PARTIAL), label="its partly filled block (internal)"),
            Patch(color=shade(RESERVED), label="allocated to it, no token yet (reserved)"),
            Patch(color=EXTERNAL_COLOR, label="free, in a hole too small for a reservation (external)"),
            Patch(color=FREE_COLOR, label="free")]


def columns_for(num_blocks: int) -> int:
    """A near-2:1 grid: 32 columns for 512 blocks, 64 for 2,048."""
    return max(8, 2 ** round(math.log2(math.sqrt(2 * num_blocks))))
