// The CUDA driver API subset herd calls through cudarc 0.19.10 (libcuda.so). Every call is
// counted (CUDA_EMU_STATS), checked the way the driver documents, and executed at once: the
// emulated device finishes each operation before the call returns, so stream and event waits are
// always satisfied.
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <algorithm>
#include <set>
#include <string>

#include "emu.h"

using namespace emu;

typedef unsigned long long CUdeviceptr;
typedef int CUdevice;
struct Ctx {
    int device;
    int refs;
};
// A captured graph's operations (shared by the graph and its executables) and the device memory
// allocated inside the capture (owned until the last of them is destroyed).
struct GraphData {
    std::vector<std::function<int()>> ops;
    std::vector<uintptr_t> allocs;
    bool collective = false;  // has an NCCL call: a replay runs at once (see enqueue)
    ~GraphData() {
        for (uintptr_t a : allocs) mem_free(a, true);
    }
};
struct Stream {
    unsigned flags;
    bool capturing = false;
    bool invalidated = false;
    int mode = 0;  // CU_STREAM_CAPTURE_MODE_GLOBAL / THREAD_LOCAL / RELAXED
    std::shared_ptr<GraphData> graph;
};
struct Graph {
    std::shared_ptr<GraphData> data;
};
struct GraphExec {
    std::shared_ptr<GraphData> data;
};
struct Event {
    unsigned flags;
    bool recorded = false;
    double t = 0;
    uintptr_t queue = 0;  // the stream it was last recorded on (its queue key)
};
struct Module {
    std::vector<std::unique_ptr<Function>> funcs;
};
typedef Ctx* CUcontext;
typedef Stream* CUstream;
typedef Event* CUevent;
typedef Module* CUmodule;
typedef Function* CUfunction;
typedef Graph* CUgraph;
typedef GraphExec* CUgraphExec;

#define API(NAME)      \
    EMU_COUNT(#NAME);  \
    std::lock_guard<std::recursive_mutex> lock_(api_lock())
#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

bool g_init = false;
Ctx g_primary[64];
thread_local Ctx* t_current = nullptr;
std::set<Stream*> g_streams;
std::set<Event*> g_events;
std::set<Module*> g_modules;
std::set<Function*> g_funcs;
std::set<Graph*> g_graphs;
std::set<GraphExec*> g_execs;
std::map<uintptr_t, size_t> g_pinned;  // cuMemHostAlloc ranges
int g_global_captures = 0;             // streams capturing in global mode

// Work queued on each stream, run when the host waits (see emu::enqueue). Key: the stream's
// handle; the legacy stream (0 and CU_STREAM_LEGACY) is 0, the per-thread default stream 2.
struct Pending {
    const char* fn;
    std::function<int()> op;
};
std::map<uintptr_t, std::deque<Pending>> g_queues;
// Pinned host ranges that queued copies still have to read (poisoning them would be a host write
// CUDA never makes).
std::multimap<uintptr_t, size_t> g_host_reads;

bool host_reads_pending(const void* p, size_t n) {
    uintptr_t a = (uintptr_t)p;
    for (auto& r : g_host_reads)
        if (a < r.first + r.second && r.first < a + n) return true;
    return false;
}

uintptr_t queue_key(const void* s) {
    uintptr_t v = (uintptr_t)s;
    return v == 1 ? 0 : v;
}

// Run a queue's work in order. A failure is a fault of the device's work: sticky, as on a GPU.
void run_queue(uintptr_t key) {
    auto it = g_queues.find(key);
    if (it == g_queues.end()) return;
    while (!it->second.empty()) {
        Pending p = std::move(it->second.front());
        it->second.pop_front();
        if (sticky()) continue;  // a faulted context runs nothing more
        if (int r = p.op()) {
            say("%s failed when the device ran it (%s)", p.fn, result_name(r));
            set_sticky(r == ILLEGAL_ADDRESS || r == LAUNCH_FAILED ? r : ILLEGAL_ADDRESS);
        }
    }
}

// Everything queued anywhere (a context-wide wait, or a call CUDA documents as synchronizing).
void run_all_queues() {
    for (auto& q : g_queues) run_queue(q.first);
}

void invalidate_captures() {
    for (Stream* st : g_streams)
        if (st->capturing && st->mode != 2) st->invalidated = true;
}

constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;

int need_ctx() {
    if (!g_init) return NOT_INITIALIZED;
    if (!t_current || t_current->refs <= 0) return INVALID_CONTEXT;
    return OK;
}
// Most calls fail once a kernel has faulted (the error is sticky, as on a GPU).
int need_ctx_ok() {
    if (int r = need_ctx()) return r;
    return sticky();
}
#define CHECK(expr)                 \
    do {                            \
        if (int r_ = (expr)) return r_; \
    } while (0)

bool stream_ok(CUstream s, const char* fn) {
    uintptr_t v = (uintptr_t)s;
    if (v == 0 || v == 1 || v == 2) return true;  // legacy NULL stream, CU_STREAM_LEGACY, per-thread
    if (g_streams.count(s)) return true;
    say("%s: stream %p is not a live stream (destroyed?)", fn, (void*)s);
    return false;
}

int check_dev_range(const char* fn, const char* what, CUdeviceptr p, size_t n) {
    if (n == 0) return OK;
    std::string why;
    if (!mem_check((uintptr_t)p, n, &why)) {
        say("%s: %s range of %zu bytes: %s", fn, what, n, why.c_str());
        return INVALID_VALUE;
    }
    return OK;
}

int check_host_range(const char* fn, const void* p, size_t n) {
    if (n && !p) {
        say("%s: the host pointer is NULL", fn);
        return INVALID_VALUE;
    }
    if (mem_overlaps_device((uintptr_t)p, n)) {
        say("%s: the host pointer %p is device memory (a device pointer passed as a host pointer)", fn, p);
        return INVALID_VALUE;
    }
    return OK;
}

}  // namespace

