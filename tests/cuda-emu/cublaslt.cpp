// The cuBLASLt subset herd uses (libcublasLt.so): D = alpha * op(A) * op(B) + beta * C, column
// major, batch 1, A and B bf16 (or f32), C and D f32, COMPUTE_32F with f32 scales on the host.
// Layouts, leading dimensions, types and the operand memory are checked as the library documents
// them (an inconsistent problem is CUBLAS_STATUS_INVALID_VALUE, an unsupported one
// CUBLAS_STATUS_NOT_SUPPORTED), each with a message saying what is wrong.
#include <cinttypes>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "emu.h"

using namespace emu;

#define EXPORT extern "C" __attribute__((visibility("default")))
#define API(NAME)      \
    EMU_COUNT(#NAME);  \
    std::lock_guard<std::recursive_mutex> lock_(api_lock())

namespace {

enum Status {
    ST_SUCCESS = 0,
    ST_NOT_INITIALIZED = 1,
    ST_ALLOC_FAILED = 3,
    ST_INVALID_VALUE = 7,
    ST_EXECUTION_FAILED = 13,
    ST_NOT_SUPPORTED = 15,
};
enum DataType { R_32F = 0, R_16F = 2, R_16BF = 14 };
constexpr int COMPUTE_32F = 68;

struct Handle {
    int magic = 0x4c54;
};
struct Layout {
    uint32_t type;
    int32_t order = 0;  // CUBLASLT_ORDER_COL
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch = 1;
    int64_t stride = 0;
};
struct Desc {
    int32_t compute, scale;
    int32_t pointer_mode = 0;  // host
    int32_t transa = 0, transb = 0, transc = 0;
    uint32_t epilogue = 1;  // CUBLASLT_EPILOGUE_DEFAULT
};
struct Pref {
    uint64_t max_ws = 0;
};

std::set<void*> g_live;  // every live handle/descriptor of this library

template <typename T>
bool live(T* p, const char* fn, const char* what) {
    if (p && g_live.count((void*)p)) return true;
    say("%s: %s %p is not a live cuBLASLt object (destroyed, or never created)", fn, what, (void*)p);
    return false;
}

const char* type_name(uint32_t t) {
    switch (t) {
        case R_32F: return "CUDA_R_32F";
        case R_16F: return "CUDA_R_16F";
        case R_16BF: return "CUDA_R_16BF";
        default: return "another type";
    }
}
size_t type_size(uint32_t t) { return t == R_32F ? 4 : (t == R_16F || t == R_16BF) ? 2 : 0; }

constexpr uint64_t ALGO_MAGIC = 0x6f676c612d756d65ull;  // "emu-algo"

// The problem a descriptor and four layouts describe, or why it is invalid / unsupported.
struct Problem {
    uint64_t m, n, k;
};
int validate(const char* fn, const Desc* d, const Layout* a, const Layout* b, const Layout* c, const Layout* dd,
             Problem* pr) {
    if (!live(d, fn, "matmul descriptor") || !live(a, fn, "layout A") || !live(b, fn, "layout B") ||
        !live(c, fn, "layout C") || !live(dd, fn, "layout D"))
        return ST_INVALID_VALUE;
    // What is supported (the rest is NOT_SUPPORTED, as on a card without that kernel).
    if (d->compute != COMPUTE_32F || d->scale != R_32F) {
        say("%s: compute type %d / scale type %s: the emulator supports CUBLAS_COMPUTE_32F with CUDA_R_32F scales",
            fn, d->compute, type_name(d->scale));
        return ST_NOT_SUPPORTED;
    }
    if (a->type != b->type || (a->type != R_16BF && a->type != R_32F) || c->type != R_32F || dd->type != R_32F) {
        say("%s: A %s x B %s -> C %s / D %s: the emulator supports bf16 x bf16 -> f32 and f32 x f32 -> f32", fn,
            type_name(a->type), type_name(b->type), type_name(c->type), type_name(dd->type));
        return ST_NOT_SUPPORTED;
    }
    if (d->pointer_mode != 0 || d->epilogue != 1 || d->transc != 0) {
        say("%s: device pointer mode, epilogues and TRANSC are not emulated", fn);
        return ST_NOT_SUPPORTED;
    }
    const Layout* ls[4] = {a, b, c, dd};
    const char* names = "ABCD";
    for (int i = 0; i < 4; i++) {
        const Layout* l = ls[i];
        if (l->order != 0) {
            say("%s: layout %c has a row-major/tiled order; the emulator supports CUBLASLT_ORDER_COL", fn, names[i]);
            return ST_NOT_SUPPORTED;
        }
        if (l->batch != 1) {
            say("%s: layout %c has batch count %d; the emulator supports batch 1", fn, names[i], l->batch);
            return ST_NOT_SUPPORTED;
        }
        // cuBLASLt: for CUBLASLT_ORDER_COL the leading dimension must be >= the number of rows.
        if (l->ld < 0 || (uint64_t)l->ld < l->rows || (l->ld == 0 && l->rows)) {
            say("%s: layout %c is %" PRIu64 " x %" PRIu64 " with leading dimension %" PRId64
                ": a column-major matrix needs ld >= rows",
                fn, names[i], l->rows, l->cols, l->ld);
            return ST_INVALID_VALUE;
        }
    }
    bool ta = d->transa != 0, tb = d->transb != 0;
    uint64_t am = ta ? a->cols : a->rows, ak = ta ? a->rows : a->cols;
    uint64_t bk = tb ? b->cols : b->rows, bn = tb ? b->rows : b->cols;
    if (ak != bk || dd->rows != am || dd->cols != bn || c->rows != dd->rows || c->cols != dd->cols) {
        say("%s: op(A) is %" PRIu64 " x %" PRIu64 " (A %" PRIu64 " x %" PRIu64 "%s), op(B) is %" PRIu64 " x %" PRIu64
            " (B %" PRIu64 " x %" PRIu64 "%s), C is %" PRIu64 " x %" PRIu64 ", D is %" PRIu64 " x %" PRIu64
            ": need op(A) m x k, op(B) k x n, C and D m x n",
            fn, am, ak, a->rows, a->cols, ta ? ", transposed" : "", bk, bn, b->rows, b->cols, tb ? ", transposed" : "",
            c->rows, c->cols, dd->rows, dd->cols);
        return ST_INVALID_VALUE;
    }
    if (!am || !bn || !ak) {
        say("%s: an empty problem (m=%" PRIu64 ", n=%" PRIu64 ", k=%" PRIu64 ")", fn, am, bn, ak);
        return ST_INVALID_VALUE;
    }
    pr->m = am;
    pr->n = bn;
    pr->k = ak;
    return ST_SUCCESS;
}

// The bytes a column-major matrix spans from its pointer.
bool operand_ok(const char* fn, char name, const void* p, const Layout* l) {
    size_t es = type_size(l->type);
    if (!p) {
        say("%s: pointer %c is NULL", fn, name);
        return false;
    }
    if ((uintptr_t)p % es) {
        say("%s: pointer %c (%p) is not aligned to its %zu-byte element", fn, name, p, es);
        return false;
    }
    uint64_t span = ((l->cols - 1) * (uint64_t)l->ld + l->rows) * es;
    std::string why;
    if (!mem_check((uintptr_t)p, span, &why)) {
        say("%s: matrix %c (%" PRIu64 " x %" PRIu64 ", ld %" PRId64 ", %s) spans %" PRIu64 " bytes: %s", fn, name,
            l->rows, l->cols, l->ld, type_name(l->type), span, why.c_str());
        return false;
    }
    return true;
}

float load(const void* p, uint32_t type, uint64_t i) {
    if (type == R_32F) return ((const float*)p)[i];
    uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// D = alpha op(A) op(B) + beta C: op(A) as rows of k, op(B) as columns of k (both contiguous),
// f32 accumulation.
void matmul(const Desc* d, float al, const void* A, const Layout* a, const void* B, const Layout* b, float be,
            const void* C, const Layout* c, void* D, const Layout* dd, Problem pr) {
    const uint64_t m = pr.m, n = pr.n, k = pr.k;
    const bool ta = d->transa != 0, tb = d->transb != 0;
    std::vector<float> bcols(n * k);
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t kk = 0; kk < k; kk++)
            bcols[j * k + kk] = load(B, b->type, tb ? j + kk * (uint64_t)b->ld : kk + j * (uint64_t)b->ld);
    const uint64_t TILE = 64;
    std::vector<float> arows(TILE * k);
    float* Dp = (float*)D;
    const float* Cp = (const float*)C;
    for (uint64_t i0 = 0; i0 < m; i0 += TILE) {
        uint64_t i1 = i0 + TILE < m ? i0 + TILE : m;
        for (uint64_t i = i0; i < i1; i++)
            for (uint64_t kk = 0; kk < k; kk++)
                arows[(i - i0) * k + kk] = load(A, a->type, ta ? kk + i * (uint64_t)a->ld : i + kk * (uint64_t)a->ld);
        for (uint64_t j = 0; j < n; j++) {
            const float* bc = &bcols[j * k];
            for (uint64_t i = i0; i < i1; i++) {
                const float* ar = &arows[(i - i0) * k];
                float s = 0.0f;
                for (uint64_t kk = 0; kk < k; kk++) s += ar[kk] * bc[kk];
                float v = al * s;
                if (be != 0.0f) v += be * Cp[i + j * (uint64_t)c->ld];
                Dp[i + j * (uint64_t)dd->ld] = v;
            }
        }
    }
}

}  // namespace

EXPORT int cublasLtCreate(Handle** h) {
    API(cublasLtCreate);
    if (!h) return ST_INVALID_VALUE;
    *h = new Handle;
    g_live.insert(*h);
    return ST_SUCCESS;
}

EXPORT int cublasLtDestroy(Handle* h) {
    API(cublasLtDestroy);
    if (!live(h, "cublasLtDestroy", "handle")) return ST_NOT_INITIALIZED;
    g_live.erase(h);
    delete h;
    return ST_SUCCESS;
}

EXPORT int cublasLtMatrixLayoutCreate(Layout** l, uint32_t type, uint64_t rows, uint64_t cols, int64_t ld) {
    API(cublasLtMatrixLayoutCreate);
    if (!l) return ST_INVALID_VALUE;
    *l = new Layout{type, 0, rows, cols, ld};
    g_live.insert(*l);
    return ST_SUCCESS;
}

EXPORT int cublasLtMatrixLayoutDestroy(Layout* l) {
    API(cublasLtMatrixLayoutDestroy);
    if (!live(l, "cublasLtMatrixLayoutDestroy", "layout")) return ST_INVALID_VALUE;
    g_live.erase(l);
    delete l;
    return ST_SUCCESS;
}

template <typename T>
static int set_field(const char* fn, const char* attr, T* field, const void* buf, size_t size) {
    if (!buf || size != sizeof(T)) {
        say("%s(%s): %zu bytes given, the attribute holds %zu", fn, attr, size, sizeof(T));
        return ST_INVALID_VALUE;
    }
    memcpy(field, buf, sizeof(T));
    return ST_SUCCESS;
}

EXPORT int cublasLtMatrixLayoutSetAttribute(Layout* l, int attr, const void* buf, size_t size) {
    API(cublasLtMatrixLayoutSetAttribute);
    const char* fn = "cublasLtMatrixLayoutSetAttribute";
    if (!live(l, fn, "layout")) return ST_INVALID_VALUE;
    switch (attr) {
        case 0: return set_field(fn, "TYPE", &l->type, buf, size);
        case 1: return set_field(fn, "ORDER", &l->order, buf, size);
        case 2: return set_field(fn, "ROWS", &l->rows, buf, size);
        case 3: return set_field(fn, "COLS", &l->cols, buf, size);
        case 4: return set_field(fn, "LD", &l->ld, buf, size);
        case 5: return set_field(fn, "BATCH_COUNT", &l->batch, buf, size);
        case 6: return set_field(fn, "STRIDED_BATCH_OFFSET", &l->stride, buf, size);
        default:
            say("%s: attribute %d is not emulated", fn, attr);
            return ST_INVALID_VALUE;
    }
}

EXPORT int cublasLtMatmulDescCreate(Desc** d, int32_t compute, int32_t scale) {
    API(cublasLtMatmulDescCreate);
    if (!d) return ST_INVALID_VALUE;
    *d = new Desc{compute, scale};
    g_live.insert(*d);
    return ST_SUCCESS;
}

EXPORT int cublasLtMatmulDescDestroy(Desc* d) {
    API(cublasLtMatmulDescDestroy);
    if (!live(d, "cublasLtMatmulDescDestroy", "descriptor")) return ST_INVALID_VALUE;
    g_live.erase(d);
    delete d;
    return ST_SUCCESS;
}

EXPORT int cublasLtMatmulDescSetAttribute(Desc* d, int attr, const void* buf, size_t size) {
    API(cublasLtMatmulDescSetAttribute);
    const char* fn = "cublasLtMatmulDescSetAttribute";
    if (!live(d, fn, "descriptor")) return ST_INVALID_VALUE;
    int r;
    switch (attr) {
        case 0: return set_field(fn, "COMPUTE_TYPE", &d->compute, buf, size);
        case 1: return set_field(fn, "SCALE_TYPE", &d->scale, buf, size);
        case 2: return set_field(fn, "POINTER_MODE", &d->pointer_mode, buf, size);
        case 3: r = set_field(fn, "TRANSA", &d->transa, buf, size); break;
        case 4: r = set_field(fn, "TRANSB", &d->transb, buf, size); break;
        case 5: r = set_field(fn, "TRANSC", &d->transc, buf, size); break;
        case 7: return set_field(fn, "EPILOGUE", &d->epilogue, buf, size);
        default:
            say("%s: attribute %d is not emulated", fn, attr);
            return ST_INVALID_VALUE;
    }
    if (r == ST_SUCCESS && (d->transa < 0 || d->transa > 2 || d->transb < 0 || d->transb > 2)) {
        say("%s: a transpose operation must be CUBLAS_OP_N, _T or _C (0, 1, 2)", fn);
        return ST_INVALID_VALUE;
    }
    return r;
}

EXPORT int cublasLtMatmulPreferenceCreate(Pref** p) {
    API(cublasLtMatmulPreferenceCreate);
    if (!p) return ST_INVALID_VALUE;
    *p = new Pref;
    g_live.insert(*p);
    return ST_SUCCESS;
}

EXPORT int cublasLtMatmulPreferenceDestroy(Pref* p) {
    API(cublasLtMatmulPreferenceDestroy);
    if (!live(p, "cublasLtMatmulPreferenceDestroy", "preference")) return ST_INVALID_VALUE;
    g_live.erase(p);
    delete p;
    return ST_SUCCESS;
}

EXPORT int cublasLtMatmulPreferenceSetAttribute(Pref* p, int attr, const void* buf, size_t size) {
    API(cublasLtMatmulPreferenceSetAttribute);
    const char* fn = "cublasLtMatmulPreferenceSetAttribute";
    if (!live(p, fn, "preference")) return ST_INVALID_VALUE;
    uint32_t u32;
    switch (attr) {
        case 0: return set_field(fn, "SEARCH_MODE", &u32, buf, size);
        case 1: return set_field(fn, "MAX_WORKSPACE_BYTES", &p->max_ws, buf, size);
        case 5: case 6: case 7: case 8: return set_field(fn, "MIN_ALIGNMENT", &u32, buf, size);
        default:
            say("%s: attribute %d is not emulated", fn, attr);
            return ST_INVALID_VALUE;
    }
}

struct Algo {
    uint64_t data[8];
};
struct HeuristicResult {
    Algo algo;
    size_t workspaceSize;
    int state;
    float wavesCount;
    int reserved[4];
};
static_assert(sizeof(HeuristicResult) == 96, "cublasLtMatmulHeuristicResult_t is 96 bytes");

EXPORT int cublasLtMatmulAlgoGetHeuristic(Handle* h, Desc* d, Layout* a, Layout* b, Layout* c, Layout* dd, Pref* pref,
                                          int requested, HeuristicResult* results, int* count) {
    API(cublasLtMatmulAlgoGetHeuristic);
    const char* fn = "cublasLtMatmulAlgoGetHeuristic";
    if (!live(h, fn, "handle")) return ST_NOT_INITIALIZED;
    if (!live(pref, fn, "preference")) return ST_INVALID_VALUE;
    if (requested <= 0 || !results || !count) {
        say("%s: requestedAlgoCount %d (must be > 0) or a NULL result pointer", fn, requested);
        return ST_INVALID_VALUE;
    }
    Problem pr;
    if (int r = validate(fn, d, a, b, c, dd, &pr)) return r;
    memset(results, 0, sizeof(HeuristicResult));
    Algo& al = results[0].algo;
    al.data[0] = ALGO_MAGIC;
    al.data[1] = (uint64_t)a->type | ((uint64_t)d->transa << 8) | ((uint64_t)d->transb << 16);
    results[0].workspaceSize = 0;  // the emulated kernel needs no workspace
    results[0].state = ST_SUCCESS;
    results[0].wavesCount = 1.0f;
    *count = 1;
    return ST_SUCCESS;
}

EXPORT int cublasLtMatmul(Handle* h, Desc* d, const void* alpha, const void* A, Layout* a, const void* B, Layout* b,
                          const void* beta, const void* C, Layout* c, void* D, Layout* dd, const Algo* algo,
                          void* workspace, size_t ws_size, void* stream) {
    API(cublasLtMatmul);
    const char* fn = "cublasLtMatmul";
    (void)stream;
    if (!live(h, fn, "handle")) return ST_NOT_INITIALIZED;
    if (sticky()) return ST_EXECUTION_FAILED;
    Problem pr;
    if (int r = validate(fn, d, a, b, c, dd, &pr)) return r;
    if (!alpha || !beta) {
        say("%s: alpha or beta is NULL", fn);
        return ST_INVALID_VALUE;
    }
    if (algo) {
        uint64_t want = (uint64_t)a->type | ((uint64_t)d->transa << 8) | ((uint64_t)d->transb << 16);
        if (algo->data[0] != ALGO_MAGIC || algo->data[1] != want) {
            say("%s: the algorithm was not returned by cublasLtMatmulAlgoGetHeuristic for these types and "
                "transposes",
                fn);
            return ST_INVALID_VALUE;
        }
    }
    if (ws_size) {
        std::string why;
        if (!workspace || !mem_check((uintptr_t)workspace, ws_size, &why)) {
            say("%s: workspace of %zu bytes: %s", fn, ws_size, workspace ? why.c_str() : "NULL pointer");
            return ST_INVALID_VALUE;
        }
    }
    float al, be;
    memcpy(&al, alpha, 4);
    memcpy(&be, beta, 4);
    if (!operand_ok(fn, 'A', A, a) || !operand_ok(fn, 'B', B, b) || !operand_ok(fn, 'D', D, dd))
        return ST_INVALID_VALUE;
    if (be != 0.0f && !operand_ok(fn, 'C', C, c)) return ST_INVALID_VALUE;
    if (C == D && (c->ld != dd->ld)) {
        say("%s: C and D are the same memory but their layouts differ (ld %" PRId64 " vs %" PRId64 ")", fn, c->ld,
            dd->ld);
        return ST_INVALID_VALUE;
    }
    // Run on the stream (now, or at every replay of a captured graph: with copies of the
    // descriptors, which the caller may destroy once this returns).
    Layout la = *a, lb = *b, lc = *c, ld = *dd;
    Desc de = *d;
    int r = enqueue(stream, fn, [=] {
        // The operands may be gone by a replay.
        if (!operand_ok(fn, 'A', A, &la) || !operand_ok(fn, 'B', B, &lb) || !operand_ok(fn, 'D', D, &ld) ||
            (be != 0.0f && !operand_ok(fn, 'C', C, &lc)))
            return (int)ILLEGAL_ADDRESS;
        matmul(&de, al, A, &la, B, &lb, be, C, &lc, D, &ld, pr);
        return (int)OK;
    });
    return r == OK ? ST_SUCCESS : ST_EXECUTION_FAILED;
}
