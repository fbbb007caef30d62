// cuda-emu-probe SCENARIO: drives the emulated device directly (libcuda.so, libcublasLt.so and
// the real NVRTC, found on LD_LIBRARY_PATH as scripts/cuda-emu sets it) to show that each of its
// checks fires: the emulator must be able to fail. Every scenario first does the same thing
// correctly (which must work), then wrongly (which must be refused or fault, as on a GPU).
// Exit status 0: the emulator behaved as expected; 1: it did not (printed); 2: usage.
// The kernels are herd's own, compiled by NVRTC from the sources the emulator was built from
// (scripts/cuda-emu exports CUDA_EMU_KERNEL_DIR and CUDA_EMU_KERNEL_FILES).
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

typedef unsigned long long CUdeviceptr;
typedef void* H;

#define FN(ret, name, ...)          \
    typedef ret (*name##_t)(__VA_ARGS__); \
    static name##_t name;

FN(int, cuInit, unsigned)
FN(int, cuDeviceGet, int*, int)
FN(int, cuDevicePrimaryCtxRetain, H*, int)
FN(int, cuCtxSetCurrent, H)
FN(int, cuCtxSynchronize)
FN(int, cuMemAlloc_v2, CUdeviceptr*, size_t)
FN(int, cuMemFree_v2, CUdeviceptr)
FN(int, cuMemcpyHtoD_v2, CUdeviceptr, const void*, size_t)
FN(int, cuMemcpyDtoH_v2, void*, CUdeviceptr, size_t)
FN(int, cuModuleLoadData, H*, const void*)
FN(int, cuModuleGetFunction, H*, H, const char*)
FN(int, cuLaunchKernel, H, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, H, void**, void**)
FN(int, cuStreamCreate, H*, unsigned)
FN(int, cuStreamSynchronize, H)
FN(int, cuStreamBeginCapture_v2, H, int)
FN(int, cuStreamEndCapture, H, H*)
FN(int, cuGraphInstantiateWithFlags, H*, H, unsigned long long)
FN(int, cuGraphLaunch, H, H)
FN(int, cuMemHostAlloc, void**, size_t, unsigned)
FN(int, cuMemcpyHtoDAsync_v2, CUdeviceptr, const void*, size_t, H)
FN(int, cuMemcpyDtoHAsync_v2, void*, CUdeviceptr, size_t, H)
FN(int, cublasLtCreate, H*)
FN(int, cublasLtMatrixLayoutCreate, H*, uint32_t, uint64_t, uint64_t, int64_t)
FN(int, cublasLtMatmulDescCreate, H*, int32_t, int32_t)
FN(int, cublasLtMatmulDescSetAttribute, H, int, const void*, size_t)
FN(int, cublasLtMatmulPreferenceCreate, H*)
FN(int, cublasLtMatmulAlgoGetHeuristic, H, H, H, H, H, H, H, int, void*, int*)
FN(int, cublasLtMatmul, H, H, const void*, const void*, H, const void*, H, const void*, const void*, H, void*, H,
   const void*, void*, size_t, H)
FN(int, nvrtcCreateProgram, H*, const char*, const char*, int, const char**, const char**)
FN(int, nvrtcCompileProgram, H, int, const char**)
FN(int, nvrtcGetPTXSize, H, size_t*)
FN(int, nvrtcGetPTX, H, char*)
FN(int, nvrtcGetProgramLogSize, H, size_t*)
FN(int, nvrtcGetProgramLog, H, char*)

static int failures = 0;

static void expect(const char* what, int got, int want) {
    if (got == want) {
        printf("ok    %s: %d\n", what, got);
    } else {
        printf("FAIL  %s: got %d, expected %d\n", what, got, want);
        failures++;
    }
}

static void* sym(void* lib, const char* name) {
    void* p = dlsym(lib, name);
    if (!p) {
        fprintf(stderr, "cuda-emu-probe: %s not found\n", name);
        exit(1);
    }
    return p;
}

static std::string read_file(const std::string& p) {
    std::ifstream f(p);
    if (!f) {
        fprintf(stderr, "cuda-emu-probe: cannot read %s\n", p.c_str());
        exit(1);
    }
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

// herd's kernels as one NVRTC program, as src/backend/cuda/kernels.rs builds it.
static std::string herd_ptx() {
    const char* dir = getenv("CUDA_EMU_KERNEL_DIR");
    const char* list = getenv("CUDA_EMU_KERNEL_FILES");
    if (!dir || !list) {
        fprintf(stderr, "cuda-emu-probe: run me under scripts/cuda-emu (CUDA_EMU_KERNEL_DIR is not set)\n");
        exit(1);
    }
    std::string src = read_file(std::string(dir) + "/common.cuh");
    std::istringstream files(list);
    std::string f;
    while (files >> f) src += "\n// ---- " + f + " ----\n" + read_file(std::string(dir) + "/" + f);
    H prog;
    if (nvrtcCreateProgram(&prog, src.c_str(), "herd_kernels.cu", 0, nullptr, nullptr)) exit(1);
    const char* opts[] = {"--gpu-architecture=compute_90", "--fmad=true", "--std=c++17"};
    if (nvrtcCompileProgram(prog, 3, opts)) {
        size_t n;
        nvrtcGetProgramLogSize(prog, &n);
        std::string log(n, '\0');
        nvrtcGetProgramLog(prog, &log[0]);
        fprintf(stderr, "cuda-emu-probe: NVRTC failed:\n%s\n", log.c_str());
        exit(1);
    }
    size_t n;
    nvrtcGetPTXSize(prog, &n);
    std::string ptx(n, '\0');
    nvrtcGetPTX(prog, &ptx[0]);
    return ptx;
}

static H g_mod;
static H func(const char* name) {
    H f;
    if (cuModuleGetFunction(&f, g_mod, name)) {
        fprintf(stderr, "cuda-emu-probe: no kernel %s\n", name);
        exit(1);
    }
    return f;
}

static CUdeviceptr upload(const std::vector<float>& v) {
    CUdeviceptr p;
    if (cuMemAlloc_v2(&p, v.size() * 4) || cuMemcpyHtoD_v2(p, v.data(), v.size() * 4)) exit(1);
    return p;
}

// x += y over n floats: add_in_place(float* x, const float* y, u64 n)
static int add_in_place(CUdeviceptr x, CUdeviceptr y, unsigned long long n, unsigned block = 256, H stream = nullptr) {
    void* args[] = {&x, &y, &n};
    return cuLaunchKernel(func("add_in_place"), 1, 1, 1, block, 1, 1, 0, stream, args, nullptr);
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr,
                "usage: cuda-emu-probe SCENARIO (valid, oob-pointer, use-after-free, kernel-overrun, copy-overrun, "
                "cublaslt-ld, launch-bounds, grid-limit, partial-warp, ptx-mismatch, out-of-memory, graph, async)\n");
        return 2;
    }
    std::string sc = argv[1];
    void* cuda = dlopen("libcuda.so", RTLD_NOW | RTLD_LOCAL);
    void* lt = dlopen("libcublasLt.so", RTLD_NOW | RTLD_LOCAL);
    void* nvrtc = dlopen("libnvrtc.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!cuda || !lt || !nvrtc) {
        fprintf(stderr, "cuda-emu-probe: run me under scripts/cuda-emu (%s)\n", dlerror());
        return 1;
    }
#define LOAD(lib, name) name = (name##_t)sym(lib, #name)
    LOAD(cuda, cuInit); LOAD(cuda, cuDeviceGet); LOAD(cuda, cuDevicePrimaryCtxRetain); LOAD(cuda, cuCtxSetCurrent);
    LOAD(cuda, cuCtxSynchronize); LOAD(cuda, cuMemAlloc_v2); LOAD(cuda, cuMemFree_v2); LOAD(cuda, cuMemcpyHtoD_v2);
    LOAD(cuda, cuMemcpyDtoH_v2); LOAD(cuda, cuModuleLoadData); LOAD(cuda, cuModuleGetFunction);
    LOAD(cuda, cuLaunchKernel); LOAD(cuda, cuStreamCreate); LOAD(cuda, cuStreamSynchronize);
    LOAD(cuda, cuStreamBeginCapture_v2); LOAD(cuda, cuStreamEndCapture); LOAD(cuda, cuGraphInstantiateWithFlags);
    LOAD(cuda, cuGraphLaunch); LOAD(cuda, cuMemHostAlloc); LOAD(cuda, cuMemcpyHtoDAsync_v2);
    LOAD(cuda, cuMemcpyDtoHAsync_v2);
    LOAD(lt, cublasLtCreate); LOAD(lt, cublasLtMatrixLayoutCreate); LOAD(lt, cublasLtMatmulDescCreate);
    LOAD(lt, cublasLtMatmulDescSetAttribute); LOAD(lt, cublasLtMatmulPreferenceCreate);
    LOAD(lt, cublasLtMatmulAlgoGetHeuristic); LOAD(lt, cublasLtMatmul);
    LOAD(nvrtc, nvrtcCreateProgram); LOAD(nvrtc, nvrtcCompileProgram); LOAD(nvrtc, nvrtcGetPTXSize);
    LOAD(nvrtc, nvrtcGetPTX); LOAD(nvrtc, nvrtcGetProgramLogSize); LOAD(nvrtc, nvrtcGetProgramLog);

    int dev;
    H ctx;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx)) return 1;
    std::string ptx = herd_ptx();
    if (sc == "ptx-mismatch") {
        // embed_gather(table, tokens, out, dim) loses its last parameter: the PTX no longer
        // matches the C++ build of the same kernel.
        std::string bad = ptx;
        size_t at = bad.find(",\n\t.param .u32 embed_gather_param_3");
        if (at == std::string::npos) {
            printf("FAIL  embed_gather's parameter 3 not found in the PTX\n");
            return 1;
        }
        bad.erase(at, strlen(",\n\t.param .u32 embed_gather_param_3"));
        H m;
        expect("cuModuleLoadData of PTX whose embed_gather lacks a parameter", cuModuleLoadData(&m, bad.c_str()), 218);
        expect("cuModuleLoadData of herd's PTX", cuModuleLoadData(&m, ptx.c_str()), 0);
        printf("%s\n", failures ? "the emulator did NOT behave as expected" : "the emulator behaved as expected");
        return failures ? 1 : 0;
    }
    expect("cuModuleLoadData of herd's PTX", cuModuleLoadData(&g_mod, ptx.c_str()), 0);

    const int N = 1000;
    std::vector<float> a(N, 1.0f), b(N, 2.0f), out(N);
    CUdeviceptr x = upload(a), y = upload(b);
    expect("add_in_place on live buffers", add_in_place(x, y, N), 0);
    expect("synchronize", cuCtxSynchronize(), 0);
    cuMemcpyDtoH_v2(out.data(), x, N * 4);
    if (out[0] != 3.0f || out[N - 1] != 3.0f) {
        printf("FAIL  add_in_place computed %g, %g (expected 3)\n", out[0], out[N - 1]);
        failures++;
    }

    if (sc == "valid") {
        // nothing more
    } else if (sc == "oob-pointer") {
        expect("launch with x one past the end of its allocation (accepted, faults later)",
               add_in_place(x + N * 4, y, N), 0);
        expect("synchronize after the fault (sticky CUDA_ERROR_ILLEGAL_ADDRESS)", cuCtxSynchronize(), 700);
    } else if (sc == "use-after-free") {
        cuMemFree_v2(y);
        expect("launch reading a freed buffer", add_in_place(x, y, N), 0);
        expect("synchronize after the fault", cuCtxSynchronize(), 700);
    } else if (sc == "kernel-overrun") {
        // select_rows(x, rows, out, cols): a row index one past the last row of x.
        const int rows = 10, cols = 64;
        CUdeviceptr src = upload(std::vector<float>(rows * cols, 1.0f));
        CUdeviceptr dst = upload(std::vector<float>(cols, 0.0f));
        unsigned idx_ok = rows - 1, idx_bad = rows;
        CUdeviceptr ri;
        cuMemAlloc_v2(&ri, 4);
        int c = cols;
        void* args[] = {&src, &ri, &dst, &c};
        cuMemcpyHtoD_v2(ri, &idx_ok, 4);
        expect("select_rows of the last row", cuLaunchKernel(func("select_rows"), 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr), 0);
        expect("synchronize", cuCtxSynchronize(), 0);
        cuMemcpyHtoD_v2(ri, &idx_bad, 4);
        expect("select_rows of the row after the last", cuLaunchKernel(func("select_rows"), 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr), 0);
        expect("synchronize after the fault", cuCtxSynchronize(), 700);
    } else if (sc == "copy-overrun") {
        std::vector<float> big(N + 1, 0.0f);
        expect("cuMemcpyHtoD of 4 bytes more than the allocation", cuMemcpyHtoD_v2(x, big.data(), (N + 1) * 4), 1);
        expect("cuMemcpyDtoH from 4 bytes into the allocation, its full size", cuMemcpyDtoH_v2(big.data(), x + 4, N * 4), 1);
    } else if (sc == "cublaslt-ld") {
        // D[n=8, m=4] = W[8, 16] . X[4, 16]^T, herd's layouts: A = W as 16 x 8 (ld 16) transposed,
        // B = X^T as 16 x 4 (ld 16), C = D as 8 x 4 (ld 8); bf16 x bf16 -> f32.
        const int n = 8, m = 4, k = 16;
        std::vector<uint16_t> w(n * k, 0x3f80), xb(m * k, 0x3f80);  // 1.0 in bf16
        CUdeviceptr W, X, D;
        cuMemAlloc_v2(&W, w.size() * 2);
        cuMemAlloc_v2(&X, xb.size() * 2);
        cuMemAlloc_v2(&D, n * m * 4);
        cuMemcpyHtoD_v2(W, w.data(), w.size() * 2);
        cuMemcpyHtoD_v2(X, xb.data(), xb.size() * 2);
        H h, da, db, dd, desc, pref;
        cublasLtCreate(&h);
        cublasLtMatmulDescCreate(&desc, 68, 0);
        int trans = 1;
        cublasLtMatmulDescSetAttribute(desc, 3, &trans, 4);
        cublasLtMatmulPreferenceCreate(&pref);
        char heur[96];
        int count = 0;
        float alpha = 1, beta = 0;
        cublasLtMatrixLayoutCreate(&da, 14, k, n, k);
        cublasLtMatrixLayoutCreate(&db, 14, k, m, k);
        cublasLtMatrixLayoutCreate(&dd, 0, n, m, n);
        expect("heuristic for herd's layouts", cublasLtMatmulAlgoGetHeuristic(h, desc, da, db, dd, dd, pref, 1, heur, &count), 0);
        expect("matmul with herd's layouts", cublasLtMatmul(h, desc, &alpha, (void*)W, da, (void*)X, db, &beta, (void*)D, dd, (void*)D, dd, heur, nullptr, 0, nullptr), 0);
        std::vector<float> d(n * m);
        cuMemcpyDtoH_v2(d.data(), D, d.size() * 4);
        if (d[0] != (float)k) {
            printf("FAIL  matmul computed %g (expected %d)\n", d[0], k);
            failures++;
        }
        H a_small, a_big;
        cublasLtMatrixLayoutCreate(&a_small, 14, k, n, k - 1);  // ld < rows
        expect("heuristic with A's leading dimension below its rows", cublasLtMatmulAlgoGetHeuristic(h, desc, a_small, db, dd, dd, pref, 1, heur, &count), 7);
        cublasLtMatrixLayoutCreate(&a_big, 14, k, n, 2 * k);  // spans twice W's memory
        cublasLtMatmulAlgoGetHeuristic(h, desc, da, db, dd, dd, pref, 1, heur, &count);
        expect("matmul whose A leading dimension runs past W's allocation", cublasLtMatmul(h, desc, &alpha, (void*)W, a_big, (void*)X, db, &beta, (void*)D, dd, (void*)D, dd, heur, nullptr, 0, nullptr), 7);
    } else if (sc == "launch-bounds") {
        // attn_partial_bf16 is compiled with __launch_bounds__(128).
        void* args[16] = {};
        CUdeviceptr z = 0;
        int i0 = 0;
        float f0 = 0;
        for (int i = 0; i < 8; i++) args[i] = &z;
        for (int i = 8; i < 12; i++) args[i] = &i0;
        args[12] = &f0;
        expect("attn_partial_bf16 with 256 threads per block (launch bounds 128)",
               cuLaunchKernel(func("attn_partial_bf16"), 1, 1, 1, 256, 1, 1, 0, nullptr, args, nullptr), 701);
        expect("add_in_place with 1025 threads per block", add_in_place(x, y, N, 1025), 1);
        expect("synchronize (refused launches leave no sticky error)", cuCtxSynchronize(), 0);
    } else if (sc == "grid-limit") {
        // attn_combine(part_acc, part_ml, out, out16, splits, head_dim) reads blockIdx.x only:
        // extra blocks along y redo row 0.
        int splits = 1, hd = 1;
        CUdeviceptr null = 0;
        void* args[] = {&y, &y, &x, &null, &splits, &hd};
        expect("attn_combine with grid y = 65535",
               cuLaunchKernel(func("attn_combine"), 1, 65535, 1, 32, 1, 1, 0, nullptr, args, nullptr), 0);
        expect("attn_combine with grid y = 65536",
               cuLaunchKernel(func("attn_combine"), 1, 65536, 1, 32, 1, 1, 0, nullptr, args, nullptr), 1);
        expect("attn_combine with grid z = 65536",
               cuLaunchKernel(func("attn_combine"), 1, 1, 65536, 32, 1, 1, 0, nullptr, args, nullptr), 1);
        expect("synchronize", cuCtxSynchronize(), 0);
    } else if (sc == "partial-warp") {
        // add_rmsnorm reduces with full-mask shuffles: a block of 100 threads has a 4-lane warp.
        int cols = N;
        float eps = 1e-5f;
        CUdeviceptr w = upload(std::vector<float>(N, 1.0f)), o = upload(std::vector<float>(N, 0.0f));
        CUdeviceptr null = 0;
        void* args[] = {&x, &null, &w, &o, &null, &cols, &eps};
        expect("add_rmsnorm with 128 threads",
               cuLaunchKernel(func("add_rmsnorm"), 1, 1, 1, 128, 1, 1, 0, nullptr, args, nullptr), 0);
        expect("synchronize", cuCtxSynchronize(), 0);
        expect("add_rmsnorm with 100 threads (accepted, fails in the kernel)",
               cuLaunchKernel(func("add_rmsnorm"), 1, 1, 1, 100, 1, 1, 0, nullptr, args, nullptr), 0);
        expect("synchronize after the failed kernel (sticky CUDA_ERROR_LAUNCH_FAILED)", cuCtxSynchronize(), 719);
    } else if (sc == "graph") {
        // Capture: y = pinned 5s (copied in), x += y twice; replayed twice: x = 3 + 4 * 5.
        H st, graph, exec;
        cuStreamCreate(&st, 1);
        float* pinned;
        cuMemHostAlloc((void**)&pinned, N * 4, 0);
        for (int i = 0; i < N; i++) pinned[i] = 5.0f;
        expect("cuStreamBeginCapture on a created stream", cuStreamBeginCapture_v2(st, 0), 0);
        expect("captured copy from pinned memory", cuMemcpyHtoDAsync_v2(y, pinned, N * 4, st), 0);
        expect("captured launch", add_in_place(x, y, N, 256, st), 0);
        expect("captured launch", add_in_place(x, y, N, 256, st), 0);
        expect("cuStreamEndCapture", cuStreamEndCapture(st, &graph), 0);
        cuMemcpyDtoH_v2(out.data(), x, N * 4);
        if (out[0] != 3.0f) {
            printf("FAIL  a captured launch ran at capture time (x = %g)\n", out[0]);
            failures++;
        }
        expect("cuGraphInstantiate", cuGraphInstantiateWithFlags(&exec, graph, 0), 0);
        expect("cuGraphLaunch", cuGraphLaunch(exec, st), 0);
        expect("cuGraphLaunch again", cuGraphLaunch(exec, st), 0);
        expect("cuStreamSynchronize", cuStreamSynchronize(st), 0);
        cuMemcpyDtoH_v2(out.data(), x, N * 4);
        if (out[0] != 23.0f || out[N - 1] != 23.0f) {
            printf("FAIL  two replays gave %g (expected 23)\n", out[0]);
            failures++;
        }
        // What a capture refuses.
        expect("cuStreamBeginCapture on the legacy NULL stream", cuStreamBeginCapture_v2(nullptr, 0), 900);
        std::vector<float> pageable(N, 1.0f);
        expect("cuStreamBeginCapture", cuStreamBeginCapture_v2(st, 0), 0);
        expect("copy from pageable memory while capturing", cuMemcpyHtoDAsync_v2(y, pageable.data(), N * 4, st), 900);
        expect("cuStreamEndCapture of the invalidated capture", cuStreamEndCapture(st, &graph), 901);
        expect("cuStreamBeginCapture", cuStreamBeginCapture_v2(st, 0), 0);
        expect("a launch on the legacy stream while another stream captures", add_in_place(x, y, N), 906);
        expect("cuStreamEndCapture of the invalidated capture", cuStreamEndCapture(st, &graph), 901);
        expect("synchronize", cuCtxSynchronize(), 0);
    } else if (sc == "async") {
        // The device runs a stream's work when the host waits for it, as a GPU runs it later: a
        // host that reads results before waiting sees poison, and one that overwrites a pinned
        // source before the copy ran sends the new bytes. x = 3s here.
        H st;
        cuStreamCreate(&st, 1);
        float* pinned;
        cuMemHostAlloc((void**)&pinned, N * 4, 0);
        for (int i = 0; i < N; i++) pinned[i] = 5.0f;
        expect("copy pinned 5s in", cuMemcpyHtoDAsync_v2(y, pinned, N * 4, st), 0);
        for (int i = 0; i < N; i++) pinned[i] = 7.0f;  // too early: the copy has not run
        expect("x += y", add_in_place(x, y, N, 256, st), 0);
        float* result;
        cuMemHostAlloc((void**)&result, N * 4, 0);
        expect("copy x out to pinned memory", cuMemcpyDtoHAsync_v2(result, x, N * 4, st), 0);
        uint32_t bits;
        memcpy(&bits, &result[0], 4);
        if (bits != 0xFFFFFFFFu) {
            printf("FAIL  read before waiting: %g, not poison (the copy ran before the host waited)\n", result[0]);
            failures++;
        } else {
            printf("ok    read before waiting: poison (NaN)\n");
        }
        expect("cuStreamSynchronize", cuStreamSynchronize(st), 0);
        if (result[0] != 10.0f || result[N - 1] != 10.0f) {
            printf("FAIL  after waiting: %g (expected 3 + 7: the copy reads its pinned source when it runs)\n",
                   result[0]);
            failures++;
        } else {
            printf("ok    after waiting: 3 + 7 (the pinned source was read when the copy ran)\n");
        }
        // Pageable memory is staged at the call: overwriting it at once is safe.
        std::vector<float> pageable(N, 1.0f);
        expect("copy pageable 1s in", cuMemcpyHtoDAsync_v2(y, pageable.data(), N * 4, st), 0);
        pageable.assign(N, 100.0f);
        expect("x += y", add_in_place(x, y, N, 256, st), 0);
        cuMemcpyDtoH_v2(out.data(), x, N * 4);  // synchronous: waits for the stream's work
        // One pinned buffer as the source of a copy in and the destination of a copy out, in
        // stream order, is correct: the copy out must not clobber what the copy in still reads.
        for (int i = 0; i < N; i++) pinned[i] = 2.0f;
        expect("copy pinned 2s in", cuMemcpyHtoDAsync_v2(y, pinned, N * 4, st), 0);
        expect("copy x out to the same pinned buffer", cuMemcpyDtoHAsync_v2(pinned, x, N * 4, st), 0);
        expect("cuStreamSynchronize", cuStreamSynchronize(st), 0);
        cuMemcpyDtoH_v2(out.data(), y, N * 4);
        if (out[0] != 2.0f) {
            printf("FAIL  stream-ordered reuse of a pinned buffer: y = %g (expected 2)\n", out[0]);
            failures++;
        }
        cuMemcpyDtoH_v2(out.data(), x, N * 4);
        if (out[0] != 11.0f) {
            printf("FAIL  a synchronous copy did not wait for queued work, or pageable memory was not staged (%g)\n",
                   out[0]);
            failures++;
        } else {
            printf("ok    a synchronous copy waited; pageable memory was staged at the call\n");
        }
        fprintf(stderr, "cuda-emu-probe: queued work runs when the host waits\n");
    } else if (sc == "out-of-memory") {
        CUdeviceptr p;
        expect("cuMemAlloc of more than CUDA_EMU_MEMORY_GB", cuMemAlloc_v2(&p, (size_t)1 << 62), 2);
        expect("cuMemAlloc of 0 bytes", cuMemAlloc_v2(&p, 0), 1);
    } else {
        fprintf(stderr, "cuda-emu-probe: unknown scenario %s\n", sc.c_str());
        return 2;
    }
    printf("%s\n", failures ? "the emulator did NOT behave as expected" : "the emulator behaved as expected");
    return failures ? 1 : 0;
}
