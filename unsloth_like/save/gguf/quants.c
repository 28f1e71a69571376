/*
 * GGUF quantisers in C: the same maths as ``kquants.py`` (the K-quants) and the ``gguf``
 * package's numpy code (the legacy types), byte for byte what llama.cpp's ``llama-quantize``
 * writes without an importance matrix, at the speed of compiled code on a CPU.
 *
 * Built on first use by ``native.py`` with the system's C compiler and loaded through ctypes;
 * nothing here depends on Python. Every value is computed in float32, one operation at a time, in
 * ggml's order: the build disables contraction into fused multiply-adds (-ffp-contract=off) and
 * any reassociation (no -ffast-math), because one different last bit can change a stored scale
 * (see kquants.py for why each detail matters).
 *
 * Entry point: ul_quantize_rows(type, src, dst, nrows, n_per_row), type being ggml's type number.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256
#define GROUP_MAX_EPS 1e-15f

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

/* ------------------------------------------------------------------ float helpers */

static inline uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Round half to even through the float32 adder: adding 1.5 * 2^23 leaves the integer in the low
 * mantissa bits. Out-of-range inputs give what ggml's nearest_int gives (it is the same trick). */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int32_t i;
    memcpy(&i, &val, 4);
    return (i & 0x007fffff) - 0x00400000;
}

/* float32 -> IEEE half, round to nearest even; NaN becomes a quiet NaN with the sign kept. */
static uint16_t to_half(float f) {
    uint32_t x = float_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t a = x & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;            /* NaN */
    if (a >= 0x47800000u) return sign | 0x7c00u;           /* >= 65536 (or inf): infinity */
    if (a >= 0x38800000u) {                                /* normal half (>= 2^-14) */
        uint32_t r = a - (112u << 23);                     /* rebias the exponent 127 -> 15 */
        r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;         /* 23 -> 10 mantissa bits, ties to even;
                                                              a carry into 0x7c00 is infinity */
        return sign | (uint16_t)r;
    }
    uint32_t e = a >> 23;
    if (e < 102) return sign;                              /* below 2^-25: rounds to zero */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;              /* the value is m * 2^(e-150) */
    uint32_t shift = 126 - e;                              /* in units of 2^-24: m >> shift */
    uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (q & 1u))) q++;
    return sign | (uint16_t)q;                             /* q == 0x400 is the smallest normal */
}

static float from_half(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_float(sign | 0x7f800000u | (m << 13));
    if (e != 0) return bits_float(sign | ((e + 112u) << 23) | (m << 13));
    float v = (float)m * 0x1p-24f;                         /* subnormal: exact */
    return sign ? -v : v;
}

static inline void put_half(uint8_t *p, float f) { uint16_t h = to_half(f); p[0] = (uint8_t)h; p[1] = (uint8_t)(h >> 8); }

/* ------------------------------------------------------------------ legacy block types */

/* (int)roundf(v) as ggml's x86-64 build computes it, inlined: v minus its truncation is exact
 * below 2^23, and halves round away from zero. Out of int range (infinite values, from the
 * infinite inverse scale of a block of float32 denormals) x86 converts to INT_MIN, whose low
 * byte, 0, is what ggml stores. */
static inline int round_away(float v) {
    if (!(fabsf(v) < 2147483648.f)) return INT32_MIN;
    int i = (int)v;
    float frac = v - (float)i;
    return i + (frac >= 0.5f) - (frac <= -0.5f);  /* branch-free: the halves are unpredictable */
}

/* Q8_0: 32 values, one scale: {half d; int8 qs[32]}. */
static void q8_0_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) { float a = fabsf(x[j]); amax = amax > a ? amax : a; }
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int j = 0; j < 32; j++) y[2 + j] = (uint8_t)(int8_t)round_away(x[j] * id);
    }
}

/* The signed value of largest magnitude (the first one on ties), as Q4_0/Q5_0 pick it. */
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (amax < fabsf(x[j])) { amax = fabsf(x[j]); max = x[j]; }
    }
    return max;
}

/* Q4_0: {half d; uint8 qs[16]}, values j and j+16 in the low and high nibble of byte j. */
static void q4_0_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 18) {
        const float d = signed_absmax(x, 32) / -8;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        for (int j = 0; j < 16; j++) {
            uint8_t lo = (uint8_t)imin(15, (int8_t)(x[j] * id + 8.5f));
            uint8_t hi = (uint8_t)imin(15, (int8_t)(x[16 + j] * id + 8.5f));
            y[2 + j] = lo | (uint8_t)(hi << 4);
        }
    }
}

