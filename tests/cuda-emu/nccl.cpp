// The NCCL subset herd uses (libnccl.so), across separate processes (the MPI ranks of one
// replica): a POSIX shared-memory segment named by the unique id holds one staging slot per rank
// and a process-shared barrier. Every collective first checks that all ranks called the same
// operation with the same count and type (a protocol error is reported, not hung on), then moves
// the data in slot-sized chunks. Reductions add the ranks in rank order, so every rank gets
// bit-identical results.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <new>
#include <functional>
#include <memory>
#include <set>
#include <string>

#include "emu.h"

using namespace emu;

#define EXPORT extern "C" __attribute__((visibility("default")))
#define API(NAME)      \
    EMU_COUNT(#NAME);  \
    std::lock_guard<std::recursive_mutex> lock_(api_lock())

namespace {

enum NcclResult {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};
enum DType { Int8 = 0, Uint8, Int32, Uint32, Int64, Uint64, Float16, Float32, Float64, Bfloat16 };
enum RedOp { Sum = 0, Prod, Max, Min, Avg };
enum Coll { ALL_REDUCE = 1, ALL_GATHER = 2, BROADCAST = 3 };

constexpr int MAX_RANKS = 64;
constexpr size_t SLOT = 4 << 20;  // staging bytes per rank
constexpr uint64_t MAGIC = 0x6c63636e2d756d65ull;

struct OpDesc {
    uint64_t seq;
    uint32_t coll, dtype, op, root;
    uint64_t count;
};
struct Header {
    std::atomic<uint64_t> magic;
    int32_t nranks;
    std::atomic<uint32_t> arrived;
    std::atomic<uint32_t> generation;
    std::atomic<uint32_t> attached;
    std::atomic<int32_t> failed;  // a rank gave up: the others stop waiting
    OpDesc ops[MAX_RANKS];
    // Where each rank runs: NCCL refuses two ranks of one communicator on one GPU.
    int32_t device[MAX_RANKS];
    char host[MAX_RANKS][64];
};

struct Comm {
    int rank, nranks;
    Header* hdr;
    char* slots;
    size_t map_len;
    uint64_t seq = 0;
    std::string name;
};
std::set<Comm*> g_comms;

size_t dtype_size(uint32_t t) {
    switch (t) {
        case Int8: case Uint8: return 1;
        case Float16: case Bfloat16: return 2;
        case Int32: case Uint32: case Float32: return 4;
        case Int64: case Uint64: case Float64: return 8;
        default: return 0;
    }
}
const char* dtype_name(uint32_t t) {
    static const char* n[] = {"int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64", "bfloat16"};
    return t < 10 ? n[t] : "?";
}
const char* coll_name(uint32_t c) {
    return c == ALL_REDUCE ? "ncclAllReduce" : c == ALL_GATHER ? "ncclAllGather" : c == BROADCAST ? "ncclBroadcast" : "?";
}

double timeout_s() {
    const char* v = getenv("CUDA_EMU_NCCL_TIMEOUT");
    return v && *v ? atof(v) : 300.0;
}

void backoff(unsigned* spins) {
    if (++*spins < 64) return;
    struct timespec ts = {0, *spins < 1000 ? 20000 : 200000};
    nanosleep(&ts, nullptr);
}

// All ranks meet; false (with a message) on timeout or when a peer gave up.
bool barrier(Comm* c, const char* what) {
    Header* h = c->hdr;
    uint32_t gen = h->generation.load(std::memory_order_acquire);
    if (h->arrived.fetch_add(1, std::memory_order_acq_rel) == (uint32_t)c->nranks - 1) {
        h->arrived.store(0, std::memory_order_relaxed);
        h->generation.fetch_add(1, std::memory_order_acq_rel);
        return true;
    }
    double t0 = now_ms(), limit = timeout_s() * 1e3;
    unsigned spins = 0;
    while (h->generation.load(std::memory_order_acquire) == gen) {
        if (h->failed.load(std::memory_order_acquire) >= 0) {
            say("NCCL rank %d: %s: rank %d gave up; stopping too", c->rank, what, h->failed.load());
            return false;
        }
        if (now_ms() - t0 > limit) {
            say("NCCL rank %d: %s: the other ranks did not arrive within %.0f s (CUDA_EMU_NCCL_TIMEOUT)", c->rank,
                what, timeout_s());
            int32_t none = -1;
            h->failed.compare_exchange_strong(none, c->rank);
            return false;
        }
        backoff(&spins);
    }
    return true;
}

// Every rank's description of the call must agree.
int agree(Comm* c, OpDesc d, const char* what) {
    d.seq = ++c->seq;
    c->hdr->ops[c->rank] = d;
    if (!barrier(c, what)) return ncclSystemError;
    for (int r = 0; r < c->nranks; r++) {
        const OpDesc& o = c->hdr->ops[r];
        if (o.seq != d.seq || o.coll != d.coll || o.dtype != d.dtype || o.count != d.count || o.op != d.op ||
            o.root != d.root) {
            say("NCCL rank %d: collective #%" PRIu64 " is %s(count %" PRIu64 ", %s, op %u) here but rank %d called "
                "collective #%" PRIu64 " %s(count %" PRIu64 ", %s, op %u): the ranks disagree",
                c->rank, d.seq, coll_name(d.coll), d.count, dtype_name(d.dtype), d.op, r, o.seq, coll_name(o.coll),
                o.count, dtype_name(o.dtype), o.op);
            int32_t none = -1;
            c->hdr->failed.compare_exchange_strong(none, c->rank);
            return ncclInvalidUsage;
        }
    }
    // Nobody rewrites its descriptor before all have compared.
    if (!barrier(c, what)) return ncclSystemError;
    return ncclSuccess;
}

bool live(Comm* c, const char* fn) {
    if (g_comms.count(c)) return true;
    say("%s: %p is not a live communicator (destroyed or aborted?)", fn, (void*)c);
    return false;
}

bool dev_range(const char* fn, const char* what, const void* p, size_t bytes) {
    std::string why;
    if (bytes && !mem_check((uintptr_t)p, bytes, &why)) {
        say("%s: %s (%zu bytes): %s", fn, what, bytes, why.c_str());
        return false;
    }
    return true;
}

float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

template <typename T>
T apply(uint32_t op, T a, T b) {
    switch (op) {
        case Prod: return a * b;
        case Max: return a > b ? a : b;
        case Min: return a < b ? a : b;
        default: return a + b;
    }
}

// out[i] = reduce over ranks (in rank order) of slot_r[i], for `n` elements.
template <typename T>
void reduce_typed(Comm* c, uint32_t op, size_t n, T* out) {
    for (size_t i = 0; i < n; i++) {
        T acc = ((const T*)c->slots)[i];
        for (int r = 1; r < c->nranks; r++) acc = apply(op, acc, ((const T*)(c->slots + r * SLOT))[i]);
        if (op == Avg) acc = acc / (T)c->nranks;
        out[i] = acc;
    }
}

void reduce_chunk(Comm* c, uint32_t dtype, uint32_t op, size_t n, void* out) {
    switch (dtype) {
        case Float32: reduce_typed(c, op, n, (float*)out); break;
        case Float64: reduce_typed(c, op, n, (double*)out); break;
        case Int32: reduce_typed(c, op, n, (int32_t*)out); break;
        case Uint32: reduce_typed(c, op, n, (uint32_t*)out); break;
        case Int64: reduce_typed(c, op, n, (int64_t*)out); break;
        case Uint64: reduce_typed(c, op, n, (uint64_t*)out); break;
        case Bfloat16:
            for (size_t i = 0; i < n; i++) {
                float acc = bf16_to_f32(((const uint16_t*)c->slots)[i]);
                for (int r = 1; r < c->nranks; r++)
                    acc = apply(op, acc, bf16_to_f32(((const uint16_t*)(c->slots + r * SLOT))[i]));
                if (op == Avg) acc /= (float)c->nranks;
                ((uint16_t*)out)[i] = f32_to_bf16(acc);
            }
            break;
    }
}

// Run a collective on its stream: now, or at every replay of a captured graph (a failure there
// is a fault of the graph). NCCL codes pass through; a capture error becomes ncclInvalidUsage.
int on_stream(void* stream, const char* fn, std::function<int()> op) {
    // Shared: a recorded collective outlives this call.
    auto nccl_rc = std::make_shared<int>(ncclSuccess);
    // Run now (after the stream's earlier work): a collective waits for its peers, and a peer
    // waiting in MPI for this process must not wait on work this process has not flushed.
    int r = enqueue(
        stream, fn,
        [op, fn, nccl_rc]() mutable {
        *nccl_rc = op();
        if (*nccl_rc != ncclSuccess) {
            say("%s failed (%s)", fn, *nccl_rc == ncclInvalidUsage ? "the ranks disagree" : "see above");
            return (int)ILLEGAL_ADDRESS;
        }
        return (int)OK;
        },
        true);
    if (r == OK) return *nccl_rc;
    return *nccl_rc != ncclSuccess ? *nccl_rc : ncclInvalidUsage;
}

}  // namespace

EXPORT const char* ncclGetErrorString(int r) {
    API(ncclGetErrorString);
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
        case ncclSystemError: return "unhandled system error (cuda-emu: see its message on stderr)";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument (cuda-emu: see its message on stderr)";
        case ncclInvalidUsage: return "invalid usage (cuda-emu: see its message on stderr)";
        case ncclRemoteError: return "remote process exited or there was a network error";
        default: return "unknown result code";
    }
}

