"""EleutherAI's lm-evaluation-harness as a real client of the server (its local-completions model), on local tasks
written here (the hub is unreachable): multiple-choice accuracy and rolling perplexity come out as scoring the same
items with transformers directly gives them, and a generate_until task runs."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from pagedlab.engine.async_engine import AsyncLLMEngine
from pagedlab.entrypoints.openai.api_server import build_app
from tests.server_fixtures import ServerThread, build_chat_model

MODEL = "tiny-chat"
QUESTIONS = [
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog.", "red car.", "blue sky."], "answer": 0},
    {"question": "Blocks are shared between sequences and", "choices": ["copied on write.", "thrown away."],
     "answer": 0},
    {"question": "A scheduler batches requests", "choices": ["never.", "continuously, one token at a time."],
     "answer": 1},
    {"question": "User: hello there\nAssistant:", "choices": [" hello, how can I help you today?", " no."],
     "answer": 0},
    {"question": "In the beginning the paged cache held", "choices": ["nothing at all.", "every token."],
     "answer": 1},
]
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."},
         {"text": "Blocks are shared between sequences and copied on write. A scheduler batches requests."}]
TASKS = {
    "pagedlab_mc": dict(output_type="multiple_choice", doc_to_text="{{question}}", doc_to_choice="{{choices}}",
                        doc_to_target="{{answer}}", metric_list=[{"metric": "acc"}]),
    "pagedlab_ppl": dict(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
                         metric_list=[{"metric": "word_perplexity"}]),
    "pagedlab_gen": dict(output_type="generate_until", doc_to_text="{{question}}", doc_to_target="{{choices[0]}}",
                         generation_kwargs={"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
                         metric_list=[{"metric": "exact_match"}]),
}


def write_tasks(directory) -> None:
    data = {"pagedlab_mc": QUESTIONS, "pagedlab_ppl": TEXTS, "pagedlab_gen": QUESTIONS}
    for name, spec in TASKS.items():
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in data[name]))
        config = dict(task=name, dataset_path="json", dataset_kwargs={"data_files": {"test": str(path)}},
                      test_split="test", **spec)
        (directory / f"{name}.yaml").write_text(json.dumps(config))      # JSON is YAML


@pytest.fixture(scope="module")
def results(tmp_path_factory, monkeypatch_module):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_dir = build_chat_model(str(tmp_path_factory.mktemp("tiny-chat")))
    tasks_dir = tmp_path_factory.mktemp("tasks")
    write_tasks(tasks_dir)
    engine = AsyncLLMEngine.build(model_dir, device="cpu", dtype="float32", max_model_len=256, swap_space=0,
                                  num_gpu_blocks_override=256)
    try:
        with ServerThread(build_app(engine, MODEL)) as url:
            out = lm_eval.simple_evaluate(
                model="local-completions", model_args=dict(
                    base_url=f"{url}/v1/completions", model=MODEL, tokenizer=model_dir,
                    tokenizer_backend="huggingface", max_length=256, num_concurrent=1, max_retries=1),
                tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks_dir)), log_samples=True)
    finally:
        engine.shutdown()
    return model_dir, out


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield mp


def hf_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].float().log_softmax(dim=-1)
    rows = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    return logprobs[rows, ids[0, len(context_ids):]].sum().item()


def test_lm_eval_scores_equal_transformers(results):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = results
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    # multiple choice: lm-eval's split of context and continuation (" " between them), scored by transformers
    correct = 0
    samples = sorted(out["samples"]["pagedlab_mc"], key=lambda s: s["doc_id"])
    for doc, sample in zip(QUESTIONS, samples):
        scores = []
        for choice in doc["choices"]:
            context, continuation = doc["question"], " " + choice
            whole, context_ids = encode(context + continuation), encode(context)
            scores.append(hf_loglikelihood(model, context_ids, whole[len(context_ids):]))
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(scores, abs=1e-4)
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert out["results"]["pagedlab_mc"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))

    # rolling perplexity: one window each, after the BOS token lm-eval puts before it
    total, words = 0.0, 0
    for doc in TEXTS:
        total += hf_loglikelihood(model, [tokenizer.bos_token_id], encode(doc["text"]))
        words += len(re.split(r"\s+", doc["text"]))
    assert out["results"]["pagedlab_ppl"]["word_perplexity,none"] == pytest.approx(math.exp(-total / words),
                                                                                 rel=1e-4)

    generated = out["samples"]["pagedlab_gen"]
    assert len(generated) == len(QUESTIONS) and all(isinstance(s["resps"][0][0], str) for s in generated)
    assert "exact_match,none" in out["results"]["pagedlab_gen"]
