#!/usr/bin/env python3
"""Tiny GGUF models of every family loratune reads, converted by llama.cpp's own converter.

For each variant below, a small random Hugging Face model is built with transformers (every parameter drawn
from N(0, 0.5²) so norm offsets and row permutations are visible), saved, and converted to GGUF (f32) by
llama.cpp's `convert_hf_to_gguf.py` with the vocabulary export replaced by a placeholder token list (the tiny models have no tokenizer).
The Rust test (`src/gguf/tests.rs`, `families_*`) then checks that loratune's reader gives back exactly the
original HF tensors (names, torch layout, q/k un-permutation, Gemma norm offset) and the same ModelConfig as
loratune's config.json parser.

Writes tests/fixtures/gguf/families/<variant>.gguf, <variant>.safetensors (the HF state dict, tied lm_head
left out, plus `__input_ids` / `__logits`: the HF model's logits for a fixed 10-token sequence, eager attention,
f32), <variant>.config.json (transformers' config.json). As an extra cross-check, transformers' own GGUF
loader is run on each file it supports and must reproduce the HF state dict too.

Needs llama.cpp's converter: the one vendored in the llama-cpp-python 0.3.36 sdist (its gguf-py is 0.19.0):
  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # or fetch the .tar.gz from PyPI
  tar xzf llama_cpp_python-0.3.36.tar.gz
  LLAMA_CPP_DIR=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp /work/venv/bin/python scripts/reference/gguf_families_fixture.py
Pinned: transformers 5.24.0, torch 2.15.0, gguf 0.19.0, safetensors 0.8.0.
"""
import json
import os
import runpy
import shutil
import sys
import tempfile

import torch

LCPP = os.environ.get("LLAMA_CPP_DIR")
if not LCPP or not os.path.exists(os.path.join(LCPP, "convert_hf_to_gguf.py")):
    sys.exit("set LLAMA_CPP_DIR to a llama.cpp checkout (see the docstring)")
sys.path.insert(0, LCPP)
sys.path.insert(0, os.path.join(LCPP, "gguf-py"))

import conversion  # noqa: E402  (llama.cpp's converter package)
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, FalconConfig, Gemma2Config, GemmaConfig, LlamaConfig, MistralConfig, MixtralConfig,
    Phi3Config, Qwen2Config, Qwen3Config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "families")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)

VARIANTS = {
    # q/k permutation with biases on q, k, v, o and the MLP.
    "llama": LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         attention_bias=True, mlp_bias=True),
    # Llama 3.1-style frequency scaling → rope_freqs tensor.
    "llama3": LlamaConfig(**{**COMMON, "max_position_embeddings": 32768}, rms_norm_eps=1e-5, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
    "mistral": MistralConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
                             sliding_window=None),
    "qwen2": Qwen2Config(**COMMON, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True),
    # head_dim 16 ≠ hidden / heads = 8.
    "qwen3": Qwen3Config(**COMMON, head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
    # Fused qkv / gate_up, partial rotary, sliding window.
    "phi3": Phi3Config(**COMMON, rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5,
                       original_max_position_embeddings=512, sliding_window=256, tie_word_embeddings=False,
                       pad_token_id=0),
    "gemma": GemmaConfig(**COMMON, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0),
    "gemma2": Gemma2Config(**{**COMMON, "num_hidden_layers": 2}, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                           query_pre_attn_scalar=16, attn_logit_softcapping=40.0, final_logit_softcapping=25.0,
                           sliding_window=128),
    # Sparse mixture of experts (last, so the variants above keep their random draws): llama.cpp writes it as
    # `llama` with expert_count / expert_used_count and stacked ffn_{gate,up,down}_exps tensors.
    "mixtral": MixtralConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    # Falcon (llama.cpp's `falcon`, query_key_value regrouped q|k|v by the converter): Falcon-7B's layout
    # (multi-query, one shared LayerNorm, tied head) and the new decoder architecture (2 key/value heads, ln_attn +
    # ln_mlp). llama.cpp's falcon has no linear biases and an MLP of 4·hidden, so neither has others.
    "falcon": FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           max_position_embeddings=512, multi_query=True, new_decoder_architecture=False,
                           parallel_attn=True, bias=False, alibi=False, tie_word_embeddings=True),
    "falcon-new": FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               num_kv_heads=2, max_position_embeddings=512, new_decoder_architecture=True,
                               parallel_attn=True, bias=False, alibi=False, tie_word_embeddings=False),
}


def convert(model_dir, out_file):
    orig = conversion.get_model_class

    def no_vocab(*a, **k):
        cls = orig(*a, **k)
        # A placeholder token list (so readers can tell the vocabulary size), no real tokenizer.
        cls.set_vocab = lambda self: self.gguf_writer.add_token_list([f"<t{i}>" for i in range(self.hparams["vocab_size"])])
        return cls

    conversion.get_model_class = no_vocab
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", out_file]
    try:
        runpy.run_path(os.path.join(LCPP, "convert_hf_to_gguf.py"), run_name="__main__")
    finally:
        sys.argv = argv
        conversion.get_model_class = orig


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(1234)
    for name, cfg in VARIANTS.items():
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        tmp = tempfile.mkdtemp()
        model.save_pretrained(tmp)
        if name == "falcon":
            # multi_query means one key/value head, but transformers 5 fills `num_kv_heads` with its default (=
            # num_attention_heads, also when tiiuae/falcon-7b's config.json lacks the key), and llama.cpp's converter
            # (which reads configs through AutoConfig) would regroup query_key_value into 4 groups and fail. Say 1.
            cpath = os.path.join(tmp, "config.json")
            c = json.load(open(cpath))
            c["num_kv_heads"] = 1
            json.dump(c, open(cpath, "w"), indent=2)
        gguf_path = os.path.join(OUT, f"{name}.gguf")
        convert(tmp, gguf_path)
        sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if name == "mixtral":
            # the checkpoint layout (per-expert w1/w2/w3, as save_pretrained wrote it), not transformers 5's fused
            # in-memory experts
            from safetensors.torch import load_file
            sd = load_file(os.path.join(tmp, "model.safetensors"))
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        # Forward reference: logits of the HF model for a fixed sequence (keys starting with "__" are not weights).
        ids = torch.tensor([[1, 5, 9, 2, 33, 60, 7, 0, 63, 17]])
        with torch.no_grad():
            sd["__input_ids"] = ids.clone()
            sd["__logits"] = model(input_ids=ids).logits.float().contiguous()
        save_file(sd, os.path.join(OUT, f"{name}.safetensors"))
        shutil.copy(os.path.join(tmp, "config.json"), os.path.join(OUT, f"{name}.config.json"))

        # Cross-check with transformers' GGUF loader where it supports the architecture.
        try:
            d = os.path.dirname(gguf_path)
            back = AutoModelForCausalLM.from_pretrained(d, gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
            bsd = back.state_dict()
            worst = max((bsd[k] - v).abs().max().item() for k, v in sd.items() if not k.startswith("__"))
            print(f"{name}: transformers' GGUF loader reproduces the HF weights, max |diff| = {worst:.3g}")
        except Exception as e:  # noqa: BLE001
            print(f"{name}: transformers' GGUF loader cannot load it: {type(e).__name__}: {str(e)[:120]}")
        shutil.rmtree(tmp)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(VARIANTS)} variants to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
