// What the compiled kernels see of the emulator's thread scheduler (shim.h uses it).
#pragma once

#include <cstdint>

struct emu_uint3 {
    unsigned int x, y, z;
};

namespace emu_rt {

enum FiberState { READY, RUNNING, AT_BARRIER, AT_WARP, EXITED, FAULTED };
enum ShflMode { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, WARP_SYNC };

// One thread of the running block.
struct Fiber {
    emu_uint3 tid;
    void* sp;
    unsigned linear, lane, warp;
    FiberState state;
    // Where it waits (barrier or warp operation) and what it asked for.
    const char* file;
    int line;
    int mode;
    unsigned mask;
    int arg, width;
    uint64_t val, res;
};

extern Fiber* g_cur;
extern emu_uint3 g_block_idx, g_block_dim, g_grid_dim;

void syncthreads(const char* file, int line);
uint64_t warp_op(int mode, unsigned mask, uint64_t v, int arg, int width, const char* file, int line);
[[noreturn]] void trap(const char* what, const char* file, int line);

}  // namespace emu_rt
