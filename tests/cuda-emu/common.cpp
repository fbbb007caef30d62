// Configuration, messages, call counters and the sticky error.
#include <sys/time.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "emu.h"

namespace emu {

const char* result_name(int r) {
    switch (r) {
        case OK: return "CUDA_SUCCESS";
        case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case DEINITIALIZED: return "CUDA_ERROR_DEINITIALIZED";
        case NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case INVALID_PTX: return "CUDA_ERROR_INVALID_PTX";
        case INVALID_SOURCE: return "CUDA_ERROR_INVALID_SOURCE";
        case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
        case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case NOT_READY: return "CUDA_ERROR_NOT_READY";
        case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case STREAM_CAPTURE_IMPLICIT: return "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}

const char* result_string(int r) {
    switch (r) {
        case OK: return "no error";
        case INVALID_VALUE: return "invalid argument";
        case OUT_OF_MEMORY: return "out of memory";
        case NOT_INITIALIZED: return "initialization error";
        case DEINITIALIZED: return "driver shutting down";
        case NO_DEVICE: return "no CUDA-capable device is detected";
        case INVALID_DEVICE: return "invalid device ordinal";
        case INVALID_IMAGE: return "device kernel image is invalid";
        case INVALID_CONTEXT: return "invalid device context";
        case INVALID_PTX: return "a PTX JIT compilation failed";
        case INVALID_SOURCE: return "device kernel image is invalid";
        case INVALID_HANDLE: return "invalid resource handle";
        case ILLEGAL_STATE: return "the operation cannot be performed in the present state";
        case NOT_FOUND: return "named symbol not found";
        case NOT_READY: return "device not ready";
        case ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case LAUNCH_OUT_OF_RESOURCES: return "too many resources requested for launch";
        case LAUNCH_FAILED: return "unspecified launch failure";
        case NOT_SUPPORTED: return "operation not supported";
        case STREAM_CAPTURE_UNSUPPORTED: return "operation not permitted when stream is capturing";
        case STREAM_CAPTURE_INVALIDATED: return "operation failed due to a previous error during capture";
        case STREAM_CAPTURE_IMPLICIT: return "operation would make the legacy stream depend on a capturing blocking stream";
        default: return "unknown error";
    }
}

void say(const char* fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    // One write per message: ranks of an MPI job do not interleave within a line.
    std::string line = std::string("cuda-emu: ") + buf + "\n";
    ssize_t r = write(2, line.data(), line.size());
    (void)r;
}

static uint64_t env_u64(const char* name, uint64_t dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    char* end = nullptr;
    unsigned long long x = strtoull(v, &end, 10);
    if (*end) {
        say("%s=%s is not a whole number", name, v);
        _exit(2);
    }
    return x;
}

const Config& config() {
    // Never destroyed: the exit-time stats writer still reads it.
    static const Config& c = *new Config([] {
        Config c;
        const char* gb = getenv("CUDA_EMU_MEMORY_GB");
        double g = 4.0;
        if (gb && *gb) {
            char* end = nullptr;
            g = strtod(gb, &end);
            if (*end || !(g > 0)) {
                say("CUDA_EMU_MEMORY_GB=%s is not a positive number of GB", gb);
                _exit(2);
            }
        }
        c.total_bytes = (uint64_t)(g * 1e9);
        c.devices = (int)env_u64("CUDA_EMU_DEVICES", 1);
        c.pools = env_u64("CUDA_EMU_POOLS", 1) != 0;
        // CUDA_LAUNCH_BLOCKING=1 makes a real driver run each launch before returning: so here.
        c.sync = env_u64("CUDA_EMU_SYNC", 0) != 0 || env_u64("CUDA_LAUNCH_BLOCKING", 0) != 0;
        const char* s = getenv("CUDA_EMU_STATS");
        if (s) c.stats_path = s;
        return c;
    }());
    return c;
}

uint64_t seed() {
    static uint64_t s = [] {
        const char* v = getenv("CUDA_EMU_SEED");
        if (v && *v) return env_u64("CUDA_EMU_SEED", 0);
        struct timeval tv;
        gettimeofday(&tv, nullptr);
        return (uint64_t)tv.tv_sec * 1000003u ^ (uint64_t)tv.tv_usec * 7919u ^ (uint64_t)getpid();
    }();
    return s;
}

std::recursive_mutex& api_lock() {
    static std::recursive_mutex m;
    return m;
}

static Counter* g_counters = nullptr;

Counter::Counter(const char* n) : name(n) {
    // Function-local statics are constructed under the C++ init guard; the list is only
    // read at exit.
    next = __atomic_exchange_n(&g_counters, this, __ATOMIC_ACQ_REL);
}

namespace {
struct StatsWriter {
    ~StatsWriter() {
        const std::string& path = config().stats_path;
        if (path.empty()) return;
        // "%p" in the name becomes the process id (one file per MPI rank).
        std::string p;
        for (size_t i = 0; i < path.size(); i++) {
            if (path[i] == '%' && i + 1 < path.size() && path[i + 1] == 'p') {
                p += std::to_string(getpid());
                i++;
            } else {
                p += path[i];
            }
        }
        FILE* f = fopen(p.c_str(), "w");
        if (!f) {
            say("CUDA_EMU_STATS: cannot write %s: %s", p.c_str(), strerror(errno));
            return;
        }
        std::vector<Counter*> all;
        for (Counter* c = __atomic_load_n(&g_counters, __ATOMIC_ACQUIRE); c; c = c->next)
            all.push_back(c);
        // Sorted by name: stable files for diffs.
        for (size_t i = 1; i < all.size(); i++)
            for (size_t j = i; j > 0 && strcmp(all[j - 1]->name, all[j]->name) > 0; j--)
                std::swap(all[j - 1], all[j]);
        fprintf(f, "{\"emulated\": true, \"calls\": {");
        bool first = true;
        for (Counter* c : all) {
            if (!c->n) continue;
            fprintf(f, "%s\"%s\": %llu", first ? "" : ", ", c->name, (unsigned long long)c->n);
            first = false;
        }
        fprintf(f, "}, \"peak_device_bytes\": %llu, \"device_bytes\": %llu}\n", (unsigned long long)mem_peak(),
                (unsigned long long)config().total_bytes);
        fclose(f);
    }
} g_stats_writer;
}  // namespace

static int g_sticky = 0;
int sticky() { return __atomic_load_n(&g_sticky, __ATOMIC_ACQUIRE); }
void set_sticky(int r) {
    int zero = 0;
    __atomic_compare_exchange_n(&g_sticky, &zero, r, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

void clear_sticky() { __atomic_store_n(&g_sticky, 0, __ATOMIC_RELEASE); }

double now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

}  // namespace emu