namespace emu {

bool is_pinned(const void* p, size_t n) {
    auto it = g_pinned.upper_bound((uintptr_t)p);
    if (it == g_pinned.begin()) return false;
    --it;
    return (uintptr_t)p >= it->first && (uintptr_t)p + n <= it->first + it->second;
}

int sync_gate(const char* fn) {
    if (g_global_captures > 0) {
        say("%s while a stream is capturing (mode global): not permitted; the capture is invalidated", fn);
        invalidate_captures();
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    return OK;
}

int enqueue(void* stream, const char* fn, std::function<int()> op, bool now) {
    CUstream s = (CUstream)stream;
    uintptr_t v = (uintptr_t)s;
    if (v == 0 || v == 1) {
        // The legacy stream synchronizes with every blocking stream, a capturing one included.
        if (g_global_captures > 0) {
            say("%s on the legacy (NULL) stream while another stream is capturing: the legacy stream would "
                "wait for it (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT); use the capturing stream",
                fn);
            invalidate_captures();
            return STREAM_CAPTURE_IMPLICIT;
        }
    } else if (v != 2 && s->capturing) {
        if (s->invalidated) return STREAM_CAPTURE_INVALIDATED;
        if (strncmp(fn, "nccl", 4) == 0) s->graph->collective = true;
        s->graph->ops.push_back(std::move(op));
        return OK;
    }
    // Ordering with the legacy stream: its work waits for all earlier work of blocking streams,
    // and theirs for its earlier work (non-blocking streams, flag 1, are independent of it).
    uintptr_t key = queue_key(s);
    if (key == 0) {
        for (Stream* st : g_streams)
            if (!(st->flags & 1)) run_queue((uintptr_t)st);
    } else if (v == 2 || !(s->flags & 1)) {
        run_queue(0);
    }
    if (now || config().sync) {
        run_queue(key);
        return op();
    }
    g_queues[key].push_back({fn, std::move(op)});
    return OK;
}

}  // namespace emu

namespace {

const char* kind_name(ParamKind k) {
    switch (k) {
        case ParamKind::Pointer: return "pointer";
        case ParamKind::Integer: return "integer";
        case ParamKind::Float: return "float";
        default: return "struct";
    }
}

}  // namespace

int emu::current_device() { return t_current && t_current->refs > 0 ? t_current->device : -1; }

// ---------------------------------------------------------------- init, version, errors
EXPORT int cuInit(unsigned flags) {
    API(cuInit);
    if (flags != 0) return INVALID_VALUE;
    if (!g_init && !getenv("CUDA_EMU_QUIET"))
        say("EMULATED CUDA device (tests/cuda-emu, on the CPU): results check logic, launch geometry, layouts, "
            "synchronisation and memory safety; they say nothing about speed");
    g_init = true;
    (void)config();
    return OK;
}

EXPORT int cuDriverGetVersion(int* v) {
    API(cuDriverGetVersion);
    if (!v) return INVALID_VALUE;
    *v = 13000;
    return OK;
}

EXPORT int cuGetErrorString(int e, const char** s) {
    API(cuGetErrorString);
    if (!s) return INVALID_VALUE;
    *s = result_string(e);
    return OK;
}

EXPORT int cuGetErrorName(int e, const char** s) {
    API(cuGetErrorName);
    if (!s) return INVALID_VALUE;
    *s = result_name(e);
    return OK;
}

// ---------------------------------------------------------------- devices
EXPORT int cuDeviceGetCount(int* n) {
    API(cuDeviceGetCount);
    if (!g_init) return NOT_INITIALIZED;
    if (!n) return INVALID_VALUE;
    *n = config().devices;
    return OK;
}

static int dev_ok(CUdevice d) {
    if (!g_init) return NOT_INITIALIZED;
    if (d < 0 || d >= config().devices || d >= 64) return INVALID_DEVICE;
    return OK;
}

EXPORT int cuDeviceGet(CUdevice* d, int ordinal) {
    API(cuDeviceGet);
    if (!d) return INVALID_VALUE;
    CHECK(dev_ok(ordinal));
    *d = ordinal;
    return OK;
}

EXPORT int cuDeviceGetName(char* name, int len, CUdevice d) {
    API(cuDeviceGetName);
    CHECK(dev_ok(d));
    if (!name || len <= 0) return INVALID_VALUE;
    snprintf(name, (size_t)len, "NVIDIA H100 (emulated by cuda-emu on the CPU)");
    return OK;
}

EXPORT int cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    API(cuDeviceGetUuid);
    CHECK(dev_ok(d));
    if (!uuid) return INVALID_VALUE;
    memset(uuid, 0, 16);
    memcpy(uuid, "cuda-emu", 8);
    uuid[15] = (unsigned char)d;
    return OK;
}

EXPORT int cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

EXPORT int cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    API(cuDeviceTotalMem_v2);
    CHECK(dev_ok(d));
    if (!bytes) return INVALID_VALUE;
    *bytes = config().total_bytes;
    return OK;
}

