#!/usr/bin/env python3
"""Render real Hugging Face chat templates with transformers' own Jinja renderer and write the expected strings.

Writes tests/fixtures/templates/expected.json, read by the Rust tests in src/tokenizer/chat_template.rs, which
must reproduce every string byte for byte (and every `raise_exception` message).

Pinned: transformers 5.24.0 (jinja2 >= 3.1.6), run with /work/venv/bin/python:
    /work/venv/bin/python scripts/reference/chat_template_reference.py

The templates are the committed files in tests/fixtures/templates/ (origin in that folder's README.md).
The clock behind `strftime_now` is frozen at FIXED_NOW so that the Llama 3.1/3.2 templates ("Today Date: ...")
render the same on every run; the Rust test sets the same instant.
"""

import datetime as _dt
import json
import pathlib

import transformers
from transformers.utils import chat_template_utils

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "tests" / "fixtures" / "templates"
FIXED_NOW = _dt.datetime(2025, 3, 9, 14, 5, 0)


class _FrozenDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


# transformers' `strftime_now` looks the name `datetime` up in this module at call time.
chat_template_utils.datetime = _FrozenDatetime

# template file -> (bos_token, eos_token) as in the model's tokenizer_config.json
TEMPLATE_SPECIAL_TOKENS = {
    "HuggingFaceTB-SmolLM2-135M-Instruct.jinja": ("<|im_start|>", "<|im_end|>"),
    "chatml.jinja": ("<s>", "<|im_end|>"),
    "meta-llama-Meta-Llama-3-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>"),
    "mistralai-Mistral-7B-Instruct-v0.1.jinja": ("<s>", "</s>"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": (None, "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": (None, "<|im_end|>"),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>"),
    "alpaca.jinja": ("<s>", "</s>"),
    "LFM2.5-8B-A1B.jinja": ("<|startoftext|>", "<|im_end|>"),
    "test-generation-blocks.jinja": ("<s>", "<|im_end|>"),
}

TRICKY = (
    "Quotes: 'single' and \"double\", a backslash \\ and a {{ brace }} {% tag %}.\n"
    "Unicode: café, naïve, 中文, русский, 🦙🚀.\tTab\nSecond line\n"
)

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
    ],
    "multi_turn_no_system": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "tricky_content": [
        {"role": "system", "content": "  System with surrounding spaces  \n"},
        {"role": "user", "content": TRICKY},
        {"role": "assistant", "content": "\n  Answer with <html> & \"json\": {\"a\": 1}  \n"},
    ],
    "user_whitespace_only_edges": [
        {"role": "user", "content": "\n\nleading newlines and trailing spaces   "},
        {"role": "assistant", "content": ""},
    ],
    "extra_fields_and_tool_call": [
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call12345",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}},
                }
            ],
        },
        {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call12345"},
        {"role": "assistant", "content": "It is 21 °C."},
    ],
    "empty": [],
}


def render(source, messages, add_generation_prompt, bos, eos):
    try:
        # Like apply_chat_template, pass only the special tokens the tokenizer has (absent ones stay undefined).
        special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
        rendered, indices = chat_template_utils.render_jinja_template(
            conversations=[messages],
            chat_template=source,
            add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=True,
            **special,
        )
        text = rendered[0]
        # {% generation %} spans, as byte offsets into the UTF-8 text (transformers gives character offsets).
        spans = [[len(text[:a].encode("utf-8")), len(text[:b].encode("utf-8"))] for a, b in indices[0]]
        return {"text": text, "generation_spans": spans}
    except Exception as e:  # jinja2 TemplateError from raise_exception, UndefinedError, ...
        kind = "raise_exception" if type(e).__name__ == "TemplateError" else "error"
        return {kind: str(e)}


def main():
    out = {
        "generator": f"scripts/reference/chat_template_reference.py, transformers {transformers.__version__}",
        "fixed_now": FIXED_NOW.isoformat(),
        "conversations": CONVERSATIONS,
        "cases": [],
    }
    for name, (bos, eos) in TEMPLATE_SPECIAL_TOKENS.items():
        source = (TEMPLATES / name).read_text(encoding="utf-8")
        for conv_name, messages in CONVERSATIONS.items():
            for gp in (False, True):
                case = {
                    "template": name,
                    "bos_token": bos,
                    "eos_token": eos,
                    "conversation": conv_name,
                    "add_generation_prompt": gp,
                }
                case.update(render(source, messages, gp, bos, eos))
                out["cases"].append(case)
    path = TEMPLATES / "expected.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    kinds = {}
    for c in out["cases"]:
        k = next(k for k in ("text", "raise_exception", "error") if k in c)
        kinds[k] = kinds.get(k, 0) + 1
    print(f"wrote {path}: {len(out['cases'])} cases {kinds}")


if __name__ == "__main__":
    main()
