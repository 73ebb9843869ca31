// sftd's CUDA kernels: the GPU side of the per-row ops in src/train/nn (causal softmax and its
// gradient, RMSNorm and its input gradient, rotary embedding, the SwiGLU gate and its gradient).
// Each is one pass over global memory where candle's composed ops take several, and each matches
// the CPU kernel of the same op (same formula, same element order within a row); the Rust side
// (src/train/nn/cuda_ops.rs) launches them and the CUDA tests hold them to the CPU kernels.
//
// Row kernels run one block per row (blockDim.x a multiple of 32, at most 1024); the others one
// thread per element or element pair. Every buffer is contiguous. T is float or double.

#include <stdint.h>

template <typename T> __device__ __forceinline__ T exp_of(T x);
template <> __device__ __forceinline__ float exp_of<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double exp_of<double>(double x) { return exp(x); }

template <typename T> __device__ __forceinline__ T sqrt_of(T x);
template <> __device__ __forceinline__ float sqrt_of<float>(float x) { return sqrtf(x); }
template <> __device__ __forceinline__ double sqrt_of<double>(double x) { return sqrt(x); }

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T> __device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    T u = __shfl_xor_sync(0xffffffffu, v, o);
    v = u > v ? u : v;
  }
  return v;
}

// The sum (or max) of v over the block, returned to every thread. The leading barrier keeps a
// second call from overwriting partials that a warp is still reading from the first.
template <typename T, bool MAX> __device__ T block_reduce(T v) {
  __shared__ T partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T w = lane < warps ? partial[lane] : (MAX ? partial[0] : T(0));
  return MAX ? warp_max(w) : warp_sum(w);
}

// ---- causal softmax -----------------------------------------------------------------------------
// x, y: rows of t scores; row r holds query position r mod t and sees columns 0..=r mod t.
// y = softmax(scale · x) over the seen columns, 0 above the diagonal.
template <typename T> __device__ void causal_softmax(const T *x, T *y, int t, T scale) {
  const int64_t row = blockIdx.x;
  const int seen = (int)(row % t) + 1;
  const T *xr = x + row * t;
  T *yr = y + row * t;
  T m = xr[0];
  for (int j = threadIdx.x; j < seen; j += blockDim.x) m = xr[j] > m ? xr[j] : m;
  m = block_reduce<T, true>(m);
  T s = 0;
  for (int j = threadIdx.x; j < seen; j += blockDim.x) {
    T e = exp_of((xr[j] - m) * scale);
    yr[j] = e;
    s += e;
  }
  const T inv = T(1) / block_reduce<T, false>(s);
  for (int j = threadIdx.x; j < seen; j += blockDim.x) yr[j] *= inv;
  for (int j = seen + threadIdx.x; j < t; j += blockDim.x) yr[j] = 0;
}

// dx = scale · y ⊙ (g − Σ y ⊙ g) per row; y is 0 above the diagonal, so only the seen columns
// are read and the rest of dx is 0.
template <typename T>
__device__ void causal_softmax_grad(const T *y, const T *g, T *dx, int t, T scale) {
  const int64_t row = blockIdx.x;
  const int seen = (int)(row % t) + 1;
  const T *yr = y + row * t, *gr = g + row * t;
  T *dr = dx + row * t;
  T dot = 0;
  for (int j = threadIdx.x; j < seen; j += blockDim.x) dot += yr[j] * gr[j];
  dot = block_reduce<T, false>(dot);
  for (int j = threadIdx.x; j < seen; j += blockDim.x) dr[j] = scale * yr[j] * (gr[j] - dot);
  for (int j = seen + threadIdx.x; j < t; j += blockDim.x) dr[j] = 0;
}

// ---- RMSNorm ------------------------------------------------------------------------------------
// Rows of c elements: y = w ⊙ x · r with r = 1/√(mean(x²) + eps).
template <typename T> __device__ T inv_rms(const T *xr, int c, T eps) {
  T ss = 0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) ss += xr[j] * xr[j];
  ss = block_reduce<T, false>(ss);
  return T(1) / sqrt_of(ss / T(c) + eps);
}

template <typename T> __device__ void rms_norm(const T *x, const T *w, T *y, int c, T eps) {
  const int64_t row = blockIdx.x;
  const T *xr = x + row * c;
  T *yr = y + row * c;
  const T r = inv_rms(xr, c, eps);
  for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] = w[j] * (xr[j] * r);
}