EXPORT int cuDeviceGetAttribute(int* v, int attrib, CUdevice d) {
    API(cuDeviceGetAttribute);
    CHECK(dev_ok(d));
    if (!v) return INVALID_VALUE;
    switch (attrib) {
        case 1: *v = 1024; break;             // MAX_THREADS_PER_BLOCK
        case 2: case 3: *v = 1024; break;     // MAX_BLOCK_DIM_X/Y
        case 4: *v = 64; break;               // MAX_BLOCK_DIM_Z
        case 5: *v = 0x7fffffff; break;       // MAX_GRID_DIM_X
        case 6: case 7: *v = 65535; break;    // MAX_GRID_DIM_Y/Z
        case 8: *v = 49152; break;            // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *v = 65536; break;            // TOTAL_CONSTANT_MEMORY
        case 10: *v = 32; break;              // WARP_SIZE
        case 12: *v = 65536; break;           // MAX_REGISTERS_PER_BLOCK
        case 13: *v = 1980000; break;         // CLOCK_RATE (kHz)
        case 16: *v = 132; break;             // MULTIPROCESSOR_COUNT (H100 SXM)
        case 18: *v = 0; break;               // INTEGRATED
        case 19: *v = 1; break;               // CAN_MAP_HOST_MEMORY
        case 20: *v = 0; break;               // COMPUTE_MODE default
        case 31: *v = 1; break;               // CONCURRENT_KERNELS
        case 33: *v = 0x18 + d; break;        // PCI_BUS_ID
        case 34: *v = 0; break;               // PCI_DEVICE_ID
        case 36: *v = 2619000; break;         // MEMORY_CLOCK_RATE
        case 37: *v = 5120; break;            // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *v = 50 << 20; break;        // L2_CACHE_SIZE
        case 39: *v = 2048; break;            // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: *v = 3; break;               // ASYNC_ENGINE_COUNT
        case 41: *v = 1; break;               // UNIFIED_ADDRESSING
        case 75: *v = 9; break;               // COMPUTE_CAPABILITY_MAJOR
        case 76: *v = 0; break;               // COMPUTE_CAPABILITY_MINOR
        case 81: *v = 233472; break;          // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 83: *v = 1; break;               // MANAGED_MEMORY
        case 97: *v = 232448; break;          // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *v = config().pools ? 1 : 0; break;  // MEMORY_POOLS_SUPPORTED
        default:
            say("cuDeviceGetAttribute(%d): attribute not emulated (add it to tests/cuda-emu/driver.cpp)", attrib);
            return INVALID_VALUE;
    }
    return OK;
}

// ---------------------------------------------------------------- contexts
EXPORT int cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    API(cuDevicePrimaryCtxRetain);
    CHECK(dev_ok(d));
    if (!c) return INVALID_VALUE;
    g_primary[d].device = d;
    g_primary[d].refs++;
    *c = &g_primary[d];
    return OK;
}

EXPORT int cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    API(cuDevicePrimaryCtxRelease_v2);
    CHECK(dev_ok(d));
    if (g_primary[d].refs <= 0) {
        say("cuDevicePrimaryCtxRelease(%d): the primary context is not retained", d);
        return INVALID_CONTEXT;
    }
    if (--g_primary[d].refs == 0) {
        // The context is destroyed: its memory, streams, events, graphs and modules go with it,
        // and a sticky error is cleared (a fresh context starts clean, as on a GPU).
        for (auto* e : g_execs) delete e;
        g_execs.clear();
        for (auto* g : g_graphs) delete g;
        g_graphs.clear();
        for (auto* st : g_streams) st->graph.reset();
        g_global_captures = 0;
        g_queues.clear();
        g_host_reads.clear();
        mem_free_all();
        for (auto* s : g_streams) delete s;
        g_streams.clear();
        for (auto* e : g_events) delete e;
        g_events.clear();
        for (auto* m : g_modules) {
            for (auto& f : m->funcs) g_funcs.erase(f.get());
            delete m;
        }
        g_modules.clear();
        clear_sticky();
    }
    return OK;
}

EXPORT int cuCtxGetCurrent(CUcontext* c) {
    API(cuCtxGetCurrent);
    if (!g_init) return NOT_INITIALIZED;
    if (!c) return INVALID_VALUE;
    *c = t_current;
    return OK;
}

EXPORT int cuCtxSetCurrent(CUcontext c) {
    API(cuCtxSetCurrent);
    if (!g_init) return NOT_INITIALIZED;
    if (c && (c < g_primary || c >= g_primary + 64 || c->refs <= 0)) {
        say("cuCtxSetCurrent(%p): not a live context", (void*)c);
        return INVALID_CONTEXT;
    }
    t_current = c;
    return OK;
}

EXPORT int cuCtxGetDevice(CUdevice* d) {
    API(cuCtxGetDevice);
    CHECK(need_ctx());
    if (!d) return INVALID_VALUE;
    *d = t_current->device;
    return OK;
}

EXPORT int cuCtxSynchronize() {
    API(cuCtxSynchronize);
    CHECK(sync_gate("cuCtxSynchronize"));
    CHECK(need_ctx());
    run_all_queues();
    return need_ctx_ok();
}

// ---------------------------------------------------------------- memory
EXPORT int cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    API(cuMemGetInfo_v2);
    CHECK(need_ctx());
    if (!free_b || !total) return INVALID_VALUE;
    *total = config().total_bytes;
    *free_b = config().total_bytes - mem_used();
    return OK;
}

EXPORT int cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    API(cuMemAlloc_v2);
    CHECK(need_ctx_ok());
    CHECK(sync_gate("cuMemAlloc"));
    if (!p) return INVALID_VALUE;
    uintptr_t a;
    CHECK(mem_alloc(&a, bytes, false));
    *p = a;
    return OK;
}

EXPORT int cuMemFree_v2(CUdeviceptr p) {
    API(cuMemFree_v2);
    CHECK(need_ctx_ok());
    CHECK(sync_gate("cuMemFree"));
    if (!p) return OK;
    run_all_queues();  // cuMemFree synchronizes: queued work may still use the memory
    return mem_free((uintptr_t)p, false);
}

