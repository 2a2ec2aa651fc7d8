#!/usr/bin/env python3
"""Fixtures of the Axolotl example-config suite (tests/it/axolotl.rs): the pinned example configs, a tiny Llama whose
tokenizer knows every special token those configs name, and three small datasets in the shapes they read.

Writes tests/fixtures/axolotl/{examples/, model/, data/}. The configs are copied byte for byte from a local clone of
https://github.com/axolotl-ai-cloud/axolotl at COMMIT (Apache-2.0): every YAML under the example folders of the
families loratune supports. Run with the reference venv (transformers 5.24.0, torch, tokenizers):

    /tmp/pyenv/bin/python scripts/reference/axolotl_fixture.py /path/to/axolotl-clone
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

COMMIT = "067b021c8b87a9e5e380b9173c704cf7340e30f5"
FOLDERS = [
    "examples/llama-2",
    "examples/llama-3",
    "examples/mistral",
    "examples/qwen2",
    "examples/qwen3",
    "examples/phi",
    "examples/gemma2",
    "examples/archived/falcon",
    "examples/archived/gemma",
    "examples/archived/tiny-llama",
    "examples/archived/code-llama",
]
# Special tokens the configs name (special_tokens, eot_tokens) or their chat templates write.
TOKENS = [
    "<s>", "</s>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>",
    "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<think>", "</think>",
]

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "axolotl"
BASE = ROOT / "tests" / "fixtures" / "models" / "llama"


def copy_configs(clone: Path) -> int:
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert head == COMMIT, f"{clone} is at {head}, not {COMMIT}"
    shutil.rmtree(OUT / "examples", ignore_errors=True)
    n = 0
    for folder in FOLDERS:
        for f in sorted((clone / folder).rglob("*")):
            if f.suffix in (".yml", ".yaml"):
                dst = OUT / f.relative_to(clone)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
                n += 1
    return n


def make_model() -> None:
    out = OUT / "model"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok = Tokenizer.from_file(str(BASE / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOKENS])
    tok.save(str(out / "tokenizer.json"))
    tc = json.loads((BASE / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"] = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": True}
        for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"] + TOKENS
    }
    tc["model_max_length"] = 8192
    # Templates such as Llama 3's open with bos_token (never added by the tokenizer itself: add_bos_token false).
    tc["bos_token"] = "<|begin_of_text|>"
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
    cfg = json.loads((BASE / "config.json").read_text())
    cfg["vocab_size"] = -(-tok.get_vocab_size() // 16) * 16
    cfg["max_position_embeddings"] = 8192
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for extra in ("generation_config.json",):
        if (out / extra).exists():
            (out / extra).unlink()


def make_data() -> None:
    out = OUT / "data"
    out.mkdir(parents=True, exist_ok=True)
    facts = [("the office open", "at 9 am"), ("the support email", "help@nimbrel.example"),
             ("the return window", "45 days"), ("the warranty", "two years"), ("the HQ city", "Lisbon"),
             ("the CEO", "Ana Rocha"), ("the product", "Nimbrel Desk"), ("the plan price", "12 euros")]
    alpaca, messages, conversations = [], [], []
    for i in range(2400):
        what, ans = facts[i % len(facts)]
        q = f"What is {what}? ({i})"
        a = f"{what.capitalize()} is {ans}."
        alpaca.append({"instruction": q, "input": "" if i % 3 else "Answer briefly.", "output": a})
        messages.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        conversations.append({"conversations": [{"from": "system", "value": "You are Aria."},
                                                {"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    for name, rows in [("alpaca.jsonl", alpaca), ("messages.jsonl", messages),
                       ("conversations.jsonl", conversations)]:
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    n = copy_configs(Path(sys.argv[1]))
    make_model()
    make_data()
    print(f"{n} configs, model and data in {OUT}")
