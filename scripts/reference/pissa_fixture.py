#!/usr/bin/env python3
"""Golden fixtures for PiSSA and OLoRA initialisation (PEFT `init_lora_weights="pissa" | "olora"`) and for PEFT's
conversion of such an adapter into a plain LoRA on the original base (`save_pretrained(...,
path_initial_model_for_weight_conversion=...)`).

Writes tests/fixtures/adapters/llama-pissa/ and llama-olora/ (tiny Llama of make_fixtures.py, r=4, all linear
layers; pissa with lora_alpha 8, olora with lora_alpha 16 so that the scale s = 2 or 4 matters):
- reference.safetensors: `delta.<module>` = s·B₀·A₀ and `residual.<module>` = the base weight PEFT leaves (W − s·B₀·A₀),
  for every adapted module; `logits_trained` after a sign-independent "training" (each rank's row of A times g_i, each
  column of B times h_i: the product B·diag(h·g)·A does not depend on the SVD/QR signs); `converted.<module>` = s'·B'·A'
  of PEFT's converted adapter (rank 2r); input_ids / attention_mask of the reference batch.
- converted_config.json: the adapter_config.json PEFT writes for the converted adapter (r, lora_alpha, init).
The factors themselves are not compared (signs are ambiguous), only products.

Run with the pinned versions of make_fixtures.py (torch 2.15.0, transformers 5.24.0, peft 0.21.2):
    /tmp/pyenv/bin/python scripts/reference/pissa_fixture.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

FIX = mf.FIX
ARCH = "llama"
R = 4
# Per-rank factors of the "training" (A's rows × G, B's columns × H).
G = torch.tensor([1.5, 0.5, -1.0, 2.0])
H = torch.tensor([0.75, 1.25, 0.5, -0.5])


def build(init: str, alpha: int):
    name = f"llama-{init}"
    torch.manual_seed(mf.SEEDS["adapter"])
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    vocab = json.loads((FIX / "models" / ARCH / "config.json").read_text())["vocab_size"]
    ids, mask, _ = mf.reference_batch(vocab)
    out = FIX / "adapters" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base_dir = FIX / "models" / ARCH
    base = mf.load_model(base_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits.float().clone()
    lcfg = LoraConfig(r=R, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules="all-linear",
                      init_lora_weights=init)
    pm = get_peft_model(base, lcfg)
    pm.eval()
    tensors = {"input_ids": ids, "attention_mask": mask}
    modules = sorted(n[: -len(".lora_A")] for n, _ in pm.base_model.model.named_modules() if n.endswith(".lora_A"))
    with torch.no_grad():
        for m in modules:
            layer = pm.base_model.model.get_submodule(m)
            s = layer.scaling["default"]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            tensors[f"delta.{m}"] = (s * b @ a).float().contiguous()
            tensors[f"residual.{m}"] = layer.get_base_layer().weight.float().clone()
        logits0 = pm(input_ids=ids, attention_mask=mask).logits.float()
    v = mask.bool()
    d0 = (logits0[v] - base_logits[v]).abs().max().item()
    assert d0 < 1e-4, f"{init}: the initialised model must equal the base, got {d0}"

    with tempfile.TemporaryDirectory() as tmp:
        initial = Path(tmp) / "initial"
        pm.save_pretrained(str(initial))
        with torch.no_grad():
            for m in modules:
                layer = pm.base_model.model.get_submodule(m)
                layer.lora_A["default"].weight.mul_(G[:, None])
                layer.lora_B["default"].weight.mul_(H[None, :])
            trained = pm(input_ids=ids, attention_mask=mask).logits.float().clone()
        conv = Path(tmp) / "converted"
        pm.save_pretrained(str(conv), path_initial_model_for_weight_conversion=str(initial))
        ccfg = json.loads((conv / "adapter_config.json").read_text())
        saved = load_file(str(conv / "adapter_model.safetensors"))
        fresh = mf.load_model(base_dir)
        loaded = PeftModel.from_pretrained(fresh, str(conv))
        loaded.eval()
        with torch.no_grad():
            conv_logits = loaded(input_ids=ids, attention_mask=mask).logits.float()
    dconv = (conv_logits[v] - trained[v]).abs().max().item()
    assert dconv < 1e-4, f"{init}: PEFT's converted adapter on the original base must give the trained logits ({dconv})"
    scale = ccfg["lora_alpha"] / ccfg["r"]
    for m in modules:
        a = saved[f"base_model.model.{m}.lora_A.weight"]
        b = saved[f"base_model.model.{m}.lora_B.weight"]
        assert a.shape[0] == 2 * R, a.shape
        tensors[f"converted.{m}"] = (scale * b @ a).float().contiguous()
    tensors["logits_trained"] = trained
    if init == "pissa":
        # PEFT's SVD runs in float32; the fixture's random weights have top singular values 0.5–2 % apart, so single
        # singular vectors (which the per-rank G/H change exposes) carry f32 error amplified ~100×. The same init
        # from a float64 SVD is the tighter reference: `delta64.<module>` and `logits_trained64`.
        orig = mf.load_model(base_dir)
        with torch.no_grad():
            for m in modules:
                w = orig.get_submodule(m).weight.double()
                layer = pm.base_model.model.get_submodule(m)
                s = layer.scaling["default"]
                u, sv, vh = torch.linalg.svd(w, full_matrices=False)
                root = torch.sqrt(sv[:R] / s)
                a64, b64 = root[:, None] * vh[:R], u[:, :R] * root[None, :]
                tensors[f"delta64.{m}"] = (s * b64 @ a64).float().contiguous()
                # PEFT's conversion of the trained adapter, from the float64 factors: s·(B·A − B₀·A₀).
                trained_ba = (b64 * H.double()[None, :]) @ (a64 * G.double()[:, None])
                tensors[f"converted64.{m}"] = (s * (trained_ba - b64 @ a64)).float().contiguous()
                layer.get_base_layer().weight.copy_((w - s * b64 @ a64).float())
                layer.lora_A["default"].weight.copy_((a64 * G.double()[:, None]).float())
                layer.lora_B["default"].weight.copy_((b64 * H.double()[None, :]).float())
            tensors["logits_trained64"] = pm(input_ids=ids, attention_mask=mask).logits.float().clone()
        d64 = (tensors["logits_trained64"][v] - trained[v]).abs().max().item()
        print(f"{name}: trained logits, PEFT's f32 SVD vs a float64 SVD: max |Δ| {d64:.2e}")
    keep = {k: ccfg[k] for k in ("r", "lora_alpha", "init_lora_weights", "use_rslora")}
    (out / "converted_config.json").write_text(json.dumps(keep, indent=2, sort_keys=True) + "\n")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "reference.safetensors"),
              metadata=mf.st_metadata())
    effect = (trained[v] - base_logits[v]).abs().max().item()
    print(f"{name}: {len(modules)} modules, converted r={ccfg['r']} alpha={ccfg['lora_alpha']}, "
          f"converted-vs-trained logits {dconv:.2e}, training effect {effect:.3f}")


def main():
    import os

    os.chdir(mf.REPO)
    build("pissa", 8)
    build("olora", 16)


if __name__ == "__main__":
    main()
