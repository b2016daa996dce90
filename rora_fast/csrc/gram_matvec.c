/*
 * CPU fast path of rora_fast.linalg.sigma_max: w = Aᵀ(A v) in ONE pass over a contiguous
 * float32 row-major A (rows x cols). Each row is read once: its dot with v (an entry of
 * A v) is formed while the row is in L1, and the row, scaled by that dot, is added to w.
 * torch needs two passes (A @ v, then Aᵀ @ u), and σ_max of a large weight is bound by
 * the memory traffic of those passes, so this halves the cost of each Lanczos step.
 *
 * Threads own contiguous row blocks and private accumulators (cols floats each), summed
 * at the end. Dots and accumulators are float32 (σ_max is wanted to ~1e-3 relative).
 *
 * A minimal CPython module (no numpy or torch headers):
 *   gram_matvec_f32(a_ptr, v_ptr, w_ptr, rows, cols, threads)
 * reads rows*cols floats at a_ptr, cols floats at v_ptr, writes cols floats at w_ptr.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void gram_rows(const float *a, const float *v, float *acc, int64_t r0, int64_t r1,
                      int64_t cols) {
    for (int64_t n = r0; n < r1; ++n) {
        const float *row = a + n * cols;
        float dot = 0.0f;
#ifdef _OPENMP
        #pragma omp simd reduction(+:dot)
#endif
        for (int64_t k = 0; k < cols; ++k) dot += row[k] * v[k];
#ifdef _OPENMP
        #pragma omp simd
#endif
        for (int64_t k = 0; k < cols; ++k) acc[k] += dot * row[k];
    }
}

static int gram_matvec(const float *a, const float *v, float *w, int64_t rows, int64_t cols,
                       int threads) {
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    memset(w, 0, (size_t)cols * sizeof(float));
    if (threads == 1) {
        gram_rows(a, v, w, 0, rows, cols);
        return 0;
    }
    float *part = (float *)calloc((size_t)(threads - 1) * (size_t)cols, sizeof(float));
    if (part == NULL) return -1;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
        gram_rows(a, v, t == 0 ? w : part + (size_t)(t - 1) * cols, r0, r1, cols);
    }
#else
    gram_rows(a, v, w, 0, rows, cols);
#endif
    for (int t = 0; t < threads - 1; ++t) {
        const float *p = part + (size_t)t * cols;
        for (int64_t k = 0; k < cols; ++k) w[k] += p[k];
    }
    free(part);
    return 0;
}

static PyObject *py_gram_matvec_f32(PyObject *self, PyObject *args) {
    unsigned long long aptr, vptr, wptr;
    long long rows, cols;
    int threads, rc;
    if (!PyArg_ParseTuple(args, "KKKLLi", &aptr, &vptr, &wptr, &rows, &cols, &threads))
        return NULL;
    if (rows < 0 || cols < 0 || aptr == 0 || vptr == 0 || wptr == 0) {
        PyErr_SetString(PyExc_ValueError, "gram_matvec_f32: bad buffer or shape");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = gram_matvec((const float *)(uintptr_t)aptr, (const float *)(uintptr_t)vptr,
                     (float *)(uintptr_t)wptr, rows, cols, threads);
    Py_END_ALLOW_THREADS
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gram_matvec_f32", py_gram_matvec_f32, METH_VARARGS,
     "gram_matvec_f32(a_ptr, v_ptr, w_ptr, rows, cols, threads): w = A^T (A v), one pass."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_linalg_cpu",
                                    "CPU fast path of rora_fast.linalg.sigma_max.", -1, methods};

PyMODINIT_FUNC PyInit__linalg_cpu(void) { return PyModule_Create(&module); }
