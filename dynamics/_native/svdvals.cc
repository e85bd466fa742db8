// Singular values of a batch of small dense float32 matrices, for XLA's CPU backend: an XLA FFI
// custom call, compiled and registered by dynamics/native.py.
//
// Each matrix is reduced to upper bidiagonal form B by Householder reflections (Golub and Kahan)
// in double precision; every singular value of B is then found by bisection on Sturm counts of
// B^T B - x I, taken with the differential stationary qd recurrence, which works on the entries
// of B (never forming B^T B) and is relatively accurate. The bisection probes of all singular
// values of several matrices advance together in vector registers, so the recurrence's latency
// overlaps across probes. At the sizes of a training run's layers (tens to a few hundred rows)
// LAPACK's routines spend most of their time in call overhead and short scalar loops; this
// kernel is several times faster at the same accuracy (tests/test_native.py).
//
// Input (..., r, c), row-major; output (..., min(r, c)), descending. A matrix with a non-finite
// entry gives NaN.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#else
constexpr int kBytes = 32;
#endif
typedef double vd __attribute__((vector_size(kBytes)));
typedef float vf __attribute__((vector_size(kBytes)));
typedef int32_t vi __attribute__((vector_size(kBytes)));
constexpr int kF = kBytes / 4;  // floats per vf
constexpr int kD = kBytes / 8;  // doubles per vd

