#!/usr/bin/env python3
"""GGUF LoRA adapters made by llama.cpp's own converter, for `tests/it/gguf_export.rs`.

Runs llama.cpp's `convert_lora_to_gguf.py` (vendored in the llama-cpp-python 0.3.36 sdist; its gguf-py is 0.19.0)
on the PEFT fixture adapters tests/fixtures/adapters/{llama,llama-rslora,qwen2,phi3,gemma2,mixtral-experts} with their fixture
bases tests/fixtures/models/<arch> (`--base`, config only) and `--outtype f32`, writing
tests/fixtures/gguf/lora/<name>.gguf (a few KB each). loratune's `export_gguf_adapter` must reproduce every
tensor bit for bit and the `general.architecture` / `general.type` / `adapter.*` keys — except
`adapter.lora.alpha` of the rsLoRA adapter: the converter copies `lora_alpha` (8) unchanged although llama.cpp
scales by alpha/r, so it applies 8/4 instead of rsLoRA's 8/√4; loratune writes 8·√4 = 16.

  pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
  LLAMA_CPP_DIR=$PWD/llama_cpp_python-0.3.36/vendor/llama.cpp /work/venv/bin/python scripts/reference/gguf_lora_fixture.py
Pinned: torch 2.15.0, transformers 5.24.0, gguf 0.19.0 (the converter's own gguf-py), safetensors 0.8.0.
"""
import os
import subprocess
import sys

LCPP = os.environ.get("LLAMA_CPP_DIR")
if not LCPP or not os.path.exists(os.path.join(LCPP, "convert_lora_to_gguf.py")):
    sys.exit("set LLAMA_CPP_DIR to a llama.cpp checkout (see the docstring)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "lora")

ADAPTERS = {"llama": "llama", "llama-rslora": "llama", "qwen2": "qwen2", "phi3": "phi3", "gemma2": "gemma2",
            # Mixtral: attention, the router and every expert (stacked: lora_a [experts, r, in], lora_b [experts, out, r])
            "mixtral-experts": "mixtral"}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, base in ADAPTERS.items():
        out = os.path.join(OUT, f"{name}.gguf")
        cmd = [sys.executable, os.path.join(LCPP, "convert_lora_to_gguf.py"), "--outtype", "f32",
               "--base", os.path.join(ROOT, "tests", "fixtures", "models", base), "--outfile", out,
               os.path.join(ROOT, "tests", "fixtures", "adapters", name)]
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.path.join(LCPP, "gguf-py")})
        print(f"{name}: {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
