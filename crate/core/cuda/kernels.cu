// CUDA kernels of beit's fused ops, compiled to PTX by build.rs with the `cuda` feature. Each
// one mirrors a CPU kernel in src/ops.rs, src/optim.rs or src/tokenizer.rs; the Rust side
// (src/cuda.rs) launches them. Row kernels run one block per row with block-wide reductions.
//
// The activation kernels come in two element types, `<name>_f32` and `<name>_bf16` (mixed
// precision): they load and store their type and compute in f32. Gradients of parameters are
// accumulated and written in f32. Cross-entropy, AdamW and EMA are f32 only.

#include <stdint.h>
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16(v); }

// `<name>_f32` and `<name>_bf16` entry points of a template kernel `<name>`; PARAMS and ARGS
// spell the parameter list (with T for the element type) and the argument names.
#define BOTH_TYPES(name, PARAMS, ARGS)                                             \
    extern "C" __global__ void name##_f32 PARAMS(float) { name<float> ARGS; }     \
    extern "C" __global__ void name##_bf16 PARAMS(bf16) { name<bf16> ARGS; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // shared may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (int)threadIdx.x < warps ? shared[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}

__device__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (int)threadIdx.x < warps ? shared[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}

// ---- LayerNorm over rows of d: y = (x - mean) * rstd * gamma + beta ------------------------

template <typename T>
__device__ void row_mean_rstd(const T* x, int d, float eps, float* shared, float* mean, float* rstd) {
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += to_f32(x[i]);
    const float m = block_sum(s, shared) / d;
    float q = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float t = to_f32(x[i]) - m;
        q += t * t;
    }
    *mean = m;
    *rstd = rsqrtf(block_sum(q, shared) / d + eps);
}

template <typename T>
__device__ void layer_norm_fwd(const T* x, const T* gamma, const T* beta, T* y, int d, float eps) {
    __shared__ float shared[32];
    const T* xr = x + (size_t)blockIdx.x * d;
    T* yr = y + (size_t)blockIdx.x * d;
    float mean, rstd;
    row_mean_rstd(xr, d, eps, shared, &mean, &rstd);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        yr[i] = from_f32<T>((to_f32(xr[i]) - mean) * rstd * to_f32(gamma[i]) + to_f32(beta[i]));
    }
}
#define LAYER_NORM_FWD_PARAMS(T) (const T* x, const T* gamma, const T* beta, T* y, int d, float eps)
BOTH_TYPES(layer_norm_fwd, LAYER_NORM_FWD_PARAMS, (x, gamma, beta, y, d, eps))

// dx of one row (f32, into the packed output), and the row's mean and rstd for the parameter
// gradients.
template <typename T>
__device__ void layer_norm_bwd_rows(const T* x, const T* gamma, const T* g, float* dx, float* stats, int d, float eps) {
    __shared__ float shared[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * d;
    const T* gr = g + row * d;
    float mean, rstd;
    row_mean_rstd(xr, d, eps, shared, &mean, &rstd);
    float a = 0.f, b = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gh = to_f32(gr[i]) * to_f32(gamma[i]);
        a += gh;
        b += gh * (to_f32(xr[i]) - mean) * rstd;
    }
    const float mean_gh = block_sum(a, shared) / d;
    const float mean_gh_xhat = block_sum(b, shared) / d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float xhat = (to_f32(xr[i]) - mean) * rstd;
        dx[row * d + i] = rstd * (to_f32(gr[i]) * to_f32(gamma[i]) - mean_gh - xhat * mean_gh_xhat);
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}
#define LAYER_NORM_BWD_ROWS_PARAMS(T) (const T* x, const T* gamma, const T* g, float* dx, float* stats, int d, float eps)
BOTH_TYPES(layer_norm_bwd_rows, LAYER_NORM_BWD_ROWS_PARAMS, (x, gamma, g, dx, stats, d, eps))