EXPORT int cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    API(cuMemAllocAsync);
    CHECK(need_ctx_ok());
    if (!config().pools) {
        say("cuMemAllocAsync: this device reports no memory pools (CUDA_EMU_POOLS=0)");
        return NOT_SUPPORTED;
    }
    if (!p || !stream_ok(s, "cuMemAllocAsync")) return INVALID_VALUE;
    uintptr_t a;
    uintptr_t v = (uintptr_t)s;
    if (v > 2 && s->capturing) {
        // A graph allocation node: the address is fixed when captured and the memory belongs to
        // the graph; every replay starts from poisoned (fresh) memory.
        if (s->invalidated) return STREAM_CAPTURE_INVALIDATED;
        CHECK(mem_alloc(&a, bytes, true));
        s->graph->allocs.push_back(a);
        s->graph->ops.push_back([a, bytes] {
            memset((void*)a, 0xFF, bytes);
            return (int)OK;
        });
        *p = a;
        return OK;
    }
    CHECK(enqueue(s, "cuMemAllocAsync", [] { return (int)OK; }));
    if (mem_alloc(&a, bytes, true) != OK) {
        // The pool reuses memory freed earlier on the stream (stream order): run the stream's
        // queued work, which holds those frees, and try again.
        run_queue(queue_key(s));
        CHECK(mem_alloc(&a, bytes, true));
    }
    *p = a;
    return OK;
}

EXPORT int cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    API(cuMemFreeAsync);
    CHECK(need_ctx_ok());
    if (!stream_ok(s, "cuMemFreeAsync")) return INVALID_VALUE;
    if (!p) return OK;
    uintptr_t v = (uintptr_t)s;
    if (v > 2 && s->capturing) {
        if (s->invalidated) return STREAM_CAPTURE_INVALIDATED;
        auto& owned = s->graph->allocs;
        // Memory allocated in this capture is the graph's (freed with it); memory from before
        // the capture is freed by every replay, so a second replay is a double free.
        if (std::find(owned.begin(), owned.end(), (uintptr_t)p) != owned.end()) return OK;
        s->graph->ops.push_back([p] { return mem_free((uintptr_t)p, true); });
        return OK;
    }
    return enqueue(s, "cuMemFreeAsync", [p] { return mem_free((uintptr_t)p, true); });
}

// The default memory pool of each device: herd only sets its release threshold (how much freed
// memory the pool keeps instead of returning it at a synchronization). The emulated pool keeps
// nothing either way; the value is recorded and checked.
struct MemPool {
    int device;
    uint64_t release_threshold = 0;
};
static MemPool g_pools[64];

EXPORT int cuDeviceGetDefaultMemPool(MemPool** pool, CUdevice d) {
    API(cuDeviceGetDefaultMemPool);
    CHECK(dev_ok(d));
    if (!pool) return INVALID_VALUE;
    if (!config().pools) {
        say("cuDeviceGetDefaultMemPool: this device reports no memory pools (CUDA_EMU_POOLS=0)");
        return NOT_SUPPORTED;
    }
    g_pools[d].device = d;
    *pool = &g_pools[d];
    return OK;
}

EXPORT int cuMemPoolSetAttribute(MemPool* pool, int attr, void* value) {
    API(cuMemPoolSetAttribute);
    CHECK(need_ctx_ok());
    if (!pool || pool < g_pools || pool >= g_pools + 64 || !value) {
        say("cuMemPoolSetAttribute: %p is not a memory pool from cuDeviceGetDefaultMemPool", (void*)pool);
        return INVALID_VALUE;
    }
    if (attr != 4) {  // CU_MEMPOOL_ATTR_RELEASE_THRESHOLD (cuuint64_t)
        say("cuMemPoolSetAttribute(%d): attribute not emulated", attr);
        return INVALID_VALUE;
    }
    memcpy(&pool->release_threshold, value, sizeof(uint64_t));
    return OK;
}

EXPORT int cuMemHostAlloc(void** p, size_t bytes, unsigned flags) {
    API(cuMemHostAlloc);
    CHECK(need_ctx_ok());
    (void)flags;
    if (!p || !bytes) return INVALID_VALUE;
    void* m = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    if (!m) return OUT_OF_MEMORY;
    memset(m, 0xFF, bytes);
    g_pinned[(uintptr_t)m] = bytes;
    *p = m;
    return OK;
}

EXPORT int cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }

EXPORT int cuMemFreeHost(void* p) {
    API(cuMemFreeHost);
    CHECK(need_ctx_ok());
    CHECK(sync_gate("cuMemFreeHost"));
    run_all_queues();  // synchronizes: a queued copy may still use the memory
    if (p && !g_pinned.erase((uintptr_t)p)) {
        say("cuMemFreeHost(%p): not memory from cuMemHostAlloc", p);
        return INVALID_VALUE;
    }
    free(p);
    return OK;
}

static int memset_impl(const char* fn, CUdeviceptr p, uint32_t v, size_t elem, size_t n, CUstream s, bool async) {
    CHECK(need_ctx_ok());
    if (async && !stream_ok(s, fn)) return INVALID_HANDLE;
    if (!async) CHECK(sync_gate(fn));
    if (p % elem) {
        say("%s: pointer 0x%llx is not %zu-byte aligned", fn, p, elem);
        return INVALID_VALUE;
    }
    CHECK(check_dev_range(fn, "destination", p, n * elem));
    if (!async) run_all_queues();  // a synchronous memset waits for earlier work and for itself
    return enqueue(
        s, fn,
        [=] {
        // Checked again at a graph replay: the memory may be gone by then.
        if (int r = check_dev_range(fn, "destination", p, n * elem)) return r;
        if (elem == 1) {
            memset((void*)p, (int)(v & 0xff), n);
        } else if (elem == 2) {
            uint16_t x = (uint16_t)v;
            for (size_t i = 0; i < n; i++) memcpy((char*)p + 2 * i, &x, 2);
        } else {
            for (size_t i = 0; i < n; i++) memcpy((char*)p + 4 * i, &v, 4);
        }
        return (int)OK;
        },
        !async);
}

