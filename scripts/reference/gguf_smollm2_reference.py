#!/usr/bin/env python3
"""Reference values for loratune's GGUF reader on SmolLM2-135M-Instruct.Q4_1.gguf, from transformers' own GGUF
loading (`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, which dequantises with gguf-py and undoes
llama.cpp's q/k permutation).

Writes (small, committed):
  tests/fixtures/gguf/smollm2_reference.json         config fields transformers derives from the metadata
  tests/fixtures/gguf/smollm2_reference.safetensors  slices of tensors; key = "<hf name>|r0:r1|c0:c1"
                                                    (rows / columns of the torch-layout tensor; 1-D tensors use
                                                    "<hf name>|r0:r1"), plus `__*` forward references (logits
                                                    of a ChatML prompt, see below)

Needs the model: run scripts/fetch-smollm2.sh first. Pinned: transformers 5.24.0, torch 2.15.0, gguf 0.19.0.
  /work/venv/bin/python scripts/reference/gguf_smollm2_reference.py
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = os.path.join(ROOT, "models")
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")

# (hf name, row range, column range or None for 1-D); chosen to cover: Q4_1 q_proj and k_proj across whole
# heads (checks the un-permutation), Q8_0 embedding rows, F32 norms, a late layer, down_proj.
SLICES = [
    ("model.layers.0.self_attn.q_proj.weight", (0, 128), (0, 8)),
    ("model.layers.29.self_attn.q_proj.weight", (448, 576), (560, 576)),
    ("model.layers.0.self_attn.k_proj.weight", (0, 192), (32, 40)),
    ("model.layers.17.self_attn.k_proj.weight", (64, 128), (0, 8)),
    ("model.layers.0.self_attn.v_proj.weight", (0, 64), (0, 8)),
    ("model.layers.3.self_attn.o_proj.weight", (0, 8), (0, 64)),
    ("model.layers.5.mlp.down_proj.weight", (100, 104), (0, 1536)),
    ("model.layers.5.mlp.gate_proj.weight", (0, 4), (0, 576)),
    ("model.layers.5.mlp.up_proj.weight", (1532, 1536), (0, 576)),
    ("model.embed_tokens.weight", (0, 3), (0, 576)),
    ("model.embed_tokens.weight", (49150, 49152), (0, 576)),
    ("model.layers.0.input_layernorm.weight", (0, 576), None),
    ("model.layers.11.post_attention_layernorm.weight", (0, 576), None),
    ("model.norm.weight", (0, 576), None),
]


def main():
    path = os.path.join(MODELS, NAME)
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run scripts/fetch-smollm2.sh first")
    cfg = AutoConfig.from_pretrained(MODELS, gguf_file=NAME)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=NAME, dtype=torch.float32)
    sd = model.state_dict()
    out = {}
    for name, (r0, r1), cols in SLICES:
        t = sd[name]
        if cols is None:
            out[f"{name}|{r0}:{r1}"] = t[r0:r1].contiguous().clone()
        else:
            c0, c1 = cols
            out[f"{name}|{r0}:{r1}|{c0}:{c1}"] = t[r0:r1, c0:c1].contiguous().clone()
    # Forward reference on a ChatML prompt (tokenized by transformers' GGUF tokenizer; special tokens are in
    # the text already): logits[:, :256] at every position, the full-vocabulary logsumexp and argmax per
    # position, and 4096 logits of the last position.
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=NAME)
    text = "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    out["__input_ids"] = ids[0].clone()
    out["__logits_head"] = logits[:, :256].contiguous().clone()
    out["__logits_last"] = logits[-1, :4096].contiguous().clone()
    out["__logsumexp"] = torch.logsumexp(logits, dim=-1).contiguous()
    out["__argmax"] = logits.argmax(dim=-1).contiguous()
    print("prompt ids:", ids[0].tolist(), "greedy next:", repr(tok.decode([int(logits[-1].argmax())])))
    save_file(out, os.path.join(OUT, "smollm2_reference.safetensors"))
    fields = {
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": (cfg.rope_parameters or {}).get("rope_theta", getattr(cfg, "rope_theta", None)),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "lm_head_is_embedding": bool(torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)),
        "num_tensors": len(sd),
    }
    with open(os.path.join(OUT, "smollm2_reference.json"), "w") as f:
        json.dump(fields, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(fields, indent=1, sort_keys=True))
    print(f"wrote {len(out)} slices")


if __name__ == "__main__":
    main()