inline vd load(const double* p) {
  vd v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(double* p, vd v) { __builtin_memcpy(p, &v, sizeof v); }
inline double hsum(vd v) {  // a tree of sums: no long dependency chain
#if defined(__AVX512F__)
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#else
  return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}
// Sum of squares of p[from..ld) (from < ld), read as whole vectors from a block boundary.
inline double sumsq_from(const double* p, int from, int ld) {
  const int i0 = (from / kD) * kD;
  vd acc = {};
  for (int i = i0; i < ld; i += kD) {
    vd x = load(p + i);
    if (i < from) {
      for (int l = 0; l < kD; ++l) x[l] = (i + l < from) ? 0.0 : x[l];
    }
    acc += x * x;
  }
  return hsum(acc);
}

// ------------------------------------------------------------------ bidiagonalization

// The trailing-matrix updates keep a block of up to kG vectors of rows of the reflector(s) in
// registers and stream the columns through them (one load and one store per vector).
constexpr int kG = 8;

// Rows [g0, g0 + NV kD) of columns j0..n-1: y_j -= (aL s_j) v; w += u_j y_j.
template <int NV>
void left_pass(double* a, int ld, int g0, int j0, int n, const double* v, double aL,
               const double* s, const double* u, double* w) {
  vd vv[NV], ww[NV];
  for (int q = 0; q < NV; ++q) {
    vv[q] = load(v + g0 + q * kD);
    ww[q] = vd{};
  }
  for (int j = j0; j < n; ++j) {
    double* y = a + static_cast<std::ptrdiff_t>(j) * ld + g0;
    const double f = aL * s[j], c = u[j];
    for (int q = 0; q < NV; ++q) {
      vd yy = load(y + q * kD) - f * vv[q];
      store(y + q * kD, yy);
      ww[q] += c * yy;
    }
  }
  for (int q = 0; q < NV; ++q) store(w + g0 + q * kD, ww[q]);
}

// Rows [g0, g0 + NV kD) of columns j0..n-1: y_j -= (aR u_j) w; s_j += v . y_j.
template <int NV>
void right_pass(double* a, int ld, int g0, int j0, int n, const double* w, double aR,
                const double* u, const double* v, double* s) {
  vd ww[NV], vv[NV];
  for (int q = 0; q < NV; ++q) {
    ww[q] = load(w + g0 + q * kD);
    vv[q] = load(v + g0 + q * kD);
  }
  for (int j = j0; j < n; ++j) {
    double* y = a + static_cast<std::ptrdiff_t>(j) * ld + g0;
    const double f = aR * u[j];
    vd acc = {};
    for (int q = 0; q < NV; ++q) {
      vd yy = load(y + q * kD) - f * ww[q];
      store(y + q * kD, yy);
      acc += vv[q] * yy;
    }
    s[j] += hsum(acc);
  }
}

// The passes over rows r0..ld-1, a group of up to kG vectors at a time.
#define DYNAMICS_OVER_GROUPS(PASS, ...)                                       \
  for (int g0 = r0; g0 < ld; g0 += kG * kD) {                              \
    switch (std::min(kG, (ld - g0) / kD)) {                                \
      case 1: PASS<1>(a, ld, g0, __VA_ARGS__); break;                      \
      case 2: PASS<2>(a, ld, g0, __VA_ARGS__); break;                      \
      case 3: PASS<3>(a, ld, g0, __VA_ARGS__); break;                      \
      case 4: PASS<4>(a, ld, g0, __VA_ARGS__); break;                      \
      case 5: PASS<5>(a, ld, g0, __VA_ARGS__); break;                      \
      case 6: PASS<6>(a, ld, g0, __VA_ARGS__); break;                      \
      case 7: PASS<7>(a, ld, g0, __VA_ARGS__); break;                      \
      default: PASS<8>(a, ld, g0, __VA_ARGS__); break;                     \
    }                                                                      \
  }

// Upper bidiagonal form of the m x n matrix held column-major in a, leading dimension ld (a
// multiple of kD, rows m..ld-1 zero), m >= n; a is destroyed. Diagonal into d (n),
// superdiagonal into e (n - 1). Workspaces: v, w, z of ld doubles; u, s of n doubles.
//
// Step k applies a left reflector I - aL v v^T (zeroing column k below the diagonal) and a
// right one I - aR u u^T (zeroing row k right of the superdiagonal), in two passes over the
// trailing columns: the left update, which also accumulates A u for the right reflector, and
// the right update, which also takes the inner products with the next step's left reflector.
// Rows above the active block are never read again, so the vector loops start at a block
// boundary and may leave them changed.
void bidiagonalize(double* a, int m, int n, int ld, double* d, double* e, double* v, double* w,
                   double* z, double* u, double* s) {
  (void)m;
  auto col = [&](int j) { return a + static_cast<std::ptrdiff_t>(j) * ld; };
  // The left reflector of column k into v (zero outside rows k..), its factor into aL (0: none),
  // the new diagonal entry into d[k].
  auto left = [&](int k, double& aL) {
    const double* x = col(k);
    const double tail = sumsq_from(x, k + 1, ld);
    const double alpha = x[k];
    for (int i = (k / kD) * kD; i < ld; ++i) v[i] = (i < k) ? 0.0 : x[i];
    if (tail == 0.0) {
      d[k] = alpha;
      aL = 0.0;
      return;
    }
    const double beta = -std::copysign(std::sqrt(alpha * alpha + tail), alpha);
    v[k] = alpha - beta;
    aL = 2.0 / (v[k] * v[k] + tail);
    d[k] = beta;
  };
  double aL = 0.0;
  left(0, aL);
  for (int j = 1; j < n; ++j) {  // step 0's inner products with v
    vd acc = {};
    for (int i = 0; i < ld; i += kD) acc += load(v + i) * load(col(j) + i);
    s[j] = hsum(acc);
  }
  for (int k = 0; k + 1 < n; ++k) {
    const int i0 = (k / kD) * kD;        // the block holding row k
    const int r0 = ((k + 1) / kD) * kD;  // the right reflector works on rows k+1..
    // Left update of the block holding row k first: row k of every column, into u.
    for (int j = k + 1; j < n; ++j) {
      double* y = col(j);
      store(y + i0, load(y + i0) - (aL * s[j]) * load(v + i0));
      u[j] = y[k];
    }
    if (k + 2 == n) {  // last column: no right reflector
      e[k] = u[k + 1];
      // finish the left update of column n-1 below the block of row k
      double* y = col(k + 1);
      const double f = aL * s[k + 1];
      for (int i = i0 + kD; i < ld; i += kD) store(y + i, load(y + i) - f * load(v + i));
      double unused;
      left(k + 1, unused);
      break;
    }
    // The rest of the left update, accumulating w = sum_j u_j a_j over rows r0.. (the block of
    // row k is done: v is masked there when it is also the first block of the pass).
    for (int i = r0; i < ld; ++i) z[i] = (i < i0 + kD) ? 0.0 : v[i];
    DYNAMICS_OVER_GROUPS(left_pass, k + 1, n, z, aL, s, u, w)
    // The right reflector from u = row k of columns k+1..
    double utail = 0.0;
    for (int j = k + 2; j < n; ++j) utail += u[j] * u[j];
    double aR = 0.0;
    if (utail == 0.0) {
      e[k] = u[k + 1];
    } else {
      const double u0 = u[k + 1];
      const double beta = -std::copysign(std::sqrt(u0 * u0 + utail), u0);
      u[k + 1] = u0 - beta;
      aR = 2.0 / (u[k + 1] * u[k + 1] + utail);
      e[k] = beta;
      // w = sum_j A[k, j] a_j; with u_{k+1} = A[k, k+1] - beta, A u = w - beta a_{k+1}
      const double* y = col(k + 1);
      for (int i = r0; i < ld; i += kD) store(w + i, load(w + i) - beta * load(y + i));
    }
    // Right update: column k+1 first (it gives the next left reflector), then the others
    // together with their inner products with that reflector.
    {
      double* y = col(k + 1);
      const double f = aR * u[k + 1];
      for (int i = r0; i < ld; i += kD) store(y + i, load(y + i) - f * load(w + i));
    }
    left(k + 1, aL);
    for (int j = k + 2; j < n; ++j) s[j] = 0.0;
    DYNAMICS_OVER_GROUPS(right_pass, k + 2, n, w, aR, u, v, s)
  }
}

// ------------------------------------------------------------------ bisection

inline vf reciprocal(vf p) {
#if defined(__AVX512F__)
  vf r = reinterpret_cast<vf>(_mm512_rcp14_ps(reinterpret_cast<__m512>(p)));
  return r * (2.0f - p * r);  // one Newton step from 14 bits: about 28 bits
#else
  return 1.0f / p;
#endif
}

// A block: kF bisection probes of one matrix's singular values (indices k0..k0+kF-1, ascending
// order), each with its interval [lo, hi].
struct Block {
  const float* d2;  // squared diagonal of the (scaled) bidiagonal matrix
  const float* e2;  // squared superdiagonal, e2[n-1] = 0
  vf lo, hi;
  vi index;   // k of each lane; lanes past the matrix's n hold -1 and are done from the start
  float floor;  // intervals narrower than this are done: ub 2^-60, where squares in float
                // would leave the normal range
  bool done;
};

// Sturm counts: c[b] = number of singular values below sqrt(x[b]) of block b's matrix, for
// nb <= NB blocks (of matrices of order n).
template <int NB>
void count(const Block* blk, int n, const vf* x, vi* c) {
  const float pivmin = 1e-30f;
  vf t[NB];
  for (int b = 0; b < NB; ++b) {
    t[b] = -x[b];
    c[b] = vi{};
  }
  for (int i = 0; i < n; ++i) {
    for (int b = 0; b < NB; ++b) {
      vf p = blk[b].d2[i] + t[b];
      c[b] -= (p < 0.0f);  // a true comparison is -1
      vf ap = p < 0.0f ? -p : p;
      p = ap < pivmin ? -pivmin : p;
      t[b] = blk[b].e2[i] * t[b] * reciprocal(p) - x[b];
    }
  }
}

// One halving of the interval of every lane of the NB blocks; marks the blocks whose every
// interval is one unit in the last place wide (or below the block's floor) done.
template <int NB>
void halve(Block* blk, int n) {
  vf mid[NB], x[NB];
  vi c[NB];
  for (int b = 0; b < NB; ++b) {
    mid[b] = 0.5f * (blk[b].lo + blk[b].hi);
    x[b] = mid[b] * mid[b];
  }
  count<NB>(blk, n, x, c);
  for (int b = 0; b < NB; ++b) {
    // c values lie below mid: the (k+1)-th smallest is below mid iff c > k
    vi below = c[b] > blk[b].index;
    blk[b].hi = below ? mid[b] : blk[b].hi;
    blk[b].lo = below ? blk[b].lo : mid[b];
    vf m2 = 0.5f * (blk[b].lo + blk[b].hi);
    vi fin = (m2 == blk[b].lo) | (m2 == blk[b].hi) | ((blk[b].hi - blk[b].lo) <= blk[b].floor) |
             (blk[b].index < 0);
    bool done = true;
    for (int l = 0; l < kF; ++l) done &= (fin[l] != 0);
    blk[b].done = done;
  }
}

void halve_any(Block* blk, int nb, int n) {
  switch (nb) {
    case 1: halve<1>(blk, n); break;
    case 2: halve<2>(blk, n); break;
    case 3: halve<3>(blk, n); break;
    case 4: halve<4>(blk, n); break;
    case 5: halve<5>(blk, n); break;
    case 6: halve<6>(blk, n); break;
    case 7: halve<7>(blk, n); break;
    default: halve<8>(blk, n); break;
  }
}

// Bisection of nb <= 8 blocks to convergence; blocks that are done drop out, so the probes of
// values that take long (the smallest, relative to the largest) do not hold the others.
void bisect(Block* blk, int nb, int n) {
  Block active[8];
  int where[8];
  for (int iter = 0; iter < 200; ++iter) {
    int na = 0;
    for (int b = 0; b < nb; ++b)
      if (!blk[b].done) {
        where[na] = b;
        active[na++] = blk[b];
      }
    if (na == 0) return;
    halve_any(active, na, n);
    for (int q = 0; q < na; ++q) blk[where[q]] = active[q];
  }
}

// Starting intervals: the counts at an even grid of as many points as a matrix has lanes
// bracket every singular value between two neighbouring points (per = blocks per matrix).
template <int NB>
void start(Block* blk, int n, int per, float* grid, int32_t* counts) {
  vf x[NB];
  vi c[NB];
  const int lanes = per * kF;
  for (int b = 0; b < NB; ++b) {
    const int q = b % per;
    const float ub = blk[b].hi[0];
    for (int l = 0; l < kF; ++l) {
      const float g = ub * static_cast<float>(q * kF + l + 1) / static_cast<float>(lanes + 1);
      x[b][l] = g * g;
    }
  }
  count<NB>(blk, n, x, c);
  for (int b0 = 0; b0 < NB; b0 += per) {  // one matrix: blocks b0..b0+per-1
    const float ub = blk[b0].hi[0];
    for (int q = 0; q < per; ++q)
      for (int l = 0; l < kF; ++l) {
        grid[q * kF + l] = std::sqrt(x[b0 + q][l]);
        counts[q * kF + l] = c[b0 + q][l];
      }
    int j = 0;  // first grid point whose count exceeds k
    for (int k = 0; k < n; ++k) {
      while (j < lanes && counts[j] <= k) ++j;
      Block& b = blk[b0 + k / kF];
      b.lo[k % kF] = (j > 0) ? grid[j - 1] : 0.0f;
      b.hi[k % kF] = (j < lanes) ? grid[j] : ub;
    }
  }
}

void start_any(Block* blk, int nb, int n, int per, float* grid, int32_t* counts) {
  switch (nb) {
    case 1: start<1>(blk, n, per, grid, counts); break;
    case 2: start<2>(blk, n, per, grid, counts); break;
    case 3: start<3>(blk, n, per, grid, counts); break;
    case 4: start<4>(blk, n, per, grid, counts); break;
    case 5: start<5>(blk, n, per, grid, counts); break;
    case 6: start<6>(blk, n, per, grid, counts); break;
    case 7: start<7>(blk, n, per, grid, counts); break;
    default: start<8>(blk, n, per, grid, counts); break;
  }
}

// All blocks, a few whole matrices (per blocks each) at a time; a matrix of more than 8 blocks
// goes 8 of its blocks at a time, from [0, ub].
void bisect_blocks(Block* blk, int nb, int n, int per, float* grid, int32_t* counts) {
  if (per > 8) {
    for (int b0 = 0; b0 < nb; b0 += 8) bisect(blk + b0, std::min(8, nb - b0), n);
    return;
  }
  const int step = (8 / per) * per;
  for (int b0 = 0; b0 < nb; b0 += step) {
    const int k = std::min(step, nb - b0);
    start_any(blk + b0, k, n, per, grid, counts);
    bisect(blk + b0, k, n);
  }
}

// ------------------------------------------------------------------ driver

struct Workspace {
  std::vector<double> a, v, w, z, u, s, d, e;
  std::vector<float> d2, e2, grid;
  std::vector<double> scale;
  std::vector<int32_t> counts;
  std::vector<int> status;  // 0 ok, 1 zero matrix, 2 non-finite
  std::vector<Block> blocks;
};

// Singular values of `count` row-major r x c matrices, descending, into out (count x min(r, c)).
void batch_values(const float* in, int64_t count, int r, int c, float* out, Workspace& ws) {
  const int m = std::max(r, c), n = std::min(r, c);
  const int ld = (m + kD - 1) / kD * kD;
  ws.a.assign(static_cast<size_t>(ld) * n, 0.0);
  ws.u.resize(n);
  ws.s.resize(n);
  ws.d.resize(n);
  ws.e.resize(n);
  ws.v.resize(ld);
  ws.w.resize(ld);
  ws.z.resize(ld);
  // Matrices go through the bisection a group at a time, so their probes fill the registers.
  const int per_matrix = (n + kF - 1) / kF;
  const int group = std::max<int64_t>(1, std::min<int64_t>(count, std::max(1, 8 / per_matrix)));
  ws.d2.resize(static_cast<size_t>(group) * n);
  ws.e2.resize(static_cast<size_t>(group) * n);
  ws.scale.resize(group);
  ws.grid.resize(static_cast<size_t>(per_matrix) * kF);
  ws.counts.resize(static_cast<size_t>(per_matrix) * kF);
  ws.status.resize(group);
  ws.blocks.resize(static_cast<size_t>(group) * per_matrix);

  for (int64_t g0 = 0; g0 < count; g0 += group) {
    const int gn = static_cast<int>(std::min<int64_t>(group, count - g0));
    int nb = 0;
    for (int q = 0; q < gn; ++q) {
      const float* src = in + (g0 + q) * static_cast<int64_t>(r) * c;
      double* a = ws.a.data();
      bool finite = true;
      // Row-major (r, c) is column-major (c, r), the transpose, with the same singular values;
      // work on the tall one (m >= n), columns padded to ld with zeros.
      if (c >= r) {
        for (int j = 0; j < r; ++j) {
          for (int i = 0; i < c; ++i) {
            float val = src[static_cast<std::ptrdiff_t>(j) * c + i];
            finite &= std::isfinite(val);
            a[static_cast<std::ptrdiff_t>(j) * ld + i] = val;
          }
          for (int i = c; i < ld; ++i) a[static_cast<std::ptrdiff_t>(j) * ld + i] = 0.0;
        }
      } else {
        for (int j = 0; j < c; ++j) {
          for (int i = 0; i < r; ++i) {
            float val = src[static_cast<std::ptrdiff_t>(i) * c + j];
            finite &= std::isfinite(val);
            a[static_cast<std::ptrdiff_t>(j) * ld + i] = val;
          }
          for (int i = r; i < ld; ++i) a[static_cast<std::ptrdiff_t>(j) * ld + i] = 0.0;
        }
      }
      float* d2 = ws.d2.data() + static_cast<size_t>(q) * n;
      float* e2 = ws.e2.data() + static_cast<size_t>(q) * n;
      ws.status[q] = finite ? 0 : 2;
      if (!finite) continue;
      bidiagonalize(a, m, n, ld, ws.d.data(), ws.e.data(), ws.v.data(), ws.w.data(), ws.z.data(),
                    ws.u.data(), ws.s.data());
      // Scale to a largest entry near one (by a power of two, exactly), then square in float.
      double big = 0.0;
      for (int i = 0; i < n; ++i) big = std::max(big, std::fabs(ws.d[i]));
      for (int i = 0; i + 1 < n; ++i) big = std::max(big, std::fabs(ws.e[i]));
      if (big == 0.0) {
        ws.status[q] = 1;
        continue;
      }
      int ex;
      std::frexp(big, &ex);
      ws.scale[q] = std::ldexp(1.0, ex);
      const double inv = std::ldexp(1.0, -ex);
      float ub = 0.0f;
      for (int i = 0; i < n; ++i) {
        const float di = static_cast<float>(ws.d[i] * inv);
        const float ei = (i + 1 < n) ? static_cast<float>(ws.e[i] * inv) : 0.0f;
        const float ep = (i > 0) ? static_cast<float>(ws.e[i - 1] * inv) : 0.0f;
        d2[i] = di * di;
        e2[i] = ei * ei;
        ub = std::max(ub, std::fabs(di) + std::max(std::fabs(ei), std::fabs(ep)));
      }
      ub *= 1.0001f;  // strictly above the largest singular value
      for (int p = 0; p < per_matrix; ++p) {
        Block& b = ws.blocks[nb++];
        b.d2 = d2;
        b.e2 = e2;
        for (int l = 0; l < kF; ++l) {
          int k = p * kF + l;
          b.index[l] = (k < n) ? k : -1;
          b.lo[l] = 0.0f;
          b.hi[l] = ub;
        }
        b.floor = ub * 0x1p-60f;
        b.done = false;
      }
    }
    bisect_blocks(ws.blocks.data(), nb, n, per_matrix, ws.grid.data(), ws.counts.data());
    int bi = 0;
    for (int q = 0; q < gn; ++q) {
      float* s = out + (g0 + q) * static_cast<int64_t>(n);
      if (ws.status[q] != 0) {
        const float fill = ws.status[q] == 1 ? 0.0f : std::numeric_limits<float>::quiet_NaN();
        for (int k = 0; k < n; ++k) s[k] = fill;
        continue;
      }
      for (int p = 0; p < per_matrix; ++p, ++bi) {
        const Block& b = ws.blocks[bi];
        for (int l = 0; l < kF; ++l) {
          int k = p * kF + l;
          // an interval still reaching down to 0 is below the floor: the value is zero to
          // within ub 2^-60
          const double mid = (b.lo[l] == 0.0f) ? 0.0 : 0.5 * (b.lo[l] + b.hi[l]);
          if (k < n) s[n - 1 - k] = static_cast<float>(mid * ws.scale[q]);
        }
      }
    }
  }
}

}  // namespace

