// Loss and gradient of a dense network (a multilayer perceptron) on a weighted batch, for XLA's
// CPU backend: an XLA FFI custom call, compiled and registered by dynamics/native.py.
//
// The network (dynamics.models.mlp without normalization):
//   h_0 = x,  z_k = c_k h_{k-1} W_k^T + b_k,  h_k = act(z_k) (k < L),  f = z_L,
// with W_k (out, in) row-major, c_k the parameterization's multiplier, act one of identity,
// ReLU and tanh; the loss  sum_i [w_i > 0] w_i l(f_i, t_i)  with l the square loss
// mean_j (f_ij - t_ij)^2 or the cross-entropy -sum_j t_ij log softmax(f_i)_j.
//
// One call computes the loss and every layer's gradient for each run of a batch of runs,
// one run after the other, on the calling thread (so it is safe on several simulated CPU
// devices at once). Activations are kept feature-major (features x examples), which makes every
// product of a step one form, C += A B with B's rows contiguous, computed by register-blocked
// tiles; the transposes that need are the size of an activation, not of a product.
//
// Numbers:
// - a run's numbers do not depend on how many runs a call holds, nor on anything else in
//   the call: each run is computed alone, in a fixed order;
// - examples are processed in order and the sums over examples (weight and bias gradients,
//   the loss) run over them one by one, so examples past the last one of nonzero weight are
//   never touched: a batch masked to its first b examples gives bit for bit the numbers of
//   the batch of those b examples;
// - the gradient of an example of zero weight is exactly zero, as in `where(w > 0, ...)`.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;
#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));
constexpr int kRegs = 32;
#else
constexpr int kRegs = 16;
#endif

template <class V>
constexpr int lanes() {
  return static_cast<int>(sizeof(V) / sizeof(float));
}
template <class V>
inline V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V>
inline void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
inline v8 fmadd(v8 a, v8 b, v8 c) {  // a * b + c, fused where the machine has it
#if defined(__FMA__)
  return reinterpret_cast<v8>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a),
                                              reinterpret_cast<__m256>(b),
                                              reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}
#if defined(__AVX512F__)
inline v16 fmadd(v16 a, v16 b, v16 c) {
  return reinterpret_cast<v16>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                               reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
}
#endif

// ------------------------------------------------------------------ products

inline v8 splat(const float* p, v8) {
#if defined(__AVX__)
  return reinterpret_cast<v8>(_mm256_broadcast_ss(p));
#else
  const float a = *p;
  return v8{a, a, a, a, a, a, a, a};
#endif
}
#if defined(__AVX512F__)
inline v16 splat(const float* p, v16) { return reinterpret_cast<v16>(_mm512_set1_ps(*p)); }
#endif

// What happens to a tile of products on its way to memory: nothing (kPlain); a layer's forward
// pass, c z + b then the activation (kForward); the way back through an activation, with h the
// activation's output in C's layout (kBackward).
enum Activation { kLinear = 0, kRelu = 1, kTanh = 2 };
enum EpiKind { kPlain = 0, kForward = 1, kBackward = 2 };

struct Epi {
  int kind = kPlain;
  int activation = kLinear;
  bool hidden = false;          // kForward: apply the activation (every layer but the last)
  float scale = 1.0f;           // kForward: the layer's multiplier c
  const float* bias = nullptr;  // kForward: b, one per row of C
  const float* h = nullptr;     // kBackward: the activation's output, C's layout (ldc)
};

template <class V>
inline V finish(V x, const Epi& e, int row, const float* h) {
  if (e.kind == kForward) {
    if (e.scale != 1.0f) x = e.scale * x;
    if (e.bias != nullptr) x = x + e.bias[row];
    if (e.hidden) {
      if (e.activation == kRelu) {
        x = (x < V{}) ? V{} : x;  // max(x, 0) that keeps a NaN, as XLA's
      } else if (e.activation == kTanh) {
        for (int l = 0; l < lanes<V>(); ++l) x[l] = std::tanh(x[l]);
      }
    }
  } else if (e.kind == kBackward) {
    const V hv = vload<V>(h);
    if (e.activation == kRelu) {
      x = (hv > V{}) ? x : V{};  // relu'(z) = [z > 0] = [relu(z) > 0]
    } else if (e.activation == kTanh) {
      x = x * (1.0f - hv * hv);
    }
  }
  return x;
}

