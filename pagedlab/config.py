"""Engine configuration: dataclasses with vLLM's names, validated on construction with errors that say what would fit."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

PREEMPTION_MODES = ("recompute", "swap")
ALLOCATORS = ("paged", "static")
BATCHING_MODES = ("continuous", "static")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
QUANTIZATIONS = (None, "fp8", "awq", "gptq")
DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A setting that cannot work, with what would."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4.0                 # GiB of CPU memory for swapped-out blocks
    enable_prefix_caching: bool = False
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: int | None = None
    cpu_kv_cache_space: float = 0.5         # GiB of KV cache when the model runs on the CPU
    allocator: str = "paged"                # "static": contiguous max_model_len reservations (the baseline)
    static_reservation: str = "max_model_len"   # or "request": prompt + max_tokens

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
        _check(self.static_reservation in ("max_model_len", "request"),
               f"static_reservation must be 'max_model_len' or 'request', got {self.static_reservation!r}")


@dataclass
class SchedulerConfig:
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None     # default: max(8192, max_model_len) with chunked prefill
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    batching: str = "continuous"                  # "static": admit a batch, wait until all of it finishes

    def __post_init__(self) -> None:
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
    model: str | None = None                  # local HF-format directory
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    quantization: str | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None          # None: the model's own limit
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.quantization in QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
               f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")


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
        if parts["scheduler"].get("max_model_len") is None:
            parts["scheduler"].pop("max_model_len", None)
        return cls(ModelConfig(**parts["model"]), CacheConfig(**parts["cache"]),
                   SchedulerConfig(**parts["scheduler"]))
