// Kernel execution: the blocks of a grid run one after another; the threads of a block are
// fibers. A fiber runs until it reaches __syncthreads or a warp shuffle, or ends. A barrier opens
// when every live thread of the block waits at it (at the same __syncthreads); the waiting
// threads then resume in a shuffled order (seeded), so code that relies on one order (a race)
// sees different ones. A shuffle opens when every lane named in its mask has reached it.
// Anything else (a barrier that some live thread never reaches, a full-mask shuffle in a partial
// or divergent warp, a memory fault, a write past the end of an allocation) is an error that
// names the kernel, and makes the context's error sticky as a GPU fault would.
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <ctime>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "emu.h"
#include "emu_rt.h"

extern "C" void emu_fiber_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_start();

namespace emu_rt {
Fiber* g_cur = nullptr;
emu_uint3 g_block_idx, g_block_dim, g_grid_dim;
}  // namespace emu_rt

namespace emu {

using emu_rt::Fiber;

namespace {

constexpr size_t STACK = 128 * 1024;
constexpr unsigned MAX_THREADS = 1024;
constexpr size_t MAX_SMEM = 48 * 1024;

size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

// ---- Seeded shuffles ----
struct Rng {
    uint64_t s;
    uint64_t next() {
        s += 0x9e3779b97f4a7c15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
};
Rng& rng() {
    static Rng r{seed()};
    return r;
}
template <typename T>
void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[rng().next() % i]);
}

// ---- The running block ----
struct Block {
    const KernelDef* def = nullptr;
    void* const* args = nullptr;
    const char* kernel = "";
    std::vector<Fiber> fibers;
    std::vector<unsigned> ready;  // a queue (head index below)
    size_t head = 0;
    unsigned live = 0, at_barrier = 0;
    unsigned nwarps = 0;
    std::vector<unsigned> warp_waiting;  // lanes of each warp waiting at a warp op
    std::vector<unsigned> warp_size;     // lanes that exist in each warp
    std::string error;                   // set when the block must stop
};
Block g_blk;
void* g_sched_sp = nullptr;
char* g_stacks = nullptr;

// Fault recovery: a SIGSEGV/SIGBUS/SIGFPE in a kernel jumps back to the launch.
sigjmp_buf g_fault_jmp;
volatile sig_atomic_t g_in_kernel = 0;
volatile uintptr_t g_fault_addr = 0;
volatile int g_fault_sig = 0;
struct sigaction g_old_segv, g_old_bus, g_old_fpe;

void fault_handler(int sig, siginfo_t* info, void* uctx) {
    if (g_in_kernel) {
        g_fault_sig = sig;
        g_fault_addr = (uintptr_t)info->si_addr;
        g_in_kernel = 0;
        siglongjmp(g_fault_jmp, 1);
    }
    // Not ours: hand it to whoever was there before (Rust's stack-overflow handler, default).
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : sig == SIGBUS ? &g_old_bus : &g_old_fpe;
    if (old->sa_flags & SA_SIGINFO) {
        if (old->sa_sigaction) {
            old->sa_sigaction(sig, info, uctx);
            return;
        }
    } else if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
        old->sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);  // returning re-executes the instruction: default action
}