// One tile of C (MR rows from row m0, NV vectors of columns) = sum_k A(m, k) B[k, :], with row
// k of B at B + k ldb and row m of C at C + m ldc; A(m, k) at A[k lda + m] (COLS: A stored by
// columns) or at A[m lda + k] (by rows). Every entry of C is one chain of fused multiply-adds
// over k in order, then the epilogue.
template <class V, int MR, int NV, bool COLS>
inline void tile(int K, const float* A, std::ptrdiff_t lda, const float* B, std::ptrdiff_t ldb,
                 float* C, std::ptrdiff_t ldc, const Epi& e, int m0, const float* h) {
  constexpr int W = lanes<V>();
  V c[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) c[r][v] = V{};
  if constexpr (COLS) {
    for (int k = 0; k < K; ++k) {
      V b[NV];
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) b[v] = vload<V>(B + k * ldb + v * W);
      const float* a = A + k * lda;
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const V ar = splat(a + r, V{});
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) c[r][v] = fmadd(ar, b[v], c[r][v]);
      }
    }
  } else {
    const float* a[MR];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) a[r] = A + r * lda;
    for (int k = 0; k < K; ++k) {
      V b[NV];
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) b[v] = vload<V>(B + k * ldb + v * W);
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) {
        const V ar = splat(a[r] + k, V{});
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) c[r][v] = fmadd(ar, b[v], c[r][v]);
      }
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      const std::ptrdiff_t at = r * ldc + v * W;
      vstore<V>(C + at, finish(c[r][v], e, m0 + r, h + at));
    }
}

// Rows m0..M-1 of one column block, MR rows at a time and the rest in one smaller tile.
template <class V, int NV, int MR, bool COLS>
void rows(int m0, int M, int K, const float* A, std::ptrdiff_t lda, const float* B,
          std::ptrdiff_t ldb, float* C, std::ptrdiff_t ldc, const Epi& e, const float* h) {
  if constexpr (MR > 0) {
    for (; m0 + MR <= M; m0 += MR)
      tile<V, MR, NV, COLS>(K, A + m0 * (COLS ? 1 : lda), lda, B, ldb, C + m0 * ldc, ldc, e, m0,
                            h + m0 * ldc);
    if (m0 < M) rows<V, NV, MR - 1, COLS>(m0, M, K, A, lda, B, ldb, C, ldc, e, h);
  }
}

// The tallest tile of NV vectors whose accumulators, B's vectors and a broadcast fit in the
// vector registers, with one to spare (16 registers: 6 x 2 or 12 x 1; 32: 12 x 2 or 24 x 1);
// A stored by rows takes one address register per row, so at most 8 rows.
template <int NV, bool COLS>
constexpr int tile_rows() {
  constexpr int r = (kRegs == 32 ? 24 : 12) / NV;
  return COLS ? r : (r > 8 ? 8 : r);
}

// C (M x N) = epilogue(A (M x K) B (K x N)), N a multiple of 8; A(m, k) at A[k lda + m] (COLS)
// or A[m lda + k]; h (kBackward) in C's layout.
template <bool COLS>
void gemm(int M, int N, int K, const float* A, std::ptrdiff_t lda, const float* B,
          std::ptrdiff_t ldb, float* C, std::ptrdiff_t ldc, const Epi& e = Epi{}) {
  const float* h = e.h != nullptr ? e.h : C;  // read only by kBackward
  int n0 = 0;
#if defined(__AVX512F__)
  for (; n0 + 32 <= N; n0 += 32)
    rows<v16, 2, tile_rows<2, COLS>(), COLS>(0, M, K, A, lda, B + n0, ldb, C + n0, ldc, e,
                                             h + n0);
  for (; n0 + 16 <= N; n0 += 16)
    rows<v16, 1, tile_rows<1, COLS>(), COLS>(0, M, K, A, lda, B + n0, ldb, C + n0, ldc, e,
                                             h + n0);
#else
  for (; n0 + 16 <= N; n0 += 16)
    rows<v8, 2, tile_rows<2, COLS>(), COLS>(0, M, K, A, lda, B + n0, ldb, C + n0, ldc, e,
                                            h + n0);
#endif
  for (; n0 + kLanes <= N; n0 += kLanes)
    rows<v8, 1, tile_rows<1, COLS>(), COLS>(0, M, K, A, lda, B + n0, ldb, C + n0, ldc, e,
                                            h + n0);
}