extern "C" void dynamics_svdvals_batch(const float* in, int64_t count, int r, int c, float* out) {
  Workspace ws;
  if (r > 0 && c > 0 && count > 0) batch_values(in, count, r, c, out, ws);
}

namespace ffi = xla::ffi;

static ffi::Error SvdvalsImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> s) {
  auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("svdvals: the input must be a matrix");
  const int r = static_cast<int>(dims[dims.size() - 2]);
  const int c = static_cast<int>(dims[dims.size() - 1]);
  int64_t count = 1;
  for (size_t i = 0; i + 2 < dims.size(); ++i) count *= dims[i];
  dynamics_svdvals_batch(x.typed_data(), count, r, c, s->typed_data());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynamicsSvdvals, SvdvalsImpl,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

// ------------------------------------------------------------------ adjacent gradients

// Arguments: L gradients g_k and L previous gradients p_k (each (runs..., ...), float32);
// results: dots (runs..., L) = <p_k, g_k>, squares (runs..., L) = |g_k|^2, and the L new
// previous gradients (g_k, written over p_k: the caller aliases them). One pass over each
// gradient, instead of two reductions and a copy into the loop state.
static ffi::Error GradPairsImpl(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const size_t L = args.size() / 2;
  if (args.size() != 2 * L || rets.size() != L + 2)
    return ffi::Error::InvalidArgument("grad_pairs: expected 2L arguments and L + 2 results");
  auto dots = rets.get<ffi::Buffer<ffi::F32>>(0);
  auto sqs = rets.get<ffi::Buffer<ffi::F32>>(1);
  if (!dots.has_value() || !sqs.has_value()) return ffi::Error::Internal("grad_pairs: results");
  float* dot = (*dots)->typed_data();
  float* sq = (*sqs)->typed_data();
  const int64_t runs = static_cast<int64_t>((*dots)->element_count() / L);
  for (size_t k = 0; k < L; ++k) {
    auto g = args.get<ffi::Buffer<ffi::F32>>(k);
    auto p = args.get<ffi::Buffer<ffi::F32>>(L + k);
    auto out = rets.get<ffi::Buffer<ffi::F32>>(2 + k);
    if (!g.has_value() || !p.has_value() || !out.has_value())
      return ffi::Error::Internal("grad_pairs: buffers");
    const int64_t size = static_cast<int64_t>(g->element_count()) / runs;
    const float* gd = g->typed_data();
    const float* pd = p->typed_data();
    float* od = (*out)->typed_data();
    for (int64_t r = 0; r < runs; ++r) {
      const float* gr = gd + r * size;
      const float* pr = pd + r * size;
      float* orow = od + r * size;
      vf ad0 = {}, ad1 = {}, as0 = {}, as1 = {};
      int64_t i = 0;
      for (; i + 2 * kF <= size; i += 2 * kF) {
        vf g0, g1, p0, p1;
        __builtin_memcpy(&g0, gr + i, sizeof g0);
        __builtin_memcpy(&g1, gr + i + kF, sizeof g1);
        __builtin_memcpy(&p0, pr + i, sizeof p0);
        __builtin_memcpy(&p1, pr + i + kF, sizeof p1);
        ad0 += g0 * p0;
        ad1 += g1 * p1;
        as0 += g0 * g0;
        as1 += g1 * g1;
        if (orow != gr) {
          __builtin_memcpy(orow + i, &g0, sizeof g0);
          __builtin_memcpy(orow + i + kF, &g1, sizeof g1);
        }
      }
      double d = 0.0, s2 = 0.0;
      for (int l = 0; l < kF; ++l) {
        d += static_cast<double>(ad0[l]) + ad1[l];
        s2 += static_cast<double>(as0[l]) + as1[l];
      }
      for (; i < size; ++i) {
        d += static_cast<double>(gr[i]) * pr[i];
        s2 += static_cast<double>(gr[i]) * gr[i];
        if (orow != gr) orow[i] = gr[i];
      }
      dot[r * L + k] = static_cast<float>(d);
      sq[r * L + k] = static_cast<float>(s2);
    }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynamicsGradPairs, GradPairsImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets());
