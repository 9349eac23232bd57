#!/usr/bin/env bash
# The one test command (README): installs what the tests need on a fresh Debian machine, then runs
# the whole workspace's tests. The WGSL backend needs a Vulkan driver; where none is installed we
# add Mesa's software driver (lavapipe), so the WGSL tests run on any machine, GPU or not.
set -euo pipefail
cd "$(dirname "$0")/.."
# Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" for every device a test opens
# when it is unset (CI, containers), though compute needs no display: give them the temp folder
# (as the moe command does).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}"

if ! compgen -G "/usr/share/vulkan/icd.d/*.json" >/dev/null && ! compgen -G "/etc/vulkan/icd.d/*.json" >/dev/null; then
  echo "test.sh: no Vulkan driver found; installing mesa-vulkan-drivers (lavapipe)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mesa-vulkan-drivers >/dev/null
fi

# The CUDA kernels are checked without a GPU in two ways: compiled by NVRTC for sm_90 and sm_80
# (NVRTC comes as a pip wheel, ~45 MiB), and run on the CPU emulator (built with g++ 12+).
# Plots (`moe bench --plot x.svg|x.png`) lay out their text with a system TrueType font.
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  echo "test.sh: installing fonts-dejavu-core (text in bench plots)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fonts-dejavu-core >/dev/null
fi
if ! command -v g++ >/dev/null 2>&1; then
  echo "test.sh: installing g++ (for the CUDA kernels' CPU emulator)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++ >/dev/null
fi
if ! ldconfig -p | grep -q libnvrtc; then
  # A no-op when the wheel is already there.
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore nvidia-cuda-nvrtc==13.2.86 \
    || echo "test.sh: could not install NVRTC; the compile test will skip unless MOE_REQUIRE_NVRTC is set"
fi

# Backends named here fail instead of skipping when unavailable (CI: cpu,wgpu,cudaemu).
echo "test.sh: MOE_REQUIRE_BACKENDS=${MOE_REQUIRE_BACKENDS:-<none>}"
cargo test --workspace --no-fail-fast "$@"
