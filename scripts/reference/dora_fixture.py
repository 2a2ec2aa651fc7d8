#!/usr/bin/env python3
"""Golden fixtures for DoRA (PEFT `use_dora=True`), beside make_fixtures.py's LoRA adapters and in their format.

Writes tests/fixtures/adapters/llama-dora/: adapter_config.json (use_dora), adapter_model.safetensors (lora_A, lora_B
and each module's `lora_magnitude_vector`), reference.safetensors with the same entries as make_fixtures.py's
adapters (logits, loss, grad.<key> of every A, B and magnitude, step1 / step1wd after one AdamW step, clip.<key>,
clip_total_norm, merged_logits from PEFT's merge_and_unload) plus `merged.<module>.weight` for three modules (PEFT's
merged weight: the row norms of W + s·B·A rescaled to the magnitude).

The factors are N(0, 0.2²) as in make_fixtures.py, and the magnitudes are PEFT's initial ones (the row norms of
W + s·B·A) times 1 + N(0, 0.1²), so that every term of DoRA's forward and gradient is exercised. Dropout is 0 (PEFT's
DoRA with dropout applies the base weight to the dropped input, which loratune does too; a Rust test checks that
path against the formula).

Run with the pinned versions of make_fixtures.py (torch 2.15.0, transformers 5.24.0, peft 0.21.2):
    /tmp/pyenv/bin/python scripts/reference/dora_fixture.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

FIX = mf.FIX
NAME, ARCH = "llama-dora", "llama"
MERGED = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]


def main():
    torch.manual_seed(mf.SEEDS["adapter"])
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    import os

    os.chdir(mf.REPO)
    vocab = json.loads((FIX / "models" / ARCH / "config.json").read_text())["vocab_size"]
    ids, mask, labels = mf.reference_batch(vocab)
    out = FIX / "adapters" / NAME
    shutil.rmtree(out, ignore_errors=True)
    base = mf.load_model(Path("tests/fixtures/models") / ARCH)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules="all-linear",
                      use_dora=True)
    pm = get_peft_model(base, lcfg)
    pm.eval()
    g = torch.Generator().manual_seed(mf.SEEDS["adapter"] + len(NAME))
    named = sorted(((n, p) for n, p in pm.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    with torch.no_grad():
        for n, p in named:
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        # PEFT's initial magnitude for these factors (the row norms of W + s·B·A), then perturbed.
        for n, p in named:
            if "lora_magnitude_vector" in n:
                mod = pm.get_submodule(n.split(".lora_magnitude_vector")[0])
                w = mod.get_base_layer().weight
                delta = mod.get_delta_weight("default")
                norm = torch.linalg.norm(w + delta, dim=1)
                p.copy_(norm * (1 + 0.1 * torch.randn(p.shape, generator=g)))
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    acfg = json.loads((out / "adapter_config.json").read_text())
    if isinstance(acfg["target_modules"], list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    assert acfg["use_dora"] is True
    saved = load_file(str(out / "adapter_model.safetensors"))

    def peft_key(n: str) -> str:
        # lora_A/B: `….lora_A.default.weight` → `….lora_A.weight`; the magnitude is saved without `.weight`.
        k = n.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default", "")
        assert k in saved, (n, k, sorted(saved)[:6])
        return k

    keys = [peft_key(n) for n, _ in named]
    assert sorted(keys) == sorted(saved.keys()), (sorted(keys)[:5], sorted(saved.keys())[:5])
    print("magnitude key example:", [k for k in keys if "magnitude" in k][0], saved[[k for k in keys if "magnitude" in k][0]].shape)

    for p in pm.parameters():
        p.grad = None
    outp = pm(input_ids=ids, attention_mask=mask, labels=labels)
    outp.loss.backward()
    logits = outp.logits.detach().float().clone()
    loss = outp.loss.detach().float().reshape(1).clone()
    tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits, "loss": loss}
    mf.record_step([p for _, p in named], keys, tensors, "llama-dora")

    merged = pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        ml_logits = merged(input_ids=ids, attention_mask=mask).logits.float()
        for m in MERGED:
            tensors[f"merged.{m}.weight"] = merged.get_submodule(m).weight.detach().float().clone()
    v = mask.bool()
    dmerge = (ml_logits[v] - logits[v]).abs().max().item()
    assert dmerge < 1e-4 * max(1.0, logits[v].abs().max().item()), dmerge
    tensors["merged_logits"] = ml_logits
    base_ref = load_file(str(FIX / "models" / ARCH / "reference.safetensors"))
    dbase = (logits[v] - base_ref["logits"][v]).abs().max().item()
    assert dbase > 0.1, dbase
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "reference.safetensors"),
              metadata=mf.st_metadata())
    total = tensors["clip_total_norm"]
    print(f"{NAME}: {len(keys)} tensors, loss {loss.item():.5f}, clip norm {total.item():.4f}, "
          f"merge vs unmerged {dmerge:.2e}, adapter effect {dbase:.3f}")


if __name__ == "__main__":
    main()