static void min_max(const float *x, int n, float *lo, float *hi) {
    float min = FLT_MAX, max = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
    }
    *lo = min; *hi = max;
}

/* Q4_1: {half d; half m; uint8 qs[16]}. */
static void q4_1_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 20) {
        float min, max;
        min_max(x, 32, &min, &max);
        const float d = (max - min) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        put_half(y + 2, min);
        for (int j = 0; j < 16; j++) {
            uint8_t lo = (uint8_t)imin(15, (int8_t)((x[j] - min) * id + 0.5f));
            uint8_t hi = (uint8_t)imin(15, (int8_t)((x[16 + j] - min) * id + 0.5f));
            y[4 + j] = lo | (uint8_t)(hi << 4);
        }
    }
}

static void put_u32(uint8_t *p, uint32_t v) { for (int k = 0; k < 4; k++) p[k] = (uint8_t)(v >> (8 * k)); }

/* Q5_0: {half d; uint8 qh[4]; uint8 qs[16]}: the fifth bits of the 32 values in qh. */
static void q5_0_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 22) {
        const float d = signed_absmax(x, 32) / -16;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            uint8_t lo = (uint8_t)imin(31, (int8_t)(x[j] * id + 16.5f));
            uint8_t hi = (uint8_t)imin(31, (int8_t)(x[16 + j] * id + 16.5f));
            y[6 + j] = (uint8_t)((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= ((uint32_t)(lo & 0x10u) >> 4) << j;
            qh |= ((uint32_t)(hi & 0x10u) >> 4) << (j + 16);
        }
        put_u32(y + 2, qh);
    }
}

/* Q5_1: {half d; half m; uint8 qh[4]; uint8 qs[16]}. */
static void q5_1_row(const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / 32; b++, x += 32, y += 24) {
        float min, max;
        min_max(x, 32, &min, &max);
        const float d = (max - min) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        put_half(y, d);
        put_half(y + 2, min);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            uint8_t lo = (uint8_t)((x[j] - min) * id + 0.5f);
            uint8_t hi = (uint8_t)((x[16 + j] - min) * id + 0.5f);
            y[8 + j] = (uint8_t)((lo & 0x0f) | ((hi & 0x0f) << 4));
            qh |= ((uint32_t)(lo & 0x10u) >> 4) << j;
            qh |= ((uint32_t)(hi & 0x10u) >> 4) << (j + 16);
        }
        put_u32(y + 4, qh);
    }
}

/* ------------------------------------------------------------------ K-quant scale searches */

/* Scale and minimum of one sub-block for x ~ scale*L - the_min, L in [0, nmax] (kquants.py's
 * _make_qkx2_quants, one sub-block at a time). */
static float qkx2(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                  float rmin, float rdelta, int nstep, int use_mad) {
    uint8_t trial[32];
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best = 0;
    for (int i = 0; i < n; i++) {
        L[i] = (uint8_t)imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
        float diff = scale * L[i] + min - x[i];
        diff = use_mad ? fabsf(diff) : diff * diff;
        best += w[i] * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(0, imin(nmax, nearest_int(iscale * (x[i] - min))));
            trial[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (!(det > 0)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
        float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
        if (this_min > 0) {  /* a positive offset is not representable: refit the scale alone */
            this_min = 0;
            this_scale = sum_xl / sum_l2;
        }
        float err = 0;
        for (int i = 0; i < n; i++) {
            float diff = this_scale * trial[i] + this_min - x[i];
            diff = use_mad ? fabsf(diff) : diff * diff;
            err += w[i] * diff;
        }
        if (err < best) {
            memcpy(L, trial, (size_t)n);
            best = err;
            scale = this_scale;
            min = this_min;
        }
    }
    *the_min = -min;
    return scale;
}

/* The first rounding of Q3_K's and Q6_K's searches: each value against the inverse scale, L in
 * [-nmax, nmax), with the x^2-weighted sums sum(w*x*l) and sum(w*l*l) that judge a scale. */
static void round_weighted(int n, int nmax, const float *x, float iscale, int8_t *L, float *sumlx, float *suml2) {
    float slx = 0, sl2 = 0;
    for (int i = 0; i < n; i++) {
        int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
        L[i] = (int8_t)l;
        float w = x[i] * x[i];
        slx += w * x[i] * l;
        sl2 += w * l * l;
    }
    *sumlx = slx;
    *suml2 = sl2;
}

/* Symmetric scale for x ~ scale*(L - nmax), weighted by x^2 (kquants.py's _make_qx_quants). */
static float qx(int n, int nmax, const float *x, int8_t *L) {
    const float max = signed_absmax(x, n);
    if (fabsf(max) < GROUP_MAX_EPS) {  /* all (nearly) zero */
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx, suml2;
    round_weighted(n, nmax, x, iscale, L, &sumlx, &suml2);
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i])));
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                L[i] = (int8_t)(nmax + imax(-nmax, imin(nmax - 1, nearest_int(iscale * x[i]))));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

