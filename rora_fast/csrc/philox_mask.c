/*
 * CPU fast path of the RoRA weight keep-mask (rora_fast/reference.py defines it; this file
 * must stay bit-identical to reference.weight_keep_mask, which the tests check).
 *
 * Element (n, k) of an out x in weight uses Philox4x32-10 with key = seed (lo, hi words)
 * and counter (n * ceil(in / 8) + k / 8, 0, 0, 0) -- Triton's tl.randint4x stream -- and
 * keeps the element when 16-bit lane k % 8 ((word[j / 2] >> (16 * (j % 2))) & 0xFFFF)
 * is >= thr.
 *
 * A minimal CPython module (no numpy or torch headers): keep_mask(seed, out_ptr, rows,
 * cols, thr, threads) writes rows * cols bytes (0/1) to the buffer at out_ptr (the
 * data_ptr() of a contiguous torch.bool tensor).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Philox for a block of consecutive counters: a loop the compiler can vectorise. */
#define BLK 64
static inline void philox_block(uint64_t seed, uint32_t first, int nb, uint32_t *w0,
                                uint32_t *w1, uint32_t *w2, uint32_t *w3) {
    const uint32_t s0 = (uint32_t)(seed & 0xFFFFFFFFu), s1 = (uint32_t)(seed >> 32);
    for (int i = 0; i < nb; ++i) {
        uint32_t c0 = first + (uint32_t)i, c1 = 0, c2 = 0, c3 = 0, k0 = s0, k1 = s1;
        for (int r = 0; r < 10; ++r) {
            uint64_t pb = (uint64_t)0xCD9E8D57u * c2;
            uint64_t pa = (uint64_t)0xD2511F53u * c0;
            uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
            uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
            c1 = (uint32_t)pb;
            c3 = (uint32_t)pa;
            c0 = n0;
            c2 = n2;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        w0[i] = c0; w1[i] = c1; w2[i] = c2; w3[i] = c3;
    }
}

/* The keep-mask as bytes (1 = kept) for a rows x cols weight. */
static void keep_mask_rows(uint64_t seed, uint8_t *out, int64_t rows, int64_t cols,
                           uint32_t thr, int threads) {
    const int64_t groups = (cols + 7) / 8;
#ifdef _OPENMP
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
#endif
    for (int64_t n = 0; n < rows; ++n) {
        uint8_t *row = out + n * cols;
        uint32_t w[4][BLK];
        for (int64_t q0 = 0; q0 < groups; q0 += BLK) {
            int nb = (int)(groups - q0 < BLK ? groups - q0 : BLK);
            philox_block(seed, (uint32_t)(n * groups + q0), nb, w[0], w[1], w[2], w[3]);
            for (int i = 0; i < nb; ++i) {
                int64_t k0 = (q0 + i) * 8;
                int64_t lanes = cols - k0 < 8 ? cols - k0 : 8;
                for (int64_t j = 0; j < lanes; ++j) {
                    uint32_t half = (w[j >> 1][i] >> (16 * (j & 1))) & 0xFFFFu;
                    row[k0 + j] = half >= thr;
                }
            }
        }
    }
    (void)threads;
}

/* bits(w * scale) where the lane is kept, +0.0f where it is dropped (no branch, no NaN
   leaking through a dropped element: the same as torch.where(keep, w * scale, 0)). */
static inline float keep_scale(float w, uint32_t lane, uint32_t thr, float scale) {
    union { float f; uint32_t u; } v;
    v.f = w * scale;
    v.u &= (uint32_t)0 - (uint32_t)(lane >= thr);
    return v.f;
}

/* out = keep ? w * scale : 0, for a contiguous float32 weight (one pass, no mask buffer).
   On x86-64 gcc builds AVX-512 / AVX2 / baseline clones and picks one at run time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void masked_f32_rows(uint64_t seed, const float *w, float *out, int64_t rows,
                            int64_t cols, uint32_t thr, float scale, int threads) {
    const int64_t groups = (cols + 7) / 8;
    const int64_t full = cols / 8;  /* groups with all 8 lanes inside the row */
#ifdef _OPENMP
    #pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
#endif
    for (int64_t n = 0; n < rows; ++n) {
        const float *wr = w + n * cols;
        float *orow = out + n * cols;
        uint32_t w0[BLK], w1[BLK], w2[BLK], w3[BLK];
        for (int64_t q0 = 0; q0 < groups; q0 += BLK) {
            int nb = (int)(groups - q0 < BLK ? groups - q0 : BLK);
            philox_block(seed, (uint32_t)(n * groups + q0), nb, w0, w1, w2, w3);
            int nfull = (int)(full - q0 < nb ? (full - q0 > 0 ? full - q0 : 0) : nb);
            for (int i = 0; i < nfull; ++i) {
                const float *src = wr + (q0 + i) * 8;
                float *dst = orow + (q0 + i) * 8;
                dst[0] = keep_scale(src[0], w0[i] & 0xFFFFu, thr, scale);
                dst[1] = keep_scale(src[1], w0[i] >> 16, thr, scale);
                dst[2] = keep_scale(src[2], w1[i] & 0xFFFFu, thr, scale);
                dst[3] = keep_scale(src[3], w1[i] >> 16, thr, scale);
                dst[4] = keep_scale(src[4], w2[i] & 0xFFFFu, thr, scale);
                dst[5] = keep_scale(src[5], w2[i] >> 16, thr, scale);
                dst[6] = keep_scale(src[6], w3[i] & 0xFFFFu, thr, scale);
                dst[7] = keep_scale(src[7], w3[i] >> 16, thr, scale);
            }
            for (int i = nfull; i < nb; ++i) {  /* the ragged last group of the row */
                uint32_t r[4] = {w0[i], w1[i], w2[i], w3[i]};
                int64_t k0 = (q0 + i) * 8;
                int64_t lanes = cols - k0 < 8 ? cols - k0 : 8;
                for (int64_t j = 0; j < lanes; ++j)
                    orow[k0 + j] = keep_scale(wr[k0 + j], (r[j >> 1] >> (16 * (j & 1))) & 0xFFFFu,
                                              thr, scale);
            }
        }
    }
    (void)threads;
}

