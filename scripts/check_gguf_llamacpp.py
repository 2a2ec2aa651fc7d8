#!/usr/bin/env python3
"""External check of loratune's GGUF exports against llama.cpp (not run in CI).

Run through scripts/check_gguf_llamacpp.sh, which builds loratune, makes a venv with llama-cpp-python 0.3.36 (it
compiles llama.cpp from source), gguf 0.19.0 and safetensors, fetches SmolLM2 and calls this script.

What it does, on SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct.Q4_1.gguf):
  1. writes two seeded random PEFT adapters for SmolLM2 (q,k,v,o,gate,up,down, all 30 layers): `std`
     (r 8, lora_alpha 16) and `rslora` (r 16, lora_alpha 8, use_rslora) — numpy + safetensors, PEFT layout;
  2. exports with `loratune export`: merged GGUFs of the base (f32, f16, bf16, q8_0, q4_0), merged GGUFs with
     each adapter (f32, q8_0), GGUF adapters of both (f32), and an Ollama folder;
  3. greedy decoding of the chat prompt "What is the capital of France? Answer in one sentence.":
     loratune (`loratune generate --json`, KV-cached decoder) vs llama.cpp (llama-cpp-python, same prompt ids,
     temp 0 / top_k 1), for every exported file, and for llama.cpp's base + GGUF adapter (`lora_path`) vs
     loratune's base + PEFT adapter; also checks that llama.cpp tokenizes the rendered prompt into the same ids
     and applies the GGUF's chat template into the same text;
  4. reads every metadata key and tensor of every exported GGUF with the `gguf` package's GGUFReader.
  5. Mixtral (tests/fixtures/models/mixtral + adapters/mixtral-experts) and Falcon (models/falcon +
     adapters/falcon): greedy ids of llama.cpp and loratune on loratune's f32 GGUF exports (base; merged with the
     adapter), and llama.cpp's base + GGUF adapter against its merged file. `CHECKS=families` runs only this part.
Prints a table and exits non-zero when a required comparison fails. Required: identical greedy ids for every
f32/f16/bf16 file and for base + GGUF adapter (f32); byte-identical Q8_0/Q4_0 tensors vs llama.cpp's own
quantiser; llama.cpp's tokenization and chat template. Informative only ([info]): greedy ids on Q8_0/Q4_0 files
and quantised adapters — llama.cpp multiplies quantised weights with activations it quantises to 8 bits, loratune
with f32 activations, so near-tied tokens can legitimately go different ways.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORATUNE = os.environ.get("LORATUNE_BIN", os.path.join(ROOT, "target", "release", "loratune"))
BASE = os.environ.get("LORATUNE_SMOLLM2_GGUF", os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
PROMPT = "What is the capital of France? Answer in one sentence."
MAX_NEW = int(os.environ.get("MAX_NEW_TOKENS", "40"))

# SmolLM2-135M shapes: hidden 576, 9 heads × 64, 3 kv heads, intermediate 1536, 30 layers.
MODULES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (576, 192),
    "self_attn.v_proj": (576, 192),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (576, 1536),
    "mlp.up_proj": (576, 1536),
    "mlp.down_proj": (1536, 576),
}


def make_adapter(path, r, alpha, rslora, seed, b_std):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(30):
        for mod, (fin, fout) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((r, fin)) / np.sqrt(fin)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fout, r)) * b_std).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(m.split(".")[1] for m in MODULES), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": rslora, "use_dora": False, "modules_to_save": None, "base_model_name_or_path": BASE,
        "init_lora_weights": True, "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{p.stderr}")
    return p


def loratune_generate(model, adapter=None):
    cmd = [LORATUNE, "generate", "--model", model, "--chat", "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW),
           "--json"]
    if adapter:
        cmd += ["--adapter", adapter]
    return json.loads(run(cmd).stdout)


_llms = {}


def llama(model, lora=None):
    from llama_cpp import Llama

    key = (model, lora)
    if key not in _llms:
        kw = dict(model_path=model, n_ctx=512, n_threads=os.cpu_count() or 2, verbose=False, seed=0)
        if lora:
            kw["lora_path"] = lora
        _llms.clear()
        _llms[key] = Llama(**kw)
    return _llms[key]


def llama_generate(model, prompt_ids, stop_ids, lora=None):
    llm = llama(model, lora)
    llm.reset()
    out = []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if tok in stop_ids or llm.token_eos() == tok or len(out) >= MAX_NEW:
            break
    return out, llm.detokenize(out).decode("utf-8", errors="replace")


def gguf_read_all(path):
    import gguf

    r = gguf.GGUFReader(path)
    n = 0
    for k, field in r.fields.items():
        field.contents()  # decodes every value (arrays included)
        n += 1
    for t in r.tensors:
        assert t.data.nbytes == t.n_bytes, t.name
    return n, len(r.tensors), r.fields["general.architecture"].contents()


FIXTURES = os.path.join(ROOT, "tests", "fixtures")
# (label, fixture model, fixture adapter): Mixtral with the router + every-expert adapter (stacked ffn_*_exps), and
# Falcon-7B's layout (llama.cpp's `falcon`, query_key_value regrouped) with an all-linear adapter.
FAMILIES = [("mixtral", "mixtral", "mixtral-experts"), ("falcon", "falcon", "falcon")]


def check_family(label, model, adapter):
    """A tiny fixture family (2 layers; Mixtral: 4 experts, top-2, and llama.cpp's `llama` has no sliding window, so
    both sides run the GGUF without one). Required: llama.cpp's greedy ids equal loratune's on loratune's f32 exports
    of the base and of the base merged with the adapter. And llama.cpp's base + the GGUF adapter against llama.cpp on
    the merged file, as logits over 13 positions: these random tiny models have near-tied logits and llama.cpp's
    adapter path (W·x + s·B·A·x) rounds differently from its merged weights (~1e-2 here, for attention-only
    adapters too), so greedy ids are not a fair test there; the difference must be ≤ 0.05 while the adapter moves
    the logits by ≥ 1 (so an ignored adapter tensor fails). Returns (ok, rows)."""
    import numpy as np

    model, adapter = os.path.join(FIXTURES, "models", model), os.path.join(FIXTURES, "adapters", adapter)
    work = tempfile.mkdtemp(prefix=f"loratune-llamacpp-{label}-")
    out = {}
    for name, args in [("base", []), ("merged", ["--adapter", adapter]), ("adapter", ["--adapter", adapter])]:
        fmt = "gguf-adapter" if name == "adapter" else "gguf"
        out[name] = os.path.join(work, f"{name}.gguf")
        run([LORATUNE, "export", "--model", model, *args, "--format", fmt, "--out", out[name]])
    rows, ok = [], True
    base = loratune_generate(out["base"])
    merged = loratune_generate(out["merged"])
    for case, lt, path in [(f"{label} base f32", base, out["base"]),
                           (f"{label} merged f32 ({os.path.basename(adapter)} adapter)", merged, out["merged"])]:
        ids, text = llama_generate(path, lt["prompt_ids"], set(lt.get("stop_ids", [])) | {2})
        if lt.get("stop_reason") == "context":
            # loratune stops at the model's 128 positions; llama.cpp's context here is longer
            ids = ids[: len(lt["generated_ids"])]
        same = ids == lt["generated_ids"]
        ok &= same
        rows.append((case, same, lt["text"], text))

    from llama_cpp import Llama

    seq = [1, 5, 9, 2, 33, 60, 7, 100, 63, 17, 200, 301, 44]

    def logits(path, lora=None):
        kw = dict(model_path=path, n_ctx=128, n_threads=os.cpu_count() or 2, verbose=False, logits_all=True,
                  seed=0)
        if lora:
            kw["lora_path"] = lora
        llm = Llama(**kw)
        llm.reset()
        llm.eval(seq)
        return np.array(llm.scores[: len(seq)])

    b, m, a = logits(out["base"]), logits(out["merged"]), logits(out["base"], out["adapter"])
    effect, diff = float(np.abs(m - b).max()), float(np.abs(a - m).max())
    good = diff <= 0.05 and effect >= 1.0
    ok &= good
    print(f"{label} in llama.cpp: base + GGUF adapter vs merged file: max |Δlogit| {diff:.4f} "
          f"(the adapter itself moves the logits by {effect:.3f}): {good}")
    return ok, rows


def main():
    if os.environ.get("CHECKS") == "families":
        ok, rows = True, []
        for fam in FAMILIES:
            fam_ok, fam_rows = check_family(*fam)
            ok &= fam_ok
            rows += fam_rows
        for label, same, a, b in rows:
            print(f"{label:70s} {str(same):6s} {a!r} | {b!r}")
        print("\nALL MATCH" if ok else "\nMISMATCH")
        sys.exit(0 if ok else 1)
    if not os.path.isfile(BASE):
        sys.exit(f"{BASE} missing: run scripts/fetch-smollm2.sh")
    import llama_cpp

    work = tempfile.mkdtemp(prefix="loratune-llamacpp-")
    print(f"llama-cpp-python {llama_cpp.__version__}, work dir {work}")
    ad_std, ad_rs = os.path.join(work, "adapter-std"), os.path.join(work, "adapter-rslora")
    # Magnitudes chosen so that each adapter changes SmolLM2's greedy answer (a no-op adapter would prove nothing).
    make_adapter(ad_std, r=8, alpha=16, rslora=False, seed=1, b_std=0.12)
    make_adapter(ad_rs, r=16, alpha=8, rslora=True, seed=2, b_std=0.07)

    exports = {}

    def export(name, *args):
        out = os.path.join(work, name)
        run([LORATUNE, "export", "--model", BASE, *args, "--out", out])
        exports[name] = out
        return out

    for t in ["f32", "f16", "bf16", "q8_0", "q4_0"]:
        export(f"base-{t}.gguf", "--format", "gguf", "--type", t)
    for ad_name, ad in [("std", ad_std), ("rslora", ad_rs)]:
        for t in ["f32", "q8_0"]:
            export(f"merged-{ad_name}-{t}.gguf", "--adapter", ad, "--format", "gguf", "--type", t)
        export(f"adapter-{ad_name}.gguf", "--adapter", ad, "--format", "gguf-adapter")
    export("adapter-std-q8_0.gguf", "--adapter", ad_std, "--format", "gguf-adapter", "--type", "q8_0")
    sep_dir = os.path.join(work, "ollama-separate")
    run([LORATUNE, "export", "--model", BASE, "--adapter", ad_std, "--format", "ollama", "--separate-adapter",
         "--type", "f16", "--out", sep_dir])
    exports["ollama-separate/base.gguf"] = os.path.join(sep_dir, "base.gguf")
    exports["ollama-separate/adapter.gguf"] = os.path.join(sep_dir, "adapter.gguf")
    ollama_dir = os.path.join(work, "ollama")
    cmd = run([LORATUNE, "export", "--model", BASE, "--adapter", ad_std, "--format", "ollama", "--type", "q8_0",
               "--out", ollama_dir, "--name", "smollm2-test"]).stdout.strip()
    exports["ollama/model.gguf"] = os.path.join(ollama_dir, "model.gguf")

    rows = []
    ok = True

    def compare(label, lt, model, lora=None, required=True):
        nonlocal ok
        stop = set(lt.get("stop_ids", [])) | {2}
        ids, text = llama_generate(model, lt["prompt_ids"], stop, lora)
        same = ids == lt["generated_ids"]
        if required:
            ok &= same
        rows.append((label + ("" if required else " [info]"), same, lt["text"], text))

    ref = loratune_generate(BASE)
    # llama.cpp's tokenizer and chat template on the original file give loratune's prompt.
    llm = llama(BASE)
    tok_ids = llm.tokenize(ref["prompt"].encode(), add_bos=False, special=True)
    tok_same = tok_ids == ref["prompt_ids"]
    ok &= tok_same
    print(f"llama.cpp tokenizes loratune's rendered prompt into the same {len(tok_ids)} ids: {tok_same}")
    compare("original Q4_1 (no export)", ref, BASE)
    for t in ["f32", "f16", "bf16", "q8_0", "q4_0"]:
        p = exports[f"base-{t}.gguf"]
        compare(f"export {t}", loratune_generate(p), p, required=t in ("f32", "f16", "bf16"))
    for ad_name, ad in [("std", ad_std), ("rslora", ad_rs)]:
        lt = loratune_generate(BASE, ad)
        changed = lt["generated_ids"] != ref["generated_ids"]
        print(f"adapter {ad_name} changes loratune's completion: {changed} -> {lt['text']!r}")
        compare(f"merged {ad_name} f32 vs loratune base+adapter", lt, exports[f"merged-{ad_name}-f32.gguf"])
        compare(f"base f32 + GGUF adapter {ad_name} vs loratune base+adapter", lt, exports["base-f32.gguf"],
                exports[f"adapter-{ad_name}.gguf"])
        p = exports[f"merged-{ad_name}-q8_0.gguf"]
        compare(f"merged {ad_name} q8_0 (both read the file)", loratune_generate(p), p, required=False)
    p = exports["ollama/model.gguf"]
    compare("ollama folder model.gguf (q8_0, std adapter)", loratune_generate(p), p, required=False)
    lt_std = loratune_generate(BASE, ad_std)
    compare("ollama-separate base f16 + adapter f32 vs loratune base+adapter", lt_std,
            exports["ollama-separate/base.gguf"], exports["ollama-separate/adapter.gguf"], required=False)
    compare("base f32 + GGUF adapter std q8_0 vs loratune base+adapter (f32)", lt_std, exports["base-f32.gguf"],
            exports["adapter-std-q8_0.gguf"], required=False)

    # llama.cpp's own quantiser (llama_model_quantize, no imatrix) on loratune's f32 export must give the same
    # bytes as loratune's q8_0 / q4_0 exports for every tensor both store in the same type.
    import gguf

    for ftype, t in [(7, "q8_0"), (2, "q4_0")]:
        q = os.path.join(work, f"llama-quantize-{t}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = os.cpu_count() or 2
        rc = llama_cpp.llama_model_quantize(exports["base-f32.gguf"].encode(), q.encode(), params)
        if rc != 0:
            ok = False
            print(f"llama_model_quantize {t} failed: {rc}")
            continue
        mine = {x.name: x for x in gguf.GGUFReader(exports[f"base-{t}.gguf"]).tensors}
        theirs = {x.name: x for x in gguf.GGUFReader(q).tensors}
        same = differ = other_type = 0
        for name, x in theirs.items():
            y = mine[name]
            if x.tensor_type != y.tensor_type:
                other_type += 1
            elif bytes(x.data.tobytes()) == bytes(y.data.tobytes()):
                same += 1
            else:
                differ += 1
                print(f"  {t}: {name} ({x.tensor_type.name}) differs from llama-quantize")
        ok &= differ == 0 and same > 0
        print(f"llama-quantize {t} vs loratune {t}: {same} tensors byte-identical, {differ} differ, "
              f"{other_type} stored in another type by llama-quantize")

    # llama.cpp's own chat-template handling of an exported file.
    llm = llama(exports["base-f32.gguf"])
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": PROMPT}], temperature=0.0, top_k=1,
                                      max_tokens=MAX_NEW)
    chat_text = chat["choices"][0]["message"]["content"]
    chat_same = chat_text.strip() == ref["text"].replace("<|im_end|>", "").strip()
    ok &= chat_same
    print(f"llama.cpp create_chat_completion on export f32 (GGUF chat template): {chat_text!r} == loratune: {chat_same}")

    for fam in FAMILIES:
        fam_ok, fam_rows = check_family(*fam)
        ok &= fam_ok
        rows += fam_rows

    print()
    print(f"{'case':62s} {'same ids':8s}  loratune | llama.cpp")
    for label, same, a, b in rows:
        print(f"{label:62s} {str(same):8s}  {a!r} | {b!r}")
    print()
    for name, path in exports.items():
        n_kv, n_t, arch = gguf_read_all(path)
        print(f"gguf.GGUFReader {name:28s} {n_kv:3d} keys, {n_t:3d} tensors, arch {arch}")
    with open(os.path.join(ollama_dir, "Modelfile")) as f:
        print("\nModelfile:\n" + f.read())
    print(cmd)
    print("\nALL MATCH" if ok else "\nMISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