// dx = r·(g ⊙ w) − (r³/c)·x·Σ(g ⊙ w ⊙ x); w is frozen and gets no gradient.
template <typename T>
__device__ void rms_norm_grad(const T *x, const T *g, const T *w, T *dx, int c, T eps) {
  const int64_t row = blockIdx.x;
  const T *xr = x + row * c, *gr = g + row * c;
  T *dr = dx + row * c;
  const T r = inv_rms(xr, c, eps);
  T dot = 0;
  for (int j = threadIdx.x; j < c; j += blockDim.x) dot += gr[j] * w[j] * xr[j];
  const T k = r * r * r / T(c) * block_reduce<T, false>(dot);
  for (int j = threadIdx.x; j < c; j += blockDim.x) dr[j] = r * gr[j] * w[j] - k * xr[j];
}

// ---- rotary embedding ---------------------------------------------------------------------------
// x, y: (n, h, d), half-split layout; cos, sin: (n, d/2) f32 at each token's position. One thread
// per (token, head, j < d/2) pair; sign −1 rotates backwards (the gradient).
template <typename T>
__device__ void rope(const T *x, const float *cos, const float *sin, T *y, int n, int h, int d,
                     T sign) {
  const int half = d / 2;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (int64_t)n * h * half) return;
  const int j = (int)(i % half);
  const int64_t th = i / half, t = th / h;
  const T c = (T)cos[t * half + j], s = sign * (T)sin[t * half + j];
  const T x1 = x[th * d + j], x2 = x[th * d + j + half];
  y[th * d + j] = x1 * c - x2 * s;
  y[th * d + j + half] = x2 * c + x1 * s;
}

// ---- SwiGLU gate --------------------------------------------------------------------------------
template <typename T> __device__ __forceinline__ T sigmoid(T x) { return T(1) / (T(1) + exp_of(-x)); }

// y = silu(g) ⊙ u, element by element over len.
template <typename T> __device__ void silu_mul(const T *g, const T *u, T *y, int64_t len) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= len) return;
  y[k] = g[k] * sigmoid(g[k]) * u[k];
}

// d[0..len) = d gate, d[len..2·len) = d up, for the output gradient dy.
template <typename T>
__device__ void silu_mul_grad(const T *g, const T *u, const T *dy, T *d, int64_t len) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= len) return;
  const T s = sigmoid(g[k]);
  d[k] = dy[k] * u[k] * s * (T(1) + g[k] * (T(1) - s));
  d[len + k] = dy[k] * (g[k] * s);
}

#define SFTD_KERNELS(T, SUFFIX)                                                                   \
  extern "C" __global__ void causal_softmax_##SUFFIX(const T *x, T *y, int t, T scale) {         \
    causal_softmax<T>(x, y, t, scale);                                                            \
  }                                                                                               \
  extern "C" __global__ void causal_softmax_grad_##SUFFIX(const T *y, const T *g, T *dx, int t,  \
                                                          T scale) {                              \
    causal_softmax_grad<T>(y, g, dx, t, scale);                                                   \
  }                                                                                               \
  extern "C" __global__ void rms_norm_##SUFFIX(const T *x, const T *w, T *y, int c, T eps) {     \
    rms_norm<T>(x, w, y, c, eps);                                                                 \
  }                                                                                               \
  extern "C" __global__ void rms_norm_grad_##SUFFIX(const T *x, const T *g, const T *w, T *dx,   \
                                                    int c, T eps) {                               \
    rms_norm_grad<T>(x, g, w, dx, c, eps);                                                        \
  }                                                                                               \
  extern "C" __global__ void rope_##SUFFIX(const T *x, const float *cos, const float *sin, T *y,  \
                                           int n, int h, int d, T sign) {                         \
    rope<T>(x, cos, sin, y, n, h, d, sign);                                                       \
  }                                                                                               \
  extern "C" __global__ void silu_mul_##SUFFIX(const T *g, const T *u, T *y, int64_t len) {       \
    silu_mul<T>(g, u, y, len);                                                                    \
  }                                                                                               \
  extern "C" __global__ void silu_mul_grad_##SUFFIX(const T *g, const T *u, const T *dy, T *d,   \
                                                    int64_t len) {                                \
    silu_mul_grad<T>(g, u, dy, d, len);                                                           \
  }

SFTD_KERNELS(float, f32)
SFTD_KERNELS(double, f64)
