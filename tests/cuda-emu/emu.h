// The emulated CUDA device: what the driver, cuBLASLt and NCCL parts share.
// Everything here runs on the CPU; device pointers are host addresses from the allocation table.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace emu {

// ---- CUDA driver result codes (the subset the emulator returns) ----
enum Result : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    DEINITIALIZED = 4,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_PTX = 218,
    INVALID_SOURCE = 300,
    INVALID_HANDLE = 400,
    ILLEGAL_STATE = 401,
    NOT_FOUND = 500,
    NOT_READY = 600,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
    STREAM_CAPTURE_UNSUPPORTED = 900,
    STREAM_CAPTURE_INVALIDATED = 901,
    STREAM_CAPTURE_IMPLICIT = 906,
    UNKNOWN = 999,
};

const char* result_name(int r);
const char* result_string(int r);

// ---- Messages ----
// Every message starts with "cuda-emu: " and goes to stderr; errors are never silent.
void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// The seed of the resume-order shuffles (CUDA_EMU_SEED, else from the clock), for messages.
uint64_t seed();

// ---- Configuration (environment, read once) ----
struct Config {
    uint64_t total_bytes;   // CUDA_EMU_MEMORY_GB
    int devices;            // CUDA_EMU_DEVICES
    bool pools;             // CUDA_EMU_POOLS (cuMemAllocAsync support)
    std::string stats_path; // CUDA_EMU_STATS
    bool sync;              // CUDA_EMU_SYNC=1 or CUDA_LAUNCH_BLOCKING=1: stream work runs at once
};
const Config& config();

// ---- The one lock: the API is entered by one host thread at a time ----
std::recursive_mutex& api_lock();

// ---- Call counters (CUDA_EMU_STATS) ----
struct Counter {
    const char* name;
    uint64_t n = 0;
    Counter* next = nullptr;
    explicit Counter(const char* name);
};
#define EMU_COUNT(NAME)                          \
    static ::emu::Counter emu_counter_(NAME);    \
    __atomic_add_fetch(&emu_counter_.n, 1, __ATOMIC_RELAXED)

// ---- Sticky context error (a kernel fault poisons the context, as on a GPU) ----
int sticky();
void set_sticky(int r);
void clear_sticky();

// ---- Allocation table ----
struct Alloc {
    uintptr_t base = 0;    // what cuMemAlloc returned
    size_t size = 0;       // bytes requested
    size_t slack = 0;      // bytes between size and the guard page (canary-filled)
    void* map = nullptr;   // the mapping (pages + guard page)
    size_t map_len = 0;
    uint64_t serial = 0;   // allocation number, for messages
    bool pooled = false;   // cuMemAllocAsync
};

// Allocate `bytes` of device memory (poisoned: 0xFF bytes, a NaN in f32/f64/bf16).
int mem_alloc(uintptr_t* out, size_t bytes, bool pooled);
int mem_free(uintptr_t ptr, bool pooled);
void mem_free_all();
uint64_t mem_used();
uint64_t mem_peak();  // most device memory in use at once (CUDA_EMU_STATS reports it)

// Checks [p, p + bytes) lies in one live allocation. On failure returns false and fills `why`.
bool mem_check(uintptr_t p, size_t bytes, std::string* why);
// Like mem_check for a single pointer value (a kernel argument): inside a live allocation.
bool mem_check_ptr(uintptr_t p, std::string* why);
// The live allocation holding p, or nullptr.
const Alloc* mem_find(uintptr_t p);
// Describe an address relative to the table (for fault messages).
std::string mem_describe(uintptr_t p);
// Is the canary past the end of the allocation at p intact? (false: something wrote past it)
bool mem_canary_ok(uintptr_t p, size_t* first_bad);
// Does [p, p + bytes) overlap any device allocation? (host pointers must not)
bool mem_overlaps_device(uintptr_t p, size_t bytes);

// ---- Kernels ----
enum class ParamKind { Pointer, Integer, Float, Aggregate };
struct ParamInfo {
    ParamKind kind;
    size_t size;
};
struct KernelDef {
    const char* name;
    std::vector<ParamInfo> params;
    // Run one thread of the kernel with the argument bytes (one buffer per parameter).
    void (*call)(void* const* args);
};
const std::vector<KernelDef>& kernel_table();

// What the PTX says about one .entry.
struct PtxEntry {
    std::string name;
    std::vector<ParamInfo> params;  // kind Pointer never appears: PTX has .u64 for both
    std::vector<std::string> param_text;
    unsigned maxntid[3] = {0, 0, 0};  // 0: none declared
    size_t static_smem = 0;
};
// Parse every .entry of a PTX module; false with `why` on text that is not PTX.
bool ptx_parse(const char* text, std::vector<PtxEntry>* out, std::string* why);

struct Dim3 {
    unsigned x, y, z;
};
struct Function {
    const KernelDef* def;
    PtxEntry entry;
    bool alive = true;
};
// Run a launch to completion (the emulator is synchronous). Returns OK, or a launch error
// (INVALID_VALUE, ... : the launch was refused), or ILLEGAL_ADDRESS / LAUNCH_FAILED after a
// fault (already made sticky and reported).
int launch(Function* f, Dim3 grid, Dim3 block, unsigned dyn_smem, void** params);
// The checks a launch makes before it runs (a refused launch: INVALID_VALUE, ...), alone: stream
// capture checks at capture time, runs at replay.
int launch_validate(Function* f, Dim3 grid, Dim3 block, unsigned dyn_smem, void** params);

// ---- Streams: deferred work and stream capture (CUDA graphs) ----
// An operation on `stream`. Not capturing: queued on the stream and run when the host waits for
// it (cuStreamSynchronize, an event, a synchronous copy ...), as a GPU runs it later: a host that
// reads results before waiting sees poison, not the answer. `now`: run at once after the stream's
// earlier work (collectives: a peer process must not wait on work this process never flushes).
// Capturing: recorded into the stream's graph to run at every cuGraphLaunch (a replay error makes
// the context's error sticky, as a fault in a graph does). Returns OK when queued or recorded,
// what running it returned when run now, or a capture error (an operation on the legacy stream
// while another stream captures invalidates that capture). A queued operation that fails when it
// runs makes the context's error sticky, reported at the next synchronization.
int enqueue(void* stream, const char* fn, std::function<int()> op, bool now = false);
// A call that waits for the device (or may not be captured): refused while a global-mode capture
// is active, which it invalidates (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED).
int sync_gate(const char* fn);
// Is [p, p + n) host memory from cuMemHostAlloc (pinned)?
bool is_pinned(const void* p, size_t n);

// The device of the calling thread's current context (-1: none), as cudaGetDevice tells NCCL.
int current_device();

// ---- Host timing for events ----
double now_ms();

}  // namespace emu
