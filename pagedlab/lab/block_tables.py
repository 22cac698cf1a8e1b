"""Block tables beside the physical blocks they point to, drawn from an engine `Snapshot`, and notebook 2's player
that steps a real engine (or plays back its steps) and lets a learner type a prompt and watch its blocks fill.

Every cell is a block: pale in its request's colour when allocated, filled from the left in the solid colour for
the slots that hold a token, with its physical id (or refcount) written on it. A request keeps its colour in every
figure (`memory_maps.request_color`).
"""
from __future__ import annotations

import html

import ipywidgets as widgets
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from pagedlab.core.snapshot import Snapshot
from pagedlab.lab.explorer import STYLE, Explorer, slider_layout
from pagedlab.lab.memory_maps import FREE_COLOR, request_color

PALE = 0.25     # how much of its request's colour an allocated, empty slot range gets
CACHED_FREE_COLOR = "#bbdefb"


def _pale(color) -> tuple:
    return tuple(PALE * np.asarray(color) + (1 - PALE))


def _draw_cells(ax, cells: list[tuple[float, float, tuple, float, str]], text_size: float) -> None:
    """cells: (x, y, colour, filled share, label). Pale background, solid filled part, label on top."""
    back, front = [], []
    for x, y, color, share, _ in cells:
        back.append(Rectangle((x - 0.45, y - 0.4), 0.9, 0.8, facecolor=_pale(color) if share >= 0 else color,
                              edgecolor="#616161", linewidth=0.6))
        if share > 0:
            front.append(Rectangle((x - 0.45, y - 0.4), 0.9 * share, 0.8, facecolor=color, linewidth=0))
    ax.add_collection(PatchCollection(back, match_original=True))
    ax.add_collection(PatchCollection(front, match_original=True))
    if text_size:
        for x, y, _, _, label in cells:
            if label:
                ax.text(x, y, label, ha="center", va="center", fontsize=text_size, color="black", clip_on=True,
                        in_layout=False)     # hundreds of labels: keep them out of the layout's measuring


def draw_block_tables(ax, snapshot: Snapshot, label: str = "physical", max_seqs: int = 24) -> None:
    """Row = sequence, column = logical block; the cell's number: its physical block (or refcount). A cell has
    the colour of the block's first holder, as in the physical view: a prefix-cache hit shows the blocks of the
    request that computed them."""
    bs = snapshot.block_size
    seqs = list(snapshot.seqs)[:max_seqs]
    width = max([len(s.block_table) for s in seqs] + [1])
    cells = []
    for row, seq in enumerate(seqs):
        for j, block in enumerate(seq.block_table):
            color = request_color(snapshot.blocks[block].owners[0].split("/")[0])   # whoever holds it first
            filled = min(bs, max(0, seq.num_computed_tokens - j * bs))
            refs = snapshot.blocks[block].ref_count
            text = str(block) if label == "physical" else (f"{refs}" if refs > 1 else "")
            cells.append((j, row, color, filled / bs, text))
    _draw_cells(ax, cells, 7 if width <= 40 else 0)
    ax.set_xlim(-0.6, width - 0.4)
    ax.set_ylim(max(len(seqs), 1) - 0.5, -0.5)
    ax.set_yticks(range(len(seqs)), [f"req {s.request_id}/{s.seq_index}: {s.num_computed_tokens} tok"
                                     + ("" if s.block_table else f" ({s.status})") for s in seqs],
                  fontsize="small")
    if not seqs:
        ax.text(0.5, 0.5, "no sequence holds blocks", transform=ax.transAxes, ha="center", color="#757575")
    for tick, seq in zip(ax.get_yticklabels(), seqs):
        tick.set_color(request_color(seq.request_id))
    ax.set_xticks(range(width) if width <= 24 else range(0, width, 4))
    ax.set_xlabel(f"logical block (token position // {bs})")
    ax.set_ylabel("sequence")
    what = "physical block id" if label == "physical" else "refcount, where more than 1"
    ax.set_title(f"block tables (number in a cell: {what})", fontsize="medium")


