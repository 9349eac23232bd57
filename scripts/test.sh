#!/usr/bin/env bash
# The one test command (README): installs what the tests need on a fresh Debian machine, then runs
# the whole workspace's tests. The WGSL backend needs a Vulkan driver; where none is installed we
# add Mesa's software driver (lavapipe), so the WGSL tests run on any machine, GPU or not.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1; then
  echo "test.sh: no Vulkan driver found; installing mesa-vulkan-drivers (lavapipe)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi

# Backends named here fail instead of skipping when unavailable (CI: cpu,wgpu).
echo "test.sh: MOE_REQUIRE_BACKENDS=${MOE_REQUIRE_BACKENDS:-<none>}"
cargo test --workspace --no-fail-fast "$@"
