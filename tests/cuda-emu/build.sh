#!/usr/bin/env bash
# Builds the emulated CUDA device into OUT (scripts/cuda-emu calls this; nothing here is committed
# output). Usage: tests/cuda-emu/build.sh OUT KERNEL_DIR FILE.cu...
#   KERNEL_DIR  the .cu sources to compile as the kernels' C++ twins (common.cuh first, then the
#               FILEs in the order herd concatenates them: src/backend/cuda/kernels.rs FILES)
# Produces OUT/libcuda-emu.so with the names cudarc loads linked to it (libcuda.so,
# libcublasLt.so, libnccl.so), an empty OUT/libcublas.so, and OUT/cuda-emu-probe.
set -euo pipefail
OUT=$1
KDIR=$2
shift 2
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ "$(uname -m)" != x86_64 ]; then
    echo "cuda-emu: the fiber switch is x86-64 assembly; this machine is $(uname -m)" >&2
    exit 1
fi
CXX=${CXX:-g++}
mkdir -p "$OUT/obj"
# -O2 without -ffast-math: the kernels test NaN and -INFINITY, which fast math folds away.
# No -march: no FMA contraction, so f32 arithmetic rounds like herd's CPU backend.
FLAGS=(-std=c++17 -O2 -g -fPIC -fvisibility=hidden -fno-fast-math -Wall -Wno-unknown-pragmas -I"$HERE" -I"$OUT/obj")

# The kernels' C++ twins: every kernel file inside one namespace (the scheduler finds their shared
# variables by this namespace's mangled prefix), and the table of every extern "C" __global__.
GEN="$OUT/obj/kernels_gen.cpp"
{
    echo '#include "shim.h"'
    echo 'namespace { namespace emu_kernels {'
    echo "#include \"$KDIR/common.cuh\""
    for f in "$@"; do echo "#include \"$KDIR/$f\""; done
    echo '} }'
    echo '#include "kernel_thunk.h"'
    echo 'namespace emu {'
    echo 'const std::vector<KernelDef>& kernel_table() {'
    echo '    static const std::vector<KernelDef> table = {'
    for f in "$@"; do
        perl -0777 -ne 'while (/extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(/g) { print "        EMU_KERNEL($1),\n" }' "$KDIR/$f"
    done
    echo '    };'
    echo '    return table;'
    echo '}'
    echo '}'
} >"$GEN"

pids=()
for src in common memory ptx exec driver cublaslt nccl; do
    "$CXX" "${FLAGS[@]}" -c "$HERE/$src.cpp" -o "$OUT/obj/$src.o" &
    pids+=($!)
done
"$CXX" "${FLAGS[@]}" -Wno-unused-variable -Wno-unused-function -Wno-sign-compare -c "$GEN" -o "$OUT/obj/kernels.o" &
pids+=($!)
"$CXX" -c "$HERE/fiber_x86_64.S" -o "$OUT/obj/fiber.o" &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done

"$CXX" -shared -o "$OUT/libcuda-emu.so" "$OUT"/obj/*.o -ldl -lrt -pthread -Wl,-z,noexecstack
for name in libcuda.so libcuda.so.1 libcublasLt.so libnccl.so; do
    ln -sf libcuda-emu.so "$OUT/$name"
done
# doctor checks that libcublas is present; herd never calls it.
echo 'void cuda_emu_no_cublas(void) {}' | "$CXX" -x c -shared -fPIC -o "$OUT/libcublas.so" -
"$CXX" -std=c++17 -O2 -g -Wall -o "$OUT/cuda-emu-probe" "$HERE/probe.cpp" -ldl
