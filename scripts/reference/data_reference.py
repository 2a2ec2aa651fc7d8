#!/usr/bin/env python3
"""Expected input ids and assistant-token masks of multi-turn conversations under real chat templates, computed
by transformers, for loratune's data-path parity test (src/data/parity.rs).

Writes tests/fixtures/data/template_masks.json. Neither the tests nor CI run this script.

Pinned: transformers 5.24.0, tokenizers 0.23.3 (run with /work/venv/bin/python):
    /work/venv/bin/python scripts/reference/data_reference.py [--templates DIR] [--gguf PATH]

How the reference is built (independently of loratune's algorithm, which renders conversation prefixes):
- Each real template (tests/fixtures/templates/*.jinja, verbatim from the models' tokenizer_config.json) gets a
  hand-written twin with `{% generation %}…{% endgeneration %}` around what an assistant turn should train on:
  its content (as the template writes it, e.g. after `| trim`) plus the end-of-turn token that closes it. The
  script asserts that the twin renders byte-identical text to the real template for every conversation.
- transformers' `apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`
  on the twin gives `input_ids` (the text tokenized without special tokens) and `assistant_masks` (every token
  overlapping a generation span).
- Tokenizers: the fixture byte-level BPE (tests/fixtures/tokenizer/tokenizer.json) plus the template's special
  tokens added as special tokens in the listed order (so they get ids 384, 385, ...), and — for SmolLM2 — the
  real SmolLM2-135M-Instruct tokenizer loaded by transformers from the GGUF (models/, scripts/fetch-smollm2.sh).
- Conversations a template rejects (Gemma/Mistral: system role, alternation) are recorded with the message
  given to raise_exception.
"""

import argparse
import json
import pathlib
import sys

import tokenizers
import transformers
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "data" / "template_masks.json"

SMOL_TAGGED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TAGGED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

GEMMA_TAGGED = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\\n' }}{% generation %}"
    "{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

MISTRAL_TAGGED = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

PHI3_TAGGED = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n'}}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN_OLD = """    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"""
QWEN_NEW = """    {%- if message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}
    {%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"""

