"""The scheduler -> executor seam is plain data: the SchedulerOutput pickles and msgpack-encodes and holds no live
object; a worker that sees nothing but the outputs' diffs rebuilds every block table and token list the allocator
and the scheduler hold; and the layers below the scheduler import nothing above them."""
from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import msgspec
import pytest

from pagedlab.executor.input_batch import InputBatch
from pagedlab.sampling_params import SamplingParams, StructuredOutputsParams
from pagedlab.sched_output import CachedSeqData, NewSeqData, SchedulerOutput
from tests.core_helpers import CheckedExecutor, check_all_returned, run_to_end, sim_engine

PACKAGE = Path(__file__).resolve().parents[1] / "pagedlab"
PLAIN = (int, float, str, bool, type(None))
PLAIN_RECORDS = (SchedulerOutput, NewSeqData, CachedSeqData, SamplingParams, StructuredOutputsParams)


def assert_plain(value, path="out") -> None:
    """Builtins and the seam's own records only: no Request, Sequence, allocator or block."""
    if isinstance(value, PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_plain(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_plain(key, f"{path} key")
            assert_plain(item, f"{path}[{key!r}]")
    else:
        assert type(value) in PLAIN_RECORDS, f"{path} is a {type(value).__name__}"
        for f in dataclasses.fields(value):
            assert_plain(getattr(value, f.name), f"{path}.{f.name}")


class MirroringExecutor(CheckedExecutor):
    """The simulator's executor plus what a worker keeps: an InputBatch fed only by the outputs. Every step it checks
    the output is plain data and that the batch agrees with the allocator and the scheduler."""
    holds_seqs = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch = InputBatch(num_rows=2, max_tokens=4, max_blocks=2)    # small: they must grow
        self.engine = None
        self.steps = self.cow_replacements = self.new_seqs = self.cached_seqs = 0

    def execute(self, out, grammar=None):
        assert_plain(out)
        assert pickle.loads(pickle.dumps(out)) == out
        msgspec.msgpack.encode(out)
        self.batch.update(out)
        scheduler, kv = self.engine.scheduler, self.engine.kv
        assert set(self.batch.row_of) == set(scheduler._held), "the worker holds exactly what the scheduler sent"
        assert out.seq_ids == [s.seq.seq_id for s in scheduler.batch.seqs]
        for sched in scheduler.batch.seqs:
            seq, row = sched.seq, self.batch.row_of[sched.seq.seq_id]
            assert self.batch.block_ids(seq.seq_id) == kv.block_table(seq)
            assert self.batch.token_ids[row, :self.batch.num_tokens[row]].tolist() == seq.token_ids
            assert self.batch.num_prompt_tokens[row] == seq.num_prompt_tokens
            assert self.batch.req_ids[row] == sched.request.request_id
            assert self.batch.seq_indexes[row] == sched.seq_index
        self.steps += 1
        self.cow_replacements += len(out.replaced_block_ids)
        self.new_seqs += len(out.new_seqs)
        self.cached_seqs += len(out.cached_seqs.seq_ids)
        return super().execute(out)


def mirrored_engine(**kwargs):
    engine = sim_engine(**kwargs)
    mirror = MirroringExecutor(engine.executor.cost, engine.executor.clock, engine.kv.block_size)
    mirror.engine, engine.executor = engine, mirror
    engine.scheduler.worker_holds_seqs = True
    return engine, mirror


CONFIGS = {
    "n>1 copy-on-write, swap": dict(num_blocks=28, num_cpu_blocks=64, preemption_mode="swap"),
    "recompute, chunked": dict(num_blocks=24, max_num_batched_tokens=12),
    "prefix caching": dict(num_blocks=48, enable_prefix_caching=True, max_num_batched_tokens=16),
    "static": dict(num_blocks=64, allocator="static", static_reservation="request"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_worker_fed_only_diffs_rebuilds_the_block_tables(name):
    engine, mirror = mirrored_engine(max_model_len=48, max_num_seqs=8, **CONFIGS[name])
    shared = list(range(5, 22))
    for i in range(14):
        prompt = shared[:4 + i % 13] + [100 + i] * (i % 5) if name == "prefix caching" else [7 + i] * (3 + 2 * i % 11)
        n = 3 if i % 4 == 1 and name != "static" else 1
        engine.add_request({"prompt_token_ids": prompt}, SamplingParams(n=n, temperature=0, ignore_eos=True,
                                                                       max_tokens=6 + 3 * (i % 5)))
    outputs = run_to_end(engine)
    assert len(outputs) == 14 and all(o.error is None for o in outputs.values())
    check_all_returned(engine)
    assert mirror.steps > 10 and mirror.cached_seqs > mirror.new_seqs
    if name == "n>1 copy-on-write, swap":
        assert mirror.cow_replacements > 0 and engine.totals["preemptions"] > 0
    if name == "recompute, chunked":
        assert engine.totals["preemptions"] > 0
    # every sequence that ended was forgotten once the next step with work came
    engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2, ignore_eos=True))
    run_to_end(engine)
    assert len(mirror.batch) <= 1


def test_diffs_carry_only_what_changed():
    """A decode step sends each held sequence its one new token and, at a block boundary, its one new block."""
    engine, mirror = mirrored_engine(num_blocks=32, block_size=4)
    outs = []
    execute = mirror.execute
    mirror.execute = lambda out, grammar=None: outs.append(out) or execute(out)
    engine.add_request({"prompt_token_ids": [1, 2, 3, 4, 5, 6]}, SamplingParams(max_tokens=5, ignore_eos=True))
    run_to_end(engine)
    first, *decodes = outs
    assert [s.seq_id for s in first.new_seqs] == first.seq_ids and first.new_seqs[0].token_ids == [1, 2, 3, 4, 5, 6]
    assert len(first.new_seqs[0].block_ids) == 2
    for out in decodes:
        assert not out.new_seqs and out.num_scheduled_tokens == [1]
        assert [len(t) for t in out.cached_seqs.new_token_ids] == [1]
    # decodes compute positions 6, 7 (block 1), 8 (a new block 2), 9
    assert [len(b) for out in decodes for b in out.cached_seqs.new_block_ids] == [0, 0, 1, 0]
    assert outs[-1].finished_seq_ids == [] and not engine.scheduler._held
    assert engine.scheduler._finished_seq_ids == [first.seq_ids[0]]     # reported with the next step that has work


def test_output_of_every_kind_of_request_is_plain():
    params = SamplingParams(n=2, temperature=0.7, seed=3, logprobs=2, prompt_logprobs=1, logit_bias={5: 1.0},
                            stop_token_ids=[9], structured_outputs=StructuredOutputsParams(regex="[ab]+"))
    out = SchedulerOutput(step=1, seq_ids=[4], num_scheduled_tokens=[3], num_computed_tokens=[0], num_samples=[2],
                          new_seqs=[NewSeqData(4, "r", 0, [1, 2, 3], 3, [0], params)],
                          blocks_to_copy=[(1, 2)], replaced_block_ids=[(4, 0, 7)])
    assert_plain(out)
    assert pickle.loads(pickle.dumps(out)) == out
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=SchedulerOutput)
    assert decoded.new_seqs[0].sampling_params.logit_bias == {5: 1.0}


# --- each layer only knows the ones below it -------------------------------------------------------------------
ABOVE = {
    "executor": ("pagedlab.scheduler", "pagedlab.engine", "pagedlab.sequence", "pagedlab.sim", "pagedlab.entrypoints"),
    "layers": ("pagedlab.scheduler", "pagedlab.engine", "pagedlab.sequence", "pagedlab.executor", "pagedlab.sim",
               "pagedlab.entrypoints"),
    "models": ("pagedlab.scheduler", "pagedlab.engine", "pagedlab.sequence", "pagedlab.executor", "pagedlab.sim"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", ABOVE)
def test_no_import_reaches_up(package):
    offenders = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == above or name.startswith(above + ".") for above in ABOVE[package]):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_scan_sees_imports():
    assert "pagedlab.engine.llm_engine" in imported_modules(PACKAGE / "entrypoints" / "generate.py") or \
        any(n.startswith("pagedlab.") for n in imported_modules(PACKAGE / "entrypoints" / "generate.py"))
    assert "pagedlab.sched_output.SchedulerOutput" in imported_modules(PACKAGE / "executor" / "model_runner.py")


def test_input_batch_appends_uneven_diffs_and_grows():
    """Diffs of several tokens, none, or one per row (a fast-forwarded run, a prompt chunk, a decode), past the
    arrays' first size."""
    batch = InputBatch(num_rows=1, max_tokens=2, max_blocks=1)
    params = SamplingParams()
    batch.update(SchedulerOutput(0, new_seqs=[NewSeqData(s, "r", s, [s] * 3, 3, [s], params) for s in (7, 8, 9)]))
    batch.update(SchedulerOutput(1, cached_seqs=CachedSeqData([7, 8, 9], [[1, 2, 3, 4, 5], [], [6]],
                                                              [[70, 71], [], [90]])))
    batch.update(SchedulerOutput(2, replaced_block_ids=[(9, 1, 91)], finished_seq_ids=[8],
                                 cached_seqs=CachedSeqData([7, 9], [[6], [7]], [[], []])))
    tokens = {s: batch.token_ids[row, :batch.num_tokens[row]].tolist() for s, row in batch.row_of.items()}
    assert tokens == {7: [7, 7, 7, 1, 2, 3, 4, 5, 6], 9: [9, 9, 9, 6, 7]}
    assert batch.block_ids(7) == [7, 70, 71] and batch.block_ids(9) == [9, 91]
    assert len(batch) == 2