EXPORT int cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream s) {
    API(cuMemsetD8Async);
    return memset_impl("cuMemsetD8Async", p, v, 1, n, s, true);
}
EXPORT int cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    API(cuMemsetD8_v2);
    return memset_impl("cuMemsetD8", p, v, 1, n, nullptr, false);
}
EXPORT int cuMemsetD16Async(CUdeviceptr p, unsigned short v, size_t n, CUstream s) {
    API(cuMemsetD16Async);
    return memset_impl("cuMemsetD16Async", p, v, 2, n, s, true);
}
EXPORT int cuMemsetD32Async(CUdeviceptr p, unsigned v, size_t n, CUstream s) {
    API(cuMemsetD32Async);
    return memset_impl("cuMemsetD32Async", p, v, 4, n, s, true);
}
EXPORT int cuMemsetD32_v2(CUdeviceptr p, unsigned v, size_t n) {
    API(cuMemsetD32_v2);
    return memset_impl("cuMemsetD32", p, v, 4, n, nullptr, false);
}

// A copy to or from pageable host memory waits for the host: it cannot be captured.
static int host_capture_gate(const char* fn, CUstream s, const void* host, size_t n) {
    uintptr_t v = (uintptr_t)s;
    if (v > 2 && s->capturing && !is_pinned(host, n)) {
        say("%s of pageable host memory on a capturing stream: not permitted (copy through cuMemHostAlloc "
            "memory); the capture is invalidated",
            fn);
        s->invalidated = true;
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    return OK;
}

static int htod(const char* fn, CUdeviceptr dst, const void* src, size_t n, CUstream s, bool async) {
    CHECK(need_ctx_ok());
    if (async && !stream_ok(s, fn)) return INVALID_HANDLE;
    if (!async) CHECK(sync_gate(fn));
    CHECK(check_dev_range(fn, "destination", dst, n));
    CHECK(check_host_range(fn, src, n));
    CHECK(host_capture_gate(fn, s, src, n));
    if (!async) run_all_queues();  // a synchronous copy waits for earlier work and for itself
    uintptr_t v = (uintptr_t)s;
    if (async && !(v > 2 && s->capturing) && !is_pinned(src, n)) {
        // Pageable memory is staged at the call (the host may reuse it at once); pinned memory
        // is read when the copy runs, so a host that overwrites it too early sends the new bytes.
        auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
        return enqueue(s, fn, [=] {
            if (int r = check_dev_range(fn, "destination", dst, n)) return r;
            if (n) memcpy((void*)dst, staged->data(), n);
            return (int)OK;
        });
    }
    if (!async || (v > 2 && s->capturing) || config().sync)
        return enqueue(
            s, fn,
            [=] {
                if (int r = check_dev_range(fn, "destination", dst, n)) return r;
                if (n) memcpy((void*)dst, src, n);
                return (int)OK;
            },
            !async);
    auto read = g_host_reads.emplace((uintptr_t)src, n);
    return enqueue(s, fn, [=] {
        g_host_reads.erase(read);
        if (int r = check_dev_range(fn, "destination", dst, n)) return r;
        if (n) memcpy((void*)dst, src, n);
        return (int)OK;
    });
}
static int dtoh(const char* fn, void* dst, CUdeviceptr src, size_t n, CUstream s, bool async) {
    CHECK(need_ctx_ok());
    if (async && !stream_ok(s, fn)) return INVALID_HANDLE;
    if (!async) CHECK(sync_gate(fn));
    CHECK(check_dev_range(fn, "source", src, n));
    CHECK(check_host_range(fn, dst, n));
    CHECK(host_capture_gate(fn, s, dst, n));
    if (!async) run_all_queues();  // a synchronous copy waits for earlier work and for itself
    uintptr_t v = (uintptr_t)s;
    bool capturing = v > 2 && s->capturing;
    // To pageable memory even the async copy returns only when done (CUDA documents it so); to
    // pinned memory it runs later, and until then the host buffer holds poison, not stale data.
    bool now = !async || (!capturing && !is_pinned(dst, n));
    if (!now && !capturing && !config().sync && n && !host_reads_pending(dst, n)) memset(dst, 0xFF, n);
    return enqueue(
        s, fn,
        [=] {
            if (int r = check_dev_range(fn, "source", src, n)) return r;
            if (n) memcpy(dst, (const void*)src, n);
            return (int)OK;
        },
        now);
}
static int dtod(const char* fn, CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s, bool async) {
    CHECK(need_ctx_ok());
    if (async && !stream_ok(s, fn)) return INVALID_HANDLE;
    if (!async) CHECK(sync_gate(fn));
    CHECK(check_dev_range(fn, "source", src, n));
    CHECK(check_dev_range(fn, "destination", dst, n));
    if (!async) run_all_queues();
    return enqueue(
        s, fn,
        [=] {
            if (int r = check_dev_range(fn, "source", src, n)) return r;
            if (int r = check_dev_range(fn, "destination", dst, n)) return r;
            if (n) memmove((void*)dst, (const void*)src, n);
            return (int)OK;
        },
        !async);
}

EXPORT int cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    API(cuMemcpyHtoDAsync_v2);
    return htod("cuMemcpyHtoDAsync", dst, src, n, s, true);
}
EXPORT int cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    API(cuMemcpyHtoD_v2);
    return htod("cuMemcpyHtoD", dst, src, n, nullptr, false);
}
EXPORT int cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    API(cuMemcpyDtoHAsync_v2);
    return dtoh("cuMemcpyDtoHAsync", dst, src, n, s, true);
}
EXPORT int cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    API(cuMemcpyDtoH_v2);
    return dtoh("cuMemcpyDtoH", dst, src, n, nullptr, false);
}
EXPORT int cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    API(cuMemcpyDtoDAsync_v2);
    return dtod("cuMemcpyDtoDAsync", dst, src, n, s, true);
}
EXPORT int cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    API(cuMemcpyDtoD_v2);
    return dtod("cuMemcpyDtoD", dst, src, n, nullptr, false);
}

