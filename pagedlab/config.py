"""Engine configuration: dataclasses with vLLM's names, validated on construction with errors that say what would fit.

A field with `flag(...)` metadata is an engine flag: `pagedlab generate | serve | bench | sim` declare their
command-line options from these fields (engine/arg_utils.py), so a setting is declared here and nowhere else."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

PREEMPTION_MODES = ("recompute", "swap")
ALLOCATORS = ("paged", "static")
BATCHING_MODES = ("continuous", "static")
STATIC_RESERVATIONS = ("max_model_len", "request")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
QUANTIZATIONS = (None, "fp8", "awq", "gptq")
DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")
DEFAULT_MAX_MODEL_LEN = 2048     # where there is no model to take the limit from (the simulator)


class ConfigError(ValueError):
    """A setting that cannot work, with what would."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flag(help: str, choices: tuple | None = None, commands: tuple[str, ...] | None = None) -> dict:
    """Field metadata that makes a config field a command-line flag (--field-name). `commands`: the subcommands
    that take it (default: every one that runs an engine)."""
    return {"help": help, "choices": choices, "commands": commands}


@dataclass
class CacheConfig:
    block_size: int = field(default=16, metadata=flag("tokens per KV cache block"))
    gpu_memory_utilization: float = field(default=0.9, metadata=flag(
        "fraction of the GPU's memory the engine may use: weights, activations and KV cache"))
    swap_space: float = field(default=4.0, metadata=flag("GiB of CPU memory for swapped-out KV blocks"))
    enable_prefix_caching: bool = field(default=False, metadata=flag(
        "share the KV blocks of common prompt prefixes between requests"))
    kv_cache_dtype: str = field(default="auto", metadata=flag(
        "KV cache dtype: auto (the model's) or fp8 (e4m3, scaled per layer)", KV_CACHE_DTYPES))
    num_gpu_blocks_override: int | None = field(default=None, metadata=flag(
        "this many KV cache blocks instead of what memory profiling gives"))
    cpu_kv_cache_space: float = field(default=0.5, metadata=flag("GiB of KV cache when the model runs on the CPU"))
    allocator: str = field(default="paged", metadata=flag(
        "paged: blocks on demand (PagedAttention); static: a contiguous reservation per request (the baseline)",
        ALLOCATORS))
    static_reservation: str = field(default="max_model_len", metadata=flag(
        "what the static allocator reserves for a request: max_model_len, or request (prompt + max_tokens)",
        STATIC_RESERVATIONS))

    def __post_init__(self) -> None:
        _check(isinstance(self.block_size, int) and 1 <= self.block_size <= 256,
               f"block_size must be an integer in [1, 256], got {self.block_size!r} (16 is the usual choice)")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}: it is the fraction "
               "of total GPU memory the engine may use (weights + activations + KV cache); 0.9 is the default")
        _check(self.swap_space >= 0, f"swap_space must be >= 0 GiB, got {self.swap_space!r}")
        _check(self.cpu_kv_cache_space > 0, f"cpu_kv_cache_space must be > 0 GiB, got {self.cpu_kv_cache_space!r}")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
               f"num_gpu_blocks_override must be >= 1 or None, got {self.num_gpu_blocks_override!r}")
        _check(self.allocator in ALLOCATORS, f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        _check(self.static_reservation in STATIC_RESERVATIONS,
               f"static_reservation must be one of {STATIC_RESERVATIONS}, got {self.static_reservation!r}")


@dataclass
class SchedulerConfig:
    max_model_len: int | None = field(default=None, metadata=flag(
        f"the longest a sequence may be, prompt + output tokens (default: the model's limit; "
        f"{DEFAULT_MAX_MODEL_LEN} in the simulator, which has no model)"))
    max_num_seqs: int = field(default=256, metadata=flag("the most sequences in one step's batch"))
    max_num_batched_tokens: int | None = field(default=None, metadata=flag(
        "the most tokens in one step (default: 8192; without chunked prefill at least max_model_len)"))
    enable_chunked_prefill: bool = field(default=True, metadata=flag(
        "split long prompts into chunks that share steps with decoding sequences"))
    preemption_mode: str = field(default="recompute", metadata=flag(
        "a preempted request's KV is dropped and recomputed, or swapped out to CPU memory", PREEMPTION_MODES))
    batching: str = field(default="continuous", metadata=flag(
        "continuous: requests join and leave every step; static: a batch runs until all of it has finished",
        BATCHING_MODES))
    # Off by default until a GPU run has shown its parity and its gain there; None: on for a CUDA model runner
    # with tensor_parallel_size 1 (what the default becomes then), off elsewhere.
    async_scheduling: bool | None = field(default=False, metadata=flag(
        "schedule and prepare step N+1 while the device runs step N (vLLM's async scheduling)"))

    def __post_init__(self) -> None:
        if self.max_model_len is None:
            self.max_model_len = DEFAULT_MAX_MODEL_LEN
        _check(isinstance(self.max_model_len, int) and self.max_model_len >= 1,
               f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
               f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 8192 if self.enable_chunked_prefill else max(8192, self.max_model_len)
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens!r}")
        _check(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
               f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
               f"({self.max_model_len}): without chunked prefill a long prompt could never be scheduled. "
               "Raise max_num_batched_tokens or enable_chunked_prefill=True")
        _check(self.preemption_mode in PREEMPTION_MODES,
               f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        _check(self.batching in BATCHING_MODES, f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")


@dataclass
class ModelConfig:
    model: str | None = field(default=None, metadata=flag(
        "local Hugging Face directory or .gguf file (default: the embedded tiny model)",
        commands=("generate", "serve")))
    tokenizer: str | None = field(default=None, metadata=flag("tokenizer directory (default: the model's own)"))
    dtype: str = field(default="auto", metadata=flag(
        "weights and activations: auto is the checkpoint's dtype on a GPU, float32 on a CPU", DTYPES))
    device: str = field(default="auto", metadata=flag("auto (a GPU if there is one), cpu, cuda or cuda:N"))
    seed: int = field(default=0, metadata=flag(
        "random seed: sampling, and the workload (and random weights) of bench and sim"))
    enforce_eager: bool = field(default=False, metadata=flag("no CUDA graphs: every step runs eagerly"))
    quantization: str | None = field(default=None, metadata=flag(
        "quantized weights: fp8 (quantized as they load), awq or gptq (the checkpoint's)",
        tuple(q for q in QUANTIZATIONS if q)))
    tensor_parallel_size: int = field(default=1, metadata=flag("GPUs the model is sharded over (Megatron style)"))
    served_model_name: str | None = field(default=None, metadata=flag(
        "the model name the API answers to (default: --model)", commands=("serve",)))

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.quantization in QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")


CONFIG_CLASSES = (ModelConfig, CacheConfig, SchedulerConfig)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Split flat vLLM-style keyword arguments among the three configs; unknown names are an error."""
        parts = {}
        for name, klass in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in fields(klass)}
            parts[name] = {k: kwargs[k] for k in list(kwargs) if k in names}
        known = set().union(*(p.keys() for p in parts.values()))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s) {unknown}")
        return cls(ModelConfig(**parts["model"]), CacheConfig(**parts["cache"]),
                   SchedulerConfig(**parts["scheduler"]))
