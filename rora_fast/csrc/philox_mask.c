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

/* Philox for a block of consecutive counters, one counter at a time (the portable path,
   and the tail of the SIMD path). */
#define BLK 64
static inline void philox_block_scalar(uint64_t seed, uint32_t first, int nb, uint32_t *w0,
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

/* The same, eight counters per step in AVX2 registers (x86-64, chosen at run time when
   the CPU has AVX2). The compiler's own vectorisation of the loop above widens every
   32 x 32 -> 64-bit product to 64-bit lanes and runs at about scalar speed; here each
   product is two vpmuludq (even and odd lanes) and two blends for its high and low
   words. Bit-identical to the scalar path (tests/test_native_mask.py). */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RORA_HAVE_AVX2_PATH 1
#include <immintrin.h>

__attribute__((target("avx2")))
static inline void mulhilo8(__m256i a, __m256i m, __m256i *hi, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m);                       /* lanes 0, 2, 4, 6 */
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  /* lanes 1, 3, 5, 7 */
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

__attribute__((target("avx2")))
static inline void philox_rounds8(__m256i *c0, __m256i *c1, __m256i *c2, __m256i *c3,
                                  uint32_t s0, uint32_t s1) {
    const __m256i m0 = _mm256_set1_epi32((int)0xD2511F53u);
    const __m256i m1 = _mm256_set1_epi32((int)0xCD9E8D57u);
    uint32_t k0 = s0, k1 = s1;
    for (int r = 0; r < 10; ++r) {
        __m256i hia, loa, hib, lob;
        mulhilo8(*c0, m0, &hia, &loa);
        mulhilo8(*c2, m1, &hib, &lob);
        __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hib, *c1), _mm256_set1_epi32((int)k0));
        __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hia, *c3), _mm256_set1_epi32((int)k1));
        *c1 = lob;
        *c3 = loa;
        *c0 = n0;
        *c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

__attribute__((target("avx2")))
static void philox_block_avx2(uint64_t seed, uint32_t first, int nb, uint32_t *w0,
                              uint32_t *w1, uint32_t *w2, uint32_t *w3) {
    const uint32_t s0 = (uint32_t)(seed & 0xFFFFFFFFu), s1 = (uint32_t)(seed >> 32);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(first + (uint32_t)i)), lane);
        __m256i c1 = _mm256_setzero_si256(), c2 = c1, c3 = c1;
        philox_rounds8(&c0, &c1, &c2, &c3, s0, s1);
        _mm256_storeu_si256((__m256i *)(w0 + i), c0);
        _mm256_storeu_si256((__m256i *)(w1 + i), c1);
        _mm256_storeu_si256((__m256i *)(w2 + i), c2);
        _mm256_storeu_si256((__m256i *)(w3 + i), c3);
    }
    if (i < nb)
        philox_block_scalar(seed, first + (uint32_t)i, nb - i, w0 + i, w1 + i, w2 + i, w3 + i);
}
#endif

/* 1 when philox_block takes the AVX2 path: set at import from the CPU's features;
   set_simd(False) forces the scalar path (the tests compare the two). */
static int use_avx2 = 0;

static inline void philox_block(uint64_t seed, uint32_t first, int nb, uint32_t *w0,
                                uint32_t *w1, uint32_t *w2, uint32_t *w3) {
#ifdef RORA_HAVE_AVX2_PATH
    if (use_avx2 && nb >= 8) {
        philox_block_avx2(seed, first, nb, w0, w1, w2, w3);
        return;
    }
#endif
    philox_block_scalar(seed, first, nb, w0, w1, w2, w3);
}

static int cpu_has_avx2(void) {
#ifdef RORA_HAVE_AVX2_PATH
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
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

static PyObject *py_simd(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(use_avx2 ? "avx2" : "scalar");
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on))
        return NULL;
    use_avx2 = on ? cpu_has_avx2() : 0;
    return PyUnicode_FromString(use_avx2 ? "avx2" : "scalar");
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
    {"simd", py_simd, METH_NOARGS, "The Philox path in use: 'avx2' or 'scalar'."},
    {"set_simd", py_set_simd, METH_VARARGS,
     "set_simd(on): use the AVX2 Philox path when on and the CPU has AVX2 (else the scalar "
     "path); returns the path now in use."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox_cpu",
                                    "CPU fast path of the RoRA weight keep-mask.", -1, methods};

PyMODINIT_FUNC PyInit__philox_cpu(void) {
    use_avx2 = cpu_has_avx2();
    return PyModule_Create(&module);
}