EXPORT int ncclGetVersion(int* v) {
    API(ncclGetVersion);
    if (!v) return ncclInvalidArgument;
    *v = 22800;
    return ncclSuccess;
}

EXPORT int ncclGetUniqueId(char* id) {
    API(ncclGetUniqueId);
    if (!id) return ncclInvalidArgument;
    memset(id, 0, 128);
    static unsigned counter = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(id, 128, "/cuda-emu-nccl-%d-%u-%lx", (int)getpid(), ++counter, (unsigned long)ts.tv_nsec);
    return ncclSuccess;
}

// ncclUniqueId (128 bytes) is passed by value: the struct itself in the signature.
struct UniqueId {
    char internal[128];
};

EXPORT int ncclCommInitRank(Comm** out, int nranks, UniqueId id, int rank) {
    API(ncclCommInitRank);
    const char* fn = "ncclCommInitRank";
    if (!out || nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks) {
        say("%s: rank %d of %d (at most %d ranks)", fn, rank, nranks, MAX_RANKS);
        return ncclInvalidArgument;
    }
    if (sticky()) return ncclUnhandledCudaError;
    std::string name(id.internal, strnlen(id.internal, sizeof id.internal));
    if (name.rfind("/cuda-emu-nccl-", 0) != 0) {
        say("%s: the unique id was not made by ncclGetUniqueId of the emulator (\"%.20s\")", fn, name.c_str());
        return ncclInvalidArgument;
    }
    size_t len = sizeof(Header) + (size_t)nranks * SLOT;
    len = (len + 4095) / 4096 * 4096;
    int fd = -1;
    double t0 = now_ms(), limit = timeout_s() * 1e3;
    if (rank == 0) {
        fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0 || ftruncate(fd, (off_t)len) != 0) {
            say("%s: cannot create shared memory %s: %s", fn, name.c_str(), strerror(errno));
            if (fd >= 0) close(fd);
            return ncclSystemError;
        }
    } else {
        // Wait for rank 0 to create it.
        unsigned spins = 0;
        for (;;) {
            fd = shm_open(name.c_str(), O_RDWR, 0600);
            struct stat st;
            if (fd >= 0 && fstat(fd, &st) == 0 && (size_t)st.st_size == len) break;
            if (fd >= 0) close(fd);
            if (now_ms() - t0 > limit) {
                say("%s: rank %d: rank 0 did not create %s within %.0f s", fn, rank, name.c_str(), timeout_s());
                return ncclSystemError;
            }
            backoff(&spins);
        }
    }
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        say("%s: cannot map %s: %s", fn, name.c_str(), strerror(errno));
        return ncclSystemError;
    }
    Header* h = (Header*)m;
    if (rank == 0) {
        new (&h->arrived) std::atomic<uint32_t>(0);
        new (&h->generation) std::atomic<uint32_t>(0);
        new (&h->attached) std::atomic<uint32_t>(0);
        new (&h->failed) std::atomic<int32_t>(-1);
        h->nranks = nranks;
        h->magic.store(MAGIC, std::memory_order_release);
    } else {
        unsigned spins = 0;
        while (h->magic.load(std::memory_order_acquire) != MAGIC) {
            if (now_ms() - t0 > limit) {
                say("%s: rank %d: %s was never initialised by rank 0", fn, rank, name.c_str());
                munmap(m, len);
                return ncclSystemError;
            }
            backoff(&spins);
        }
        if (h->nranks != nranks) {
            say("%s: rank %d says there are %d ranks, rank 0 says %d", fn, rank, nranks, h->nranks);
            munmap(m, len);
            return ncclInvalidArgument;
        }
    }
    Comm* c = new Comm{rank, nranks, h, (char*)m + sizeof(Header), len};
    c->name = name;
    h->device[rank] = current_device();
    gethostname(h->host[rank], sizeof h->host[rank] - 1);
    if (!barrier(c, "ncclCommInitRank")) {
        munmap(m, len);
        delete c;
        return ncclSystemError;
    }
    // As NCCL: "Duplicate GPU detected" when two ranks share a device on one host (every rank
    // sees every pair, so all of them fail together).
    for (int a = 0; a < nranks; a++)
        for (int b = a + 1; b < nranks; b++) {
            if (h->device[a] != h->device[b] || strcmp(h->host[a], h->host[b]) != 0) continue;
            if (rank == a || rank == b)
                say("%s: Duplicate GPU detected : rank %d and rank %d both on CUDA device %d of %s", fn, a, b,
                    h->device[a], h->host[a]);
            if (rank == 0) shm_unlink(name.c_str());
            munmap(m, len);
            delete c;
            return ncclInvalidUsage;
        }
    // Everyone has it mapped: the name can go (no file is left behind, even after a crash).
    if (rank == 0) shm_unlink(name.c_str());
    g_comms.insert(c);
    *out = c;
    return ncclSuccess;
}