// The parameter gradients, in the rows after dx of the packed f32 output [rows + 2, d]:
// dgamma[j] += sum_r g[r, j] * xhat[r, j], dbeta[j] += sum_r g[r, j] over this block's rows
// (grid: columns / blockDim.x x row chunks; the two rows start at zero).
template <typename T>
__device__ void layer_norm_bwd_params(const T* x, const T* g, const float* stats, float* packed, int rows, int d,
                                      int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const int start = blockIdx.y * rows_per_chunk;
    const int end = min(rows, start + rows_per_chunk);
    float a = 0.f, b = 0.f;
    for (int r = start; r < end; r++) {
        const float gv = to_f32(g[(size_t)r * d + j]);
        a += gv * (to_f32(x[(size_t)r * d + j]) - stats[2 * r]) * stats[2 * r + 1];
        b += gv;
    }
    atomicAdd(packed + (size_t)rows * d + j, a);
    atomicAdd(packed + (size_t)(rows + 1) * d + j, b);
}
#define LAYER_NORM_BWD_PARAMS_PARAMS(T) \
    (const T* x, const T* g, const float* stats, float* packed, int rows, int d, int rows_per_chunk)
BOTH_TYPES(layer_norm_bwd_params, LAYER_NORM_BWD_PARAMS_PARAMS, (x, g, stats, packed, rows, d, rows_per_chunk))

// ---- Softmax over rows of scale * x + bias (bias: bias_rows rows repeated; 0 = none) -------
// The logits are recomputed in each pass rather than stored, so that a bf16 output never holds
// intermediate values.

template <typename T>
__device__ void softmax_fwd(const T* x, const T* bias, T* y, int d, int bias_rows, float scale) {
    __shared__ float shared[32];
    const T* xr = x + (size_t)blockIdx.x * d;
    const T* br = bias_rows > 0 ? bias + (size_t)(blockIdx.x % bias_rows) * d : nullptr;
    T* yr = y + (size_t)blockIdx.x * d;
    auto logit = [&](int i) { return to_f32(xr[i]) * scale + (br ? to_f32(br[i]) : 0.f); };
    float m = -INFINITY;
    for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, logit(i));
    m = block_max(m, shared);
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += __expf(logit(i) - m);
    const float inv = 1.f / block_sum(s, shared);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = from_f32<T>(__expf(logit(i) - m) * inv);
}
#define SOFTMAX_FWD_PARAMS(T) (const T* x, const T* bias, T* y, int d, int bias_rows, float scale)
BOTH_TYPES(softmax_fwd, SOFTMAX_FWD_PARAMS, (x, bias, y, d, bias_rows, scale))

template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, int d) {
    __shared__ float shared[32];
    const size_t off = (size_t)blockIdx.x * d;
    float dot = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dot += to_f32(y[off + i]) * to_f32(g[off + i]);
    dot = block_sum(dot, shared);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        dx[off + i] = from_f32<T>(to_f32(y[off + i]) * (to_f32(g[off + i]) - dot));
    }
}
#define SOFTMAX_BWD_PARAMS(T) (const T* y, const T* g, T* dx, int d)
BOTH_TYPES(softmax_bwd, SOFTMAX_BWD_PARAMS, (y, g, dx, d))

// ---- GELU (erf form) ---------------------------------------------------------------------

template <typename T>
__device__ void gelu_fwd(const T* x, T* y, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        y[i] = from_f32<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
    }
}
#define GELU_FWD_PARAMS(T) (const T* x, T* y, size_t n)
BOTH_TYPES(gelu_fwd, GELU_FWD_PARAMS, (x, y, n))

template <typename T>
__device__ void gelu_bwd(const T* x, const T* g, T* dx, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = to_f32(x[i]);
        const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * __expf(-0.5f * v * v);
        dx[i] = from_f32<T>((cdf + v * pdf) * to_f32(g[i]));
    }
}
#define GELU_BWD_PARAMS(T) (const T* x, const T* g, T* dx, size_t n)
BOTH_TYPES(gelu_bwd, GELU_BWD_PARAMS, (x, g, dx, n))

// ---- Cross-entropy per row: loss = logsumexp(z) - z[t]; dz = (softmax(z) - onehot(t)) g --

__device__ float row_log_sum_exp(const float* z, int v, float* shared) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < v; i += blockDim.x) m = fmaxf(m, z[i]);
    m = block_max(m, shared);
    float s = 0.f;
    for (int i = threadIdx.x; i < v; i += blockDim.x) s += __expf(z[i] - m);
    return m + __logf(block_sum(s, shared));
}

