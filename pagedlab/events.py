"""Instrumentation: an event bus the memory core and scheduler publish to, and a recorder that keeps what it hears.

Publishers guard every emit with `if bus.enabled:`, so with nobody subscribed an event costs one attribute read;
an event of a kind nobody listens for returns from `emit` at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# Block events carry `block` (physical id) and `seq`; request events carry `request`; `step` carries StepStats.
BLOCK_ALLOCATED = "block_allocated"
BLOCK_FREED = "block_freed"
BLOCK_SHARED = "block_shared"            # a fork or a prefix-cache hit took another reference
BLOCK_COW = "block_cow"                  # copy-on-write: `block` -> `dst`
BLOCK_SWAPPED_OUT = "block_swapped_out"  # `block` (gpu) -> `dst` (cpu)
BLOCK_SWAPPED_IN = "block_swapped_in"    # `block` (cpu) -> `dst` (gpu)
BLOCK_EVICTED = "block_evicted"          # a cached free block was reused, its prefix forgotten
PREFIX_HIT = "prefix_hit"                # `tokens` prompt tokens of `request` served from cache
REQUEST_ADMITTED = "request_admitted"
REQUEST_PREEMPTED = "request_preempted"  # `mode`: recompute | swap
REQUEST_SWAPPED_IN = "request_swapped_in"  # a swapped-out request's blocks are back: it runs again
REQUEST_FINISHED = "request_finished"    # `reason`
REQUEST_REJECTED = "request_rejected"    # `reason`
STEP = "step"

# The request-level events: a few per request, where block events are one per block.
REQUEST_EVENTS = frozenset({REQUEST_ADMITTED, REQUEST_PREEMPTED, REQUEST_SWAPPED_IN, REQUEST_FINISHED,
                            REQUEST_REJECTED, PREFIX_HIT})


@dataclass(frozen=True)
class Event:
    kind: str
    step: int
    data: dict[str, Any]


Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, frozenset[str] | None]] = []
        self._kinds: frozenset[str] | None = frozenset()     # the kinds anyone listens for (None: every kind)
        self.enabled = False
        self.step = 0

    def subscribe(self, fn: Subscriber, kinds: set[str] | None = None) -> Callable[[], None]:
        """Add a listener for the events of `kinds` (None: all of them); returns a function that removes it."""
        entry = (fn, None if kinds is None else frozenset(kinds))
        self._subscribers.append(entry)
        self._listened_changed()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
            self._listened_changed()
        return unsubscribe

    def _listened_changed(self) -> None:
        self.enabled = bool(self._subscribers)
        wanted = [kinds for _, kinds in self._subscribers]
        self._kinds = None if None in wanted else frozenset().union(*wanted)

    def wants(self, kinds: set[str]) -> bool:
        """Whether any listener takes events of one of these kinds."""
        return any(wanted is None or not wanted.isdisjoint(kinds) for _, wanted in self._subscribers)

    def emit(self, kind: str, **data: Any) -> None:
        if self._kinds is not None and kind not in self._kinds:
            return
        event = None
        for fn, wanted in list(self._subscribers):
            if wanted is None or kind in wanted:
                event = event or Event(kind, self.step, data)
                fn(event)


class Recorder:
    """Subscribes to a bus and keeps every event; `dataframe()` gives them to pandas, one row an event."""

    def __init__(self, bus: EventBus, kinds: set[str] | None = None) -> None:
        self.events: list[Event] = []
        self.kinds = kinds
        self.close = bus.subscribe(self.events.append, kinds)

    def dataframe(self, kind: str | None = None):
        import pandas as pd

        rows = [{"kind": e.kind, "step": e.step, **_flatten(e.data)} for e in self.events
                if kind is None or e.kind == kind]
        return pd.DataFrame(rows)

    def steps(self):
        """Per-step statistics (the STEP events) as a DataFrame indexed by step."""
        frame = self.dataframe(STEP)
        return frame.set_index("step") if not frame.empty else frame


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if hasattr(value, "request_id"):
            out[key] = value.request_id
        elif hasattr(value, "__dataclass_fields__"):
            out.update({f"{k}": v for k, v in vars(value).items()})
        else:
            out[key] = value
    return out