static int destroy(Comm* c, const char* fn) {
    if (!live(c, fn)) return ncclInvalidArgument;
    g_comms.erase(c);
    munmap(c->hdr, c->map_len);
    delete c;
    return ncclSuccess;
}

EXPORT int ncclCommDestroy(Comm* c) {
    API(ncclCommDestroy);
    return destroy(c, "ncclCommDestroy");
}

EXPORT int ncclCommAbort(Comm* c) {
    API(ncclCommAbort);
    int r = destroy(c, "ncclCommAbort");
    // NCCL frees the communicator, but reports the CUDA error it met doing so (a faulted
    // context's streams cannot be synchronized).
    if (r == ncclSuccess && sticky()) return ncclUnhandledCudaError;
    return r;
}

EXPORT int ncclCommFinalize(Comm* c) {
    API(ncclCommFinalize);
    return live(c, "ncclCommFinalize") ? ncclSuccess : ncclInvalidArgument;
}

EXPORT int ncclCommCount(const Comm* c, int* n) {
    API(ncclCommCount);
    if (!live((Comm*)c, "ncclCommCount") || !n) return ncclInvalidArgument;
    *n = c->nranks;
    return ncclSuccess;
}

EXPORT int ncclCommUserRank(const Comm* c, int* r) {
    API(ncclCommUserRank);
    if (!live((Comm*)c, "ncclCommUserRank") || !r) return ncclInvalidArgument;
    *r = c->rank;
    return ncclSuccess;
}