void install_handlers() {
    static bool done = false;
    // Every thread that launches needs its own alternate stack (a fiber's stack may be the
    // one that overflowed).
    static thread_local bool alt = false;
    if (!alt) {
        stack_t ss;
        ss.ss_size = 64 * 1024;
        ss.ss_sp = mmap(nullptr, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        ss.ss_flags = 0;
        stack_t cur;
        sigaltstack(nullptr, &cur);
        if (cur.ss_flags & SS_DISABLE) sigaltstack(&ss, nullptr);
        alt = true;
    }
    if (done) return;
    done = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    sigaction(SIGFPE, &sa, &g_old_fpe);
}

// ---- Shared memory: the kernels' function-local statics, found in our own symbol table ----
struct SharedVar {
    void* addr;
    size_t size;
};
std::vector<SharedVar>& shared_vars() {
    static std::vector<SharedVar> vars = [] {
        std::vector<SharedVar> v;
        Dl_info info;
        if (!dladdr((void*)&shared_vars, &info) || !info.dli_fname) {
            say("cannot find the emulator library on disk (dladdr failed)");
            _exit(70);
        }
        int fd = open(info.dli_fname, O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0) {
            say("cannot read %s to find the kernels' shared variables", info.dli_fname);
            _exit(70);
        }
        const char* img = (const char*)mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        close(fd);
        const Elf64_Ehdr* eh = (const Elf64_Ehdr*)img;
        const Elf64_Shdr* sh = (const Elf64_Shdr*)(img + eh->e_shoff);
        // Kernel sources are compiled inside namespace { namespace emu_kernels { ... } }.
        const char* prefix = "_ZZN12_GLOBAL__N_111emu_kernels";
        for (int i = 0; i < eh->e_shnum; i++) {
            if (sh[i].sh_type != SHT_SYMTAB) continue;
            const Elf64_Sym* syms = (const Elf64_Sym*)(img + sh[i].sh_offset);
            const char* str = img + sh[sh[i].sh_link].sh_offset;
            size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
            for (size_t k = 0; k < n; k++) {
                const Elf64_Sym& s = syms[k];
                if (ELF64_ST_TYPE(s.st_info) != STT_OBJECT || s.st_shndx == SHN_UNDEF || s.st_shndx >= eh->e_shnum)
                    continue;
                if (strncmp(str + s.st_name, prefix, strlen(prefix)) != 0) continue;
                if (!(sh[s.st_shndx].sh_flags & SHF_WRITE)) continue;  // constants stay
                v.push_back(SharedVar{(char*)info.dli_fbase + s.st_value, (size_t)s.st_size});
            }
        }
        munmap((void*)img, st.st_size);
        return v;
    }();
    return vars;
}

void poison_shared() {
    for (auto& v : shared_vars()) memset(v.addr, 0xFF, v.size);
}

// ---- Fibers ----
// A fiber that stops (barrier, warp operation, exit, fault) does the scheduler's bookkeeping
// itself and switches straight to the next ready fiber: one switch per stop. Only a finished or
// failed block switches back to the launch.
void handoff(Fiber* f);

void fiber_main(void* p) {
    Fiber* f = (Fiber*)p;
    g_blk.def->call(g_blk.args);
    f->state = emu_rt::EXITED;
    handoff(f);
    __builtin_trap();  // an exited fiber is never resumed
}

void fiber_init(Fiber* f, unsigned i) {
    char* top = g_stacks + (size_t)(i + 1) * (STACK + page_size());
    // emu_fiber_switch pops r15 r14 r13 r12 rbx rbp, then returns into emu_fiber_start with
    // the stack 16-byte aligned (so the entry sees the ABI's alignment after its call).
    uintptr_t a = ((uintptr_t)top - 64) & ~(uintptr_t)15;
    uint64_t* sp = (uint64_t*)(a - 56);
    sp[0] = 0;                             // r15
    sp[1] = 0;                             // r14
    sp[2] = (uint64_t)(void*)&fiber_main;  // r13: entry
    sp[3] = (uint64_t)f;                   // r12: its argument
    sp[4] = 0;                             // rbx
    sp[5] = 0;                             // rbp
    sp[6] = (uint64_t)(void*)&emu_fiber_start;
    f->sp = sp;
}

void alloc_stacks() {
    if (g_stacks) return;
    size_t per = STACK + page_size();
    void* m = mmap(nullptr, per * MAX_THREADS + page_size(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        say("cannot map fiber stacks");
        _exit(70);
    }
    g_stacks = (char*)m;
    // A guard page below every stack: an overflow faults instead of running into a neighbour.
    for (unsigned i = 0; i < MAX_THREADS; i++) mprotect(g_stacks + i * per, page_size(), PROT_NONE);
}

// The fiber stops (its state says why) until the scheduler resumes it.
inline void yield(Fiber* f) { handoff(f); }

std::string where(const char* file, int line) {
    const char* base = strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}


}  // namespace

}  // namespace emu

