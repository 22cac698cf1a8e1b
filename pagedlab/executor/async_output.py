"""A launched step's sampled tokens on their way to the host (async scheduling, as vLLM's AsyncModelRunnerOutput).

ModelRunner.launch leaves the sampled ids (and any logprobs) on the device and starts their copy into pinned host
memory behind the step's kernels, recording an event; the host goes on scheduling and preparing the next step,
whose decode rows read their input ids from the same device tensor. `results()` waits for the event only, never
for the device as a whole, and builds the SampleResults. On the CPU the tensors are already on the host.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from pagedlab.layers.prompt_logprobs import StepLogits, attach_prompt_logprobs
from pagedlab.layers.sampler import SampledTokens
from pagedlab.sched_output import SampleResult

_PROMPT_TENSORS = ("chosen", "top_values", "top_ids")


class AsyncOutput:
    def __init__(self, step: StepLogits | None, sampled: SampledTokens | None, num_samples: list[int],
                 device: torch.device) -> None:
        self.num_samples = num_samples
        # not the logits: the memory profile counted one step's, and the next step makes its own meanwhile
        self._step = None if step is None else replace(step, logits=None)
        self._sampled = sampled
        tensors = dict(sampled.tensors()) if sampled is not None else {}
        if step is not None:
            tensors.update({"prompt_" + name: getattr(step, name) for name in _PROMPT_TENSORS
                            if getattr(step, name) is not None})
        self._ready = None
        if device.type == "cuda" and tensors:
            tensors = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                       for name, t in tensors.items()}
            self._ready = torch.cuda.Event()
            self._ready.record()
        self._host = tensors

    def sampled_token(self, index: int) -> int:
        """One sampled token, on the host (the next launch's sampling rows that read their past tokens)."""
        if self._ready is not None:
            self._ready.synchronize()
        return int(self._host["tokens"][index])

    def results(self) -> list[SampleResult | None]:
        """One result per scheduled row (None where it neither samples nor has prompt logprobs)."""
        if self._ready is not None:
            self._ready.synchronize()
        host = self._host
        sampled = []
        if self._sampled is not None:
            sampled = self._sampled.with_tensors({k: v for k, v in host.items() if not k.startswith("prompt_")})
            sampled = sampled.results()
        if self._step is None:
            return [None] * len(self.num_samples)
        it = iter(sampled)
        results = [next(it) if k else None for k in self.num_samples]
        step = replace(self._step, **{name: host.get("prompt_" + name) for name in _PROMPT_TENSORS})
        return attach_prompt_logprobs(step, results)