// ---------------------------------------------------------------- streams and events
EXPORT int cuStreamCreate(CUstream* s, unsigned flags) {
    API(cuStreamCreate);
    CHECK(need_ctx_ok());
    if (!s || flags > 1) return INVALID_VALUE;
    *s = new Stream{flags};
    g_streams.insert(*s);
    return OK;
}

EXPORT int cuStreamCreateWithPriority(CUstream* s, unsigned flags, int priority) {
    (void)priority;
    return cuStreamCreate(s, flags);
}

EXPORT int cuStreamDestroy_v2(CUstream s) {
    API(cuStreamDestroy_v2);
    CHECK(need_ctx());
    if (!g_streams.count(s)) {
        say("cuStreamDestroy: %p is not a live stream", (void*)s);
        return INVALID_HANDLE;
    }
    run_queue((uintptr_t)s);  // its work completes; the handle goes at once
    g_queues.erase((uintptr_t)s);
    g_streams.erase(s);
    delete s;
    return OK;
}

EXPORT int cuStreamSynchronize(CUstream s) {
    API(cuStreamSynchronize);
    CHECK(need_ctx_ok());
    if (!stream_ok(s, "cuStreamSynchronize")) return INVALID_HANDLE;
    uintptr_t v = (uintptr_t)s;
    if ((v > 2 && s->capturing) || ((v == 0 || v == 1) && g_global_captures > 0)) {
        say("cuStreamSynchronize of a capturing stream (or the legacy stream during a capture): not permitted; "
            "the capture is invalidated");
        invalidate_captures();
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    // The legacy stream's work waits for the blocking streams' earlier work: run theirs too.
    if (queue_key(s) == 0) run_all_queues();
    run_queue(queue_key(s));
    return sticky();
}

EXPORT int cuStreamQuery(CUstream s) {
    API(cuStreamQuery);
    CHECK(need_ctx_ok());
    if (!stream_ok(s, "cuStreamQuery")) return INVALID_HANDLE;
    run_queue(queue_key(s));  // "complete" must be true of what the host reads next
    return sticky();
}

static bool event_ok(CUevent e, const char* fn) {
    if (g_events.count(e)) return true;
    say("%s: %p is not a live event (destroyed?)", fn, (void*)e);
    return false;
}

EXPORT int cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    API(cuStreamWaitEvent);
    CHECK(need_ctx_ok());
    (void)flags;
    if (!stream_ok(s, "cuStreamWaitEvent") || !event_ok(e, "cuStreamWaitEvent")) return INVALID_HANDLE;
    // The waiting stream's later work follows the event's stream's work up to the record: run it
    // now (more order than a GPU gives, never less).
    if (!(queue_key(s) > 2 && s->capturing)) run_queue(e->queue);
    return OK;
}

EXPORT int cuEventCreate(CUevent* e, unsigned flags) {
    API(cuEventCreate);
    CHECK(need_ctx_ok());
    if (!e || flags > 0xf) return INVALID_VALUE;
    *e = new Event{flags};
    g_events.insert(*e);
    return OK;
}

EXPORT int cuEventDestroy_v2(CUevent e) {
    API(cuEventDestroy_v2);
    CHECK(need_ctx());
    if (!g_events.erase(e)) {
        say("cuEventDestroy: %p is not a live event (destroyed twice?)", (void*)e);
        return INVALID_HANDLE;
    }
    delete e;
    return OK;
}

EXPORT int cuEventRecord(CUevent e, CUstream s) {
    API(cuEventRecord);
    CHECK(need_ctx_ok());
    if (!event_ok(e, "cuEventRecord") || !stream_ok(s, "cuEventRecord")) return INVALID_HANDLE;
    e->queue = queue_key(s);
    return enqueue(s, "cuEventRecord", [e] {
        if (!g_events.count(e)) return (int)INVALID_HANDLE;
        e->recorded = true;
        e->t = now_ms();
        return (int)OK;
    });
}

EXPORT int cuEventSynchronize(CUevent e) {
    API(cuEventSynchronize);
    CHECK(need_ctx_ok());
    if (!event_ok(e, "cuEventSynchronize")) return INVALID_HANDLE;
    run_queue(e->queue);
    return sticky();
}

EXPORT int cuEventQuery(CUevent e) {
    API(cuEventQuery);
    CHECK(need_ctx_ok());
    if (!event_ok(e, "cuEventQuery")) return INVALID_HANDLE;
    run_queue(e->queue);
    return sticky();
}

static int elapsed(const char* fn, float* ms, CUevent a, CUevent b) {
    CHECK(need_ctx_ok());
    if (!ms) return INVALID_VALUE;
    if (!event_ok(a, fn) || !event_ok(b, fn)) return INVALID_HANDLE;
    run_queue(a->queue);
    run_queue(b->queue);
    if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) {
        say("%s: an event was created with CU_EVENT_DISABLE_TIMING", fn);
        return INVALID_HANDLE;
    }
    if (!a->recorded || !b->recorded) return NOT_READY;
    // Host time of the emulation: never a measure of GPU speed.
    *ms = (float)(b->t - a->t);
    return OK;
}
EXPORT int cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    API(cuEventElapsedTime);
    return elapsed("cuEventElapsedTime", ms, a, b);
}
EXPORT int cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    API(cuEventElapsedTime_v2);
    return elapsed("cuEventElapsedTime_v2", ms, a, b);
}

