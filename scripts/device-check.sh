#!/usr/bin/env bash
# Prepares the one device call of crates/moe-cuda/DEVICE_CHECK.md, here (no GPU needed): stages
# release binaries with ../shared/gpu/stage, then edits the .device/run.sh it wrote, and checks
# that every edit took (a changed stage script fails here, not on the GPU's clock):
#   - MOE_CUDA_NO_EMULATOR=1: the moe-cuda tests would otherwise try to build the CUDA kernels'
#     CPU emulator there, from a path that machine does not have; MOE_REQUIRE_SUPPORT=1: every
#     required backend runs every case;
#   - the NVRTC compile test skipped (~40 s of device time; CI runs it, and the suite compiles
#     every kernel it runs anyway);
#   - each test binary under `timeout 240`: a test that hangs on a real driver costs 4 minutes
#     and is reported as failed, not the whole call and every step after it;
#   - the steps after the tests (sanitizer, peers, benches, A/B pairs) from scripts/device-steps.sh,
#     which travels with the working tree.
# Then make the call it prints. MOE_STAGE overrides the stage script's path.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${MOE_STAGE:-../shared/gpu/stage}
if [ ! -x "$stage" ]; then
  echo "device-check: no stage script at $stage (set MOE_STAGE)" >&2
  exit 1
fi
"$stage"
run=.device/run.sh
sed -i '/^export MOE_REQUIRE_BACKENDS=/a export MOE_CUDA_NO_EMULATOR=1 MOE_REQUIRE_SUPPORT=1' "$run"
sed -i 's/--test-threads=1 >/--test-threads=1 --skip nvrtc_compiles_every_kernel >/' "$run"
sed -i 's/^\(  *\)"\$t" --test-threads=1/\1timeout -k 10 240 "$t" --test-threads=1/' "$run"
sed -i 's|^\[ -n "" \] && \.device/bin/moe.*$|. scripts/device-steps.sh|' "$run"
for want in '^export MOE_CUDA_NO_EMULATOR=1 MOE_REQUIRE_SUPPORT=1$' '--skip nvrtc_compiles_every_kernel >' '^  *timeout -k 10 240 "\$t" --test-threads=1' '^\. scripts/device-steps\.sh$'; do
  if ! grep -q -- "$want" "$run"; then
    echo "device-check: $run has no line matching '$want': the stage script changed; edit run.sh by hand (DEVICE_CHECK.md)" >&2
    exit 1
  fi
done
bash -n "$run"
bash -n scripts/device-steps.sh
echo 'device-check: ready. Call run with command "bash .device/run.sh", carry [".device"], timeout_s 560; then give_back.'
