// Singular values of a batch of small dense float32 matrices, for XLA's CPU backend: an XLA FFI
// custom call, compiled and registered by dynamics/native.py.
//
// Each matrix X (m x n, m >= n: the matrix or its transpose) gives its Gram matrix X^T X in
// double precision (products of float32 entries are exact in double), which Householder
// reflections reduce to symmetric tridiagonal form T; T plus a shift of a few units of double
// rounding is factored as B^T B with B upper bidiagonal, and every singular value of B is found
// by bisection on Sturm counts of B^T B - x I, taken with the differential stationary qd
// recurrence, which works on the entries of B (never forming B^T B) and is relatively accurate;
// the shift is then taken off the squares. The Gram matrix costs a singular value s_i an
// absolute error of about sqrt(eps_double) s_1 = 1e-8 s_1 where s_i is near zero (and
// eps_double s_1^2 / s_i elsewhere), below what rounding the matrix's own entries to float32
// (up to 6e-8 s_1) already leaves uncertain; the gain is flops and passes: the tridiagonal
// reduction updates half of a symmetric matrix, one pass per reflector, where a bidiagonal one
// makes two passes over the whole matrix. The bisection probes of all singular values of several
// matrices advance together in vector registers, so the recurrence's latency overlaps across
// probes. At the sizes of a training run's layers (tens to a few hundred rows) LAPACK's routines
// spend most of their time in call overhead and short scalar loops; this kernel is several
// times faster at the same accuracy (tests/test_native.py).
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

// ------------------------------------------------------------------ reduction

// The Gram matrix G = X^T X of the m x n matrix X (m >= n) held row-major in x, rows of ldn
// doubles (columns n..ldn-1 zero), into g (ldn x ldn, column-major) as the tridiagonal
// reduction holds it: column j from row (j / kD) kD on (the lower triangle and the diagonal
// blocks; rows n..ldn-1 zero). Products of float32 entries are exact in double, so G is correct
// to a few units of double rounding. A kD-column block at a time, NV vectors of rows at once in
// registers (one tile: NV x kD vector sums, one broadcast entry per column and row of X).
template <int NV>
void gram_tile(const double* x, int m, int ldn, int j0, int i0, double* g) {
  vd acc[NV][kD];
  for (int q = 0; q < NV; ++q)
    for (int c = 0; c < kD; ++c) acc[q][c] = vd{};
  for (int r = 0; r < m; ++r) {
    const double* xr = x + static_cast<std::ptrdiff_t>(r) * ldn;
    vd xv[NV];
    for (int q = 0; q < NV; ++q) xv[q] = load(xr + i0 + q * kD);
    for (int c = 0; c < kD; ++c) {
      const double s = xr[j0 + c];
      for (int q = 0; q < NV; ++q) acc[q][c] += xv[q] * s;
    }
  }
  for (int c = 0; c < kD; ++c)
    for (int q = 0; q < NV; ++q)
      store(g + static_cast<std::ptrdiff_t>(j0 + c) * ldn + i0 + q * kD, acc[q][c]);
}

constexpr int kGramRows = (kD == 4) ? 3 : 2;  // vectors of rows per tile: 3 x 4 or 2 x 8 sums

void gram(const double* x, int m, int n, int ldn, double* g) {
  for (int j0 = 0; j0 < n; j0 += kD) {
    int i0 = j0;
    for (; i0 + kGramRows * kD <= ldn; i0 += kGramRows * kD)
      gram_tile<kGramRows>(x, m, ldn, j0, i0, g);
    if (i0 + 2 * kD <= ldn) {
      gram_tile<2>(x, m, ldn, j0, i0, g);
      i0 += 2 * kD;
    }
    if (i0 < ldn) gram_tile<1>(x, m, ldn, j0, i0, g);
  }
  // (the last block's columns past n, zero, land in g's padding columns)
}

