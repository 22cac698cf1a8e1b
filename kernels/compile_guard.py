"""Counting Triton compiles, so that an engine can show it compiles nothing once it serves.

Startup (pagedlab/executor/warmup.py) launches every kernel variant the configuration can meet; a compile after
`mark_startup_complete()` is a warm-up gap: a step that waited for the compiler while requests were in flight. Each
one is logged as a warning and counted (`compiles_after_startup()`, read by the bench and by the server's /metrics
as pagedlab:triton_compiles_after_startup).

On a GPU the count comes from Triton itself: `triton.knobs.runtime.jit_post_compile_hook` is called once per
in-memory cache miss of a JIT function (a compile, or a load from Triton's disk cache: either stalls the step).
Triton's interpreter (TRITON_INTERPRET=1) compiles nothing and calls no such hook, so there each launch's variant key
is worked out the way Triton's cache key is (constexpr values, the dtype and 16-byte alignment of each pointer, ints
as 1 / multiple of 16 / other, launch options) by a pre-run hook on pagedlab's kernels, and a key not seen before
counts as a compile.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("pagedlab.kernels")

MAX_RECORDED = 32       # late compiles whose description is kept (the count goes on)
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


@dataclass
class CompileCounter:
    total: int = 0
    at_startup: int = 0
    after_startup: int = 0
    startup_complete: bool = False
    late: list[str] = field(default_factory=list)     # the first MAX_RECORDED compiles after startup


COUNTER = CompileCounter()
_installed = False
_seen: set[tuple] = set()       # interpreter: the variant keys launched so far


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def record_compile(description: str) -> None:
    COUNTER.total += 1
    if not COUNTER.startup_complete:
        COUNTER.at_startup += 1
        return
    COUNTER.after_startup += 1
    if len(COUNTER.late) < MAX_RECORDED:
        COUNTER.late.append(description)
    logger.warning("Triton compiled %s after startup (%d so far): the warm-up missed this variant, and the step "
                   "waited for the compiler", description, COUNTER.after_startup)


def install() -> None:
    """Start counting (idempotent). Call before the first kernel launch, so that startup's compiles count too."""
    global _installed
    if _installed:
        return
    _installed = True
    if interpreted():
        for kernel in pagedlab_kernels():
            kernel.add_pre_run_hook(_variant_hook(kernel))
        return
    try:
        from triton import knobs
    except ImportError:     # no Triton (the torch references compile nothing), or one without knobs
        return
    previous = knobs.runtime.jit_post_compile_hook

    def on_compile(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 - Triton's names
        record_compile(repr)
        if previous is not None:
            return previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                            already_compiled=already_compiled)
        return None

    knobs.runtime.jit_post_compile_hook = on_compile


def mark_startup_complete() -> None:
    """From here on a compile is a warm-up gap."""
    if not COUNTER.startup_complete:
        logger.info("Triton kernels ready: %d variants compiled since counting began", COUNTER.at_startup)
    COUNTER.startup_complete = True


def compiles_after_startup() -> int:
    return COUNTER.after_startup


def stats() -> dict:
    return {"triton_compiles_at_startup": COUNTER.at_startup,
            "triton_compiles_after_startup": COUNTER.after_startup, "late_compiles": list(COUNTER.late)}


def reset() -> None:
    """Forget every count and seen variant (tests; a benchmark that restarts the count)."""
    COUNTER.total = COUNTER.at_startup = COUNTER.after_startup = 0
    COUNTER.startup_complete = False
    COUNTER.late.clear()
    _seen.clear()


# --- the interpreter's accounting ------------------------------------------------------------------------------
def pagedlab_kernels() -> list:
    """Every Triton kernel pagedlab launches (its kernels package and the fused element-wise layers)."""
    from triton.runtime.jit import KernelInterface

    from pagedlab.kernels import attention, awq, cache_ops, moe, quant
    from pagedlab.layers import fused_ops
    modules = (attention, awq, cache_ops, moe, quant, fused_ops)
    return [obj for module in modules for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and name.endswith("_kernel")]


def arg_class(value):
    """What Triton's cache key keeps of a runtime argument."""
    if isinstance(value, torch.Tensor):
        return str(value.dtype), value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return type(value).__name__
    if isinstance(value, int):
        if value == 1:
            return 1
        return "i64" if not -2**31 <= value < 2**31 else "i32", value % 16 == 0
    return type(value).__name__


def variant_key(name: str, params: list[inspect.Parameter], args: tuple, kwargs: dict) -> tuple:
    values = dict(zip((p.name for p in params), args))
    parts = []
    for p in params:
        value = values.get(p.name, kwargs.get(p.name, p.default))
        constexpr = "constexpr" in str(p.annotation)
        parts.append((p.name, str(value) if constexpr else arg_class(value)))
    options = tuple((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs)
    return (name, tuple(parts), options)


def _variant_hook(kernel):
    fn = getattr(kernel, "fn", kernel)
    name = f"{fn.__module__}.{fn.__name__}"
    params = list(inspect.signature(fn).parameters.values())

    def hook(*args, **kwargs):
        key = variant_key(name, params, args, kwargs)
        if key not in _seen:
            _seen.add(key)
            constexprs = ", ".join(f"{p.name}={v}" for p, (_, v) in zip(params, key[1])
                                   if "constexpr" in str(p.annotation))
            record_compile(f"{name}[{constexprs}]")
    return hook
