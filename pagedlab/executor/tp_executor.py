"""Tensor-parallel execution: one ModelRunner per rank, each with its shard of the weights and its heads' KV cache
under the same block ids.

Rank 0 is the engine's process; the scheduler and the KV-cache manager run there, once. Each step rank 0
broadcasts the scheduler's plain-data output (new sequences whole, the others as diffs, the block swaps and copies:
a few KiB) in one message over the control group; every rank then updates its own persistent batch from it, packs
and uploads the step's inputs, moves its blocks and runs the same forward pass, its all-reduces meeting the
others', and the logits are gathered to rank 0, which samples. Startup (memory profiling, KV-cache allocation,
CUDA-graph capture) is mirrored the same way, so every collective has all ranks behind it. At shutdown every rank
destroys its CUDA graphs before the process group: NCCL does not destroy a communicator that a live graph still
uses.

The other ranks are worker processes spawned here (one machine), or processes torchrun started (any number of
machines): under torchrun every rank runs the same script, and a rank > 0 serves rank 0 inside `LLM(...)` and exits
when rank 0 shuts down.
"""
from __future__ import annotations

import contextlib
import os
import socket
import weakref
from dataclasses import dataclass
from multiprocessing import connection

import torch
import torch.multiprocessing as mp

from pagedlab.config import ConfigError, EngineConfig
from pagedlab.distributed.communication import all_gather_object, broadcast_object
from pagedlab.distributed.parallel_state import check_outside_any_group, destroy_tensor_parallel, init_tensor_parallel
from pagedlab.executor.base import SampleResult, SchedulerOutput, check_kv_capacity
from pagedlab.executor.model_runner import ModelRunner
from pagedlab.layers.parallel import check_heads_divide
from pagedlab.models.loader import load_hf_config, resolve_device

STARTUP_TIMEOUT_S = 300      # for a spawned worker to import its modules and report in
SHUTDOWN_TIMEOUT_S = 30      # for a worker to leave after rank 0 says so, before it is terminated


@dataclass(frozen=True)
class TorchrunRank:
    rank: int
    local_rank: int


def torchrun_rank(world_size: int) -> TorchrunRank | None:
    """This process's rank when a launcher such as torchrun started it (RANK, WORLD_SIZE, MASTER_ADDR set)."""
    if not all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return None
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ConfigError(f"tensor_parallel_size={world_size}, but the launcher started WORLD_SIZE="
                          f"{os.environ['WORLD_SIZE']} processes: they must be equal")
    return TorchrunRank(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def check_tensor_parallel(config: EngineConfig, ranks_on_this_machine: int) -> None:
    """The errors worth raising before any process starts: heads that do not divide, too few GPUs."""
    world_size = config.model.tensor_parallel_size
    hf_config = load_hf_config(config.model.model)
    num_heads = hf_config.num_attention_heads
    check_heads_divide(num_heads, getattr(hf_config, "num_key_value_heads", None) or num_heads, world_size)
    device = resolve_device(config.model.device)
    if device.type != "cuda":
        return
    if device.index is not None:
        raise ConfigError(f"device={config.model.device!r} would put every rank on one GPU: pass device='cuda' "
                          "(rank r runs on cuda:r; pick the GPUs with CUDA_VISIBLE_DEVICES)")
    if ranks_on_this_machine > torch.cuda.device_count():
        raise ConfigError(f"tensor_parallel_size={world_size} puts {ranks_on_this_machine} ranks on this machine, "
                          f"one GPU each, but it has {torch.cuda.device_count()} GPU(s)")


def make_executor(config: EngineConfig):
    """A ModelRunner for tensor_parallel_size 1, else rank 0's TensorParallelExecutor. Under torchrun a rank > 0
    serves rank 0's steps here, then exits the process."""
    world_size = config.model.tensor_parallel_size
    if world_size == 1:
        return ModelRunner(config)
    launched = torchrun_rank(world_size)
    check_tensor_parallel(config, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if launched else world_size)
    if launched is not None and launched.rank > 0:
        serve(config, launched.rank, launched.local_rank, "env://")
        raise SystemExit(0)
    return TensorParallelExecutor(config, launched_by_torchrun=launched is not None)


class TensorParallelExecutor:
    """Rank 0's executor: its own ModelRunner, driven in step with the other ranks'. Attributes it does not define
    (hf_config, device, eos_token_ids, bytes_per_block of one rank's cache, ...) are its runner's."""

    def __init__(self, config: EngineConfig, launched_by_torchrun: bool = False) -> None:
        check_outside_any_group()       # before any worker starts, or it would wait for a rank 0 that never comes
        self.config = config
        if launched_by_torchrun:
            self.workers, init_method = [], "env://"
        else:
            init_method = f"tcp://127.0.0.1:{_free_port()}"
            self.workers = _spawn_workers(config, init_method)
        try:
            self.runner = _start_rank(config, 0, 0, init_method)
        except BaseException:
            _stop_processes(self.workers, SHUTDOWN_TIMEOUT_S)
            raise
        self._shutdown = weakref.finalize(self, _shut_down, self.workers, self.runner)

    def __getattr__(self, name: str):
        if name == "runner":        # not built yet
            raise AttributeError(name)
        return getattr(self.runner, name)

    def profile_num_blocks(self) -> dict:
        broadcast_object({"method": "profile_num_blocks"})
        report = _profile_num_blocks(self.runner)
        try:    # the usual startup failure once workers exist: shut them down before reporting it
            check_kv_capacity(report["num_gpu_blocks"], self.config.cache.block_size,
                              self.config.scheduler.max_model_len, report["bytes_per_block"])
        except ConfigError:
            self.shutdown()
            raise
        return report

    def allocate_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        broadcast_object({"method": "allocate_kv_cache", "num_gpu_blocks": num_gpu_blocks,
                          "num_cpu_blocks": num_cpu_blocks})
        self.runner.allocate_kv_cache(num_gpu_blocks, num_cpu_blocks)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, grammar=None) -> list[SampleResult | None]:
        broadcast_object({"method": "execute", "out": out})
        return self.runner.sample(self.runner.execute_model(out), out, grammar)

    def shutdown(self) -> None:
        """Stop every rank and leave the process group (also done when the executor is collected or at exit)."""
        self._shutdown()