extern "C" __global__ void cross_entropy_fwd(const float* z, const uint32_t* targets, float* loss, int v) {
    __shared__ float shared[32];
    const float* zr = z + (size_t)blockIdx.x * v;
    const float lse = row_log_sum_exp(zr, v, shared);
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - zr[targets[blockIdx.x]];
}

extern "C" __global__ void cross_entropy_bwd(const float* z, const uint32_t* targets, const float* g, float* dz, int v) {
    __shared__ float shared[32];
    const size_t off = (size_t)blockIdx.x * v;
    const float lse = row_log_sum_exp(z + off, v, shared);
    const float gi = g[blockIdx.x];
    const uint32_t t = targets[blockIdx.x];
    for (int i = threadIdx.x; i < v; i += blockDim.x) {
        dz[off + i] = (__expf(z[off + i] - lse) - (i == (int)t ? 1.f : 0.f)) * gi;
    }
}

// ---- Cross-entropy of logits resized bilinearly to the labels' size, per output pixel ----
// One block per output pixel (b, y, x) of [B, H, W]; logits z are [B, h, w, k]. taps holds
// each output row's and then each output column's two low-resolution indices, weights their
// weights (2 (H + W) each). Ignored pixels get loss 0 and no gradient.

// An output pixel's four taps: cells [row][column] (offsets in the image's map) and the row
// and column weights.
struct ResizedPixel {
    size_t cells[2][2];
    float wy[2], wx[2];
};

__device__ ResizedPixel resized_pixel(const uint32_t* taps, const float* weights, size_t pixel, int w, int H, int W, int k) {
    ResizedPixel p;
    const int x = pixel % W, y = (pixel / W) % H;
    for (int i = 0; i < 2; i++) {
        p.wy[i] = weights[2 * y + i];
        p.wx[i] = weights[2 * (H + x) + i];
        for (int j = 0; j < 2; j++) p.cells[i][j] = ((size_t)taps[2 * y + i] * w + taps[2 * (H + x) + j]) * k;
    }
    return p;
}

// Class i's resized logit: (z00 wy0 + z10 wy1) wx0 + (z01 wy0 + z11 wy1) wx1, as the CPU op.
__device__ __forceinline__ float resized_value(const float* image, const ResizedPixel& p, int i) {
    const float a00 = image[p.cells[0][0] + i], a01 = image[p.cells[0][1] + i];
    const float a10 = image[p.cells[1][0] + i], a11 = image[p.cells[1][1] + i];
    return (a00 * p.wy[0] + a10 * p.wy[1]) * p.wx[0] + (a01 * p.wy[0] + a11 * p.wy[1]) * p.wx[1];
}

// Returns log-sum-exp of the pixel's k resized logits (every thread gets it).
__device__ float resized_log_sum_exp(const float* image, const ResizedPixel& p, int k, float* shared) {
    float m = -INFINITY;
    for (int i = threadIdx.x; i < k; i += blockDim.x) m = fmaxf(m, resized_value(image, p, i));
    m = block_max(m, shared);
    float s = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) s += __expf(resized_value(image, p, i) - m);
    return m + __logf(block_sum(s, shared));
}

extern "C" __global__ void resized_cross_entropy_fwd(const float* z, const uint32_t* labels, const uint32_t* taps, const float* weights, float* loss, int h, int w, int H, int W, int k, uint32_t ignore) {
    __shared__ float shared[32];
    const size_t pixel = blockIdx.x;
    const uint32_t t = labels[pixel];
    if (t == ignore) {  // the same for the whole block
        if (threadIdx.x == 0) loss[pixel] = 0.f;
        return;
    }
    const float* image = z + pixel / ((size_t)H * W) * h * w * k;
    const ResizedPixel p = resized_pixel(taps, weights, pixel, w, H, W, k);
    const float lse = resized_log_sum_exp(image, p, k, shared);
    if (threadIdx.x == 0) loss[pixel] = lse - resized_value(image, p, t);
}

