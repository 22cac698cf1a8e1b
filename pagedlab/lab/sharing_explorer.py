"""Notebook 3's explorer: three requests with one system prompt and `n` samples each, on the engine's paged
cache with prefix caching (the simulator's engine: the real scheduler and block manager, no model). The block
tables and the physical blocks show every refcount; the prefix-cache hits and copy-on-write copies so far are
listed beside them."""
from __future__ import annotations

import ipywidgets as widgets
from matplotlib.figure import Figure

from pagedlab import events as ev
from pagedlab.core.snapshot import Snapshot
from pagedlab.lab.block_tables import block_tables_figure
from pagedlab.lab.explorer import STYLE, Explorer, slider_layout
from pagedlab.sim.simulator import SimConfig, Simulator
from pagedlab.sim.workloads import TraceRequest

QUESTION_TOKENS = (6, 9, 5)         # each request's own tokens after the system prompt


def sharing_trace(system_prompt: int, n: int, max_tokens: int = 8) -> list[TraceRequest]:
    """Request 0 arrives first; requests 1 and 2, with the same system prompt, once its prefill has run."""
    return [TraceRequest(prompt_len=system_prompt + q, output_len=max_tokens, arrival=0.0 if i == 0 else 1e-9, n=n,
                         prefix_id=0, prefix_len=system_prompt) for i, q in enumerate(QUESTION_TOKENS)]


def run_sharing(system_prompt: int, n: int, step: int, block_size: int = 4, kv_slots: int = 512,
                max_model_len: int = 128) -> tuple[Snapshot, list, list]:
    """The engine after `step` steps: its snapshot, and the prefix hits and copy-on-write events so far."""
    config = SimConfig(kv_tokens=kv_slots, block_size=block_size, max_model_len=max_model_len,
                       enable_prefix_caching=True)
    sim = Simulator(config, sharing_trace(system_prompt, n))
    recorder = ev.Recorder(sim.engine.bus, {ev.PREFIX_HIT, ev.BLOCK_COW})
    sim.run(max_steps=step)
    recorder.close()
    hits = [e for e in recorder.events if e.kind == ev.PREFIX_HIT]
    copies = [e for e in recorder.events if e.kind == ev.BLOCK_COW]
    return sim.engine.snapshot(), hits, copies


class SharingExplorer(Explorer):
    """Controls: the system prompt's length, samples per request (n), the block size, and the step shown."""

    main_control = "system_prompt"

    def __init__(self, system_prompt: int = 24, n: int = 1, block_size: int = 4, step: int = 2,
                 max_model_len: int = 128) -> None:
        self.max_model_len = max_model_len
        controls = {
            "system_prompt": widgets.IntSlider(value=system_prompt, min=0, max=64, step=2,
                                               description="system prompt (tokens)", continuous_update=False,
                                               style=STYLE, layout=slider_layout()),
            "n": widgets.IntSlider(value=n, min=1, max=4, description="samples per request (n)",
                                   continuous_update=False, style=STYLE, layout=slider_layout()),
            "block_size": widgets.SelectionSlider(options=[2, 4, 8, 16], value=block_size, description="block_size",
                                                  continuous_update=False, style=STYLE, layout=slider_layout()),
            "step": widgets.IntSlider(value=step, min=1, max=8, description="after step", continuous_update=False,
                                      style=STYLE, layout=slider_layout()),
        }
        super().__init__(controls)
        self.redraw()

    def draw(self, system_prompt: int, n: int, block_size: int, step: int) -> tuple[Figure, str]:
        snapshot, hits, copies = run_sharing(system_prompt, n, step, block_size, max_model_len=self.max_model_len)
        usage = snapshot.usage
        title = (f"after step {step}: {usage['tokens']} token slots stored, {usage['shared_saved']} more without "
                 f"sharing; {len(copies)} copy-on-write copies so far")
        figure = block_tables_figure(snapshot, columns=max(16, snapshot.num_blocks // 8), label="refcount",
                                     title=title)
        lines = [f"prefix cache: request {e.data['request'].request_id} found {e.data['tokens']} prompt tokens "
                 f"at step {e.step}" for e in hits if e.data["tokens"]]
        lines += [f"copy-on-write at step {e.step}: shared block {e.data['block']} copied to {e.data['dst']}"
                  for e in copies]
        reserved = n * self.max_model_len
        lines.append(f"<i>A static allocator would reserve n x max_model_len = {n} x {self.max_model_len} = "
                     f"{reserved} slots per request, copies of the prompt included: "
                     f"{snapshot.num_blocks * block_size // reserved} such requests fit in this "
                     f"{snapshot.num_blocks * block_size}-slot cache.</i>")
        return figure, "<br>".join(lines)
