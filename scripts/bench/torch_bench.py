#!/usr/bin/env python3
"""PyTorch + PEFT counterpart of `loratune bench`: the same LoRA training step on the same model and batch.

One step = forward (causal-LM loss over every next-token position), backward, global grad-norm clip (1.0),
AdamW (lr 1e-4), zero_grad — what `loratune bench` times with the trainer's own step. The batch is the
same hashed token ids as `loratune bench` (so the step-0 loss matches), labels = inputs, no padding.

Versions used for the recorded numbers: torch 2.15.0, transformers 5.24.0, peft 0.21.2 (/work/venv).

    python scripts/bench/torch_bench.py --model /tmp/smollm2-hf --batch 4 --seq 256 --rank 8 --steps 5
    python scripts/bench/torch_bench.py --shape llama-3.2-1b --device cuda --dtype bf16 --seq 2048 --rank 16 \
        --targets all-linear

Prints one JSON line (like `loratune bench --json`).
"""
import argparse
import json
import resource
import statistics
import time

import torch

SHAPES = {
    # Llama-3.2-1B's config.json (random weights).
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
    # SmolLM2-135M's config.json (random weights).
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
}

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def bench_tokens(batch, seq, vocab):
    """The token ids `loratune bench` uses (src/bench.rs `bench_tokens`): a fixed integer hash."""
    m = (1 << 64) - 1
    return [[((((r * seq + i + 1) * 0x9E3779B97F4A7C15) & m) >> 33) % vocab for i in range(seq)]
            for r in range(batch)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="HF model folder (f32 weights are used as they are)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-weight model of a named shape")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated modules or all-linear")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--peak-flops", type=float, help="for MFU; default 330e9 on the CPU, 989e12 on CUDA")
    a = ap.parse_args()
    if a.peak_flops is None:
        a.peak_flops = 989e12 if a.device.startswith("cuda") else 330e9

    from transformers import AutoModelForCausalLM, LlamaConfig
    from peft import LoraConfig, get_peft_model

    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if a.model:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn)
    elif a.shape:
        cfg = LlamaConfig(**SHAPES[a.shape])
        cfg._attn_implementation = a.attn
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=a.attn)
    else:
        ap.error("--model or --shape is required")
    model.to(a.device)
    model.config.use_cache = False
    targets = "all-linear" if a.targets == "all-linear" else a.targets.split(",")
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=targets,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    # PEFT keeps the adapter in the base dtype unless told otherwise; loratune keeps LoRA factors in f32.
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    ids = torch.tensor(bench_tokens(a.batch, a.seq, vocab)).to(a.device)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    times = []
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
        print(f"step {i}: {dt:.3f}s loss {out.loss.item():.4f}", flush=True, file=__import__("sys").stderr)

    med = statistics.median(times)
    tokens = a.batch * a.seq
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    # Same FLOP model as `loratune bench`: frozen base → 4·params per token (+ attention).
    attn = 4.0 * c.num_hidden_layers * a.seq * c.num_attention_heads * hd * 2.0
    flops_tok = 4.0 * total + attn
    res = {
        "side": "torch+peft",
        "torch": torch.__version__,
        "tokens_per_step": tokens,
        "step_seconds_median": med,
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "tokens_per_second": tokens / med,
        "achieved_gflops": flops_tok * tokens / med / 1e9,
        "mfu": flops_tok * tokens / med / a.peak_flops,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "trainable_params": trainable,
        "total_params": total,
    }
    if a.device.startswith("cuda"):
        res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()
