#!/usr/bin/env bash
# The fused GPU kernels (src/kernels/cube) without a GPU: burn's wgpu backend on Mesa's lavapipe (software
# Vulkan) runs the same `#[cube]` kernels CUDA runs, in f32 and f16 (no bf16, no tensor cores there). Installs
# lavapipe when it is missing (Debian/Ubuntu: mesa-vulkan-drivers), then runs the kernel tests, which compare
# values and gradients with the reference implementation on the same backend.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  echo "installing Mesa's lavapipe (mesa-vulkan-drivers) for the GPU-kernel tests"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi
ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || {
  echo "error: lavapipe (lvp_icd*.json) is still missing after installing mesa-vulkan-drivers" >&2
  exit 1
}
# Only lavapipe: never pick a real (or absent) hardware driver.
export VK_ICD_FILENAMES
VK_ICD_FILENAMES=$(ls /usr/share/vulkan/icd.d/lvp_icd*.json | head -n1)
# One test at a time: the memory test reads the device's allocation counters, which other tests would share.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
cargo test --release --features wgpu --lib kernels::cube "$@" -- --test-threads=1