EXPORT int ncclGroupStart() {
    API(ncclGroupStart);
    return ncclSuccess;
}

EXPORT int ncclGroupEnd() {
    API(ncclGroupEnd);
    return ncclSuccess;
}

EXPORT int ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, Comm* c, void* stream) {
    API(ncclAllReduce);
    const char* fn = "ncclAllReduce";
    (void)stream;
    if (!live(c, fn)) return ncclInvalidArgument;
    if (sticky()) return ncclUnhandledCudaError;
    size_t es = dtype_size((uint32_t)dtype);
    if (!es || dtype == Float16 || dtype == Int8 || dtype == Uint8 || op < Sum || op > Avg) {
        say("%s: data type %d / reduction %d is not emulated (float32, float64, bfloat16 and 32/64-bit integers; "
            "sum, prod, max, min, avg)",
            fn, dtype, op);
        return ncclInvalidArgument;
    }
    if (!dev_range(fn, "send buffer", send, count * es) || !dev_range(fn, "receive buffer", recv, count * es))
        return ncclInvalidArgument;
    return on_stream(stream, fn, [=] {
        if (int r = agree(c, OpDesc{0, ALL_REDUCE, (uint32_t)dtype, (uint32_t)op, 0, count}, fn)) return r;
        size_t per = SLOT / es;
        for (size_t off = 0; off < count; off += per) {
            size_t n = count - off < per ? count - off : per;
            memcpy(c->slots + c->rank * SLOT, (const char*)send + off * es, n * es);
            if (!barrier(c, fn)) return (int)ncclSystemError;
            reduce_chunk(c, (uint32_t)dtype, (uint32_t)op, n, (char*)recv + off * es);
            if (!barrier(c, fn)) return (int)ncclSystemError;
        }
        return (int)ncclSuccess;
    });
}

