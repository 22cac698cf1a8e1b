"""LLM: offline inference with vLLM's interface — `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import logging
import os
from typing import Sequence as Seq

from pagedlab.config import ConfigError, EngineConfig
from pagedlab.engine.llm_engine import LLMEngine, check_kv_capacity
from pagedlab.outputs import RequestOutput
from pagedlab.sampling_params import SamplingParams

logger = logging.getLogger("pagedlab")
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "data", "tiny-llama")


def build_engine(model: str | None = None, **kwargs) -> LLMEngine:
    """Load the model, size the KV cache from memory left after a profiling pass, and build the engine."""
    from pagedlab.executor.tp_executor import make_executor
    from pagedlab.models.gguf_loader import is_gguf
    from pagedlab.models.loader import load_hf_config, model_max_length

    model = model or DEFAULT_MODEL
    if not os.path.isdir(model) and not is_gguf(model):
        raise ConfigError(f"model {model!r} is neither a local directory nor a .gguf file; pagedlab loads Hugging "
                          "Face checkpoints (config.json + *.safetensors) and GGUF files from disk, never from a hub")
    limit = model_max_length(load_hf_config(model))
    max_model_len = kwargs.get("max_model_len") or limit
    if max_model_len > limit:
        raise ConfigError(f"max_model_len ({max_model_len}) is larger than the model's maximum length ({limit}); "
                          f"use at most {limit}")
    kwargs["max_model_len"] = max_model_len
    config = EngineConfig.from_kwargs(model=model, **kwargs)
    if config.scheduler.async_scheduling and config.model.tensor_parallel_size > 1:
        raise ConfigError("async_scheduling=True needs tensor_parallel_size 1: the other ranks would need each "
                          "step's sampled tokens before it is applied. Pass async_scheduling=False (the default "
                          "there)")
    if config.cache.gpu_memory_utilization == 1.0:
        logger.warning("gpu_memory_utilization=1.0 leaves no headroom for activations and other processes; "
                       "0.9-0.95 is safer")
    runner = make_executor(config)     # a ModelRunner, or rank 0 of tensor_parallel_size ranks
    report = runner.profile_num_blocks()
    num_gpu_blocks, num_cpu_blocks = report["num_gpu_blocks"], report["num_cpu_blocks"]
    logger.info("KV cache: %s", kv_budget_line(report))
    if report.get("tensor_parallel_size", 1) > 1:
        logger.info("Tensor parallel: %s", tensor_parallel_line(report, runner.hf_config, config.cache.block_size))
    engine_kwargs = dict(num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=num_cpu_blocks,
                         eos_token_ids=runner.eos_token_ids, bytes_per_block=runner.bytes_per_block,
                         vocab_size=runner.hf_config.vocab_size)
    check_kv_capacity(num_gpu_blocks, config.cache.block_size, config.scheduler.max_model_len,
                      runner.bytes_per_block)
    runner.allocate_kv_cache(num_gpu_blocks, num_cpu_blocks)
    engine = LLMEngine(config, runner, tokenizer=load_tokenizer(config.model.tokenizer or model), **engine_kwargs)
    engine.kv_budget = report
    return engine


def load_tokenizer(source: str):
    """The tokenizer of a model directory or a GGUF file (from its metadata), or None (with a warning) if it has
    none."""
    from transformers import AutoTokenizer

    from pagedlab.models.gguf_loader import is_gguf, load_gguf_tokenizer

    if is_gguf(source):
        return load_gguf_tokenizer(source)
    if any(os.path.exists(os.path.join(source, f))
           for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(source)
    logger.warning("no tokenizer in %s: prompts must be token ids and outputs carry no text", source)
    return None


def kv_budget_line(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    if "total" in report:
        terms = (f"{gib(report['total'])} total x {report['gpu_memory_utilization']} - {gib(report['weights'])} "
                 f"weights - {gib(report['peak_activation'])} peak activations - {gib(report['non_torch'])} "
                 f"outside torch = {gib(report['kv_cache'])}")
    else:
        terms = f"{gib(report['kv_cache'])} on {report['device']} (cpu_kv_cache_space)"
    override = " (num_gpu_blocks_override)" if report.get("num_gpu_blocks_override") else ""
    return (f"{terms} / {report['bytes_per_block']} bytes per block = {report['num_gpu_blocks']} blocks{override}; "
            f"{report['num_cpu_blocks']} CPU swap blocks")


def tensor_parallel_line(report: dict, hf_config, block_size: int) -> str:
    """Each rank's share of the model and of every token's KV, and how the group's block count is set."""
    size = report["tensor_parallel_size"]
    heads = getattr(hf_config, "num_attention_heads", None) or hf_config.n_head
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    replicated = f" (each replicated on {size // kv_heads} ranks)" if size > kv_heads else ""
    weights = report["weight_bytes_per_rank"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"  # noqa: E731
    per_rank = (f"{gib(weights[0])} on each rank" if max(weights) - min(weights) <= 0.01 * max(weights)
                else ", ".join(f"rank {r}: {gib(b)}" for r, b in enumerate(weights)))
    blocks = report["num_gpu_blocks_per_rank"]
    per_token = report["bytes_per_block"] // block_size
    return (f"tensor_parallel_size={size}: each rank holds {report['num_heads']} of {heads} query heads and "
            f"{report['num_kv_heads']} of {kv_heads} KV heads{replicated}; weights {per_rank} ({gib(sum(weights))} "
            f"in all); KV {per_token} bytes per token on each rank; blocks per rank {blocks}: the cache gets the "
            f"fewest, {min(blocks)} blocks = {min(blocks) * block_size} tokens on every rank")


class LLM:
    def __init__(self, model: str | None = None, **kwargs) -> None:
        self.llm_engine = build_engine(model, **kwargs)
        self._closed = False

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine: tensor-parallel workers exit and the process group goes (another LLM can start in this
        process), CUDA graphs are released. generate() afterwards raises; a second call does nothing."""
        if not self._closed:
            self._closed = True
            self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts are strings, token-id dicts ({"prompt_token_ids": [...]}) or a list of them; outputs come back
        in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, (list, tuple)) else \
            [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts and {len(params)} sampling params; give one or as many")
        if self._closed:
            raise RuntimeError("this LLM was shut down; build a new one")
        engine = self.llm_engine
        ids = [engine.add_request(p, sp).request_id for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: str | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, through the tokenizer's template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        prompts = [{"prompt_token_ids": list(tokenizer.apply_chat_template(
            c, add_generation_prompt=add_generation_prompt, chat_template=chat_template, tokenize=True,
            return_dict=False))} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine, done = self.llm_engine, {}
        wanted = set(ids)
        # Only finished outputs are read here: building every running request's output each step costs ~10 us a
        # request, milliseconds a step at batch 256.
        report_unfinished, engine.report_unfinished = engine.report_unfinished, False
        try:
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
                while engine.has_unfinished_requests() or engine.scheduler.rejected:
                    for output in engine.step():
                        if output.finished and output.request_id in wanted:
                            done[output.request_id] = output
                            bar.update(1)
        finally:
            engine.report_unfinished = report_unfinished
        return [done[i] for i in ids]
