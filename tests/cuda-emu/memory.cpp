// Device memory: every allocation is its own mapping, right-aligned against a PROT_NONE guard
// page, so a kernel that runs past the end faults (and is reported) instead of corrupting a
// neighbour. Fresh memory is poisoned with 0xFF bytes (NaN as f32, f64 and bf16). Freed memory is
// made PROT_NONE and kept reserved for a while, so a use after free faults too.
#include <sys/mman.h>
#include <unistd.h>

#include <cinttypes>
#include <cstring>
#include <deque>
#include <map>

#include "emu.h"

namespace emu {

namespace {

constexpr size_t ALIGN = 256;          // cudaMalloc's guarantee
constexpr unsigned char POISON = 0xFF;  // NaN in every float format herd uses
constexpr unsigned char CANARY = 0xA5;  // past the end, before the guard page
constexpr size_t QUARANTINE = 4096;     // freed mappings kept PROT_NONE before unmapping

size_t page() {
    static size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

struct Freed {
    uintptr_t base;
    size_t size;
    uint64_t serial;
};

std::map<uintptr_t, Alloc> g_live;  // by base
std::deque<Alloc> g_quarantine;     // freed, still reserved (PROT_NONE)
std::map<uintptr_t, Freed> g_freed;  // recently freed ranges, for messages
uint64_t g_used = 0;
uint64_t g_peak = 0;
uint64_t g_serial = 0;

const Alloc* find_live(uintptr_t p) {
    auto it = g_live.upper_bound(p);
    if (it == g_live.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    if (p >= a.base && p < a.base + a.size) return &a;
    return nullptr;
}

// The live allocation whose mapping (including slack) holds p.
const Alloc* find_mapping(uintptr_t p) {
    auto it = g_live.upper_bound(p);
    if (it == g_live.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    if (p >= a.base && p < a.base + a.size + a.slack + page()) return &a;
    return nullptr;
}

const Freed* find_freed(uintptr_t p) {
    auto it = g_freed.upper_bound(p);
    if (it == g_freed.begin()) return nullptr;
    --it;
    if (p >= it->second.base && p < it->second.base + it->second.size) return &it->second;
    return nullptr;
}

}  // namespace

uint64_t mem_used() { return g_used; }
uint64_t mem_peak() { return g_peak; }

int mem_alloc(uintptr_t* out, size_t bytes, bool pooled) {
    if (bytes == 0) {
        say("cuMemAlloc%s of 0 bytes: CUDA refuses it (CUDA_ERROR_INVALID_VALUE)",
            pooled ? "Async" : "");
        return INVALID_VALUE;
    }
    const uint64_t total = config().total_bytes;
    if (g_used + bytes > total || bytes > total) {
        // Not an emulator error: the caller is told, as a GPU would tell it.
        return OUT_OF_MEMORY;
    }
    size_t rounded = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    size_t data_pages = (rounded + page() - 1) / page() * page();
    size_t map_len = data_pages + page();
    void* m = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    uintptr_t guard = (uintptr_t)m + data_pages;
    if (mprotect((void*)guard, page(), PROT_NONE) != 0) {
        munmap(m, map_len);
        return OUT_OF_MEMORY;
    }
    Alloc a;
    a.base = guard - rounded;
    a.size = bytes;
    a.slack = rounded - bytes;
    a.map = m;
    a.map_len = map_len;
    a.serial = ++g_serial;
    a.pooled = pooled;
    memset((void*)a.base, POISON, bytes);
    memset((void*)(a.base + bytes), CANARY, a.slack);
    g_freed.erase(a.base);
    g_live[a.base] = a;
    g_used += bytes;
    if (g_used > g_peak) g_peak = g_used;
    *out = a.base;
    return OK;
}

int mem_free(uintptr_t ptr, bool pooled) {
    auto it = g_live.find(ptr);
    if (it == g_live.end()) {
        const Freed* f = find_freed(ptr);
        if (f && f->base == ptr)
            say("cuMemFree%s(0x%" PRIxPTR "): allocation #%" PRIu64 " was already freed (double free)",
                pooled ? "Async" : "", ptr, f->serial);
        else
            say("cuMemFree%s(0x%" PRIxPTR "): not the start of a live allocation (%s)",
                pooled ? "Async" : "", ptr, mem_describe(ptr).c_str());
        return INVALID_VALUE;
    }
    Alloc a = it->second;
    g_live.erase(it);
    g_used -= a.size;
    // Drop the pages (the memory goes back to the host) but keep the range reserved and
    // inaccessible: a later access through a stale pointer faults.
    mmap(a.map, a.map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    g_quarantine.push_back(a);
    g_freed[a.base] = Freed{a.base, a.size, a.serial};
    while (g_quarantine.size() > QUARANTINE) {
        Alloc old = g_quarantine.front();
        g_quarantine.pop_front();
        munmap(old.map, old.map_len);
        g_freed.erase(old.base);
    }
    return OK;
}

void mem_free_all() {
    std::vector<uintptr_t> bases;
    for (auto& kv : g_live) bases.push_back(kv.first);
    for (uintptr_t b : bases) mem_free(b, false);
}

const Alloc* mem_find(uintptr_t p) { return find_live(p); }

std::string mem_describe(uintptr_t p) {
    char buf[256];
    if (const Alloc* a = find_mapping(p)) {
        if (p < a->base + a->size)
            snprintf(buf, sizeof buf, "byte %" PRIuPTR " of allocation #%" PRIu64 " (%zu bytes at 0x%" PRIxPTR ")",
                     p - a->base, a->serial, a->size, a->base);
        else
            snprintf(buf, sizeof buf, "%" PRIuPTR " bytes past the end of allocation #%" PRIu64 " (%zu bytes at 0x%" PRIxPTR ")",
                     p - (a->base + a->size), a->serial, a->size, a->base);
        return buf;
    }
    if (const Freed* f = find_freed(p)) {
        snprintf(buf, sizeof buf, "inside allocation #%" PRIu64 " (%zu bytes at 0x%" PRIxPTR "), which was freed: use after free",
                 f->serial, f->size, f->base);
        return buf;
    }
    // Just before an allocation?
    auto it = g_live.upper_bound(p);
    if (it != g_live.end() && it->first - p < 4096) {
        snprintf(buf, sizeof buf, "%" PRIuPTR " bytes before allocation #%" PRIu64 " (%zu bytes at 0x%" PRIxPTR ")",
                 it->first - p, it->second.serial, it->second.size, it->first);
        return buf;
    }
    return "not in any device allocation";
}

bool mem_check(uintptr_t p, size_t bytes, std::string* why) {
    const Alloc* a = find_live(p);
    if (!a) {
        *why = "0x" + [&] { char b[32]; snprintf(b, sizeof b, "%" PRIxPTR, p); return std::string(b); }() +
               " is " + mem_describe(p);
        return false;
    }
    if (bytes > a->base + a->size - p) {
        char b[256];
        snprintf(b, sizeof b, "%zu bytes from byte %" PRIuPTR " of allocation #%" PRIu64 " (%zu bytes) run %zu bytes past its end",
                 bytes, p - a->base, a->serial, a->size, (size_t)(p + bytes - (a->base + a->size)));
        *why = b;
        return false;
    }
    return true;
}

bool mem_check_ptr(uintptr_t p, std::string* why) {
    if (find_live(p)) return true;
    char b[32];
    snprintf(b, sizeof b, "0x%" PRIxPTR, p);
    *why = std::string(b) + " is " + mem_describe(p);
    return false;
}

bool mem_canary_ok(uintptr_t p, size_t* first_bad) {
    const Alloc* a = find_live(p);
    if (!a) return true;
    const unsigned char* c = (const unsigned char*)(a->base + a->size);
    for (size_t i = 0; i < a->slack; i++) {
        if (c[i] != CANARY) {
            *first_bad = i;
            return false;
        }
    }
    return true;
}

bool mem_overlaps_device(uintptr_t p, size_t bytes) {
    if (bytes == 0) return false;
    auto it = g_live.upper_bound(p + bytes - 1);
    if (it == g_live.begin()) return false;
    --it;
    return it->second.base + it->second.size > p;
}

}  // namespace emu