def serve(config: EngineConfig, rank: int, local_rank: int, init_method: str) -> None:
    """A rank > 0: build this rank's runner, then do what rank 0 broadcasts until it says shutdown."""
    runner = _start_rank(config, rank, local_rank, init_method)
    try:
        with torch.inference_mode():
            while (message := broadcast_object())["method"] != "shutdown":
                if message["method"] == "execute":
                    runner.execute_model(message["out"])
                elif message["method"] == "profile_num_blocks":
                    _profile_num_blocks(runner)
                elif message["method"] == "allocate_kv_cache":
                    runner.allocate_kv_cache(message["num_gpu_blocks"], message["num_cpu_blocks"])
    finally:
        runner.release_cuda_graphs()
        destroy_tensor_parallel()


def _start_rank(config: EngineConfig, rank: int, local_rank: int, init_method: str) -> ModelRunner:
    """Join the group and build this rank's runner. The ranks compare notes before going on: one that failed would
    otherwise leave the others waiting in their first collective."""
    cuda = resolve_device(config.model.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    init_tensor_parallel(rank, config.model.tensor_parallel_size, init_method, "nccl" if cuda else "gloo")
    runner = error = None
    try:
        runner = ModelRunner(config)
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        error = exc
    summary = None if error is None else f"{type(error).__name__}: {error}"
    failures = [(r, e) for r, e in enumerate(all_gather_object(summary)) if e]
    if failures:
        destroy_tensor_parallel()
        if error is not None:
            raise error
        raise RuntimeError("; ".join(f"tensor-parallel rank {r} failed to start: {e}" for r, e in failures))
    return runner


def _profile_num_blocks(runner: ModelRunner) -> dict:
    """Every rank profiles its own memory; the cache gets as many blocks as the tightest rank holds."""
    reports = all_gather_object(runner.profile_num_blocks())
    return {**reports[0], "num_gpu_blocks": min(r["num_gpu_blocks"] for r in reports),
            "num_cpu_blocks": min(r["num_cpu_blocks"] for r in reports),
            "tensor_parallel_size": len(reports),
            "num_gpu_blocks_per_rank": [r["num_gpu_blocks"] for r in reports],
            "weight_bytes_per_rank": [r["weight_bytes"] for r in reports]}


# --- worker processes ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(config: EngineConfig, rank: int, init_method: str, num_threads: int, started) -> None:
    started.send(True)
    started.close()
    torch.set_num_threads(num_threads)
    serve(config, rank, rank, init_method)


def _spawn_workers(config: EngineConfig, init_method: str) -> list[mp.Process]:
    """Ranks 1..N-1, with as many torch threads as rank 0. Each reports in once its modules are imported: one that
    dies first (typically re-running a script with no __main__ guard) is reported here instead of leaving rank 0
    waiting for it in the group's rendezvous."""
    context = mp.get_context("spawn")
    workers, reports = [], []
    for rank in range(1, config.model.tensor_parallel_size):
        report, started = context.Pipe(duplex=False)
        worker = context.Process(target=_worker_main, name=f"pagedlab-tp-rank{rank}", daemon=True,
                                 args=(config, rank, init_method, torch.get_num_threads(), started))
        worker.start()
        started.close()
        workers.append(worker)
        reports.append(report)
    for worker, report in zip(workers, reports):
        connection.wait([report, worker.sentinel], timeout=STARTUP_TIMEOUT_S)
        if not _reported_in(report):
            _stop_processes(workers, timeout=0)
            raise RuntimeError(
                f"{worker.name} did not start (exit code {worker.exitcode}; its error is printed above). Workers are "
                "spawned and re-import the main module: a script that builds a tensor-parallel engine needs an "
                "`if __name__ == \"__main__\":` guard")
    return workers


def _reported_in(report) -> bool:
    try:
        return report.poll() and report.recv()
    except EOFError:
        return False


def _shut_down(workers: list[mp.Process], runner: ModelRunner) -> None:
    with contextlib.suppress(RuntimeError):     # a worker that died already cannot be told
        broadcast_object({"method": "shutdown"})
    runner.release_cuda_graphs()
    destroy_tensor_parallel()
    _stop_processes(workers, SHUTDOWN_TIMEOUT_S)


def _stop_processes(workers: list[mp.Process], timeout: float) -> None:
    """Wait up to timeout seconds for the workers to exit, then terminate (and if need be kill) the rest."""
    for worker in workers:
        worker.join(timeout)
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
            worker.join(5)
        if worker.is_alive():
            worker.kill()
            worker.join()
