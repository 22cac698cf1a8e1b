"""Each request's life as intervals of one state at a time, read from the request events the engine published:
waiting (arrived, not admitted yet), running (admitted: its prompt or its tokens are being computed), preempted
(its KV dropped, waiting to be recomputed) and swapped (its KV in CPU memory, waiting to come back)."""
from __future__ import annotations

import pandas as pd

STATES = ("waiting", "running", "preempted", "swapped")
STATE_COLORS = {"waiting": "#bdbdbd", "running": "#2e7d32", "preempted": "#e53935", "swapped": "#7e57c2"}
STATE_LABELS = {"waiting": "waiting (not admitted yet)", "running": "running (prefill or decode)",
                "preempted": "preempted: KV dropped, waits to recompute",
                "swapped": "swapped: KV in CPU memory, waits to come back"}
_NEXT_STATE = {"request_admitted": "running", "request_swapped_in": "running"}


def request_states(run) -> pd.DataFrame:
    """One row per (request, interval): request_id, state, start, end, in simulated seconds. Scheduling events
    happen as their step starts; a request ends when the step that finishes it ends."""
    columns = ["request_id", "state", "start", "end"]
    requests = run.requests.dropna(subset=["arrival", "finished"])
    if not len(requests):
        return pd.DataFrame(columns=columns)
    tl = run.timeline
    step_start = pd.Series((tl["time"] - tl["duration"]).to_numpy(), index=tl["step"].to_numpy())
    events = run.events
    if len(events):
        events = events[events["kind"].isin(["request_admitted", "request_swapped_in", "request_preempted"])]
    by_request = {rid: group for rid, group in events.groupby("request")} if len(events) else {}
    rows = []
    for r in requests.itertuples():
        state, since = "waiting", r.arrival
        for e in by_request.get(r.request_id, events.iloc[:0]).itertuples():
            at = max(float(step_start.get(e.step, since)), since)
            if e.kind == "request_preempted":
                new = "swapped" if e.mode == "swap" else "preempted"
            else:
                new = _NEXT_STATE[e.kind]
            if new != state:
                rows.append((r.request_id, state, since, at))
                state, since = new, at
        rows.append((r.request_id, state, since, max(r.finished, since)))
    return pd.DataFrame(rows, columns=columns)


def state_seconds(states: pd.DataFrame) -> pd.DataFrame:
    """Seconds each request spent in each state (a column per state)."""
    spans = states.assign(seconds=states["end"] - states["start"])
    table = spans.pivot_table(index="request_id", columns="state", values="seconds", aggfunc="sum", fill_value=0.0)
    return table.reindex(columns=list(STATES), fill_value=0.0)
