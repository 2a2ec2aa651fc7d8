#!/usr/bin/env python3
"""Golden fixtures for Mixtral (sparse mixture of experts), from transformers + PEFT.

Writes (beside make_fixtures.py's families, with the same tokenizer, batch and conventions):
  tests/fixtures/models/mixtral/            config.json, generation_config.json, model.safetensors, tokenizer files,
                                            reference.safetensors (input_ids, attention_mask, logits, loss,
                                            logits_single, greedy_prompt, greedy_ids)
  tests/fixtures/adapters/mixtral/          PEFT adapter on the attention projections (q, k, v, o) of transformers'
                                            own MixtralForCausalLM; reference.safetensors as make_fixtures.py's
  tests/fixtures/adapters/mixtral-experts/  PEFT adapter on q_proj, v_proj, the router (`gate`) and every expert's
                                            w1 / w2 / w3, in the per-expert layout vLLM loads (see below)

The tiny model: hidden 64, 2 layers, 4 heads / 2 KV heads, head_dim 16, 4 experts of intermediate size 64, top-2,
sliding window 5 — every Mixtral switch on.

Routing margin: the choice of experts is a discontinuous function of the router logits, so a reference whose k-th
and (k+1)-th router logits nearly tie would flip experts under float rounding. The script records every router
logit of every forward it references (base model, both adapters) and draws weights from successive seeds until the
smallest gap between the k-th and (k+1)-th logit of any token in any layer is at least MIN_MARGIN; the margins are
printed and asserted.

Expert adapters: transformers >= 5 fuses the experts into 3-D tensors (`mlp.experts.gate_up_proj`), which PEFT can
only target through `target_parameters` (one LoRA over gate|up together, not vLLM's per-expert w1/w3 adapters). The
checkpoints on the Hub, transformers' own save_pretrained, and vLLM's Mixtral LoRA support all use the per-expert
names (`block_sparse_moe.experts.{e}.w1`). So the expert adapter is made by PEFT on a per-expert module tree: each
layer's fused block is replaced by `PerExpertMoe` below (transformers 4.x's MixtralSparseMoeBlock, nn.Linear
experts named as on the Hub), which the script first proves equal to transformers' fused block on the same
weights. PEFT then targets those nn.Linear modules with its ordinary LoRA.

Run with the pinned versions of make_fixtures.py (torch 2.15.0, transformers 5.24.0, peft 0.21.2).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM, MixtralConfig  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

FIX = mf.FIX
MIN_MARGIN = 0.05
AUX_COEF = 0.5  # large, so the balancing loss's share of the gradients is far above rounding
ROUTER_STD = 0.6
EXPERTS = 4
TOP_K = 2


def make_config(vocab: int) -> MixtralConfig:
    c = mf.common(vocab)
    c["intermediate_size"] = 64
    return MixtralConfig(
        **c,
        head_dim=16,
        tie_word_embeddings=False,
        sliding_window=5,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


class PerExpert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PerExpertMoe(nn.Module):
    """transformers 4.x's MixtralSparseMoeBlock (router `gate`, experts as nn.Linear w1/w2/w3)."""

    def __init__(self, fused, hidden: int, inter: int):
        super().__init__()
        self.top_k = TOP_K
        self.gate = nn.Linear(hidden, EXPERTS, bias=False)
        self.experts = nn.ModuleList([PerExpert(hidden, inter) for _ in range(EXPERTS)])
        with torch.no_grad():
            self.gate.weight.copy_(fused.gate.weight)
            for e, ex in enumerate(self.experts):
                gu = fused.experts.gate_up_proj[e]
                ex.w1.weight.copy_(gu[:inter])
                ex.w3.weight.copy_(gu[inter:])
                ex.w2.weight.copy_(fused.experts.down_proj[e])

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        RECORD.append(router_logits.detach().clone())
        w = F.softmax(router_logits, dim=1, dtype=torch.float)
        w, selected = torch.topk(w, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=EXPERTS).permute(2, 1, 0)
        for e in range(EXPERTS):
            idx, rows = torch.where(mask[e])
            y = self.experts[e](x[rows]) * w[rows, idx, None]
            out.index_add_(0, rows, y.to(x.dtype))
        return out.reshape(b, s, h)


RECORD: list[torch.Tensor] = []