// ---- The calls the kernels make (emu_rt.h) ----
namespace emu_rt {

void trap(const char* what, const char* file, int line) {
    Fiber* f = g_cur;
    if (emu::g_blk.error.empty())
        emu::g_blk.error = std::string(what) + " at " + emu::where(file, line) + " (thread " +
                           std::to_string(f->linear) + ")";
    f->state = FAULTED;
    emu::yield(f);
    __builtin_trap();
}

void syncthreads(const char* file, int line) {
    Fiber* f = g_cur;
    f->state = AT_BARRIER;
    f->file = file;
    f->line = line;
    emu::yield(f);
}

uint64_t warp_op(int mode, unsigned mask, uint64_t v, int arg, int width, const char* file, int line) {
    Fiber* f = g_cur;
    auto& b = emu::g_blk;
    unsigned lanes = b.warp_size[f->warp];
    unsigned exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    const char* name = mode == SHFL_XOR ? "__shfl_xor_sync" : mode == SHFL_IDX ? "__shfl_sync"
                     : mode == SHFL_UP ? "__shfl_up_sync" : mode == SHFL_DOWN ? "__shfl_down_sync" : "__syncwarp";
    if (mask & ~exist) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "%s with mask 0x%08x in warp %u, which has only %u lanes (a block of %u threads is not a "
                 "whole number of warps)",
                 name, mask, f->warp, lanes, b.fibers.size() ? (unsigned)b.fibers.size() : 0);
        trap(msg, file, line);
    }
    if (!(mask & (1u << f->lane))) {
        char msg[160];
        snprintf(msg, sizeof msg, "%s with mask 0x%08x called by lane %u, which is not in the mask", name, mask, f->lane);
        trap(msg, file, line);
    }
    if (mode != WARP_SYNC && (width <= 0 || width > 32 || (width & (width - 1)))) {
        char msg[96];
        snprintf(msg, sizeof msg, "%s with width %d (must be a power of 2 up to 32)", name, width);
        trap(msg, file, line);
    }
    f->state = AT_WARP;
    f->file = file;
    f->line = line;
    f->mode = mode;
    f->mask = mask;
    f->arg = arg;
    f->width = width;
    f->val = v;
    emu::yield(f);
    return f->res;
}

}  // namespace emu_rt