# name, template file, tagged twin (a string or a function of the original), bos, eos, special tokens to add
CASES = [
    ("smollm2", "HuggingFaceTB-SmolLM2-135M-Instruct.jinja", SMOL_TAGGED, None, "<|im_end|>", []),
    (
        "llama3",
        "meta-llama-Meta-Llama-3-8B-Instruct.jinja",
        LLAMA3_TAGGED,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    (
        "gemma2",
        "google-gemma-2-2b-it.jinja",
        GEMMA_TAGGED,
        "<bos>",
        "<eos>",
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
    ),
    ("mistral", "mistralai-Mistral-7B-Instruct-v0.1.jinja", MISTRAL_TAGGED, "<s>", "</s>", ["<s>", "</s>"]),
    (
        "phi3",
        "microsoft-Phi-3.5-mini-instruct.jinja",
        PHI3_TAGGED,
        "<s>",
        "<|endoftext|>",
        ["<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    ),
    ("qwen2.5", "Qwen-Qwen2.5-7B-Instruct.jinja", lambda src: replace_once(src, QWEN_OLD, QWEN_NEW), None, "<|im_end|>", []),
]

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You are Aria, the support assistant of Nimbrel Home. Answer briefly."},
        {"role": "user", "content": "How do I reset my password?"},
        {
            "role": "assistant",
            "content": 'Open Settings → Account, then choose "Reset password". The e-mail arrives within 5 minutes.',
        },
        {"role": "user", "content": "  It never arrived.\n"},
        {
            "role": "assistant",
            "content": "Check your spam folder first.\nIf it is not there, write to help@nimbrel.example (ticket #4821).  ",
        },
    ],
    [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": ""},
    ],
    [
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": "1, 2, 3."},
        {"role": "user", "content": "Now backwards 🙂"},
        {"role": "assistant", "content": "3, 2, 1 — done! 🎉"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour ! Ça va ?"},
    ],
    [
        {"role": "user", "content": "Repeat after me: yes"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "yes"},
        {"role": "assistant", "content": "yes"},
    ],
]


def replace_once(src, old, new):
    if src.count(old) != 1:
        sys.exit(f"template text to tag not found exactly once: {old[:60]!r}")
    return src.replace(old, new)


def fixture_tokenizer(bos, eos, added):
    tok = Tokenizer.from_file(str(FIXTURES / "tokenizer" / "tokenizer.json"))
    base = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    ids = {t: tok.token_to_id(t) for t in added}
    assert [ids[t] for t in added] == list(range(base, base + len(added))), ids
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>"), ids


def run_case(hf_tok, template, tagged, conversations):
    done, errors = [], []
    for conv in conversations:
        try:
            text = hf_tok.apply_chat_template(conv, tokenize=False, chat_template=template)
        except Exception as e:  # raise_exception(...) in the template
            msg = str(e)
            try:
                hf_tok.apply_chat_template(conv, tokenize=False, chat_template=tagged)
                sys.exit("the tagged twin accepts a conversation the real template rejects")
            except Exception as e2:
                assert str(e2) == msg, (msg, str(e2))
            errors.append({"messages": conv, "raises": msg})
            continue
        tagged_text = hf_tok.apply_chat_template(conv, tokenize=False, chat_template=tagged)
        assert tagged_text == text, f"tagged twin renders differently:\n{text!r}\n{tagged_text!r}"
        out = hf_tok.apply_chat_template(
            conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=tagged
        )
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert len(mask) == len(ids) and sum(mask) > 0
        done.append({"messages": conv, "text": text, "input_ids": ids, "assistant_masks": mask})
    return done, errors


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--templates", default=str(FIXTURES / "templates"))
    ap.add_argument("--gguf", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    args = ap.parse_args()
    if transformers.__version__ != "5.24.0" or tokenizers.__version__ != "0.23.3":
        sys.exit(f"pinned transformers 5.24.0 / tokenizers 0.23.3, found {transformers.__version__} / {tokenizers.__version__}")
    tdir = pathlib.Path(args.templates)
    cases = []
    for name, file, tagged, bos, eos, added in CASES:
        template = (tdir / file).read_text()
        twin = tagged(template) if callable(tagged) else tagged
        hf_tok, ids = fixture_tokenizer(bos, eos, added)
        done, errors = run_case(hf_tok, template, twin, CONVERSATIONS)
        cases.append(
            {
                "name": name,
                "template_file": file,
                "tokenizer": "fixture",
                "added_special_tokens": added,
                "added_ids": [ids[t] for t in added],
                "bos_token": bos,
                "eos_token": eos,
                "conversations": done,
                "rejected": errors,
            }
        )
        print(f"{name}: {len(done)} conversations, {len(errors)} rejected")
    gguf = pathlib.Path(args.gguf)
    if not gguf.is_file():
        sys.exit(f"{gguf} missing: run scripts/fetch-smollm2.sh")
    real = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    template = (tdir / "HuggingFaceTB-SmolLM2-135M-Instruct.jinja").read_text()
    assert real.chat_template == template, "the GGUF's template differs from the committed file"
    done, errors = run_case(real, template, SMOL_TAGGED, CONVERSATIONS)
    cases.append(
        {
            "name": "smollm2-gguf",
            "template_file": "HuggingFaceTB-SmolLM2-135M-Instruct.jinja",
            "tokenizer": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
            "added_special_tokens": [],
            "added_ids": [],
            "bos_token": real.bos_token,
            "eos_token": real.eos_token,
            "pad_token": real.pad_token,
            "conversations": done,
            "rejected": errors,
        }
    )
    print(f"smollm2-gguf: {len(done)} conversations (bos {real.bos_token!r}, eos {real.eos_token!r}, pad {real.pad_token!r})")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "_about": "Written by scripts/reference/data_reference.py (transformers 5.24.0, tokenizers 0.23.3): "
        "apply_chat_template(return_assistant_tokens_mask=True) on {% generation %}-tagged twins of real templates.",
        "cases": cases,
    }
    OUT.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