def record_router(model):
    """Hooks on transformers' fused routers that append their logits to RECORD."""
    hooks = []
    for layer in model.model.layers:
        if isinstance(getattr(layer, "mlp", None), PerExpertMoe):
            continue
        gate = layer.mlp.gate
        hooks.append(gate.register_forward_hook(lambda mod, inp, out: RECORD.append(out[0].detach().clone())))
    return hooks


def margin_of(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), TOP_K + 1, dim=-1).values
    return (top[:, TOP_K - 1] - top[:, TOP_K]).min().item()


def recorded_margin() -> float:
    m = min((margin_of(r) for r in RECORD), default=float("inf"))
    RECORD.clear()
    return m


def to_per_expert(model, cfg):
    """Replace every layer's fused MoE block by PerExpertMoe, registered as `block_sparse_moe` (the Hub's name)."""
    for layer in model.model.layers:
        blk = PerExpertMoe(layer.mlp, cfg.hidden_size, cfg.intermediate_size)
        del layer.mlp
        layer.block_sparse_moe = blk
        object.__setattr__(layer, "mlp", blk)  # the decoder layer calls self.mlp; the module is named once
    return model


@torch.no_grad()
def init_weights(model, seed: int):
    """make_fixtures.py's rule (matrices ~ N(0, 0.15²), RMSNorm weights 1 + N(0, 0.1²)), applied to the fused 3-D
    expert tensors too; the router's matrix wider (ROUTER_STD) so its logits spread and the routing margin holds."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.ndim >= 2:
            std = ROUTER_STD if name.endswith("mlp.gate.weight") else 0.15
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith(".weight") and "norm" in name:
            p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
        else:
            raise RuntimeError(f"mixtral: no init rule for parameter {name} {tuple(p.shape)}")


def save_reference(out: Path, m, ids, mask, logits, loss, single):
    """`out/reference.safetensors`: make_fixtures.py's tensors plus `greedy_prompt` (the first 6 ids of row 0) and
    `greedy_ids` (10 argmax steps, each a full forward: no cache, no stop token). Returns the greedy ids."""
    prompt = ids[0:1, :6]
    seq = prompt
    with torch.no_grad():
        for _ in range(10):
            nxt = m(input_ids=seq).logits[0, -1].argmax().reshape(1, 1)
            seq = torch.cat([seq, nxt], dim=1)
    RECORD.clear()
    greedy = seq[0, prompt.shape[1]:].clone()
    save_file(
        {
            "input_ids": ids.contiguous(),
            "attention_mask": mask.contiguous(),
            "logits": logits.contiguous(),
            "loss": loss.contiguous(),
            "logits_single": single.contiguous(),
            "greedy_prompt": prompt[0].clone().contiguous(),
            "greedy_ids": greedy.contiguous(),
        },
        str(out / "reference.safetensors"),
        metadata=mf.st_metadata(),
    )
    return greedy


def forward(model, ids, mask, labels):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        single = model(input_ids=ids[1:2, : mf.ROW1_LEN]).logits
    return out.logits.float(), out.loss.float().reshape(1), single.float()


def build_base(tok_dir: Path, vocab: int):
    ids, mask, labels = mf.reference_batch(vocab)
    out = FIX / "models" / "mixtral"
    for attempt in range(100):
        seed = 108 + 1000 * attempt
        if out.exists():
            shutil.rmtree(out)
        torch.manual_seed(seed)
        cfg = make_config(vocab)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        init_weights(model, seed)
        model.eval()
        model.save_pretrained(str(out))
        m = mf.load_model(out)
        hooks = record_router(m)
        logits, loss, single = forward(m, ids, mask, labels)
        margin = recorded_margin()
        for h in hooks:
            h.remove()
        mf.log(f"mixtral seed {seed}: smallest top-{TOP_K} routing margin {margin:.4f}")
        if margin >= MIN_MARGIN:
            break
    else:
        sys.exit("no seed gave a routing margin")
    mf.copy_tokenizer(tok_dir, out)
    names = sorted(load_file(str(out / "model.safetensors")).keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in names, names
    assert "model.layers.1.block_sparse_moe.gate.weight" in names, names

    # the per-expert block is transformers' fused block
    pe = to_per_expert(mf.load_model(out), cfg)
    l2, loss2, s2 = forward(pe, ids, mask, labels)
    RECORD.clear()
    d = (l2 - logits).abs().max().item()
    mf.log(f"per-expert module tree vs transformers' fused experts: max |logit diff| {d:.3g}")
    assert d < 1e-5, d

    ml = mf.manual_loss(logits, labels).float()
    assert torch.allclose(ml, loss[0], rtol=1e-5, atol=1e-6), (ml, loss)
    pad_vs_single = (logits[1, : mf.ROW1_LEN] - single[0]).abs().max().item()
    assert pad_vs_single < 1e-4, pad_vs_single

    # sliding window and top-k both matter
    def variant(**kw):
        c = json.loads((out / "config.json").read_text())
        c.update(kw)
        alt = MixtralConfig(**{k: v for k, v in c.items() if k not in ("architectures", "model_type", "transformers_version")})
        mm = AutoModelForCausalLM.from_config(alt, attn_implementation="eager", dtype=torch.float32)
        mm.load_state_dict(m.state_dict())
        mm.eval()
        RECORD.clear()
        with torch.no_grad():
            return (mm(input_ids=ids, attention_mask=mask).logits - logits).abs().max().item()

    effects = {"no_window": variant(sliding_window=None), "top1": variant(num_experts_per_tok=1)}
    mf.log(f"switch effects (max |logit diff| when off): {effects}")
    assert all(v > 1e-3 for v in effects.values()), effects

    greedy = save_reference(out, m, ids, mask, logits, loss, single)
    mf.log(f"mixtral: loss {loss.item():.6f}, greedy {greedy.tolist()}")
    return cfg


def build_adapter(name: str, cfg, vocab: int, targets, per_expert: bool, arch: str = "mixtral"):
    """A PEFT adapter on tests/fixtures/models/<arch> with make_fixtures.py's reference tensors (grads, AdamW
    steps, clipping, merged logits); for Mixtral also the routing margin, and the balancing loss when not
    per_expert."""
    ids, mask, labels = mf.reference_batch(vocab)
    out = FIX / "adapters" / name
    for attempt in range(100):
        if out.exists():
            shutil.rmtree(out)
        seed = mf.SEEDS["adapter"] + len(name) + 1000 * attempt
        torch.manual_seed(seed)
        base = mf.load_model(Path("tests/fixtures/models") / arch)
        if per_expert:
            base = to_per_expert(base, cfg)
            # PEFT >= 0.21 rewrites Mixtral expert targets onto transformers 5's fused tensors when it sees
            # model_type "mixtral"; this tree has real per-expert nn.Linear modules, so it must not.
            base.config.model_type = "mixtral-per-expert"
        lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=targets)
        pm = get_peft_model(base, lcfg)
        pm.eval()
        g = torch.Generator().manual_seed(seed)
        named = sorted(((n, p) for n, p in pm.named_parameters() if p.requires_grad), key=lambda kv: kv[0])
        assert named and all(".lora_A." in n or ".lora_B." in n for n, _ in named)
        with torch.no_grad():
            for _, p in named:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        hooks = [] if per_expert or arch != "mixtral" else record_router(pm.base_model.model)
        RECORD.clear()
        for p in pm.parameters():
            p.grad = None
        outp = pm(input_ids=ids, attention_mask=mask, labels=labels)
        margin = recorded_margin()
        for h in hooks:
            h.remove()
        mf.log(f"adapter {name} seed {seed}: routing margin {margin:.4f}")
        if margin >= MIN_MARGIN:
            break
    else:
        sys.exit(f"{name}: no seed gave a routing margin")
    outp.loss.backward()
    pm.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    acfg = json.loads((out / "adapter_config.json").read_text())
    if isinstance(acfg["target_modules"], list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
        (out / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
    saved = load_file(str(out / "adapter_model.safetensors"))
    keys = [n.replace(".default.", ".") for n, _ in named]
    assert sorted(keys) == sorted(saved.keys()), (sorted(keys), sorted(saved.keys()))
    if per_expert:
        assert "base_model.model.model.layers.0.block_sparse_moe.experts.2.w3.lora_A.weight" in saved
        assert "base_model.model.model.layers.1.block_sparse_moe.gate.lora_B.weight" in saved
    psd = get_peft_model_state_dict(pm)
    for (n, p), k in zip(named, keys):
        assert torch.equal(saved[k], p.detach()) and torch.equal(psd[k], p.detach()), k

    logits = outp.logits.detach().float().clone()
    loss = outp.loss.detach().float().reshape(1).clone()
    params = [p for _, p in named]
    grads = [p.grad.detach().clone() for p in params]
    zero = [k for k, gr in zip(keys, grads) if gr.abs().max() == 0]
    assert not zero, f"LoRA parameters with an all-zero gradient: {zero}"
    tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits, "loss": loss}

    if not per_expert and arch == "mixtral":
        # the router's load-balancing loss (transformers' load_balancing_loss_func, as MixtralForCausalLM adds it
        # with output_router_logits): loss = CE + coef · aux, aux over both layers' routers, padding excluded
        for p in params:
            p.grad = None
        pm.base_model.model.config.output_router_logits = True
        pm.base_model.model.router_aux_loss_coef = AUX_COEF
        RECORD.clear()
        outa = pm(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        RECORD.clear()
        outa.loss.backward()
        pm.base_model.model.config.output_router_logits = False
        ce = (outa.loss - AUX_COEF * outa.aux_loss).item()
        assert abs(ce - loss.item()) < 1e-5, (ce, loss.item())
        tensors["aux.coef"] = torch.tensor([AUX_COEF])
        tensors["aux.aux_loss"] = outa.aux_loss.detach().float().reshape(1).clone()
        tensors["aux.loss"] = outa.loss.detach().float().reshape(1).clone()
        for k, p in zip(keys, params):
            tensors[f"aux.grad.{k}"] = p.grad.detach().clone()
        dg = max((p.grad - gr).abs().max().item() for p, gr in zip(params, grads))
        mf.log(f"adapter {name}: aux loss {outa.aux_loss.item():.6f} (coef {AUX_COEF}) changes the gradients by up to {dg:.3g}")
        assert dg > 1e-4, dg
        for p, gr in zip(params, grads):
            p.grad = gr.clone()

    # The LM gradients (restored above when the aux loss ran), two AdamW steps and clipping, as make_fixtures records.
    mf.record_step(params, keys, tensors, name)

    merged = pm.merge_and_unload()
    merged.eval()
    RECORD.clear()
    with torch.no_grad():
        ml_logits = merged(input_ids=ids, attention_mask=mask).logits.float()
    RECORD.clear()
    v = mask.bool()
    dmerge = (ml_logits[v] - logits[v]).abs().max().item()
    assert dmerge < 1e-4 * max(1.0, logits[v].abs().max().item()), (name, dmerge)
    tensors["merged_logits"] = ml_logits
    if per_expert:
        # the same adapter file, loaded by PEFT onto transformers' own (fused) Mixtral: PEFT converts the per-expert
        # LoRA weights (w1|w3 → a block-diagonal LoRA on gate_up_proj, w2 → down_proj, gate → the router).
        from peft import PeftModel

        fused = PeftModel.from_pretrained(mf.load_model(Path("tests/fixtures/models") / "mixtral"), str(out))
        fused.eval()
        with torch.no_grad():
            fl = fused(input_ids=ids, attention_mask=mask).logits.float()
        RECORD.clear()
        dfused = (fl[v] - logits[v]).abs().max().item()
        mf.log(f"adapter {name}: loaded by PEFT onto transformers' fused experts, max |logit diff| {dfused:.3g}")
        assert dfused < 1e-4, dfused
    base_ref = load_file(str(FIX / "models" / arch / "reference.safetensors"))
    dbase = (logits[v] - base_ref["logits"][v]).abs().max().item()
    assert dbase > 0.1, f"{name}: adapter barely changes logits ({dbase})"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "reference.safetensors"),
              metadata=mf.st_metadata())
    mf.log(f"adapter {name}: {len(keys)} tensors, loss {loss.item():.6f}, clip norm {tensors['clip_total_norm'].item():.4g}, "
           f"merged-unmerged {dmerge:.3g}, adapter-base {dbase:.3g}")


def main():
    mf.check_versions()
    import os

    os.chdir(mf.REPO)
    tok_dir = FIX / "tokenizer"
    vocab = mf.VOCAB_SIZE
    cfg = build_base(tok_dir, vocab)
    build_adapter("mixtral", cfg, vocab, ["q_proj", "k_proj", "v_proj", "o_proj"], per_expert=False)
    build_adapter("mixtral-experts", cfg, vocab, ["q_proj", "v_proj", "gate", "w1", "w2", "w3"], per_expert=True)


if __name__ == "__main__":
    main()
