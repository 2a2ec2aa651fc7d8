#!/usr/bin/env python3
"""Load loratune's exports with the reference libraries and record their logits.

For each tests/fixtures/loratune_export/<arch>/ (written by loratune, see tests/it/export.rs):
  * adapter/  -> PEFT 0.21.2 PeftModel.from_pretrained on the fixture base tests/fixtures/models/<arch>
  * merged/   -> transformers 5.24.0 AutoModelForCausalLM.from_pretrained
and writes external_logits.safetensors {peft_logits, transformers_merged_logits} for the fixture's reference
batch, after checking both against loratune's own logits (loratune_logits.safetensors) within 1e-4.

Run: /work/venv/bin/python scripts/reference/check_loratune_exports.py   (CPU, float32, eager attention)
"""
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
FX = ROOT / "tests" / "fixtures"


def real_max_diff(a, b, mask):
    m = mask.bool()
    return (a[m] - b[m]).abs().max().item()


def main():
    torch.manual_seed(0)
    ok = True
    for d in sorted((FX / "loratune_export").iterdir()):
        arch = d.name
        ref = load_file(str(FX / "models" / arch / "reference.safetensors"))
        ids, mask = ref["input_ids"], ref["attention_mask"]
        ours = load_file(str(d / "loratune_logits.safetensors"))["logits"]
        base = AutoModelForCausalLM.from_pretrained(str(FX / "models" / arch), dtype=torch.float32,
                                                    attn_implementation="eager")
        peft_model = PeftModel.from_pretrained(base, str(d / "adapter"))
        peft_model.eval()
        with torch.no_grad():
            peft_logits = peft_model(input_ids=ids, attention_mask=mask).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(str(d / "merged"), dtype=torch.float32,
                                                      attn_implementation="eager")
        merged.eval()
        with torch.no_grad():
            merged_logits = merged(input_ids=ids, attention_mask=mask).logits.float()
        dp = real_max_diff(peft_logits, ours, mask)
        dm = real_max_diff(merged_logits, ours, mask)
        print(f"{arch}: PEFT on loratune adapter vs loratune {dp:.3e}; transformers on loratune merged folder vs loratune {dm:.3e}")
        ok &= dp <= 1e-4 and dm <= 1e-4
        save_file({"peft_logits": peft_logits.contiguous(), "transformers_merged_logits": merged_logits.contiguous()},
                  str(d / "external_logits.safetensors"), metadata={"format": "pt"})
    if not ok:
        sys.exit("mismatch above 1e-4")


if __name__ == "__main__":
    main()