/* Q3_K's search: round against the max, then up to five passes moving one value at a time
 * (kquants.py's _make_q3_quants). */
static float q3(int n, int nmax, const float *x, int8_t *L) {
    const float max = signed_absmax(x, n);
    if (fabsf(max) < GROUP_MAX_EPS) {  /* all (nearly) zero */
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float sumlx, suml2;
    round_weighted(n, nmax, x, -nmax / max, L, &sumlx, &suml2);
    for (int round = 0; round < 5; round++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float w = x[i] * x[i];
            float slx = sumlx - w * x[i] * L[i];
            if (!(slx > 0)) continue;
            float sl2 = suml2 - w * L[i] * L[i];
            int l = imax(-nmax, imin(nmax - 1, nearest_int(x[i] * sl2 / slx)));
            if (l == L[i]) continue;
            slx += w * x[i] * l;
            sl2 += w * l * l;
            if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
                L[i] = (int8_t)l;
                sumlx = slx;
                suml2 = sl2;
                changed++;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < n; i++) L[i] = (int8_t)(L[i] + nmax);
    return sumlx / suml2;
}

/* ------------------------------------------------------------------ K-quant block types */

/* Values 32 apart share a byte, two bits each (Q2_K, Q3_K): 64 bytes per 256 values. */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int j = 0; j < QK_K; j += 128) {
        for (int l = 0; l < 32; l++) {
            qs[j / 4 + l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
        }
    }
}

/* Q2_K: {uint8 scales[16] (scale | min << 4); uint8 qs[64]; half d; half dmin}. */
static void q2_k_block(const float *x, uint8_t *y) {
    uint8_t L[QK_K];
    float w[16], scales[16], mins[16];
    uint8_t *sc = y, *qs = y + 16;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; j++) {
        for (int l = 0; l < 16; l++) w[l] = fabsf(x[16 * j + l]);
        scales[j] = qkx2(16, 3, x + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15, 1);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    const float q4scale = 15.f;
    uint16_t d = 0, dmin = 0;  /* +0 halves */
    if (max_scale > 0) {
        float iscale = q4scale / max_scale;
        for (int j = 0; j < 16; j++) sc[j] = (uint8_t)nearest_int(iscale * scales[j]);
        d = to_half(max_scale / q4scale);
    } else {
        memset(sc, 0, 16);
    }
    if (max_min > 0) {
        float iscale = q4scale / max_min;
        for (int j = 0; j < 16; j++) sc[j] |= (uint8_t)(nearest_int(iscale * mins[j]) << 4);
        dmin = to_half(max_min / q4scale);
    }
    for (int j = 0; j < 16; j++) {
        const float dj = from_half(d) * (sc[j] & 0xF);
        if (!dj) continue;
        const float mj = from_half(dmin) * (sc[j] >> 4);
        for (int i = 0; i < 16; i++) {
            L[16 * j + i] = (uint8_t)imax(0, imin(3, nearest_int((x[16 * j + i] + mj) / dj)));
        }
    }
    pack_2bit(L, qs);
    y[80] = (uint8_t)d; y[81] = (uint8_t)(d >> 8);
    y[82] = (uint8_t)dmin; y[83] = (uint8_t)(dmin >> 8);
}

