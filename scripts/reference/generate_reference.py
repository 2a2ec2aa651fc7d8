#!/usr/bin/env python3
"""Greedy-generation reference for SmolLM2-135M-Instruct (from the Q4_1 GGUF, dequantised by transformers).

Writes tests/fixtures/generate/smollm2_greedy.json: for each prompt, the chat-templated prompt ids and
transformers' greedy continuation ids (do_sample=False, up to 48 new tokens, stopping at eos <|im_end|>).

With --converted DIR (a folder written by `loratune convert models/SmolLM2-135M-Instruct.Q4_1.gguf DIR`), it also
loads that folder with transformers (model + tokenizer + chat template) and checks it produces the same prompt
ids and the same greedy ids — i.e. loratune's HF export is usable by transformers.

Run: /work/venv/bin/python scripts/reference/generate_reference.py [--converted DIR]
(torch 2.15.0, transformers 5.24.0, CPU, float32)
"""
import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
    "List three prime numbers greater than 10.",
]


def run(model, tok):
    out = []
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            g = model.generate(x, max_new_tokens=48, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                               pad_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        gen = g[0, len(ids):].tolist()
        out.append({"prompt": p, "prompt_ids": ids, "generated_ids": gen,
                    "text": tok.decode(gen, skip_special_tokens=True)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--converted")
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(ROOT / "models"), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(ROOT / "models"), gguf_file=GGUF, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ref = run(model, tok)
    dest = ROOT / "tests/fixtures/generate/smollm2_greedy.json"
    dest.write_text(json.dumps({"source": "transformers 5.24.0 from " + GGUF + " (f32), greedy", "cases": ref},
                               indent=1, ensure_ascii=False) + "\n")
    for r in ref:
        print(repr(r["prompt"]), "->", repr(r["text"]))
    if a.converted:
        tok2 = AutoTokenizer.from_pretrained(a.converted)
        m2 = AutoModelForCausalLM.from_pretrained(a.converted, dtype=torch.float32, attn_implementation="eager").eval()
        conv = run(m2, tok2)
        same = all(x["prompt_ids"] == y["prompt_ids"] and x["generated_ids"] == y["generated_ids"] for x, y in zip(ref, conv))
        print("converted folder in transformers: same prompt ids and greedy ids as the GGUF:", same)
        for r in conv:
            print("  converted:", repr(r["text"]))
        if not same:
            raise SystemExit("MISMATCH")


if __name__ == "__main__":
    main()
