"""Online serving benchmark with `vllm bench serve`'s metrics: TTFT, TPOT, ITL (per streamed chunk) and end-to-end
latency (mean, median, p99), request and output-token throughput, at Poisson request rates and at max concurrency.

It starts `pagedlab serve` itself (or measures a running server: --base-url), sends vLLM's random dataset (random
token ids decoded to text prompts of --input-len tokens, --output-len tokens each, EOS ignored) through aiohttp as
streaming /v1/completions, warms up first, and writes JSON (the card named) after every scenario. While a scenario
runs it also reads the core's step statistics (/stats/steps), so each result says how the median gap between chunks
compares with the engine's decode step at that time.

    # H200, the issue's workload: Llama-3.2-1B shape, random weights, the embedded model's tokenizer
    PYTHONPATH=. python benchmarks/bench_serving.py --shape llama-3.2-1b --num-prompts 1000 --input-len 512 \\
        --output-len 128 --warmup-prompts 200 --request-rate 50 inf 100 --max-num-seqs 256 --max-model-len 2048 \\
        --gpu-memory-utilization 0.9 --out out/serving
    # CPU: 64 concurrent streams of the embedded tiny model
    PYTHONPATH=. python benchmarks/bench_serving.py --model data/tiny-llama --device cpu --dtype float32 \\
        --num-prompts 64 --input-len 16 --output-len 64 --warmup-prompts 16 --request-rate inf --out out/serving-cpu
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "data", "tiny-llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- the dataset -------------------------------------------------------------------------------------------------
def random_prompts(tokenizer, num: int, input_len: int, seed: int) -> list[str]:
    """vLLM's random dataset: uniform token ids decoded to text, re-encoded and cut so each is input_len tokens."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    specials = set(tokenizer.all_special_ids)
    prompts = []
    for _ in range(num):
        ids = [int(t) for t in rng.integers(0, vocab, input_len * 2) if int(t) not in specials]
        text = tokenizer.decode(ids[:input_len])
        for _ in range(3):      # decoding and encoding again need not give the same count: settle it
            ids = tokenizer.encode(text, add_special_tokens=False)[:input_len]
            text = tokenizer.decode(ids)
        prompts.append(text)
    return prompts


# --- one request -------------------------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    chunks: int = 0
    error: str = ""


async def send(session, url: str, model: str, prompt: str, output_len: int) -> RequestResult:
    payload = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                result.error = f"{response.status}: {(await response.text())[:300]}"
                return result
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.perf_counter()
                data = json.loads(line[6:])
                if data.get("choices"):
                    if result.chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.chunks += 1
                elif data.get("usage"):
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                    result.output_tokens = data["usage"]["completion_tokens"]
                elif data.get("error"):
                    result.error = data["error"]["message"]
                    return result
        result.latency = time.perf_counter() - start
        result.ok = result.chunks > 0
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run_load(url: str, model: str, prompts: list[str], output_len: int, rate: float,
                   max_concurrency: int | None, seed: int) -> tuple[list[RequestResult], float]:
    """Send every prompt, at Poisson arrivals of `rate` per second (inf: all at once), at most max_concurrency in
    flight; returns the results and the wall time from the first send to the last answer."""
    import aiohttp

    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=1 << 20) as session:
        async def one(prompt: str) -> RequestResult:
            if limit is None:
                return await send(session, url, model, prompt, output_len)
            async with limit:
                return await send(session, url, model, prompt, output_len)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


# --- metrics -----------------------------------------------------------------------------------------------------
def summarize(values_s: list[float], name: str) -> dict:
    if not values_s:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    ms = np.asarray(values_s) * 1000
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"p90_{name}_ms": float(np.percentile(ms, 90)), f"p99_{name}_ms": float(np.percentile(ms, 99)),
            f"std_{name}_ms": float(ms.std())}


