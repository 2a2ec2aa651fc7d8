#!/usr/bin/env python3
"""A pre-quantized bitsandbytes 4-bit (NF4 + double quantization) checkpoint, saved by transformers, with reference
logits: the end-to-end check of loratune's bnb loader (tests/it/bnb.rs).

It quantizes the tiny llama fixture (tests/fixtures/models/llama, made by make_fixtures.py) exactly as a Hub
`…-bnb-4bit` checkpoint is made:

    AutoModelForCausalLM.from_pretrained(llama, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
        dtype=torch.float32, attn_implementation="eager").save_pretrained(out)

on the CPU (bitsandbytes >= 0.48 quantizes and dequantizes on the CPU; no GPU is touched), then reloads the saved
folder (the pre-quantized path) and records its logits on the llama fixture's reference batch.

Environment (the venv of nf4_fixture.py plus transformers; accelerate is required by transformers' bnb quantizer):
    /tmp/bnbenv/bin/pip install transformers==5.24.0 safetensors accelerate
    /tmp/bnbenv/bin/python scripts/reference/bnb4bit_fixture.py
Generated with torch 2.15.0, bitsandbytes 0.50.2, transformers 5.24.0, accelerate 1.16.0, safetensors 0.8.0
(the versions are printed). CPU, float32, eager attention, one thread; byte-identical on re-run.

Writes tests/fixtures/models/llama-bnb4bit/ (described in tests/fixtures/README.md):
  config.json, generation_config.json   as save_pretrained wrote them (config.json has `quantization_config`)
  model.safetensors                     embed_tokens + norms f32; every decoder linear as
                                        `W` (U8 [numel/2, 1]) + `W.absmax` (U8) + `W.quant_map` (F32 [16])
                                        + `W.nested_absmax` (F32) + `W.nested_quant_map` (F32 [256])
                                        + `W.quant_state.bitsandbytes__nf4` (U8 JSON); lm_head tied (not stored)
  tokenizer.json, tokenizer_config.json copied from models/llama
  reference.safetensors                 input_ids, attention_mask (the llama reference batch), logits, loss,
                                        logits_single of the reloaded 4-bit model
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import accelerate  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "tests" / "fixtures" / "models" / "llama"
OUT = REPO / "tests" / "fixtures" / "models" / "llama-bnb4bit"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"]
ROW1_LEN = 11
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BNB_SUFFIXES = [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"]


def log(*a):
    print(*a, flush=True)


def bnb_config():
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def forward(model, ids, mask, labels):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        single = model(input_ids=ids[1:2, :ROW1_LEN]).logits
    return out.logits.float(), out.loss.float().reshape(1), single.float()


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    # One thread: the double-quantization offset is torch.mean over the absmax values, whose summation order
    # depends on the thread count for long tensors (not at this size, but keep every run identical).
    torch.set_num_threads(1)
    vers = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bitsandbytes": bnb.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
    }
    log("versions:", vers)

    ref = load_file(str(SRC / "reference.safetensors"))
    ids, mask = ref["input_ids"], ref["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    valid = mask.bool()

    # 1. quantize the f32 llama fixture while loading, as a user making a bnb-4bit checkpoint does
    q = AutoModelForCausalLM.from_pretrained(
        str(SRC), quantization_config=bnb_config(), dtype=torch.float32, attn_implementation="eager"
    )
    q.eval()
    n4 = 0
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            assert mod.weight.bnb_quantized and qs.quant_type == "nf4" and qs.nested and qs.blocksize == 64, name
            n4 += 1
    assert n4 == 2 * len(LINEARS), f"{n4} Linear4bit modules"
    assert not isinstance(q.lm_head, bnb.nn.Linear4bit), "lm_head must stay dense"
    logits_mem, _, _ = forward(q, ids, mask, labels)

    if OUT.exists():
        shutil.rmtree(OUT)
    q.save_pretrained(str(OUT))
    for f in TOKENIZER_FILES:
        shutil.copyfile(SRC / f, OUT / f)

    # 2. what landed on disk: the Hub layout
    sd = load_file(str(OUT / "model.safetensors"))
    f32 = load_file(str(SRC / "model.safetensors"))
    want = {"model.embed_tokens.weight", "model.norm.weight"}
    worst_w = 0.0
    for i in range(2):
        want |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        for lin in LINEARS:
            w = f"model.layers.{i}.{lin}.weight"
            want |= {w} | {w + s for s in BNB_SUFFIXES}
            assert sd[w].dtype == torch.uint8 and sd[w].shape[1] == 1, (w, sd[w].dtype, sd[w].shape)
            state = json.loads(bytes(sd[w + ".quant_state.bitsandbytes__nf4"].tolist()).decode())
            assert state["quant_type"] == "nf4" and state["blocksize"] == 64, state
            assert state["shape"] == list(f32[w].shape), (state, f32[w].shape)
            # dequantize through bitsandbytes from the saved tensors: the NF4 error of this weight
            qs = F.QuantState.from_dict({k[len(w) + 1:]: v for k, v in sd.items() if k.startswith(w + ".")},
                                        device="cpu")
            dq = F.dequantize_4bit(sd[w], qs)
            assert dq.dtype == torch.float32 and dq.shape == f32[w].shape, (dq.dtype, dq.shape)
            worst_w = max(worst_w, (dq - f32[w]).abs().max().item())
    assert set(sd) == want, sorted(set(sd) ^ want)
    for k in sd:
        if k in f32:
            if sd[k].dtype == torch.float32:
                assert torch.equal(sd[k], f32[k]), f"{k}: dense tensor changed"
    cfg = json.loads((OUT / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True and cfg["tie_word_embeddings"] is True
    log("quantization_config:", json.dumps(qc, sort_keys=True))
    log(f"{len(sd)} tensors in model.safetensors; max |dequant(W) - W_f32| over the NF4 weights = {worst_w:.4g}")

    # 3. the reference comes from the files on disk (the pre-quantized loading path)
    m = AutoModelForCausalLM.from_pretrained(str(OUT), dtype=torch.float32, attn_implementation="eager")
    m.eval()
    assert sum(isinstance(x, bnb.nn.Linear4bit) for x in m.modules()) == 2 * len(LINEARS)
    logits, loss, single = forward(m, ids, mask, labels)
    assert torch.equal(logits[valid], logits_mem[valid]), "reloaded checkpoint gives other logits"
    assert torch.isfinite(logits).all()
    d_pad = (logits[1, :ROW1_LEN] - single[0]).abs().max().item()
    assert d_pad < 1e-4, d_pad
    d_f32 = (logits[valid] - ref["logits"][valid]).abs().max().item()
    assert d_f32 > 1e-2, f"NF4 barely changes the logits ({d_f32}): the test could not tell NF4 from f32"
    log(
        f"logits: std {logits[valid].std().item():.4f}, max abs {logits[valid].abs().max().item():.3f}, "
        f"loss {loss.item():.6f} (f32 llama {ref['loss'].item():.6f}); "
        f"max |logits(NF4) - logits(f32 llama)| = {d_f32:.4g}; padded row vs alone {d_pad:.2g}"
    )
    save_file(
        {
            "input_ids": ids.contiguous(),
            "attention_mask": mask.contiguous(),
            "logits": logits.contiguous(),
            "loss": loss.contiguous(),
            "logits_single": single.contiguous(),
        },
        str(OUT / "reference.safetensors"),
        metadata={"format": "pt"},
    )

    digest = hashlib.sha256()
    total = 0
    for p in sorted(OUT.iterdir()):
        os.chmod(p, 0o644)  # safetensors writes model.safetensors with mode 0600
        data = p.read_bytes()
        total += len(data)
        digest.update(p.name.encode())
        digest.update(data)
        log(f"{len(data):>10}  {p.relative_to(REPO)}")
    log(f"total {total} bytes; sha256 {digest.hexdigest()}")


if __name__ == "__main__":
    main()
