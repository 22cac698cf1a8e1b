"""Engine flags are declared once, on the config dataclasses: every subcommand that takes a setting has the same
flag (vLLM's name, the field's default and help), a field added with flag metadata becomes a flag everywhere, and
the command line imports only the subcommand that runs."""
import subprocess
import sys
from dataclasses import MISSING, field, fields, make_dataclass
from pathlib import Path

import pytest

from pagedlab import config
from pagedlab.cli import COMMANDS, command_parser
from pagedlab.engine import arg_utils
from pagedlab.entrypoints.sim import OWN_FLAGS, sim_engine_fields
from pagedlab.sim.simulator import SimConfig

ROOT = Path(__file__).resolve().parents[1]
ENGINE_RUNNING = ("generate", "serve", "bench", "sim")
# each command's flags of its own that share a config field's name (a different meaning there)
OWN = {"bench": {"model"}, "sim": set(OWN_FLAGS)}
VLLM_FLAGS = ("--model", "--tokenizer", "--dtype", "--seed", "--enforce-eager", "--quantization",
              "--tensor-parallel-size", "--block-size", "--gpu-memory-utilization", "--swap-space",
              "--enable-prefix-caching", "--kv-cache-dtype", "--num-gpu-blocks-override", "--max-model-len",
              "--max-num-seqs", "--max-num-batched-tokens", "--enable-chunked-prefill")


def flags(command: str) -> dict:
    return {a.dest: a for a in command_parser(command)._actions if a.option_strings}


def flag_fields():
    return [f for klass in config.CONFIG_CLASSES for f in fields(klass) if "help" in f.metadata]


def takes(command: str, f) -> bool:
    if command == "sim":
        return f.name in sim_engine_fields()
    return command in (f.metadata["commands"] or arg_utils.ENGINE_COMMANDS)


def test_every_engine_flag_is_in_every_subcommand_that_takes_it_with_one_default_and_help():
    parsed = {c: flags(c) for c in ENGINE_RUNNING}
    for f in flag_fields():
        helps = set()
        for command in ENGINE_RUNNING:
            action = parsed[command].get(f.name)
            if not takes(command, f):
                assert action is None or f.name in OWN.get(command, ()), (command, f.name)
                continue
            assert action is not None, f"pagedlab {command} lacks --{f.name.replace('_', '-')}"
            assert action.option_strings[0] == "--" + f.name.replace("_", "-")
            assert action.default == f.default, (command, f.name)
            assert action.help.startswith(f.metadata["help"])
            if f.metadata["choices"]:
                assert tuple(action.choices) == f.metadata["choices"]
            helps.add(action.help)
        assert len(helps) == 1, (f.name, helps)


def test_vllm_flag_names():
    for command in ("generate", "serve"):
        options = {o for a in command_parser(command)._actions for o in a.option_strings}
        assert set(VLLM_FLAGS) <= options
        assert ("--served-model-name" in options) == (command == "serve")
        assert "--no-enable-chunked-prefill" in options      # booleans switch both ways, as vLLM's


def test_sim_settings_have_the_engines_names_and_defaults():
    engine = {f.name: f for f in flag_fields()}
    sim = {f.name: f for f in fields(SimConfig)}
    shared = set(engine) & set(sim)
    assert shared - set(OWN_FLAGS) == sim_engine_fields()
    assert {"block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "preemption_mode",
            "swap_space", "enable_prefix_caching", "batching", "static_reservation", "seed"} <= shared
    for name in shared:
        assert sim[name].default == engine[name].default, name
    # and what the simulator runs is the engine's own config, built from them
    assert SimConfig(block_size=8, max_model_len=512).engine_config().scheduler.max_model_len == 512


def test_a_config_field_with_flag_metadata_becomes_a_flag(monkeypatch):
    extended = make_dataclass("ExtendedCacheConfig", [("new_knob", int, field(
        default=3, metadata=config.flag("a knob the engine grew")))], bases=(config.CacheConfig,))
    monkeypatch.setattr(config, "CONFIG_CLASSES", (config.ModelConfig, extended, config.SchedulerConfig))
    for command in arg_utils.ENGINE_COMMANDS:
        action = flags(command)["new_knob"]
        assert action.option_strings == ["--new-knob"] and action.default == 3
        assert action.help == "a knob the engine grew (default: 3)"
    args = command_parser("generate").parse_args(["hi", "--new-knob", "5"])
    assert arg_utils.engine_kwargs(args)["new_knob"] == 5


def test_parsed_flags_reach_the_engine_config():
    args = command_parser("serve").parse_args(
        ["--block-size", "32", "--max-model-len", "128", "--no-enable-chunked-prefill", "--max-num-batched-tokens",
         "256", "--enable-prefix-caching", "--preemption-mode", "swap", "--dtype", "float32",
         "--served-model-name", "m"])
    engine = config.EngineConfig.from_kwargs(**arg_utils.engine_kwargs(args))
    assert (engine.cache.block_size, engine.cache.enable_prefix_caching) == (32, True)
    assert (engine.scheduler.max_model_len, engine.scheduler.enable_chunked_prefill,
            engine.scheduler.max_num_batched_tokens, engine.scheduler.preemption_mode) == (128, False, 256, "swap")
    assert (engine.model.dtype, engine.model.served_model_name) == ("float32", "m")
    assert not hasattr(engine.model, "max_model_len")       # one max_model_len: the scheduler's
    with pytest.raises(SystemExit):
        command_parser("generate").parse_args(["hi", "--preemption-mode", "sometimes"])


def test_defaults_are_the_fields():
    for f in flag_fields():
        assert f.default is not MISSING, f"{f.name}: an engine flag needs a default"


def test_profile_takes_the_engine_flags_it_depends_on_with_its_own_two_defaults():
    from pagedlab.entrypoints.profile import PROFILED_SETTINGS
    parsed, engine = flags("profile"), {f.name: f for f in flag_fields()}
    assert set(engine) & set(parsed) == PROFILED_SETTINGS | {"model"}     # --model: its own, required
    for name in PROFILED_SETTINGS:
        assert parsed[name].help.startswith(engine[name].metadata["help"].split(" (default:")[0]), name
        expected = {"max_model_len": 2048, "swap_space": 1.0}.get(name, engine[name].default)
        assert parsed[name].default == expected, name
    assert "default here: 2048" in parsed["max_model_len"].help


def test_the_command_line_imports_only_the_subcommand_that_runs():
    code = ("import sys; from pagedlab.cli import main; main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith('pagedlab.entrypoints')))")
    run = subprocess.run([sys.executable, "-c", code, "sim", "--workload", "alpaca", "--num-requests", "10",
                          "--allocator", "paged"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = run.stdout.strip().splitlines()[-1]
    assert "pagedlab.entrypoints.sim" in loaded
    for other in ("generate", "bench", "openai", "profile"):
        assert f"pagedlab.entrypoints.{other}" not in loaded
    listing = subprocess.run([sys.executable, "-m", "pagedlab.cli", "--help"], capture_output=True, text=True,
                             timeout=60, cwd=ROOT)
    assert all(name in listing.stdout for name in COMMANDS)
