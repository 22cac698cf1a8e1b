"""The `pagedlab` command: `sim` (model-free simulator), `generate` (run a model), `serve`, `bench`, `profile`.

Only the subcommand that runs is imported (its flags included): a core install without the serve extra runs
`pagedlab sim`, and `pagedlab --help` lists every subcommand without importing any."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments(parser) and run(args), one-line help)
COMMANDS = {
    "sim": ("pagedlab.entrypoints.sim",
            "simulate a workload on the paged or static allocator (no model, no GPU)"),
    "generate": ("pagedlab.entrypoints.generate", "generate text for prompts with a local HF checkpoint"),
    "serve": ("pagedlab.entrypoints.openai.cli_args", "serve a model over an OpenAI-compatible HTTP API"),
    "bench": ("pagedlab.entrypoints.bench.cli",
              "offline throughput vs transformers, roofline, cold start and latency on one GPU"),
    "profile": ("pagedlab.entrypoints.profile",
                "measure the engine's step times on this GPU for the simulator (a profile)"),
}


def command_parser(name: str, sub=None) -> argparse.ArgumentParser:
    """The parser of one subcommand, its module imported now (standalone, or added to `sub`)."""
    module_name, help = COMMANDS[name]
    module = importlib.import_module(module_name)
    if sub is None:
        parser = argparse.ArgumentParser(prog=f"pagedlab {name}", description=module.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        parser = sub.add_parser(name, help=help, description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="pagedlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help) in COMMANDS.items():
        if name == chosen:
            command_parser(name, sub)
        else:
            sub.add_parser(name, help=help, add_help=False)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
