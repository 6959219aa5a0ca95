// Fused fp32 kernels for the engine's decode step on x86 CPUs with AVX2 and FMA (see kernels.py, which builds
// this file with the system's C compiler and calls it through ctypes). Each replaces a chain of small PyTorch
// ops with one pass over the data; all work row by row, so a row's result never depends on the other rows in
// the batch (batched greedy output stays that of the request alone).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

// exp of 8 lanes: Cephes' expf (range reduction by ln 2 split in two, degree-5 polynomial; ~1 ulp over the
// normal range), the algorithm of avx_mathfun and of PyTorch's own vectorised exp. Below ~-87.7 it gives 0
// (no denormals), and NaN gives NaN.
static inline __m256 exp8(__m256 x) {
    // clamped with x as the second operand, which max/min return when it is NaN: a NaN stays NaN
    x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for rows of `dim` floats (a multiple of 8).
void lmf_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
            __m256 v = _mm256_loadu_ps(xr + i);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        __m256 s = _mm256_set1_ps(1.0f / sqrtf(hsum(ss) / (float)dim + eps));
        for (int64_t i = 0; i < dim; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), s), _mm256_loadu_ps(w + i)));
    }
}

// Rotary embedding in place, HF's half-split convention: for each of `rows` rows (`stride` floats apart) and
// its `heads` heads of hd floats, (x1, x2) -> (x1 cos1 + x2 sin1, x2 cos2 + x1 sin2), with the row's cos and
// sin (hd floats each; sin's first half negated, as layers.rope_cos_sin makes them). hd/2 a multiple of 8.
void lmf_rope(float *x, int64_t stride, int64_t rows, int64_t heads, int64_t hd, const float *cos, const float *sin) {
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos + r * hd, *s = sin + r * hd;
        for (int64_t h = 0; h < heads; h++) {
            float *x1 = x + r * stride + h * hd, *x2 = x1 + half;
            for (int64_t i = 0; i < half; i += 8) {
                __m256 a = _mm256_loadu_ps(x1 + i), b = _mm256_loadu_ps(x2 + i);
                _mm256_storeu_ps(x1 + i, _mm256_fmadd_ps(b, _mm256_loadu_ps(s + i), _mm256_mul_ps(a, _mm256_loadu_ps(c + i))));
                _mm256_storeu_ps(x2 + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(s + half + i),
                                                         _mm256_mul_ps(b, _mm256_loadu_ps(c + half + i))));
            }
        }
    }
}

// out[r, i] = silu(gu[r, i]) * gu[r, n + i]: SwiGLU on the fused gate/up product's rows of 2n (n a multiple of 8).
void lmf_silu_mul(const float *gu, float *out, int64_t rows, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * n, *u = g + n;
        float *o = out + r * n;
        for (int64_t i = 0; i < n; i += 8) {
            __m256 a = _mm256_loadu_ps(g + i);
            __m256 silu = _mm256_div_ps(a, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, a))));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
    }
}

// The decode tokens' attention on the dense copy of their contexts (kv_cache.DenseDecode), one task per (row,
// kv head): row r holds token order[r] of the flat batch, whose new key and value are appended at position
// last[r]; then its `group` query heads attend positions first[r]..last[r] (softmax(q k^T * scale) v).
// q, k, v: the flat batch's rows, `*_stride` floats apart, heads of `hd` floats side by side (hd a multiple of
// 8). kd, vd: (rows, nkv, cap, hd). y: (tokens, nkv * group, hd), only the decode tokens' rows written.
// scratch: per task `group * (longest context)` floats for the scores.
void lmf_dense_decode_attention(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                                int64_t v_stride, float *kd, float *vd, float *y, const int64_t *order,
                                const int64_t *last, const int64_t *first, int64_t bd, int64_t nkv, int64_t group,
                                int64_t cap, int64_t hd, float scale, float *scratch, int64_t scratch_per,
                                int threads) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)  // tasks differ in context length
    for (int64_t task = 0; task < bd * nkv; task++) {
        const int64_t r = task / nkv, h = task % nkv, t = order[r], pos = last[r], lo = first[r];
        float *K = kd + (r * nkv + h) * cap * hd, *V = vd + (r * nkv + h) * cap * hd;
        const float *kn = k + t * k_stride + h * hd, *vn = v + t * v_stride + h * hd;
        for (int64_t i = 0; i < hd; i++) {
            K[pos * hd + i] = kn[i];
            V[pos * hd + i] = vn[i];
        }
        const int64_t len = pos + 1 - lo;
        const float *qh = q + t * q_stride + h * group * hd;
        float *s = scratch + task * scratch_per;  // s[j * len + l]: query head j's score for position lo + l
        for (int64_t l = 0; l < len; l++) {  // each key row read once for the group's queries
            const float *kr = K + (lo + l) * hd;
            for (int64_t j = 0; j < group; j++) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t i = 0; i < hd; i += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + j * hd + i), _mm256_loadu_ps(kr + i), acc);
                s[j * len + l] = hsum(acc) * scale;
            }
        }
        for (int64_t j = 0; j < group; j++) {  // softmax, max-subtracted
            float *sj = s + j * len, m = -INFINITY;
            for (int64_t l = 0; l < len; l++) m = sj[l] > m ? sj[l] : m;
            const __m256 vm = _mm256_set1_ps(m);
            __m256 vsum = _mm256_setzero_ps();
            int64_t l = 0;
            for (; l + 8 <= len; l += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sj + l), vm));
                _mm256_storeu_ps(sj + l, e);
                vsum = _mm256_add_ps(vsum, e);
            }
            float sum = hsum(vsum), tail[8] = {0};
            for (int64_t i = 0; l + i < len; i++) tail[i] = sj[l + i] - m;
            __m256 e = exp8(_mm256_loadu_ps(tail));
            _mm256_storeu_ps(tail, e);
            for (int64_t i = 0; l + i < len; i++) {
                sj[l + i] = tail[i];
                sum += tail[i];
            }
            const float inv = 1.0f / sum;
            for (l = 0; l < len; l++) sj[l] *= inv;
        }
        for (int64_t j = 0; j < group; j++) {  // out = p v, 64 output lanes (8 accumulators) at a time
            float *out = y + t * nkv * group * hd + (h * group + j) * hd;
            const float *p = s + j * len;
            for (int64_t i0 = 0; i0 < hd; i0 += 64) {
                const int n8 = (int)((hd - i0 < 64 ? hd - i0 : 64) / 8);
                __m256 acc[8];
                for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
                for (int64_t l = 0; l < len; l++) {
                    const __m256 pl = _mm256_set1_ps(p[l]);
                    const float *vr = V + (lo + l) * hd + i0;
                    for (int c = 0; c < n8; c++) acc[c] = _mm256_fmadd_ps(pl, _mm256_loadu_ps(vr + 8 * c), acc[c]);
                }
                for (int c = 0; c < n8; c++) _mm256_storeu_ps(out + i0 + 8 * c, acc[c]);
            }
        }
    }
}