static PyObject *py_masked_f32(PyObject *self, PyObject *args) {
    unsigned long long seed, wptr, optr;
    long long rows, cols;
    unsigned int thr;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLIfi", &seed, &wptr, &optr, &rows, &cols, &thr, &scale,
                          &threads))
        return NULL;
    if (rows < 0 || cols < 0 || wptr == 0 || optr == 0) {
        PyErr_SetString(PyExc_ValueError, "masked_f32: bad buffer or shape");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    masked_f32_rows((uint64_t)seed, (const float *)(uintptr_t)wptr, (float *)(uintptr_t)optr,
                    rows, cols, thr, scale, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_keep_mask(PyObject *self, PyObject *args) {
    unsigned long long seed, ptr;
    long long rows, cols;
    unsigned int thr;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLLIi", &seed, &ptr, &rows, &cols, &thr, &threads))
        return NULL;
    if (rows < 0 || cols < 0 || ptr == 0) {
        PyErr_SetString(PyExc_ValueError, "keep_mask: bad buffer or shape");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    keep_mask_rows((uint64_t)seed, (uint8_t *)(uintptr_t)ptr, rows, cols, thr, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_has_openmp(PyObject *self, PyObject *args) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"keep_mask", py_keep_mask, METH_VARARGS,
     "keep_mask(seed, out_ptr, rows, cols, thr, threads): write the RoRA keep-mask bytes."},
    {"masked_f32", py_masked_f32, METH_VARARGS,
     "masked_f32(seed, w_ptr, out_ptr, rows, cols, thr, scale, threads): out = keep ? w*scale : 0."},
    {"has_openmp", py_has_openmp, METH_NOARGS, "Whether the module was built with OpenMP."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox_cpu",
                                    "CPU fast path of the RoRA weight keep-mask.", -1, methods};

PyMODINIT_FUNC PyInit__philox_cpu(void) { return PyModule_Create(&module); }
