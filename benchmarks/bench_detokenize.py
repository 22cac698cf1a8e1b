"""Streaming detokenization, per token: the output stage's IncrementalDetokenizer against decoding the whole output
after every token (what the engine did before: O(n^2) in the output's length), on the real SmolLM2 tokenizer.

    PYTHONPATH=. python benchmarks/bench_detokenize.py --out DIR      # the CPU only; about a minute

Each output length is decoded token by token, the way a streamed request is: `incremental` (tokenizers'
DecodeStream), `incremental+stop` (the same with two stop strings that never match, so every token is checked),
`window` (a tokenizer with only decode(): two decodes of a few recent tokens a token) and `whole` (decode(ids[:k])
for every k). Medians of --repeats runs, in microseconds a token. Writes DIR/detokenize.json with the CPU named.
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import tokenizers
import transformers

from pagedlab import SamplingParams
from pagedlab.engine.detokenizer import IncrementalDetokenizer
from pagedlab.models.catalog import fetch_smollm2
from pagedlab.models.gguf_loader import load_gguf_tokenizer

TEXT = ("The paged cache holds every token of every request in fixed-size blocks; a block table maps each "
        "sequence's logical blocks to physical ones, so memory is allocated on demand — “naïve” static "
        "reservations waste most of it. 你好，世界 🙂 ")


class DecodeOnly:
    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode


def per_token_us(fn, ids: list[int], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(ids) * 1e6


def incremental(tokenizer, params: SamplingParams):
    def run(ids):
        detokenizer = IncrementalDetokenizer(tokenizer, params)
        for token_id in ids:
            detokenizer.update([token_id])
        return detokenizer.text
    return run


def whole(tokenizer):
    def run(ids):
        for k in range(1, len(ids) + 1):
            text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        return text
    return run


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    tokenizer = load_gguf_tokenizer(str(fetch_smollm2()))
    corpus = tokenizer.encode(TEXT * (1 + max(args.lengths) // 32), add_special_tokens=False)
    plain, stops = SamplingParams(), SamplingParams(stop=["never here \x00", "nor this \x01"])
    methods = {"incremental": incremental(tokenizer, plain), "incremental+stop": incremental(tokenizer, stops),
               "window": incremental(DecodeOnly(tokenizer), plain), "whole": whole(tokenizer)}
    rows = []
    for length in args.lengths:
        ids = corpus[:length]
        expected = tokenizer.decode(ids, skip_special_tokens=True)
        row = {"output_tokens": length}
        for name, fn in methods.items():
            assert fn(ids) == expected, name
            row[f"{name}_us_per_token"] = per_token_us(fn, ids, args.repeats)
        row["whole_over_incremental"] = row["whole_us_per_token"] / row["incremental_us_per_token"]
        rows.append(row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"cpu": cpu_name(), "python": platform.python_version(), "tokenizers": tokenizers.__version__,
              "transformers": transformers.__version__, "tokenizer": "SmolLM2-135M-Instruct (GGUF)",
              "command": " ".join(sys.argv), "rows": rows}
    (out / "detokenize.json").write_text(json.dumps(result, indent=2))
    print(f"CPU: {result['cpu']}; microseconds a token, medians of {args.repeats}")
    names = list(methods)
    print("| output tokens | " + " | ".join(names) + " | whole / incremental |")
    print("|---:|" + "---:|" * (len(names) + 1))
    for row in rows:
        cells = " | ".join(f"{row[f'{n}_us_per_token']:.2f}" for n in names)
        print(f"| {row['output_tokens']} | {cells} | {row['whole_over_incremental']:.0f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
