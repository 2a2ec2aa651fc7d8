#!/usr/bin/env python3
"""Golden fixtures for PEFT's `modules_to_save` (Axolotl's `lora_modules_to_save: [embed_tokens, lm_head]`): the
embedding and lm_head trained in full, besides LoRA on q_proj / v_proj.

Writes tests/fixtures/adapters/llama-saved/ (tied embeddings: PEFT trains two independent copies) and
mistral-saved/ (untied), each with the adapter PEFT saves (adapter_config.json + adapter_model.safetensors, whose
whole-module keys are `base_model.model.model.embed_tokens.weight` and `base_model.model.lm_head.weight`) and
reference.safetensors in the layout of make_fixtures.py's adapters: logits, loss, `grad.<key>` for every trained
tensor (LoRA factors and the two copies), one AdamW step without / with weight decay (`step1.*`, `step1wd.*`),
the clipped gradients, and `merged_logits` of PEFT's merge_and_unload. The LoRA factors and both copies are set away
from their start (seeded noise) so that every tensor matters.

Run with the pinned versions of make_fixtures.py (torch 2.15.0, transformers 5.24.0, peft 0.21.2):
    /tmp/pyenv/bin/python scripts/reference/modules_to_save_fixture.py
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
from peft.utils import get_peft_model_state_dict  # noqa: E402

FIX = mf.FIX


def build(name: str, arch: str) -> dict:
    torch.manual_seed(mf.SEEDS["adapter"])
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out = FIX / "adapters" / name
    shutil.rmtree(out, ignore_errors=True)
    vocab = json.loads((FIX / "models" / arch / "config.json").read_text())["vocab_size"]
    ids, mask, labels = mf.reference_batch(vocab)
    base = mf.load_model(Path("tests/fixtures/models") / arch)
    tied = bool(base.config.tie_word_embeddings)
    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"])
    pm = get_peft_model(base, lcfg)
    pm.eval()
    named = sorted(((n, p) for n, p in pm.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
    # LoRA factors ~ N(0, 0.2²); the copies moved by N(0, 0.02²) from the base weights (so that the saved values
    # are not the base's, and the two tied copies differ).
    g = torch.Generator().manual_seed(mf.SEEDS["adapter"] + len(name))
    with torch.no_grad():
        for n, p in named:
            if ".modules_to_save." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    copies = [n for n, _ in named if ".modules_to_save." in n]
    assert len(copies) == 2, copies
    if tied:
        emb = pm.base_model.model.model.embed_tokens.modules_to_save["default"].weight
        head = pm.base_model.model.lm_head.modules_to_save["default"].weight
        assert emb.data_ptr() != head.data_ptr(), "PEFT should train two independent copies of a tied matrix"

    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    acfg = json.loads((out / "adapter_config.json").read_text())
    for k in ("target_modules", "modules_to_save"):
        acfg[k] = sorted(acfg[k])
    (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    saved = load_file(str(out / "adapter_model.safetensors"))
    psd = get_peft_model_state_dict(pm)

    def peft_key(n: str) -> str:
        k = n.replace(".modules_to_save.default", "").replace(".default.", ".")
        assert k in saved, (n, k, sorted(saved))
        return k

    keys = [peft_key(n) for n, _ in named]
    assert sorted(keys) == sorted(saved), (sorted(keys), sorted(saved))
    for (n, p), k in zip(named, keys):
        assert torch.equal(saved[k], p.detach()) and torch.equal(psd[k], p.detach()), k
    assert "base_model.model.model.embed_tokens.weight" in saved and "base_model.model.lm_head.weight" in saved

    for p in pm.parameters():
        p.grad = None
    outp = pm(input_ids=ids, attention_mask=mask, labels=labels)
    outp.loss.backward()
    logits = outp.logits.detach().float().clone()
    loss = outp.loss.detach().float().reshape(1).clone()
    tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits, "loss": loss}
    mf.record_step([p for _, p in named], keys, tensors, name)

    merged = pm.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        ml = merged(input_ids=ids, attention_mask=mask).logits.float()
    v = mask.bool()
    dmerge = (ml[v] - logits[v]).abs().max().item()
    assert dmerge < 1e-4, (name, dmerge)
    tensors["merged_logits"] = ml
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "reference.safetensors"),
              metadata=mf.st_metadata())
    summary = {"tied": tied, "tensors": len(keys), "loss": loss.item(), "merge_vs_unmerged": dmerge}
    mf.log(f"adapter {name}: {summary}")
    return summary


def main():
    mf.check_versions()
    for name, arch in (("llama-saved", "llama"), ("mistral-saved", "mistral")):
        build(name, arch)


if __name__ == "__main__":
    main()
