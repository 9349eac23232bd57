#!/usr/bin/env bash
# Builds the CPU emulator of the CUDA kernels (see emu.h) as a shared library:
#   crates/moe-cuda/emu/build.sh [OUT_DIR]      (default: target/moe-cuda-emu)
# and prints its path. Needs g++ (C++17, _Float16: GCC 12 or newer on x86-64). Then e.g.
#   MOE_CUDA_EMULATOR=$(crates/moe-cuda/emu/build.sh) cargo test -p moe-cuda
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${1:-$root/target/moe-cuda-emu}
mkdir -p "$out/src"
objs=()
for f in "$root"/shaders/cuda/*.cu; do
  name=$(basename "$f" .cu)
  # `extern __shared__` has no C++ spelling: dynamic shared memory is emu.h's `dyn`.
  sed 's/extern __shared__/extern/' "$f" > "$out/src/$name.cpp"
  g++ -std=c++17 -O2 -g -fPIC -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=0 -Wall -Wno-unknown-pragmas -Wno-unused-function \
      -include "$here/emu.h" -I "$here" -c "$out/src/$name.cpp" -o "$out/$name.o"
  objs+=("$out/$name.o")
done
g++ -std=c++17 -O2 -g -fPIC -U_FORTIFY_SOURCE -D_FORTIFY_SOURCE=0 -Wall -c "$here/emu.cpp" -o "$out/emu.o"
g++ -shared -o "$out/libmoe_cuda_emu.so" "$out/emu.o" "${objs[@]}"
echo "$out/libmoe_cuda_emu.so"