// ---------------------------------------------------------------- modules and launches
EXPORT int cuModuleLoadData(CUmodule* m, const void* image) {
    API(cuModuleLoadData);
    CHECK(need_ctx_ok());
    if (!m || !image) return INVALID_VALUE;
    const char* text = (const char*)image;
    if (memcmp(text, "\x7f" "ELF", 4) == 0) {
        say("cuModuleLoadData: a cubin/fatbin image; the emulator runs PTX only");
        return NOT_SUPPORTED;
    }
    std::vector<PtxEntry> entries;
    std::string why;
    if (!ptx_parse(text, &entries, &why)) {
        say("cuModuleLoadData: %s", why.c_str());
        return INVALID_PTX;
    }
    auto mod = std::make_unique<Module>();
    bool bad = false;
    for (auto& e : entries) {
        const KernelDef* def = nullptr;
        for (auto& k : kernel_table())
            if (e.name == k.name) def = &k;
        if (!def) {
            say("cuModuleLoadData: the PTX has .entry %s, which the emulator's build of the kernel sources does not "
                "have (it was built from other sources than the PTX: see CUDA_EMU_KERNELS in scripts/cuda-emu)",
                e.name.c_str());
            bad = true;
            continue;
        }
        bool same = e.params.size() == def->params.size();
        for (size_t i = 0; same && i < e.params.size(); i++) {
            const ParamInfo& p = e.params[i];
            const ParamInfo& c = def->params[i];
            if (p.size != c.size) same = false;
            bool pf = p.kind == ParamKind::Float, cf = c.kind == ParamKind::Float;
            if (pf != cf) same = false;
            if ((p.kind == ParamKind::Aggregate) != (c.kind == ParamKind::Aggregate)) same = false;
        }
        if (!same) {
            std::string ptx, cpp;
            for (auto& t : e.param_text) ptx += (ptx.empty() ? "" : ", ") + t;
            for (auto& c : def->params)
                cpp += (cpp.empty() ? "" : ", ") + std::string(kind_name(c.kind)) + "/" + std::to_string(c.size);
            say("cuModuleLoadData: .entry %s: the PTX parameters (%s) do not match the C++ build of the same "
                "kernel (%s)",
                e.name.c_str(), ptx.c_str(), cpp.c_str());
            bad = true;
            continue;
        }
        if (e.static_smem > 48 * 1024) {
            say("cuModuleLoadData: .entry %s uses %zu bytes of static shared memory (at most 48 KB)", e.name.c_str(),
                e.static_smem);
            bad = true;
            continue;
        }
        auto f = std::make_unique<Function>();
        f->def = def;
        f->entry = e;
        g_funcs.insert(f.get());
        mod->funcs.push_back(std::move(f));
    }
    if (bad) {
        for (auto& f : mod->funcs) g_funcs.erase(f.get());
        return INVALID_PTX;
    }
    *m = mod.release();
    g_modules.insert(*m);
    return OK;
}

EXPORT int cuModuleUnload(CUmodule m) {
    API(cuModuleUnload);
    CHECK(need_ctx());
    if (!g_modules.count(m)) {
        say("cuModuleUnload: %p is not a loaded module", (void*)m);
        return INVALID_HANDLE;
    }
    run_all_queues();  // queued launches of its kernels run first
    g_modules.erase(m);
    for (auto& f : m->funcs) g_funcs.erase(f.get());
    delete m;
    return OK;
}

EXPORT int cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    API(cuModuleGetFunction);
    CHECK(need_ctx_ok());
    if (!f || !name) return INVALID_VALUE;
    if (!g_modules.count(m)) {
        say("cuModuleGetFunction(%s): %p is not a loaded module", name, (void*)m);
        return INVALID_HANDLE;
    }
    for (auto& fn : m->funcs)
        if (fn->entry.name == name) {
            *f = fn.get();
            return OK;
        }
    return NOT_FOUND;
}

static bool func_ok(CUfunction f, const char* fn) {
    if (g_funcs.count(f)) return true;
    say("%s: %p is not a function of a loaded module (unloaded?)", fn, (void*)f);
    return false;
}

EXPORT int cuFuncGetAttribute(int* v, int attrib, CUfunction f) {
    API(cuFuncGetAttribute);
    CHECK(need_ctx_ok());
    if (!v) return INVALID_VALUE;
    if (!func_ok(f, "cuFuncGetAttribute")) return INVALID_HANDLE;
    const PtxEntry& e = f->entry;
    switch (attrib) {
        case 0: *v = e.maxntid[0] ? (int)(e.maxntid[0] * e.maxntid[1] * e.maxntid[2]) : 1024; break;
        case 1: *v = (int)e.static_smem; break;
        case 2: *v = 0; break;
        case 3: *v = 0; break;
        case 4: *v = 32; break;  // registers cannot be emulated: a plausible count
        case 5: *v = 90; break;
        case 6: *v = 90; break;
        case 8: *v = 0; break;
        default:
            say("cuFuncGetAttribute(%d): attribute not emulated", attrib);
            return INVALID_VALUE;
    }
    return OK;
}

EXPORT int cuFuncSetAttribute(CUfunction f, int attrib, int value) {
    API(cuFuncSetAttribute);
    CHECK(need_ctx_ok());
    if (!func_ok(f, "cuFuncSetAttribute")) return INVALID_HANDLE;
    say("cuFuncSetAttribute(%s, %d, %d): not emulated (dynamic shared memory opt-in is not supported)",
        f->def->name, attrib, value);
    return NOT_SUPPORTED;
}

EXPORT int cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                          unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    API(cuLaunchKernel);
    CHECK(need_ctx_ok());
    if (!func_ok(f, "cuLaunchKernel")) return INVALID_HANDLE;
    if (!stream_ok(s, "cuLaunchKernel")) return INVALID_HANDLE;
    if (extra) {
        say("cuLaunchKernel(%s): the `extra` parameter form is not emulated (pass kernelParams)", f->def->name);
        return INVALID_VALUE;
    }
    Dim3 grid{gx, gy, gz}, block{bx, by, bz};
    // Refused now if it would be refused; run later (when the stream's work runs, or at every
    // replay of a captured graph) with the arguments of now: copied, the launch owns them.
    CHECK(launch_validate(f, grid, block, smem, params));
    std::vector<std::vector<char>> args;
    for (size_t i = 0; i < f->def->params.size(); i++)
        args.emplace_back((const char*)params[i], (const char*)params[i] + f->def->params[i].size);
    const char* kname = f->def->name;  // static: outlives an unloaded module
    return enqueue(s, "cuLaunchKernel", [f, kname, grid, block, smem, args]() mutable {
        if (!g_funcs.count(f)) {
            say("%s: the kernel's module was unloaded before it ran", kname);
            return (int)INVALID_HANDLE;
        }
        std::vector<void*> p;
        for (auto& a : args) p.push_back(a.data());
        return launch(f, grid, block, smem, p.data());
    });
}