// dz must be zeroed: the four taps of neighbouring pixels overlap, so gradients are added atomically.
extern "C" __global__ void resized_cross_entropy_bwd(const float* z, const uint32_t* labels, const uint32_t* taps, const float* weights, const float* g, float* dz, int h, int w, int H, int W, int k, uint32_t ignore) {
    __shared__ float shared[32];
    const size_t pixel = blockIdx.x;
    const uint32_t t = labels[pixel];
    if (t == ignore) return;
    const size_t image_offset = pixel / ((size_t)H * W) * h * w * k;
    const float* image = z + image_offset;
    const ResizedPixel p = resized_pixel(taps, weights, pixel, w, H, W, k);
    const float lse = resized_log_sum_exp(image, p, k, shared);
    const float gi = g[pixel];
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const float d = (__expf(resized_value(image, p, i) - lse) - (i == (int)t ? 1.f : 0.f)) * gi;
        for (int r = 0; r < 2; r++) {
            for (int c = 0; c < 2; c++) atomicAdd(dz + image_offset + p.cells[r][c] + i, d * (p.wy[r] * p.wx[c]));
        }
    }
}

// Class ids [B, H, W]: the first maximum over the k resized logits of each output pixel.
extern "C" __global__ void resized_argmax(const float* z, const uint32_t* taps, const float* weights, uint32_t* classes, int h, int w, int H, int W, int k) {
    __shared__ float best_values[32];
    __shared__ int best_indices[32];
    const size_t pixel = blockIdx.x;
    const float* image = z + pixel / ((size_t)H * W) * h * w * k;
    const ResizedPixel p = resized_pixel(taps, weights, pixel, w, H, W, k);
    float best = -INFINITY;
    int index = k;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const float v = resized_value(image, p, i);
        if (v > best) best = v, index = i;  // a thread's classes ascend: strict > keeps the first
    }
    // (value, index) pairs: the larger value, the smaller index among equal values.
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int j = __shfl_xor_sync(0xffffffffu, index, o);
        if (v > best || (v == best && j < index)) best = v, index = j;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) best_values[warp] = best, best_indices[warp] = index;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 1; i < (int)(blockDim.x >> 5); i++) {
            if (best_values[i] > best || (best_values[i] == best && best_indices[i] < index)) best = best_values[i], index = best_indices[i];
        }
        classes[pixel] = index;
    }
}

// ---- Bias over rows ----------------------------------------------------------------------

template <typename T>
__device__ void add_bias(const T* x, const T* b, T* y, size_t total, int n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        y[i] = from_f32<T>(to_f32(x[i]) + to_f32(b[i % n]));
    }
}
#define ROW_VECTOR_PARAMS(T) (const T* x, const T* b, T* y, size_t total, int n)
BOTH_TYPES(add_bias, ROW_VECTOR_PARAMS, (x, b, y, total, n))

template <typename T>
__device__ void scale_columns(const T* x, const T* g, T* y, size_t total, int n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        y[i] = from_f32<T>(to_f32(x[i]) * to_f32(g[i % n]));
    }
}
BOTH_TYPES(scale_columns, ROW_VECTOR_PARAMS, (x, b, y, total, n))

// out[j] += sum of column j over this block's rows (out: f32, starts at zero).
template <typename T>
__device__ void sum_rows(const T* x, float* out, int rows, int n, int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const int start = blockIdx.y * rows_per_chunk;
    const int end = min(rows, start + rows_per_chunk);
    float a = 0.f;
    for (int r = start; r < end; r++) a += to_f32(x[(size_t)r * n + j]);
    atomicAdd(out + j, a);
}
#define SUM_ROWS_PARAMS(T) (const T* x, float* out, int rows, int n, int rows_per_chunk)
BOTH_TYPES(sum_rows, SUM_ROWS_PARAMS, (x, out, rows, n, rows_per_chunk))

// ---- Row lookup backward: d table[r, j] = the sum of dy[p, j] over the picks p of row r ------

// offsets/positions list each table row's picks (CSR); one thread per table value, f32 sums in
// the listed order.
template <typename T>
__device__ void row_lookup_bwd(const T* dy, const uint32_t* offsets, const uint32_t* positions, float* out, size_t total, int n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / n;
        const int j = i % n;
        float a = 0.f;
        for (uint32_t q = offsets[r]; q < offsets[r + 1]; q++) a += to_f32(dy[(size_t)positions[q] * n + j]);
        out[i] = a;
    }
}
#define ROW_LOOKUP_BWD_PARAMS(T) (const T* dy, const uint32_t* offsets, const uint32_t* positions, float* out, size_t total, int n)
BOTH_TYPES(row_lookup_bwd, ROW_LOOKUP_BWD_PARAMS, (dy, offsets, positions, out, total, n))