def metrics(results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    return {
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output_tokens, "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_tokens for r in done)) / duration,
        "chunks_per_output_token": sum(r.chunks for r in done) / max(1, output_tokens),
        **summarize([r.ttft for r in done], "ttft"), **summarize(tpot, "tpot"),
        **summarize([gap for r in done for gap in r.itl], "itl"), **summarize([r.latency for r in done], "e2el"),
    }


class StepWatcher:
    """Collects the core's step statistics (/stats/steps) while a scenario runs."""

    def __init__(self, base_url: str) -> None:
        self.base_url, self.steps, self._task, self._since = base_url, {}, None, 0

    async def _fetch(self, session, since: int) -> list[dict]:
        async with session.get(f"{self.base_url}/stats/steps", params={"since": since}) as response:
            return (await response.json())["steps"]

    async def _poll(self, session) -> None:
        try:
            async with session:
                while True:
                    for step in await self._fetch(session, max(self.steps, default=self._since)):
                        self.steps[step["step"]] = step
                    await asyncio.sleep(0.5)
        except Exception:  # noqa: BLE001 - a server without it (vLLM): no step statistics
            return

    async def start(self) -> None:
        """From the step the core is at now (earlier ones, the warm-up's, are not this scenario's)."""
        import aiohttp
        session = aiohttp.ClientSession()
        try:
            self._since = max((s["step"] for s in await self._fetch(session, 0)), default=0)
        except Exception:  # noqa: BLE001 - no step statistics
            await session.close()
            return
        self._task = asyncio.create_task(self._poll(session))

    async def stop(self) -> dict:
        """Step statistics: the executor's time per step (duration) and the core's whole step, schedule to outputs
        sent (period: between the ends of consecutive steps), over all steps and over decode-only ones."""
        if self._task is None:
            return {}
        await asyncio.sleep(0.6)
        self._task.cancel()
        steps = sorted(self.steps.values(), key=lambda s: s["step"])
        if not steps:
            return {}
        for earlier, later in zip(steps, steps[1:]):
            if later["step"] == earlier["step"] + 1:
                later["period"] = later["time"] - earlier["time"]
        decode = [s for s in steps if s["num_prefill_tokens"] == 0 and s["num_decode_seqs"]]
        ms = lambda rows, key: float(np.median([s[key] for s in rows if key in s]) * 1000) if rows else None  # noqa
        out = {"steps": len(steps), "median_step_ms": ms(steps, "duration"),
               "median_step_period_ms": ms(steps, "period"),
               "mean_batch": float(np.mean([s["num_running_seqs"] for s in steps]))}
        if decode:
            out.update(decode_steps=len(decode), median_decode_step_ms=ms(decode, "duration"),
                       median_decode_step_period_ms=ms(decode, "period"),
                       median_decode_batch=float(np.median([s["num_decode_seqs"] for s in decode])))
        return out


# --- the server --------------------------------------------------------------------------------------------------
def build_checkpoint(shape: str, directory: str, device: str) -> None:
    """A random-weight checkpoint of `shape` with the embedded model's tokenizer (built in a child process, so this
    one holds no GPU memory while the server runs)."""
    if os.path.exists(os.path.join(directory, "config.json")):
        return
    code = ("import sys, torch; sys.path.insert(0, %r); from pagedlab.entrypoints.bench import "
            "build_random_checkpoint; build_random_checkpoint(%r, %r, torch.bfloat16, %r, 0)"
            % (ROOT, shape, directory, device))
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(TINY, name)):
            shutil.copy(os.path.join(TINY, name), directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model_dir: str, port: int, log_path: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pagedlab.entrypoints.openai.api_server", "--model", model_dir,
               "--port", str(port), "--served-model-name", "bench", "--disable-uvicorn-access-log",
               "--max-num-seqs", str(args.max_num_seqs), "--device", args.device, "--dtype", args.dtype,
               "--gpu-memory-utilization", str(args.gpu_memory_utilization),
               "--api-server-count", str(args.api_server_count)]
    if args.max_model_len:
        command += ["--max-model-len", str(args.max_model_len)]
    command += args.server_arg
    print("server:", " ".join(command), flush=True)
    log = open(log_path, "w")
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_healthy(base_url: str, server: subprocess.Popen | None, timeout: float) -> None:
    import urllib.request
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} (see its log)")
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not become healthy")
        time.sleep(0.5)


def card_name(device: str) -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.strip().splitlines()
        if names and device != "cpu":
            return names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# --- main --------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help="a local HF directory to serve")
    what.add_argument("--shape", help="serve a random-weight checkpoint of this shape (pagedlab bench's SHAPES)")
    p.add_argument("--base-url", help="measure this running server instead of starting one (e.g. vLLM's)")
    p.add_argument("--served-model-name", default="bench", help="the model name to send with --base-url")
    p.add_argument("--checkpoint-dir", default=None, help="where --shape's checkpoint goes (default: under --out)")
    p.add_argument("--tokenizer", default=TINY, help="tokenizer for the prompts (default: the embedded model's)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--warmup-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")],
                   help="requests per second, Poisson arrivals; inf sends all at once (one scenario each)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--server-arg", action="append", default=[], help="one more argument for pagedlab serve")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--out", default="out/serving")
    p.add_argument("--label", default=None, help="the result file's name (default: pagedlab_<card>)")
    return p.parse_args(argv)