/* Q3_K: {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d}. */
static void q3_k_block(const float *x, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    int l6[16];
    uint8_t *hmask = y, *qs = y + 32, *sc = y + 96;
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; j++) {
        scales[j] = q3(16, 4, x + 16 * j, L + 16 * j);
        float a = fabsf(scales[j]);
        if (a > amax) { amax = a; max_scale = scales[j]; }
    }
    memset(sc, 0, 12);
    uint16_t d = 0;
    if (max_scale) {
        float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; j++) {
            int8_t l = (int8_t)nearest_int(iscale * scales[j]);
            l6[j] = imax(-32, imin(31, l)) + 32;
            if (j < 8) sc[j] = (uint8_t)(l6[j] & 0xF);
            else sc[j - 8] |= (uint8_t)((l6[j] & 0xF) << 4);
            sc[j % 4 + 8] |= (uint8_t)((l6[j] >> 4) << (2 * (j / 4)));
        }
        d = to_half(1 / iscale);
    } else {
        for (int j = 0; j < 16; j++) l6[j] = 0;
    }
    for (int j = 0; j < 16; j++) {
        const float dj = from_half(d) * (l6[j] - 32);
        if (!dj) continue;
        for (int i = 0; i < 16; i++) {
            L[16 * j + i] = (int8_t)(imax(-4, imin(3, nearest_int(x[16 * j + i] / dj))) + 4);
        }
    }
    uint8_t low[QK_K];
    memset(hmask, 0, 32);
    for (int j = 0; j < QK_K; j++) {  /* bit 2 of value j goes to byte j % 32, bit j / 32 */
        int l = L[j];
        if (l > 3) { hmask[j % 32] |= (uint8_t)(1u << (j / 32)); l -= 4; }
        low[j] = (uint8_t)l;
    }
    pack_2bit(low, qs);
    y[108] = (uint8_t)d; y[109] = (uint8_t)(d >> 8);
}

/* Q4_K/Q5_K's sub-block scales and levels: (levels, 12 packed scale bytes, d, dmin). */
static void q45_k_levels(const float *x, int nmax, float rmin, int nstep, uint8_t *L, uint8_t *packed,
                         uint16_t *d_out, uint16_t *dmin_out) {
    float w[32], scales[8], mins[8];
    uint8_t ls[8], lm[8];
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        const float *xj = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++) sum_x2 += xj[l] * xj[l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++) w[l] = av_x + fabsf(xj[l]);
        scales[j] = qkx2(32, nmax, xj, w, L + 32 * j, &mins[j], rmin, 0.1f, nstep, 0);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; j++) {
        uint8_t s = (uint8_t)nearest_int(inv_scale * scales[j]);
        uint8_t m = (uint8_t)nearest_int(inv_min * mins[j]);
        ls[j] = s < 63 ? s : 63;
        lm[j] = m < 63 ? m : 63;
    }
    for (int j = 0; j < 4; j++) {  /* ggml's get_scale_min_k4 layout */
        packed[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        packed[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        packed[j + 8] = (uint8_t)((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
    }
    uint16_t d = to_half(max_scale / 63.f), dmin = to_half(max_min / 63.f);
    for (int j = 0; j < 8; j++) {
        const float dj = from_half(d) * ls[j];
        if (!dj) continue;
        const float mj = from_half(dmin) * lm[j];
        for (int i = 0; i < 32; i++) {
            L[32 * j + i] = (uint8_t)imax(0, imin(nmax, nearest_int((x[32 * j + i] + mj) / dj)));
        }
    }
    *d_out = d;
    *dmin_out = dmin;
}

static void put_d_dmin(uint8_t *y, uint16_t d, uint16_t dmin) {
    y[0] = (uint8_t)d; y[1] = (uint8_t)(d >> 8); y[2] = (uint8_t)dmin; y[3] = (uint8_t)(dmin >> 8);
}

/* Q4_K: {half d; half dmin; uint8 scales[12]; uint8 qs[128]}. */
static void q4_k_block(const float *x, uint8_t *y) {
    uint8_t L[QK_K];
    uint16_t d, dmin;
    q45_k_levels(x, 15, -1.f, 20, L, y + 4, &d, &dmin);
    put_d_dmin(y, d, dmin);
    uint8_t *q = y + 16;
    for (int j = 0; j < QK_K; j += 64, q += 32) {  /* 64 values: 32 low nibbles, then 32 high */
        for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

/* Q5_K: {half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}. */
static void q5_k_block(const float *x, uint8_t *y) {
    uint8_t L[QK_K];
    uint16_t d, dmin;
    q45_k_levels(x, 31, -0.5f, 15, L, y + 4, &d, &dmin);
    put_d_dmin(y, d, dmin);
    uint8_t *qh = y + 16, *ql = y + 48;
    memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
        for (int j = 0; j < 32; j++) {
            int l1 = L[n + j], l2 = L[n + j + 32];
            if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
            if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
            ql[j] = (uint8_t)(l1 | (l2 << 4));
        }
    }
}

/* Q6_K: {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}. */
static void q6_k_block(const float *x, uint8_t *y) {
    int8_t L[QK_K];
    float scales[16];
    float max_scale = 0, max_abs = 0;
    for (int j = 0; j < 16; j++) {
        scales[j] = qx(16, 32, x + 16 * j, L + 16 * j);
        float a = fabsf(scales[j]);
        if (a > max_abs) { max_abs = a; max_scale = scales[j]; }
    }
    if (max_abs < GROUP_MAX_EPS) {  /* all scales (nearly) zero: an all-zero block */
        memset(y, 0, 210);
        return;
    }
    int8_t *sc = (int8_t *)(y + 192);
    float iscale = -128.f / max_scale;
    uint16_t d = to_half(1 / iscale);
    for (int j = 0; j < 16; j++) sc[j] = (int8_t)imin(127, nearest_int(iscale * scales[j]));
    for (int j = 0; j < 16; j++) {
        const float dj = from_half(d) * sc[j];
        if (!dj) continue;
        for (int i = 0; i < 16; i++) {
            L[16 * j + i] = (int8_t)(imax(-32, imin(31, nearest_int(x[16 * j + i] / dj))) + 32);
        }
    }
    uint8_t *ql = y, *qh = y + 128;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; l++) {
            ql[l] = (uint8_t)((L[j + l] & 0xF) | ((L[j + l + 64] & 0xF) << 4));
            ql[l + 32] = (uint8_t)((L[j + l + 32] & 0xF) | ((L[j + l + 96] & 0xF) << 4));
            qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6));
        }
    }
    y[208] = (uint8_t)d; y[209] = (uint8_t)(d >> 8);
}