// ---- NHWC convolution pieces: im2col / col2im of k x k "same" convolutions (stride 1, zero
// padding (k-1)/2), 2x2 max-pooling and 2x nearest upsampling. Channels are innermost, so
// consecutive threads touch consecutive addresses.

template <typename T> __device__ __forceinline__ T zero() { return from_f32<T>(0.f); }
template <> __device__ __forceinline__ uint4 zero<uint4>() { return make_uint4(0, 0, 0, 0); }

// One block per output pixel (b, y, x): cols[pixel, (ky, kx, ch)] = x[b, y+ky-p, x+kx-p, ch],
// zero outside the image. A pure copy, so it also runs on 16-byte units (`im2col_nhwc_x16`,
// c counted in units) when a pixel's channels fill whole units: 8 bf16 or 4 f32 per load and
// store instead of one.
template <typename T>
__device__ void im2col_nhwc(const T* x, T* cols, int h, int w, int c, int k) {
    const size_t pixel = blockIdx.x;
    const int px = pixel % w, py = (pixel / w) % h, p = (k - 1) / 2, row_len = k * k * c;
    const size_t image = pixel / ((size_t)w * h) * h;
    T* out = cols + pixel * row_len;
    for (int j = threadIdx.x; j < row_len; j += blockDim.x) {
        const int tap = j / c, ch = j - tap * c, sy = py + tap / k - p, sx = px + tap % k - p;
        out[j] = (sy >= 0 && sy < h && sx >= 0 && sx < w) ? x[((image + sy) * w + sx) * c + ch] : zero<T>();
    }
}
#define IM2COL_NHWC_PARAMS(T) (const T* x, T* cols, int h, int w, int c, int k)
BOTH_TYPES(im2col_nhwc, IM2COL_NHWC_PARAMS, (x, cols, h, w, c, k))
extern "C" __global__ void im2col_nhwc_x16 IM2COL_NHWC_PARAMS(uint4) { im2col_nhwc<uint4>(x, cols, h, w, c, k); }

// The adjoint, in gather form (no atomics): one block per input pixel, dx[b, y, x, ch] = the
// sum over taps of the column entries that read it, in f32.
template <typename T>
__device__ void col2im_nhwc(const T* cols, T* dx, int h, int w, int c, int k) {
    const size_t pixel = blockIdx.x;
    const int px = pixel % w, py = (pixel / w) % h, p = (k - 1) / 2, row_len = k * k * c;
    const size_t image = pixel / ((size_t)w * h) * h;
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        float a = 0.f;
        for (int ky = 0; ky < k; ky++) {
            const int oy = py - ky + p;
            if (oy < 0 || oy >= h) continue;
            for (int kx = 0; kx < k; kx++) {
                const int ox = px - kx + p;
                if (ox < 0 || ox >= w) continue;
                a += to_f32(cols[((image + oy) * w + ox) * row_len + (ky * k + kx) * c + ch]);
            }
        }
        dx[pixel * c + ch] = from_f32<T>(a);
    }
}
#define COL2IM_NHWC_PARAMS(T) (const T* cols, T* dx, int h, int w, int c, int k)
BOTH_TYPES(col2im_nhwc, COL2IM_NHWC_PARAMS, (cols, dx, h, w, c, k))

// Offset of the top-left input element of output element i's 2x2 window ([b, h/2, w/2, c]).
__device__ __forceinline__ size_t window_origin(size_t i, int h, int w, int c) {
    const int ch = i % c, ox = (i / c) % (w / 2);
    const size_t boy = i / ((size_t)c * (w / 2));  // b * h/2 + oy
    return (2 * boy * w + 2 * ox) * (size_t)c + ch;
}

template <typename T>
__device__ void max_pool2_nhwc_fwd(const T* x, T* y, size_t n, int h, int w, int c) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t o = window_origin(i, h, w, c), row = (size_t)w * c;
        float m = to_f32(x[o]);
        m = fmaxf(m, to_f32(x[o + c]));
        m = fmaxf(m, to_f32(x[o + row]));
        y[i] = from_f32<T>(fmaxf(m, to_f32(x[o + row + c])));
    }
}
// n: output elements; h, w, c: the input's.
#define MAX_POOL2_NHWC_FWD_PARAMS(T) (const T* x, T* y, size_t n, int h, int w, int c)
BOTH_TYPES(max_pool2_nhwc_fwd, MAX_POOL2_NHWC_FWD_PARAMS, (x, y, n, h, w, c))