async def run_scenarios(args, base_url: str, model: str, tokenizer, results: dict, write) -> None:
    url = f"{base_url}/v1/completions"
    if args.warmup_prompts:
        warmup = random_prompts(tokenizer, args.warmup_prompts, args.input_len, args.seed + 1000)
        start = time.perf_counter()
        outcome, _ = await run_load(url, model, warmup, args.output_len, float("inf"), args.max_concurrency,
                                    args.seed)
        print(f"warm-up: {sum(r.ok for r in outcome)}/{len(outcome)} ok in {time.perf_counter() - start:.1f} s",
              flush=True)
    for index, rate in enumerate(args.request_rate):
        prompts = random_prompts(tokenizer, args.num_prompts, args.input_len, args.seed + index)
        watcher = StepWatcher(base_url)
        await watcher.start()
        outcome, duration = await run_load(url, model, prompts, args.output_len, rate, args.max_concurrency,
                                           args.seed + index)
        scenario = {"request_rate": "inf" if rate == float("inf") else rate,
                    "max_concurrency": args.max_concurrency, **metrics(outcome, duration),
                    "engine_steps": await watcher.stop()}
        steps = scenario["engine_steps"]
        if steps.get("median_decode_step_period_ms") and scenario["median_itl_ms"]:
            scenario["median_itl_over_decode_step"] = (scenario["median_itl_ms"]
                                                       / steps["median_decode_step_period_ms"])
        results["scenarios"].append(scenario)
        write()
        print(f"rate {scenario['request_rate']}: {scenario['completed']}/{len(prompts)} ok, "
              f"{scenario['output_throughput']:.0f} out tok/s, TTFT mean {scenario['mean_ttft_ms']:.1f} "
              f"p99 {scenario['p99_ttft_ms']:.1f} ms, ITL mean {scenario['mean_itl_ms']:.2f} median "
              f"{scenario['median_itl_ms']:.2f} p99 {scenario['p99_itl_ms']:.2f} ms, TPOT mean "
              f"{scenario['mean_tpot_ms']:.2f} ms, {scenario['chunks_per_output_token']:.3f} chunks/token; "
              f"engine: {steps}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from pagedlab.entrypoints.openai.api_server import raise_open_file_limit
    raise_open_file_limit()         # a connection per request in flight

    os.makedirs(args.out, exist_ok=True)
    card = card_name(args.device)
    label = args.label or "pagedlab_" + "".join(c if c.isalnum() else "_" for c in card).strip("_").lower()
    path = os.path.join(args.out, f"bench_serving_{label}.json")
    results = {"card": card, "command": " ".join(sys.argv), "workload": {
        "dataset": "random", "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "warmup_prompts": args.warmup_prompts, "ignore_eos": True,
        "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization, "api_server_count": args.api_server_count,
        "model": args.model or args.shape or args.base_url, "tokenizer": args.tokenizer}, "scenarios": []}

    def write() -> None:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    server = log_path = None
    try:
        if args.base_url:
            base_url, model = args.base_url.rstrip("/"), args.served_model_name
        else:
            model_dir = args.model or TINY
            if args.shape:
                model_dir = args.checkpoint_dir or os.path.join(args.out, f"checkpoint-{args.shape}")
                start = time.perf_counter()
                build_checkpoint(args.shape, model_dir, "cuda" if args.device in ("auto", "cuda") else "cpu")
                print(f"checkpoint: {model_dir} in {time.perf_counter() - start:.1f} s", flush=True)
            port = free_port()
            base_url, model = f"http://127.0.0.1:{port}", "bench"
            start = time.perf_counter()
            log_path = os.path.join(args.out, f"server_{label}.log")
            server = start_server(args, model_dir, port, log_path)
            wait_healthy(base_url, server, args.startup_timeout)
            results["server_startup_s"] = time.perf_counter() - start
            print(f"server up in {results['server_startup_s']:.1f} s", flush=True)
        write()
        asyncio.run(run_scenarios(args, base_url, model, tokenizer, results, write))
    except BaseException:
        if log_path is not None:
            with open(log_path) as f:
                print("--- the server's log, last lines:\n" + "".join(f.readlines()[-40:]), flush=True)
        raise
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