// dst[c, r] = src[r, c] for r < n_rows, c < n_cols; 8 x 8 blocks in registers.
void transpose(const float* src, int n_rows, int n_cols, std::ptrdiff_t lds, float* dst,
               std::ptrdiff_t ldd) {
  int r0 = 0;
#if defined(__AVX__)
  for (; r0 + 8 <= n_rows; r0 += 8) {
    int c0 = 0;
    for (; c0 + 8 <= n_cols; c0 += 8) {
      __m256 x[8], y[8];
      for (int i = 0; i < 8; ++i) x[i] = _mm256_loadu_ps(src + (r0 + i) * lds + c0);
      for (int i = 0; i < 8; i += 2) {
        y[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        y[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        x[i] = _mm256_shuffle_ps(y[i], y[i + 2], 0x44);
        x[i + 1] = _mm256_shuffle_ps(y[i], y[i + 2], 0xEE);
        x[i + 2] = _mm256_shuffle_ps(y[i + 1], y[i + 3], 0x44);
        x[i + 3] = _mm256_shuffle_ps(y[i + 1], y[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        y[i] = _mm256_permute2f128_ps(x[i], x[i + 4], 0x20);
        y[i + 4] = _mm256_permute2f128_ps(x[i], x[i + 4], 0x31);
      }
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (c0 + i) * ldd + r0, y[i]);
    }
    for (int r = r0; r < r0 + 8; ++r)
      for (int c = c0; c < n_cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
#endif
  for (int r = r0; r < n_rows; ++r)
    for (int c = 0; c < n_cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

inline int round8(int n) { return (n + 7) / 8 * 8; }

// ------------------------------------------------------------------ the network

enum Loss { kSquare = 0, kCrossEntropy = 1 };

struct Net {
  int L;
  std::vector<int> width;  // L + 1 widths
  int activation;
  int loss;
  bool bias;
  std::vector<float> mult;  // L multipliers
};

struct Work {
  std::vector<float> xt;                // d_0 x P: the inputs, feature-major
  std::vector<std::vector<float>> h;    // h[k]: width[k] x P, k = 1..L (h[L]: the outputs f)
  std::vector<float> d, g, bm, dw;      // deltas, input gradients, a batch-major copy, a gradient
  std::vector<float> target;            // one example's one-hot target
};

// The loss and gradients of one run. x (B, d_0), t (B, C), w (B); W[k], b[k] of layer k + 1.
float run_one(const Net& net, int B, const float* x, const float* t, const int32_t* labels,
              const float* w,
              const float* const* W, const float* const* b, float* const* dW, float* const* db,
              Work& ws) {
  const int L = net.L;
  const int* width = net.width.data();
  int n = 0;  // examples up to the last one of nonzero weight: the rest are never read
  for (int i = 0; i < B; ++i)
    if (w[i] > 0.0f) n = i + 1;
  if (n == 0) {
    for (int k = 0; k < L; ++k) {
      std::fill(dW[k], dW[k] + static_cast<std::size_t>(width[k + 1]) * width[k], 0.0f);
      if (net.bias) std::fill(db[k], db[k] + width[k + 1], 0.0f);
    }
    return 0.0f;
  }
  const int P = round8(n);  // columns of the feature-major arrays (padding columns are zero)
  int wmax = 0;
  for (int k = 0; k <= L; ++k) wmax = std::max(wmax, width[k]);
  ws.xt.assign(static_cast<std::size_t>(width[0]) * P, 0.0f);
  ws.h.resize(L + 1);
  for (int k = 1; k <= L; ++k) ws.h[k].resize(static_cast<std::size_t>(width[k]) * P);
  ws.d.resize(static_cast<std::size_t>(wmax) * P);
  ws.g.resize(static_cast<std::size_t>(wmax) * P);
  ws.bm.resize(static_cast<std::size_t>(P) * round8(wmax));
  ws.dw.resize(static_cast<std::size_t>(wmax) * round8(wmax));
  transpose(x, n, width[0], width[0], ws.xt.data(), P);

  // forward: h_{k+1} = act(c W h_k + b), feature-major
  const float* in = ws.xt.data();
  for (int k = 0; k < L; ++k) {
    const int fi = width[k], fo = width[k + 1];
    Epi e;
    e.kind = kForward;
    e.activation = net.activation;
    e.hidden = k + 1 < L;
    e.scale = net.mult[k];
    e.bias = net.bias ? b[k] : nullptr;
    float* z = ws.h[k + 1].data();
    gemm<false>(fo, P, fi, W[k], fi, in, P, z, P, e);
    in = z;
  }

  // loss, and its gradient with respect to the outputs, feature-major into d (C x P)
  const int C = width[L];
  const float* f = ws.h[L].data();
  float* d = ws.d.data();
  std::fill(d, d + static_cast<std::size_t>(C) * P, 0.0f);
  ws.target.resize(C);
  double total = 0.0;
  for (int i = 0; i < n; ++i) {
    if (!(w[i] > 0.0f)) continue;
    const float* ti;
    if (labels != nullptr) {  // one-hot; a label outside [0, C) is all zeros, as jax.nn.one_hot
      std::fill(ws.target.begin(), ws.target.end(), 0.0f);
      if (labels[i] >= 0 && labels[i] < C) ws.target[labels[i]] = 1.0f;
      ti = ws.target.data();
    } else {
      ti = t + static_cast<std::ptrdiff_t>(i) * C;
    }
    if (net.loss == kSquare) {
      double s = 0.0;
      const float scale = 2.0f * (w[i] / static_cast<float>(C));
      for (int j = 0; j < C; ++j) {
        const float e = f[j * P + i] - ti[j];
        s += static_cast<double>(e) * e;
        d[j * P + i] = scale * e;
      }
      total += (s / C) * w[i];
    } else {
      float mx = f[i];
      for (int j = 1; j < C; ++j) mx = std::max(mx, f[j * P + i]);
      double se = 0.0, st = 0.0;
      for (int j = 0; j < C; ++j) se += std::exp(static_cast<double>(f[j * P + i] - mx));
      const double lse = std::log(se);
      double li = 0.0;
      for (int j = 0; j < C; ++j) {
        const double logp = static_cast<double>(f[j * P + i] - mx) - lse;
        li -= ti[j] * logp;
        st += ti[j];
      }
      for (int j = 0; j < C; ++j) {
        const double p = std::exp(static_cast<double>(f[j * P + i] - mx) - lse);
        d[j * P + i] = static_cast<float>(w[i] * (st * p - ti[j]));
      }
      total += li * w[i];
    }
  }

  // backward: d holds dL/dz_k (width[k] x P) on entry to layer k
  for (int k = L - 1; k >= 0; --k) {
    const int fi = width[k], fo = width[k + 1];
    if (net.bias) {  // z = c u + b: the bias takes dL/dz, the product c dL/dz
      for (int o = 0; o < fo; ++o) {
        const float* row = d + static_cast<std::ptrdiff_t>(o) * P;
        float s = 0.0f;
        for (int i = 0; i < n; ++i) s += row[i];
        db[k][o] = s;
      }
    }
    const float c = net.mult[k];
    if (c != 1.0f)
      for (std::size_t q = 0; q < static_cast<std::size_t>(fo) * P; ++q) d[q] *= c;
    // dW = d (fo x n) h_{k} (n x fi), h_{k} batch-major (fi padded to a multiple of 8)
    const int fp = round8(fi);
    const float* hb;
    if (k == 0 && fp == fi) {
      hb = x;
    } else {
      float* bm = ws.bm.data();
      const float* src = (k == 0) ? ws.xt.data() : ws.h[k].data();
      if (fp != fi)
        for (int i = 0; i < n; ++i) std::fill(bm + i * fp + fi, bm + (i + 1) * fp, 0.0f);
      transpose(src, fi, n, P, bm, fp);
      hb = bm;
    }
    float* out = (fp == fi) ? dW[k] : ws.dw.data();
    gemm<false>(fo, fp, n, d, P, hb, fp, out, fp);
    if (fp != fi)
      for (int o = 0; o < fo; ++o)
        std::memcpy(dW[k] + static_cast<std::ptrdiff_t>(o) * fi, out + o * fp, sizeof(float) * fi);
    if (k == 0) break;
    // dL/dz_{k-1} = act'(z_{k-1}) (W^T d), fi x P
    Epi e;
    e.kind = kBackward;
    e.activation = net.activation;
    e.h = ws.h[k].data();
    gemm<true>(fi, P, fo, W[k], fi, d, P, ws.g.data(), P, e);
    std::swap(ws.d, ws.g);
    d = ws.d.data();
  }
  return static_cast<float>(total);
}

}  // namespace

namespace ffi = xla::ffi;

// Arguments: x (runs..., B, d_0), the targets t (runs..., B, C) float32 or class labels
// (runs..., B) int32, w (runs..., B), then the L weights
// (runs..., out, in) and, with bias, the L biases (runs..., out). Results: the loss (runs...),
// the L weight gradients and, with bias, the L bias gradients. Attributes: activation (0
// identity, 1 ReLU, 2 tanh), loss (0 square, 1 cross-entropy), bias (0 or 1), multipliers (L).
static ffi::Error DenseGradImpl(ffi::RemainingArgs args, ffi::RemainingRets rets, int32_t activation,
                                int32_t loss, int32_t bias, ffi::Span<const float> multipliers) {
  const int L = static_cast<int>(multipliers.size());
  const int per = bias ? 2 : 1;
  if (L < 1 || args.size() != static_cast<std::size_t>(3 + per * L) ||
      rets.size() != static_cast<std::size_t>(1 + per * L))
    return ffi::Error::InvalidArgument("dense_grad: argument or result count");
  auto x = args.get<ffi::Buffer<ffi::F32>>(0);
  auto t = args.get<ffi::AnyBuffer>(1);
  auto w = args.get<ffi::Buffer<ffi::F32>>(2);
  auto lo = rets.get<ffi::Buffer<ffi::F32>>(0);
  if (!x.has_value() || !t.has_value() || !w.has_value() || !lo.has_value())
    return ffi::Error::InvalidArgument("dense_grad: buffers");
  auto xd = x->dimensions();
  if (xd.size() < 2) return ffi::Error::InvalidArgument("dense_grad: x must be (..., B, d)");
  const int B = static_cast<int>(xd[xd.size() - 2]);
  const int64_t runs = static_cast<int64_t>((*lo)->element_count());
  Net net;
  net.L = L;
  net.activation = activation;
  net.loss = loss;
  net.bias = bias != 0;
  net.mult.assign(multipliers.begin(), multipliers.end());
  net.width.resize(L + 1);
  net.width[0] = static_cast<int>(xd[xd.size() - 1]);
  std::vector<const float*> Wp(L), bp(L, nullptr);
  std::vector<float*> dWp(L), dbp(L, nullptr);
  std::vector<std::size_t> wsz(L), bsz(L, 0);
  for (int k = 0; k < L; ++k) {
    auto wk = args.get<ffi::Buffer<ffi::F32>>(3 + k);
    auto gk = rets.get<ffi::Buffer<ffi::F32>>(1 + k);
    if (!wk.has_value() || !gk.has_value()) return ffi::Error::InvalidArgument("dense_grad: W");
    auto dims = wk->dimensions();
    if (dims.size() < 2) return ffi::Error::InvalidArgument("dense_grad: W must be (..., out, in)");
    const int fo = static_cast<int>(dims[dims.size() - 2]);
    const int fi = static_cast<int>(dims[dims.size() - 1]);
    if (fi != net.width[k]) return ffi::Error::InvalidArgument("dense_grad: layer widths");
    net.width[k + 1] = fo;
    wsz[k] = static_cast<std::size_t>(fo) * fi;
    Wp[k] = wk->typed_data();
    dWp[k] = (*gk)->typed_data();
    if (net.bias) {
      auto bk = args.get<ffi::Buffer<ffi::F32>>(3 + L + k);
      auto hk = rets.get<ffi::Buffer<ffi::F32>>(1 + L + k);
      if (!bk.has_value() || !hk.has_value()) return ffi::Error::InvalidArgument("dense_grad: b");
      bsz[k] = fo;
      bp[k] = bk->typed_data();
      dbp[k] = (*hk)->typed_data();
    }
  }
  const int C = net.width[L];
  const bool labels = t->element_type() == ffi::DataType::S32;
  if (!labels && t->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("dense_grad: targets must be float32 or int32 labels");
  if (static_cast<int64_t>(t->element_count()) != runs * B * (labels ? 1 : C) ||
      static_cast<int64_t>(w->element_count()) != runs * B ||
      static_cast<int64_t>(x->element_count()) != runs * B * net.width[0])
    return ffi::Error::InvalidArgument("dense_grad: shapes of x, t, w");
  thread_local Work ws;
  std::vector<const float*> Wr(L), br(L);
  std::vector<float*> dWr(L), dbr(L);
  float* lossp = (*lo)->typed_data();
  for (int64_t r = 0; r < runs; ++r) {
    for (int k = 0; k < L; ++k) {
      Wr[k] = Wp[k] + r * wsz[k];
      dWr[k] = dWp[k] + r * wsz[k];
      br[k] = net.bias ? bp[k] + r * bsz[k] : nullptr;
      dbr[k] = net.bias ? dbp[k] + r * bsz[k] : nullptr;
    }
    const float* tr = labels ? nullptr : static_cast<const float*>(t->untyped_data()) + r * B * C;
    const int32_t* yr = labels ? static_cast<const int32_t*>(t->untyped_data()) + r * B : nullptr;
    lossp[r] = run_one(net, B, x->typed_data() + r * B * net.width[0], tr, yr,
                       w->typed_data() + r * B, Wr.data(), br.data(), dWr.data(), dbr.data(), ws);
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynamicsDenseGrad, DenseGradImpl,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("loss")
                                  .Attr<int32_t>("bias")
                                  .Attr<ffi::Span<const float>>("multipliers"));