// The symmetric matrix is held as its lower triangle and the diagonal blocks: column j from
// row (j / kD) kD on. One pass over rows [g0, g0 + NV kD) of columns j0..n-1 (their held part)
// applies the rank-2 update y_j -= v_j w + w_j v of one Householder step (kUpdate) and takes
// the product p = A c with the updated matrix: the held part of column j adds c_j y_j to p
// (rows from its block on) and y_j . c to p_j (rows from the next block on: the rest of row j),
// the latter as kD partial sums into t[j kD..] for the caller to add. Groups of rows go in
// order, so the first to reach column j is the one holding its diagonal block: it writes t[j],
// the groups below add to it.
template <int NV, bool kUpdate>
void sym_pass(double* a, int ld, int g0, int j0, int n, const double* v, const double* w,
              const double* c, double* p, double* t) {
  vd vv[NV], ww[NV], cc[NV], pp[NV];
  for (int q = 0; q < NV; ++q) {
    if (kUpdate) {
      vv[q] = load(v + g0 + q * kD);
      ww[q] = load(w + g0 + q * kD);
    }
    cc[q] = load(c + g0 + q * kD);
    pp[q] = vd{};
  }
  const int g1 = g0 + NV * kD;
  int j = j0;
  for (; j < std::min(g0, n); ++j) {  // columns left of the rows: all of them held
    double* y = a + static_cast<std::ptrdiff_t>(j) * ld + g0;
    const double fv = v[j], fw = w[j], fc = c[j];
    vd acc = {};
    for (int q = 0; q < NV; ++q) {
      vd yy = load(y + q * kD);
      if (kUpdate) {
        yy = yy - fv * ww[q] - fw * vv[q];
        store(y + q * kD, yy);
      }
      pp[q] += fc * yy;
      acc += cc[q] * yy;
    }
    store(t + static_cast<std::ptrdiff_t>(j) * kD, load(t + static_cast<std::ptrdiff_t>(j) * kD) + acc);
  }
  for (; j < std::min(g1, n); ++j) {  // columns among the rows: held from their block on
    double* y = a + static_cast<std::ptrdiff_t>(j) * ld + g0;
    const int qs = (j - g0) / kD;
    const double fv = v[j], fw = w[j], fc = c[j];
    vd acc = {};
    for (int q = 0; q < NV; ++q) {
      if (q < qs) continue;
      vd yy = load(y + q * kD);
      if (kUpdate) {
        yy = yy - fv * ww[q] - fw * vv[q];
        store(y + q * kD, yy);
      }
      pp[q] += fc * yy;
      if (q > qs) acc += cc[q] * yy;
    }
    store(t + static_cast<std::ptrdiff_t>(j) * kD, acc);  // the first group to reach column j
  }
  for (int q = 0; q < NV; ++q) store(p + g0 + q * kD, pp[q]);
}

template <int NV>
void update_pass(double* a, int ld, int g0, int j0, int n, const double* v, const double* w,
                 const double* c, double* p, double* t) {
  sym_pass<NV, true>(a, ld, g0, j0, n, v, w, c, p, t);
}
template <int NV>
void product_pass(double* a, int ld, int g0, int j0, int n, const double* c, double* p,
                  double* t) {
  sym_pass<NV, false>(a, ld, g0, j0, n, nullptr, nullptr, c, p, t);
}

// The passes over rows r0..ld-1, a group of up to kG vectors at a time (kG vectors each of
// v, w, c and p stay in registers).
constexpr int kG = (kD == 4) ? 2 : 4;  // 2 x 4 vectors of v, w, c, p in 16 registers (AVX2)
#define DYNAMICS_OVER_GROUPS(PASS, ...)                                       \
  for (int g0 = r0; g0 < ld; g0 += kG * kD) {                              \
    switch (std::min(kG, (ld - g0) / kD)) {                                \
      case 1: PASS<1>(a, ld, g0, __VA_ARGS__); break;                      \
      case 2: PASS<2>(a, ld, g0, __VA_ARGS__); break;                      \
      case 3: PASS<3>(a, ld, g0, __VA_ARGS__); break;                      \
      default: PASS<kG>(a, ld, g0, __VA_ARGS__); break;                    \
    }                                                                      \
  }

// p[j] += the sum of t[j kD..(j+1) kD) for j in [j0, n): a block of kD columns at a time as
// one transposition (kD = 4), so no sum runs along a vector.
inline void add_row_sums(const double* t, int j0, int n, double* p) {
  int j = j0;
#if defined(__has_builtin) && !defined(__AVX512F__)
#if __has_builtin(__builtin_shufflevector)
  for (; j + 4 <= n; j += 4) {
    const vd a = load(t + j * 4), b = load(t + j * 4 + 4), c = load(t + j * 4 + 8),
             d = load(t + j * 4 + 12);
    const vd ab = __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
    const vd cd = __builtin_shufflevector(c, d, 0, 4, 2, 6) + __builtin_shufflevector(c, d, 1, 5, 3, 7);
    const vd sums = __builtin_shufflevector(ab, cd, 0, 1, 4, 5) + __builtin_shufflevector(ab, cd, 2, 3, 6, 7);
    vd pj;
    __builtin_memcpy(&pj, p + j, sizeof pj);
    pj += sums;
    __builtin_memcpy(p + j, &pj, sizeof pj);
  }
#endif
#endif
  for (; j < n; ++j) p[j] += hsum(load(t + static_cast<std::ptrdiff_t>(j) * kD));
}

