"""Seeded, reproducible request traces for the simulator.

Length distributions are log-normal, fitted to the means the vLLM paper (Kwon et al., SOSP 2023, Fig. 11)
reports for its datasets — ShareGPT: 161 input / 338 output tokens; Alpaca: 19 / 58 — and filtered like the
paper's ShareGPT setup (prompt < 1024, prompt + output <= 2048). The spreads (sigma) are our choice: wide for
ShareGPT's long-tailed conversations, narrow for Alpaca's short instructions. The committed files in
data/traces/ are `python -m pagedlab.sim.workloads data/traces`; their measured means are in data/README.md.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

TRACE_DIR = Path(__file__).resolve().parents[2] / "data" / "traces"


@dataclass
class TraceRequest:
    prompt_len: int
    output_len: int
    arrival: float = 0.0       # seconds after the start
    n: int = 1                 # parallel samples
    prefix_id: int = -1        # requests with the same prefix_id share their first prefix_len tokens
    prefix_len: int = 0


@dataclass(frozen=True)
class LengthModel:
    input_mean: float
    input_sigma: float
    output_mean: float
    output_sigma: float
    max_prompt: int = 1023
    max_total: int = 2048

    def draw(self, rng: random.Random) -> tuple[int, int]:
        while True:
            p = round(rng.lognormvariate(math.log(self.input_mean) - self.input_sigma ** 2 / 2, self.input_sigma))
            o = round(rng.lognormvariate(math.log(self.output_mean) - self.output_sigma ** 2 / 2, self.output_sigma))
            if 1 <= p <= self.max_prompt and 1 <= o and p + o <= self.max_total:
                return p, o


SHAREGPT = LengthModel(161, 1.0, 338, 0.8)
ALPACA = LengthModel(19, 0.6, 58, 0.7)
WORKLOADS = ("sharegpt", "alpaca", "shared_prefix", "parallel_sampling")


def _arrivals(rng: random.Random, count: int, rate: float) -> list[float]:
    """Poisson arrivals at `rate` requests/s; all at 0 when the rate is infinite (offline batch)."""
    if math.isinf(rate):
        return [0.0] * count
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def make_trace(workload: str, num_requests: int = 1000, seed: int = 0, request_rate: float = math.inf,
               system_prompt_len: int = 256, num_prefixes: int = 4, n: int = 4) -> list[TraceRequest]:
    rng = random.Random(f"{workload}/{seed}")
    arrivals = _arrivals(rng, num_requests, request_rate)
    if workload in ("sharegpt", "alpaca"):
        lengths = SHAREGPT if workload == "sharegpt" else ALPACA
        return [TraceRequest(*lengths.draw(rng), arrival=t) for t in arrivals]
    if workload == "shared_prefix":
        # A few system prompts, each followed by a short Alpaca-like user turn.
        out = []
        for t in arrivals:
            p, o = ALPACA.draw(rng)
            out.append(TraceRequest(system_prompt_len + p, o, t, prefix_id=rng.randrange(num_prefixes),
                                    prefix_len=system_prompt_len))
        return out
    if workload == "parallel_sampling":
        return [TraceRequest(*SHAREGPT.draw(rng), arrival=t, n=n) for t in arrivals]
    raise ValueError(f"unknown workload {workload!r}; choose one of {WORKLOADS} or give a .jsonl trace path")


def save_trace(trace: list[TraceRequest], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in trace:
            f.write(json.dumps(asdict(r)) + "\n")


def load_trace(name_or_path: str, num_requests: int | None = None, seed: int = 0,
               request_rate: float = math.inf) -> list[TraceRequest]:
    """A workload by name (generated, seeded) or a .jsonl trace file (each line a TraceRequest)."""
    if name_or_path.endswith(".jsonl"):
        with open(name_or_path) as f:
            trace = [TraceRequest(**json.loads(line)) for line in f if line.strip()]
        return trace[:num_requests] if num_requests else trace
    return make_trace(name_or_path, num_requests or 1000, seed, request_rate)


def prompt_tokens(request: TraceRequest, index: int, vocab: int = 32000) -> list[int]:
    """Synthetic token ids: a shared prefix where the trace says so, then ids unique to the request."""
    prefix = [(request.prefix_id * 7919 + i) % vocab for i in range(request.prefix_len)] if request.prefix_id >= 0 \
        else []
    start = (index * 104729) % vocab
    own = list(range(start, start + request.prompt_len - len(prefix)))
    return prefix + (own if not own or own[-1] < vocab else [i % vocab for i in own])


if __name__ == "__main__":
    import sys

    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else TRACE_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in WORKLOADS:
        trace = make_trace(name, 1000, seed=0)
        save_trace(trace, out_dir / f"{name}.jsonl")
        mean_in = sum(r.prompt_len for r in trace) / len(trace)
        mean_out = sum(r.output_len for r in trace) / len(trace)
        print(f"{name:18s} {len(trace)} requests, mean input {mean_in:.1f}, mean output {mean_out:.1f}")
