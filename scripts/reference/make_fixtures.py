#!/usr/bin/env python3
"""Generate loratune's golden parity fixtures under tests/fixtures/ with transformers + PEFT.

Pinned environment (see scripts/reference/README.md): torch 2.15.0, transformers 5.24.0, peft 0.21.2,
tokenizers 0.23.3, safetensors (the venv's), run as

    /work/venv/bin/python scripts/reference/make_fixtures.py

from anywhere (paths are resolved from this file). CPU only, float32, eager attention, fixed seeds,
`torch.use_deterministic_algorithms(True)`. Running it twice produces byte-identical files.

What it writes (full description in tests/fixtures/README.md):
  tests/fixtures/tokenizer/                tokenizer.json, tokenizer_config.json, tokenizer_reference.json
  tests/fixtures/models/<arch>/            config.json, generation_config.json, model.safetensors (f32),
                                           tokenizer files, reference.safetensors
  tests/fixtures/models/llama-bf16/        the llama weights stored as bf16 + reference computed after f32 upcast
  tests/fixtures/adapters/<name>/          adapter_config.json, adapter_model.safetensors, reference.safetensors
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

PINNED = {"torch": "2.15.0", "transformers": "5.24.0", "peft": "0.21.2", "tokenizers": "0.23.3"}

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
VOCAB_SIZE = 384
PAD_ID = 3
SEQ_LEN = 16
ROW1_LEN = 11

# SmolLM2-135M-Instruct's chat template, verbatim (from the GGUF key tokenizer.chat_template).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun while the fox runs into the forest.
A small model can learn a lot from a little data, but it needs the right training recipe and a careful eye.
In 2024 there were 365 days, 12 months and 52 weeks; the year 1999 had 365 days too.
She said: "Hello, how are you today?" He answered: "I am fine, thank you, and you?"
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
Low-rank adaptation trains two small matrices for every large weight matrix and keeps the base model frozen.
The learning rate was 0.001, the batch size was 4, and the model was trained for 3 epochs on 10000 samples.
What is the capital of France? Answer in one sentence. The answer is Paris, a city on the river Seine.
Rust is a systems programming language that runs fast, prevents crashes and makes concurrency safe.
Please write a short poem about the sea. The sea is wide, the sea is deep, the sea will sing you into sleep.
The user asks a question and the assistant gives an answer; the system message sets the rules of the chat.
Tokens are pieces of words: a tokenizer splits the text into tokens and maps every token to a number.
We tested the model on 250 questions and it answered 187 of them correctly, which is about 75 percent.
When the weather is good we walk in the park, and when it rains we read books and drink hot tea at home.
The attention layer lets every token look at the tokens before it, and the feed-forward layer mixes features.
""" * 3

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"]
ADAPTER_ARCHS = ["llama", "qwen2", "phi3", "gemma2"]

# one fixed seed per use, so every file depends only on its own seed
SEEDS = {
    "batch": 1234,
    "llama": 101,
    "mistral": 102,
    "qwen2": 103,
    "qwen3": 104,
    "phi3": 105,
    "gemma": 106,
    "gemma2": 107,
    "adapter": 2024,
}


def log(*a):
    print(*a, flush=True)


def check_versions():
    got = {
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "tokenizers": tokenizers.__version__,
    }
    bad = {k: (got[k], v) for k, v in PINNED.items() if got[k] != v}
    if bad:
        sys.exit(f"error: version mismatch (got, pinned): {bad}; use /work/venv/bin/python")
    return got


def st_metadata() -> dict:
    # Only one key: the safetensors writer serialises the metadata map in hash order, so several keys would make
    # the files differ byte-wise from run to run. Provenance is documented in tests/fixtures/README.md instead.
    return {"format": "pt"}


