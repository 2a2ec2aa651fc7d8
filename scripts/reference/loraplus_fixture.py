#!/usr/bin/env python3
"""LoRA+ parameter groups as PEFT builds them (peft.optimizers.create_loraplus_optimizer) for a LoRA on every linear
layer of the tiny Llama fixture: each trainable parameter's learning rate and weight decay.

Writes tests/fixtures/adapters/loraplus_groups.json, read by the config tests (TrainConfig::lr_multipliers).
Run with the reference venv: /tmp/pyenv/bin/python scripts/reference/loraplus_fixture.py
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]
LR, RATIO, WD = 2e-4, 16.0, 0.01

model = AutoModelForCausalLM.from_pretrained(ROOT / "tests/fixtures/models/llama")
model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO, weight_decay=WD)
names = {id(p): n for n, p in model.named_parameters()}
groups = {}
for g in opt.param_groups:
    for p in g["params"]:
        # PEFT's parameter name without the adapter name: the key of adapter_model.safetensors.
        groups[names[id(p)].replace(".default", "")] = {"lr": g["lr"], "weight_decay": g["weight_decay"]}
out = ROOT / "tests/fixtures/adapters/loraplus_groups.json"
out.write_text(json.dumps({"lr": LR, "loraplus_lr_ratio": RATIO, "weight_decay": WD, "params": groups},
                          indent=1, sort_keys=True) + "\n")
print(f"{len(groups)} parameters → {out}")