// Symmetric tridiagonal form of the symmetric n x n matrix held (as sym_pass describes)
// column-major in a, leading dimension ld (a multiple of kD, rows n..ld-1 zero); a is
// destroyed. Diagonal into d (n), subdiagonal into e (n - 1). Workspaces: v, z, w, p, c of ld
// doubles, t of n kD.
//
// Step k reflects column k below the subdiagonal (H = I - tau v v^T) and updates the trailing
// matrix A <- H A H = A - v w^T - w v^T, with p = tau A v and w = p - (tau/2)(p.v) v. The
// update runs in one pass over the trailing columns, which also takes the next step's p: the
// column that gives the next reflector is updated first. Rows above the trailing matrix are
// never read again, so the vector loops start at a block boundary and may leave them changed.
void tridiagonalize(double* a, int n, int ld, double* d, double* e, double* v, double* z,
                    double* w, double* p, double* c, double* t) {
  auto col = [&](int j) { return a + static_cast<std::ptrdiff_t>(j) * ld; };
  d[0] = a[0];
  if (n == 1) return;
  if (n == 2) {
    e[0] = col(0)[1];
    d[1] = col(1)[1];
    return;
  }
  // The reflector of column k (rows k+2.. into row k+1) into r (zero from row k+1's block up
  // to row k), its factor into tau (0: none), the subdiagonal entry into e[k].
  auto reflect = [&](int k, double* r, double& tau) {
    const double* x = col(k);
    const double tail = sumsq_from(x, k + 2, ld);
    const double alpha = x[k + 1];
    const int i0 = ((k + 1) / kD) * kD;
    for (int i = i0; i < ld; i += kD) store(r + i, load(x + i));
    for (int i = i0; i < k + 1; ++i) r[i] = 0.0;
    if (tail == 0.0) {
      e[k] = alpha;
      tau = 0.0;
      return;
    }
    const double beta = -std::copysign(std::sqrt(alpha * alpha + tail), alpha);
    r[k + 1] = alpha - beta;
    tau = 2.0 / (r[k + 1] * r[k + 1] + tail);
    e[k] = beta;
  };
  double tau;
  reflect(0, v, tau);
  {
    for (int i = 0; i < ld; ++i) c[i] = tau * v[i];
    const int r0 = 0;
    DYNAMICS_OVER_GROUPS(product_pass, 1, n, c, p, t)
    add_row_sums(t, 1, n, p);
  }
  for (int k = 0; k + 2 < n; ++k) {
    const int i0 = ((k + 1) / kD) * kD;  // the block holding row k+1
    vd acc = {};
    for (int i = i0; i < ld; i += kD) acc += load(p + i) * load(v + i);
    const double half = 0.5 * tau * hsum(acc);
    for (int i = i0; i < ld; i += kD) store(w + i, load(p + i) - half * load(v + i));
    // column k+1 first: it gives the next reflector
    double* y = col(k + 1);
    {
      const double fv = v[k + 1], fw = w[k + 1];
      for (int i = i0; i < ld; i += kD)
        store(y + i, load(y + i) - fv * load(w + i) - fw * load(v + i));
    }
    d[k + 1] = y[k + 1];
    const int r0 = ((k + 2) / kD) * kD;
    if (k + 3 == n) {  // the last step: no reflector follows
      e[k + 1] = y[k + 2];
      d[k + 2] = col(k + 2)[k + 2] - 2.0 * v[k + 2] * w[k + 2];
      break;
    }
    double tn;
    reflect(k + 1, z, tn);
    for (int i = r0; i < ld; ++i) c[i] = tn * z[i];
    DYNAMICS_OVER_GROUPS(update_pass, k + 2, n, v, w, c, p, t)
    add_row_sums(t, k + 2, n, p);
    std::swap(v, z);
    tau = tn;
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
  bool done;
};

// Sturm counts: c[b] = number of singular values below sqrt(x[b]) of block b's matrix, for
// nb <= NB blocks (of matrices of order n).
template <int NB>
void count(const Block* const* blk, int n, const vf* x, vi* c) {
  const float pivmin = 1e-30f;
  vf t[NB];
  for (int b = 0; b < NB; ++b) {
    t[b] = -x[b];
    c[b] = vi{};
  }
  for (int i = 0; i < n; ++i) {
    for (int b = 0; b < NB; ++b) {
      vf p = blk[b]->d2[i] + t[b];
      c[b] -= (p < 0.0f);  // a true comparison is -1
      vf ap = p < 0.0f ? -p : p;
      p = ap < pivmin ? -pivmin : p;
      t[b] = blk[b]->e2[i] * t[b] * reciprocal(p) - x[b];
    }
  }
}

// One halving of the interval of every lane of the NB blocks; marks the blocks whose every
// interval is one unit in the last place wide done (every value is at least sqrt(shift) > 0,
// so every interval closes to that).
template <int NB>
void halve(Block* const* blk, int n) {
  vf mid[NB], x[NB];
  vi c[NB];
  for (int b = 0; b < NB; ++b) {
    mid[b] = 0.5f * (blk[b]->lo + blk[b]->hi);
    x[b] = mid[b] * mid[b];
  }
  count<NB>(blk, n, x, c);
  for (int b = 0; b < NB; ++b) {
    // c values lie below mid: the (k+1)-th smallest is below mid iff c > k
    vi below = c[b] > blk[b]->index;
    blk[b]->hi = below ? mid[b] : blk[b]->hi;
    blk[b]->lo = below ? blk[b]->lo : mid[b];
    vf m2 = 0.5f * (blk[b]->lo + blk[b]->hi);
    vi fin = (m2 == blk[b]->lo) | (m2 == blk[b]->hi) |
             (blk[b]->index < 0);
    bool done = true;
    for (int l = 0; l < kF; ++l) done &= (fin[l] != 0);
    blk[b]->done = done;
  }
}

void halve_any(Block* const* blk, int nb, int n) {
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
  Block* active[8];
  for (int iter = 0; iter < 200; ++iter) {
    int na = 0;
    for (int b = 0; b < nb; ++b)
      if (!blk[b].done) active[na++] = blk + b;
    if (na == 0) return;
    halve_any(active, na, n);
  }
}

// Starting intervals: the counts at an even grid of as many points as a matrix has lanes
// bracket every singular value between two neighbouring points (per = blocks per matrix).
template <int NB>
void start(Block* blk, int n, int per, float* grid, int32_t* counts) {
  vf x[NB];
  vi c[NB];
  const int lanes = per * kF;
  const Block* ptr[NB];
  for (int b = 0; b < NB; ++b) {
    ptr[b] = blk + b;
    const int q = b % per;
    const float ub = blk[b].hi[0];
    for (int l = 0; l < kF; ++l) {
      const float g = ub * static_cast<float>(q * kF + l + 1) / static_cast<float>(lanes + 1);
      x[b][l] = g * g;
    }
  }
  count<NB>(ptr, n, x, c);
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

typedef float vh __attribute__((vector_size(kD * 4)));  // kD floats

// X, the tall one of the row-major r x c matrix src (c <= r) and its transpose (c > r), which
// have the same singular values, into x: row-major, rows of ld doubles (columns past min(r, c)
// are left as they are: zero). False if an entry is not finite (x * 0 is NaN then).
bool load_tall(const float* src, int r, int c, int ld, double* x) {
  vd bad = {};
  double bad1 = 0.0;
  for (int i = 0; i < r; ++i) {
    const float* row = src + static_cast<std::ptrdiff_t>(i) * c;
    int j = 0;
    for (; j + kD <= c; j += kD) {
      vh h;
      __builtin_memcpy(&h, row + j, sizeof h);
      const vd xv = __builtin_convertvector(h, vd);
      bad += xv * 0.0;
      if (c <= r) {
        store(x + static_cast<std::ptrdiff_t>(i) * ld + j, xv);
      } else {
        for (int l = 0; l < kD; ++l) x[static_cast<std::ptrdiff_t>(j + l) * ld + i] = xv[l];
      }
    }
    for (; j < c; ++j) {
      const double val = row[j];
      bad1 += val * 0.0;
      x[(c <= r) ? static_cast<std::ptrdiff_t>(i) * ld + j : static_cast<std::ptrdiff_t>(j) * ld + i] = val;
    }
  }
  return hsum(bad) == 0.0 && bad1 == 0.0;
}

struct Workspace {
  std::vector<double> x, g, v, z, w, p, c, t, d, e;
  std::vector<float> d2, e2, grid;
  std::vector<double> scale, shift;
  std::vector<int32_t> counts;
  std::vector<int> status;  // 0 ok, 1 zero matrix, 2 non-finite
  std::vector<Block> blocks;
};

// Singular values of `count` row-major r x c matrices, descending, into out (count x min(r, c)).
void batch_values(const float* in, int64_t count, int r, int c, float* out, Workspace& ws) {
  const int m = std::max(r, c), n = std::min(r, c);
  int ld = (n + kD - 1) / kD * kD;
  if (ld % 128 == 0) ld += kD;  // not a multiple of 1 KiB: columns would share cache sets
  ws.x.assign(static_cast<size_t>(m) * ld, 0.0);
  ws.g.resize(static_cast<size_t>(ld) * ld);
  for (auto* b : {&ws.v, &ws.z, &ws.w, &ws.p, &ws.c}) b->assign(ld, 0.0);
  ws.t.resize(static_cast<size_t>(n) * kD);
  ws.d.resize(n);
  ws.e.resize(n);
  // Matrices go through the bisection a group at a time, so their probes fill the registers.
  const int per_matrix = (n + kF - 1) / kF;
  const int group = std::max<int64_t>(1, std::min<int64_t>(count, std::max(1, 8 / per_matrix)));
  ws.d2.resize(static_cast<size_t>(group) * n);
  ws.e2.resize(static_cast<size_t>(group) * n);
  ws.scale.resize(group);
  ws.shift.resize(group);
  ws.grid.resize(static_cast<size_t>(per_matrix) * kF);
  ws.counts.resize(static_cast<size_t>(per_matrix) * kF);
  ws.status.resize(group);
  ws.blocks.resize(static_cast<size_t>(group) * per_matrix);

  for (int64_t g0 = 0; g0 < count; g0 += group) {
    const int gn = static_cast<int>(std::min<int64_t>(group, count - g0));
    int nb = 0;
    for (int q = 0; q < gn; ++q) {
      const float* src = in + (g0 + q) * static_cast<int64_t>(r) * c;
      const bool finite = load_tall(src, r, c, ld, ws.x.data());
      float* d2 = ws.d2.data() + static_cast<size_t>(q) * n;
      float* e2 = ws.e2.data() + static_cast<size_t>(q) * n;
      ws.status[q] = finite ? 0 : 2;
      if (!finite) continue;
      gram(ws.x.data(), m, n, ld, ws.g.data());
      tridiagonalize(ws.g.data(), n, ld, ws.d.data(), ws.e.data(), ws.v.data(), ws.z.data(),
                     ws.w.data(), ws.p.data(), ws.c.data(), ws.t.data());
      // T = Q^T X^T X Q, whose eigenvalues are the squared singular values. Scale it by a power
      // of four (exactly) to a largest eigenvalue at most one, shift it by a few units of
      // double rounding so it is safely positive definite, and factor T + shift I = B^T B with
      // B upper bidiagonal (LDL^T, stable for a definite matrix): the bisection then finds the
      // singular values of B, sqrt(s^2 + shift), to float precision relative to themselves.
      double big = 0.0;  // Gershgorin bound of the largest eigenvalue
      for (int i = 0; i < n; ++i)
        big = std::max(big, std::fabs(ws.d[i]) + (i + 1 < n ? std::fabs(ws.e[i]) : 0.0) +
                                (i > 0 ? std::fabs(ws.e[i - 1]) : 0.0));
      if (big == 0.0) {
        ws.status[q] = 1;
        continue;
      }
      int ex2;
      std::frexp(big, &ex2);  // big < 2^ex2
      const int ex = (ex2 >= 0) ? (ex2 + 1) / 2 : -((-ex2) / 2);  // 4^ex >= 2^ex2
      ws.scale[q] = std::ldexp(1.0, ex);
      const double inv = std::ldexp(1.0, -2 * ex);
      const double shift = 4.0 * n * std::numeric_limits<double>::epsilon() * big * inv;
      ws.shift[q] = shift;
      double piv = ws.d[0] * inv + shift;
      for (int i = 0; i < n; ++i) {
        piv = std::max(piv, shift);  // (never needed for a definite matrix)
        const double ei = (i + 1 < n) ? ws.e[i] * inv : 0.0;
        const double f = ei * ei / piv;
        d2[i] = static_cast<float>(piv);
        e2[i] = static_cast<float>(f);
        if (i + 1 < n) piv = ws.d[i + 1] * inv + shift - f;
      }
      const float ub = static_cast<float>(std::sqrt(big * inv + shift)) * 1.0001f;
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
          const double mid = 0.5 * (b.lo[l] + b.hi[l]);
          const double s2 = std::max(mid * mid - ws.shift[q], 0.0);
          if (k < n) s[n - 1 - k] = static_cast<float>(std::sqrt(s2) * ws.scale[q]);
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
