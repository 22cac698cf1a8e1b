"""Engine flags, declared once: every config field with `flag(...)` metadata (config.py) becomes --field-name, with
the field's type, default, choices and help, in each subcommand that runs an engine (as vLLM's EngineArgs does).
A subcommand adds only its own flags beside them."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields

from pagedlab import config

ENGINE_COMMANDS = ("generate", "serve", "bench")      # the subcommands that run a model take every engine flag
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def engine_fields(command: str, only: set[str] | None = None) -> list[Field]:
    """The config fields that are flags of `command`, in declaration order (model, cache, scheduler): those whose
    metadata names it (default: every command that runs a model), or those in `only` (what the simulator models)."""
    chosen = []
    for klass in config.CONFIG_CLASSES:
        for f in fields(klass):
            if "help" in f.metadata and (f.name in only if only is not None else
                                         command in (f.metadata.get("commands") or ENGINE_COMMANDS)):
                chosen.append(f)
    return chosen


def option(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def field_type(f: Field) -> type:
    """int for `int` and `int | None` (config.py's annotations are strings: `from __future__ import annotations`)."""
    if isinstance(f.type, type):
        return f.type
    names = [t.strip() for t in str(f.type).split("|") if t.strip() != "None"]
    if len(names) != 1 or names[0] not in _TYPES:
        raise TypeError(f"engine flag {f.name}: type {f.type!r} is not int, float, str or bool (optionally | None)")
    return _TYPES[names[0]]


def add_engine_args(parser: argparse.ArgumentParser, command: str, only: set[str] | None = None,
                    defaults: dict | None = None) -> argparse._ArgumentGroup:
    """defaults: the command's own default of a flag, where its purpose needs another (shown in its help)."""
    group = parser.add_argument_group("engine", "the engine's settings (pagedlab.config), vLLM's flag names")
    defaults = defaults or {}
    for f in engine_fields(command, only):
        kind, help = field_type(f), f.metadata["help"]
        if f.name in defaults:
            default = defaults[f.name]
            help = help.split(" (default:")[0] + f" (default here: {default})"
        else:
            default = None if f.default is MISSING else f.default
            if default is not None and not isinstance(default, bool):
                help += f" (default: {default})"
        if kind is bool:
            group.add_argument(option(f), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help)
        else:
            group.add_argument(option(f), dest=f.name, type=kind, default=default, help=help,
                               choices=f.metadata.get("choices"))
    return group


def flag_names() -> set[str]:
    """Every config field that is an engine flag."""
    return {f.name for klass in config.CONFIG_CLASSES for f in fields(klass) if "help" in f.metadata}


def engine_kwargs(args: argparse.Namespace, exclude: tuple[str, ...] = ("model",)) -> dict:
    """The engine flags of a parsed command line as keyword arguments of `LLM(model, **kwargs)`."""
    names = flag_names()
    return {name: value for name, value in vars(args).items() if name in names and name not in exclude}