# ----------------------------------------------------------------------------------------------------------------
# 1. tokenizer
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer(out: Path) -> int:
    tok = Tokenizer(models.BPE())
    # Like SmolLM2: single digits are split off first, then GPT-2 byte-level pre-tokenization.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert vocab == VOCAB_SIZE, vocab
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)

    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in enumerate(SPECIALS)
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "model_max_length": 128,
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # Reference encodings / renderings through transformers (what a user of AutoTokenizer gets).
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.eos_token_id == 2 and hf.pad_token_id == 3 and hf.bos_token is None, (
        hf.eos_token_id,
        hf.pad_token_id,
        hf.bos_token,
    )
    texts = [
        "Hello, how are you today?",
        "In 2024 there were 365 days.",
        "  two leading spaces and trailing space ",
        "Tabs\tand\nnewlines\n\nand unicode: café, naïve, 日本語 🙂",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
        "The capital of France is Paris.<|im_end|>",
    ]
    enc = []
    for t in texts:
        ids = hf(t, add_special_tokens=False)["input_ids"]
        raw = tok.encode(t, add_special_tokens=False).ids
        assert ids == raw, (t, ids, raw)
        assert tok.decode(ids, skip_special_tokens=False) == t, (t, tok.decode(ids, skip_special_tokens=False))
        enc.append({"text": t, "ids": ids, "tokens": [tok.id_to_token(i) for i in ids]})
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ]
    chats = []
    for msgs in convs:
        for agp in (False, True):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
            ids = hf(text, add_special_tokens=False)["input_ids"]
            chats.append({"messages": msgs, "add_generation_prompt": agp, "text": text, "ids": ids})
    ref = {
        "_about": "Produced by scripts/reference/make_fixtures.py with transformers AutoTokenizer "
        "(encode with add_special_tokens=False; chat via apply_chat_template(tokenize=False) then encode).",
        "vocab_size": vocab,
        "special_tokens": {s: i for i, s in enumerate(SPECIALS)},
        "encodings": enc,
        "chat": chats,
    }
    # one record per line: readable in a diff, still plain JSON
    lines = ["{"]
    items = list(ref.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i + 1 < len(items) else ""
        if isinstance(v, list):
            inner = ",\n".join("    " + json.dumps(e, ensure_ascii=False) for e in v)
            lines.append(f"  {json.dumps(k)}: [\n{inner}\n  ]{comma}")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{comma}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == ref
    (out / "tokenizer_reference.json").write_text(text)
    log(f"tokenizer: vocab {vocab}, merges {len(json.loads((out / 'tokenizer.json').read_text())['model']['merges'])}")
    return vocab


TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]


def copy_tokenizer(src: Path, dst: Path):
    for f in TOKENIZER_FILES:
        shutil.copyfile(src / f, dst / f)


# ----------------------------------------------------------------------------------------------------------------
# 2. models
# ----------------------------------------------------------------------------------------------------------------
def common(vocab: int) -> dict:
    return dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
    )