EXPORT int ncclAllGather(const void* send, void* recv, size_t count, int dtype, Comm* c, void* stream) {
    API(ncclAllGather);
    const char* fn = "ncclAllGather";
    (void)stream;
    if (!live(c, fn)) return ncclInvalidArgument;
    if (sticky()) return ncclUnhandledCudaError;
    size_t es = dtype_size((uint32_t)dtype);
    if (!es) {
        say("%s: data type %d is not an NCCL type", fn, dtype);
        return ncclInvalidArgument;
    }
    if (!dev_range(fn, "send buffer", send, count * es) ||
        !dev_range(fn, "receive buffer", recv, count * es * (size_t)c->nranks))
        return ncclInvalidArgument;
    return on_stream(stream, fn, [=] {
        if (int r = agree(c, OpDesc{0, ALL_GATHER, (uint32_t)dtype, 0, 0, count}, fn)) return r;
        size_t per = SLOT / es;
        for (size_t off = 0; off < count; off += per) {
            size_t n = count - off < per ? count - off : per;
            memcpy(c->slots + c->rank * SLOT, (const char*)send + off * es, n * es);
            if (!barrier(c, fn)) return (int)ncclSystemError;
            for (int r = 0; r < c->nranks; r++)
                memcpy((char*)recv + ((size_t)r * count + off) * es, c->slots + r * SLOT, n * es);
            if (!barrier(c, fn)) return (int)ncclSystemError;
        }
        return (int)ncclSuccess;
    });
}

EXPORT int ncclBroadcast(const void* send, void* recv, size_t count, int dtype, int root, Comm* c, void* stream) {
    API(ncclBroadcast);
    const char* fn = "ncclBroadcast";
    (void)stream;
    if (!live(c, fn)) return ncclInvalidArgument;
    if (sticky()) return ncclUnhandledCudaError;
    size_t es = dtype_size((uint32_t)dtype);
    if (!es || root < 0 || root >= c->nranks) {
        say("%s: data type %d / root %d invalid", fn, dtype, root);
        return ncclInvalidArgument;
    }
    if ((c->rank == root && !dev_range(fn, "send buffer", send, count * es)) ||
        !dev_range(fn, "receive buffer", recv, count * es))
        return ncclInvalidArgument;
    return on_stream(stream, fn, [=] {
        if (int r = agree(c, OpDesc{0, BROADCAST, (uint32_t)dtype, 0, (uint32_t)root, count}, fn)) return r;
        size_t per = SLOT / es;
        for (size_t off = 0; off < count; off += per) {
            size_t n = count - off < per ? count - off : per;
            if (c->rank == root) memcpy(c->slots, (const char*)send + off * es, n * es);
            if (!barrier(c, fn)) return (int)ncclSystemError;
            memcpy((char*)recv + off * es, c->slots, n * es);
            if (!barrier(c, fn)) return (int)ncclSystemError;
        }
        return (int)ncclSuccess;
    });
}