namespace emu {
namespace {


void fail(const std::string& msg) {
    if (g_blk.error.empty()) g_blk.error = msg;
}

void release_barrier() {
    std::vector<unsigned> waiting;
    const Fiber* first = nullptr;
    for (auto& f : g_blk.fibers) {
        if (f.state != emu_rt::AT_BARRIER) continue;
        if (!first) first = &f;
        if (f.line != first->line || strcmp(f.file, first->file) != 0) {
            fail("divergent __syncthreads: thread " + std::to_string(first->linear) + " waits at " +
                 where(first->file, first->line) + ", thread " + std::to_string(f.linear) + " at " +
                 where(f.file, f.line) + " (every live thread of a block must reach the same barrier)");
            return;
        }
        waiting.push_back(f.linear);
    }
    shuffle(waiting);
    for (unsigned i : waiting) {
        g_blk.fibers[i].state = emu_rt::READY;
        g_blk.ready.push_back(i);
    }
    g_blk.at_barrier = 0;
}

// Every lane named in the mask has arrived: compute the results, resume them shuffled.
void release_warp(unsigned w) {
    Fiber* lanes[32] = {};
    const Fiber* first = nullptr;
    Fiber* base = &g_blk.fibers[w * 32];
    for (unsigned l = 0; l < g_blk.warp_size[w]; l++) {
        Fiber& f = base[l];
        if (f.state != emu_rt::AT_WARP) continue;
        if (!first) first = &f;
        if (f.mask != first->mask || f.mode != first->mode || f.line != first->line ||
            (f.file != first->file && strcmp(f.file, first->file) != 0)) {
            char msg[256];
            snprintf(msg, sizeof msg,
                     "divergent warp %u: lane %u waits at a warp operation at %s (mask 0x%08x), lane %u at %s "
                     "(mask 0x%08x)",
                     w, first->lane, where(first->file, first->line).c_str(), first->mask, f.lane,
                     where(f.file, f.line).c_str(), f.mask);
            fail(msg);
            return;
        }
        lanes[l] = &f;
    }
    unsigned order[32], n = 0;
    for (unsigned l = 0; l < 32; l++) {
        Fiber* f = lanes[l];
        if (!f) continue;
        int wd = f->width ? f->width : 32;
        unsigned seg = l & ~(unsigned)(wd - 1);
        int src = (int)l;
        switch (f->mode) {
            case emu_rt::SHFL_IDX: src = (int)(seg + ((unsigned)f->arg & (unsigned)(wd - 1))); break;
            case emu_rt::SHFL_UP: src = (int)l - f->arg; if (src < (int)seg) src = (int)l; break;
            case emu_rt::SHFL_DOWN: src = (int)l + f->arg; if (src >= (int)(seg + wd)) src = (int)l; break;
            case emu_rt::SHFL_XOR:
                src = (int)(l ^ (unsigned)f->arg);
                if ((unsigned)src >= seg + wd) src = (int)l;
                break;
            default: break;
        }
        // A source lane outside the mask gives an undefined value on a GPU: poison.
        f->res = (src >= 0 && src < 32 && lanes[src]) ? lanes[src]->val : ~0ull;
        order[n++] = l;
    }
    for (unsigned i = n; i > 1; i--) std::swap(order[i - 1], order[rng().next() % i]);
    for (unsigned i = 0; i < n; i++) {
        lanes[order[i]]->state = emu_rt::READY;
        g_blk.ready.push_back(w * 32 + order[i]);
    }
    g_blk.warp_waiting[w] = 0;
}

// Nothing can run: describe why the block is stuck.
void diagnose_deadlock() {
    const Fiber* bar = nullptr;
    const Fiber* wop = nullptr;
    unsigned nbar = 0, nwop = 0;
    for (auto& f : g_blk.fibers) {
        if (f.state == emu_rt::AT_BARRIER) { if (!bar) bar = &f; nbar++; }
        if (f.state == emu_rt::AT_WARP) { if (!wop) wop = &f; nwop++; }
    }
    char msg[512];
    if (bar && wop) {
        snprintf(msg, sizeof msg,
                 "__syncthreads at %s is reached by %u of %u live threads; %u others wait at a warp operation at "
                 "%s (lane %u of warp %u): divergent __syncthreads",
                 where(bar->file, bar->line).c_str(), nbar, g_blk.live, nwop, where(wop->file, wop->line).c_str(),
                 wop->lane, wop->warp);
    } else if (wop) {
        unsigned w = wop->warp, exited = 0, there = 0;
        for (unsigned l = 0; l < g_blk.warp_size[w]; l++) {
            auto st = g_blk.fibers[w * 32 + l].state;
            if (st == emu_rt::EXITED) exited++;
            if (st == emu_rt::AT_WARP) there++;
        }
        snprintf(msg, sizeof msg,
                 "warp operation at %s with mask 0x%08x in warp %u: %u lanes wait, %u lanes named in the mask "
                 "already exited (a full-mask shuffle in a divergent warp)",
                 where(wop->file, wop->line).c_str(), wop->mask, w, there, exited);
    } else {
        snprintf(msg, sizeof msg, "the block cannot make progress (scheduler bug)");
    }
    fail(msg);
}

// Run one block to completion (or to its first error).
void run_block(unsigned nthreads) {
    Block& b = g_blk;
    poison_shared();
    b.fibers.resize(nthreads);
    b.ready.clear();
    b.head = 0;
    b.live = nthreads;
    b.at_barrier = 0;
    b.nwarps = (nthreads + 31) / 32;
    b.warp_waiting.assign(b.nwarps, 0);
    b.warp_size.assign(b.nwarps, 32);
    if (nthreads % 32) b.warp_size.back() = nthreads % 32;
    unsigned bx = emu_rt::g_block_dim.x, by = emu_rt::g_block_dim.y;
    for (unsigned i = 0; i < nthreads; i++) {
        Fiber& f = b.fibers[i];
        f.linear = i;
        f.tid = emu_uint3{i % bx, (i / bx) % by, i / (bx * by)};
        f.lane = i % 32;
        f.warp = i / 32;
        f.state = emu_rt::READY;
        fiber_init(&f, i);
        b.ready.push_back(i);
    }
    shuffle(b.ready);
    Fiber& f = b.fibers[b.ready[b.head++]];
    f.state = emu_rt::RUNNING;
    emu_rt::g_cur = &f;
    emu_fiber_switch(&g_sched_sp, f.sp);
    emu_rt::g_cur = nullptr;
}

void handoff(Fiber* f) {
    Block& b = g_blk;
    switch (f->state) {
        case emu_rt::EXITED:
            b.live--;
            if (b.at_barrier && b.at_barrier == b.live) release_barrier();
            break;
        case emu_rt::AT_BARRIER:
            if (++b.at_barrier == b.live) release_barrier();
            break;
        case emu_rt::AT_WARP: {
            unsigned need = f->mask == 0xffffffffu ? 32 : (unsigned)__builtin_popcount(f->mask);
            if (++b.warp_waiting[f->warp] == need) release_warp(f->warp);
            break;
        }
        case emu_rt::FAULTED:
            break;  // b.error is set
        default:
            fail("a thread stopped in an unexpected state (scheduler bug)");
    }
    if (b.error.empty() && b.live > 0 && b.head == b.ready.size()) diagnose_deadlock();
    if (!b.error.empty() || b.live == 0) {
        // The block is over (or failed): back to the launch; this fiber is abandoned.
        emu_rt::g_cur = nullptr;
        emu_fiber_switch(&f->sp, g_sched_sp);
        __builtin_trap();
    }
    unsigned i = b.ready[b.head++];
    if (b.head > 4096 && b.head * 2 > b.ready.size()) {
        b.ready.erase(b.ready.begin(), b.ready.begin() + b.head);
        b.head = 0;
    }
    Fiber* n = &b.fibers[i];
    n->state = emu_rt::RUNNING;
    emu_rt::g_cur = n;
    if (n != f) emu_fiber_switch(&f->sp, n->sp);
}

std::string dims(Dim3 d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

}  // namespace

namespace {
// CUDA_EMU_PROFILE=1: host time per kernel at exit (where the emulator spends its time; never a
// statement about a GPU).
struct Profile {
    std::map<std::string, std::pair<uint64_t, double>> by_kernel;
    ~Profile() {
        const char* v = getenv("CUDA_EMU_PROFILE");
        if (!v || !*v || by_kernel.empty()) return;
        for (auto& kv : by_kernel)
            say("profile: %-22s %8" PRIu64 " launches %10.1f ms (CPU time of the emulation)", kv.first.c_str(),
                kv.second.first, kv.second.second);
    }
} g_profile;
double cpu_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
struct Timer {
    const char* name;
    double t0 = cpu_ms();
    ~Timer() {
        auto& e = g_profile.by_kernel[name];
        e.first++;
        e.second += cpu_ms() - t0;
    }
};
}  // namespace

int launch_validate(Function* fn, Dim3 grid, Dim3 block, unsigned dyn_smem, void** params) {
    const KernelDef* def = fn->def;
    const PtxEntry& e = fn->entry;
    const char* name = def->name;
    std::string geom = "grid " + dims(grid) + ", block " + dims(block);
    // Launch limits of an H100 (compute capability 9.0).
    uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) {
        say("cuLaunchKernel(%s): %s has a zero dimension", name, geom.c_str());
        return INVALID_VALUE;
    }
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > MAX_THREADS) {
        say("cuLaunchKernel(%s): %s: a block has at most 1024 threads (x, y <= 1024, z <= 64)", name, geom.c_str());
        return INVALID_VALUE;
    }
    if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        say("cuLaunchKernel(%s): %s: grid y and z are at most 65535, x at most 2^31-1", name, geom.c_str());
        return INVALID_VALUE;
    }
    if (e.maxntid[0]) {
        uint64_t maxt = (uint64_t)e.maxntid[0] * e.maxntid[1] * e.maxntid[2];
        if (threads > maxt) {
            say("cuLaunchKernel(%s): %s has %" PRIu64 " threads per block, but the kernel was compiled with "
                "__launch_bounds__(%" PRIu64 ") (.maxntid)",
                name, geom.c_str(), threads, maxt);
            return LAUNCH_OUT_OF_RESOURCES;
        }
    }
    if (e.static_smem + dyn_smem > MAX_SMEM) {
        say("cuLaunchKernel(%s): %zu bytes of static + %u of dynamic shared memory exceed 48 KB per block", name,
            e.static_smem, dyn_smem);
        return INVALID_VALUE;
    }
    size_t np = def->params.size();
    if (np && !params) {
        say("cuLaunchKernel(%s): kernelParams is NULL but the kernel takes %zu parameters", name, np);
        return INVALID_VALUE;
    }
    return OK;
}

