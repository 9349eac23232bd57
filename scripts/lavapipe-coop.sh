#!/usr/bin/env bash
# Tests the WGSL backend's tensor-core kernel (shaders/wgsl/grouped_gemm_coop.wgsl) without a GPU.
#
# Debian 12's lavapipe (Mesa 22) has no VK_KHR_cooperative_matrix, so there `grouped_gemm` never
# takes that kernel. Mesa 25.1 and later does (8x8x8 f16 -> f32), and Debian trixie-backports
# carries it. It needs trixie's glibc, so nothing is installed: the packages are unpacked into a
# folder (default target/mesa-coop, ~250 MiB) and cargo runs the test binaries through that
# glibc's dynamic loader (CARGO_TARGET_<triple>_RUNNER). Then the wgpu instances of the conformance
# suite (`wgpu`, `wgpu_split` on tensor cores, `wgpu_scalar` on the FMA kernels of the same device,
# `wgpu_uniform` with parameters in buffers) and moe-wgpu's tests run, with
# MOE_REQUIRE_TENSOR_CORES=1 making a test fail unless the tensor cores are in use, so the check
# cannot pass on the scalar kernels alone. The `wgpu` instance then runs again with 16x16 matrices
# (NVIDIA's size, which lavapipe executes though it offers 8x8).
#
# The same run goes through trixie's Khronos validation layer (1.4.309: it knows
# VK_KHR_cooperative_matrix; Debian 12's 1.3.239 does not), which checks every SPIR-V module
# (spirv-val), every API call and the synchronisation between dispatches; any error or warning it
# logs fails the script.
#
#   scripts/lavapipe-coop.sh [setup]    setup: only download and unpack, print the environment
set -euo pipefail
# Mesa's Vulkan drivers print "XDG_RUNTIME_DIR is invalid or not set" for every device a test opens
# when it is unset (CI, containers), though compute needs no display: give them the temp folder
# (as the moe command does).
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-${TMPDIR:-/tmp}}"
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dir=${MOE_MESA_COOP_DIR:-$root/target/mesa-coop}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if [ ! -f "$dir/ready-2" ]; then
  echo "lavapipe-coop.sh: unpacking Debian trixie's glibc and trixie-backports' Mesa into $dir"
  rm -rf "$dir" && mkdir -p "$dir/debs" "$dir/root"
  # Resolve mesa-vulkan-drivers' dependencies (first alternative of each) from the two package
  # indexes, newest Mesa from backports, everything else from trixie; download them.
  python3 - "$mirror" "$dir/debs" <<'EOF'
import lzma, sys, urllib.request, os
mirror, out = sys.argv[1], sys.argv[2]
def index(suite):
    data = urllib.request.urlopen(f"{mirror}/dists/{suite}/main/binary-amd64/Packages.xz", timeout=120).read()
    pk, provides = {}, {}
    for stanza in lzma.decompress(data).decode("utf-8", "replace").split("\n\n"):
        f = {}
        for line in stanza.splitlines():
            if line and line[0] not in " \t" and ":" in line:
                k, _, v = line.partition(":")
                f[k] = v.strip()
        if "Package" in f:
            pk.setdefault(f["Package"], f)
            for p in f.get("Provides", "").split(","):
                if p.strip():
                    provides.setdefault(p.strip().split(" ")[0], f)
    return pk, provides
main, provides = index("trixie")
bpo, _ = index("trixie-backports")
skip = {"debconf", "debconf-2.0", "dpkg", "libc-bin", "install-info", "perl-base", "base-files", "usrmerge", "usr-is-merged"}
todo, seen = ["libc6", "libstdc++6", "libgcc-s1", "libvulkan1", "mesa-vulkan-drivers", "vulkan-validationlayers"], {}
while todo:
    name = todo.pop()
    if name in seen or name in skip:
        continue
    f = bpo.get(name) if name.startswith("mesa") and name in bpo else main.get(name) or provides.get(name)
    if f is None:
        sys.exit(f"lavapipe-coop.sh: {name} is in neither trixie nor trixie-backports")
    seen[name] = f
    for dep in (f.get("Depends", "") + "," + f.get("Pre-Depends", "")).split(","):
        if dep.strip():
            todo.append(dep.split("|")[0].strip().split(" ")[0].split(":")[0])
mesa = seen["mesa-vulkan-drivers"]["Version"]
print(f"lavapipe-coop.sh: Mesa {mesa}, {len(seen)} packages")
for f in seen.values():
    path = os.path.join(out, os.path.basename(f["Filename"]))
    with urllib.request.urlopen(f"{mirror}/{f['Filename']}", timeout=300) as r, open(path, "wb") as w:
        w.write(r.read())
