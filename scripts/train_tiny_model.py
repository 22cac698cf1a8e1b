#!/usr/bin/env python
"""Train the embedded toy checkpoint in data/tiny-llama/ (tokenizer + Llama model).

Data: the King James Bible from Debian's `bible-kjv-text` package, read through the
`bible` CLI of `bible-kjv` (apt-get install -y bible-kjv bible-kjv-text).
Everything is seeded; the step count (not wall time) fixes the LR schedule, so a
run with the same --steps on the same torch version reproduces the checkpoint.

    .venv/bin/python scripts/train_tiny_model.py --out data/tiny-llama
"""
import argparse
import json
import math
import random
import subprocess
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3 (Llama convention for 0-2)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def load_kjv() -> list[str]:
    """One string per chapter: its verses (numbers stripped) joined by newlines."""
    raw = subprocess.run(["bible", "-l10000", "gen1:1-rev22:21"], capture_output=True,
                         text=True, check=True).stdout
    chapters, cur = [], []
    for line in raw.splitlines():
        if line.startswith("  "):  # "  12 And God said, ..."
            cur.append(line.strip().split(" ", 1)[1])
        elif line.strip() and cur:  # a "Book N" heading starts the next chapter
            chapters.append("\n".join(cur))
            cur = []
    chapters.append("\n".join(cur))
    return chapters


def train_tokenizer(chapters: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(chapters, trainer)
    tok.post_processor = processors.TemplateProcessing(  # prepend <s>, like Llama
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>", model_max_length=512,
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def patch_json(path: Path, **kv):
    d = json.loads(path.read_text())
    d.update(kv)
    path.write_text(json.dumps(d, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="data/tiny-llama")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--max-minutes", type=float, default=24.0,
                    help="safety stop on wall time (an early stop breaks reproducibility)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="1 is faster than 2 on a shared 2-core box")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    chapters = load_kjv()
    tokenizer = train_tokenizer(chapters, args.vocab)
    # Token stream "<s> chapter <s> chapter ..."; every 50th chapter is held out for eval.
    encs = tokenizer.backend_tokenizer.encode_batch(chapters)
    stream = lambda keep: torch.tensor([i for k, e in enumerate(encs) if keep(k) for i in e.ids])
    data, val = stream(lambda k: k % 50 != 7), stream(lambda k: k % 50 == 7)
    print(f"{len(chapters)} chapters, {sum(map(len, chapters)) / 1e6:.2f}M chars, {len(data) / 1e6:.2f}M "
          f"train + {len(val) / 1e3:.0f}k val tokens, vocab {len(tokenizer)}", flush=True)

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):  # linear warmup, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))

    model.train()
    t_train, ema = time.time(), None
    for step in range(args.steps):
        starts = [rng.randrange(len(data) - args.seq_len - 1) for _ in range(args.batch)]
        x = torch.stack([data[s:s + args.seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        elapsed = time.time() - t_train
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  ema {ema:.3f}  lr {lr_at(step):.2e}  "
                  f"{elapsed:.0f}s", flush=True)
        if elapsed > args.max_minutes * 60:
            print(f"time budget hit at step {step}", flush=True)
            break

    model.eval()  # held-out loss over all non-overlapping val windows
    with torch.no_grad():
        x = val[: len(val) // args.seq_len * args.seq_len].view(-1, args.seq_len)
        eval_loss = sum(model(input_ids=b, labels=b).loss.item() for b in x.split(32)) / len(x.split(32))
    print(f"final: train-ema {ema:.3f}  eval {eval_loss:.3f}  steps {step + 1}  "
          f"train {time.time() - t_train:.0f}s  total {time.time() - t0:.0f}s", flush=True)

    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                               do_sample=False, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out, save_jinja_files=False)  # chat template inside tokenizer_config
    # Small compatibility touches for readers other than transformers 5 (older transformers, engines).
    patch_json(out / "config.json", rope_theta=cfg.rope_parameters["rope_theta"], torch_dtype="float32")
    patch_json(out / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps({
        "args": vars(args), "steps_done": step + 1, "train_loss_ema": round(ema, 4),
        "eval_loss": round(eval_loss, 4), "train_seconds": round(time.time() - t_train),
        "tokens": len(data), "torch": torch.__version__}, indent=2) + "\n")

    # Smoke test: reload from disk and greedy-decode.
    tok = AutoTokenizer.from_pretrained(out)
    m = AutoModelForCausalLM.from_pretrained(out).eval()
    for prompt in ["In the beginning", "And the LORD said", "Blessed are the"]:
        enc = tok(prompt, return_tensors="pt")
        gen = m.generate(**enc, max_new_tokens=30, do_sample=False)
        print(repr(tok.decode(gen[0], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