int launch(Function* fn, Dim3 grid, Dim3 block, unsigned dyn_smem, void** params) {
    Timer timer{fn->def->name};
    if (int r = launch_validate(fn, grid, block, dyn_smem, params)) return r;
    const KernelDef* def = fn->def;
    const char* name = def->name;
    std::string geom = "grid " + dims(grid) + ", block " + dims(block);
    uint64_t threads = (uint64_t)block.x * block.y * block.z;
    size_t np = def->params.size();
    // The parameter bytes, copied now (a launch owns its arguments once it returns).
    std::vector<std::vector<char>> argbuf(np);
    std::vector<void*> args(np);
    for (size_t i = 0; i < np; i++) {
        argbuf[i].assign((const char*)params[i], (const char*)params[i] + def->params[i].size);
        args[i] = argbuf[i].data();
    }
    // Every pointer argument must be null or inside a live allocation.
    std::vector<uintptr_t> ptrs;
    for (size_t i = 0; i < np; i++) {
        if (def->params[i].kind != ParamKind::Pointer) continue;
        uintptr_t p;
        memcpy(&p, args[i], 8);
        if (!p) continue;
        std::string why;
        if (!mem_check_ptr(p, &why)) {
            say("kernel %s (%s): pointer argument %zu: %s", name, geom.c_str(), i, why.c_str());
            set_sticky(ILLEGAL_ADDRESS);
            return OK;  // as on a GPU: the launch is accepted, the fault is sticky
        }
        ptrs.push_back(p);
    }

    // CUDA_EMU_FAULT=KERNEL[:N]: the Nth launch of KERNEL (default the first) faults as if it had
    // touched a bad address, to test how the program handles a kernel fault.
    static const char* inject = getenv("CUDA_EMU_FAULT");
    static unsigned long inject_n = 0;
    if (inject && *inject) {
        std::string spec(inject), kname = spec.substr(0, spec.find(':'));
        unsigned long nth = spec.find(':') == std::string::npos ? 1 : strtoul(spec.c_str() + spec.find(':') + 1, nullptr, 10);
        if (kname == name && ++inject_n == nth) {
            say("kernel %s (%s): illegal address (injected by CUDA_EMU_FAULT=%s)", name, geom.c_str(), inject);
            set_sticky(ILLEGAL_ADDRESS);
            return OK;
        }
    }
    install_handlers();
    alloc_stacks();
    g_blk.def = def;
    g_blk.args = args.data();
    g_blk.kernel = name;
    g_blk.error.clear();
    emu_rt::g_grid_dim = emu_uint3{grid.x, grid.y, grid.z};
    emu_rt::g_block_dim = emu_uint3{block.x, block.y, block.z};
    unsigned nthreads = (unsigned)threads;

    volatile unsigned cur_x = 0, cur_y = 0, cur_z = 0;
    if (sigsetjmp(g_fault_jmp, 1) != 0) {
        // A memory fault or arithmetic trap inside the kernel.
        Fiber* f = emu_rt::g_cur;
        emu_rt::g_cur = nullptr;
        uintptr_t a = g_fault_addr;
        char bl[64];
        snprintf(bl, sizeof bl, "block (%u,%u,%u)", cur_x, cur_y, cur_z);
        if (g_fault_sig == SIGFPE)
            say("kernel %s (%s): arithmetic trap (integer division by zero?) in %s, thread %u", name, geom.c_str(),
                bl, f ? f->linear : 0);
        else
            say("kernel %s (%s): illegal address 0x%" PRIxPTR " (%s) in %s, thread %u", name, geom.c_str(), a,
                a < 4096 ? "a null pointer" : mem_describe(a).c_str(), bl, f ? f->linear : 0);
        set_sticky(ILLEGAL_ADDRESS);
        return OK;
    }
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                cur_x = x;
                cur_y = y;
                cur_z = z;
                emu_rt::g_block_idx = emu_uint3{x, y, z};
                g_in_kernel = 1;
                run_block(nthreads);
                g_in_kernel = 0;
                if (!g_blk.error.empty()) {
                    say("kernel %s (%s): %s in block (%u,%u,%u); rerun with CUDA_EMU_SEED=%" PRIu64
                        " to repeat the thread order",
                        name, geom.c_str(), g_blk.error.c_str(), x, y, z, seed());
                    set_sticky(LAUNCH_FAILED);
                    return OK;
                }
            }
    // A write past the end of an argument's allocation (into its slack before the guard page).
    for (uintptr_t p : ptrs) {
        size_t bad;
        if (!mem_canary_ok(p, &bad)) {
            const Alloc* a = mem_find(p);
            say("kernel %s (%s) wrote past the end of allocation #%" PRIu64 " (%zu bytes), %zu bytes after it", name,
                geom.c_str(), a ? a->serial : 0, a ? a->size : 0, bad);
            set_sticky(ILLEGAL_ADDRESS);
            return OK;
        }
    }
    return OK;
}

}  // namespace emu