def make_config(arch: str, vocab: int):
    c = common(vocab)
    if arch == "llama":
        return LlamaConfig(
            **c,
            head_dim=16,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 100000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if arch == "mistral":
        return MistralConfig(
            **c,
            head_dim=16,
            tie_word_embeddings=False,
            sliding_window=5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if arch == "qwen2":
        return Qwen2Config(
            **c,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        )
    if arch == "qwen3":
        return Qwen3Config(
            **c,
            head_dim=16,
            tie_word_embeddings=False,
            attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        )
    if arch == "phi3":
        return Phi3Config(
            **c,
            tie_word_embeddings=False,
            original_max_position_embeddings=128,
            sliding_window=6,
            partial_rotary_factor=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        )
    if arch == "gemma":
        return GemmaConfig(
            **c,
            head_dim=16,
            hidden_act="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if arch == "gemma2":
        return Gemma2Config(
            **c,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            sliding_window=5,
            # 32 != head_dim (16) on purpose: a loader that ignores query_pre_attn_scalar gets different numbers.
            query_pre_attn_scalar=32,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=5.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    raise ValueError(arch)


# std of the random matrices, per (arch, parameter-name substring); default 0.15
MATRIX_STD = {
    # gemma2: large q/k so attention scores reach the soft-cap (50), large embeddings so that the final logits
    # reach the final soft-cap (5).
    "gemma2": {"q_proj": 0.75, "k_proj": 0.75, "embed_tokens": 0.6},
}


@torch.no_grad()
def init_weights(model, arch: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    gemma_norm = arch in ("gemma", "gemma2")  # these RMSNorms compute x * (1 + w)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 2:
            std = 0.15
            for key, s in MATRIX_STD.get(arch, {}).items():
                if key in name:
                    std = s
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name.endswith(".weight") and "norm" in name:
            w = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(w if gemma_norm else 1.0 + w)
        else:
            raise RuntimeError(f"{arch}: no init rule for parameter {name} {tuple(p.shape)}")


def reference_batch(vocab: int):
    g = torch.Generator().manual_seed(SEEDS["batch"])
    ids = torch.randint(4, vocab, (2, SEQ_LEN), generator=g, dtype=torch.int64)
    mask = torch.ones(2, SEQ_LEN, dtype=torch.int64)
    ids[1, ROW1_LEN:] = PAD_ID
    mask[1, ROW1_LEN:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def manual_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The documented convention: logits[:, t] predicts labels[:, t+1]; mean over targets != -100."""
    lg = logits[:, :-1, :].reshape(-1, logits.shape[-1]).double()
    tg = labels[:, 1:].reshape(-1)
    valid = tg != -100
    lp = torch.log_softmax(lg[valid], dim=-1)
    return -(lp.gather(1, tg[valid][:, None]).mean())


def load_model(path: Path, dtype=torch.float32):
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    m.eval()
    return m


def forward_reference(model, ids, mask, labels):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        single = model(input_ids=ids[1:2, :ROW1_LEN]).logits
    return out.logits.float(), out.loss.float().reshape(1), single.float()


class ScoreRecorder:
    """Wraps a modeling module's eager_attention_forward to record raw (pre-soft-cap, pre-mask) attention scores
    at causally visible, non-padded (query, key) pairs."""

    def __init__(self, modeling_module, mask):
        self.mod = modeling_module
        self.orig = modeling_module.eager_attention_forward
        self.mask = mask
        self.scores = []

    def __enter__(self):
        orig = self.orig
        rec = self

        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
            scaling = kwargs.get("scaling", None)
            if scaling is None:
                scaling = module.scaling
            k = self.mod.repeat_kv(key, module.num_key_value_groups)
            s = torch.matmul(query, k.transpose(2, 3)) * scaling  # [b, h, q, k]
            T = s.shape[-1]
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
            valid = causal[None, None] & (rec.mask[:, None, None, :T] == 1) & (rec.mask[:, None, :T, None] == 1)
            rec.scores.append(s[valid.expand_as(s)].detach().clone())
            return orig(module, query, key, value, attention_mask, *args, **kwargs)

        self.mod.eager_attention_forward = wrapped
        return self

    def __exit__(self, *exc):
        self.mod.eager_attention_forward = self.orig
        return False


def write_v4_config(path: Path):
    """Rewrite a v5 config.json into the transformers v4 form: top-level rope_theta, rope_scaling null,
    no rope_parameters, torch_dtype instead of dtype, a v4 transformers_version."""
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    assert rp.get("rope_type", "default") == "default", rp
    out = {}
    for k, v in cfg.items():
        if k == "dtype":
            out["torch_dtype"] = v
        elif k == "transformers_version":
            out[k] = "4.46.3"
        else:
            out[k] = v
    out["rope_theta"] = rp["rope_theta"]
    out["rope_scaling"] = None
    path.write_text(json.dumps(dict(sorted(out.items())), indent=2) + "\n")


def build_models(tok_dir: Path, vocab: int) -> dict:
    ids, mask, labels = reference_batch(vocab)
    log(f"reference batch input_ids:\n{ids}")
    summary = {}
    for arch in ARCHS:
        out = FIX / "models" / arch
        if out.exists():
            shutil.rmtree(out)
        torch.manual_seed(SEEDS[arch])
        cfg = make_config(arch, vocab)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        init_weights(model, arch, SEEDS[arch])
        model.eval()
        model.save_pretrained(str(out))
        copy_tokenizer(tok_dir, out)

        if arch == "llama":
            # llama3 rope scaling: frequencies must fall in all three bands (kept, smoothed, divided by factor 8)
            inv = model.model.rotary_emb.inv_freq.double()
            base = 1.0 / (100000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
            ratio = inv / base
            kept = int((ratio - 1).abs().lt(1e-6).sum())
            divided = int((ratio - 1 / 8).abs().lt(1e-6).sum())
            smoothed = ratio.numel() - kept - divided
            log(f"llama3 rope bands: kept {kept}, smoothed {smoothed}, divided by 8: {divided}; ratio {ratio.tolist()}")
            assert kept > 0 and smoothed > 0 and divided > 0
        if arch == "phi3":
            rot = model.model.rotary_emb.inv_freq.numel() * 2
            assert rot == 8, f"phi3 partial rotary not honoured: rotary dim {rot}"

        # reload from disk: the reference must come from exactly the files on disk
        m = load_model(out)
        logits, loss, single = forward_reference(m, ids, mask, labels)

        if arch == "mistral":
            write_v4_config(out / "config.json")
            m4 = load_model(out)
            assert m4.config.sliding_window == 5, m4.config.sliding_window
            l4, loss4, s4 = forward_reference(m4, ids, mask, labels)
            assert torch.equal(l4, logits) and torch.equal(loss4, loss) and torch.equal(s4, single), (
                "v4-form mistral config does not reproduce the v5 logits"
            )
            log("mistral: v4-form config.json reproduces the v5 logits bit for bit")

        # conventions the README documents
        ml = manual_loss(logits, labels).float()
        assert torch.allclose(ml, loss[0], rtol=1e-5, atol=1e-6), (arch, ml, loss)
        real = logits[1, :ROW1_LEN]
        pad_vs_single = (real - single[0]).abs().max().item()
        assert pad_vs_single < 1e-4, (arch, pad_vs_single)
        assert torch.isfinite(logits).all(), f"{arch}: non-finite logits"

        # extra diagnostics
        modeling = sys.modules[type(m).__module__]
        with ScoreRecorder(modeling, mask) as rec:
            with torch.no_grad():
                m(input_ids=ids, attention_mask=mask)
        scores = torch.cat(rec.scores)
        valid = mask.bool()
        lv = logits[valid]
        info = {
            "logit_std": lv.std().item(),
            "logit_absmax": lv.abs().max().item(),
            "loss": loss.item(),
            "score_absmax": scores.abs().max().item(),
            "score_std": scores.std().item(),
            "pad_vs_single": pad_vs_single,
        }
        if arch == "gemma2":
            info.update(gemma2_softcap_effect(m, ids, mask, logits, scores))
        info.update(switch_effects(arch, out, ids, mask, logits))
        summary[arch] = info
        log(f"{arch}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))

        save_file(
            {
                "input_ids": ids.contiguous(),
                "attention_mask": mask.contiguous(),
                "logits": logits.contiguous(),
                "loss": loss.contiguous(),
                "logits_single": single.contiguous(),
            },
            str(out / "reference.safetensors"),
            metadata=st_metadata(),
        )

        if arch == "llama":
            build_llama_bf16(model, tok_dir, ids, mask, labels, logits)
    return summary


def switch_effects(arch: str, path: Path, ids, mask, logits) -> dict:
    """Reload the same weights with one family switch turned off and measure how much the valid-position logits
    move, so that every switch in the fixtures is known to matter (a loader that ignores it fails the test)."""
    variants = {}

    def rope(**kw):
        def f(c):
            rp = dict(c.rope_parameters)
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                rp.pop(k, None)
            rp.update(kw)
            c.rope_parameters = rp

        return f

    def setattr_(k, v):
        return lambda c: setattr(c, k, v)

    if arch == "llama":
        variants["no_llama3_rope_scaling"] = rope(rope_type="default")
    if arch == "mistral":
        variants["no_sliding_window"] = setattr_("sliding_window", None)
    if arch == "qwen2":
        variants["no_linear_rope_scaling"] = rope(rope_type="default")
        variants["rope_theta_1e4"] = rope(rope_theta=10000.0, rope_type="linear", factor=2.0)
    if arch == "phi3":
        variants["full_rotary"] = rope(partial_rotary_factor=1.0)
        variants["no_sliding_window"] = setattr_("sliding_window", None)
    if arch == "gemma2":
        variants["no_sliding_window"] = setattr_("sliding_window", 128)
        variants["query_pre_attn_scalar_eq_head_dim"] = setattr_("query_pre_attn_scalar", 16)
    res = {}
    v = mask.bool()
    for name, fn in variants.items():
        c = AutoConfig.from_pretrained(str(path))
        fn(c)
        mv = AutoModelForCausalLM.from_pretrained(str(path), config=c, dtype=torch.float32, attn_implementation="eager")
        mv.eval()
        with torch.no_grad():
            lv = mv(input_ids=ids, attention_mask=mask).logits
        d = (lv[v] - logits[v]).abs().max().item()
        assert d > 1e-2, f"{arch}: switch {name} barely changes the logits ({d})"
        res[f"effect_{name}"] = d
    if arch in ("gemma", "gemma2"):
        # tanh-approximate GELU vs exact erf GELU: small but far above f32 noise
        m = load_model(path)
        for layer in m.model.layers:
            layer.mlp.act_fn = torch.nn.GELU()
        with torch.no_grad():
            lv = m(input_ids=ids, attention_mask=mask).logits
        d = (lv[v] - logits[v]).abs().max().item()
        assert d > 1e-4, f"{arch}: exact vs tanh GELU indistinguishable ({d})"
        res["effect_exact_gelu_instead_of_tanh"] = d
    return res


def gemma2_softcap_effect(m, ids, mask, logits, scores) -> dict:
    valid = mask.bool()
    cap = m.config.final_logit_softcapping
    with torch.no_grad():
        m.config.final_logit_softcapping = None
        raw = m(input_ids=ids, attention_mask=mask).logits
        m.config.final_logit_softcapping = cap
        attn_caps = [layer.self_attn.attn_logit_softcapping for layer in m.model.layers]
        for layer in m.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        no_attn_cap = m(input_ids=ids, attention_mask=mask).logits
        for layer, c in zip(m.model.layers, attn_caps):
            layer.self_attn.attn_logit_softcapping = c
        again = m(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(again, logits)
    rv = raw[valid]
    d_final = (logits[valid] - rv).abs().max().item()
    d_attn = (logits[valid] - no_attn_cap[valid]).abs().max().item()
    frac_final = (rv.abs() > cap).float().mean().item()
    capped_scores = 50.0 * torch.tanh(scores / 50.0)
    d_scores = (capped_scores - scores).abs().max().item()
    frac_scores = (scores.abs() > 25.0).float().mean().item()
    assert d_final > 0.5, f"final soft-cap barely changes logits ({d_final})"
    assert d_attn > 0.05, f"attention soft-cap barely changes logits ({d_attn})"
    assert d_scores > 1.0, f"attention soft-cap barely changes scores ({d_scores})"
    return {
        "raw_logit_std": rv.std().item(),
        "raw_logit_absmax": rv.abs().max().item(),
        "frac_raw_logits_beyond_cap": frac_final,
        "max_logit_change_final_cap": d_final,
        "max_logit_change_attn_cap": d_attn,
        "max_score_change_attn_cap": d_scores,
        "frac_scores_abs_gt_25": frac_scores,
    }


def build_llama_bf16(model_f32, tok_dir, ids, mask, labels, logits_f32):
    out = FIX / "models" / "llama-bf16"
    if out.exists():
        shutil.rmtree(out)
    m = model_f32.to(torch.bfloat16)
    m.save_pretrained(str(out))
    model_f32.to(torch.float32)  # (same object; not used afterwards)
    copy_tokenizer(tok_dir, out)
    # check the file really holds bf16
    sd = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in sd.values()), {k: t.dtype for k, t in sd.items()}
    up = load_model(out, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in up.parameters())
    logits, loss, single = forward_reference(up, ids, mask, labels)
    d = (logits - logits_f32)[mask.bool()].abs().max().item()
    log(f"llama-bf16: loss={loss.item():.6g}, max |logits(bf16 weights) - logits(f32 weights)| = {d:.4g}")
    assert d > 1e-3, "bf16 rounding should visibly change the logits"
    save_file(
        {
            "input_ids": ids.contiguous(),
            "attention_mask": mask.contiguous(),
            "logits": logits.contiguous(),
            "loss": loss.contiguous(),
            "logits_single": single.contiguous(),
        },
        str(out / "reference.safetensors"),
        metadata=st_metadata(),
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. adapters
# ----------------------------------------------------------------------------------------------------------------
def record_step(params, keys, tensors: dict, name: str):
    """After a backward pass: the LoRA gradients (`grad.*`), one AdamW step from the same start without and with
    weight decay (`step1.*`, `step1wd.*`), and the gradients clipped to a total norm of 0.5 (`clip.*`,
    `clip_total_norm`) into `tensors`; the parameters are left at their start values."""
    start = [p.detach().clone() for p in params]
    grads = [p.grad.detach().clone() for p in params]
    assert all(gr.abs().max() > 0 for gr in grads), f"{name}: a LoRA parameter got an all-zero gradient"
    for k, gr in zip(keys, grads):
        tensors[f"grad.{k}"] = gr

    def adamw_step(wd: float):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        opt.step()
        res = [p.detach().clone() for p in params]
        for p, gr in zip(params, grads):  # the step must not have touched the gradients
            assert torch.equal(p.grad, gr)
        return res

    for k, v in zip(keys, adamw_step(0.0)):
        tensors[f"step1.{k}"] = v
    for k, v in zip(keys, adamw_step(0.01)):
        tensors[f"step1wd.{k}"] = v
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)

    total = torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)
    want = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads)).float()
    assert torch.allclose(total, want, rtol=1e-5), (total, want)
    assert total.item() > 0.5, f"{name}: total grad norm {total.item()} <= 0.5, clipping would not bite"
    for k, p in zip(keys, params):
        tensors[f"clip.{k}"] = p.grad.detach().clone()
    tensors["clip_total_norm"] = total.detach().float().reshape(1)


def adapter_specs():
    specs = []
    for arch in ADAPTER_ARCHS:
        specs.append((arch, arch, dict(target_modules="all-linear", use_rslora=False)))
    specs.append(("llama-rslora", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)))
    return specs


def build_adapters(vocab: int) -> dict:
    ids, mask, labels = reference_batch(vocab)
    summary = {}
    for name, arch, kw in adapter_specs():
        out = FIX / "adapters" / name
        if out.exists():
            shutil.rmtree(out)
        torch.manual_seed(SEEDS["adapter"])
        # repo-relative path, so adapter_config.json's base_model_name_or_path is "tests/fixtures/models/<arch>"
        base = load_model(Path("tests/fixtures/models") / arch)
        lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **kw)
        pm = get_peft_model(base, lcfg)
        pm.eval()

        # every lora_A / lora_B ~ N(0, 0.2^2), in sorted-name order from one generator
        g = torch.Generator().manual_seed(SEEDS["adapter"] + len(name))
        named = sorted(((n, p) for n, p in pm.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
        assert named and all(".lora_A." in n or ".lora_B." in n for n, _ in named), [n for n, _ in named]
        with torch.no_grad():
            for _, p in named:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

        pm.save_pretrained(str(out))
        # PEFT also writes a boilerplate model card; not needed here
        (out / "README.md").unlink(missing_ok=True)
        saved = load_file(str(out / "adapter_model.safetensors"))
        acfg = json.loads((out / "adapter_config.json").read_text())
        # PEFT writes target_modules from a Python set (order varies with PYTHONHASHSEED): sort it so the file is
        # reproducible. The content is unchanged (PEFT treats the list as a set).
        if isinstance(acfg["target_modules"], list):
            acfg["target_modules"] = sorted(acfg["target_modules"])
            (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
        assert acfg["base_model_name_or_path"] == f"tests/fixtures/models/{arch}", acfg["base_model_name_or_path"]

        def peft_key(n: str) -> str:
            k = n.replace(".default.", ".")
            assert k in saved, (n, k)
            return k

        keys = [peft_key(n) for n, _ in named]
        assert sorted(keys) == sorted(saved.keys()), (sorted(keys), sorted(saved.keys()))
        psd = get_peft_model_state_dict(pm)
        for (n, p), k in zip(named, keys):
            assert torch.equal(saved[k], p.detach()) and torch.equal(psd[k], p.detach()), k

        # forward + backward
        for p in pm.parameters():
            p.grad = None
        outp = pm(input_ids=ids, attention_mask=mask, labels=labels)
        outp.loss.backward()
        logits = outp.logits.detach().float().clone()
        loss = outp.loss.detach().float().reshape(1).clone()
        ml = manual_loss(logits, labels).float()
        assert torch.allclose(ml, loss[0], rtol=1e-5, atol=1e-6), (name, ml, loss)

        tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits, "loss": loss}
        record_step([p for _, p in named], keys, tensors, name)

        # merged model: merge in f32 and compare
        merged = pm.merge_and_unload()
        merged.eval()
        with torch.no_grad():
            ml_logits = merged(input_ids=ids, attention_mask=mask).logits.float()
        v = mask.bool()
        dmerge = (ml_logits[v] - logits[v]).abs().max().item()
        assert dmerge < 1e-4 * max(1.0, logits[v].abs().max().item()), (name, dmerge)
        tensors["merged_logits"] = ml_logits

        # does the adapter change the base model's output?
        base_ref = load_file(str(FIX / "models" / arch / "reference.safetensors"))
        dbase = (logits[v] - base_ref["logits"][v]).abs().max().item()
        assert dbase > 0.1, f"{name}: adapter barely changes logits ({dbase})"

        save_file(
            {k: t.contiguous() for k, t in tensors.items()},
            str(out / "reference.safetensors"),
            metadata=st_metadata(),
        )
        summary[name] = {
            "n_lora_tensors": len(keys),
            "loss": loss.item(),
            "logit_std": logits[v].std().item(),
            "clip_total_norm": tensors["clip_total_norm"].item(),
            "max_merged_minus_unmerged": dmerge,
            "max_adapter_minus_base": dbase,
        }
        log(f"adapter {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in summary[name].items()))
    return summary


# ----------------------------------------------------------------------------------------------------------------
def tree_report():
    total = 0
    rows = []
    for p in sorted(FIX.rglob("*")):
        if p.is_file():
            n = p.stat().st_size
            total += n
            rows.append((p.relative_to(REPO), n))
    for r, n in rows:
        log(f"{n:>10}  {r}")
    log(f"total: {total} bytes = {total / 2**20:.3f} MiB")
    return total


def main():
    vers = check_versions()
    log("versions:", vers)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # summation order independent of the machine's core count
    os.chdir(REPO)

    tok_dir = FIX / "tokenizer"
    vocab = build_tokenizer(tok_dir)
    models_summary = build_models(tok_dir, vocab)
    adapters_summary = build_adapters(vocab)
    total = tree_report()
    # The whole tests/fixtures tree (other generators write there too: Mixtral and Falcon add ~3.5 MiB): keep the
    # clone small.
    assert total < 20 * 2**20, f"fixtures too large: {total} bytes"

    log("\nper-arch logit std (valid positions):")
    for a, s in models_summary.items():
        log(f"  {a:8s} {s['logit_std']:.4f}")
    digest = hashlib.sha256()
    for p in sorted(FIX.rglob("*")):
        if p.is_file() and p.name != "README.md":
            digest.update(str(p.relative_to(FIX)).encode())
            digest.update(p.read_bytes())
    log(f"sha256 of all generated files: {digest.hexdigest()}")


if __name__ == "__main__":
    main()
