"""Where a step's time goes, from the STEP events of a run: each phase's host time (schedule, prepare, forward,
sample, update: StepStats), and on a GPU the device time of a decode step (the largest decode graph's replay and the
logits + argmax, timed alone with CUDA events). On a GPU the forward phase is the launch and sample waits for the
device, so a decode step's exposed host time is its engine time less the device time. With async scheduling the
phases overlap the device's step, so their sum says nothing of what is exposed: there a decode step's period (from
one decode step's end to the next's, on the engine clock) less the device time is."""
from __future__ import annotations

PHASES = ("schedule", "prepare", "forward", "sample", "update")


def step_seconds(stats) -> float:
    """The engine's time for a step: its phases, end to end (outputs to the caller not included)."""
    return (stats.schedule_time + stats.prepare_time + stats.forward_time + stats.sample_time
            + stats.update_time)


def phase_summary(steps: list) -> dict:
    """Mean milliseconds per step of each phase, and of the whole step."""
    if not steps:
        return {}
    n = len(steps)
    out = {phase: 1e3 * sum(getattr(s, f"{phase}_time") for s in steps) / n for phase in PHASES}
    out["step"] = sum(out[p] for p in PHASES)
    out = {k: round(v, 4) for k, v in out.items()}
    out["steps"] = n
    out["mean_batch"] = round(sum(s.num_batched_tokens for s in steps) / n, 1)
    return out


def decode_period_ms(steps: list) -> float | None:
    """Median milliseconds from one decode-only step's end to the next's (same batch size, consecutive steps)."""
    periods = sorted(1e3 * (b.time - a.time) for a, b in zip(steps, steps[1:])
                     if b.step == a.step + 1 and a.num_prefill_tokens == b.num_prefill_tokens == 0
                     and a.num_batched_tokens == b.num_batched_tokens > 0)
    return round(periods[len(periods) // 2], 4) if periods else None


def step_split(steps: list, runner=None, device=None, periods: dict | None = None) -> dict:
    """The host phases of decode-only steps and of steps with prefill; on a GPU the device time of a decode step
    and the host time it leaves exposed."""
    decode = [s for s in steps if s.num_prefill_tokens == 0 and s.num_batched_tokens]
    result = {"unit": "ms per step", "decode_steps": phase_summary(decode),
              "steps_with_prefill": phase_summary([s for s in steps if s.num_prefill_tokens])}
    # periods: {"async_on" | "async_off": a decode step's period in a run of the same workload in that mode}
    periods = periods or {}
    if periods:
        result["decode_period_ms"] = periods
    if device is None or device.type != "cuda":
        result["device"] = "the forward pass runs on the host: every phase is host time"
        return result
    result.update(device_times(runner))
    device_ms = result.get("graph_replay_ms", {}).get("ms", 0.0) + result.get("logits_argmax_ms", 0.0)
    if decode and device_ms:
        result["decode_device_ms"] = round(device_ms, 4)
        result["decode_exposed_host_ms"] = round(result["decode_steps"]["step"] - device_ms, 4)
        # what the device waits for the host each decode step, with async scheduling on and off
        result["decode_exposed_host_ms_by_scheduling"] = {
            mode: round(period - device_ms, 4) for mode, period in periods.items() if period is not None}
    return result


def device_times(runner) -> dict:
    """The largest decode graph's replay and the logits + argmax over its batch, each timed alone (20 runs) with
    CUDA events; empty without graphs."""
    import torch

    graphs = getattr(runner, "graphs", None)
    if not graphs:
        return {}
    batch = runner.graph_batch_sizes[-1]
    graph = graphs[batch]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        start.record()
        for _ in range(20):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    hidden = runner.graph_output[:batch]
    return {"graph_replay_ms": {"batch": batch, "ms": timed(graph.replay),
                                "note": "context as left in the graph buffers by the last decode step"},
            "logits_argmax_ms": timed(lambda: runner.model.compute_logits(hidden).argmax(dim=-1))}