/* ------------------------------------------------------------------ entry points */

typedef void (*k_block_fn)(const float *, uint8_t *);
typedef void (*row_fn)(const float *, uint8_t *, int64_t);

static void k_row(k_block_fn block, int bytes, const float *x, uint8_t *y, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; b++) block(x + b * QK_K, y + b * bytes);
}

/* Bytes of one row of n_per_row values, or 0 for an unknown type or a row that does not fill
 * whole blocks. */
int64_t ul_row_bytes(int type, int64_t n_per_row) {
    int block = 32, bytes;
    switch (type) {
        case T_Q8_0: bytes = 34; break;
        case T_Q4_0: bytes = 18; break;
        case T_Q4_1: bytes = 20; break;
        case T_Q5_0: bytes = 22; break;
        case T_Q5_1: bytes = 24; break;
        case T_Q2_K: block = QK_K; bytes = 84; break;
        case T_Q3_K: block = QK_K; bytes = 110; break;
        case T_Q4_K: block = QK_K; bytes = 144; break;
        case T_Q5_K: block = QK_K; bytes = 176; break;
        case T_Q6_K: block = QK_K; bytes = 210; break;
        default: return 0;
    }
    if (n_per_row <= 0 || n_per_row % block) return 0;
    return n_per_row / block * bytes;
}

/* Quantise nrows rows of n_per_row float32 values (contiguous) into dst (nrows * row bytes).
 * Returns 0, or -1 for an unknown type or a row length that is not a whole number of blocks. */
int ul_quantize_rows(int type, const float *src, uint8_t *dst, int64_t nrows, int64_t n_per_row) {
    const int64_t row_bytes = ul_row_bytes(type, n_per_row);
    if (!row_bytes) return -1;
    for (int64_t r = 0; r < nrows; r++) {
        const float *x = src + r * n_per_row;
        uint8_t *y = dst + r * row_bytes;
        switch (type) {
            case T_Q8_0: q8_0_row(x, y, n_per_row); break;
            case T_Q4_0: q4_0_row(x, y, n_per_row); break;
            case T_Q4_1: q4_1_row(x, y, n_per_row); break;
            case T_Q5_0: q5_0_row(x, y, n_per_row); break;
            case T_Q5_1: q5_1_row(x, y, n_per_row); break;
            case T_Q2_K: k_row(q2_k_block, 84, x, y, n_per_row); break;
            case T_Q3_K: k_row(q3_k_block, 110, x, y, n_per_row); break;
            case T_Q4_K: k_row(q4_k_block, 144, x, y, n_per_row); break;
            case T_Q5_K: k_row(q5_k_block, 176, x, y, n_per_row); break;
            case T_Q6_K: k_row(q6_k_block, 210, x, y, n_per_row); break;
        }
    }
    return 0;
}