// Each window's gradient goes to its first maximum in row-major order (as the CPU op); the
// rest of the window gets zero. One thread per window.
template <typename T>
__device__ void max_pool2_nhwc_bwd(const T* x, const T* y, const T* g, T* dx, size_t n, int h, int w, int c) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t o = window_origin(i, h, w, c), row = (size_t)w * c;
        const size_t at[4] = {o, o + c, o + row, o + row + c};
        bool given = false;
        for (int t = 0; t < 4; t++) {
            const bool first_max = !given && to_f32(x[at[t]]) == to_f32(y[i]);
            dx[at[t]] = first_max ? g[i] : from_f32<T>(0.f);
            given = given || first_max;
        }
    }
}
#define MAX_POOL2_NHWC_BWD_PARAMS(T) (const T* x, const T* y, const T* g, T* dx, size_t n, int h, int w, int c)
BOTH_TYPES(max_pool2_nhwc_bwd, MAX_POOL2_NHWC_BWD_PARAMS, (x, y, g, dx, n, h, w, c))

// y[b, Y, X, ch] = x[b, Y/2, X/2, ch]; n: output elements; h, w, c: the input's.
template <typename T>
__device__ void upsample2_nhwc_fwd(const T* x, T* y, size_t n, int h, int w, int c) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int ch = i % c, ox = (i / c) % (2 * w);
        const size_t boy = i / ((size_t)c * 2 * w);  // b * 2h + Y
        y[i] = x[((boy / (2 * h) * h + boy % (2 * h) / 2) * w + ox / 2) * (size_t)c + ch];
    }
}
#define UPSAMPLE2_NHWC_FWD_PARAMS(T) (const T* x, T* y, size_t n, int h, int w, int c)
BOTH_TYPES(upsample2_nhwc_fwd, UPSAMPLE2_NHWC_FWD_PARAMS, (x, y, n, h, w, c))

// dx[b, y, x, ch] = the sum of g's 2x2 block over it, in f32; n: dx's elements (h, w, c).
template <typename T>
__device__ void upsample2_nhwc_bwd(const T* g, T* dx, size_t n, int h, int w, int c) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int ch = i % c, ix = (i / c) % w;
        const size_t biy = i / ((size_t)c * w);  // b * h + y
        const size_t row = (size_t)2 * w * c, o = (2 * biy * 2 * w + 2 * ix) * (size_t)c + ch;
        dx[i] = from_f32<T>(to_f32(g[o]) + to_f32(g[o + c]) + to_f32(g[o + row]) + to_f32(g[o + row + c]));
    }
}
#define UPSAMPLE2_NHWC_BWD_PARAMS(T) (const T* g, T* dx, size_t n, int h, int w, int c)
BOTH_TYPES(upsample2_nhwc_bwd, UPSAMPLE2_NHWC_BWD_PARAMS, (g, dx, n, h, w, c))

// ---- Optimizer and EMA, in place ----------------------------------------------------------

// m = beta m + (1 - beta) (s g)   or, squared, v = beta v + (1 - beta) (s g)^2
extern "C" __global__ void adamw_moment(float* m, const float* g, size_t n, float beta, float scale, int squared) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float gs = g[i] * scale;
        m[i] = beta * m[i] + (1.f - beta) * (squared ? gs * gs : gs);
    }
}

// p -= lr (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + lr wd p
extern "C" __global__ void adamw_update(float* p, const float* m, const float* v, size_t n, float lr, float decay,
                                        float inv_bc1, float inv_sqrt_bc2, float eps) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float update = (m[i] * inv_bc1) / (sqrtf(v[i]) * inv_sqrt_bc2 + eps);
        p[i] -= lr * update + decay * p[i];
    }
}

extern "C" __global__ void ema_update(float* e, const float* p, size_t n, float decay) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        e[i] = decay * e[i] + (1.f - decay) * p[i];
    }
}