def draw_physical_blocks(ax, snapshot: Snapshot, columns: int = 16, label: str = "id") -> None:
    """Every physical block in id order, `columns` per row: its owner's colour, filled as far as it holds tokens;
    a black dot where a block is shared by more than one sequence."""
    bs = snapshot.block_size
    cells, shared = [], []
    for block in snapshot.blocks:
        row, col = divmod(block.block_id, columns)
        if block.owners:
            color = request_color(block.owners[0].split("/")[0])
            share = block.filled / bs
        else:
            color, share = (CACHED_FREE_COLOR if block.cached else FREE_COLOR), -1
        text = str(block.block_id) if label == "id" else (f"{block.ref_count}" if block.ref_count > 1 else "")
        cells.append((col, row, color, share, text))
        if block.ref_count > 1:
            shared.append((col + 0.35, row - 0.25))
    rows = -(-snapshot.num_blocks // columns)
    _draw_cells(ax, cells, 7 if columns <= 24 else 0)
    if shared:
        ax.scatter(*zip(*shared), s=14, c="black", zorder=3)
    ax.set_xlim(-0.6, columns - 0.4)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks(range(rows), [f"{r * columns}-" for r in range(rows)], fontsize="x-small")
    ax.set_ylabel("block id", fontsize="small")
    usage = snapshot.usage
    ax.set_title(f"physical blocks: {usage['usage']:.0%} taken, {usage['utilization']:.0%} of their slots hold "
                 "tokens", fontsize="medium")


def legend_handles(snapshot: Snapshot, shared: bool = False) -> list:
    requests = list(dict.fromkeys(s.request_id for s in snapshot.seqs))
    handles = [Patch(color=request_color(r), label=f"request {r}") for r in requests]
    example = request_color(requests[0]) if requests else (0.3, 0.3, 0.3)
    handles += [Patch(facecolor=_pale(example), edgecolor="#616161",
                      label=f"pale part: allocated slots with no token yet (a block = {snapshot.block_size} slots)"),
                Patch(facecolor=FREE_COLOR, edgecolor="#616161", label="free block")]
    if any(b.cached and not b.owners for b in snapshot.blocks):
        handles.append(Patch(facecolor=CACHED_FREE_COLOR, edgecolor="#616161", label="free, prefix still cached"))
    if shared:
        handles.append(Patch(color="black", label="dot: shared by more than one sequence"))
    return handles


def block_tables_figure(snapshot: Snapshot, columns: int = 16, label: str = "physical", title: str = "") -> Figure:
    """The block tables (left) and the physical blocks (right) at one instant, in the same colours."""
    width = max([len(s.block_table) for s in snapshot.seqs] + [1])
    rows = max(len(snapshot.seqs), 2)
    fig = Figure(figsize=(4.0 + min(width, 40) * 0.22 + 0.28 * columns, 1.8 + max(0.32 * rows, 0.3 *
                          -(-snapshot.num_blocks // columns))), layout="constrained")
    tables_ax, blocks_ax = fig.subplots(1, 2, width_ratios=[max(min(width, 40), 6), columns])
    draw_block_tables(tables_ax, snapshot, label)
    draw_physical_blocks(blocks_ax, snapshot, columns, "id" if label == "physical" else "refcount")
    shared = any(b.ref_count > 1 for b in snapshot.blocks)
    fig.legend(handles=legend_handles(snapshot, shared), loc="outside lower center", ncols=3, fontsize="small")
    fig.suptitle(title or f"step {snapshot.step}: {snapshot.num_blocks} blocks of {snapshot.block_size} token "
                 "slots; the solid part of a cell = slots holding a token", fontsize="medium")
    return fig


class BlockTablePlayer(Explorer):
    """Steps a real engine and keeps a snapshot after every step; `step` (with a Play button) shows any of them.
    `ask(text)` adds a request (a chat message when the model has a chat template) and runs the engine until it
    is answered, redrawing after every step."""

    main_control = "step"

    def __init__(self, engine, columns: int = 16, max_new_tokens: int = 48, chat: bool = True) -> None:
        self.engine, self.columns, self.max_new_tokens = engine, columns, max_new_tokens
        self.snapshots: list[Snapshot] = [engine.snapshot()]
        self.texts: list[dict[str, str]] = [{}]      # per snapshot: each request's output text so far
        self.outputs: dict = {}                      # request id -> its RequestOutput, once finished
        controls = {"step": widgets.IntSlider(value=0, min=0, max=0, description="after step",
                                              continuous_update=True, style=STYLE, layout=slider_layout("280px"))}
        self.play = widgets.Play(value=0, min=0, max=0, interval=700, description="play")
        widgets.jslink((self.play, "value"), (controls["step"], "value"))
        self.prompt = widgets.Text(placeholder="type a message, then Enter", continuous_update=False,
                                   layout=slider_layout())
        self.prompt.observe(self._asked, names="value")
        asking = [widgets.HTML("<b>Ask the model</b> (Enter sends):"), self.prompt] if chat else []
        super().__init__(controls, extra=[self.play, *asking])
        self.redraw()

    def run(self, prompts, params, redraw_every: int = 0) -> None:
        """Add the prompts and step until every request is done, keeping a snapshot of every step."""
        for prompt in prompts:
            self.engine.add_request(prompt, params)
        self._step_until_done(redraw_every)

    def _asked(self, change) -> None:
        if change["new"].strip():
            self.ask(change["new"])
            self.prompt.value = ""

    def ask(self, text: str, max_tokens: int | None = None) -> None:
        from pagedlab import SamplingParams

        tokenizer = self.engine.tokenizer
        prompt = text
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                   add_generation_prompt=True)
        params = SamplingParams(temperature=0, max_tokens=max_tokens or self.max_new_tokens)
        self.engine.add_request(prompt, params)
        self._step_until_done(redraw_every=1)

    def _step_until_done(self, redraw_every: int) -> None:
        texts = dict(self.texts[-1])
        sched, tokenizer = self.engine.scheduler, self.engine.tokenizer
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                texts[output.request_id] = output.outputs[0].text if output.outputs else ""
                if output.finished:
                    self.outputs[output.request_id] = output
            for request in list(sched.running) + list(sched.swapped) + list(sched.waiting):
                tokens = request.seqs[0].output_token_ids
                texts[request.request_id] = tokenizer.decode(tokens) if tokenizer else f"{len(tokens)} tokens"
            self.snapshots.append(self.engine.snapshot())
            self.texts.append(dict(texts))
            self._extend_range()
            if redraw_every and len(self.snapshots) % redraw_every == 0:
                self.redraw(step=len(self.snapshots) - 1)
        self._extend_range()
        self.redraw(step=len(self.snapshots) - 1)

    def _extend_range(self) -> None:
        last = len(self.snapshots) - 1
        self._quiet = True
        try:
            self.controls["step"].max = self.play.max = last
        finally:
            self._quiet = False

    def draw(self, step: int) -> tuple[Figure, str]:
        snapshot = self.snapshots[step]
        figure = block_tables_figure(snapshot, self.columns)
        texts = self.texts[step]
        lines = [f"<span style='color:rgb{tuple(int(255 * c) for c in request_color(rid))}'>&#9632;</span> "
                 f"<b>request {rid}</b>: {html.escape(text[-160:])}" for rid, text in texts.items()]
        return figure, "<br>".join(lines) or "no request yet"


def block_table_engine(block_size: int, num_blocks: int, max_model_len: int = 128, real_model: bool = False,
                       **kwargs):
    """An engine for watching block tables on the CPU: with `real_model`, SmolLM2-135M-Instruct when `make models`
    has fetched it; else (or without it) the lab's KJV toy model. max_model_len is cut to what `num_blocks` of
    `block_size` hold, so any cache size runs. Returns (engine, model path, model name)."""
    from pagedlab.engine.llm import build_engine
    from pagedlab.lab.models import lab_model_dir
    from pagedlab.models.catalog import smollm2_path

    settings = dict(block_size=block_size, num_gpu_blocks_override=num_blocks,
                    max_model_len=min(max_model_len, num_blocks * block_size), **kwargs)
    real = smollm2_path() if real_model else None
    if real is not None:
        return build_engine(str(real), **settings), str(real), "SmolLM2-135M-Instruct"
    toy = lab_model_dir()
    return build_engine(toy, **settings), toy, "the KJV toy model"