// ---------------------------------------------------------------- stream capture and graphs
EXPORT int cuStreamBeginCapture_v2(CUstream s, int mode) {
    API(cuStreamBeginCapture_v2);
    CHECK(need_ctx_ok());
    uintptr_t v = (uintptr_t)s;
    if (v <= 2) {
        say("cuStreamBeginCapture: the legacy/per-thread default stream cannot be captured; create a stream "
            "(cuStreamCreate) and launch on it");
        return STREAM_CAPTURE_UNSUPPORTED;
    }
    if (!stream_ok(s, "cuStreamBeginCapture")) return INVALID_HANDLE;
    if (mode < 0 || mode > 2) return INVALID_VALUE;
    if (s->capturing) {
        say("cuStreamBeginCapture: the stream is already capturing");
        return ILLEGAL_STATE;
    }
    s->capturing = true;
    s->invalidated = false;
    s->mode = mode;
    s->graph = std::make_shared<GraphData>();
    if (mode != 2) g_global_captures++;
    return OK;
}

EXPORT int cuStreamEndCapture(CUstream s, CUgraph* out) {
    API(cuStreamEndCapture);
    CHECK(need_ctx());
    if (!out) return INVALID_VALUE;
    uintptr_t v = (uintptr_t)s;
    if (v <= 2 || !stream_ok(s, "cuStreamEndCapture") || !s->capturing) {
        say("cuStreamEndCapture: the stream is not capturing");
        return ILLEGAL_STATE;
    }
    s->capturing = false;
    if (s->mode != 2) g_global_captures--;
    auto data = std::move(s->graph);
    if (s->invalidated) {
        *out = nullptr;
        return STREAM_CAPTURE_INVALIDATED;
    }
    Graph* g = new Graph{data};
    g_graphs.insert(g);
    *out = g;
    return OK;
}

EXPORT int cuStreamIsCapturing(CUstream s, int* status) {
    API(cuStreamIsCapturing);
    CHECK(need_ctx());
    if (!status) return INVALID_VALUE;
    uintptr_t v = (uintptr_t)s;
    if (v <= 2) {
        *status = 0;
        return g_global_captures > 0 && v != 2 ? STREAM_CAPTURE_IMPLICIT : OK;
    }
    if (!stream_ok(s, "cuStreamIsCapturing")) return INVALID_HANDLE;
    *status = !s->capturing ? 0 : s->invalidated ? 2 : 1;  // NONE, ACTIVE, INVALIDATED
    return OK;
}

EXPORT int cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph g, unsigned long long flags) {
    API(cuGraphInstantiateWithFlags);
    CHECK(need_ctx_ok());
    (void)flags;
    if (!out) return INVALID_VALUE;
    if (!g_graphs.count(g)) {
        say("cuGraphInstantiate: %p is not a live graph", (void*)g);
        return INVALID_HANDLE;
    }
    GraphExec* e = new GraphExec{g->data};
    g_execs.insert(e);
    *out = e;
    return OK;
}

EXPORT int cuGraphUpload(CUgraphExec e, CUstream s) {
    API(cuGraphUpload);
    CHECK(need_ctx_ok());
    if (!g_execs.count(e) || !stream_ok(s, "cuGraphUpload")) return INVALID_HANDLE;
    return OK;
}

EXPORT int cuGraphLaunch(CUgraphExec e, CUstream s) {
    API(cuGraphLaunch);
    CHECK(need_ctx_ok());
    if (!g_execs.count(e)) {
        say("cuGraphLaunch: %p is not a live executable graph", (void*)e);
        return INVALID_HANDLE;
    }
    if (!stream_ok(s, "cuGraphLaunch")) return INVALID_HANDLE;
    auto data = e->data;
    return enqueue(
        s, "cuGraphLaunch",
        [data] {
        // A replayed operation that fails is a fault of the running graph: sticky.
        for (auto& op : data->ops) {
            if (int r = op()) {
                say("cuGraphLaunch: a captured operation failed at replay (%s)", result_name(r));
                set_sticky(r == ILLEGAL_ADDRESS || r == LAUNCH_FAILED ? r : ILLEGAL_ADDRESS);
                return (int)OK;
            }
            if (sticky()) return (int)OK;
        }
        return (int)OK;
        },
        data->collective);  // a replay holding collectives runs now (see enqueue)
}

EXPORT int cuGraphExecDestroy(CUgraphExec e) {
    API(cuGraphExecDestroy);
    CHECK(need_ctx());
    if (!g_execs.erase(e)) {
        say("cuGraphExecDestroy: %p is not a live executable graph", (void*)e);
        return INVALID_HANDLE;
    }
    delete e;
    return OK;
}

EXPORT int cuGraphDestroy(CUgraph g) {
    API(cuGraphDestroy);
    CHECK(need_ctx());
    if (!g_graphs.erase(g)) {
        say("cuGraphDestroy: %p is not a live graph", (void*)g);
        return INVALID_HANDLE;
    }
    delete g;
    return OK;
}

// NVRTC looks for private driver tables through this (it dlopens libcuda itself): there are
// none here, which NVRTC handles by compiling without them.
EXPORT int cuGetExportTable(const void** table, const void* uuid) {
    API(cuGetExportTable);
    (void)uuid;
    if (table) *table = nullptr;
    return NOT_FOUND;
}
