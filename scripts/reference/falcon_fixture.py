#!/usr/bin/env python3
"""Golden fixtures for Falcon (`FalconForCausalLM`, rotary), from transformers + PEFT.

Writes, with make_fixtures.py's tokenizer, reference batch and conventions:
  tests/fixtures/models/falcon/       Falcon-7B's layout: multi-query (one key/value head), attention and MLP in
                                      parallel off one LayerNorm, no linear biases, tied head
  tests/fixtures/models/falcon-new/   new_decoder_architecture (Falcon-40B/180B): 2 key/value heads, query_key_value
                                      grouped per key/value head, ln_attn + ln_mlp, biases on every linear, untied
  tests/fixtures/models/falcon-seq/   the sequential layout (parallel_attn false, multi_query false: q/k/v grouped
                                      per head), biases
  each with reference.safetensors (input_ids, attention_mask, logits, loss, logits_single, greedy_prompt,
  greedy_ids)
  tests/fixtures/adapters/falcon/, adapters/falcon-new/: PEFT LoRA r=4 on every linear (all-linear:
                                      query_key_value, dense, dense_h_to_4h, dense_4h_to_h) with make_fixtures.py's
                                      reference tensors (grads, AdamW steps, clipping, merged logits)

Shape: hidden 64, 2 layers, 4 heads of 16, ffn_hidden_size 256 (falcon: llama.cpp's 4·hidden) or 128, vocab 384. Weights: matrices ~ N(0, 0.15²),
LayerNorm weights 1 + N(0, 0.1²), every bias (LayerNorm and linear) ~ N(0, 0.1²).
Run with make_fixtures.py's pins (torch 2.15.0, transformers 5.24.0, peft 0.21.2).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import moe_fixture as moe  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, FalconConfig  # noqa: E402

FIX = mf.FIX
SEEDS = {"falcon": 109, "falcon-new": 110, "falcon-seq": 111}


def make_config(name: str, vocab: int) -> FalconConfig:
    c = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=mf.PAD_ID,
             rope_theta=10000.0, alibi=False)
    if name == "falcon":
        # the MLP of 4·hidden that llama.cpp's falcon assumes, so scripts/check_gguf_llamacpp.py can run it there
        return FalconConfig(**c, multi_query=True, new_decoder_architecture=False, parallel_attn=True, bias=False,
                            tie_word_embeddings=True, ffn_hidden_size=256)
    c["ffn_hidden_size"] = 128
    if name == "falcon-new":
        return FalconConfig(**c, new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=True,
                            tie_word_embeddings=False)
    if name == "falcon-seq":
        return FalconConfig(**c, multi_query=False, new_decoder_architecture=False, parallel_attn=False,
                            bias=True, tie_word_embeddings=False)
    raise ValueError(name)


@torch.no_grad()
def init_weights(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name.endswith(".weight"):  # LayerNorm
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
        else:
            raise RuntimeError(f"falcon: no init rule for parameter {name} {tuple(p.shape)}")


def build_model(name: str, tok_dir: Path, vocab: int):
    ids, mask, labels = mf.reference_batch(vocab)
    out = FIX / "models" / name
    if out.exists():
        shutil.rmtree(out)
    torch.manual_seed(SEEDS[name])
    cfg = make_config(name, vocab)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    init_weights(model, SEEDS[name])
    model.eval()
    model.save_pretrained(str(out))
    mf.copy_tokenizer(tok_dir, out)
    m = mf.load_model(out)
    logits, loss, single = moe.forward(m, ids, mask, labels)
    ml = mf.manual_loss(logits, labels).float()
    assert torch.allclose(ml, loss[0], rtol=1e-5, atol=1e-6), (name, ml, loss)
    pad_vs_single = (logits[1, : mf.ROW1_LEN] - single[0]).abs().max().item()
    assert pad_vs_single < 1e-4, pad_vs_single
    moe.save_reference(out, m, ids, mask, logits, loss, single)
    names = sorted(json.loads((out / "config.json").read_text()).keys())
    mf.log(f"{name}: loss {loss.item():.6f}, logit std {logits[mask.bool()].std().item():.3f}; config keys {names}")
    return cfg


def main():
    mf.check_versions()
    os.chdir(mf.REPO)
    vocab = mf.VOCAB_SIZE
    cfgs = {n: build_model(n, FIX / "tokenizer", vocab) for n in SEEDS}
    for name in ("falcon", "falcon-new"):
        moe.build_adapter(name, cfgs[name], vocab, "all-linear", per_expert=False, arch=name)


if __name__ == "__main__":
    main()