EOF
  for d in "$dir"/debs/*.deb; do dpkg-deb -x "$d" "$dir/root"; done
  lib="$dir/root/usr/lib/x86_64-linux-gnu"
  sed "s#\"library_path\": \"[^\"]*\"#\"library_path\": \"$lib/libvulkan_lvp.so\"#" \
    "$dir/root/usr/share/vulkan/icd.d/lvp_icd.json" > "$dir/lvp.json"
  printf '#!/bin/sh\n# Runs a program with trixie'"'"'s glibc and libraries (and so its Mesa).\nexec %s/ld-linux-x86-64.so.2 --library-path %s "$@"\n' "$lib" "$lib" > "$dir/run.sh"
  chmod +x "$dir/run.sh"
  mkdir -p "$dir/layers"
  sed "s#\"library_path\": \"[^\"]*\"#\"library_path\": \"$lib/libVkLayer_khronos_validation.so\"#" \
    "$dir/root/usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json" > "$dir/layers/VkLayer_khronos_validation.json"
  printf 'khronos_validation.debug_action = VK_DBG_LAYER_ACTION_LOG_MSG\nkhronos_validation.log_filename = %s\nkhronos_validation.report_flags = error,warn\n' \
    "$dir/validation.log" > "$dir/vk_layer_settings.txt"
  rm -rf "$dir/debs"
  touch "$dir/ready-2"
fi

export VK_ICD_FILENAMES="$dir/lvp.json"
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$dir/run.sh"
if [ "${1:-}" = "setup" ]; then
  echo "export VK_ICD_FILENAMES=$VK_ICD_FILENAMES"
  echo "export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER"
  exit 0
fi
"$dir/run.sh" "$(command -v vulkaninfo || echo /bin/true)" 2>/dev/null | grep -E "driverInfo|VK_KHR_cooperative_matrix " | head -2 || true
export MOE_REQUIRE_BACKENDS=wgpu MOE_REQUIRE_TENSOR_CORES=1
# The validation layer: found through VK_LAYER_PATH, enabled by wgpu (WGPU_VALIDATION), logging to
# a file that must stay empty.
export VK_LAYER_PATH="$dir/layers" VK_LAYER_SETTINGS_PATH="$dir" WGPU_VALIDATION=1
rm -f "$dir/validation.log"
# Proof that the layer is in the device the tests open: an empty log would also come from a
# layer that never loaded. The loader's own debug output names each layer it inserts.
loaded=$(VK_LOADER_DEBUG=layer cargo test -q -p moe-wgpu info_and_round_trip 2>&1 || true)
if ! grep -q 'Inserted device layer "VK_LAYER_KHRONOS_validation"' <<<"$loaded"; then
  echo "lavapipe-coop.sh: the Vulkan validation layer did not load into the device; the loader said:"
  grep -E "LAYER|ERROR" <<<"$loaded" | tail -20
  exit 1
fi
cargo test -p moe-wgpu
cargo test -p moe-conformance --test conformance -- wgpu
if [ -s "$dir/validation.log" ]; then
  echo "lavapipe-coop.sh: the Vulkan validation layer reported:"
  grep -E "^Validation" "$dir/validation.log" | sort | uniq -c | head -20
  exit 1
fi
echo "lavapipe-coop.sh: Vulkan validation clean (the layer loaded into the device and reported nothing)"
# NVIDIA's size: lavapipe offers 8x8x8 but its compiler lowers any size, so the 16x16 code path
# (tile dealing, offsets, strides) runs here too. Outside the validation layer, which rightly
# reports a size the device does not offer (VUID-RuntimeSpirv-OpTypeCooperativeMatrixKHR-10163).
unset VK_LAYER_PATH VK_LAYER_SETTINGS_PATH
export WGPU_VALIDATION=0 MOE_WGPU_COOP_SIZE=16
MOE_REQUIRE_TENSOR_CORES=16 cargo test -p moe-wgpu tensor_cores_in_use
cargo test -p moe-conformance --test conformance -- wgpu::
# No kernel may assume a subgroup size: the suite again with lavapipe's 4- and 16-wide subgroups
# (128- and 512-bit vectors; at both the FMA kernels run: 128 refuses cooperative matrices, see
# below, and at 16 lanes the 8x8 ones do not fit tiled_coop's tile dealing).
unset MOE_WGPU_COOP_SIZE
for width in 128 512; do
  LP_NATIVE_VECTOR_WIDTH=$width cargo test -p moe-conformance --test conformance -- wgpu::
done
# A driver that lists cooperative matrices but refuses a device with them (this lavapipe at 128-bit
# vectors: VK_ERROR_FEATURE_NOT_PRESENT, which wgpu turns into a panic) must still give a working
# backend, on the FMA kernels, that says why.
cargo build -q -p moe-cli
moe="${CARGO_TARGET_DIR:-$root/target}/debug/moe"
out=$(LP_NATIVE_VECTOR_WIDTH=128 "$dir/run.sh" "$moe" devices 2>&1) || true
if ! grep -q "^wgpu  available: .*tensor cores: not used: the device did not open with cooperative matrices" <<<"$out"; then
  echo "lavapipe-coop.sh: expected wgpu on its FMA kernels at 128-bit vectors; moe devices said:"
  echo "$out"
  exit 1
fi
LP_NATIVE_VECTOR_WIDTH=128 "$dir/run.sh" "$moe" demo --backend wgpu --tokens 24 --hidden 256 --intermediate 96 --experts 16
echo "lavapipe-coop.sh: a device refusing cooperative matrices opens without them"
